"""``benchmarks/lora_vs_peft.py --interleave`` end to end on the CPU (``--tiny``): every variant's
model resident, the timed steps alternating between them; the result carries per-variant medians,
the paired ratios and no memory figures (the GPU run is the measurement)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from benchmarks import lora_vs_peft

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks/lora_vs_peft.py")


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, SCRIPT, "--tiny", "--models", "bert", "--out", str(tmp_path / "r.json"),
                           *args], capture_output=True, text=True, timeout=600)


def test_interleaved_run_writes_medians_paired_ratios_and_no_memory(tmp_path: Path) -> None:
    variants = ["frozen", "ours", "ours_merged", "peft_bf16", "peft_default"]
    proc = _run(tmp_path, "--interleave", "--block", "2", "--variants", *variants, "--warmup", "1", "--steps", "3",
                "--rounds", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert m["interleaved"] == 1 and m["rounds"] == 2 and m["interleave_block"] == 2
    for v in variants:
        assert m[f"bert_{v}_ms_min"] <= m[f"bert_{v}_ms"] <= m[f"bert_{v}_ms_max"]
        assert f"bert_{v}_peak_gib" not in m  # every model is resident: no per-variant peak
    assert not any(k.startswith("peak_mem_ratio") for k in m)
    best = min(("peft_default", "peft_bf16"), key=lambda v: m[f"bert_{v}_ms"])
    # the ratio is taken before the milliseconds are rounded to 3 decimals, and is then rounded to 4
    ours_ms, best_ms = m["bert_ours_ms"], m[f"bert_{best}_ms"]
    bound = 5e-5 + ours_ms / best_ms * (5e-4 / ours_ms + 5e-4 / best_ms) * 1.01
    assert m["step_time_ratio_bert"] == pytest.approx(ours_ms / best_ms, abs=bound)
    for a in ("ours", "ours_merged"):
        for b in ("peft_bf16", "peft_default", "frozen"):
            assert m[f"bert_{a}_vs_{b}_paired"] > 0
    # the trainable counts come from the resident models, as in the sequential mode
    assert m["bert_trainable_params"] == m["bert_peft_trainable_params"] > 0
    assert m["bert_ours_sibling_sets"] > 0


def test_interleave_refuses_two_merged_variants_profiling_and_an_empty_block(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    """Argument checks, in this process (each a subprocess took 12 s of imports): exit 2, the reason on
    stderr, no result file. ``--tiny`` rewrites the module's globals and SPECS: restored afterwards."""
    monkeypatch.setattr(lora_vs_peft, "SPECS", copy.deepcopy(lora_vs_peft.SPECS))
    for name in ("TINY", "DEVICE", "COMPILE_MODE"):
        monkeypatch.setattr(lora_vs_peft, name, getattr(lora_vs_peft, name))
    out = tmp_path / "r.json"
    cases = [
        (["--variants", "ours_merged", "ours_merged_tkernel", "peft_bf16"], "at most one merged_training variant"),
        (["--profile-dir", str(tmp_path / "p"), "--variants", "ours", "peft_bf16"], "time only"),
        (["--block", "0", "--variants", "ours", "peft_bf16"], "--block must be at least 1"),
    ]
    for args, reason in cases:
        monkeypatch.setattr(sys, "argv", [SCRIPT, "--tiny", "--models", "bert", "--out", str(out), "--interleave",
                                          *args])
        with pytest.raises(SystemExit) as exc:
            lora_vs_peft.main()
        assert exc.value.code == 2 and reason in capsys.readouterr().err
    assert not out.exists()


def test_turns_alternate_in_a_rotated_order_and_each_turn_s_first_step_is_untimed(monkeypatch) -> None:
    """The schedule itself, with stand-in models whose steps log their variant: warm-up per variant,
    then per cycle one turn of ``block`` steps each, the order rotated by one every cycle; one sample
    per turn, from its steps after the first."""
    log: list[str] = []
    variant_of: dict[int, str] = {}

    def build(spec, variant, r):
        model = nn.Linear(1, 1)
        variant_of[id(model)] = variant
        return model, list(model.parameters())

    monkeypatch.setattr(lora_vs_peft, "DEVICE", "cpu")
    monkeypatch.setitem(lora_vs_peft.SPECS, "stub", {})
    monkeypatch.setattr(lora_vs_peft, "build", build)
    monkeypatch.setattr(lora_vs_peft, "step_fn", lambda model, params, spec: lambda: log.append(variant_of[id(model)]))
    timed: list[tuple[int, int]] = []
    real_timed = lora_vs_peft.timed_steps

    def timed_steps(step, warmup, steps, cuda):
        timed.append((warmup, steps))
        return real_timed(step, warmup, steps, cuda)

    monkeypatch.setattr(lora_vs_peft, "timed_steps", timed_steps)
    variants = ["frozen", "ours", "peft_bf16"]
    *rounds, last = lora_vs_peft.measure_interleaved("stub", variants, r=4, warmup=2, steps=2, rounds=2, block=3)
    f, o, p = variants
    warm = [f, f, o, o, p, p]
    cycles = [[f, o, p], [o, p, f], [p, f, o], [f, o, p]]  # rounds × steps = 4 cycles, rotated by one each
    assert log == warm + [v for order in cycles for v in order for _ in range(3)]
    assert timed == [(1, 2)] * 12  # every turn: its first step untimed, the other block - 1 timed
    assert len(rounds) == 2 and all(set(r) == set(variants) for r in rounds)
    assert all(len(ratios) == 4 for ratios in last["paired"].values())  # one sample per turn
    assert set(last["paired"]) == {(a, b) for a in variants for b in variants if a != b}


def test_every_path_sets_both_switches_of_its_variant() -> None:
    """measure, the interleaved turns and the kernel profile all go through ``switches``: the replay
    kernel is on exactly for the TKERNEL variants (a profile once ran them with the kernel off)."""
    from lightning_lora.core import replay_kernels

    try:
        for variant, on in (("ours_merged_tkernel", True), ("ours", False), ("ours_tkernel_compiled", True),
                            ("peft_bf16", False)):
            lora_vs_peft.switches(variant)
            assert replay_kernels.enabled() is on, variant
    finally:
        replay_kernels.set_enabled(False)
