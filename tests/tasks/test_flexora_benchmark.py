"""benchmarks/flexora_glue.py: step-budget tags, and ``--retrain-budget full`` (the official code's
budget: the search on top, the retraining with LoRA's whole budget)."""

from __future__ import annotations

from benchmarks import flexora_glue as f
from benchmarks.glue_harness import check_stored_budgets, read_jsonl

LRS = {"lora": 2e-3, "flexora": 2e-3}


def test_shared_budget_reproduces_the_committed_runs():
    raw = "benchmarks/results/flexora_glue_runs.jsonl"
    runs = f.make_runs(f.parse_args(["--sst2-steps", "1000"]), {"rte": 1400, "sst2": 1000}, {}, LRS)
    check_stored_budgets(runs, raw)
    stored = {r["key"] for r in read_jsonl(raw) if "error" not in r}
    assert all(r.key in stored for r in runs)
    assert {r.steps for r in runs if r.task == "sst2"} == {1000}


def test_full_retrain_budget_puts_the_search_on_top():
    args = f.parse_args(["--retrain-budget", "full"])
    runs = f.make_runs(args, {"rte": 1400, "sst2": 1000}, {}, LRS)
    for r in runs:
        if r.method == "lora":
            assert r.steps == {"rte": 1400, "sst2": 1000}[r.task] and not r.tag.endswith("/full")
        else:
            search = r.method_kwargs["search_steps"]
            assert search == round(args.search_fraction * {"rte": 1400, "sst2": 1000}[r.task])
            # the retraining after the search gets exactly LoRA's steps
            assert r.steps - search == {"rte": 1400, "sst2": 1000}[r.task] and r.tag.endswith("/full")


def test_other_step_budgets_are_tagged():
    runs = f.make_runs(f.parse_args([]), {"rte": 1400, "sst2": 2000}, {}, LRS)
    assert {r.tag for r in runs if r.task == "sst2"} == {"lora/lr0.002/s2000", "flexora/lr0.002/s2000"}
