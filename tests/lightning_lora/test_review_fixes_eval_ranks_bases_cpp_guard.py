"""Per-rank validation metrics under AdapterCallback(eval_ranks=...), PEFT's
saved embedding base weights in a lower precision than the model's,
and the C++ path's guard on torch's private forward-AD level."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

import lightning_lora as ll
from lightning_lora.core import multi
from lightning_lora.core.state import WEIGHTS_NAME
from lightning_lora.methods.dylora import set_rank
from test_lego_transfer_multi_argument_checks import _TinyLM  # the test directory is on sys.path
from lightning_lora.tasks.modules import SequenceClassifier

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
]


# ---- eval_ranks: every rank's metrics from its own passes ----------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(torch.tanh(self.body(x))))


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([i[k] for i in items]) for k in ("x", "labels")}


def _dylora_validation(module: SequenceClassifier, g: torch.Generator, eval_ranks: list[int],
                       root) -> pl.Trainer:
    """DyLoRA r = 4 on ``module``'s body, moved away from its init (B = 0) so that the ranks differ,
    and a validate-only Trainer whose callback also validates at ``eval_ranks``."""
    ll.inject_adapter(module.model, "dylora", r=4, target_modules=["body"])
    with torch.no_grad():
        for p in ll.trainable_parameters(module.model):
            p.add_(torch.randn(p.shape, generator=g) * 0.8)
    cb = ll.AdapterCallback("dylora", r=4, target_modules=["body"], target="model", eval_ranks=eval_ranks)
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root),
                      callbacks=[cb])


def test_eval_ranks_log_each_rank_s_own_loss_and_metrics(tmp_path):
    """SequenceClassifier logs its loss and metrics as torchmetrics objects (val_loss since session
    22, for DDP sums): the callback's extra pass at each other rank updated the same objects, so
    ``val_loss`` (the deployed rank's), ``val_loss_rank1`` and ``val_loss_rank4`` were all one mean
    over every rank's passes (DyLoRA validates at every rank by default)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(25, 4, generator=g)
    data = [{"x": x[i], "labels": (x[i, 0] * x[i, 1] > 0).long()} for i in range(25)]
    loader = DataLoader(data, batch_size=4, collate_fn=_collate)
    module = SequenceClassifier(_Net(), metrics=("accuracy", "f1"))
    trainer = _dylora_validation(module, g, [1, 4], tmp_path)
    (res,) = trainer.validate(module, loader, verbose=False)

    expected = {}
    module.eval()
    for b in (1, 4):
        set_rank(module.model, b)
        with torch.no_grad():
            logits = torch.cat([module({"x": batch["x"]}) for batch in loader])
        y = torch.stack([d["labels"] for d in data])
        tp = int(((logits.argmax(-1) == 1) & (y == 1)).sum())
        expected[b] = {"loss": float(F.cross_entropy(logits, y)),
                       "accuracy": float((logits.argmax(-1) == y).float().mean()),
                       "f1": 2 * tp / (int((logits.argmax(-1) == 1).sum()) + int((y == 1).sum()))}
    assert abs(expected[1]["loss"] - expected[4]["loss"]) > 1e-3  # the ranks do differ
    assert expected[1]["accuracy"] != expected[4]["accuracy"]
    for b in (1, 4):
        for name in ("loss", "accuracy", "f1"):
            assert res[f"val_{name}_rank{b}"] == pytest.approx(expected[b][name], abs=1e-6), (b, name, res)
    # the plain names are the deployed rank's (4), not a mean over the ranks
    for name in ("loss", "accuracy", "f1"):
        assert res[f"val_{name}"] == pytest.approx(expected[4][name], abs=1e-6), (name, res)
    # the module's own metric objects saw only the plain passes; nothing else was registered on it
    assert [n for n, _ in module.named_children()] == ["model", "val_metrics", "test_metrics", "val_loss_mean",
                                                      "test_loss_mean"]


def test_eval_ranks_per_rank_metrics_start_afresh_each_epoch(tmp_path):
    """Two validation runs in a row give the same per-rank values: the rank copies do not carry the
    first run's states into the second."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 4, generator=g)
    data = [{"x": x[i], "labels": (x[i, 0] > 0).long()} for i in range(10)]
    loader = DataLoader(data, batch_size=3, collate_fn=_collate)
    trainer = _dylora_validation(module := SequenceClassifier(_Net()), g, [2, 4], tmp_path)
    first = trainer.validate(module, loader, verbose=False)
    second = trainer.validate(module, loader, verbose=False)
    assert first == second
    assert first[0]["val_loss_rank2"] != pytest.approx(first[0]["val_loss_rank4"], abs=1e-4)


# ---- load_adapter_as: PEFT's saved embedding base weight in a lower precision --------------------
def test_load_adapter_as_accepts_the_model_s_base_weight_saved_in_bfloat16(tmp_path):
    """Trained and saved by PEFT in bf16 (its lm_head base weight saved in bf16), loaded into the same
    model in fp32: the saved weight is the model's rounded to bf16, not another base; it was refused as
    'differ from this model's'. A weight that is not the model's rounding stays refused."""
    src = _TinyLM()
    multi.add_adapter(src, "b", "lora", r=2, target_modules=["body", "lm_head"])
    path = multi.save_adapters(src, tmp_path)["b"]
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = "base_model.model.lm_head.base_layer.weight"
    weight = src.lm_head.base_layer.weight.detach()
    assert not torch.equal(weight.bfloat16().float(), weight)  # bf16 does round these values
    save_file({**tensors, key: weight.bfloat16()}, str(path / WEIGHTS_NAME), metadata=meta)
    m = _TinyLM()
    multi.add_adapter(m, "a", "lora", r=2, target_modules=["body"])
    multi.load_adapter_as(m, path, "b")
    assert multi.adapter_names(m) == ["a", "b"]
    assert torch.equal(m.lm_head.base_layer.weight, weight)  # the model's fp32 base is kept

    save_file({**tensors, key: (weight + 0.5).bfloat16()}, str(path / WEIGHTS_NAME), metadata=meta)
    m = _TinyLM()
    multi.add_adapter(m, "a", "lora", r=2, target_modules=["body"])
    with pytest.raises(ll.AdapterFormatError, match="differ from this model's"):
        multi.load_adapter_as(m, path, "b")


def test_cpp_path_stands_down_where_torch_lacks_the_private_forward_ad_level(monkeypatch):
    """The C++ path's forward-AD check reads torch's private ``forward_ad._current_level``; a torch
    without it must run the Python functions, not fail every forward with AttributeError."""
    from lightning_lora.methods import lora as lora_mod

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    ll.inject_adapter(model, "lora", r=2, target_modules=["0"])
    x = torch.randn(3, 8)
    expected = model(x)

    class Unusable:  # stands in for the compiled module: any use of it fails the test
        def __getattr__(self, name):
            raise AssertionError(f"the C++ path was taken ({name})")

    monkeypatch.setattr(lora_mod, "_CPP", Unusable())
    with pytest.raises(AssertionError, match="C\\+\\+ path was taken"):
        model(x)  # the check is live: with the attribute present the (fake) C++ path is entered
    monkeypatch.delattr(torch.autograd.forward_ad, "_current_level")
    assert torch.equal(model(x), expected)
