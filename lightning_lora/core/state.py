"""Adapter-only state dicts and the on-disk adapter format.

A saved adapter is a directory with two files, the layout Hugging Face PEFT uses:

- ``adapter_model.safetensors``: the adapter tensors, keyed ``base_model.model.<module>.<tensor>``
  (PEFT's keys: ``...q_proj.lora_A.weight``). Its safetensors metadata also records this library's
  method name and full config, so non-PEFT methods round-trip too.
- ``adapter_config.json``: PEFT's config for methods PEFT knows (LoRA, rsLoRA, DoRA), so the
  directory loads with ``peft.PeftModel.from_pretrained``; otherwise this library's config.

Loading never unpickles: tensors come from safetensors, the config from JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import AdapterConfig, Method, available_methods, get_method, make_config
from .inject import _inside, _set_submodule, adapter_layers, adapter_writes, get_adapter_method, inject_adapter, unload
from .layer import AdapterLayer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterFormatError(ValueError):
    """An adapter directory or file that cannot be used with this model."""


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors of ``model`` keyed as in the model's own ``state_dict`` (plus trainable extras).

    Holds every adapter layer's own tensors, ``modules_to_save`` and any other trainable
    parameter (e.g. biases under ``bias="lora_only"``); never the frozen base weights.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model).items():
        for k, t in layer.adapter_state_dict().items():
            out[f"{name}.{k}"] = t
    for name, p in model.named_parameters():
        if p.requires_grad and name not in out:
            out[name] = p.detach()
    method = get_adapter_method(model)
    if method is not None and method.config.modules_to_save:
        for name, t in model.state_dict().items():
            module_name = name.rsplit(".", 1)[0]
            if _inside(module_name, method.config.modules_to_save):  # nested modules too (BatchNorm stats)
                out[name] = t
    return out


def _to_file_key(model: nn.Module, key: str) -> str:
    """Model key -> PEFT file key (``lora_A`` -> ``lora_A.weight`` etc., per layer class)."""
    layers = adapter_layers(model)
    module_name, _, local = key.rpartition(".")
    layer = layers.get(module_name)
    if layer is not None:
        local = getattr(layer, "file_key_map", {}).get(local, local)
    return PREFIX + (f"{module_name}.{local}" if module_name else local)


def _from_file_keys(model: nn.Module) -> dict[str, str]:
    """File key -> model key for every tensor :func:`adapter_state_dict` would save."""
    return {_to_file_key(model, k): k for k in adapter_state_dict(model)}


def save_adapter(model: nn.Module, directory: str | os.PathLike[str], base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``.

    Files are written to a temporary name and renamed, so an interrupted save leaves no
    half-written adapter behind.
    """
    method = get_adapter_method(model)
    if method is None:
        raise ValueError("model has no adapter to save; inject_adapter() first")
    tensors = {_to_file_key(model, k): v for k, v in adapter_state_dict(model).items()}
    tensors.update(_file_extras(model))
    return write_adapter(directory, method, adapter_layers(model), tensors, base_model_name_or_path)


def _file_extras(model: nn.Module) -> dict[str, torch.Tensor]:
    """File key -> tensor of every layer's :meth:`~lightning_lora.core.layer.AdapterLayer.file_extras`."""
    return {PREFIX + f"{name}.{k}": t for name, layer in adapter_layers(model).items() for k, t in layer.file_extras().items()}


def write_adapter(
    directory: str | os.PathLike[str],
    method: Method,
    layers: dict[str, AdapterLayer],
    tensors: dict[str, torch.Tensor],
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write one adapter (``method``'s ``layers``, ``tensors`` keyed by file key) in the format above."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _unshared({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    metadata = {
        "format": "pt",
        "lightning_lora_method": method.config.method,
        "lightning_lora_config": json.dumps(method.config.to_dict()),
        "lightning_lora_layers": json.dumps(sorted(layers)),
    }
    extra = getattr(method, "layer_metadata", None)
    if callable(extra):
        metadata["lightning_lora_layer_metadata"] = json.dumps(extra(layers))
    # PEFT's format where the method has one and PEFT could load these layers (``to_peft_config``
    # returns None where it could not); this library's own config otherwise
    peft = getattr(method, "to_peft_config", None)
    config_json: dict[str, Any] = (peft(layers) if callable(peft) else None) or {"lightning_lora": method.config.to_dict()}
    config_json["base_model_name_or_path"] = base_model_name_or_path
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=metadata))
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config_json, indent=2, sort_keys=True)))
    return directory


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every tensor that shares memory with an earlier one cloned: safetensors refuses
    shared storage, which tied weights give (a tied output head in ``modules_to_save`` is also the
    input embedding). Loading writes the same values into both names, so the tie holds."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) if v.numel() else (id(v), 0)
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_adapter_config(directory: str | os.PathLike[str]) -> tuple[str, AdapterConfig, dict[str, Any]]:
    """``(method name, config, metadata)`` of a saved adapter (ours or PEFT's)."""
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFormatError(f"{weights}: no adapter weights file (expected {WEIGHTS_NAME} in {directory})")
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterFormatError(f"{weights}: not a readable safetensors file ({exc})") from None
    if "lightning_lora_method" in metadata:
        name = metadata["lightning_lora_method"]
        cfg = make_config(name, json.loads(metadata["lightning_lora_config"]))
        return name, cfg, metadata
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{cfg_path}: missing adapter config")
    try:
        peft_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{cfg_path}: invalid JSON ({exc})") from None
    peft_type = str(peft_cfg.get("peft_type", "")).upper()
    for name in available_methods():
        cls = get_method(name)
        if getattr(cls, "peft_type", None) == peft_type and hasattr(cls, "from_peft_config"):
            try:
                return name, cls.from_peft_config(peft_cfg), metadata
            except (ValueError, TypeError, KeyError) as exc:  # options this library does not support
                raise AdapterFormatError(f"{cfg_path}: {exc}") from exc
    raise AdapterFormatError(f"{cfg_path}: PEFT type {peft_type or '(none)'} is not supported by lightning_lora")


@contextmanager
def injected_for_loading(
    model: nn.Module, name: str, cfg: AdapterConfig, layer_metadata: Any, source: str | os.PathLike[str]
) -> Iterator[None]:
    """Inject method ``name`` into ``model`` for a load from ``source``, unless it already carries it.

    ``layer_metadata`` (structure the tensors' shapes depend on, e.g. DyLoRA's ranks) is restored
    before injection. An error inside the ``with`` block removes an adapter injected here and
    restores ``requires_grad``, so a failed load leaves ``model`` as it was. Errors name ``source``.
    """
    existing = get_adapter_method(model)
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    # the modules themselves: unload() puts back each layer's base, which a method may have replaced
    # (LQ-LoRA: by the quantized weight)
    originals = dict(model.named_modules())
    if existing is None:
        method = get_method(name)(cfg)
        restore = getattr(method, "restore_layer_metadata", None)
        if layer_metadata is not None and callable(restore):
            try:
                restore(layer_metadata)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise AdapterFormatError(f"{source}: invalid layer metadata for {name!r}: {exc}") from exc
        try:
            inject_adapter(model, method)
        except (ValueError, TypeError) as exc:  # targets absent from / unsupported in this model
            raise AdapterFormatError(f"{source}: adapter does not fit this model: {exc}") from exc
    elif existing.config.method != name:
        raise AdapterFormatError(f"{source}: adapter is {name!r} but the model already carries {existing.config.method!r}")
    try:
        yield
    except BaseException:
        if existing is None:  # undo our own injection
            injected = list(adapter_layers(model))
            unload(model)
            for layer_name in injected:
                _set_submodule(model, layer_name, originals[layer_name])
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
        raise


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], strict: bool = True) -> nn.Module:
    """Inject (if needed) and load a saved adapter into ``model``; returns ``model``.

    Keys are checked: with ``strict`` a tensor missing from the file, an unexpected tensor or a
    shape mismatch raises :class:`AdapterFormatError` naming the file and the keys. Everything is
    checked before any tensor is copied; when the check fails, an adapter injected by this call is
    removed again, so a failed load leaves ``model`` as it was.
    """
    directory = Path(directory)
    name, cfg, metadata = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    raw_meta = metadata.get("lightning_lora_layer_metadata")
    with injected_for_loading(model, name, cfg, json.loads(raw_meta) if raw_meta else None, weights):
        _copy_adapter_tensors(model, weights, strict)
    return model


#: PEFT's ``EMBEDDING_LAYER_NAMES``: the only targets whose base weight it saves beside the adapter
_PEFT_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def peft_embedding_base(name: str, layer: nn.Module) -> torch.Tensor | None:
    """The base weight PEFT saves beside the adapter of layer ``name`` (as
    ``<name>.base_layer.weight``), or None: PEFT does so only for the layers it counts as embedding
    layers (``embed_tokens``, ``lm_head``; ``save_embedding_layers="auto"``)."""
    if name.rsplit(".", 1)[-1] not in _PEFT_EMBEDDING_LAYER_NAMES:
        return None
    weight = getattr(getattr(layer, "base_layer", None), "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _peft_embedding_base_keys(model: nn.Module) -> dict[str, str]:
    """File key -> model key of every adapter layer's base weight that PEFT saves
    (:func:`peft_embedding_base`). PEFT loads that tensor into the base layer; so does
    :func:`load_adapter`, where the file has it."""
    return {PREFIX + f"{name}.base_layer.weight": f"{name}.base_layer.weight" for name, layer in adapter_layers(model).items()
            if peft_embedding_base(name, layer) is not None}


def _copy_adapter_tensors(model: nn.Module, weights: Path, strict: bool) -> None:
    file_to_model = _from_file_keys(model)
    with safe_open(str(weights), framework="pt") as f:
        file_keys = set(f.keys())
        missing = sorted(set(file_to_model) - file_keys)
        # a base weight PEFT saved is loaded, not required: every other file lacks it
        file_to_model.update({k: v for k, v in _peft_embedding_base_keys(model).items() if k in file_keys})
        # copies another format keeps (PEFT's tied head factors): expected where the file has them, not read
        unexpected = sorted(file_keys - set(file_to_model) - set(_file_extras(model)))
        if strict and (missing or unexpected):
            raise AdapterFormatError(
                f"{weights}: adapter does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        state = model.state_dict(keep_vars=True)
        common = sorted(file_keys & set(file_to_model))
        for fkey in common:  # every shape first, so a mismatch copies nothing
            src_shape = tuple(f.get_slice(fkey).get_shape())
            dst_shape = tuple(state[file_to_model[fkey]].shape)
            if src_shape != dst_shape:
                raise AdapterFormatError(
                    f"{weights}: tensor {fkey} has shape {src_shape}, the model expects {dst_shape}"
                )
        with torch.no_grad(), adapter_writes(model):
            for fkey in common:
                dst = state[file_to_model[fkey]]
                dst.copy_(f.get_tensor(fkey).to(dst.dtype))
