"""LoRA-LEGO (Zhao et al., ICLR 2025, https://arxiv.org/abs/2409.16167): merge LoRAs rank by rank.

Every rank of a LoRA, the pair ``(a_k, b_k)`` = (row k of A, column k of B), is a "minimal semantic
unit" (MSU): ``ΔW = Σ_k b_k a_kᵀ``. Per adapted layer, independently (METHODS.md §6):

1. pool the MSUs of all source LoRAs (heterogeneous ranks allowed), each LoRA's scale ``s_j``
   folded in (default ``√s_j`` into both factors; ``folding="b"``: ``s_j`` into b only);
2. canonicalise (default on; not in the paper): ``(a, b) ≡ (−a, −b) ≡ (c·a, b/c)``, so flip the
   sign to make the largest-``|·|`` entry of b positive and balance ``‖a‖ = ‖b‖``; without it
   k-means separates identical units;
3. k-means (Lloyd, k-means++ init, fixed seed; fp64 on the CPU, so it is deterministic) over the
   feature ``concat(a, b)`` (default) or ``a`` / ``b`` alone, into ``k`` clusters (the merged rank).
   The pooled units are first put in a canonical order (lexicographic in ``concat(a, b)``, see
   :func:`canonical_order`), so the merge does not depend on the order of the sources (the paper
   treats the pool as a set; k-means++ seeding would otherwise follow the pooling order);
   ``n_init > 1`` keeps the lowest-inertia of that many seeded k-means++ starts;
4. centroids ``ā_c``, ``b̄_c`` = member means; merged LoRA ``B' = [b̄_1 … b̄_k]``, ``A' = [ā_1; …; ā_k]``;
5. dual reweighting (the paper names the two steps; its formulas are unconfirmed, these are
   METHODS.md's [design] defaults):

   - parameter reweighting (averaging shrinks norms): ``ā_c ← ā_c · mean_{i∈c}‖a_i‖ / ‖ā_c‖``,
     likewise ``b̄_c``;
   - output reweighting (summing changes the output variance): one scalar ``λ`` on ``B'A'``,
     ``λ = √(mean_j ‖ΔW_j‖_F² / ‖B'A'‖_F²)`` (``"norm"``: ``E‖ΔW x‖²`` for isotropic x), or the same
     ratio measured on calibration inputs X (``"calibration"``: ``‖X ΔW_jᵀ‖²`` and ``‖X (B'A')ᵀ‖²``),
     or ``"none"``. ``λ`` is split as ``√λ`` into both factors.

``k`` equal to the number of units and no reweighting reproduces the concatenation ``Σ_j ΔW_j``;
one LoRA with ``k = r`` comes back unchanged (up to the canonical sign and scale of each unit).
An empty cluster (only possible with duplicate units) contributes a zero unit. In :func:`lego_merge`
``k`` larger than the number of units raises; :func:`lego_merge_adapters` caps ``k`` per layer at the
units there.

Changed behaviour: since the canonical ordering (review 2, item 6) the clusters, and so the merged
weights, differ from those of the earlier code for the same seed whenever the pooled order was not
already canonical; results computed before it (``benchmarks/results/lego_glue_session13.json``) are not
reproduced bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.multi import active_adapters, adapter_method, multi_layers, set_adapter
from ..core.config import whole_number
from .baselines import _layers_by_target, add_lora_from_factors, lora_factors

__all__ = [
    "LegoResult", "canonical_order", "canonicalize_units", "collect_layer_inputs", "kmeans", "lego_merge",
    "lego_merge_adapters", "minimal_semantic_units",
]

FOLDINGS = ("sqrt", "b")
FEATURES = ("concat", "a", "b")
OUTPUT_REWEIGHTS = ("norm", "calibration", "none")


def _check_options(**given: str) -> None:
    """ValueError for an option (``folding``, ``feature``, ``output_reweight``) outside its choices."""
    choices = {"folding": FOLDINGS, "feature": FEATURES, "output_reweight": OUTPUT_REWEIGHTS}
    for name, value in given.items():
        if value not in choices[name]:
            raise ValueError(f"{name} must be one of {choices[name]}, got {value!r}")


def minimal_semantic_units(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0,
                           folding: str = "sqrt") -> tuple[torch.Tensor, torch.Tensor]:
    """MSUs of ``ΔW = scale · B A``: ``(units_a (r, n), units_b (r, m))`` with ``ΔW = units_bᵀ units_a``.

    ``b``: B (m, r); ``a``: A (r, n). ``folding``: ``"sqrt"`` puts ``√scale`` into both factors
    (a negative scale goes to b), ``"b"`` puts ``scale`` into b.
    """
    _check_options(folding=folding)
    a, b = a.float(), b.float().t()
    if folding == "b":
        return a.clone(), scale * b
    root = math.sqrt(abs(scale))
    return root * a, math.copysign(root, scale) * b


def canonicalize_units(units_a: torch.Tensor, units_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical form of each unit (row): largest-``|·|`` entry of b positive, ``‖a‖ = ‖b‖``.

    Each ``b_kᵀ a_k`` is unchanged; a unit with a zero factor becomes zero in both.
    """
    idx = units_b.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(units_b.gather(1, idx))
    sign[sign == 0] = 1.0
    a, b = units_a * sign, units_b * sign
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    live = (na > 0) & (nb > 0)
    one = torch.ones_like(na)
    ratio = torch.where(live, (nb / torch.where(live, na, one)).sqrt(), torch.zeros_like(na))  # √(‖b‖/‖a‖)
    return a * ratio, torch.where(live, b / torch.where(live, ratio, one), torch.zeros_like(b))


def canonical_order(x: torch.Tensor) -> torch.Tensor:
    """Permutation that sorts the rows of ``x`` (U, d) lexicographically (column 0 first, ascending).

    A total order of the rows that does not depend on their input order: rows that tie on every
    column are equal, so their relative order cannot change anything computed from them. Runs in
    fp64 on the CPU (-0.0 ties with 0.0). Returns a (U,) long tensor on ``x``'s device.
    """
    if x.dim() != 2:
        raise ValueError(f"expected (U, d) rows, got shape {tuple(x.shape)}")
    if x.shape[0] <= 1:
        return torch.arange(x.shape[0], device=x.device)
    rows = x.detach().to("cpu", torch.float64).numpy()
    lead = rows[:, : min(rows.shape[1], 8)]
    perm = np.lexsort(lead.T[::-1])  # lexsort's last key is the primary one
    if (lead[perm[1:]] == lead[perm[:-1]]).all(axis=1).any():  # ties on the leading columns: all of them
        perm = np.lexsort(rows.T[::-1])
    return torch.from_numpy(np.ascontiguousarray(perm)).long().to(x.device)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, max_iter: int = 100, tol: float = 1e-10, n_init: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding: ``(centroids (k, d), labels (U,))`` for ``x`` (U, d).

    Runs in fp64 on the CPU with a seeded generator: the same input and seed give the same result
    on every device. Stops when the squared centroid shift falls below ``tol`` times the data's
    mean squared norm. A cluster left empty takes the point farthest from its centroid; with
    only duplicates left it stays empty (centroid kept, no members). ``n_init``: number of
    k-means++ starts drawn one after another from the seeded generator; the run with the lowest
    inertia (sum of squared distances to the assigned centroids) is kept, the first on ties.
    The result depends on the order of the rows of ``x``; see :func:`canonical_order`.
    """
    n_points = x.shape[0]
    if not 1 <= k <= n_points:
        raise ValueError(f"k must be in [1, {n_points}] (the number of units), got {k}")
    # max_iter 0 (or negative) skipped Lloyd's loop: the k-means++ seeds came back as "clusters"
    max_iter = whole_number(max_iter, "max_iter", minimum=1)
    n_init = whole_number(n_init, "n_init", minimum=1)
    device, dtype = x.device, x.dtype
    x = x.detach().to("cpu", torch.float64)
    g = torch.Generator().manual_seed(seed)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(n_init):
        centroids, labels, inertia = _lloyd(x, k, g, max_iter, tol)
        if best is None or inertia < best[0]:
            best = (inertia, centroids, labels)
    assert best is not None
    return best[1].to(device, dtype), best[2].to(device)


def _lloyd(x: torch.Tensor, k: int, g: torch.Generator, max_iter: int, tol: float
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One k-means++ start and Lloyd's iterations on fp64 CPU ``x``: ``(centroids, labels, inertia)``."""
    n_points = x.shape[0]
    sq = (x * x).sum(1)

    def sqdist(c: torch.Tensor) -> torch.Tensor:  # (U, k), clamped against rounding below 0
        return (sq[:, None] + (c * c).sum(1)[None, :] - 2.0 * x @ c.t()).clamp_min(0.0)

    chosen = [int(torch.randint(n_points, (1,), generator=g))]
    d2 = sqdist(x[chosen]).squeeze(1)
    for _ in range(1, k):
        weights = d2.clone()
        weights[chosen] = 0.0
        if weights.sum() <= 0:  # only duplicates of chosen points left: pick uniformly among the rest
            weights = torch.ones(n_points, dtype=torch.float64)
            weights[chosen] = 0.0
        i = int(torch.multinomial(weights, 1, generator=g))
        chosen.append(i)
        d2 = torch.minimum(d2, sqdist(x[i : i + 1]).squeeze(1))
    centroids = x[chosen].clone()
    scale = float(sq.mean()) or 1.0
    labels = sqdist(centroids).argmin(1)
    for _ in range(max_iter):
        dist = sqdist(centroids)
        labels = dist.argmin(1)
        new = centroids.clone()
        for j in range(k):
            members = labels == j
            if members.any():
                new[j] = x[members].mean(0)
            else:
                own = dist.gather(1, labels[:, None]).squeeze(1)
                counts = torch.bincount(labels, minlength=k)
                own[counts[labels] < 2] = -1.0  # never empty another cluster
                far = int(own.argmax())
                if own[far] > 0:
                    new[j] = x[far]
                    labels[far] = j
        shift = float(((new - centroids) ** 2).sum())
        centroids = new
        if shift <= tol * scale:
            break
    dist = sqdist(centroids)
    labels = dist.argmin(1)
    inertia = float(dist.gather(1, labels[:, None]).sum())
    return centroids, labels, inertia


@dataclass
class LegoResult:
    """A merged layer: ``ΔW' = B A`` (scale 1).

    Attributes:
        B: (m, k). A: (k, n). labels: cluster of each pooled unit, (U,), in source order.
        lam: the output-reweighting factor (already folded into B and A).
    """

    B: torch.Tensor
    A: torch.Tensor
    labels: torch.Tensor
    lam: float


def lego_merge(
    loras: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    k: int,
    seed: int = 0,
    canonicalize: bool = True,
    folding: str = "sqrt",
    feature: str = "concat",
    parameter_reweight: bool = True,
    output_reweight: str = "norm",
    calibration_inputs: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
    n_init: int = 1,
) -> LegoResult:
    """Merge the LoRAs of one layer into one rank-``k`` LoRA.

    The result does not depend on the order of ``loras`` (up to float rounding of the output
    reweighting's sums): the pooled units are sorted by :func:`canonical_order` of
    ``concat(a, b)`` before k-means, and ``labels`` are mapped back to the pooled (source) order.
    This changed the clusters for a given seed relative to the code before the fix.

    Args:
        loras: ``[(B_j (m, r_j), A_j (r_j, n), s_j)]`` with ``ΔW_j = s_j B_j A_j``.
        k: merged rank (number of clusters); at most ``Σ_j r_j``.
        calibration_inputs: X (N, n), needed for ``output_reweight="calibration"``.
        n_init: seeded k-means++ starts; the lowest-inertia one is kept (default 1, one start).
    """
    k = whole_number(k, "k (the merged rank)")  # a float (2.5, 4.0) or True failed deep in torch.zeros
    max_iter = whole_number(max_iter, "max_iter", minimum=1)
    n_init = whole_number(n_init, "n_init", minimum=1)
    _check_options(feature=feature, output_reweight=output_reweight)
    if output_reweight == "calibration" and calibration_inputs is None:
        raise ValueError("output_reweight='calibration' needs calibration_inputs (N, n)")
    if not loras:
        raise ValueError("nothing to merge: no LoRAs")
    shapes = {(b.shape[0], a.shape[1]) for b, a, _ in loras}
    if len(shapes) != 1:
        raise ValueError(f"LoRAs of one layer must share (out, in); got {sorted(shapes)}")
    units = [minimal_semantic_units(b, a, s, folding) for b, a, s in loras]
    ua = torch.cat([u[0] for u in units])  # (U, n)
    ub = torch.cat([u[1] for u in units])  # (U, m)
    if canonicalize:
        ua, ub = canonicalize_units(ua, ub)
    # canonical order of the pooled units: everything below sees the same rows in the same order
    # whatever the order of the sources; labels are mapped back to the pooled order at the end
    order = canonical_order(torch.cat([ua, ub], dim=1))
    ua, ub = ua[order], ub[order]
    feats = {"concat": torch.cat([ua, ub], dim=1), "a": ua, "b": ub}[feature]
    _, sorted_labels = kmeans(feats, k, seed=seed, max_iter=max_iter, tol=tol, n_init=n_init)
    labels = torch.empty_like(sorted_labels)
    labels[order] = sorted_labels
    a_bar = torch.zeros(k, ua.shape[1], device=ua.device)
    b_bar = torch.zeros(k, ub.shape[1], device=ub.device)
    for c in range(k):
        members = sorted_labels == c
        if not members.any():
            continue  # empty cluster: a zero unit
        a_bar[c], b_bar[c] = ua[members].mean(0), ub[members].mean(0)
        if parameter_reweight:
            for bar, pool in ((a_bar, ua), (b_bar, ub)):
                norm = bar[c].norm()
                if norm > 0:
                    bar[c] = bar[c] * (pool[members].norm(dim=1).mean() / norm)
    merged = b_bar.t() @ a_bar  # (m, n)
    lam = 1.0
    if output_reweight != "none":
        deltas = [s * b.float() @ a.float() for b, a, s in loras]
        if output_reweight == "norm":
            target = math.fsum(sorted(float(d.pow(2).sum()) for d in deltas)) / len(deltas)
            current = float(merged.pow(2).sum())
        else:
            x = calibration_inputs.float().to(merged.device)  # type: ignore[union-attr]
            target = math.fsum(sorted(float((x @ d.t()).pow(2).sum()) for d in deltas)) / len(deltas)
            current = float((x @ merged.t()).pow(2).sum())
        lam = math.sqrt(target / current) if current > 0 else 1.0
    root = math.sqrt(lam)
    return LegoResult(B=root * b_bar.t().contiguous(), A=root * a_bar, labels=labels, lam=lam)


@torch.no_grad()
def collect_layer_inputs(model: nn.Module, run: Callable[[nn.Module], Any], targets: Sequence[str],
                         max_rows: int = 4096) -> dict[str, torch.Tensor]:
    """Inputs of the adapted modules ``targets`` while ``run(model)`` runs: target -> X (≤ max_rows, n).

    Used for ``output_reweight="calibration"``; the caller picks which adapters are active.
    """
    layers = multi_layers(model)
    rows: dict[str, list[torch.Tensor]] = {t: [] for t in targets}
    handles = []
    for t in targets:
        def hook(_module: nn.Module, args: tuple[Any, ...], t: str = t) -> None:
            got = sum(r.shape[0] for r in rows[t])
            if got < max_rows:
                x = args[0].detach()
                rows[t].append(x.reshape(-1, x.shape[-1])[: max_rows - got].float())
        handles.append(layers[t].register_forward_pre_hook(hook))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    missing = [t for t, r in rows.items() if not r]
    if missing:
        raise ValueError(f"calibration run never reached {missing[:3]}")
    return {t: torch.cat(r) for t, r in rows.items()}


def lego_merge_adapters(
    model: nn.Module,
    sources: Sequence[str],
    name: str,
    k: int | None = None,
    seed: int = 0,
    canonicalize: bool = True,
    folding: str = "sqrt",
    feature: str = "concat",
    parameter_reweight: bool = True,
    output_reweight: str = "norm",
    calibration: Callable[[nn.Module], Any] | None = None,
    modules_to_save_from: str | None = None,
    max_iter: int = 100,
    n_init: int = 1,
) -> dict[str, LegoResult]:
    """LoRA-LEGO over the named LoRA adapters ``sources`` of ``model``; adds LoRA adapter ``name``.

    ``k`` (the merged adapter's rank) defaults to the largest source rank. At each layer the number
    of clusters is ``min(k, U_t)``, with ``U_t`` the rank-1 units the sources have there (the sum of
    the ranks of the sources that adapt it): a layer adapted only by smaller-rank sources keeps all
    its units (their concatenation, then the reweighting) and is padded with zero units up to ``k``.
    A ``k`` above the largest number of units at any layer raises. The result does not depend on the order of
    ``sources`` (see :func:`lego_merge`). ``calibration``: for ``output_reweight="calibration"``,
    a function that runs the model on a calibration batch (``lambda m: m(**batch)``); the inputs
    of each layer are recorded with no adapter active (the base model's activations).
    Returns target -> :class:`LegoResult`.
    """
    by_target = _layers_by_target(model, sources)
    if k is None:
        k = max(int(adapter_method(model, s).config.r) for s in sources)  # type: ignore[attr-defined]
    k = whole_number(k, "k (the merged rank)")
    # checked here, before the calibration run and any k-means: a bad count or option surfaced per
    # layer ("layer t: ..."), after every source's factors were read
    max_iter = whole_number(max_iter, "max_iter", minimum=1)
    n_init = whole_number(n_init, "n_init", minimum=1)
    _check_options(folding=folding, feature=feature, output_reweight=output_reweight)
    factors = {t: [lora_factors(layer) for layer in layers.values()] for t, layers in by_target.items()}
    units = {t: sum(b.shape[1] for b, _, _ in fs) for t, fs in factors.items()}
    most = max(units.values())
    if not 1 <= k <= most:
        t = next(t for t, u in units.items() if u == most)
        raise ValueError(f"layer {t}: k must be in [1, {most}] (the most units at any layer), got {k}")
    inputs: dict[str, torch.Tensor] = {}
    if output_reweight == "calibration":
        if calibration is None:
            raise ValueError("output_reweight='calibration' needs calibration=lambda model: model(**batch)")
        before = active_adapters(model)
        set_adapter(model, [])
        try:
            inputs = collect_layer_inputs(model, calibration, list(by_target))
        finally:
            set_adapter(model, before)
    results: dict[str, LegoResult] = {}
    for t in by_target:
        try:
            results[t] = lego_merge(factors[t], min(k, units[t]), seed=seed,
                                    canonicalize=canonicalize, folding=folding, feature=feature,
                                    parameter_reweight=parameter_reweight, output_reweight=output_reweight,
                                    calibration_inputs=inputs.get(t), max_iter=max_iter, n_init=n_init)
        except ValueError as exc:
            raise ValueError(f"layer {t}: {exc}") from None
    add_lora_from_factors(model, name, {t: (r.B, r.A) for t, r in results.items()}, modules_to_save_from)
    return results
