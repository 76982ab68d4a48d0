"""``benchmarks/method_overhead.py`` on the CPU (``--tiny``): the sequential pass keeps the memory and
per-method figures, ``--interleave`` adds side-by-side timing whose ratios are medians of same-cycle
ratios, ``--methods`` measures a subset (LoRA always: the denominator), bad options are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import method_overhead


def test_interleaved_subset_run_writes_paired_ratios_beside_the_sequential_figures(tmp_path: Path) -> None:
    methods = ["frozen", "allora", "dora", "peft_dora"]
    assert method_overhead.main(["--tiny", "--interleave", "--block", "2", "--cycles", "3",
                                 "--methods", *methods, "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "method_overhead.json").read_text())["metrics"]
    assert m["interleaved_block"] == 2 and m["interleaved_cycles"] == 3
    for name in [*methods, "lora"]:  # LoRA is measured without being asked: every ratio's denominator
        assert m[f"{name}_ms"] > 0 and m[f"{name}_ms_sequential"] > 0, name
        assert m[f"{name}_cpp_path_on"] == 0.0, name  # the tests pin the Python path (tests/conftest.py)
    assert not any(k.startswith(("bone_", "smora_", "peft_dora_bf16_")) for k in m)  # only the subset ran
    assert m["allora_time_ratio_vs_lora"] > 0 and m["dora_time_ratio_vs_peft"] > 0
    assert m["allora_trainable"] == m["lora_trainable"] > 0  # same rank, same targets
    assert "lora_time_ratio_vs_lora" not in m


def test_paired_ratio_is_the_median_of_same_cycle_ratios() -> None:
    """Not the ratio of the medians: a drifting host moves both steps of a cycle together."""
    times = {"a": [1.0, 10.0, 3.0], "lora": [1.0, 5.0, 1.0]}  # per cycle 1, 2, 3; medians 3 / 1
    assert method_overhead.paired(times, "a", "lora") == 2.0


def test_turns_rotate_and_each_turn_starts_with_an_untimed_step(monkeypatch) -> None:
    order: list[str] = []
    timed: list[tuple[int, int]] = []

    def fake_build(name, *args):
        return (lambda: order.append(name)), None, []

    def fake_timed_steps(step, warmup, steps, cuda):
        timed.append((warmup, steps))
        step()
        return 1.0, 0.0

    monkeypatch.setattr(method_overhead, "build", fake_build)
    monkeypatch.setattr(method_overhead, "settle", lambda step: None)
    monkeypatch.setattr(method_overhead, "timed_steps", fake_timed_steps)
    times = method_overhead.measure_interleaved(["lora", "b", "c"], "cpu", True, 1, 1, warmup=0, block=3, cycles=3)
    assert order == ["lora", "b", "c", "b", "c", "lora", "c", "lora", "b"]
    assert set(timed) == {(1, 2)}  # block 3: one untimed step, two timed
    assert times == {"lora": [1.0] * 3, "b": [1.0] * 3, "c": [1.0] * 3}


def test_interleaved_groups_pair_each_method_with_lora_and_dora_with_the_peft_variants() -> None:
    """Pairs, not every model at once: the step hook scans every LoRA layer of the process, so
    resident foreign models would slow LoRA-form steps (see the module docstring)."""
    g = method_overhead.groups(["frozen", "lora", "dora", "bone", "peft_dora", "peft_dora_bf16"])
    assert g == [["lora", "frozen"], ["lora", "dora", "peft_dora", "peft_dora_bf16"], ["lora", "bone"]]
    assert method_overhead.groups(["lora", "peft_dora"]) == [["lora", "peft_dora"]]
    assert method_overhead.groups(["lora"]) == []


@pytest.mark.parametrize("args, message", [
    (["--block", "1"], "--block must be >= 2"),
    (["--methods", "lora", "qlora"], "unknown methods ['qlora']"),
])
def test_bad_options_are_refused_before_anything_runs(tmp_path: Path, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as exc:
        method_overhead.main(["--tiny", "--out", str(tmp_path), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
