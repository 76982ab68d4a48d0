"""A check shared by the tests of the fused paths' version checks (test_lora_fused_base_weight_version.py,
test_frozen_weight_version_lora_sb_nlora.py): legitimate in-place writes between steps must not trip them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import lightning_lora as ll


def assert_input_grads_match_across_steps(model: nn.Module, ref: nn.Module, steps: int, **tolerances: Any) -> None:
    """Train ``model`` (fused path) and ``ref`` (the same weights on the per-layer formula) side by
    side for ``steps`` SGD steps, with a merge and an unmerge (in-place writes to the base weights)
    after each: no step may raise, and the input gradients must agree (``torch.testing.assert_close``
    with ``tolerances``)."""
    opts = [torch.optim.SGD(ll.trainable_parameters(m), lr=0.1) for m in (model, ref)]
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
