"""ALLoRA (Huang, Balestriero 2024; METHODS.md §5): LoRA without dropout and without α/r, with
gradients scaled by an inverse-norm coefficient.

Layer: ``y = W0 x + b + B A x`` (``ΔW = BA``, s = 1, no dropout), A Kaiming-uniform, B = 0, so the
output equals the base output at init (S1, bit-exact). Trainable: A, B, ``r(m+n)``. The layer is
:class:`LoRALinear` built with ``alpha = r`` (s = r/r = 1.0 exactly) and ``dropout = 0``; users
cannot set either.

Training: each adapter unit θ (row of A or B by default) has its gradient multiplied by
``c(θ) = 1/sqrt(‖θ‖² + 1/η²)`` (c(0) = η), computed from the pre-step weights; see
:mod:`lightning_lora.optim.allora` for the formula, granularities and the optimizer wrapper. Under
Lightning the :meth:`ALLoRA.on_after_backward` hook does it (AdapterCallback calls it): after the
last backward of an accumulation window only (so accumulated gradients are scaled once), before
AMP unscaling (the scaling is linear, so the order does not matter) and before gradient clipping,
as METHODS §5's algorithm asks. With manual optimisation the hook scales after every
``manual_backward``; to accumulate gradients there, inject with :func:`lightning_lora.inject_adapter`
and wrap the optimizer in :class:`lightning_lora.optim.ALLoRAOptimizer` instead of using the callback
(with the callback too, the scaling would apply twice: ``on_fit_start`` refuses that).
With ``apply_to="update"`` the optimizer's update is scaled instead (``θ_pre + c(θ_pre)(θ_post −
θ_pre)``): :meth:`ALLoRA.on_fit_start` hooks it into the step of each of the fit's optimizers.
Gradient clipping (Lightning's ``gradient_clip_val``) then acts on the unscaled gradient, before
the step, and the update is scaled after it; with ``apply_to="grad"`` the gradient is scaled first
and clipping sees the scaled gradient, as METHODS.md §5 orders them.

[unconfirmed] in METHODS §5, with the choices made here: the coefficient form (above) and η (no
default: ``eta`` is required); granularity (``"row"`` default, ``"tensor"``, ``"element"``);
init (standard LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.config import AdapterConfig, Method, register, whole_number
from ..core.layer import AdapterLayer
from ..optim.allora import (GRANULARITIES, ALLoRAOptimizer, _check, _hooked_params, _refuse_twice, install_update_scaling,
                             layer_parameters, scale_gradients)
from .lora import LoRA, LoRAConfig, LoRALinear


@dataclass
class ALLoRAConfig(AdapterConfig):
    """ALLoRA options.

    Attributes:
        r: rank.
        eta: η of ``c(θ) = 1/sqrt(‖θ‖² + 1/η²)``; required (the paper's value is unconfirmed).
        granularity: ``"row"`` (default), ``"tensor"`` or ``"element"``.
        apply_to: ``"grad"`` (default, the paper's wording) scales the gradients before the step;
            ``"update"`` scales the optimizer's update instead, ``θ ← θ_pre + c(θ_pre)(θ_post − θ_pre)``
            (:class:`lightning_lora.optim.UpdateScaling`). Under Adam a gradient scaled by ``c`` is
            divided by ``c`` again, so only ``"update"`` gives B at zero its η-times larger step
            (METHODS.md §5, "Interaction with Adam").
        init: A's init, as :class:`LoRAConfig` (``"kaiming"`` default, or ``"gaussian"``).
        fused, adapter_dtype: as :class:`LoRAConfig`.
    """

    r: int = 8
    eta: float | None = None
    granularity: str = "row"
    apply_to: str = "grad"
    init: str = "kaiming"
    fused: bool = True
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.r = whole_number(self.r, "ALLoRA rank r")
        if self.eta is None:
            raise ValueError("ALLoRA needs eta (no default: the paper's value is unconfirmed, METHODS.md §5)")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        _check(self.eta, self.granularity)  # a finite number > 0 (an infinite eta gives NaN gradients)
        if self.apply_to not in ("grad", "update"):
            raise ValueError(f"apply_to must be 'grad' or 'update', got {self.apply_to!r}")
        self.lora_config()  # validates r and init

    def lora_config(self) -> LoRAConfig:
        """The equivalent plain LoRA config: ``alpha = r`` (s = 1), no dropout."""
        return LoRAConfig(
            r=self.r, alpha=float(self.r), dropout=0.0, init=self.init, fused=self.fused,
            adapter_dtype=self.adapter_dtype, target_modules=self.target_modules, target_types=self.target_types,
            exclude_modules=self.exclude_modules, modules_to_save=self.modules_to_save, bias=self.bias,
        )


class ALLoRALinear(LoRALinear):
    """LoRA layer with ``scaling == 1.0`` and no dropout; parameters ``lora_A`` (r, in), ``lora_B`` (out, r)."""

    #: LoRA's forward as it is (the gradient scaling acts on ``.grad`` after backward, or in the
    #: optimizer step): the C++ function computes the same gradients (``LoRALinear.cpp_path``)
    cpp_path = True


@register("allora")
class ALLoRA(Method):
    """ALLoRA. The saved directory is a PEFT LoRA directory (``lora_alpha = r``, no dropout): PEFT
    loads it for inference; here it reloads as ALLoRA through the file's metadata."""

    Config = ALLoRAConfig
    supported_types = (nn.Linear,)

    def make_layer(self, base: nn.Module, name: str) -> ALLoRALinear:
        return ALLoRALinear(base, self.config.lora_config())  # type: ignore[attr-defined]

    def to_peft_config(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        return LoRA(self.config.lora_config()).to_peft_config(layers)  # type: ignore[attr-defined]

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        self._update_hooks: list[Any] = []  # step-hook handles of apply_to="update"

    def on_fit_start(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        """``apply_to="update"``: hook the update rule into the step of every optimizer of the fit that
        holds adapter parameters (Lightning's optimizers are plain torch optimizers). Refuses an
        optimizer that already scales them (an ALLoRAOptimizer, or the user's
        :func:`~lightning_lora.optim.install_update_scaling` hooks): the scaling would apply twice."""
        self.on_fit_end(trainer, pl_module, layers)  # a fit that ended in an exception left its hooks
        params = layer_parameters(layers.values())
        for opt in getattr(trainer, "optimizers", []):
            if isinstance(opt, ALLoRAOptimizer):
                raise ValueError("configure_optimizers returned an ALLoRAOptimizer, but the allora method under "
                                 "AdapterCallback already scales (apply_to=%r): the scaling would apply twice; "
                                 "return the plain optimizer" % self.config.apply_to)  # type: ignore[attr-defined]
            _refuse_twice(params, _hooked_params(opt), "install_update_scaling was called on an optimizer of this "
                          "fit and the allora method under AdapterCallback scales them too")
        if self.config.apply_to != "update":  # type: ignore[attr-defined]
            return
        for opt in getattr(trainer, "optimizers", []):
            held = {id(p) for group in opt.param_groups for p in group["params"]}
            mine = [p for p in params if id(p) in held]
            if mine:
                self._update_hooks += install_update_scaling(
                    opt, mine, self.config.eta, self.config.granularity)  # type: ignore[attr-defined]
        if params and not self._update_hooks:
            raise ValueError("ALLoRA apply_to='update': no optimizer of this fit holds the adapter parameters "
                             "(a strategy that flattens them, FSDP or DeepSpeed?); use apply_to='grad'")

    def on_fit_end(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        """Take the update rule off the fit's optimizers (an optimizer stepped after ``fit`` is the user's)."""
        for handle in self._update_hooks:
            handle.remove()
        self._update_hooks = []

    def on_after_backward(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        """Scale the adapter gradients once per optimizer step (see the module docstring); nothing with
        ``apply_to="update"`` (the optimizer's step hooks do the work)."""
        if self.config.apply_to != "grad":  # type: ignore[attr-defined]
            return
        if getattr(pl_module, "automatic_optimization", True):
            fit_loop = getattr(trainer, "fit_loop", None)
            if fit_loop is not None and fit_loop._should_accumulate():
                return  # not the last micro-batch: scale the accumulated gradient once, later
        scale_gradients(layer_parameters(layers.values()), self.config.eta, self.config.granularity)  # type: ignore[attr-defined]

