"""DyLoRA's fused path (LoRA's fused function at rank b) against its plain formula (``fused=False``):
outputs and every gradient, both modes, both scalings, train (sampled rank) and eval, fp32 and bf16
autocast, 2-D and 3-D inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods import dylora as dylora_mod


def _pair(mode: str, scaling_impl: str, bias: bool = True):
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16, bias=bias), nn.Tanh(), nn.Linear(16, 8, bias=bias))
        layers = ll.inject_adapter(model, "dylora", r=6, alpha=12, target_modules=["0", "2"], mode=mode,
                                   scaling_impl=scaling_impl)
        with torch.no_grad():  # B starts at zero: make every adapter term count
            for layer in layers.values():
                layer.lora_B.normal_(0, 0.2)
                layer.fused = fused
        models.append((model, layers))
    return models


def _grads(model: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.float().pow(2).sum().backward()
    params = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, params


@pytest.mark.parametrize("mode", ["frozen", "full"])
@pytest.mark.parametrize("scaling_impl", ["paper", "code"])
@pytest.mark.parametrize("shape", [(10, 12), (2, 5, 12)])
@pytest.mark.parametrize("train", [True, False])
def test_fused_equals_reference_fp32(mode, scaling_impl, shape, train):
    (fm, fl), (rm, rl) = _pair(mode, scaling_impl)
    for model, layers in ((fm, fl), (rm, rl)):
        model.train(train)
        dylora_mod.set_rank(layers, 3)  # train-mode and deployment rank
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out_f, gx_f, gp_f = _grads(fm, x)
    out_r, gx_r, gp_r = _grads(rm, x)
    torch.testing.assert_close(out_f, out_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_f, gx_r, rtol=1e-6, atol=1e-6)
    assert gp_f.keys() == gp_r.keys()
    for name in gp_r:
        if gp_r[name] is None:
            assert gp_f[name] is None, name
        else:
            torch.testing.assert_close(gp_f[name], gp_r[name], rtol=1e-5, atol=1e-6, msg=name)
    if train and mode == "frozen":  # only row b-1 of A and column b-1 of B train at rank b = 3
        a_grad = gp_f["0.lora_A"]
        assert a_grad[:2].abs().sum() == 0 and a_grad[2].abs().sum() > 0 and a_grad[3:].abs().sum() == 0


def test_fused_bf16_autocast_as_close_to_fp64_as_the_reference():
    """bf16 under autocast: the fused path's outputs and gradients are finite and no further from an
    fp64 run of the same model than the plain formula's (both round differently)."""
    (fm, fl), (rm, rl) = _pair("full", "paper")
    (dm, dl), _ = _pair("full", "paper")
    for model, layers in ((fm, fl), (rm, rl)):
        model.to(torch.bfloat16).train()
        dylora_mod.set_rank(layers, 4)
    dm.double().train()
    dylora_mod.set_rank(dl, 4)
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _grads(fm, x)
        plain = _grads(rm, x)
    exact = _grads(dm, x.double())
    assert fused[0].dtype == plain[0].dtype == torch.bfloat16
    pairs = [("out", fused[0], plain[0], exact[0]), ("x", fused[1], plain[1], exact[1])]
    pairs += [(n, fused[2][n], plain[2][n], exact[2][n]) for n in exact[2]]
    for name, f, r, e in pairs:
        assert torch.isfinite(f).all(), name
        err_f = (f.double() - e).abs().max().item()
        err_r = (r.double() - e).abs().max().item()
        scale = e.abs().max().item()
        assert err_f <= 1.5 * err_r + 1e-3 * scale, (name, err_f, err_r, scale)
        assert err_f <= 2e-2 * scale, (name, err_f, scale)


def test_fused_path_is_taken_and_dropout_falls_back(monkeypatch):
    """The fused function runs by default; active dropout, ``fused=False`` and an unfrozen base weight
    take the plain formula (which gives the base weight its gradient)."""
    calls = []
    real = dylora_mod._apply_fused
    monkeypatch.setattr(dylora_mod, "_apply_fused", lambda *a: calls.append(1) or real(*a))
    (fm, fl), _ = _pair("full", "paper")
    fm.train()
    x = torch.randn(4, 12)
    fm(x)
    assert len(calls) == 2
    fl["0"].base_layer.weight.requires_grad_(True)
    fm(x).sum().backward()
    assert len(calls) == 3 and fl["0"].base_layer.weight.grad is not None
    fl["2"].dropout_p = 0.1
    fm(x)
    assert len(calls) == 3
