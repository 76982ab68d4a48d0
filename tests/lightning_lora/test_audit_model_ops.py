"""Everyday PyTorch operations on a LoRA-adapted model: copies (``copy.deepcopy``, ``pickle``) and
fp64 models (``.double()``: merge / unmerge, DoRA's gradients).

- A copy is a live layer of its own: after a step of an optimizer holding its A and B it keeps its
  casts between forwards as the original does (it was never registered for the step hook, so it
  re-cast A and B at every forward for the rest of the run), and it carries none of the original's
  cached casts.
- An fp64 model stays fp64: merge / unmerge does not round its base weights to fp32, and DoRA's norm
  and magnitude are not computed in fp32 (its fp64 gradients passed through fp32 casts).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods import lora as lora_mod

from test_lora_cast_cache import _Block  # the test directory is on sys.path


def _bf16_model(use_dora: bool) -> nn.Module:
    """bf16 base, fp32 adapters: the fused path runs on cached bf16 casts of A and B."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block()).to(torch.bfloat16)
    layers = ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["q", "k", "v", "o", "up", "down"],
                               use_dora=use_dora, adapter_dtype="float32")
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.1)
    return model


def _lora_layers(model: nn.Module) -> list[lora_mod.LoRALinear]:
    return [m for m in model.modules() if isinstance(m, lora_mod.LoRALinear)]


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).float().pow(2).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _deepcopy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _pickle(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("make_copy", [_deepcopy, _pickle], ids=["deepcopy", "pickle"])
def test_copy_is_a_live_layer_that_keeps_its_own_casts(make_copy, use_dora):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    model = _bf16_model(use_dora)
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-2, fused=True)
    model(x)  # learns the sibling sets
    _step(model, opt, x)
    model(x)  # casts kept from here on
    twin = make_copy(model)
    assert torch.equal(twin(x), model(x))
    originals = {id(t) for layer in _lora_layers(model) for t in layer._casts}
    for layer in _lora_layers(twin):  # none of the original's cached casts (or their copies) came along
        assert not any(id(t) in originals for t in layer._casts)
    before = model(x).clone()
    twin_opt = torch.optim.AdamW(ll.trainable_parameters(twin), lr=1e-2, fused=True)
    for _ in range(2):
        _step(twin, twin_opt, x)
    twin(x)
    kept = [layer._casts for layer in _lora_layers(twin)]
    y = twin(x)
    # the copy, like the original, reuses its casts between optimizer steps (before the fix it made
    # new ones at every forward: it was not registered for the optimizer step hook)
    for layer, casts in zip(_lora_layers(twin), kept):
        assert layer._casts[0] is casts[0] and layer._casts[1] is casts[1]
        assert torch.equal(layer._casts[0], layer.lora_A.detach().to(torch.bfloat16))
        assert torch.equal(layer._casts[1], layer.lora_B.detach().to(torch.bfloat16))
    ll.invalidate_cast_caches()
    assert torch.equal(y, twin(x))  # what fresh casts give
    assert torch.equal(model(x), before)  # the original did not move
    assert not torch.equal(twin(x), before)


def _fp64_model(use_dora: bool, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)).double()
    layers = ll.inject_adapter(model, "lora", r=4, target_modules=["0", "2"], use_dora=use_dora,
                               adapter_dtype="float64", **kw)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.1)
            if layer.lora_magnitude is not None:
                layer.lora_magnitude.mul_(1.1)
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_fp64_merge_unmerge_keeps_fp64_precision(use_dora):
    model = _fp64_model(use_dora)
    x = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights = [p.clone() for p in model.parameters() if not p.requires_grad]
    y = model(x)
    ll.merge_adapter(model)
    y_merged = model(x)
    ll.unmerge_adapter(model)
    # fp32 rounding of the base weights moved these by ~1e-8
    torch.testing.assert_close(y_merged, y, rtol=0, atol=1e-13)
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-13)
    for w, w0 in zip((p for p in model.parameters() if not p.requires_grad), weights):
        torch.testing.assert_close(w, w0, rtol=0, atol=1e-14)


def test_fp64_dora_at_init_is_the_base_and_its_gradients_are_fp64():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)).double()
    x = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = base(x)
    model = copy.deepcopy(base)
    ll.inject_adapter(model, "lora", r=4, target_modules=["0", "2"], use_dora=True, adapter_dtype="float64")
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-14)  # m = ν in fp64 at init

    model = _fp64_model(True, dora_detach_norm=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = tuple(p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, params)  # failed: ν and m went through fp32


@pytest.mark.parametrize("detach", [True, False])
def test_fp64_dora_gradient_accumulation_equals_one_batch(detach):
    model = _fp64_model(True, dora_detach_norm=detach)
    acc, one = copy.deepcopy(model), copy.deepcopy(model)
    xs = torch.randn(4, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    acc.zero_grad(set_to_none=False)
    for i in range(4):
        acc(xs[i:i + 1]).pow(2).sum().backward()
    one(xs).pow(2).sum().backward()
    grads_one = dict(one.named_parameters())
    for name, p in acc.named_parameters():
        if p.requires_grad:
            # the magnitude's gradient was rounded to fp32 per backward (relative error ~1e-7)
            torch.testing.assert_close(p.grad, grads_one[name].grad, rtol=1e-12, atol=1e-14)
