"""DoRA (and GradNormLoRP, its DoRA-form layer) on a base weight with an all-zero row (a pruned unit).

There ``m = ‖W0‖_row = 0`` and ``ν = ‖W0 + sBA‖_row = 0`` at init, so ``m/ν`` is ``0/0``: the layer
takes the scale 1 there (the row runs as the base). Checked: output equal to the base bit for bit at
init (fused and plain paths, detached norm or not), finite gradients, merge/unmerge restoring the base
weight (zero rows exactly), merged output equal to the unmerged one; also a row with ``m = 0`` after training
(``ν ≠ 0``, the merged row is 0 whatever W0 was) unmerges exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_lora as ll

ZERO_ROWS = (2, 5)
# (method, options, fused); GradNormLoRP is the DoRA layer with dropout 0.1 by default: 0 here
CASES = [
    pytest.param("lora", dict(use_dora=True), True, id="dora-fused"),
    pytest.param("lora", dict(use_dora=True), False, id="dora-plain"),
    pytest.param("lora", dict(use_dora=True, dora_detach_norm=False), True, id="dora-norm-grad"),
    pytest.param("gradnorm_lorp", dict(dropout=0.0), True, id="gradnorm_lorp-fused"),
    pytest.param("gradnorm_lorp", dict(dropout=0.0), False, id="gradnorm_lorp-plain"),
]


def _base(bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6, bias=bias), nn.Tanh(), nn.Linear(6, 4, bias=bias))
    with torch.no_grad():
        for i in ZERO_ROWS:
            model[0].weight[i].zero_()
        model[2].weight[1].zero_()
    return model


def _adapted(method: str, options: dict, fused: bool, bias: bool = True):
    base = _base(bias)
    model = copy.deepcopy(base)
    ll.inject_adapter(model, method, r=2, target_modules=["0", "2"], **options)
    for layer in ll.adapter_layers(model).values():
        layer.fused = fused
    return base, model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("method", "options", "fused"), CASES)
def test_output_equals_the_base_at_init(method, options, fused, bias):
    base, model = _adapted(method, options, fused, bias)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        y0, y = base(x), model(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y0)


@pytest.mark.parametrize(("method", "options", "fused"), CASES)
def test_gradients_are_finite(method, options, fused):
    _, model = _adapted(method, options, fused)
    x = torch.randn(4, 8, requires_grad=True)
    model(x).pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude" in n for n in grads) and any("lora_B" in n for n in grads)
    for name, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), name
    assert torch.isfinite(x.grad).all()
    # the zero rows' B gets a gradient (the row can grow), and its output stays finite after a step
    layer = ll.adapter_layers(model)["0"]
    assert layer.lora_B.grad[list(ZERO_ROWS)].abs().sum() > 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.sub_(0.1 * p.grad)
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize(("method", "options", "fused"), CASES)
def test_merge_then_unmerge_restores_the_base_exactly(method, options, fused):
    base, model = _adapted(method, options, fused)
    x = torch.randn(5, 8)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in ll.adapter_layers(model).items()}
    with torch.no_grad():
        y, h = model(x), model[0](x)
        ll.merge_adapter(model)
        for layer in ll.adapter_layers(model).values():
            assert torch.isfinite(layer.base_layer.weight).all()
        y_merged, h_merged = model(x), model[0](x)
        ll.unmerge_adapter(model)
        y_back = model(x)
    torch.testing.assert_close(y_merged, y, rtol=1e-6, atol=1e-6)
    assert torch.equal(h_merged[:, list(ZERO_ROWS)], h[:, list(ZERO_ROWS)])  # the pruned units: the bias
    torch.testing.assert_close(y_back, base(x).detach(), rtol=1e-6, atol=1e-6)
    # zero rows come back bit for bit; the others within rounding (W'·ν/m − sBA), as they always did
    zero = {"0": list(ZERO_ROWS), "2": [1]}
    for n, layer in ll.adapter_layers(model).items():
        w = layer.base_layer.weight
        assert torch.isfinite(w).all(), n
        assert torch.equal(w[zero[n]], weights[n][zero[n]]) and not w[zero[n]].any(), n
        torch.testing.assert_close(w, weights[n], rtol=1e-6, atol=1e-6, msg=n)


@pytest.mark.parametrize("fused", [True, False])
def test_merge_round_trip_after_training_moves_the_zero_rows(fused):
    """Away from init: B ≠ 0 on the pruned rows (ν ≠ 0), one of them with m still 0, another with
    m grown; and a nonzero row whose m went to 0 (its merged row is 0 whatever W0 was)."""
    _, model = _adapted("lora", dict(use_dora=True), fused)
    layer = ll.adapter_layers(model)["0"]
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.lora_magnitude[5] = 0.7  # pruned row 5 grew; pruned row 2 keeps m = 0
        layer.lora_magnitude[0] = 0.0  # a nonzero row switched off
    x = torch.randn(5, 8)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = model(x)
        assert torch.isfinite(y).all()
        ll.merge_adapter(model)
        assert torch.isfinite(layer.base_layer.weight).all()
        y_merged = model(x)
        ll.unmerge_adapter(model)
        y_back = model(x)
    torch.testing.assert_close(y_merged, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_back, y, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(layer.base_layer.weight).all()
    assert torch.equal(layer.base_layer.weight[[0, 2]], w0[[0, 2]])  # m = 0: kept at merge
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-6, atol=1e-6)


def test_delta_weight_is_zero_on_zero_rows_at_init():
    _, model = _adapted("lora", dict(use_dora=True), True)
    for layer in ll.adapter_layers(model).values():
        dw = layer.delta_weight()
        assert torch.isfinite(dw).all()
    assert torch.equal(ll.adapter_layers(model)["0"].delta_weight()[list(ZERO_ROWS)], torch.zeros(2, 8))
