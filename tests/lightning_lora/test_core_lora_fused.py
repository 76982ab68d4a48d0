"""The fused path of the r×r-core adapters (``CoreLoRALinear``: LoRA-XS, LoRA-SB, SLoRA, NLoRA, IntTune)
against the reference formula (``fused = False``, :meth:`CoreLoRALinear.adapter_forward`): outputs and
every gradient (input, trainable factors, trainable bias / base weight) in fp32, with fp64 factors
on fp32 activations (cast path), and in bf16 with and without autocast; on 2-D and 3-D inputs; on
``nn.Linear`` and transformers ``Conv1D``; cast caching across in-place writes and optimizer steps."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.lora_sb import CoreLoRALinear

#: method -> config kwargs; every variant's layers take the fused path unless noted in FALLBACK
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_xs": ("lora_xs", dict(r=4, alpha=16, svd="exact")),
    "lora_sb": ("lora_sb", dict(r=4, svd="exact")),
    "slora": ("slora", dict(r=4, alpha=8)),
    "nlora_nystrom_plain": ("nlora", dict(r=4, alpha=8, residual=False)),
    "nlora_reference": ("nlora", dict(r=4, init="reference")),
    "nlora_nystrom_residual": ("nlora", dict(r=4, alpha=8)),  # full residual: _FusedCoreResidual
    "nlora_reference_residual": ("nlora", dict(r=4, init="reference", residual=True)),
    "inttune_nystrom": ("inttune", dict(r=4, alpha=8)),  # residual s·B (N − N0) A, fused
    "inttune_reference": ("inttune", dict(r=4, init="reference")),
    "lora_xs_bias": ("lora_xs", dict(r=4, alpha=8, svd="exact", bias="lora_only")),
    "slora_bias": ("slora", dict(r=4, bias="lora_only")),
    "nlora_residual_bias": ("nlora", dict(r=4, init="reference", residual=True, bias="lora_only")),
}
FALLBACK: set[str] = set()
#: bf16 normwise relative error allowed between the fused and the reference bf16 results (NLoRA's
#: N = U⁺ has entries ~100x W0's: longer bf16 error chains, as in test_invariants' bf16_rtol)
BF16_TOL = {"nlora_nystrom_plain": 4e-2, "inttune_nystrom": 4e-2}
#: the perturbed Nyström residual in bf16: both paths are 50-150 % off the fp64 result (two large
#: products of U⁺ cancelling), so they are compared with each other in fp32 and fp64 only (the
#: `reference` residual covers bf16); in fp32 the fused and reference rounding differ by ~2e-6
BF16_VARIANTS = [v for v in VARIANTS if v != "nlora_nystrom_residual"]
FP32_TOL = {"nlora_nystrom_residual": 1e-5}


def _perturb(model: nn.Module) -> None:
    """Every factor non-trivial (SLoRA's B = 0 and LoRA-SB's placeholder would hide gradient terms);
    trainable factors also move away from IntTune's stored N0."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in ll.adapter_layers(model).values():
            for name in ("lora_A", "lora_core", "lora_B"):
                t = getattr(layer, name)
                noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
                t.add_(0.3 * noise * (t.double().abs().mean() + 0.1).to(t.dtype))


def _model(variant: str, conv1d: bool = False, adapter_dtype: str = "float32") -> nn.Module:
    method, kw = VARIANTS[variant]
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        model = nn.Sequential(Conv1D(16, 24), nn.Tanh(), Conv1D(24, 16))
    else:
        model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 24))
    ll.inject_adapter(model, method, dict(kw, adapter_dtype=adapter_dtype), target_modules=["0", "2"])
    _perturb(model)
    return model


def _pair(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(fused model, reference copy)."""
    ref = copy.deepcopy(model)
    for layer in ll.adapter_layers(ref).values():
        layer.fused = False
    return model, ref


def _run(model: nn.Module, x: torch.Tensor, gy: torch.Tensor, autocast: bool = False) -> dict[str, torch.Tensor]:
    """Output and every gradient (input and trainable tensors) of ``(model(x) * gy).sum()``, in fp64."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    (y.float() * gy).sum().backward()
    out = {"y": y.detach().double(), "grad_x": x.grad.double()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            out[name] = p.grad.double()
    return out


def _inputs(three_d: bool, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (2, 3, n) if three_d else (5, n)
    x = torch.randn(shape, generator=g)
    gy = torch.randn(shape, generator=g)
    return x, gy


def _uses_fused(model: nn.Module, x: torch.Tensor) -> bool:
    layer = ll.adapter_layers(model)["0"]
    y = layer(x.detach().requires_grad_(True))
    return type(y.grad_fn).__name__ in ("_FusedCoreBackward", "_FusedCoreResidualBackward")


def _assert_close_all(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = b[k].norm().item()
        err = (a[k] - b[k]).norm().item()
        assert err <= rel * scale + 1e-12, f"{k}: |fused - reference| = {err:.3g}, |reference| = {scale:.3g}"


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_equals_reference_fp32(variant: str, three_d: bool) -> None:
    model, ref = _pair(_model(variant))
    x, gy = _inputs(three_d)
    assert _uses_fused(model, x) == (variant not in FALLBACK)
    assert not _uses_fused(ref, x)
    _assert_close_all(_run(model, x, gy), _run(ref, x, gy), FP32_TOL.get(variant, 1e-6))


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("variant", ["lora_xs", "lora_sb", "slora", "nlora_reference", "inttune_nystrom", "slora_bias",
                                     "nlora_nystrom_residual"])
def test_fused_equals_reference_fp64_factors_on_fp32(variant: str, three_d: bool) -> None:
    """fp64 factors on fp32 activations: every factor is cast (frozen ones through the cache)."""
    model, ref = _pair(_model(variant, adapter_dtype="float64"))
    x, gy = _inputs(three_d)
    assert _uses_fused(model, x)
    for _ in range(2):  # the second call reads the cached casts
        _assert_close_all(_run(model, x, gy), _run(ref, x, gy), FP32_TOL.get(variant, 1e-6))


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_model", "autocast"])
@pytest.mark.parametrize("variant", BF16_VARIANTS)
def test_fused_equals_reference_bf16(variant: str, autocast: bool, three_d: bool) -> None:
    """bf16 activations with fp32 factors: the base layers in bf16, or an fp32 model under autocast."""
    model = _model(variant)
    if not autocast:
        for layer in ll.adapter_layers(model).values():
            layer.base_layer.to(torch.bfloat16)
    model, ref = _pair(model)
    x, gy = _inputs(three_d)
    if not autocast:
        x = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert _uses_fused(model, x) == (variant not in FALLBACK)
    fused, plain = _run(model, x, gy, autocast), _run(ref, x, gy, autocast)
    assert fused["y"].dtype == plain["y"].dtype
    _assert_close_all(fused, plain, BF16_TOL.get(variant, 2e-2))


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("variant", ["lora_xs", "slora_bias", "inttune_nystrom", "nlora_nystrom_residual"])
def test_fused_equals_reference_on_conv1d(variant: str, three_d: bool) -> None:
    model, ref = _pair(_model(variant, conv1d=True))
    x, gy = _inputs(three_d)
    assert _uses_fused(model, x)
    _assert_close_all(_run(model, x, gy), _run(ref, x, gy), FP32_TOL.get(variant, 1e-6))


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("variant", ["lora_xs_bias", "nlora_residual_bias"])
def test_trainable_base_weight_gets_its_gradient(variant: str, conv1d: bool) -> None:
    model = _model(variant, conv1d=conv1d)
    for layer in ll.adapter_layers(model).values():
        layer.base_layer.weight.requires_grad_(True)
    model, ref = _pair(model)
    x, gy = _inputs(True)
    out = _run(model, x, gy)
    assert any(k.endswith("base_layer.weight") for k in out)
    _assert_close_all(out, _run(ref, x, gy), 1e-6)


def test_fallbacks_take_the_reference_path() -> None:
    x, _ = _inputs(False)
    model = _model("slora")
    layer = ll.adapter_layers(model)["0"]
    layer.fused = False
    assert not _uses_fused(model, x)
    layer.fused = True
    assert _uses_fused(model, x)
    layer.disabled = True
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.disabled = False
    layer.merge()
    assert not _uses_fused(model, x)
    layer.unmerge()
    # dropout: reference in train mode only (F.dropout is the identity in eval mode)
    drop = _model("slora")
    ll.adapter_layers(drop)["0"].dropout_p = 0.25
    assert not _uses_fused(drop.train(), x)
    assert _uses_fused(drop.eval(), x)


def test_functorch_transform_matches() -> None:
    """Under ``torch.func`` the reference runs (the hand-written backward is not traced)."""
    model = _model("slora")
    x, gy = _inputs(False)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (torch.func.functional_call(model, p, (x,)) * gy).sum()

    grads = torch.func.grad(loss)(params)
    eager = _run(model, x, gy)
    for k, g in grads.items():
        torch.testing.assert_close(g.double(), eager[k], rtol=1e-5, atol=1e-6)


def test_frozen_casts_cached_and_follow_in_place_writes() -> None:
    """fp64 buffers on fp32 activations: the casts are reused between calls and follow
    ``set_factors``, ``load_state_dict`` and buffer replacement; a pending graph keeps its values."""
    model, ref = _pair(_model("lora_xs", adapter_dtype="float64"))
    x, gy = _inputs(True)
    layer = ll.adapter_layers(model)["0"]
    model(x)
    cast = layer._cast_cache["lora_A"][4]
    model(x)
    assert layer._cast_cache["lora_A"][4] is cast  # no new cast without a change
    _assert_close_all(_run(model, x, gy), _run(ref, x, gy), 1e-6)

    # a graph made before the write keeps the factors its forward used
    xg = x.clone().requires_grad_(True)
    y_old = model(xg)
    before = _run(ref, x, gy)
    g = torch.Generator().manual_seed(9)
    A2 = torch.randn(layer.lora_A.shape, generator=g, dtype=torch.float64)
    B2 = torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64)
    for m in (model, ref):
        lay = ll.adapter_layers(m)["0"]
        lay.set_factors(A2, lay.lora_core.detach(), B2)
    (y_old * gy).sum().backward()
    torch.testing.assert_close(xg.grad.double(), before["grad_x"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_old.detach().double(), before["y"], rtol=1e-5, atol=1e-6)
    # the next forward reads the new factors
    after = _run(ref, x, gy)
    assert (after["y"] - before["y"]).abs().max() > 1e-2
    _assert_close_all(_run(model, x, gy), after, 1e-6)

    # load_state_dict (in-place copy) and replacing a buffer by another tensor
    state = {k: v * 0.5 for k, v in ref.state_dict().items() if "lora_" in k}
    ref.load_state_dict(state, strict=False)
    model.load_state_dict(state, strict=False)
    _assert_close_all(_run(model, x, gy), _run(ref, x, gy), 1e-6)
    for m in (model, ref):
        lay = ll.adapter_layers(m)["2"]
        new = lay.lora_B.clone() * 2.0  # a new tensor (as .to() makes), at the old one's version
        while new._version < lay.lora_B._version:
            new.mul_(1.0)
        assert new._version == lay.lora_B._version
        lay.lora_B = new
    _assert_close_all(_run(model, x, gy), _run(ref, x, gy), 1e-6)
    model.to("cpu")  # .to() replaces the buffers: the cache lets go of the old ones
    assert not layer._cast_cache
    _assert_close_all(_run(model, x, gy), _run(ref, x, gy), 1e-6)


@pytest.mark.parametrize("fused_opt", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("variant", ["slora", "lora_xs", "inttune_nystrom", "nlora_reference_residual"])
def test_graph_pending_across_optimizer_step(variant: str, fused_opt: bool) -> None:
    """bf16 activations, fp32 factors (every factor is cast): an optimizer step between forward and
    backward leaves the pending graph on the values its forward used (as the reference's cast
    nodes do), also with a fused optimizer (which leaves version counters alone); the next forward
    reads the stepped values."""
    model = _model(variant)
    for layer in ll.adapter_layers(model).values():
        layer.base_layer.to(torch.bfloat16)
    model, ref = _pair(model)
    x, gy = _inputs(True)
    x = x.bfloat16()
    kw = dict(fused=True) if fused_opt else dict(foreach=True)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05, **kw) for m in (model, ref)]
    y = model(x)  # pending
    expected = _run(ref, x, gy)  # the reference at the pre-step values
    for m, opt in zip((model, ref), opts):
        for p in m.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)
        opt.step()
        m.zero_grad(set_to_none=True)
    (y.float() * gy).sum().backward()
    got = {"y": y.detach().double()}
    got.update({k: p.grad.double() for k, p in model.named_parameters() if p.requires_grad})
    _assert_close_all(got, {k: v for k, v in expected.items() if k != "grad_x"}, 2e-2)
    # after the step: both models hold the same stepped values, and the fused forward reads them
    stepped = _run(ref, x, gy)
    assert (stepped["y"] - expected["y"]).abs().max() > 1e-2
    _assert_close_all(_run(model, x, gy), stepped, 2e-2)


def test_in_place_update_of_an_uncast_factor_before_backward_raises() -> None:
    """fp32 factors on fp32 activations are used as they are: an in-place update before backward
    (a non-fused optimizer step) raises, as for nn.Linear's weight and on the reference path."""
    x, gy = _inputs(False)
    for fused in (True, False):
        model = _model("slora")
        for layer in ll.adapter_layers(model).values():
            layer.fused = fused
        y = model(x.requires_grad_(True))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, foreach=True)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (y * gy).sum().backward()


def test_frozen_factors_save_no_input() -> None:
    """With A frozen (LoRA-XS) the fused function keeps the two (N, r) products, not x (N, n)."""
    model = _model("lora_xs")
    layer = ll.adapter_layers(model)["0"]
    assert isinstance(layer, CoreLoRALinear)
    x = torch.randn(64, 24, requires_grad=True)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        layer(x)
    # u_s (R's gradient reads it) is kept; v_s (B's gradient) and x (A's) are not
    assert (64, 24) not in saved and saved.count((64, 4)) == 1


def test_double_backward_raises_instead_of_a_wrong_second_order_gradient() -> None:
    model = _model("slora")
    x, gy = _inputs(False)
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad((model(x) * gy).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_linear_subclass_with_its_own_forward_takes_the_reference() -> None:
    class Doubled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(Doubled(24, 16))
    ll.inject_adapter(model, "lora_xs", dict(r=4, svd="exact"), target_modules=["0"])
    x, _ = _inputs(False)
    assert not _uses_fused(model, x)
    layer = ll.adapter_layers(model)["0"]
    torch.testing.assert_close(layer(x), layer.adapter_forward(x, layer.base_layer(x)))


def test_meta_device_forward() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(24, 16))
    ll.inject_adapter(model, "lora_xs", dict(r=4, adapter_dtype="float64"), target_modules=["0"])
    y = model(torch.empty(2, 3, 24, device="meta"))
    assert y.shape == (2, 3, 16) and y.device.type == "meta"
