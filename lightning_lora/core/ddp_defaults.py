"""DDP settings for adapter training that ``AdapterCallback`` fills in when the user left them unset.

An adapter step is short on the GPU and long on the host (many small adapter kernels), so DDP's own
per-step work adds to it directly (docs/benchmarks.md, "DDP scaling"). Two of ``DistributedDataParallel``'s
defaults cost such a step without buying anything in the common case:

- ``broadcast_buffers=True`` broadcasts every buffer from rank 0 at the start of **every forward**:
  a second collective per step beside the gradient all-reduce, so a rank whose host runs late holds
  the other at the forward as well as at the backward. Transformer buffers (``position_ids``,
  ``token_type_ids``, rotary ``inv_freq``) never change in training, and DDP already broadcasts
  buffers once when it wraps the model, so the per-forward copy only matters for buffers that
  training changes, BatchNorm's running statistics above all, and for adapters that keep state in
  buffers (SMoRA's router bias, IncreLoRA's scores, LoRA-SB's frozen factors...). It is switched off
  only when the model has neither: no module with running statistics and no adapter layer holding a
  buffer.
- ``gradient_as_bucket_view=False`` keeps every gradient in its own tensor and copies it into DDP's
  communication buckets after backward; ``True`` makes the gradients views into the buckets (no copy,
  no second copy of the gradient memory). It changes nothing a training loop can see unless it
  replaces or detaches ``.grad`` in place, which Lightning's loop does not.

Session 12 measured ``static_graph=True``, ``gradient_as_bucket_view=True`` and
``broadcast_buffers=False`` together: ``scaling_2gpu`` 1.77 and 1.68 against 1.63 and 1.54 with the
defaults (BERT-base, LoRA r = 16, two H200s; ``ddp_scaling_static_graph_bucket_view_no_broadcast_buffers*.json``).
``static_graph`` is left to the user: it is wrong for a model whose set of used parameters changes
between steps (Flexora's layer selection, IncreLoRA's growing ranks, routing that skips experts).

A value the user passed to ``DDPStrategy(...)`` is never changed; ``AdapterCallback(ddp_defaults=False)``
leaves DDP's own defaults.
"""

from __future__ import annotations

from typing import Any

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


def apply_ddp_defaults(strategy: Any, module: nn.Module) -> dict[str, Any]:
    """Fill ``strategy``'s DDP keyword arguments that the user did not set; return what was set.

    ``strategy`` is the trainer's strategy; anything but Lightning's ``DDPStrategy`` (one device,
    FSDP, DeepSpeed) is left alone. Must run before the strategy wraps the model (``AdapterCallback``
    calls it in ``setup``, which Lightning runs before ``strategy.setup``).
    """
    from lightning.pytorch.strategies import DDPStrategy

    if not isinstance(strategy, DDPStrategy):
        return {}
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(kwargs, dict):  # a Lightning without the attribute: nothing to fill
        return {}
    wanted = {"gradient_as_bucket_view": True}
    if not has_changing_buffers(module):
        wanted["broadcast_buffers"] = False
    applied = {k: v for k, v in wanted.items() if k not in kwargs}
    kwargs.update(applied)
    return applied
