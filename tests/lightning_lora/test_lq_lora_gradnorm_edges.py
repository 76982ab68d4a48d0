"""Edge cases of LQ-LoRA, its quantizer and GradNormLoRP: each test failed on the code before its fix."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.core.config import make_config
from lightning_lora.methods.lq_lora import LQLoRA
from lightning_lora.optim.gradnorm_lorp import Blockwise8bit, GradNormLoRPAdamW
from lightning_lora.quant import dequantize, lq_decompose, nf_levels, quantize


# ---- GradNormLoRP optimizer --------------------------------------------------------------------------
def test_weight_norm_matches_explicit_reference_when_g_turns_negative():
    """The optimizer stores only g and ‖v‖ and rebuilds v from p. With an explicit (g, v) textbook
    weight-norm Adam as reference, p must agree after every step, including once a row's g < 0
    (there v̂ = −p̂; taking v̂ = p̂ flipped ∇g and the rebuilt row)."""
    torch.manual_seed(0)
    w = torch.randn(3, 5) * 0.05
    c = w / w.norm(dim=1, keepdim=True) + 0.3 * torch.randn(3, 5)  # loss <c, p>: pushes g down
    p = nn.Parameter(w.clone())
    lr, (b1, b2), eps = 0.02, (0.9, 0.999), 1e-6
    opt = GradNormLoRPAdamW([{"params": [p], "rank": 5, "proj_type": "identity", "weight_norm": True}],
                            lr=lr, betas=(b1, b2), eps=eps)
    v, g = w.clone(), w.norm(dim=1)
    mv, sv, mg, sg = (torch.zeros_like(v), torch.zeros_like(v), torch.zeros_like(g), torch.zeros_like(g))
    went_negative = False
    for t in range(1, 31):
        p.grad = c.clone()
        opt.step()
        vn = v.norm(dim=1, keepdim=True)
        vh = v / vn
        gg = (c * vh).sum(dim=1)
        gv = (g.unsqueeze(1) / vn) * (c - gg.unsqueeze(1) * vh)
        mv.lerp_(gv, 1 - b1)
        sv.mul_(b2).addcmul_(gv, gv, value=1 - b2)
        mg.lerp_(gg, 1 - b1)
        sg.mul_(b2).addcmul_(gg, gg, value=1 - b2)
        bc1, bc2 = 1 - b1**t, math.sqrt(1 - b2**t)
        v = v - lr * (mv / bc1) / (sv.sqrt() / bc2 + eps)
        g = g - lr * (mg / bc1) / (sg.sqrt() / bc2 + eps)
        went_negative |= bool((g < 0).any())
        ref = g.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)
        torch.testing.assert_close(p.detach(), ref, atol=1e-5, rtol=0, msg=f"step {t}")
    assert went_negative  # the scenario really crossed g = 0
    torch.testing.assert_close(opt.state[p]["wn_g"], g, atol=1e-5, rtol=0)


def test_add_param_group_gets_rank_defaults_and_checks():
    a, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(6, 4))
    opt = GradNormLoRPAdamW([{"params": [a]}], lr=1e-2)
    opt.add_param_group({"params": [b], "rank": 2})
    group = opt.param_groups[1]
    assert (group["update_proj_gap"], group["scale"], group["proj_type"], group["weight_norm"]) == (200, 1.0, "std", False)
    a.grad, b.grad = torch.randn(4, 6), torch.randn(6, 4)
    before = b.detach().clone()
    opt.step()  # KeyError 'weight_norm' before the fix
    delta = b.detach() - before
    sv = torch.linalg.svdvals(delta)
    assert sv[2:].max() < 1e-5 * sv[0] and "proj" in opt.state[b]  # rank ≤ 2 up to fp32 rounding of p
    with pytest.raises(ValueError, match="rank and update_proj_gap"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "rank": 0})
    with pytest.raises(ValueError, match="proj_type"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "rank": 1, "proj_type": "nope"})


def test_8bit_small_second_moment_next_to_a_large_one_stays_adam_sized():
    """An entry whose √v is < 1/510 of its block's max rounds to code 0. Reading that back as v = 0
    made the next step m̂/ε (×10⁴ the fp32 step here); it must stay close to the fp32 step."""
    steps = {}
    for bits in (32, 8):
        p = nn.Parameter(torch.zeros(16))
        opt = GradNormLoRPAdamW([p], lr=1.0, optim_bits=bits, eps=1e-8)
        g = torch.zeros(16)
        g[0] = 1.0  # a large gradient long ago sets the block's max √v
        p.grad = g
        opt.step()
        for _ in range(100):
            p.grad = torch.zeros(16)
            opt.step()
        g = torch.zeros(16)
        g[1] = 1e-3  # a small fresh gradient: √v_1 ≈ max/950, m_1 ≠ 0
        p.grad = g
        opt.step()
        before = p.detach().clone()
        p.grad = torch.zeros(16)
        opt.step()  # uses the stored (8-bit) moments of entry 1
        steps[bits] = float((p.detach() - before)[1])
    assert steps[32] < 0 and steps[8] < 0
    assert abs(steps[8] - steps[32]) <= 0.5 * abs(steps[32]), steps


def test_8bit_sqrt_zero_code_reads_mid_bin_and_zero_block_reads_zero():
    v = torch.tensor([1.0, 1e-8, 0.0, 0.25] + [0.0] * 4)
    codes, mx = Blockwise8bit.quantize_sqrt(v, 4)
    back = Blockwise8bit.dequantize_sqrt(codes, mx, v.shape, 4)
    step = 1.0 / 255
    assert codes[1] == 0 and codes[2] == 0
    torch.testing.assert_close(back[1:3].sqrt(), torch.full((2,), step / 4))  # |error| ≤ step/4 < step/2
    assert torch.equal(back[4:], torch.zeros(4))  # an all-zero block (max 0) stays exactly 0
    assert back[0] == 1.0 and (back[3].sqrt() - 0.5).abs() <= step / 2 + 1e-6


# ---- quantization ------------------------------------------------------------------------------------
def test_nf_levels_returns_a_fresh_tensor():
    w = torch.randn(8, 16)
    expected = dequantize(quantize(w, "nf4"))
    levels = nf_levels(4)
    levels.mul_(2)  # a caller's in-place edit
    nf_levels(4, "cpu").zero_()
    assert nf_levels(4).abs().max() == 1.0 and nf_levels(4).unique().numel() == 16
    assert torch.equal(dequantize(quantize(w, "nf4")), expected)


# ---- LQ-LoRA -----------------------------------------------------------------------------------------
def test_lq_lora_config_rejects_bad_adapter_dtype():
    with pytest.raises(ValueError, match="adapter_dtype"):
        make_config("lq_lora", adapter_dtype="fp16")
    with pytest.raises(ValueError, match="adapter_dtype"):
        make_config("lq_lora", adapter_dtype="int8")
    assert make_config("lq_lora", adapter_dtype="bfloat16").adapter_dtype == "bfloat16"
    with pytest.raises(ValueError, match="max_iters"):
        make_config("lq_lora", max_iters=0)


def test_lq_lora_rank_above_dims_names_the_module():
    net = nn.Sequential(nn.Linear(20, 13), nn.Tanh(), nn.Linear(13, 7))
    with pytest.raises(ValueError, match=r"r=8 exceeds min\(out, in\) = 7 of module '2'"):
        ll.inject_adapter(net, "lq_lora", r=8, max_iters=1, target_modules=["0", "2"])


def test_lq_lora_precomputed_decomposition_of_wrong_shape_raises():
    dec = lq_decompose(torch.randn(16, 8), 2, "nf4", max_iters=2)  # (out, in) = (16, 8)
    net = nn.Sequential(nn.Linear(16, 8))  # (out, in) = (8, 16)
    method = LQLoRA(make_config("lq_lora", r=2, target_modules=["0"]), decompositions={"0": dec})
    with pytest.raises(ValueError, match=r"decompositions\['0'\] is for a \(16, 8\) matrix"):
        ll.inject_adapter(net, method)
    # the right shape is still taken as is
    net = nn.Sequential(nn.Linear(8, 16))
    layers = ll.inject_adapter(net, LQLoRA(make_config("lq_lora", r=2, target_modules=["0"]), decompositions={"0": dec}))
    assert torch.equal(layers["0"].base_layer.weight, dec.q_dense)


# ---- GradNormLoRP config -----------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(proj_rank=0), dict(update_proj_gap=0), dict(eps=-1.0)])
def test_gradnorm_config_rejects_bad_projection_options(kw):
    with pytest.raises(ValueError):
        make_config("gradnorm_lorp", **kw)


@pytest.mark.parametrize("shape", [(5, 7), (13, 20), (64, 32)])
@pytest.mark.parametrize("spec", ["nf4", "nf3", "b3-s8-fp16-B16-G16", "b4-s--bf16-B8-G8", "b8-s3-bf16-B32-G64"])
def test_quantized_linear_storage_is_sized_without_quantizing(monkeypatch, shape, spec):
    """An empty QuantizedLinear (the load path of every LQ-LoRA layer) gets buffers of exactly the
    sizes and dtypes quantize() produces, reading back as zeros, without quantizing a dense zero matrix
    (which cost ~1 s per 4096 x 11008 layer on the CPU, on every load)."""
    from lightning_lora.quant import QuantizedLinear
    from lightning_lora.quant import linear as qlinear_mod

    ref = quantize(torch.zeros(shape), spec).tensors()

    def no_quantize(*a, **k):
        raise AssertionError("QuantizedLinear() must not quantize to size its buffers")

    monkeypatch.setattr(qlinear_mod, "quantize", no_quantize)
    layer = QuantizedLinear(shape[1], shape[0], spec)
    for name, t in ref.items():
        buf = getattr(layer, name)
        assert buf.shape == t.shape and buf.dtype == t.dtype, name
    assert torch.equal(layer.weight, torch.zeros(shape)) and layer.storage_bytes() * 8 == layer.storage_bits()


def test_fp16_scales_saturate_instead_of_turning_the_block_nan():
    """A block absmax above 65504 used to become an fp16 inf scale and dequantize to NaN (0·inf); it
    saturates now, so the matrix stays finite and the ILP sees a finite (large) cost for that config."""
    from lightning_lora.quant import build_cost_table, solve_ilp

    torch.manual_seed(0)
    w = torch.randn(16, 16)
    w[0, 0] = 1e5
    for spec in ("b4-s8-fp16-B16-G16", "b4-s--fp16-B16-G16"):
        d = dequantize(quantize(w, spec))
        assert torch.isfinite(d).all(), spec
        assert d.abs().max() <= 65504 * (1 + 1e-3) and (d[1:] - w[1:]).abs().max() < 1e5, spec
    table = build_cost_table({"w": w}, 0, ["b4-s8-fp16-B16-G16", "b4-s8-bf16-B16-G16"])  # rank 0: plain NF
    assert np.isfinite(table.cost).all()
    assert solve_ilp(table, 8.0).choice["w"].scale_dtype == "bf16"


_DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _DEVICES)
def test_lq_lora_precomputed_decomposition_lands_on_the_base_device(device):
    """A decomposition computed on the CPU for a model on another device: Q must follow the base
    layer (it stayed on the decomposition's device while A and B moved, so forward mixed devices).
    ``meta`` stands in for a second device on CPU-only machines."""
    dec = lq_decompose(torch.randn(8, 16), 2, "nf4", max_iters=2)
    net = nn.Sequential(nn.Linear(16, 8, device=device))
    method = LQLoRA(make_config("lq_lora", r=2, target_modules=["0"]), decompositions={"0": dec})
    layer = ll.inject_adapter(net, method)["0"]
    want = torch.device(device).type
    assert {t.device.type for t in (*layer.base_layer.buffers(), *layer.parameters())} == {want}
    if want == "cuda":
        x = torch.randn(3, 16, device=device)
        torch.testing.assert_close(layer(x).cpu(), x.cpu() @ (dec.q_dense + dec.L1 @ dec.L2).t() + net[0].base_layer.bias.cpu(),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tests the CUDA device path; CI has no GPU")
@pytest.mark.parametrize("compile_dequant", [False, True])
def test_lq_lora_on_cuda_bf16_trains_and_round_trips(tmp_path, monkeypatch, compile_dequant):
    """Device and dtype on a GPU: decomposition on the GPU, bf16 forward and backward finite with
    gradients on A and B only, save/load onto a fresh GPU model bit-identical."""
    from lightning_lora.quant import QuantizedLinear

    monkeypatch.setattr(QuantizedLinear, "compile_dequant", compile_dequant)

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(96, 80), nn.Tanh(), nn.Linear(80, 40)).to("cuda", torch.bfloat16)

    net = make()
    ll.inject_adapter(net, "lq_lora", r=4, max_iters=3, quant="b3-s8-fp16-B16-G16", target_modules=["0", "2"])
    x = torch.randn(6, 96, device="cuda", dtype=torch.bfloat16)
    y = net(x)
    y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    trained = {n for n, p in net.named_parameters() if p.grad is not None}
    assert trained == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    ll.save_adapter(net, tmp_path / "a")
    fresh = make()
    ll.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(x), net(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tests the CUDA device path; CI has no GPU")
@pytest.mark.parametrize("bits", [32, 8])
def test_gradnorm_optimizer_on_cuda_resumes_bit_exact(bits):
    def run(p: nn.Parameter, opt: GradNormLoRPAdamW, steps: range) -> None:
        for t in steps:
            g = torch.Generator(device="cuda").manual_seed(t)
            p.grad = torch.randn(p.shape, generator=g, device="cuda")
            opt.step()

    def group(p: nn.Parameter) -> list[dict]:
        return [{"params": [p], "rank": 4, "update_proj_gap": 2, "weight_norm": True}]

    torch.manual_seed(0)
    w = torch.randn(24, 16, device="cuda")
    p, q = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    opt = GradNormLoRPAdamW(group(p), lr=1e-2, optim_bits=bits, weight_decay=0.1)
    run(p, opt, range(3))
    q.data.copy_(p.data)
    opt2 = GradNormLoRPAdamW(group(q), lr=1e-2, optim_bits=bits, weight_decay=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint file: no shared tensors
    run(p, opt, range(3, 6))
    run(q, opt2, range(3, 6))
    assert torch.isfinite(p).all() and torch.equal(p, q)


def test_weight_norm_on_zero_rows_warns_instead_of_silently_freezing_them():
    """weight_norm=True on LoRA B (zero at init) kept B at 0 for good without a word: g = 0 rows get
    ∇v = 0 and ∇g = 0. The row really stays 0 (that is the math); the optimizer now says so."""
    b = nn.Parameter(torch.zeros(8, 2))
    opt = GradNormLoRPAdamW([{"params": [b], "rank": 2, "weight_norm": True}], lr=1e-2)
    b.grad = torch.randn(8, 2)
    with pytest.warns(UserWarning, match="8 all-zero row"):
        opt.step()
    b.grad = torch.randn(8, 2)
    opt.step()
    assert torch.equal(b.detach(), torch.zeros(8, 2))
    w = nn.Parameter(torch.randn(8, 2))
    opt = GradNormLoRPAdamW([{"params": [w], "rank": 2, "weight_norm": True}], lr=1e-2)
    w.grad = torch.randn(8, 2)
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        opt.step()  # no zero rows: no warning
