"""ALLoRA gradient scaling (Huang, Balestriero 2024; METHODS.md §5), usable without Lightning.

Each adapter unit θ (a row of A or B by default) gets its gradient multiplied by

    c(θ) = 1 / sqrt(‖θ‖₂² + 1/η²)  =  η / sqrt(1 + (η‖θ‖₂)²)

so ``c(0) = η`` (the largest boost; B starts at zero) and ``c(θ) ≈ 1/‖θ‖`` once ``‖θ‖ ≫ 1/η``.
The functional form and η are [unconfirmed] in METHODS §5 (no official code; the abstract only says
"inversely proportional to the ℓ2 norm"): η has no default and must be given. The second form is
what is computed, so ``c(0) == η`` exactly and zero-norm units stay finite.

Granularity [design]: ``"row"`` (default: one coefficient per row of a 2-D tensor, i.e. per output
row of B (length r) and per row of A (length n); 1-D tensors are one unit), ``"tensor"`` (one per
tensor), ``"element"`` (``|θ|`` per entry). c depends only on the weights, so scaling each
sample's gradient equals scaling the mini-batch gradient [derived].

Entry points (all agree bit for bit; tested):

- :func:`scale_gradients` — call between ``backward()`` and ``optimizer.step()``;
- :class:`ALLoRAOptimizer` — wraps any ``torch.optim.Optimizer``; ``apply_to="update"`` scales the
  optimizer's step instead of the gradient (METHODS §5 open choice: Adam's per-coordinate
  normalisation cancels a constant gradient rescale, so under Adam only the change of c over time
  matters; default ``"grad"``, the paper's wording);
- :func:`install_update_scaling` — the update form on an unwrapped optimizer, through its step hooks;
- the ``allora`` method's ``on_after_backward`` hook, driven by :class:`lightning_lora.AdapterCallback`.

One of them per parameter: a second scaling of a parameter (the hooks installed twice, the hooks and
the wrapper, the user's hooks under the callback) would multiply its step by c(θ)², and is refused
with a ValueError. Disjoint parameter sets may use different entry points.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import nn

GRANULARITIES = ("row", "tensor", "element")


def _check(eta: float | None, granularity: str) -> None:
    # a string (YAML reads ``1e-3`` as one) would fail later in an obscure comparison, and an
    # infinite eta turns c(0) = eta / sqrt(1 + (eta * 0)**2) into inf / nan: NaN gradients, silently
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or not eta > 0:
        raise ValueError(f"ALLoRA needs a finite number eta > 0 (no default: METHODS.md §5), got {eta!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def _coefficients(theta: torch.Tensor, eta: float, granularity: str, lead: int) -> torch.Tensor:
    """``c`` for fp32 ``theta`` whose first ``lead`` dims (0 or 1) index stacked parameters; the rest
    is one parameter's shape ``P``. Shapes: ``(*L, *P)`` -> ``"row"`` with ``len(P) >= 2``:
    ``(*L, P[0], 1, ...)``; ``"row"`` on 1-D or ``"tensor"``: ``(*L, 1, ...)``; ``"element"``:
    ``(*L, *P)``. Each norm reduces one unit's entries only, so stacking does not mix parameters."""
    ndim = theta.dim() - lead
    if granularity == "element":
        norm = theta.abs()
    elif granularity == "row" and ndim >= 2:
        norm = theta.flatten(lead + 1).norm(dim=-1).view(*theta.shape[:lead + 1], *([1] * (ndim - 1)))
    else:
        norm = theta.flatten(lead).norm(dim=-1).view(*theta.shape[:lead], *([1] * ndim))
    return eta / torch.sqrt(1.0 + (eta * norm) ** 2)


def allora_coefficient(param: torch.Tensor, eta: float, granularity: str = "row") -> torch.Tensor:
    """``c(θ)`` for every unit of ``param``, in fp32, broadcastable to ``param.shape``.

    Shapes: ``"row"`` on an (R, C) tensor -> (R, 1); ``"tensor"`` -> (1, 1) (a 1-D tensor: (1,));
    ``"element"`` -> param.shape.
    """
    _check(eta, granularity)
    return _coefficients(param.detach().float(), eta, granularity, 0)


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Trainable adapter parameters of every adapter layer in ``module`` (not heads or biases)."""
    from ..core.inject import adapter_layers

    return layer_parameters(adapter_layers(module).values())


def layer_parameters(layers: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Trainable adapter parameters (``adapter_param_names``) of the given adapter layers."""
    return [p for layer in layers for name in layer.adapter_param_names  # type: ignore[attr-defined]
            if isinstance(p := getattr(layer, name, None), nn.Parameter) and p.requires_grad]


def _resolve(target: nn.Module | Iterable[torch.Tensor], eta: float | None, granularity: str | None):
    if isinstance(target, nn.Module):
        from ..core.inject import get_adapter_method

        method = get_adapter_method(target)
        cfg = getattr(method, "config", None)
        eta = eta if eta is not None else getattr(cfg, "eta", None)
        granularity = granularity or getattr(cfg, "granularity", None)
        params = adapter_parameters(target)
    else:
        params = list(target)
    return params, eta, granularity or "row"


@torch.no_grad()
def scale_gradients(
    target: nn.Module | Iterable[torch.Tensor], eta: float | None = None, granularity: str | None = None
) -> None:
    """Multiply, in place, each parameter's ``.grad`` by ``c(θ)`` computed from its current value.

    ``target``: a model (its adapter layers' trainable parameters are scaled; ``eta`` and
    ``granularity`` default to the model's ALLoRA config) or an iterable of parameters. Call it
    once per optimizer step, after the last backward of an accumulation window (and before
    clipping); parameters without a gradient are skipped.
    """
    params, eta, granularity = _resolve(target, eta, granularity)
    _check(eta, granularity)
    # parameters of one shape, dtype and device are scaled together: a handful of kernels per group
    # instead of ~8 per parameter (the step is launch-bound on a GPU: 144 tensors for BERT-base)
    groups: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.shape, p.dtype, p.grad.dtype, p.device), []).append(p)
    for (_, _, grad_dtype, _), group in groups.items():
        grads = [p.grad for p in group]
        if len(group) == 1:
            c = _coefficients(group[0].detach().float(), eta, granularity, 0)  # type: ignore[arg-type]
            grads[0].copy_((grads[0].float() * c).to(grad_dtype))
            continue
        c = _coefficients(torch.stack([p.detach() for p in group]).float(), eta, granularity, 1)  # type: ignore[arg-type]
        if grad_dtype == torch.float32:
            torch._foreach_mul_(grads, list(c.unbind(0)))
        else:  # scaled in fp32, rounded once to the gradient's dtype, as for a single tensor
            scaled = (torch.stack(grads).float() * c).to(grad_dtype)
            torch._foreach_copy_(grads, list(scaled.unbind(0)))


class UpdateScaling:
    """ALLoRA on the optimizer's update (``apply_to="update"``): ``θ ← θ_pre + c(θ_pre)·(θ_post − θ_pre)``.

    :meth:`before` keeps the pre-step values and their coefficients, :meth:`after` rescales what the
    step changed. Under Adam this is the form that keeps ALLoRA's mechanism: Adam divides a gradient
    scaled by a constant ``c`` by the same ``c`` again, so scaling the gradient only matters through
    the change of ``c`` over time (METHODS.md §5, "Interaction with Adam"), while scaling the update
    gives a zero-norm unit (B at init) an η times larger step. Parameters of one shape, dtype and
    device are handled together (a handful of kernels per group, not per tensor). Every parameter is
    kept, with or without a gradient: under Lightning the step's closure (forward and backward) runs
    inside ``step()``, after the step's pre-hooks, so gradients do not exist yet in :meth:`before`; a
    parameter the step does not move comes out unchanged (``θ_post = θ_pre``).
    """

    def __init__(self, eta: float, granularity: str = "row") -> None:
        _check(eta, granularity)
        self.eta, self.granularity = eta, granularity
        self._saved: list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def before(self, params: Iterable[torch.Tensor]) -> None:
        groups: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        for p in params:
            groups.setdefault((p.shape, p.dtype, p.device), []).append(p)
        # (stack copies: the pre-step values survive the optimizer's in-place step)
        self._saved = [(group, old := torch.stack([p.detach() for p in group]),
                        _coefficients(old.float(), self.eta, self.granularity, 1))  # type: ignore[arg-type]
                       for group in groups.values()]

    @torch.no_grad()
    def after(self) -> None:
        for group, old, c in self._saved:
            new = torch.stack([p.detach() for p in group])
            scaled = (old.float() + c * (new.float() - old.float())).to(old.dtype)
            torch._foreach_copy_(group, list(scaled.unbind(0)))
        self._saved = []


def install_update_scaling(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], eta: float,
                           granularity: str = "row") -> tuple[Any, Any]:
    """Scale every ``step()`` of ``optimizer`` on ``params`` by ALLoRA's update rule (:class:`UpdateScaling`),
    through the optimizer's step pre- and post-hooks, so any torch optimizer works unwrapped (the
    ``allora`` method installs it on Lightning's optimizers when ``apply_to="update"``). Returns the two
    hook handles (``.remove()`` them to stop)."""
    scaling, params = UpdateScaling(eta, granularity), list(params)
    # a second ALLoRA scaling of the same parameters (these hooks twice, or hooks plus an
    # ALLoRAOptimizer's own scaling) multiplied their step by c(θ)², silently
    _refuse_twice(params, _hooked_params(optimizer), "install_update_scaling was already called on this optimizer")
    if isinstance(optimizer, ALLoRAOptimizer):
        _refuse_twice(params, optimizer.scaled_params(), "the ALLoRAOptimizer scales them already")
    pre = optimizer.register_step_pre_hook(_UpdateHook(scaling, params))
    post = optimizer.register_step_post_hook(lambda opt, args, kwargs: scaling.after())
    return pre, post


class _UpdateHook:
    """The step pre-hook of :func:`install_update_scaling`. Its ``params`` are what it scales: read
    back from the optimizer's hook table (:func:`_hooked_params`), so a second scaling of them is
    refused, and a removed handle takes them out with the hook."""

    def __init__(self, scaling: UpdateScaling, params: list[torch.Tensor]) -> None:
        self.scaling, self.params = scaling, params

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.scaling.before(self.params)


def _hooked_params(optimizer: Any) -> list[torch.Tensor]:
    """The parameters that :func:`install_update_scaling`'s hooks on ``optimizer`` scale (none for an
    optimizer without them)."""
    hooks = getattr(optimizer, "_optimizer_step_pre_hooks", None) or {}
    return [p for hook in hooks.values() if isinstance(hook, _UpdateHook) for p in hook.params]


def _refuse_twice(params: Iterable[torch.Tensor], scaled: Iterable[torch.Tensor], why: str) -> None:
    """ValueError when one of ``params`` is in ``scaled`` (already ALLoRA-scaled by another mechanism)."""
    scaled_ids = {id(p) for p in scaled}
    n = sum(id(p) in scaled_ids for p in params)
    if n:
        raise ValueError(f"ALLoRA scaling would apply twice to {n} parameter(s): {why}; "
                         "scale each parameter with one mechanism only")


class ALLoRAOptimizer(torch.optim.Optimizer):
    """Wraps any torch optimizer: ``step()`` applies ALLoRA scaling, then the inner step.

    Args:
        optimizer: the inner optimizer (SGD, AdamW, ...); its ``param_groups`` and ``state`` are
            shared (schedulers and checkpoints see the inner optimizer's).
        eta: η of c(θ) (required).
        granularity: ``"row"`` | ``"tensor"`` | ``"element"``.
        apply_to: ``"grad"`` scales gradients before the step (paper wording, default);
            ``"update"`` scales the step itself, ``θ ← θ + c(θ_pre)·(step(θ) − θ)``.
        params: parameters to scale; default every parameter of the inner optimizer. Pass
            ``lightning_lora.optim.adapter_parameters(model)`` when the
            optimizer also trains a head that ALLoRA should leave alone.

    Coefficients always come from the pre-step parameters. A closure, if given, is evaluated once
    before scaling (optimizers that re-evaluate it, such as LBFGS, are not supported).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        eta: float,
        granularity: str = "row",
        apply_to: str = "grad",
        params: Iterable[torch.Tensor] | None = None,
    ) -> None:  # no super().__init__: every piece of state is the inner optimizer's
        if apply_to not in ("grad", "update"):
            raise ValueError(f"apply_to must be 'grad' or 'update', got {apply_to!r}")
        _check(eta, granularity)
        # ALLoRAOptimizer(model.parameters(), eta=...) failed only at the first step(), with an
        # AttributeError on 'param_groups'
        if not (hasattr(optimizer, "param_groups") and callable(getattr(optimizer, "step", None))):
            raise TypeError(f"ALLoRAOptimizer wraps a torch optimizer (torch.optim.AdamW(params, ...)), "
                            f"got {type(optimizer).__name__}")
        # wrapping a wrapper applied c(θ) twice per step (c² on the gradient), silently
        if isinstance(optimizer, ALLoRAOptimizer):
            raise ValueError("the optimizer is already an ALLoRAOptimizer: wrapping it again would apply the "
                             "ALLoRA scaling twice per step; wrap the plain optimizer once")
        self.optimizer = optimizer
        self.eta, self.granularity, self.apply_to = eta, granularity, apply_to
        self._params = None if params is None else list(params)
        _refuse_twice(self.scaled_params(), _hooked_params(optimizer),
                      "install_update_scaling was called on the wrapped optimizer")
        self._init_hooks()

    def _init_hooks(self) -> None:
        # the hook tables ``Optimizer.__init__`` would create: without them ``register_step_pre_hook``
        # (``install_update_scaling`` on this wrapper) raises, and :meth:`step` reads the step ones
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())

    def __getstate__(self) -> dict[str, Any]:
        # ``Optimizer.__getstate__`` keeps only defaults / state / param_groups, which here are
        # properties of the inner optimizer: a copy or pickle lost ``optimizer`` and eta and raised.
        # Hooks and a scheduler's patched ``step`` (closures, not picklable) are left out, as torch does
        return {k: self.__dict__[k] for k in ("optimizer", "eta", "granularity", "apply_to", "_params")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    # delegate the state torch / Lightning / schedulers read
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.optimizer.defaults = value

    def scaled_params(self) -> list[torch.Tensor]:
        if self._params is not None:
            return self._params
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def step(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Run this wrapper's step pre-hooks, :meth:`_step` (the scaling and the inner step), then its
        post-hooks, with torch's hook protocol (a pre-hook may return new ``(args, kwargs)``).

        Not torch's hook-running wrapper: that would fire the process-wide hooks
        (``torch.optim.optimizer.register_optimizer_step_pre_hook`` / post) a second time, since the
        inner optimizer's own ``step`` fires them (with the inner optimizer as argument) once per step.
        """
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            args = (self, *args)  # torch passes the bound instance in ``args``
            for hook in list(self._optimizer_step_pre_hooks.values()):
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(f"a step pre-hook must return None or (new_args, new_kwargs), got {result}")
                    args, kwargs = result
            out = self._step(*args[1:], **kwargs)
            for hook in list(self._optimizer_step_post_hooks.values()):
                hook(self, args, kwargs)
            return out

    # torch's ``_patch_step_function`` (``Optimizer.__init__`` / ``__setstate__``) skips a step marked
    # hooked: wrapping it again would fire the global hooks twice per step
    step.hooked = True  # type: ignore[attr-defined]

    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for p in self.scaled_params() if p.grad is not None]
        if self._optimizer_step_pre_hooks or self.optimizer.__dict__.get("_optimizer_step_pre_hooks"):
            # update-scaling hooks installed after wrapping (on the inner optimizer, or on this one for
            # a parameter group added since): the checks at install time could not see this wrapper
            _refuse_twice(params, _hooked_params(self) + _hooked_params(self.optimizer),
                          "install_update_scaling hooks and this ALLoRAOptimizer both scale them")
        if self.apply_to == "grad":
            scale_gradients(params, self.eta, self.granularity)
            self.optimizer.step()
            return loss
        scaling = UpdateScaling(self.eta, self.granularity)
        scaling.before(params)
        self.optimizer.step()
        scaling.after()
        return loss

    def __repr__(self) -> str:
        return f"ALLoRAOptimizer(eta={self.eta}, granularity={self.granularity!r}, apply_to={self.apply_to!r}, {self.optimizer!r})"
