"""DyLoRA (Valipour et al., EACL 2023, https://arxiv.org/abs/2210.07558): one LoRA of maximum rank
``r_max`` trained so that every prefix rank ``b ≤ r_max`` works (nested dropout on the rank axis).

Equations (docs METHODS.md §4; ``A ∈ R^{r_max×n}`` Kaiming-uniform a = √5, ``B ∈ R^{m×r_max}`` zeros):

- (1) at rank b:  ``y = W0 x + b0 + (α/b) · B[:, :b] A[:b, :] · dropout(x)``            [paper]
- (2) code form:  ``(α/r_max) · (√(r_max/b) B[:, :b]) (√(r_max/b) A[:b, :])`` = (1)  [code]
  (``huawei-noah/Efficient-NLP`` ``DyLoRA/loralib/DyLoRA.py`` @ 278c345). Same product, other
  rounding: ``scaling_impl="paper"`` (default) or ``"code"``.
- (3) merge at rank b: ``W0 + (α/b) · B[:, :b] A[:b]``.
- (4) training step: sample ``b ~ p_B`` on {r_min..r_max} (uniform by default, as the code), once
  per step for ALL layers; then
  ``mode="frozen"`` (paper's "DyLoRA (frozen)", official GLUE script): only row ``A[b-1]`` and column
  ``B[:, b-1]`` receive gradient, rows/columns ``< b-1`` enter the forward detached, ``≥ b`` unused;
  ``mode="full"``: all of ``A[:b]``, ``B[:, :b]`` train.

Two ranks live on each layer (:class:`DyLoRALinear`):

- ``rank``: used outside training (eval forward, merge, export); set by :func:`set_rank`.
- ``train_rank``: used by forwards in train mode; the per-step sampler sets it, :func:`set_rank`
  sets both. So ``model.eval()`` (Lightning's validation) always runs at the deployment rank, never
  at whichever b the last training step drew.

Rank sampling (:meth:`DyLoRA.sample_rank`) is a pure function of ``(seed, step)``: the same b on
every DDP process without communication, reproducible, and unchanged by resuming from a checkpoint
(it uses ``trainer.global_step``, the optimizer-step counter: with gradient accumulation all
micro-batches of one update share b, so one update trains one rank). The design doc suggested a
callback-owned ``torch.Generator``; a stateful generator would need its state checkpointed and
synchronised, a seeded hash of the step needs neither.

Deployment: :func:`set_rank` then ``merge_adapter`` merges at rank b; :func:`export_lora` writes a
plain LoRA directory of rank b (``A[:b]``, ``B[:, :b]``, ``r = b``, ``lora_alpha = α``) that Hugging
Face PEFT loads; PEFT's scaling ``lora_alpha / r = α/b`` is exactly (1).

Saved adapters (``save_adapter``) carry ``r_max`` (the config's ``r``) and every layer's deployment
rank in the safetensors metadata (METHODS S4).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import json
import math
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..core.config import (adapter_torch_dtype, AdapterConfig, finite_number, get_method, make_config, Method, register,
                           whole_number)
from ..core.inject import adapter_layers, get_adapter_method
from ..core.layer import AdapterLayer, no_autocast
from ..core.state import CONFIG_NAME, WEIGHTS_NAME, _atomic_write, _to_file_key, adapter_state_dict
from .lora import _apply_fused, _autocast_dtype, _plain_linear_base, _weight_bias


@dataclass
class DyLoRAConfig(AdapterConfig):
    """DyLoRA options.

    Attributes:
        r: maximum rank ``r_max`` (the shape of the factors).
        alpha: scale numerator; at rank b the update is scaled by ``alpha / b``.
        r_min: smallest rank sampled in training.
        rank_pmf: optional probabilities of ranks ``r_min..r_max`` (length ``r - r_min + 1``,
            normalised here); None = uniform (official code).
        mode: ``"frozen"`` (only the b-th row of A / column of B train in a step; paper's frozen
            variant, official GLUE script; default) or ``"full"`` (all of the first b train).
        scaling_impl: ``"paper"`` (``α/b`` on the product, eq. 1) or ``"code"`` (``α/r_max`` with each
            factor times ``√(r_max/b)``, eq. 2). Equal up to rounding.
        seed: seed of the per-step rank sampler.
        eval_rank: deployment rank the layers start at (forward outside training, merge, export);
            None = ``r``.
        dropout: dropout on the adapter branch input only (train mode only).
        adapter_dtype: dtype of the adapter parameters.
    """

    r: int = 8
    alpha: float = 16.0
    r_min: int = 1
    rank_pmf: list[float] | None = None
    mode: str = "frozen"
    scaling_impl: str = "paper"
    seed: int = 0
    eval_rank: int | None = None
    dropout: float = 0.0
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        # ranks are counts: 2.5 passed the range checks below and failed later inside a slice
        for key in ("r", "r_min", "eval_rank"):
            value = getattr(self, key)
            if value is not None:  # eval_rank None = the full rank
                setattr(self, key, whole_number(value, f"DyLoRA {key}"))
        self.seed = whole_number(self.seed, "DyLoRA seed")
        # a NaN / inf / string alpha was kept and gave NaN outputs (or a TypeError) at the first forward
        self.alpha = finite_number(self.alpha, "DyLoRA alpha")
        if self.r < 1:
            raise ValueError(f"DyLoRA maximum rank r must be >= 1, got {self.r}")
        if not 1 <= self.r_min <= self.r:
            raise ValueError(f"r_min must be in [1, r={self.r}], got {self.r_min}")
        if self.mode not in ("frozen", "full"):
            raise ValueError(f"mode must be 'frozen' or 'full', got {self.mode!r}")
        if self.scaling_impl not in ("paper", "code"):
            raise ValueError(f"scaling_impl must be 'paper' or 'code', got {self.scaling_impl!r}")
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.r:
            raise ValueError(f"eval_rank must be in [1, r={self.r}], got {self.eval_rank}")
        if self.rank_pmf is not None:
            # finite: NaN passed the p < 0 and sum checks, and an inf weight normalised to NaN
            pmf = [float(finite_number(p, "DyLoRA rank_pmf weight")) for p in self.rank_pmf]
            if len(pmf) != self.r - self.r_min + 1 or any(p < 0 for p in pmf) or sum(pmf) <= 0:
                raise ValueError(
                    f"rank_pmf needs {self.r - self.r_min + 1} non-negative weights (ranks {self.r_min}..{self.r}), got {pmf}"
                )
            self.rank_pmf = [p / sum(pmf) for p in pmf]

    def resolve_eval_ranks(self, spec: list[int] | str | None) -> list[int]:
        """``"all"`` -> [1..r]; ``"none"``/None/[] -> []; a list is checked against [1, r]."""
        if spec is None or (isinstance(spec, str) and spec == "none"):  # (== on an array is elementwise)
            return []
        if isinstance(spec, str) and spec == "all":
            return list(range(1, self.r + 1))
        if isinstance(spec, str) or not isinstance(spec, Iterable):
            raise ValueError(f"eval_ranks must be a list of ranks, 'all' or 'none', got {spec!r}")
        try:  # numpy integers too (np.arange(1, 9)); not floats or bools
            ranks = sorted({whole_number(b, "eval_ranks entry") for b in spec})
        except ValueError:
            raise ValueError(f"eval_ranks must be whole numbers in [1, r={self.r}], got {list(spec)}") from None
        if ranks and not (1 <= ranks[0] and ranks[-1] <= self.r):
            raise ValueError(f"eval_ranks must lie in [1, r={self.r}], got {list(spec)}")
        return ranks


def _as_rank(b: Any, r_max: int) -> int:
    """``b`` as a rank in [1, r_max], or a one-line ValueError. ``int(b)`` alone turned 3.5 (say
    ``r_max / 2`` for an odd r_max) into 3 and True into 1 without a word."""
    try:
        whole = not isinstance(b, bool) and bool(int(b) == b)
    except (TypeError, ValueError):
        whole = False
    if not whole or not 1 <= int(b) <= r_max:
        raise ValueError(f"rank must be a whole number in [1, r_max={r_max}], got {b!r}")
    return int(b)


class DyLoRALinear(AdapterLayer):
    """DyLoRA on an ``nn.Linear`` or transformers ``Conv1D``.

    Parameters: ``lora_A`` (r_max, in_features), ``lora_B`` (out_features, r_max). Plain ints:
    ``rank`` (deployment), ``train_rank`` (train-mode forwards), ``r_max``.
    """

    adapter_param_names = ("lora_A", "lora_B")
    file_key_map: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    #: take LoRA's fused path where it applies (:meth:`_fused`); False forces the plain formula
    fused: bool = True

    def __init__(self, base_layer: nn.Module, config: DyLoRAConfig, rank: int | None = None) -> None:
        super().__init__(base_layer)
        self.r_max = config.r
        self.alpha = config.alpha
        self.mode = config.mode
        self.scaling_impl = config.scaling_impl
        self.dropout_p = config.dropout
        self.rank = self.train_rank = rank if rank is not None else (config.eval_rank or config.r)
        self._merged_rank: int | None = None
        dtype = adapter_torch_dtype(config.adapter_dtype)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r_max, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r_max, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    # ---- rank ---------------------------------------------------------------------------------
    def set_rank(self, b: int, train: bool = True) -> None:
        """Deployment rank ``b`` (and, with ``train``, the train-mode rank too)."""
        b = _as_rank(b, self.r_max)
        if self.merged and b != self.rank:
            raise RuntimeError(f"adapter is merged at rank {self.rank}; unmerge() before set_rank({b})")
        self.rank = b
        if train:
            self.train_rank = b

    def scaling(self, b: int) -> float:
        """The scale of the truncated product at rank b: ``α/b`` (eq. 1; eq. 2 gives the same)."""
        return self.alpha / b

    def factors(self, b: int, detach_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A_b (b, in), B_b (out, b), s)`` with ``s · B_b A_b`` the update at rank b.

        ``detach_prefix``: rows/columns ``< b-1`` are detached (frozen mode: gradient reaches only
        row ``b-1`` of A and column ``b-1`` of B).
        """
        A, B = self.lora_A[:b], self.lora_B[:, :b]
        if detach_prefix and b > 1:
            A = torch.cat([A[: b - 1].detach(), A[b - 1 :]], dim=0)
            B = torch.cat([B[:, : b - 1].detach(), B[:, b - 1 :]], dim=1)
        if self.scaling_impl == "code":  # eq. 2: scale α/r_max, each factor times √(r_max/b)
            f = math.sqrt(self.r_max / b)
            return A * f, B * f, self.alpha / self.r_max
        return A, B, self.alpha / b

    # ---- AdapterLayer -------------------------------------------------------------------------
    def delta_weight(self, b: int | None = None) -> torch.Tensor:
        """``s · B_b A_b`` in fp32, shape (out, in), at rank ``b`` (default: the deployment rank)."""
        A, B, s = self.factors(self.rank if b is None else b)
        with no_autocast(A.device):
            return s * (B.float() @ A.float())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x, *args, **kwargs)
        b = self.train_rank if self.training else self.rank
        A, B, s = self.factors(b, detach_prefix=self.training and self.mode == "frozen")
        if (self.fused and not args and not kwargs and not (self.dropout_p > 0 and self.training)
                # functorch transforms and compiling trace the plain formula (as LoRALinear)
                and not torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling()):
            weight, bias = _weight_bias(self)  # type: ignore[arg-type]
            # an unfrozen base weight gets no gradient from the fused function
            if _plain_linear_base(self) and not weight.requires_grad:
                dtype = _autocast_dtype(x)  # under autocast: as LoRALinear.forward
                if dtype is not None:
                    with torch.autocast(x.device.type, enabled=False):
                        return self._fused(x.to(dtype), weight.to(dtype),
                                           None if bias is None else bias.to(dtype), A, B, s)
                return self._fused(x, weight, bias, A, B, s)
        return self.reference_forward(x, A, B, s, *args, **kwargs)

    def reference_forward(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                          *args: Any, **kwargs: Any) -> torch.Tensor:
        """The plain formula ``base(x) + s · (dropout(x) A_b^T) B_b^T``; x (..., in), A_b (b, in),
        B_b (out, b) from :meth:`factors`."""
        base_out = self.base_layer(x, *args, **kwargs)
        dtype = base_out.dtype
        xd = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        lora_out = (xd.to(dtype) @ A.to(dtype).t()) @ B.to(dtype).t()
        return base_out + s * lora_out

    def _fused(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
               B: torch.Tensor, s: float) -> torch.Tensor:
        """LoRA's fused function (:class:`~lightning_lora.methods.lora._FusedLoRA`) at rank b: the base
        matmul accumulates into the adapter's output, the scale rides in a GEMM alpha. A_b, B_b are
        cast here (per call: the rank, and in frozen mode the detached prefix, change every step)."""
        dtype = x.dtype
        with torch.no_grad():  # the casts are not inputs of the function: no autograd node for them
            casts = (A if A.dtype == dtype else A.to(dtype), B if B.dtype == dtype else B.to(dtype))
        return _apply_fused(x, x, weight, bias, A, B, casts, s, None, self.fan_in_fan_out)

    @torch.no_grad()
    def merge(self) -> None:
        super().merge()  # eq. 3 at self.rank
        self._merged_rank = self.rank

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        w = self.base_weight
        with no_autocast(w.device):
            w.copy_((w.float() - self.delta_weight(self._merged_rank)).to(w.dtype))
        self.merged = False
        self._merged_rank = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, rank={self.rank}, alpha={self.alpha:g}, mode={self.mode}"


def _dylora_layers(model_or_layers: nn.Module | dict[str, AdapterLayer]) -> dict[str, DyLoRALinear]:
    layers = model_or_layers if isinstance(model_or_layers, dict) else adapter_layers(model_or_layers)
    out = {n: layer for n, layer in layers.items() if isinstance(layer, DyLoRALinear)}
    if not out:
        raise ValueError("no DyLoRA layers found; inject_adapter(model, 'dylora', ...) first")
    return out


def set_rank(model_or_layers: nn.Module | dict[str, AdapterLayer], b: int, train: bool = True) -> None:
    """Put every DyLoRA layer at rank ``b`` (evaluation, merge, export; with ``train`` also the
    train-mode forward until the sampler sets another rank). Raises, changing nothing, on a rank that
    is not a whole number in [1, r_max] (ValueError) and on a layer merged at another rank
    (RuntimeError)."""
    layers = _dylora_layers(model_or_layers)
    b = _as_rank(b, min(layer.r_max for layer in layers.values()))  # a bad rank is a ValueError, merged or not
    for layer in layers.values():  # check all before changing any
        if layer.merged and layer.rank != b:
            raise RuntimeError(f"adapter is merged at rank {layer.rank}; unmerge before set_rank({b})")
    for layer in layers.values():
        layer.set_rank(b, train=train)


def get_rank(model_or_layers: nn.Module | dict[str, AdapterLayer]) -> int:
    """The deployment rank shared by every DyLoRA layer (raises if they differ)."""
    ranks = {layer.rank for layer in _dylora_layers(model_or_layers).values()}
    if len(ranks) != 1:
        raise ValueError(f"DyLoRA layers are at different ranks: {sorted(ranks)}")
    return ranks.pop()


@contextlib.contextmanager
def rank_context(model_or_layers: nn.Module | dict[str, AdapterLayer], b: int) -> Iterator[None]:
    """Deployment rank ``b`` inside the block; the previous ranks are restored after it."""
    layers = _dylora_layers(model_or_layers)
    before = {n: layer.rank for n, layer in layers.items()}
    set_rank(layers, b, train=False)
    try:
        yield
    finally:
        for n, layer in layers.items():
            layer.set_rank(before[n], train=False)


def export_lora(
    model: nn.Module, directory: str | os.PathLike[str], rank: int | None = None, base_model_name_or_path: str | None = None
) -> Path:
    """Write the adapter at rank ``b`` as a plain LoRA directory that Hugging Face PEFT loads.

    Tensors: ``lora_A = A[:b]`` (b, in), ``lora_B = B[:, :b]`` (out, b); config ``r = b``,
    ``lora_alpha = α``, so PEFT's scale ``lora_alpha / r = α/b`` reproduces eq. 1 (eq. 2 has the
    same product). Other saved tensors (``modules_to_save``, trainable biases) are copied as
    ``save_adapter`` writes them. The directory also loads here as method ``"lora"``.

    Args:
        rank: b; default the layers' deployment rank.
    """
    method = get_adapter_method(model)
    if not isinstance(method, DyLoRA):
        raise ValueError("model carries no DyLoRA adapter")
    layers = _dylora_layers(model)
    cfg: DyLoRAConfig = method.config  # type: ignore[assignment]
    b = get_rank(layers) if rank is None else _as_rank(rank, cfg.r)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in adapter_state_dict(model).items():
        module_name, _, local = key.rpartition(".")
        if module_name in layers and local == "lora_A":
            t = t[:b]
        elif module_name in layers and local == "lora_B":
            t = t[:, :b]
        tensors[_to_file_key(model, key)] = t.detach().contiguous().cpu().clone()
    lora_cfg = make_config(
        "lora", r=b, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=sorted(layers),
        modules_to_save=list(cfg.modules_to_save), bias=cfg.bias,
    )
    peft_json = get_method("lora")(lora_cfg).to_peft_config(layers)  # type: ignore[attr-defined]
    peft_json["base_model_name_or_path"] = base_model_name_or_path
    metadata = {
        "format": "pt",
        "lightning_lora_method": "lora",
        "lightning_lora_config": json.dumps(lora_cfg.to_dict()),
        "lightning_lora_layers": json.dumps(sorted(layers)),
        "dylora_r_max": str(cfg.r),
        "dylora_rank": str(b),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=metadata))
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(peft_json, indent=2, sort_keys=True)))
    return directory



@register("dylora")
class DyLoRA(Method):
    """DyLoRA: nested-rank LoRA; samples one rank per training step for all layers."""

    Config = DyLoRAConfig
    supported_types = (nn.Linear,)

    def __init__(self, config: DyLoRAConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        self._restored_ranks: dict[str, int] = {}
        self._warned_merged_validation = False
        #: rank drawn for the latest training step (None before the first)
        self.last_rank: int | None = None

    def make_layer(self, base: nn.Module, name: str) -> DyLoRALinear:
        return DyLoRALinear(base, self.config, rank=self._restored_ranks.get(name))  # type: ignore[arg-type]

    # ---- sampling (eq. 4) ---------------------------------------------------------------------
    def sample_rank(self, step: int) -> int:
        """The rank b of training step ``step``: a pure function of ``(config.seed, step)``.

        ``random.Random`` seeded with a string hashes it with SHA-512: the same value in every
        process and Python run (independent of ``PYTHONHASHSEED``), so DDP processes agree without
        communicating.
        """
        c: DyLoRAConfig = self.config  # type: ignore[assignment]
        rng = random.Random(f"dylora:{c.seed}:{int(step)}")
        ranks = range(c.r_min, c.r + 1)
        if c.rank_pmf is None:
            return rng.randint(c.r_min, c.r)
        return rng.choices(ranks, weights=c.rank_pmf)[0]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        b = self.sample_rank(trainer.global_step)
        for layer in _dylora_layers(layers).values():
            layer.train_rank = b
        self.last_rank = b

    # ---- validation at several ranks (AdapterCallback(eval_ranks=...)) -----------------------
    #: ranks validated when ``AdapterCallback(eval_ranks=None)``: every b, as the official code does
    #: (r_max validation passes; pass a list such as [1, 2, 4, 8] for a large r_max)
    default_eval_ranks: ClassVar[str] = "all"

    def validation_variants(self, spec: list[int] | str | None, layers: dict[str, AdapterLayer]) -> list[tuple[str, Any]]:
        """``[(log-name suffix, context factory or None)]``: one entry per rank to validate at.

        ``spec``: ``AdapterCallback(eval_ranks=...)``: a list of ranks, ``"all"`` or ``"none"``;
        None = :attr:`default_eval_ranks`. A None factory means "the current state": the callback
        logs the plain pass under that suffix too instead of running it again.
        """
        c: DyLoRAConfig = self.config  # type: ignore[assignment]
        ranks = c.resolve_eval_ranks(self.default_eval_ranks if spec is None else spec)
        dy = _dylora_layers(layers)
        deployed = {layer.rank for layer in dy.values()}
        current = deployed.pop() if len(deployed) == 1 else None  # layers at different ranks: none is "current"
        if any(layer.merged for layer in dy.values()):
            # merged (merge_on_fit_end, say): the rank is fixed in the weights until unmerged
            if not self._warned_merged_validation:
                warnings.warn(f"DyLoRA: the adapter is merged at rank {current}; validating at that rank only "
                              "(unmerge it to validate at the others)", stacklevel=2)
                self._warned_merged_validation = True
            return [(f"_rank{current}", None)] if current in ranks else []
        return [(f"_rank{b}", None if b == current else functools.partial(rank_context, layers, b)) for b in ranks]

    # ---- save / load (S4) -------------------------------------------------------------------
    def layer_metadata(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        """Non-parameter state for ``save_adapter``: ``r_max`` and each layer's deployment rank."""
        return {"r_max": self.config.r, "ranks": {n: layer.rank for n, layer in _dylora_layers(layers).items()}}  # type: ignore[attr-defined]

    def restore_layer_metadata(self, meta: dict[str, Any]) -> None:
        """Inverse of :meth:`layer_metadata`, called by ``load_adapter`` before injection."""
        if int(meta.get("r_max", self.config.r)) != self.config.r:  # type: ignore[attr-defined]
            raise ValueError(f"saved r_max {meta['r_max']} != config r {self.config.r}")  # type: ignore[attr-defined]
        ranks = {n: int(b) for n, b in meta.get("ranks", {}).items()}
        # checked here: make_layer passes them to DyLoRALinear unchecked, where rank 0 divides by zero
        # and a rank > r_max silently truncates to r_max rows while scaling by α/rank
        bad = {n: b for n, b in ranks.items() if not 1 <= b <= self.config.r}  # type: ignore[attr-defined]
        if bad:
            raise ValueError(f"saved DyLoRA ranks must be in [1, r_max={self.config.r}], got {bad}")  # type: ignore[attr-defined]
        self._restored_ranks = ranks

    def apply_layer_metadata(self, meta: dict[str, Any], layers: dict[str, AdapterLayer], root: Any = None) -> None:
        """The same for layers that already exist: ``AdapterCallback`` calls it when a checkpoint
        loads into an injected module (``trainer.fit(ckpt_path=...)``), so the deployment ranks the
        checkpoint was saved at come back."""
        self.restore_layer_metadata(meta)
        ranks, self._restored_ranks = self._restored_ranks, {}
        for name, layer in _dylora_layers(layers).items():
            if name in ranks:
                layer.set_rank(ranks[name], train=False)

    # convenience forms of the module functions
    set_rank = staticmethod(set_rank)
    get_rank = staticmethod(get_rank)
    rank_context = staticmethod(rank_context)
    export_lora = staticmethod(export_lora)
