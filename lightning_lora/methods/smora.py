"""SMoRA: single-ranked mixture-of-experts LoRA (Zhao et al. 2025, "Each Rank Could be an Expert",
https://arxiv.org/abs/2501.15103; docs METHODS.md §7). No official code is public, so every choice
below is tagged with its source: [paper], [secondary], [derived] or [design].

Equations (``A ∈ R^{r×n}`` Kaiming-uniform a = √5, ``B ∈ R^{m×r}`` zeros, router ``W_g ∈ R^{r×n}``):

- (1) unified view [paper]: E LoRA experts of rank r_e, ``ΔW x = Σ_e g_e B_e A_e x``; stacking
  ``A = [A_1; …; A_E]``, ``B = [B_1 | … | B_E]`` (r = E·r_e) gives ``ΔW x = B·G(x)·A x`` with
  ``G(x) = blockdiag(g_1 I, …, g_E I)``.
- (2) SMoRA, r_e = 1, E = r [paper]: ``y = W0 x + b0 + s · B diag(g(x)) A x``, ``s = α/r``.
- (3) router [paper]: ``z = W_g x``; the top-k indices of ``z + β`` are selected; ``g = gate_scale ·
  softmax(z restricted to the selected indices)``, 0 elsewhere. Whether β also enters the gate
  values is unconfirmed: ``bias_in_gate=False`` (default, DeepSeek-V3 style: β only selects) or True.
- (4) auxiliary-loss-free balancing [secondary]: β ∈ R^r is a buffer, not learned; after a step
  ``β_i ← β_i + u · sign(ē − e_i)``, e_i = tokens routed to rank i, ē = mean_i e_i. Under-loaded
  ranks move up, over-loaded ranks down; no auxiliary loss term.

Efficient gating (:meth:`SMoRALinear.forward`): no loop over ranks. ``h = x Aᵀ`` (N, r) is
multiplied by the dense gate matrix ``G`` (N, r) (top-k gates scattered into zeros), then by ``Bᵀ``.
Cost: the FLOPs of a dense rank-r LoRA, 2N·r(n+m), plus the router 2N·r·n and O(N·r) for
top-k/softmax/scatter; memory two extra (N, r) tensors. The sparse path (gather the k active rows of
A per token, or permute tokens MoE-style) would spend 2N·k(n+m) instead, but needs per-token weight
gathers (N·k·n memory) or a grouped-GEMM kernel; since r(m+n) ≪ mn the adapter is a small share of
the layer either way, so the dense masked path is the one implemented. It is exact: an unselected
rank has gate 0, so its A row and B column get exactly zero gradient from that token.

Precision [METHODS S5]: router logits, top-k and softmax run in fp32 with autocast off; the gates
are cast to the activation dtype for the (N, r) product.

Load counters and β (METHODS S4): ``router_bias`` (β, fp32) and ``load_counts`` (int64, tokens per
rank consumed by all β updates so far) are buffers saved with the adapter. Tokens routed since the
last update are counted in a plain tensor attribute (``pending_counts``), not a buffer: DDP
broadcasts buffers from rank 0 before forwards, which would overwrite the other processes' counts.
The update sums the pending counts over DDP processes (one ``all_reduce``), so β stays identical
on every process. Only forwards in train mode with autograd on count (validation never does);
padding tokens count like any token; a re-entrant activation-checkpoint recompute counts twice
(harmless: the sign rule is scale-free when every rank is counted twice).

Training: :class:`SMoRA`'s ``on_train_batch_end`` hook (driven by ``AdapterCallback``) runs
:func:`update_bias` after every training batch (``count_scope="batch"``) or only after batches that
stepped the optimizer (``count_scope="step"``: counts accumulate over gradient-accumulation
micro-batches), then logs ``smora/load_max_over_mean`` (mean over layers of max_i f_i / mean_i f_i
with f the load fractions; 1 = balanced) and ``smora/load_max_over_mean_worst``. Per-layer
fractions: :func:`routing_stats`. Plain PyTorch: call ``update_bias(model)`` after
``optimizer.step()``.

``merge()`` raises (METHODS S2): the gates depend on the input, so no fixed ΔW exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig, finite_number, Method, register, whole_number
from ..core.inject import adapter_layers
from ..core.layer import AdapterLayer, no_autocast
from ..core.multi import MultiAdapterLayer


@dataclass
class SMoRAConfig(AdapterConfig):
    """SMoRA options.

    Attributes:
        r: total rank = number of rank-1 experts (default 64 [secondary]).
        top_k: active ranks per token (default 8, 12.5 % [secondary]).
        alpha: scale numerator, ``s = alpha / r`` (default 2r [design], as ``conf/adapter/lora.yaml``).
        gate_scale: gate values are ``gate_scale · softmax`` (1 [design]: gates sum to 1; ``top_k``
            gives a dense rank-k LoRA at uniform gates). The paper's choice is unconfirmed.
        bias_in_gate: β also enters the gate softmax (False: β only selects [design, DeepSeek-V3]).
        bias_update_rate: u in ``β_i += u·sign(ē − e_i)`` (1e-3 [design]); 0 disables balancing.
        count_scope: ``"batch"`` (update β after every training batch, default) or ``"step"``
            (after batches that stepped the optimizer: counts span gradient-accumulation windows).
        router_init: ``"normal"`` (N(0, router_std²)) or ``"zeros"`` (ties then select the same
            ranks for every token until β spreads them).
        router_std: std of the ``"normal"`` router init (0.02 [design]).
        dropout: dropout on the adapter branch input (the router sees the clean input).
        log_routing: log load-imbalance scalars from the callback hook.
        log_per_layer: also log ``smora/<layer>/load_max_over_mean`` per layer.
    """

    r: int = 64
    top_k: int = 8
    alpha: float | None = None
    gate_scale: float = 1.0
    bias_in_gate: bool = False
    bias_update_rate: float = 1e-3
    count_scope: str = "batch"
    router_init: str = "normal"
    router_std: float = 0.02
    dropout: float = 0.0
    log_routing: bool = True
    log_per_layer: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.r = whole_number(self.r, "SMoRA rank r")
        self.top_k = whole_number(self.top_k, "SMoRA top_k")
        if self.r < 1:
            raise ValueError(f"SMoRA rank r must be >= 1, got {self.r}")
        if not 1 <= self.top_k <= self.r:
            raise ValueError(f"top_k must be in [1, r={self.r}], got {self.top_k}")
        if self.alpha is None:
            self.alpha = 2.0 * self.r
        # NaN passed the checks below: a NaN alpha made every output NaN, a NaN / inf rate turned β
        # into NaN after the first update (top-k on NaN scores)
        self.alpha = finite_number(self.alpha, "SMoRA alpha")
        self.bias_update_rate = finite_number(self.bias_update_rate, "SMoRA bias_update_rate")
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.count_scope not in ("batch", "step"):
            raise ValueError(f"count_scope must be 'batch' or 'step', got {self.count_scope!r}")
        if self.router_init not in ("normal", "zeros"):
            raise ValueError(f"router_init must be 'normal' or 'zeros', got {self.router_init!r}")
        # gate_scale <= 0 would zero (or flip) every gate: the adapter then silently never learns
        if not self.gate_scale > 0:
            raise ValueError(f"gate_scale must be > 0, got {self.gate_scale}")
        if not self.router_std >= 0:  # nn.init.normal_ would fail later, at injection, less clearly
            raise ValueError(f"router_std must be >= 0, got {self.router_std}")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r  # type: ignore[arg-type]


class SMoRALinear(AdapterLayer):
    """SMoRA on an ``nn.Linear`` or transformers ``Conv1D``.

    Parameters: ``lora_A`` (r, in), ``lora_B`` (out, r), ``router_weight`` W_g (r, in).
    Buffers (saved): ``router_bias`` β (r,) fp32, ``load_counts`` (r,) int64.
    """

    adapter_param_names = ("lora_A", "lora_B", "router_weight")
    adapter_buffer_names = ("router_bias", "load_counts")

    def __init__(self, base_layer: nn.Module, config: SMoRAConfig) -> None:
        super().__init__(base_layer)
        self.r, self.top_k = config.r, config.top_k
        self.scaling = config.scaling
        self.gate_scale = config.gate_scale
        self.bias_in_gate = config.bias_in_gate
        self.bias_update_rate = config.bias_update_rate
        self.dropout_p = config.dropout
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.router_weight = nn.Parameter(torch.zeros(self.r, self.in_features, device=device))
        if config.router_init == "normal":
            nn.init.normal_(self.router_weight, std=config.router_std)
        # β is fp32 whatever the default dtype: a 1e-3 step is below bf16's resolution past |β| = 0.5
        self.register_buffer("router_bias", torch.zeros(self.r, dtype=torch.float32, device=device))
        self.register_buffer("load_counts", torch.zeros(self.r, dtype=torch.long, device=device))
        #: tokens routed to each rank since the last β update (transient; see the module docstring)
        self.pending_counts: torch.Tensor | None = None
        #: load fractions of the window consumed by the last β update (None before the first)
        self.last_load_fraction: torch.Tensor | None = None

    def _apply(self, fn: Any, recurse: bool = True) -> "SMoRALinear":
        """``.to(bfloat16)`` / ``.half()`` (and Lightning's ``"bf16-true"`` / ``"16-true"``, which call
        ``module.to(dtype)``) would cast β like any float buffer; keep it fp32 (float64 is left as
        is): in bf16, ``β + u`` with u = 1e-3 rounds back to β once |β| ≥ 0.5, so balancing stalls."""
        super()._apply(fn, recurse)
        beta = self._buffers.get("router_bias")
        if beta is not None and beta.dtype not in (torch.float32, torch.float64):
            self._buffers["router_bias"] = beta.float()
        return self

    # ---- routing ------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. (3). ``x`` (N, in) -> ``(gates (N, r) fp32, top-k indices (N, k), ascending per row)``.

        Logits, selection and softmax in fp32 with autocast off (S5)."""
        with no_autocast(x.device):
            z = F.linear(x.float(), self.router_weight.float())  # (N, r)
            scores = z + self.router_bias.float()
            # rank order, not score order: the softmax sums its k terms in index order, so a β change
            # that reorders but keeps a token's selected set leaves its gates bit-identical (§7
            # invariant 8; in score order the sum order moved and k >= 3 gates differed by an ulp)
            idx = torch.topk(scores, self.top_k, dim=-1, sorted=False).indices.sort(dim=-1).values  # (N, k)
            logits = (scores if self.bias_in_gate else z).gather(-1, idx)
            g = torch.softmax(logits, dim=-1)
            if self.gate_scale != 1.0:
                g = g * self.gate_scale
            gates = torch.zeros_like(z).scatter(-1, idx, g)
        return gates, idx

    def _count(self, idx: torch.Tensor) -> None:
        counts = torch.zeros(self.r, dtype=torch.long, device=idx.device)
        counts.scatter_add_(0, idx.reshape(-1), torch.ones_like(idx.reshape(-1)))
        if self.pending_counts is None or self.pending_counts.device != idx.device:
            self.pending_counts = counts
        else:
            self.pending_counts += counts

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base_out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return base_out
        dtype = base_out.dtype
        x2 = x.reshape(-1, self.in_features)
        gates, idx = self.route(x2)
        if self.training and torch.is_grad_enabled():
            self._count(idx.detach())
        xd = F.dropout(x2, self.dropout_p, self.training) if self.dropout_p > 0 else x2
        h = xd.to(dtype) @ self.lora_A.to(dtype).t()  # (N, r)
        delta = (h * gates.to(dtype)) @ self.lora_B.to(dtype).t()  # (N, out), eq. (2) without s
        return base_out + self.scaling * delta.view(*base_out.shape[:-1], self.out_features)

    # ---- balancing (eq. 4) --------------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor | None = None, u: float | None = None) -> torch.Tensor:
        """``β_i += u·sign(ē − e_i)`` from ``counts`` (default: the pending counts), which are then
        added to ``load_counts`` and reset. Returns the window's load fractions (r,) (zeros when no
        token was routed: then β does not move)."""
        u = self.bias_update_rate if u is None else u
        if counts is None:
            counts = self.pending_counts if self.pending_counts is not None else torch.zeros_like(self.load_counts)
        e = counts.to(device=self.router_bias.device, dtype=torch.float32)
        self.router_bias += (u * torch.sign(e.mean() - e)).to(self.router_bias.dtype)
        self.load_counts += counts.to(self.load_counts.device, torch.long)
        self.pending_counts = None
        self.last_load_fraction = e / e.sum().clamp_min(1.0)
        return self.last_load_fraction

    # ---- no fixed ΔW --------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        raise RuntimeError("SMoRA has no fixed delta weight: its gates depend on the input (METHODS.md §7)")

    def merge(self) -> None:
        raise RuntimeError("SMoRA cannot be merged: the gates g(x) depend on the input (METHODS.md S2, §7)")

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", r={self.r}, top_k={self.top_k}, scaling={self.scaling:g}, gate_scale={self.gate_scale:g}"
        )


def _smora_layers(model_or_layers: nn.Module | dict[str, AdapterLayer]) -> dict[str, SMoRALinear]:
    """SMoRA layers by name; those inside a multi-adapter layer (``add_adapter``) as
    ``"<module>[<adapter name>]"`` (``adapter_layers`` lists only the outer multi-adapter layer)."""
    layers = model_or_layers if isinstance(model_or_layers, dict) else adapter_layers(model_or_layers)
    out: dict[str, SMoRALinear] = {}
    for n, layer in layers.items():
        if isinstance(layer, SMoRALinear):
            out[n] = layer
        elif isinstance(layer, MultiAdapterLayer):
            out.update({f"{n}[{a}]": sub for a, sub in layer.adapters.items() if isinstance(sub, SMoRALinear)})
    if not out:
        raise ValueError("no SMoRA layers found; inject_adapter(model, 'smora', ...) first")
    return out


@torch.no_grad()
def update_bias(model_or_layers: nn.Module | dict[str, AdapterLayer], u: float | None = None) -> dict[str, torch.Tensor]:
    """Eq. (4) for every SMoRA layer from the counts routed since the last call; returns
    ``{layer name: load fractions (r,)}``. Call after ``optimizer.step()`` in plain PyTorch (the
    Lightning hook does it for you). Under ``torch.distributed`` the counts are summed over all
    processes first (one ``all_reduce``), so every process applies the same β."""
    layers = _smora_layers(model_or_layers)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # each layer from its own counts, on its own device: a model split over devices
        # (``device_map="auto"``) cannot stack them as they are
        return {n: layer.update_bias(None, u) for n, layer in layers.items()}
    # one (L, r) tensor on one device for a single all_reduce; each layer moves its row back
    device = next(iter(layers.values())).load_counts.device
    counts = torch.stack([
        layer.pending_counts.to(device)
        if layer.pending_counts is not None else torch.zeros_like(layer.load_counts, device=device)
        for layer in layers.values()
    ])  # (L, r)
    torch.distributed.all_reduce(counts)
    return {n: layer.update_bias(counts[i], u) for i, (n, layer) in enumerate(layers.items())}


def routing_stats(model_or_layers: nn.Module | dict[str, AdapterLayer], cumulative: bool = False) -> dict[str, torch.Tensor]:
    """``{layer name: load fractions (r,)}``, each summing to 1: of the window consumed by the last
    β update, or (``cumulative``) of every token counted so far (``load_counts``). Layers with no
    counted token yet are left out."""
    out = {}
    for n, layer in _smora_layers(model_or_layers).items():
        if cumulative:
            c = layer.load_counts.float()
            if c.sum() > 0:
                out[n] = c / c.sum()
        elif layer.last_load_fraction is not None and layer.last_load_fraction.sum() > 0:
            out[n] = layer.last_load_fraction
    return out


def load_imbalance(fractions: torch.Tensor) -> float:
    """``max_i f_i / mean_i f_i`` of load fractions (r,): 1 when balanced, r/k when every token
    picks the same k ranks."""
    return float(fractions.max() * fractions.numel() / fractions.sum().clamp_min(1e-12))


@register("smora")
class SMoRA(Method):
    """SMoRA: every rank of a LoRA is an expert; top-k routing per token, bias-balanced."""

    Config = SMoRAConfig
    supported_types = (nn.Linear,)
    mergeable = False  # the gates depend on the input

    def __init__(self, config: SMoRAConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        self._step_at_batch_start: int | None = None
        #: ``{layer: load fractions}`` of the last update made by the hook
        self.last_stats: dict[str, torch.Tensor] = {}

    def make_layer(self, base: nn.Module, name: str) -> SMoRALinear:
        return SMoRALinear(base, self.config)  # type: ignore[arg-type]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        self._step_at_batch_start = getattr(trainer, "global_step", None)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        c: SMoRAConfig = self.config  # type: ignore[assignment]
        if c.count_scope == "step" and getattr(trainer, "global_step", None) == self._step_at_batch_start:
            return  # the optimizer did not step (gradient accumulation): keep counting
        stats = update_bias(layers)
        self.last_stats = stats
        log = getattr(pl_module, "log", None)
        if not c.log_routing or not callable(log):
            return
        ratios = {n: load_imbalance(f) for n, f in stats.items() if f.sum() > 0}
        if not ratios:
            return
        kw = dict(on_step=True, on_epoch=False, batch_size=1)
        log("smora/load_max_over_mean", sum(ratios.values()) / len(ratios), **kw)
        log("smora/load_max_over_mean_worst", max(ratios.values()), **kw)
        if c.log_per_layer:
            for n, v in ratios.items():
                log(f"smora/{n}/load_max_over_mean", v, **kw)

    # convenience forms of the module functions
    update_bias = staticmethod(update_bias)
    routing_stats = staticmethod(routing_stats)
    load_imbalance = staticmethod(load_imbalance)
