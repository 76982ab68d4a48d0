"""``trainer.fit(..., ckpt_path=...)`` resumes every method to the uninterrupted result.

For each method (or option) that had no resume test (LoRA: ``test_callback.py``; DyLoRA, Flexora
without re-initialisation: ``test_dylora_flexora_edges.py`` / ``test_flexora.py``; IncreLoRA:
``test_increlora.py``), three fits of the same ``N``-step run on a tiny module:

- uninterrupted, ``N`` steps;
- interrupted: the same run (same ``max_steps``, so schedules and estimates built from the fit's
  length agree) stopped after ``K`` steps, with the adapter-only checkpoint ``ModelCheckpoint``
  wrote there;
- resumed from that checkpoint in a fresh module, callback and trainer, with the global RNG in
  another state than the uninterrupted run had at step ``K`` (as in a new process).

The resumed fit must end with every adapter tensor, buffer, optimizer state and LR-scheduler state
bit-identical to the uninterrupted one. Checkpoints fall on epoch boundaries (two batches per
epoch, ``K`` even): Lightning restarts a non-resumable DataLoader mid-epoch, for any module. Dropout
is 0 and the data are not shuffled: Lightning does not checkpoint the global RNG those draw from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll
from lightning_lora.callback import adapter_checkpoint_keys
from lightning_lora.core.inject import get_adapter_method

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*"),
    pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]

TARGETS = ["fc1", "fc2"]
N_STEPS = 8


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the frozen base is the same in every fit
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class Tiny(pl.LightningModule):
    """AdamW with weight decay (or the method's own optimizer) and a per-step warmup/decay schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        method = get_adapter_method(self.net)
        if callable(getattr(method, "make_optimizer", None)):  # GradNormLoRP's projected AdamW
            opt = method.make_optimizer(self, lr=1e-2, weight_decay=0.01)
        else:
            opt = torch.optim.AdamW(ll.trainable_parameters(self), lr=1e-2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4) * max(0.1, 1 - t / 20))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader(n: int, batch_size: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


class _StopAt(pl.Callback):
    """Ends the fit after ``step`` optimizer steps of a longer ``max_steps`` (an interruption)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(method: str, options: dict[str, Any], root: Path, *, stop_at: int | None = None, ckpt: str | None = None,
         accumulate: int = 1, gate_data: bool = False) -> tuple[pl.Trainer, Tiny, ll.AdapterCallback]:
    pl.seed_everything(0, verbose=False)
    module = Tiny()
    if ckpt is not None:
        torch.manual_seed(1234)  # a new process: the global RNG is not where the first fit left it
    cb = ll.AdapterCallback(method, target="net", target_modules=TARGETS, **options)
    callbacks: list[pl.Callback] = [cb]
    if stop_at is not None:
        callbacks += [ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=stop_at, save_top_k=-1),
                      _StopAt(stop_at)]
    t = pl.Trainer(accelerator="cpu", devices=1, max_steps=N_STEPS, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=stop_at is not None, default_root_dir=str(root),
                   callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0,
                   accumulate_grad_batches=accumulate)
    if gate_data:  # Flexora's gate data: 6 batches of 2, so where the resumed fit picks up matters
        cb.method.set_gate_data(_loader(12, 2, seed=1))  # type: ignore[attr-defined]
    t.fit(module, _loader(8 * accumulate, 4), ckpt_path=ckpt)  # two optimizer steps per epoch
    assert t.global_step == (stop_at or N_STEPS)
    return t, module, cb


def _adapter_state(module: Tiny) -> dict[str, torch.Tensor]:
    """Everything the adapter checkpoint keeps (adapter parameters and buffers, LQ-LoRA's packed base)."""
    keep = adapter_checkpoint_keys(module)
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k in keep}


def _assert_equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype, f"{where}: {a.dtype} vs {getattr(b, 'dtype', b)}"
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")
    elif callable(a):  # LambdaLR's lambdas
        return
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _resume_and_compare(tmp_path: Path, method: str, options: dict[str, Any], stop_at: int,
                        accumulate: int = 1, gate_data: bool = False) -> tuple[ll.AdapterCallback, ...]:
    kw = dict(accumulate=accumulate, gate_data=gate_data)
    t_full, full, cb_full = _fit(method, options, tmp_path / "full", **kw)
    _, part, cb_part = _fit(method, options, tmp_path / "part", stop_at=stop_at, **kw)
    ckpt = tmp_path / "part" / f"step={stop_at}.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == stop_at
    # adapter-only: neither the head nor a dense frozen base weight is in the file
    assert set(saved["state_dict"]) == set(_adapter_state(part))
    assert not any(k.startswith("net.head.") or k.endswith("base_layer.weight") for k in saved["state_dict"])
    t_res, resumed, cb_res = _fit(method, options, tmp_path / "resumed", ckpt=str(ckpt), **kw)

    final_full, final_res = _adapter_state(full), _adapter_state(resumed)
    trained = {n for n, p in resumed.named_parameters() if p.requires_grad}
    moved = [k for k in trained if not torch.equal(final_res[k], saved["state_dict"][k])]
    assert moved, "the resumed fit did not train"
    _assert_equal(final_full, final_res, "adapter")
    _assert_equal(t_full.optimizers[0].state_dict(), t_res.optimizers[0].state_dict(), "optimizer")
    _assert_equal(t_full.lr_scheduler_configs[0].scheduler.state_dict(),
                  t_res.lr_scheduler_configs[0].scheduler.state_dict(), "scheduler")
    meta = getattr(cb_full.method, "layer_metadata", None)
    if callable(meta):
        _assert_equal(meta(cb_full.layers), meta(cb_res.layers), "layer_metadata")
    return cb_full, cb_part, cb_res


# (method, options, K): K inside the phase that holds state outside the adapter tensors
CASES = [
    pytest.param("lora", dict(r=4, alpha=8, use_dora=True), 4, id="dora"),
    pytest.param("ffa_lora", dict(r=4, alpha=8), 4, id="ffa_lora"),
    pytest.param("allora", dict(r=4, eta=10.0), 4, id="allora-grad"),
    # the update form hooks the fit's optimizer: the resumed fit's new optimizer must get the hooks
    pytest.param("allora", dict(r=4, eta=10.0, apply_to="update"), 4, id="allora-update"),
    pytest.param("bone", dict(r=4), 4, id="bone"),
    pytest.param("bat", dict(r=4), 4, id="bat"),
    pytest.param("lora_xs", dict(r=4), 4, id="lora_xs"),
    # K = 2: inside the 4-step LR warmup; the gradient init (2 batches, η₁ from the fit's length)
    # must not run again on resume, and the frozen factors come from the checkpoint
    pytest.param("lora_sb", dict(r=4, svd="exact", n_init_batches=2, warmup_ratio=0.25), 2, id="lora_sb"),
    pytest.param("slora", dict(r=4), 4, id="slora"),
    pytest.param("nlora", dict(r=4), 4, id="nlora"),
    pytest.param("inttune", dict(r=4), 4, id="inttune"),
    # router bias β and load counters are buffers; K after several β updates
    pytest.param("smora", dict(r=4, top_k=2, bias_update_rate=0.01, router_init="normal"), 4, id="smora"),
    pytest.param("lq_lora", dict(r=4, alpha=8.0, max_iters=5), 4, id="lq_lora"),
    # projector refreshed at steps 0, 3, 6: K = 4 is inside a projection period (optimizer state)
    pytest.param("gradnorm_lorp", dict(r=4, dropout=0.0, proj_rank=2, update_proj_gap=3), 4, id="gradnorm_lorp"),
    pytest.param("gradnorm_lorp", dict(r=4, dropout=0.0, proj_rank=2, update_proj_gap=3, optim_bits=8,
                                       proj_type="full"), 4, id="gradnorm_lorp-8bit-full"),
]


@pytest.mark.parametrize("method,options,stop_at", CASES)
def test_resumed_fit_equals_the_uninterrupted_fit(tmp_path, method, options, stop_at):
    _resume_and_compare(tmp_path, method, options, stop_at)


@pytest.mark.parametrize("method,options", [
    pytest.param("allora", dict(r=4, eta=10.0), id="allora"),  # scales once per accumulated step
    # count_scope="step": β moves once per optimizer step, counts summed over the micro-batches
    pytest.param("smora", dict(r=4, top_k=2, bias_update_rate=0.01, count_scope="step"), id="smora-step"),
    pytest.param("gradnorm_lorp", dict(r=4, dropout=0.0, proj_rank=2, update_proj_gap=3), id="gradnorm_lorp"),
])
def test_resumed_fit_with_gradient_accumulation_equals_the_uninterrupted_fit(tmp_path, method, options):
    _resume_and_compare(tmp_path, method, options, 4, accumulate=2)


# ---- Flexora's default reinit=True, resumed inside the search ---------------------------------------------
FLEXORA = dict(r=4, search_steps=5, gate_batches=1, granularity="module")


@pytest.mark.parametrize("options", [
    pytest.param({}, id="kaiming-remove"),
    pytest.param(dict(init="gaussian", exclusion="zero", selection="top_k", top_k=1, gate_every=3),
                 id="gaussian-zero-top1"),
])
def test_flexora_resumed_mid_search_reinitialises_as_the_uninterrupted_fit(tmp_path, options):
    """The selection at step 5 re-initialises the kept modules' A. It was drawn from the global RNG, whose
    state there depends on every draw before it (each DataLoader iterator takes one; the resumed process
    starts elsewhere) and which Lightning does not checkpoint: the resumed fit retrained from another A.
    A is now drawn from a generator seeded by ``torch.initial_seed()`` at the first fit start (saved in
    the checkpoint) and the module's name."""
    cb_full, cb_part, cb_res = _resume_and_compare(tmp_path, "flexora", {**FLEXORA, **options}, 4, gate_data=True)
    assert cb_part.method.phase == "search" and cb_part.method.gate_steps >= 1  # K = 4: inside the search
    assert cb_full.method.phase == cb_res.method.phase == "retrain"
    assert cb_res.method.reinit_seed == cb_full.method.reinit_seed == 0  # seed_everything(0), from the file
