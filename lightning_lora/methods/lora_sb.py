"""LoRA-XS (Bałazy et al. 2024) and LoRA-SB (Ponkshe et al. 2024): METHODS.md §12.

Both: ``y = W0 x + b + s · B R A dropout(x)`` with ``B ∈ R^{m×r}`` and ``A ∈ R^{r×n}`` FROZEN and only
the r×r core ``R`` trained: r² parameters per adapted m×n matrix (r(m+n) frozen).

- LoRA-XS (§12 "LoRA-XS init" [code]): ``W0 ≈ U_r Σ_r V_rᵀ`` (truncated SVD in fp32, cast back to the
  adapter dtype); ``B = U_r``, ``A = Σ_r V_rᵀ``, ``R ~ N(0, σ²)``, σ = 1e-5, so the output is within
  O(1e-5) of the base at init (``core_init="zeros"`` gives the exact base output [design]).
  ``α = r`` (s = 1) by default; the GLUE script's α = 16 is one option away.
- LoRA-SB (§12 "LoRA-SB init" [code], steps 1-6): the factors come from an estimate of the first
  full fine-tuning step. ``G = Σ_b ∇_W (L_b / |b|)`` over ``n_init_batches`` training batches at W0,
  ``ΔW̃ = −η₁ sign(G)`` (Adam's first step), ``η₁ = η / (warmup_ratio · T)``, then
  ``ΔW̃ ≈ U_r S_r V_rᵀ`` and ``B = U_r``, ``R = diag(S_r)``, ``A = V_rᵀ``. ``s = 1`` always: α is not
  a hyperparameter (a user α is ignored with a warning). W0 is NOT reset, so after the init the
  model is ``W0 + B R A`` (S1 not promised; the documented value is tested). Why α drops out
  [derived]: with orthonormal B, A, ``∂L/∂R = s Bᵀ G Aᵀ`` and one SGD step on R moves W by
  ``−η s² P_B G P_A`` (projected full fine-tuning).

  The init runs in :meth:`LoRASB.on_fit_start` (driven by :class:`~lightning_lora.AdapterCallback`;
  its batches come from ``trainer.train_dataloader`` or from :meth:`LoRASB.set_init_data`) or, in
  plain PyTorch, in :func:`init_lora_sb`. Until then a layer holds a placeholder: ``B = I[:, :r]``,
  ``A = I[:r, :]``, ``R = 0`` (output == base). A saved ``lora_sb_initialized`` flag stops a second
  ``fit`` (or a loaded adapter) from being re-initialised.

Frozen factors are persistent buffers: SAVED with the adapter, never recomputed on load (an SVD is
not bit-stable across hardware; METHODS S4). The layer, :class:`CoreLoRALinear`, is shared with
SLoRA / NLoRA / IntTune (§14, ``nlora.py``), where any of A, N(=R), B may train.

SVD backend (§12 open choice): ``svd="lowrank"`` (``torch.svd_lowrank``, niter 10, seeded; the
LoRA-SB code; default) or ``"exact"`` (``torch.linalg.svd``; tests and small matrices). LoRA-XS's
own code uses sklearn's randomized TruncatedSVD (random_state 42); the seed default 42 follows it.
η₁'s T (§12 open choice): ``"batches"`` (dataloader batches, the code; default) or ``"steps"``
(optimizer steps; differs under gradient accumulation).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig, Method, register
from ..core.inject import adapter_layers, get_adapter_method
from ..core.layer import AdapterLayer, no_autocast


# ---- the shared layer ------------------------------------------------------------------------
class CoreLoRALinear(AdapterLayer):
    """``y = base(x) + s · B R A dropout(x)``; each of A (r, in), R (r, r), B (out, r) is either a
    trainable parameter or a frozen persistent buffer (names ``lora_A``, ``lora_core``, ``lora_B``).

    ``lora_core`` is R in §12 and N in §14. Subclasses (or callers) fill the factors; the
    constructor allocates them (zeros) with the requested trainable set.
    """

    factor_names = ("lora_A", "lora_core", "lora_B")

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        scaling: float,
        trainable: tuple[str, ...] = ("lora_core",),
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(base_layer)
        if r > min(self.in_features, self.out_features):
            raise ValueError(f"rank r={r} exceeds min(out, in) = {min(self.in_features, self.out_features)}")
        self.r = r
        self.scaling = scaling
        self.dropout_p = dropout
        device = base_layer.weight.device
        shapes = {"lora_A": (r, self.in_features), "lora_core": (r, r), "lora_B": (self.out_features, r)}
        self.adapter_param_names = tuple(n for n in self.factor_names if n in trainable)
        self.adapter_buffer_names = tuple(n for n in self.factor_names if n not in trainable)
        for name in self.factor_names:
            t = torch.zeros(shapes[name], dtype=dtype, device=device)
            if name in trainable:
                setattr(self, name, nn.Parameter(t))
            else:
                self.register_buffer(name, t, persistent=True)

    @torch.no_grad()
    def set_factors(self, A: torch.Tensor, R: torch.Tensor, B: torch.Tensor) -> None:
        """Copy new factors in place (dtype of the adapter; works for parameters and buffers)."""
        for name, t in (("lora_A", A), ("lora_core", R), ("lora_B", B)):
            dst = getattr(self, name)
            if dst.is_meta:
                continue
            dst.copy_(t.to(device=dst.device, dtype=dst.dtype))

    def _core_delta_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, R, B)`` used by forward and delta_weight (hook for §14's residual mode)."""
        return self.lora_A, self.lora_core, self.lora_B

    def delta_weight(self) -> torch.Tensor:
        """``s · B R A`` in fp32, shape (out, in)."""
        A, R, B = self._core_delta_inputs()
        with no_autocast(A.device):
            return self.scaling * (B.float() @ (R.float() @ A.float()))

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        dtype = base_out.dtype
        A, R, B = (t.to(dtype) for t in self._core_delta_inputs())
        xd = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        h = ((xd.to(dtype) @ A.t()) @ R.t()) @ B.t()
        return base_out + (h * self.scaling if self.scaling != 1.0 else h)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, scaling={self.scaling:g}, trainable={list(self.adapter_param_names)}"


# ---- SVD helpers -----------------------------------------------------------------------------
def truncated_svd(w: torch.Tensor, r: int, method: str = "exact", niter: int = 10, seed: int = 42):
    """``(U_r (m, r), S_r (r,), V_r (n, r))`` of ``w`` (m, n), computed in fp32.

    ``"exact"``: ``torch.linalg.svd``; ``"lowrank"``: ``torch.svd_lowrank(q=r, niter)`` with the
    global RNG forked and seeded by ``seed`` (identical on every rank / rerun on one machine).
    """
    w = w.detach().float()
    if method == "exact":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r].t()
    if method != "lowrank":
        raise ValueError(f"svd must be 'exact' or 'lowrank', got {method!r}")
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
    return U[:, :r], S[:r], V[:, :r]


# ---- LoRA-XS ---------------------------------------------------------------------------------
@dataclass
class LoRAXSConfig(AdapterConfig):
    """LoRA-XS options.

    Attributes:
        r: rank (R is r×r).
        alpha: ``s = alpha / r``; None (default) = r, s = 1 (LLM scripts); the GLUE script uses 16.
        dropout: dropout on the adapter input.
        core_init: ``"gaussian"`` (R ~ N(0, core_std²), code default) or ``"zeros"`` (exact base
            output at init, gradients still flow since A, B ≠ 0) [design].
        core_std: σ of the Gaussian core init (1e-5).
        svd: ``"lowrank"`` (default) or ``"exact"``; svd_niter / svd_seed for ``"lowrank"``.
        adapter_dtype: dtype of R and of the stored factors.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    core_init: str = "gaussian"
    core_std: float = 1e-5
    svd: str = "lowrank"
    svd_niter: int = 10
    svd_seed: int = 42
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise ValueError(f"rank r must be >= 1, got {self.r}")
        if self.alpha is None:
            self.alpha = float(self.r)
        if self.core_init not in ("gaussian", "zeros"):
            raise ValueError(f"core_init must be 'gaussian' or 'zeros', got {self.core_init!r}")
        if self.svd not in ("lowrank", "exact"):
            raise ValueError(f"svd must be 'lowrank' or 'exact', got {self.svd!r}")


@torch.no_grad()
def init_lora_xs(w0: torch.Tensor, r: int, svd: str = "exact", niter: int = 10, seed: int = 42):
    """LoRA-XS frozen factors of ``w0`` (out, in): ``(A = Σ_r V_rᵀ (r, in), B = U_r (out, r))``, fp32.

    ``B A`` is the best rank-r approximation of W0 (Eckart–Young; exact with ``svd="exact"``).
    """
    U, S, V = truncated_svd(w0, r, svd, niter, seed)
    return S.unsqueeze(1) * V.t(), U


@register("lora_xs")
class LoRAXS(Method):
    """LoRA-XS: frozen SVD factors of W0, trainable r×r core."""

    Config = LoRAXSConfig
    supported_types = (nn.Linear,)

    def make_layer(self, base: nn.Module, name: str) -> CoreLoRALinear:
        c: LoRAXSConfig = self.config  # type: ignore[assignment]
        layer = CoreLoRALinear(base, c.r, c.alpha / c.r, ("lora_core",), c.dropout, getattr(torch, c.adapter_dtype))
        if layer.base_weight.is_meta:
            return layer
        A, B = init_lora_xs(layer.base_weight, c.r, c.svd, c.svd_niter, c.svd_seed)
        R = torch.zeros(c.r, c.r)
        if c.core_init == "gaussian":
            R.normal_(0.0, c.core_std)
        layer.set_factors(A, R, B)
        return layer


# ---- LoRA-SB ---------------------------------------------------------------------------------
@dataclass
class LoRASBConfig(AdapterConfig):
    """LoRA-SB options.

    Attributes:
        r: rank (R is r×r).
        alpha: ignored (s = 1 always; a value other than None / r warns).
        dropout: dropout on the adapter input (commonsense recipe: 0.05).
        n_init_batches: training batches of the gradient estimate (code: 50 samples / batch 3 on
            MetaMathQA, 170 / 10 on Commonsense170K, 2 on GLUE).
        init_lr: η of ``η₁ = η / (warmup_ratio · T)``; None = the optimizer's (initial) lr at fit start.
        warmup_ratio: linear warmup fraction (0.02 in the LLM recipes); 0 means ``η₁ = η``.
        total_steps: T; None = from the trainer (see ``t_unit``).
        t_unit: ``"batches"`` (T in dataloader batches, the code) or ``"steps"`` (optimizer steps).
        svd, svd_niter, svd_seed: SVD of ΔW̃ (``torch.svd_lowrank(q=r, niter=10)`` in the code).
        adapter_dtype: dtype of R and of the stored factors.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    n_init_batches: int = 8
    init_lr: float | None = None
    warmup_ratio: float = 0.02
    total_steps: int | None = None
    t_unit: str = "batches"
    svd: str = "lowrank"
    svd_niter: int = 10
    svd_seed: int = 42
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise ValueError(f"rank r must be >= 1, got {self.r}")
        if self.alpha is not None and float(self.alpha) != float(self.r):
            warnings.warn(f"LoRA-SB fixes the scale s = 1 (alpha = r); alpha={self.alpha} is ignored", stacklevel=3)
        if self.n_init_batches < 1:
            raise ValueError(f"n_init_batches must be >= 1, got {self.n_init_batches}")
        if self.t_unit not in ("batches", "steps"):
            raise ValueError(f"t_unit must be 'batches' or 'steps', got {self.t_unit!r}")
        if self.svd not in ("lowrank", "exact"):
            raise ValueError(f"svd must be 'lowrank' or 'exact', got {self.svd!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


class LoRASBLinear(CoreLoRALinear):
    """LoRA-SB layer: s = 1, frozen B, A; trainable R; ``lora_sb_initialized`` saved flag."""

    def __init__(self, base_layer: nn.Module, config: LoRASBConfig) -> None:
        super().__init__(base_layer, config.r, 1.0, ("lora_core",), config.dropout, getattr(torch, config.adapter_dtype))
        self.register_buffer("lora_sb_initialized", torch.zeros((), dtype=torch.bool, device=self.lora_A.device))
        self.adapter_buffer_names = (*self.adapter_buffer_names, "lora_sb_initialized")
        if not self.lora_A.is_meta:  # placeholder until the gradient init: orthonormal, R = 0
            eye_a = torch.eye(config.r, self.in_features)
            eye_b = torch.eye(self.out_features, config.r)
            self.set_factors(eye_a, torch.zeros(config.r, config.r), eye_b)


def _batch_size(batch: Any) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    return 1


@contextlib.contextmanager
def _full_weight_grads(model: nn.Module, layers: dict[str, AdapterLayer]):
    """Inside: adapters disabled (the model is W0), every parameter frozen except the base weights
    of ``layers``, whose gradients a post-accumulate hook adds into fp32 ``(out, in)`` accumulators
    and then frees. Yields the accumulator dict; restores flags, modes and adapters on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    states = {name: (layer.disabled, layer.training) for name, layer in layers.items()}
    was_training = model.training
    acc: dict[str, torch.Tensor] = {}
    handles = []
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        w = layer.base_layer.weight
        acc[name] = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32, device=w.device)

        def hook(p: torch.Tensor, name: str = name, t: bool = layer.fan_in_fan_out) -> None:
            g = p.grad.float()
            acc[name].add_(g.t() if t else g)
            p.grad = None

        w.requires_grad_(True)
        handles.append(w.register_post_accumulate_grad_hook(hook))
        layer.disabled = True
    model.train()  # the official estimate runs in train mode
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            if not f:
                p.grad = None
        for name, layer in layers.items():
            layer.disabled = states[name][0]
        model.train(was_training)
        for name, layer in layers.items():
            layer.train(states[name][1])


def estimate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    n_batches: int,
    layers: dict[str, AdapterLayer] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``G = Σ_b ∇_W (L_b / |b|)`` at W0 for every adapted layer (§12 step 1), fp32 (out, in).

    ``loss_fn(model, batch)`` returns the batch loss; ``reduce`` (e.g. a DDP all-reduce sum) is
    applied to each G so every rank gets the same factors.
    """
    layers = adapter_layers(model) if layers is None else layers
    seen = 0
    with _full_weight_grads(model, layers) as acc:
        for batch in batches:
            if seen >= n_batches:
                break
            loss = loss_fn(model, batch)
            (loss / _batch_size(batch)).backward()
            seen += 1
    if seen == 0:
        raise ValueError("LoRA-SB init: no batch to estimate the gradient from")
    if reduce is not None:
        acc = {k: reduce(v) for k, v in acc.items()}
    return acc


@torch.no_grad()
def lora_sb_factors(grad: torch.Tensor, r: int, lr1: float, svd: str = "lowrank", niter: int = 10, seed: int = 42):
    """§12 steps 2-4: ``ΔW̃ = −η₁ sign(G)`` ≈ ``U_r S_r V_rᵀ``; returns ``(A = V_rᵀ, R = diag(S_r), B = U_r)``."""
    dw = -lr1 * torch.sign(grad.float())
    U, S, V = truncated_svd(dw, r, svd, niter, seed)
    return V.t().contiguous(), torch.diag(S), U.contiguous()


def init_lora_sb(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    lr: float = 1e-4,
    warmup_ratio: float | None = None,
    total_steps: int | None = None,
    n_batches: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    config: "LoRASBConfig | None" = None,
) -> dict[str, torch.Tensor]:
    """Plain-PyTorch LoRA-SB initialisation of every LoRA-SB layer of ``model`` (after ``inject_adapter``).

    Args:
        batches: iterable of training batches; the first ``n_batches`` (config ``n_init_batches``)
            are used.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (batch mean, as in training).
        lr: η, the peak learning rate of the run; ``η₁ = η / (warmup_ratio · total_steps)`` when
            both are given and positive (config defaults for warmup_ratio / total_steps), else η.
        reduce: applied to each summed G (DDP: an all-reduce sum) so all ranks agree.
        config: SVD options and defaults; None = the config injected into ``model``.
    Returns:
        the estimated gradients G by layer name (fp32, (out, in)).
    """
    layers = {n: l for n, l in adapter_layers(model).items() if isinstance(l, LoRASBLinear)}
    if not layers:
        raise ValueError("model has no LoRA-SB layer; inject_adapter(model, 'lora_sb', ...) first")
    if config is None:
        method = get_adapter_method(model)
        config = method.config if isinstance(method, LoRASB) else LoRASBConfig()  # type: ignore[assignment]
    cfg: LoRASBConfig = config  # type: ignore[assignment]
    warmup_ratio = cfg.warmup_ratio if warmup_ratio is None else warmup_ratio
    total_steps = cfg.total_steps if total_steps is None else total_steps
    lr1 = lr / (warmup_ratio * total_steps) if warmup_ratio and total_steps else lr
    grads = estimate_gradients(model, batches, loss_fn, n_batches or cfg.n_init_batches, layers, reduce)
    for name, layer in layers.items():
        A, R, B = lora_sb_factors(grads[name], layer.r, lr1, cfg.svd, cfg.svd_niter, cfg.svd_seed)
        layer.set_factors(A, R, B)
        layer.lora_sb_initialized.fill_(True)
    return grads


@register("lora_sb")
class LoRASB(Method):
    """LoRA-SB: gradient-estimate init in ``on_fit_start``; only R trains, s = 1."""

    Config = LoRASBConfig
    supported_types = (nn.Linear,)

    def __init__(self, config: LoRASBConfig) -> None:
        super().__init__(config)
        self.init_batches: Iterable[Any] | None = None
        self.init_loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None

    def make_layer(self, base: nn.Module, name: str) -> LoRASBLinear:
        return LoRASBLinear(base, self.config)  # type: ignore[arg-type]

    def set_init_data(self, batches: Iterable[Any] | None = None, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        """Use ``batches`` (instead of ``trainer.train_dataloader``) and/or ``loss_fn(pl_module, batch)``
        (instead of ``pl_module.training_step``) for the init in :meth:`on_fit_start`."""
        self.init_batches, self.init_loss_fn = batches, loss_fn

    def on_fit_start(self, trainer: Any, pl_module: Any, layers: dict[str, AdapterLayer]) -> None:
        sb = {n: l for n, l in layers.items() if isinstance(l, LoRASBLinear)}
        if not sb or trainer.ckpt_path is not None or all(bool(l.lora_sb_initialized) for l in sb.values()):
            return  # resumed, or already initialised (e.g. a loaded adapter): keep the factors
        c: LoRASBConfig = self.config  # type: ignore[assignment]
        batches = self.init_batches
        if batches is None:
            trainer.fit_loop.setup_data()  # the train loader is otherwise built after on_fit_start
            batches = trainer.train_dataloader
        lr = c.init_lr
        if lr is None:
            group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
            lr = group.get("initial_lr", group.get("lr"))
            if lr is None:
                raise ValueError("LoRA-SB: set init_lr, no optimizer lr to read it from")
        total = c.total_steps
        if total is None:
            total = trainer.estimated_stepping_batches
            if c.t_unit == "batches":
                total = total * trainer.accumulate_grad_batches
        loss_fn = self.init_loss_fn or _training_step_loss
        strategy = trainer.strategy

        def reduce(t: torch.Tensor) -> torch.Tensor:
            return strategy.reduce(t, reduce_op="sum") if trainer.world_size > 1 else t

        def step_batches():
            for i, batch in enumerate(batches):
                yield strategy.batch_to_device(batch) if self.init_batches is None else batch

        with _no_logging(pl_module):
            init_lora_sb(pl_module, step_batches(), loss_fn, lr, c.warmup_ratio, int(total), c.n_init_batches, reduce, c)


def _training_step_loss(pl_module: nn.Module, batch: Any) -> torch.Tensor:
    out = pl_module.training_step(batch, 0)  # type: ignore[operator]
    return out["loss"] if isinstance(out, dict) else out


@contextlib.contextmanager
def _no_logging(pl_module: nn.Module):
    """``self.log`` is not allowed in ``on_fit_start``: silence it while training_step runs there."""
    if not hasattr(pl_module, "log"):
        yield
        return
    object.__setattr__(pl_module, "log", lambda *a, **k: None)
    object.__setattr__(pl_module, "log_dict", lambda *a, **k: None)
    try:
        yield
    finally:
        object.__delattr__(pl_module, "log")
        object.__delattr__(pl_module, "log_dict")
