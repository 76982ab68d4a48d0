"""The fused core functions of LoRA-XS / LoRA-SB / SLoRA / NLoRA / IntTune (``_FusedCore``,
``_FusedCoreResidual``) keep the frozen base weight for backward outside ``save_for_backward``; an
in-place write to it between forward and backward must raise as it does for ``nn.Linear`` (autograd's
version check) instead of giving silently wrong input gradients. Writes between steps (optimizer
steps, merge / unmerge) and inference tensors (no version counter) must still work."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import lightning_lora as ll

from fused_reference import assert_input_grads_match_across_steps, plain_formula_copy  # the test directory is on sys.path

MODIFIED = "modified by an inplace operation"  # what nn.Linear raises (test_lora_fused_base_weight_version.py)

#: method -> config kwargs, and the grad_fn the layer's output must have (proves the fused path ran)
VARIANTS = {
    "lora_xs": ("lora_xs", dict(r=2, svd="exact"), "_FusedCoreBackward"),
    "lora_sb": ("lora_sb", dict(r=2, svd="exact"), "_FusedCoreBackward"),
    "slora": ("slora", dict(r=2), "_FusedCoreBackward"),
    "nlora_plain": ("nlora", dict(r=2, residual=False), "_FusedCoreBackward"),
    "nlora_residual": ("nlora", dict(r=2, init="reference", residual=True), "_FusedCoreResidualBackward"),
    "inttune": ("inttune", dict(r=2), "_FusedCoreBackward"),
}


def _model(variant: str) -> nn.Module:
    method, kw, _ = VARIANTS[variant]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    ll.inject_adapter(model, method, kw, target_modules=["0"])
    return model


def _forward(model: nn.Module, variant: str, x: torch.Tensor) -> torch.Tensor:
    y = model(x)
    assert type(y.grad_fn).__name__ == VARIANTS[variant][2], "the fused path did not run"
    return y


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_in_place_base_write_before_backward_raises(variant):
    model = _model(variant)
    x = torch.randn(3, 8, requires_grad=True)
    y = _forward(model, variant, x)
    with torch.no_grad():
        model[0].base_layer.weight.add_(1.0)
    with pytest.raises(RuntimeError, match=MODIFIED) as err:
        y.sum().backward()
    assert "base weight" in str(err.value) and "expected version" in str(err.value)


@pytest.mark.parametrize("variant", ["lora_xs", "nlora_residual"])
def test_no_input_grad_does_not_check(variant):
    """Without an input gradient the base weight is not read in backward: a write is harmless (the
    factors' gradients read only saved products), as it is for nn.Linear with x not requiring grad."""
    model = _model(variant)
    y = _forward(model, variant, torch.randn(3, 8))
    with torch.no_grad():
        model[0].base_layer.weight.add_(1.0)
    y.sum().backward()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_writes_between_steps_do_not_raise(variant):
    """Optimizer steps and merge / unmerge (in-place on the base weight) between steps leave the fused
    path working, with the reference formula's input gradients."""
    model = _model(variant)
    ref = plain_formula_copy(model)
    assert_input_grads_match_across_steps(model, ref, 2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["lora_xs", "nlora_residual"])
def test_inference_mode_base_weight_runs(variant):
    """A base layer built under torch.inference_mode has an inference weight (no version counter to
    record; it is kept on ctx, not saved, so autograd accepts it): forward and backward still run, with
    the reference formula's input gradient."""
    method, kw, _ = VARIANTS[variant]
    torch.manual_seed(0)
    with torch.inference_mode():
        base = nn.Linear(8, 6)
    model = nn.Sequential(base)
    ll.inject_adapter(model, method, kw, target_modules=["0"])
    assert model[0].base_layer.weight.is_inference()
    x = torch.randn(3, 8, requires_grad=True)
    _forward(model, variant, x).pow(2).sum().backward()
    model[0].fused = False
    xr = x.detach().clone().requires_grad_(True)
    # the reference: nn.Linear cannot save an inference weight for backward, so a normal copy
    yr = model[0].adapter_forward(xr, xr @ base.weight.clone().t() + base.bias.clone())
    yr.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
