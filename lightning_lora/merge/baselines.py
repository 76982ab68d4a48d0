"""The merges users know, from named adapters of one model into a new named LoRA adapter.

- Linear / task arithmetic (Ilharco et al. 2023): ``ΔW = Σ_i w_i ΔW_i``.
- TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim each ``ΔW_i`` to its
  ``density`` share of largest-magnitude entries, elect the sign of ``Σ_i w_i τ̂_i`` per entry,
  average only the entries that agree with it (disjoint mean), scale by ``λ``.
- Concatenation: ``B = [w_1 s_1 B_1 | … | w_N s_N B_N]``, ``A = [A_1; …; A_N]``: exactly
  ``Σ_i w_i ΔW_i`` at rank ``Σ_i r_i``, no approximation (LoRA sources only).

Linear and TIES work on dense ``ΔW`` (any method); the result is brought back to a LoRA of rank
``rank`` by truncated SVD (the best rank-``rank`` approximation, Eckart–Young), as PEFT's
``svd`` / ``ties_svd`` combinations do. Linear over plain LoRA sources takes the same SVD through
the concatenated factors (QR of each, an R×R SVD), never forming ``ΔW``. Linear without ``rank`` over LoRA sources is the exact
concatenation. Choices (documented where PEFT and the paper differ): TIES trims per adapted
matrix (PEFT; the paper trims the whole flattened task vector) and applies the weights after
trimming, before the sign election (PEFT). SVDs run in fp32 (the factored one in fp64 on CPU).

A module targeted by only some sources gets the others' ``ΔW = 0``. Merged adapters are LoRA with
``alpha = r`` (scale 1); a layer whose merged rank is below ``r`` is padded with zero units. A merged
adapter adapts exactly the modules its sources adapt (full qualified names, see :func:`exact_targets`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from ..core.layer import AdapterLayer
from ..core.config import finite_number, whole_number
from ..core.multi import add_adapter, adapter_method, copy_saved_modules, delete_adapter, named_adapter_layers
from ..methods.lora import LoRALinear

__all__ = [
    "add_lora_from_factors", "concat_factors", "exact_targets", "lora_factors", "low_rank_factors",
    "low_rank_factors_of_product", "merge_concat",
    "merge_task_arithmetic", "merge_ties", "task_arithmetic", "ties",
]


# ---- tensor formulas -------------------------------------------------------------------------
def task_arithmetic(deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """``Σ_i w_i ΔW_i``; every ``ΔW_i`` has the same shape; weights default to 1."""
    weights = _weights(weights, len(deltas))
    return sum(w * d.float() for w, d in zip(weights, deltas))  # type: ignore[return-value]


def ties(deltas: Sequence[torch.Tensor], density: float = 0.2, weights: Sequence[float] | None = None,
         lam: float = 1.0) -> torch.Tensor:
    """TIES merge of same-shape task updates: trim, elect sign, disjoint mean, times ``lam``.

    ``density``: share of entries of each ``ΔW_i`` kept (largest ``|·|``; ties at the threshold kept).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    weights = _weights(weights, len(deltas))
    trimmed = []
    for d in deltas:
        d = d.float()
        keep = max(1, round(density * d.numel()))
        threshold = d.abs().flatten().kthvalue(d.numel() - keep + 1).values
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    stack = torch.stack([w * t for w, t in zip(weights, trimmed)])  # (N, ...)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    count = agree.sum(0).clamp(min=1)
    return lam * (stack * agree).sum(0) / count


def concat_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                   weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B A = Σ_i w_i s_i B_i A_i``; ``factors`` = ``[(B_i (m, r_i), A_i (r_i, n), s_i)]``.

    Returns ``B`` (m, Σr_i) and ``A`` (Σr_i, n), fp32.
    """
    weights = _weights(weights, len(factors))
    b = torch.cat([w * s * B.float() for w, (B, _, s) in zip(weights, factors)], dim=1)
    a = torch.cat([A.float() for _, A, _ in factors], dim=0)
    return b, a


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta`` (m, n) by SVD: ``B = U√S`` (m, rank), ``A = √S Vᵀ`` (rank, n).

    Ranks above ``min(m, n)`` are padded with zero units.
    """
    rank = whole_number(rank, "rank", 1)  # a float failed deep in slicing
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return _truncate(u, s, vh, rank, delta.shape, delta.device)


def low_rank_factors_of_product(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`low_rank_factors` of ``b @ a`` (b: (m, R), a: (R, n)) without forming it: QR of both
    factors and an R×R SVD, O((m + n)R²) instead of O(mn·min(m, n))."""
    rank = whole_number(rank, "rank", 1)
    dtype = torch.float64 if b.device.type == "cpu" else torch.float32
    qb, rb = torch.linalg.qr(b.to(dtype))  # (m, R), (R, R)
    qa, ra = torch.linalg.qr(a.to(dtype).t())  # (n, R), (R, R)
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    return _truncate(qb @ u, s, vh @ qa.t(), rank, (b.shape[0], a.shape[1]), b.device)


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, shape: tuple[int, int],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(shape[0], rank, dtype=torch.float32, device=device)
    a = torch.zeros(rank, shape[1], dtype=torch.float32, device=device)
    b[:, :k] = (u[:, :k] * root).float()
    a[:k] = (root[:, None] * vh[:k]).float()
    return b, a


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if n == 0:
        raise ValueError("nothing to merge: no sources")
    if weights is None:
        return [1.0] * n
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, str):  # "12" would otherwise be read as the weights [1.0, 2.0]
        raise TypeError(f"weights must be a sequence of numbers, got the string {weights!r}")
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} sources")
    # a non-finite weight made every merged entry NaN
    return [finite_number(w, f"weights[{i}]") for i, w in enumerate(weights)]


# ---- adapters of a model ---------------------------------------------------------------------
def _is_plain_lora(layer: AdapterLayer) -> bool:
    # exactly LoRALinear: subclasses (other methods) may read their factors differently
    return type(layer) is LoRALinear and not layer.use_dora


def lora_factors(layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B (m, r), A (r, n), s)`` of a plain LoRA layer (``ΔW = s B A``), fp32 copies."""
    if not _is_plain_lora(layer):
        raise TypeError(f"expected a plain LoRA layer (method 'lora', no DoRA), got {type(layer).__name__}")
    return layer.lora_B.detach().float().clone(), layer.lora_A.detach().float().clone(), float(layer.scaling)


def _check_sources(sources: Sequence[str]) -> None:
    # a string is a sequence of its characters: "ab" would silently merge adapters "a" and "b"
    if isinstance(sources, str):
        raise TypeError(f"sources must be a list of adapter names, got the string {sources!r} (use [{sources!r}])")


def _layers_by_target(model: nn.Module, sources: Sequence[str]) -> dict[str, dict[str, AdapterLayer]]:
    """target -> {source name -> its layer}, over the union of the sources' targets, in model order."""
    _check_sources(sources)
    if len(set(sources)) != len(sources) or not sources:
        raise ValueError(f"sources must be distinct and non-empty, got {list(sources)}")
    per_source = {s: named_adapter_layers(model, s) for s in sources}
    targets: dict[str, dict[str, AdapterLayer]] = {}
    for s in sources:
        for t, layer in per_source[s].items():
            targets.setdefault(t, {})[s] = layer
    return targets


def exact_targets(names: Sequence[str]) -> str:
    """``target_modules`` that matches exactly the qualified module names ``names`` and nothing else.

    A list of names would follow PEFT's suffix rule (``"0"`` also matches ``"1.0"``); a single string
    is a regular expression matched against the whole qualified name, so an escaped alternation is exact.
    """
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def add_lora_from_factors(model: nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                          modules_to_save_from: str | None = None) -> None:
    """Add a LoRA adapter ``name`` with ``ΔW_t = B_t A_t`` (scale 1) at each target ``t`` of ``factors``.

    ``factors``: qualified module name -> ``(B (m, r_t), A (r_t, n))``; exactly these modules are
    adapted (names are matched whole, not by PEFT's suffix rule); the adapter's rank is
    ``max r_t`` (smaller layers padded with zero units). ``modules_to_save_from``: also give the new
    adapter a copy of that adapter's ``modules_to_save`` (its head).
    """
    if not factors:
        raise ValueError("nothing to merge: no adapted modules")
    rank = max(b.shape[1] for b, _ in factors.values())
    saved = list(adapter_method(model, modules_to_save_from).config.modules_to_save) if modules_to_save_from else []
    add_adapter(model, name, "lora", r=rank, alpha=float(rank), target_modules=exact_targets(factors),
                modules_to_save=saved)
    try:
        layers = named_adapter_layers(model, name)
        if set(layers) != set(factors):  # never re-target: exactly the given modules
            raise RuntimeError(f"merged adapter {name!r} adapts {sorted(set(layers) ^ set(factors))[:5]} "
                               "differently from its sources")
        with torch.no_grad():
            for t, (b, a) in factors.items():
                layer = layers[t]
                r_t = b.shape[1]
                layer.lora_B.zero_()
                layer.lora_A.zero_()
                layer.lora_B[:, :r_t] = b.to(layer.lora_B)
                layer.lora_A[:r_t] = a.to(layer.lora_A)
        if modules_to_save_from:
            copy_saved_modules(model, modules_to_save_from, name)
    except BaseException:
        delete_adapter(model, name)
        raise


def merge_concat(model: nn.Module, sources: Sequence[str], name: str, weights: Sequence[float] | None = None,
                 modules_to_save_from: str | None = None) -> str:
    """New LoRA adapter ``name`` = exact concatenation of the LoRA ``sources`` (rank Σ r_i)."""
    weights = _weights(weights, len(sources))
    w_of = dict(zip(sources, weights))
    factors = {}
    for t, by_source in _layers_by_target(model, sources).items():
        parts = [lora_factors(layer) for layer in by_source.values()]
        factors[t] = concat_factors(parts, [w_of[s] for s in by_source])
    add_lora_from_factors(model, name, factors, modules_to_save_from)
    return name


def _default_rank(model: nn.Module, sources: Sequence[str]) -> int:
    _check_sources(sources)
    if not sources:  # else max([]) below fails with an obscure "max() arg is an empty sequence"
        raise ValueError("nothing to merge: no sources")
    ranks = [getattr(adapter_method(model, s).config, "r", None) for s in sources]
    if any(r is None for r in ranks):
        raise ValueError("give rank: some sources have no rank r in their config")
    return max(ranks)  # type: ignore[type-var]


def merge_task_arithmetic(model: nn.Module, sources: Sequence[str], name: str,
                          weights: Sequence[float] | None = None, rank: int | None = None,
                          modules_to_save_from: str | None = None) -> str:
    """New LoRA adapter ``name`` with ``ΔW = Σ_i w_i ΔW_i``: exact (concatenation) without ``rank``,
    else its best rank-``rank`` approximation."""
    if rank is None:
        return merge_concat(model, sources, name, weights, modules_to_save_from)
    rank = whole_number(rank, "rank", 1)
    weights = _weights(weights, len(sources))
    w_of = dict(zip(sources, weights))
    factors = {}
    with torch.no_grad():
        for t, by_source in _layers_by_target(model, sources).items():
            ws = [w_of[s] for s in by_source]
            if all(_is_plain_lora(layer) for layer in by_source.values()):  # low rank: SVD through the factors
                factors[t] = low_rank_factors_of_product(*concat_factors([lora_factors(x) for x in by_source.values()], ws),
                                                         rank)
            else:
                delta = task_arithmetic([layer.delta_weight() for layer in by_source.values()], ws)
                factors[t] = low_rank_factors(delta, rank)
    add_lora_from_factors(model, name, factors, modules_to_save_from)
    return name


def merge_ties(model: nn.Module, sources: Sequence[str], name: str, density: float = 0.2,
               weights: Sequence[float] | None = None, lam: float = 1.0, rank: int | None = None,
               modules_to_save_from: str | None = None) -> str:
    """New LoRA adapter ``name``: TIES merge of the sources' ``ΔW`` at rank ``rank`` (default: max source r)."""
    rank = _default_rank(model, sources) if rank is None else rank
    rank = whole_number(rank, "rank", 1)
    lam = finite_number(lam, "lam")  # NaN failed deep inside the SVD
    weights = _weights(weights, len(sources))
    w_of = dict(zip(sources, weights))
    factors = {}
    with torch.no_grad():
        for t, by_source in _layers_by_target(model, sources).items():
            deltas = [layer.delta_weight() for layer in by_source.values()]
            if len(deltas) < len(sources):  # sources that do not adapt t contribute ΔW = 0
                deltas += [torch.zeros_like(deltas[0])] * (len(sources) - len(deltas))
            ws = [w_of[s] for s in by_source] + [1.0] * (len(sources) - len(by_source))
            factors[t] = low_rank_factors(ties(deltas, density, ws, lam), rank)
    add_lora_from_factors(model, name, factors, modules_to_save_from)
    return name
