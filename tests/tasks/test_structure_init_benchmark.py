"""benchmarks/structure_init_glue.py: the stored runs are found again by the recorded command's run
list (no budget conflict), and the head-lr variants (session 13) are runs of their own."""

from __future__ import annotations

from benchmarks import structure_init_glue as s
from benchmarks.glue_harness import check_stored_budgets, read_jsonl

RAW = "benchmarks/results/raw/structure_init_glue.jsonl"


def test_stored_sweeps_replay_without_conflict_including_head_lr_variants():
    """Every stored sweep run, the head-rate variants' too (session 14 ran them), matches the run the
    script would request now: a rerun trains nothing again and reuses nothing under another recipe."""
    stored = {r["key"] for r in read_jsonl(RAW) if "error" not in r}
    old = [t for t in s.METHODS if t not in s.RUN_FIELDS]
    sweeps = s.sweep_runs(old, 400, smoke=False)
    check_stored_budgets(sweeps, RAW)
    assert all(r.key in stored for r in sweeps)
    new = s.sweep_runs(list(s.RUN_FIELDS), 400, smoke=False)
    check_stored_budgets(new, RAW)
    assert all(r.key in stored for r in new)
    assert {r.head_lr for r in new} == {2e-3} and {r.lr for r in new} == {5e-3, 1e-2, 2e-2, 5e-2}
    mains = s.main_runs(["lora_sb_headlr"], {"lora_sb_headlr": 1e-2}, smoke=False)
    assert {r.head_lr for r in mains} == {2e-3} and len(mains) == 9



def test_method_configs_compare_with_defaults_filled_in():
    """A stored DyLoRA row without ``mode`` (session 4, when ``frozen`` was implied) matches a request
    that names the default; another rank does not."""
    import dataclasses
    import json

    import pytest

    from benchmarks.glue_harness import GlueRun

    rows = [json.loads(line) for line in open("benchmarks/results/raw/dylora_sst2.jsonl")]
    row = next(r for r in rows if r["tag"] == "dylora" and "error" not in r)
    assert "mode" not in json.loads(row["method_kwargs"])
    run = GlueRun("dylora", "sst2", row["seed"], {"r": 8, "alpha": 16, "dropout": 0.05, "mode": "frozen"},
                  lr=row["lr"], steps=row["steps"], eval_ranks=row["eval_ranks"], tag="dylora")
    check_stored_budgets([run], "benchmarks/results/raw/dylora_sst2.jsonl")
    with pytest.raises(ValueError, match="method_kwargs"):
        check_stored_budgets([dataclasses.replace(run, method_kwargs={**run.method_kwargs, "r": 4})],
                             "benchmarks/results/raw/dylora_sst2.jsonl")
