"""LoRA-LEGO, Trans-LoRA and named-adapter loading: counts that mean "do nothing"
are refused instead of giving an empty or un-iterated result, a classifier mismatch is found before
the synthetic data is generated, and a saved PEFT base weight is checked when loading by name."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_lora import transfer as tr
from lightning_lora.core import multi
from lightning_lora.core.state import WEIGHTS_NAME, AdapterFormatError
from lightning_lora.merge import baselines as mb
from lightning_lora.merge import lego
from test_audit_merge_fed_transfer import _two_adapters  # the test directory is on sys.path


# ---- LoRA-LEGO: max_iter / n_init ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(max_iter=0), r"^max_iter must be >= 1, got 0"),  # returned the k-means++ seeds as clusters
    (dict(max_iter=-3), r"^max_iter must be >= 1, got -3"),
    (dict(max_iter=2.5), r"^max_iter must be a whole number"),
    (dict(n_init=0), r"^n_init must be >= 1, got 0"),
    (dict(n_init=2.5), r"^n_init must be a whole number"),  # was a TypeError from range()
])
def test_lego_refuses_max_iter_and_n_init_below_one(kwargs, message):
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        lego.kmeans(x, 2, **kwargs)
    m = _two_adapters()
    loras = [mb.lora_factors(layer) for layer in multi.named_adapter_layers(m, "a").values()][:1]
    with pytest.raises(ValueError, match=message):
        lego.lego_merge(loras, 2, **kwargs)
    with pytest.raises(ValueError, match=message):  # before any layer: no "layer 0:" prefix
        lego.lego_merge_adapters(m, ["a", "b"], "out", **kwargs)
    assert multi.adapter_names(m) == ["a", "b"]


def test_lego_max_iter_one_still_runs_and_more_iterations_can_move_the_centroids():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    c1, l1 = lego.kmeans(x, 4, max_iter=1)
    c_many, l_many = lego.kmeans(x, 4, max_iter=100)
    assert c1.shape == c_many.shape == (4, 3) and l1.shape == l_many.shape == (40,)
    # the defaults are unchanged: an explicit max_iter=100, n_init=1 is the default call
    c_def, l_def = lego.kmeans(x, 4)
    assert torch.equal(c_def, c_many) and torch.equal(l_def, l_many)


# ---- Trans-LoRA: max_batches, MLM generator counts ----------------------------------------------
@pytest.mark.parametrize("max_batches, message", [
    (0, r"max_batches must be None or >= 1, got 0"),  # returned [] as if the model had produced nothing
    (-1, r"max_batches must be None or >= 1, got -1"),
    (1.5, r"max_batches must be None or a whole number"),
])
def test_generate_synthetic_refuses_max_batches_below_one(max_batches, message):
    # generator and tokenizer are never touched: the checks come first
    with pytest.raises(ValueError, match=message):
        tr.generate_synthetic(None, None, ["a good film"], 2, max_batches=max_batches)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), r"batch_size must be >= 1, got 0"),  # failed deep: "max() arg is an empty sequence"
    (dict(n=2.5), r"n must be a whole number"),  # a TypeError from range()
    (dict(n=-1), r"n must be >= 0, got -1"),
    (dict(window=0), r"window must be >= 1, got 0"),
])
def test_generate_synthetic_mlm_checks_its_counts_before_sampling(kwargs, message):
    args = dict(n=2, encode=lambda s: [ord(c) for c in s], decode=lambda ids: "".join(map(chr, ids.tolist())),
                mask_token_id=0, allowed_ids=torch.tensor([65, 67, 71, 84]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):  # the MLM (None here) is never called
        tr.generate_synthetic_mlm(None, ["ACGTACGT"], **args)


# ---- Trans-LoRA: class-count mismatch before generation -----------------------------------------
def _classifier(num_labels: int, seed: int) -> tr.TextClassifier:
    from lightning_lora import inject_adapter
    from lightning_lora.tasks import load_tiny_bert

    model, tok = load_tiny_bert(num_labels=num_labels, seed=seed)
    inject_adapter(model, "lora", r=2, target_modules=["query"], modules_to_save=["classifier"])
    return tr.TextClassifier(model, tr.hf_text_encoder(tok, max_length=16))


class _CountingGenerator:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, seeds: list[str], n: int, r: int) -> list[str]:
        self.calls += 1
        return [f"{seeds[0]} number {r} {i}" for i in range(n)]


def test_transfer_refuses_a_class_count_mismatch_before_generating():
    """A 2-way teacher and a 3-way student failed in kd_loss at the first distillation step, after
    every synthetic round had been generated, filtered and labelled."""
    teacher, student = _classifier(2, seed=0), _classifier(3, seed=1)
    gen = _CountingGenerator()
    with pytest.raises(ValueError, match=r"student logits \(\d+, 3\) and teacher logits \(\d+, 2\) differ in shape"):
        tr.transfer(teacher, student, ["a good film", "a bad plot"], generate=gen, filter=False, n_samples=4,
                    steps=1)
    assert gen.calls == 0
    # matching heads go through: the probe does not get in the way
    gen = _CountingGenerator()
    res = tr.transfer(teacher, _classifier(2, seed=1), ["a good film", "a bad plot"], generate=gen, filter=False,
                      n_samples=4, steps=1, batch_size=2)
    assert gen.calls >= 1 and res.teacher_logits.shape == (4, 2)


# ---- named adapters: PEFT's saved embedding base weights ----------------------------------------
class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.body(x)))


def _saved_with_base_weight(tmp_path, shift: float):
    """Adapter "b" (targets lm_head) saved as PEFT does with ``save_embedding_layers``: the lm_head
    base weight (plus ``shift``) beside the adapter tensors. Returns (source model, its directory)."""
    src = _TinyLM()
    multi.add_adapter(src, "b", "lora", r=2, target_modules=["body", "lm_head"])
    with torch.no_grad():
        for layer in multi.named_adapter_layers(src, "b").values():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(3))
    path = multi.save_adapters(src, tmp_path)["b"]
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["base_model.model.lm_head.base_layer.weight"] = src.lm_head.base_layer.weight.detach() + shift
    save_file(tensors, str(path / WEIGHTS_NAME), metadata=meta)
    return src, path


def _model_with_a() -> nn.Module:
    m = _TinyLM()
    multi.add_adapter(m, "a", "lora", r=2, target_modules=["body"])
    with torch.no_grad():
        multi.named_adapter_layers(m, "a")["body"].lora_B.fill_(0.1)
    return m


def test_load_adapter_as_accepts_a_saved_base_weight_equal_to_the_models(tmp_path):
    """The lm_head base weight PEFT saves was "unexpected" under strict=True: the adapter did not load."""
    src, path = _saved_with_base_weight(tmp_path, shift=0.0)
    m = _model_with_a()
    multi.load_adapter_as(m, path, "b")
    assert multi.adapter_names(m) == ["a", "b"]
    x = torch.randn(3, 8)
    multi.set_adapter(m, "b")
    with torch.no_grad():
        assert torch.equal(m(x), src(x))
    fresh = _TinyLM()  # also as the first adapter of a plain model
    assert multi.load_adapters(fresh, tmp_path, names=["b"]) == ["b"]
    with torch.no_grad():
        assert torch.equal(fresh(x), src(x))


@pytest.mark.parametrize("strict", [True, False])
def test_load_adapter_as_refuses_a_saved_base_weight_that_differs_and_leaves_the_model_as_it_was(tmp_path, strict):
    """Named adapters share the base weight: a different saved one was either "unexpected" (strict)
    or silently dropped (strict=False), so "b" ran on a base it was not trained with."""
    _, path = _saved_with_base_weight(tmp_path, shift=0.5)
    m = _model_with_a()
    base = m.lm_head.weight.detach().clone()
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = m(x)
    with pytest.raises(AdapterFormatError,
                       match=r"adapter_model\.safetensors: saved base weights "
                             r"\['base_model\.model\.lm_head\.base_layer\.weight'\] differ from this model's"):
        multi.load_adapter_as(m, path, "b", strict=strict)
    assert multi.adapter_names(m) == ["a"]
    assert isinstance(m.lm_head, nn.Linear) and torch.equal(m.lm_head.weight, base)
    with torch.no_grad():
        assert torch.equal(m(x), before)
