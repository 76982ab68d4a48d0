"""Find target modules, replace them by adapter layers, freeze the rest, and undo it all."""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig, Method, get_method, make_config
from .layer import AdapterLayer, _is_conv1d

_METHOD_ATTR = "_lightning_lora_method"
#: set by core.multi on a model that carries several named adapters
_MULTI_ATTR = "_lightning_lora_adapters"


def _name_matches(name: str, keys: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def _inside(name: str, keys: list[str]) -> bool:
    """Whether ``name`` or one of its parent modules matches ``keys`` (modules trained in full)."""
    parts = name.split(".")
    return any(_name_matches(".".join(parts[:i]), keys) for i in range(1, len(parts) + 1))


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _output_head_names(model: nn.Module) -> set[str]:
    """Qualified names of the model's output head (excluded from ``"all-linear"``, as PEFT does)."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out_emb is not None and module is out_emb:
            heads.add(name)
        elif name.split(".")[-1] in ("lm_head", "classifier", "score"):
            heads.add(name)
    return heads


#: PEFT's sequence-classification task lists both head names in ``modules_to_save``; a model has one
_PEFT_HEAD_NAMES = frozenset({"classifier", "score"})


def _check_named_modules(model: nn.Module, config: AdapterConfig) -> None:
    """``modules_to_save`` must match a module (a typo would leave the head frozen and unsaved);
    names of it that match nothing when others do, and ``exclude_modules`` names that match nothing
    (a typo adapts the module it meant to exclude), are warned about. PEFT ignores unmatched names,
    and its sequence-classification configs list both ``classifier`` and ``score``: the one of those
    two that a model lacks is not warned about."""
    names = [n for n, _ in model.named_modules() if n and ".base_layer" not in n]
    unmatched_save = [k for k in config.modules_to_save if not any(_name_matches(n, [k]) for n in names)]
    if unmatched_save and len(unmatched_save) == len(config.modules_to_save):
        children = [n for n, _ in model.named_children()]
        raise ValueError(f"modules_to_save={unmatched_save!r} matched no module (a name matches a module whose "
                         f"qualified name equals it or ends with '.' + name); top-level modules: {children}")
    unmatched_save = [k for k in unmatched_save if k not in _PEFT_HEAD_NAMES]
    if unmatched_save:
        warnings.warn(f"modules_to_save={unmatched_save!r} matched no module", stacklevel=3)
    unmatched_exclude = [k for k in config.exclude_modules if not any(_name_matches(n, [k]) for n in names)]
    if unmatched_exclude:
        warnings.warn(f"exclude_modules={unmatched_exclude!r} matched no module", stacklevel=3)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Qualified names of the modules ``config`` targets, in model order.

    Raises ``ValueError`` when nothing matches, listing some module names to help fix the pattern.
    """
    _check_named_modules(model, config)
    targets = config.target_modules
    type_keys = tuple(config.target_types)
    heads = _output_head_names(model) if targets == "all-linear" else set()
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, AdapterLayer) or ".base_layer" in name:
            continue
        if _name_matches(name, config.exclude_modules) or _inside(name, config.modules_to_save):
            continue
        if targets == "all-linear":
            hit = _is_linear_like(module) and name not in heads
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        elif targets:
            hit = _name_matches(name, list(targets))
        else:
            hit = False
        if not hit and type_keys:
            hit = any(
                (isinstance(t, str) and type(module).__name__ == t) or (isinstance(t, type) and isinstance(module, t))
                for t in type_keys
            )
        if hit:
            names.append(name)
    # an adapted nn.MultiheadAttention adapts its own out_proj (which it never calls: it reads the weight)
    attention = {n for n in names if isinstance(model.get_submodule(n), nn.MultiheadAttention)}
    names = [n for n in names if not (n.endswith(".out_proj") and n.rpartition(".")[0] in attention)]
    if not names and not getattr(config, "target_parameters", None):  # (LoRA on bare parameters alone)
        sample = [n for n, m in model.named_modules() if _is_linear_like(m)][:8]
        raise ValueError(
            f"target_modules={targets!r} target_types={list(type_keys)!r} matched no module; "
            f"linear modules in this model include: {sample}"
        )
    return names


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_adapter(
    model: nn.Module,
    method: str | Method = "lora",
    config: AdapterConfig | dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, AdapterLayer]:
    """Wrap every target module of ``model`` in the method's adapter layer, in place.

    Freezes every parameter of the model, then marks the adapter parameters, ``modules_to_save``
    and (by ``config.bias``) biases trainable. Calling it again on an adapted model raises; use
    :func:`adapter_layers` to get the existing layers.

    Returns:
        qualified module name -> adapter layer.
    """
    if getattr(model, _METHOD_ATTR, None) is not None:
        raise RuntimeError("model already has an adapter; unload() it first or use adapter_layers()")
    if getattr(model, _MULTI_ATTR, None) is not None:
        raise RuntimeError("model carries named adapters; use lightning_lora.core.multi.add_adapter()")
    if isinstance(method, Method):
        method_obj = method
    else:
        method_obj = get_method(method)(make_config(method, config, **kwargs))
    cfg = method_obj.config
    names = find_targets(model, cfg)
    supported = method_obj.supported_types
    for name in names:  # check every target before touching the model
        base = model.get_submodule(name)
        linear_ok = _is_conv1d(base) and nn.Linear in supported  # Conv1D is a transposed Linear
        if supported and not isinstance(base, supported) and not linear_ok:
            raise TypeError(
                f"method {cfg.method!r} cannot adapt module {name!r} of type {type(base).__name__}; "
                f"supported: {[t.__name__ for t in supported]}"
            )
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    # the modules themselves: a layer may replace its base (LQ-LoRA: by the quantized weight)
    originals = {name: model.get_submodule(name) for name in names}
    layers: dict[str, AdapterLayer] = {}
    try:
        for name in names:
            layer = method_obj.make_layer(originals[name], name)
            _set_submodule(model, name, layer)
            layers[name] = layer
        for name, layer in method_obj.extra_layers(model, layers).items():
            originals[name] = model.get_submodule(name)
            _set_submodule(model, name, layer)
            layers[name] = layer
    except BaseException:
        # a layer that cannot be built (shape constraint, ...) leaves the model as it was
        for name in layers:
            _set_submodule(model, name, originals[name])
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        raise
    object.__setattr__(model, _METHOD_ATTR, method_obj)
    _mark_trainable(model, cfg)
    method_obj.on_inject(model, layers)
    _warn_tied(model, layers)
    return layers


def _warn_tied(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """Say when an adapted weight is tied to another module (GPT-2's ``wte`` and ``lm_head``): that
    module keeps running the base weight without the update, and merging is refused."""
    for name, others in tied_modules(model, layers).items():
        warnings.warn(f"the base weight of {name!r} is tied to {others[0]!r}: the adapter acts in {name!r} only "
                      f"({others[0]!r} keeps the frozen weight), and it cannot be merged", stacklevel=3)


def _mark_trainable(model: nn.Module, cfg: AdapterConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_layers(model).values():
        for pname in layer.adapter_param_names:
            p = getattr(layer, pname, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(True)
        if cfg.bias == "lora_only":
            for bias in layer.base_biases():
                bias.requires_grad_(True)
    if cfg.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    for name, module in model.named_modules():
        if cfg.modules_to_save and _name_matches(name, cfg.modules_to_save):
            for p in module.parameters():
                p.requires_grad_(True)


def get_adapter_method(model: nn.Module) -> Method | None:
    """The method object injected into ``model``, or None."""
    return getattr(model, _METHOD_ATTR, None)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Qualified name (of the original module) -> adapter layer, in model order.

    Only outermost adapter layers: the per-adapter layers inside a multi-adapter layer
    (:mod:`lightning_lora.core.multi`) belong to it and are not listed.
    """
    out: dict[str, AdapterLayer] = {}
    outer: str | None = None
    for name, m in model.named_modules():  # pre-order: a layer's descendants follow it directly
        if outer is not None and name.startswith(outer + "."):
            continue
        if isinstance(m, AdapterLayer):
            out[name] = m
            outer = name
    return out


def modules_to_save_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the modules an injected config trains in full (``modules_to_save``: a
    classifier head, a pooler), wherever in ``model`` the adapter was injected (a LightningModule's
    ``self.model``, say), in model order."""
    out: dict[int, nn.Parameter] = {}
    for root in model.modules():
        method = get_adapter_method(root)
        keys = list(method.config.modules_to_save or []) if method is not None else []
        if not keys:
            continue
        for name, module in root.named_modules():
            if _name_matches(name, keys):
                out.update((id(p), p) for p in module.parameters() if p.requires_grad)
    return list(out.values())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``: what ``configure_optimizers`` should hand the optimizer."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """``{"trainable": n, "total": N, "trainable_percent": 100·n/N}``: parameter elements, each shared
    (tied) parameter once. A quantized base (LQ-LoRA) holds its frozen weights as packed buffers, which
    are not parameters and are not in ``total``."""
    params = list(model.parameters())  # (deduplicated by identity: a tied weight counts once)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / total if total else 0.0}


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: n || all params: N || trainable%: x`` (PEFT's line) for ``model``."""
    c = parameter_counts(model)
    print(f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
          f"trainable%: {c['trainable_percent']:.4f}")


def named_trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def merge_adapter(model: nn.Module) -> None:
    """Merge every adapter layer into its base weight. Refused (ValueError, nothing merged) where a base
    weight is tied to another module (:func:`check_untied_for_merge`)."""
    layers = adapter_layers(model)
    check_untied_for_merge(model, layers)
    for layer in layers.values():
        layer.merge()


def check_untied_for_merge(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """Raise ValueError when the base weight of one of ``layers`` is also another module's parameter
    (tied weights: GPT-2's ``wte`` and ``lm_head``). Merging writes the update into that tensor, so the
    other module would change too: the merged model would not compute what the unmerged one does (the
    tied head never saw the adapter)."""
    for name, others in tied_modules(model, layers).items():
        raise ValueError(f"cannot merge the adapter of {name!r}: its base weight is tied to {others[0]!r} (the "
                         "same tensor), which merging would change too, without the adapter's own input; untie "
                         "them first (e.g. copy the weight into a new parameter) or keep the adapter unmerged")


def tied_modules(model: nn.Module, layers: dict[str, AdapterLayer]) -> dict[str, list[str]]:
    """Adapter layer name -> the other modules whose parameter its base weight also is (tied weights);
    layers with an untied base weight are left out."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rpartition(".")[0])
    tied: dict[str, list[str]] = {}
    for name, layer in layers.items():
        weight = getattr(layer.base_layer, "weight", None)
        if isinstance(weight, torch.Tensor):
            others = [o for o in owners.get(id(weight), []) if o != name and not o.startswith(name + ".")
                      and not _share_update(layer, layers.get(o.removesuffix(".base_layer")))]
            if others:
                tied[name] = others
    return tied


def _share_update(layer: AdapterLayer, other: AdapterLayer | None) -> bool:
    """Whether ``layer`` and ``other`` apply one update to their shared weight (LoRA's tied head and
    its embedding: ``ensure_weight_tying``), so merging it once is right for both."""
    return other is not None and (getattr(other, "tied_source", None) is layer or getattr(layer, "tied_source", None) is other)


def unmerge_adapter(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def unmerge_merged(model: nn.Module) -> list[AdapterLayer]:
    """Unmerge the layers of ``model`` that are merged; returns them."""
    merged = [layer for layer in adapter_layers(model).values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    return merged


@contextmanager
def adapter_writes(model: nn.Module) -> Iterator[None]:
    """Around code that writes adapter tensors: merged layers are unmerged for it and merged again
    after it, with the new tensors. Written into a merged layer, new tensors would not change the
    output (the old update stays in the base weight), and a later unmerge would subtract the new
    update from a weight that holds the old one: the base would be lost."""
    merged = unmerge_merged(model)
    try:
        yield
    finally:
        for layer in merged:
            layer.merge()


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    """Enable or disable every adapter layer (disabled = exact base model). Disabling is refused,
    before any layer changes, while adapters are merged: ``unmerge_adapter(model)`` first.

    Modules trained in full (``modules_to_save``, a new classifier head) are not adapter layers: with
    one injected adapter they are the model's own modules, trained in place, and keep their trained
    weights when the adapter is disabled. Named adapters (:mod:`lightning_lora.core.multi`) keep the
    original module beside each adapter's copy, and disabling there runs the original, as in PEFT."""
    from .multi import ModulesToSaveWrapper  # multi imports this module

    layers = adapter_layers(model).values()
    if not enabled and any(layer.merged for layer in layers):
        raise RuntimeError("cannot disable merged adapters (their update is in the base weights); "
                           "unmerge_adapter(model) first")
    for layer in layers:
        layer.enable_adapter() if enabled else layer.disable_adapter()
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.disabled = not enabled


class disable_adapter:
    """Disable every adapter of ``model`` now; as a context manager, enable them again on exit:
    ``with disable_adapter(model): base_out = model(x)``. A bare ``disable_adapter(model)`` leaves
    them disabled (``set_adapter_enabled(model, True)`` enables them)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        set_adapter_enabled(model, False)

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc: Any) -> None:
        set_adapter_enabled(self.model, True)


@torch.no_grad()
def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Replace every adapter layer by its base layer, merging the update first if ``merge``.

    Returns the same model object; parameters keep their ``requires_grad=False``. On a model with
    named adapters (``core.multi``) every adapter goes and the model no longer lists any; a module
    trained in full per adapter (``modules_to_save``) becomes the active adapter's copy, as PEFT's
    ``unload`` does, or the original module when no active adapter has a copy.
    """
    from .multi import ModulesToSaveWrapper  # multi imports this module

    if merge:
        check_untied_for_merge(model, {n: layer for n, layer in adapter_layers(model).items() if not layer.merged})
    for name, layer in adapter_layers(model).items():
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name, wrapper in wrappers:
        kept = wrapper.copies[wrapper.active] if wrapper.active in wrapper.copies else wrapper.original_module
        _set_submodule(model, name, kept)
    for attr in (_METHOD_ATTR, _MULTI_ATTR):
        if hasattr(model, attr):
            object.__delattr__(model, attr)
    return model
