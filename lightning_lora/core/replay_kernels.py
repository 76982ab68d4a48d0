"""A's gradient read straight from the tensors a replayed LoRA input is made of (Triton, CUDA).

The fused LoRA paths replay an adapter input in backward instead of saving it (``_input_recipe`` in
:mod:`lightning_lora.methods.lora`): BERT's down projection reads ``gelu(h)``, a LLaMA MLP's
``silu(gate) * up``, and the autograd graph keeps ``h`` (``gate``, ``up``) anyway. Replayed in torch
ops, the input is written out whole (one or two elementwise kernels over N × n) and read back by the
GEMM ``grad_A = (s·g B)^T x``. :func:`act_grad_a` computes the activation on the fly while loading
the GEMM's tiles: ``x`` is never materialised, which drops a write and a read of an N × n tensor per
layer (BERT-base at 32 × 512: 96 MiB each, twelve layers).

Each tile applies the forward's ops in the forward's dtypes (``act`` in fp32 rounded to bf16, then the
product in fp32 rounded to bf16), so the ``x`` it multiplies is the forward's ``x`` (up to the last
bit of the activation's libm); the sum runs in a different order than cuBLAS's, as any two GEMMs do.
Opt-in (``LIGHTNING_LORA_TRITON_REPLAY=1`` or :func:`set_enabled`): timed on the H200, its extra launch
costs a host-bound step more than the write and read it saves (docs/benchmarks.md).
"""
from __future__ import annotations

import os
from typing import Any

import torch


__all__ = ["act_grad_a", "enabled", "set_enabled", "supported"]

_ENABLED = os.environ.get("LIGHTNING_LORA_TRITON_REPLAY") == "1"
#: activation codes of the kernel (``ACT``): the recipe's ``approximate`` (None: SiLU)
_ACTS = {"none": 0, "tanh": 1, None: 2}
_IDENTITY = 3  # a product of two saved tensors (an MLP's act(gate) * up, when its node saved both)
_ROWS_PER_PROGRAM = 512  # rows of N one program reduces (a constexpr: no recompile per batch shape)


def enabled() -> bool:
    return _ENABLED


def set_enabled(on: bool) -> None:
    """Turn the kernel on or off for this process (default: ``LIGHTNING_LORA_TRITON_REPLAY=1``)."""
    global _ENABLED
    _ENABLED = bool(on)


def _parts(recipe: tuple[Any, ...]) -> tuple[Any, int, Any] | None:
    """``(act_input, act_code, multiplier or None)`` for the recipes the kernel computes:
    ``act(a)``, ``act(a) * b`` / ``b * act(a)`` and ``a * b`` over saved tensors; None for any other."""
    if recipe[0] == "act" and recipe[1][0] == "saved" and recipe[2] in _ACTS:
        return recipe[1], _ACTS[recipe[2]], None
    if recipe[0] == "mul":
        if recipe[1][0] == "saved" and recipe[2][0] == "saved":  # the product node saved both factors
            return recipe[1], _IDENTITY, recipe[2]
        for act, other in ((recipe[1], recipe[2]), (recipe[2], recipe[1])):
            if act[0] == "act" and act[1][0] == "saved" and act[2] in _ACTS and other[0] == "saved":
                return act[1], _ACTS[act[2]], other
    return None


def supported(recipe: tuple[Any, ...], g: torch.Tensor) -> bool:
    """Whether :func:`act_grad_a` takes ``recipe`` with gradient rows ``g`` (switch on, CUDA, Triton,
    a recipe it computes)."""
    return _ENABLED and g.is_cuda and g.dtype == torch.bfloat16 and triton is not None and _parts(recipe) is not None


def act_grad_a(g: torch.Tensor, recipe: tuple[Any, ...], shape: torch.Size, dtype: torch.dtype,
               interpret: bool = False) -> torch.Tensor | None:
    """``g^T x`` in ``dtype`` where ``x`` (the input ``recipe`` rebuilds, of ``shape``) is computed tile by
    tile. ``g`` (N, r), any strides (a sibling set passes a transposed view); returns (r, n), or None
    when the saved factors are not bf16 (the kernel repeats a bf16 forward's roundings only): the
    caller replays in torch ops then. ``interpret``: fp32 dots (Triton's CPU interpreter mishandles
    bf16 ones; tests only)."""
    saved_a, act, saved_b = _parts(recipe)  # type: ignore[misc]
    from ..methods.lora import _replay  # (the recipe's tensors, read with its checks)

    a = _replay(saved_a)
    b = a if saved_b is None else _replay(saved_b)
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return None
    if a.shape != shape or b.shape != shape:
        raise RuntimeError(f"LoRA: the replayed input has shape {tuple(a.shape)}, expected {tuple(shape)}")
    n = shape[-1]
    a2, b2 = a.reshape(-1, n), b.reshape(-1, n)
    N, r = g.shape
    block_r = max(16, triton.next_power_of_2(r))
    block_k, block_n = 32, 64
    splits = triton.cdiv(N, _ROWS_PER_PROGRAM)
    parts = torch.empty((splits, block_r, n), dtype=torch.float32, device=g.device)
    act_grad_a_kernel[(triton.cdiv(n, block_n), splits)](
        g, a2, b2, parts, N, n, r, g.stride(0), g.stride(1), a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
        ACT=act, MUL=saved_b is not None, DOT_FP32=interpret, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_N=block_n,
        CHUNK=_ROWS_PER_PROGRAM,
    )
    out = parts[0, :r] if splits == 1 else parts.sum(0)[:r]
    return out if dtype == torch.float32 else out.to(dtype)


# the kernels are module-level (a jitted function calls another by its global name); Triton is imported
# only where it exists (CUDA builds of torch ship it), and TRITON_INTERPRET is read at this import
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without Triton: act_grad_a is never asked
    triton = None

if triton is not None:
    @triton.jit
    def _round_bf16(v):
        # round to nearest even by hand, then an exact cast: the same bits on the GPU and in Triton's
        # CPU interpreter (whose fp32 -> bf16 cast truncates)
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def act_grad_a_kernel(G, A, B, OUT, N, n, r, s_gn, s_gr, s_an, s_ak, s_bn, s_bk,
                          ACT: tl.constexpr, MUL: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.program_id(1) * CHUNK
        rr = tl.arange(0, BLOCK_R)
        cmask = cols[None, :] < n
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for k in tl.static_range(CHUNK // BLOCK_K):
            rows = start + k * BLOCK_K + tl.arange(0, BLOCK_K)
            rmask = rows[:, None] < N
            gt = tl.load(G + rr[:, None] * s_gr + rows[None, :] * s_gn,
                         mask=(rr[:, None] < r) & (rows[None, :] < N), other=0.0)  # (R, K)
            h = tl.load(A + rows[:, None] * s_an + cols[None, :] * s_ak, mask=rmask & cmask, other=0.0).to(tl.float32)
            if ACT == 0:  # GELU, erf form
                y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
            elif ACT == 1:  # GELU, tanh form: tanh(z) = 1 - 2 / (exp(2z) + 1)
                z = 0.7978845608028654 * (h + 0.044715 * h * h * h)
                y = 0.5 * h * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
            elif ACT == 2:  # SiLU
                y = h / (1.0 + tl.exp(-h))
            else:  # a saved factor as it is
                y = h
            x = _round_bf16(y)
            if MUL:
                u = tl.load(B + rows[:, None] * s_bn + cols[None, :] * s_bk, mask=rmask & cmask, other=0.0)
                x = _round_bf16(x.to(tl.float32) * u.to(tl.float32))
            if DOT_FP32:
                acc += tl.dot(gt.to(tl.float32), x.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(gt, x)
        tl.store(OUT + tl.program_id(1) * BLOCK_R * n + rr[:, None] * n + cols[None, :], acc,
                 mask=(rr[:, None] < r) & cmask)
