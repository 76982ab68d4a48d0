"""Choosing one quantization config per matrix under a bits-per-parameter budget (METHODS.md §2).

Integer linear program [paper][code: lq_utils.py, allocation_utils.py]: binary ``x_{i,c}``,

    minimise   Σ_{i,c} cost_{i,c} x_{i,c}
    subject to Σ_c x_{i,c} = 1                       (one config per matrix i)
               Σ_{i,c} storage_{i,c} x_{i,c} ≤ budget · Σ_i numel_i

with ``cost_{i,c} = ‖W_i − (Q + L1L2)‖_F²`` (or its Fisher-weighted form) from :func:`build_cost_table`
and ``storage_{i,c}`` the exact packed bits of :func:`lightning_lora.quant.nf.storage_bits`
(padding and the offset μ included; the code uses ``bits(c)·numel``, which differs only by those).
The budget counts the quantized matrices only, not the LoRA factors. Solved with
``scipy.optimize.milp`` (HiGHS; the code's Gurobi path is not used: no commercial dependency).
Costs are divided by their largest value before solving (conditioning, as the code does).

Optimality gap (our choice; whether the code sets Gurobi's ``MIPGap`` is unconfirmed): the solve stops
once the incumbent is proven within a relative gap ``mip_rel_gap`` of the optimum, by default 1e-4,
Gurobi's own default. On SmolLM2-135M's 210 × 24 tables this takes at most 3 s where a proof of exact
optimality (``mip_rel_gap=0``) takes up to 23 s for an objective lower by less than 1e-4 relative
(benchmarks/results/lq_lora_smollm2.json, docs/results.md).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.config import finite_number
from .decompose import lq_decompose
from .nf import QuantConfig, parse_config, storage_bits

#: the code's grid: b ∈ {2,3,4,8}, b0 ∈ {2,3,4,8}, b1 ∈ {bf16, fp16, fp32}, B0 ∈ {16,32,64},
#: B1 ∈ {16,64,256} -> 432 configs
FULL_GRID: tuple[QuantConfig, ...] = tuple(
    QuantConfig(b, b0, b1, B0, B1)
    for b, b0, b1, B0, B1 in itertools.product((2, 3, 4, 8), (2, 3, 4, 8), ("bf16", "fp16", "fp32"), (16, 32, 64), (16, 64, 256))
)
#: a 24-config grid (b ∈ {2,3,4,8} × B0 ∈ {16,32,64} × b0 ∈ {4,8}; fp16 group absmax, B1 = 256):
#: the bit width and block size dominate the error; used where 432 decompositions per matrix cost too much
SMALL_GRID: tuple[QuantConfig, ...] = tuple(
    QuantConfig(b, b0, "fp16", B0, 256) for b, B0, b0 in itertools.product((2, 3, 4, 8), (16, 32, 64), (4, 8))
)


@dataclass
class CostTable:
    """Costs and storage of every (matrix, config) pair.

    Attributes:
        names: matrix names (rows). numels: elements per matrix.
        configs: the candidate configs (columns).
        cost: (n_matrices, n_configs) float64. storage: (n_matrices, n_configs) int64 bits.
    """

    names: list[str]
    numels: list[int]
    configs: list[QuantConfig]
    cost: np.ndarray
    storage: np.ndarray


@dataclass
class ILPSolution:
    """``choice[name]`` = chosen config; ``bits_per_param`` = exact storage / Σ numel."""

    choice: dict[str, QuantConfig]
    objective: float
    bits_per_param: float
    seconds: float


def storage_table(numels: Sequence[int], configs: Sequence[QuantConfig]) -> np.ndarray:
    return np.array([[storage_bits(n, c) for c in configs] for n in numels], dtype=np.int64)


def build_cost_table(
    weights: dict[str, torch.Tensor],
    rank: int,
    configs: Iterable[QuantConfig | str] = SMALL_GRID,
    max_iters: int = 100,
    fisher: dict[str, torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
    **decompose_kwargs,
) -> CostTable:
    """Decompose every matrix under every config; ``cost = error²`` (Fisher-weighted when given)."""
    cfgs = [parse_config(c) for c in configs]
    if not cfgs:  # else numpy's "zero-size array to reduction operation" when the ILP reads the table
        raise ValueError("no quantization configs to choose from: configs is empty")
    names = list(weights)
    # check every matrix before decomposing any (a bad one late in the list would otherwise fail
    # only after minutes of work), naming it: lq_decompose's own errors do not know the name
    for name in names:
        shape = tuple(weights[name].shape)
        if len(shape) != 2:
            raise ValueError(f"matrix {name!r} has shape {shape}: not a 2-D matrix")
        if not 0 <= rank <= min(shape):
            raise ValueError(f"matrix {name!r} of shape {shape}: rank must be in [0, {min(shape)}], got {rank}")
        if fisher is not None and name not in fisher:
            raise ValueError(f"no Fisher tensor given for matrix {name!r}")
        if fisher is not None and tuple(fisher[name].shape) != shape:
            raise ValueError(f"matrix {name!r}: Fisher has shape {tuple(fisher[name].shape)}, weight has {shape}")
    cost = np.zeros((len(names), len(cfgs)))
    for i, name in enumerate(names):
        f = None if fisher is None else fisher[name]
        for j, cfg in enumerate(cfgs):
            try:
                cost[i, j] = lq_decompose(weights[name], rank, cfg, max_iters, fisher=f, **decompose_kwargs).error ** 2
            except ValueError as e:  # e.g. NaN entries that cannot be quantized: say which matrix and config
                raise ValueError(f"matrix {name!r}, config {cfg.name}: {e}") from e
            except Exception as e:  # other types (e.g. torch.linalg.LinAlgError) are kept; a note names it
                if hasattr(e, "add_note"):  # Python >= 3.11 (the project supports 3.10)
                    e.add_note(f"while decomposing matrix {name!r} under config {cfg.name}")
                raise
        if progress is not None:
            progress(name)
    numels = [int(weights[n].numel()) for n in names]
    return CostTable(names, numels, cfgs, cost, storage_table(numels, cfgs))


#: Gurobi's default relative MIP gap; 0 proves optimality (up to ~8x slower on real tables)
DEFAULT_MIP_REL_GAP = 1e-4


def check_budget(budget: float, storage: np.ndarray, numels: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``budget`` (bits/param) is a finite number that the cheapest
    config of every matrix meets. ``storage`` (matrices, configs): bits of each matrix under each
    config (:func:`storage_table`); ``numels``: parameters of each matrix. Cheap (no decomposition),
    so callers run it before building a cost table: a NaN budget used to reach HiGHS as a "model
    error" and a string a numpy ufunc error, and a too-small budget was refused only after every
    matrix had been decomposed under every config."""
    finite_number(budget, "budget (bits per parameter)")
    if storage.shape[0] == 0 or sum(numels) == 0:
        raise ValueError("no matrices to quantize")
    if storage.shape[1] == 0:
        raise ValueError("no quantization configs to choose from: configs is empty")
    min_bits = storage.min(axis=1).sum() / float(sum(numels))
    if budget < min_bits - 1e-12:
        raise ValueError(f"budget {budget} bits/param is below the smallest achievable {min_bits:.4f} with these configs")


def solve_ilp(table: CostTable, budget: float, time_limit: float = 60.0,
              mip_rel_gap: float = DEFAULT_MIP_REL_GAP) -> ILPSolution:
    """Pick one config per matrix minimising total cost with average bits per parameter ≤ ``budget``.

    The returned objective is within ``mip_rel_gap`` (relative) of the optimum; ``0`` for the exact one.

    Raises ``ValueError`` when even the cheapest configs exceed the budget, ``RuntimeError`` when
    HiGHS finds no solution within ``time_limit`` seconds.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    start = time.perf_counter()
    n, k = table.cost.shape
    if mip_rel_gap < 0:
        raise ValueError(f"mip_rel_gap must be >= 0, got {mip_rel_gap}")
    check_budget(budget, table.storage, table.numels)
    total = float(sum(table.numels))
    scale = float(np.abs(table.cost).max()) or 1.0
    c = (table.cost / scale).reshape(-1)
    rows = np.repeat(np.arange(n), k)
    one_per_matrix = LinearConstraint(csr_matrix((np.ones(n * k), (rows, np.arange(n * k))), shape=(n, n * k)), 1, 1)
    # storage in units of "bits / total": the budget row reads Σ storage/total · x ≤ budget
    budget_row = LinearConstraint((table.storage / total).reshape(1, -1), -np.inf, budget)
    res = milp(c, constraints=[one_per_matrix, budget_row], integrality=np.ones(n * k), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "mip_rel_gap": mip_rel_gap})
    if res.x is None:
        raise RuntimeError(f"ILP found no solution (HiGHS status {res.status}: {res.message})")
    x = np.round(res.x).reshape(n, k).astype(bool)
    picks = x.argmax(axis=1)
    choice = {name: table.configs[j] for name, j in zip(table.names, picks)}
    used = float(table.storage[np.arange(n), picks].sum()) / total
    objective = float(table.cost[np.arange(n), picks].sum())
    return ILPSolution(choice, objective, used, time.perf_counter() - start)


def brute_force(table: CostTable, budget: float) -> tuple[float, tuple[int, ...]]:
    """Exhaustive search (tests only): ``(best total cost, config index per matrix)``."""
    total = sum(table.numels)
    best = (np.inf, ())
    n, k = table.cost.shape
    for picks in itertools.product(range(k), repeat=n):
        bits = sum(table.storage[i, j] for i, j in enumerate(picks)) / total
        if bits <= budget + 1e-12:
            cost = float(sum(table.cost[i, j] for i, j in enumerate(picks)))
            if cost < best[0]:
                best = (cost, picks)
    return best
