"""LQ-LoRA's low-rank plus quantized decomposition ``W ≈ Q + L1 L2`` (METHODS.md §2).

Alternating minimisation of ``‖W − (Q + L1 L2)‖_F`` [paper][code: lq_utils.py]:

    repeat up to T_max times:
        L1, L2 = balanced rank-r SVD of (W − Q)    (Fisher-weighted when F is given)
        Q      = NF-quantize(W − L1 L2)
        err    = ‖W − Q − L1 L2‖_F                 (‖√F ⊙ (...)‖_F when F is given)
        stop when err grows

Open choice (METHODS §2): the official code returns the iterate that made the error grow; the
default here keeps the best iterate (``return_last=True`` gives the code's behaviour).

Fisher-weighted variant [paper][code]: ``F`` is the empirical Fisher diagonal of W (same shape).
The weighted SVD is approximated by a rank-1 row × column weighting ``ρ_i = √(mean_j F_ij)``,
``γ_j = √(mean_i F_ij)``: ``(L̃1, L̃2) = SVD_r(diag(ρ)(W − Q)diag(γ))``, ``L1 = diag(ρ)⁻¹ L̃1``,
``L2 = L̃2 diag(γ)⁻¹`` (``fisher_mode="row"`` / ``"col"`` keep one side; ``"two_sided"`` default).
Quantization stays unweighted; the stopping test and the returned error use the full elementwise √F.

Everything runs in fp32. The randomized SVD (``torch.svd_lowrank``'s algorithm, oversampling
``q = r + 10``, as in the code) draws from its own generator seeded per call, so a decomposition is
reproducible on one device and leaves the global RNG states untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .nf import QuantConfig, QuantizedTensor, dequantize, parse_config, quantize

FISHER_MODES = ("two_sided", "row", "col")


@dataclass
class Decomposition:
    """Result of :func:`lq_decompose`.

    Attributes:
        quantized: packed Q. q_dense: Q dequantized (out, in) fp32.
        L1: (out, r) fp32. L2: (r, in) fp32 (balanced: ``L1 = U√Σ``, ``L2 = √Σ Vᵀ``).
        error: (weighted) ‖W − Q − L1L2‖_F of the returned iterate; errors: one per iterate.
        iterations: iterates computed.
    """

    quantized: QuantizedTensor
    q_dense: torch.Tensor
    L1: torch.Tensor
    L2: torch.Tensor
    error: float
    errors: list[float] = field(default_factory=list)
    iterations: int = 0


def _svd_lowrank(a: torch.Tensor, q: int, niter: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.svd_lowrank(a, q, niter)`` (Halko et al. 2009, Alg. 4.4 + 5.1; the same operations in
    the same order) for a real 2-D ``a``, with its Gaussian test matrix drawn from ``generator``
    (``torch.svd_lowrank`` takes no generator, only the global RNG). Returns ``U (m, q), S (q,), V (n, q)``."""
    wide = a.shape[0] < a.shape[1]
    if wide:  # work on the tall orientation, as torch does
        a = a.t()
    omega = torch.randn(a.shape[1], q, dtype=a.dtype, device=a.device, generator=generator)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):  # subspace (power) iterations
        basis = torch.linalg.qr(a.t() @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    U, S, Vh = torch.linalg.svd(basis.t() @ a, full_matrices=False)
    U, V = basis @ U, Vh.t()
    return (V, S, U) if wide else (U, S, V)


def balanced_svd(m: torch.Tensor, r: int, method: str = "lowrank", seed: int = 0, oversample: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of ``m`` (out, in): ``L1 = U_r √Σ_r`` (out, r), ``L2 = √Σ_r V_rᵀ`` (r, in)."""
    m = m.float()
    if method == "exact":
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        U, S, V = U[:, :r], S[:r], Vh[:r].t()
    elif method == "lowrank":
        q = min(r + oversample, *m.shape)
        # a dedicated generator on m's device: no global RNG state is read or changed (seeding the
        # global RNG inside fork_rng reseeded every CUDA device but restored only the forked ones)
        generator = torch.Generator(device=m.device).manual_seed(seed)
        U, S, V = _svd_lowrank(m, q, niter=2, generator=generator)
        U, S, V = U[:, :r], S[:r], V[:, :r]
    else:
        raise ValueError(f"svd must be 'lowrank' or 'exact', got {method!r}")
    root = S.clamp_min(0).sqrt()
    return U * root, root.unsqueeze(1) * V.t()


def fisher_weights(fisher: torch.Tensor, mode: str = "two_sided", eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column weights ``ρ`` (out,) and ``γ`` (in,) of a Fisher matrix (out, in); the mean
    comes before the square root. ``"row"`` sets γ = 1, ``"col"`` sets ρ = 1. Clamped at ``eps``
    so zero-Fisher rows stay invertible."""
    if mode not in FISHER_MODES:
        raise ValueError(f"fisher_mode must be one of {FISHER_MODES}, got {mode!r}")
    f = fisher.float()
    rho = f.mean(dim=1).clamp_min(eps).sqrt()
    gamma = f.mean(dim=0).clamp_min(eps).sqrt()
    if mode == "row":
        gamma = torch.ones_like(gamma)
    elif mode == "col":
        rho = torch.ones_like(rho)
    return rho, gamma


@torch.no_grad()
def lq_decompose(
    w: torch.Tensor,
    rank: int,
    config: QuantConfig | str,
    max_iters: int = 100,
    fisher: torch.Tensor | None = None,
    fisher_mode: str = "two_sided",
    svd: str = "lowrank",
    seed: int = 0,
    return_last: bool = False,
) -> Decomposition:
    """Decompose ``w`` (out, in) into NF-quantized ``Q`` plus rank-``rank`` ``L1 L2``.

    ``rank = 0`` gives plain NF quantization (``L1``, ``L2`` empty). ``fisher``: (out, in) empirical
    Fisher diagonal for the weighted variant. Returns the best iterate (``return_last``: the last).
    """
    cfg = parse_config(config)
    if w.dim() != 2:
        raise ValueError(f"lq_decompose needs a 2-D matrix, got shape {tuple(w.shape)}")
    if rank < 0 or rank > min(w.shape):
        raise ValueError(f"rank must be in [0, {min(w.shape)}] for a {tuple(w.shape)} matrix, got {rank}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    W = w.detach().float()
    out_f, in_f = W.shape
    sqrt_f = None
    if fisher is not None:
        if fisher.shape != W.shape:
            raise ValueError(f"fisher has shape {tuple(fisher.shape)}, weight has {tuple(W.shape)}")
        sqrt_f = fisher.to(W.device).float().clamp_min(0).sqrt()
        rho, gamma = fisher_weights(fisher.to(W.device), fisher_mode)

    def error(q_dense: torch.Tensor, L1: torch.Tensor, L2: torch.Tensor) -> float:
        resid = W - q_dense - (L1 @ L2 if rank else 0.0)
        return float((resid * sqrt_f).norm() if sqrt_f is not None else resid.norm())

    zeros_l1 = W.new_zeros(out_f, 0)
    zeros_l2 = W.new_zeros(0, in_f)
    if rank == 0:
        q = quantize(W, cfg)
        qd = dequantize(q)
        e = error(qd, zeros_l1, zeros_l2)
        return Decomposition(q, qd, zeros_l1, zeros_l2, e, [e], 1)

    Q = torch.zeros_like(W)
    best: Decomposition | None = None
    last: Decomposition | None = None
    errors: list[float] = []
    for t in range(max_iters):
        if sqrt_f is None:
            L1, L2 = balanced_svd(W - Q, rank, svd, seed + t)
        else:
            L1w, L2w = balanced_svd(rho.unsqueeze(1) * (W - Q) * gamma.unsqueeze(0), rank, svd, seed + t)
            L1, L2 = L1w / rho.unsqueeze(1), L2w / gamma.unsqueeze(0)
        q = quantize(W - L1 @ L2, cfg)
        Q = dequantize(q)
        e = error(Q, L1, L2)
        errors.append(e)
        last = Decomposition(q, Q, L1, L2, e, errors, t + 1)
        if best is not None and e > best.error:
            break
        best = last
    result = last if return_last else best
    assert result is not None
    result.errors, result.iterations = errors, len(errors)
    return result


# ---- empirical Fisher ------------------------------------------------------------------------------
def estimate_fisher(
    model: nn.Module,
    examples: Iterable[dict[str, torch.Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    weights: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal ``F = Σ_n (∂ℓ_n/∂W)²`` of each named weight, in fp32.

    Args:
        model: the unquantized model (its parameters' ``requires_grad`` is restored afterwards).
        examples: single examples (batch size 1, per-example gradients as in the paper's code);
            a batch of B rows is split into B examples here.
        loss_fn: ``(model, example) -> scalar loss``.
        weights: name -> weight parameter to accumulate for (e.g. every targeted linear's weight).

    Returns:
        name -> Fisher tensor of the weight's shape (fp32, on the weight's device).
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in weights.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in weights.items()}
    was_training = model.training
    model.eval()
    try:
        for batch in examples:
            sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
            n = sizes.pop() if len(sizes) == 1 else 1
            for i in range(n):
                example = {k: (v[i : i + 1] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
                grads = torch.autograd.grad(loss_fn(model, example), list(weights.values()), allow_unused=True)
                for (name, _), g in zip(weights.items(), grads):
                    if g is not None:
                        fisher[name].add_(g.float().square())
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return fisher


def relative_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    """``‖w − approx‖_F / ‖w‖_F`` in fp32."""
    w = w.float()
    return float((w - approx.float()).norm() / w.norm().clamp_min(1e-30))
