"""GradNormLoRP optimizer (Huang et al., AAAI 2025; METHODS.md §3): low-rank projected, optionally
weight-normalised, optionally 8-bit AdamW.

Parameter groups with a ``"rank"`` key get GaLore-style gradient projection; other groups take a plain
AdamW step (the same arithmetic as ``torch.optim.AdamW(foreach=False)``; tested).

Projection (per 2-D parameter, gradient ``G`` (m, n), refreshed by an SVD of the current G when
``step % update_proj_gap == 0``, kept bit-identical in between; projectors live in optimizer state,
so Lightning checkpoints carry them):

- ``"std"`` (default, code): m ≥ n: ``Q`` = top-r right singular vectors (r, n), ``R = G Qᵀ`` (m, r),
  back ``ΔW = R̃ Q``; m < n: ``P`` = top-r left singular vectors (m, r), ``R = Pᵀ G`` (r, n), ``ΔW = P R̃``.
- ``"full"`` (the paper's two-sided form): ``R = Pᵀ G Qᵀ`` (r, r), ``ΔW = P R̃ Q``.
- ``"identity"``: no projection (``R = G``); projected Adam then equals plain Adam exactly (test hook).

Adam moments are kept for R only; the update is ``−lr · scale · back(m̂/(√v̂ + ε))`` with
``scale`` = GaLore's α. As in GaLore, moments are kept across a projector refresh.

Weight normalisation (``weight_norm=True`` in a group; the full-parameter path ii of METHODS §3):
``p = g · v/‖v‖_row``. The direction gradient is the textbook
``∇v = (g/‖v‖)(I − v̂v̂ᵀ)∇p`` (default; ``repo_parity=True``: ``∇v = ∇p`` as in the repository's
``LowRankWeightNormAdamW``), ``∇g = Σ_row(∇p ⊙ v̂)``. ∇v is projected; g (a vector) is not. Since
``v̂ = sign(g)·p̂`` (g is a free parameter and Adam can push a row's g below 0), only ``g`` and
``‖v‖_row`` are stored (two m-vectors), not a second copy of the weight: ``v = sign(g)·p̂·‖v‖`` is exact.
Decoupled weight decay acts on v and g.

8-bit state (``optim_bits=8``): each moment is stored blockwise (``block_size`` = 256): the first
moment as signed int8 with a per-block fp32 absmax, the second as uint8 codes of ``√v`` with a per-block
fp32 max (quantizing √v halves the dynamic range that 8 bits must cover); a √v code 0 reads back as
a quarter step (its bin's middle), not 0, so a small nonzero ``v`` rounded to 0 cannot turn the next
``m̂/(√v̂ + ε)`` into ``m̂/ε``. bitsandbytes' dynamic
(non-linear) 8-bit map is not used: this is a self-contained torch implementation, so it runs wherever
torch runs. Dequantized to fp32 for the step, re-quantized after. Weight decay is applied to the weight
after projecting back, as in GaLore-8bit.

Usage from ``configure_optimizers``::

    return GradNormLoRPAdamW(gradnorm_lorp_param_groups(self), lr=3e-5)

or :meth:`lightning_lora.methods.gradnorm_lorp.GradNormLoRP.make_optimizer`, which the task modules
of :mod:`lightning_lora.tasks` call automatically when the injected method is ``gradnorm_lorp``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..core.config import finite_number, whole_number

PROJ_TYPES = ("std", "full", "identity")


def _check_group(group: dict[str, Any]) -> dict[str, Any]:
    """Check the AdamW hyper-parameters of one param group (defaults merged in); returns
    ``optim_bits`` and ``block_size`` as ints. Without it a bad value surfaced only at the first
    ``step()`` (``block_size=0``: a ZeroDivisionError in the 8-bit packing), or never: NaN ``lr``,
    ``betas`` outside [0, 1) (Adam diverges) and ``optim_bits=16`` (silently ran 8-bit) were accepted."""
    for key in ("lr", "eps", "weight_decay"):
        value = group[key]  # (finite_number also takes a 0-d tensor lr)
        if finite_number(value, f"GradNormLoRPAdamW {key}") < 0:
            raise ValueError(f"GradNormLoRPAdamW {key} must be >= 0, got {value!r}")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(0.0 <= finite_number(b, "GradNormLoRPAdamW betas") < 1.0 for b in betas)):
        raise ValueError(f"GradNormLoRPAdamW betas must be two numbers in [0, 1), got {betas!r}")
    out: dict[str, Any] = {"optim_bits": whole_number(group["optim_bits"], "GradNormLoRPAdamW optim_bits"),
                           "block_size": whole_number(group["block_size"], "GradNormLoRPAdamW block_size", 1)}
    if out["optim_bits"] not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32, got {group['optim_bits']}")
    return out


# ---- blockwise 8-bit state ------------------------------------------------------------------------------
class Blockwise8bit:
    """Helpers for 8-bit blockwise moment storage (see the module docstring)."""

    @staticmethod
    def quantize_signed(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1).float()
        pad = (-flat.numel()) % block
        blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        codes = torch.round(blocks / absmax.clamp_min(1e-30) * 127).clamp_(-127, 127).to(torch.int8)
        return codes.reshape(-1), absmax.reshape(-1)

    @staticmethod
    def dequantize_signed(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
        vals = codes.view(-1, block).float() * (absmax.unsqueeze(1) / 127)
        return vals.reshape(-1)[: math.prod(shape)].view(shape)

    @staticmethod
    def quantize_sqrt(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        root = x.reshape(-1).float().clamp_min(0).sqrt()
        pad = (-root.numel()) % block
        blocks = torch.nn.functional.pad(root, (0, pad)).view(-1, block)
        mx = blocks.amax(dim=1, keepdim=True)
        codes = torch.round(blocks / mx.clamp_min(1e-30) * 255).clamp_(0, 255).to(torch.uint8)
        return codes.reshape(-1), mx.reshape(-1)

    @staticmethod
    def dequantize_sqrt(codes: torch.Tensor, mx: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
        # code 0 stands for √v in [0, step/2): read it as step/4, the bin's middle (same error bound as
        # rounding). Reading 0 would make the next Adam step m̂/ε for every small v next to a large one
        # (×10⁴ too large with ε = 1e-8); a block whose max is 0 still reads back 0.
        root = codes.view(-1, block).float().clamp_min(0.25) * (mx.unsqueeze(1) / 255)
        return root.square().reshape(-1)[: math.prod(shape)].view(shape)


# ---- projection -------------------------------------------------------------------------------------------
def compute_projector(grad: torch.Tensor, rank: int, proj_type: str) -> dict[str, torch.Tensor]:
    """Projector matrices from an SVD of ``grad`` (m, n), in fp32: ``{"P": (m, r)}``, ``{"Q": (r, n)}``
    or both (``"full"``); ``{}`` for ``"identity"``."""
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    if proj_type == "identity":
        return {}
    m, n = grad.shape
    r = min(rank, m, n)
    U, _, Vh = torch.linalg.svd(grad.detach().float(), full_matrices=False)
    if proj_type == "full":
        return {"P": U[:, :r].contiguous(), "Q": Vh[:r].contiguous()}
    return {"Q": Vh[:r].contiguous()} if m >= n else {"P": U[:, :r].contiguous()}


def project(grad: torch.Tensor, proj: dict[str, torch.Tensor]) -> torch.Tensor:
    """``R`` = ``Pᵀ G``, ``G Qᵀ`` or ``Pᵀ G Qᵀ`` (fp32)."""
    r = grad.float()
    if "P" in proj:
        r = proj["P"].t() @ r
    if "Q" in proj:
        r = r @ proj["Q"].t()
    return r


def project_back(low: torch.Tensor, proj: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse map of :func:`project`: ``P R``, ``R Q`` or ``P R Q``."""
    out = low
    if "P" in proj:
        out = proj["P"] @ out
    if "Q" in proj:
        out = out @ proj["Q"]
    return out


# ---- optimizer ---------------------------------------------------------------------------------------------
class GradNormLoRPAdamW(torch.optim.Optimizer):
    """AdamW with per-group low-rank gradient projection, weight normalisation and 8-bit state.

    Group keys (defaults in brackets): ``lr``, ``betas`` [(0.9, 0.999)], ``eps`` [1e-6, paper code],
    ``weight_decay`` [0.0]; projection groups add ``rank``, ``update_proj_gap`` [200], ``scale`` [1.0],
    ``proj_type`` ["std"], ``weight_norm`` [False], ``repo_parity`` [False]. ``optim_bits`` [32] and
    ``block_size`` [256] apply to every group.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, optim_bits: int = 32, block_size: int = 256) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=optim_bits,
                        block_size=block_size)
        # checked here, not at the first step(): see _check_group
        defaults.update(_check_group(defaults))
        super().__init__(params, defaults)  # calls add_param_group for every group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` plus the projection defaults and checks of a
        ``"rank"`` group. Done here rather than in ``__init__`` so groups added later (IncreLoRA-style
        growth, Lightning's ``BaseFinetuning``) get them too: ``step()`` reads every key."""
        if "rank" in param_group:
            param_group.setdefault("update_proj_gap", 200)
            param_group.setdefault("scale", 1.0)
            param_group.setdefault("proj_type", "std")
            param_group.setdefault("weight_norm", False)
            param_group.setdefault("repo_parity", False)
            # whole numbers: rank=2.5 failed at the first step() inside a slice, and a fractional gap
            # refreshed the projector at irregular steps ((step - 1) % 1.5 == 0)
            param_group["rank"] = whole_number(param_group["rank"], "GradNormLoRPAdamW rank")
            param_group["update_proj_gap"] = whole_number(param_group["update_proj_gap"],
                                                          "GradNormLoRPAdamW update_proj_gap")
            finite_number(param_group["scale"], "GradNormLoRPAdamW scale")
            if param_group["rank"] < 1 or param_group["update_proj_gap"] < 1:
                raise ValueError(f"rank and update_proj_gap must be >= 1, got {param_group['rank']}, "
                                 f"{param_group['update_proj_gap']}")
            if param_group["proj_type"] not in PROJ_TYPES:
                raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {param_group['proj_type']!r}")
        # a group's own lr / betas / optim_bits / block_size override the defaults: check them too
        # (optim_bits=16 in a group silently ran the 8-bit path)
        param_group.update({k: v for k, v in _check_group({**self.defaults, **param_group}).items()
                            if k in param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, then every state tensor gets back its saved dtype.

        torch casts each floating state tensor (nested dicts included) to its parameter's dtype, and the
        8-bit codes too: bf16 parameters would come back with bf16 moments, projectors and weight-norm
        vectors, which ``step()`` cannot mix with its fp32 arithmetic (and which lost precision), and
        int8/uint8 codes would become floats. The saved tensors themselves are restored instead (moved
        to the loaded state's device), so a resumed run equals an uninterrupted one."""
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)

        def restore(loaded: Any, saved: Any) -> Any:
            if torch.is_tensor(loaded) and torch.is_tensor(saved) and loaded.dtype != saved.dtype:
                return saved.to(device=loaded.device)
            if isinstance(loaded, dict) and isinstance(saved, dict):
                return {k: restore(v, saved[k]) if k in saved else v for k, v in loaded.items()}
            return loaded

        for i, p in zip(saved_ids, params):
            if i in saved_state and p in self.state:
                self.state[p] = restore(self.state[p], saved_state[i])

    # moments: fp32 tensors or 8-bit (codes, scales)
    def _load_moments(self, state: dict[str, Any], shape: torch.Size, device: torch.device, group: dict[str, Any]):
        if "exp_avg" not in state and "exp_avg_q" not in state:
            return torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        if group["optim_bits"] == 32:
            return state["exp_avg"], state["exp_avg_sq"]
        b = group["block_size"]
        return (Blockwise8bit.dequantize_signed(state["exp_avg_q"], state["exp_avg_scale"], shape, b),
                Blockwise8bit.dequantize_sqrt(state["exp_avg_sq_q"], state["exp_avg_sq_scale"], shape, b))

    def _store_moments(self, state: dict[str, Any], m: torch.Tensor, v: torch.Tensor, group: dict[str, Any]) -> None:
        if group["optim_bits"] == 32:
            state["exp_avg"], state["exp_avg_sq"] = m, v
            return
        b = group["block_size"]
        state["exp_avg_q"], state["exp_avg_scale"] = Blockwise8bit.quantize_signed(m, b)
        state["exp_avg_sq_q"], state["exp_avg_sq_scale"] = Blockwise8bit.quantize_sqrt(v, b)

    def _adam_direction(self, state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any], step: int) -> torch.Tensor:
        """``m̂ / (√v̂ + ε)`` for ``grad`` (fp32), updating the stored moments (torch AdamW's arithmetic)."""
        beta1, beta2 = group["betas"]
        m, v = self._load_moments(state, grad.shape, grad.device, group)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self._store_moments(state, m, v, group)
        bc1 = 1 - beta1**step
        bc2_sqrt = math.sqrt(1 - beta2**step)
        return (m / bc1) / (v.sqrt() / bc2_sqrt + group["eps"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GradNormLoRPAdamW does not support sparse gradients")
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                if "rank" in group and p.dim() == 2:
                    self._projected_step(p, state, group)
                else:
                    self._plain_step(p, state, group)
        return loss

    def _plain_step(self, p: nn.Parameter, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, wd, step = group["lr"], group["weight_decay"], state["step"]
        grad = p.grad
        if group["optim_bits"] == 32 and p.dtype == torch.float32:
            # exactly torch.optim.AdamW(foreach=False)'s single-tensor arithmetic
            beta1, beta2 = group["betas"]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * wd)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
            bc1 = 1 - beta1**step
            bc2_sqrt = math.sqrt(1 - beta2**step)
            denom = (v.sqrt() / bc2_sqrt).add_(group["eps"])
            p.addcdiv_(m, denom, value=-lr / bc1)
            return
        direction = self._adam_direction(state, grad.float(), group, step)
        p.mul_(1 - lr * wd)
        p.add_(direction.to(p.dtype), alpha=-lr)

    def _projected_step(self, p: nn.Parameter, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, wd, step = group["lr"], group["weight_decay"], state["step"]
        grad = p.grad.float()
        if group["weight_norm"]:
            w = p.detach().float()
            if "wn_g" not in state:
                state["wn_g"] = w.norm(dim=1)
                state["wn_vnorm"] = state["wn_g"].clone()
                zero_rows = int((state["wn_g"] == 0).sum())
                if zero_rows:  # g = 0 and v̂ undefined: ∇v = (g/‖v‖)(...) = 0 and ∇g = 0, so such a row never moves
                    warnings.warn(f"GradNormLoRPAdamW: weight_norm=True on a {tuple(p.shape)} parameter with "
                                  f"{zero_rows} all-zero row(s): weight normalisation keeps them at 0 for good "
                                  "(a zero-initialised LoRA B would never train); use weight_norm=False for it",
                                  stacklevel=3)
            g, vnorm = state["wn_g"], state["wn_vnorm"]
            # p = g·v/‖v‖, so v̂ = sign(g)·p̂: once Adam drives a row's g below 0, taking v̂ = p̂ would flip
            # ∇g's sign (ascent on g) and the rebuilt row of p
            sign = torch.ones_like(g).masked_fill_(g < 0, -1.0).unsqueeze(1)  # g's dtype and device
            v_hat = sign * w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            grad_g = (grad * v_hat).sum(dim=1)
            if group["repo_parity"]:
                grad_dir = grad
            else:  # textbook: (g/‖v‖)(I − v̂v̂ᵀ)∇p, row-wise
                grad_dir = (g / vnorm.clamp_min(1e-12)).unsqueeze(1) * (grad - grad_g.unsqueeze(1) * v_hat)
        else:
            grad_dir = grad
        # projector: refreshed when (step - 1) % T == 0, i.e. at steps 1, T+1, ... (t mod T == 0, t from 0)
        if (state["step"] - 1) % group["update_proj_gap"] == 0 or "proj" not in state:
            state["proj"] = compute_projector(grad_dir, group["rank"], group["proj_type"])
        proj = state["proj"]
        low = project(grad_dir, proj)
        update = project_back(self._adam_direction(state, low, group, step), proj) * group["scale"]
        if group["weight_norm"]:
            g_state = state.setdefault("wn_g_state", {})
            g_update = self._adam_direction(g_state, grad_g, {**group, "optim_bits": 32}, step)
            v = v_hat * vnorm.unsqueeze(1)
            v.mul_(1 - lr * wd).add_(update, alpha=-lr)
            g.mul_(1 - lr * wd).add_(g_update, alpha=-lr)
            vnorm.copy_(v.norm(dim=1))
            p.copy_((g / vnorm.clamp_min(1e-12)).unsqueeze(1) * v)
        else:
            p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr)

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors (moments, projectors, weight-norm vectors)."""
        return optimizer_state_bytes(self)


def gradnorm_lorp_param_groups(module: nn.Module, rank: int = 8, update_proj_gap: int = 500, scale: float = 4.0,
                               proj_type: str = "std", names: tuple[str, ...] = ("lora_A", "lora_B"),
                               weight_norm: bool = False, repo_parity: bool = False) -> list[dict[str, Any]]:
    """Two groups over the trainable parameters of ``module``: parameters whose name ends with one of
    ``names`` (2-D) get projection; everything else (DoRA magnitude, heads, biases) plain AdamW."""
    projected, plain = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (projected if p.dim() == 2 and name.rsplit(".", 1)[-1] in names else plain).append(p)
    groups: list[dict[str, Any]] = []
    if projected:
        groups.append({"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
                       "proj_type": proj_type, "weight_norm": weight_norm, "repo_parity": repo_parity})
    if plain:
        groups.append({"params": plain})
    return groups


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (nested dicts included): the optimizer's memory."""
    total = 0

    def add(obj: Any) -> None:
        nonlocal total
        if torch.is_tensor(obj):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                add(v)

    for state in optimizer.state.values():
        add(state)
    return total
