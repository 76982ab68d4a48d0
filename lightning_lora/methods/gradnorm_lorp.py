"""GradNormLoRP (METHODS.md §3), fine-tuning path (i): a DoRA-form weight-normalised LoRA layer plus
the low-rank projected AdamW of :mod:`lightning_lora.optim.gradnorm_lorp` on the LoRA factors.

Layer: ``W' = m ⊙ (W0 + sBA)/‖W0 + sBA‖_row`` with ``m`` initialised to ``‖W0‖_row`` and B = 0, so the
output equals the base at init (bit-exact); trainable A, B, m: ``r(m+n) + m``. It is the DoRA layer of
:mod:`lightning_lora.methods.lora` (same forward, merge and unmerge with the cached row norm).

Optimizer: :meth:`GradNormLoRP.make_optimizer` builds :class:`GradNormLoRPAdamW` with projection on
``lora_A`` / ``lora_B`` (rank ``proj_rank``, α = ``proj_scale``, gap ``update_proj_gap``, ``proj_type``)
and plain AdamW on the magnitude and every other trainable parameter (heads), 32- or 8-bit state. The
task modules of :mod:`lightning_lora.tasks` (``SequenceClassifier``, ``CausalLM``) call it from
``configure_optimizers`` when the injected method has ``make_optimizer``, so
``AdapterCallback("gradnorm_lorp", ...)`` alone switches the optimizer; in your own module call
``get_adapter_method(self.model).make_optimizer(self, lr=...)``.

Defaults follow ``amdora_glue.sh`` [code]: r = 8, α = 16, dropout 0.1, projection rank 8, scale 4,
gap 500, std. The full-parameter path (ii) is the optimizer alone with ``weight_norm=True`` groups on
plain weights (:func:`lightning_lora.optim.gradnorm_lorp.gradnorm_lorp_param_groups`), no adapter layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.config import finite_number, Method, register, whole_number
from ..optim.gradnorm_lorp import GradNormLoRPAdamW, gradnorm_lorp_param_groups
from .lora import LoRAConfig, LoRALinear


@dataclass
class GradNormLoRPConfig(LoRAConfig):
    """LoRA options (``use_dora`` is forced on) plus the optimizer's projection options.

    Attributes:
        proj_rank: rank of the gradient projection.
        proj_scale: GaLore's α (update multiplier).
        update_proj_gap: SVD refresh period T (steps).
        proj_type: ``"std"`` | ``"full"`` | ``"identity"``.
        optim_bits: 32 or 8 (blockwise 8-bit Adam moments).
        eps: Adam ε (1e-6 in the code).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    use_dora: bool = True
    proj_rank: int = 8
    proj_scale: float = 4.0
    update_proj_gap: int = 500
    proj_type: str = "std"
    optim_bits: int = 32
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.use_dora:
            raise ValueError("GradNormLoRP's layer is the weight-normalised (DoRA) form: use_dora must be True")
        for key in ("proj_rank", "update_proj_gap", "optim_bits"):
            setattr(self, key, whole_number(getattr(self, key), key))
        if self.proj_type not in ("std", "full", "identity"):
            raise ValueError(f"proj_type must be 'std', 'full' or 'identity', got {self.proj_type!r}")
        if self.optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {self.optim_bits}")
        # checked at config time: the optimizer would refuse them only in configure_optimizers, after
        # the adapter was injected and the Trainer started
        if self.proj_rank < 1 or self.update_proj_gap < 1:
            raise ValueError(f"proj_rank and update_proj_gap must be >= 1, got {self.proj_rank}, {self.update_proj_gap}")
        # NaN passed ``eps < 0``; a NaN proj_scale multiplies every update: NaN weights at the first step
        self.eps = finite_number(self.eps, "eps")
        self.proj_scale = finite_number(self.proj_scale, "proj_scale")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


class GradNormLoRPLinear(LoRALinear):
    """DoRA-form layer: ``lora_A`` (r, in), ``lora_B`` (out, r), ``lora_magnitude`` (out,)."""

    #: LoRA's DoRA forward as it is (the projection lives in the optimizer): ``LoRALinear.cpp_path``
    cpp_path = True


@register("gradnorm_lorp")
class GradNormLoRP(Method):
    Config = GradNormLoRPConfig
    supported_types = (nn.Linear,)

    def make_layer(self, base: nn.Module, name: str) -> GradNormLoRPLinear:
        return GradNormLoRPLinear(base, self.config)  # type: ignore[arg-type]

    def make_optimizer(self, module: nn.Module, lr: float, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999), **_: Any) -> GradNormLoRPAdamW:
        """The projected AdamW over ``module``'s trainable parameters (see the module docstring)."""
        c: GradNormLoRPConfig = self.config  # type: ignore[assignment]
        groups = gradnorm_lorp_param_groups(module, rank=c.proj_rank, update_proj_gap=c.update_proj_gap,
                                            scale=c.proj_scale, proj_type=c.proj_type)
        return GradNormLoRPAdamW(groups, lr=lr, betas=tuple(betas), eps=c.eps, weight_decay=weight_decay,
                                 optim_bits=c.optim_bits)
