"""Optimizer-side pieces of adapter methods (ALLoRA gradient scaling, ...)."""

from .allora import ALLoRAOptimizer, adapter_parameters, allora_coefficient, scale_gradients

__all__ = ["ALLoRAOptimizer", "adapter_parameters", "allora_coefficient", "scale_gradients"]
