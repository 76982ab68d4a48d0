"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024).

``y = W0 x + b + s · B A dropout(x)`` with ``A ∈ R^{r×n}``, ``B ∈ R^{m×r}``, ``s = α/r``
(rsLoRA: ``α/√r``). B starts at zero, so the adapted model equals the base model at init.

DoRA (``use_dora=True``): ``W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖_row`` with a trainable magnitude
``m`` (one entry per output row) initialised to ``‖W0‖_row``. With the norm detached (the default)
it runs the fused LoRA function below and rescales its output per row
(:meth:`LoRALinear._dora_rescale`). A row with ``‖W0 + sBA‖_row = 0`` (an all-zero row of W0, a
pruned unit, at init: ``m = 0`` too) takes the scale ``m/ν := 1``, so it runs as the base instead of
``0/0`` (:func:`~lightning_lora.core.dora.safe_mag_scale`).

Speed: the plain LoRA path is one autograd function (:class:`_FusedLoRA`) that

- adds the adapter term inside the base matmul's epilogue (``addmm`` with beta = 1) instead of a
  separate add kernel that re-reads the whole activation,
- runs adapter matmuls in the activation dtype (bf16 under bf16 training) while the adapter
  parameters, and so the optimizer state, stay in fp32,
- casts fp32 adapter parameters to the activation dtype once per optimizer step, for all layers
  whose parameters changed in one multi-tensor copy (``torch._foreach_copy_``: one kernel on CUDA
  where one cast per A and per B were launched before), right after ``optimizer.step()`` (a global
  step post-hook), where its host time overlaps the step's GPU work instead of delaying the next
  forward's launches,
- applies the scale ``s`` as the GEMM ``alpha`` of the two rank-r products (``s·x A^T`` forward,
  ``s·g B`` backward), so no kernel scales a tensor and no scaled copy of A is held,
- saves only ``x`` (shared with the caller), the small ``s·x A^T`` and the weights for backward;
  and not even ``x`` where the graph already keeps what it is made of (an MLP's ``act(gate) * up``,
  a BERT MLP's ``gelu(h)``; with ``replay_inputs="all"`` also an RMSNorm's scaled input): the
  elementwise ops are replayed in backward, bit for bit (:func:`_input_recipe`), which saves the
  one activation per adapted input that LoRA adds to a frozen model's graph (PEFT keeps it),
- runs the adapters of sibling layers that read the same input (q, k, v; gate, up) together
  (:class:`_SiblingGroup`, :class:`_FusedLoRASiblings`): one GEMM ``x [A_q; A_k; A_v]^T`` forward,
  one ``[gB_q, gB_k, gB_v]^T x`` for the A gradients and a single ``grad_x`` buffer that every
  sibling's base and adapter term accumulate into (no per-sibling ``grad_x`` and no autograd sum of
  them). Which layers share an input is learned from the first forward pass.

Its output and gradients equal the plain formula (tested against :meth:`LoRALinear.reference_forward`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..core import _lora_cpp, replay_kernels
from ..core.config import adapter_torch_dtype, AdapterConfig, finite_number, Method, register, whole_number
from ..core.dora import DoRAMerge
from ..core.layer import AdapterLayer, accumulate_dtype, autocast_available, no_autocast
from ..core.rounding import merged_weight, merged_weights
from .lora_modules import (MODULE_TYPES, LoRAConv, LoRAConvTranspose, LoRAEmbedding, LoRAParameters, TiedLoRALinear,
                           make_module_layer)


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA options.

    Attributes:
        r: rank.
        alpha: scale numerator; ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout on the adapter branch input only (train mode only).
        use_rslora: rank-stabilised scaling.
        init: ``"kaiming"`` (Kaiming-uniform A, a = √5; official code and PEFT default) or
            ``"gaussian"`` (A ~ N(0, 1/r²) as PEFT's ``init_lora_weights="gaussian"``; the paper's form).
        use_dora: weight-decomposed LoRA.
        dora_detach_norm: DoRA's ``‖W0 + sBA‖_row`` treated as a constant in backward (paper §4.3,
            official default); ``False`` back-propagates through it.
        fused: use the fused autograd path (LoRA, and DoRA with ``dora_detach_norm``, as the fused
            LoRA output rescaled per row: :meth:`LoRALinear._dora_rescale`; DoRA with a gradient
            through the norm takes the plain formula).
        fuse_siblings: with ``fused``, run the adapters of layers of one parent module that read the
            same input tensor (q/k/v, gate/up) in one autograd function (see :class:`_SiblingGroup`).
        adapter_dtype: dtype of the adapter parameters (fp32 keeps optimizer state in fp32).
        replay_inputs: with ``fused``, which adapter inputs are rebuilt in backward from tensors
            the graph keeps anyway instead of being saved (:func:`_input_recipe`; same bits either way):
            ``"products"`` (default) an out-of-place product or activation of saved tensors in the
            activation dtype (an MLP's ``act(gate) * up``, BERT's ``gelu(h)``): one elementwise kernel
            per rebuilt input; ``"all"`` also chains with dtype casts (a LLaMA RMSNorm's
            ``w * (h * rsqrt(var)).to(bf16)``: three kernels, two over fp32 tensors); ``"none"`` saves
            every input as PEFT does. On the H200 (session 7, LLaMA 1.1B, ``lora_vs_peft.py``)
            ``"all"`` held 3.2 GiB less than ``"none"`` for 6.4 ms more per step (+4.6 %).
            ``True`` / ``False`` mean ``"all"`` / ``"none"``.
        merged_training: in train mode, run each layer as a frozen layer runs, through the adapted
            weight ``W' = W + s·B A``: one GEMM forward and one for the input gradient instead of
            the fused path's extra rank-r output pass and accumulating GEMMs. ``W'`` is formed once per
            optimizer step (kept until A, B or W change: one more copy of the adapted weights in
            memory) in the activation dtype; in bf16 it is rounded stochastically, so that
            ``E[W'] = W + s·B A`` and small deltas are not lost (:mod:`lightning_lora.core.rounding`).
            A and B get the exact gradients of that forward. Eval mode takes the exact fused path.
            Plain LoRA only (no dropout, no DoRA); fp16 activations fall back to the fused path
            (with a warning). Off by default: it trades the bf16 forward's rounding (unbiased, one
            bf16 ulp of ``W'`` at most per element) for speed; measured in docs/benchmarks.md.
        ensure_weight_tying: (the ``lora`` method only) where an adapted ``nn.Embedding``'s table is also another module's weight
            (a language model's tied output head: GPT-2, SmolLM2), adapt that module with the same
            factors (:class:`~lightning_lora.methods.lora_modules.TiedLoRALinear`), so the head
            computes with ``E + ΔE`` as the lookup does and merging (once, into the shared table) is
            exact. Off: the head keeps the frozen table and merging is refused. PEFT's option of the
            same name (peft 0.21.2 with transformers 5 does not tie the head: docs/architecture.md).
        target_parameters: (the ``lora`` method only) bare parameters to adapt, as ``"<module>.<parameter>"`` names matched as
            module names are (the full name, or any ending after a dot): the fused expert weights of
            transformers 5's mixture-of-experts layers, ``["experts.gate_up_proj", "experts.down_proj"]``
            (:class:`~lightning_lora.methods.lora_modules.LoRAParameters`; PEFT's option of the same
            name and format). Alone, pass ``target_modules=[]`` (``None`` means every linear layer).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    use_dora: bool = False
    dora_detach_norm: bool = True
    fused: bool = True
    fuse_siblings: bool = True
    adapter_dtype: str = "float32"
    replay_inputs: str = "products"
    merged_training: bool = False
    ensure_weight_tying: bool = False
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self) is not LoRAConfig and (self.ensure_weight_tying or self.target_parameters):
            # the methods built on LoRA's config (FFA-LoRA, Flexora, GradNormLoRP) adapt linear layers only
            raise ValueError(f"ensure_weight_tying and target_parameters are options of the 'lora' method, not of "
                             f"{self.method!r}")
        if isinstance(self.target_parameters, str):
            self.target_parameters = [self.target_parameters]
        if self.target_parameters is not None:
            self.target_parameters = list(self.target_parameters)
            if not all(isinstance(t, str) and "." in t for t in self.target_parameters):
                raise ValueError(f"target_parameters must be '<module>.<parameter>' names, got {self.target_parameters!r}")
        if self.ensure_weight_tying and self.use_dora:
            raise ValueError("ensure_weight_tying does not support DoRA: the embedding's magnitude is per embedding "
                             "dimension, a tied head's would be per output row")
        if self.merged_training:
            if self.dropout > 0:
                raise ValueError("merged_training needs dropout = 0: with dropout the adapter reads another "
                                 f"input than the base weight, so the two cannot share one GEMM (dropout={self.dropout})")
            if self.use_dora:
                raise ValueError("merged_training does not support DoRA (use_dora=True)")
            if not self.fused:
                raise ValueError("merged_training needs fused=True (it is a form of the fused path)")
        self.r = whole_number(self.r, "LoRA rank r")
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        # a None or string alpha failed only at injection, as a TypeError inside the scale s = alpha / r
        self.alpha = finite_number(self.alpha, "LoRA alpha (s = alpha / r)")
        if isinstance(self.replay_inputs, bool):  # the session-6 switch (and configs saved with it)
            self.replay_inputs = "all" if self.replay_inputs else "none"
        if self.replay_inputs not in REPLAY_MODES:
            raise ValueError(f"replay_inputs must be one of {', '.join(REPLAY_MODES)} (or a bool), "
                             f"got {self.replay_inputs!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


#: ``LoRAConfig.replay_inputs`` values: nothing, cast-free recipes, every recipe
REPLAY_MODES = ("none", "products", "all")

_MM_OUT_DTYPE: dict[str, bool] = {}  # whether torch.mm(..., out_dtype=) works, per device type

#: the C++ autograd functions (:mod:`lightning_lora.core._lora_cpp`): ``_lora_cpp.AUTO`` (the default:
#: built in the background at the first fused training forward on a CUDA input where a compiler exists), None
#: (off, ``LIGHTNING_LORA_CPP=0``), True (``LIGHTNING_LORA_CPP=1``: built at the first fused forward,
#: waiting for it) or the compiled module
_CPP: Any = _lora_cpp.mode_from_env()
_AUTO = _lora_cpp.AUTO


#: 0-dim placeholders for ``_mm_scaled``'s unused ``addmm`` input, per (dtype, device): ``beta = 0``
#: never reads or writes it, so one tensor serves every call (no allocation per GEMM)
_PLACEHOLDERS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_is_compiling = torch.compiler.is_compiling
#: ``torch.jit.is_tracing()`` without its Python wrapper (asked per layer per forward: host time)
_is_tracing = torch._C._is_tracing


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling · (a @ b)`` in one GEMM (``alpha`` of ``addmm``; ``beta = 0`` ignores the unused input,
    which is a shared 0-dim placeholder that is never expanded, copied or written)."""
    if scaling == 1.0:
        return torch.mm(a, b)
    if _is_compiling():  # no tensor made while tracing goes into a cache
        return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scaling)
    key = (a.dtype, a.device)
    z = _PLACEHOLDERS.get(key)
    if z is None:
        with torch.no_grad():
            z = _PLACEHOLDERS[key] = a.new_empty(())
    return torch.addmm(z, a, b, beta=0, alpha=scaling)


def _mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` returned in ``dtype``: bf16/fp16 inputs accumulate straight into an fp32 result
    where the backend supports ``out_dtype`` (no separate cast kernel); otherwise a plain mm."""
    if dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE.get(a.device.type, True):
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[a.device.type] = False
    return torch.mm(a, b)


#: at most this many autograd nodes (products, casts) are replayed to rebuild one LoRA input
_RECIPE_MAX_NODES = 4
#: the autograd nodes :func:`_recipe` follows (a recipe starts at one of them)
_RECIPE_NODES = frozenset(("MulBackward0", "GeluBackward0", "SiluBackward0", "ToCopyBackward0"))


def _saved_tensor_hooks_active() -> bool:
    """Whether ``torch.autograd.graph.saved_tensors_hooks`` are active (checkpointing, offloading);
    True where torch does not say (a private API: assume the careful case)."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, RuntimeError, TypeError):
        return True


def _input_recipe(x: torch.Tensor, casts: bool = True) -> tuple[Any, ...] | None:
    """How to recompute ``x`` in backward from tensors the autograd graph keeps anyway, or None.

    The adapter's backward needs its input (``grad_A = g_s^T x``), and a frozen base layer would
    not keep it: so the LoRA input is the one activation LoRA adds per layer. Often the graph
    already holds what ``x`` is made of: the input of an MLP's down projection is ``act(gate) * up``,
    and that product's node saves both factors for its own backward; a LLaMA RMSNorm output is
    ``w * (h * rsqrt(var)).to(bf16)``, whose inner product saves ``h`` and ``rsqrt(var)`` and the outer
    one ``w``. Then saving ``x`` again costs a full activation per layer while replaying the (one to
    three) elementwise ops in backward costs one pass over it.

    The recipe follows ``x.grad_fn`` through out-of-place ``mul`` (``MulBackward0``), dtype/device
    casts (``ToCopyBackward0``) and GELU / SiLU (whose nodes save their input: a BERT MLP's output
    projection reads ``gelu(h)``) only, at most ``_RECIPE_MAX_NODES`` nodes, down to tensors those
    nodes save (read in backward, with autograd's own version check). Elementwise ops give the same bits
    when replayed on the same inputs, so outputs and gradients are unchanged. Anything else (a view,
    an in-place result, a leaf, other ops, tracing, compiling, saved-tensor hooks active as under
    ``torch.utils.checkpoint``): None, and ``x`` is saved as before. ``casts=False`` refuses dtype
    casts too (``replay_inputs="products"``): a cast chain such as an RMSNorm's replays over fp32
    tensors, several passes for the one activation it saves.
    """
    if type(x) is not torch.Tensor:
        return None
    node = x.grad_fn
    # most inputs (a LayerNorm's output, a view, a leaf) cannot start a recipe: rejected by the node's
    # type before the other checks (host time: asked per layer per forward)
    if node is None or type(node).__name__ not in _RECIPE_NODES:
        return None
    if x._base is not None or x._version != 0 or _is_compiling() or _is_tracing():
        return None
    if _saved_tensor_hooks_active():
        # saved-tensor hooks (activation checkpointing, offloading) own how saved tensors come
        # back, and may allow one unpack only (torch.utils.checkpoint): save x through them
        return None
    try:
        budget = [_RECIPE_MAX_NODES]
        return _recipe(node, budget, casts)
    except (AttributeError, RuntimeError, IndexError, TypeError):  # a node type that lacks what we read
        return None


def _packed_by_hook(raw: Any) -> bool:
    """Whether a node's saved tensor went through a saved-tensor hook (its producer ran under
    ``torch.utils.checkpoint`` or offloading while the adapted layer did not). Such a tensor is not
    replayed from: its owner's backward unpacks it, and a non-reentrant checkpoint refuses a second
    unpack (``CheckpointError``: a model checkpointing an MLP's up projection but not its down one
    failed in backward). Torch versions without ``unpack_hook`` say nothing: False."""
    return getattr(raw, "unpack_hook", None) is not None


def _recipe(node: Any, budget: list[int], casts: bool) -> tuple[Any, ...] | None:
    budget[0] -= 1
    if budget[0] < 0:
        return None
    name = type(node).__name__
    if name == "MulBackward0":
        parts: list[tuple[Any, ...]] = []
        for i, attr in enumerate(("_saved_self", "_saved_other")):
            raw = getattr(node, "_raw" + attr)
            if _packed_by_hook(raw):
                return None
            if raw.data is not None:  # saved as is
                parts.append(("saved", node, attr))
                continue
            nxt, _ = node.next_functions[i]
            sub = None if nxt is None else _recipe(nxt, budget, casts)
            if sub is None:
                return None
            parts.append(sub)
        return ("mul", parts[0], parts[1])
    if name in ("GeluBackward0", "SiluBackward0"):  # an activation's node saves its input
        if node._raw_saved_self.data is None or _packed_by_hook(node._raw_saved_self):
            return None
        approximate = node._saved_approximate if name == "GeluBackward0" else None
        return ("act", ("saved", node, "_saved_self"), approximate)
    if name == "ToCopyBackward0":
        if not casts:
            return None
        meta = node._input_metadata[0]  # the forward output's dtype and device
        if meta.is_nested_tensor or meta.is_cpp_nested_tensor:
            return None
        nxt, _ = node.next_functions[0]
        sub = None if nxt is None else _recipe(nxt, budget, casts)
        return None if sub is None else ("to", sub, meta.dtype, meta.device)
    return None


def _replay(recipe: tuple[Any, ...]) -> torch.Tensor:
    """The tensor a :func:`_input_recipe` recipe describes (bit for bit what the forward computed)."""
    kind = recipe[0]
    if kind == "saved":
        t = getattr(recipe[1], recipe[2])
        if t is None:
            raise RuntimeError("LoRA: a tensor its input is recomputed from was freed (its graph already ran backward)")
        return t
    if kind == "mul":
        return torch.mul(_replay(recipe[1]), _replay(recipe[2]))
    if kind == "act":
        h = _replay(recipe[1])
        return F.silu(h) if recipe[2] is None else F.gelu(h, approximate=recipe[2])
    return _replay(recipe[1]).to(device=recipe[3], dtype=recipe[2])


def _saved_input(x: torch.Tensor, recipe: tuple[Any, ...] | None, shape: torch.Size) -> torch.Tensor:
    """The saved input ``x`` (N, n), or the input replayed from ``recipe`` and viewed as (N, n)."""
    if recipe is None:
        return x
    full = _replay(recipe)
    if full.shape != shape:
        raise RuntimeError(f"LoRA: the replayed input has shape {tuple(full.shape)}, expected {tuple(shape)}")
    return full.reshape(-1, shape[-1])


def _grad_a(gb_s: torch.Tensor, x: torch.Tensor | None, replay: tuple[Any, ...] | None,
            dtype: torch.dtype) -> torch.Tensor:
    """``gb_s^T x`` (r, n) in ``dtype``: A's gradient from ``gb_s`` (N, r) and the saved input ``x`` (N, n),
    or the input ``replay`` = (recipe, shape) rebuilds, either in torch ops or, where
    :mod:`lightning_lora.core.replay_kernels` is on and takes the recipe, tile by tile in one kernel."""
    if replay is None:
        return _mm_to(gb_s.t(), x, dtype)  # type: ignore[arg-type]
    if replay_kernels.supported(replay[0], gb_s):
        grad = replay_kernels.act_grad_a(gb_s, replay[0], replay[1], dtype)
        if grad is not None:
            return grad
    return _mm_to(gb_s.t(), _saved_input(x, *replay), dtype)  # type: ignore[arg-type]


def _raise_modified(t: torch.Tensor, expected: int, what: str) -> None:
    """Raise autograd's error for a tensor written in place between forward and backward."""
    raise RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace operation: "
        f"[{t.type()} {list(t.shape)}], {what}, is at version {t._version}; expected version {expected} "
        "instead. Hint: enable anomaly detection to find the operation that failed to compute its gradient, "
        "with torch.autograd.set_detect_anomaly(True)."
    )


def _stash_frozen_weight(ctx: Any, w: torch.Tensor | None) -> None:
    """Keep the frozen base weight ``w`` (None: backward does not need it) on ``ctx`` with its version.

    ``w`` stays off ``save_for_backward`` (saved-tensor hooks, e.g. offloading, would pack the whole
    weight at every call), so autograd does not check it: :func:`_frozen_weight` compares the version
    in backward instead, so that an in-place write to the base weight before backward raises as it
    does for ``nn.Linear`` instead of giving silently wrong input gradients."""
    ctx.w = w
    ctx.w_version = None if w is None else _version(w)  # an inference tensor has none: not checked


def _frozen_weight(ctx: Any, what: str) -> torch.Tensor:
    """The weight :func:`_stash_frozen_weight` kept, after checking it was not written in place;
    ``what`` names it in the error."""
    w = ctx.w
    if ctx.w_version is not None and w._version != ctx.w_version:
        _raise_modified(w, ctx.w_version, what)
    return w


def _check_versions(ts: tuple[torch.Tensor, ...], versions: list[int | None]) -> None:
    """Raise as autograd does if one of ``ts`` (the stacked A casts, then the base weights of a fused
    sibling set) was written in place since ``versions`` were recorded (None: an inference tensor,
    which has no version counter, is not checked)."""
    for i, (t, v) in enumerate(zip(ts, versions)):
        if v is not None and t._version != v:
            what = "the stacked A casts of a fused LoRA sibling set" if i == 0 else (
                f"the base weight of member {i - 1} of a fused LoRA sibling set")
            _raise_modified(t, v, what)


class _FusedLoRA(torch.autograd.Function):
    """``out = x W^T + b + s (xd A^T) B^T`` with a hand-written backward.

    Shapes: ``x, xd`` (..., n), flattened to (N, n) inside (no autograd view nodes around the
    function); ``w`` the base weight as stored: (m, n), or (n, m) with ``fan_in_fan_out`` (Conv1D);
    ``A`` (r, n); ``B`` (m, r); ``out`` (..., m), a fresh tensor (not a view, so in-place ops on it
    are allowed). ``xd`` is the dropout-ed input (``x`` itself when dropout is off; then it is saved
    once). ``casts`` = ``(Ac, Bc)``: ``A`` and ``B`` in the activation dtype (the parameters themselves
    when they already are), cached between optimizer steps. The scale ``s`` rides in the GEMM
    ``alpha`` of the two rank-r products, so no kernel is spent on scaling:

    - forward:  ``xa_s = s·xd Ac^T``, ``out = xa_s Bc^T + b``, then ``out += x W^T`` inside the
      big matmul's epilogue (one pass over ``out``);
    - backward: ``gb_s = s·g Bc``, ``grad_x = gb_s Ac + g W``, ``grad_A = gb_s^T xd``,
      ``grad_B = g^T xa_s``; the parameter gradients accumulate in fp32 directly where the
      backend allows it.
    """

    @staticmethod
    def forward(ctx, x, xd, w, bias, A, B, casts, scaling, replay=None, fan_in_fan_out=False):  # type: ignore[override]
        Ac, Bc = casts
        shape = x.shape
        n = shape[-1]
        x2 = x.reshape(-1, n)
        same_input = xd is x
        xd2 = x2 if same_input else xd.reshape(-1, n)
        xa_s = _mm_scaled(xd2, Ac.t(), scaling)  # (N, r)
        m = Bc.shape[0]
        # a plain tuple: a torch.Size made by slicing costs more to build and to parse (host time)
        out = xa_s.new_empty((*shape[:-1], m))
        out2 = out.view(-1, m)
        if bias is not None:
            torch.addmm(bias, xa_s, Bc.t(), out=out2)
        else:
            torch.mm(xa_s, Bc.t(), out=out2)
        out2.addmm_(x2, w if fan_in_fan_out else w.t())
        ctx.same_input = same_input
        # replay = (recipe, shape of the unflattened input): x is replayed in backward, not saved
        # (see _input_recipe; without dropout only: a dropout-ed input has no recipe)
        ctx.replay = replay if same_input else None
        # xd is read by grad_A only (a frozen A, as FFA-LoRA's, needs none)
        keep_xd = ctx.needs_input_grad[4] and ctx.replay is None
        # A or B in the activation dtype is its own cast (a detached alias): saved through autograd,
        # so that an in-place update before backward (a non-fused optimizer step, a manual edit)
        # raises as it does for nn.Linear's weight instead of giving a silently wrong gradient. A
        # cast copy is a fresh tensor that nothing writes: no tracking needed
        ctx.save_for_backward(xd2 if keep_xd else None, xa_s,
                              Ac if Ac.dtype == A.dtype else None, Bc if Bc.dtype == B.dtype else None)
        ctx.Ac, ctx.Bc = Ac, Bc
        _stash_frozen_weight(ctx, w)
        ctx.scaling = scaling
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.shapes = (shape, xd.shape)
        ctx.dtypes = (A.dtype, B.dtype)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        # Why: the hand-written backward is not differentiable (it computes with
        # detached casts of A, B and with W): under create_graph=True (gradient penalties, double
        # backward) its results carried a partial graph and second-order gradients came out silently
        # wrong. Then it runs as @once_differentiable: a second backward through it raises. One grad-mode
        # test per call otherwise (the engine runs a plain backward with grad mode off)
        if torch.is_grad_enabled():
            return _once_differentiable_fused(ctx, g)
        return _FusedLoRA._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):  # type: ignore[no-untyped-def]
        xd, xa_s, _, _ = ctx.saved_tensors  # unpacking checks the aliases' versions
        need_x, need_xd, _, need_bias, need_A, need_B = ctx.needs_input_grad[:6]
        w = _frozen_weight(ctx, "the base weight of a fused LoRA layer")
        Bc = ctx.Bc
        g = g.reshape(-1, Bc.shape[0])  # what the view node around the output did
        gb_s = _mm_scaled(g, Bc, ctx.scaling)  # (N, r) = s·g B
        w_b = w.t() if ctx.fan_in_fan_out else w  # (m, n)
        grad_x = grad_xd = grad_bias = grad_A = grad_B = None
        if ctx.same_input:
            if need_x:
                grad_x = torch.mm(gb_s, ctx.Ac)
                grad_x.addmm_(g, w_b)
                grad_x = grad_x.view(ctx.shapes[0])
        else:
            if need_x:
                grad_x = torch.mm(g, w_b).view(ctx.shapes[0])
            if need_xd:
                grad_xd = torch.mm(gb_s, ctx.Ac).view(ctx.shapes[1])
        if need_A:
            grad_A = _grad_a(gb_s, xd, ctx.replay, ctx.dtypes[0])
        if need_B:
            grad_B = _mm_to(g.t(), xa_s, ctx.dtypes[1])
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_xd, None, grad_bias, grad_A, grad_B, None, None, None, None


class _FusedLoRASiblings(torch.autograd.Function):
    """``k`` LoRA layers that read the same input: ``out_i = x W_i^T + b_i + s (x A_i^T) B_i^T``.

    Shapes: ``x`` (..., n), flattened to (N, n) inside; ``a_cat`` = ``[A_1; ...; A_k]`` in the
    activation dtype, (R, n) with ``R = Σ r_i``; ``ws[i]`` the base weights as stored ((m_i, n), or
    (n, m_i) with ``fan_in_fan_out``); ``b_casts[i]`` = ``B_i`` in the activation dtype, (m_i, r_i);
    ``out_i`` (..., m_i), fresh tensors (not views). The parameters ``A_i``, ``B_i`` are inputs only
    so that they receive gradients (fp32 where they are fp32). All layers share one scale ``s``.

    - forward:  ``xa_s = s·x a_cat^T`` (N, R): one GEMM reads ``x`` once for all siblings; then per
      sibling ``out_i = xa_s[:, i] B_i^T + b_i`` and ``out_i += x W_i^T`` in the big GEMM's epilogue;
    - backward: ``gb^T`` (R, N) with rows ``s·B_i^T g_i^T``; ``grad_A = gb^T x`` (one GEMM, one read
      of ``x``); ``grad_x = gb a_cat`` then ``+= g_i W_i`` for every sibling, accumulated in one buffer;
      ``grad_B_i = g_i^T xa_s[:, i]``. A sibling whose output was not used (``g_i`` None) adds nothing.

    ``merged`` (``merged_training``): ``ws[i]`` are the adapted weights ``W'_i = W_i + s·B_i A_i``
    (see :class:`_MergedLoRA`), so ``out_i = x W'_i^T + b_i`` and ``grad_x = Σ g_i W'_i``, with no
    rank-r term; ``xa_s``, ``grad_A`` and ``grad_B`` as above.
    """

    @staticmethod
    def forward(ctx, x, a_cat, meta, *tensors):  # type: ignore[override]
        ranks, scaling, b_casts, replay, fifo, merged = meta
        k = len(ranks)
        ws, biases = tensors[:k], tensors[k:2 * k]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        lead = (*shape[:-1],)  # a plain tuple (see _FusedLoRA.forward)
        xa_s = _mm_scaled(x2, a_cat.t(), scaling)  # (N, R)
        outs = []
        bc_ts = []  # B_i^T (r_i, m_i): read again in backward
        for xa_i, w, bias, Bc, t in zip(xa_s.split_with_sizes(ranks, 1), ws, biases, b_casts, fifo):
            m = Bc.shape[0]
            out = xa_s.new_empty((*lead, m))
            out2 = out.view(-1, m)
            bc_t = Bc.t()
            if merged:  # W' carries the adapter: the frozen layer's one GEMM
                if bias is not None:
                    torch.addmm(bias, x2, w if t else w.t(), out=out2)
                else:
                    torch.mm(x2, w if t else w.t(), out=out2)
            else:
                if bias is not None:
                    torch.addmm(bias, xa_i, bc_t, out=out2)
                else:
                    torch.mm(xa_i, bc_t, out=out2)
                out2.addmm_(x2, w if t else w.t())
            outs.append(out)
            bc_ts.append(bc_t)
        # replay = (recipe, shape) (see _input_recipe): x is replayed in backward, not saved
        # a B in the activation dtype is its own cast: version-checked as in _FusedLoRA (a_cat is a
        # fresh buffer or concatenation, never an alias of the parameters)
        b_dtypes = [t.dtype for t in tensors[3 * k:]]
        ctx.save_for_backward(x2 if replay is None else None, xa_s,
                              *(Bc if Bc.dtype == dt else None for Bc, dt in zip(b_casts, b_dtypes)))
        ctx.set_materialize_grads(False)  # an unused sibling's gradient arrives as None, not zeros
        # (views of tensors ctx holds anyway: no memory beyond theirs)
        ctx.a_cat, ctx.meta, ctx.ws, ctx.bc_ts = a_cat, meta, ws, bc_ts
        # a_cat and the base weights stay off save_for_backward (see _FusedLoRA.forward): their
        # versions are checked in backward instead
        try:
            ctx.versions = [t._version for t in (a_cat, *ws)]
        except RuntimeError:  # an inference tensor has no version counter: nothing to check for it
            ctx.versions = [None if t.is_inference() else t._version for t in (a_cat, *ws)]
        ctx.shape = shape
        ctx.dtypes = [t.dtype for t in tensors[2 * k:]]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: see _FusedLoRA.backward
            return _once_differentiable_siblings(ctx, *gs)
        return _FusedLoRASiblings._backward(ctx, *gs)

    @staticmethod
    def _backward(ctx, *gs):  # type: ignore[no-untyped-def]
        x, xa_s = ctx.saved_tensors[:2]  # unpacking checks the B aliases' versions
        kept = (ctx.a_cat, *ctx.ws)
        try:  # one list compare when nothing was written (host time per call)
            same = [t._version for t in kept] == ctx.versions
        except RuntimeError:  # an inference tensor among them: compared one by one
            same = False
        if not same:
            _check_versions(kept, ctx.versions)
        ranks, scaling, b_casts, replay, fifo, merged = ctx.meta
        k = len(ranks)
        needs = ctx.needs_input_grad
        need_x, need_bias, need_A, need_B = needs[0], needs[3 + k:3 + 2 * k], needs[3 + 2 * k:3 + 3 * k], needs[3 + 3 * k:]
        # what the view nodes around the outputs did
        gs = [None if g is None else g.reshape(-1, Bc.shape[0]) for g, Bc in zip(gs, b_casts)]
        g_ts = [None if g is None else g.t() for g in gs]  # (m_i, N), read twice
        gb_t = xa_s.new_empty(sum(ranks), xa_s.shape[0])  # (R, N); rows i: (s·g_i B_i)^T
        for rows, g_t, bc_t in zip(gb_t.split_with_sizes(ranks), g_ts, ctx.bc_ts):
            if g_t is None:
                rows.zero_()
            elif scaling == 1.0:
                torch.mm(bc_t, g_t, out=rows)
            else:
                torch.addmm(rows, bc_t, g_t, beta=0, alpha=scaling, out=rows)
        grad_x = None
        if need_x:
            if merged:  # Σ g_i W'_i (zeros only where no sibling's output was used)
                for g, w, t in zip(gs, ctx.ws, fifo):
                    if g is not None:
                        w_b = w.t() if t else w
                        grad_x = torch.mm(g, w_b) if grad_x is None else grad_x.addmm_(g, w_b)
                if grad_x is None:
                    grad_x = xa_s.new_zeros((xa_s.shape[0], ctx.a_cat.shape[1]))
            else:
                grad_x = torch.mm(gb_t.t(), ctx.a_cat)
                for g, w, t in zip(gs, ctx.ws, fifo):
                    if g is not None:
                        grad_x.addmm_(g, w.t() if t else w)
            grad_x = grad_x.view(ctx.shape)
        grads_A: list[torch.Tensor | None] = [None] * k
        if any(need_A):
            grad_a_cat = _grad_a(gb_t.t(), x, replay, ctx.dtypes[0])  # (R, n)
            # a sibling whose output went unused gets None, as on its own path (an optimizer skips it)
            grads_A = [ga if g is not None else None for ga, g in zip(grad_a_cat.split_with_sizes(ranks), gs)]
        grads_B: list[torch.Tensor | None] = [None] * k
        grads_bias: list[torch.Tensor | None] = [None] * k
        for i, (xa_i, g, g_t) in enumerate(zip(xa_s.split_with_sizes(ranks, 1), gs, g_ts)):
            if g is not None and need_B[i]:
                grads_B[i] = _mm_to(g_t, xa_i, ctx.dtypes[k + i])
            if g is not None and need_bias[i]:
                grads_bias[i] = g.sum(0)
        return (grad_x, None, None, *([None] * k), *grads_bias, *grads_A, *grads_B)


#: ``Function.apply`` without its Python wrapper (signature binding for ``setup_context``, which these
#: functions do not define, and unwrapping functorch wrappers): the C++ entry it ends in, a few
#: microseconds less per call. Used when no functorch transform is active and nothing is compiling;
#: otherwise ``apply`` itself (see :func:`_plain_apply`).
_apply_fused = super(torch.autograd.Function, _FusedLoRA).apply  # type: ignore[misc]
#: the backward functions as ``@once_differentiable`` (run under ``create_graph=True`` only): results
#: that raise when differentiated again, instead of a graph that misses A, B and W
_once_differentiable_fused = once_differentiable(_FusedLoRA._backward)
_once_differentiable_siblings = once_differentiable(_FusedLoRASiblings._backward)
_apply_siblings = super(torch.autograd.Function, _FusedLoRASiblings).apply  # type: ignore[misc]


class _MergedLoRA(torch.autograd.Function):
    """``out = x W'^T + b`` with ``W' = W + s·B A`` formed beforehand (``merged_training``), and the
    gradients of A and B that this forward has.

    Shapes: ``x`` (..., n), flattened to (N, n) inside; ``w_merged`` as the base weight is stored,
    (m, n), or (n, m) with ``fan_in_fan_out``; ``A`` (r, n); ``B`` (m, r); ``out`` (..., m), a fresh
    tensor. ``casts`` = ``(Ac, Bc)``, A and B in the activation dtype (see :class:`_FusedLoRA`).

    - forward:  ``out = x W'^T + b`` (the frozen layer's one GEMM), ``xa_s = s·x Ac^T`` for ``grad_B``;
    - backward: ``grad_x = g W'`` (one GEMM), ``gb_s = s·g Bc``, ``grad_A = gb_s^T x``,
      ``grad_B = g^T xa_s`` (fp32 where the backend allows it), ``x`` replayed where it has a recipe.
    """

    @staticmethod
    def forward(ctx, x, w_merged, bias, A, B, casts, scaling, replay=None, fan_in_fan_out=False):  # type: ignore[override]
        Ac, Bc = casts
        shape = x.shape
        n = shape[-1]
        x2 = x.reshape(-1, n)
        w_t = w_merged if fan_in_fan_out else w_merged.t()  # (n, m)
        m = w_t.shape[1]
        out = x2.new_empty((*shape[:-1], m))
        if bias is not None:
            torch.addmm(bias, x2, w_t, out=out.view(-1, m))
        else:
            torch.mm(x2, w_t, out=out.view(-1, m))
        need_A, need_B = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        xa_s = _mm_scaled(x2, Ac.t(), scaling) if need_B else None  # (N, r)
        ctx.replay = replay
        ctx.save_for_backward(x2 if need_A and replay is None else None, xa_s,
                              Ac if Ac.dtype == A.dtype else None, Bc if Bc.dtype == B.dtype else None)
        # W' is this forward's own tensor (a new one is formed after the next optimizer step), so the
        # backward reads the weight the forward used whatever happens to W meanwhile
        ctx.w, ctx.Bc = w_merged, Bc
        ctx.scaling = scaling
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.shape = shape
        ctx.dtypes = (A.dtype, B.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        x2, xa_s, _, _ = ctx.saved_tensors  # unpacking checks the aliases' versions
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        w = ctx.w
        g2 = g.reshape(-1, w.shape[1] if ctx.fan_in_fan_out else w.shape[0])
        grad_x = grad_bias = grad_A = grad_B = None
        if need_x:
            grad_x = torch.mm(g2, w.t() if ctx.fan_in_fan_out else w).view(ctx.shape)
        if need_A:
            gb_s = _mm_scaled(g2, ctx.Bc, ctx.scaling)  # (N, r)
            grad_A = _grad_a(gb_s, x2, ctx.replay, ctx.dtypes[0])
        if need_B:
            grad_B = _mm_to(g2.t(), xa_s, ctx.dtypes[1])
        if need_bias:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None, None


#: the activation dtypes ``merged_training`` forms ``W'`` in (fp16: the fused path, warned once)
_MERGED_DTYPES = (torch.bfloat16, torch.float32)
_MERGED_DTYPE_WARNED: list[bool] = []


def _merged_dtype_ok(dtype: torch.dtype) -> bool:
    """Whether ``merged_training`` can form ``W'`` in ``dtype``; warns once where it cannot."""
    if dtype in _MERGED_DTYPES:
        return True
    if not _MERGED_DTYPE_WARNED:
        _MERGED_DTYPE_WARNED.append(True)
        warnings.warn(f"LoRA merged_training forms W + sBA in bf16 or fp32 only; {dtype} activations take "
                      "the fused path", stacklevel=4)
    return False


#: where the stochastic rounding of ``merged_training`` draws its seeds: the process's torch seed and
#: a count of merges, so that a run repeated with the same seed rounds the same way
_MERGE_COUNT = itertools.count()


def _merge_seed() -> int:
    """The next stochastic-rounding seed (see ``_MERGE_COUNT``)."""
    return (torch.initial_seed() * 1_000_003 + 65_537 * next(_MERGE_COUNT)) & 0x7FFF_FFFF


#: live ``merged_training`` layers: after an optimizer step the stale ones are merged together
_MERGED_LAYERS: weakref.WeakSet[LoRALinear] = weakref.WeakSet()


def _cast_key(layer: LoRALinear, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> tuple[Any, ...] | None:
    """What ``layer``'s cached casts of ``A`` and ``B`` in ``dtype`` depend on: the explicit
    invalidations (:func:`invalidate_cast_caches`), the steps of optimizers holding A or B (the
    layer's ``_step_epoch``: fused optimizers leave version counters alone), the parameters' versions
    (other in-place writes: init, loading) and storages; ``None`` (never cached) for inference tensors,
    which (made under torch.inference_mode) have no version counter."""
    if A.is_inference() or B.is_inference():
        return None
    return (_CAST_INVALIDATIONS, layer.__dict__.get("_step_epoch", 0), A._version, B._version, A.data_ptr(), B.data_ptr(),
            dtype)


def _casts_current(layer: LoRALinear, key: tuple[Any, ...] | None, A: torch.Tensor, B: torch.Tensor,
                   dtype: torch.dtype) -> bool:
    """Whether casts cached under ``key`` still hold for ``A``, ``B`` and ``dtype``: ``key ==
    _cast_key(layer, A, B, dtype)`` without building the tuple (checked per layer per forward). Storages
    are compared before versions: an inference tensor, which has no version counter, never sits in a
    storage a cached key was taken from."""
    return (key is not None and key[0] == _CAST_INVALIDATIONS and key[1] == layer.__dict__.get("_step_epoch", 0)
            and key[6] == dtype and key[4] == A.data_ptr() and key[5] == B.data_ptr() and key[2] == A._version
            and key[3] == B._version)


def _forward_ad_inactive() -> bool:
    """Whether no forward-mode AD level is open (the C++ path does not support one). torch keeps the
    level in a private attribute; where a torch release drops it, forward AD counts as active, so
    the C++ path stands down for the Python one instead of failing every forward with AttributeError."""
    return getattr(torch.autograd.forward_ad, "_current_level", 0) < 0


def _plain_apply() -> bool:
    """Whether ``Function.apply`` must take its full Python path (functorch transforms, compiling)."""
    return torch._C._are_functorch_transforms_active() or _is_compiling()


def _version(t: torch.Tensor) -> int | None:
    """The version counter, or None for inference tensors (which have none)."""
    return None if t.is_inference() else t._version


def _weight_bias(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The base layer's weight and bias, read from its parameter dict: every forward reads them, and
    ``nn.Module.__getattr__`` is a slow fallback lookup per access (host time on launch-bound steps)."""
    base = layer._modules.get("base_layer")
    if base is None:  # a named adapter's layer holds its shared base unregistered (core.multi)
        base = layer.base_layer
    params = base._parameters
    # a subclass may hold them elsewhere (a buffer, a property): then the ordinary lookup
    weight = params["weight"] if "weight" in params else base.weight
    bias = params["bias"] if "bias" in params else getattr(base, "bias", None)
    return weight, bias


def _plain_linear_base(layer: nn.Module) -> bool:
    """Whether ``layer``'s base computes ``x W^T + b`` as the fused functions do: a transformers
    ``Conv1D`` (``fan_in_fan_out``) or a module whose ``forward`` is ``nn.Linear``'s (a subclass may
    compute otherwise), with no hooks of its own (the fused paths never call the base module, so its
    forward / pre-forward / backward hooks would not run). Every fused path asks this before its
    autograd function stands in for the base (LoRA and its subclasses, sibling sets, DyLoRA, the
    LoRA-XS / LoRA-SB / nLoRA core), so it also says False while ``torch.jit.trace`` records (which
    ``torch.onnx.export``'s TorchScript exporter runs): the tracer records such a function as one
    opaque ``prim::PythonOp``, which ``torch.jit.save`` cannot serialize, and fails outright
    (``unordered_map::at``) when the function's forward reads tensors passed inside a non-tensor
    argument (the cached A/B casts, a sibling set's ``meta``). The layers' plain formulas trace as
    ordinary ATen ops."""
    if _is_tracing():
        return False
    base = layer._modules.get("base_layer")
    if base is None:  # a named adapter's layer holds its shared base unregistered (core.multi)
        base = layer.base_layer
    # Why: hooks on the base were skipped by the fused paths (a forward hook that
    # rescales the base output changed nothing). Four dict truth tests per call (host time: ~0.1 µs)
    if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks:
        return False
    return bool(layer.fan_in_fan_out) or type(base).forward is nn.Linear.forward


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``x``'s device, else None. The fused paths then run
    everything in that dtype with autocast off inside. Asks nothing when no autocast is on anywhere
    (host time per layer), and never asks a device without an autocast dispatch key (e.g. meta:
    asking would raise: :func:`~lightning_lora.core.layer.autocast_available`)."""
    if not torch._C._is_any_autocast_enabled():
        return None
    device_type = x.device.type
    if autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _lora_ab(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` from the layer's parameter dict (see :func:`_weight_bias`); FFA-LoRA's
    frozen A is a buffer, so anything not in the dict takes the ordinary lookup."""
    params = layer._parameters
    A = params["lora_A"] if "lora_A" in params else layer.lora_A
    B = params["lora_B"] if "lora_B" in params else layer.lora_B
    return A, B


class _SiblingSet:
    """Sibling layers that read the same input, in call order; ``members[0]`` (the leader) runs all."""

    def __init__(self, members: tuple[LoRALinear, ...]) -> None:
        self.members = members
        self.offsets: dict[LoRALinear, int] = {}
        off = 0
        for m in members:
            self.offsets[m] = off
            off += m.r
        self.rank_total = off
        self.ranks = tuple(m.r for m in members)
        self.index = {m: i for i, m in enumerate(members)}
        self.fifo = tuple(m.fan_in_fan_out for m in members)
        #: latest (R, n) buffer per dtype that _refresh_casts wrote the members' A casts into
        self.a_buffers: dict[torch.dtype, torch.Tensor] = {}
        self._a_cat: tuple[Any, torch.Tensor] | None = None  # (key, a_cat)

    def can_fuse(self, x: torch.Tensor) -> bool:
        """Whether this call can take the fused path for every member (no dropout in train mode, no
        DoRA, enabled, not merged, one scale, one device, one adapter dtype, frozen base weights, plain
        ``nn.Linear`` / ``Conv1D`` bases without hooks)."""
        first = self.members[0]
        scaling = first.scaling
        device = x.device
        dtype = None
        for m in self.members:
            if (m.disabled or m.merged or m.use_dora or not m.fused or (m.dropout_p > 0 and m.training)
                    or m.scaling != scaling or not _plain_linear_base(m)):  # (see LoRALinear.forward)
                return False
            A = _lora_ab(m)[0]
            if dtype is None:
                dtype = A.dtype
            w = _weight_bias(m)[0]
            if A.dtype != dtype or A.device != device or w.device != device or w.requires_grad:
                return False
        return True

    def a_cat(self, casts: list[tuple[torch.Tensor, torch.Tensor]], aliases: bool = False) -> torch.Tensor:
        """``[A_1; ...; A_k]`` in the activation dtype: the buffer the casts were written into, or one
        concatenation per optimizer step (partial refresh); one per forward where the A "casts" are the
        parameters themselves (``aliases``: A already in the activation dtype, e.g. fp32 training)."""
        key: tuple[Any, ...] = tuple(m._cast_key for m in self.members)
        # Why: with ``aliases`` the per-layer path reads A itself, so a write that
        # moves no version counter (``p.data.copy_``, a collective) shows at once there; a cached
        # concatenation (a copy) went stale instead, silently (fp32 q/k/v outputs 36 % off after
        # ``A.data.mul_(0.5)``). Such a concatenation is still kept for inspection, under a None key:
        # never reused. (A real cast, fp32 A under bf16 autocast, is a copy on both paths:
        # ``invalidate_cast_caches`` documents those writes.)
        if aliases:
            key = (None,)
        if None not in key and self._a_cat is not None and self._a_cat[0] == key:
            return self._a_cat[1]
        dtype = casts[0][0].dtype
        buf = self.a_buffers.get(dtype)
        n = self.members[0].in_features
        if buf is not None and all(
            c[0]._base is buf and c[0].storage_offset() == self.offsets[m] * n for m, c in zip(self.members, casts)
        ):
            out = buf
        else:
            out = torch.cat([c[0] for c in casts])
        self._a_cat = (key, out) if None not in key or aliases else None
        return out

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output for input ``x`` (..., n), with the autocast handling of
        :meth:`LoRALinear.forward`."""
        dtype = _autocast_dtype(x)
        if dtype is not None:
            with torch.autocast(x.device.type, enabled=False):
                return self._run(x.to(dtype), dtype)
        return self._run(x, None)

    def _run(self, x: torch.Tensor, dtype: torch.dtype | None) -> list[torch.Tensor]:
        members = self.members
        # (after an optimizer step its hook has refreshed them; left: first call, other in-place writes)
        xdtype = x.dtype
        ws, biases, As, Bs = [], [], [], []
        stale = None
        for m in members:
            w, b = _weight_bias(m)
            if dtype is not None:
                w, b = w.to(dtype), None if b is None else b.to(dtype)
            ws.append(w)
            biases.append(b)
            A, B = _lora_ab(m)
            As.append(A)
            Bs.append(B)
            if not _casts_current(m, m._cast_key, A, B, xdtype):
                if stale is None:
                    stale = []
                stale.append(m)
        # (after an optimizer step its hook has refreshed them; left: first call, other in-place writes)
        if stale:  # together, so the A casts land in one stacked buffer
            _refresh_casts(stale, xdtype)
        casts = [m._casts for m in members]
        a_cat = self.a_cat(casts, aliases=As[0].dtype == xdtype)
        first = members[0]
        mode = first.replay_inputs
        recipe = None
        # (the recipe first: it rejects most inputs at once; x is read in backward for A's gradient only)
        if mode != "none":
            recipe = _input_recipe(x, casts=mode == "all")
            if recipe is not None and not any(A.requires_grad for A in As):
                recipe = None
        # merged_training (every member has it, train mode): the members' W' instead of W
        merged = all(m.merged_training and m.training for m in members) and _merged_dtype_ok(xdtype)
        if merged:
            ws = [m._merged_weight(w, A, B, xdtype) for m, w, A, B in zip(members, ws, As, Bs)]
        cpp = _CPP if _CPP is not _AUTO or _lora_cpp.starts_auto(x) else None  # (automatic: CUDA training)
        # (a plain tensor only: a subclass's __torch_function__ sees the Python function's ops, not the C++ ones;
        # not under forward-mode AD: the Python function raises NotImplementedError there, the C++ one did not)
        if (cpp is not None and not merged and type(x) is torch.Tensor and _forward_ad_inactive()
                and not _plain_apply()):  # the C++ function (automatic on CUDA: _lora_cpp.resolve_auto)
            if cpp is True:
                cpp = _lora_cpp.load_for_env()
            elif cpp is _AUTO:
                cpp = _lora_cpp.resolve_auto()  # (starts_auto(x) checked above)
            with_bias = [b for b in biases if b is not None]
            enc = None if cpp is None else ((), ()) if recipe is None else _lora_cpp.encode_recipe(recipe)
            if enc is not None and len(with_bias) in (0, len(biases)):
                return cpp.siblings(x, a_cat, ws, with_bias, As, Bs, [c[1] for c in casts], first.scaling,
                                    self.ranks, self.fifo, *enc)
        meta = (self.ranks, first.scaling, tuple([c[1] for c in casts]),
                None if recipe is None else (recipe, x.shape), self.fifo, merged)
        if _plain_apply():
            return list(_FusedLoRASiblings.apply(x, a_cat, meta, *ws, *biases, *As, *Bs))
        return list(_apply_siblings(x, a_cat, meta, *ws, *biases, *As, *Bs))


@dataclass
class _PendingOutputs:
    """Outputs the leader computed for the siblings that have not been called yet."""

    x: weakref.ref[torch.Tensor]
    version: int | None
    outputs: dict[LoRALinear, torch.Tensor]


class _SiblingGroup:
    """LoRA layers of one parent module with the same ``in_features``: the candidates for sharing an input.

    Which of them do read the same tensor is learned from the calls: during the first forward pass
    every member runs alone and the group records runs of consecutive calls on the same input
    tensor; when a member is called a second time, the runs of two or more become
    :class:`_SiblingSet` s (in attention: q, k, v, with o reading another tensor). From then on the
    first member of a set computes every member's output in one :class:`_FusedLoRASiblings` and the
    others pick theirs up, provided they are called with the very same tensor, unmodified (identity
    and version counter). Any other call pattern falls back to the per-layer path, so results never
    depend on the plan; a group whose model keeps breaking the plan (``MAX_MISSES``) stops fusing.
    """

    MAX_MISSES = 8

    def __init__(self, members: list[LoRALinear]) -> None:
        self.members = members
        self.sets: dict[LoRALinear, _SiblingSet] | None = None  # None: still learning
        self._runs: list[list[LoRALinear]] = []
        self._prev: weakref.ref[torch.Tensor] | None = None
        self._pending: _PendingOutputs | None = None
        self.misses = 0

    def __reduce__(self) -> tuple[Any, ...]:
        # copies (deepcopy, pickle) start learning afresh: pending outputs belong to a live autograd graph
        return (_SiblingGroup, (self.members,))

    def __deepcopy__(self, memo: dict[int, Any]) -> "_SiblingGroup":
        # registered in ``memo`` before the members are copied: each member's ``_siblings`` then maps to
        # this one copy. Through ``__reduce__`` the members were copied first, every one of them made a
        # group of its own, and a copied model never fused its q/k/v again
        new = _SiblingGroup([])
        memo[id(self)] = new
        new.members = copy.deepcopy(self.members, memo)
        return new

    def _observe(self, layer: LoRALinear, x: torch.Tensor) -> None:
        if any(layer in run for run in self._runs):  # a new pass began: the plan is complete
            self.sets = {}
            for run in self._runs:
                if len(run) >= 2:
                    s = _SiblingSet(tuple(run))
                    for m in run:
                        self.sets[m] = s
                        m._cast_key = None  # refresh into the set's stacked buffer
            self._runs, self._prev = [], None
            return
        prev = self._prev() if self._prev is not None else None
        if prev is x and self._runs:
            self._runs[-1].append(layer)
        else:
            self._runs.append([layer])
        self._prev = weakref.ref(x)

    def _miss(self) -> None:
        self.misses += 1
        if self.misses >= self.MAX_MISSES:
            self.sets, self._pending = {}, None

    def forward(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output for ``x`` through its set, or None: the caller runs it alone."""
        if _is_compiling():
            return None
        if self.sets is None:
            if _saved_tensor_hooks_active():
                # non-reentrant checkpointing recomputes this forward in backward and requires the
                # same saved tensors: the plan must not complete between the forward and its recompute
                return None
            self._observe(layer, x)
            if self.sets is None:
                return None
        s = self.sets.get(layer)
        if s is None:
            return None
        pending = self._pending
        if pending is not None and layer in pending.outputs:
            if pending.x() is x and pending.version == _version(x):
                out = pending.outputs.pop(layer)
                if not pending.outputs:
                    self._pending = None
                return out
        if layer is not s.members[0]:
            self._miss()  # called without the leader's outputs for this input
            return None
        if pending is not None and pending.outputs:
            self._miss()  # outputs computed for siblings that were never called
        self._pending = None
        if not self.sets or not s.can_fuse(x):
            return None
        outs = s.run(x)
        self._pending = _PendingOutputs(weakref.ref(x), _version(x), dict(zip(s.members[1:], outs[1:])))
        return outs[0]


#: live LoRA layers, so a stale cast cache refreshes every stale layer's casts in one multi-tensor copy
_CAST_LAYERS: weakref.WeakSet[LoRALinear] = weakref.WeakSet()
#: calls of :func:`invalidate_cast_caches`: part of every cast-cache key, the adapters' (with the
#: layer's ``_step_epoch``) and that of casts optimizer steps do not touch (frozen buffers,
#: ``CoreLoRALinear._frozen_cast``). An optimizer step moves the ``_step_epoch`` of the layers whose A
#: or B it holds, by identity or by storage (a view into a flat buffer; a storage that cannot be read
#: counts as held), because fused optimizers (``torch.optim.AdamW(fused=True)``'s ``_fused_adamw_``)
#: update parameters in place without bumping their version counter: keyed on versions alone, the
#: casts went stale after the first step. Per layer, so that another model's optimizer (two models
#: trained in turn, a gate optimizer beside the adapters' one) leaves these casts, and
#: ``merged_training``'s W', as they are.
_CAST_INVALIDATIONS = 0


def invalidate_cast_caches() -> None:
    """Make every LoRA layer cast its A and B again at its next forward.

    The fused path keeps A and B converted to the activation dtype (bf16 / fp16 autocast) between
    optimizer steps, once a ``torch.optim`` optimizer holding them has stepped; before that, and for
    adapters trained by hand, it converts them at every forward. Writes that go around autograd's
    version counter are invisible to that cache: ``p.data.copy_(...)``, ``p.data.mul_(...)`` and
    ``torch.distributed`` collectives into a parameter (``dist.broadcast``, ``all_reduce``), e.g.
    model averaging between optimizer steps. Call this after such a write. ``AdapterCallback``
    calls it at the start of training, validation, test and predict; ``with torch.no_grad():
    p.copy_(...)`` and ``load_state_dict`` need nothing (they move the version counter).
    """
    global _CAST_INVALIDATIONS
    _CAST_INVALIDATIONS += 1


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _refresh_after_step(optimizer)


def _refresh_after_step(optimizer: torch.optim.Optimizer) -> None:
    """Refresh the casts of the layers this optimizer just updated, now rather than in the next forward.

    After ``step()`` the host is usually ahead of the GPU (the step's kernels are still queued), so
    the Python work of a refresh (a few microseconds per layer, one multi-tensor copy) hides behind
    GPU work here; at the start of the next forward it would delay the first launches while the
    GPU waits. Layers that never cast (not run yet), DoRA layers and layers this optimizer does not
    hold refresh lazily in their forward. The layers it holds are also marked as managed: only
    theirs are kept from one forward to the next (``LoRALinear._cast_key_for``).
    """
    if not _CAST_LAYERS:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    held = {id(p) for p in params}
    storages: list[set[int] | None] = []  # the held parameters' storages, made on first need

    def in_held_storage(t: torch.Tensor) -> bool:
        """Whether ``t`` lives in a held parameter's storage (a view into a flat buffer); True where a
        storage cannot be read (a tensor subclass, a trace): what the step moved is unknown then."""
        try:
            if not storages:
                storages.append({p.untyped_storage().data_ptr() for p in params})
            held_storages = storages[0]
            return held_storages is None or t.untyped_storage().data_ptr() in held_storages
        except (RuntimeError, NotImplementedError):
            storages[:] = [None]
            return True

    by_dtype: dict[torch.dtype, list[LoRALinear]] = {}
    for layer in list(_CAST_LAYERS):
        state = layer.__dict__
        A, B = _lora_ab(layer)
        by_identity = id(A) in held or id(B) in held
        if by_identity or in_held_storage(A) or in_held_storage(B):
            state["_step_epoch"] = state.get("_step_epoch", 0) + 1  # this step may have moved A or B
        dtype = state.get("_cast_dtype")
        if dtype is None:  # never cast (not run yet, inference tensors)
            continue
        if by_identity:
            # from now on this optimizer's steps are known to move A and B: casts may be kept
            # between them (LoRALinear._cast_key_for). Marked by the parameters' identities, so a
            # copy of the layer (new A and B) starts unmarked
            state["_cast_managed"] = (id(A), id(B))
            if not layer.use_dora:  # DoRA's casts refresh in its forward, as they always did
                by_dtype.setdefault(dtype, []).append(layer)
    for dtype, layers in by_dtype.items():
        _refresh_casts(layers, dtype)


# global post-step hook: runs after ``step()`` of every torch.optim.Optimizer (subclasses included)
_OPTIMIZER_STEP_HOOK = register_optimizer_step_post_hook(_count_optimizer_step)


def _refresh_casts(layers: list[LoRALinear], dtype: torch.dtype) -> None:
    """Set each layer's ``_casts`` to ``(A, B)`` in ``dtype`` and its cache key. Parameters already in
    ``dtype`` are used as they are; the others are converted by one ``_foreach_copy_`` per device.

    The destinations are made with few tensor ops (host time per optimizer step): the A casts of a
    sibling set are row blocks of one fresh (R, n) buffer (``split_with_sizes``), and every other cast
    is one slice of a fresh ``(count, *shape)`` buffer per device and shape (``unbind``). A new buffer
    each refresh: a graph still waiting for backward keeps the old one."""
    by_device: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    # (defaultdicts: no list made per lookup, as setdefault does; per layer per optimizer step)
    by_shape: defaultdict[tuple[torch.device, torch.Size], list[tuple[list[Any], int, torch.Tensor]]]
    by_shape = defaultdict(list)
    by_set: defaultdict[_SiblingSet, list[tuple[list[Any], LoRALinear, torch.Tensor]]] = defaultdict(list)
    done: list[tuple[LoRALinear, list[Any], torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for layer in layers:
            A, B = _lora_ab(layer)
            casts: list[Any] = [None, None]
            group = layer._siblings
            s = group.sets.get(layer) if group is not None and group.sets else None
            if A.dtype == dtype:
                casts[0] = A.detach()
            elif s is not None:
                # A's cast is a row block of its set's stacked A: the fused siblings read it whole
                by_set[s].append((casts, layer, A))
            else:
                by_shape[(A.device, A.shape)].append((casts, 0, A))
            if B.dtype == dtype:
                casts[1] = B.detach()
            else:
                by_shape[(B.device, B.shape)].append((casts, 1, B))
            done.append((layer, casts, A, B))
        for s, entries in by_set.items():
            src = entries[0][2]
            buf = s.a_buffers[dtype] = src.new_empty((s.rank_total, src.shape[1]), dtype=dtype)
            blocks = buf.split_with_sizes(s.ranks)
            index = s.index
            dsts, srcs = by_device.setdefault(src.device, ([], []))
            for casts, layer, A in entries:
                dst = casts[0] = blocks[index[layer]]
                dsts.append(dst)
                srcs.append(A)
        for (device, shape), entries in by_shape.items():
            if len(entries) == 1:
                views = (torch.empty(shape, dtype=dtype, device=device),)
            else:
                views = torch.empty((len(entries), *shape), dtype=dtype, device=device).unbind(0)
            dsts, srcs = by_device.setdefault(device, ([], []))
            for (casts, i, src), dst in zip(entries, views):
                casts[i] = dst
                dsts.append(dst)
                srcs.append(src)
        for dsts, srcs in by_device.values():
            torch._foreach_copy_(dsts, srcs)
    for layer, casts, A, B in done:
        # plain attributes, written past nn.Module.__setattr__'s parameter/buffer/module checks
        state = layer.__dict__
        state["_casts"] = (casts[0], casts[1])
        key = _cast_key(layer, A, B, dtype)
        state["_cast_dtype"] = None if key is None else dtype  # what the step hook refreshes in
        # (None for a layer no optimizer has stepped yet: its casts serve this forward only)
        state["_cast_key"] = key if state.get("_cast_managed") == (id(A), id(B)) else None


class LoRALinear(DoRAMerge):
    """LoRA on an ``nn.Linear`` or transformers ``Conv1D``.

    Parameters: ``lora_A`` (r, in_features), ``lora_B`` (out_features, r); with DoRA also
    ``lora_magnitude`` (out_features,).
    """

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude")
    file_key_map: ClassVar[dict[str, str]] = {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "lora_magnitude": "lora_magnitude_vector",
    }
    #: the C++ autograd function may stand in for :class:`_FusedLoRA` in :meth:`_fused` (CUDA training
    #: by default, ``LIGHTNING_LORA_CPP``). Opt-in per class: a subclass starts without it (set to
    #: False in ``__init_subclass__``) and claims it in its own body once its adapter is exactly
    #: ``_fused``'s (``x W^T + b + s·(x A^T) B^T`` from :func:`_lora_ab`'s A and B, the DoRA rescale
    #: after it), with nothing (an override, an ``autograd.Function`` of its own) around that math
    #: that the C++ function's ATen calls would bypass
    cpp_path: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "cpp_path" not in cls.__dict__:
            cls.cpp_path = False

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base_layer)
        self.r = config.r
        self.scaling = config.scaling
        self.dropout_p = config.dropout
        self.fused = config.fused
        self.replay_inputs = config.replay_inputs
        self.merged_training = config.merged_training
        if self.merged_training and type(self) is not LoRALinear:
            raise ValueError(f"merged_training is an option of plain LoRA layers; {type(self).__name__} "
                             "computes its adapter otherwise")
        #: ``(key, W')`` of ``merged_training``: the adapted weight, until A, B or W change
        self._merged_cache: tuple[Any, torch.Tensor] | None = None
        if self.merged_training:
            _MERGED_LAYERS.add(self)
        self.use_dora = config.use_dora
        self.dora_detach_norm = config.dora_detach_norm
        dtype = adapter_torch_dtype(config.adapter_dtype)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, dtype=dtype, device=device))
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        if self.use_dora:
            with torch.no_grad():
                # (fp64 norms for an fp64 base or adapter: m = ν exactly at init, see accumulate_dtype)
                w0 = self.base_weight
                norm = w0.to(torch.promote_types(accumulate_dtype(w0), dtype)).norm(dim=1)
            self.lora_magnitude = nn.Parameter(norm.to(dtype))
        else:
            self.register_parameter("lora_magnitude", None)
        self._cast_key: tuple[Any, ...] | None = None
        #: the dtype the casts were last made in (what the optimizer step hook refreshes them in)
        self._cast_dtype: torch.dtype | None = None
        #: ``(id(A), id(B))`` once an optimizer holding them has stepped: casts are kept from then on
        self._cast_managed: tuple[int, int] | None = None
        #: steps of optimizers holding A or B (by identity or storage): part of the cast key
        self._step_epoch = 0
        self._casts: tuple[torch.Tensor, ...] = ()
        #: the sibling group (same parent, same in_features) set by LoRA.on_inject; None: runs alone
        self._siblings: _SiblingGroup | None = None
        _CAST_LAYERS.add(self)

    #: per-process cache state a copy (``copy.deepcopy``, ``pickle``) starts without: the casts and
    #: ``W'`` are copies of the original's (memory, and keyed on its storages), ``_cast_managed`` holds
    #: the ids of the original's A and B
    _COPY_RESET: ClassVar[dict[str, Any]] = {
        "_casts": (), "_cast_key": None, "_cast_dtype": None, "_cast_managed": None, "_merged_cache": None}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(self._COPY_RESET)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy runs no __init__: registered here, or the optimizer step hook would never mark it and a
        # deep-copied or unpickled model (ddp_spawn, torch.save of the model) would re-cast A and B at
        # every forward and form merged_training's W' at every step
        super().__setstate__(state)
        self.__dict__.update(self._COPY_RESET)
        _CAST_LAYERS.add(self)
        if self.__dict__.get("merged_training"):
            _MERGED_LAYERS.add(self)

    def _scaled_ba(self) -> torch.Tensor:
        """``s·B A`` in fp32 (fp64 for fp64 adapters: :func:`~lightning_lora.core.layer.accumulate_dtype`), shape (out, in), also inside
        an autocast region."""
        A, B = self.lora_A, self.lora_B
        acc = accumulate_dtype(A, B)
        with no_autocast(A.device):
            return self.scaling * (B.to(acc) @ A.to(acc))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x, *args, **kwargs)
        # functorch transforms (torch.func.grad, vmap, ...) wrap the parameters: no storage for the
        # cast cache's key, and the fused functions' hand-written backward is not what they trace.
        # torch.compile gets the plain formula too: the compiler fuses it itself, while the fused
        # path's caches, version checks and autograd.Function break its graph at every layer
        # Why: a base whose forward is not nn.Linear's (a subclass overriding it)
        # or that has hooks also gets the plain formula; the fused functions compute x W^T + b
        # themselves and silently dropped what the base's own forward or hooks add. So does a
        # forward under torch.jit.trace (_plain_linear_base says False then)
        if ((self.use_dora and not self.dora_detach_norm) or not self.fused or args or kwargs
                or torch._C._are_functorch_transforms_active() or _is_compiling()
                or not _plain_linear_base(self)):
            return self.reference_forward(x, *args, **kwargs)
        if self._siblings is not None:  # (merged_training included: see _SiblingSet._run)
            out = self._siblings.forward(self, x)
            if out is not None:
                return out
        if self.merged_training and self.training:
            out = self._merged_forward(x)
            if out is not None:
                return out
        weight, bias = _weight_bias(self)
        if weight.requires_grad:  # an unfrozen base weight: the fused backward computes no gradient for it
            return self.reference_forward(x)
        dtype = _autocast_dtype(x)
        if dtype is not None:
            with torch.autocast(x.device.type, enabled=False):
                x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
                out = self._fused(x, weight, bias)
                return self._dora_rescale(out, bias) if self.use_dora else out
        out = self._fused(x, weight, bias)
        return self._dora_rescale(out, bias) if self.use_dora else out

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """``merged_training``'s train-mode output (see :class:`_MergedLoRA`), or None where it does not
        apply (an unfrozen base weight, fp16 or other activation dtypes): the fused path then."""
        weight, bias = _weight_bias(self)
        if weight.requires_grad:
            return None
        dtype = _autocast_dtype(x)
        if not _merged_dtype_ok(dtype or x.dtype):
            return None
        if dtype is not None:
            with torch.autocast(x.device.type, enabled=False):
                return self._merged(x.to(dtype), weight, None if bias is None else bias.to(dtype))
        return self._merged(x, weight, bias)

    def _merged(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        A, B = _lora_ab(self)
        dtype = x.dtype
        casts = self._casts if _casts_current(self, self._cast_key, A, B, dtype) else self._adapter_casts(dtype)
        w_merged = self._merged_weight(weight, A, B, dtype)
        recipe = None
        if self.replay_inputs != "none" and A.requires_grad:
            recipe = _input_recipe(x, casts=self.replay_inputs == "all")
        replay = None if recipe is None else (recipe, x.shape)
        return _MergedLoRA.apply(x, w_merged, bias, A, B, casts, self.scaling, replay, self.fan_in_fan_out)

    def _merged_weight(self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
        """``W + s·B A`` in ``dtype`` in the base weight's layout, kept while A, B (the cast cache's key:
        optimizer steps, versions), W (version, storage) and s stay as they were; formed at every forward
        until an optimizer holding A or B has stepped (see :meth:`_cast_key_for`)."""
        key = self._merged_key(weight, dtype)
        if key is not None:
            cached = self._merged_cache
            if cached is not None and cached[0] == key:
                return cached[1]
            # after an optimizer step every merged layer that ran in dtype is stale: all of them are
            # formed now, together (a few grouped kernel launches instead of one per layer)
            stale: list[tuple[LoRALinear, Any, torch.Tensor, torch.Tensor, torch.Tensor]] = [(self, key, weight, A, B)]
            for layer in list(_MERGED_LAYERS):
                old = layer._merged_cache
                if (layer is self or old is None or not layer.training or old[1].dtype != dtype
                        or old[1].device != weight.device):
                    continue
                w_l = _weight_bias(layer)[0]
                key_l = layer._merged_key(w_l, dtype)
                if key_l is not None and key_l != old[0]:
                    stale.append((layer, key_l, w_l, *_lora_ab(layer)))
            for layer, *_ in stale:
                layer._merged_cache = None  # the stale W' goes before the next is formed (peak memory)
            ws = merged_weights([t[2].detach() for t in stale], [t[4].detach() for t in stale],
                                [t[3].detach() for t in stale], [t[0].scaling for t in stale], dtype, _merge_seed(),
                                [t[0].fan_in_fan_out for t in stale])
            for (layer, key_l, *_), w in zip(stale, ws):
                layer._merged_cache = (key_l, w)
            return ws[0]
        self._merged_cache = None
        return merged_weight(weight.detach(), B.detach(), A.detach(), self.scaling, dtype, _merge_seed(),
                            self.fan_in_fan_out)

    def _merged_key(self, weight: torch.Tensor, dtype: torch.dtype) -> Any:
        """What this layer's ``W'`` in ``dtype`` depends on: its casts' key, W's storage and version, and
        s (set by hand between two steps, it must not find the W' of the old s) (None: not kept, see
        :meth:`_merged_weight`)."""
        key = self._cast_key_for(dtype)
        return None if key is None else (key, weight.data_ptr(), _version(weight), self.scaling)

    def _dora_rescale(self, out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """DoRA (detached norm) on the fused LoRA output ``out = W0x + b + sBAx``, shape (..., m).

        The reference formula ``W0x + b + (m/ν − 1)⊙W0x + (m/ν)⊙sBAx`` (``ν = ‖W0 + sBA‖_row``,
        a constant in backward) regrouped as ``out + (m/ν − 1)⊙(out − b)``: one activation-sized
        tensor is saved for backward (``out − b``, for the magnitude's gradient) where the
        reference saves two (``W0x`` and ``BAx``) beside ``x``, and the adapter term rides in the
        base GEMM as in LoRA. At init (``m = ν`` exactly, ``B = 0``) the output is the base's,
        bit for bit; the gradient reaching ``out`` is ``(m/ν)⊙g``, as in the reference.
        """
        mag_scale = self._dora_mag_scale(out.dtype)
        centred = out - bias if bias is not None else out
        return out + (mag_scale - 1) * centred

    def _cast_key_for(self, dtype: torch.dtype) -> tuple[Any, ...] | None:
        """This layer's :func:`_cast_key` for ``dtype``; None (cast at every forward, never reused)
        until a ``torch.optim`` optimizer holding A or B has stepped. Before that, nothing says how
        the parameters will change: a loop that updates them by hand through ``.data`` moves no
        version counter, and kept casts would go stale without a sign."""
        A, B = _lora_ab(self)
        if self.__dict__.get("_cast_managed") != (id(A), id(B)):
            return None
        return _cast_key(self, A, B, dtype)

    def _adapter_casts(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` in ``dtype``, recomputed only when A or B changed (optimizer step). Parameters
        already in ``dtype`` are used as they are: no copy, no kernel. When this layer's casts are
        stale, so are, after an optimizer step, those of every other layer that ran in ``dtype``
        on this device: all of them are refreshed together, in one multi-tensor copy."""
        key = self._cast_key_for(dtype)
        if key is not None and key == self._cast_key:
            return self._casts  # type: ignore[return-value]
        stale = [self]
        # (a DoRA layer refreshes only its own casts: it comes here every step, and the scan, which
        # collects non-DoRA layers only, found them already refreshed by the step hook)
        if key is not None and self.lora_A.dtype != dtype and not self.use_dora:
            device = self.lora_A.device
            for layer in list(_CAST_LAYERS):
                old = layer._cast_key
                if (layer is not self and old is not None and old[-1] == dtype and not layer.use_dora
                        and layer.lora_A.device == device and old != layer._cast_key_for(dtype)):
                    stale.append(layer)
        _refresh_casts(stale, dtype)
        return self._casts  # type: ignore[return-value]

    def _fused(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = None
        xd = x
        if self.dropout_p > 0:
            # dropout on the (N, n) view, as it always was (the same mask for a non-contiguous input)
            x2 = x.reshape(-1, self.in_features)
            xd2 = self._dropout(x2)
            if xd2 is not x2:  # active: the function runs on (N, n), its output is viewed back
                lead, x, xd = x.shape[:-1], x2, xd2
        A, B = _lora_ab(self)
        dtype = x.dtype
        casts = self._casts if _casts_current(self, self._cast_key, A, B, dtype) else self._adapter_casts(dtype)
        mode = self.replay_inputs
        recipe = None
        if mode != "none" and xd is x and A.requires_grad:
            recipe = _input_recipe(x, casts=mode == "all")
        cpp = _CPP if _CPP is not _AUTO or _lora_cpp.starts_auto(x) else None  # (automatic: CUDA training)
        # (plain LoRALinear and the subclasses that claim ``cpp_path``: the others keep the Python
        # function they were written against; and a plain tensor x only: a subclass's __torch_function__ sees the Python function's ops, and its
        # outputs keep the subclass there, while the C++ function's ATen calls bypass it; and not under
        # forward-mode AD, where the Python function raises NotImplementedError and the C++ one did not)
        if (cpp is not None and xd is x and type(self).cpp_path and type(x) is torch.Tensor
                and _forward_ad_inactive() and not _plain_apply()):  # C++ (automatic on CUDA: _lora_cpp.resolve_auto)
            if cpp is True:
                cpp = _lora_cpp.load_for_env()
            elif cpp is _AUTO:
                cpp = _lora_cpp.resolve_auto()  # (starts_auto(x) checked above)
            enc = None if cpp is None else ((), ()) if recipe is None else _lora_cpp.encode_recipe(recipe)
            if enc is not None:
                return cpp.fused(x, weight, bias, A, B, casts[0], casts[1], self.scaling, self.fan_in_fan_out, *enc)
        replay = None if recipe is None else (recipe, x.shape)
        if _plain_apply():
            out = _FusedLoRA.apply(x, xd, weight, bias, A, B, casts, self.scaling, replay, self.fan_in_fan_out)
        else:
            out = _apply_fused(x, xd, weight, bias, A, B, casts, self.scaling, replay, self.fan_in_fan_out)
        return out if lead is None else out.view(*lead, self.out_features)

    def reference_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Plain (unfused) formula; also DoRA's forward."""
        base_out = self.base_layer(x, *args, **kwargs)
        dtype = base_out.dtype
        A, B = self.lora_A.to(dtype), self.lora_B.to(dtype)
        lora_out = (self._dropout(x).to(dtype) @ A.t()) @ B.t()
        if not self.use_dora:
            return base_out + self.scaling * lora_out
        # DoRA: y = W0x + (m/ν − 1)⊙(W0x) + (m/ν)⊙(s·BAx) + b, ν = ‖W0 + sBA‖_row
        mag_scale = self._dora_mag_scale(dtype)
        bias = self.base_layer.bias
        base_no_bias = base_out - bias.to(dtype) if bias is not None else base_out
        return base_out + (mag_scale - 1) * base_no_bias + mag_scale * self.scaling * lora_out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, scaling={self.scaling:g}, dora={self.use_dora}"


#: Fields of PEFT's ``LoraConfig`` that loading here honours or that do not change what a loaded
#: adapter computes on a plain ``nn.Linear`` / ``Conv1D`` base (bookkeeping, training-time options,
#: the configs of initialisations that leave the base weight as it is). Options
#: :meth:`LoRA.from_peft_config` refuses with a reason of its own (``rank_pattern``,
#: ``layers_to_transform``, ...) are listed too. Any other field set to a true value is refused by
#: :func:`_unsupported_peft_lora_options`.
_PEFT_LORA_HARMLESS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
    "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "use_dora", "megatron_config", "megatron_core",
    "eva_config", "lora_ga_config", "use_qalora", "qalora_group_size", "runtime_config", "ensure_weight_tying",
    "target_parameters",
})
#: ``init_lora_weights`` values (prefixes) with which PEFT rewrites the base weight when it builds
#: the layers, on load too (PiSSA and CorDA keep the residual ``W - s B0 A0``, OLoRA likewise, LoftQ
#: the quantized weight): the saved A and B only make sense on that rewritten base
_PEFT_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq")
#: why a known refused field cannot load here
_PEFT_LORA_REASONS = {
    "alora_invocation_tokens": "Activated LoRA applies the update only after the invocation tokens",
    "lora_bias": "lora_B has a bias",
    "layer_replication": "PEFT duplicates base layers",
    "trainable_token_indices": "trainable embedding rows",
    "use_bdlora": "block-diagonal LoRA factors",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA truncates the base weight and adds a singular-value diagonal",
    "monteclora_config": "MonteCLoRA samples the adapter",
    "velora_config": "VeLoRA",
}


@functools.cache
def _peft_lora_defaults() -> dict[str, Any]:
    """The installed PEFT's ``LoraConfig`` defaults by field (empty without PEFT)."""
    try:
        from peft import LoraConfig
    except ImportError:
        return {}
    return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(LoraConfig)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def _unsupported_peft_lora_options(peft_cfg: dict[str, Any]) -> list[str]:
    """``"field=value (why)"`` for every option of a PEFT LoRA ``adapter_config.json`` with which the
    adapter computes something this library does not: a PEFT variant (Activated LoRA, ``lora_bias``,
    ...) or an initialisation that rewrites the base weight. Loading such a directory as plain LoRA
    ran without a word and gave other outputs than PEFT (Activated LoRA: every token adapted; PiSSA:
    the update on the original instead of the residual base weight)."""
    # a field this list does not know passes when it holds the installed PEFT's own default: a newer
    # PEFT that adds a field with a non-empty default (as qalora_group_size) must not make every adapter
    # it saves unloadable
    defaults = _peft_lora_defaults()
    out: list[str] = []
    for key, value in sorted(peft_cfg.items()):
        if key in _PEFT_LORA_HARMLESS or not value:
            continue
        if key in _PEFT_LORA_REASONS or key not in defaults or value != defaults[key]:
            out.append(f"{key}={value!r} ({_PEFT_LORA_REASONS.get(key, 'a PEFT option this library does not implement')})")
    init = peft_cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_PEFT_BASE_REWRITING_INITS):
        out.append(f"init_lora_weights={init!r} (PEFT rewrites the base weight when loading it; save the adapter "
                   "converted to plain LoRA: save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    return out


@register("lora")
class LoRA(Method):
    """LoRA / rsLoRA / DoRA. Saves in Hugging Face PEFT's format (``peft_type = "LORA"``)."""

    Config = LoRAConfig
    #: linear layers (and transformers' Conv1D), embeddings, (transposed) convolutions and multi-head attention
    #: (:mod:`lightning_lora.methods.lora_modules`); methods built on LoRA set their own
    supported_types = (nn.Linear, *MODULE_TYPES)
    peft_type: ClassVar[str] = "LORA"

    def make_layer(self, base: nn.Module, name: str) -> AdapterLayer:
        if isinstance(base, MODULE_TYPES):
            return make_module_layer(base, self.config)  # type: ignore[arg-type]
        return LoRALinear(base, self.config)  # type: ignore[arg-type]

    def extra_layers(self, model: nn.Module, layers: dict[str, AdapterLayer]) -> dict[str, AdapterLayer]:
        """The heads tied to adapted embeddings (:meth:`_tied_layers`) and the modules holding targeted
        bare parameters (:meth:`_parameter_layers`)."""
        return {**self._tied_layers(model, layers), **self._parameter_layers(model, layers)}

    def _parameter_layers(self, model: nn.Module, layers: dict[str, AdapterLayer]) -> dict[str, AdapterLayer]:
        """With ``target_parameters``: a :class:`LoRAParameters` for every module holding a matching
        parameter (its own, not a submodule's); ValueError where none matches or the module is a target."""
        keys = self.config.target_parameters  # type: ignore[attr-defined]
        if not keys:
            return {}
        from ..core.inject import _name_matches

        found: dict[str, list[str]] = {}
        for name, module in model.named_modules():
            if any(name.startswith(t + ".") for t in layers):  # inside an adapter layer built just now
                continue
            owner = module.base_layer if isinstance(module, AdapterLayer) else module
            hits = [p for p, _ in owner.named_parameters(recurse=False) if _name_matches(f"{name}.{p}", keys)]
            if not hits:
                continue
            if isinstance(module, AdapterLayer):
                raise ValueError(f"target_parameters: {name}.{hits[0]} belongs to {name!r}, which target_modules adapts "
                                 "already; adapt one or the other (target_modules=[] for parameters only)")
            if not name:
                raise ValueError(f"target_parameters: {hits[0]!r} belongs to the top-level module; target a submodule's")
            found[name] = hits
        for name, module in model.named_modules():  # a parametrized tensor is no parameter of its module
            hit = next((p for p in getattr(module, "parametrizations", {}) if _name_matches(f"{name}.{p}", keys)), None)
            if hit is not None:
                raise ValueError(f"target_parameters: {name}.{hit} is computed by a torch.nn.utils.parametrize "
                                 "parametrization; LoRA adapts plain parameters (remove the parametrization first)")
        if not found:
            sample = [n for n, p in model.named_parameters() if p.dim() >= 2][:8]
            raise ValueError(f"target_parameters={keys!r} matched no parameter; 2-D and 3-D parameters in this model "
                             f"include: {sample}")
        return {name: LoRAParameters(model.get_submodule(name), names, self.config)  # type: ignore[arg-type]
                for name, names in found.items()}

    def _tied_layers(self, model: nn.Module, layers: dict[str, AdapterLayer]) -> dict[str, AdapterLayer]:
        """With ``ensure_weight_tying``: a :class:`TiedLoRALinear` for every ``nn.Linear`` whose weight is an
        adapted embedding's table (qualified name -> layer); ValueError for a tie it cannot follow."""
        if not self.config.ensure_weight_tying:  # type: ignore[attr-defined]
            return {}
        from ..core.inject import tied_modules

        out: dict[str, AdapterLayer] = {}
        ties = {name: [o.removesuffix(".base_layer") for o in others] for name, others in tied_modules(model, layers).items()}
        for name, others in ties.items():  # every such target first: the message names the fix
            if not isinstance(layers[name], LoRAEmbedding):
                raise ValueError(f"ensure_weight_tying: {name!r} ({type(layers[name].base_layer).__name__}) shares its "
                                 f"weight with {others[0]!r}; target the embedding only, whose adapter its tied modules share")
        for name, others in ties.items():
            layer = layers[name]
            for other in others:
                module = model.get_submodule(other)
                if not isinstance(module, nn.Linear) or isinstance(module, AdapterLayer):
                    raise ValueError(f"ensure_weight_tying: {other!r} ({type(module).__name__}) shares the table of "
                                     f"{name!r}; only an untargeted nn.Linear head can share its adapter")
                out[other] = TiedLoRALinear(module, layer, self.config.dropout)  # type: ignore[attr-defined]
        if not out:
            warnings.warn("ensure_weight_tying=True, but no adapted nn.Embedding is tied to another module",
                          stacklevel=4)
        return out

    def on_inject(self, model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
        """Group plain LoRA layers by parent module and ``in_features`` (sibling candidates)."""
        c: LoRAConfig = self.config  # type: ignore[assignment]
        if not (c.fused and c.fuse_siblings):
            return
        groups: dict[tuple[str, int], list[LoRALinear]] = {}
        for name, layer in layers.items():
            if type(layer) is LoRALinear:
                groups.setdefault((name.rpartition(".")[0], layer.in_features), []).append(layer)
        for members in groups.values():
            if len(members) >= 2:
                group = _SiblingGroup(members)
                for layer in members:
                    layer._siblings = group

    def to_peft_config(self, layers: dict[str, AdapterLayer]) -> dict[str, Any] | None:
        """PEFT ``LoraConfig`` fields for the injected layers (exact names, so PEFT adapts the same set);
        None where PEFT would build other layers from them (a grouped convolution: PEFT's form for it
        is another function) or has none (a transposed convolution), so the adapter is saved in this
        library's own format."""
        c: LoRAConfig = self.config  # type: ignore[assignment]
        if any((isinstance(layer, LoRAConv) and layer.groups > 1) or isinstance(layer, LoRAConvTranspose)
               for layer in layers.values()):
            return None
        return {
            "peft_type": "LORA",
            "task_type": None,
            "r": c.r,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "use_rslora": c.use_rslora,
            "use_dora": c.use_dora,
            "init_lora_weights": True if c.init == "kaiming" else "gaussian",
            # a tied head follows the embedding's adapter (ensure_weight_tying), as in PEFT
            "target_modules": sorted(n for n, layer in layers.items() if not isinstance(layer, (TiedLoRALinear, LoRAParameters))),
            "ensure_weight_tying": c.ensure_weight_tying,
            # full names, as PEFT matches them (its wrappers nest in each module's parameter order, as ours name them)
            "target_parameters": sorted(f"{n}.{p}" for n, layer in layers.items() if isinstance(layer, LoRAParameters)
                                        for p in layer.names) or None,
            "modules_to_save": list(c.modules_to_save) or None,
            "bias": c.bias,
            # transformers' Conv1D (an nn.Embedding's table is also stored (in, out), but PEFT's
            # embedding layer ignores the option)
            "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values() if isinstance(layer, LoRALinear)),
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any]) -> LoRAConfig:
        """A :class:`LoRAConfig` from a PEFT ``adapter_config.json`` dict; a ValueError for options with
        which the adapter computes something else here than in PEFT (see
        :func:`_unsupported_peft_lora_options`)."""
        unsupported = _unsupported_peft_lora_options(cfg)
        if unsupported:
            raise ValueError(f"PEFT LoRA option(s) lightning_lora does not support: {'; '.join(unsupported)}")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ValueError("PEFT adapters with rank_pattern/alpha_pattern are not supported yet")
        if cfg.get("layers_to_transform") is not None:
            raise ValueError("PEFT adapters with layers_to_transform are not supported yet")
        exclude = cfg.get("exclude_modules") or []
        if isinstance(exclude, str):
            raise ValueError("PEFT adapters with a regex exclude_modules are not supported yet")
        init = cfg.get("init_lora_weights", True)
        return LoRAConfig(
            r=int(cfg["r"]),
            alpha=float(cfg.get("lora_alpha", 8)),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            use_rslora=bool(cfg.get("use_rslora", False)),
            use_dora=bool(cfg.get("use_dora", False)),
            init="gaussian" if init == "gaussian" else "kaiming",
            target_modules=cfg.get("target_modules"),
            exclude_modules=list(exclude),
            modules_to_save=list(cfg.get("modules_to_save") or []),
            bias=cfg.get("bias", "none"),
            ensure_weight_tying=bool(cfg.get("ensure_weight_tying", False)),
            target_parameters=list(cfg["target_parameters"]) if cfg.get("target_parameters") else None,
        )
