"""Machinery shared by every method: configs and registry, the adapter layer, injection, state."""

from .config import AdapterConfig, Method, available_methods, get_method, make_config, register
from .inject import (
    adapter_layers,
    disable_adapter,
    find_targets,
    get_adapter_method,
    inject_adapter,
    merge_adapter,
    modules_to_save_parameters,
    named_trainable_parameters,
    parameter_counts,
    print_trainable_parameters,
    set_adapter_enabled,
    trainable_parameters,
    unload,
    unmerge_adapter,
)
from .layer import AdapterLayer
from .state import AdapterFormatError, adapter_state_dict, load_adapter, read_adapter_config, save_adapter

__all__ = [
    "AdapterConfig", "AdapterFormatError", "AdapterLayer", "Method", "adapter_layers", "adapter_state_dict",
    "available_methods", "disable_adapter", "find_targets", "get_adapter_method", "get_method", "inject_adapter",
    "load_adapter", "make_config", "merge_adapter", "modules_to_save_parameters", "named_trainable_parameters",
    "parameter_counts", "print_trainable_parameters", "read_adapter_config",
    "register", "save_adapter", "set_adapter_enabled", "trainable_parameters", "unload", "unmerge_adapter",
]
