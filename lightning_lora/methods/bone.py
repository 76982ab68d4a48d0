"""Bone and Bat (block-affine adaptation; METHODS.md §9; "MiSS" in Hugging Face PEFT).

Shapes: base weight ``W ∈ R^{m×n}`` (out × in), block width r. Both variants train one tensor,
``bone_block`` (saved as PEFT's ``miss_block``), zero at init, ``r·m`` parameters per adapted matrix.

Bone (``variant="bone"``, the default; PEFT ``MissConfig(init_weights=True)``), ``b ∈ R^{r×m}``:

    ΔW = [bᵀ | bᵀ | … | bᵀ]                 (the m×r shard tiled over the n/r column blocks)
    y  = base(x) + (Σ_j x_j) b             (x_j: consecutive r-chunks of dropout(x); no ΔW built)

If n % r ≠ 0 the forward zero-pads x, and merge gives the leftover columns the first (n mod r)
columns of bᵀ (``ΔW[:, c] = bᵀ[:, c mod r]``); both are the same map. Optional dropout on x before
chunk-summing (MiSS ``miss_dropout``, default 0).

Bat (``variant="bat"`` or the ``"bat"`` method; Bone v1 "Weight Guide"; PEFT ``init_weights="bat"``),
``b ∈ R^{(m/r)×r×r}``, shared over the in-blocks j; needs m % r == n % r == 0:

    W'_ij = W_ij + W_ij b_i + b_i = W_ij (I + b_i) + b_i
    y     = base layer run with W' in place of W        (dense; W' built every forward)

Merge: Bone ``W ← W + tile(bᵀ)``; Bat ``W ← W'``. Unmerge: Bone subtracts; Bat
``W_ij ← (W'_ij − b_i)(I + b_i)⁻¹``, solved in fp32 (``torch.linalg.solve``, which applies the
inverse without forming it), and raises if some ``I + b_i`` is singular.

Scaling is not supported (as in PEFT): a ``scaling`` other than 1 warns and is reset to 1. The
MiSS "mini" variant (``b ∈ R^{r×mini_r}``) is not implemented. S1 holds bit-exactly: Bone adds
``x·0``, and Bat calls the base layer's own forward with ``W + 0 = W``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..core.config import AdapterConfig, Method, register, whole_number
from ..core.layer import AdapterLayer, no_autocast

VARIANTS = ("bone", "bat")


@dataclass
class BoneConfig(AdapterConfig):
    """Bone / Bat options.

    Attributes:
        r: block width (paper / PEFT default 64).
        variant: ``"bone"`` (default; current MiSS default, faster) or ``"bat"`` (v1 Weight Guide).
        dropout: dropout on x before the chunk sum (Bone only; MiSS ``miss_dropout``).
        scaling: accepted for API symmetry; anything but 1 warns and is reset to 1 (METHODS §9).
    """

    r: int = 64
    variant: str = "bone"
    dropout: float = 0.0
    scaling: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.r = whole_number(self.r, "Bone block width r")
        if self.r < 1:
            raise ValueError(f"Bone block width r must be >= 1, got {self.r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "bat" and self.dropout:
            raise ValueError("Bat has no dropout (its forward is a dense linear with W'); use dropout=0")
        if self.scaling != 1.0:
            warnings.warn(f"{self.variant}: scaling is not supported; keeping scale 1 (got {self.scaling})", stacklevel=3)
            self.scaling = 1.0


@dataclass
class BatConfig(BoneConfig):
    """Bat: :class:`BoneConfig` with ``variant="bat"``."""

    variant: str = "bat"

    def __post_init__(self) -> None:
        if self.variant != "bat":
            raise ValueError(f"the 'bat' method has variant 'bat'; for {self.variant!r} use method 'bone'")
        super().__post_init__()


class BoneLinear(AdapterLayer):
    """Bone / Bat on an ``nn.Linear`` or transformers ``Conv1D``.

    Parameter ``bone_block``: (r, out_features) for Bone, (out_features // r, r, r) for Bat.
    """

    adapter_param_names = ("bone_block",)
    file_key_map: ClassVar[dict[str, str]] = {"bone_block": "miss_block"}

    def __init__(self, base_layer: nn.Module, config: BoneConfig, name: str = "") -> None:
        super().__init__(base_layer)
        r, m, n = config.r, self.out_features, self.in_features
        self.r, self.variant, self.dropout_p = r, config.variant, config.dropout
        where = f" ({name}: out_features m={m}, in_features n={n})" if name else f" (m={m}, n={n})"
        if self.variant == "bat":
            if m % r or n % r:
                raise ValueError(
                    f"Bat needs the weight to split into r×r blocks: m % r == n % r == 0, got r={r}{where}; "
                    "choose r dividing both, or variant='bone' (which pads n)"
                )
            shape: tuple[int, ...] = (m // r, r, r)
        else:
            if r > n:
                raise ValueError(f"Bone needs r <= in_features, got r={r}{where}")
            shape = (r, m)
        w = base_layer.weight
        self.bone_block = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=w.device))

    # ---- Bone ----------------------------------------------------------------------------
    def _bone_delta(self) -> torch.Tensor:
        cols = torch.arange(self.in_features, device=self.bone_block.device) % self.r
        return self.bone_block.float().t()[:, cols]  # (m, n): ΔW[:, c] = bᵀ[:, c mod r]

    def _bone_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dtype = base_out.dtype
        xd = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        pad = (-self.in_features) % self.r
        if pad:
            xd = F.pad(xd, (0, pad))
        xs = xd.reshape(*xd.shape[:-1], -1, self.r).sum(dim=-2)  # (..., r) = Σ_j x_j
        return base_out + xs.to(dtype) @ self.bone_block.to(dtype)

    # ---- Bat -----------------------------------------------------------------------------
    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        """(m, n) -> (m/r, n/r, r, r), block [i, j] = W_ij."""
        r = self.r
        return w.reshape(self.out_features // r, r, self.in_features // r, r).transpose(1, 2)

    def _unblocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.transpose(1, 2).reshape(self.out_features, self.in_features)

    def _bat_delta(self, w: torch.Tensor) -> torch.Tensor:
        """``W_ij b_i + b_i`` in fp32 for the unmerged weight ``w`` (m, n)."""
        b = self.bone_block.float().unsqueeze(1)  # (m/r, 1, r, r), shared over j
        return self._unblocks(self._blocks(w.float()) @ b + b)

    def _bat_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        w = self.base_weight
        with no_autocast(w.device):
            w_new = (w.float() + self._bat_delta(w)).to(w.dtype)
        stored = w_new.t() if self.fan_in_fan_out else w_new
        # (is_compiling first: torch.compile cannot trace through torch._C._is_tracing, a graph break)
        if not torch.compiler.is_compiling() and torch._C._is_tracing():
            # torch.jit.trace refuses functional_call ("stateless API"); the base's own forward and
            # hooks still run, with W' put in place of W for the call (nothing else runs meanwhile)
            params = self.base_layer._parameters
            weight = params["weight"]
            params["weight"] = stored
            try:
                return self.base_layer(x, *args, **kwargs)
            finally:
                params["weight"] = weight
        # the base layer's own forward with W' (Linear or Conv1D alike): bit-exact W at b = 0
        return functional_call(self.base_layer, {"weight": stored}, (x, *args), kwargs)

    # ---- AdapterLayer API ----------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``W' − W`` in fp32, shape (out, in). For Bat it depends on W, so it is defined for the
        unmerged layer only."""
        if self.variant == "bone":
            return self._bone_delta()
        if self.merged:
            raise RuntimeError("Bat's delta depends on the unmerged weight; unmerge() first")
        with no_autocast(self.base_weight.device):
            return self._bat_delta(self.base_weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x, *args, **kwargs)
        if self.variant == "bat":
            return self._bat_forward(x, *args, **kwargs)
        return self._bone_forward(x, self.base_layer(x, *args, **kwargs))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.variant == "bone":
            return super().unmerge()
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        w = self.base_weight
        with no_autocast(w.device):
            b = self.bone_block.float().unsqueeze(1)  # (m/r, 1, r, r)
            eye = torch.eye(self.r, device=b.device, dtype=torch.float32)
            # X (I + b_i) = W'_ij − b_i  ->  X = (W'_ij − b_i)(I + b_i)⁻¹
            x, info = torch.linalg.solve_ex(eye + b, self._blocks(w.float()) - b, left=False)
            if bool((info != 0).any()):
                raise RuntimeError("Bat unmerge: some I + b_i is singular; the merged weight cannot be inverted")
            w.copy_(self._unblocks(x).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + f", variant={self.variant}, r={self.r}"


@register("bone")
class Bone(Method):
    """Bone (and Bat via ``variant="bat"``). Saves in PEFT's MiSS format (``peft_type = "MISS"``,
    keys ``<module>.miss_block``) on ``nn.Linear`` layers (on transformers ``Conv1D``, which PEFT's
    MiSS does not adapt, the config is this library's own: see :meth:`to_peft_config`); PEFT MiSS
    directories (``init_weights`` True, False and ``"bat"``; not ``"mini"``) load here."""

    Config = BoneConfig
    supported_types = (nn.Linear,)
    peft_type: ClassVar[str | None] = "MISS"

    def make_layer(self, base: nn.Module, name: str) -> BoneLinear:
        return BoneLinear(base, self.config, name)  # type: ignore[arg-type]

    @staticmethod
    def _peft_blocker(layers: dict[str, AdapterLayer]) -> str | None:
        """Why these layers cannot be a PEFT MiSS adapter, naming the module; None if they can.
        PEFT's MiSS adapts ``torch.nn.Linear`` only and refuses a transformers ``Conv1D`` (GPT-2)
        at load ("Target module Conv1D(...) is not supported")."""
        conv1d = sorted(n for n, layer in layers.items() if layer.fan_in_fan_out)
        if not conv1d:
            return None
        more = f" (as are {len(conv1d) - 1} more adapted modules)" if len(conv1d) > 1 else ""
        return (f"cannot export Bone/Bat as a PEFT MiSS adapter: module {conv1d[0]!r} is a transformers "
                f"Conv1D{more}, and PEFT's MiSS adapts torch.nn.Linear only")

    def peft_config(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        """PEFT ``MissConfig`` fields; ``ValueError`` naming the module if PEFT could not load them
        (a layer on a transformers ``Conv1D``)."""
        blocker = self._peft_blocker(layers)
        if blocker is not None:
            raise ValueError(blocker)
        c: BoneConfig = self.config  # type: ignore[assignment]
        return {
            "peft_type": "MISS",
            "task_type": None,
            "r": c.r,
            "miss_dropout": c.dropout,
            "mini_r": 1,
            "init_weights": "bat" if c.variant == "bat" else True,
            "target_modules": sorted(layers),
            "exclude_modules": None,
            "modules_to_save": list(c.modules_to_save) or None,
            "bias": c.bias,
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def to_peft_config(self, layers: dict[str, AdapterLayer]) -> dict[str, Any] | None:
        """``adapter_config.json`` of :func:`lightning_lora.save_adapter`: PEFT MiSS (:meth:`peft_config`)
        when PEFT can load it; None with Conv1D layers, with a warning (``save_adapter`` then writes
        this library's own config, as for methods PEFT lacks): a MiSS config there would claim a PEFT
        directory that PEFT cannot load. Our loader reads the safetensors metadata either way."""
        blocker = self._peft_blocker(layers)
        if blocker is None:
            return self.peft_config(layers)
        warnings.warn(f"{blocker}; adapter_config.json is written in lightning_lora's own format "
                      "(loads with lightning_lora.load_adapter, not with PEFT)", stacklevel=4)
        return None

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any]) -> BoneConfig:
        init = cfg.get("init_weights", True)
        # False is PEFT's random init of the default (Bone) block, same shape and forward as True;
        # the weights come from the file, so it loads as Bone ("mini" has another shape: refused)
        if init not in (True, False, "bat"):
            raise ValueError(f"PEFT MiSS init_weights={init!r} is not supported (only True / False and 'bat')")
        if cfg.get("layers_to_transform") is not None:
            raise ValueError("PEFT adapters with layers_to_transform are not supported yet")
        exclude = cfg.get("exclude_modules") or []
        if isinstance(exclude, str):
            raise ValueError("PEFT adapters with a regex exclude_modules are not supported yet")
        bias = {"MiSS_only": "lora_only"}.get(cfg.get("bias", "none"), cfg.get("bias", "none"))
        # PEFT's bat forward never applies miss_dropout (a dense linear with W'), so it is dropped
        # here rather than refused by BatConfig
        dropout = 0.0 if init == "bat" else float(cfg.get("miss_dropout", 0.0))
        return BoneConfig(
            r=int(cfg["r"]), variant="bat" if init == "bat" else "bone", dropout=dropout,
            target_modules=cfg.get("target_modules"), exclude_modules=list(exclude),
            modules_to_save=list(cfg.get("modules_to_save") or []), bias=bias,
        )


@register("bat")
class Bat(Bone):
    """Bat (Bone v1, Weight Guide): the ``"bone"`` method with ``variant="bat"``. ``peft_type`` is
    None so PEFT MiSS directories resolve to ``"bone"`` (whose config carries the variant)."""

    Config = BatConfig
    peft_type: ClassVar[str | None] = None
