"""What a federated round exchanges: the model's trainable tensors, nothing else.

After :func:`lightning_lora.inject_adapter`, ``requires_grad`` marks exactly the adapter's
trainable set (METHODS S3): ``lora_B`` alone for FFA-LoRA (A0 is a buffer), ``lora_A`` and
``lora_B`` for LoRA, plus every parameter of ``modules_to_save`` (e.g. a classifier head trained in
full; its buffers, e.g. BatchNorm statistics, are not exchanged). These tensors, in
``named_parameters`` order, are the Flower ``Parameters`` of every message. Frozen tensors (the
base model, FFA-LoRA's A0) never travel: clients build them identically (same seeds), and the
server checks that with :func:`frozen_digest` in round 1.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


def exchanged_names(model: nn.Module) -> list[str]:
    """Names of the tensors a round exchanges (trainable parameters, model order)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("the model has no trainable parameter to exchange; inject an adapter first")
    return names


def get_arrays(model: nn.Module) -> list[np.ndarray]:
    """The exchanged tensors as fp32 NumPy arrays (CPU copies), in :func:`exchanged_names` order."""
    return [p.detach().float().cpu().numpy().copy() for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def set_arrays(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Copy ``arrays`` (as from :func:`get_arrays`) into the model's trainable parameters."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if len(arrays) != len(params):
        raise ValueError(f"got {len(arrays)} arrays for {len(params)} trainable tensors: method or targets differ")
    for (name, p), a in zip(params, arrays):
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(f"array for {name} has shape {tuple(a.shape)}, the model's is {tuple(p.shape)}")
        p.copy_(torch.from_numpy(np.ascontiguousarray(a)).to(p.dtype))


# buffers that a forward pass in train mode updates (running statistics): they differ between
# clients after local training by design and are not exchanged, so they are no frozen tensor
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def running_stat_names(model: nn.Module) -> set[str]:
    """``state_dict`` names of the running statistics of normalisation layers (BatchNorm, InstanceNorm, ...)."""
    out = set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, _NormBase):
            out.update(f"{mname}.{b}" if mname else b for b in _RUNNING_STATS)
    return out


@torch.no_grad()
def frozen_digest(model: nn.Module) -> str:
    """BLAKE2b hex digest of every frozen tensor of ``model`` (base weights, FFA-LoRA's A0, ...).

    Two clients with the same digest hold the same frozen model, so averaging their trainable
    tensors is meaningful (for FFA-LoRA, ``mean_k(B_k A0) = B̄ A0`` needs the same A0).
    Hashed: frozen parameters and persistent buffers, except the running statistics of
    normalisation layers (:func:`running_stat_names`), which training updates on each client."""
    skip = {n for n, p in model.named_parameters() if p.requires_grad} | running_stat_names(model)
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if name in skip:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
