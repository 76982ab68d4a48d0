"""DoRA's arithmetic shared by every layer that has it (LoRA's linear, embedding and convolution
layers, and GradNormLoRP's through LoRA's): ``m/ν`` that stays finite at ``ν = 0``, and the exact
merge / unmerge of ``W' = (m/ν) ⊙ (W0 + ΔW)``.

A layer using :class:`DoRAMerge` provides ``use_dora``, ``dora_detach_norm``, ``lora_magnitude``
(one entry per output feature, in any shape) and ``_scaled_ba()`` (ΔW in
:attr:`~lightning_lora.core.layer.AdapterLayer.base_weight`'s shape); it gets ν (``_dora_norm``),
``m/ν`` (``_dora_mag_scale``), ``delta_weight`` (``W' − W0`` under DoRA), merge and unmerge.
"""

from __future__ import annotations

import torch

from .layer import AdapterLayer, accumulate_dtype


def safe_mag_scale(mag: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """DoRA's ``m/ν``, and 1 where ``ν = 0`` (an all-zero row of ``W0 + sBA``, e.g. a pruned unit at
    init, where ``m = ‖W0‖ = 0``): that row then runs as the base, instead of ``0/0 = NaN``. Rows with
    ``ν ≠ 0`` are ``m/ν`` bit for bit; the gradients of ``m`` and ``ν`` stay finite (zero) at ``ν = 0``."""
    zero = norm == 0
    return torch.where(zero, torch.ones_like(mag), mag / torch.where(zero, torch.ones_like(norm), norm))


class DoRAMerge(AdapterLayer):
    """Merge and unmerge of a layer that may carry DoRA (module docstring); plain LoRA (``use_dora``
    False) takes :class:`AdapterLayer`'s."""

    #: ν at merge time, shape (out,), and the W0 rows of zero magnitude (their merged rows are 0)
    _merged_norm: torch.Tensor | None = None
    _merged_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def _scaled_ba(self) -> torch.Tensor:
        """``ΔW = s·B A`` in ``base_weight``'s shape, fp32 (each layer's own)."""
        raise NotImplementedError

    @staticmethod
    def _row_norm(w: torch.Tensor) -> torch.Tensor:
        """Norm of each output feature's weights (dim 0 of ``base_weight``: a row, a kernel), shape (out,)."""
        return w.flatten(1).norm(dim=1)

    def _dora_norm(self) -> torch.Tensor:
        """``ν = ‖W0 + ΔW‖`` per output feature, shape (out,), in fp32 (fp64 where W0 or the adapter is:
        :func:`~lightning_lora.core.layer.accumulate_dtype`), also under autocast."""
        dw = self._scaled_ba()
        w0 = self.base_weight
        return self._row_norm(w0.to(accumulate_dtype(w0, dw)) + dw)

    def _dora_mag_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """``m/ν`` in ``dtype``, shape (out,); ν a constant in backward with ``dora_detach_norm``."""
        if self.dora_detach_norm:
            with torch.no_grad():
                norm = self._dora_norm()
        else:
            norm = self._dora_norm()
        mag = self.lora_magnitude.reshape(-1)
        # fp64 magnitude or norm: m/ν in fp64 (a .float() rounded fp64 gradients of m to fp32)
        return safe_mag_scale(mag.to(accumulate_dtype(mag, norm)), norm).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = s·B A`` (``_scaled_ba``) in ``base_weight``'s shape, fp32 (fp64 for an fp64 base or
        adapter); with DoRA ``W' − W0``, a row (output feature) with ν = 0 at scale 1 as in the forward,
        and ν a constant in backward with ``dora_detach_norm``, as in the forward (its gradients are the
        layer's where a caller computes with :attr:`~lightning_lora.core.layer.AdapterLayer.weight`)."""
        dw = self._scaled_ba()
        if not self.use_dora:
            return dw
        w0 = self.base_weight
        w0 = w0.to(accumulate_dtype(w0, dw))  # fp64 for an fp64 base (see accumulate_dtype)
        v = w0 + dw
        shape = (-1, *(1,) * (v.dim() - 1))
        norm = self._row_norm(v).reshape(shape)
        if self.dora_detach_norm:
            norm = norm.detach()
        zero = norm == 0
        w_new = self.lora_magnitude.reshape(-1).to(v.dtype).reshape(shape) * v / torch.where(zero, 1.0, norm)
        return torch.where(zero, v, w_new) - w0

    @torch.no_grad()
    def merge(self) -> None:
        if self.use_dora and not self.merged:
            # cache ν so unmerge can recover W0 exactly: W0 = W'·ν/m − ΔW
            self._merged_norm = self._dora_norm()
            # rows with m = 0 merge to 0 whatever W0 was (or to W0 + ΔW = 0 where ν = 0 too): keep
            # their W0 rows, W'·ν/m cannot give them back
            idx = (self.lora_magnitude.reshape(-1) == 0).nonzero().squeeze(1)
            w = self.base_weight
            self._merged_rows = (idx.to(w.device), w[idx.to(w.device)].clone()) if idx.numel() else None
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.use_dora:
            return super().unmerge()
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        w = self.base_weight
        assert self._merged_norm is not None
        dw = self._scaled_ba()
        acc = accumulate_dtype(w, dw)  # fp64 for an fp64 base (see accumulate_dtype)
        shape = (-1, *(1,) * (w.dim() - 1))
        norm = self._merged_norm.to(acc).reshape(shape)
        mag = self.lora_magnitude.reshape(-1).to(acc).reshape(shape)
        # ν = 0: the row merged with scale 1 (W' = W0 + ΔW); m = 0: restored from _merged_rows below
        zero = norm == 0
        w0 = w.to(acc) * torch.where(zero, 1.0, norm) / torch.where(zero | (mag == 0), 1.0, mag) - dw
        w.copy_(w0.to(w.dtype))
        if self._merged_rows is not None:
            w.index_copy_(0, *self._merged_rows)
        self._merged_norm = None
        self._merged_rows = None
        self.merged = False
