"""LoRA-XS (Bałazy et al. 2024) and LoRA-SB (Ponkshe et al. 2024): METHODS.md §12.

Both: ``y = W0 x + b + s · B R A dropout(x)`` with ``B ∈ R^{m×r}`` and ``A ∈ R^{r×n}`` FROZEN and only
the r×r core ``R`` trained: r² parameters per adapted m×n matrix (r(m+n) frozen).

- LoRA-XS (§12 "LoRA-XS init" [code]): ``W0 ≈ U_r Σ_r V_rᵀ`` (truncated SVD in fp32, cast back to the
  adapter dtype); ``B = U_r``, ``A = Σ_r V_rᵀ``, ``R ~ N(0, σ²)``, σ = 1e-5, so the output is within
  O(1e-5) of the base at init (``core_init="zeros"`` gives the exact base output [design]).
  ``α = r`` (s = 1) by default; the GLUE script's α = 16 is one option away.
- LoRA-SB (§12 "LoRA-SB init" [code], steps 1-6): the factors come from an estimate of the first
  full fine-tuning step. ``G = Σ_b ∇_W (L_b / |b|)`` over ``n_init_batches`` training batches at W0,
  ``ΔW̃ = −η₁ sign(G)`` (Adam's first step), ``η₁ = η / (warmup_ratio · T)``, then
  ``ΔW̃ ≈ U_r S_r V_rᵀ`` and ``B = U_r``, ``R = diag(S_r)``, ``A = V_rᵀ``. ``s = 1`` always: α is not
  a hyperparameter (a user α is ignored with a warning). W0 is NOT reset, so after the init the
  model is ``W0 + B R A`` (S1 not promised; the documented value is tested). Why α drops out
  [derived]: with orthonormal B, A, ``∂L/∂R = s Bᵀ G Aᵀ`` and one SGD step on R moves W by
  ``−η s² P_B G P_A`` (projected full fine-tuning).

  The init runs in :meth:`LoRASB.on_fit_start` (driven by :class:`~lightning_lora.AdapterCallback`;
  its batches come from ``trainer.train_dataloader`` or from :meth:`LoRASB.set_init_data`) or, in
  plain PyTorch, in :func:`init_lora_sb`. Until then a layer holds a placeholder: ``B = I[:, :r]``,
  ``A = I[:r, :]``, ``R = 0`` (output == base). A saved ``lora_sb_initialized`` flag stops a second
  ``fit`` (or a loaded adapter) from being re-initialised.

Frozen factors are persistent buffers: SAVED with the adapter, never recomputed on load (an SVD is
not bit-stable across hardware; METHODS S4). The layer, :class:`CoreLoRALinear`, is shared with
SLoRA / NLoRA / IntTune (§14, ``nlora.py``), where any of A, N(=R), B may train.

SVD backend (§12 open choice): ``svd="lowrank"`` (``torch.svd_lowrank``, niter 10, seeded; the
LoRA-SB code; default) or ``"exact"`` (``torch.linalg.svd``; tests and small matrices). LoRA-XS's
own code uses sklearn's randomized TruncatedSVD (random_state 42); the seed default 42 follows it.
η₁'s T (§12 open choice): ``"batches"`` (dataloader batches, the code; default) or ``"steps"``
(optimizer steps; differs under gradient accumulation).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..core.config import adapter_torch_dtype, AdapterConfig, finite_number, Method, register, whole_number
from ..core.inject import adapter_layers, get_adapter_method
from ..core.layer import AdapterLayer, accumulate_dtype, no_autocast
from . import lora as _lora
from .lora import (_autocast_dtype, _frozen_weight, _mm_scaled, _mm_to, _plain_linear_base, _stash_frozen_weight,
                   _weight_bias)


# ---- the shared layer ------------------------------------------------------------------------
class _FusedCore(torch.autograd.Function):
    """``out = x W^T + b + s · ((x A^T) R^T) B^T`` with a hand-written backward (the fused path of
    :class:`CoreLoRALinear`; :meth:`CoreLoRALinear.adapter_forward` is the reference formula).

    Shapes: ``x`` (..., n), flattened to (N, n) inside (no autograd view nodes around the function);
    ``w`` the base weight as stored: (m, n), or (n, m) with ``fan_in_fan_out`` (Conv1D); ``A`` (r, n),
    ``R`` (r, r), ``B`` (m, r) as the layer holds them (any dtype); ``R0`` (r, r) or None: IntTune's
    residual offset, the core used is ``R − R0``; ``casts`` = ``(Ac, Bc)``: frozen A / B already in
    ``x``'s dtype (cached by the layer), or None to cast here. Casts made here run with grad mode off
    (no autograd node per cast). ``out`` (..., m) is a fresh tensor (not a view). The scale ``s`` rides
    in the GEMM ``alpha`` of one rank-r product each way:

    - forward:  ``u_s = s·x Ac^T`` (N, r), ``v_s = u_s Rc^T`` (N, r), ``out = v_s Bc^T + b``, then
      ``out += x W^T`` (the base matmul accumulates into the adapter's output: no separate add);
    - backward: ``gB = g Bc`` (N, r), ``grad_R = gB^T u_s``, ``grad_B = g^T v_s``, and with
      ``gBR_s = s·gB Rc`` (N, r): ``grad_A = gBR_s^T x``, ``grad_x = gBR_s Ac + g W``. Only the
      gradients whose inputs require grad are computed, and only what they read is kept: with A
      frozen (LoRA-XS, LoRA-SB, IntTune) ``x`` is not saved at all, only the two (N, r) products.
    """

    @staticmethod
    def forward(ctx, x, w, bias, A, R, B, R0, casts, scaling, fan_in_fan_out):  # type: ignore[override]
        dtype = x.dtype
        Ac, Bc = casts
        if Ac is None:
            Ac = A if A.dtype == dtype else A.to(dtype)
        if Bc is None:
            Bc = B if B.dtype == dtype else B.to(dtype)
        Rd = R if R0 is None else R - R0  # in R's dtype, as the reference subtracts before casting
        Rc = Rd if Rd.dtype == dtype else Rd.to(dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        u_s = _mm_scaled(x2, Ac.t(), scaling)  # (N, r)
        v_s = torch.mm(u_s, Rc.t())  # (N, r)
        m = Bc.shape[0]
        out = v_s.new_empty(shape[:-1] + (m,))
        out2 = out.view(-1, m)
        if bias is not None:
            torch.addmm(bias, v_s, Bc.t(), out=out2)
        else:
            torch.mm(v_s, Bc.t(), out=out2)
        out2.addmm_(x2, w if fan_in_fan_out else w.t())
        need_x, need_w, _, need_A, need_R, need_B = ctx.needs_input_grad[:6]
        need_gb = need_x or need_A or need_R
        # a factor used as its own cast (already in x's dtype) goes through save_for_backward, so an
        # in-place write before backward raises as for nn.Linear's weight; a cast copy is a fresh
        # tensor that nothing writes (a pending graph keeps the values its forward used)
        ctx.save_for_backward(
            x2 if need_A or need_w else None,
            u_s if need_R else None,
            v_s if need_B else None,
            Ac if Ac is A and need_x else None,
            Rc if Rc is R and (need_x or need_A) else None,
            Bc if Bc is B and need_gb else None,
        )
        ctx.copies = (Ac if Ac is not A and need_x else None,
                      Rc if Rc is not R and (need_x or need_A) else None,
                      Bc if Bc is not B and need_gb else None)
        # frozen (a trainable w is saved as x is: grad_w reads x only)
        _stash_frozen_weight(ctx, w if need_x else None)
        ctx.scaling = scaling
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.shape = shape
        ctx.dtypes = (w.dtype, A.dtype, R.dtype, B.dtype)
        return out

    @staticmethod
    @once_differentiable  # the casts are not differentiable inputs: a double backward raises, not lies
    def backward(ctx, g):  # type: ignore[override]
        x2, u_s, v_s, Aa, Ra, Ba = ctx.saved_tensors  # unpacking checks the aliases' versions
        Acp, Rcp, Bcp = ctx.copies
        Ac = Aa if Aa is not None else Acp
        Rc = Ra if Ra is not None else Rcp
        Bc = Ba if Ba is not None else Bcp
        need_x, need_w, need_bias, need_A, need_R, need_B = ctx.needs_input_grad[:6]
        fifo = ctx.fan_in_fan_out
        g = g.reshape(-1, g.shape[-1])  # (N, m): what the view node around the output did
        grad_x = grad_w = grad_bias = grad_A = grad_R = grad_B = None
        if need_x or need_A or need_R:
            gB = torch.mm(g, Bc)  # (N, r)
            if need_R:
                grad_R = _mm_to(gB.t(), u_s, ctx.dtypes[2])  # (r, r) = s·gB^T u
            if need_x or need_A:
                gBR_s = _mm_scaled(gB, Rc, ctx.scaling)  # (N, r) = s·gB R
                if need_x:
                    w = _frozen_weight(ctx, "the base weight of a fused core LoRA layer")
                    grad_x = torch.mm(gBR_s, Ac)
                    grad_x.addmm_(g, w.t() if fifo else w)
                    grad_x = grad_x.view(ctx.shape)
                if need_A:
                    grad_A = _mm_to(gBR_s.t(), x2, ctx.dtypes[1])  # (r, n)
        if need_B:
            grad_B = _mm_to(g.t(), v_s, ctx.dtypes[3])  # (m, r) = s·g^T v
        if need_bias:
            grad_bias = g.sum(0)
        if need_w:
            grad_w = _mm_to(x2.t(), g, ctx.dtypes[0]) if fifo else _mm_to(g.t(), x2, ctx.dtypes[0])
        return grad_x, grad_w, grad_bias, grad_A, grad_R, grad_B, None, None, None, None


#: ``Function.apply`` without its Python wrapper (signature binding, functorch unwrapping): the C++
#: entry it ends in, a few microseconds less per call; the fused path is never taken under functorch
#: transforms or compiling, where the wrapper matters
_apply_core = super(torch.autograd.Function, _FusedCore).apply  # type: ignore[misc]


class CoreLoRALinear(AdapterLayer):
    """``y = base(x) + s · B R A dropout(x)``; each of A (r, in), R (r, r), B (out, r) is either a
    trainable parameter or a frozen persistent buffer (names ``lora_A``, ``lora_core``, ``lora_B``).

    ``lora_core`` is R in §12 and N in §14. Subclasses (or callers) fill the factors; the
    constructor allocates them (zeros) with the requested trainable set.

    Speed: :meth:`forward` runs one autograd function (:class:`_FusedCore`): the base matmul
    accumulates into the adapter's output, the scale rides in a GEMM ``alpha``, the factors are cast
    to the activation dtype inside it (no autograd node per cast) and frozen factors' casts are cached
    until the buffer changes (:meth:`_frozen_cast`); the backward computes only the gradients that are
    needed. Its output and gradients equal :meth:`adapter_forward` (the reference formula) up to
    rounding order. The reference runs instead when ``fused`` is False, with dropout active (train
    mode, ``dropout > 0``), when :meth:`_fused_factors` returns None (a subclass whose formula is not
    the product; NLoRA's full residual has its own function, see ``nlora.py``), for extra forward
    arguments, a base layer other than a plain ``nn.Linear`` / transformers ``Conv1D``, under functorch
    transforms and while compiling.
    """

    factor_names = ("lora_A", "lora_core", "lora_B")
    #: take the fused path (:class:`_FusedCore`) where it applies; False forces the reference formula
    fused: bool = True

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scaling: float,
        trainable: tuple[str, ...] = ("lora_core",),
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(base_layer)
        if r > min(self.in_features, self.out_features):
            raise ValueError(f"rank r={r} exceeds min(out, in) = {min(self.in_features, self.out_features)}")
        self.r = r
        self.scaling = scaling
        self.dropout_p = dropout
        self.fused = True
        #: frozen-factor casts: name -> (source tensor, its version, data pointer, dtype, cast)
        self._cast_cache: dict[str, tuple[torch.Tensor, int, int, torch.dtype, torch.Tensor, int]] = {}
        device = base_layer.weight.device
        shapes = {"lora_A": (r, self.in_features), "lora_core": (r, r), "lora_B": (self.out_features, r)}
        self.adapter_param_names = tuple(n for n in self.factor_names if n in trainable)
        self.adapter_buffer_names = tuple(n for n in self.factor_names if n not in trainable)
        for name in self.factor_names:
            t = torch.zeros(shapes[name], dtype=dtype, device=device)
            if name in trainable:
                setattr(self, name, nn.Parameter(t))
            else:
                self.register_buffer(name, t, persistent=True)

    @torch.no_grad()
    def set_factors(self, A: torch.Tensor, R: torch.Tensor, B: torch.Tensor) -> None:
        """Copy new factors in place (dtype of the adapter; works for parameters and buffers)."""
        for name, t in (("lora_A", A), ("lora_core", R), ("lora_B", B)):
            dst = getattr(self, name)
            if dst.is_meta:
                continue
            dst.copy_(t.to(device=dst.device, dtype=dst.dtype))

    def _core_delta_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, R, B)`` used by forward and delta_weight (hook for §14's residual mode)."""
        return self.lora_A, self.lora_core, self.lora_B

    def _factor(self, name: str) -> torch.Tensor:
        """Factor ``name`` from the parameter or buffer dict (``nn.Module.__getattr__`` is a slow
        fallback lookup: host time per forward on launch-bound steps)."""
        params = self._parameters
        if name in params:
            return params[name]  # type: ignore[return-value]
        bufs = self._buffers
        return bufs[name] if name in bufs else getattr(self, name)  # type: ignore[return-value]

    def _fused_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        """``(A, R, R0, B)`` for :class:`_FusedCore` (core used: ``R − R0``; R0 None: ``R``), or None
        when this layer's update is not ``s·B (R − R0) A`` (the reference formula runs)."""
        return self._factor("lora_A"), self._factor("lora_core"), None, self._factor("lora_B")

    def _frozen_cast(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Buffer ``t`` (factor ``name``) in ``dtype``, cached until the buffer changes; None: the
        fused function casts (or uses) it itself.

        Only buffers are cached: they change through in-place writes (``set_factors``,
        ``load_state_dict``: the version counter moves) or replacement (``.to()``: another tensor,
        compared by identity; the entry holds it, so its storage cannot be reused meanwhile).
        Writes that move no version counter (``.data``, ``torch.distributed``) need
        :func:`lightning_lora.invalidate_cast_caches`, which the key includes.
        Parameters are cast per call: fused optimizers update them without moving the version
        counter. A replaced cast is not written: a graph still waiting for backward keeps the values
        its forward used."""
        if t.dtype == dtype or t.requires_grad or name not in self._buffers:
            return None
        if t.is_inference() or torch.is_inference_mode_enabled():  # no version counter / inference casts
            return None
        cache = self.__dict__.get("_cast_cache")
        if cache is None:  # a layer unpickled from before the cache existed
            cache = self.__dict__["_cast_cache"] = {}
        entry = cache.get(name)
        if (entry is not None and entry[0] is t and entry[1] == t._version and entry[3] == dtype
                and entry[2] == t.data_ptr() and entry[5] == _lora._CAST_INVALIDATIONS):
            return entry[4]
        with torch.no_grad():
            cast = t.to(dtype)
        cache[name] = (t, t._version, t.data_ptr(), dtype, cast, _lora._CAST_INVALIDATIONS)
        return cast

    def _apply(self, fn: Any, recurse: bool = True) -> "CoreLoRALinear":
        # .to() / .cuda() / .half() replace the buffers: drop the casts (and the old buffers the cache
        # still refers to) now instead of holding them on the old device until the next forward
        self.__dict__.get("_cast_cache", {}).clear()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # super(Class, self), not super(), on every path torch.compile traces: torch 2.11's compiler
        # cannot resolve a zero-argument super() here (a graph break at every layer, seen on the H200)
        if (self.disabled or self.merged or not self.fused or args or kwargs
                or (self.dropout_p > 0 and self.training)
                # functorch transforms wrap tensors (no storage for the cache key, and the
                # hand-written backward is not what they trace); compiling traces the reference
                or torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling()):
            return super(CoreLoRALinear, self).forward(x, *args, **kwargs)
        factors = self._fused_factors()
        if factors is None or not _plain_linear_base(self):
            return super(CoreLoRALinear, self).forward(x, *args, **kwargs)
        weight, bias = _weight_bias(self)  # type: ignore[arg-type]
        dtype = _autocast_dtype(x)  # under autocast: as LoRALinear.forward
        if dtype is not None:
            with torch.autocast(x.device.type, enabled=False):
                return self._fused(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), factors)
        return self._fused(x, weight, bias, factors)

    def _fused(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]) -> torch.Tensor:
        """:class:`_FusedCore` on ``x`` (..., in) -> (..., out) in ``x``'s dtype."""
        A, R, R0, B = factors
        dtype = x.dtype
        casts = (self._frozen_cast("lora_A", A, dtype), self._frozen_cast("lora_B", B, dtype))
        return _apply_core(x, weight, bias, A, R, B, R0, casts, self.scaling, self.fan_in_fan_out)

    def delta_weight(self) -> torch.Tensor:
        """``s · B R A`` in fp32 (fp64 for fp64 factors: :func:`~lightning_lora.core.layer.accumulate_dtype`),
        shape (out, in)."""
        A, R, B = self._core_delta_inputs()
        acc = accumulate_dtype(A, R, B)  # .float() rounded an fp64 adapter's delta: merged outputs moved ~1e-8
        with no_autocast(A.device):
            return self.scaling * (B.to(acc) @ (R.to(acc) @ A.to(acc)))

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The reference formula: ``base_out + s · ((dropout(x) A^T) R^T) B^T`` with the factors cast
        to ``base_out``'s dtype; x (..., in), base_out (..., out)."""
        dtype = base_out.dtype
        A, R, B = (t.to(dtype) for t in self._core_delta_inputs())
        xd = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        h = ((xd.to(dtype) @ A.t()) @ R.t()) @ B.t()
        return base_out + (h * self.scaling if self.scaling != 1.0 else h)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, scaling={self.scaling:g}, trainable={list(self.adapter_param_names)}"


# ---- SVD helpers -----------------------------------------------------------------------------
def truncated_svd(w: torch.Tensor, r: int, method: str = "exact", niter: int = 10, seed: int = 42):
    """``(U_r (m, r), S_r (r,), V_r (n, r))`` of ``w`` (m, n), computed in fp32.

    ``"exact"``: ``torch.linalg.svd``; ``"lowrank"``: ``torch.svd_lowrank(q=r, niter)`` with the
    global RNG forked and seeded by ``seed`` (identical on every rank / rerun on one machine).
    """
    w = w.detach().float()
    if method == "exact":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r].t()
    if method != "lowrank":
        raise ValueError(f"svd must be 'exact' or 'lowrank', got {method!r}")
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
    return U[:, :r], S[:r], V[:, :r]


# ---- LoRA-XS ---------------------------------------------------------------------------------
@dataclass
class LoRAXSConfig(AdapterConfig):
    """LoRA-XS options.

    Attributes:
        r: rank (R is r×r).
        alpha: ``s = alpha / r``; None (default) = r, s = 1 (LLM scripts); the GLUE script uses 16.
        dropout: dropout on the adapter input.
        core_init: ``"gaussian"`` (R ~ N(0, core_std²), code default) or ``"zeros"`` (exact base
            output at init, gradients still flow since A, B ≠ 0) [design].
        core_std: σ of the Gaussian core init (1e-5).
        svd: ``"lowrank"`` (default) or ``"exact"``.
        svd_niter: power iterations of ``"lowrank"`` (``torch.svd_lowrank``'s niter).
        svd_seed: seed of ``"lowrank"``'s random projection.
        adapter_dtype: dtype of R and of the stored factors.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    core_init: str = "gaussian"
    core_std: float = 1e-5
    svd: str = "lowrank"
    svd_niter: int = 10
    svd_seed: int = 42
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.r = whole_number(self.r, "rank r", 1)
        if self.alpha is None:
            self.alpha = float(self.r)
        if self.core_init not in ("gaussian", "zeros"):
            raise ValueError(f"core_init must be 'gaussian' or 'zeros', got {self.core_init!r}")
        if self.svd not in ("lowrank", "exact"):
            raise ValueError(f"svd must be 'lowrank' or 'exact', got {self.svd!r}")
        # s = alpha / r: alpha = 0 gives a zero scale (R gets no gradient, the adapter never trains);
        # a negative std fails only inside normal_() at injection
        if not (isinstance(self.alpha, numbers.Real) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0 (s = alpha / r), got {self.alpha!r}")
        if not self.core_std >= 0:
            raise ValueError(f"core_std must be >= 0, got {self.core_std!r}")
        self.svd_niter = whole_number(self.svd_niter, "svd_niter", 0)
        self.svd_seed = whole_number(self.svd_seed, "svd_seed")


@torch.no_grad()
def init_lora_xs(w0: torch.Tensor, r: int, svd: str = "exact", niter: int = 10, seed: int = 42):
    """LoRA-XS frozen factors of ``w0`` (out, in): ``(A = Σ_r V_rᵀ (r, in), B = U_r (out, r))``, fp32.

    ``B A`` is the best rank-r approximation of W0 (Eckart–Young; exact with ``svd="exact"``).
    """
    U, S, V = truncated_svd(w0, r, svd, niter, seed)
    return S.unsqueeze(1) * V.t(), U


@register("lora_xs")
class LoRAXS(Method):
    """LoRA-XS: frozen SVD factors of W0, trainable r×r core."""

    Config = LoRAXSConfig
    supported_types = (nn.Linear,)

    def make_layer(self, base: nn.Module, name: str) -> CoreLoRALinear:
        c: LoRAXSConfig = self.config  # type: ignore[assignment]
        layer = CoreLoRALinear(base, c.r, c.alpha / c.r, ("lora_core",), c.dropout, adapter_torch_dtype(c.adapter_dtype))
        if layer.base_weight.is_meta:
            return layer
        A, B = init_lora_xs(layer.base_weight, c.r, c.svd, c.svd_niter, c.svd_seed)
        R = torch.zeros(c.r, c.r)
        if c.core_init == "gaussian":
            R.normal_(0.0, c.core_std)
        layer.set_factors(A, R, B)
        return layer


# ---- LoRA-SB ---------------------------------------------------------------------------------
@dataclass
class LoRASBConfig(AdapterConfig):
    """LoRA-SB options.

    Attributes:
        r: rank (R is r×r).
        alpha: ignored (s = 1 always; a value other than None / r warns).
        dropout: dropout on the adapter input (commonsense recipe: 0.05).
        n_init_batches: training batches of the gradient estimate (code: 50 samples / batch 3 on
            MetaMathQA, 170 / 10 on Commonsense170K, 2 on GLUE).
        init_lr: η of ``η₁ = η / (warmup_ratio · T)``; None = the optimizer's (initial) lr at fit start.
        warmup_ratio: linear warmup fraction (0.02 in the LLM recipes); 0 means ``η₁ = η``.
        total_steps: T; None = from the trainer (see ``t_unit``).
        t_unit: ``"batches"`` (T in dataloader batches, the code) or ``"steps"`` (optimizer steps).
        svd, svd_niter, svd_seed: SVD of ΔW̃ (``torch.svd_lowrank(q=r, niter=10)`` in the code).
        adapter_dtype: dtype of R and of the stored factors.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    n_init_batches: int = 8
    init_lr: float | None = None
    warmup_ratio: float = 0.02
    total_steps: int | None = None
    t_unit: str = "batches"
    svd: str = "lowrank"
    svd_niter: int = 10
    svd_seed: int = 42
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.r = whole_number(self.r, "rank r", 1)
        if self.alpha is not None and float(self.alpha) != float(self.r):
            warnings.warn(f"LoRA-SB fixes the scale s = 1 (alpha = r); alpha={self.alpha} is ignored", stacklevel=4)
        self.n_init_batches = whole_number(self.n_init_batches, "n_init_batches", 1)
        if self.t_unit not in ("batches", "steps"):
            raise ValueError(f"t_unit must be 'batches' or 'steps', got {self.t_unit!r}")
        if self.svd not in ("lowrank", "exact"):
            raise ValueError(f"svd must be 'lowrank' or 'exact', got {self.svd!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        # η₁ = η / (warmup_ratio · T): a negative η or T flips the sign of ΔW̃ = −η₁ sign(G) (the
        # factors then point up the gradient) and η = 0 makes ΔW̃ = 0 (arbitrary SVD factors), silently
        if self.init_lr is not None and not (math.isfinite(self.init_lr) and self.init_lr > 0):
            raise ValueError(f"init_lr must be None or a finite number > 0, got {self.init_lr!r}")
        self.total_steps = whole_number(self.total_steps, "total_steps", 1, optional=True)
        self.svd_niter = whole_number(self.svd_niter, "svd_niter", 0)
        self.svd_seed = whole_number(self.svd_seed, "svd_seed")


class LoRASBLinear(CoreLoRALinear):
    """LoRA-SB layer: s = 1, frozen B, A; trainable R; ``lora_sb_initialized`` saved flag."""

    def __init__(self, base_layer: nn.Module, config: LoRASBConfig) -> None:
        super().__init__(base_layer, config.r, 1.0, ("lora_core",), config.dropout, adapter_torch_dtype(config.adapter_dtype))
        self.register_buffer("lora_sb_initialized", torch.zeros((), dtype=torch.bool, device=self.lora_A.device))
        self.adapter_buffer_names = (*self.adapter_buffer_names, "lora_sb_initialized")
        if not self.lora_A.is_meta:  # placeholder until the gradient init: orthonormal, R = 0
            eye_a = torch.eye(config.r, self.in_features)
            eye_b = torch.eye(self.out_features, config.r)
            self.set_factors(eye_a, torch.zeros(config.r, config.r), eye_b)


def _batch_size(batch: Any) -> int:
    """|b| of ``L_b / |b|``: the first dimension of the batch's first tensor leaf with one (depth
    first through mappings, lists and tuples), else the length of its first list / tuple of
    non-tensors (a list of strings), else 1. A dict whose first value is a list of strings is sized
    by its tensors, not taken as one sample."""
    found = _first_tensor_rows(batch)
    if found is not None:
        return found
    found = _first_list_length(batch)
    return 1 if found is None else found


def _children(batch: Any) -> Iterable[Any] | None:
    if isinstance(batch, Mapping):  # also transformers' BatchEncoding, a UserDict, not a dict
        return batch.values()
    if isinstance(batch, (list, tuple)):
        return batch
    return None


def _first_tensor_rows(batch: Any) -> int | None:
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() else None  # a 0-dim leaf has no batch dimension
    for child in _children(batch) or ():
        found = _first_tensor_rows(child)
        if found is not None:
            return found
    return None


def _first_list_length(batch: Any) -> int | None:
    children = _children(batch)
    if children is None:
        return None
    if isinstance(batch, (list, tuple)) and batch and all(_children(c) is None for c in batch):
        return len(batch)  # a list of plain values (strings, numbers): one per sample
    for child in children:
        found = _first_list_length(child)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def _full_weight_grads(model: nn.Module, layers: dict[str, AdapterLayer]):
    """Inside: adapters disabled (the model is W0), every parameter frozen except the base weights
    of ``layers``, whose gradients a post-accumulate hook adds into fp32 accumulators (one per weight
    tensor, in its stored layout) and then frees. Yields ``(acc, by_layer)``: ``acc`` maps ``id(w)`` to
    its accumulator, ``by_layer`` maps a layer name to ``(id(w), fan_in_fan_out)``. A weight tied
    across layers has one hook and one accumulator: its gradient is that of the full (shared) weight,
    all uses summed, and each layer sharing it reads it (a second hook would find ``grad`` freed).
    Restores flags, modes and adapters on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    states = {name: (layer.disabled, layer.training) for name, layer in layers.items()}
    was_training = model.training
    acc: dict[int, torch.Tensor] = {}
    by_layer: dict[str, tuple[int, bool]] = {}
    handles = []
    for p in model.parameters():
        p.requires_grad_(False)

    def hook(p: torch.Tensor) -> None:
        acc[id(p)].add_(p.grad)
        p.grad = None

    for name, layer in layers.items():
        w = layer.base_layer.weight
        by_layer[name] = (id(w), bool(layer.fan_in_fan_out))
        layer.disabled = True
        if id(w) in acc:
            continue
        acc[id(w)] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        w.requires_grad_(True)
        handles.append(w.register_post_accumulate_grad_hook(hook))
    model.train()  # the official estimate runs in train mode
    try:
        yield acc, by_layer
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            if not f:
                p.grad = None
        for name, layer in layers.items():
            layer.disabled = states[name][0]
        model.train(was_training)
        for name, layer in layers.items():
            layer.train(states[name][1])


def estimate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    n_batches: int,
    layers: dict[str, AdapterLayer] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``G = Σ_b ∇_W (L_b / |b|)`` at W0 for every adapted layer (§12 step 1), fp32 (out, in).

    ``loss_fn(model, batch)`` returns the batch loss; ``reduce`` (e.g. a DDP all-reduce sum) is
    applied to each G so every rank gets the same factors.
    """
    layers = adapter_layers(model) if layers is None else layers
    seen = 0
    with _full_weight_grads(model, layers) as (acc, by_layer):
        for batch in batches:
            if seen >= n_batches:
                break
            loss = loss_fn(model, batch)
            (loss / _batch_size(batch)).backward()
            seen += 1
    if seen == 0:
        raise ValueError("LoRA-SB init: no batch to estimate the gradient from")
    if seen < n_batches:  # a short loader silently gave an estimate from fewer batches than asked for
        warnings.warn(f"LoRA-SB init: the data had {seen} batch(es), fewer than the {n_batches} asked for "
                      "(n_init_batches); the gradient is estimated from those", stacklevel=3)
    if reduce is not None:  # once per weight: a tied weight's sum must not be reduced twice
        acc = {k: reduce(v) for k, v in acc.items()}
    return {name: acc[key].t() if fifo else acc[key] for name, (key, fifo) in by_layer.items()}


@torch.no_grad()
def lora_sb_factors(grad: torch.Tensor, r: int, lr1: float, svd: str = "lowrank", niter: int = 10, seed: int = 42):
    """§12 steps 2-4: ``ΔW̃ = −η₁ sign(G)`` ≈ ``U_r S_r V_rᵀ``; returns ``(A = V_rᵀ, R = diag(S_r), B = U_r)``."""
    dw = -lr1 * torch.sign(grad.float())
    U, S, V = truncated_svd(dw, r, svd, niter, seed)
    return V.t().contiguous(), torch.diag(S), U.contiguous()


def init_lora_sb(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    lr: float = 1e-4,
    warmup_ratio: float | None = None,
    total_steps: int | None = None,
    n_batches: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    config: "LoRASBConfig | None" = None,
) -> dict[str, torch.Tensor]:
    """Plain-PyTorch LoRA-SB initialisation of every LoRA-SB layer of ``model`` (after ``inject_adapter``).

    Args:
        batches: iterable of training batches; the first ``n_batches`` (config ``n_init_batches``)
            are used.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (batch mean, as in training).
        lr: η, the peak learning rate of the run; ``η₁ = η / (warmup_ratio · total_steps)`` when
            both are given and positive (config defaults for warmup_ratio / total_steps), else η.
        reduce: applied to each summed G (DDP: an all-reduce sum) so all ranks agree.
        config: SVD options and defaults; None = the config injected into ``model``.
    Returns:
        the estimated gradients G by layer name (fp32, (out, in)).
    """
    layers = {n: l for n, l in adapter_layers(model).items() if isinstance(l, LoRASBLinear)}
    if not layers:
        raise ValueError("model has no LoRA-SB layer; inject_adapter(model, 'lora_sb', ...) first")
    if config is None:
        method = get_adapter_method(model)
        config = method.config if isinstance(method, LoRASB) else LoRASBConfig()  # type: ignore[assignment]
    cfg: LoRASBConfig = config  # type: ignore[assignment]
    warmup_ratio = cfg.warmup_ratio if warmup_ratio is None else warmup_ratio
    total_steps = cfg.total_steps if total_steps is None else total_steps
    # same checks as LoRASBConfig for the explicit arguments (and an optimizer lr read at fit start)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"LoRA-SB init: lr must be a finite number > 0, got {lr!r}")
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"LoRA-SB init: total_steps must be >= 1, got {total_steps!r}")
    # as LoRASBConfig's warmup_ratio: a negative one flipped the sign of η₁ (factors pointing up the
    # gradient) and NaN made ΔW̃ NaN, both silently
    if not 0.0 <= finite_number(warmup_ratio, "LoRA-SB init: warmup_ratio") < 1.0:
        raise ValueError(f"LoRA-SB init: warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    # n_batches=0 fell back to the config's count (``n_batches or ...``) and -1 read "no batch", silently
    n_batches = whole_number(n_batches, "LoRA-SB init: n_batches", 1, optional=True)
    lr1 = lr / (warmup_ratio * total_steps) if warmup_ratio and total_steps else lr
    grads = estimate_gradients(model, batches, loss_fn, n_batches or cfg.n_init_batches, layers, reduce)
    for name, layer in layers.items():
        A, R, B = lora_sb_factors(grads[name], layer.r, lr1, cfg.svd, cfg.svd_niter, cfg.svd_seed)
        layer.set_factors(A, R, B)
        layer.lora_sb_initialized.fill_(True)
    return grads


@register("lora_sb")
class LoRASB(Method):
    """LoRA-SB: gradient-estimate init in ``on_fit_start``; only R trains, s = 1."""

    Config = LoRASBConfig
    supported_types = (nn.Linear,)

    def __init__(self, config: LoRASBConfig) -> None:
        super().__init__(config)
        self.init_batches: Iterable[Any] | None = None
        self.init_loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None

    def make_layer(self, base: nn.Module, name: str) -> LoRASBLinear:
        return LoRASBLinear(base, self.config)  # type: ignore[arg-type]

    def set_init_data(self, batches: Iterable[Any] | None = None, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        """Use ``batches`` (instead of ``trainer.train_dataloader``) and/or ``loss_fn(pl_module, batch)``
        (instead of ``pl_module.training_step``) for the init in :meth:`on_fit_start`."""
        self.init_batches, self.init_loss_fn = batches, loss_fn

    def on_fit_start(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        sb = {n: l for n, l in layers.items() if isinstance(l, LoRASBLinear)}
        if not sb or trainer.ckpt_path is not None or all(bool(l.lora_sb_initialized) for l in sb.values()):
            return  # resumed, or already initialised (e.g. a loaded adapter): keep the factors
        c: LoRASBConfig = self.config  # type: ignore[assignment]
        batches = self.init_batches
        if batches is None:
            trainer.fit_loop.setup_data()  # the train loader is otherwise built after on_fit_start
            batches = trainer.train_dataloader
        lr = c.init_lr
        if lr is None:
            group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
            lr = group.get("initial_lr", group.get("lr"))
            if lr is None:
                raise ValueError("LoRA-SB: set init_lr, no optimizer lr to read it from")
        total = c.total_steps
        if total is None:
            total = trainer.estimated_stepping_batches
            if c.t_unit == "batches":
                total = total * trainer.accumulate_grad_batches
            if c.warmup_ratio and not math.isfinite(total):
                # an unsized train loader with max_steps=-1: int(inf) would raise an OverflowError
                raise ValueError("LoRA-SB: the trainer's step count is unknown (unsized loader, no max_steps); "
                                 "set total_steps (or warmup_ratio=0) for η₁ = η / (warmup_ratio · T)")
        loss_fn = self.init_loss_fn or _training_step_loss
        strategy = trainer.strategy

        def reduce(t: torch.Tensor) -> torch.Tensor:
            return strategy.reduce(t, reduce_op="sum") if trainer.world_size > 1 else t

        def step_batches():
            for i, batch in enumerate(batches):
                yield strategy.batch_to_device(batch) if self.init_batches is None else batch

        with _no_logging(pl_module):
            init_lora_sb(pl_module, step_batches(), loss_fn, lr, c.warmup_ratio,
                         int(total) if math.isfinite(total) else None, c.n_init_batches, reduce, c)


def _training_step_loss(pl_module: nn.Module, batch: Any) -> torch.Tensor:
    out = pl_module.training_step(batch, 0)  # type: ignore[operator]
    return out["loss"] if isinstance(out, dict) else out


@contextlib.contextmanager
def _no_logging(pl_module: nn.Module):
    """``self.log`` is not allowed in ``on_fit_start``: silence it while training_step runs there."""
    if not hasattr(pl_module, "log"):
        yield
        return
    object.__setattr__(pl_module, "log", lambda *a, **k: None)
    object.__setattr__(pl_module, "log_dict", lambda *a, **k: None)
    try:
        yield
    finally:
        object.__delattr__(pl_module, "log")
        object.__delattr__(pl_module, "log_dict")
