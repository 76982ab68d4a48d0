"""benchmarks/lego_glue.py: the source runs, with and without ``--init-per-task``."""

from __future__ import annotations

from benchmarks import lego_glue as g


def test_default_runs_share_the_seed_across_tasks():
    runs = g.make_runs(False, g.SEEDS)
    assert {r.tag for r in runs} == {"lego_src"}
    for s in g.SEEDS:
        assert {r.task: r.seed for r in runs if r.seed == s} == {t: s for t in g.TASKS}


def test_init_per_task_gives_each_task_its_own_seed_and_groups_by_base_seed():
    runs = g.make_runs(False, g.SEEDS, init_per_task=True)
    assert {r.tag for r in runs} == {"lego_src_it"} and len({r.key for r in runs}) == 12
    for s in g.SEEDS:
        group = [r for r in runs if r.seed % g.INIT_STRIDE == s]
        assert sorted(r.task for r in group) == sorted(g.TASKS)
        assert len({r.seed for r in group}) == len(g.TASKS)  # four different inits
        assert len({g.adapter_path(g.Path("x"), r) for r in group}) == len(g.TASKS)
    default = {g.adapter_path(g.Path("x"), r) for r in g.make_runs(False, g.SEEDS)}
    assert not default & {g.adapter_path(g.Path("x"), r) for r in runs}  # never the default runs' folders
    assert all(r.epochs == g.EPOCHS[r.task] and r.steps is None for r in runs)


def test_a_stored_source_lora_at_another_rate_is_refused_before_training(tmp_path):
    import dataclasses
    import json

    import pytest

    run = g.make_runs(False, g.SEEDS)[0]
    row = {**dataclasses.asdict(dataclasses.replace(run, lr=run.lr * 2)), "key": run.key,
           "method_kwargs": json.dumps(run.method_kwargs, sort_keys=True)}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="lr="):
        g.train_all([run], tmp_path, workers=1, threads=1)
