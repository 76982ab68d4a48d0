"""Several named adapters on one model: add, switch, route per example, delete, save and load by name.

    add_adapter(model, "sst2", "lora", r=8, target_modules=["query", "value"])
    add_adapter(model, "rte", "lora", r=8, target_modules=["query", "value"])
    set_adapter(model, "rte")                    # one adapter; or a list: their updates add up
    with use_adapter(model, "sst2"): y = model(x)
    with route_adapters(model, ["sst2", "rte"], index): y = model(x)   # index (batch,): per example
    save_adapters(model, "out/")                 # PEFT layout: "default" at the root, others in out/<name>/
    load_adapters(fresh_model, "out/")

Structure. Each targeted module is replaced by one :class:`MultiAdapterLayer` that owns the frozen
base layer and, per adapter name, the method's own adapter layer (built by ``Method.make_layer``
on the same base module, which it uses but does not register, so the base weight appears once in
``state_dict``). Different adapters may use different methods and target different modules; a
module that the active adapter does not target behaves as the base module. ``modules_to_save``
(a classifier head) get one trainable copy per adapter in a :class:`ModulesToSaveWrapper`, as in
PEFT; the frozen original serves adapters without a copy.

Which adapter runs:

- one active adapter: its layer's own forward, so the output is bit-identical to a model that
  carries that adapter alone;
- several active adapters: ``base(x) + Σ_i (layer_i(x) − base(x))`` (their updates add up); the
  head copy used is the one of the first active adapter in the given order that has one;
- per-example routing (:func:`route_adapters`): rows of the batch (dim 0 of each adapted module's
  input, so batch-first models) go through the adapter their index names; ``-1`` is the base model.

Trainable parameters follow the active set (``set_adapter``): the active adapters' own parameters
and head copies train, everything else is frozen. Biases are shared by all adapters, so only
``bias="none"`` is supported.

Merging into the base weight (``merge_adapter`` / ``unmerge_adapter`` from :mod:`.inject`) merges
the active set; switching adapters while merged raises. A model that already carries one adapter
from :func:`~lightning_lora.core.inject.inject_adapter` is converted on the first
:func:`add_adapter`: that adapter becomes ``"default"``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .config import AdapterConfig, Method, get_method, make_config
from .inject import _METHOD_ATTR, _MULTI_ATTR, _name_matches, _set_submodule, _warn_tied, adapter_layers, find_targets
from .layer import AdapterLayer, _is_conv1d, _refuse_merge_while_disabled, no_autocast
from .state import PREFIX, WEIGHTS_NAME, AdapterFormatError, peft_embedding_base, read_adapter_config, write_adapter

DEFAULT_NAME = "default"  # PEFT's name for the adapter saved at the root of a directory


# ---- layers ----------------------------------------------------------------------------------
def _rows(index: torch.Tensor, i: int) -> torch.Tensor:
    return (index == i).nonzero().squeeze(1)


def _check_batch(index: torch.Tensor, x: torch.Tensor, where: str) -> None:
    if x.dim() == 0 or x.shape[0] != index.numel():
        raise ValueError(
            f"{where}: adapter_index has {index.numel()} entries but the input's first dim is "
            f"{tuple(x.shape)[:1]}; per-example routing needs batch-first inputs"
        )


class MultiAdapterLayer(AdapterLayer):
    """A frozen base layer with several named adapter layers; runs the active one(s).

    Attributes:
        adapters: name -> the method's adapter layer (which uses ``base_layer`` without owning it).
        active: names run by :meth:`forward`, in order (those this layer does not carry are skipped).
        routing: ``(names, index)`` during :func:`route_adapters`; ``index`` has shape ``(batch,)``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.routing: tuple[tuple[str, ...], torch.Tensor] | None = None
        self._merged_names: tuple[str, ...] = ()
        #: the summed update folded in when several adapters were merged together (for unmerge)
        self._merged_delta: torch.Tensor | None = None

    def add(self, name: str, layer: AdapterLayer) -> None:
        """Carry ``layer`` (built on ``self.base_layer``) under ``name``."""
        if layer.base_layer is not self.base_layer:
            raise ValueError(f"adapter {name!r}: its layer wraps another base module")
        # keep the base as a plain attribute of the adapter layer: one registered copy only
        del layer._modules["base_layer"]
        object.__setattr__(layer, "base_layer", self.base_layer)
        self.adapters[name] = layer

    def _running(self) -> list[AdapterLayer]:
        return [self.adapters[n] for n in self.active if n in self.adapters]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x, *args, **kwargs)
        if self.routing is not None:
            return self._routed_forward(x, *args, **kwargs)
        running = self._running()
        if not running:
            return self.base_layer(x, *args, **kwargs)
        if len(running) == 1:
            return running[0](x, *args, **kwargs)
        base_out = self.base_layer(x, *args, **kwargs)
        out = base_out
        for layer in running:
            out = out + (layer(x, *args, **kwargs) - base_out)
        return out

    def _routed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names, index = self.routing  # type: ignore[misc]
        _check_batch(index, x, "MultiAdapterLayer")
        out = self.base_layer(x, *args, **kwargs)  # rows routed to -1 or to an adapter not here
        for i, name in enumerate(names):
            rows = _rows(index, i)
            if name in self.adapters and rows.numel():
                out = out.index_copy(0, rows, self.adapters[name](x.index_select(0, rows), *args, **kwargs))
        return out

    def delta_weight(self) -> torch.Tensor:
        """Sum of the active adapters' updates in :attr:`base_weight`'s shape, fp32."""
        dw = torch.zeros(self.base_weight.shape, device=self.base_weight.device)
        for layer in self._running():
            dw = dw + layer.delta_weight()
        return dw

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapters into the base weight. One adapter merges with its own exact
        merge. Several add the sum of their updates, each computed against the unmerged base, as the
        forward combines them (``W0 x + Σ (layer_i(x) − W0 x)``): merging one after another would
        compute the second update on a base that already holds the first, which is wrong for every
        method whose update depends on the base (DoRA, Bat). The sum is kept for :meth:`unmerge`."""
        if self.merged:
            raise RuntimeError("adapter is already merged; call unmerge() first")
        if self.routing is not None:
            raise RuntimeError("cannot merge while routing adapters per example")
        _refuse_merge_while_disabled(self)
        names = tuple(n for n in self.active if n in self.adapters)
        if len(names) > 1:
            total = self.delta_weight()  # every update from the unmerged base, before any write
            w = self.base_weight
            with no_autocast(w.device):
                w.copy_((w.float() + total).to(w.dtype))
            self._merged_delta = total
        else:
            for n in names:
                self.adapters[n].merge()
        self._merged_names = names
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        if self._merged_delta is not None:
            w = self.base_weight
            with no_autocast(w.device):
                w.copy_((w.float() - self._merged_delta).to(w.dtype))
            self._merged_delta = None
        else:
            for n in reversed(self._merged_names):
                self.adapters[n].unmerge()
        self._merged_names = ()
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + f", active={list(self.active)}"


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full per adapter (a classifier head): one copy per adapter name.

    Attributes:
        original_module: the frozen module the copies were made from; used when no active adapter has a copy.
        copies: adapter name -> trainable copy.
        active: name whose copy runs (None: the original).
        routing: ``(names, index)`` during :func:`route_adapters`; ``index`` has shape ``(batch,)``.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.routing: tuple[tuple[str, ...], torch.Tensor] | None = None
        #: set by ``set_adapter_enabled`` / ``disable_adapter``: the original runs, as in PEFT
        self.disabled = False

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.routing is None:
            module = self.copies[self.active] if self.active in self.copies else self.original_module
            return module(x, *args, **kwargs)
        names, index = self.routing
        _check_batch(index, x, "ModulesToSaveWrapper")
        out = self.original_module(x, *args, **kwargs)
        for i, name in enumerate(names):
            rows = _rows(index, i)
            if name in self.copies and rows.numel():
                out = out.index_copy(0, rows, self.copies[name](x.index_select(0, rows), *args, **kwargs))
        return out


# ---- model-level registry ---------------------------------------------------------------------
@dataclass
class AdapterSet:
    """What a multi-adapter model carries: name -> method (with its config), and the active names."""

    methods: dict[str, Method] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def _registry(model: nn.Module) -> AdapterSet | None:
    return getattr(model, _MULTI_ATTR, None)


def _require(model: nn.Module, names: Sequence[str]) -> AdapterSet:
    reg = _registry(model)
    known = list(reg.methods) if reg is not None else []
    for n in names:
        if n not in known:
            raise ValueError(f"unknown adapter {n!r}; the model carries {known}")
    assert reg is not None or not names
    return reg  # type: ignore[return-value]


def _as_names(names: str | Sequence[str]) -> list[str]:
    # a name or a list of names; None or a number failed with "'NoneType' object is not iterable"
    if not isinstance(names, (str, Sequence, set, frozenset)):
        raise TypeError(f"adapter names must be a name or a list of names, got {type(names).__name__} {names!r}")
    out = [names] if isinstance(names, str) else list(names)
    bad = [n for n in out if not isinstance(n, str)]
    if bad:
        raise TypeError(f"adapter names must be strings, got {bad!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"adapter names repeat: {out}")
    return out


def multi_layers(model: nn.Module) -> dict[str, MultiAdapterLayer]:
    """Qualified module name -> :class:`MultiAdapterLayer`, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiAdapterLayer)}


def _wrappers(model: nn.Module) -> dict[str, ModulesToSaveWrapper]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters ``model`` carries, in the order they were added."""
    reg = _registry(model)
    return list(reg.methods) if reg is not None else []


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters, in order."""
    reg = _registry(model)
    return list(reg.active) if reg is not None else []


def adapter_method(model: nn.Module, name: str) -> Method:
    """The method object (with ``.config``) of adapter ``name``."""
    return _require(model, [name]).methods[name]


def named_adapter_layers(model: nn.Module, name: str) -> dict[str, AdapterLayer]:
    """Qualified module name -> adapter ``name``'s own layer (``delta_weight()``, ``lora_A``, ...)."""
    _require(model, [name])
    return {t: m.adapters[name] for t, m in multi_layers(model).items() if name in m.adapters}


def adapter_delta_weights(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Qualified module name -> ``ΔW`` of adapter ``name`` in the base weight's ``(out, in)`` layout (a
    convolution's: its kernel's shape), fp32.
    Refused while adapters are merged: an update that depends on the base (DoRA, Bat) would be read
    from a base that already holds it."""
    _check_unmerged(model, "read an adapter's delta weights")
    with torch.no_grad():
        return {t: layer.delta_weight() for t, layer in named_adapter_layers(model, name).items()}


@contextmanager
def _plain_view(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """Temporarily put the base modules back in place of our wrappers (so targeting sees the plain
    model); yields wrapped name -> wrapper."""
    wrapped: dict[str, nn.Module] = {**multi_layers(model), **_wrappers(model)}
    for name, w in wrapped.items():
        _set_submodule(model, name, w.base_layer if isinstance(w, MultiAdapterLayer) else w.original_module)
    try:
        yield wrapped
    finally:
        for name, w in wrapped.items():
            _set_submodule(model, name, w)


def _sync(model: nn.Module) -> None:
    """Push the active set into every layer and wrapper; active adapters train, the rest is frozen."""
    reg = _registry(model)
    active = tuple(reg.active) if reg is not None else ()
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in multi_layers(model).values():
        layer.active = active
        for name in active:
            child = layer.adapters[name] if name in layer.adapters else None
            for pname in getattr(child, "adapter_param_names", ()):
                p = getattr(child, pname, None)
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(True)
    for wrapper in _wrappers(model).values():
        wrapper.active = next((n for n in active if n in wrapper.copies), None)
        if wrapper.active is not None:
            wrapper.copies[wrapper.active].requires_grad_(True)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"adapter name must be a Python identifier (no dots or spaces), got {name!r}")


def _convert_single(model: nn.Module) -> None:
    """Turn a model carrying one injected adapter into a multi-adapter model; it becomes ``"default"``."""
    method: Method = getattr(model, _METHOD_ATTR)
    cfg = method.config
    if cfg.bias != "none":
        raise ValueError(f"cannot add named adapters next to an adapter with bias={cfg.bias!r} (biases are shared)")
    for name, layer in adapter_layers(model).items():
        if layer.merged:
            raise RuntimeError("unmerge the existing adapter before adding named adapters")
        multi = MultiAdapterLayer(layer.base_layer)
        multi.add(DEFAULT_NAME, layer)
        _set_submodule(model, name, multi)
    if cfg.modules_to_save:  # the trained head is the model's own module: it becomes default's copy
        matches = [n for n, _ in model.named_modules() if n and _name_matches(n, cfg.modules_to_save)]
        for name in [h for h in matches if not any(h.startswith(o + ".") for o in matches)]:
            module = model.get_submodule(name)
            wrapper = ModulesToSaveWrapper(module)
            wrapper.copies[DEFAULT_NAME] = copy.deepcopy(module)
            _set_submodule(model, name, wrapper)
    object.__delattr__(model, _METHOD_ATTR)
    object.__setattr__(model, _MULTI_ATTR, AdapterSet({DEFAULT_NAME: method}, [DEFAULT_NAME]))


def _revert_to_single(model: nn.Module) -> None:
    """Undo :func:`_convert_single` on a model whose only adapter is ``"default"``: a failed add or
    load must leave a single-adapter model as it was (``get_adapter_method``, ``save_adapter``)."""
    reg = _registry(model)
    assert reg is not None and list(reg.methods) == [DEFAULT_NAME]
    for name, multi in multi_layers(model).items():
        layer = multi.adapters[DEFAULT_NAME]
        base = layer.__dict__.pop("base_layer")  # MultiAdapterLayer.add kept it as a plain attribute
        layer._modules["base_layer"] = base
        _set_submodule(model, name, layer)
    for name, wrapper in _wrappers(model).items():
        _set_submodule(model, name, wrapper.original_module)  # the model's own trained head
    object.__delattr__(model, _MULTI_ATTR)
    object.__setattr__(model, _METHOD_ATTR, reg.methods[DEFAULT_NAME])


def add_adapter(
    model: nn.Module,
    name: str,
    method: str | Method = "lora",
    config: AdapterConfig | dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, AdapterLayer]:
    """Add adapter ``name`` (a registered method with its config) to ``model``, in place.

    The first adapter added becomes active; later ones stay inactive until :func:`set_adapter`
    (as in PEFT). Returns qualified module name -> the new adapter's layers.
    """
    _check_name(name)
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise RuntimeError("cannot add an adapter while adapters are merged; unmerge_adapter(model) first")
    if getattr(model, _METHOD_ATTR, None) is None:
        return _add_adapter(model, name, method, config, **kwargs)
    alone = [(n, layer) for n, layer in adapter_layers(model).items() if not layer.named_adapters]
    if alone:
        raise TypeError(f"cannot add adapter {name!r}: the injected adapter's layer {alone[0][0]!r} "
                        f"({_kind(alone[0][1].base_layer)}) is one that named adapters do not support")
    _convert_single(model)
    try:
        return _add_adapter(model, name, method, config, **kwargs)
    except BaseException:
        _revert_to_single(model)
        raise


def _kind(module: nn.Module) -> str:
    """``nn.MultiheadAttention`` for torch's own modules, the class name otherwise (for messages)."""
    cls = type(module)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def _add_adapter(
    model: nn.Module,
    name: str,
    method: str | Method,
    config: AdapterConfig | dict[str, Any] | None,
    **kwargs: Any,
) -> dict[str, AdapterLayer]:
    reg = _registry(model)
    if reg is not None and name in reg.methods:
        raise ValueError(f"adapter {name!r} already exists; delete_adapter() it first")
    method_obj = method if isinstance(method, Method) else get_method(method)(make_config(method, config, **kwargs))
    cfg = method_obj.config
    if cfg.bias != "none":
        raise ValueError(f"named adapters support bias='none' only (biases are shared), got {cfg.bias!r}")
    for option in ("ensure_weight_tying", "target_parameters"):
        if getattr(cfg, option, None):
            raise ValueError(f"adapter {name!r}: named adapters do not support {option}; inject one adapter "
                             "with inject_adapter")
    with _plain_view(model) as wrapped:
        targets = find_targets(model, cfg)
        matches = [n for n, _ in model.named_modules() if n and cfg.modules_to_save and _name_matches(n, cfg.modules_to_save)]
        heads = [h for h in matches if not any(h.startswith(o + ".") for o in matches)]  # outermost only
        # a module cannot be both adapted and saved per adapter (each head copy would hold adapter layers)
        saved = [w for w, m in wrapped.items() if isinstance(m, ModulesToSaveWrapper)] + heads
        adapted = [w for w, m in wrapped.items() if isinstance(m, MultiAdapterLayer)] + targets
        for t in adapted:
            inside = [h for h in saved if t.startswith(h + ".")]
            if inside:
                raise ValueError(f"adapter {name!r}: adapted module {t!r} lies inside {inside[0]!r}, "
                                 f"a module saved per adapter (modules_to_save)")
        supported = method_obj.supported_types
        for t in targets:  # check every target before touching the model
            base = model.get_submodule(t)
            linear_ok = _is_conv1d(base) and nn.Linear in supported  # Conv1D is a transposed Linear
            if supported and not isinstance(base, supported) and not linear_ok:
                raise TypeError(f"method {cfg.method!r} cannot adapt module {t!r} of type {type(base).__name__}")
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    created: dict[str, nn.Module] = {}
    try:
        for t in targets:
            layer = model.get_submodule(t)
            if not isinstance(layer, MultiAdapterLayer):
                layer = MultiAdapterLayer(layer)
                _set_submodule(model, t, layer)
                created[t] = layer
            new = method_obj.make_layer(layer.base_layer, t)
            if not new.named_adapters:
                raise TypeError(f"adapter {name!r}: named adapters cannot adapt {_kind(layer.base_layer)} {t!r}; "
                                "exclude it, or inject one adapter with inject_adapter")
            layer.add(name, new)
        for h in heads:
            wrapper = model.get_submodule(h)
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(wrapper)
                _set_submodule(model, h, wrapper)
                created[h] = wrapper
            wrapper.copies[name] = copy.deepcopy(wrapper.original_module)
    except BaseException:
        _remove_from_layers(model, name)
        for t, w in created.items():
            _set_submodule(model, t, w.base_layer if isinstance(w, MultiAdapterLayer) else w.original_module)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        raise
    if reg is None:
        reg = AdapterSet()
        object.__setattr__(model, _MULTI_ATTR, reg)
    reg.methods[name] = method_obj
    if not reg.active:
        reg.active = [name]
    _sync(model)
    _warn_tied(model, {t: m for t, m in multi_layers(model).items() if t in targets})
    return named_adapter_layers(model, name)


def _remove_from_layers(model: nn.Module, name: str) -> None:
    for t, layer in multi_layers(model).items():
        if name in layer.adapters:
            del layer.adapters[name]
        if not len(layer.adapters):
            _set_submodule(model, t, layer.base_layer)
    for h, wrapper in _wrappers(model).items():
        if name in wrapper.copies:
            del wrapper.copies[name]
        if not len(wrapper.copies):
            _set_submodule(model, h, wrapper.original_module)


def _check_unmerged(model: nn.Module, what: str) -> None:
    if any(layer.merged for layer in multi_layers(model).values()):
        raise RuntimeError(f"cannot {what} while adapters are merged; unmerge_adapter(model) first")


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` (one name or a list, possibly empty) the active adapters; they alone train."""
    names = _as_names(names)
    reg = _require(model, names)
    if reg is None:
        raise ValueError("model carries no named adapters; add_adapter() first")
    _check_unmerged(model, "switch adapters")
    reg.active = names
    _sync(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a model left without adapters is the plain base model again."""
    reg = _require(model, [name])
    _check_unmerged(model, "delete an adapter")
    _remove_from_layers(model, name)
    del reg.methods[name]
    reg.active = [n for n in reg.active if n != name]
    if not reg.methods:
        object.__delattr__(model, _MULTI_ATTR)
    _sync(model)


@contextmanager
def use_adapter(model: nn.Module, names: str | Sequence[str]) -> Iterator[nn.Module]:
    """``with use_adapter(model, "sst2"): y = model(x)``; the previous active set comes back after."""
    before = active_adapters(model)
    set_adapter(model, names)
    try:
        yield model
    finally:
        set_adapter(model, before)


@contextmanager
def route_adapters(model: nn.Module, names: Sequence[str], adapter_index: torch.Tensor) -> Iterator[nn.Module]:
    """Per-example adapters: row ``i`` of the batch runs adapter ``names[adapter_index[i]]`` (``-1``: none).

    ``adapter_index``: integer tensor of shape ``(batch,)`` on the model's device. Each row's output
    equals running that row with its adapter alone (and its head copy); inputs must be batch-first.
    """
    names = tuple(_as_names(names))
    _require(model, names)
    _check_unmerged(model, "route adapters")
    index = torch.as_tensor(adapter_index)
    if index.dim() != 1 or index.dtype.is_floating_point:
        raise ValueError(f"adapter_index must be a 1-D integer tensor, got shape {tuple(index.shape)} {index.dtype}")
    if index.numel() and (int(index.min()) < -1 or int(index.max()) >= len(names)):
        raise ValueError(f"adapter_index values must lie in [-1, {len(names) - 1}]")
    modules: list[Any] = [*multi_layers(model).values(), *_wrappers(model).values()]
    for m in modules:
        m.routing = (names, index)
    try:
        yield model
    finally:
        for m in modules:
            m.routing = None


# ---- save / load by name ----------------------------------------------------------------------
def _adapter_file_tensors(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, str]]:
    """File key (the single-adapter format of :mod:`.state`) -> (model tensor, model key) of adapter ``name``."""
    out: dict[str, tuple[torch.Tensor, str]] = {}
    state = model.state_dict(keep_vars=True)
    for t, layer in multi_layers(model).items():
        if name not in layer.adapters:
            continue
        child = layer.adapters[name]
        key_map = getattr(child, "file_key_map", {})
        for local in child.adapter_state_dict():
            model_key = f"{t}.adapters.{name}.{local}"
            out[f"{PREFIX}{t}.{key_map.get(local, local)}"] = (state[model_key], model_key)
    for h, wrapper in _wrappers(model).items():
        if name in wrapper.copies:
            for local in wrapper.copies[name].state_dict():
                model_key = f"{h}.copies.{name}.{local}"
                out[f"{PREFIX}{h}.{local}"] = (state[model_key], model_key)
    return out


def adapter_subdir(directory: str | os.PathLike[str], name: str) -> Path:
    """Where adapter ``name`` lives under ``directory`` (PEFT: ``default`` at the root, others in ``<name>/``)."""
    return Path(directory) if name == DEFAULT_NAME else Path(directory) / name


def save_adapters(
    model: nn.Module,
    directory: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
) -> dict[str, Path]:
    """Save adapters by name (all by default), each in the single-adapter format of :mod:`.state`.

    Returns name -> directory. Each directory loads alone with :func:`~lightning_lora.core.state.load_adapter`
    (and, for LoRA, in PEFT: ``PeftModel.from_pretrained(model, directory, adapter_name=...)``).
    """
    names = adapter_names(model) if names is None else _as_names(names)
    reg = _require(model, names)
    out: dict[str, Path] = {}
    for name in names:
        tensors = {k: v for k, (v, _) in _adapter_file_tensors(model, name).items()}
        layers = named_adapter_layers(model, name)
        out[name] = write_adapter(adapter_subdir(directory, name), reg.methods[name], layers, tensors,
                                  base_model_name_or_path)
    return out


def _embedding_base_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """File key -> base weight of each module adapter ``name`` targets whose base weight PEFT saves
    beside the adapter (:func:`~lightning_lora.core.state.peft_embedding_base`)."""
    return {f"{PREFIX}{t}.base_layer.weight": w for t, layer in multi_layers(model).items()
            if name in layer.adapters and (w := peft_embedding_base(t, layer)) is not None}


def _same_base(saved: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``saved`` is ``weight``, in either one's dtype: PEFT saves the base in the dtype it
    trained in (bf16), which may be the model's own weight rounded (the model now in fp32)."""
    saved = saved.to(weight.device)
    return torch.equal(saved.to(weight.dtype), weight) or torch.equal(saved, weight.to(saved.dtype))


def load_adapter_as(model: nn.Module, directory: str | os.PathLike[str], name: str, strict: bool = True) -> nn.Module:
    """Load a saved adapter (ours or PEFT's) into ``model`` under ``name``; returns ``model``.

    Keys and shapes are checked before anything is copied; on any error the adapter is removed
    again, so a failed load leaves ``model`` as it was. A base weight PEFT saved with the adapter
    (``embed_tokens`` / ``lm_head`` targets) must equal the model's (whatever ``strict``), else
    :class:`AdapterFormatError`: named adapters share one base weight, so it is never replaced here
    (:func:`~lightning_lora.core.state.load_adapter` loads it, for a model with that one adapter).
    """
    directory = Path(directory)
    method_name, cfg, metadata = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    method = get_method(method_name)(cfg)
    raw_meta = metadata.get("lightning_lora_layer_metadata")
    restore = getattr(method, "restore_layer_metadata", None)
    if raw_meta and callable(restore):
        restore(json.loads(raw_meta))
    was_single = getattr(model, _METHOD_ATTR, None) is not None
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    try:
        add_adapter(model, name, method)
    except (ValueError, TypeError) as exc:
        raise AdapterFormatError(f"{weights}: adapter does not fit this model: {exc}") from exc
    try:
        expected = _adapter_file_tensors(model, name)
        with safe_open(str(weights), framework="pt") as f:
            file_keys = set(f.keys())
            # PEFT's saved embedding base weights: checked against the model's, not required (they
            # used to be "unexpected", or silently ignored under strict=False)
            bases = {k: w for k, w in _embedding_base_tensors(model, name).items() if k in file_keys}
            missing = sorted(set(expected) - file_keys)
            unexpected = sorted(file_keys - set(expected) - set(bases))
            if strict and (missing or unexpected):
                raise AdapterFormatError(f"{weights}: adapter does not fit this model: missing {missing[:5]}, "
                                         f"unexpected {unexpected[:5]}")
            common = sorted(file_keys & set(expected))
            for k, dst_t in {**{k: expected[k][0] for k in common}, **bases}.items():
                src, dst = tuple(f.get_slice(k).get_shape()), tuple(dst_t.shape)
                if src != dst:
                    raise AdapterFormatError(f"{weights}: tensor {k} has shape {src}, the model expects {dst}")
            # one base weight serves every named adapter: replacing it would change the others (and a
            # failed load_adapters could not undo it), so a different one is refused, an equal one is a no-op
            differ = sorted(k for k, w in bases.items() if not _same_base(f.get_tensor(k), w.detach()))
            if differ:
                raise AdapterFormatError(
                    f"{weights}: saved base weights {differ[:5]} differ from this model's, which all named "
                    f"adapters share; load_adapter(model, directory) loads them for a single adapter")
            with torch.no_grad():
                for k in common:
                    dst_t = expected[k][0]
                    dst_t.copy_(f.get_tensor(k).to(dst_t.dtype))
    except BaseException:
        delete_adapter(model, name)
        if was_single:
            _revert_to_single(model)
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
        raise
    return model


def _saved_adapter_names(directory: Path) -> list[str]:
    """The adapters saved under ``directory``: ``default`` when it holds one itself, then each
    sub-directory that holds one."""
    return ([DEFAULT_NAME] if (directory / WEIGHTS_NAME).is_file() else []) + sorted(
        p.name for p in directory.iterdir() if p.is_dir() and (p / WEIGHTS_NAME).is_file())


def load_adapters(model: nn.Module, directory: str | os.PathLike[str], names: Sequence[str] | None = None,
                  strict: bool = True) -> list[str]:
    """Load the adapters saved by :func:`save_adapters` (or PEFT's ``save_pretrained``) under ``directory``.

    ``names`` defaults to every adapter found: ``default`` when ``directory`` itself holds one, plus
    each sub-directory that holds one. Returns the names loaded.
    """
    directory = Path(directory)
    if names is None:
        names = _saved_adapter_names(directory)
        if not names:
            raise AdapterFormatError(f"{directory}: no adapter found (no {WEIGHTS_NAME} here or in a sub-directory)")
    names = _as_names(names)
    # every named folder must hold an adapter before anything is loaded (a missing one late in the
    # list used to fail after the earlier ones had been added to the model)
    absent = [n for n in names if not (adapter_subdir(directory, n) / WEIGHTS_NAME).is_file()]
    if absent:
        raise AdapterFormatError(f"{directory}: no saved adapter {absent} (no {WEIGHTS_NAME} in "
                                 f"{[str(adapter_subdir(directory, n)) for n in absent][:3]}); adapters found: "
                                 f"{_saved_adapter_names(directory) if directory.is_dir() else []}")
    # all or nothing: a later adapter that does not fit removes the ones this call already loaded,
    # so a failed call leaves the model as it was (single-adapter models included)
    was_single = getattr(model, _METHOD_ATTR, None) is not None
    before_active = active_adapters(model)
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    loaded: list[str] = []
    try:
        for name in names:
            load_adapter_as(model, adapter_subdir(directory, name), name, strict=strict)
            loaded.append(name)
    except BaseException:
        for name in reversed(loaded):
            delete_adapter(model, name)
        if loaded and was_single:
            _revert_to_single(model)
        elif _registry(model) is not None:
            set_adapter(model, before_active)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        raise
    return loaded


def copy_saved_modules(model: nn.Module, source: str, target: str) -> None:
    """Copy adapter ``source``'s ``modules_to_save`` weights (its head) into ``target``'s copies.

    Use it to give a merged adapter the head of one of its sources: ``target`` must already have a
    copy of each module ``source`` saves (add it with the same ``modules_to_save``).
    """
    _require(model, [source, target])
    pairs = [(h, w) for h, w in _wrappers(model).items() if source in w.copies]
    missing = [h for h, w in pairs if target not in w.copies]
    if missing:
        raise ValueError(f"adapter {target!r} has no copy of {missing} (give it modules_to_save={missing})")
    with torch.no_grad():
        for _, w in pairs:
            w.copies[target].load_state_dict(w.copies[source].state_dict())
