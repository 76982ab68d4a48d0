"""Shared harness of the CPU host-time benchmarks (``lora_host_overhead.py``, ``allora_scale_host.py``):
children that import lightning_lora from the working tree and, with ``--before REV``, from a temporary
git worktree of that revision, alternating, so that the machine's drift hits both alike."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_child(script: str, root: str, args: list[str]) -> dict[str, float]:
    """Run ``script --child root *args`` and parse the JSON object on its last stdout line."""
    cmd = [sys.executable, script, "--child", root, *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def alternate(before: str | None, pairs: int, run: Callable[[str], dict[str, float]],
              record: Callable[[str, dict[str, float]], None]) -> None:
    """``pairs`` times: ``record("", run(tree))`` then, with ``before``, ``record("before_", run(worktree))``."""
    with tempfile.TemporaryDirectory() as tmp:
        wt = str(Path(tmp) / "before")
        if before:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", wt, before],
                           check=True, capture_output=True)
        try:
            for _ in range(pairs):
                for prefix, root in [("", str(ROOT))] + ([("before_", wt)] if before else []):
                    record(prefix, run(root))
        finally:
            if before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", wt], capture_output=True)


def write_result(name: str, script: str, out: str, metrics: dict[str, float]) -> None:
    """Write ``{"name", "command", "device", "date", "metrics"}`` to ``out`` and print it."""
    import torch

    result = {"name": name, "command": " ".join(["python", f"benchmarks/{Path(script).name}", *sys.argv[1:]]),
              "device": f"cpu, 1 thread (torch {torch.__version__})", "date": time.strftime("%Y-%m-%d"),
              "metrics": {k: round(v, 4) for k, v in metrics.items()}}
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
