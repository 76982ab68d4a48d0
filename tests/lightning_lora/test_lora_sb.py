"""LoRA-XS and LoRA-SB specifics (METHODS.md §12 invariants): SVD factors, saved frozen factors,
the LoRA-SB gradient init (plain PyTorch and through AdapterCallback), projected first step,
parameter counts."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.lora_sb import LoRASBLinear, init_lora_sb, lora_sb_factors


def _xs(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 48))
    layers = ll.inject_adapter(model, "lora_xs", dict(r=4, svd="exact", **kw), target_modules=["0", "2"])
    return model, layers


def _sb(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 8))
    layers = ll.inject_adapter(model, "lora_sb", dict(r=4, svd="exact", **kw), target_modules=["0", "2"])
    return model, layers


def _batches(n: int = 3, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 48, generator=g), torch.randint(0, 8, (6,), generator=g)) for _ in range(n)]


def _ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


# ---- LoRA-XS -----------------------------------------------------------------------------------
def test_lora_xs_factors_are_the_best_rank_r_approximation():
    model, layers = _xs()
    for layer in layers.values():
        w0 = layer.base_weight.detach().double()
        B, A = layer.lora_B.double(), layer.lora_A.double()
        torch.testing.assert_close(B.t() @ B, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
        U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
        best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
        torch.testing.assert_close(B @ A, best, atol=1e-5, rtol=0)
        # Eckart–Young: the residual is the tail of the spectrum
        assert abs((w0 - B @ A).norm().item() - S[4:].norm().item()) < 1e-5
        assert layer.lora_core.abs().max() < 1e-4 and layer.lora_core.abs().max() > 0  # N(0, (1e-5)²)
    # the seeded randomized SVD lands close to the exact one
    torch.manual_seed(0)
    lowrank = ll.inject_adapter(nn.Sequential(nn.Linear(48, 32)), "lora_xs", dict(r=4), target_modules=["0"])["0"]
    w0 = lowrank.base_weight.detach()
    U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
    err = (w0 - lowrank.lora_B @ lowrank.lora_A).norm() / S[4:].norm()
    assert err < 1.05


def test_lora_xs_only_core_trains_and_factors_are_saved_not_recomputed(tmp_path):
    model, layers = _xs()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_core", "2.lora_core"]
    assert {"lora_A", "lora_B"} <= dict(layers["0"].named_buffers()).keys()
    with torch.no_grad():
        layers["0"].lora_A.mul_(1.5)  # factors that no SVD of W0 would give
    ll.save_adapter(model, tmp_path / "xs")
    other, _ = _xs(seed=0)
    fresh = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 48))
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "base_layer" in k})
    ll.load_adapter(fresh, tmp_path / "xs")
    assert torch.equal(fresh[0].lora_A, layers["0"].lora_A)
    assert not torch.equal(fresh[0].lora_A, other[0].lora_A)
    x = torch.randn(4, 48)
    assert torch.equal(fresh(x), model(x))


def test_lora_xs_zero_core_is_exact_and_alpha_defaults_to_r():
    model, layers = _xs(core_init="zeros")
    assert all(layer.scaling == 1.0 for layer in layers.values())
    x = torch.randn(3, 48)
    with torch.no_grad():
        y = model(x)
        with ll.disable_adapter(model):
            assert torch.equal(model(x), y)
    assert _xs(alpha=16)[1]["0"].scaling == 4.0


# ---- LoRA-SB -----------------------------------------------------------------------------------
def test_lora_sb_alpha_is_fixed_with_a_warning():
    with pytest.warns(UserWarning, match="alpha"):
        _, layers = _sb(alpha=32)
    assert layers["0"].scaling == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _sb(alpha=4)


def test_lora_sb_init_matches_the_paper():
    model, layers = _sb()
    batches = _batches()
    lr, warmup, T = 1e-3, 0.02, 100
    eta1 = lr / (warmup * T)
    grads = init_lora_sb(model, batches, _ce, lr=lr, warmup_ratio=warmup, total_steps=T)
    # G is the sum over batches of the full-weight gradient of loss / batch size, at W0
    ref = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 8))
    ref.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "base_layer" in k})
    g_ref = {"0": torch.zeros(32, 48), "2": torch.zeros(8, 32)}
    for b in batches:
        ref.zero_grad()
        (_ce(ref, b) / 6).backward()
        g_ref["0"] += ref[0].weight.grad
        g_ref["2"] += ref[2].weight.grad
    for name, layer in layers.items():
        torch.testing.assert_close(grads[name], g_ref[name], atol=1e-6, rtol=1e-5)
        dw = -eta1 * torch.sign(grads[name])
        assert torch.isin(dw, torch.tensor([-eta1, 0.0, eta1])).all()
        B, R, A = layer.lora_B, layer.lora_core, layer.lora_A
        r = layer.r
        torch.testing.assert_close(B.t() @ B, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(A @ A.t(), torch.eye(r), atol=1e-5, rtol=0)
        d = torch.diagonal(R)
        assert torch.equal(R, torch.diag(d)) and (d >= 0).all() and (d[:-1] >= d[1:]).all()
        S = torch.linalg.svdvals(dw.double())
        assert abs((dw - B @ R @ A).norm().item() - S[r:].norm().item()) < 1e-6  # Eckart–Young
        assert bool(layer.lora_sb_initialized)
    # W0 is not reset: the model is W0 + B R A (s = 1)
    x = batches[0][0]
    with torch.no_grad():
        for name, layer in layers.items():
            ref.get_submodule(name).weight.add_(layer.lora_B @ layer.lora_core @ layer.lora_A)
        torch.testing.assert_close(model(x), ref(x), atol=1e-6, rtol=0)


def test_lora_sb_first_step_is_the_projected_gradient():
    """∂L/∂R = s Bᵀ G Aᵀ, and one SGD step on R moves W by −η s² P_B G P_A (s = 1)."""
    model, layers = _sb()
    init_lora_sb(model, _batches(), _ce, lr=1e-2)
    batch = _batches(1, seed=9)[0]
    # G = ∂L/∂W at the current weight W0 + BRA: merge, take the full-weight gradient, unmerge
    weights = {name: layer.base_layer.weight for name, layer in layers.items()}
    ll.merge_adapter(model)
    for w in weights.values():
        w.requires_grad_(True)
    _ce(model, batch).backward()
    merged_grads = {}
    for name, w in weights.items():
        merged_grads[name] = w.grad.clone()
        w.grad = None
        w.requires_grad_(False)
    ll.unmerge_adapter(model)
    for layer in layers.values():
        layer.lora_core.grad = None
    _ce(model, batch).backward()
    eta = 0.5
    for name, layer in layers.items():
        B, A, Gw = layer.lora_B.detach(), layer.lora_A.detach(), merged_grads[name]
        torch.testing.assert_close(layer.lora_core.grad, B.t() @ Gw @ A.t(), atol=1e-6, rtol=1e-4)
        w_old = layer.delta_weight()
        with torch.no_grad():
            layer.lora_core -= eta * layer.lora_core.grad
        step = layer.delta_weight() - w_old
        torch.testing.assert_close(step, -eta * (B @ B.t()) @ Gw @ (A.t() @ A), atol=1e-6, rtol=1e-4)


def test_lora_sb_factors_and_eta1_helpers():
    g = torch.randn(16, 12)
    A, R, B = lora_sb_factors(g, 3, 0.5, svd="exact")
    assert A.shape == (3, 12) and R.shape == (3, 3) and B.shape == (16, 3)
    # the sign pattern's top singular vectors, scaled by η₁
    U, S, Vh = torch.linalg.svd(-0.5 * torch.sign(g))
    torch.testing.assert_close(torch.diagonal(R), S[:3], atol=1e-5, rtol=0)


def test_lora_sb_placeholder_is_base_until_init():
    model, layers = _sb()
    x = torch.randn(3, 48)
    with torch.no_grad():
        y = model(x)
        with ll.disable_adapter(model):
            assert torch.equal(model(x), y)
    assert not any(bool(layer.lora_sb_initialized) for layer in layers.values())


def test_lora_sb_init_through_adapter_callback(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    data = _batches(4)
    xs, ys = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 8))

        def training_step(self, batch, batch_idx):
            loss = _ce(self.net, batch)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(ll.trainable_parameters(self), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(xs, ys), batch_size=6, shuffle=False)

    module = Module()
    ref = Module()
    cb = ll.AdapterCallback("lora_sb", r=4, svd="exact", n_init_batches=2, target_modules=["net.0", "net.2"])
    trainer = pl.Trainer(
        max_steps=1, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
    )
    trainer.fit(module)
    # the same init by hand: 2 batches, lr from the optimizer, T = 1 step, warmup 0.02
    ll.inject_adapter(ref.net, "lora_sb", dict(r=4, svd="exact"), target_modules=["0", "2"])
    init_lora_sb(ref.net, data[:2], _ce, lr=0.1, warmup_ratio=0.02, total_steps=1)
    for name in ("0", "2"):
        got, want = module.net.get_submodule(name), ref.net.get_submodule(name)
        assert isinstance(got, LoRASBLinear) and bool(got.lora_sb_initialized)
        torch.testing.assert_close(got.lora_A, want.lora_A, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.lora_B, want.lora_B, atol=1e-5, rtol=0)
        assert not torch.equal(got.lora_core, want.lora_core)  # R took one SGD step after the init
    # a second fit keeps the (initialised, trained) factors
    a_before = module.net[0].lora_A.clone()
    trainer2 = pl.Trainer(
        max_steps=1, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
    )
    cb.method.set_init_data(batches=data[2:], loss_fn=lambda m, b: _ce(m.net, b))
    trainer2.fit(module)
    assert torch.equal(module.net[0].lora_A, a_before)


# ---- parameter counts (METHODS S6 worked example) ---------------------------------------------
def test_mistral_7b_lora_sb_r96_count_on_meta():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000,
    )
    with torch.device("meta"):
        model = MistralForCausalLM(cfg)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ll.inject_adapter(model, "lora_sb", dict(r=96), target_modules=targets)
    assert sum(p.numel() for p in ll.trainable_parameters(model)) == 2_064_384
