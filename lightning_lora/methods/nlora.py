"""SLoRA, NLoRA and IntTune (Guo, Wu, Chang; Findings of EMNLP 2025): METHODS.md §14.

``y = W0 x + b + s · B N A dropout(x)``, an r×r matrix N between LoRA's factors (``lora_core``;
A (r, in), B (out, r); ``s = alpha / r``, alpha = r by default: the code's α = r = 128).

- SLoRA (``"slora"`` init [code]): A and N Kaiming-uniform (a = √5), B = 0 ⇒ ΔW = 0; A, N, B train:
  r(m+n) + r² parameters. Output == base at init, bit-exact.
- NLoRA: A, N, B train, initialised from W0 with a Nyström approximation. Two modes (§14 "Init
  modes", open choice; the paper is the default):

  * ``init="nystrom"`` (paper equations): random column indices I and row indices J,
    |I| = |J| = r, from a generator seeded by ``seed`` and the module name;
    ``C = W0[:, I]`` (m×r), ``R_w = W0[J, :]`` (r×n), ``U = W0[J, I]`` (r×r), ``W0 ≈ C U⁺ R_w``;
    ``B = C``, ``N = U⁺`` (pinv in fp64, optional ``pinv_rtol`` cut-off for an ill-conditioned U),
    ``A = R_w``. Exact when rank(W0) = r and U is invertible [derived].
    ``residual=True`` (default) keeps the output equal to the base at init, as PiSSA's
    ``W0 ← W0 − s·B N A`` does, but without touching the base weight: the init factors are kept as
    frozen saved buffers (``lora_A0``, ``lora_core0``, ``lora_B0``) and the update is
    ``s·(B N A − B0 N0 A0)``, evaluated telescoped (``(B−B0)NA + B0[(N−N0)A + N0(A−A0)]``) so bf16
    does not lose the small difference of two large products. Same function in exact arithmetic; in floating point the two terms
    are computed identically at init, so the output is the base output bit for bit. Why not mutate
    W0 [design]: ``disable_adapter`` / ``unload`` then still give the pre-trained model, and a saved
    adapter is self-contained (the residual is not recomputed on load; METHODS S4). Merge folds
    ``s·(BNA − B0N0A0)`` into W0, exactly PiSSA's merged weight.
  * ``init="reference"`` (official code, ``nlora_init``, for parity with the reported numbers):
    the first r rows / columns, ``A = W0[:r, :]``, ``B = W0[:, :r]``, ``N = W0[:r, :r]`` with NO
    pseudo-inverse (commented out there) and nothing subtracted, so the initial weight is
    ``W0 + s·W0[:, :r] W0[:r, :r] W0[:r, :]`` (S1 not promised; the documented value is tested).
    ``residual`` defaults to False here (the code) and may be switched on.
- IntTune [code]: the NLoRA init (either mode), then A and B frozen (saved buffers); only N trains:
  r² parameters. With ``residual`` only ``N0`` is stored: the update is ``s·B (N − N0) A``.

Speed: the layers run the fused path of :class:`~lightning_lora.methods.lora_sb.CoreLoRALinear`
(IntTune's residual as ``s·B (N − N0) A``); the full residual through :class:`_FusedCoreResidual`,
telescoped as :meth:`NLoRALinear.adapter_forward`, the reference formula.

Parameter counts (METHODS S6): SLoRA / NLoRA r(m+n) + r²; IntTune r² (LLaMA-2-7B, r = 128, seven
projections: 32·7·128² = 3,670,016).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..core.config import adapter_torch_dtype, AdapterConfig, finite_number, Method, register, whole_number
from ..core.layer import accumulate_dtype, no_autocast
from .lora import _frozen_weight, _mm_scaled, _mm_to, _stash_frozen_weight
from .lora_sb import CoreLoRALinear


def _check_dtype_name(option: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise a one-line ValueError unless ``value`` is one of the torch dtype names ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{option} must be one of {allowed}, got {value!r}")


@dataclass
class _CoreConfig(AdapterConfig):
    """Options shared by SLoRA, NLoRA and IntTune.

    Attributes:
        r: rank (N is r×r).
        alpha: ``s = alpha / r``; None (default) = r, s = 1 (code: α = r = 128).
        dropout: dropout on the adapter input (code: 0).
        init: ``"slora"``, ``"nystrom"`` or ``"reference"`` (see the module docstring).
        residual: keep the output equal to the base at init by subtracting the init update
            (``s·B0 N0 A0``, stored); None = True for ``nystrom``, False otherwise.
        seed: seeds the Nyström index draw (combined with the module name).
        pinv_rtol: relative cut-off of ``torch.linalg.pinv`` (None = torch's default).
        pinv_dtype: dtype of the pseudo-inverse (fp64; fp32 where fp64 is unsupported).
        adapter_dtype: dtype of the factors.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    init: str = "nystrom"
    residual: bool | None = None
    seed: int = 0
    pinv_rtol: float | None = None
    pinv_dtype: str = "float64"
    adapter_dtype: str = "float32"

    inits: ClassVar[tuple[str, ...]] = ("slora", "nystrom", "reference")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.r = whole_number(self.r, "rank r")
        self.seed = whole_number(self.seed, "seed")
        if self.r < 1:
            raise ValueError(f"rank r must be >= 1, got {self.r}")
        if self.alpha is None:
            self.alpha = float(self.r)
        # a NaN alpha (s = alpha / r) gave NaN outputs and a string one a TypeError at the first forward
        self.alpha = finite_number(self.alpha, "alpha (s = alpha / r)")
        if self.pinv_rtol is not None and not finite_number(self.pinv_rtol, "pinv_rtol") >= 0:
            raise ValueError(f"pinv_rtol must be None or >= 0, got {self.pinv_rtol!r}")
        if self.init not in self.inits:
            raise ValueError(f"{self.method or 'nlora'}: init must be one of {self.inits}, got {self.init!r}")
        if self.residual is None:
            self.residual = self.init == "nystrom"
        if self.residual and self.init == "slora":
            raise ValueError("residual=True needs a non-zero init (nystrom or reference); SLoRA starts at ΔW = 0")
        # checked here, not at injection: getattr(torch, "fp64") raised a bare AttributeError there, and
        # a half-precision pinv an obscure linalg error
        # (adapter_dtype: AdapterConfig.__post_init__, for every method)
        _check_dtype_name("pinv_dtype", self.pinv_dtype, ("float32", "float64"))

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r  # type: ignore[arg-type]


@dataclass
class SLoRAConfig(_CoreConfig):
    """SLoRA: ``init="slora"`` (fixed)."""

    init: str = "slora"
    inits: ClassVar[tuple[str, ...]] = ("slora",)


@dataclass
class NLoRAConfig(_CoreConfig):
    """NLoRA: ``init="nystrom"`` (paper, default) or ``"reference"`` (official code)."""

    inits: ClassVar[tuple[str, ...]] = ("nystrom", "reference")


@dataclass
class IntTuneConfig(_CoreConfig):
    """IntTune: NLoRA init, only N trains."""

    inits: ClassVar[tuple[str, ...]] = ("nystrom", "reference")


@torch.no_grad()
def nystrom_factors(
    w0: torch.Tensor,
    r: int,
    generator: torch.Generator | None = None,
    pinv_dtype: torch.dtype = torch.float64,
    pinv_rtol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nyström factors of ``w0`` (m, n) from random rows J and columns I (|I| = |J| = r).

    Returns ``(A = W0[J, :] (r, n), N = W0[J, I]⁺ (r, r), B = W0[:, I] (m, r))`` in ``pinv_dtype``,
    so that ``B N A = C U⁺ R_w ≈ W0`` (§14 "Equations", paper form).
    """
    m, n = w0.shape
    cols = torch.randperm(n, generator=generator)[:r].to(w0.device)
    rows = torch.randperm(m, generator=generator)[:r].to(w0.device)
    # slice, then cast: the same values (a cast is elementwise) without an (m, n) copy in pinv_dtype
    # (fp64: 470 MB for a 4096 x 14336 weight)
    w = w0.detach()
    R_raw = w[rows, :]
    C, R_w, U = w[:, cols].to(pinv_dtype), R_raw.to(pinv_dtype), R_raw[:, cols].to(pinv_dtype)
    N = torch.linalg.pinv(U) if pinv_rtol is None else torch.linalg.pinv(U, rtol=pinv_rtol)
    return R_w, N, C


@torch.no_grad()
def reference_factors(w0: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official-code NLoRA init: ``(A = W0[:r, :], N = W0[:r, :r], B = W0[:, :r])`` (no pinv)."""
    w = w0.detach()
    return w[:r, :].clone(), w[:r, :r].clone(), w[:, :r].clone()


class _FusedCoreResidual(torch.autograd.Function):
    """The full residual ``out = x W^T + b + s·x (B N A − B0 N0 A0)^T``, telescoped as
    :meth:`NLoRALinear.adapter_forward` (the reference) does, with a hand-written backward.

    Shapes: ``x`` (..., n) flattened to (N, n) inside; ``w`` (m, n), or (n, m) with ``fan_in_fan_out``;
    ``A`` (r, n), ``N`` (r, r), ``B`` (m, r) trainable, any dtype (cast here); ``offsets`` =
    ``(A0, N0, B0)`` already in ``x``'s dtype (cached casts or the buffers). With ``dA = A − A0``,
    ``dN = N − N0``, ``dB = B − B0`` (taken in ``x``'s dtype, as the reference does):

    - forward: ``u_s = s·x A^T``, ``p_s = s·x dA^T`` (N, r); ``v1 = u_s N^T``, ``v2 = u_s dN^T + p_s N0^T``;
      ``out = v1 dB^T + v2 B0^T + b``, then ``out += x W^T``: every term is small near the init, as in
      the reference (no cancellation of two large Nyström products);
    - backward: ``G1 = g dB``, ``G2 = g B0`` (so ``G1 + G2 = g B``); ``grad_B = g^T v1``,
      ``grad_N = (G1 + G2)^T u_s``, ``grad_A = (s·(G1 + G2) N)^T x`` (the offsets are constants:
      the factors' gradients are the plain product's), ``grad_x = s·(G1 N + G2 dN) A + s·(G2 N0) dA + g W``
      (telescoped as the forward).
    """

    @staticmethod
    def forward(ctx, x, w, bias, A, N, B, offsets, scaling, fan_in_fan_out):  # type: ignore[override]
        dtype = x.dtype
        A0, N0, B0 = offsets
        Ac = A if A.dtype == dtype else A.to(dtype)
        Nc = N if N.dtype == dtype else N.to(dtype)
        Bc = B if B.dtype == dtype else B.to(dtype)
        dA, dN, dB = Ac - A0, Nc - N0, Bc - B0
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        u_s = _mm_scaled(x2, Ac.t(), scaling)  # (N, r)
        p_s = _mm_scaled(x2, dA.t(), scaling)  # (N, r)
        v1 = torch.mm(u_s, Nc.t())
        v2 = torch.mm(u_s, dN.t())
        v2.addmm_(p_s, N0.t())
        m = B0.shape[0]
        out = v1.new_empty(shape[:-1] + (m,))
        out2 = out.view(-1, m)
        if bias is not None:
            torch.addmm(bias, v1, dB.t(), out=out2)
        else:
            torch.mm(v1, dB.t(), out=out2)
        out2.addmm_(v2, B0.t())
        out2.addmm_(x2, w if fan_in_fan_out else w.t())
        need_x, need_w, _, need_A, need_N, need_B = ctx.needs_input_grad[:6]
        # everything through save_for_backward: aliases of A, N, B (already in x's dtype) are
        # version-checked, as for nn.Linear's weight; the rest are fresh tensors
        ctx.save_for_backward(x2 if need_A or need_w else None, u_s if need_N else None, v1 if need_B else None,
                              Ac, Nc, dA, dN, dB, N0, B0)
        _stash_frozen_weight(ctx, w if need_x else None)  # frozen
        ctx.scaling = scaling
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.shape = shape
        ctx.dtypes = (w.dtype, A.dtype, N.dtype, B.dtype)
        return out

    @staticmethod
    @once_differentiable  # the casts are not differentiable inputs: a double backward raises, not lies
    def backward(ctx, g):  # type: ignore[override]
        x2, u_s, v1, Ac, Nc, dA, dN, dB, N0, B0 = ctx.saved_tensors
        need_x, need_w, need_bias, need_A, need_N, need_B = ctx.needs_input_grad[:6]
        s = ctx.scaling
        fifo = ctx.fan_in_fan_out
        g = g.reshape(-1, g.shape[-1])  # (N, m)
        grad_x = grad_w = grad_bias = grad_A = grad_N = grad_B = None
        if need_x or need_A or need_N:
            G1 = torch.mm(g, dB)  # (N, r)
            G2 = torch.mm(g, B0)  # (N, r)
            if need_A or need_N:
                gB = G1 + G2  # (N, r) = g B
                if need_N:
                    grad_N = _mm_to(gB.t(), u_s, ctx.dtypes[2])  # (r, r) = s·(g B)^T u
                if need_A:
                    grad_A = _mm_to(_mm_scaled(gB, Nc, s).t(), x2, ctx.dtypes[1])  # (r, n)
            if need_x:
                q = _mm_scaled(G1, Nc, s)  # (N, r)
                q.addmm_(G2, dN, alpha=s)
                w = _frozen_weight(ctx, "the base weight of a fused NLoRA residual layer")
                grad_x = torch.mm(q, Ac)
                grad_x.addmm_(_mm_scaled(G2, N0, s), dA)
                grad_x.addmm_(g, w.t() if fifo else w)
                grad_x = grad_x.view(ctx.shape)
        if need_B:
            grad_B = _mm_to(g.t(), v1, ctx.dtypes[3])  # (m, r) = s·g^T (u N^T)
        if need_bias:
            grad_bias = g.sum(0)
        if need_w:
            grad_w = _mm_to(x2.t(), g, ctx.dtypes[0]) if fifo else _mm_to(g.t(), x2, ctx.dtypes[0])
        return grad_x, grad_w, grad_bias, grad_A, grad_N, grad_B, None, None, None


_apply_residual = super(torch.autograd.Function, _FusedCoreResidual).apply  # type: ignore[misc]


class NLoRALinear(CoreLoRALinear):
    """``base(x) + s·B N A x`` (minus the stored init update when ``residual``).

    Trainable: A, N, B (SLoRA, NLoRA) or N only (IntTune); frozen factors and the residual's
    ``lora_A0`` / ``lora_core0`` / ``lora_B0`` are persistent buffers.
    """

    def __init__(self, base_layer: nn.Module, config: _CoreConfig, name: str, trainable: tuple[str, ...]) -> None:
        dtype = adapter_torch_dtype(config.adapter_dtype)
        super().__init__(base_layer, config.r, config.scaling, trainable, config.dropout, dtype)
        self.init_mode = config.init
        self.residual = bool(config.residual)
        # residual offsets: only the factors that can move need a frozen copy (IntTune: N0 only)
        self.offset_names = tuple(f"{n}0" for n in self.adapter_param_names) if self.residual else ()
        for oname in self.offset_names:
            self.register_buffer(oname, torch.zeros_like(getattr(self, oname[:-1]).detach()), persistent=True)
        self.adapter_buffer_names = (*self.adapter_buffer_names, *self.offset_names)
        if self.lora_A.is_meta:
            return
        w0 = self.base_weight
        r = config.r
        if config.init == "slora":
            A = torch.empty(r, self.in_features)
            N = torch.empty(r, r)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(N, a=math.sqrt(5))
            self.set_factors(A, N, torch.zeros(self.out_features, r))
            return
        if config.init == "nystrom":
            g = torch.Generator().manual_seed(config.seed + zlib.crc32(name.encode()))
            pinv_dtype = getattr(torch, config.pinv_dtype)
            if w0.device.type == "mps" and pinv_dtype == torch.float64:
                pinv_dtype = torch.float32
            with no_autocast(w0.device):
                A, N, B = nystrom_factors(w0, r, g, pinv_dtype, config.pinv_rtol)
        else:
            A, N, B = reference_factors(w0, r)
        self.set_factors(A, N, B)
        with torch.no_grad():
            for oname in self.offset_names:
                getattr(self, oname).copy_(getattr(self, oname[:-1]))

    def _core_delta_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.offset_names == ("lora_core0",):  # IntTune residual: s·B (N − N0) A
            return self.lora_A, self.lora_core - self.lora_core0, self.lora_B
        return self.lora_A, self.lora_core, self.lora_B

    def _fused_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        """IntTune's residual runs fused as ``s·B (N − N0) A``; the full residual (NLoRA with
        ``residual``) as ``(A, N, None, B)`` too, which :meth:`_fused` hands to :class:`_FusedCoreResidual`."""
        offsets = self.offset_names
        if offsets == ("lora_core0",):
            return self._factor("lora_A"), self._factor("lora_core"), self._factor("lora_core0"), self._factor("lora_B")
        # super(Class, self) on the paths torch.compile traces (here and below): CoreLoRALinear.forward
        return super(NLoRALinear, self)._fused_factors()

    def _fused(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]) -> torch.Tensor:
        """The full residual through :class:`_FusedCoreResidual`, the rest as :class:`CoreLoRALinear`."""
        if len(self.offset_names) != 3:
            return super(NLoRALinear, self)._fused(x, weight, bias, factors)
        A, N, _, B = factors
        dtype = x.dtype
        offsets = []
        for name in self.offset_names:  # lora_A0, lora_core0, lora_B0: frozen, casts cached
            t = self._factor(name)
            cast = self._frozen_cast(name, t, dtype)
            if cast is None:  # already in dtype, or not cached (inference mode)
                cast = t if t.dtype == dtype else t.to(dtype)
            offsets.append(cast)
        return _apply_residual(x, weight, bias, A, N, B, tuple(offsets), self.scaling, self.fan_in_fan_out)

    def delta_weight(self) -> torch.Tensor:
        """``s·B N A`` (minus ``s·B0 N0 A0`` with a full residual), fp32 (fp64 for fp64 factors:
        :func:`~lightning_lora.core.layer.accumulate_dtype`), shape (out, in)."""
        if len(self.offset_names) != 3:
            return super(NLoRALinear, self).delta_weight()
        ts = self._factors_and_offsets()
        acc = accumulate_dtype(*ts)  # .float() rounded an fp64 adapter's delta: merged outputs moved ~1e-6
        A, N, B, A0, N0, B0 = (t.to(acc) for t in ts)
        with no_autocast(A.device):  # telescoped, see adapter_forward
            return self.scaling * ((B - B0) @ (N @ A) + B0 @ ((N - N0) @ A + N0 @ (A - A0)))

    def _factors_and_offsets(self) -> tuple[torch.Tensor, ...]:
        return self.lora_A, self.lora_core, self.lora_B, self.lora_A0, self.lora_core0, self.lora_B0

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if len(self.offset_names) != 3:
            return super(NLoRALinear, self).adapter_forward(x, base_out)
        dtype = base_out.dtype
        xd = (F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x).to(dtype)

        A, N, B, A0, N0, B0 = (t.to(dtype) for t in self._factors_and_offsets())
        # BNA − B0N0A0 telescoped as (B − B0)NA + B0[(N − N0)A + N0(A − A0)]: every term is small near
        # the init, so the cancellation of two large Nyström products (N = U⁺ can be large) does not
        # cost bf16 precision; at init each difference is exactly 0, so the output is the base's.
        u = xd @ A.t()
        h = (u @ N.t()) @ (B - B0).t() + (u @ (N - N0).t() + (xd @ (A - A0).t()) @ N0.t()) @ B0.t()
        return base_out + (h * self.scaling if self.scaling != 1.0 else h)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", init={self.init_mode}, residual={self.residual}"


class _CoreMethod(Method):
    supported_types = (nn.Linear,)
    trainable: ClassVar[tuple[str, ...]] = ("lora_A", "lora_core", "lora_B")

    def make_layer(self, base: nn.Module, name: str) -> NLoRALinear:
        return NLoRALinear(base, self.config, name, self.trainable)  # type: ignore[arg-type]


@register("slora")
class SLoRA(_CoreMethod):
    """SLoRA: Kaiming A and N, B = 0; A, N, B train."""

    Config = SLoRAConfig


@register("nlora")
class NLoRA(_CoreMethod):
    """NLoRA: Nyström (paper) or first-r-slices (code) init; A, N, B train."""

    Config = NLoRAConfig


@register("inttune")
class IntTune(_CoreMethod):
    """IntTune: NLoRA init, only the r×r N trains."""

    Config = IntTuneConfig
    trainable = ("lora_core",)
