"""AdapterLayer: a frozen base layer plus a trainable delta.

``forward(x) = base(x) + delta(x)``. Subclasses implement :meth:`delta_weight` (the dense update
in the ``nn.Linear`` layout, shape ``(out_features, in_features)``) and usually a faster
:meth:`adapter_forward`. Merging folds ``delta_weight()`` into the base weight so inference costs
nothing; unmerging subtracts it again.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, ClassVar

import torch
from torch import nn


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 style): weight stored as (in_features, out_features).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def autocast_available(device_type: str) -> bool:
    """Whether ``device_type`` has an autocast dispatch key (asking ``torch.is_autocast_enabled`` of one
    without, e.g. meta, raises). Not asked under ``torch.compile``: torch 2.11's compiler cannot trace
    ``torch._C._is_autocast_available`` (a graph break at every adapter layer that calls this in its
    forward: Bat, LoRA-XS, LoRA-SB, ..., seen on the H200), and a traced tensor is on a real device."""
    return torch.compiler.is_compiling() or torch.amp.autocast_mode.is_autocast_available(device_type)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch autocast off on ``device``: merges and row norms must run in fp32 even inside an
    autocast region (a bf16 ``B @ A`` there would make merged weights and DoRA norms inexact)."""
    if autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. the meta device


def accumulate_dtype(*ts: torch.Tensor) -> torch.dtype:
    """The dtype dense adapter terms (``ΔW``, a merge's sum, DoRA's norms) are computed in: fp32, or
    fp64 where one of ``ts`` is fp64 (``.float()`` rounded a ``.double()`` model to fp32: a merge /
    unmerge round trip moved its outputs by ~1e-8). bf16 / fp16 / fp32 inputs: fp32."""
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def with_update(w: torch.Tensor, dw: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """``w + sign · dw`` summed in :func:`accumulate_dtype` (fp32 for bf16 / fp16 weights), rounded to
    ``w``'s dtype: a merge, an unmerge, or the weight an unmerged layer computes with."""
    acc = w.to(accumulate_dtype(w, dw))
    return (acc + dw if sign > 0 else acc - dw).to(w.dtype)


def linear_shape(base: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of an ``nn.Linear`` or transformers ``Conv1D``."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if _is_conv1d(base):
        in_f, out_f = base.weight.shape
        return in_f, out_f, True
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(base).__name__}")


def layer_shape(base: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of any base an adapter layer may wrap: a linear
    one (:func:`linear_shape`); an ``nn.Embedding`` (``num_embeddings``, ``embedding_dim``, True: its
    table is stored ``(in, out)``, so :attr:`AdapterLayer.base_weight` is its transpose, as for
    ``Conv1D``); an ``nn.Conv1d/2d/3d`` (``in_channels``, ``out_channels``, False: its weight keeps
    its own ``(out, in / groups, *kernel)`` layout, and so does every ``delta_weight`` of it; a
    transposed one keeps its ``(in, out / groups, *kernel)``); an
    ``nn.MultiheadAttention`` (``embed_dim``, ``3·embed_dim``, False: its packed input projection)."""
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim, True
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return base.in_channels, base.out_channels, False
    if isinstance(base, nn.MultiheadAttention):  # its packed input projection, (3E, E)
        return base.embed_dim, 3 * base.embed_dim, False
    return linear_shape(base)


class AdapterLayer(nn.Module):
    """Wraps ``base_layer`` (frozen) and adds a method-specific update.

    Attributes:
        base_layer: the original module; its parameters have ``requires_grad=False``.
        merged: whether :meth:`delta_weight` is currently folded into the base weight.
        disabled: when True the layer behaves exactly as the base layer.
    """

    #: names of this layer's own (adapter) parameters and buffers, used for state dicts
    adapter_param_names: tuple[str, ...] = ()
    #: names of non-parameter state that must be saved with the adapter
    adapter_buffer_names: tuple[str, ...] = ()
    #: whether :mod:`lightning_lora.core.multi` may hold this layer beside other named adapters: it adds
    #: the active layers' output differences, which is exact only where the update adds to the output
    named_adapters: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False
        self.disabled = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        # a new nn.Module starts in train mode; follow the wrapped layer so injecting into an
        # eval-mode model does not switch adapter dropout on
        self.train(base_layer.training)
        self.in_features, self.out_features, self.fan_in_fan_out = self._layer_shape(base_layer)

    @classmethod
    def _layer_shape(cls, base_layer: nn.Module) -> tuple[int, int, bool]:
        """``(in_features, out_features, fan_in_fan_out)`` of the base (:func:`layer_shape`; a layer over
        a module of no such shape, LoRA on bare parameters, gives its own)."""
        return layer_shape(base_layer)

    # ---- what subclasses provide -------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """Dense update in :attr:`base_weight`'s shape (``(out_features, in_features)`` for linear and
        embedding bases, the kernel's ``(out, in, *k)`` for convolutions), fp32."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Output of the adapted layer given the base output. Default: dense delta (slow, exact)."""
        dw = self.delta_weight().to(x.dtype)
        return base_out + x @ dw.t()

    # ---- shared behaviour --------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        """Base weight in the ``(out, in)`` layout (a transposed view for Conv1D and nn.Embedding; a
        convolution's kernel as it is, ``(out, in / groups, *kernel)``)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with, in the base layer's own layout and dtype: the base
        weight itself while merged or disabled, else ``base + delta_weight()``, differentiable in the
        adapter's parameters (computed in fp32, rounded to the base dtype).

        For callers that read a layer's weight instead of calling it: ``nn.MultiheadAttention`` passes
        ``out_proj.weight`` to its attention function, and the inference fast paths of
        ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` hand every weight to one fused
        kernel. Without this they failed on an adapted layer, and serving the base weight (as PEFT
        does) silently drops the adapter in eval mode. Adapter dropout does not apply to a weight:
        it acts only where the layer is called. A method whose update depends on the input (SMoRA's
        gates, per-batch routing) has no such weight: the layer then has no ``weight`` attribute
        (``hasattr`` is False; ``torch.jit.trace`` asks every attribute), and
        ``nn.TransformerEncoderLayer`` needs its fast path off
        (``torch.backends.mha.set_fastpath_enabled(False)``)."""
        w = self.base_layer.weight
        if self.disabled or self.merged:
            return w
        try:
            with no_autocast(w.device):
                dw = self.delta_weight()
        except (RuntimeError, NotImplementedError) as e:
            # an AttributeError: nn.Module.__getattr__ then reports the attribute missing
            raise AttributeError(f"{type(self).__name__} has no single weight: {e}") from e
        if self.fan_in_fan_out:
            dw = dw.t()
        return with_update(w, dw)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (every method here leaves the bias to the base: trained in place
        with ``bias="lora_only"`` / ``"all"``), or None; read with :attr:`weight` by the same callers."""
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base_out = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return base_out
        return self.adapter_forward(x, base_out)

    def weight_updates(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(base tensor, its update)`` pairs that :meth:`merge` adds and :meth:`unmerge` subtracts:
        ``(base_weight, delta_weight())`` here; a layer over several tensors (an attention's two
        projections, several bare parameters) lists each."""
        return [(self.base_weight, self.delta_weight())]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (computed in fp32, stored in the base dtype)."""
        if self.merged:
            raise RuntimeError("adapter is already merged; call unmerge() first")
        _refuse_merge_while_disabled(self)
        self._apply_updates(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update merged by :meth:`merge`."""
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self._apply_updates(-1.0)
        self.merged = False

    def _apply_updates(self, sign: float) -> None:
        """``w ± dw`` into every base tensor of :meth:`weight_updates`, autocast off on the base's device
        (updates formed in bf16 there would make merges inexact)."""
        first = next(itertools.chain(self.base_layer.parameters(), self.base_layer.buffers()), None)
        with no_autocast(first.device) if first is not None else contextlib.nullcontext():
            for w, dw in self.weight_updates():
                w.copy_(with_update(w, dw, sign))

    def enable_adapter(self) -> None:
        self.disabled = False

    def disable_adapter(self) -> None:
        """Run as the base layer. Refused while merged: the update is inside the base weight then,
        so "disabled" could not mean the base model."""
        if self.merged:
            raise RuntimeError("cannot disable a merged adapter (its update is in the base weight); "
                               "unmerge it first")
        self.disabled = True

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """This layer's adapter tensors by local name (no ``base_layer.`` entries)."""
        out: dict[str, torch.Tensor] = {}
        for name, t in self.state_dict(keep_vars=False).items():
            if not name.startswith("base_layer."):
                out[name] = t
        return out

    def base_biases(self) -> list[nn.Parameter]:
        """The base's bias parameters, which ``bias="lora_only"`` trains: its ``bias``, where it has one."""
        bias = getattr(self.base_layer, "bias", None)
        return [bias] if isinstance(bias, nn.Parameter) else []

    def file_extras(self) -> dict[str, torch.Tensor]:
        """Tensors a saved adapter file holds for this layer beside :meth:`adapter_state_dict`'s, by local
        file key: copies another format expects (PEFT's tied head factors), never read back."""
        return {}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


def _refuse_merge_while_disabled(layer: AdapterLayer) -> None:
    """A disabled layer runs its base weight; merging into it would change the "disabled" output."""
    if layer.disabled:
        raise RuntimeError("cannot merge a disabled adapter; enable it first")
