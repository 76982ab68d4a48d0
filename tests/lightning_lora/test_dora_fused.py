"""DoRA on LoRA's fused path (``LoRALinear._dora_rescale``): the reference formula regrouped.

With the detached norm (the default, paper §4.3) DoRA is ``(m/ν)⊙(W0x + sBAx) + b``: the fused LoRA
output rescaled per row. Checked against the plain formula (``layer.fused = False``): outputs and
every gradient, with and without bias and dropout, under bf16 autocast, at init (the base's output
bit for bit), and what the graph keeps for backward. With a gradient through the norm
(``dora_detach_norm=False``) the layer keeps the plain formula.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_lora as ll
from test_lora_saved_bytes import _held_bytes as held_bytes  # the test directory is on sys.path


def _model(bias: bool, dropout: float = 0.0, detach: bool = True, moved: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 16, bias=bias), nn.GELU(), nn.Linear(16, 8, bias=bias))
    ll.inject_adapter(model, "lora", r=4, alpha=8, use_dora=True, dora_detach_norm=detach, dropout=dropout,
                      target_modules=["0", "2"])
    if moved:  # away from init: B ≠ 0 and m ≠ ν, so every term of the formula is live
        with torch.no_grad():
            for layer in ll.adapter_layers(model).values():
                layer.lora_B.normal_(std=0.3)
                layer.lora_magnitude.mul_(torch.linspace(0.7, 1.4, layer.lora_magnitude.numel()))
    return model


def _run(model: nn.Module, x: torch.Tensor, fused: bool, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for layer in ll.adapter_layers(model).values():
        layer.fused = fused
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # same dropout masks on both paths
    y = model(x)
    y.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_matches_the_reference_formula(bias, dropout):
    model = _model(bias, dropout)
    model.train()
    x = torch.randn(5, 7, 24)
    y_ref, g_ref = _run(model, x, fused=False)
    y, g = _run(model, x, fused=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert set(g) == set(g_ref) and any("lora_magnitude" in n for n in g)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_stays_close_to_fp64():
    model = _model(bias=True)
    x = torch.randn(6, 24)
    ref = _model(bias=True).double()
    ref.load_state_dict(model.state_dict())
    for layer in ll.adapter_layers(ref).values():
        layer.fused = False
    want = ref(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_fused = model(x)
        for layer in ll.adapter_layers(model).values():
            layer.fused = False
        got_plain = model(x)
    assert got_fused.dtype == torch.bfloat16 and torch.isfinite(got_fused).all()
    err_fused = (got_fused.double() - want).abs().max()
    err_plain = (got_plain.double() - want).abs().max()
    assert err_fused <= 2 * err_plain + 1e-3, (err_fused, err_plain)


@pytest.mark.parametrize("autocast", [False, True])
def test_at_init_the_output_is_the_base_models_bit_for_bit(autocast):
    model = _model(bias=True, moved=False)
    base = nn.Sequential(nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 8))
    base[0].load_state_dict(ll.adapter_layers(model)["0"].base_layer.state_dict())
    base[2].load_state_dict(ll.adapter_layers(model)["2"].base_layer.state_dict())
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert torch.equal(model(x), base(x))


def test_gradient_through_the_norm_keeps_the_plain_formula():
    model = _model(bias=True, detach=False)
    x = torch.randn(3, 24)
    y_fused, g_fused = _run(model, x, fused=True)
    y_plain, g_plain = _run(model, x, fused=False)
    assert torch.equal(y_fused, y_plain)
    assert all(torch.equal(g_fused[n], g_plain[n]) for n in g_plain)


def test_the_fused_path_keeps_less_for_backward():
    model = _model(bias=True)
    x = torch.randn(64, 24, requires_grad=True)
    held = {}
    for fused in (False, True):
        for layer in ll.adapter_layers(model).values():
            layer.fused = fused
        held[fused] = held_bytes(model, model(x).sum())
    # the reference keeps W0x and BAx (plus the base output's copy without bias); the fused path
    # keeps out − b: at least one (64, 16) fp32 activation less for the first layer
    assert held[True] <= held[False] - 64 * 16 * 4, held
