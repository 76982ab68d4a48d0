"""QuantizedLinear: a frozen linear layer whose weight is stored packed (NF codes + scales).

The weight lives only as the ``uint8`` / integer buffers of :mod:`lightning_lora.quant.nf`; the
forward pass dequantizes it into a temporary of the activation dtype, multiplies, and drops it.
Backward dequantizes again instead of keeping the dense weight alive between forward and backward
(the autograd function saves nothing weight-sized), so training memory really falls with the bits.

``torch.compile`` of the dequantization: opt in with ``QuantizedLinear.compile_dequant = True``
(class-wide) or the environment variable ``LIGHTNING_LORA_COMPILE_DEQUANT=1``; it fuses unpacking,
the level look-up and the scale multiply into one kernel on the GPU. Off by default (compilation
costs seconds per distinct config and gains nothing on the CPU).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .nf import QuantConfig, QuantizedTensor, dequantize_parts, empty_quantized, parse_config, quantize, storage_bits

_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}
#: ``torch.jit.is_tracing()`` without its Python wrapper (asked per layer per forward: host time)
_is_tracing = torch._C._is_tracing


def _untraced_dequantize(layer: "QuantizedLinear", dtype: torch.dtype) -> torch.Tensor:
    """``layer.dequantize(dtype)`` with the TorchScript tracer paused: the tracer then records the
    result as a constant of the graph. The dequantization itself cannot be recorded: its
    ``Tensor.view(dtype)`` (the scales' integer bit patterns read back as floats) lands in the
    graph as ``aten::view(Tensor, int)``, which the TorchScript IR cannot tell from a shape and
    fails on (``INTERNAL ASSERT FAILED ... We don't have an op for aten::view``, pytorch#90365)."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return layer.dequantize(dtype)
    finally:
        torch._C._set_tracing_state(state)


def _dequant_fn(device_type: str, compile_it: bool) -> Callable[..., torch.Tensor]:
    if not compile_it or device_type != "cuda":
        return dequantize_parts
    if "cuda" not in _COMPILED:
        _COMPILED["cuda"] = torch.compile(dequantize_parts, dynamic=False)
    return _COMPILED["cuda"]


def _dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The forward formula of :class:`_DequantLinear` once ``w = dequant(packed)`` (in ``x.dtype``)."""
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


class _DequantLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W = dequant(packed)``; backward re-dequantizes for ``grad_x``.

    Shapes: ``x`` (N, in); ``W`` (out, in); ``y`` (N, out). The packed weight gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, bias, layer):  # type: ignore[override]
        ctx.layer = layer
        return _dense_linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ ctx.layer.dequantize(g.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0)
        return grad_x, grad_b, None


class QuantizedLinear(nn.Module):
    """``nn.Linear`` replacement with an NF-quantized, packed, frozen weight (layout (out, in)).

    Buffers (saved in ``state_dict``): ``codes`` (uint8, packed), ``scale_codes``, ``scale_absmax``,
    ``scale_offset`` (integer bit patterns: ``module.to(torch.bfloat16)`` leaves them untouched).
    ``bias``: frozen parameter (or None), kept in the base layer's dtype.
    """

    compile_dequant: bool = os.environ.get("LIGHTNING_LORA_COMPILE_DEQUANT", "0") == "1"

    def __init__(self, in_features: int, out_features: int, config: QuantConfig | str, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = parse_config(config)
        # empty storage of the right sizes (filled by from_float or load_state_dict); sized from the
        # layout, not by quantizing a dense zero matrix (a full quantization per layer on every load)
        q = empty_quantized((out_features, in_features), self.config, device)
        for name, t in q.tensors().items():
            self.register_buffer(name, t)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig | str,
                   quantized: QuantizedTensor | None = None) -> "QuantizedLinear":
        """Quantize ``weight`` (out, in) under ``config`` (or take an existing ``quantized``)."""
        out_f, in_f = weight.shape
        cfg = parse_config(config)
        layer = cls(in_f, out_f, cfg, bias=bias is not None, device=weight.device,
                    dtype=bias.dtype if bias is not None else torch.float32)
        q = quantized if quantized is not None else quantize(weight, cfg)
        if q.config != cfg or tuple(q.shape) != (out_f, in_f):
            raise ValueError(f"quantized tensor has config {q.config} / shape {q.shape}, expected {cfg} / {(out_f, in_f)}")
        layer.load_quantized(q)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @torch.no_grad()
    def load_quantized(self, q: QuantizedTensor) -> None:
        for name, t in q.tensors().items():
            buf = getattr(self, name)
            if buf.shape != t.shape or buf.dtype != t.dtype:
                raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, expected {tuple(buf.shape)} {buf.dtype}")
            buf.copy_(t)

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.codes, self.scale_codes, self.scale_absmax, self.scale_offset,
                               (self.out_features, self.in_features), self.config)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight (out, in) in ``dtype`` (computed in fp32)."""
        fn = _dequant_fn(self.codes.device.type, self.compile_dequant)
        return fn(self.codes, self.scale_codes, self.scale_absmax, self.scale_offset,
                  (self.out_features, self.in_features), self.config, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (out, in), fp32, read-only (a fresh tensor on every access)."""
        return self.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return self._linear(x.to(dtype))
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        # Why: torch.jit.trace (and the TorchScript ONNX exporter, which traces) failed with
        # "unordered_map::at" on _DequantLinear: its forward reads the packed buffers through
        # ``layer``, a non-tensor argument the tracer cannot map into the op's subgraph (and a
        # custom Function would at best be an opaque prim::PythonOp that torch.jit.save cannot
        # serialize). While tracing, the same formula runs as plain ops instead. The dequantized
        # weight enters the traced graph as a dense constant (see _untraced_dequantize): the traced
        # module holds W in x's dtype, not the packed codes, and later edits of the codes do not
        # reach it; nor does a later .to() (constants stay on the trace's device and dtype).
        # Outside a trace nothing changes: backward keeps re-dequantizing, not saving W.
        # (is_compiling first: torch.compile cannot trace through torch._C._is_tracing, a graph break)
        if not torch.compiler.is_compiling() and _is_tracing():
            y = _dense_linear(x, _untraced_dequantize(self, x.dtype), self.bias)
        else:
            y = _DequantLinear.apply(x, self.bias, self)
        return y.view(*lead, self.out_features)

    def storage_bits(self) -> int:
        """Exact bits of the packed weight storage (:func:`lightning_lora.quant.nf.storage_bits`)."""
        return storage_bits(self.in_features * self.out_features, self.config)

    def storage_bytes(self) -> int:
        """Bytes actually held by the weight buffers (== ``storage_bits() / 8``)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size()
                   for n in ("codes", "scale_codes", "scale_absmax", "scale_offset"))

    def extra_repr(self) -> str:
        bpp = self.storage_bits() / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"config={self.config.name}, bits_per_param={bpp:.4f}")
