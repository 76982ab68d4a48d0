"""Where the project's files are: a repository checkout, or else the current directory.

An installed (non-editable) package has no ``data/`` or ``benchmarks/`` next to it, so every
lookup takes an explicit path first, then an environment variable, then the checkout, then
``./``.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path | None:
    """The repository checkout this package was imported from, or None for an installed copy."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "lightning_lora").is_dir():
        return root
    return None


def nlp_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Folder with the NLP data sets (``sst2/``, ``mrpc/``, ... as in ``data/nlp/PROVENANCE.md``).

    Order: ``data_dir``, ``$LIGHTNING_LORA_DATA``, ``<checkout>/data/nlp``, ``./data/nlp``.
    """
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("LIGHTNING_LORA_DATA"):
        return Path(os.environ["LIGHTNING_LORA_DATA"])
    root = repo_root()
    if root is not None and (root / "data" / "nlp").is_dir():
        return root / "data" / "nlp"
    return Path.cwd() / "data" / "nlp"


def results_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder of result JSON files: ``path``, ``$LIGHTNING_LORA_RESULTS``, ``<checkout>/benchmarks/results``,
    ``./benchmarks/results``."""
    if path is not None:
        return Path(path)
    if os.environ.get("LIGHTNING_LORA_RESULTS"):
        return Path(os.environ["LIGHTNING_LORA_RESULTS"])
    root = repo_root()
    return (root if root is not None else Path.cwd()) / "benchmarks" / "results"
