"""Result files: one JSON per experiment or benchmark under ``benchmarks/results/``.

Schema (``benchmarks/make_docs.py`` renders every file into ``docs/results.md`` or
``docs/benchmarks.md``, so the docs are generated from these files, never edited by hand)::

    {
      "name":    "sst2_minilm_lora",                 # file stem, [A-Za-z0-9._-]+
      "command": "python benchmarks/sst2_minilm_lora.py --steps 1000",   # exact command line
      "device":  "cpu: Intel(R) Xeon(R) ... (2 threads)",
      "date":    "2026-11-29T12:00:00+00:00",        # UTC, ISO 8601
      "kind":    "results",                          # optional: "results" (accuracy) or "benchmark" (speed/memory)
      "metrics": {"val_accuracy": 0.89, "steps": 1000, ...}   # flat: name -> number
    }

``kind`` may be absent (files written by other tools); :func:`result_kind` then infers it: a file
with any quality metric (accuracy, F1, MCC, AUROC, perplexity, loss, precision, recall) is a
result, anything else (times, memory, throughput) a benchmark.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
import os
import platform
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .tasks.paths import results_dir

KINDS = ("results", "benchmark")
_QUALITY = {"accuracy", "acc", "f1", "mcc", "auroc", "auc", "ppl", "perplexity", "loss", "precision", "recall"}
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def device_description() -> str:
    """The accelerator the run used: ``"cuda: NVIDIA H200 (x1)"`` or ``"cpu: <model name> (N threads)"``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"cpu: {model} ({n} thread{'' if n == 1 else 's'})"


def current_command() -> str:
    """The command line of this process as a person would type it (``python path/to/script.py ...``)."""
    argv0 = sys.argv[0] if sys.argv else "python"
    name = os.path.basename(argv0)
    if name in ("lightning-lora", "lncrna"):
        return shlex.join([name, *sys.argv[1:]])
    if argv0.endswith(".py"):
        try:
            argv0 = os.path.relpath(argv0)
        except ValueError:
            pass
        return shlex.join(["python", argv0, *sys.argv[1:]])
    return shlex.join([argv0, *sys.argv[1:]])


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float | int]:
    """``metrics`` as ``{name: int | float}``; nested mappings are joined with ``.``; tensors and numpy
    scalars become Python numbers. Anything else (strings, lists) raises ``TypeError``."""
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, prefix=name + "."))
            continue
        if hasattr(value, "item") and callable(value.item):  # torch / numpy scalar
            value = value.item()
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, numbers.Real):
            raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}: {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {name!r} is {value}; results must be finite numbers")
        out[name] = value if isinstance(value, int) else float(value)
    return out


def make_result(name: str, metrics: Mapping[str, Any], command: str | None = None, *, kind: str = "results",
                device: str | None = None, date: str | None = None) -> dict[str, Any]:
    """The result record (see the module docstring) without writing it."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"result name {name!r} must match [A-Za-z0-9._-]+ (it becomes the file name)")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {
        "name": name,
        "command": command if command is not None else current_command(),
        "device": device if device is not None else device_description(),
        "date": date or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "kind": kind,
        "metrics": flat_metrics(metrics),
    }


def write_result(name: str, metrics: Mapping[str, Any], command: str | None = None, *, kind: str = "results",
                 device: str | None = None, directory: str | os.PathLike | None = None) -> Path:
    """Write ``<directory>/<name>.json`` (default ``benchmarks/results/``) atomically; returns its path.

    ``command`` defaults to this process's command line; pass the exact command when it differs
    (the Hydra entry point passes the original ``lightning-lora train ...`` line).
    """
    record = make_result(name, metrics, command, kind=kind, device=device)
    out_dir = results_dir(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def validate_result(record: Any) -> list[str]:
    """Problems with a loaded result record (empty when it follows the schema)."""
    if not isinstance(record, dict):
        return ["not a JSON object"]
    problems = [f"missing key {k!r}" for k in ("name", "command", "device", "date", "metrics") if k not in record]
    if record.get("kind", "results") not in KINDS:
        problems.append(f"kind must be one of {KINDS}")
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        problems.append("metrics must be an object")
    else:
        problems += [f"metric {k!r} is not a number" for k, v in metrics.items()
                     if isinstance(v, bool) or not isinstance(v, (int, float))]
    return problems


def result_kind(record: Mapping[str, Any]) -> str:
    """``record["kind"]`` if present, else ``"results"`` when a metric name looks like a quality metric,
    else ``"benchmark"``."""
    if record.get("kind") in KINDS:
        return str(record["kind"])
    names = record.get("metrics", {}).keys()
    # whole words of the name only: "bf16" is not "f1"
    return "results" if any(_QUALITY & set(re.split(r"[^a-z0-9]+", n.lower())) for n in names) else "benchmark"


def read_result_files(directory: str | os.PathLike | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """``(path, record)`` of every ``*.json`` record of ``directory`` (default ``benchmarks/results/``),
    sorted by file name. Several files may hold records of one name (an earlier session's run kept
    beside the current one), so the path, not the name, identifies a record."""
    out = []
    for path in sorted(results_dir(directory).glob("*.json")):
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        problems = validate_result(record)
        if problems:
            raise ValueError(f"{path}: {'; '.join(problems)}")
        out.append((path, record))
    return out


def read_results(directory: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every ``*.json`` record of ``directory`` (default ``benchmarks/results/``), sorted by name."""
    return sorted((record for _, record in read_result_files(directory)), key=lambda r: r["name"])
