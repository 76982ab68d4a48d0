"""Issue #4, bar 3: Flexora vs LoRA on all layers, RTE and SST-2, all-MiniLM-L6-v2, 3 seeds.

Both methods train through ``benchmarks/glue_harness.py`` (``run_many``: MiniLM, ``AdapterCallback``
with LoRA on query/key/value/attention-output/intermediate/output of every block, head and pooler
trained in full, ``SequenceClassifier`` with AdamW and linear warmup/decay) with ``holdout=True``
for BOTH methods: the Trainer's validation set is a 10% slice carved from train (Flexora's gate
batches come from there) and the reported accuracy is on the GLUE dev set, which neither method
ever sees during training. Same r, α, batch size and data order for both.

Learning rates: each method gets its own, chosen by accuracy on the 10% slice carved from SST-2
train (``holdout=True``; seed 0, ``--sweep-steps`` steps, Flexora searching the same
``search_fraction`` of them) over ``--lr-grid`` (default 2.5e-4, 5e-4, 1e-3, 2e-3); the reported eval
split (the GLUE dev set) is never read for this, and the one rate per method serves both tasks. A
method whose best rate is the grid's top is tried once more at 2× and 4× the top (4e-3, 8e-3), one
whose best is the grid's bottom once at half the bottom (1.25e-4); ties go to the smaller rate
(``glue_harness.best_rate``). (Flexora's gate batches come from that same carved slice, so its sweep
score is on rows its gates were trained on; the reported dev accuracy is not affected.) Flexora's
gate lr (``--gate-lr``) stays fixed. ``--lr X`` skips the sweep and runs both methods at X (the
behaviour before the sweep, whose fixed rate was 5e-4). Main runs at a rate other than 5e-4 are
tagged ``<method>/lr<rate>`` (``glue_harness.rate_tag``), so resuming from the raw file never reuses
a run made at another rate; the sweep runs are tagged ``sweep/<method>/lr<rate>``. The chosen rates
are ``rte_lora_lr``, ``rte_flexora_lr``, ``sst2_lora_lr`` and ``sst2_flexora_lr``, the sweep's slice
accuracies (points) ``sweep_<method>_accuracy_lr<rate>``.

Step budget: the same total optimizer steps for both. Flexora spends the first
``search_fraction`` of them searching (LoRA in every block, gates trained on validation batches:
``gate_batches`` micro-batches of ``gate_batch_size`` rows per step) and the rest retraining a fresh
LoRA in the selected blocks with a fresh warmup/decay schedule over those steps. The search's gate
steps are extra forward/backward passes on validation rows (not optimizer steps of the model), so
Flexora's wall time is higher; it is reported.

One gate per transformer block (6 for MiniLM-L6; the paper's layer unit). ``layers_selected`` is
read from the adapter parameter count after the fit: every block has the same LoRA size, so
``adapter_params(Flexora) / (adapter_params(LoRA) / 6)`` is the number of kept blocks. (Which
blocks: when a harness row carries ``adapter_summary``, the JSON of ``Flexora.summary()``, the
fraction of seeds that kept each block is reported too.) The classifier head and pooler train in
full for all steps in both methods; Flexora re-initialises only its LoRA factors at the switch.

Writes ``<out>/flexora_glue.json`` (via ``lightning_lora.results.write_result``) with, per task and
method, mean/std over seeds of accuracy (points), trainable parameters and layers selected, and the
bar's keys ``rte_gain_vs_lora`` and ``sst2_gain_vs_lora`` (Flexora minus LoRA mean accuracy, points)
and ``trainable_params_ratio_vs_lora`` (mean Flexora trainable parameters over LoRA's, head and
pooler included, both tasks pooled; ``adapter_params_ratio_vs_lora`` counts the LoRA factors only).
Per-run rows go to ``<out>/flexora_glue_runs.jsonl`` (resumable; keyed by tag/task/seed: runs at a
step budget other than the stored untagged ones' are tagged ``/s<steps>``, and ``glue_harness``
refuses to reuse a stored run of the same key at another budget).

``--retrain-budget full`` (session 12, after an audit of the official code, kithib/Flexora): there the
search is a run of its own and the retraining a fresh run with exactly the LoRA baseline's recipe;
here by default (``shared``) the search's steps come out of LoRA's budget, so the retraining gets
80% of LoRA's steps. ``full`` gives the retraining LoRA's whole budget and runs the search on top
(Flexora's runs tagged ``/full``; ``flexora_glue_retrain_full.json``). The learning rates still come
from the ``shared`` sweep.

    python benchmarks/flexora_glue.py                 # full run on a GPU (~4-6 min on one H200, plus the sweep)
    python benchmarks/flexora_glue.py --smoke         # CPU smoke: tiny subsets, a few steps, temp dir
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from glue_harness import GlueRun, budget_name, budget_tag, mean_std, rate_tag, run_many, run_stats, sweep_rates  # noqa: E402

from lightning_lora.results import current_command, write_result  # noqa: E402

NAME = "flexora_glue"
TASKS = ("rte", "sst2")
NUM_BLOCKS = 6  # all-MiniLM-L6-v2
METHODS = ("lora", "flexora")
#: the fixed rate of the runs before the sweep: main runs at it keep the plain tags ``lora``/``flexora``
FIXED_LR = 5e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run into a temp dir; writes no result file")
    p.add_argument("--out", default="benchmarks/results", help="folder of the result JSON and the per-run JSONL")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rte-steps", type=int, default=1400, help="optimizer steps on RTE (~20 epochs of the 90%% train)")
    p.add_argument("--sst2-steps", type=int, default=2000, help="optimizer steps on SST-2 (~1 epoch)")
    p.add_argument("--search-fraction", type=float, default=0.2, help="share of the steps Flexora searches")
    p.add_argument("--retrain-budget", choices=["shared", "full"], default="shared",
                   help="shared: Flexora's search comes out of LoRA's step budget (sessions 3-11); full: "
                        "the search comes on top and the retraining gets LoRA's full budget, as in the "
                        "official code (search and retraining are separate runs there); writes "
                        "flexora_glue_retrain_full.json")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=None,
                   help="one fixed lr for both methods, no sweep (default: each method's chosen on a slice of SST-2 train)")
    p.add_argument("--lr-grid", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3, 2e-3])
    p.add_argument("--sweep-steps", type=int, default=400, help="steps of each sweep run (SST-2, seed 0)")
    p.add_argument("--gate-lr", type=float, default=0.01)
    p.add_argument("--gate-batches", type=int, default=2)
    p.add_argument("--gate-batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    return p.parse_args(argv)


def method_kwargs(args: argparse.Namespace, method: str, steps: int) -> dict[str, Any]:
    lora = dict(r=args.r, alpha=args.alpha)
    if method == "lora":
        return lora
    search = max(1, round(args.search_fraction * steps))
    return dict(lora, search_steps=search, gate_lr=args.gate_lr, gate_batches=args.gate_batches,
                gate_batch_size=args.gate_batch_size)


def grid_extension(best: float, grid: list[float]) -> list[float]:
    """Rates to try once more when ``best`` sits on an edge of ``grid``: 2× and 4× the top, or half the
    bottom; none otherwise."""
    if best == max(grid):
        return [2 * best, 4 * best]
    if best == min(grid):
        return [best / 2]
    return []


def choose_lrs(args: argparse.Namespace, extra: dict[str, Any], out_dir: Path, workers: int,
               device: str | None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Each method's lr (and the sweep's rows): the best of ``--lr-grid`` (extended once at an edge, see
    :func:`grid_extension`) by accuracy on the 10% slice carved from SST-2 train (seed 0,
    ``--sweep-steps``); the reported GLUE dev sets are never read for this."""
    steps = 4 if args.smoke else args.sweep_steps
    return sweep_rates(
        lambda m, lr: GlueRun(m, "sst2", 0, method_kwargs(args, m, steps), lr=lr, steps=steps, holdout=True,
                              tag=f"sweep/{m}/lr{lr:g}", **extra),
        args.lr_grid, grid_extension, METHODS, out_dir / f"{NAME}_runs.jsonl", workers=workers, device=device,
        threads=1 if args.smoke else 2, extend=not args.smoke)


#: the step budgets the raw file's runs without a step tag were trained at
UNTAGGED_STEPS = {"rte": 1400, "sst2": 1000}


def make_runs(args: argparse.Namespace, steps: dict[str, int], extra: dict[str, Any],
              lrs: dict[str, float]) -> list[GlueRun]:
    """Both methods' runs. A budget other than the untagged runs' is tagged ``/s<steps>`` for both
    methods, and ``--retrain-budget full`` tags Flexora's ``/full``: the raw file keys runs by tag, task
    and seed, and ``glue_harness`` refuses a key stored at another budget."""
    runs: list[GlueRun] = []
    for task in TASKS:
        budget = budget_tag(steps[task], UNTAGGED_STEPS[task])
        for seed in args.seeds:
            for m in METHODS:
                kwargs = method_kwargs(args, m, steps[task])
                run_steps, suffix = steps[task], budget
                if m == "flexora" and args.retrain_budget == "full":  # the search on top of LoRA's budget
                    run_steps, suffix = steps[task] + kwargs["search_steps"], budget + "/full"
                # plain tag only at FIXED_LR: the raw file's runs from before the sweep are at that rate
                runs.append(GlueRun(m, method_kwargs=kwargs, lr=lrs[m], tag=rate_tag(m, lrs[m], [FIXED_LR]) + suffix,
                                    task=task, seed=seed, steps=run_steps, holdout=True, **extra))
    return runs


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:  # "flexora/lr0.001" (a rate other than FIXED_LR) counts as "flexora"
        by.setdefault((r["tag"].split("/")[0], r["task"]), []).append(r)
    metrics: dict[str, Any] = {}
    for task in TASKS:
        lora, flex = by[("lora", task)], by[("flexora", task)]
        per_block = statistics.fmean(r["adapter_params"] for r in lora) / NUM_BLOCKS
        selected = [r["adapter_params"] / per_block for r in flex]
        for tag, rows in (("lora", lora), ("flexora", flex)):
            metrics.update(run_stats(rows, f"{task}_{tag}"))
        sel = mean_std(selected)
        metrics[f"{task}_flexora_layers_selected"] = sel["mean"]
        metrics[f"{task}_flexora_layers_selected_std"] = sel["std"]
        metrics[f"{task}_flexora_layers_selected_per_seed"] = {f"seed{r['seed']}": n for r, n in zip(flex, selected)}
        metrics[f"{task}_lora_layers"] = NUM_BLOCKS
        summaries = [json.loads(r["adapter_summary"]) for r in flex if r.get("adapter_summary")]
        if len(summaries) == len(flex):  # which blocks were kept, per block: fraction of seeds
            for i, block in enumerate(summaries[0]["layers"]):
                kept = sum(block in s["selected"] for s in summaries) / len(summaries)
                metrics[f"{task}_flexora_block{i}_selected_fraction"] = kept
        metrics[f"{task}_gain_vs_lora"] = metrics[f"{task}_flexora_accuracy"] - metrics[f"{task}_lora_accuracy"]
    flex_all = [r for r in results if r["tag"].split("/")[0] == "flexora"]
    lora_all = [r for r in results if r["tag"].split("/")[0] == "lora"]
    for key in ("trainable_params", "adapter_params"):
        ratio = statistics.fmean(r[key] for r in flex_all) / statistics.fmean(r[key] for r in lora_all)
        metrics[f"{key}_ratio_vs_lora"] = ratio
    metrics["seeds"] = len({r["seed"] for r in results})
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = current_command() if argv is None else " ".join(["python", "benchmarks/flexora_glue.py", *argv])
    if args.smoke:
        # one worker process (one import of torch/transformers), one seed, 4 steps: 2 search + 2 retrain
        steps = {"rte": 4, "sst2": 4}
        args.seeds = args.seeds[:1]
        args.search_fraction = 0.5
        extra = dict(max_samples=64, max_eval_samples=32, batch_size=8, max_length=48)
        args.gate_batch_size = 8
        out_dir = Path(tempfile.mkdtemp(prefix="flexora_glue_smoke_"))
        device = args.device or "cpu"
        workers = 1
    else:
        steps = {"rte": args.rte_steps, "sst2": args.sst2_steps}
        extra = {}
        out_dir = Path(args.out)
        device = args.device
        workers = args.workers
    start = time.perf_counter()
    swept: list[dict[str, Any]] = []
    if args.lr is None:
        lrs, swept = choose_lrs(args, extra, out_dir, workers, device)
    else:
        lrs = {m: args.lr for m in METHODS}
    print("learning rates:", lrs, flush=True)
    runs = make_runs(args, steps, extra, lrs)
    results = run_many(runs, out_dir / f"{NAME}_runs.jsonl", workers=workers, device=device,
                       threads=1 if args.smoke else 2)
    metrics = summarise(results)
    metrics.update(rte_steps=steps["rte"], sst2_steps=steps["sst2"], search_fraction=args.search_fraction,
                   retrain_full_budget=int(args.retrain_budget == "full"),
                   r=args.r, alpha=args.alpha, gate_lr=args.gate_lr, gate_batches=args.gate_batches,
                   gate_batch_size=args.gate_batch_size, lr_swept=int(args.lr is None),
                   wall_seconds=time.perf_counter() - start)
    if args.lr is not None:
        metrics["lr"] = args.lr
    else:
        metrics.update({f"lr_grid_{i}": lr for i, lr in enumerate(args.lr_grid)})
        metrics["sweep_steps"] = args.sweep_steps if not args.smoke else 4
        for r in swept:  # accuracy (points) on the slice carved from SST-2 train
            metrics[f"sweep_{r['tag'].split('/')[1]}_accuracy_lr{r['lr']:g}"] = 100.0 * r["holdout_accuracy"]
    for task in TASKS:
        print(f"{task}: lr LoRA {metrics[f'{task}_lora_lr']:g} Flexora {metrics[f'{task}_flexora_lr']:g}", flush=True)
        print(f"{task}: LoRA {metrics[f'{task}_lora_accuracy']:.2f} ± {metrics[f'{task}_lora_accuracy_std']:.2f}  "
              f"Flexora {metrics[f'{task}_flexora_accuracy']:.2f} ± {metrics[f'{task}_flexora_accuracy_std']:.2f}  "
              f"gain {metrics[f'{task}_gain_vs_lora']:+.2f} points, "
              f"layers {metrics[f'{task}_flexora_layers_selected']:.1f}/{NUM_BLOCKS}", flush=True)
    print(f"trainable params ratio {metrics['trainable_params_ratio_vs_lora']:.3f} "
          f"(adapter only {metrics['adapter_params_ratio_vs_lora']:.3f}); {metrics['wall_seconds']:.0f} s", flush=True)
    if args.smoke:
        print(f"smoke run: no result file written (runs in {out_dir})")
        return 0
    # the bar's file at the untagged runs' budgets; another budget or the full retraining its own file
    name = NAME + budget_name(steps, UNTAGGED_STEPS) + ("_retrain_full" if args.retrain_budget == "full" else "")
    path = write_result(name, metrics, command=command, directory=out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
