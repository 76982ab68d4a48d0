"""LQ-LoRA (Guo et al., ICLR 2024; METHODS.md §2): quantized frozen base ``Q`` + LoRA from ``L1 L2``.

Each targeted matrix ``W`` (out, in) is decomposed offline (:func:`lightning_lora.quant.lq_decompose`)
into an NF-quantized ``Q`` and a rank-r ``L1 L2``; ``Q`` becomes the frozen base, stored packed
(:class:`~lightning_lora.quant.QuantizedLinear`: uint8 codes + double-quantized scales, dequantized
in the forward pass), and the LoRA factors start at ``A = L2/√s``, ``B = L1/√s`` so ``s·BA = L1L2``
[code]. Only A and B train.

What the adapted model computes at init is ``x (Q + L1L2)ᵀ + b``: **not** the full-precision base
(METHODS S1: "not promised; test the documented value"). With the adapter disabled it computes
``x Qᵀ + b`` (the quantized base), not the original model.

Per-matrix configs: one preset for all (``quant="nf3"``) or one config per matrix
(``matrix_configs={name: "b3-s8-fp16-B64-G256", ...}``), usually from the ILP:
:func:`plan_lq_lora` builds the cost table and solves the budget ILP; :func:`quantize_model` plans
and injects in one call. Fisher weighting: :func:`lightning_lora.quant.estimate_fisher` on
calibration batches, saved with :func:`save_fisher`; pass ``fisher_path=`` (a safetensors file,
keys = module names) so ``AdapterCallback("lq_lora", ...)`` can use it.

Merging [design]: folding ``s·BA`` into ``Q`` would need re-quantization, so ``merge()`` raises;
:func:`unload_dense` replaces every layer by an ``nn.Linear`` holding the dense ``Q + s·BA`` (the
"dequantized dense copy" of METHODS §2).

Saving: :func:`lightning_lora.save_adapter` writes A, B **and the packed Q** (codes, scales) plus the
per-matrix configs (layer metadata), so ``load_adapter(fresh_fp_model, dir)`` rebuilds the quantized
model without re-running the decomposition (a stored Q; the randomized SVD is not bit-stable across
devices). Lightning checkpoints written through ``AdapterCallback`` carry the same tensors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import adapter_torch_dtype, AdapterConfig, make_config, Method, register, whole_number
from ..core.inject import adapter_layers, find_targets, inject_adapter, _set_submodule
from ..core.layer import AdapterLayer, _is_conv1d, linear_shape
from ..quant.decompose import Decomposition, lq_decompose
from ..quant.ilp import (
    DEFAULT_MIP_REL_GAP,
    SMALL_GRID,
    CostTable,
    ILPSolution,
    build_cost_table,
    check_budget,
    solve_ilp,
    storage_table,
)
from ..quant.linear import QuantizedLinear
from ..quant.nf import QuantConfig, parse_config

_QUANT_BUFFERS = ("codes", "scale_codes", "scale_absmax", "scale_offset")


@dataclass
class LQLoRAConfig(AdapterConfig):
    """LQ-LoRA options (defaults from the official code, METHODS §2).

    Attributes:
        r: rank of ``L1 L2`` and of the LoRA factors. alpha: ``s = alpha / r``.
        dropout: dropout on the adapter branch input.
        quant: config of every matrix not in ``matrix_configs`` (preset ``nf2``/``nf3``/``nf4``/``nf8``
            or a name like ``"b3-s8-fp32-B64-G256"``).
        matrix_configs: qualified module name -> config name (e.g. the ILP's choice).
        max_iters: ``T_max`` of the alternating decomposition.
        svd: ``"lowrank"`` (randomized, q = r + 10; code default) or ``"exact"``.
        seed: seeds the randomized SVD.
        return_last: return the iterate that stopped the loop (code) instead of the best one (default).
        fisher_path: safetensors file of Fisher diagonals keyed by module name (weighted variant).
        fisher_mode: ``"two_sided"`` (default, code), ``"row"`` or ``"col"``.
        adapter_dtype: dtype of A and B.
    """

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.0
    quant: str = "nf4"
    matrix_configs: dict[str, str] = field(default_factory=dict)
    max_iters: int = 100
    svd: str = "lowrank"
    seed: int = 0
    return_last: bool = False
    fisher_path: str | None = None
    fisher_mode: str = "two_sided"
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("r", "max_iters", "seed"):
            setattr(self, key, whole_number(getattr(self, key), f"LQ-LoRA {key}"))
        if self.r < 1:
            raise ValueError(f"LQ-LoRA rank r must be >= 1, got {self.r}")
        if self.max_iters < 1:  # else lq_decompose refuses it only at injection
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")
        parse_config(self.quant)
        for name, spec in self.matrix_configs.items():
            try:
                parse_config(spec)
            except ValueError as exc:
                raise ValueError(f"matrix_configs[{name!r}]: {exc}") from None
        if self.svd not in ("lowrank", "exact"):
            raise ValueError(f"svd must be 'lowrank' or 'exact', got {self.svd!r}")
        if self.fisher_mode not in ("two_sided", "row", "col"):
            raise ValueError(f"fisher_mode must be 'two_sided', 'row' or 'col', got {self.fisher_mode!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _dense_weight(base: nn.Module) -> torch.Tensor:
    """Weight of an ``nn.Linear`` / ``Conv1D`` in the (out, in) layout, fp32."""
    _, _, fan_in_fan_out = linear_shape(base)
    w = base.weight.detach()
    return (w.t() if fan_in_fan_out else w).float()


class LQLoRALinear(AdapterLayer):
    """LoRA over a packed quantized base.

    ``base_layer``: :class:`QuantizedLinear` (frozen, (out, in) layout whatever the original module).
    Parameters: ``lora_A`` (r, in), ``lora_B`` (out, r). ``forward(x) = x Qᵀ + b + s·(x Aᵀ) Bᵀ``.
    """

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, config: LQLoRAConfig, quant_config: QuantConfig,
                 decomposition: Decomposition | None) -> None:
        super().__init__(base_layer)
        self.r = config.r
        self.scaling = config.scaling
        self.dropout_p = config.dropout
        self.quant_config = quant_config
        bias = getattr(base_layer, "bias", None)
        device = base_layer.weight.device
        #: the dense weight's dtype, which ``unload_dense`` gives back (Q itself keeps no float dtype)
        self.dense_dtype = base_layer.weight.dtype
        dtype = adapter_torch_dtype(config.adapter_dtype)
        if decomposition is None:  # loading: storage of the right size, filled by load_adapter
            qlinear = QuantizedLinear(self.in_features, self.out_features, quant_config, bias=bias is not None,
                                      device=device, dtype=bias.dtype if bias is not None else torch.float32)
            if bias is not None:
                qlinear.bias.data.copy_(bias.detach())
            L1 = torch.zeros(self.out_features, self.r, device=device)
            L2 = torch.zeros(self.r, self.in_features, device=device)
        else:
            # on the base layer's device: a decomposition precomputed elsewhere (GPU decomposition, CPU
            # model, or the reverse) would otherwise leave Q on its device and A, B on the base's
            qlinear = QuantizedLinear.from_float(decomposition.q_dense.to(device), bias, quant_config,
                                                 decomposition.quantized)
            L1, L2 = decomposition.L1, decomposition.L2
        self.base_layer = qlinear  # the dense original is dropped here: its memory is freed
        self.fan_in_fan_out = False  # the quantized base is stored (out, in)
        root = math.sqrt(self.scaling)
        # contiguous: SVD factors come out transposed, and a strided copy would multiply in another
        # summation order than the contiguous tensors load_adapter writes (outputs not bit-identical)
        self.lora_A = nn.Parameter((L2 / root).to(device=device, dtype=dtype).contiguous())
        self.lora_B = nn.Parameter((L1 / root).to(device=device, dtype=dtype).contiguous())

    def delta_weight(self) -> torch.Tensor:
        """``s·B A`` (out, in), fp32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def merged_weight(self) -> torch.Tensor:
        """Dense ``Q + s·BA`` (out, in), fp32."""
        return self.base_layer.dequantize(torch.float32) + self.delta_weight()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base_out = self.base_layer(x)
        if self.disabled:
            return base_out
        dtype = base_out.dtype
        xd = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        lora_out = (xd.to(dtype) @ self.lora_A.to(dtype).t()) @ self.lora_B.to(dtype).t()
        return base_out + self.scaling * lora_out

    def merge(self) -> None:
        raise RuntimeError(
            "LQ-LoRA cannot merge into its quantized base without re-quantizing it; use "
            "lightning_lora.methods.lq_lora.unload_dense(model) for a dense Q + s·BA copy"
        )

    def unmerge(self) -> None:
        raise RuntimeError("LQ-LoRA layers are never merged (see merge())")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """A, B and the packed Q (``base_layer.codes`` etc.): Q is part of what LQ-LoRA learned offline."""
        out = super().adapter_state_dict()
        for name in _QUANT_BUFFERS:
            out[f"base_layer.{name}"] = getattr(self.base_layer, name)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, scaling={self.scaling:g}, quant={self.quant_config.name}"


@register("lq_lora")
class LQLoRA(Method):
    """LQ-LoRA. ``decompositions``: precomputed results by module name (skips the decomposition);
    ``fisher``: Fisher diagonals by module name (instead of ``config.fisher_path``)."""

    Config = LQLoRAConfig
    supported_types = (nn.Linear,)
    mergeable = False  # the base is quantized

    def __init__(self, config: AdapterConfig, decompositions: dict[str, Decomposition] | None = None,
                 fisher: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(config)
        self.decompositions = dict(decompositions or {})
        self._fisher = fisher
        self._loading_configs: dict[str, str] | None = None
        self.stats: dict[str, dict[str, Any]] = {}

    def quant_config_for(self, name: str) -> QuantConfig:
        c: LQLoRAConfig = self.config  # type: ignore[assignment]
        if self._loading_configs is not None and name in self._loading_configs:
            return parse_config(self._loading_configs[name])
        return parse_config(c.matrix_configs.get(name, c.quant))

    def fisher_for(self, name: str) -> torch.Tensor | None:
        c: LQLoRAConfig = self.config  # type: ignore[assignment]
        if self._fisher is None and c.fisher_path:
            from safetensors.torch import load_file

            self._fisher = load_file(c.fisher_path)
        if self._fisher is None:
            return None
        if name not in self._fisher:
            raise KeyError(f"no Fisher entry for module {name!r} (have {sorted(self._fisher)[:5]}...)")
        return self._fisher[name]

    def make_layer(self, base: nn.Module, name: str) -> LQLoRALinear:
        c: LQLoRAConfig = self.config  # type: ignore[assignment]
        qcfg = self.quant_config_for(name)
        if self._loading_configs is not None:
            return LQLoRALinear(base, c, qcfg, None)
        in_f, out_f, _ = linear_shape(base)
        # name the module: lq_decompose's own rank error names only the matrix shape
        if c.r > min(in_f, out_f):
            raise ValueError(f"LQ-LoRA rank r={c.r} exceeds min(out, in) = {min(in_f, out_f)} of module {name!r} "
                             f"({out_f}x{in_f}); lower r or exclude the module")
        dec = self.decompositions.pop(name, None)
        # a precomputed decomposition of another shape (another model, a transposed Conv1D weight) would
        # build a layer of the wrong size that fails only in forward, with a bare shape error
        if dec is not None and tuple(dec.q_dense.shape) != (out_f, in_f):
            raise ValueError(f"decompositions[{name!r}] is for a {tuple(dec.q_dense.shape)} matrix, but module "
                             f"{name!r} has an (out, in) = {(out_f, in_f)} weight")
        if dec is None or dec.quantized.config != qcfg or dec.L1.shape[1] != c.r:
            start = time.perf_counter()
            w = _dense_weight(base)
            fisher = self.fisher_for(name)
            dec = lq_decompose(w, c.r, qcfg, c.max_iters, fisher=fisher, fisher_mode=c.fisher_mode, svd=c.svd,
                               seed=c.seed, return_last=c.return_last)
            self.stats[name] = {"error": dec.error, "iterations": dec.iterations, "seconds": time.perf_counter() - start}
        return LQLoRALinear(base, c, qcfg, dec)

    def layer_metadata(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        """The quantization config of every layer (needed to size Q's buffers before loading)."""
        return {"quant_configs": {n: layer.quant_config.name for n, layer in layers.items()}}  # type: ignore[attr-defined]

    def restore_layer_metadata(self, meta: dict[str, Any]) -> None:
        configs = meta["quant_configs"]
        for spec in configs.values():
            parse_config(spec)
        self._loading_configs = dict(configs)


# ---- offline pipeline -----------------------------------------------------------------------------
def target_weights(model: nn.Module, **target_kwargs: Any) -> dict[str, torch.Tensor]:
    """Dense (out, in) fp32 weights of the modules LQ-LoRA would target (``target_modules=...``)."""
    cfg = make_config("lq_lora", **target_kwargs)
    out: dict[str, torch.Tensor] = {}
    for name in find_targets(model, cfg):
        module = model.get_submodule(name)
        # name the module, as the injection does: linear_shape's own error does not say which one
        if not isinstance(module, LQLoRA.supported_types) and not _is_conv1d(module):
            raise TypeError(f"method 'lq_lora' cannot adapt module {name!r} of type {type(module).__name__}; "
                            "supported: ['Linear']")
        out[name] = _dense_weight(module)
    return out


def plan_lq_lora(
    model: nn.Module,
    budget: float,
    r: int = 64,
    configs: Any = SMALL_GRID,
    fisher: dict[str, torch.Tensor] | None = None,
    max_iters: int = 100,
    time_limit: float = 60.0,
    mip_rel_gap: float = DEFAULT_MIP_REL_GAP,
    table: CostTable | None = None,
    fisher_mode: str = "two_sided",
    svd: str = "lowrank",
    seed: int = 0,
    return_last: bool = False,
    **target_kwargs: Any,
) -> tuple[ILPSolution, CostTable]:
    """Cost table (every targeted matrix × every config) and the ILP's choice at ``budget`` bits/param.

    Pass ``table`` to re-solve at another budget without recomputing costs. Returns
    ``(solution, table)``; ``solution.choice`` maps module names to configs (use
    ``{n: c.name for n, c in solution.choice.items()}`` as ``matrix_configs``).
    ``fisher_mode``, ``svd``, ``seed``, ``return_last``: the decomposition settings of the costs
    (:class:`LQLoRAConfig`'s fields of the same names; give the ones the injection will use).
    """
    if table is None:
        weights = target_weights(model, **target_kwargs)
        # the budget is checked against the storage of the cheapest configs before the cost table:
        # storage needs no decomposition, the table decomposes every matrix under every config
        check_budget(budget, storage_table([int(w.numel()) for w in weights.values()],
                                           [parse_config(c) for c in configs]), [int(w.numel()) for w in weights.values()])
        table = build_cost_table(weights, r, configs, max_iters=max_iters, fisher=fisher, fisher_mode=fisher_mode,
                                 svd=svd, seed=seed, return_last=return_last)
    return solve_ilp(table, budget, time_limit=time_limit, mip_rel_gap=mip_rel_gap), table


def quantize_model(
    model: nn.Module,
    r: int = 64,
    budget: float | None = None,
    quant: str = "nf4",
    fisher: dict[str, torch.Tensor] | None = None,
    configs: Any = SMALL_GRID,
    max_iters: int = 100,
    **config_kwargs: Any,
) -> dict[str, AdapterLayer]:
    """Inject LQ-LoRA into ``model``: with ``budget`` the ILP picks each matrix's config, otherwise
    every matrix uses ``quant``. Returns the adapter layers."""
    targeting = {k: config_kwargs[k] for k in ("target_modules", "target_types", "exclude_modules", "modules_to_save")
                 if k in config_kwargs}
    matrix_configs: dict[str, str] = {}
    if budget is not None:
        # plan under the injection's own decomposition settings (validated config): the same
        # Fisher (``fisher``, else the file ``fisher_path``), fisher_mode, svd, seed and return_last;
        # the plan used to cost every matrix with the defaults, unweighted when only fisher_path was given
        plan_cfg = make_config("lq_lora", r=r, quant=quant, max_iters=max_iters, **config_kwargs)
        assert isinstance(plan_cfg, LQLoRAConfig)
        if fisher is None and plan_cfg.fisher_path:
            from safetensors.torch import load_file

            fisher = load_file(plan_cfg.fisher_path)  # also handed to the injection below: read once
        solution, _ = plan_lq_lora(model, budget, r, configs, fisher, max_iters, fisher_mode=plan_cfg.fisher_mode,
                                   svd=plan_cfg.svd, seed=plan_cfg.seed, return_last=plan_cfg.return_last,
                                   **targeting)
        matrix_configs = {n: c.name for n, c in solution.choice.items()}
    cfg = make_config("lq_lora", r=r, quant=quant, matrix_configs=matrix_configs, max_iters=max_iters, **config_kwargs)
    return inject_adapter(model, LQLoRA(cfg, fisher=fisher))


def save_fisher(fisher: dict[str, torch.Tensor], path: str) -> None:
    """Write Fisher diagonals (module name -> (out, in)) as safetensors, for ``fisher_path=``."""
    from safetensors.torch import save_file

    save_file({k: v.detach().float().contiguous().cpu() for k, v in fisher.items()}, path)


@torch.no_grad()
def unload_dense(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LQ-LoRA layer by an ``nn.Linear`` with the dense ``Q + s·BA``; returns ``model``.

    The sum is computed in fp32 and stored in ``dtype``; ``dtype=None`` (default) gives back the dtype
    the dense layer had before quantization, so a bf16 model stays runnable on its bf16 inputs. The
    new layer lives on the quantized layer's device.
    """
    from ..core.inject import _METHOD_ATTR

    layers = adapter_layers(model)
    for name, layer in layers.items():  # check all first: no half-unloaded model on error
        if not isinstance(layer, LQLoRALinear):
            raise TypeError(f"{name} is a {type(layer).__name__}, not an LQ-LoRA layer")
    for name, layer in layers.items():
        q = layer.base_layer
        out_dtype = dtype if dtype is not None else layer.dense_dtype
        dense = nn.Linear(layer.in_features, layer.out_features, bias=q.bias is not None,
                          device=q.codes.device, dtype=out_dtype)
        dense.weight.copy_(layer.merged_weight())
        if q.bias is not None:
            dense.bias.copy_(q.bias)
        dense.requires_grad_(False)
        _set_submodule(model, name, dense)
    if hasattr(model, _METHOD_ATTR):
        object.__delattr__(model, _METHOD_ATTR)
    return model


def quantized_storage_bits(model: nn.Module) -> tuple[int, int]:
    """``(bits of packed Q, quantized elements)`` over every LQ-LoRA layer of ``model``."""
    layers = [l for l in adapter_layers(model).values() if isinstance(l, LQLoRALinear)]
    return (sum(l.base_layer.storage_bits() for l in layers),
            sum(l.in_features * l.out_features for l in layers))
