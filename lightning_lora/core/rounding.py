"""The adapted weight ``W + s·B A`` formed in bf16 with stochastic rounding.

LoRA's ``merged_training`` mode (:class:`lightning_lora.methods.lora.LoRAConfig`) runs a layer as a
frozen layer runs: one GEMM forward (``x W'^T + b``) and one for the input gradient (``g W'``), with
``W' = W + s·B A`` formed once per optimizer step. In fp32 ``W'`` is as exact as the two-GEMM form.
In bf16, round-to-nearest would lose every delta smaller than half a unit in the last place of
``W``: early in training that is most of ``s·B A`` (``W`` ~ 3e-2 has an ulp of 1.2e-4; one AdamW step
of lr 1e-4 moves ``s·B A`` by ~3e-5), and the forward would not see the adapter at all. Stochastic
rounding rounds up with probability equal to the distance from the lower neighbour, so
``E[W'] = W + s·B A`` exactly: the two-GEMM form keeps small deltas the same way, in expectation, through
the rounding of its output (whose fractional position varies from element to element). Where
``s·B A = 0`` (at init) ``W' = W`` bit for bit, since ``W`` is already a bf16 value.

On CUDA with Triton the merge is one kernel (the rank-``r`` product, the add, the rounding), launched
once for all layers of one weight shape (:func:`merged_weights`); elsewhere (CPU, no Triton) the same
arithmetic in torch ops with a seeded ``torch.Generator``. The two draw different random bits; each is
deterministic for a given seed.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["merged_weight", "merged_weights", "stochastic_round_bf16", "triton_available"]

#: the element types the grouped kernel reads (others take :func:`merged_weight` one by one)
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: fp32 bit pattern's upper half (a bf16 value) and the lower half that rounding drops
_HIGH = -65536  # 0xFFFF0000 as int32
_LOW = 65536


def triton_available() -> bool:
    """Whether Triton imported (it ships with CUDA builds of torch, not with CPU ones)."""
    return triton is not None


def _use_triton(t: torch.Tensor) -> bool:
    """Whether merges of ``t`` take the Triton kernels (CUDA tensors where Triton imports)."""
    return t.is_cuda and triton_available()


def stochastic_round_bf16(v: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``v`` (fp32, any shape) rounded to bf16 stochastically: up with probability equal to the
    dropped low 16 bits over 2^16, so ``E[result] = v`` (for finite values below bf16's largest)."""
    if v.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 takes an fp32 tensor, got {v.dtype}")
    noise = torch.randint(0, _LOW, v.shape, generator=generator, dtype=torch.int32, device=v.device)
    # the sign is its own bit, so adding to the magnitude's bits rounds |v| up or down: unbiased for
    # either sign; a carry into the exponent is the next binade's first value, as it should be
    bits = (v.contiguous().view(torch.int32) + noise).bitwise_and_(_HIGH)
    return bits.view(torch.float32).to(torch.bfloat16)


def merged_weight(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float,
                  dtype: torch.dtype, seed: int, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``W + s·B A`` in ``dtype``, in ``weight``'s layout.

    Shapes: ``weight`` (m, n), or (n, m) with ``fan_in_fan_out``; ``B`` (m, r); ``A`` (r, n). The sum is
    formed in fp32; bf16 results are rounded stochastically (seeded by ``seed``), fp32 ones are exact
    to fp32 rounding. Other dtypes raise: fp16 has no cheap unbiased rounding from fp32 here.
    """
    if dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"merged_weight forms bf16 or fp32 weights, got {dtype}")
    P, Q = (A.t(), B.t()) if fan_in_fan_out else (B, A)  # weight's layout = P @ Q
    if dtype == torch.bfloat16 and _use_triton(weight) and weight.dtype in _KERNEL_DTYPES:
        return _merged_weight_triton(weight, P, Q, scaling, seed)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        v = torch.addmm(weight.float(), P.float(), Q.float(), alpha=scaling)
        if dtype == torch.float32:
            return v
        gen = torch.Generator(device=weight.device)
        gen.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        return stochastic_round_bf16(v, gen)


def merged_weights(weights: list[torch.Tensor], Bs: list[torch.Tensor], As: list[torch.Tensor],
                   scalings: list[float], dtype: torch.dtype, seed: int,
                   fan_in_fan_out: list[bool]) -> list[torch.Tensor]:
    """:func:`merged_weight` of many layers at once (each with its own seed, drawn from ``seed``).

    On CUDA with Triton, layers of one shape, layout and dtype (a transformer's q/k/v/o, its up and its
    down projections) share one kernel launch: after every optimizer step the merges of a whole model
    take a handful of launches, where one per layer cost a host-bound step ~0.1 ms each (Triton's
    Python launcher). Elsewhere: one :func:`merged_weight` per layer."""
    n = len(weights)
    if not (dtype == torch.bfloat16 and n and _use_triton(weights[0])):
        return [merged_weight(w, B, A, s, dtype, seed + i, f)
                for i, (w, B, A, s, f) in enumerate(zip(weights, Bs, As, scalings, fan_in_fan_out))]
    groups: dict[tuple[Any, ...], list[int]] = {}
    Ps, Qs = [], []
    out: list[Any] = [None] * n
    for i, (w, B, A, f) in enumerate(zip(weights, Bs, As, fan_in_fan_out)):
        P, Q = (A.t(), B.t()) if f else (B, A)
        Ps.append(P)
        Qs.append(Q)
        if w.dtype not in _KERNEL_DTYPES or P.dtype not in _KERNEL_DTYPES or Q.dtype not in _KERNEL_DTYPES:
            out[i] = merged_weight(w, B, A, scalings[i], dtype, seed + i, f)  # (e.g. fp64 parameters)
            continue
        key = (w.device, w.dtype, P.dtype, Q.dtype, w.shape, P.shape, w.stride(), P.stride(), Q.stride())
        groups.setdefault(key, []).append(i)
    for g, idx in enumerate(groups.values()):
        results = _merged_weights_triton([weights[i] for i in idx], [Ps[i] for i in idx], [Qs[i] for i in idx],
                                         [scalings[i] for i in idx], (seed + 7919 * g) & 0x7FFF_FFFF)
        for i, r in zip(idx, results):
            out[i] = r
    return out


def _merged_weights_triton(weights: list[torch.Tensor], Ps: list[torch.Tensor], Qs: list[torch.Tensor],
                           scalings: list[float], seed: int) -> list[torch.Tensor]:
    """One grouped launch for layers of one shape, strides and dtypes: bf16 (M, N) each, slices of one
    fresh (G, M, N) buffer (a graph still waiting for backward keeps the previous one)."""
    w0, p0, q0 = weights[0], Ps[0], Qs[0]
    if len(weights) == 1:
        return [_merged_weight_triton(w0, p0, q0, scalings[0], seed)]
    G = len(weights)
    M, N = w0.shape
    r = p0.shape[1]
    device = w0.device
    table, scales = _device_tables(device, tuple(t.data_ptr() for ts in (weights, Ps, Qs) for t in ts),
                                   tuple(scalings))
    out = torch.empty((G, M, N), dtype=torch.bfloat16, device=device)
    block_r = min(64, max(16, triton.next_power_of_2(r)))
    grid = (triton.cdiv(M, 64), triton.cdiv(N, 64), G)
    tl_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
    _sr_merge_grouped[grid](
        table, scales, out, M, N, r,
        w0.stride(0), w0.stride(1), p0.stride(0), p0.stride(1), q0.stride(0), q0.stride(1), seed,
        W_DT=tl_dtype[w0.dtype], P_DT=tl_dtype[p0.dtype], Q_DT=tl_dtype[q0.dtype],
        BLOCK_M=64, BLOCK_N=64, BLOCK_R=block_r, K_BLOCKS=triton.cdiv(r, block_r),
    )
    return list(out.unbind(0))


#: device copies of the grouped kernel's address and scale tables, by content: the addresses of the
#: base weights and adapter parameters stay put across optimizer steps (updated in place), so a
#: training step finds its tables here. A copy from pageable host memory makes the host wait for the
#: GPU's queue to drain (CUDA's rule for such copies): made at every step, it left the GPU idle.
_TABLES: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
_TABLES_MAX = 64


def _device_tables(device: torch.device, ptrs: tuple[int, ...],
                   scalings: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (3, G) int64 address table and the (G,) fp32 scales on ``device``, made once per content."""
    key = (device, ptrs, scalings)
    found = _TABLES.get(key)
    if found is None:
        if len(_TABLES) >= _TABLES_MAX:  # addresses of freed tensors: drop the oldest
            del _TABLES[next(iter(_TABLES))]
        found = _TABLES[key] = (torch.tensor(ptrs, dtype=torch.int64, device=device),
                                torch.tensor(scalings, dtype=torch.float32, device=device))
    return found


def _merged_weight_triton(weight: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, scaling: float,
                          seed: int) -> torch.Tensor:
    """:func:`merged_weight` in one Triton kernel: bf16 (M, N) from ``weight`` (M, N), ``P`` (M, r),
    ``Q`` (r, N), any strides."""
    M, N = weight.shape
    r = P.shape[1]
    out = torch.empty((M, N), dtype=torch.bfloat16, device=weight.device)
    # tl.dot needs K >= 16 (masked padding below that); ranks above 64 take several K blocks
    block_r = min(64, max(16, triton.next_power_of_2(r)))
    grid = (triton.cdiv(M, 64), triton.cdiv(N, 64))
    _sr_merge[grid](
        weight, P, Q, out, M, N, r,
        weight.stride(0), weight.stride(1), P.stride(0), P.stride(1), Q.stride(0), Q.stride(1),
        float(scaling), seed & 0x7FFF_FFFF,
        BLOCK_M=64, BLOCK_N=64, BLOCK_R=block_r, K_BLOCKS=triton.cdiv(r, block_r),
    )
    return out


# the kernels are module-level (a jitted function calls another by its global name); Triton is imported
# only where it exists (CUDA builds of torch ship it), and TRITON_INTERPRET is read at this import
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without Triton take the torch form
    triton = None

if triton is not None:
    @triton.jit
    def _sr_merge_tile(W, P, Q, OUT, M, N, R, s_wm, s_wn, s_pm, s_pr, s_qr, s_qn, scaling, seed,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       K_BLOCKS: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile of ``OUT = SR_bf16(W + scaling · P Q)``, ``P`` (M, R), ``Q`` (R, N)."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.static_range(K_BLOCKS):
            kk = k * BLOCK_R + rr
            p = tl.load(P + rm[:, None] * s_pm + kk[None, :] * s_pr,
                        mask=(rm[:, None] < M) & (kk[None, :] < R), other=0.0).to(tl.float32)
            q = tl.load(Q + kk[:, None] * s_qr + rn[None, :] * s_qn,
                        mask=(kk[:, None] < R) & (rn[None, :] < N), other=0.0).to(tl.float32)
            acc += tl.dot(p, q, input_precision="ieee")
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        w = tl.load(W + rm[:, None] * s_wm + rn[None, :] * s_wn, mask=mask, other=0.0).to(tl.float32)
        v = w + scaling * acc
        offs = rm[:, None] * N + rn[None, :]
        noise = (tl.randint(seed, offs) & 0xFFFF).to(tl.int32)
        bits = (v.to(tl.int32, bitcast=True) + noise) & -65536
        tl.store(OUT + offs, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _sr_merge(W, P, Q, OUT, M, N, R, s_wm, s_wn, s_pm, s_pr, s_qr, s_qn, scaling, seed,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, K_BLOCKS: tl.constexpr):
        _sr_merge_tile(W, P, Q, OUT, M, N, R, s_wm, s_wn, s_pm, s_pr, s_qr, s_qn, scaling, seed,
                       BLOCK_M, BLOCK_N, BLOCK_R, K_BLOCKS)

    @triton.jit(do_not_specialize=["seed"])
    def _sr_merge_grouped(TABLE, SCALES, OUT, M, N, R, s_wm, s_wn, s_pm, s_pr, s_qr, s_qn, seed,
                          W_DT: tl.constexpr, P_DT: tl.constexpr, Q_DT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                          K_BLOCKS: tl.constexpr):
        """Program axis 2 picks the layer, whose base addresses come from a (3, G) int64 table
        (element types ``W_DT``, ``P_DT``, ``Q_DT``); its seed is ``seed + g``."""
        g = tl.program_id(2)
        G = tl.num_programs(2)
        W = tl.load(TABLE + g).to(tl.pointer_type(W_DT))
        P = tl.load(TABLE + G + g).to(tl.pointer_type(P_DT))
        Q = tl.load(TABLE + 2 * G + g).to(tl.pointer_type(Q_DT))
        _sr_merge_tile(W, P, Q, OUT + g.to(tl.int64) * M * N, M, N, R, s_wm, s_wn, s_pm, s_pr, s_qr, s_qn,
                       tl.load(SCALES + g), seed + g, BLOCK_M, BLOCK_N, BLOCK_R, K_BLOCKS)
