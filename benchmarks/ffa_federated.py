"""FFA-LoRA vs LoRA in federated fine-tuning: 8 simulated Flower clients, Dirichlet non-IID splits.

Tasks: SST-2 with all-MiniLM-L6-v2, and lncRNA vs mRNA on data/lncrna/train (encoder of the
shipped nucleotide BERT, new head; one 256-token window per transcript; eval on data/lncrna/val).
Per task: FFA-LoRA and LoRA without DP (seed 0), and with DP-SGD at ε = 6, δ = 1e-5 (seeds 0, 1, 2).
Every run: 8 clients (Dirichlet α = 0.5 over labels, split seed 0), R rounds of K local SGD steps
(the paper's optimizer), FedAvg weighted by client size, the global model scored once at the end.

Adapters sit on every encoder Linear and on the pooler and classifier (``modules_to_save`` empty):
the head is adapted, not trained in full, so what travels is the adapter alone (B for FFA-LoRA,
A and B for LoRA). A head trained in full (148k numbers for MiniLM's pooler + classifier) would be
sent whole by both methods and would push the measured ratio above 1/2 whatever the method.

Learning rates (deviation from the paper's grids, FFA {0.1-1.0}, LoRA {0.01-0.1}; METHODS §16):
defaults are FFA-LoRA 5.0 (ten times the top of its grid) and LoRA 0.5 on SST-2, 0.2 on lncRNA
(see below; LoRA 1.0
diverged on lncRNA within 30 steps, loss 2e5, and 2.0 on SST-2); the other settings, SGD, K = 10
local steps, r = α = 8, are the paper's. Why: the head here is MiniLM's
pooler and a fresh classifier, both frozen with a LoRA (B = 0) on them, so logits start at
std ~0.015 and every gradient is small (batch gradient norm at init ~1e-2 over all adapter
tensors, per-example ~0.22), and the run has 200 local steps per client, not the paper's 10,000.
At the paper's lrs nothing moves: the first H200 run (FFA 0.5, LoRA 0.05) scored 0.5092 on SST-2
dev for both, the majority class. CPU checks (2,000-row SST-2 train slice, 200-row dev slice whose
majority is 0.54, batch 32, SGD): one client, 200 steps: FFA 0.5 loss 0.693 -> 0.678, dev 0.55
(balanced 0.51); FFA 5.0 -> 0.373, dev 0.79; LoRA 0.05 -> 0.689, dev 0.54 (balanced 0.50); LoRA
0.5 -> 0.439, dev 0.765. Federated, 2 clients with a Dirichlet(0.5) split, 10 rounds x 10 steps:
FFA 5.0 dev 0.75 (balanced 0.76, loss 0.543); LoRA 0.5 dev 0.555 (balanced 0.53, loss 0.659),
LoRA 1.0 dev 0.615 (balanced 0.64, loss 0.671). (That run is ~100 steps' worth of global progress;
the default one, 20 rounds x 10 steps, ~200, where one client's LoRA 0.5 reached 0.765.)
LoRA on lncRNA: 0.2 (session 5, H200: LoRA 0.5 without DP ended with NaN weights, eval loss NaN,
accuracy 0.158 = every row called lncRNA; 1.0 diverged within 30 steps; FFA-LoRA 5.0 was fine there,
0.915). The rule: the largest of {1, 0.5, 0.2} whose training stays finite, read from the training
run, not from the eval score (0.2 held in session 6: eval loss 0.279 without DP; each run's eval
loss is kept, NaN = diverged). LoRA's update B·A has curvature that grows with |A|·|B| (FFA-LoRA's,
linear in B, does not), so plain SGD on it goes unstable at a fixed lr once B has grown.

DP (ε = 6, δ = 1e-5, sample-level, Opacus RDP): clipping bound C per task = the median
per-example gradient norm at init on the training rows (Abadi et al. 2016's rule; the quantile
adaptive clipping of Andrew et al. 2021 targets the same), SST-2 0.25, lncRNA 0.8. CPU check
(seed-0 model, all adapter tensors, 128 SST-2 / 64 lncRNA train rows): per-example norm quantiles
10/50/90/max SST-2 FFA 0.198/0.234/0.273/0.411, LoRA 0.205/0.240/0.288/0.334; lncRNA FFA
0.61/0.77/0.95/1.03, LoRA 0.71/0.85/1.05/1.15. The paper's C = 2 (its grid 2, 5, 10, for
RoBERTa-large) never clips here, so the noise std σ·C on the summed gradient is 8x (SST-2) /
2.5x (lncRNA) larger than it needs to be for the same ε, and the noise on the parameters, lr·σ·C/B
per coordinate per step, scales with each method's lr: at C = 2 FFA-LoRA (lr 5) takes 10x LoRA's
(lr 0.5) parameter noise. Session 5 (C = 2, seed 0): SST-2 DP FFA 0.509 (the majority class, eval
loss 0.699) vs LoRA 0.702; lncRNA FFA 0.842 (majority) vs LoRA 0.905. CPU check of C on held-out
*training* rows (SST-2 train slice: one DP client on 2,000 rows, scored on 500 other train rows,
majority 0.552; 20 rounds x 10 steps, batch 32, ε 6, δ 1e-5, σ 0.646, max length 40): FFA-LoRA
lr 5, C = 2: 0.544 (balanced 0.505, loss 1.98); C = 0.25: 0.730 (balanced 0.725, loss 0.79);
LoRA lr 0.5, C = 2: 0.544 (balanced 0.497, loss 2.47); C = 0.25: 0.552 (balanced 0.50, loss 1.69)
(one client has no FedAvg averaging of the noise, so LoRA fails at both; the smaller C does not
hurt it).
The lrs stay those of the runs without DP (not tuned on the eval set). σ is per client (its own q = 32/n_k, same ε over
the same 200 steps): SST-2 0.447 (n 19,510) to 1.62 (n 269), lncRNA 0.467 (n 13,589) to 7.0
(n 53); the result holds the largest client's σ and the range.

Bytes are measured, not computed: every FitIns / FitRes is serialised with Flower's protobuf serde
(the gRPC payload) and counted (see lightning_lora/federated/strategy.py).

Metrics (benchmarks/results/ffa_federated.json):
- ``bytes_ratio_ffa_vs_lora``: FFA-LoRA message bytes per round / LoRA's, the larger of the two tasks;
- ``dp_eps6_gain_vs_lora``: mean over 3 seeds of FFA-LoRA accuracy − LoRA accuracy under DP ε = 6,
  in points, the smaller of the two tasks; ``<task>.*``: every per-task figure (accuracy without DP,
  per-seed DP accuracies, ε spent, σ, bytes).

    python benchmarks/ffa_federated.py                 # GPU, both tasks in parallel processes (see below)
    python benchmarks/ffa_federated.py --smoke         # CPU, tiny slices, < 1 min, writes nothing

Runtime on one H200 (session 5, both tasks side by side, ``--workers``): per run ~2-3 min (no DP:
FFA 128-131 s, LoRA 135-139 s; DP: FFA 159-163 s, LoRA 178-182 s), so one seed ~10.5 min and
three seeds ~22 min per task, ~22 min for both. This exceeds the ~8 min house budget: run it as a
background job. Each finished federation is appended to ``--raw`` (keyed by every setting it
depends on), so a run stopped by a session's deadline continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.glue_harness import mean_std, read_jsonl  # noqa: E402

TASK_TARGETS = {
    "sst2": ["query", "key", "value", "output.dense", "intermediate.dense", "pooler.dense", "classifier"],
    "lncrna": ["query", "key", "value", "dense", "classifier"],  # "dense" includes pooler.dense
}


#: per-task DP clipping bound C: the median per-example gradient norm at init (see the docstring)
TASK_CLIP = {"sst2": 0.25, "lncrna": 0.8}
#: per-task SGD lr of LoRA (FFA-LoRA: --lr-ffa on both): 0.5 gave NaN on lncRNA (see the docstring)
TASK_LR_LORA = {"sst2": 0.5, "lncrna": 0.2}

DEFAULT_RAW = "benchmarks/results/raw/ffa_federated.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="sst2,lncrna")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr-ffa", type=float, default=5.0, help="SGD lr of FFA-LoRA (paper grid 0.1-1.0; see the docstring)")
    p.add_argument("--lr-lora", type=float, default=None,
                   help=f"SGD lr of LoRA (paper grid 0.01-0.1; default per task {TASK_LR_LORA}; see the docstring)")
    p.add_argument("--dirichlet-alpha", type=float, default=0.5)
    p.add_argument("--epsilon", type=float, default=6.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=None,
                   help=f"DP per-example clipping bound C (default per task {TASK_CLIP}: the median "
                        "per-example gradient norm at init; the paper's grid 2, 5, 10 never clips here)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=2, help="task processes in parallel (one GPU shared)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny data slices, writes no result file")
    p.add_argument("--out", default=None, help="result directory (default benchmarks/results)")
    p.add_argument("--raw", default=None,
                   help="one JSON line per finished federation; a rerun skips those with the same settings "
                        f"(default {DEFAULT_RAW}; none with --smoke)")
    return p.parse_args(argv)


#: what a federation's raw line keeps (the figures the summary reads)
RAW_KEYS = ("accuracy", "balanced_accuracy", "loss", "message_bytes_per_round", "down_tensor_bytes_per_round",
            "up_tensor_bytes_per_round", "exchanged_params", "seconds", "client_sizes", "max_client_epsilon",
            "noise_multiplier", "noise_multiplier_min", "noise_multiplier_max", "noise_multipliers",
            "noise_multiplier_client_sizes")
_LIST_KEYS = {"client_sizes": int, "noise_multiplier_client_sizes": int, "noise_multipliers": float}


def lr_of(args: argparse.Namespace, task: str, method: str) -> float:
    if method == "ffa_lora":
        return args.lr_ffa
    return args.lr_lora if args.lr_lora is not None else TASK_LR_LORA[task]


def clip_of(args: argparse.Namespace, task: str) -> float:
    return args.clip if args.clip is not None else TASK_CLIP[task]


def run_key(args: argparse.Namespace, task: str, method: str, seed: int, dp: bool) -> str:
    """Everything a federation's result depends on, so a changed setting never reuses an old line.
    (DP keys carry ``sigma2``: rows from before σ was reported per client are not reused.)"""
    lr = lr_of(args, task, method)
    dp_part = f"dp_eps{args.epsilon:g}_delta{args.delta:g}_clip{clip_of(args, task):g}_sigma2" if dp else "nodp"
    return (f"{task}/{method}/seed{seed}/{dp_part}/lr{lr:g}/c{args.clients}_a{args.dirichlet_alpha:g}"
            f"/R{args.rounds}_k{args.local_steps}_b{args.batch_size}_r{args.r}")


def append_raw(path: str | None, row: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:  # one write per line: the two task processes may append at once
        f.write(json.dumps(row) + "\n")


def task_options(task: str, smoke: bool) -> dict:
    if not smoke:
        return {}
    if task == "sst2":
        return {"max_train": 64, "max_eval": 32, "max_length": 32}
    return {"max_train": 64, "max_eval": 32, "window_tokens": 64}


def run_task(task: str, args: argparse.Namespace) -> dict:
    """All runs of one task (one process). Returns the task's metrics."""
    from lightning_lora.federated import DPConfig, FederationConfig, LocalTraining, build_task, run_simulation

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = build_task(task, seed=0, **task_options(task, args.smoke))
    prep = time.perf_counter() - t0
    print(f"[{task}] data ready in {prep:.0f} s: {len(data.train)} train, {len(data.eval)} eval rows", flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]

    done = {row["key"]: row for row in read_jsonl(args.raw)} if args.raw else {}

    def one(method: str, seed: int, dp: bool) -> dict:
        key = run_key(args, task, method, seed, dp)
        if key in done:
            print(f"[{task}] {method} seed {seed} dp={dp}: from {args.raw}", flush=True)
            return done[key]
        cfg = FederationConfig(
            task=task, method=method, adapter={"r": args.r, "alpha": float(args.r), "target_modules": TASK_TARGETS[task],
                                               "modules_to_save": []},
            num_clients=args.clients, dirichlet_alpha=args.dirichlet_alpha, split_seed=0,
            min_client_size=args.batch_size, num_rounds=args.rounds,
            local=LocalTraining(local_steps=args.local_steps, batch_size=args.batch_size,
                                lr=lr_of(args, task, method), optimizer="sgd"),
            dp=DPConfig(epsilon=args.epsilon, delta=args.delta, max_grad_norm=clip_of(args, task)) if dp else None,
            seed=seed, device=device,
        )
        out = run_simulation(cfg, task=data)
        out = {k: list(map(_LIST_KEYS[k], out.get(k) or [])) if k in _LIST_KEYS else float(out.get(k) or 0.0)
               for k in RAW_KEYS}
        append_raw(args.raw, {"key": key, **out})
        print(f"[{task}] {method} seed {seed} dp={dp}: accuracy {out['accuracy']:.4f} "
              f"eps {out.get('max_client_epsilon', 0):.2f} bytes/round {out['message_bytes_per_round']:.0f} "
              f"{out['seconds']:.0f} s", flush=True)
        return out

    res: dict = {"train_rows": len(data.train), "eval_rows": len(data.eval), "prep_seconds": prep,
                 "lr_ffa_lora": lr_of(args, task, "ffa_lora"), "lr_lora": lr_of(args, task, "lora"),
                 "dp_clip": clip_of(args, task)}
    plain = {m: one(m, seeds[0], False) for m in ("ffa_lora", "lora")}
    for m, o in plain.items():
        res[f"{m}_nodp_accuracy"] = o["accuracy"]
        res[f"{m}_nodp_balanced_accuracy"] = o["balanced_accuracy"]
        if o.get("loss") is not None:  # NaN: the run diverged; absent: a row from before the loss was kept
            res[f"{m}_nodp_eval_loss"] = o["loss"]
        res[f"{m}_message_bytes_per_round"] = o["message_bytes_per_round"]
        res[f"{m}_tensor_bytes_per_round"] = o["down_tensor_bytes_per_round"] + o["up_tensor_bytes_per_round"]
        res[f"{m}_exchanged_params"] = o["exchanged_params"]
        res[f"{m}_nodp_seconds"] = o["seconds"]
    res["client_sizes_min"] = min(plain["lora"]["client_sizes"])
    res["client_sizes_max"] = max(plain["lora"]["client_sizes"])
    res["bytes_ratio_ffa_vs_lora"] = plain["ffa_lora"]["message_bytes_per_round"] / plain["lora"]["message_bytes_per_round"]
    gains = []
    for seed in seeds:
        dp_runs = {m: one(m, seed, True) for m in ("ffa_lora", "lora")}
        for m, o in dp_runs.items():
            res[f"{m}_dp_seed{seed}_accuracy"] = o["accuracy"]
            res[f"{m}_dp_seed{seed}_epsilon"] = o["max_client_epsilon"]
            res[f"{m}_dp_seed{seed}_balanced_accuracy"] = o["balanced_accuracy"]
            # σ is per client (q = batch / n_k): the largest client's, and the range over clients
            res[f"{m}_dp_seed{seed}_noise_multiplier"] = o["noise_multiplier"]
            res[f"{m}_dp_seed{seed}_noise_multiplier_min"] = o.get("noise_multiplier_min", 0.0)
            res[f"{m}_dp_seed{seed}_noise_multiplier_max"] = o.get("noise_multiplier_max", 0.0)
        gains.append(100 * (dp_runs["ffa_lora"]["accuracy"] - dp_runs["lora"]["accuracy"]))
    for m in ("ffa_lora", "lora"):
        res[f"{m}_dp_mean_accuracy"] = float(np.mean([res[f"{m}_dp_seed{s}_accuracy"] for s in seeds]))
    # the sample std over seeds, as every other "_std" / "±" figure (np.std's default, the population
    # std, understated it by sqrt(2/3) at 3 seeds)
    gain = mean_std(gains)
    res["dp_eps6_gain_vs_lora"], res["dp_eps6_gain_vs_lora_std"] = gain["mean"], gain["std"]
    res["seconds"] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.clients, args.rounds, args.local_steps, args.batch_size, args.seeds = 2, 1, 1, 4, "0"
        args.delta = 1e-3
    elif args.raw is None:
        args.raw = DEFAULT_RAW
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(tasks) - set(TASK_TARGETS)
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}; choose from {sorted(TASK_TARGETS)}")
    start = time.perf_counter()
    if args.workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(args.workers, len(tasks)), mp_context=get_context("spawn")) as pool:
            per_task = dict(zip(tasks, pool.map(run_task, tasks, [args] * len(tasks))))
    else:
        per_task = {t: run_task(t, args) for t in tasks}
    metrics: dict = {t: r for t, r in per_task.items()}
    metrics["bytes_ratio_ffa_vs_lora"] = max(r["bytes_ratio_ffa_vs_lora"] for r in per_task.values())
    metrics["dp_eps6_gain_vs_lora"] = min(r["dp_eps6_gain_vs_lora"] for r in per_task.values())
    metrics["num_clients"], metrics["num_rounds"], metrics["local_steps"] = args.clients, args.rounds, args.local_steps
    metrics["epsilon"], metrics["delta"], metrics["seeds"] = args.epsilon, args.delta, len(args.seeds.split(","))
    metrics["seconds"] = time.perf_counter() - start
    print(json.dumps(metrics, indent=2), flush=True)
    from lightning_lora.results import flat_metrics, write_result

    flat_metrics(metrics)  # a metric that is not a number fails here, in --smoke too, not after a GPU run
    if args.smoke:
        print(f"smoke run: no result file written ({time.perf_counter() - start:.0f} s)")
        return 0
    path = write_result("ffa_federated", metrics, directory=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
