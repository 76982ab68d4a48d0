"""FFA-LoRA (Sun, Li, Li, Ding, ICLR 2024; METHODS.md §16): LoRA with A frozen at its random init.

``y = W0 x + b + s · B A0 dropout(x)``; ``A0 ∈ R^{r×n}`` frozen, ``B ∈ R^{m×r}`` trainable, B = 0 at
init so the adapted model equals the base model (S1, bit-exact). Only B trains: ``r·m`` parameters
per adapted m×n matrix (LoRA: ``r(m+n)``).

Why freeze A (METHODS §16, "Equations"):

- exact federated aggregation [derived]: ``mean_k(B_k A0) = (mean_k B_k) A0``, so averaging B
  (:func:`fedavg`) is exactly averaging the clients' updates; vanilla LoRA's separate averaging
  gives ``mean_k(B_k)·mean_k(A_k) ≠ mean_k(B_k A_k)``;
- DP noise enters linearly: ``W0 + (B + ξ_B) A0``, no ``ξ_B ξ_A`` term [paper];
- scaling [paper, Theorem 1; derived]: under SGD, scaling ``s`` by ``c`` equals scaling the lr by
  ``c²``, so α only rescales the lr. The paper calls FFA "LoRA with α → ∞" yet uses α = 8 with r = 8
  [secondary]; the default here is ``alpha = r`` (s = 1), the paper's setting. (FedSA-LoRA's harness
  uses α = 2r; pass ``alpha=16`` for it.)

A0 is a persistent buffer, not a parameter: it never reaches an optimizer, Opacus adds no noise to
it, and it is SAVED with the adapter (METHODS S4: a recomputed init is not bit-stable across
RNG/hardware). Sharing A0 between clients [§16 open choice]: one broadcast of the saved adapter
(default: every client loads the server's adapter, A0 included), or ``a0_seed``: A0 drawn from a
generator seeded by ``a0_seed`` and the module name, identical on every client that uses the same
seed, torch version and init. The layer reuses :class:`LoRALinear` (fused path included); the saved
directory is a plain PEFT LoRA directory (``lora_A.weight`` = A0), so PEFT loads it for inference.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.config import register, whole_number
from .lora import LoRA, LoRAConfig, LoRALinear


@dataclass
class FFALoRAConfig(LoRAConfig):
    """FFA-LoRA options: LoRA's (see :class:`LoRAConfig`), with

    Attributes:
        alpha: scale numerator, ``s = alpha / r``; ``None`` (default) means ``alpha = r``, s = 1
            (paper: α = r = 8).
        a0_seed: if set, A0 is drawn from ``torch.Generator().manual_seed(a0_seed + crc32(name))``
            so clients agree on A0 without a broadcast; ``None`` uses the global RNG (then share A0
            by broadcasting the saved adapter).

    ``use_dora`` is rejected: a trainable magnitude is not FFA-LoRA and breaks its linearity in B.
    """

    alpha: float | None = None  # type: ignore[assignment]
    a0_seed: int | None = None

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = float(self.r)
        super().__post_init__()
        self.a0_seed = whole_number(self.a0_seed, "a0_seed", optional=True)
        if self.use_dora:
            raise ValueError("FFA-LoRA does not support use_dora: only B trains (METHODS.md §16)")


class FFALoRALinear(LoRALinear):
    """LoRA layer whose ``lora_A`` (r, in_features) is a frozen, saved buffer; ``lora_B`` (out, r)
    is the only parameter."""

    adapter_param_names = ("lora_B",)
    adapter_buffer_names = ("lora_A",)
    #: LoRA's forward with A a buffer (no gradient asked for it): ``LoRALinear.cpp_path``
    cpp_path = True

    def __init__(self, base_layer: nn.Module, config: FFALoRAConfig, name: str = "") -> None:
        super().__init__(base_layer, config)
        a0 = self.lora_A.detach()
        if config.a0_seed is not None:
            g = torch.Generator(device="cpu").manual_seed(config.a0_seed + zlib.crc32(name.encode()))
            cpu = torch.empty(a0.shape, dtype=torch.float32)
            if config.init == "kaiming":
                nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=g)
            else:
                nn.init.normal_(cpu, std=1.0 / self.r, generator=g)
            a0 = cpu.to(device=a0.device, dtype=a0.dtype)
        del self.lora_A  # the LoRA parameter becomes a buffer of the same name (fused path unchanged)
        self.register_buffer("lora_A", a0.clone(), persistent=True)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", A frozen"


@register("ffa_lora")
class FFALoRA(LoRA):
    """FFA-LoRA. Saves a PEFT LoRA directory (A0 as ``lora_A.weight``); reloads here as FFA-LoRA
    through the file's own metadata. ``peft_type`` is None so PEFT LoRA directories keep loading
    as plain LoRA."""

    Config = FFALoRAConfig
    supported_types = (nn.Linear,)
    peft_type: ClassVar[str | None] = None  # type: ignore[assignment]

    def make_layer(self, base: nn.Module, name: str) -> FFALoRALinear:
        return FFALoRALinear(base, self.config, name)  # type: ignore[arg-type]


@torch.no_grad()
def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted FedAvg of FFA-LoRA adapter state dicts (``lightning_lora.adapter_state_dict``).

    ``B̄ = Σ_k w_k B_k / Σ_k w_k`` (weights = client sample counts n_k; default equal) for every
    trainable tensor; A0 (``*.lora_A``) is checked to be identical on every client and copied, since
    the exact aggregation ``mean_k(B_k A0) = B̄ A0`` only holds for a shared A0. Averages in fp32 and
    returns each tensor in its input dtype.
    """
    if not states:
        raise ValueError("fedavg needs at least one client state")
    w = [1.0] * len(states) if weights is None else [float(v) for v in weights]
    if len(w) != len(states):
        raise ValueError(f"fedavg got {len(w)} weights for {len(states)} client states")
    # each weight must be valid on its own: a positive sum alone let e.g. [2, -1] extrapolate
    # (2 B_0 - B_1) and NaN slip through (NaN <= 0 is False)
    if any(not math.isfinite(v) or v < 0 for v in w):
        raise ValueError(f"fedavg weights must be finite and non-negative (client sample counts), got {w}")
    if sum(w) <= 0:
        raise ValueError(f"fedavg weights are all zero ({w}): at least one client needs a positive weight")
    keys = states[0].keys()
    for k, s in enumerate(states[1:], 1):
        if s.keys() != keys:
            raise ValueError(f"client {k} has different adapter keys than client 0")
    total = sum(w)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][key]
        if key.endswith("lora_A"):
            for k, s in enumerate(states[1:], 1):
                if not torch.equal(s[key], first):
                    raise ValueError(f"A0 differs between client 0 and client {k} at {key}: share A0 first")
            out[key] = first.clone()
            continue
        acc = sum(wk * s[key].float() for wk, s in zip(w, states))
        out[key] = (acc / total).to(first.dtype)
    return out
