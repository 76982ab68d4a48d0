"""``benchmarks/lora_vs_peft_interleaved_summary.py``: per-variant lowest / median / highest paired
ratio over interleaved runs, against the best PEFT, refusing runs it cannot read that way."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import lora_vs_peft_interleaved_summary as script
from benchmarks.lora_vs_peft_interleaved_summary import summarize


def _run_record(ours: float, cpp: float | None = None, bf16_ms: float = 40.0, default_ms: float = 69.0,
                interleaved: int = 1) -> dict:
    m = {"interleaved": interleaved, "bert_peft_bf16_ms": bf16_ms, "bert_peft_default_ms": default_ms,
         "bert_ours_vs_peft_bf16_paired": ours, "bert_ours_vs_peft_default_paired": ours * bf16_ms / default_ms,
         "bert_peft_default_vs_peft_bf16_paired": default_ms / bf16_ms}
    if cpp is not None:
        m["bert_ours_cpp_vs_peft_bf16_paired"] = cpp
    return {"name": "lora_vs_peft", "command": "x", "device": "d", "date": "2026-12-01", "metrics": m}


def test_summary_takes_min_median_max_per_variant_over_the_runs_that_hold_it() -> None:
    s = summarize([_run_record(0.86, 0.73), _run_record(0.89, 0.75), _run_record(0.80)])
    assert s["bert_ours_runs"] == 3 and s["bert_ours_cpp_runs"] == 2
    assert (s["bert_ours_vs_best_peft_paired_min"], s["bert_ours_vs_best_peft_paired_median"],
            s["bert_ours_vs_best_peft_paired_max"]) == (0.80, 0.86, 0.89)
    assert s["bert_ours_cpp_vs_best_peft_paired_max"] == 0.75
    assert s["bert_ours_vs_best_peft_paired_spread"] == pytest.approx(0.09)
    assert s["bert_peft_bf16_faster_runs"] == 3
    # PEFT's own pair is no variant of ours, and the ratio against PEFT's defaults is not the best PEFT's
    assert not any(k.startswith("bert_peft_default") for k in s)


@pytest.mark.parametrize("record,message", [
    (_run_record(0.8, interleaved=0), "not an --interleave run"),
    (_run_record(0.8, bf16_ms=70.0, default_ms=69.0), "PEFT's defaults were faster"),
])
def test_summary_refuses_runs_it_cannot_read_as_paired_against_the_best_peft(record: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        summarize([record])


def _main(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """The script's ``main`` with ``args`` as its command line (in this process: a subprocess spent its
    seconds importing torch for a JSON summary)."""
    monkeypatch.setattr(sys, "argv", ["benchmarks/lora_vs_peft_interleaved_summary.py", *args])
    script.main()


def test_summary_script_writes_a_valid_benchmark_record(tmp_path: Path, monkeypatch) -> None:
    runs = []
    for i, (ours, cpp) in enumerate([(0.86, 0.73), (0.88, 0.77)]):
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps(_run_record(ours, cpp)))
        runs.append(str(p))
    _main(monkeypatch, *runs, "--out-dir", str(tmp_path / "out"))
    rec = json.loads((tmp_path / "out/lora_vs_peft_bert_interleaved.json").read_text())
    assert rec["kind"] == "benchmark" and rec["device"] == "d"
    assert rec["command"].startswith("python benchmarks/lora_vs_peft_interleaved_summary.py ")
    assert rec["metrics"]["bert_ours_cpp_vs_best_peft_paired_max"] == 0.77


def test_recorded_command_keeps_the_result_name(tmp_path: Path, monkeypatch) -> None:
    """Session 23 wrote ``--name lora_vs_peft_bert_interleaved_s23``: a recorded command without the
    option would, run again, overwrite session 22's file instead of reproducing this one."""
    p = tmp_path / "run.json"
    p.write_text(json.dumps(_run_record(0.75, 0.74)))
    _main(monkeypatch, str(p), "--name", "other_name", "--out-dir", str(tmp_path / "out"))
    rec = json.loads((tmp_path / "out/other_name.json").read_text())
    assert rec["command"] == (f"python benchmarks/lora_vs_peft_interleaved_summary.py --name other_name "
                              f"--out-dir {tmp_path / 'out'} {p}")
