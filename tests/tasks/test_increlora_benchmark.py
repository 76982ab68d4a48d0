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
