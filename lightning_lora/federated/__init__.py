"""FFA-LoRA (and LoRA) federated fine-tuning on Flower, with Opacus DP-SGD on the clients (METHODS.md §16).

    from lightning_lora.federated import FederationConfig, LocalTraining, DPConfig, run_simulation
    out = run_simulation(FederationConfig(task="sst2", method="ffa_lora", num_clients=8,
                                          local=LocalTraining(lr=0.5), dp=DPConfig(epsilon=6)))

Pieces (one file each): :mod:`.params` (what travels: the trainable tensors only), :mod:`.data`
(Dirichlet non-IID splits, tasks), :mod:`.dp` (Opacus grad samplers for our LoRA layers, σ from
ε, accountant), :mod:`.client` (Flower ``NumPyClient``), :mod:`.strategy` (Flower ``FedAvg``
subclass with a byte meter), :mod:`.simulation` (Flower's server loop in one process; real
server and clients over gRPC). Command line: ``python -m lightning_lora.federated --help``.

Needs ``pip install 'lightning-lora[federated]'`` (flwr, opacus); importing a name from here
without them raises an ImportError that says so.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ._deps import PIP_COMMAND, FederatedDependencyMissing
from .data import FederatedTask, build_task, dirichlet_split

_LAZY = {
    "AdapterClient": ".client", "LocalTraining": ".client", "evaluate_model": ".client",
    "DPConfig": ".dp", "register_grad_samplers": ".dp", "PrivateTrainer": ".dp",
    "AdapterFedAvg": ".strategy", "weighted_mean": ".strategy",
    "FederationConfig": ".simulation", "run_simulation": ".simulation", "serve": ".simulation",
    "connect": ".simulation", "build_model": ".simulation", "InProcessClientProxy": ".simulation",
    "exchanged_names": ".params", "get_arrays": ".params", "set_arrays": ".params", "frozen_digest": ".params",
}

__all__ = ["PIP_COMMAND", "FederatedDependencyMissing", "FederatedTask", "build_task", "dirichlet_split", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
