"""benchmarks/increlora_glue.py: the official-script variants (``--incre-rank-num``, ``--increlora-dropout``)
reach the method config, keep the growth inside ``growth_end``, and get their own run tags; the
defaults are the ones the committed results were run with."""

from __future__ import annotations

from benchmarks import increlora_glue as g


def test_default_config_is_unchanged():
    args = g.parse_args([])
    kw = g.increlora_kwargs(args, "sst2", 1000)
    assert kw["incre_rank_num"] == 1 and "dropout" not in kw
    assert (kw["init_warmup"], kw["interval"]) == (70, 13)
    assert g.variant(args) == ""
    keys = [r.key for r in g.make_runs(args, {"rte": 1400, "sst2": 1000}, {}, {"lora": 2e-3, "increlora": 1e-2})]
    assert "increlora/lr0.01/sst2/seed0" in keys


def test_code_default_rank_num_and_dropout_variant():
    args = g.parse_args(["--incre-rank-num", "4", "--increlora-dropout", "0.3"])
    kw = g.increlora_kwargs(args, "sst2", 1000)
    assert kw["incre_rank_num"] == 4 and kw["dropout"] == 0.3
    # four ranks a chosen module: a quarter of the rounds, so a longer interval ends growth by the same step
    init_warmup, interval = kw["init_warmup"], kw["interval"]
    budget = sum(args.r * (m + n) for m, n in g.MODULE_SHAPES)
    start = sum(m + n + 1 for m, n in g.MODULE_SHAPES)
    rounds = -(-(budget - start) // min(m + n + 1 for m, n in g.MODULE_SHAPES) // (args.top_h * 4))
    assert interval > 13 and init_warmup + rounds * interval <= args.growth_end * 1000
    runs = g.make_runs(args, {"rte": 1400, "sst2": 1000}, {}, {"lora": 2e-3, "increlora": 1e-2})
    tags = {r.tag for r in runs}
    assert tags == {"lora", "increlora/lr0.01/k4/do0.3"}  # never counted as done by default runs


def test_other_step_budgets_get_their_own_tags_for_both_methods():
    args = g.parse_args(["--incre-rank-num", "4", "--increlora-dropout", "0.3"])
    runs = g.make_runs(args, {"rte": 1400, "sst2": 3000}, {}, {"lora": 2e-3, "increlora": 1e-2})
    tags = {(r.task, r.tag) for r in runs}
    assert tags == {("rte", "lora"), ("rte", "increlora/lr0.01/k4/do0.3"),
                    ("sst2", "lora/s3000"), ("sst2", "increlora/lr0.01/k4/do0.3/s3000")}
    assert {r.steps for r in runs if r.task == "sst2"} == {3000}


def test_committed_runs_are_reused_only_at_their_own_budget():
    """The recorded commands find their stored rows (no conflict) and every row they ask for is stored
    (session 13 trained the 3,000-step LoRA runs session 10 had taken from the 1,000-step rows); the
    clipped variant of the same command has keys of its own, and what is stored under them was trained
    clipped."""
    from benchmarks.glue_harness import check_stored_budgets, read_jsonl

    raw = "benchmarks/results/increlora_glue_runs.jsonl"
    stored = {r["key"] for r in read_jsonl(raw) if "error" not in r}
    lrs = {"lora": 2e-3, "increlora": 1e-2}
    runs = g.make_runs(g.parse_args(["--sst2-steps", "1000"]), {"rte": 1400, "sst2": 1000}, {}, lrs)
    check_stored_budgets(runs, raw)
    assert all(r.key in stored for r in runs)
    args = g.parse_args(["--sst2-steps", "3000", "--incre-rank-num", "4", "--increlora-dropout", "0.3"])
    runs = g.make_runs(args, {"rte": 1400, "sst2": 3000}, {}, lrs)
    check_stored_budgets(runs, raw)
    assert all(r.key in stored for r in runs)
    clipped = g.make_runs(args, {"rte": 1400, "sst2": 3000}, {"grad_clip": 1.0}, lrs)
    check_stored_budgets(clipped, raw)
    assert not {r.key for r in clipped} & {r.key for r in runs}  # no unclipped row is reused
    rows = {r["key"]: r for r in read_jsonl(raw) if "error" not in r}
    reused = [rows[r.key] for r in clipped if r.key in rows]  # session 15 trained some clipped runs
    assert all(row["grad_clip"] == 1.0 for row in reused)
    assert {r.grad_clip for r in clipped} == {1.0}


def test_grad_clip_tags_every_run_and_names_the_result():
    args = g.parse_args(["--sst2-steps", "6000", "--incre-rank-num", "4", "--increlora-dropout", "0.3",
                         "--grad-clip", "1.0"])
    runs = g.make_runs(args, {"rte": 1400, "sst2": 6000}, {"grad_clip": 1.0}, {"lora": 2e-3, "increlora": 1e-2})
    assert {(r.task, r.tag) for r in runs} == {("rte", "lora/c1"), ("rte", "increlora/lr0.01/k4/do0.3/c1"),
                                              ("sst2", "lora/s6000/c1"), ("sst2", "increlora/lr0.01/k4/do0.3/s6000/c1")}
    assert g.result_name({"rte": 1400, "sst2": 6000}, 1.0) == "increlora_glue_sst2_steps6000_clip1"
    assert g.result_name({"rte": 1400, "sst2": 1000}) == "increlora_glue"


def test_stored_unclipped_row_is_not_reused_for_a_clipped_run(tmp_path):
    """Even under the same key, a stored row conflicts with a request at another clipping, head rate or
    method config."""
    import dataclasses
    import json

    import pytest

    from benchmarks.glue_harness import GlueRun, check_stored_budgets

    run = GlueRun("lora", "sst2", 0, steps=10, lr=2e-3, tag="lora")
    raw = tmp_path / "runs.jsonl"
    row = {k: v for k, v in dataclasses.asdict(run).items() if k not in ("grad_clip", "head_lr")}
    row.update(key=run.key, method_kwargs=json.dumps(run.method_kwargs, sort_keys=True))  # as train_glue writes it
    raw.write_text(json.dumps(row) + "\n")
    check_stored_budgets([run], raw)  # rows from before the fields existed count as unclipped, one lr
    with pytest.raises(ValueError, match="grad_clip"):
        check_stored_budgets([dataclasses.replace(run, grad_clip=1.0)], raw)
    with pytest.raises(ValueError, match="head_lr"):
        check_stored_budgets([dataclasses.replace(run, head_lr=2e-3)], raw)
    # nor at another method config under the same tag
    with pytest.raises(ValueError, match="method_kwargs"):
        check_stored_budgets([dataclasses.replace(run, method_kwargs={"r": 4})], raw)


def test_other_budgets_write_their_own_result_file():
    assert g.result_name({"rte": 1400, "sst2": 1000}) == "increlora_glue"
    assert g.result_name({"rte": 1400, "sst2": 3000}) == "increlora_glue_sst2_steps3000"


def test_grad_clip_reaches_the_trainer():
    """``GlueRun.grad_clip`` becomes Lightning's ``gradient_clip_val`` (one step on 16 SST-2 examples)."""
    import lightning.pytorch as pl

    from benchmarks.glue_harness import GlueRun, train_glue

    seen: dict[str, object] = {}

    class Watch(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            seen["clip"] = trainer.gradient_clip_val

    run = GlueRun("lora", "sst2", 0, {"r": 2}, lr=1e-3, steps=1, batch_size=8, max_length=32,
                  max_samples=16, max_eval_samples=8, grad_clip=0.5)
    out = train_glue(run, device="cpu", callbacks=[Watch()])
    assert seen["clip"] == 0.5 and out["grad_clip"] == 0.5


def test_rate_per_task_tags_runs_with_their_rates_and_names_the_result():
    """``--rate-per-task``: each task's runs train at that task's rates and carry them in the tag, so a
    stored run counts as done only at the same rate; the result file is named apart."""
    args = g.parse_args(["--rate-per-task", "--incre-rank-num", "4", "--increlora-dropout", "0.3",
                         "--grad-clip", "1.0", "--sst2-steps", "6000"])
    lrs = {"rte": {"lora": 5e-4, "increlora": 2e-3}, "sst2": {"lora": 2e-3, "increlora": 5e-3}}
    runs = g.make_runs(args, {"rte": 1400, "sst2": 6000}, {"grad_clip": 1.0}, lrs)
    assert {(r.task, r.method, r.lr) for r in runs} == {
        ("rte", "lora", 5e-4), ("rte", "increlora", 2e-3), ("sst2", "lora", 2e-3), ("sst2", "increlora", 5e-3)}
    assert {(r.task, r.tag) for r in runs} == {
        ("rte", "lora/lr0.0005/c1"), ("rte", "increlora/lr0.002/k4/do0.3/c1"),
        ("sst2", "lora/lr0.002/s6000/c1"), ("sst2", "increlora/lr0.005/k4/do0.3/s6000/c1")}
    shared = g.make_runs(g.parse_args(["--incre-rank-num", "4", "--increlora-dropout", "0.3"]),
                         {"rte": 1400, "sst2": 6000}, {"grad_clip": 1.0}, {"lora": 2e-3, "increlora": 5e-3})
    by_key = {r.key: r for r in shared}
    reused = [r for r in runs if r.key in by_key]
    assert reused and all(r.lr == by_key[r.key].lr for r in reused)  # only a run at the very same rate is reused
    assert not any(r.task == "rte" and r.method == "lora" for r in reused)  # LoRA's RTE runs train anew
    assert g.result_name({"rte": 1400, "sst2": 6000}, 1.0, True) == "increlora_glue_sst2_steps6000_clip1_ratepertask"


def test_rate_sweep_on_another_task_carves_its_own_train_set(monkeypatch, tmp_path):
    """The RTE sweep trains and scores on RTE (a held-out slice of its train set), under tags of its own."""
    seen = []

    def fake_sweep(sweep_run, grid, extension, tags, out_jsonl, **kw):
        seen.extend(sweep_run(t, lr) for t in tags for lr in grid)
        return {t: min(grid) for t in tags}, []

    monkeypatch.setattr(g, "sweep_rates", fake_sweep)
    args = g.parse_args(["--rate-per-task", "--grad-clip", "1.0"])
    assert g.choose_lrs(args, {"grad_clip": 1.0}, tmp_path, 1, "cpu", task="rte") == {"lora": 5e-4, "increlora": 5e-4}
    assert {(r.task, r.holdout) for r in seen} == {("rte", True)}
    assert {r.tag for r in seen} >= {"sweep/lora/rte/lr0.0005/c1", "sweep/increlora/rte/lr0.002/c1"}
    seen.clear()
    g.choose_lrs(args, {"grad_clip": 1.0}, tmp_path, 1, "cpu")  # SST-2 keeps the stored rows' tags
    assert {r.task for r in seen} == {"sst2"} and "sweep/lora/lr0.002/c1" in {r.tag for r in seen}


def test_a_best_rate_on_either_edge_of_the_grid_is_swept_beyond_it(monkeypatch, tmp_path):
    """The sweep looks past the edge its best rate sits on, below the bottom as above the top: LoRA's
    RTE sweep chose the grid's lowest rate, and an upward-only extension could never test a lower one."""
    seen = {}

    def fake_sweep(sweep_run, grid, extension, tags, out_jsonl, **kw):
        seen.update(top=extension(max(grid), list(grid)), bottom=extension(min(grid), list(grid)),
                    inside=extension(sorted(grid)[1], list(grid)))
        return {t: min(grid) for t in tags}, []

    monkeypatch.setattr(g, "sweep_rates", fake_sweep)
    g.choose_lrs(g.parse_args(["--rate-per-task"]), {}, tmp_path, 1, "cpu", task="rte")
    assert seen["top"] == [5e-3, 1e-2]
    assert seen["bottom"] and max(seen["bottom"]) < 5e-4
    assert seen["inside"] == []
