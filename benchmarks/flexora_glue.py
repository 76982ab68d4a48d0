"""Issue #4, bar 3: Flexora vs LoRA on all layers, RTE and SST-2, all-MiniLM-L6-v2, 3 seeds.

Both methods train through ``benchmarks/glue_harness.py`` (``run_many``: MiniLM, ``AdapterCallback``
with LoRA on query/key/value/attention-output/intermediate/output of every block, head and pooler
trained in full, ``SequenceClassifier`` with AdamW and linear warmup/decay) with ``holdout=True``
for BOTH methods: the Trainer's validation set is a 10% slice carved from train (Flexora's gate
batches come from there) and the reported accuracy is on the GLUE dev set, which neither method
ever sees during training. Same r, α, lr, batch size and data order for both.

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
Per-run rows go to ``<out>/flexora_glue_runs.jsonl`` (resumable).

    python benchmarks/flexora_glue.py                 # full run on a GPU (~4-6 min on one H200)
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

from glue_harness import GlueRun, mean_std, run_many, run_stats  # noqa: E402

from lightning_lora.results import current_command, write_result  # noqa: E402

NAME = "flexora_glue"
TASKS = ("rte", "sst2")
NUM_BLOCKS = 6  # all-MiniLM-L6-v2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run into a temp dir; writes no result file")
    p.add_argument("--out", default="benchmarks/results", help="folder of the result JSON and the per-run JSONL")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rte-steps", type=int, default=1400, help="optimizer steps on RTE (~20 epochs of the 90%% train)")
    p.add_argument("--sst2-steps", type=int, default=2000, help="optimizer steps on SST-2 (~1 epoch)")
    p.add_argument("--search-fraction", type=float, default=0.2, help="share of the steps Flexora searches")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--gate-lr", type=float, default=0.01)
    p.add_argument("--gate-batches", type=int, default=2)
    p.add_argument("--gate-batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    return p.parse_args(argv)


def make_runs(args: argparse.Namespace, steps: dict[str, int], extra: dict[str, Any]) -> list[GlueRun]:
    runs: list[GlueRun] = []
    lora = dict(r=args.r, alpha=args.alpha)
    for task in TASKS:
        search = max(1, round(args.search_fraction * steps[task]))
        flexora = dict(lora, search_steps=search, gate_lr=args.gate_lr, gate_batches=args.gate_batches,
                       gate_batch_size=args.gate_batch_size)
        for seed in args.seeds:
            common = dict(task=task, seed=seed, lr=args.lr, steps=steps[task], holdout=True, **extra)
            runs.append(GlueRun("lora", method_kwargs=lora, tag="lora", **common))
            runs.append(GlueRun("flexora", method_kwargs=flexora, tag="flexora", **common))
    return runs


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["tag"], r["task"]), []).append(r)
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
    flex_all = [r for r in results if r["tag"] == "flexora"]
    lora_all = [r for r in results if r["tag"] == "lora"]
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
    runs = make_runs(args, steps, extra)
    start = time.perf_counter()
    results = run_many(runs, out_dir / f"{NAME}_runs.jsonl", workers=workers, device=device,
                       threads=1 if args.smoke else 2)
    metrics = summarise(results)
    metrics.update(rte_steps=steps["rte"], sst2_steps=steps["sst2"], search_fraction=args.search_fraction,
                   r=args.r, alpha=args.alpha, lr=args.lr, gate_lr=args.gate_lr, gate_batches=args.gate_batches,
                   gate_batch_size=args.gate_batch_size, wall_seconds=time.perf_counter() - start)
    for task in TASKS:
        print(f"{task}: LoRA {metrics[f'{task}_lora_accuracy']:.2f} ± {metrics[f'{task}_lora_accuracy_std']:.2f}  "
              f"Flexora {metrics[f'{task}_flexora_accuracy']:.2f} ± {metrics[f'{task}_flexora_accuracy_std']:.2f}  "
              f"gain {metrics[f'{task}_gain_vs_lora']:+.2f} points, "
              f"layers {metrics[f'{task}_flexora_layers_selected']:.1f}/{NUM_BLOCKS}", flush=True)
    print(f"trainable params ratio {metrics['trainable_params_ratio_vs_lora']:.3f} "
          f"(adapter only {metrics['adapter_params_ratio_vs_lora']:.3f}); {metrics['wall_seconds']:.0f} s", flush=True)
    if args.smoke:
        print(f"smoke run: no result file written (runs in {out_dir})")
        return 0
    path = write_result(NAME, metrics, command=command, directory=out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
