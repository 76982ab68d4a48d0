"""The fused LoRA functions keep the frozen base weight (and a sibling set's stacked A) for backward
outside ``save_for_backward``; an in-place write to it between forward and backward must raise as it
does for ``nn.Linear`` (autograd's version check) instead of giving silently wrong input gradients.
Writes the package makes itself (optimizer steps, cast refreshes, merge / unmerge between steps)
must not raise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_lora as ll

from fused_reference import assert_input_grads_match_across_steps, plain_formula_copy  # the test directory is on sys.path
from lightning_lora.methods import lora as lora_mod

MODIFIED = "modified by an inplace operation"


class _Attn(nn.Module):
    """q, k, v read the same input: one fused sibling set once the plan is learned."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, 4), nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x).sum(-1) + self.k(x).sum(-1) + self.v(x).sum(-1)


def _single(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    ll.inject_adapter(model, "lora", r=2, alpha=4, target_modules=["0"], dropout=dropout)
    with torch.no_grad():  # B starts at zero: make the adapter term count
        model[0].lora_B.normal_(0, 0.3)
    assert model[0].fused
    return model


def _siblings() -> _Attn:
    torch.manual_seed(0)
    model = _Attn()
    ll.inject_adapter(model, "lora", r=2, alpha=4, target_modules=["q", "k", "v"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    x = torch.randn(3, 8, requires_grad=True)
    for _ in range(2):  # the first pass learns the plan, the second runs the fused set
        model(x).sum().backward()
    assert model.q._siblings.sets, "the q/k/v sibling set was not formed"
    return model


def _spy(monkeypatch, cls) -> list[int]:
    """Count calls of ``cls.forward`` (proves the fused path ran)."""
    calls: list[int] = []
    fwd = cls.forward

    def counted(ctx, *args):
        calls.append(1)
        return fwd(ctx, *args)

    monkeypatch.setattr(cls, "forward", staticmethod(counted))
    return calls


def test_nn_linear_raises_on_an_in_place_base_write():
    """What the fused paths must match."""
    lin = nn.Linear(8, 6).requires_grad_(False)
    x = torch.randn(3, 8, requires_grad=True)
    y = lin(x)
    with torch.no_grad():
        lin.weight.add_(1.0)
    with pytest.raises(RuntimeError, match=MODIFIED):
        y.sum().backward()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_single_layer_raises_on_an_in_place_base_write(monkeypatch, dropout):
    model = _single(dropout)
    calls = _spy(monkeypatch, lora_mod._FusedLoRA)
    x = torch.randn(3, 8, requires_grad=True)
    y = model(x)
    assert calls, "the fused path did not run"
    with torch.no_grad():
        model[0].base_layer.weight.add_(1.0)
    with pytest.raises(RuntimeError, match=MODIFIED) as err:
        y.sum().backward()
    assert "base weight" in str(err.value) and "expected version" in str(err.value)


def test_dylora_fused_raises_on_an_in_place_base_write():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    ll.inject_adapter(model, "dylora", r=4, alpha=4, target_modules=["0"])
    x = torch.randn(3, 8, requires_grad=True)
    y = model(x)
    with torch.no_grad():
        model[0].base_layer.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match=MODIFIED):
        y.sum().backward()


@pytest.mark.parametrize("member", ["q", "k", "v"])
def test_sibling_set_raises_on_an_in_place_base_write(monkeypatch, member):
    model = _siblings()
    calls = _spy(monkeypatch, lora_mod._FusedLoRASiblings)
    x = torch.randn(3, 8, requires_grad=True)
    y = model(x)
    assert calls, "the fused sibling path did not run"
    with torch.no_grad():
        getattr(model, member).base_layer.weight.add_(1.0)
    with pytest.raises(RuntimeError, match=MODIFIED) as err:
        y.sum().backward()
    assert "base weight" in str(err.value)


def test_sibling_set_raises_on_an_in_place_write_to_the_stacked_a():
    model = _siblings()
    x = torch.randn(3, 8, requires_grad=True)
    y = model(x)
    s = model.q._siblings.sets[model.q]
    a_cat = s._a_cat[1]  # the (R, n) stacked A the forward read
    with torch.no_grad():
        a_cat.add_(1.0)
    with pytest.raises(RuntimeError, match=MODIFIED) as err:
        y.sum().backward()
    assert "stacked A" in str(err.value)


@pytest.mark.parametrize("kind", ["single", "siblings"])
def test_own_writes_between_steps_do_not_raise(kind):
    """Optimizer steps on the adapters, merge / unmerge (in-place on the base weight) between steps,
    and cast refreshes leave the fused paths working, with the per-layer path's gradients."""
    model = _single() if kind == "single" else _siblings()
    ref = plain_formula_copy(model)
    assert_input_grads_match_across_steps(model, ref, 3)


def test_inference_mode_base_weights_run(monkeypatch):
    """A model built under torch.inference_mode has inference tensors (no version counter to record)."""
    calls = _spy(monkeypatch, lora_mod._FusedLoRASiblings)
    with torch.inference_mode():
        single = _single()
        x = torch.randn(3, 8)
        assert single(x).shape == (3, 6)
        attn = _Attn()
        ll.inject_adapter(attn, "lora", r=2, alpha=4, target_modules=["q", "k", "v"])
        for _ in range(3):
            assert attn(x).shape == (3,)
    assert calls, "the fused sibling path did not run"
