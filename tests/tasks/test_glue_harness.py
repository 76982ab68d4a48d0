"""benchmarks/glue_harness.py: which data a method benchmark trains on, chooses on and reports on."""

from __future__ import annotations

import collections
import json

import pytest

from benchmarks import glue_harness as gh
from lightning_lora.tasks.models import minilm_tokenizer
from lightning_lora.tasks.glue import read_split


def _multiset(rows) -> collections.Counter:
    return collections.Counter((e.text_a, e.text_b, e.label) for e in rows)


@pytest.mark.parametrize("task", ["rte", "mrpc"])
def test_holdout_validation_is_carved_from_train_and_test_is_the_reported_set(task):
    dm = gh.HoldoutGLUEDataModule(minilm_tokenizer(), task=task, seed=0)
    train, val, test = dm.examples("train"), dm.examples("validation"), dm.examples("test")
    full_train = read_split(task, "train") if task != "mrpc" else read_split(task, "train") + read_split(task, "validation")
    # train and the carved slice partition the task's training data (as multisets: GLUE has duplicates)
    assert _multiset(train) + _multiset(val) == _multiset(full_train)
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    # the reported set is the one without holdout: GLUE dev (RTE) or MRPC's labelled test set
    assert gh.report_split(task) == ("test" if task == "mrpc" else "validation")
    assert _multiset(test) == _multiset(read_split(task, gh.report_split(task)))
    if task == "rte":  # GLUE's RTE dev set shares no example with its train set
        assert not set(_multiset(test)) & set(_multiset(train + val))


def test_plain_datamodule_scores_on_the_reported_split():
    run = gh.GlueRun("lora", "rte")
    dm = gh.make_datamodule(run, minilm_tokenizer())
    loader = gh.eval_loader(dm, run)
    assert len(loader.dataset) == len(read_split("rte", "validation"))


def test_run_many_refuses_duplicate_keys_and_orders_long_runs_first(tmp_path, monkeypatch):
    runs = [gh.GlueRun("lora", "rte", 0), gh.GlueRun("lora", "rte", 0)]
    with pytest.raises(ValueError, match="distinct keys"):
        gh.run_many(runs, tmp_path / "r.jsonl")
    seen = {}

    def fake_pool(jobs, fn, out, workers, device, threads):
        seen["order"] = list(jobs)
        return {k: {"key": k} for k in jobs}

    monkeypatch.setattr(gh, "run_pool", fake_pool)
    runs = [gh.GlueRun("lora", "rte", 0, epochs=3), gh.GlueRun("lora", "sst2", 0, steps=1000),
            gh.GlueRun("lora", "mrpc", 0, epochs=3)]
    out = gh.run_many(runs, tmp_path / "r.jsonl")
    assert seen["order"] == ["lora/sst2/seed0", "lora/mrpc/seed0", "lora/rte/seed0"]  # 1000 > 344 > 234 steps
    assert [r["key"] for r in out] == [r.key for r in runs]  # results come back in the caller's order


def _job(job, device):
    if job["fail"]:
        raise RuntimeError("boom")
    return {"value": job["x"] * 2}


def test_run_pool_records_failures_resumes_and_skips_done_runs(tmp_path):
    raw = tmp_path / "runs.jsonl"
    raw.write_text(json.dumps({"key": "done", "value": 99}) + "\n")
    jobs = {"done": {"x": 0, "fail": False}, "new": {"x": 21, "fail": False}, "bad": {"x": 1, "fail": True}}
    with pytest.raises(RuntimeError, match="1 run\\(s\\) failed: bad: RuntimeError: boom"):
        gh.run_pool(jobs, _job, raw, workers=1, threads=1)
    rows = gh.read_jsonl(raw)
    assert [r["key"] for r in rows] == ["done", "new", "bad"]  # "done" was not run again
    assert rows[1]["value"] == 42 and "error" in rows[2]
    jobs["bad"]["fail"] = False  # a failed run is retried on the next call
    results = gh.run_pool(jobs, _job, raw, workers=1, threads=1)
    assert {k: r["value"] for k, r in results.items()} == {"done": 99, "new": 42, "bad": 2}


def test_run_many_refuses_a_stored_run_of_the_same_key_at_another_budget(tmp_path, monkeypatch):
    """Session 10's IncreLoRA run at 3,000 SST-2 steps reused LoRA's stored 1,000-step rows (the key
    names tag, task and seed only): a stored row must match the budget and rate to count as done."""
    raw = tmp_path / "runs.jsonl"
    stored = gh.GlueRun("lora", "sst2", 0, lr=2e-3, steps=1000)
    raw.write_text(json.dumps({**vars(stored), "key": stored.key, "accuracy": 0.87}) + "\n")
    monkeypatch.setattr(gh, "run_pool", lambda jobs, *a, **k: {key: {"key": key} for key in jobs})
    for changed in (dict(steps=3000), dict(lr=1e-3), dict(epochs=1.0, steps=None)):
        asked = gh.GlueRun("lora", "sst2", 0, **{"lr": 2e-3, "steps": 1000, **changed})
        with pytest.raises(ValueError, match="lora/sst2/seed0.*another budget"):
            gh.run_many([asked], raw)
    gh.run_many([gh.GlueRun("lora", "sst2", 0, lr=2e-3, steps=1000)], raw)  # the same budget: reused
    gh.run_many([gh.GlueRun("lora", "sst2", 0, lr=2e-3, steps=3000, tag="lora/s3000")], raw)  # its own tag
    # an epoch-budget run is stored with the step count its epochs came to: still the same run
    epochs = gh.GlueRun("lora", "rte", 0, lr=2e-3, epochs=3.0)
    with raw.open("a") as fh:
        fh.write(json.dumps({**vars(epochs), "steps": 234, "key": epochs.key}) + "\n")
    gh.run_many([epochs], raw)
    with pytest.raises(ValueError, match="epochs=3.0 stored, 2.0 asked"):
        gh.run_many([gh.GlueRun("lora", "rte", 0, lr=2e-3, epochs=2.0)], raw)


def test_clipping_and_head_rate_must_be_positive():
    """Lightning skips clipping at 0 without a word: a run tagged as clipped would train unclipped."""
    for field in ("grad_clip", "head_lr"):
        with pytest.raises(ValueError, match=f"{field} must be > 0"):
            gh.GlueRun("lora", "sst2", 0, steps=1, **{field: 0.0})
    assert gh.GlueRun("lora", "sst2", 0, steps=1, grad_clip=1.0, head_lr=2e-3).grad_clip == 1.0
