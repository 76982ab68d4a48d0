"""Adapter configuration dataclasses and the method registry.

A method is a class registered under a name (``@register("lora")``). It carries a ``Config``
dataclass (a subclass of :class:`AdapterConfig`) and builds one adapter layer per targeted module.
Everything that is not method-specific (which modules to target, what else to train) lives in
:class:`AdapterConfig`, so every method accepts the same targeting options.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .layer import AdapterLayer


_MISSING: Any = dataclasses.MISSING


def _declared_default(f: dataclasses.Field) -> Any:
    """The value a field takes when the caller leaves it out (``_MISSING`` for a required field)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # an ambiguous comparison (array-like) is not "the same"
        return False


def _records_derived_defaults(post_init: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap a config's ``__post_init__`` so that the outermost call records, in
    ``_derived_defaults`` (name -> derived value), the fields left at their declared default that
    ``__post_init__`` then replaced (``alpha=None`` -> r). :func:`make_config` resets those to
    re-derive them. The record is an instance attribute, not a dataclass field: equality, ``repr``,
    ``to_dict`` and every export ignore it. The wrapper is one more frame between a warning in
    ``__post_init__`` and the caller (``stacklevel`` counts it)."""
    if getattr(post_init, "_records_derived_defaults", False):
        return post_init

    @functools.wraps(post_init)
    def wrapper(self: Any) -> None:
        state = self.__dict__
        if state.get("_in_post_init"):  # a super().__post_init__() inside the outer call
            post_init(self)
            return
        sentinels = getattr(type(self), "derived_sentinels", {})
        given = {}
        for f in dataclasses.fields(self):
            default = _declared_default(f) if f.init else _MISSING
            value = getattr(self, f.name)
            if default is not _MISSING and _same(value, default):
                given[f.name] = default
            elif f.init and any(_same(value, s) for s in sentinels.get(f.name, ())):
                given[f.name] = value
        state["_in_post_init"] = True
        try:
            post_init(self)
        finally:
            del state["_in_post_init"]
        derived = {n: getattr(self, n) for n, v in given.items() if not _same(getattr(self, n), v)}
        state["_derived_defaults"] = derived
        # what make_config restores to re-derive a field, where that is a sentinel and not the default
        state["_derived_from"] = {n: given[n] for n in derived if n in sentinels}

    wrapper._records_derived_defaults = True  # type: ignore[attr-defined]
    return wrapper


def whole_number(value: Any, name: str, minimum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as an int (>= ``minimum`` when given; None passes when ``optional``); a one-line
    ValueError naming the field otherwise. A float (2.5, also 2.0) passed bare ``>=`` checks and then
    failed late (``torch.zeros``, a slice) or was silently truncated (``range``, ``int(total)``); a bool
    is not a count; numpy integers become ints so the config stays JSON-serialisable."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}>= {minimum}, got {value!r}")
    return int(value)


def finite_number(value: Any, name: str) -> int | float:
    """``value`` as a Python int or float (numpy scalars and 0-d tensors too, so configs stay
    JSON-serialisable); a one-line ValueError naming the field for a non-number, a bool, NaN or ±inf
    (NaN passes every range check, ``"abc"`` failed later inside a comparison)."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def floating_dtype_name(value: Any) -> str:
    """The name of the torch floating dtype ``value`` stands for (``torch.bfloat16``, ``"bfloat16"``,
    ``"torch.bfloat16"``, ``"half"`` -> ``"float16"``): configs keep names, which save to JSON.
    Anything else raises a ValueError naming the accepted values (a ``torch.dtype`` used to fail
    deep inside layer construction with ``getattr``'s TypeError)."""
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2:
        return str(dtype).removeprefix("torch.")
    raise ValueError(f"adapter_dtype must be a floating torch dtype or its name (float32, bfloat16, float16, "
                     f"float64), got {value!r}")


def adapter_torch_dtype(value: Any) -> torch.dtype:
    """The ``torch.dtype`` of a config's ``adapter_dtype``, checked again where layers are built: the
    field may have been assigned after ``__post_init__`` normalised it."""
    return getattr(torch, floating_dtype_name(value))


@dataclass
class AdapterConfig:
    """Options shared by every method.

    Attributes:
        target_modules: which modules get an adapter. A list of names, each matching a module whose
            qualified name equals it or ends with ``"." + name`` (PEFT's rule); a single string is a
            regular expression that must match the whole qualified name; ``"all-linear"`` (the
            default when neither names nor types are given) targets every ``nn.Linear`` /
            transformers ``Conv1D`` except the model's output head.
        target_types: optional module classes (or class names) to target in addition to names.
        exclude_modules: names (same suffix rule) that are never targeted; a single name may be
            given as a string. A name that matches no module is warned about at injection.
        modules_to_save: modules trained in full and saved with the adapter (a new classifier head);
            a single name may be given as a string. When no name matches a module, injection
            fails (the head would otherwise stay frozen without a word); a name that matches nothing
            while others match is warned about.
        bias: ``"none"`` (all biases frozen), ``"lora_only"`` (biases of adapted layers train) or
            ``"all"`` (every bias in the model trains).

    A field left at its default that ``__post_init__`` resolves from others (``alpha=None`` -> a
    multiple of r, ``target_modules=None`` -> ``"all-linear"``) is remembered as such, so
    :func:`make_config` re-derives it when it changes the fields it came from.
    """

    target_modules: list[str] | str | None = None
    target_types: tuple[Any, ...] = ()
    exclude_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    bias: str = "none"

    method: ClassVar[str] = ""
    #: field -> values other than its declared default that ``__post_init__`` resolves from other
    #: fields (IncreLoRA's ``incre_rank_num=0``); a field given one is recorded like a defaulted one
    derived_sentinels: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None:  # every level records, whichever one the dataclass __init__ reaches first
            cls.__post_init__ = _records_derived_defaults(own)  # type: ignore[method-assign]

    @_records_derived_defaults
    def __post_init__(self) -> None:
        if self.bias not in ("none", "lora_only", "all"):
            raise ValueError(f"bias must be 'none', 'lora_only' or 'all', got {self.bias!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        for attr in ("exclude_modules", "modules_to_save"):  # a bare string would be read per character
            value = getattr(self, attr)
            value = [] if value is None else [value] if isinstance(value, str) else list(value)
            bad = [v for v in value if not isinstance(v, str) or not v]
            if bad:
                raise ValueError(f"{attr} must be module names (strings), got {bad!r}")
            setattr(self, attr, value)
        if self.target_modules is None and not self.target_types:
            self.target_modules = "all-linear"  # every method adapts linear layers
        dropout = getattr(self, "dropout", 0.0)  # methods with an adapter-branch dropout
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if hasattr(self, "adapter_dtype"):  # methods whose adapter parameters have a chosen dtype
            self.adapter_dtype = floating_dtype_name(self.adapter_dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (types are stored by class name)."""
        out = dataclasses.asdict(self)
        out["target_types"] = [t if isinstance(t, str) else t.__name__ for t in self.target_types]
        out["method"] = self.method
        if "adapter_dtype" in out:  # the name, also when a dtype was assigned after construction
            out["adapter_dtype"] = floating_dtype_name(out["adapter_dtype"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise so typos do not pass silently."""
        data = {k: v for k, v in data.items() if k != "method"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown option(s) for method {cls.method!r}: {unknown}; known: {sorted(known)}")
        if "target_types" in data:
            data["target_types"] = tuple(data["target_types"])
        return cls(**data)


class Method:
    """Base class of an adapter method: builds layers and, optionally, reacts to training.

    Subclasses set ``Config`` and implement :meth:`make_layer`. The hooks are called by
    :class:`lightning_lora.AdapterCallback` with ``(trainer, pl_module, layers)`` where ``layers``
    maps qualified module names to adapter layers.
    """

    Config: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: module types this method can wrap (checked at injection time for a clear error)
    supported_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: whether the update folds into the base weight (``merge``); False where it depends on the
    #: input or the base is not dense. ``AdapterCallback(merge_on_fit_end=True)`` checks it up front
    mergeable: ClassVar[bool] = True

    def __init__(self, config: AdapterConfig) -> None:
        self.config = config

    def make_layer(self, base: nn.Module, name: str) -> "AdapterLayer":
        raise NotImplementedError

    def extra_layers(self, model: nn.Module, layers: dict[str, "AdapterLayer"]) -> dict[str, "AdapterLayer"]:
        """Layers for modules that are not targets by name or type (qualified name -> layer): LoRA's for
        a head tied to an adapted embedding (``ensure_weight_tying``) and for the modules holding
        targeted bare parameters (``target_parameters``); ``inject_adapter`` puts them in place with
        the rest, and a ValueError there leaves the model as it was."""
        return {}

    def on_inject(self, model: nn.Module, layers: dict[str, "AdapterLayer"]) -> None:
        """Called by ``inject_adapter`` once every target is wrapped (qualified name -> layer)."""

    # Optional training hooks; defaults do nothing.
    def on_fit_start(self, trainer: Any, pl_module: Any, layers: dict[str, "AdapterLayer"]) -> None: ...
    def on_train_batch_start(self, trainer: Any, pl_module: Any, layers: dict[str, "AdapterLayer"]) -> None: ...
    def on_after_backward(self, trainer: Any, pl_module: Any, layers: dict[str, "AdapterLayer"]) -> None: ...
    def on_train_batch_end(self, trainer: Any, pl_module: Any, layers: dict[str, "AdapterLayer"]) -> None: ...
    def on_fit_end(self, trainer: Any, pl_module: Any, layers: dict[str, "AdapterLayer"]) -> None: ...


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: ``@register("lora") class LoRA(Method): ...``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.Config.method = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _import_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``; an unknown name lists the known ones."""
    _import_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def make_config(method: str, config: AdapterConfig | dict[str, Any] | None = None, **kwargs: Any) -> AdapterConfig:
    """Build the config of ``method`` from a config object, a dict and/or keyword arguments.

    Keyword arguments on a config object replace its fields; a field the object's ``__post_init__``
    derived from a default (``alpha=None`` -> r) is derived again from the new values, while a field
    its creator set is kept.
    """
    cls = get_method(method).Config
    if isinstance(config, AdapterConfig):
        if not isinstance(config, cls):
            raise TypeError(f"config is a {type(config).__name__}, method {method!r} needs a {cls.__name__}")
        if not kwargs:
            return config
        # dataclasses.replace alone would pass the value derived for the old fields as if set by the
        # user; a derived field assigned since (cfg.alpha = 4.0) is the user's and stays
        derived = getattr(config, "_derived_defaults", {})
        source = getattr(config, "_derived_from", {})
        reset = {f.name: source.get(f.name, _declared_default(f)) for f in dataclasses.fields(config)
                 if f.init and f.name in derived and f.name not in kwargs and _same(getattr(config, f.name), derived[f.name])}
        return dataclasses.replace(config, **reset, **kwargs)
    return cls.from_dict({**(config or {}), **kwargs})


def _import_builtin_methods() -> None:
    # Importing the package registers every built-in method; done lazily to avoid import cycles.
    import lightning_lora.methods  # noqa: F401
