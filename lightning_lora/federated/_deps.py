"""Lazy imports of the optional federated dependencies, with the pip command in the error."""

from __future__ import annotations

import importlib
from types import ModuleType

PIP_COMMAND = "pip install 'lightning-lora[federated]'   (or: pip install flwr opacus)"


class FederatedDependencyMissing(ImportError):
    """flwr or opacus is not installed."""


def require(module: str) -> ModuleType:
    """Import ``module`` (``"flwr"``, ``"opacus"`` or a submodule), or raise with the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise
        raise FederatedDependencyMissing(
            f"lightning_lora.federated needs {top!r}, which is not installed; run:\n    {PIP_COMMAND}"
        ) from None
