"""Quantization for LQ-LoRA (METHODS.md §2): NormalFloat blockwise quantization with double-quantized
scales and exact storage accounting (:mod:`.nf`), a packed frozen linear layer (:mod:`.linear`), the
low-rank plus quantized decomposition and empirical Fisher (:mod:`.decompose`) and the
bits-per-parameter ILP (:mod:`.ilp`)."""

from .decompose import Decomposition, balanced_svd, estimate_fisher, fisher_weights, lq_decompose, relative_error
from .ilp import FULL_GRID, SMALL_GRID, CostTable, ILPSolution, build_cost_table, solve_ilp, storage_table
from .linear import QuantizedLinear
from .nf import (
    PRESETS,
    QuantConfig,
    QuantizedTensor,
    dequantize,
    nf_levels,
    pack_codes,
    parse_config,
    quantize,
    quantize_dequantize,
    storage_bits,
    unpack_codes,
)

__all__ = [
    "FULL_GRID", "PRESETS", "SMALL_GRID", "CostTable", "Decomposition", "ILPSolution", "QuantConfig",
    "QuantizedLinear", "QuantizedTensor", "balanced_svd", "build_cost_table", "dequantize", "estimate_fisher",
    "fisher_weights", "lq_decompose", "nf_levels", "pack_codes", "parse_config", "quantize",
    "quantize_dequantize", "relative_error", "solve_ilp", "storage_bits", "storage_table", "unpack_codes",
]
