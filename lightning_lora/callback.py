"""AdapterCallback: the one Lightning entry point.

    trainer = L.Trainer(callbacks=[AdapterCallback("lora", r=16, target_modules=["query", "value"])])

What it does, by Lightning hook:

- ``setup`` (every stage; idempotent): injects the adapter into the LightningModule (or the
  submodule named by ``target``), freezes the base, and makes checkpoints adapter-only. It runs
  after the data module's setup and before checkpoint restore, DDP/FSDP wrapping and
  ``configure_optimizers``, so the optimizer and the DDP reducer only ever see the adapter.
- ``on_fit_start``: warns when the optimizer holds frozen parameters, and when the adapter
  parameters are no longer in the config's ``adapter_dtype`` (``precision="bf16-true"`` /
  ``"16-true"`` casts the whole module after ``setup`` injected it); runs the method's data-driven
  initialisation hook.
- ``on_train_start`` / ``on_train_end``: under multi-GPU DDP, Lightning's per-step SIGTERM broadcast
  is replaced by one that does not wait for the GPU (``async_sigterm_check``; see
  :mod:`lightning_lora.core.ddp_sync`), and restored afterwards.
- batch hooks: forwarded to the method (rank sampling, gradient edits, schedules).
- ``validation_step`` (with ``eval_ranks``, for methods with nested ranks such as DyLoRA): wrapped
  so each validation batch also runs at every requested rank, the metrics logged there repeated
  under ``<name>_rank<b>``.
- ``on_fit_end``: optional merge, optional export to a PEFT-format directory.

Checkpoints: the LightningModule's ``on_save_checkpoint`` is wrapped, because it runs for every
save, ``ModelCheckpoint(save_weights_only=True)`` included (a callback's own hook does not). The
frozen base is dropped from ``checkpoint["state_dict"]``; loading is non-strict for the base and
strict for the adapter: every adapter key must be present. Methods with non-parameter layer state
(``layer_metadata``, e.g. DyLoRA's deployment ranks) also store it as
``checkpoint["lightning_lora"]["layer_metadata"]``.

Resuming (``trainer.fit(..., ckpt_path=...)``) ends where the uninterrupted fit ends, bit for bit, for
every built-in method (``tests/lightning_lora/test_resume_every_method.py`` and the methods' own tests),
given what Lightning itself restores: a checkpoint at an epoch boundary (or a resumable DataLoader) and
no draws from the global RNG (dropout, shuffling), whose state Lightning does not checkpoint.

Loading an adapter checkpoint outside the Trainer: ``MyModule.load_from_checkpoint(path)`` cannot
restore one (a fresh module has no adapter layers, the file has no frozen base weights). Use

    module = load_adapter_checkpoint(MyModule(...), "epoch=3.ckpt", target="net")

It reads the file with ``torch.load(weights_only=True)`` (nothing is unpickled but tensors and
plain containers), rebuilds the method from ``checkpoint["lightning_lora"]`` (method, config, layer
metadata), injects it into ``module`` (or its submodule ``target``, as ``AdapterCallback(target=)``)
unless already injected, and loads ``checkpoint["state_dict"]``: non-strict for the base (the module
keeps its own base weights, which must be the ones the adapter was trained on), strict for the
adapter. Lightning's own checkpoint entries (loops, callback states, optimizer states, plain
hyper-parameters) need no allowlisted globals; ``pathlib`` paths in hyper-parameters are allowed
explicitly (``_CHECKPOINT_SAFE_GLOBALS``); any other class in the file is refused with an error
naming it. Allowlist such a class yourself only if you trust the file:
``with torch.serialization.safe_globals([MyClass]): load_adapter_checkpoint(...)``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pathlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection

from .core.config import AdapterConfig, adapter_torch_dtype, floating_dtype_name, get_method, make_config
from .core.ddp_defaults import BufferWatch, apply_ddp_defaults, buffer_sync_argument, sync_buffers_once
from .core.ddp_sync import install_async_sigterm_check, uninstall_async_sigterm_check
from .core.inject import (
    _name_matches,
    adapter_layers,
    adapter_writes,
    check_untied_for_merge,
    get_adapter_method,
    inject_adapter,
    merge_adapter,
    unmerge_merged,
)
from .core.layer import AdapterLayer
from .core.state import AdapterFormatError, injected_for_loading, save_adapter
from .methods.lora import invalidate_cast_caches

_WRAPPED = "_lightning_lora_ckpt_wrapped"
_VAL_WRAPPED = "_lightning_lora_val_wrapped"


@contextlib.contextmanager
def _log_with_suffixes(pl_module: pl.LightningModule, suffixes: list[str],
                       metric_names: dict[int, str] | None = None) -> Iterator[None]:
    """Inside the block ``pl_module.log(name, ...)`` (and so ``log_dict``) logs ``name + s`` for each
    suffix ``s`` (``""`` keeps the plain name). ``metric_names``: id -> attribute name of metric
    objects that are not submodules of ``pl_module`` (:func:`_own_metrics`' copies), which
    Lightning's ``log`` could not name itself."""
    if suffixes == [""]:
        yield
        return
    log = pl_module.log

    def log_suffixed(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if metric_names and id(value) in metric_names:
            kwargs.setdefault("metric_attribute", metric_names[id(value)])
        for s in suffixes:
            log(name + s, value, *args, **kwargs)

    object.__setattr__(pl_module, "log", log_suffixed)
    try:
        yield
    finally:
        object.__delattr__(pl_module, "log")


@contextlib.contextmanager
def _own_metrics(pl_module: nn.Module, suffix: str,
                 copies: dict[str, dict[str, nn.Module]]) -> Iterator[dict[int, str]]:
    """Inside the block, each outermost torchmetrics ``Metric`` / ``MetricCollection`` of ``pl_module``
    is replaced by this ``suffix``'s own copy (made on first use, reset; kept in ``copies``); yields
    id -> name of every metric in the copies, for ``self.log``. Why: a validation variant's pass
    (another rank) updated the module's metric objects themselves, so every ``<name>_rank<b>`` and
    the plain ``<name>`` computed one mean over all the ranks' passes."""
    if suffix not in copies:  # the module walked once per suffix and epoch, not at every batch
        own: dict[str, nn.Module] = {}
        outer: str | None = None
        for qualname, module in pl_module.named_modules():
            if outer is not None and qualname.startswith(outer + "."):
                continue  # a collection's members go with it
            if qualname and isinstance(module, (Metric, MetricCollection)):
                outer = qualname
                own[qualname] = copy.deepcopy(module)
                own[qualname].reset()
        copies[suffix] = own
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    names: dict[int, str] = {}
    try:
        for qualname, mine in copies[suffix].items():
            parent_name, _, attr = qualname.rpartition(".")
            parent = pl_module.get_submodule(parent_name)
            swapped.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, mine)
            names.update({id(m): f"{qualname}{suffix}" + (f".{n}" if n else "") for n, m in mine.named_modules()
                          if isinstance(m, Metric)})
        yield names
    finally:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)


def adapter_checkpoint_keys(pl_module: nn.Module) -> set[str]:
    """Keys of ``pl_module.state_dict()`` that an adapter checkpoint keeps.

    Kept: adapter tensors of every adapter layer (its ``adapter_state_dict()``, which may include
    base-layer tensors the method produced, e.g. LQ-LoRA's packed Q), every trainable parameter, ``modules_to_save``
    and everything outside the adapted modules' frozen base weights (buffers of metrics etc.).
    Dropped: the frozen ``base_layer`` tensors and frozen parameters of the adapted model.
    """
    keys = set(pl_module.state_dict().keys())
    trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
    frozen_params = {n for n, p in pl_module.named_parameters() if not p.requires_grad}
    save_modules: list[str] = []
    for module in pl_module.modules():
        method = get_adapter_method(module)
        if method is not None:
            save_modules += list(method.config.modules_to_save)
    kept = set()
    for prefix, module in pl_module.named_modules():  # what each layer calls its adapter (LQ-LoRA: also Q)
        if isinstance(module, AdapterLayer):
            kept |= {f"{prefix}.{k}" if prefix else k for k in module.adapter_state_dict()}
    for k in keys:
        module_name = k.rsplit(".", 1)[0]
        if k in trainable or (save_modules and _name_matches(module_name, save_modules)):
            kept.add(k)
        elif ".base_layer." in f".{k}" or k in frozen_params:
            continue
        else:
            kept.add(k)
    return kept


class AdapterCallback(pl.Callback):
    """Adds an adapter to the LightningModule and drives it through training.

    Args:
        method: registered method name (``lightning_lora.available_methods()``).
        config: the method's config object or a dict; keyword arguments override it.
        target: dotted attribute path of the submodule to adapt (``"model"``); default the whole
            LightningModule.
        merge_on_fit_end: merge the adapter into the base weights when ``fit`` ends.
        export_dir: write the adapter (PEFT format for LoRA) there when ``fit`` ends (rank 0).
        eval_ranks: validate at several adapter ranks; only for methods with nested ranks (they
            define ``validation_variants``; DyLoRA: a list of ranks, ``"all"`` or ``"none"``; None
            = the method's own default). Every validation batch runs once as usual, then once per
            other rank; metrics logged in ``validation_step`` are repeated as ``<name>_rank<b>``.
            torchmetrics objects that are attributes of the LightningModule get a copy per rank for
            the other ranks' passes; any other state the module accumulates over the epoch itself
            (a running sum) would be updated by every rank's pass.
        async_sigterm_check: under multi-GPU DDP, replace Lightning's per-step SIGTERM broadcast
            (which waits for the GPU to drain at the start of every batch) by the same check read
            one step later without that wait (:mod:`lightning_lora.core.ddp_sync`). False keeps
            Lightning's own check. No effect on one device, on CPUs or without a process group.
        ddp_defaults: under Lightning's ``DDPStrategy``, fill the DDP arguments the user left unset
            with adapter-friendly values before the model is wrapped: ``gradient_as_bucket_view=True``,
            and no buffer sync at every forward (``forward_sync_buffers=False``; older torch:
            ``broadcast_buffers=False`` and one broadcast of the buffers when training starts) when no
            buffer changes in training (no BatchNorm-style running statistics, no adapter layer
            holding buffers). Values passed to ``DDPStrategy(...)`` are kept. What this fit's setup
            filled is in ``self.ddp_defaults_applied`` (:mod:`lightning_lora.core.ddp_defaults`).
        **kwargs: config fields, e.g. ``r=16, alpha=32, target_modules=["query", "value"]``.
    """

    def __init__(
        self,
        method: str = "lora",
        config: AdapterConfig | dict[str, Any] | None = None,
        *,
        target: str | None = None,
        merge_on_fit_end: bool = False,
        export_dir: str | Path | None = None,
        eval_ranks: list[int] | str | None = None,
        async_sigterm_check: bool = True,
        ddp_defaults: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.method_name = method
        self.config = make_config(method, config, **kwargs)  # validates early: unknown names fail here
        self.target = target
        self.merge_on_fit_end = merge_on_fit_end
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.method = get_method(method)(self.config)
        self.layers: dict[str, AdapterLayer] = {}
        self.eval_ranks = eval_ranks
        self.async_sigterm_check = async_sigterm_check
        self.ddp_defaults = ddp_defaults
        self.ddp_defaults_applied: dict[str, Any] = {}
        self._buffer_watch: BufferWatch | None = None
        # suffix -> metric name -> that validation variant's copy (_own_metrics); new for each validation epoch
        self._variant_metrics: dict[str, dict[str, nn.Module]] = {}
        if merge_on_fit_end and not self.method.mergeable:
            raise ValueError(f"merge_on_fit_end: method {method!r} cannot merge its update into the base weights")
        if eval_ranks is not None and not callable(getattr(self.method, "validation_variants", None)):
            raise ValueError(f"eval_ranks: method {method!r} has no ranks to validate at")
        resolve = getattr(self.config, "resolve_eval_ranks", None)
        if eval_ranks is not None and callable(resolve):  # a bad value fails here, not after an epoch
            resolve(eval_ranks)

    # ---- injection --------------------------------------------------------------------------
    def target_module(self, pl_module: nn.Module) -> nn.Module:
        """The module the adapter goes into: ``pl_module`` or its submodule ``target`` (see
        :func:`adapted_module`)."""
        return adapted_module(pl_module, self.target, "AdapterCallback")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        module = self.target_module(pl_module)
        existing = get_adapter_method(module)
        if existing is None:
            self.layers = inject_adapter(module, self.method)
            self._warn_if_spawned(trainer)
        else:
            if existing.config.method != self.method_name:
                raise RuntimeError(
                    f"module already carries a {existing.config.method!r} adapter, callback asks for {self.method_name!r}"
                )
            if existing is not self.method:  # injected elsewhere (by hand before fit, or another callback)
                # adopting it silently trained another adapter than the one asked for (r=2 on one
                # module for r=4 on two); compared as to_dict, which names target_types by class name,
                # with name lists as sets (PEFT writes target_modules from a set: any order)
                ours, theirs = _comparable(self.config.to_dict()), _comparable(existing.config.to_dict())
                diff = [f"{k}={theirs.get(k)!r} (callback: {ours.get(k)!r})"
                        for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
                if diff:
                    raise RuntimeError(f"module already carries a {self.method_name!r} adapter with another config: "
                                       f"{', '.join(diff)}; unload() it or give the callback the same config")
            self.method = existing
            self.layers = adapter_layers(module)
        self._wrap_checkpoint_hooks(pl_module)
        self._wrap_validation_step(pl_module)
        if self.ddp_defaults and stage == "fit":  # setup runs before the strategy wraps the model in DDP
            # (DDP wraps only to fit); what this fit's setup filled, decided for this model
            self.ddp_defaults_applied = apply_ddp_defaults(getattr(trainer, "strategy", None), pl_module)

    def _wrap_validation_step(self, pl_module: pl.LightningModule) -> None:
        """Run each validation batch at every rank the method names (``validation_variants``)."""
        if getattr(pl_module, _VAL_WRAPPED, False) or not callable(getattr(self.method, "validation_variants", None)):
            return
        if type(pl_module).validation_step is pl.LightningModule.validation_step:
            return  # no validation_step: wrapping would make Lightning think there is one
        user_step = pl_module.validation_step

        def validation_step(*args: Any, **kwargs: Any) -> Any:
            variants = self.method.validation_variants(self.eval_ranks, self.layers)  # type: ignore[attr-defined]
            # a variant without context is the current state: log the plain pass under its name too
            with _log_with_suffixes(pl_module, ["", *(s for s, ctx in variants if ctx is None)]):
                out = user_step(*args, **kwargs)
            for suffix, ctx in variants:
                if ctx is not None:  # its own metric objects: the module's count the plain pass only
                    with ctx(), _own_metrics(pl_module, suffix, self._variant_metrics) as names, \
                            _log_with_suffixes(pl_module, [suffix], names):
                        user_step(*args, **kwargs)
            return out

        pl_module.validation_step = validation_step  # type: ignore[method-assign]
        object.__setattr__(pl_module, _VAL_WRAPPED, True)

    @staticmethod
    def _warn_if_spawned(trainer: pl.Trainer) -> None:
        # ddp_spawn / ddp_fork / ddp_notebook run setup (so the injection) only in the workers; at the
        # end Lightning loads rank 0's state_dict into the launching process's module with
        # strict=False, which silently drops every adapter key there: the trained adapter is lost.
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

        if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher) and trainer.is_global_zero:
            warnings.warn(
                "AdapterCallback under a spawn/fork strategy injects the adapter in the worker processes only: "
                "the module in the launching process will not receive the trained adapter. Call "
                "lightning_lora.inject_adapter(module, ...) with the same config before trainer.fit(), or use "
                "strategy='ddp'.",
                stacklevel=2,
            )

    def _wrap_checkpoint_hooks(self, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, _WRAPPED, False):
            return
        pl_module.strict_loading = False  # the frozen base is not in adapter checkpoints
        user_save = pl_module.on_save_checkpoint
        user_load = pl_module.on_load_checkpoint

        def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
            user_save(checkpoint)
            keep = adapter_checkpoint_keys(pl_module)
            sd = checkpoint.get("state_dict", {})
            checkpoint["state_dict"] = {k: v for k, v in sd.items() if k in keep}
            info: dict[str, Any] = {"method": self.method.config.method, "config": self.method.config.to_dict()}
            extra = getattr(self.method, "layer_metadata", None)
            if callable(extra):  # non-parameter layer state (DyLoRA ranks); names relative to `target`
                info["layer_metadata"] = extra(adapter_layers(self.target_module(pl_module)))
            checkpoint["lightning_lora"] = info

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            user_load(checkpoint)
            # Lightning copies the checkpoint's tensors in after this hook: into merged layers they
            # would leave the old update in the base weights (and an unmerge would then subtract the
            # new one), so the adapter goes back to running unmerged, as it trained
            if unmerge_merged(self.target_module(pl_module)):
                warnings.warn("AdapterCallback: the adapter was merged; it was unmerged before loading the "
                              "checkpoint, and the loaded adapter runs unmerged", stacklevel=2)
            meta = (checkpoint.get("lightning_lora") or {}).get("layer_metadata")
            apply = getattr(self.method, "apply_layer_metadata", None)
            if meta is not None and callable(apply):  # structure changed in training (IncreLoRA ranks,
                # Flexora's selection): rebuilt on the live layers, which the method may remove
                apply(meta, self.layers, root=self.target_module(pl_module))
            expected = adapter_checkpoint_keys(pl_module)
            have = set(checkpoint.get("state_dict", {}))
            missing = sorted(expected - have)
            model_keys = set(pl_module.state_dict().keys())
            unexpected = sorted(have - model_keys)
            if missing or unexpected:
                raise RuntimeError(
                    "checkpoint does not fit this adapter: "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
                )

        pl_module.on_save_checkpoint = on_save_checkpoint  # type: ignore[method-assign]
        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        object.__setattr__(pl_module, _WRAPPED, True)

    # ---- training ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if unmerge_merged(self.target_module(pl_module)):  # e.g. a second fit after merge_on_fit_end
            warnings.warn("AdapterCallback: the adapter was merged; it was unmerged to train", stacklevel=2)
        if self.merge_on_fit_end:  # a tied base weight would refuse the merge only after the whole fit
            module = self.target_module(pl_module)
            check_untied_for_merge(module, adapter_layers(module))
        frozen = 0
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                frozen += sum(1 for p in group["params"] if not p.requires_grad)
        if frozen:
            warnings.warn(
                f"the optimizer holds {frozen} frozen parameter tensors; build it from "
                "lightning_lora.trainable_parameters(self) in configure_optimizers",
                stacklevel=2,
            )
        self._warn_if_adapter_dtype_changed(trainer)
        self.method.on_fit_start(trainer, pl_module, self.layers)

    def _warn_if_adapter_dtype_changed(self, trainer: pl.Trainer) -> None:
        """One warning (rank 0) when adapter parameters are not in the config's ``adapter_dtype``.

        Lightning's precision plugin converts the whole module (``precision="bf16-true"``, ``"16-true"``,
        ``"64-true"``) in ``strategy.setup``, after ``setup`` injected the adapter and before this hook
        (and before ``configure_optimizers``), as does a ``model.to(dtype)`` after injection: the adapter
        then trains in that dtype, fp32 optimizer state included, without a word. Only warned, not cast
        back: under a true-half precision there is no autocast, and not every method's forward is
        written for fp32 parameters on half activations."""
        configured = getattr(self.method.config, "adapter_dtype", None)
        if configured is None or not trainer.is_global_zero:  # a method without a chosen dtype
            return
        wanted = adapter_torch_dtype(configured)
        found = [p.dtype for layer in self.layers.values() for name, p in layer.named_parameters()
                 if not name.startswith("base_layer.") and p.is_floating_point() and p.dtype != wanted]
        if not found:
            return
        names = ", ".join(sorted({floating_dtype_name(d) for d in found}))
        warnings.warn(
            f"AdapterCallback: {len(found)} {self.method.config.method!r} adapter parameter tensors are {names}, "
            f"not the configured adapter_dtype {floating_dtype_name(wanted)} (Trainer precision={trainer.precision!r} "
            "or a model.to(dtype) after injection cast them), and train in that dtype; use a mixed precision "
            "(precision=\"bf16-mixed\" or \"16-mixed\"), which keeps them as configured, or set adapter_dtype "
            "to the dtype you mean to train in",
            stacklevel=3,  # the caller of on_fit_start, as the warnings there
        )

    # a loop starting (also validation inside fit, and training after DDP broadcast rank 0's values
    # into every rank's parameters): casts made before it may predate writes the cache cannot see
    # (.data, torch.distributed); see lightning_lora.invalidate_cast_caches
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        invalidate_cast_caches()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # fresh copies on the module's device and outside any earlier run's inference mode (an
        # inference-tensor state cannot be updated in place by fit's no_grad validation)
        self._variant_metrics = {}

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        invalidate_cast_caches()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        invalidate_cast_caches()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ddp_defaults_applied.get("broadcast_buffers") is False:
            sync_buffers_once(pl_module)  # older torch: broadcast_buffers=False skipped DDP's sync at wrap
        # the per-forward sync is off: warn if training turns out to change a buffer after all
        off = self.ddp_defaults_applied.get(buffer_sync_argument()) is False
        self._buffer_watch = BufferWatch(pl_module) if off else None
        invalidate_cast_caches()
        if self.async_sigterm_check:  # after the strategy set up the process group and DDP
            install_async_sigterm_check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        uninstall_async_sigterm_check(trainer)
        self._buffer_watch = None  # (its copies of the buffers)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        uninstall_async_sigterm_check(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.method.on_train_batch_start(trainer, pl_module, self.layers)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.method.on_after_backward(trainer, pl_module, self.layers)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.method.on_train_batch_end(trainer, pl_module, self.layers)
        if self._buffer_watch is not None and batch_idx < 2:  # the first optimizer steps show it
            self._buffer_watch.check()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.method.on_fit_end(trainer, pl_module, self.layers)
        module = self.target_module(pl_module)
        if self.export_dir is not None and trainer.is_global_zero:
            save_adapter(module, self.export_dir)
        if self.merge_on_fit_end:
            merge_adapter(module)

    def save_adapter(self, pl_module: pl.LightningModule, directory: str | Path) -> Path:
        """Write the adapter of ``pl_module`` (PEFT format for LoRA)."""
        return save_adapter(self.target_module(pl_module), directory)


# ---- loading an adapter checkpoint outside the Trainer ----------------------------------------------
#: Classes a Lightning checkpoint may hold outside tensors and plain containers that
#: ``load_adapter_checkpoint`` allows for ``torch.load(weights_only=True)``: paths in hyper-parameters
#: (``save_hyperparameters()`` with a ``data_dir: Path``). Rebuilding one only builds a path.
_CHECKPOINT_SAFE_GLOBALS: tuple[type, ...] = (
    pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath,
)


def _short(keys: list[str]) -> str:
    return f"{keys[:5]}{'...' if len(keys) > 5 else ''}"


def _read_checkpoint(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with :data:`_CHECKPOINT_SAFE_GLOBALS` allowed for this call
    only (``safe_globals`` restores the caller's allowlist on exit)."""
    try:
        with torch.serialization.safe_globals(list(_CHECKPOINT_SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AdapterFormatError(
            f"{path}: cannot be read with torch.load(weights_only=True): {str(exc).strip()[-400:]}\n"
            "If the file holds other objects (hyper-parameters of custom classes) and you trust it, allowlist "
            "those classes: `with torch.serialization.safe_globals([...]): load_adapter_checkpoint(...)`."
        ) from None
    except Exception as exc:  # not a torch file, truncated zip, ... (torch raises many types here)
        raise AdapterFormatError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def load_adapter_checkpoint(
    module: nn.Module,
    checkpoint_path: str | os.PathLike[str],
    *,
    target: str | None = None,
    strict: bool = True,
) -> nn.Module:
    """Restore a checkpoint written through :class:`AdapterCallback` into ``module``; returns ``module``.

    ``MyModule.load_from_checkpoint`` cannot: a fresh module has no adapter layers and the file has
    no frozen base weights. Here the file is read with ``torch.load(weights_only=True)`` (see the
    module docstring for allowlisted classes), the method is rebuilt from
    ``checkpoint["lightning_lora"]`` (method name, config, and ``layer_metadata`` restored before
    injection, e.g. DyLoRA's deployment ranks) and injected into ``module`` or its submodule
    ``target`` (dotted path, the meaning of ``AdapterCallback(target=)``) unless that already carries
    the same method; then ``checkpoint["state_dict"]`` (keys relative to ``module``) is loaded:
    non-strict for the base (``module`` keeps its own base weights: build it as for training),
    strict for the adapter.

    Args:
        module: the LightningModule (or any ``nn.Module`` the checkpoint's keys are relative to).
        checkpoint_path: a ``.ckpt`` written by ``ModelCheckpoint`` / ``trainer.save_checkpoint``
            while the callback was attached (``save_weights_only`` or not).
        target: submodule to adapt, as in ``AdapterCallback(target=...)``; default ``module``.
        strict: raise when an adapter key of the model (every key an adapter checkpoint keeps,
            :func:`adapter_checkpoint_keys`) is missing from the file, or the file holds a key the
            model lacks. Shapes are always checked.

    Raises:
        FileNotFoundError: no such file.
        AdapterFormatError: (a ``ValueError``) not a checkpoint written by AdapterCallback, an
            unreadable file, a method that does not fit the model, missing/unexpected keys or a
            shape mismatch; the message names the file and the keys. Everything is checked before
            any tensor is copied, and an adapter injected by this call is removed again on failure,
            so a failed load leaves ``module`` as it was.
        AttributeError: ``module`` has no submodule ``target``.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    checkpoint = _read_checkpoint(path)
    info = checkpoint.get("lightning_lora") if isinstance(checkpoint, dict) else None
    if not isinstance(info, dict) or "method" not in info or "config" not in info:
        raise AdapterFormatError(
            f"{path}: not an adapter checkpoint written by AdapterCallback (it has no 'lightning_lora' entry)"
        )
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise AdapterFormatError(f"{path}: adapter checkpoint without a 'state_dict'")
    name = info["method"]
    try:
        cfg = make_config(name, info["config"])
    except (ValueError, TypeError) as exc:
        raise AdapterFormatError(f"{path}: cannot rebuild the {name!r} adapter: {exc}") from exc

    adapted = adapted_module(module, target, "load_adapter_checkpoint")
    with injected_for_loading(adapted, name, cfg, info.get("layer_metadata"), path):
        _load_checkpoint_state(module, state, path, strict)
    return module


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict with its lists of names sorted: the order of target names means nothing."""
    return {k: sorted(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v
            for k, v in config.items()}


def adapted_module(module: nn.Module, target: str | None, caller: str) -> nn.Module:
    """``module`` or its submodule ``target`` (dotted path); for a submodule wrapped by
    ``torch.compile`` (``self.model = torch.compile(self.model)``, as the README recommends under
    DDP), the module it wraps. Adapted through the wrapper, every layer name started with
    ``_orig_mod.``, and so did the keys and ``target_modules`` of an exported PEFT directory, which then
    fitted no uncompiled model. The wrapper runs the wrapped module, so the adapter is used all the
    same. ``caller`` names the API in the error for a missing submodule."""
    if target:
        try:
            module = module.get_submodule(target)
        except AttributeError:
            raise AttributeError(f"{caller}(target={target!r}): the module has no such submodule") from None
    wrapped = getattr(module, "_orig_mod", None)  # what torch.compile's OptimizedModule runs
    return wrapped if isinstance(wrapped, nn.Module) else module


def _without_compile_wrappers(key: str) -> str:
    """``key`` without the ``_orig_mod.`` segments a ``torch.compile``'d submodule puts in state-dict keys."""
    return ".".join(part for part in key.split(".") if part != "_orig_mod")


def _load_checkpoint_state(module: nn.Module, state: dict[str, Any], path: Path, strict: bool) -> None:
    model_state = module.state_dict()
    # a module trained with a compiled submodule (self.net = torch.compile(self.net)) saved keys with
    # "_orig_mod." in them: match them to the keys of a module built with or without the wrapper
    by_plain_key = {_without_compile_wrappers(k): k for k in model_state}
    state = {by_plain_key.get(_without_compile_wrappers(k), k): v for k, v in state.items()}
    required = adapter_checkpoint_keys(module)
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - set(model_state))
    if strict and (missing or unexpected):
        raise AdapterFormatError(
            f"{path}: checkpoint does not fit this adapter: missing {_short(missing)}, unexpected {_short(unexpected)}"
        )
    common = [k for k in state if k in model_state]
    bad = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(model_state[k].shape)}"
        for k in common
        if isinstance(state[k], torch.Tensor) and isinstance(model_state[k], torch.Tensor)
        and state[k].shape != model_state[k].shape
    ]
    if bad:
        raise AdapterFormatError(f"{path}: shape mismatch, checkpoint written for another model? {_short(bad)}")
    # base keys absent from the file stay as they are (non-strict); the check above covered the adapter
    with adapter_writes(module):
        module.load_state_dict({k: state[k] for k in common}, strict=False)
