"""IncreLoRA (Zhang et al. 2023, https://arxiv.org/abs/2308.12043): start every module at a tiny rank
and add ranks during training to the modules with the highest smoothed importance, until a total
budget is spent. METHODS.md §15; official code ``FeiyuZhang98/IncreLoRA`` (``loralib/increlora.py``,
``NLU/src/transformers/{trainer,optimization}.py``).

Equations [code]:

- ``ΔW = α/(ρ + 1e-5) · Σ_i e_i b_i a_iᵀ = α/(ρ + 1e-5) · B diag(e) A``; ρ = activated ranks of the
  module; α = ``alpha`` (``r`` when ``alpha <= 0``). Components: ``a_i`` (1×n), ``b_i`` (m×1), ``e_i``.
- importance per module and step: ``S = Σ|ΔW ⊙ ∂L/∂ΔW| / √(mn)``;
  ``Ī ← β1 Ī + (1−β1) S``; ``Ū ← β2 Ū + (1−β2) |S − Ī|``; score ``Ī·Ū``.
- regulariser ``R = 1/(2M) Σ_modules (‖AAᵀ − I‖_F + ‖BᵀB − I‖_F)`` over all components, reserves
  included (Frobenius norm not squared; ``orth_squared=True`` squares it); loss ``L + γR``.

Schedule (phases) [code]:

1. init: component 0 of rank ``r`` with ``e = 0``, ``a, b ~ N(0, 0.02²)``; with advance learning one
   reserve per module (``incre_rank_num`` rank-1 components): ``e = 1e-5`` fixed, a, b train.
2. warm-up: steps ``t ≤ init_warmup``: scores are tracked, nothing is added.
3. growth: at ``t > init_warmup`` with ``t % interval == 0`` while the budget is not spent: the top-h
   modules by ``Ī·Ū`` activate their reserve (e becomes a trainable parameter starting at 1e-5;
   ρ += incre_rank_num) and get a fresh reserve. The new parameters form ONE new optimizer param
   group per round, with its own learning-rate clock: linear warm-up over ``group_warmup_steps``
   from lr 0, then linear decay to 0 at the end of training (the code's ``Multi_LambdaLR``).
4. final: once the budget is spent, reserves are deleted (the code sets their e to 0: the same
   output, but its dead a, b stayed trainable), the dense score path and its hooks are switched off.

Budgets: ``target_rank × #modules`` ranks (paper, or ``target_total_rank``), or a parameter budget
``budget_lora_r = k``: the final trainable count ``Σ ρ(m+n+1)`` may not exceed LoRA rank k's
``k·Σ(m+n)`` on the same modules (modules whose next rank does not fit are skipped; the gap at the
end is below one rank of the largest module). :func:`lora_param_count` and :func:`active_param_count`
give both counts.

Design choices (see METHODS.md open choices; defaults follow the paper/code):

- Parameters are grown, not pre-allocated to r_max with a mask: every component is its own
  ``nn.Parameter`` named ``lora_A_<i>``, ``lora_B_<i>``, ``lora_E_<i>`` (reserve e: buffer
  ``reserve_E_<i>``). A mask would make the trainable set (S3/S6 counts), AdamW state and weight
  decay of inactive slots wrong, and a per-slot warm-up cannot be expressed through param groups.
  Parameter objects never change when a reserve is activated, so AdamW states survive growth.
- Optimizer groups are a function of the structure: the user's groups (``configure_optimizers``)
  hold the parameters that exist at fit start; group ``k`` (k ≥ 1) holds, per module in model order,
  the e's activated in round k then the a, b created in round k. On resume the structure is rebuilt
  from the checkpoint before the state dict is loaded (``apply_layer_metadata``, called by
  AdapterCallback), and ``on_fit_start`` rebuilds the groups by parameter name and extends the
  ``LambdaLR`` before Lightning loads the optimizer and scheduler states, so ``N + N`` steps with a
  checkpoint in between equal ``2N`` steps (tested across growth events).
- Supported LR schedulers: ``LambdaLR`` (incl. transformers' ``get_*_schedule_with_warmup``) stepped
  every optimizer step, or none (then the method sets the lr of its groups every step).
- The regulariser needs no change to the LightningModule: ``on_after_backward`` adds ``γ∇R`` to the
  gradients once per optimizer step (last micro-batch; ×loss-scale under fp16 AMP). ``R`` does not
  depend on the data, so this equals back-propagating ``L + γR``. Users who add
  :func:`orthogonality_regularizer` to their own loss set ``orth_reg=0``.
- Scores: while the budget is not spent, the forward builds the dense ``ΔW`` (as the code) and a
  tensor hook collects ``∂L/∂ΔW``, summed over the micro-batches of one optimizer step (the code
  keeps only the last micro-batch); afterwards the cheaper low-rank path is used. Under DDP the
  per-module scores are averaged across processes, and gradients of parameters added after DDP
  wrapped the model are all-reduced by the method.
- Ties at the h-th score: ``tie_break="exact"`` (default) takes exactly h modules, ties broken by
  module order; ``"threshold"`` takes every module ≥ the h-th score as the code does (clamped by
  the budget so it is never exceeded).
- ``incre_rank_num``: 1 (default: the rank=2 GLUE scripts and the rank=8 MNLI script); 0 = the code's
  mapping {2:1, 4:2, 6:3, 8:4}[target_rank], which the rank=8 SST-2 and RTE scripts get (they pass no
  ``--incre_rank_num``, so 4 ranks per chosen module per round and 4 rank-1 reserves per module).
- The initial reserves are created with the layer (they are in the user's optimizer group from the
  start); the code adds them at step 0 in a group whose schedule is the global one shifted by one step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import adapter_torch_dtype, AdapterConfig, finite_number, Method, register, whole_number
from ..core.inject import adapter_layers
from ..core.layer import AdapterLayer, no_autocast

_CODE_RANK_NUM = {2: 1, 4: 2, 6: 3, 8: 4}


@dataclass
class IncreLoRAConfig(AdapterConfig):
    """IncreLoRA options (defaults: official GLUE scripts).

    Attributes:
        r: initial rank of every module (``lora_r``).
        alpha: scale numerator, ``ΔW = alpha/(ρ+1e-5)·B diag(e) A``; ``<= 0`` means ``r``.
        target_rank: average final rank; rank budget ``target_rank × #modules``.
        target_total_rank: total rank budget (overrides ``target_rank``).
        budget_lora_r: parameter budget instead of a rank budget: the trainable parameters of LoRA of
            this rank on the same modules (``k·Σ(m+n)``); the final ``Σρ(m+n+1)`` stays below it.
        init_warmup: no allocation at steps ``t <= init_warmup``.
        interval: allocation at steps ``t % interval == 0``.
        top_h: modules that get ranks per allocation.
        incre_rank_num: ranks added to a chosen module per allocation (also the reserve size); 0 = the
            code's default mapping from ``target_rank`` (what the official rank=8 SST-2/RTE scripts run:
            4); with ``budget_lora_r`` give the number itself.
        advance_learning: reserves train before activation (``e = reserve_e``, a and b trainable).
        reserve_e: fixed e of a reserve (code: 1e-5).
        beta1, beta2: EMA coefficients of sensitivity and uncertainty.
        orth_reg: γ of the orthogonality regulariser (paper: 0.1; 0.3 for RTE); 0 switches it off.
        orth_squared: square the Frobenius norms (code: not squared).
        tie_break: ``"exact"`` (exactly top-h, ties by module order) or ``"threshold"`` (code).
        group_warmup_steps: warm-up of each new param group; None = ``interval`` (the paper's scripts
            use warmup_steps = incre_interval).
        total_steps: end of the new groups' linear decay; None = ``trainer.estimated_stepping_batches``.
        init_std: std of the normal init of a and b.
        seed: seed of the components added during training (a pure function of seed, round, layer
            and component: a resumed run adds the same ones); None = drawn from torch's global RNG at
            injection (so ``seed_everything`` decides) and saved with the adapter.
        rank_eps: the code's ``ρ + 1e-5`` in the scale.
        dropout: dropout on the adapter branch input (train mode only).
        adapter_dtype: dtype of the adapter parameters.
    """

    r: int = 1
    alpha: float = 16.0
    target_rank: int = 8
    target_total_rank: int | None = None
    budget_lora_r: int | None = None
    init_warmup: int = 100
    interval: int = 100
    top_h: int = 2
    incre_rank_num: int = 1
    advance_learning: bool = True
    reserve_e: float = 1e-5
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.1
    orth_squared: bool = False
    tie_break: str = "exact"
    group_warmup_steps: int | None = None
    total_steps: int | None = None
    init_std: float = 0.02
    seed: int | None = None
    rank_eps: float = 1e-5
    dropout: float = 0.0
    adapter_dtype: str = "float32"

    # incre_rank_num=0 is resolved from target_rank in __post_init__ like a defaulted field, but the
    # declared default stays 1 (the scripts' value, 0 would give 4 at the default target_rank):
    # naming the sentinel here lets the derived-defaults record note it, so make_config restores 0
    # and re-derives when target_rank changes instead of keeping the old target_rank's value
    derived_sentinels: ClassVar[dict[str, tuple[Any, ...]]] = {"incre_rank_num": (0,)}

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("r", "target_rank", "init_warmup", "interval", "top_h", "incre_rank_num"):
            setattr(self, key, whole_number(getattr(self, key), f"IncreLoRA {key}"))
        for key in ("target_total_rank", "budget_lora_r", "group_warmup_steps", "total_steps", "seed"):
            setattr(self, key, whole_number(getattr(self, key), f"IncreLoRA {key}", optional=True))
        # total_steps <= 0 gave every grown group lr 0 for good (the decay ends at total_steps): the
        # added ranks silently never trained; a negative warm-up was taken as none, silently
        if self.target_total_rank is not None and self.target_total_rank < 1:  # else an error at fit start
            raise ValueError(f"IncreLoRA target_total_rank must be None or >= 1, got {self.target_total_rank}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"IncreLoRA total_steps must be None or >= 1, got {self.total_steps}")
        if self.group_warmup_steps is not None and self.group_warmup_steps < 0:
            raise ValueError(f"IncreLoRA group_warmup_steps must be None or >= 0, got {self.group_warmup_steps}")
        # NaN passed every range check below (orth_reg NaN: NaN gradients from the regulariser)
        for key in ("alpha", "reserve_e", "orth_reg", "init_std", "rank_eps"):
            setattr(self, key, finite_number(getattr(self, key), f"IncreLoRA {key}"))
        if self.init_std < 0 or self.rank_eps < 0:
            raise ValueError(f"IncreLoRA init_std and rank_eps must be >= 0, got {self.init_std}, {self.rank_eps}")
        if self.r < 1:
            raise ValueError(f"IncreLoRA initial rank r must be >= 1, got {self.r}")
        if self.incre_rank_num == 0:
            if self.target_rank not in _CODE_RANK_NUM:
                raise ValueError(f"incre_rank_num=0 maps target_rank in {sorted(_CODE_RANK_NUM)}, got {self.target_rank}")
            self.incre_rank_num = _CODE_RANK_NUM[self.target_rank]
        if self.incre_rank_num < 1:
            raise ValueError(f"incre_rank_num must be >= 1 (or 0 for the code's mapping), got {self.incre_rank_num}")
        if self.target_rank < self.r:
            raise ValueError(f"target_rank ({self.target_rank}) must be >= the initial rank r ({self.r})")
        if self.budget_lora_r is not None and self.budget_lora_r < 1:
            raise ValueError(f"budget_lora_r must be >= 1, got {self.budget_lora_r}")
        if self.interval < 1 or self.top_h < 1 or self.init_warmup < 0:
            raise ValueError("interval and top_h must be >= 1 and init_warmup >= 0")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"beta1, beta2 must lie in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg < 0:
            raise ValueError(f"orth_reg must be >= 0, got {self.orth_reg}")
        if self.tie_break not in ("exact", "threshold"):
            raise ValueError(f"tie_break must be 'exact' or 'threshold', got {self.tie_break!r}")

    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha > 0 else float(self.r)


class IncreLoRALinear(AdapterLayer):
    """IncreLoRA on an ``nn.Linear`` / transformers ``Conv1D``: a growable list of components.

    Component i: ``lora_A_<i>`` (r_i, in), ``lora_B_<i>`` (out, r_i) and, once active, ``lora_E_<i>``
    (r_i,); a reserve keeps its e in the buffer ``reserve_E_<i>`` (r_i,) instead. Reserves are the last
    components. ``score_state`` (buffer, fp32): ``[Ī, Ū, last S]``.

    Structure (plain lists, saved as layer metadata): ``ranks[i]``, ``created[i]`` (allocation round
    that created it; 0 = init) and ``activated[i]`` (round that activated it; None = reserve).
    """

    adapter_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, config: IncreLoRAConfig, structure: dict[str, list] | None = None) -> None:
        super().__init__(base_layer)
        self.alpha = config.scale_alpha
        self.rank_eps = config.rank_eps
        self.dropout_p = config.dropout
        self.init_std = config.init_std
        self.reserve_e = config.reserve_e if config.advance_learning else 0.0
        self._dtype = adapter_torch_dtype(config.adapter_dtype)
        self.ranks: list[int] = []
        self.created: list[int] = []
        self.activated: list[int | None] = []
        self.scoring = True  # dense ΔW path with a gradient hook while the budget is not spent
        self._grad_sum: torch.Tensor | None = None  # Σ ∂L/∂ΔW over the micro-batches of one step
        self._dw_seen: torch.Tensor | None = None  # ΔW of the latest scored forward (detached, fp32)
        self.register_buffer("score_state", torch.zeros(3, dtype=torch.float32, device=base_layer.weight.device))
        if structure is None:
            self.add_component(config.r, round_=0, active=True, e_init=0.0)
            if config.advance_learning:
                for _ in range(config.incre_rank_num):
                    self.add_component(1, round_=0, active=False)
        else:
            self.rebuild(structure)

    # ---- structure --------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """ρ: activated ranks."""
        return sum(r for r, a in zip(self.ranks, self.activated) if a is not None)

    @property
    def n_reserve(self) -> int:
        return sum(1 for a in self.activated if a is None)

    def _device(self) -> torch.device:
        return self.base_layer.weight.device

    def add_component(self, rank: int, round_: int, active: bool, e_init: float | None = None,
                      generator: torch.Generator | None = None) -> None:
        """Append component ``len(ranks)``: a, b ~ N(0, init_std²) (drawn on the CPU from ``generator``
        when given, else from the global RNG); e = ``e_init`` (active) or the reserve e (buffer).
        Parameters are created trainable."""
        i = len(self.ranks)
        dev, dt = self._device(), self._dtype
        if generator is None:
            a = torch.empty(rank, self.in_features, dtype=dt, device=dev).normal_(0.0, self.init_std)
            b = torch.empty(self.out_features, rank, dtype=dt, device=dev).normal_(0.0, self.init_std)
        else:
            a = torch.empty(rank, self.in_features).normal_(0.0, self.init_std, generator=generator).to(dev, dt)
            b = torch.empty(self.out_features, rank).normal_(0.0, self.init_std, generator=generator).to(dev, dt)
        a, b = nn.Parameter(a), nn.Parameter(b)
        self.register_parameter(f"lora_A_{i}", a)
        self.register_parameter(f"lora_B_{i}", b)
        if active:
            self.register_parameter(f"lora_E_{i}", nn.Parameter(torch.full((rank,), float(e_init or 0.0), dtype=dt, device=dev)))
        else:
            self.register_buffer(f"reserve_E_{i}", torch.full((rank,), self.reserve_e, dtype=dt, device=dev))
        self.ranks.append(rank)
        self.created.append(round_)
        self.activated.append(round_ if active else None)
        self._refresh_names()

    def activate(self, i: int, round_: int) -> nn.Parameter:
        """Reserve i becomes active: its e turns into a trainable parameter starting at the reserve value."""
        if self.activated[i] is not None:
            raise RuntimeError(f"component {i} is already active")
        e = getattr(self, f"reserve_E_{i}")
        delattr(self, f"reserve_E_{i}")
        p = nn.Parameter(e.detach().clone())
        self.register_parameter(f"lora_E_{i}", p)
        self.activated[i] = round_
        self._refresh_names()
        return p

    def drop_reserves(self) -> list[nn.Parameter]:
        """Delete every reserve (they are the last components); returns their a, b parameters."""
        dropped: list[nn.Parameter] = []
        while self.activated and self.activated[-1] is None:
            i = len(self.ranks) - 1
            dropped += [getattr(self, f"lora_A_{i}"), getattr(self, f"lora_B_{i}")]
            for name in (f"lora_A_{i}", f"lora_B_{i}", f"reserve_E_{i}"):
                delattr(self, name)
            self.ranks.pop(), self.created.pop(), self.activated.pop()
        self._refresh_names()
        return dropped

    def _refresh_names(self) -> None:
        names = []
        for i, act in enumerate(self.activated):
            names += [f"lora_A_{i}", f"lora_B_{i}"] + ([f"lora_E_{i}"] if act is not None else [])
        self.adapter_param_names = tuple(names)

    def structure(self) -> dict[str, list]:
        return {"ranks": list(self.ranks), "created": list(self.created), "activated": list(self.activated),
                "scoring": self.scoring}

    def rebuild(self, structure: dict[str, Any]) -> None:
        """Replace all components by fresh ones of the saved shapes (values come from a state dict)."""
        for i in range(len(self.ranks)):
            for name in (f"lora_A_{i}", f"lora_B_{i}", f"lora_E_{i}", f"reserve_E_{i}"):
                if hasattr(self, name):
                    delattr(self, name)
        self.ranks, self.created, self.activated = [], [], []
        ranks, created, activated = structure["ranks"], structure["created"], structure["activated"]
        if not (len(ranks) == len(created) == len(activated)) or not ranks or activated[0] is None:
            raise ValueError(f"invalid IncreLoRA layer structure {structure}")
        for r, c, a in zip(ranks, created, activated):
            self.add_component(int(r), int(c), active=a is not None)
            if a is not None:
                self.activated[-1] = int(a)
        self.scoring = bool(structure.get("scoring", True))

    # ---- the update -------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``(A (R, in), B (out, R), e (R,), s)`` over all components, reserves included; ``s = α/(ρ+eps)``."""
        n = len(self.ranks)
        A = torch.cat([getattr(self, f"lora_A_{i}") for i in range(n)], 0)
        B = torch.cat([getattr(self, f"lora_B_{i}") for i in range(n)], 1)
        e = torch.cat([getattr(self, f"lora_E_{i}" if self.activated[i] is not None else f"reserve_E_{i}") for i in range(n)])
        return A, B, e, self.alpha / (self.rank + self.rank_eps)

    def delta_weight(self) -> torch.Tensor:
        """``s · B diag(e) A`` in fp32, shape (out, in)."""
        A, B, e, s = self.factors()
        with no_autocast(A.device):
            return s * ((B.float() * e.float()) @ A.float())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base_out = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return base_out
        dtype = base_out.dtype
        xd = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        if self.scoring and self.training and torch.is_grad_enabled():
            dw = self.delta_weight()  # (out, in) fp32: its gradient is ∂L/∂ΔW
            if dw.requires_grad:
                self._dw_seen = dw.detach()
                dw.register_hook(self._collect_grad)
            return base_out + F.linear(xd.to(dtype), dw.to(dtype))
        A, B, e, s = self.factors()
        # e scales the (tokens, R) intermediate: in bf16 its gradient is a sum over tokens, far less
        # rounding than through a rescaled A
        lora_out = ((xd.to(dtype) @ A.to(dtype).t()) * e.to(dtype)) @ B.to(dtype).t()
        return base_out + s * lora_out

    def _collect_grad(self, g: torch.Tensor) -> None:
        g = g.detach().float()
        self._grad_sum = g.clone() if self._grad_sum is None else self._grad_sum.add_(g)

    def take_sensitivity(self) -> torch.Tensor | None:
        """``S = Σ|ΔW ⊙ ∂L/∂ΔW| / √(mn)`` (fp32 scalar) of the step just finished, or None without a
        scored backward; resets the collected gradient."""
        if self._grad_sum is None or self._dw_seen is None:
            return None
        s = (self._dw_seen.abs() * self._grad_sum.abs()).sum() / math.sqrt(self._dw_seen.numel())
        self._grad_sum = None
        self._dw_seen = None
        return s

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, reserves={self.n_reserve}, alpha={self.alpha:g}"


# ---- free functions ---------------------------------------------------------------------------------
def _increlora_layers(model_or_layers: nn.Module | dict[str, AdapterLayer]) -> dict[str, IncreLoRALinear]:
    layers = model_or_layers if isinstance(model_or_layers, dict) else adapter_layers(model_or_layers)
    out = {n: layer for n, layer in layers.items() if isinstance(layer, IncreLoRALinear)}
    if not out:
        raise ValueError("no IncreLoRA layers found; inject_adapter(model, 'increlora', ...) first")
    return out


def lora_param_count(model_or_layers: nn.Module | dict[str, AdapterLayer], r: int) -> int:
    """Trainable parameters of LoRA rank ``r`` on the same modules: ``r·Σ(m+n)``."""
    return sum(r * (layer.in_features + layer.out_features) for layer in _increlora_layers(model_or_layers).values())


def active_param_count(model_or_layers: nn.Module | dict[str, AdapterLayer]) -> int:
    """IncreLoRA's parameter count without reserves: ``Σ ρ(m+n+1)`` (the paper's count)."""
    return sum(layer.rank * (layer.in_features + layer.out_features + 1)
               for layer in _increlora_layers(model_or_layers).values())


def total_rank(model_or_layers: nn.Module | dict[str, AdapterLayer]) -> int:
    return sum(layer.rank for layer in _increlora_layers(model_or_layers).values())


def orthogonality_regularizer(model_or_layers: nn.Module | dict[str, AdapterLayer], squared: bool = False) -> torch.Tensor:
    """``R = 1/(2M) Σ (‖AAᵀ − I‖_F + ‖BᵀB − I‖_F)`` over all components (fp32, differentiable)."""
    layers = _increlora_layers(model_or_layers)
    total = None
    for layer in layers.values():
        A, B, _, _ = layer.factors()
        with no_autocast(A.device):
            A, B = A.float(), B.float()
            eye = torch.eye(A.shape[0], device=A.device)
            terms = torch.linalg.matrix_norm(A @ A.t() - eye), torch.linalg.matrix_norm(B.t() @ B - eye)
        for t in terms:
            t = t.square() if squared else t
            total = t if total is None else total + t
    assert total is not None
    return total / (2 * len(layers))


class _GroupSchedule:
    """LR factor of a param group added at step ``start``: linear warm-up over ``warmup`` steps from 0,
    then linear decay to 0 at ``total`` (the code's ``Multi_LambdaLR``). A callable object, not a
    function, so ``LambdaLR.state_dict`` saves its fields."""

    def __init__(self, start: int, warmup: int, total: int) -> None:
        self.start, self.warmup, self.total = int(start), int(warmup), int(total)

    def __call__(self, step: int) -> float:
        s = step - self.start
        if s < self.warmup:
            return max(0.0, s / max(1, self.warmup))
        remaining = self.total - self.start
        return max(0.0, (remaining - s) / max(1, remaining - self.warmup))


@register("increlora")
class IncreLoRA(Method):
    """IncreLoRA: rank allocation by smoothed importance (see the module docstring)."""

    Config = IncreLoRAConfig
    supported_types = (nn.Linear,)

    def __init__(self, config: IncreLoRAConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        self._restored: dict[str, dict[str, Any]] = {}
        #: seed of the components added during training (config ``seed``, else drawn at injection)
        self.seed: int | None = config.seed
        #: start step of allocation round k (k = 1, 2, ...): ``rounds[k-1]``
        self.rounds: list[int] = []
        #: modules chosen in each round
        self.allocations: list[list[str]] = []
        self.finished = False
        #: the trainer's global_step when the current batch started: unchanged at its end means the
        #: optimizer did not step (gradient accumulation). Read at batch start, not at fit start:
        #: Lightning restores global_step on resume only after on_fit_start
        self._step_at_batch_start: int | None = None
        self._total_steps: int | None = None
        self._base_lr: float | None = None

    @property
    def cfg(self) -> IncreLoRAConfig:
        return self.config  # type: ignore[return-value]

    def make_layer(self, base: nn.Module, name: str) -> IncreLoRALinear:
        if self.seed is None:  # drawn from the global RNG (seed_everything), saved with the structure
            self.seed = int(torch.randint(0, 2**62, (1,)).item())
        return IncreLoRALinear(base, self.cfg, self._restored.get(name))

    def _generator(self, k: int, layer_index: int, component: int) -> torch.Generator:
        """RNG of a component added during training: a pure function of (seed, round, layer, component),
        so a resumed run draws the same new components as an uninterrupted one."""
        key = random.Random(f"increlora:{self.seed}:{k}:{layer_index}:{component}").getrandbits(63)
        return torch.Generator().manual_seed(key)

    # ---- budget -------------------------------------------------------------------------------
    def rank_budget(self, layers: dict[str, IncreLoRALinear]) -> int:
        c = self.cfg
        return c.target_total_rank if c.target_total_rank is not None else c.target_rank * len(layers)

    def param_budget(self, layers: dict[str, IncreLoRALinear]) -> int | None:
        return None if self.cfg.budget_lora_r is None else lora_param_count(layers, self.cfg.budget_lora_r)

    def _cost(self, layer: IncreLoRALinear, ranks: int) -> int:
        return ranks * (layer.in_features + layer.out_features + 1)

    def budget_left(self, layers: dict[str, IncreLoRALinear]) -> bool:
        """Whether any module can still get a rank."""
        pb = self.param_budget(layers)
        if pb is None:
            return total_rank(layers) < self.rank_budget(layers)
        left = pb - active_param_count(layers)
        return any(self._cost(layer, 1) <= left for layer in layers.values())

    # ---- importance -----------------------------------------------------------------------------
    def update_scores(self, layers: dict[str, IncreLoRALinear], trainer: Any = None) -> None:
        """EMA update of ``[Ī, Ū]`` from this step's sensitivities (averaged over DDP processes)."""
        names = list(layers)
        s_list = []
        for n in names:
            layer = layers[n]
            s = layer.take_sensitivity()
            s_list.append(layer.score_state[2].float() if s is None else s.to(layer.score_state.device))
        s_vec = torch.stack(s_list)
        if trainer is not None and getattr(trainer, "world_size", 1) > 1:
            s_vec = trainer.strategy.reduce(s_vec, reduce_op="mean")
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for n, s in zip(names, s_vec):
            st = layers[n].score_state
            ipt = b1 * st[0].float() + (1 - b1) * s
            unc = b2 * st[1].float() + (1 - b2) * (s - ipt).abs()
            st.copy_(torch.stack([ipt, unc, s]).to(st.dtype))

    def scores(self, layers: dict[str, IncreLoRALinear]) -> dict[str, float]:
        """``Ī·Ū`` per module."""
        return {n: float(layer.score_state[0].float() * layer.score_state[1].float()) for n, layer in layers.items()}

    def choose(self, layers: dict[str, IncreLoRALinear]) -> list[tuple[str, int]]:
        """``[(module, ranks to add)]`` of one allocation, within the budget."""
        c = self.cfg
        sc = self.scores(layers)
        order = sorted(range(len(sc)), key=lambda i: (-list(sc.values())[i], i))
        names = [list(sc)[i] for i in order]
        pb = self.param_budget(layers)
        chosen: list[tuple[str, int]] = []
        if pb is None:
            left = self.rank_budget(layers) - total_rank(layers)
            h = min(c.top_h, math.ceil(left / c.incre_rank_num))
            picked = names[:h]
            if c.tie_break == "threshold" and h > 0:
                thr = sc[names[h - 1]]
                picked = [n for n in names if sc[n] >= thr]
            for n in picked:
                add = min(c.incre_rank_num, left)
                if add <= 0:
                    break
                chosen.append((n, add))
                left -= add
            return chosen
        left = pb - active_param_count(layers)
        thr = None
        for n in names:
            if len(chosen) >= c.top_h and (c.tie_break == "exact" or sc[n] < thr):  # type: ignore[operator]
                break
            layer = layers[n]
            add = min(c.incre_rank_num, left // (layer.in_features + layer.out_features + 1))
            if add >= 1:
                chosen.append((n, add))
                left -= self._cost(layer, add)
                thr = sc[n]
        return chosen

    # ---- growth -------------------------------------------------------------------------------
    def grow(self, layers: dict[str, IncreLoRALinear], chosen: list[tuple[str, int]], step: int) -> int:
        """Activate reserves / add components of ``chosen`` as allocation round k; returns k."""
        k = len(self.rounds) + 1
        c = self.cfg
        index = {n: j for j, n in enumerate(layers)}
        for name, add in chosen:
            layer = layers[name]
            if layer.merged:
                raise RuntimeError(f"{name}: cannot add ranks to a merged adapter")
            if c.advance_learning:
                reserves = [i for i, a in enumerate(layer.activated) if a is None][:add]
                for i in reserves:
                    layer.activate(i, k)
            for _ in range(add):
                g = self._generator(k, index[name], len(layer.ranks))
                if c.advance_learning:
                    layer.add_component(1, round_=k, active=False, generator=g)
                else:
                    layer.add_component(1, round_=k, active=True, e_init=0.0, generator=g)
        self.rounds.append(int(step))
        self.allocations.append([n for n, _ in chosen])
        return k

    def finish(self, layers: dict[str, IncreLoRALinear]) -> list[nn.Parameter]:
        """Final phase: delete reserves, stop scoring. Returns the deleted parameters."""
        dropped: list[nn.Parameter] = []
        for layer in layers.values():
            dropped += layer.drop_reserves()
            layer.scoring = False
            layer._grad_sum = layer._dw_seen = None
        self.finished = True
        return dropped

    @staticmethod
    def group_params(layers: dict[str, IncreLoRALinear], k: int) -> list[nn.Parameter]:
        """Parameters of allocation round k's optimizer group, in a fixed order (see module docstring)."""
        out: list[nn.Parameter] = []
        for layer in layers.values():
            out += [getattr(layer, f"lora_E_{i}") for i, a in enumerate(layer.activated) if a == k and layer.created[i] != k]
            for i, cr in enumerate(layer.created):
                if cr == k:
                    out += [getattr(layer, f"lora_A_{i}"), getattr(layer, f"lora_B_{i}")]
                    if layer.activated[i] == k:
                        out.append(getattr(layer, f"lora_E_{i}"))
        return out

    # ---- optimizer / scheduler ------------------------------------------------------------------
    @staticmethod
    def _optimizer_and_scheduler(trainer: Any) -> tuple[torch.optim.Optimizer, Any]:
        if not trainer.optimizers:
            raise RuntimeError("IncreLoRA needs an optimizer (configure_optimizers) to add ranks to")
        opt = trainer.optimizers[0]
        opt = getattr(opt, "optimizer", opt)  # LightningOptimizer wraps the torch optimizer
        scheds = [cfg.scheduler for cfg in trainer.lr_scheduler_configs if getattr(cfg.scheduler, "optimizer", None) is opt]
        for s in scheds:
            if not isinstance(s, torch.optim.lr_scheduler.LambdaLR):
                raise TypeError(
                    f"IncreLoRA adds param groups with their own warm-up; it supports a LambdaLR scheduler "
                    f"(e.g. transformers' get_linear_schedule_with_warmup) or none, got {type(s).__name__}"
                )
        return opt, (scheds[0] if scheds else None)

    def _add_group(self, trainer: Any, params: list[nn.Parameter], start: int) -> None:
        opt, sched = self._optimizer_and_scheduler(trainer)
        schedule = _GroupSchedule(start, self._group_warmup(), self._total(trainer))
        template = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "initial_lr")}
        base_lr = self._base_lr if self._base_lr is not None else float(opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"]))
        lr = base_lr * schedule(start)
        opt.add_param_group({**template, "params": params, "lr": lr, "initial_lr": base_lr})
        if sched is not None:
            sched.base_lrs.append(base_lr)
            sched.lr_lambdas.append(schedule)
            if hasattr(sched, "_last_lr"):
                sched._last_lr = [g["lr"] for g in opt.param_groups]

    def _group_warmup(self) -> int:
        return self.cfg.group_warmup_steps if self.cfg.group_warmup_steps is not None else self.cfg.interval

    def _total(self, trainer: Any) -> int:
        if self.cfg.total_steps is not None:
            return self.cfg.total_steps
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("IncreLoRA: the run has no finite length; set total_steps in the config")
        return int(total)

    def _remove_from_optimizer(self, trainer: Any, params: list[nn.Parameter]) -> None:
        if not params or not trainer.optimizers:
            return
        opt, _ = self._optimizer_and_scheduler(trainer)
        ids = {id(p) for p in params}
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        for p in params:
            opt.state.pop(p, None)

    # ---- Lightning hooks ------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        """Check the scheduler, fix the base lr, and on resume rebuild the param groups by name (the
        optimizer and scheduler states are loaded by Lightning right after this hook)."""
        ilayers = _increlora_layers(layers)
        opt, sched = self._optimizer_and_scheduler(trainer)
        g0 = opt.param_groups[0]
        self._base_lr = float(g0.get("initial_lr", g0["lr"]))
        pb = self.param_budget(ilayers)
        if pb is not None and active_param_count(ilayers) > pb:
            raise ValueError(
                f"IncreLoRA: the initial adapter ({active_param_count(ilayers)} parameters) already exceeds "
                f"the budget of LoRA r={self.cfg.budget_lora_r} ({pb}); lower r or raise budget_lora_r"
            )
        if pb is None and total_rank(ilayers) > self.rank_budget(ilayers):
            raise ValueError(f"IncreLoRA: initial total rank {total_rank(ilayers)} exceeds the budget {self.rank_budget(ilayers)}")
        if not self.rounds:
            return
        # resume: growth groups k = 1..K, taken out of the groups configure_optimizers built
        grown = [self.group_params(ilayers, k) for k in range(1, len(self.rounds) + 1)]
        grown_ids = {id(p) for ps in grown for p in ps}
        n_user = len(opt.param_groups)
        if sched is not None and len(sched.lr_lambdas) != n_user:
            raise RuntimeError("IncreLoRA resume: the scheduler does not match the optimizer's groups")
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in grown_ids]
        for k, params in enumerate(grown, start=1):
            self._add_group(trainer, params, self.rounds[k - 1])

    def on_after_backward(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        """Once per optimizer step (last micro-batch): all-reduce grads of parameters DDP does not know
        (added during training), then add ``γ∇R``."""
        if getattr(pl_module, "automatic_optimization", True):
            fit_loop = getattr(trainer, "fit_loop", None)
            if fit_loop is not None and fit_loop._should_accumulate():
                return
        ilayers = _increlora_layers(layers)
        if getattr(trainer, "world_size", 1) > 1 and self.rounds:
            import torch.distributed as dist

            for k in range(1, len(self.rounds) + 1):
                for p in self.group_params(ilayers, k):
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(trainer.world_size)
        if self.cfg.orth_reg > 0:
            self.add_regularizer_grad(ilayers, trainer)

    def add_regularizer_grad(self, layers: dict[str, IncreLoRALinear], trainer: Any = None) -> torch.Tensor:
        """``p.grad += γ ∂R/∂p`` for every a and b (times the AMP loss scale, if any); returns R."""
        params = [p for layer in layers.values() for i in range(len(layer.ranks))
                  for p in (getattr(layer, f"lora_A_{i}"), getattr(layer, f"lora_B_{i}")) if p.requires_grad]
        with torch.enable_grad():
            reg = orthogonality_regularizer(layers, squared=self.cfg.orth_squared)
            grads = torch.autograd.grad(self.cfg.orth_reg * reg, params, allow_unused=True)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                g = (g * scale).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
        return reg.detach()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        self._step_at_batch_start = int(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        """After each optimizer step t: update scores and, at allocation steps, add ranks."""
        step = int(trainer.global_step)
        if step == self._step_at_batch_start:
            return  # accumulating: no optimizer step in this batch
        t = step - 1  # index of the optimizer step just done (the code's global_step)
        ilayers = _increlora_layers(layers)
        opt, sched = self._optimizer_and_scheduler(trainer)
        if sched is None:  # no scheduler: the method keeps its groups' clocks
            n_user = len(opt.param_groups) - len(self.rounds)
            for k, start in enumerate(self.rounds, start=1):
                sch = _GroupSchedule(start, self._group_warmup(), self._total(trainer))
                opt.param_groups[n_user + k - 1]["lr"] = self._base_lr * sch(step)  # type: ignore[operator]
        if self.finished:
            return
        self.update_scores(ilayers, trainer)
        if t > self.cfg.init_warmup and t % self.cfg.interval == 0 and self.budget_left(ilayers):
            chosen = self.choose(ilayers)
            if chosen:
                k = self.grow(ilayers, chosen, step)
                self._add_group(trainer, self.group_params(ilayers, k), step)
            if not self.budget_left(ilayers):
                self._remove_from_optimizer(trainer, self.finish(ilayers))

    # ---- save / load (S4; Lightning resume) ----------------------------------------------------
    def layer_metadata(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        """Structure for ``save_adapter`` and checkpoints: per-layer components, rounds, phase."""
        return {
            "layers": {n: layer.structure() for n, layer in _increlora_layers(layers).items()},
            "rounds": list(self.rounds),
            "allocations": [list(a) for a in self.allocations],
            "finished": self.finished,
            "seed": self.seed,
        }

    def restore_layer_metadata(self, meta: dict[str, Any]) -> None:
        """Inverse of :meth:`layer_metadata` before injection (``load_adapter``)."""
        self._restored = {n: dict(s) for n, s in meta.get("layers", {}).items()}
        self.rounds = [int(s) for s in meta.get("rounds", [])]
        self.allocations = [list(a) for a in meta.get("allocations", [])]
        self.finished = bool(meta.get("finished", False))
        if meta.get("seed") is not None:
            self.seed = int(meta["seed"])

    def apply_layer_metadata(self, meta: dict[str, Any], layers: dict[str, AdapterLayer],
                             root: nn.Module | None = None) -> None:
        """Same for already-injected layers (Lightning resume): rebuild every layer to the saved
        structure so the checkpoint's state dict fits. ``root`` is not needed here."""
        self.restore_layer_metadata(meta)
        ilayers = _increlora_layers(layers)
        missing = sorted(set(self._restored) - set(ilayers))
        if missing:
            raise ValueError(f"checkpoint has IncreLoRA layers this model lacks: {missing[:5]}")
        for n, layer in ilayers.items():
            if n in self._restored:
                layer.rebuild(self._restored[n])

    # convenience forms of the module functions
    lora_param_count = staticmethod(lora_param_count)
    active_param_count = staticmethod(active_param_count)
    total_rank = staticmethod(total_rank)
    orthogonality_regularizer = staticmethod(orthogonality_regularizer)


__all__ = [
    "IncreLoRA", "IncreLoRAConfig", "IncreLoRALinear", "active_param_count", "lora_param_count",
    "orthogonality_regularizer", "total_rank",
]
