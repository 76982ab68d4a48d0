"""An MLP whose up (and gate) projections run under a non-reentrant ``torch.utils.checkpoint`` while
its down projection does not: the down projection's LoRA input is ``gelu(up(x))`` or
``silu(gate(x)) * up(x)``, whose factors the checkpoint packed with its hooks. Replaying from them
unpacked each a second time in backward, which the checkpoint refuses (``CheckpointError``). Such
inputs are saved instead: training works, and outputs and gradients equal those of
``replay_inputs="none"`` bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lightning_lora as ll


class PartlyCheckpointedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "gelu":
            h = checkpoint(lambda t: F.gelu(self.up(t)), x, use_reentrant=False)
        else:
            h = checkpoint(lambda t: F.silu(self.gate(t)) * self.up(t), x, use_reentrant=False)
        return self.down(h)


def _run(kind: str, replay: str):
    torch.manual_seed(0)
    model = PartlyCheckpointedMLP()
    ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["up", "gate", "down"], replay_inputs=replay)
    with torch.no_grad():
        for layer in ll.adapter_layers(model).values():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = model(x, kind)
    out.pow(2).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in ll.trainable_parameters(model)]


@pytest.mark.parametrize("replay", ["products", "all"])
@pytest.mark.parametrize("kind", ["gelu", "mul"])
def test_checkpointed_factors_are_saved_not_replayed(kind: str, replay: str) -> None:
    got, expected = _run(kind, replay), _run(kind, "none")
    assert len(got) == len(expected)
    for a, b in zip(got, expected):  # (the gate's adapter gets no gradient in the GELU MLP, either way)
        assert (a is None and b is None) or torch.equal(a, b)
