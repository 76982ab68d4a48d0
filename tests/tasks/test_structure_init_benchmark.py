"""benchmarks/structure_init_glue.py: the stored runs are found again by the recorded command's run
list (no budget conflict), and the head-lr variants (session 13) are runs of their own."""

from __future__ import annotations

from benchmarks import structure_init_glue as s
from benchmarks.glue_harness import check_stored_budgets, read_jsonl

RAW = "benchmarks/results/raw/structure_init_glue.jsonl"


def test_stored_sweeps_replay_without_conflict_and_head_lr_variants_are_new():
    stored = {r["key"] for r in read_jsonl(RAW) if "error" not in r}
    old = [t for t in s.METHODS if t not in s.RUN_FIELDS]
    sweeps = s.sweep_runs(old, 400, smoke=False)
    check_stored_budgets(sweeps, RAW)
    assert all(r.key in stored for r in sweeps)
    new = s.sweep_runs(list(s.RUN_FIELDS), 400, smoke=False)
    check_stored_budgets(new, RAW)
    assert not any(r.key in stored for r in new)
    assert {r.head_lr for r in new} == {2e-3} and {r.lr for r in new} == {5e-3, 1e-2, 2e-2, 5e-2}
    mains = s.main_runs(["lora_sb_headlr"], {"lora_sb_headlr": 1e-2}, smoke=False)
    assert {r.head_lr for r in mains} == {2e-3} and len(mains) == 9

