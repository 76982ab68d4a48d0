"""Issue #5, bar 1: adapter structures and initialisations side by side on SST-2, RTE and MRPC (MiniLM).

Every method of issue #5 and LoRA r = 8, 3 seeds each, the same step budget per task (SST-2 1,000
steps, RTE and MRPC three epochs, batch 32), through :mod:`benchmarks.glue_harness`.

Learning rate: methods differ in the step size they need (an r×r core, FFA-LoRA's lone B), so each
method gets its own, chosen once on SST-2 from {5e-4, 1e-3, 2e-3, 5e-3} (``nlora_small_lr``:
{1e-5, 3e-5, 1e-4, 2e-4}) by the accuracy on a
10% slice carved from SST-2 *train* (400 steps, seed 0); the reported sets (GLUE dev, MRPC test) are
never used to choose anything. A method whose best rate is the top of its grid is swept over
{1e-2, 2e-2, 5e-2} as well (once), since its optimum may lie above the grid; its main runs at a rate
from that extension are tagged ``<method>/lr<rate>``. The chosen rate is used on all three tasks.

Ranks (MiniLM: hidden 384, intermediate 1536; every Linear of the encoder adapted):
- LoRA, SLoRA, NLoRA, IntTune, ALLoRA, FFA-LoRA: r = 8.
- Bone / Bat: block width 16 (r·out parameters per matrix: about LoRA r = 8's budget).
- LoRA-XS / LoRA-SB: r = 16 (r² per matrix: 36 times fewer than LoRA r = 8); LoRA-SB also at
  r = 21 (``lora_sb_r21``: 20.9 times fewer, the largest core the bar's 20-times budget allows), and
  ``lora_sb_sched`` (session 12): r = 16 with η₁'s ``warmup_ratio`` set to the harness's schedule
  (0.06, not the config's 0.02) and no dropout, as the official GLUE code. ``lora_sb_headlr`` and
  ``lora_xs_headlr`` (session 13): the head and pooler at LoRA's rate, 2e-3 (``GlueRun.head_lr``),
  the core's rate swept over {5e-3, 1e-2, 2e-2, 5e-2}.
- SMoRA: 64 rank-1 experts, top-8 active per token (the FLOPs of a rank-8 LoRA).
- ALLoRA: η = 1 (the paper's value is not public; METHODS.md §5); no dropout, s = 1 (forced).
  ``allora_update``: η = 10 with ``apply_to="update"`` (the optimizer's update scaled, not the
  gradient: under AdamW only this form changes B's first steps; ``allora_update_gain_vs_lora_rte``).

Keys (points, mean over tasks and seeds, method minus LoRA): ``lora_sb_gain_vs_lora``,
``allora_gain_vs_lora_rte`` (RTE only, the short run), ``nlora_gain_vs_lora``, and
``lora_sb_param_reduction`` (LoRA's adapter parameters over LoRA-SB's; the shared head excluded).
NLoRA runs in both init modes (METHODS.md §14): ``nlora`` (paper, the key above) and ``nlora_ref``
(official code; ``nlora_ref_gain_vs_lora``), and in the paper's mode again over a grid of smaller
learning rates (``nlora_small_lr``), because the paper's pseudo-inverse core makes it unstable at
LoRA's rates on MiniLM; and with the opt-in pseudo-inverse cut-off ``pinv_rtol`` 0.1 and 0.3
(``nlora_rtol01``, ``nlora_rtol03``: variants, not the paper's init, each with its own grid).
Per method and task: ``<tag>_<task>_mean`` / ``_std`` (accuracy, points), ``<tag>_adapter_params``,
``<tag>_lr``.

    python benchmarks/structure_init_glue.py --workers 8          # H200: sweep + 99 runs
    python benchmarks/structure_init_glue.py --smoke               # CPU, tiny subsets, writes nothing
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.glue_harness import GlueRun, best_rate, mean_std, rate_tag, read_jsonl, run_many  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402

#: tag -> (registered method, config); dropout 0.05 where the method has dropout (ALLoRA forbids it)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {"r": 8, "alpha": 16, "dropout": 0.05}),
    "bone": ("bone", {"r": 16}),
    "bat": ("bat", {"r": 16}),
    "lora_xs": ("lora_xs", {"r": 16, "alpha": 16, "dropout": 0.05}),
    "lora_sb": ("lora_sb", {"r": 16, "dropout": 0.05}),
    # the largest r×r core within the bar's budget (20 times fewer than LoRA r = 8's 331,776:
    # 36 × 21² = 15,876, 20.9 times fewer); r = 16 above is 36 times fewer
    "lora_sb_r21": ("lora_sb", {"r": 21, "dropout": 0.05}),
    # LoRA-SB with η₁'s warmup fraction equal to the harness's schedule (0.06; the config's 0.02 made the
    # init's jump 3 times the first warmup step's size) and no dropout, as the official GLUE code
    # (session 12 audit; η₁ = lr / (warmup_ratio · T) sets only R's starting size)
    "lora_sb_sched": ("lora_sb", {"r": 16, "dropout": 0.0, "warmup_ratio": 0.06}),
    # the head and pooler at LoRA's rate (2e-3) while the r×r core takes its own, higher rate (session 13,
    # from session 12's LoRA-SB audit: at R's best rate, 1e-2, the fresh head trains at 1e-2 too; the
    # official LoRA-XS GLUE code gives the head its own rate, `cls_learning_rate`)
    "lora_sb_headlr": ("lora_sb", {"r": 16, "dropout": 0.05}),
    "lora_xs_headlr": ("lora_xs", {"r": 16, "alpha": 16, "dropout": 0.05}),
    "slora": ("slora", {"r": 8, "dropout": 0.05}),
    "nlora": ("nlora", {"r": 8, "dropout": 0.05}),
    # the official code's init (first r rows/columns, no pseudo-inverse): the paper's random-index
    # Nyström core U⁺ is ill-conditioned on MiniLM (‖N‖ up to ~1.6e3 on value projections)
    "nlora_ref": ("nlora", {"r": 8, "init": "reference", "dropout": 0.05}),
    # the paper's init again, with smaller learning rates (see LR_GRIDS): at 5e-4, five AdamW steps
    # move MiniLM's last hidden states by 224% of their norm (LoRA: 10%)
    "nlora_small_lr": ("nlora", {"r": 8, "dropout": 0.05}),
    # the paper's init with the opt-in pseudo-inverse cut-off (METHODS.md §14: a design choice, not
    # the paper's): singular values of the r×r intersection below rtol·σ_max are dropped, which
    # bounds ‖N‖ (0.1: ‖N‖₂ ≤ 36 on MiniLM against up to 4,233 without; notes in docs/results.md)
    "nlora_rtol01": ("nlora", {"r": 8, "dropout": 0.05, "pinv_rtol": 0.1}),
    "nlora_rtol03": ("nlora", {"r": 8, "dropout": 0.05, "pinv_rtol": 0.3}),
    "inttune": ("inttune", {"r": 8, "dropout": 0.05}),
    "allora": ("allora", {"r": 8, "eta": 1.0}),
    # the update form (session 12): under AdamW a gradient scaled by c is divided by c again, so at η = 1
    # the gradient form above is LoRA at s = 1 with a mild per-row slowdown; scaling the update gives B at
    # zero its η-times larger step. η = 10 fixed beforehand (METHODS.md §5 leaves η open), not swept
    "allora_update": ("allora", {"r": 8, "eta": 10.0, "apply_to": "update"}),
    "ffa_lora": ("ffa_lora", {"r": 8, "dropout": 0.05}),
    "smora": ("smora", {"r": 64, "top_k": 8, "dropout": 0.05}),
}
LR_GRID = (5e-4, 1e-3, 2e-3, 5e-3)
#: GlueRun fields other than the method config, per tag (run and sweep alike)
RUN_FIELDS: dict[str, dict[str, Any]] = {"lora_sb_headlr": {"head_lr": 2e-3}, "lora_xs_headlr": {"head_lr": 2e-3}}
#: methods swept over another grid (chosen the same way, on the carved slice)
LR_GRIDS: dict[str, tuple[float, ...]] = {"nlora_small_lr": (1e-5, 3e-5, 1e-4, 2e-4),
                                          # the core's rate only (the head stays at 2e-3): around
                                          # LoRA-SB's 1e-2, where the plain rows peaked
                                          "lora_sb_headlr": (5e-3, 1e-2, 2e-2, 5e-2),
                                          "lora_xs_headlr": (5e-3, 1e-2, 2e-2, 5e-2),
                                          # B's first steps are up to η = 10 times the optimizer's: lower rates too
                                          "allora_update": (1e-4, 3e-4, 1e-3, 2e-3),
                                          "nlora_rtol01": (3e-5, 1e-4, 3e-4, 1e-3),
                                          "nlora_rtol03": (1e-4, 3e-4, 1e-3, 2e-3)}
#: swept too when a method's best rate is the top of its grid (session 5: LoRA-SB, FFA-LoRA, IntTune
#: and SLoRA still improved at 5e-3, so their optimum lay outside the grid); once, not repeated
EXTENDED_GRID = (1e-2, 2e-2, 5e-2)
#: the same step budget for every method: SST-2 1,000 steps (about half an epoch), RTE and MRPC 3 epochs
TASK_LENGTH: dict[str, dict[str, Any]] = {"sst2": {"steps": 1000}, "rte": {"epochs": 3.0}, "mrpc": {"epochs": 3.0}}
SEEDS = (0, 1, 2)


def sweep_runs(tags: list[str], steps: int, smoke: bool, grid: dict[str, tuple[float, ...]] | None = None) -> list[GlueRun]:
    """The carved-slice runs of ``tags`` over their grid (``grid[tag]`` when given)."""
    sub = {"max_samples": 256, "max_eval_samples": 64} if smoke else {}
    grids = grid or {t: LR_GRIDS.get(t, LR_GRID) for t in tags}
    return [GlueRun(METHODS[t][0], "sst2", 0, METHODS[t][1], lr=lr, steps=steps, holdout=True,
                    tag=f"sweep/{t}/lr{lr:g}", **RUN_FIELDS.get(t, {}), **sub) for t in tags for lr in grids[t]]


def at_top_edge(results: list[dict[str, Any]], tags: list[str]) -> list[str]:
    """Tags whose chosen rate is the largest of their grid: their optimum may lie above it."""
    return [t for t in tags if best_rate(results, t) == max(LR_GRIDS.get(t, LR_GRID))]


def run_tag(tag: str, lr: float) -> str:
    """The tag of ``tag``'s main runs (see :func:`benchmarks.glue_harness.rate_tag`)."""
    return rate_tag(tag, lr, LR_GRIDS.get(tag, LR_GRID))


def main_runs(tags: list[str], lrs: dict[str, float], smoke: bool) -> list[GlueRun]:
    sub = {"max_samples": 128, "max_eval_samples": 64} if smoke else {}
    length = (lambda task: {"steps": 4}) if smoke else (lambda task: TASK_LENGTH[task])
    return [GlueRun(METHODS[t][0], task, seed, METHODS[t][1], lr=lrs[t], tag=run_tag(t, lrs[t]), **length(task),
                    **RUN_FIELDS.get(t, {}), **sub)
            for t in tags for task in TASK_LENGTH for seed in SEEDS]


def summarise(results: list[dict[str, Any]], tags: list[str], lrs: dict[str, float]) -> dict[str, float]:
    acc: dict[str, dict[str, list[float]]] = {}
    params: dict[str, int] = {}
    method_of = {run_tag(t, lrs[t]): t for t in tags}
    for r in results:
        t = method_of[r["tag"]]
        acc.setdefault(t, {}).setdefault(r["task"], []).append(100.0 * r["accuracy"])
        params[t] = r["adapter_params"]
    m: dict[str, float] = {}
    for t in tags:
        for task, v in acc[t].items():
            ms = mean_std(v)
            m[f"{t}_{task}_mean"], m[f"{t}_{task}_std"] = ms["mean"], ms["std"]
        m[f"{t}_mean"] = statistics.fmean(x for v in acc[t].values() for x in v)
        m[f"{t}_adapter_params"] = params[t]
        m[f"{t}_lr"] = lrs[t]

    def gain(tag: str, tasks: tuple[str, ...] = tuple(TASK_LENGTH)) -> float:
        return statistics.fmean(m[f"{tag}_{k}_mean"] - m[f"lora_{k}_mean"] for k in tasks)

    for t in tags:
        if t != "lora":
            m[f"{t}_gain_vs_lora"] = gain(t)
    for t in tags:  # every ALLoRA and LoRA-SB variant gets its bar's own key
        if METHODS[t][0] == "allora":
            m[f"{t}_gain_vs_lora_rte"] = gain(t, ("rte",))
        elif METHODS[t][0] == "lora_sb":
            m[f"{t}_param_reduction"] = m["lora_adapter_params"] / m[f"{t}_adapter_params"]
    m["seeds"] = len(SEEDS)
    return m


def write_partial(args: argparse.Namespace) -> int:
    """Per method and task, mean/std accuracy (points) and run count of the finished runs in the raw file:
    the figures quoted while the benchmark is incomplete (no bar key is computed from them)."""
    rows = [r for r in read_jsonl(args.raw) if "error" not in r and not r["tag"].startswith("sweep/")]
    m: dict[str, float] = {}
    by: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        by.setdefault((r["tag"], r["task"]), []).append(100.0 * r["accuracy"])
        m[f"{r['tag']}_adapter_params"] = r["adapter_params"]
        m[f"{r['tag']}_lr"] = r["lr"]
    for (tag, task), v in sorted(by.items()):
        ms = mean_std(v)
        m.update({f"{tag}_{task}_mean": ms["mean"], f"{tag}_{task}_std": ms["std"], f"{tag}_{task}_runs": ms["n"]})
    for (tag, task) in sorted(by):  # per-task differences to LoRA, points (not the bar's mean over tasks)
        if tag != "lora" and ("lora", task) in by:
            m[f"{tag}_{task}_minus_lora"] = m[f"{tag}_{task}_mean"] - m[f"lora_{task}_mean"]
    devices = ", ".join(sorted({r["device"] for r in rows}))
    print("wrote", write_result("structure_init_glue_partial", m, command=current_command(), directory=args.out,
                                device=f"runs on {devices} (summarised from {args.raw})"))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per worker")
    p.add_argument("--raw", default="benchmarks/results/raw/structure_init_glue.jsonl",
                   help="one JSON line per finished run (the run resumes from it)")
    p.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    p.add_argument("--sweep-steps", type=int, default=400)
    p.add_argument("--only", default=None, help="comma-separated tags (default: all)")
    p.add_argument("--phase", choices=["all", "sweep"], default="all")
    p.add_argument("--smoke", action="store_true", help="tiny subsets, 2 methods, writes nothing")
    p.add_argument("--partial", action="store_true",
                   help="train nothing: summarise the runs already in --raw as structure_init_glue_partial.json")
    args = p.parse_args(argv)
    if args.partial:
        return write_partial(args)
    tags = args.only.split(",") if args.only else list(METHODS)
    if args.smoke:
        tags, args.sweep_steps = ["lora", "lora_sb"], 3
        args.raw = str(Path(tempfile.mkdtemp()) / "smoke.jsonl")
    if "lora" not in tags:
        tags = ["lora", *tags]
    sweep = run_many(sweep_runs(tags, args.sweep_steps, args.smoke), args.raw, args.workers, threads=args.threads)
    edge = at_top_edge(sweep, tags)
    if edge:
        print("best rate at the top of the grid, sweeping", EXTENDED_GRID, "too:", edge, flush=True)
        sweep += run_many(sweep_runs(edge, args.sweep_steps, args.smoke, {t: EXTENDED_GRID for t in edge}),
                          args.raw, args.workers, threads=args.threads)
    lrs = {t: best_rate(sweep, t) for t in tags}
    print("learning rates chosen on the carved SST-2 slice:", lrs, flush=True)
    if args.phase == "sweep":
        return 0
    results = run_many(main_runs(tags, lrs, args.smoke), args.raw, args.workers, threads=args.threads)
    metrics = summarise(results, tags, lrs)
    for k, v in sorted(metrics.items()):
        print(f"{k}: {v:.4g}")
    if not args.smoke and args.only is None:
        print("wrote", write_result("structure_init_glue", metrics, command=current_command(), directory=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
