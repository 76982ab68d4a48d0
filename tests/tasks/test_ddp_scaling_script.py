"""``benchmarks/ddp_scaling.py`` end to end on the CPU (gloo): both device counts run, alternate,
and the result carries the figures the docs read. Slow (about 40 s per repeat: seven Lightning
processes), so CI skips it; the GPU run is the measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ddp_scaling_cpu_check_writes_medians_and_every_run(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/ddp_scaling.py"), "--accelerator", "cpu", "--tiny", "--steps", "5",
         "--warmup", "1", "--repeats", "1", "--adapter", "lora", "--no-broadcast-buffers", "--with-lightning-sigterm"],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    result = json.loads(out[out.rindex('{\n  "name": "ddp_scaling'):])  # the children log to the same stdout
    m = result["metrics"]
    # diagnostic flags name their own result, so they never overwrite the bar's ddp_scaling.json
    assert result["name"] == "ddp_scaling_no_broadcast_buffers_tiny_steps5" and result["device"] == "cpu (gloo)"
    for key in ("samples_per_s_1gpu", "samples_per_s_2gpu", "median_step_ms_1gpu", "median_step_ms_2gpu"):
        assert m[key] > 0
    assert m["scaling_2gpu"] == pytest.approx(m["samples_per_s_2gpu"] / m["samples_per_s_1gpu"])
    assert m["samples_per_s_1gpu_run0"] == m["samples_per_s_1gpu"] and m["repeats"] == 1
    # the LoRA runs also time two devices with DDP's own defaults and, on request, Lightning's own
    # per-step SIGTERM check
    for label in ("ddp_defaults_off", "lightning_sigterm"):
        assert m[f"scaling_2gpu_{label}"] == pytest.approx(m[f"samples_per_s_2gpu_{label}"] / m["samples_per_s_1gpu"])
    # which path each configuration's runs ended on: the CPU never switches to the C++ path by itself
    assert {k: v for k, v in m.items() if k.startswith("cpp_path_on_")} == {
        "cpp_path_on_1gpu": 0, "cpp_path_on_2gpu": 0, "cpp_path_on_2gpu_ddp_defaults_off": 0,
        "cpp_path_on_2gpu_lightning_sigterm": 0}
