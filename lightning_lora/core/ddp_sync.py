"""Lightning's per-step SIGTERM broadcast under DDP, without its host-GPU synchronisation.

Lightning 2.5+ runs ``_TrainingEpochLoop._broadcast_sigterm_tensor`` at the start of every training
batch when ``world_size > 1`` (Lightning PR #20825: a SIGTERM seen by rank 0 must stop every rank in
the same step, or the others deadlock in the next collective). It builds a one-element tensor from a
Python list on the device, broadcasts it from rank 0 and reads it back with ``.item()``. Both the
pageable host-to-device copy and ``.item()`` wait for the GPU to drain: the host cannot start
launching step k + 1 while the GPU still runs step k's backward and optimizer step. A one-GPU run
does not broadcast, so the one-GPU step keeps that overlap and the two-GPU step loses it. The cost
is largest where the host launch time and the GPU time are of the same order, as in a LoRA step
(many small adapter kernels; Lightning issue #21487 measures the same sync on fast loops).

:class:`AsyncSigtermCheck` keeps the same decision, one step later, without the drain:

- a persistent device flag is filled (a kernel with a scalar argument, no copy from the host),
  broadcast from rank 0 (NCCL enqueues the collective; the host does not wait) and copied into a
  pinned host buffer with ``non_blocking=True``, followed by a CUDA event;
- at the next batch, every rank waits on the *previous* batch's event (the GPU passed it a whole
  step ago unless it lags the host by more than a step) and reads that flag. All ranks read the
  flag of the same step, so they stop together, as Lightning's check does, one step later.

It applies only to CUDA devices with an initialised process group of more than one rank; anything
else keeps Lightning's own method. :func:`install_async_sigterm_check` is what ``AdapterCallback``
calls in ``on_train_start`` (``AdapterCallback(async_sigterm_check=False)`` keeps Lightning's
check); :func:`uninstall_async_sigterm_check` restores the loop in ``on_train_end``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_ATTR = "_broadcast_sigterm_tensor"  # the loop method replaced (an instance attribute shadows it)


class AsyncSigtermCheck:
    """Callable that replaces ``trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor``.

    Two host buffers (pinned on CUDA) alternate, so the copy of step k never overwrites the value of
    step k − 1 while that value is still to be read. On a CPU device (gloo; used by the tests) the
    broadcast and the copy are synchronous and there is no event to wait on.
    """

    def __init__(self, trainer: Any, device: torch.device) -> None:
        self.trainer = trainer
        self.cuda = device.type == "cuda"
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.host = [torch.zeros(1, dtype=torch.int32, pin_memory=self.cuda) for _ in range(2)]
        self.pending: tuple[int, Any] | None = None  # (host buffer index, its CUDA event or None)
        self.steps = 0

    def __call__(self) -> None:
        import torch.distributed as dist
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self.flag.fill_(1 if getattr(self.trainer, "received_sigterm", False) else 0)
        try:
            dist.broadcast(self.flag, src=0)
        except Exception:  # noqa: BLE001 - as Lightning's check: a failed broadcast means no signal
            self.flag.zero_()
        slot = self.steps % 2
        self.host[slot].copy_(self.flag, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        previous, self.pending = self.pending, (slot, event)
        self.steps += 1
        if previous is None:
            return
        prev_slot, prev_event = previous
        if prev_event is not None:
            prev_event.synchronize()
        if int(self.host[prev_slot][0]) == 1:
            with contextlib.suppress(Exception):  # as Lightning's check
                dist.barrier()  # every rank reaches this in the same step
            raise SIGTERMException()


def _epoch_loop(trainer: Any) -> Any | None:
    return getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)


def install_async_sigterm_check(trainer: Any) -> bool:
    """Replace Lightning's per-step SIGTERM broadcast of ``trainer`` by :class:`AsyncSigtermCheck`.

    Returns whether it was installed: only with an initialised process group of more than one rank,
    a CUDA root device, and a Lightning whose epoch loop has the method.
    """
    import torch.distributed as dist

    loop = _epoch_loop(trainer)
    if loop is None or not hasattr(type(loop), _ATTR) or isinstance(loop.__dict__.get(_ATTR), AsyncSigtermCheck):
        return False
    if not (dist.is_available() and dist.is_initialized() and trainer.world_size > 1):
        return False
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return False
    setattr(loop, _ATTR, AsyncSigtermCheck(trainer, device))
    return True


def uninstall_async_sigterm_check(trainer: Any) -> None:
    """Give the epoch loop back its own method (no-op when nothing was installed)."""
    loop = _epoch_loop(trainer)
    if loop is not None and isinstance(loop.__dict__.get(_ATTR), AsyncSigtermCheck):
        del loop.__dict__[_ATTR]
