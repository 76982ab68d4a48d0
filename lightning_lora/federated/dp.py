"""Sample-level DP-SGD on a federated client with Opacus (METHODS.md §16, invariant 5).

Opacus computes per-sample gradients with module hooks (``GradSampleModule``, ``grad_sample_mode
= "hooks"``): a forward hook keeps each module's input, a backward hook gets the gradient of its
output, and a per-type *grad sampler* turns the two into one gradient per example. Our LoRA layers
own their parameters (``lora_A``, ``lora_B``) and compute them in a custom autograd function
(:class:`lightning_lora.methods.lora._FusedLoRA`, no vmap rule), so Opacus's functorch fallback
cannot differentiate them; this module registers exact grad samplers for
:class:`~lightning_lora.methods.lora.LoRALinear` and
:class:`~lightning_lora.methods.ffa.FFALoRALinear` instead. With ``x`` (N, ..., n) the layer input,
``g`` (N, ..., m) the gradient of its output and ``s`` the scale:

- ``grad_B[i] = s · Σ_t g[i,t]ᵀ (x[i,t] Aᵀ)``  (N, m, r)
- ``grad_A[i] = s · Σ_t (g[i,t] B)ᵀ x[i,t]``   (N, r, n); FFA-LoRA's A0 is a buffer: no grad
  sample, no noise, no clipping (invariant 5).

The adapter branch's dropout is applied inside the layer, after the hook saw ``x``, so DP needs
``dropout = 0`` (checked). DoRA's magnitude has no sampler here (rejected).

Privacy: Poisson-sampled batches (Opacus ``DPDataLoader``, sample rate ``q = batch_size / n_k``),
per-sample clipping to ``max_grad_norm`` and Gaussian noise of std ``σ·C`` on the summed
gradient (Opacus ``DPOptimizer``); σ is chosen by ``opacus.accountants.utils.get_noise_multiplier``
so that all the client's planned local steps (rounds × local steps) spend at most ``epsilon`` at
``delta``. The accountant is Opacus's RDP accountant by default (the peer code's
``make_private_with_epsilon``); ``"prv"`` and ``"gdp"`` (the GDP/CLT accountant of related work)
are offered too (METHODS §16 open choice). The guarantee is per client, for that client's own
examples (sample-level DP as in the paper), not user-level across clients.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..core.inject import adapter_layers
from ..core.config import finite_number
from ..methods.ffa import FFALoRALinear
from ..methods.lora import LoRALinear
from ._deps import require

ACCOUNTANTS = ("rdp", "prv", "gdp")


@dataclass
class DPConfig:
    """DP-SGD options of one client.

    Attributes:
        epsilon: target ε over the whole federated run (all rounds of this client).
        delta: target δ (should be below 1 / client dataset size).
        max_grad_norm: per-sample clipping bound C (the paper's grid: 2, 5, 10).
        accountant: ``"rdp"`` (default), ``"prv"`` or ``"gdp"``.
        noise_multiplier: σ; ``None`` (default) derives it from ε, δ, the sample rate and the step count.
    """

    epsilon: float = 6.0
    delta: float = 1e-5
    max_grad_norm: float = 2.0
    accountant: str = "rdp"
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        # numbers only, and finite ones: "abc" failed with a bare TypeError on the comparison, and NaN
        # passed every comparison below (the noise search then failed inside Opacus)
        for name in ("epsilon", "delta", "max_grad_norm") + (("noise_multiplier",) if self.noise_multiplier is not None else ()):
            setattr(self, name, finite_number(getattr(self, name), f"dp.{name}"))
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.epsilon <= 0 or not 0 < self.delta < 1 or self.max_grad_norm <= 0:
            raise ValueError(f"DP needs epsilon > 0, 0 < delta < 1, max_grad_norm > 0; got {self}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")


def _lora_grad_sample(layer: LoRALinear, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a LoRA / FFA-LoRA layer. ``activations[0]`` (N, ..., n), ``backprops`` (N, ..., m)."""
    x = activations[0].float()
    g = backprops.float()
    A, B = layer.lora_A.float(), layer.lora_B.float()
    out: dict[nn.Parameter, torch.Tensor] = {}
    if isinstance(layer.lora_B, nn.Parameter) and layer.lora_B.requires_grad:
        xa = torch.matmul(x, A.t())  # (N, ..., r)
        out[layer.lora_B] = (layer.scaling * torch.einsum("n...o,n...r->nor", g, xa)).to(layer.lora_B.dtype)
    if isinstance(layer.lora_A, nn.Parameter) and layer.lora_A.requires_grad:
        gb = torch.matmul(g, B)  # (N, ..., r)
        out[layer.lora_A] = (layer.scaling * torch.einsum("n...r,n...i->nri", gb, x)).to(layer.lora_A.dtype)
    return out


_REGISTERED = False
# one GradSampleModule per model: clients of the in-process simulation share a model, and a second
# set of Opacus hooks on it would record every per-sample gradient twice
# (keyed by id(model), held weakly: the hooks keep the GradSampleModule alive as long as the model)
_HOOKED: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def register_grad_samplers() -> None:
    """Register the LoRA / FFA-LoRA grad samplers with Opacus (idempotent). Opacus looks samplers up
    by exact type, so each layer class is registered by name."""
    global _REGISTERED
    if _REGISTERED:
        return
    utils = require("opacus.grad_sample.utils")
    utils.register_grad_sampler([LoRALinear, FFALoRALinear])(_lora_grad_sample)
    _REGISTERED = True


def check_dp_compatible(model: nn.Module) -> None:
    """Raise ``ValueError`` for adapter layers whose per-sample gradients this module cannot compute."""
    for name, layer in adapter_layers(model).items():
        if not isinstance(layer, LoRALinear):
            raise ValueError(f"DP-SGD supports LoRA and FFA-LoRA on linear layers only; {name} is {type(layer).__name__}")
        if layer.use_dora:
            raise ValueError(f"DP-SGD does not support DoRA ({name}): no per-sample gradient for the magnitude")
        if layer.dropout_p > 0:
            raise ValueError(f"DP-SGD needs adapter dropout = 0 ({name} has {layer.dropout_p}): "
                             "the per-sample gradient uses the layer input before dropout")


def noise_multiplier_for(cfg: DPConfig, sample_rate: float, steps: int) -> float:
    """σ that spends ``cfg.epsilon`` at ``cfg.delta`` over ``steps`` Poisson-sampled steps at ``sample_rate``."""
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier)
    return _search_sigma(cfg.epsilon, cfg.delta, sample_rate, steps, cfg.accountant)


@functools.lru_cache(maxsize=256)
def _search_sigma(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    # Opacus's binary search costs seconds (tens of accountant evaluations): once per setting
    utils = require("opacus.accountants.utils")
    return float(utils.get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                            steps=steps, accountant=accountant))


class PrivateTrainer:
    """Owns the Opacus pieces of one client: the hooked model, the accountant, σ and the noise RNG.

    ``model`` is wrapped in a ``GradSampleModule`` (hooks; our grad samplers); :meth:`optimizer`
    wraps a fresh torch optimizer per round in a ``DPOptimizer``; :meth:`account` records one step.
    The accountant lives as long as the client, so ε adds up over rounds.
    """

    def __init__(self, model: nn.Module, cfg: DPConfig, sample_rate: float, total_steps: int, batch_size: int,
                 seed: int = 0) -> None:
        check_dp_compatible(model)
        register_grad_samplers()
        accountants = require("opacus.accountants")
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.batch_size = batch_size
        self.noise_multiplier = noise_multiplier_for(cfg, sample_rate, total_steps)
        hooked = _HOOKED.get(id(model))
        self.module = hooked if hooked is not None and hooked._module is model else self._hook(model)
        self.accountant = accountants.create_accountant(cfg.accountant)
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    @staticmethod
    def _hook(model: nn.Module) -> nn.Module:
        gsm = require("opacus.grad_sample")
        # Opacus refuses trainable modules that hold buffers (running statistics mix examples);
        # FFA-LoRA's A0 is a constant buffer, so that one complaint is dropped, every other one raised
        errors = [e for e in gsm.GradSampleModule.validate(model, strict=False)
                  if not ("with buffers" in str(e) and "FFALoRALinear" in str(e))]
        if errors:
            raise NotImplementedError(errors)
        hooked = gsm.GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        _HOOKED[id(model)] = hooked
        return hooked

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        opt_mod = require("opacus.optimizers")
        return opt_mod.DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.cfg.max_grad_norm,
                                   expected_batch_size=self.batch_size, loss_reduction="mean", generator=self.generator)

    def account(self) -> None:
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self) -> float:
        """ε spent so far at ``cfg.delta`` (0 before the first step)."""
        return float(self.accountant.get_epsilon(self.cfg.delta)) if len(self.accountant) else 0.0

    def close(self) -> None:
        """Remove Opacus's hooks from the model (for every client sharing it)."""
        _HOOKED.pop(id(self.module._module), None)
        self.module.remove_hooks()
        self.module.to_standard_module()
