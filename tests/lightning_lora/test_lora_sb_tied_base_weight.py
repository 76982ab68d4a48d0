"""LoRA-SB's gradient estimate on a base weight tied between two adapted layers: one hook per weight
tensor, and both layers get the gradient of the full (shared) weight, Σ_b ∇_W (L_b / |b|) with both
uses summed, as plain autograd computes it."""

from __future__ import annotations

import copy

import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.lora_sb import init_lora_sb, lora_sb_factors


def _tied_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 3))
    model[2].weight = model[0].weight
    return model


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (model(batch[0]) - batch[1]).pow(2).mean()


def test_tied_weight_under_two_lora_sb_layers_gets_the_full_weight_gradient():
    model = _tied_model()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(2)]
    for batch in batches:  # G = Σ_b ∇_W (L_b / |b|) of the shared tensor (autograd sums both uses)
        (_loss(reference, batch) / 4).backward()
    want = reference[0].weight.grad

    layers = ll.inject_adapter(model, "lora_sb", r=2, target_modules=["0", "2"], svd="exact", n_init_batches=2)
    assert layers["0"].base_layer.weight is layers["2"].base_layer.weight
    grads = init_lora_sb(model, batches, _loss, lr=1e-3, warmup_ratio=0)

    torch.testing.assert_close(grads["0"], want)
    torch.testing.assert_close(grads["2"], want)
    A, R, B = lora_sb_factors(want, 2, 1e-3, "exact")
    for name in ("0", "2"):
        layer = layers[name]
        assert bool(layer.lora_sb_initialized)
        torch.testing.assert_close(layer.lora_core, R)
        torch.testing.assert_close(layer.lora_B @ layer.lora_core @ layer.lora_A, B @ R @ A)
    # the estimate left no gradient behind and restored the frozen base
    assert model[0].base_layer.weight.grad is None and not model[0].base_layer.weight.requires_grad


def test_tied_weight_reduce_runs_once_per_weight():
    model = _tied_model()
    ll.inject_adapter(model, "lora_sb", r=2, target_modules=["0", "2"], svd="exact", n_init_batches=1)
    seen: list[int] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:  # stands in for DDP's in-place all-reduce sum
        seen.append(id(t))
        return t.mul_(2)

    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g))
    grads = init_lora_sb(model, [batch], _loss, lr=1e-3, warmup_ratio=0, reduce=reduce)
    assert len(seen) == 1  # one shared tensor: reducing it per layer would double the sum
    reference = _tied_model()
    (_loss(reference, batch) / 4).backward()
    torch.testing.assert_close(grads["2"], 2 * reference[0].weight.grad)
