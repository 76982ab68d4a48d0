"""DyLoRA-specific invariants (METHODS.md §4); the shared S1-S6 run in test_invariants.py."""

from __future__ import annotations

import json
import random
from collections import Counter

import lightning.pytorch as pl
import pytest
import peft
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll
from lightning_lora.core.state import WEIGHTS_NAME, read_adapter_config
from lightning_lora.methods.dylora import DyLoRA, DyLoRAConfig, DyLoRALinear, export_lora, get_rank, set_rank

R = 4
ALPHA = 8.0


def stack(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).eval()


def adapted(seed: int = 0, **kw) -> tuple[nn.Module, dict[str, DyLoRALinear]]:
    m = stack(seed)
    layers = ll.inject_adapter(m, "dylora", dict(r=R, alpha=ALPHA, target_modules=["0", "2"], **kw))
    with torch.no_grad():  # B != 0 so every rank matters
        g = torch.Generator().manual_seed(5)
        for layer in layers.values():
            layer.lora_B.normal_(generator=g)
    return m, layers  # type: ignore[return-value]


X = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))


def formula(m: nn.Module, x: torch.Tensor, b: int) -> torch.Tensor:
    """``x W0ᵀ + b0 + (α/b)·x A[:b]ᵀ B[:, :b]ᵀ`` layer by layer (METHODS §4 invariant 3)."""
    def lin(layer, x):
        base = layer.base_layer
        return x @ base.weight.t() + base.bias + (ALPHA / b) * (x @ layer.lora_A[:b].t()) @ layer.lora_B[:, :b].t()
    return lin(m[2], torch.tanh(lin(m[0], x)))


# ---- forward at rank b ---------------------------------------------------------------------------
def test_output_equals_base_at_init_for_every_rank():
    base = stack()
    m = stack()
    ll.inject_adapter(m, "dylora", r=R, alpha=ALPHA, target_modules=["0", "2"])
    with torch.no_grad():
        y0 = base(X)
        for b in range(1, R + 1):
            set_rank(m, b)
            assert torch.equal(m(X), y0)
            m.train()
            assert torch.equal(m(X), y0)
            m.eval()


@pytest.mark.parametrize("scaling_impl", ["paper", "code"])
def test_set_rank_changes_output_as_the_formula_says(scaling_impl):
    m, layers = adapted(scaling_impl=scaling_impl)
    outs = {}
    with torch.no_grad():
        for b in range(1, R + 1):
            set_rank(m, b)
            assert get_rank(m) == b and all(layer.rank == layer.train_rank == b for layer in layers.values())
            outs[b] = m(X)
            torch.testing.assert_close(outs[b], formula(m, X, b), atol=1e-5, rtol=0)
    for b in range(1, R):
        assert not torch.allclose(outs[b], outs[b + 1])
    with pytest.raises(ValueError):
        set_rank(m, R + 1)
    with pytest.raises(ValueError):
        set_rank(m, 0)


def test_train_mode_uses_sampled_rank_eval_mode_the_deployment_rank():
    m, layers = adapted()
    set_rank(m, 2)
    for layer in layers.values():
        layer.train_rank = 3  # what the sampler does
    with torch.no_grad():
        y_eval = m(X)
        m.train()
        y_train = m(X)
    torch.testing.assert_close(y_eval, formula(m, X, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(y_train, formula(m, X, 3), atol=1e-5, rtol=0)


def test_merge_at_current_rank_and_set_rank_while_merged_raises():
    m, layers = adapted()
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    set_rank(m, 2)
    with torch.no_grad():
        y = m(X)
        ll.merge_adapter(m)
        torch.testing.assert_close(m(X), y, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="merged"):
        set_rank(m, 3)
    assert get_rank(m) == 2  # nothing changed by the failed call
    ll.unmerge_adapter(m)
    for n, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, w0[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("b", [1, 2, R])
def test_truncation_equals_lora_of_rank_b(b):
    """DyLoRA at rank b == a separately built LoRA of rank b with the same first-b factors
    (full mode at b = r_max is vanilla LoRA with scale α/r_max: invariant 2), output and gradients."""
    m, layers = adapted(mode="full")
    set_rank(m, b)
    lora = stack()
    lora_layers = ll.inject_adapter(lora, "lora", r=b, alpha=ALPHA, target_modules=["0", "2"], fused=False)
    with torch.no_grad():
        for n, layer in lora_layers.items():
            layer.lora_A.copy_(layers[n].lora_A[:b])
            layer.lora_B.copy_(layers[n].lora_B[:, :b])
    m.train()
    lora.train()
    y, y_lora = m(X), lora(X)
    torch.testing.assert_close(y, y_lora, atol=1e-6, rtol=0)
    y.square().sum().backward()
    y_lora.square().sum().backward()
    for n, layer in layers.items():
        torch.testing.assert_close(layer.lora_A.grad[:b], lora_layers[n].lora_A.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad[:, :b], lora_layers[n].lora_B.grad, atol=1e-5, rtol=1e-5)
        # full mode: rows/columns >= b get exactly zero gradient (invariant 5)
        assert not layer.lora_A.grad[b:].any() and not layer.lora_B.grad[:, b:].any()


# ---- gradients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("b", range(1, R + 1))
def test_frozen_mode_only_row_and_column_b_get_gradient(b):
    m, layers = adapted(mode="frozen")
    set_rank(m, b)
    m.train()
    m(X).square().sum().backward()
    for layer in layers.values():
        gA, gB = layer.lora_A.grad, layer.lora_B.grad
        keep = torch.zeros(R, dtype=torch.bool)
        keep[b - 1] = True
        assert not gA[~keep].any() and not gB[:, ~keep].any()
        assert gA[b - 1].abs().sum() > 0 and gB[:, b - 1].abs().sum() > 0


def test_frozen_and_full_modes_have_the_same_forward():
    yf = adapted(mode="frozen")[0].train()
    yu = adapted(mode="full")[0].train()
    set_rank(yf, 3)
    set_rank(yu, 3)
    assert torch.equal(yf(X), yu(X))


# ---- sampling ------------------------------------------------------------------------------------
def method(**kw) -> DyLoRA:
    return DyLoRA(DyLoRAConfig(r=8, **kw))


def test_rank_sequence_is_deterministic_and_identical_on_two_processes():
    seq = [method(seed=3).sample_rank(s) for s in range(200)]
    # a second "DDP process": another method object, other global RNG states
    random.seed(999)
    torch.manual_seed(999)
    other = method(seed=3)
    assert [other.sample_rank(s) for s in range(200)] == seq
    assert other.sample_rank(57) == seq[57]  # stateless: any order, any resume point
    assert [method(seed=4).sample_rank(s) for s in range(200)] != seq
    assert set(seq) == set(range(1, 9))


def test_sampler_is_uniform_and_respects_r_min_and_pmf():
    m = method(r_min=3)
    counts = Counter(m.sample_rank(s) for s in range(10_000))
    assert set(counts) == set(range(3, 9))
    expected = 10_000 / 6
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 20.5  # χ²(5 dof) 99.9 % quantile
    pmf = method(r_min=7, rank_pmf=[3, 1])
    counts = Counter(pmf.sample_rank(s) for s in range(4000))
    assert set(counts) == {7, 8} and abs(counts[7] / 4000 - 0.75) < 0.03


def test_config_validation():
    with pytest.raises(ValueError):
        DyLoRAConfig(r=4, r_min=5)
    with pytest.raises(ValueError):
        DyLoRAConfig(r=4, mode="half")
    with pytest.raises(ValueError):
        DyLoRAConfig(r=4, eval_rank=5)
    with pytest.raises(ValueError):
        DyLoRAConfig(r=4, rank_pmf=[1, 1])
    with pytest.raises(ValueError):
        DyLoRAConfig(r=4).resolve_eval_ranks([0, 2])
    assert DyLoRAConfig(r=3).resolve_eval_ranks("all") == [1, 2, 3]


# ---- save / load / export ------------------------------------------------------------------------
def test_save_load_carries_r_max_and_rank(tmp_path):
    m, _ = adapted()
    set_rank(m, 3)
    with torch.no_grad():
        y = m(X)
    ll.save_adapter(m, tmp_path / "a")
    name, cfg, meta = read_adapter_config(tmp_path / "a")
    assert name == "dylora" and cfg.r == R
    assert json.loads(meta["lightning_lora_layer_metadata"]) == {"r_max": R, "ranks": {"0": 3, "2": 3}}
    fresh = stack()
    ll.load_adapter(fresh, tmp_path / "a")
    assert get_rank(fresh) == 3
    with torch.no_grad():
        assert torch.equal(fresh(X), y)
    bad = DyLoRA(DyLoRAConfig(r=R + 1))
    with pytest.raises(ValueError, match="r_max"):
        bad.restore_layer_metadata({"r_max": R, "ranks": {}})


def test_export_at_rank_b_loads_as_lora_here(tmp_path):
    m, _ = adapted()
    set_rank(m, 2)
    with torch.no_grad():
        y = m(X)
    export_lora(m, tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == ALPHA
    assert cfg["lora_alpha"] / cfg["r"] == ALPHA / 2  # PEFT's scale == DyLoRA's α/b
    fresh = stack()
    ll.load_adapter(fresh, tmp_path / "e")
    assert ll.get_adapter_method(fresh).config.method == "lora"
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), y, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        export_lora(m, tmp_path / "x", rank=R + 1)


@pytest.mark.parametrize("model", ["bert", "gpt2"])
def test_export_at_rank_b_loads_in_peft(model_builders, model, tmp_path):
    targets = {"bert": ["query", "value"], "gpt2": ["c_attn", "mlp.c_proj"]}[model]
    ours = model_builders[model](0)
    ll.inject_adapter(ours, "dylora", r=R, alpha=ALPHA, target_modules=targets, scaling_impl="code")
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in ll.trainable_parameters(ours):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    ids = {"input_ids": torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))}

    def out(mod):
        o = mod(**ids)
        return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state

    for b in (1, 3):
        set_rank(ours, b)
        with torch.no_grad():
            y = out(ours.eval())
        export_lora(ours, tmp_path / f"r{b}")
        theirs = peft.PeftModel.from_pretrained(model_builders[model](0), str(tmp_path / f"r{b}")).eval()
        scalings = {
            mod.scaling["default"] for mod in theirs.modules() if isinstance(getattr(mod, "scaling", None), dict)
        }
        assert scalings == {ALPHA / b}
        with torch.no_grad():
            torch.testing.assert_close(out(theirs), y, atol=1e-5, rtol=0)
    assert (tmp_path / "r1" / WEIGHTS_NAME).is_file()


# ---- AdapterCallback: per-step sampling and validation at several ranks ---------------------------
class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.train_ranks: list[int] = []
        self.val_ranks: list[int] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.train_ranks.append(self.net[0].train_rank)
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        assert not self.net[0].training
        self.val_ranks.append(self.net[0].rank)
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(ll.trainable_parameters(self), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)), batch_size=2)


def _fit(tmp_path, module, cb, steps=6):
    t = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
        callbacks=[cb], num_sanity_val_steps=0, limit_val_batches=2, val_check_interval=3,
    )
    t.fit(module, _loader(), _loader())
    return t


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_callback_samples_rank_per_step_and_validates_each_rank(tmp_path):
    module = Net()
    cb = ll.AdapterCallback("dylora", r=R, alpha=ALPHA, seed=7, target_modules=["0", "2"], target="net",
                            eval_ranks=[1, 2, R])
    t = _fit(tmp_path, module, cb)
    assert module.train_ranks == [cb.method.sample_rank(s) for s in range(6)]
    assert all(layer.train_rank == module.train_ranks[-1] for layer in cb.layers.values())
    # each validation batch: once at the deployment rank r_max (also logged as _rank4), then 1 and 2
    assert module.val_ranks[:3] == [R, 1, 2]
    assert get_rank(module.net) == R  # restored after the extra passes
    keys = set(t.callback_metrics)
    assert {"val_loss", "val_loss_rank1", "val_loss_rank2", f"val_loss_rank{R}"} <= keys
    assert t.callback_metrics[f"val_loss_rank{R}"] == t.callback_metrics["val_loss"]
    assert t.callback_metrics["val_loss_rank1"] != t.callback_metrics["val_loss"]


def test_callback_eval_ranks_needs_a_method_with_ranks():
    with pytest.raises(ValueError, match="eval_ranks"):
        ll.AdapterCallback("lora", r=2, eval_ranks=[1, 2])


@pytest.mark.parametrize("bad", [[R + 1], [0], "al", 3, [1.5]])
def test_callback_checks_eval_ranks_up_front(bad):
    """A bad ``eval_ranks`` fails when the callback is built, not at the first validation batch after an epoch."""
    with pytest.raises(ValueError, match="eval_ranks"):
        ll.AdapterCallback("dylora", r=R, alpha=ALPHA, target_modules=["0", "2"], target="net", eval_ranks=bad)


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_validate_after_merge_on_fit_end_runs_at_the_merged_rank(tmp_path):
    """Merged at the end of fit, the adapter's rank is fixed in the weights: validation runs at that rank
    (with a warning) instead of failing on set_rank for the others."""
    module = Net()
    cb = ll.AdapterCallback("dylora", r=R, alpha=ALPHA, target_modules=["0", "2"], target="net", merge_on_fit_end=True)
    t = _fit(tmp_path, module, cb)
    assert all(layer.merged for layer in cb.layers.values())
    module.val_ranks.clear()
    with pytest.warns(UserWarning, match="merged at rank"):
        out = t.validate(module, _loader(), verbose=False)
    assert set(module.val_ranks) == {R} and out[0][f"val_loss_rank{R}"] == out[0]["val_loss"]


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_fit_resumed_from_a_checkpoint_keeps_the_deployment_rank(tmp_path):
    """``trainer.fit(ckpt_path=...)`` into an injected module brings back the ranks the checkpoint was
    saved at, as ``load_adapter_checkpoint`` does."""
    module = Net()
    cb = ll.AdapterCallback("dylora", r=R, alpha=ALPHA, target_modules=["0", "2"], target="net", eval_ranks="none")
    t = _fit(tmp_path, module, cb, steps=2)
    set_rank(module.net, 2)
    ckpt = tmp_path / "rank2.ckpt"
    t.save_checkpoint(ckpt)
    resumed = Net()
    cb2 = ll.AdapterCallback("dylora", r=R, alpha=ALPHA, target_modules=["0", "2"], target="net", eval_ranks="none")
    t2 = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                    callbacks=[cb2], num_sanity_val_steps=0, limit_val_batches=0)
    t2.fit(resumed, _loader(), ckpt_path=str(ckpt))  # already at max_steps: restores and ends
    assert get_rank(resumed.net) == 2
