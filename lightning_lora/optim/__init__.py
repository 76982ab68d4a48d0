"""Optimizer-side pieces of adapter methods (ALLoRA gradient scaling, ...)."""

from .allora import (
    ALLoRAOptimizer,
    UpdateScaling,
    adapter_parameters,
    allora_coefficient,
    install_update_scaling,
    scale_gradients,
)

__all__ = ["ALLoRAOptimizer", "UpdateScaling", "adapter_parameters", "allora_coefficient", "install_update_scaling",
           "scale_gradients"]
