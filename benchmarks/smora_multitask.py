"""Issue #5, bar 2: one adapter on a mix of SST-2, RTE, CoLA and MRPC: SMoRA against LoRA of the same total rank.

One MiniLM, one adapter, one 2-way head for all four tasks (each is binary). Every input starts
with its task's name (``"sst2: ..."``, T5-style), the only thing that tells the model which
question is asked; SMoRA's router sees it like every other token. The training mix caps SST-2 at
10,000 sentences (the other tasks are used whole: CoLA 8,551, MRPC 3,301 after its dev carve-out,
RTE 2,490) and runs two epochs, batch 32. Each task is scored on its held-out set (GLUE dev;
MRPC test) with the same adapter.

Compared (3 seeds, every encoder Linear adapted, dropout 0.05):
- SMoRA: 64 rank-1 experts, top-8 per token, bias-based load balancing (the FLOPs of a rank-8 LoRA).
- LoRA r = 64, α = 128 (the same total rank and scale 2, as SMoRA's default α = 2r).
- LoRA r = 8, α = 16 (the same active rank), for reference.

Learning rate per method from {5e-4, 1e-3, 2e-3}, chosen by the mean accuracy over tasks on a 10%
slice carved from each task's training data (one epoch, seed 0); held-out sets never choose.

Keys: ``mean_gain_vs_lora`` (SMoRA minus LoRA r = 64, mean over tasks and seeds, points),
``<tag>_<task>_mean/std``, ``<tag>_mean``, ``<tag>_adapter_params``, ``<tag>_lr``, and SMoRA's
routing at the end of training: ``smora_load_max_over_mean`` (1 = balanced).

    python benchmarks/smora_multitask.py --workers 6
    python benchmarks/smora_multitask.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks.glue_harness import (  # noqa: E402
    MODULES_TO_SAVE, TARGETS, adapter_parameter_count, evaluate, mean_std, report_split, run_pool,
)
from lightning_lora import AdapterCallback  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402
from lightning_lora.tasks import SequenceClassifier, load_minilm  # noqa: E402
from lightning_lora.tasks.glue import Example, ListDataset, pad_batch, read_split, split_dev, subsample  # noqa: E402

TASKS = ("sst2", "rte", "cola", "mrpc")
SST2_CAP = 10_000
SEEDS = (0, 1, 2)
LR_GRID = (5e-4, 1e-3, 2e-3)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "smora": ("smora", {"r": 64, "top_k": 8, "dropout": 0.05}),
    "lora_r64": ("lora", {"r": 64, "alpha": 128, "dropout": 0.05}),
    "lora_r8": ("lora", {"r": 8, "alpha": 16, "dropout": 0.05}),
}


def prefixed(task: str, rows: list[Example]) -> list[Example]:
    return [dataclasses.replace(e, text_a=f"{task}: {e.text_a}") for e in rows]


def task_splits(task: str, holdout: bool, cap: int | None, seed: int) -> tuple[list[Example], list[Example]]:
    """``(train, scored)`` examples of one task, prefixed with its name."""
    train = read_split(task, "train")
    if holdout:  # score on a slice carved from train; the reported set is not touched
        train, scored = split_dev(train, 0.1, 0)
    else:
        scored = read_split(task, report_split(task))
    if cap is not None:
        train = subsample(train, cap, seed)
    return prefixed(task, train), prefixed(task, scored)


class MixDataModule(pl.LightningDataModule):
    def __init__(self, tokenizer: Any, holdout: bool, seed: int, batch_size: int = 32,
                 max_samples: int | None = None, max_eval_samples: int | None = None) -> None:
        super().__init__()
        self.tokenizer, self.seed, self.batch_size = tokenizer, seed, batch_size
        train: list[Example] = []
        self.scored: dict[str, list[Example]] = {}
        for task in TASKS:
            cap = SST2_CAP if task == "sst2" else None
            if max_samples is not None:
                cap = max_samples
            t, s = task_splits(task, holdout, cap, seed)
            train += t
            self.scored[task] = subsample(s, max_eval_samples, 0)
        self.train_set = ListDataset(self.encode(train))

    def encode(self, rows: list[Example]) -> list[dict[str, Any]]:
        out = []
        for e in rows:
            enc = self.tokenizer(e.text_a, e.text_b, truncation=True, max_length=128)
            out.append({**{k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc},
                        "labels": e.label})
        return out

    def loader(self, rows: list[dict[str, Any]], train: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ListDataset(rows) if not isinstance(rows, ListDataset) else rows, batch_size=self.batch_size if train else 256,
            shuffle=train, generator=torch.Generator().manual_seed(self.seed) if train else None,
            collate_fn=lambda b: pad_batch(b, self.tokenizer.pad_token_id or 0))

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.loader(self.train_set, train=True)


def train_mix(tag: str, seed: int, lr: float, holdout: bool, epochs: float, smoke: bool,
              device: str | None) -> dict[str, Any]:
    accelerator = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    pl.seed_everything(seed, workers=True, verbose=False)
    model, tokenizer = load_minilm(num_labels=2)
    dm = MixDataModule(tokenizer, holdout, seed, max_samples=64 if smoke else None,
                       max_eval_samples=32 if smoke else None)
    method, kwargs = METHODS[tag]
    module = SequenceClassifier(model, num_labels=2, lr=lr, warmup_ratio=0.06)
    steps = 4 if smoke else max(1, round(epochs * math.ceil(len(dm.train_set) / dm.batch_size)))
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[AdapterCallback(method, target="model", target_modules=TARGETS,
                                                    modules_to_save=MODULES_TO_SAVE, **kwargs)])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    dev = torch.device("cuda:0" if accelerator == "cuda" else "cpu")
    module.to(dev)
    out: dict[str, Any] = {"tag": tag, "seed": seed,
                           "lr": lr, "holdout": holdout, "steps": int(trainer.global_step),
                           "seconds": time.perf_counter() - start, "adapter_params": adapter_parameter_count(module)}
    if method == "smora":
        from lightning_lora.methods.smora import load_imbalance, routing_stats

        stats = routing_stats(module.model, cumulative=True)  # training tokens: read before scoring
        out["load_max_over_mean"] = statistics.fmean(load_imbalance(f) for f in stats.values())
    for task in TASKS:
        out[f"{task}_accuracy"] = evaluate(module.model, dm.loader(dm.encode(dm.scored[task]), train=False),
                                           task, dev)["accuracy"]
    out["mean_accuracy"] = statistics.fmean(out[f"{t}_accuracy"] for t in TASKS)
    return out


def _mix_job(job: dict[str, Any], device: str | None) -> dict[str, Any]:
    return train_mix(**job, device=device)


def job_key(job: dict[str, Any]) -> str:
    return f"{'sweep/' if job['holdout'] else ''}{job['tag']}/lr{job['lr']:g}/seed{job['seed']}"


def run_jobs(jobs: list[dict[str, Any]], raw: str, workers: int, threads: int) -> dict[str, dict[str, Any]]:
    return run_pool({job_key(j): j for j in jobs}, _mix_job, raw, workers, threads=threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--raw", default="benchmarks/results/raw/smora_multitask.jsonl")
    p.add_argument("--out", default=None)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    grid, seeds = LR_GRID, SEEDS
    if args.smoke:
        grid, seeds = LR_GRID[:1], SEEDS[:1]
        args.raw = str(Path(tempfile.mkdtemp()) / "smoke.jsonl")
    common = {"epochs": args.epochs, "smoke": args.smoke}
    sweep = run_jobs([{"tag": t, "seed": 0, "lr": lr, "holdout": True, **common} for t in METHODS for lr in grid],
                     args.raw, args.workers, args.threads)
    lrs = {t: max((r for r in sweep.values() if r["tag"] == t), key=lambda r: (r["mean_accuracy"], -r["lr"]))["lr"]
           for t in METHODS}
    print("learning rates chosen on the carved slices:", lrs, flush=True)
    final = run_jobs([{"tag": t, "seed": s, "lr": lrs[t], "holdout": False, **common} for t in METHODS for s in seeds],
                     args.raw, args.workers, args.threads)
    m: dict[str, float] = {"seeds": len(seeds), "epochs": args.epochs}
    for t in METHODS:
        rows = [r for r in final.values() if r["tag"] == t]
        for task in TASKS:
            v = [100.0 * r[f"{task}_accuracy"] for r in rows]
            ms = mean_std(v)
            m[f"{t}_{task}_mean"], m[f"{t}_{task}_std"] = ms["mean"], ms["std"]
        m[f"{t}_mean"] = statistics.fmean(100.0 * r["mean_accuracy"] for r in rows)
        m[f"{t}_adapter_params"] = rows[0]["adapter_params"]
        m[f"{t}_lr"] = lrs[t]
        m[f"{t}_seconds"] = statistics.fmean(r["seconds"] for r in rows)
    m["smora_load_max_over_mean"] = statistics.fmean(r["load_max_over_mean"] for r in final.values() if r["tag"] == "smora")
    m["mean_gain_vs_lora"] = m["smora_mean"] - m["lora_r64_mean"]
    m["mean_gain_vs_lora_r8"] = m["smora_mean"] - m["lora_r8_mean"]
    for k, v in m.items():
        print(f"{k}: {v:.4g}")
    if not args.smoke:
        print("wrote", write_result("smora_multitask", m, command=current_command(), directory=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
