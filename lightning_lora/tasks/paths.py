"""Where the project's files are: a repository checkout, or else the current directory.

An installed (non-editable) package has no ``data/`` or ``benchmarks/`` next to it, so every
lookup takes an explicit path first, then an environment variable, then the checkout, then
``./``.
"""

from __future__ import annotations

import os
from pathlib import Path


class DataNotFound(FileNotFoundError):
    """A data set file is not where :func:`nlp_data_dir` looked. Its own class so that the
    ``lightning-lora`` CLI reports it as one line (exit status 2) rather than a traceback: it is the
    first thing an installed (non-editable) copy meets, since the data sets are not in the wheel."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} not found. The NLP data sets live in data/nlp/ of the repository checkout (they are not "
            "in the installed package); pass data_dir=... (lightning-lora train: +data.data_dir=DIR) or set "
            "LIGHTNING_LORA_DATA to that folder"
        )


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
