"""lightning_lora: LoRA-family adapters for any PyTorch model, driven by one Lightning callback.

    from lightning_lora import AdapterCallback, trainable_parameters
    trainer = L.Trainer(callbacks=[AdapterCallback("lora", r=8, target_modules=["query", "value"])])
"""

from .callback import AdapterCallback, load_adapter_checkpoint
from .core import (
    AdapterConfig,
    AdapterFormatError,
    AdapterLayer,
    Method,
    adapter_layers,
    adapter_state_dict,
    available_methods,
    disable_adapter,
    get_adapter_method,
    get_method,
    inject_adapter,
    load_adapter,
    make_config,
    merge_adapter,
    parameter_counts,
    print_trainable_parameters,
    register,
    save_adapter,
    set_adapter_enabled,
    trainable_parameters,
    unload,
    unmerge_adapter,
)
from .core.multi import (
    active_adapters,
    add_adapter,
    delete_adapter,
    load_adapters,
    route_adapters,
    save_adapters,
    set_adapter,
    use_adapter,
)
from .core._lora_cpp import disable as disable_cpp_path
from .core._lora_cpp import enable as enable_cpp_path
from .core._lora_cpp import status as cpp_path_status
from .methods.lora import LoRAConfig, invalidate_cast_caches

__version__ = "0.1.0"

__all__ = [
    "AdapterCallback", "AdapterConfig", "AdapterFormatError", "AdapterLayer", "LoRAConfig", "Method",
    "adapter_layers", "adapter_state_dict", "available_methods", "disable_adapter", "get_adapter_method",
    "get_method", "inject_adapter", "invalidate_cast_caches", "load_adapter", "load_adapter_checkpoint", "make_config", "merge_adapter",
    "parameter_counts", "print_trainable_parameters", "register", "save_adapter", "set_adapter_enabled",
    "trainable_parameters", "unload", "unmerge_adapter",
    # several named adapters on one model (core.multi)
    "active_adapters", "add_adapter", "delete_adapter", "load_adapters", "route_adapters", "save_adapters",
    "set_adapter", "use_adapter",
    # the C++ autograd functions of the fused LoRA paths (core._lora_cpp; automatic on CUDA)
    "enable_cpp_path", "disable_cpp_path", "cpp_path_status",
]
