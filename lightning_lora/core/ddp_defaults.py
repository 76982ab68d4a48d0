"""DDP settings for adapter training that ``AdapterCallback`` fills in when the user left them unset.

An adapter step is short on the GPU and long on the host (many small adapter kernels), so DDP's own
per-step work adds to it directly (docs/benchmarks.md, "DDP scaling"). Two of ``DistributedDataParallel``'s
defaults cost such a step without buying anything in the common case:

- the per-forward buffer sync (``broadcast_buffers=True``, ``forward_sync_buffers`` in torch ≥ 2.13)
  broadcasts every buffer from rank 0 at the start of **every forward**: a second collective per step
  beside the gradient all-reduce, so a rank whose host runs late holds the other at the forward as
  well as at the backward. Transformer buffers (``position_ids``, ``token_type_ids``, rotary
  ``inv_freq``) never change in training; the per-forward copy only matters for buffers that training
  changes, BatchNorm's running statistics above all, and for adapters that keep state in buffers
  (SMoRA's router bias, IncreLoRA's scores, LoRA-SB's frozen factors...). It is switched off only when
  the model has neither: no module with running statistics and no adapter layer holding a buffer.
  The buffers are still made equal once, when training starts: torch ≥ 2.13 has
  ``forward_sync_buffers=False``, which keeps DDP's sync at wrap; on older torch
  ``broadcast_buffers=False`` also skips that sync, so ``AdapterCallback`` broadcasts the buffers from
  rank 0 itself in ``on_train_start`` (:func:`sync_buffers_once`).
- ``gradient_as_bucket_view=False`` keeps every gradient in its own tensor and copies it into DDP's
  communication buckets after backward; ``True`` makes the gradients views into the buckets (no copy,
  no second copy of the gradient memory). It changes nothing a training loop can see unless it
  replaces or detaches ``.grad`` in place, which Lightning's loop does not.

Session 12 measured ``static_graph=True``, ``gradient_as_bucket_view=True`` and
``broadcast_buffers=False`` together: ``scaling_2gpu`` 1.77 and 1.68 against 1.63 and 1.54 with the
defaults (BERT-base, LoRA r = 16, two H200s; ``ddp_scaling_static_graph_bucket_view_no_broadcast_buffers*.json``).
``static_graph`` is left to the user: it is wrong for a model whose set of used parameters changes
between steps (Flexora's layer selection, IncreLoRA's growing ranks, routing that skips experts).

A value the user passed to ``DDPStrategy(...)`` is never changed (either buffer argument counts as the
user's choice); values filled by an earlier ``setup`` of the same strategy are decided again (a second
fit may bring a model with BatchNorm). DeepSpeed, a subclass of Lightning's ``DDPStrategy`` that does
not read these arguments, is left alone. ``AdapterCallback(ddp_defaults=False)`` leaves DDP's own
defaults.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layer import AdapterLayer


def has_changing_buffers(module: nn.Module) -> bool:
    """True when training may change a buffer of ``module``: a module with running statistics
    (BatchNorm, InstanceNorm with ``track_running_stats``) or an adapter layer holding any buffer."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            return True
        if isinstance(m, AdapterLayer) and any(True for _ in m.buffers(recurse=False)):
            return True
    return False


_FILLED = "_lightning_lora_ddp_filled"  # the keys this module put into a strategy's kwargs


def buffer_sync_argument() -> str:
    """The name of DDP's per-forward buffer sync argument in this torch."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"


def apply_ddp_defaults(strategy: Any, module: nn.Module) -> dict[str, Any]:
    """Fill ``strategy``'s DDP keyword arguments that the user did not set; return what was set.

    ``strategy`` is the trainer's strategy; anything but Lightning's ``DDPStrategy`` (one device,
    FSDP, DeepSpeed) is left alone. Must run before the strategy wraps the model (``AdapterCallback``
    calls it in ``setup``, which Lightning runs before ``strategy.setup``).
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    if not isinstance(strategy, DDPStrategy) or isinstance(strategy, DeepSpeedStrategy):
        return {}
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(kwargs, dict):  # a Lightning without the attribute: nothing to fill
        return {}
    for key in getattr(strategy, _FILLED, ()):  # our own earlier values: decide again for this model
        kwargs.pop(key, None)
    wanted: dict[str, Any] = {"gradient_as_bucket_view": True}
    user_set_buffers = "broadcast_buffers" in kwargs or "forward_sync_buffers" in kwargs
    if not user_set_buffers and not has_changing_buffers(module):
        wanted[buffer_sync_argument()] = False
    applied = {k: v for k, v in wanted.items() if k not in kwargs}
    kwargs.update(applied)
    setattr(strategy, _FILLED, tuple(applied))
    return applied


def sync_buffers_once(module: nn.Module) -> None:
    """Broadcast every buffer of ``module`` from rank 0 (older torch: ``broadcast_buffers=False`` skips
    DDP's own sync at wrap). No-op without an initialised process group of more than one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


class BufferWatch:
    """Warns once when a buffer changes in training after the per-forward buffer sync was switched off.

    :func:`has_changing_buffers` decides before the model is wrapped and knows only BatchNorm-style
    statistics and adapter layers; a buffer training writes otherwise (an EMA, a counter, a module
    built in ``configure_model``) would drift apart across ranks unnoticed. ``AdapterCallback``
    copies every buffer when training starts and compares after the first batches (values, not
    version counters: BatchNorm's kernels update ``running_mean`` without moving its version).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.start = {name: buf.detach().clone() for name, buf in module.named_buffers()}
        self.warned = False

    def check(self) -> None:
        if self.warned:
            return
        changed = [name for name, buf in self.module.named_buffers()
                   if name not in self.start or not torch.equal(self.start[name], buf)]
        if changed:
            import warnings

            self.warned = True
            warnings.warn(
                f"AdapterCallback switched off DDP's buffer sync at every forward, but training changes the "
                f"buffer(s) {changed[:5]}: they may drift apart across ranks. Pass DDPStrategy("
                f"{buffer_sync_argument()}=True) or AdapterCallback(ddp_defaults=False).", stacklevel=2)

