"""NormalFloat (NF-b) blockwise quantization with double-quantized scales (METHODS.md §2).

A quantization config ``c = (b, b0, b1, B0, B1)`` [code: HanGuo97/lq-lora, quantization_utils.py]:

1. flatten W row-major, cut it into blocks of ``B0`` elements; block scale ``s_k = max|a|``;
2. double quantization of the scales: offset ``μ = min_k s_k``; per group of ``B1`` scales an
   unsigned ``b0``-bit absmax code ``round((s_k − μ)(2^b0 − 1)/g)``, with ``g`` the group's
   absmax stored in ``b1`` ∈ {fp16, bf16, fp32}; ``ŝ_k = code·g/(2^b0 − 1) + μ``
   (``b0 = None``: no double quantization, ``ŝ_k = s_k`` stored in ``b1``);
3. every element gets the nearest NF-b level of ``a/ŝ_k`` (bucketize on level midpoints).

Storage, exact, in bits (:func:`storage_bits`): ``b`` per (padded) element + ``b0`` per (padded)
block scale + ``bits(b1)`` per group + 32 for ``μ``. The paper's per-parameter formula
``bits(c) = b + b0/B0 + bits(b1)/(B0·B1)`` (:meth:`QuantConfig.bits_per_param`) ignores padding and
``μ``; both are given, and the packed tensors of :func:`quantize` occupy exactly
:func:`storage_bits` bits (tested).

Padding: W is zero-padded to a multiple of ``B0`` elements and the scales to a multiple of ``B1``
(padded blocks are all zero: scale 0, code 0). Codes are bit-packed into ``uint8`` (8 codes of b
bits -> b bytes), so 3-bit codes really take 3 bits.

All arithmetic runs in fp32 (METHODS S5: quantization in fp32 even under autocast).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

#: NF code book constant of QLoRA / LQ-LoRA (``create_normal_map(offset=0.9677083)``)
NF_OFFSET = 0.9677083
SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32}
# integer types of the same width: the group absmax and μ are stored as bit patterns, so that
# ``model.to(torch.bfloat16)`` (which casts floating buffers) never re-rounds quantization state
_BITS_INT = {"fp16": torch.int16, "bf16": torch.int16, "fp32": torch.int32}


#: bits -> the code book on the CPU: a plain dict, not ``functools.lru_cache``, because the dequantization
#: in every LQ-LoRA forward asks for it and ``torch.compile`` traces through an ``lru_cache`` wrapper with
#: a warning of "potential silent incorrectness" to the user (a dict entry is read as a constant)
_NF_LEVELS: dict[int, torch.Tensor] = {}


def _nf_levels_cpu(bits: int) -> torch.Tensor:
    levels = _NF_LEVELS.get(bits)
    if levels is None:
        levels = _NF_LEVELS[bits] = _make_nf_levels(bits)
    return levels


def _make_nf_levels(bits: int) -> torch.Tensor:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"NF quantization supports bits in {SUPPORTED_BITS}, got {bits}")
    half = 2 ** (bits - 1)
    neg_p = torch.linspace(1 - NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1]  # 2^(b-1) - 1 levels
    pos_p = torch.linspace(0.5, NF_OFFSET, half + 1, dtype=torch.float64)  # 0 and 2^(b-1) levels
    levels = torch.special.ndtri(torch.cat([neg_p, pos_p]))
    levels = levels / levels.abs().max()
    levels[half - 1] = 0.0  # ndtri(0.5) is 0 up to rounding
    return levels.float()


def nf_levels(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``2^bits`` sorted NF levels in ``[-1, 1]`` (fp32): one 0, ``2^(b-1) - 1`` negative levels.

    A fresh tensor on every call: the cached code book is never handed out, so an in-place edit of the
    result cannot change every later quantization and dequantization."""
    levels = _nf_levels_cpu(bits)
    # copy=True: ``.to`` returns the cached tensor itself when it is already on ``device`` (CPU)
    return levels.clone() if device is None else levels.to(device, copy=True)


@dataclass(frozen=True)
class QuantConfig:
    """One quantization config ``(b, b0, b1, B0, B1)``.

    Attributes:
        bits: ``b``, bits per weight (2, 3, 4 or 8).
        scale_bits: ``b0``, bits per block scale (2, 3, 4, 8) or None (no double quantization: the
            scales are stored in ``scale_dtype``).
        scale_dtype: ``b1``, dtype of the per-group absmax (or of the raw scales when ``scale_bits``
            is None): ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        block_size: ``B0``, weights per block (multiple of 8).
        scale_block_size: ``B1``, scales per group (multiple of 8).
    """

    bits: int = 4
    scale_bits: int | None = 8
    scale_dtype: str = "fp32"
    block_size: int = 64
    scale_block_size: int = 256

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.scale_bits is not None and self.scale_bits not in SUPPORTED_BITS:
            raise ValueError(f"scale_bits must be one of {SUPPORTED_BITS} or None, got {self.scale_bits}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        for name in ("block_size", "scale_block_size"):
            v = getattr(self, name)
            if v < 8 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {v}")

    def bits_per_param(self) -> float:
        """The paper's ``b + b0/B0 + bits(b1)/(B0·B1)`` (no padding, no offset μ)."""
        if self.scale_bits is None:
            return self.bits + _DTYPE_BITS[self.scale_dtype] / self.block_size
        return self.bits + self.scale_bits / self.block_size + _DTYPE_BITS[self.scale_dtype] / (
            self.block_size * self.scale_block_size
        )

    @property
    def name(self) -> str:
        """Canonical string, e.g. ``"b4-s8-fp32-B64-G256"`` (``s-`` without double quantization)."""
        s = "-" if self.scale_bits is None else str(self.scale_bits)
        return f"b{self.bits}-s{s}-{self.scale_dtype}-B{self.block_size}-G{self.scale_block_size}"

    def __str__(self) -> str:
        return self.name


#: QLoRA-style presets: (b, 8, fp32, 64, 256); ``nf4`` = 4.127 bits per parameter
PRESETS: dict[str, QuantConfig] = {f"nf{b}": QuantConfig(b, 8, "fp32", 64, 256) for b in SUPPORTED_BITS}

_NAME_RE = re.compile(r"^b(\d+)-s(\d+|-)-(fp16|bf16|fp32)-B(\d+)-G(\d+)$")


def parse_config(spec: str | QuantConfig) -> QuantConfig:
    """A :class:`QuantConfig` from a preset name (``"nf3"``) or a canonical name (``"b3-s8-fp32-B64-G256"``)."""
    if isinstance(spec, QuantConfig):
        return spec
    if spec in PRESETS:
        return PRESETS[spec]
    m = _NAME_RE.match(spec)
    if m is None:
        raise ValueError(f"unknown quantization config {spec!r}: use one of {sorted(PRESETS)} or a name like 'b3-s8-fp32-B64-G256'")
    b, s, dt, bs, gs = m.groups()
    return QuantConfig(int(b), None if s == "-" else int(s), dt, int(bs), int(gs))


@dataclass(frozen=True)
class QuantLayout:
    """Sizes of one quantized matrix under one config (all counts include padding)."""

    numel: int
    padded_numel: int
    n_blocks: int  # real blocks (padded_numel / B0)
    padded_blocks: int  # blocks padded to a multiple of B1
    n_groups: int


def layout(numel: int, cfg: QuantConfig) -> QuantLayout:
    n_blocks = math.ceil(numel / cfg.block_size)
    padded_blocks = math.ceil(n_blocks / cfg.scale_block_size) * cfg.scale_block_size
    return QuantLayout(numel, n_blocks * cfg.block_size, n_blocks, padded_blocks, padded_blocks // cfg.scale_block_size)


def storage_bits(numel: int, cfg: QuantConfig) -> int:
    """Exact bits of the packed storage of an ``numel``-element matrix (codes, scale codes, group
    absmax, offset μ; padding included). Equals ``8 × Σ nbytes`` of :func:`quantize`'s tensors."""
    lay = layout(numel, cfg)
    if cfg.scale_bits is None:
        return cfg.bits * lay.padded_numel + _DTYPE_BITS[cfg.scale_dtype] * lay.n_blocks
    return (
        cfg.bits * lay.padded_numel
        + cfg.scale_bits * lay.padded_blocks
        + _DTYPE_BITS[cfg.scale_dtype] * lay.n_groups
        + 32
    )


# ---- bit packing -----------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` (length a multiple of 8) into ``uint8``: each run of 8
    codes becomes ``bits`` bytes, little-endian (code i occupies bits ``[i·b, (i+1)·b)``).

    Shapes: ``codes`` (N,) -> (N·bits/8,).
    """
    if codes.numel() % 8:
        raise ValueError(f"pack_codes needs a multiple of 8 codes, got {codes.numel()}")
    if bits == 8:
        return codes.to(torch.uint8).reshape(-1)
    c = codes.reshape(-1, 8).to(torch.int64)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=1, keepdim=True)  # (G, 1), at most 8·b ≤ 32 bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8`` (N·bits/8,) -> int64 codes (N,)."""
    if bits == 8:
        return packed.to(torch.int64)
    p = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    return ((word >> shifts) & ((1 << bits) - 1)).reshape(-1)


# ---- float <-> bit pattern ---------------------------------------------------------------------
def float_to_bits(x: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """``x`` rounded to ``dtype_name`` and reinterpreted as same-width integers. Saturates at the dtype's
    largest finite value: an fp16 scale above 65504 would otherwise become inf and dequantize to NaN
    (0·inf), silently, for the whole block or group (and NaN costs in the ILP table)."""
    dtype = SCALE_DTYPES[dtype_name]
    big = torch.finfo(dtype).max
    return x.clamp(-big, big).to(dtype).view(_BITS_INT[dtype_name])


def bits_to_float(x: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """Inverse of :func:`float_to_bits`, returned in fp32."""
    return x.view(SCALE_DTYPES[dtype_name]).float()


# ---- quantization ------------------------------------------------------------------------------
@dataclass
class QuantizedTensor:
    """Packed NF quantization of one matrix.

    Attributes:
        codes: uint8 (padded_numel·b/8,), bit-packed NF level indices.
        scale_codes: uint8 (padded_blocks·b0/8,) packed scale codes; with ``scale_bits=None`` the
            raw scales as ``b1`` bit patterns (n_blocks,) (int16 / int32).
        scale_absmax: per-group absmax ``g`` as ``b1`` bit patterns (n_groups,); empty without
            double quantization.
        scale_offset: ``μ`` as an fp32 bit pattern (1,) int32; empty without double quantization.
        shape: the matrix shape; config: the :class:`QuantConfig`.
    """

    codes: torch.Tensor
    scale_codes: torch.Tensor
    scale_absmax: torch.Tensor
    scale_offset: torch.Tensor
    shape: tuple[int, ...]
    config: QuantConfig

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scale_codes": self.scale_codes, "scale_absmax": self.scale_absmax,
                "scale_offset": self.scale_offset}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def empty_quantized(shape: tuple[int, ...], cfg: QuantConfig | str,
                    device: torch.device | str | None = None) -> QuantizedTensor:
    """Zero-filled packed storage of the sizes and dtypes :func:`quantize` gives a ``shape`` matrix under
    ``cfg`` (all scales 0, so it dequantizes to zeros), without quantizing anything: sizing a layer to
    load into then costs no dense ``shape`` temporary (1 s per 4096 x 11008 matrix on a CPU)."""
    cfg = parse_config(cfg)
    lay = layout(math.prod(shape), cfg)
    codes = torch.zeros(lay.padded_numel * cfg.bits // 8, dtype=torch.uint8, device=device)
    int_t = _BITS_INT[cfg.scale_dtype]
    if cfg.scale_bits is None:  # raw scales as b1 bit patterns; no group absmax, no offset
        return QuantizedTensor(codes, torch.zeros(lay.n_blocks, dtype=int_t, device=device),
                               torch.zeros(0, dtype=int_t, device=device), torch.zeros(0, dtype=torch.int32, device=device),
                               tuple(shape), cfg)
    return QuantizedTensor(codes, torch.zeros(lay.padded_blocks * cfg.scale_bits // 8, dtype=torch.uint8, device=device),
                           torch.zeros(lay.n_groups, dtype=int_t, device=device),
                           torch.zeros(1, dtype=torch.int32, device=device), tuple(shape), cfg)


def _quantize_scales(scales: torch.Tensor, cfg: QuantConfig, lay: QuantLayout):
    """Double quantization of the block scales (n_blocks,) fp32 -> (scale_codes, absmax, offset, ŝ)."""
    if cfg.scale_bits is None:
        raw = float_to_bits(scales, cfg.scale_dtype)
        empty = torch.empty(0, dtype=torch.int32, device=scales.device)
        return raw, empty.to(_BITS_INT[cfg.scale_dtype]), empty, bits_to_float(raw, cfg.scale_dtype)
    mu = scales.min()
    mu_bits = float_to_bits(mu.reshape(1), "fp32")
    mu = bits_to_float(mu_bits, "fp32")
    shifted = torch.zeros(lay.padded_blocks, device=scales.device)
    shifted[: lay.n_blocks] = scales - mu
    groups = shifted.view(lay.n_groups, cfg.scale_block_size)
    absmax_bits = float_to_bits(groups.amax(dim=1), cfg.scale_dtype)
    g = bits_to_float(absmax_bits, cfg.scale_dtype).unsqueeze(1)  # the stored (rounded) absmax
    qmax = 2 ** cfg.scale_bits - 1
    safe_g = torch.where(g > 0, g, torch.ones_like(g))
    codes = torch.round(groups * qmax / safe_g).clamp_(0, qmax)
    codes = torch.where(g > 0, codes, torch.zeros_like(codes))
    deq = (codes * g / qmax).reshape(-1)[: lay.n_blocks] + mu
    return pack_codes(codes.reshape(-1), cfg.scale_bits), absmax_bits, mu_bits, deq


def block_scales(q: QuantizedTensor) -> torch.Tensor:
    """The dequantized block scales ``ŝ_k`` (n_blocks,), fp32."""
    cfg = q.config
    lay = layout(math.prod(q.shape), cfg)
    if cfg.scale_bits is None:
        return bits_to_float(q.scale_codes, cfg.scale_dtype)
    qmax = 2 ** cfg.scale_bits - 1
    codes = unpack_codes(q.scale_codes, cfg.scale_bits).view(lay.n_groups, cfg.scale_block_size)
    g = bits_to_float(q.scale_absmax, cfg.scale_dtype).unsqueeze(1)
    mu = bits_to_float(q.scale_offset, "fp32")
    return (codes.float() * g / qmax).reshape(-1)[: lay.n_blocks] + mu


@torch.no_grad()
def quantize(w: torch.Tensor, cfg: QuantConfig | str) -> QuantizedTensor:
    """NF-quantize ``w`` (any shape, row-major blocks) under ``cfg``; computed in fp32."""
    cfg = parse_config(cfg)
    flat = w.detach().reshape(-1).float()
    if not torch.isfinite(flat).all():
        raise ValueError("cannot quantize a tensor with NaN or Inf entries")
    lay = layout(flat.numel(), cfg)
    padded = torch.zeros(lay.padded_numel, device=flat.device)
    padded[: flat.numel()] = flat
    blocks = padded.view(lay.n_blocks, cfg.block_size)
    scales = blocks.abs().amax(dim=1)
    scale_codes, absmax, offset, s_hat = _quantize_scales(scales, cfg, lay)
    levels = nf_levels(cfg.bits, flat.device)
    safe = torch.where(s_hat > 0, s_hat, torch.ones_like(s_hat)).unsqueeze(1)
    normed = torch.where(s_hat.unsqueeze(1) > 0, blocks / safe, torch.zeros_like(blocks))
    mids = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(normed.reshape(-1), mids)  # nearest level (ties go to the lower one)
    return QuantizedTensor(pack_codes(codes, cfg.bits), scale_codes, absmax, offset, tuple(w.shape), cfg)


def dequantize_parts(codes: torch.Tensor, scale_codes: torch.Tensor, scale_absmax: torch.Tensor,
                     scale_offset: torch.Tensor, shape: tuple[int, ...], cfg: QuantConfig,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense matrix (``shape``, ``dtype``) from packed parts; used by the forward pass of
    :class:`~lightning_lora.quant.linear.QuantizedLinear` (plain torch ops; compilable)."""
    numel = math.prod(shape)
    lay = layout(numel, cfg)
    q = QuantizedTensor(codes, scale_codes, scale_absmax, scale_offset, shape, cfg)
    s_hat = block_scales(q)
    idx = unpack_codes(codes, cfg.bits)
    vals = nf_levels(cfg.bits, codes.device)[idx].view(lay.n_blocks, cfg.block_size) * s_hat.unsqueeze(1)
    return vals.reshape(-1)[:numel].view(shape).to(dtype)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``q.shape`` tensor of ``level·ŝ_k`` values."""
    return dequantize_parts(q.codes, q.scale_codes, q.scale_absmax, q.scale_offset, q.shape, q.config, dtype)


def quantize_dequantize(w: torch.Tensor, cfg: QuantConfig | str) -> torch.Tensor:
    """``dequantize(quantize(w))`` in fp32 (the "fake" quantized matrix)."""
    return dequantize(quantize(w, cfg))
