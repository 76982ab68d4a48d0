"""Edge cases of DyLoRA and Flexora: rank checks, retraining init, manual optimisation, DDP re-init,
exact-name reloads, and a resumed DyLoRA fit (each defect test failed before its fix)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll
from lightning_lora.methods.dylora import DyLoRA, DyLoRAConfig, export_lora, get_rank, set_rank
from lightning_lora.methods.flexora import Flexora


# ---- models ------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Nested(nn.Module):
    """A top-level ``fc`` and a ``blk.fc``: the first name is a dotted suffix of the second."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.blk = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blk(torch.tanh(self.fc(x)))


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))


def searched(seed: int = 0, **kw) -> tuple[nn.Module, dict, Flexora]:
    """A Flexora MLP (one gate per module) with gate logits that select modules "0" and "4"."""
    model = mlp(seed)
    layers = ll.inject_adapter(model, "flexora", dict(r=4, alpha=8, target_modules=["0", "2", "4"],
                                                      granularity="module", **kw))
    method: Flexora = ll.get_adapter_method(model)  # type: ignore[assignment]
    method.set_gate_logits([0.3, -0.4, 0.1], layers)
    return model, layers, method


# ---- Flexora: the retraining re-initialisation follows LoRA's ``init`` ------------------------------
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_flexora_reinit_draws_A_as_the_configured_lora_init(init):
    """``reset_lora`` used Kaiming-uniform whatever ``init`` said: a ``init="gaussian"`` run retrained
    from a Kaiming A. Now A is redrawn exactly as ``LoRALinear`` draws it."""
    model, layers, method = searched(init=init)
    torch.manual_seed(123)
    selected = method.finish_search(layers, root=model)
    assert selected == ["0", "4"]
    torch.manual_seed(123)  # the reference draws, in the same order
    for name in ["0", "4"]:
        A = layers[name].lora_A
        ref = torch.empty_like(A)
        if init == "gaussian":
            nn.init.normal_(ref, std=1.0 / 4)
        else:
            nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
        assert torch.equal(A, ref), name
        assert not layers[name].lora_B.any()


# ---- Flexora: manual optimisation ---------------------------------------------------------------
class ManualNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = mlp(0)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(ll.trainable_parameters(self), lr=0.1)


def _data(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]


def _manual_fit(gate_loss: bool) -> tuple[ManualNet, ll.AdapterCallback, pl.Trainer]:
    module = ManualNet()
    cb = ll.AdapterCallback("flexora", target="net", r=2, alpha=4, target_modules=["0", "2", "4"],
                            granularity="module", search_steps=10, gate_batches=2)
    cb.method.set_gate_data(_data(1))  # type: ignore[attr-defined]
    if gate_loss:
        cb.method.set_gate_loss(lambda m, b: F.cross_entropy(m.net(b[0]), b[1]))  # type: ignore[attr-defined]
    t = pl.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu")
    x = torch.cat([b[0] for b in _data(0)])
    y = torch.cat([b[1] for b in _data(0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    return module, cb, t


def test_flexora_gate_step_refuses_a_manual_optimization_training_step():
    """With manual optimisation the gate step called ``training_step`` on a validation batch, which ran
    ``manual_backward`` and ``optimizer.step()`` (θ trained on validation data, global_step advanced),
    and then died in ``autograd.grad`` with "Trying to backward through the graph a second time".
    Now: a clear error naming the fix, before anything runs."""
    with pytest.raises(RuntimeError, match="manual optimization.*set_gate_loss"):
        _manual_fit(gate_loss=False)
    module, cb, t = _manual_fit(gate_loss=True)  # with a gate loss: one optimizer step per batch
    assert t.global_step == 2 and cb.method.gate_steps == 2  # type: ignore[attr-defined]


# ---- Flexora: a retrained adapter reloads only its selected modules -------------------------------
def test_flexora_retrained_adapter_loads_when_a_selected_name_is_a_suffix_of_another(tmp_path):
    """The loader re-targeted the selected module names as a ``target_modules`` list, whose entries
    also match every module ending in ``"." + name``: selecting ``fc`` but not ``blk.fc`` re-adapted
    ``blk.fc`` too and the load failed (its tensors are not in the file)."""
    torch.manual_seed(0)
    model = Nested()
    layers = ll.inject_adapter(model, "flexora", r=2, alpha=4, target_modules=["fc"], granularity="module")
    method: Flexora = ll.get_adapter_method(model)  # type: ignore[assignment]
    assert method.layer_keys == ["fc", "blk.fc"]
    method.set_gate_logits([0.5, -0.5], layers)
    assert method.finish_search(layers, root=model) == ["fc"]
    with torch.no_grad():
        layers["fc"].lora_B.normal_(generator=torch.Generator().manual_seed(1))
    ll.save_adapter(model, tmp_path / "a")
    torch.manual_seed(0)
    fresh = Nested()
    ll.load_adapter(fresh, tmp_path / "a")
    assert list(ll.adapter_layers(fresh)) == ["fc"] and type(fresh.blk.fc) is nn.Linear
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ---- Flexora under torch.distributed: the same re-initialised adapter on every process ------------
def _reinit_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, layers, method = searched(seed=0)  # identical model and gates on every process
        torch.manual_seed(1000 + rank)  # ... but RNG states that differ, as after uneven dropout draws
        method.finish_search(layers, root=model)
        torch.save({n: layers[n].lora_A.detach().clone() for n in method.selected_modules}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_flexora_reinit_is_identical_on_every_process(tmp_path):
    """DDP broadcasts parameters only when it wraps the model; the selection's re-initialisation drew
    A from each process's own RNG, so processes whose RNG states had drifted retrained different
    adapters for the rest of the fit. Now rank 0's draw is broadcast."""
    world = 2
    out = str(tmp_path / "A")
    mp.spawn(_reinit_worker, args=(world, str(tmp_path / "store"), out), nprocs=world, join=True)
    a0, a1 = torch.load(f"{out}.0", weights_only=True), torch.load(f"{out}.1", weights_only=True)
    assert a0.keys() == a1.keys() == {"0", "4"}
    for name in a0:
        assert torch.equal(a0[name], a1[name]), name
    torch.manual_seed(1000)  # and it is rank 0's own draw
    for name in ["0", "4"]:
        ref = torch.empty_like(a0[name])
        nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
        assert torch.equal(a0[name], ref)


# ---- DyLoRA: saved deployment ranks are checked -------------------------------------------------
def test_dylora_restored_ranks_outside_1_to_r_max_are_rejected(tmp_path):
    """Saved ranks went unchecked into the layers: rank 0 divided by zero at the first forward, a rank
    above r_max ran at r_max rows with the scale α/rank. Now the load fails with a one-line error."""
    method = DyLoRA(DyLoRAConfig(r=4))
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"ranks must be in \[1, r_max=4\]"):
            method.restore_layer_metadata({"r_max": 4, "ranks": {"0": 2, "2": bad}})
    method.restore_layer_metadata({"r_max": 4, "ranks": {"0": 1, "2": 4}})  # the bounds themselves are fine
    assert method._restored_ranks == {"0": 1, "2": 4}

    # through load_adapter: a file whose metadata names rank 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    ll.inject_adapter(model, "dylora", r=4, alpha=8, target_modules=["0", "2"])
    ll.save_adapter(model, tmp_path / "a")
    path = Path(tmp_path / "a" / "adapter_model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["lightning_lora_layer_metadata"] = '{"r_max": 4, "ranks": {"0": 0, "2": 4}}'
    save_file(load_file(str(path)), str(path), metadata=meta)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="ranks must be in"):
        ll.load_adapter(fresh, tmp_path / "a")


# ---- DyLoRA: a rank is a whole number ------------------------------------------------------------
def test_dylora_non_integral_ranks_are_rejected_not_truncated(tmp_path):
    """``int(b)`` turned ``set_rank(m, 3.5)`` (``r_max / 2`` for r_max = 7) into rank 3 and True into
    rank 1 silently, ``export_lora(rank=2.5)`` wrote a rank-2 adapter, and ``eval_rank=2.5`` passed the
    config check and failed inside a slice at the first forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    layers = ll.inject_adapter(model, "dylora", r=7, alpha=8, target_modules=["0", "2"])
    for bad in (3.5, True, "3", None):
        with pytest.raises(ValueError, match=r"whole number in \[1, r_max=7\]"):
            set_rank(model, bad)
        with pytest.raises(ValueError, match="whole number"):
            layers["0"].set_rank(bad)
    assert get_rank(model) == 7  # unchanged by the refused calls
    set_rank(model, 3.0)  # a whole float is still a rank
    set_rank(model, torch.tensor(2))
    assert get_rank(model) == 2 and all(layer.train_rank == 2 for layer in layers.values())
    with pytest.raises(ValueError, match="whole number"):
        export_lora(model, tmp_path / "e", rank=2.5)
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match="eval_rank must be a whole number"):
        DyLoRAConfig(r=4, eval_rank=2.5)
    with pytest.raises(ValueError, match="r_min must be a whole number"):
        DyLoRAConfig(r=4, r_min=1.5)
    # bounds still give their one-line errors, also on a merged adapter (a ValueError, not "merged")
    ll.merge_adapter(model)
    for bad in (0, 8):
        with pytest.raises(ValueError, match=r"\[1, r_max=7\]"):
            set_rank(model, bad)


# ---- DyLoRA: a fit resumed from a checkpoint equals the uninterrupted one (coverage) --------------
class RankNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.ranks: list[int] = []

    def training_step(self, batch, batch_idx):
        self.ranks.append(self.net[0].train_rank)
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(ll.trainable_parameters(self), lr=0.05, weight_decay=0.1)


class _StopAfter(pl.Callback):
    def __init__(self, epochs: int | None) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if self.epochs is not None and trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _dylora_fit(stop: int | None = None, ckpt: str | None = None, save: str | None = None,
                accumulate: int = 1) -> RankNet:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    module = RankNet()
    cb = ll.AdapterCallback("dylora", target="net", r=4, alpha=8, target_modules=["0", "2"], seed=3)
    t = pl.Trainer(max_epochs=4, callbacks=[cb, _StopAfter(stop)], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                   accumulate_grad_batches=accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, DataLoader(data, batch_size=4), ckpt_path=ckpt)
    if save is not None:
        t.save_checkpoint(save)
    return module


@pytest.mark.parametrize("accumulate", [1, 2])
def test_dylora_fit_resumed_mid_training_equals_the_uninterrupted_fit(tmp_path, accumulate):
    """Rank sampling is a function of (seed, global_step): the resumed fit draws the same ranks (one per
    optimizer step, shared by the micro-batches of an accumulation window) and ends at the same adapter."""
    full = _dylora_fit(accumulate=accumulate)
    ckpt = str(tmp_path / "half.ckpt")
    part = _dylora_fit(2, save=ckpt, accumulate=accumulate)
    resumed = _dylora_fit(ckpt=ckpt, accumulate=accumulate)
    assert part.ranks + resumed.ranks == full.ranks and len(set(full.ranks)) > 1
    if accumulate == 2:
        assert all(a == b for a, b in zip(full.ranks[::2], full.ranks[1::2]))
    sa, sb = ll.adapter_state_dict(full.net), ll.adapter_state_dict(resumed.net)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-7, msg=k)
