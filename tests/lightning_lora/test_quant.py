"""NF quantization, packing, storage accounting, decomposition and ILP (METHODS.md §2, invariants 1-12)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_lora.quant import (
    PRESETS,
    QuantConfig,
    QuantizedLinear,
    balanced_svd,
    build_cost_table,
    dequantize,
    lq_decompose,
    nf_levels,
    pack_codes,
    parse_config,
    quantize,
    quantize_dequantize,
    solve_ilp,
    storage_bits,
    unpack_codes,
)
from lightning_lora.quant.ilp import DEFAULT_MIP_REL_GAP, CostTable, brute_force, storage_table
from lightning_lora.quant.nf import block_scales, layout

NF4_TABLE = [-1, -.6962, -.5251, -.3949, -.2844, -.1848, -.0910, 0, .0796, .1609, .2461, .3379, .4407, .5626, .7230, 1]
NF3_TABLE = [-1, -.4786, -.2171, 0, .1609, .3379, .5626, 1]
NF2_TABLE = [-1, 0, .3379, 1]


# ---- 1. code book -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codebook_shape(bits):
    lv = nf_levels(bits)
    assert lv.numel() == 2**bits and torch.all(lv[1:] > lv[:-1])
    assert lv[0] == -1 and lv[-1] == 1 and int((lv == 0).sum()) == 1
    assert int((lv < 0).sum()) == 2 ** (bits - 1) - 1 and int((lv > 0).sum()) == 2 ** (bits - 1)


@pytest.mark.parametrize("bits,table", [(4, NF4_TABLE), (3, NF3_TABLE), (2, NF2_TABLE)])
def test_codebook_matches_published_tables(bits, table):
    torch.testing.assert_close(nf_levels(bits), torch.tensor(table), atol=1e-4, rtol=0)


def test_bad_bits_and_configs_raise():
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantConfig(block_size=12)
    with pytest.raises(ValueError, match="unknown quantization config"):
        parse_config("nf5")
    assert parse_config(QuantConfig(3, None, "bf16", 16, 16).name) == QuantConfig(3, None, "bf16", 16, 16)


# ---- packing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (8 * 37,), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() * bits // 8
    assert torch.equal(unpack_codes(packed, bits), codes)


# ---- 2-3. quantization --------------------------------------------------------------------------------
def test_idempotent_without_double_quantization():
    w = torch.randn(40, 56)
    cfg = QuantConfig(3, None, "fp32", 16, 16)
    once = quantize_dequantize(w, cfg)
    assert torch.equal(quantize_dequantize(once, cfg), once)


@pytest.mark.parametrize("spec", ["nf2", "nf3", "nf4", "b4-s--fp32-B32-G16", "b3-s2-bf16-B16-G64"])
def test_values_are_levels_times_block_scale(spec):
    cfg = parse_config(spec)
    w = torch.randn(33, 50)  # 1650 elements: not a multiple of the block size (padding)
    q = quantize(w, cfg)
    deq = dequantize(q).reshape(-1)
    lay = layout(w.numel(), cfg)
    s_hat = block_scales(q)
    padded = torch.zeros(lay.padded_numel)
    padded[: w.numel()] = deq
    normed = padded.view(lay.n_blocks, cfg.block_size) / s_hat.unsqueeze(1)
    lv = nf_levels(cfg.bits)
    dist = (normed.unsqueeze(-1) - lv).abs().min(dim=-1).values
    assert dist.max() < 1e-5  # every value is level · ŝ_k
    codes = unpack_codes(q.codes, cfg.bits).view(lay.n_blocks, cfg.block_size)
    assert max(len(torch.unique(row)) for row in codes) <= 2**cfg.bits


def test_round_trip_error_bound():
    """Without double quantization each element is within half the widest level gap × s_k."""
    w = torch.randn(64, 96)
    for bits in (2, 3, 4, 8):
        cfg = QuantConfig(bits, None, "fp32", 32, 16)
        lv = nf_levels(bits)
        half_gap = float((lv[1:] - lv[:-1]).max()) / 2
        blocks = w.reshape(-1, 32)
        s = blocks.abs().amax(dim=1, keepdim=True)
        err = (quantize_dequantize(w, cfg).reshape(-1, 32) - blocks).abs()
        assert torch.all(err <= half_gap * s + 1e-6)
    # with double quantization the block scales are off by at most half a scale step
    cfg = parse_config("b4-s4-fp32-B16-G16")
    q = quantize(w, cfg)
    s_true = w.reshape(-1, 16).abs().amax(dim=1)
    mu = s_true.min()
    step = (s_true - mu).view(-1, 16).amax(dim=1).repeat_interleave(16) / (2**4 - 1)
    assert torch.all((block_scales(q) - s_true).abs() <= step / 2 + 1e-6)
    # relative error falls with the bit width
    errs = [float((quantize_dequantize(w, p) - w).norm() / w.norm()) for p in ("nf2", "nf3", "nf4", "nf8")]
    assert errs == sorted(errs, reverse=True) and errs[2] < 0.12 and errs[3] < 0.01


def test_zero_blocks_and_nonfinite():
    w = torch.zeros(16, 64)
    w[3] = torch.randn(64)
    assert torch.equal(quantize_dequantize(w, "nf4")[0], torch.zeros(64))
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[float("nan")] * 8]), "nf4")


# ---- 4. storage accounting ------------------------------------------------------------------------------
def test_bits_per_param_presets_and_monotonicity():
    assert math.isclose(PRESETS["nf4"].bits_per_param(), 4.127, abs_tol=1e-3)
    assert math.isclose(PRESETS["nf3"].bits_per_param(), 3.127, abs_tol=1e-3)
    base = dict(bits=3, scale_bits=4, scale_dtype="fp16", block_size=32, scale_block_size=64)
    def bpp(**kw):
        return QuantConfig(**{**base, **kw}).bits_per_param()
    assert bpp(bits=2) < bpp(bits=3) < bpp(bits=4) < bpp(bits=8)
    assert bpp(scale_bits=2) < bpp(scale_bits=3) < bpp(scale_bits=4) < bpp(scale_bits=8)
    assert bpp(scale_dtype="bf16") == bpp(scale_dtype="fp16") < bpp(scale_dtype="fp32")
    assert bpp(block_size=16) > bpp(block_size=32) > bpp(block_size=64)
    assert bpp(scale_block_size=16) > bpp(scale_block_size=64) > bpp(scale_block_size=256)


@pytest.mark.parametrize("shape", [(576, 192), (33, 50), (7, 8)])
@pytest.mark.parametrize("spec", ["nf2", "nf3", "nf4", "nf8", "b3-s--bf16-B16-G16", "b2-s3-fp16-B32-G64"])
def test_storage_accounting_is_exact(shape, spec):
    cfg = parse_config(spec)
    q = quantize(torch.randn(shape), cfg)
    assert q.nbytes() * 8 == storage_bits(math.prod(shape), cfg)
    layer = QuantizedLinear.from_float(torch.randn(shape), None, cfg)
    assert layer.storage_bytes() * 8 == layer.storage_bits() == storage_bits(math.prod(shape), cfg)
    # large divisible shapes approach the paper's formula (padding and μ vanish)
    if shape == (576, 192) and cfg.scale_bits is not None:
        assert abs(layer.storage_bits() / math.prod(shape) - cfg.bits_per_param()) < 0.02


# ---- QuantizedLinear ------------------------------------------------------------------------------------
def test_quantized_linear_forward_backward_and_dtype_cast():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 32)
    q = QuantizedLinear.from_float(lin.weight, lin.bias, "nf4")
    assert [n for n, _ in q.named_parameters()] == ["bias"] and not q.bias.requires_grad
    w = quantize_dequantize(lin.weight, "nf4")
    x = torch.randn(2, 5, 48, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, lin.bias), atol=1e-6, rtol=0)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, w, lin.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    buffers = {n: b.clone() for n, b in q.named_buffers()}
    q.to(torch.bfloat16)  # integer bit patterns: quantization state survives the cast unchanged
    assert all(torch.equal(b, buffers[n]) for n, b in q.named_buffers())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(torch.randn(3, 48)).dtype == torch.bfloat16


# ---- 5-8, 10. decomposition -----------------------------------------------------------------------------
def _low_rank_plus_noise(seed: int, m: int = 64, n: int = 96, r: int = 8, noise: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / math.sqrt(r) + noise * torch.randn(m, n, generator=g)


def test_decomposition_error_decreases_and_best_is_kept():
    w = _low_rank_plus_noise(0)
    d = lq_decompose(w, 8, "nf3", max_iters=30)
    assert d.errors[1] < d.errors[0]  # the alternation improves on the first iterate
    assert d.error <= d.errors[0] and d.error == min(d.errors)
    kept = d.errors[: d.errors.index(d.error) + 1]
    assert all(b <= a for a, b in zip(kept, kept[1:]))
    recomputed = float((w - d.q_dense - d.L1 @ d.L2).norm())
    assert math.isclose(recomputed, d.error, rel_tol=1e-5)
    last = lq_decompose(w, 8, "nf3", max_iters=30, return_last=True)
    assert last.error == last.errors[-1]


def test_exact_low_rank_is_recovered():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 6, generator=g) @ torch.randn(6, 40, generator=g)
    d = lq_decompose(w, 6, "nf2", max_iters=5, svd="exact")
    assert float((w - d.q_dense - d.L1 @ d.L2).norm() / w.norm()) < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lq_beats_plain_nf(seed):
    w = _low_rank_plus_noise(seed)
    plain = float((w - quantize_dequantize(w, "nf3")).norm())
    assert lq_decompose(w, 8, "nf3", max_iters=20).error < plain


def test_balanced_factors():
    w = torch.randn(30, 20)
    L1, L2 = balanced_svd(w, 5, "exact")
    s = torch.linalg.svdvals(w)[:5]
    torch.testing.assert_close(L1.norm(dim=0), s.sqrt(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(L2.norm(dim=1), s.sqrt(), atol=1e-5, rtol=1e-5)


def test_constant_fisher_equals_unweighted():
    w = _low_rank_plus_noise(3)
    # one alternation step (later steps can flip a code sitting on a level midpoint by rounding)
    plain = lq_decompose(w, 8, "nf4", max_iters=1, svd="exact")
    weighted = lq_decompose(w, 8, "nf4", max_iters=1, svd="exact", fisher=torch.full_like(w, 2.5))
    torch.testing.assert_close(weighted.L1 @ weighted.L2, plain.L1 @ plain.L2, atol=1e-5, rtol=1e-4)
    assert math.isclose(weighted.error, plain.error * math.sqrt(2.5), rel_tol=1e-3)


def test_fisher_weighting_lowers_weighted_error():
    w = _low_rank_plus_noise(4)
    g = torch.Generator().manual_seed(5)
    fisher = torch.rand(w.shape[0], 1, generator=g) ** 4 * torch.rand(1, w.shape[1], generator=g) ** 4
    plain = lq_decompose(w, 8, "nf3", max_iters=10)
    weighted = lq_decompose(w, 8, "nf3", max_iters=10, fisher=fisher)
    plain_weighted_err = float(((w - plain.q_dense - plain.L1 @ plain.L2) * fisher.sqrt()).norm())
    assert weighted.error < plain_weighted_err


def test_decompose_rejects_bad_input():
    with pytest.raises(ValueError, match="rank"):
        lq_decompose(torch.randn(4, 8), 5, "nf4")
    with pytest.raises(ValueError, match="fisher"):
        lq_decompose(torch.randn(4, 8), 2, "nf4", fisher=torch.ones(8, 4))


# ---- 11-12. ILP -------------------------------------------------------------------------------------------
def _toy_table(seed: int = 0) -> CostTable:
    rng = np.random.default_rng(seed)
    configs = [parse_config(p) for p in ("nf2", "nf3", "nf4", "nf8")]
    numels = [4096, 8192, 12288]
    # cost falls with bits, more steeply for some matrices
    cost = np.array([[rng.uniform(0.5, 2) * 4.0 ** -c.bits * n for c in configs] for n in numels])
    return CostTable([f"m{i}" for i in range(3)], numels, configs, cost, storage_table(numels, configs))


@pytest.mark.parametrize("budget", [2.3, 2.6, 3.0, 3.4, 3.9, 4.5, 6.0, 9.0])
def test_ilp_equals_brute_force(budget):
    table = _toy_table()
    sol = solve_ilp(table, budget, mip_rel_gap=0.0)
    best, _ = brute_force(table, budget)
    assert math.isclose(sol.objective, best, rel_tol=1e-9)
    assert sol.bits_per_param <= budget + 1e-12 and len(sol.choice) == 3


def test_ilp_default_gap_within_tolerance_of_optimum():
    # 6 matrices x 4 configs: brute force over 4^6 picks; the default gap must stay within 1e-4 of it
    rng = np.random.default_rng(3)
    configs = [parse_config(p) for p in ("nf2", "nf3", "nf4", "nf8")]
    numels = [int(n) for n in rng.integers(1, 8, size=6) * 2048]
    cost = np.array([[rng.uniform(0.5, 2) * 4.0 ** -c.bits * n for c in configs] for n in numels])
    table = CostTable([f"m{i}" for i in range(6)], numels, configs, cost, storage_table(numels, configs))
    for budget in (2.4, 3.1, 3.7, 5.0):
        sol = solve_ilp(table, budget)
        best, _ = brute_force(table, budget)
        assert best <= sol.objective <= best * (1 + DEFAULT_MIP_REL_GAP) + 1e-12
        assert sol.bits_per_param <= budget + 1e-12
    with pytest.raises(ValueError, match="mip_rel_gap"):
        solve_ilp(table, 3.0, mip_rel_gap=-1.0)


def test_ilp_properties():
    table = _toy_table(1)
    max_bits = table.storage.max(axis=1).sum() / sum(table.numels)
    sol = solve_ilp(table, max_bits)
    assert [table.configs.index(sol.choice[n]) for n in table.names] == list(table.cost.argmin(axis=1))
    objectives = [solve_ilp(table, b).objective for b in np.linspace(2.3, 8.5, 12)]
    assert all(b <= a + 1e-12 for a, b in zip(objectives, objectives[1:]))
    with pytest.raises(ValueError, match="below the smallest"):
        solve_ilp(table, 2.0)


def test_cost_table_from_decompositions():
    weights = {f"w{i}": _low_rank_plus_noise(i, 32, 64) for i in range(2)}
    table = build_cost_table(weights, 4, ["nf2", "nf4"], max_iters=3)
    assert table.cost.shape == (2, 2) and np.all(table.cost[:, 0] > table.cost[:, 1])
    assert table.storage[0, 0] == storage_bits(32 * 64, parse_config("nf2"))
    sol = solve_ilp(table, 3.5)
    assert sol.seconds < 10 and set(sol.choice) == {"w0", "w1"}


