"""Adapter configuration dataclasses and the method registry.

A method is a class registered under a name (``@register("lora")``). It carries a ``Config``
dataclass (a subclass of :class:`AdapterConfig`) and builds one adapter layer per targeted module.
Everything that is not method-specific (which modules to target, what else to train) lives in
:class:`AdapterConfig`, so every method accepts the same targeting options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .layer import AdapterLayer


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
    """

    target_modules: list[str] | str | None = None
    target_types: tuple[Any, ...] = ()
    exclude_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    bias: str = "none"

    method: ClassVar[str] = ""

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (types are stored by class name)."""
        out = dataclasses.asdict(self)
        out["target_types"] = [t if isinstance(t, str) else t.__name__ for t in self.target_types]
        out["method"] = self.method
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
    """Build the config of ``method`` from a config object, a dict and/or keyword arguments."""
    cls = get_method(method).Config
    if isinstance(config, AdapterConfig):
        if not isinstance(config, cls):
            raise TypeError(f"config is a {type(config).__name__}, method {method!r} needs a {cls.__name__}")
        return dataclasses.replace(config, **kwargs) if kwargs else config
    return cls.from_dict({**(config or {}), **kwargs})


def _import_builtin_methods() -> None:
    # Importing the package registers every built-in method; done lazily to avoid import cycles.
    import lightning_lora.methods  # noqa: F401
