"""Issue #7, bar 1: four GLUE LoRAs (SST-2, CoLA, RTE, MRPC; MiniLM) merged into one by LoRA-LEGO,
task arithmetic and TIES, all at the same merged rank; per-task and mean accuracy over 3 seeds.

Training: one LoRA per task and seed through :mod:`benchmarks.glue_harness` (r = 8, α = 16,
dropout 0.05, lr 1e-3, every Linear of the encoder; SST-2 one epoch, the others three), each saved
with its trained head (``modules_to_save=["classifier", "pooler"]``).

The head problem. Each task has its own trained classifier and pooler (all four tasks are
binary, but the heads are not interchangeable), and a merged LoRA cannot merge heads meaningfully.
So only the LoRA deltas are merged; each task is evaluated with the merged LoRA and *its own*
head: the four task adapters are loaded as named adapters of one MiniLM
(:mod:`lightning_lora.core.multi`), each merge adds a named adapter, and before scoring task t the
merged adapter gets task t's head (``copy_saved_modules``). This measures how much of each task's
low-rank update survives the merge, the quantity LoRA merging is about.

Merges, all rank 8 (the source rank), per seed over the same four adapters:

- ``lego``: LoRA-LEGO with the defaults of METHODS.md §6 (k = 8, canonicalised units, concat
  feature, parameter reweighting, λ by the norm rule, seed 0);
- ``ta_sum``: task arithmetic Σ ΔW_t (λ = 1), SVD-truncated to rank 8;
- ``ta_mean``: task arithmetic with λ = 1/4 (the mean), rank 8;
- ``ties``: TIES (density 0.2, λ = 1), rank 8.

The best baseline is the one with the highest mean over tasks and seeds (chosen after the fact,
which favours the baselines). Nothing is tuned on the reported sets; λ and density are the
papers' / PEFT's defaults. Ablations (reported, not used by the key): ``lego_plain`` (no
canonicalisation, no reweighting), ``lego_k32`` (k = all 32 units: the exact sum, so equal to
task arithmetic at full rank up to rounding), ``lego_feat_a`` / ``lego_feat_b`` (units clustered by
a or by b alone, the spec's open choice of feature; added after session 3's run, so that file has
neither). ``single`` is each task's own LoRA (upper bound).

Keys: ``<merge>_<task>_mean`` / ``_std`` (accuracy, points), ``<merge>_mean`` (mean over tasks of
the seed means), CoLA MCC and MRPC F1 as ``<merge>_cola_mcc_mean`` / ``<merge>_mrpc_f1_mean``,
``best_baseline_mean``, ``mean_gain_vs_best_baseline`` (points, LEGO minus the best baseline).

    python benchmarks/lego_glue.py --workers 6          # H200: 12 trainings (about 3-4 min) + merges
    python benchmarks/lego_glue.py --smoke              # CPU, tiny subsets, writes nothing
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from benchmarks.glue_harness import (  # noqa: E402
    GlueRun, _quiet, check_stored_budgets, eval_loader, evaluate, make_datamodule, read_jsonl, train_glue,
)
from lightning_lora.core import multi  # noqa: E402
from lightning_lora.merge import baselines as mb  # noqa: E402
from lightning_lora.merge import lego  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402
from lightning_lora.tasks import load_minilm  # noqa: E402

TASKS = ("sst2", "cola", "rte", "mrpc")
EPOCHS = {"sst2": 1.0, "cola": 3.0, "rte": 3.0, "mrpc": 3.0}
SEEDS = (0, 1, 2)
RANK = 8
LORA = {"r": RANK, "alpha": 16, "dropout": 0.05}
LR = 1e-3
BASELINES = ("ta_sum", "ta_mean", "ties")


#: ``--init-per-task``: task i of seed s trains with seed ``s + INIT_STRIDE * i`` (its own LoRA init)
INIT_STRIDE = 1000


def make_runs(smoke: bool, seeds: tuple[int, ...], init_per_task: bool = False) -> list[GlueRun]:
    """The 12 source runs. By default the four LoRAs of a seed share that seed, so they start from the
    same A (``seed_everything`` before injection); ``init_per_task`` gives each task its own seed."""
    tag = "lego_src_it" if init_per_task else "lego_src"
    size = dict(steps=3, max_samples=64, max_eval_samples=32) if smoke else {}
    return [GlueRun("lora", t, s + (INIT_STRIDE * i if init_per_task else 0), LORA, lr=LR, tag=tag,
                    **(size or {"epochs": EPOCHS[t]}))
            for i, t in enumerate(TASKS) for s in seeds]


def _train_one(run: dict[str, Any], adapter_dir: str, out_jsonl: str, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    with _quiet():
        result = train_glue(GlueRun(**run), adapter_dir=adapter_dir)
    with open(out_jsonl, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"[{result['key']}] accuracy {result['accuracy']:.4f} steps {result['steps']} {result['seconds']:.0f} s",
          flush=True)
    return result


def adapter_path(root: Path, run: GlueRun) -> Path:
    """Where a source LoRA is saved; ``--init-per-task``'s in a folder of their own (its SST-2 runs share
    the default runs' seeds)."""
    name = f"{run.task}_seed{run.seed}"
    return root / name if run.tag == "lego_src" else root / run.tag / name


def train_all(runs: list[GlueRun], root: Path, workers: int, threads: int) -> dict[str, dict[str, Any]]:
    """Train (resumably) and save every source LoRA; returns key -> train_glue result."""
    import dataclasses

    out_jsonl = root / "train.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    check_stored_budgets(runs, out_jsonl)  # a stored LoRA at another budget, rate or config is not this run
    done = {r["key"]: r for r in read_jsonl(out_jsonl)}
    todo = [r for r in runs if not (r.key in done and (adapter_path(root, r) / "adapter_model.safetensors").is_file())]
    todo.sort(key=lambda r: -EPOCHS[r.task] * {"sst2": 67349, "cola": 8551, "mrpc": 3668, "rte": 2490}[r.task])
    args = [(dataclasses.asdict(r), str(adapter_path(root, r)), str(out_jsonl), threads) for r in todo]
    if workers <= 1:
        for a in args:
            _train_one(*a)
    elif args:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for fut in [pool.submit(_train_one, *a) for a in args]:
                fut.result()
    done = {r["key"]: r for r in read_jsonl(out_jsonl)}
    return {r.key: done[r.key] for r in runs}


def merge_and_score(runs: list[GlueRun], root: Path, seed: int, device: torch.device, k_all: int
                    ) -> dict[str, dict[str, dict[str, float]]]:
    """merge -> task -> scores, for the four LoRAs of ``seed`` (with ``--init-per-task``: of seeds
    ``seed + INIT_STRIDE * i``)."""
    mine = {r.task: r for r in runs if r.seed % INIT_STRIDE == seed}
    model, tokenizer = load_minilm(num_labels=2)
    for task, run in mine.items():
        multi.load_adapter_as(model, adapter_path(root, run), task)
    model.to(device).eval()
    sources = list(mine)
    first = sources[0]
    merges = {
        "lego": lambda n: lego.lego_merge_adapters(model, sources, n, k=RANK, seed=0, modules_to_save_from=first),
        "ta_sum": lambda n: mb.merge_task_arithmetic(model, sources, n, rank=RANK, modules_to_save_from=first),
        "ta_mean": lambda n: mb.merge_task_arithmetic(model, sources, n, weights=[1 / len(sources)] * len(sources),
                                                      rank=RANK, modules_to_save_from=first),
        "ties": lambda n: mb.merge_ties(model, sources, n, density=0.2, lam=1.0, rank=RANK, modules_to_save_from=first),
        "lego_plain": lambda n: lego.lego_merge_adapters(model, sources, n, k=RANK, seed=0, canonicalize=False,
                                                         parameter_reweight=False, output_reweight="none",
                                                         modules_to_save_from=first),
        "lego_k32": lambda n: lego.lego_merge_adapters(model, sources, n, k=k_all, seed=0, parameter_reweight=False,
                                                       output_reweight="none", modules_to_save_from=first),
        # the spec's open choice of clustering feature (METHODS.md §6): a alone, b alone
        "lego_feat_a": lambda n: lego.lego_merge_adapters(model, sources, n, k=RANK, seed=0, feature="a",
                                                          modules_to_save_from=first),
        "lego_feat_b": lambda n: lego.lego_merge_adapters(model, sources, n, k=RANK, seed=0, feature="b",
                                                          modules_to_save_from=first),
    }
    for name, make in merges.items():
        start = time.perf_counter()
        make(name)
        print(f"[seed {seed}] merged {name} in {time.perf_counter() - start:.1f} s", flush=True)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for task, run in mine.items():
        loader = eval_loader(make_datamodule(run, tokenizer), run)
        multi.set_adapter(model, task)
        scores.setdefault("single", {})[task] = evaluate(model, loader, task, device)
        for name in merges:
            multi.copy_saved_modules(model, task, name)  # the merged LoRA with task's own head
            multi.set_adapter(model, name)
            scores.setdefault(name, {})[task] = evaluate(model, loader, task, device)
        print(f"[seed {seed}] {task}: " + ", ".join(f"{n} {s[task]['accuracy']:.4f}" for n, s in scores.items()),
              flush=True)
    return scores


def summarise(per_seed: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, float]:
    out: dict[str, float] = {}
    names = list(per_seed[0])
    for name in names:
        task_means = []
        for task in TASKS:
            for metric in per_seed[0][name][task]:
                values = [100.0 * s[name][task][metric] for s in per_seed]
                key = f"{name}_{task}" if metric == "accuracy" else f"{name}_{task}_{metric}"
                out[f"{key}_mean"] = statistics.fmean(values)
                out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            task_means.append(out[f"{name}_{task}_mean"])
        out[f"{name}_mean"] = statistics.fmean(task_means)
    best = max(BASELINES, key=lambda b: out[f"{b}_mean"])
    out["best_baseline_mean"] = out[f"{best}_mean"]
    out["best_baseline_index"] = BASELINES.index(best)  # 0 ta_sum, 1 ta_mean, 2 ties
    out["mean_gain_vs_best_baseline"] = out["lego_mean"] - out["best_baseline_mean"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=6, help="training processes sharing the GPU (1: in-process)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per training process")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--adapter-dir", default=None,
                   help="where the 12 source LoRAs are saved (resumable; default: <tmp>/lego_glue_adapters)")
    p.add_argument("--smoke", action="store_true", help="tiny subsets, a few steps, one seed, on CPU; writes nothing")
    p.add_argument("--init-per-task", action="store_true",
                   help="each task's run from its own seed (LoRA init, head init and data order; by default the "
                        "four LoRAs of a seed start from the "
                        "same A, which keeps their sum close to rank 8 and favours the SVD-of-the-sum baselines); "
                        "writes lego_glue_init_per_task.json")
    args = p.parse_args(argv)
    seeds = (0,) if args.smoke else SEEDS
    out_dir = Path(tempfile.mkdtemp(prefix="lego_glue_smoke_")) if args.smoke else Path(args.out or "benchmarks/results")
    default_root = out_dir / "lego_glue_adapters" if args.smoke else Path(tempfile.gettempdir()) / "lego_glue_adapters"
    root = Path(args.adapter_dir) if args.adapter_dir else default_root
    runs = make_runs(args.smoke, seeds, args.init_per_task)
    start = time.perf_counter()
    trained = train_all(runs, root, 1 if args.smoke else args.workers, args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.set_float32_matmul_precision("high")  # as train_glue scores, so reloaded adapters score the same
    k_all = RANK * len(TASKS)
    with _quiet():
        per_seed = [merge_and_score(runs, root, s, device, k_all) for s in seeds]
    for s, scores in zip(seeds, per_seed):  # loaded adapters score as they did right after training
        for run in (r for r in runs if r.seed % INIT_STRIDE == s):
            task = run.task
            got, want = scores["single"][task]["accuracy"], trained[run.key]["accuracy"]
            if abs(got - want) > 1e-6:
                print(f"WARNING: {task} seed {s}: reloaded adapter scores {got:.4f}, after training {want:.4f}")
    metrics = summarise(per_seed)
    metrics.update(rank=RANK, seeds=len(seeds), seconds=time.perf_counter() - start)
    print(json.dumps({k: round(v, 3) for k, v in metrics.items() if k.endswith("_mean") or "gain" in k}, indent=1))
    if args.smoke:
        print(f"smoke run: nothing written (adapters in {root})")
        return 0
    metrics["init_per_task"] = int(args.init_per_task)
    name = "lego_glue_init_per_task" if args.init_per_task else "lego_glue"
    path = write_result(name, metrics, command=current_command(), directory=out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
