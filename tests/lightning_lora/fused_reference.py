"""What the tests of the fused adapter paths compare against: a copy of a model on the plain
(unfused) formula, and a run of the two side by side over training steps."""

from __future__ import annotations

from typing import Any

import copy

import torch
from torch import nn

import lightning_lora as ll


def plain_formula_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose adapter layers all run their plain (unfused) formula (``fused = False`` on
    every module that has the switch: LoRA's layers and the LoRA-XS/SB/NLoRA cores)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if hasattr(m, "fused"):
            m.fused = False
    return ref


def assert_input_grads_match_across_steps(model: nn.Module, ref: nn.Module, steps: int, lr: float = 1e-3,
                                          **tolerances: Any) -> None:
    """Train ``model`` (fused path) and ``ref`` (the same weights on the per-layer formula) side by
    side for ``steps`` SGD steps, with a merge and an unmerge (in-place writes to the base weights)
    after each: no step may raise, and the input gradients must agree (``torch.testing.assert_close``
    with ``tolerances``). ``lr`` small enough that the squared-output loss does not blow up (at 0.1 the
    q/k/v model's input gradients grew to 1e27 in three steps, where any two formulas agree relatively)."""
    opts = [torch.optim.SGD(ll.trainable_parameters(m), lr=lr) for m in (model, ref)]
    for opt in opts:  # gradients left by warm-up passes (a deep copy does not carry them) are not part of it
        opt.zero_grad()
    x = torch.randn(3, 8)
    for _ in range(steps):
        grads = []
        for m, opt in zip((model, ref), opts):
            xi = x.clone().requires_grad_(True)
            m(xi).pow(2).sum().backward()
            grads.append(xi.grad)
            opt.step()
            opt.zero_grad()
            ll.merge_adapter(m)
            ll.unmerge_adapter(m)
        torch.testing.assert_close(grads[0], grads[1], **tolerances)
