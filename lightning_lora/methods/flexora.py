"""Flexora (Wei, Shu, He, Yu, ACL 2025, https://arxiv.org/abs/2408.10774; docs METHODS.md §13):
learn which layers need LoRA, then retrain LoRA in those layers only.

Two phases inside ONE ``pl.Trainer.fit``, driven by ``AdapterCallback("flexora", search_steps=...)``:

1. Search (the first ``search_steps`` optimizer steps). Every adapted module is a LoRA layer whose
   branch is scaled by the gate of its layer:

       y = W0 x + b + w_l^p · s · B A dropout(x),   w = L · softmax(α̂),   α̂ ∈ R^L (init 0: all w_l = 1)

   with ``s = α/r`` and ``p = gate_power`` (1, the paper's linear gate; 3 reproduces the official
   code, whose forward pre-hooks multiply the inputs of dropout, A and B by w_l). ``Σ_l w_l = L``.
   Each step alternates (first-order bilevel approximation, as the official code ``flora.py``):

   - train step (the module's own ``training_step`` / optimizer, unchanged): one optimizer step on
     the LoRA parameters θ from a TRAINING batch; the gates enter as constants (``w_l`` is a Python
     float folded into the layer's scale), so no gradient can reach α̂;
   - gate step (this file, ``on_train_batch_end`` after the optimizer stepped): the VALIDATION loss,
     summed over ``gate_batches`` validation mini-batches in eval mode (dropout off), is
     differentiated w.r.t. α̂ only (``torch.autograd.grad``; θ enters detached, so nothing
     accumulates in θ's ``.grad``), and one Adam step (lr ``gate_lr`` = 0.01, its own optimizer kept
     here, never seen by ``configure_optimizers``) moves α̂.

   The paper frames the gate update as unrolled differentiation of ``L_val(θ*(α̂), α̂)``; the exact
   approximation used here (and in the official code) is the ZERO-step unroll:
   ``∇_α̂ L_val(θ_t, α̂)`` at the current θ_t, i.e. the implicit dependence ``∂θ*/∂α̂`` is dropped
   (DARTS' first-order approximation). No second-order or multi-step unrolled term is computed.

2. Selection and retraining (at ``global_step == search_steps``): the selected set is
   ``S = {l : α̂_l > 0}`` (``selection="positive"``; the official code's rule and METHODS §13's
   equation and invariant 4): a fixed threshold at α̂'s initial value 0, not a comparison with any
   mean. METHODS §13 glosses the rule as "gate above the mean, ``w_l > 1``"; that is a different
   rule, which this code does not apply. As ``mean_l w_l = 1``, ``w_l > 1`` iff ``α̂_l > m`` with
   ``m = log mean_k exp(α̂_k) ≥ mean(α̂)`` (Jensen; equality only when all α̂ are equal), so
   ``{α̂_l > 0}``, ``{w_l > 1}`` and ``{α̂_l > mean(α̂)}`` agree at α̂ = 0 but not in general: with
   α̂ = (0.05, 0.5, −0.55) (Σ α̂ = 0) layer 0 has α̂ > 0 and α̂ > mean(α̂) yet ``w_0 ≈ 0.96 < 1``;
   with α̂ = (−0.1, −0.2, −0.3) no α̂ is > 0 yet ``w_0 > 1``. (w ignores a constant added to α̂, so
   the gate gradient sums to 0, but Adam's per-coordinate steps do not keep Σ α̂ at 0.) The logged
   ``flexora/layers_above_mean`` is, despite its name, the count of ``α̂_l > 0`` (before the
   empty-set fallback). ``selection="top_k"`` keeps the ``top_k`` largest α̂ instead. An empty set
   (e.g. α̂ never moved) falls back to all layers [design]; a non-finite α̂ (a diverged gate step)
   raises, naming the layers and the step, after undoing that step (α̂ and Adam's state are the
   last good step's). Then, as a fresh LoRA run (the code's stage 2 is a new SFT
   run): α̂ is discarded (gates of kept layers set to 1), the LoRA factors of the selected layers are
   re-initialised (A drawn as LoRA's ``init`` says, B = 0; ``reinit=False`` keeps the searched factors; modules
   trained in full, ``modules_to_save`` such as a new classifier head, keep their weights: the
   paper's LLMs have no new head to restart [design]), the
   unselected adapters are REMOVED (their modules get their base layer back: no parameters, no
   compute; ``exclusion="zero"`` instead zeroes and freezes them, the code's behaviour), and the
   module's optimizer and LR schedule are rebuilt through Lightning
   (``trainer.strategy.setup_optimizers``, i.e. the module's own ``configure_optimizers``, now seeing
   only the selected LoRA parameters, with fresh optimizer state). With
   ``retrain_schedule="fresh"`` (default) ``trainer.estimated_stepping_batches`` reports the
   remaining steps while the schedule is built, so a warmup/decay schedule spans the retraining
   phase exactly; ``"continue"`` fast-forwards the new scheduler to the current step.

What a "layer" is (``granularity``): ``"block"`` (default, the paper's and the code's unit: one gate
per transformer block; the code groups LoRA modules by ``layers.<i>`` in their names) groups the
adapted modules by the first ``<prefix>.<i>`` that ``block_pattern`` finds in their qualified
names (``encoder.layer.3``, ``model.layers.3``, ``transformer.h.3``); a module outside any
numbered block is its own layer. ``"module"``: one gate per adapted module.

Validation batches for the gate step come from, in order: an iterable given with
:meth:`Flexora.set_gate_data`, ``trainer.datamodule.val_dataloader()``, the Trainer's validation
dataloader(s). The iterator restarts when exhausted. ``gate_batch_size`` splits each pulled batch
into micro-batches of that size. The loss is the module's own ``training_step`` (its ``log`` calls
muted) unless :meth:`Flexora.set_gate_loss` gives a ``loss_fn(pl_module, batch) -> scalar``.

Saved state (METHODS S4): ``layer_metadata`` (safetensors metadata of ``save_adapter`` and
``checkpoint["lightning_lora"]["layer_metadata"]``) holds the phase, the gated layers, α̂ and the
gates (current during search, at selection afterwards), the selected layers and modules. Loading a
retrained adapter (``load_adapter``, ``load_adapter_checkpoint``) injects only the selected modules;
loading a search-phase adapter restores α̂ and the gates. :func:`read_flexora_metadata` reads it from
a directory without a model; :meth:`Flexora.summary` from a live or loaded model.

Resuming a fit (``trainer.fit(..., ckpt_path=...)``): the checkpoint's ``layer_metadata`` also
holds the gate optimizer's Adam state, the number of gate micro-batches used so far, the step
of the selection and the seed of the re-initialisation at the selection (``reinit``: each kept
module's A is drawn from a generator seeded by ``torch.initial_seed()`` at the first fit start and
the module's name, not from the global RNG, whose state Lightning does not checkpoint).
``apply_layer_metadata`` (called by ``AdapterCallback`` before the state dict is loaded) restores
α̂, the gates, the Adam state and the seed mid-search, and skips the gate data already used
(same batches as an uninterrupted run when the source is deterministic); after the selection it
removes (or zeroes) the unselected adapters without re-initialising the kept ones, and
``on_fit_start`` rebuilds the optimizer and its "fresh" schedule from the selection step before
Lightning loads their states. A resumed fit equals the uninterrupted one (tested on both sides of
the selection). Limits: under DDP the gate gradient
is averaged over processes, so every process selects the same layers, and the re-initialised
factors are broadcast from rank 0, so every process retrains the same adapter; the removed/frozen adapters
stay registered with DDP's reducer, so use ``strategy="ddp_find_unused_parameters_true"``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..core.config import Method, register, whole_number
from ..core.layer import AdapterLayer
from .lora import LoRAConfig, LoRALinear

#: default ``block_pattern``: ``layer.3`` / ``layers.3`` (BERT, LLaMA), ``h.3`` (GPT-2), ``block(s).3``
BLOCK_PATTERN = r"(?:^|\.)(?:layers?|h|blocks?)\.\d+(?=\.|$)"


@dataclass
class FlexoraConfig(LoRAConfig):
    """Flexora options: LoRA's (see :class:`LoRAConfig`; defaults r = 8, α = 16 as the official
    code's LLaMA-Factory setup; ``use_dora`` is rejected), plus

    Attributes:
        search_steps: optimizer steps of the search phase; at this step the layers are selected and
            retraining starts (same fit).
        gate_lr: Adam learning rate of the gate logits α̂ (code: 0.01).
        gate_batches: validation mini-batches whose summed loss drives one gate step (code: 8).
        gate_batch_size: split each pulled validation batch into micro-batches of this size
            (None: use the batches as the loader gives them).
        gate_every: a gate step after every ``gate_every``-th optimizer step (code: 1).
        gate_power: the branch scales as ``w_l ** gate_power``; 1 = paper (linear), 3 = official code.
        granularity: ``"block"`` (one gate per transformer block, paper) or ``"module"``.
        block_pattern: regex whose first match in a module's qualified name (up to its end) names
            the module's block.
        selection: ``"positive"`` (keep ``{l : α̂_l > 0}``, official code and METHODS §13's
            equation; not ``w_l > 1``, the "above the mean" gloss of METHODS: see the module
            docstring) or ``"top_k"`` (the ``top_k`` largest α̂).
        top_k: layers kept by ``selection="top_k"``.
        empty_selection: ``"all"`` (keep every layer when none is selected, e.g. no α̂_l > 0) or
            ``"error"``.
        exclusion: ``"remove"`` (unselected modules get their base layer back) or ``"zero"``
            (B = 0 and frozen: inert, the code's way; still computed).
        reinit: re-initialise the selected LoRA factors at the switch (paper: retrain from scratch).
        retrain_schedule: ``"fresh"`` (the module's LR schedule restarts over the remaining steps)
            or ``"continue"`` (the rebuilt scheduler is advanced to the current step).
    """

    alpha: float = 16.0
    search_steps: int = 100
    gate_lr: float = 0.01
    gate_batches: int = 8
    gate_batch_size: int | None = None
    gate_every: int = 1
    gate_power: int = 1
    granularity: str = "block"
    block_pattern: str = BLOCK_PATTERN
    selection: str = "positive"
    top_k: int | None = None
    empty_selection: str = "all"
    exclusion: str = "remove"
    reinit: bool = True
    retrain_schedule: str = "fresh"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError("Flexora gates a plain LoRA branch; use_dora=True is not supported")
        for key in ("search_steps", "gate_batches", "gate_every", "gate_power"):
            setattr(self, key, whole_number(getattr(self, key), f"Flexora: {key}"))
        for key in ("gate_batch_size", "top_k"):
            setattr(self, key, whole_number(getattr(self, key), f"Flexora: {key}", optional=True))
        checks = {
            "search_steps": self.search_steps >= 1, "gate_batches": self.gate_batches >= 1,
            "gate_every": self.gate_every >= 1, "gate_power": self.gate_power >= 1, "gate_lr": self.gate_lr > 0,
            "gate_batch_size": self.gate_batch_size is None or self.gate_batch_size >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"Flexora: {bad[0]} must be positive, got {getattr(self, bad[0])!r}")
        choices = {"granularity": ("block", "module"), "selection": ("positive", "top_k"),
                   "empty_selection": ("all", "error"), "exclusion": ("remove", "zero"),
                   "retrain_schedule": ("fresh", "continue")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"Flexora: {key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.selection == "top_k" and (self.top_k is None or self.top_k < 1):
            raise ValueError(f"Flexora: selection='top_k' needs top_k >= 1, got {self.top_k!r}")
        try:
            re.compile(self.block_pattern)
        except re.error as exc:
            raise ValueError(f"Flexora: block_pattern {self.block_pattern!r} is not a regex ({exc})") from None


# ---- gates and selection (pure functions) ------------------------------------------------------------
def gate_values(logits: torch.Tensor) -> torch.Tensor:
    """``w = L · softmax(α̂)``, shape (L,), fp32 (differentiable).

    Written ``(e · L) / Σ e`` with ``e = exp(α̂ − max α̂)``: at α̂ = 0 every gate is exactly 1.0 for any
    L (``L · softmax`` rounds ``1/L`` first and misses 1.0 for L = 41, 47, ...).
    """
    a = logits.float()
    e = torch.exp(a - a.max().detach())
    return e * a.numel() / e.sum()


def layer_key(name: str, config: FlexoraConfig) -> str:
    """The gated layer a module belongs to: its block prefix (``encoder.layer.3``) or its own name."""
    if config.granularity == "block":
        m = re.search(config.block_pattern, name)
        if m is not None:
            return name[: m.end()]
    return name


def group_layers(names: Iterable[str], config: FlexoraConfig) -> dict[str, list[str]]:
    """Gated layer -> its module names, both in model order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(layer_key(n, config), []).append(n)
    return groups


def select_layers(logits: Sequence[float] | torch.Tensor, keys: Sequence[str], config: FlexoraConfig,
                  step: int | None = None) -> list[str]:
    """The layers kept after the search, in model order.

    ``selection="positive"``: exactly ``{l : α̂_l > 0}``, a fixed threshold at α̂'s initial value 0
    (not ``w_l > 1``, not ``α̂_l > mean(α̂)``: see the module docstring); ``"top_k"``: the ``top_k``
    largest α̂ (ties to the earlier layer). Empty result: every layer (``empty_selection="all"``) or a
    RuntimeError. A non-finite α̂ raises a ValueError naming its layers (and ``step``, the optimizer
    step of the selection, when given).
    """
    a = [float(v) for v in (logits.tolist() if isinstance(logits, torch.Tensor) else logits)]
    if len(a) != len(keys):
        raise ValueError(f"{len(a)} gate logits for {len(keys)} layers")
    # NaN compares False with everything: "NaN > 0" would silently drop the layer, and top_k's sort
    # order would be arbitrary. A non-finite α̂ means the gate step diverged, so stop loudly instead.
    # Checking α̂ suffices: finite α̂ always gives finite gates (gate_values subtracts max α̂).
    # The gate step already stops at the first non-finite α̂; this catches logits set by hand.
    bad = _non_finite(keys, a)
    if bad:
        raise _diverged("gate logit", list(bad), f"α̂ = {list(bad.values())}", step)
    if config.selection == "positive":
        keep = {i for i, v in enumerate(a) if v > 0}
    else:
        keep = set(sorted(range(len(a)), key=lambda i: (-a[i], i))[: config.top_k])
    if not keep:
        if config.empty_selection == "error":
            raise RuntimeError("Flexora selected no layer (no gate logit above 0)")
        keep = set(range(len(a)))
    return [k for i, k in enumerate(keys) if i in keep]


def _non_finite(keys: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    return {k: v for k, v in zip(keys, values) if not math.isfinite(v)}


def _diverged(what: str, layers: Sequence[str], values: Any, step: int | None) -> ValueError:
    """The one-line error of a diverged search (gate step and selection), naming layers and step."""
    at = f" at optimizer step {step}" if step is not None else ""
    return ValueError(f"Flexora: non-finite {what} for layer(s) {list(layers)}{at} ({values}): "
                      "the gate step diverged; lower gate_lr, or clip gradients (Trainer(gradient_clip_val=...)) "
                      "if the LoRA weights diverged first")


# ---- the layer ------------------------------------------------------------------------------------------
class FlexoraLinear(LoRALinear):
    """LoRA layer whose branch is scaled by its layer's gate.

    Parameters as :class:`LoRALinear`: ``lora_A`` (r, in), ``lora_B`` (out, r). Plain state:
    ``gate`` (w_l, float, folded into ``scaling = lora_scaling · w_l^p`` so the fused LoRA path,
    ``delta_weight`` and ``merge`` all see it), ``hyper_gate`` (w_l as a tensor attached to α̂, set
    only during the gate step), ``excluded`` (zeroed and frozen after the search).
    """

    #: outside the gate step the forward is LoRA's, the gate folded into the float ``scaling``; the
    #: gate step computes its own formula, never ``_fused``: ``LoRALinear.cpp_path``
    cpp_path = True

    def __init__(self, base_layer: nn.Module, config: FlexoraConfig, gate: float = 1.0) -> None:
        super().__init__(base_layer, config)
        self.lora_scaling = self.scaling  # s = α/r (or α/√r), without the gate
        self.gate_power = config.gate_power
        #: LoRA's ``init`` ("kaiming" / "gaussian"): :meth:`reset_lora` re-initialises A the same way
        self.lora_init: str = config.init
        self.gate = 1.0
        self.hyper_gate: torch.Tensor | None = None
        self.excluded = False
        self.set_gate(gate)

    def set_gate(self, w: float) -> None:
        """Fix the gate at ``w`` (a constant for the train step, eval, merge)."""
        if self.merged:
            raise RuntimeError("unmerge() before changing the gate: the merged weight holds w·s·BA")
        self.gate = float(w)
        self.scaling = self.lora_scaling * self.gate**self.gate_power

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """Fresh LoRA init, as a new run: A as :class:`LoRALinear` initialises it (``init="kaiming"``:
        Kaiming-uniform a = √5; ``"gaussian"``: N(0, 1/r²)), B = 0. ``generator`` (a CPU generator):
        A is drawn from it, in fp32 on the CPU, instead of from the global RNG."""
        # drawn on the CPU: a CPU generator cannot fill a CUDA tensor, and the draw must not depend
        # on the device or the adapter dtype
        target = self.lora_A if generator is None else torch.empty(self.lora_A.shape, dtype=torch.float32)
        # the config's init, not always Kaiming: a "gaussian" run must retrain from a gaussian A
        if self.lora_init == "gaussian":
            nn.init.normal_(target, std=1.0 / self.r, generator=generator)
        else:
            nn.init.kaiming_uniform_(target, a=math.sqrt(5), generator=generator)
        if target is not self.lora_A:
            self.lora_A.copy_(target)  # in place: bumps the version the fused casts are keyed on
        self.lora_B.zero_()

    @torch.no_grad()
    def exclude(self) -> None:
        """Make the branch inert: B = 0 and neither factor trains (``exclusion="zero"``)."""
        self.lora_B.zero_()
        self.lora_A.requires_grad_(False)
        self.lora_B.requires_grad_(False)
        self.adapter_param_names = ()  # instance override: injection must not mark them trainable
        self.excluded = True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.hyper_gate is None or self.disabled or self.merged:
            return super().forward(x, *args, **kwargs)
        # gate step: θ is a constant here (detached), only the gate carries a gradient
        base_out = self.base_layer(x, *args, **kwargs)
        dtype = base_out.dtype
        A, B = self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype)
        lora_out = (self._dropout(x).to(dtype) @ A.t()) @ B.t()
        w = self.lora_scaling * self.hyper_gate.float() ** self.gate_power
        return base_out + w.to(dtype) * lora_out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gate={self.gate:.4g}" + (", excluded" if self.excluded else "")


def _split_batch(batch: Any, size: int) -> list[Any]:
    """Micro-batches of ``size`` rows of a tensor / mapping / sequence of tensors (dim 0).

    A list or tuple holding no tensor (raw texts, ids, per-row metadata) whose length is the batch's
    row count (dim 0 of its first tensor) is a per-row field and is split with the tensors, so its
    entries stay aligned with the tensor rows. A list or tuple that holds tensors is a structure
    (``(x, y)``) and is split field by field. Anything else (scalars, strings, 0-d tensors, lists of
    another length) is shared by every micro-batch.
    """
    return _split_fields(batch, size, _batch_rows(batch))


def _batch_rows(batch: Any) -> int | None:
    """dim 0 of the first tensor (with at least one dim) in ``batch``, depth first; None if none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        rows = _batch_rows(v)
        if rows is not None:
            return rows
    return None


def _holds_tensor(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, Mapping):
        return any(_holds_tensor(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_holds_tensor(v) for v in x)
    return False


def _split_fields(batch: Any, size: int, rows: int | None) -> list[Any]:
    if isinstance(batch, torch.Tensor):
        # a 0-d tensor (e.g. a per-batch scalar) has no rows; ``split`` would raise on it
        return list(batch.split(size)) if batch.dim() > 0 else [batch]
    if isinstance(batch, Mapping):
        parts = {k: _split_fields(v, size, rows) for k, v in batch.items()}
        n = max((len(p) for p in parts.values()), default=1)
        return [{k: p[i] if len(p) == n else p[0] for k, p in parts.items()} for i in range(n)]
    if isinstance(batch, (list, tuple)):
        if not _holds_tensor(batch):
            # per-row values (texts next to input_ids): slicing keeps them aligned with the tensor rows
            if rows is not None and len(batch) == rows:
                return [batch[i : i + size] for i in range(0, rows, size)]
            return [batch]
        parts = [_split_fields(v, size, rows) for v in batch]
        n = max(len(p) for p in parts)
        fields = [[p[i] if len(p) == n else p[0] for p in parts] for i in range(n)]
        if hasattr(batch, "_fields"):  # a namedtuple's constructor takes its fields as separate arguments
            return [type(batch)(*f) for f in fields]
        return [type(batch)(f) for f in fields]
    return [batch]  # not splittable (a scalar, a string): shared by every micro-batch


# ---- the method -----------------------------------------------------------------------------------------
@register("flexora")
class Flexora(Method):
    """Flexora: gated LoRA search over layers, then LoRA retrained on the selected layers."""

    Config = FlexoraConfig
    supported_types = (nn.Linear,)

    def __init__(self, config: FlexoraConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        #: gated layers in model order (fixed at injection)
        self.layer_keys: list[str] = []
        #: α̂, shape (L,), fp32; created at the first need
        self.gate_logits: torch.Tensor | None = None
        self.gate_optimizer: torch.optim.Optimizer | None = None
        self.phase = "search"
        self.selected: list[str] | None = None
        self.selected_modules: list[str] | None = None
        self.excluded_modules: list[str] = []
        #: summed validation loss of the latest gate step
        self.last_gate_loss: float | None = None
        self.gate_steps = 0
        self._gate_source: Iterable[Any] | None = None
        self._gate_iter: Iterator[Any] | None = None
        self._pending: list[Any] = []  # micro-batches of a split batch not used yet
        self._gate_loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
        #: the trainer's global_step when the current batch started (see on_train_batch_start)
        self._step_at_batch_start: int | None = None
        self._restored_keys: list[str] = []
        self._restored_logits: list[float] | None = None
        #: gate micro-batches drawn so far, and how many a resumed fit skips before its first gate step
        self._micro_used = 0
        self._skip_micro = 0
        #: Adam state of α̂ from a checkpoint, loaded when the gate optimizer is created
        self._restored_gate_opt: dict[str, Any] | None = None
        #: global step at which the layers were selected (the retraining schedule starts there)
        self.selected_at_step: int | None = None
        self._resume_rebuild = False  # a fit resumed after the selection: rebuild optimizers in on_fit_start
        #: seed of the re-initialisation at the selection (``reinit``): ``torch.initial_seed()`` at the
        #: first fit start, saved with a search-phase checkpoint. Drawing from the global RNG instead
        #: made a fit resumed mid-search re-initialise differently: that RNG's state at the selection
        #: depends on every draw before it (each DataLoader iterator takes one), which Lightning does
        #: not checkpoint
        self.reinit_seed: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # the method rides on the model (deepcopy / pickle of the model copy it): a live DataLoader
        # iterator cannot be copied, and a copy of the gate data would copy the whole data set
        state = self.__dict__.copy()
        state["_gate_source"] = state["_gate_iter"] = None
        state["_pending"] = []
        return state

    @property
    def cfg(self) -> FlexoraConfig:
        return self.config  # type: ignore[return-value]

    def make_layer(self, base: nn.Module, name: str) -> FlexoraLinear:
        key = layer_key(name, self.cfg)
        if self.phase == "search" and key not in self.layer_keys:
            self.layer_keys.append(key)
        gate = 1.0
        if self.phase == "search" and self._restored_logits is not None and key in self._restored_keys:
            gate = gate_values(torch.tensor(self._restored_logits))[self._restored_keys.index(key)].item()
        layer = FlexoraLinear(base, self.cfg, gate=gate)
        if name in self.excluded_modules:
            layer.exclude()
        return layer

    # ---- gates ------------------------------------------------------------------------------------
    def _gates(self, device: torch.device | None = None) -> torch.Tensor:
        """α̂ as a leaf tensor with ``requires_grad`` (zeros, or the restored values)."""
        if self.gate_logits is None or self.gate_logits.numel() != len(self.layer_keys):
            if self._restored_logits is not None and self._restored_keys == self.layer_keys:
                init = torch.tensor(self._restored_logits, dtype=torch.float32)
            else:
                init = torch.zeros(len(self.layer_keys))
            self.gate_logits = init.requires_grad_(self.phase == "search")
            self.gate_optimizer = None
        if device is not None and self.gate_logits.device != device:
            self.gate_logits = self.gate_logits.detach().to(device).requires_grad_(self.phase == "search")
            self.gate_optimizer = None  # Adam state lives with the tensor it updates
        return self.gate_logits

    def set_gate_logits(self, logits: torch.Tensor | Sequence[float], layers: dict[str, AdapterLayer]) -> None:
        """Set α̂ (shape (L,)) and apply the gates to ``layers``."""
        if self.phase != "search":
            raise RuntimeError("gates exist only during the search phase")
        current = self._gates()
        values = torch.as_tensor(logits, dtype=torch.float32).reshape(-1)
        if values.numel() != current.numel():
            raise ValueError(f"expected {current.numel()} gate logits (one per layer), got {values.numel()}")
        with torch.no_grad():
            current.copy_(values.to(current.device))
        self.apply_gates(layers)

    def gates(self) -> dict[str, float]:
        """Gated layer -> current ``w_l`` (all 1.0 after the search: the gates are discarded)."""
        if self.phase != "search":
            return {k: 1.0 for k in (self.selected or [])}
        return dict(zip(self.layer_keys, gate_values(self._gates().detach()).tolist()))

    def apply_gates(self, layers: dict[str, AdapterLayer]) -> None:
        """Write ``w_l`` (from α̂) into every layer as its constant gate."""
        w = self.gates()
        for name, layer in _flexora_layers(layers).items():
            layer.set_gate(w.get(layer_key(name, self.cfg), 1.0))

    # ---- gate data and loss ---------------------------------------------------------------------------
    def set_gate_data(self, batches: Iterable[Any]) -> None:
        """Use ``batches`` (re-iterated when exhausted) for the gate step instead of the validation set."""
        self._gate_source, self._gate_iter, self._pending = batches, None, []

    def set_gate_loss(self, loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> None:
        """``loss_fn(pl_module, batch) -> scalar loss`` for the gate step (None: ``training_step``)."""
        self._gate_loss_fn = loss_fn

    def _gate_data(self, trainer: Any) -> Iterable[Any]:
        if self._gate_source is None:
            from lightning.pytorch.utilities.model_helpers import is_overridden

            dm = getattr(trainer, "datamodule", None)
            source = dm.val_dataloader() if dm is not None and is_overridden("val_dataloader", dm) else None
            if source is None:
                source = getattr(trainer, "val_dataloaders", None)
            if isinstance(source, (list, tuple)):
                source = source[0] if source else None
            if source is None:
                raise RuntimeError(
                    "Flexora needs validation batches for its gate step: give the Trainer a datamodule with "
                    "val_dataloader(), or call callback.method.set_gate_data(iterable)"
                )
            self._gate_source = source
        return self._gate_source

    def _next_gate_batches(self, trainer: Any) -> Iterator[Any]:
        """``gate_batches`` micro-batches; the source restarts when it runs out, and the unused rest
        of a split batch is kept for the next gate step (every validation row is used in turn)."""
        source = self._gate_data(trainer)
        while self._skip_micro > 0:  # a resumed fit: pass over what the first part of the fit used
            self._pull_micro(source)
            self._skip_micro -= 1
        for _ in range(self.cfg.gate_batches):
            self._micro_used += 1
            yield self._pull_micro(source)

    def _pull_micro(self, source: Iterable[Any]) -> Any:
        if not self._pending:
            if self._gate_iter is None:
                self._gate_iter = iter(source)
            try:
                batch = next(self._gate_iter)
            except StopIteration:
                self._gate_iter = iter(source)
                try:
                    batch = next(self._gate_iter)
                except StopIteration:
                    raise RuntimeError("Flexora: the gate data (validation set) is empty") from None
            size = self.cfg.gate_batch_size
            self._pending = [batch] if size is None else _split_batch(batch, size)
        return self._pending.pop(0)

    def _loss(self, pl_module: Any, batch: Any) -> torch.Tensor:
        if self._gate_loss_fn is not None:
            return self._gate_loss_fn(pl_module, batch)
        if getattr(pl_module, "automatic_optimization", True) is False:
            # a manual-optimisation training_step runs backward and optimizer.step() itself: called
            # here it trained θ on the validation batch (and advanced global_step), then autograd.grad
            # failed on the graph that backward had freed
            raise RuntimeError("Flexora: the module uses manual optimization, so its training_step cannot give the "
                               "gate loss; call callback.method.set_gate_loss(lambda module, batch: loss)")
        # the module's training_step gives the loss; its log calls would record validation batches
        # as training metrics, so they are muted for this call
        muted = ("log", "log_dict")
        for name in muted:
            object.__setattr__(pl_module, name, lambda *a, **k: None)
        try:
            out = pl_module.training_step(batch, 0)
        finally:
            for name in muted:
                object.__delattr__(pl_module, name)
        loss = out["loss"] if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError("Flexora: training_step must return a scalar loss (or {'loss': ...}) for the gate step")
        return loss

    # ---- the two steps ------------------------------------------------------------------------------
    def gate_step(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> float:
        """One Adam step on α̂ from ``∇_α̂ Σ_k L_val(batch_k)`` at the current θ (eval mode).

        θ enters detached: no gradient reaches the LoRA parameters, their ``.grad`` is untouched.
        Returns the summed validation loss.
        """
        flex = _flexora_layers(layers)
        index = {k: i for i, k in enumerate(self.layer_keys)}
        device = next(iter(flex.values())).lora_A.device
        alpha = self._gates(device)
        if self.gate_optimizer is None:
            self.gate_optimizer = torch.optim.Adam([alpha], lr=self.cfg.gate_lr)
            if self._restored_gate_opt is not None:  # resumed mid-search
                self.gate_optimizer.load_state_dict(_adam_state(self.gate_optimizer, self._restored_gate_opt))
                self._restored_gate_opt = None
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()  # as the code: dropout off for the validation loss
        strategy = getattr(trainer, "strategy", None)
        precision = getattr(trainer, "precision_plugin", None)
        grad = torch.zeros_like(alpha)
        total = torch.zeros((), device=device)
        try:
            for batch in self._next_gate_batches(trainer):
                if strategy is not None:
                    batch = strategy.batch_to_device(batch)
                with torch.enable_grad():
                    w = gate_values(alpha)
                    for name, layer in flex.items():
                        layer.hyper_gate = w[index[layer_key(name, self.cfg)]]
                    ctx = precision.train_step_context() if precision is not None else contextlib.nullcontext()
                    with ctx:
                        loss = self._loss(pl_module, batch)
                    (g,) = torch.autograd.grad(loss, alpha, allow_unused=True)
                if g is not None:
                    grad += g
                total += loss.detach().float()  # one host sync per gate step, below
        finally:
            for layer in flex.values():
                layer.hyper_gate = None
            for m, mode in modes.items():
                m.training = mode
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(grad)  # every process must select the same layers
            grad /= torch.distributed.get_world_size()
        # Checked here, not only at the selection: a NaN loss or α̂ would otherwise keep training with
        # NaN gates (and NaN Adam state) for every step up to ``search_steps``.
        step = getattr(trainer, "global_step", None)
        loss_value = float(total)  # host sync; read before the step so a NaN loss never reaches α̂
        if not math.isfinite(loss_value):  # stepping would only write NaN into α̂ and Adam's moments
            raise _diverged("gate loss", self.layer_keys, f"loss = {loss_value}", step)
        # α̂ and Adam's state before the step (a few floats per layer): a step that makes α̂ non-finite
        # is undone before it raises, so a caller that catches the error holds the last good search
        before = alpha.detach().clone(), copy.deepcopy(self.gate_optimizer.state_dict())
        alpha.grad = grad
        self.gate_optimizer.step()
        alpha.grad = None
        bad = _non_finite(self.layer_keys, alpha.detach().tolist())
        if bad:  # a finite loss with an infinite gradient, or an Adam step that overflowed
            with torch.no_grad():
                alpha.copy_(before[0])
            self.gate_optimizer.load_state_dict(before[1])
            raise _diverged("gate logit", list(bad), f"α̂ = {list(bad.values())}", step)
        self.apply_gates(layers)
        self.last_gate_loss = loss_value
        self.gate_steps += 1
        return self.last_gate_loss

    def on_fit_start(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        if self._resume_rebuild:  # resumed after the selection; Lightning loads the states next
            self._resume_rebuild = False
            if self.cfg.retrain_schedule == "fresh" and self.selected_at_step is not None:
                self._rebuild_optimizers(trainer, step=self.selected_at_step, fast_forward=False)
        if self.phase == "search":
            if self.reinit_seed is None:  # a new fit (a resumed one restored the checkpoint's seed)
                self.reinit_seed = torch.initial_seed()
            self._gates(next(iter(_flexora_layers(layers).values())).lora_A.device)
            total = getattr(trainer, "estimated_stepping_batches", math.inf)
            if total <= self.cfg.search_steps:
                warnings.warn(f"Flexora: the fit has {total} optimizer steps, search_steps={self.cfg.search_steps}: "
                              "it ends before any layer is selected or retrained", stacklevel=2)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        # read here, not at fit start: Lightning restores global_step on resume only after on_fit_start
        self._step_at_batch_start = int(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        if self.phase != "search":
            return
        step = int(trainer.global_step)
        if step == self._step_at_batch_start:
            return  # gradient accumulation: the optimizer did not step in this batch
        if step % self.cfg.gate_every == 0 or step >= self.cfg.search_steps:
            loss = self.gate_step(trainer, pl_module, layers)
            log = getattr(pl_module, "log", None)
            if callable(log):
                kw = dict(on_step=True, on_epoch=False, batch_size=1)
                log("flexora/gate_loss", loss, **kw)
                # the key's name is historical: it counts α̂_l > 0 (the selection rule), not w_l > 1
                log("flexora/layers_above_mean", float((self._gates() > 0).sum()), **kw)
        if step >= self.cfg.search_steps:
            self.finish_search(layers, root=pl_module, trainer=trainer)

    def finish_search(self, layers: dict[str, AdapterLayer], root: nn.Module, trainer: Any = None) -> list[str]:
        """Select layers from α̂, drop the others, re-init the kept ones, rebuild the optimizer.

        ``layers`` (name -> layer, names relative to the adapted model) is updated in place: removed
        modules leave it. ``root``: a module that contains the layers (the LightningModule).
        ``trainer``: when given, its optimizers and schedulers are rebuilt (see the module docstring).
        Returns the selected layers.
        """
        if self.phase != "search":
            raise RuntimeError("the search phase is already over")
        flex = _flexora_layers(layers)
        alpha = self._gates().detach()
        step = int(trainer.global_step) if trainer is not None else None
        self.selected = select_layers(alpha, self.layer_keys, self.cfg, step=step)  # raises on a NaN gate
        self._restored_logits = alpha.tolist()  # α̂ at selection, saved with the adapter
        self._restored_keys = list(self.layer_keys)
        keep = set(self.selected)
        self.selected_modules = [n for n in flex if layer_key(n, self.cfg) in keep]
        dropped = [n for n in flex if layer_key(n, self.cfg) not in keep]
        self.phase = "retrain"
        self.selected_at_step = step
        self.gate_optimizer = None
        self.gate_logits = alpha  # kept for reading; no longer trained
        for name in self.selected_modules:
            flex[name].set_gate(1.0)
            if self.cfg.reinit:
                flex[name].reset_lora(self._reinit_generator(name))
        if self.cfg.reinit:
            _broadcast_lora_A([flex[n] for n in self.selected_modules])
        if self.cfg.exclusion == "zero":
            for name in dropped:
                flex[name].set_gate(1.0)
                flex[name].exclude()
            self.excluded_modules = dropped
        else:
            _remove_adapters(layers, dropped, root)
        if trainer is not None:
            self._rebuild_optimizers(trainer)
        return self.selected

    def _reinit_generator(self, name: str) -> torch.Generator | None:
        """The generator module ``name`` draws its re-initialised A from: seeded by ``reinit_seed`` and
        the name, so the draw is the same in a resumed fit; None (the global RNG, as a plain
        ``finish_search`` outside a fit) while no seed is set."""
        if self.reinit_seed is None:
            return None
        return torch.Generator().manual_seed((self.reinit_seed + zlib.crc32(name.encode())) % 2**64)

    def _rebuild_optimizers(self, trainer: Any, step: int | None = None, fast_forward: bool = True) -> None:
        """The module's ``configure_optimizers`` again (only the selected LoRA now trains), fresh state.

        ``step``: the selection step (default: now). ``fast_forward=False`` leaves a "continue"
        schedule at step 0 (a resumed fit, whose scheduler state Lightning loads next)."""
        step = int(trainer.global_step) if step is None else step
        epoch_loop = trainer.fit_loop.epoch_loop  # holds max_steps (the fit loop's is a read-only view)
        max_steps = epoch_loop.max_steps
        if self.cfg.retrain_schedule == "fresh":
            total = trainer.estimated_stepping_batches
            if math.isfinite(total):  # the schedule sees the remaining steps as the whole run
                epoch_loop.max_steps = max(1, int(total) - step)
        try:
            trainer.strategy.setup_optimizers(trainer)
        finally:
            epoch_loop.max_steps = max_steps
        if self.cfg.retrain_schedule == "continue" and fast_forward:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
                for config in trainer.lr_scheduler_configs:
                    ticks = step if config.interval == "step" else trainer.current_epoch
                    for _ in range(ticks // max(1, config.frequency)):
                        config.scheduler.step()

    # ---- save / load (S4) ---------------------------------------------------------------------------
    def layer_metadata(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        """Phase, gated layers, α̂ and gates (at selection once retraining), selection.

        A non-finite α̂ raises a ValueError: ``json.dumps`` would write it as ``NaN`` / ``Infinity``,
        which strict JSON parsers reject, so the saved adapter could not be read back elsewhere.
        """
        meta = self._metadata()
        bad = _non_finite(meta["layers"], meta["gate_logits"])
        if bad:
            raise ValueError(f"Flexora: non-finite gate logit for layer(s) {list(bad)} (α̂ = {list(bad.values())}): "
                             "refusing to write it into the adapter metadata (not valid JSON); "
                             "set finite logits with set_gate_logits first")
        return meta

    def _metadata(self) -> dict[str, Any]:
        if self.phase == "search":
            logits = self._gates().detach().cpu().tolist()
        else:
            logits = list(self._restored_logits or [])
        meta = {
            "phase": self.phase,
            "layers": list(self.layer_keys),
            "gate_logits": logits,
            "gates": gate_values(torch.tensor(logits)).tolist() if logits else [],
            "selected": self.selected,
            "selected_modules": self.selected_modules,
            "excluded_modules": list(self.excluded_modules),
            "gate_steps": self.gate_steps,
            "selected_at_step": self.selected_at_step,
            "gate_micro_batches_used": self._micro_used,
        }
        if self.phase == "search" and self.reinit_seed is not None:  # for resuming a fit
            meta["reinit_seed"] = self.reinit_seed
        if self.phase == "search" and self.gate_optimizer is not None:  # for resuming a fit
            (state,) = self.gate_optimizer.state_dict()["state"].values() or [{}]
            if state:
                meta["gate_optimizer"] = {"step": float(state["step"]), "exp_avg": state["exp_avg"].tolist(),
                                          "exp_avg_sq": state["exp_avg_sq"].tolist()}
        return meta

    def restore_layer_metadata(self, meta: dict[str, Any]) -> None:
        """Inverse of :meth:`layer_metadata`, called before injection by the loaders. A retrained
        adapter then injects only its selected modules (``exclusion="remove"``)."""
        phase = meta.get("phase", "search")
        if phase not in ("search", "retrain"):
            raise ValueError(f"unknown Flexora phase {phase!r}")
        keys, logits = list(meta.get("layers", [])), [float(v) for v in meta.get("gate_logits", [])]
        if len(keys) != len(logits):
            raise ValueError(f"{len(logits)} gate logits for {len(keys)} layers")
        self._restored_keys, self._restored_logits = keys, logits
        self.gate_steps = int(meta.get("gate_steps", 0))
        self._micro_used = int(meta.get("gate_micro_batches_used", 0))
        self.selected_at_step = meta.get("selected_at_step")
        self._restored_gate_opt = meta.get("gate_optimizer") if phase == "search" else None
        seed = meta.get("reinit_seed") if phase == "search" else None
        self.reinit_seed = None if seed is None else int(seed)
        self.phase = phase
        if phase == "retrain":
            self.layer_keys = keys
            self.selected = list(meta["selected"])
            self.selected_modules = list(meta["selected_modules"])
            self.excluded_modules = list(meta.get("excluded_modules", []))
            self.gate_logits = torch.tensor(logits)
            if not self.excluded_modules:  # removed: inject exactly the selected modules
                # a regex of the full names (matched whole), not a list: a list entry also matches every
                # module whose name ends with "." + it, so a selected "fc" would re-adapt an unselected
                # "blk.fc", whose tensors the file does not hold
                exact = "|".join(f"(?:{re.escape(n)})" for n in self.selected_modules)
                self.config = dataclasses.replace(self.cfg, target_modules=exact, target_types=())

    def apply_layer_metadata(self, meta: dict[str, Any], layers: dict[str, AdapterLayer],
                             root: nn.Module | None = None) -> None:
        """Resume a fit: bring the injected (search-phase) layers to the checkpoint's state before its
        state dict is loaded. ``layers`` is updated in place (removed modules leave it); ``root``
        contains the layers (needed to remove unselected adapters)."""
        injected = list(self.layer_keys)
        self.restore_layer_metadata(meta)
        if self._restored_keys != injected:
            raise ValueError(f"checkpoint gates layers {self._restored_keys[:5]}, this model {injected[:5]}")
        flex = _flexora_layers(layers)
        if self.phase == "search":
            self.gate_logits, self.gate_optimizer = None, None  # rebuilt from the restored α̂ and Adam state
            self._gates()
            self.apply_gates(layers)
            self._skip_micro, self._gate_iter, self._pending = self._micro_used, None, []
            return
        keep = set(self.selected_modules or [])
        if not keep <= set(flex):
            raise ValueError(f"checkpoint selected modules this model lacks: {sorted(keep - set(flex))[:5]}")
        for name in keep:
            flex[name].set_gate(1.0)
        dropped = [n for n in flex if n not in keep]
        if self.excluded_modules:
            for name in dropped:
                flex[name].set_gate(1.0)
                flex[name].exclude()
        elif dropped:
            if root is None:
                raise ValueError("Flexora: resuming after the selection needs the root module to remove adapters")
            _remove_adapters(layers, dropped, root)
        self._resume_rebuild = True

    def summary(self) -> dict[str, Any]:
        """What the search found: phase, layers, α̂, gates, selection (JSON-serialisable; without the
        gate optimizer's state and the re-initialisation seed, which only a resumed fit needs). Unlike
        :meth:`layer_metadata` it does not refuse a non-finite α̂, so a diverged search can still be
        inspected."""
        meta = self._metadata()
        meta.pop("gate_optimizer", None)
        meta.pop("reinit_seed", None)
        return meta


def _remove_adapters(layers: dict[str, AdapterLayer], names: Sequence[str], root: nn.Module) -> None:
    """Give the modules ``names`` (keys of ``layers``) their base layer back inside ``root`` and drop
    them from ``layers``."""
    parents = {id(m): n for n, m in root.named_modules()}
    for name in names:
        full = parents.get(id(layers[name]))
        if full is None:
            raise RuntimeError(f"Flexora: adapter layer {name!r} is not inside the given root module")
        parent_name, _, child = full.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, layers[name].base_layer)
        del layers[name]


def _broadcast_lora_A(layers: Sequence[FlexoraLinear]) -> None:
    """Under ``torch.distributed``, give every process rank 0's freshly drawn ``lora_A``.

    The re-initialisation draws from each process's own RNG, whose state differs across processes
    unless every random draw so far was identical (unseeded runs, dropout on unevenly padded
    batches): DDP broadcasts parameters only when it wraps the model, so without this the processes
    would retrain different adapters (their averaged gradients never bring them back together).
    Every process reaches the selection at the same optimizer step, so the collectives line up.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for layer in layers:
        with torch.no_grad():
            buf = layer.lora_A.detach().clone()
            torch.distributed.broadcast(buf, src=0)
            layer.lora_A.copy_(buf)  # an in-place write: bumps the version the fused casts are keyed on


def _adam_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict for ``optimizer`` (Adam over α̂ alone) from :meth:`Flexora.layer_metadata`'s lists."""
    param = optimizer.param_groups[0]["params"][0]
    state = {"step": torch.tensor(float(saved["step"])),
             "exp_avg": torch.tensor(saved["exp_avg"], dtype=param.dtype, device=param.device),
             "exp_avg_sq": torch.tensor(saved["exp_avg_sq"], dtype=param.dtype, device=param.device)}
    return {"state": {0: state}, "param_groups": optimizer.state_dict()["param_groups"]}


def _flexora_layers(layers: dict[str, AdapterLayer]) -> dict[str, FlexoraLinear]:
    return {n: layer for n, layer in layers.items() if isinstance(layer, FlexoraLinear)}


def read_flexora_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The Flexora state saved by ``save_adapter`` in ``directory`` (see :meth:`Flexora.layer_metadata`)."""
    from ..core.state import WEIGHTS_NAME

    path = Path(directory) / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("lightning_lora_method") != "flexora":
        raise ValueError(f"{path}: not a Flexora adapter (method {meta.get('lightning_lora_method')!r})")
    return json.loads(meta["lightning_lora_layer_metadata"])
