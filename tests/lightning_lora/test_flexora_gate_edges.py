"""Flexora gate edges: a non-finite gate loss or logit fails loudly (in the gate step, at selection,
and when saving), and a validation batch (per-row list fields, namedtuples) is split into micro-batches
for the gate step without losing its structure."""

from __future__ import annotations

import copy
import math
import warnings
from collections import namedtuple
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll
from lightning_lora.methods.flexora import Flexora, FlexoraConfig, _split_batch, select_layers

TARGETS = ["0", "2", "4"]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))


def flexora_mlp(**kw) -> tuple[nn.Module, dict, Flexora]:
    model = mlp()
    options = dict(r=2, alpha=4, target_modules=TARGETS, granularity="module")
    options.update(kw)
    layers = ll.inject_adapter(model, "flexora", options)
    return model, layers, ll.get_adapter_method(model)  # type: ignore[return-value]


# ---- a non-finite gate logit at selection -----------------------------------------------------------
@pytest.mark.parametrize("selection", [dict(), dict(selection="top_k", top_k=2)])
def test_nan_gate_logit_at_selection_raises_naming_layer_and_step(selection):
    """``NaN > 0`` is False: a NaN α̂ silently dropped its layer (and top_k sorted NaN anywhere)."""
    model, layers, method = flexora_mlp(**selection)
    method.set_gate_logits([0.3, float("nan"), 0.1], layers)
    with pytest.raises(ValueError, match=r"non-finite.*\['2'\] at optimizer step 17.*gate_lr") as info:
        method.finish_search(layers, root=model, trainer=SimpleNamespace(global_step=17))
    assert "\n" not in str(info.value)
    # nothing was changed: still searching, every adapter still in place
    assert method.phase == "search" and method.selected is None
    assert set(ll.adapter_layers(model)) == set(TARGETS)


def test_infinite_gate_logits_are_rejected_by_select_layers():
    keys = ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"\['a', 'c'\]"):
        select_layers([math.inf, 0.2, -math.inf], keys, FlexoraConfig())
    assert select_layers([0.5, 0.2, -1.0], keys, FlexoraConfig()) == ["a", "b"]  # finite: unchanged rule


class _Regressor(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


def test_a_diverged_gate_step_stops_the_fit_at_its_first_gate_step():
    """In a fit, a NaN validation loss made α̂ NaN and the fit trained on with NaN gates until the
    selection (``search_steps`` later); it must stop at the first gate step, before α̂ is touched."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 3, generator=g)
    cb = ll.AdapterCallback("flexora", target="model", r=2, alpha=4, target_modules=TARGETS, granularity="module",
                            search_steps=6, gate_batches=1)
    cb.method.set_gate_data([(x[:4], y[:4])])  # type: ignore[attr-defined]
    cb.method.set_gate_loss(lambda m, b: F.mse_loss(m.model(b[0]), b[1]) * float("nan"))  # type: ignore[attr-defined]
    module = _Regressor(mlp())
    trainer = pl.Trainer(max_steps=8, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, accelerator="cpu")
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"non-finite gate loss.*at optimizer step 1 "):
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert trainer.global_step == 1
    assert cb.method.phase == "search" and cb.method.gate_steps == 0  # type: ignore[attr-defined]
    assert torch.equal(cb.method.gate_logits, torch.zeros(3))  # type: ignore[attr-defined]


# ---- a non-finite gate loss or logit in the gate step -----------------------------------------------
def test_nan_gate_loss_raises_before_the_gate_optimizer_steps():
    model, layers, method = flexora_mlp(gate_batches=1)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    method.set_gate_data([(x, y)])
    method.set_gate_loss(lambda m, b: F.cross_entropy(m(b[0]), b[1]) + float("nan"))
    with pytest.raises(ValueError, match=r"non-finite gate loss.*\['0', '2', '4'\] at optimizer step 5 .*gate_lr") as info:
        method.gate_step(SimpleNamespace(global_step=5), model, layers)
    assert "\n" not in str(info.value)
    # α̂, its Adam state and the layers' gates are as before the failed step
    assert torch.equal(method.gate_logits, torch.zeros(3)) and method.gate_steps == 0
    assert not method.gate_optimizer.state
    assert all(layer.gate == 1.0 for layer in layers.values())


def test_non_finite_gate_logit_raises_right_after_the_gate_optimizer_step():
    """A finite loss whose gradient w.r.t. α̂ is not finite (here sqrt at 0) turns α̂ NaN in Adam."""
    model, layers, method = flexora_mlp(gate_batches=1)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))

    def loss_fn(module, batch):
        a = method.gate_logits  # α̂ itself, as the gate step differentiates it
        return F.cross_entropy(module(batch[0]), batch[1]) + (a - a.detach()).abs().sqrt().sum()

    method.set_gate_data([(x, y)])
    method.set_gate_loss(lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    with torch.no_grad():  # B = 0 at init gives the gates no gradient
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    method.gate_step(SimpleNamespace(global_step=2), model, layers)  # one good step: α̂ and Adam state move
    good_alpha = method.gate_logits.detach().clone()
    good_state = copy.deepcopy(method.gate_optimizer.state_dict())
    assert not torch.equal(good_alpha, torch.zeros(3))
    method.set_gate_data([(x, y)])
    method.set_gate_loss(loss_fn)
    with pytest.raises(ValueError, match=r"non-finite gate logit.*\['0', '2', '4'\] at optimizer step 3 .*gate_lr"):
        method.gate_step(SimpleNamespace(global_step=3), model, layers)
    assert method.gate_steps == 1
    assert all(math.isfinite(layer.gate) for layer in layers.values())  # NaN gates never reach the layers
    # the failed step is undone: α̂ and Adam's moments are the last good step's
    assert torch.equal(method.gate_logits, good_alpha)
    state = method.gate_optimizer.state_dict()["state"][0]
    assert all(torch.equal(state[k], good_state["state"][0][k]) for k in ("exp_avg", "exp_avg_sq", "step"))


# ---- a non-finite gate logit is not written into the adapter's JSON metadata -------------------------
def test_save_adapter_refuses_a_non_finite_gate_logit(tmp_path):
    """``json.dumps`` wrote ``NaN`` into the safetensors metadata: invalid JSON for strict parsers."""
    model, layers, method = flexora_mlp()
    method.set_gate_logits([0.3, float("nan"), -math.inf], layers)
    with pytest.raises(ValueError, match=r"non-finite gate logit.*\['2', '4'\]") as info:
        ll.save_adapter(model, tmp_path / "adapter")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert math.isnan(method.summary()["gate_logits"][1])  # still inspectable
    method.set_gate_logits([0.3, 0.2, -0.1], layers)
    ll.save_adapter(model, tmp_path / "adapter")  # finite again: saved as before


# ---- list fields of a validation batch follow the tensor rows ----------------------------------------
def _rows_batch(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return {"x": x, "y": torch.randint(0, 3, (n,), generator=g),
            "text": [f"row{seed}-{i}" for i in range(n)],  # one raw text per row
            "ids": tuple(range(100 * seed, 100 * seed + n)),  # a tuple of per-row values
            "tags": ["a", "b"],  # not of batch length: shared
            "source": "val", "temperature": torch.tensor(1.5)}  # shared scalars (0-d tensor too)


def test_list_and_tuple_fields_of_batch_length_are_split_with_the_tensors():
    """A ``text`` list stayed whole in every micro-batch: 5 texts next to 2 tensor rows."""
    model, layers, method = flexora_mlp(gate_batches=3, gate_batch_size=2)
    full = _rows_batch(5, seed=1)
    seen: list[dict] = []

    def loss_fn(module, batch):
        seen.append(batch)
        return F.cross_entropy(module(batch["x"]), batch["y"])

    method.set_gate_data([full])
    method.set_gate_loss(loss_fn)
    method.gate_step(SimpleNamespace(), model, layers)

    assert [len(b["text"]) for b in seen] == [2, 2, 1] == [b["x"].shape[0] for b in seen]
    assert [t for b in seen for t in b["text"]] == full["text"]  # every text once, in order
    assert [i for b in seen for i in b["ids"]] == list(full["ids"])
    for k, b in enumerate(seen):
        assert isinstance(b["text"], list) and isinstance(b["ids"], tuple)
        assert torch.equal(b["x"], full["x"][2 * k : 2 * k + 2])
        assert b["tags"] == ["a", "b"] and b["source"] == "val" and float(b["temperature"]) == 1.5


def test_tuple_batch_with_a_text_list_is_split_field_by_field():
    """A ``(x, y, texts)`` batch: the tuple is a structure (split per field), the texts a row field."""
    model, layers, method = flexora_mlp(gate_batches=2, gate_batch_size=1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 8, generator=g), torch.randint(0, 3, (2,), generator=g)
    seen: list[tuple] = []

    def loss_fn(module, batch):
        seen.append(batch)
        return F.cross_entropy(module(batch[0]), batch[1])

    method.set_gate_data([(x, y, ["first", "second"])])
    method.set_gate_loss(loss_fn)
    method.gate_step(SimpleNamespace(), model, layers)
    assert [b[2] for b in seen] == [["first"], ["second"]]
    assert all(isinstance(b, tuple) and b[0].shape == (1, 8) for b in seen)
    assert torch.equal(seen[1][0], x[1:]) and torch.equal(seen[1][1], y[1:])


Batch = namedtuple("Batch", ["input_ids", "labels"])


def test_namedtuple_batch_is_split_into_namedtuples():
    """``type(batch)(generator)`` raised a TypeError for a namedtuple (fields are positional)."""
    model, layers, method = flexora_mlp(gate_batches=2, gate_batch_size=2)
    g = torch.Generator().manual_seed(4)
    batch = Batch(torch.randint(0, 8, (4,), generator=g), torch.randint(0, 3, (4,), generator=g))
    seen: list[Batch] = []

    def loss_fn(module, b):
        seen.append(b)
        return F.cross_entropy(module(F.one_hot(b.input_ids, 8).float()), b.labels)

    method.set_gate_data([batch])
    method.set_gate_loss(loss_fn)
    method.gate_step(SimpleNamespace(), model, layers)
    assert [type(b) for b in seen] == [Batch, Batch]
    assert torch.equal(torch.cat([b.input_ids for b in seen]), batch.input_ids)
    assert torch.equal(seen[1].labels, batch.labels[2:])


def test_split_batch_keeps_nested_namedtuples_and_plain_sequences():
    x = torch.arange(6).reshape(3, 2)
    parts = _split_batch({"b": Batch(x, [10, 11, 12]), "pair": (x, x), "seq": [x]}, 2)
    assert [type(p["b"]) for p in parts] == [Batch, Batch]
    assert [p["b"].labels for p in parts] == [[10, 11], [12]]  # per-row list still follows the rows
    assert all(type(p["pair"]) is tuple and type(p["seq"]) is list for p in parts)
    assert torch.equal(parts[1]["pair"][1], x[2:])
