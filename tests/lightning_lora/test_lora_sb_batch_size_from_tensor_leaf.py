"""LoRA-SB's |b| (the L_b / |b| weighting of its gradient estimate) comes from the batch's first
tensor leaf with a batch dimension, else from the length of a list of plain values, not from a
first leaf that happens not to be a tensor."""

from __future__ import annotations

from collections import UserDict

import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.lora_sb import _batch_size, estimate_gradients


def test_batch_size_skips_non_tensor_leaves():
    x = torch.zeros(5, 3)
    assert _batch_size({"text": ["a", "b", "c", "d", "e"], "x": x}) == 5
    assert _batch_size({"id": torch.tensor(7), "meta": {"text": ["a"] * 5}, "x": x}) == 5  # 0-dim skipped
    assert _batch_size(UserDict(text=["a"] * 5, x=x)) == 5  # a Mapping that is not a dict (BatchEncoding)
    assert _batch_size(("ignored", [x, x])) == 5
    assert _batch_size({"text": ["a", "b", "c"]}) == 3  # no tensor: the list of strings
    assert _batch_size(["a", "b"]) == 2
    assert _batch_size(torch.tensor(1.0)) == 1 and _batch_size({}) == 1


def test_gradient_estimate_divides_by_the_tensor_batch_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    reference = nn.Sequential(nn.Linear(4, 3))
    reference.load_state_dict(model.state_dict())
    layers = ll.inject_adapter(model, "lora_sb", r=2, target_modules=["0"], svd="exact")
    g = torch.Generator().manual_seed(1)
    batch = {"text": ["w"] * 6, "x": torch.randn(6, 4, generator=g), "y": torch.randn(6, 3, generator=g)}

    def loss_fn(m: nn.Module, b: dict) -> torch.Tensor:
        return (m(b["x"]) - b["y"]).pow(2).mean()

    grads = estimate_gradients(model, [batch], loss_fn, 1, layers)
    (loss_fn(reference, batch) / 6).backward()
    torch.testing.assert_close(grads["0"], reference[0].weight.grad)
