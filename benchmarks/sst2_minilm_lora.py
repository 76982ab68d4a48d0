"""SST-2 with all-MiniLM-L6-v2: lightning_lora LoRA vs Hugging Face PEFT LoRA, same recipe, one run.

Both runs use the same LightningModule (`SequenceClassifier`: AdamW over the trainable parameters,
linear warmup/decay), the same data order, seed, steps, rank, alpha, targets and trainable head.
The only difference is who puts the LoRA layers in: `AdapterCallback("lora", ...)` or
`peft.get_peft_model(model, LoraConfig(...))`. The classifier head starts from the same weights
(same seed before loading); the LoRA A matrices are drawn by each library.

SST-2 has no labelled test set, so the GLUE validation set (872 sentences) is the held-out set:
it is evaluated once, after the last step, and never used to choose anything.

Writes benchmarks/results/sst2_minilm_lora.json with val_accuracy (ours), peft_val_accuracy,
accuracy_gap_points (ours - PEFT, in points), steps, seconds (wall time of fit) and cpu_seconds
(CPU time of fit; on a shared machine wall time depends on the neighbours, so the 1-minute load
average at the start and end of each fit is recorded too).

    python benchmarks/sst2_minilm_lora.py --steps 1000 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_lora import AdapterCallback  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402
from lightning_lora.tasks import SequenceClassifier, SST2DataModule, load_minilm  # noqa: E402

# every Linear of the encoder; not pooler.dense (the whole pooler trains, see MODULES_TO_SAVE)
TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]
MODULES_TO_SAVE = ["classifier", "pooler"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=66)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is fastest on a busy 2-core machine")
    p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="plain shuffled batches instead of length-grouped ones")
    p.add_argument("--only", choices=["both", "ours", "peft"], default="both")
    p.add_argument("--val-every", type=int, default=0, help="also validate every N steps (progress only; 0 = end only)")
    p.add_argument("--name", default="sst2_minilm_lora", help="result file name; '' writes nothing")
    return p.parse_args(argv)


class PrintProgress(pl.Callback):
    """One line every ``every`` steps (the rich progress bar prints nothing when stdout is a file)."""

    def __init__(self, name: str, every: int = 100) -> None:
        self.name, self.every, self.start = name, every, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            loss = float(trainer.callback_metrics.get("train_loss", float("nan")))
            print(f"[{self.name}] step {step}/{trainer.max_steps} train_loss {loss:.3f} "
                  f"{time.perf_counter() - self.start:.0f} s", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val_accuracy" in trainer.callback_metrics:
            print(f"[{self.name}] step {trainer.global_step} val_accuracy "
                  f"{float(trainer.callback_metrics['val_accuracy']):.4f}", flush=True)


def train_one(which: str, args: argparse.Namespace, tokenizer) -> dict[str, float]:
    pl.seed_everything(args.seed, workers=True)
    model, _ = load_minilm(num_labels=2)
    callbacks: list[pl.Callback] = [PrintProgress(which)]
    if which == "ours":
        callbacks.append(AdapterCallback("lora", target="model", r=args.r, alpha=args.alpha, dropout=0.0,
                                         target_modules=TARGETS, modules_to_save=MODULES_TO_SAVE))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                                 target_modules=TARGETS, modules_to_save=MODULES_TO_SAVE, bias="none"))
    module = SequenceClassifier(model, num_labels=2, metrics=("accuracy",), lr=args.lr,
                                warmup_ratio=args.warmup_ratio)
    dm = SST2DataModule(tokenizer, max_length=args.max_length, batch_size=args.batch_size, eval_batch_size=128,
                        seed=args.seed, group_by_length=args.group_by_length)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        callbacks=callbacks, num_sanity_val_steps=0, enable_model_summary=False,
        limit_val_batches=1.0 if args.val_every else 0, val_check_interval=args.val_every or None,
        check_val_every_n_epoch=None if args.val_every else 1, log_every_n_steps=50,
    )
    load_start = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=dm)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    evaluator = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False)
    (val,) = evaluator.validate(module, datamodule=dm, verbose=False)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    out = {"val_accuracy": float(val["val_accuracy"]), "val_loss": float(val["val_loss"]),
           "steps": int(trainer.global_step), "seconds": seconds, "cpu_seconds": cpu_seconds,
           "loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0], "trainable_params": trainable}
    print(f"[{which}] {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = current_command() if argv is None else " ".join(["python", "benchmarks/sst2_minilm_lora.py", *argv])
    model_probe, tokenizer = load_minilm(num_labels=2)
    del model_probe
    runs = {w: train_one(w, args, tokenizer) for w in (["ours", "peft"] if args.only == "both" else [args.only])}
    metrics: dict[str, float] = {}
    if "ours" in runs:
        o = runs["ours"]
        metrics.update(val_accuracy=o["val_accuracy"], val_loss=o["val_loss"], steps=o["steps"],
                       seconds=o["seconds"], cpu_seconds=o["cpu_seconds"], loadavg_1m_start=o["loadavg_1m_start"],
                       loadavg_1m_end=o["loadavg_1m_end"], trainable_params=o["trainable_params"])
    if "peft" in runs:
        q = runs["peft"]
        metrics.update(peft_val_accuracy=q["val_accuracy"], peft_val_loss=q["val_loss"], peft_steps=q["steps"],
                       peft_seconds=q["seconds"], peft_cpu_seconds=q["cpu_seconds"],
                       peft_loadavg_1m_start=q["loadavg_1m_start"], peft_loadavg_1m_end=q["loadavg_1m_end"],
                       peft_trainable_params=q["trainable_params"])
    if len(runs) == 2:
        metrics["accuracy_gap_points"] = 100.0 * (runs["ours"]["val_accuracy"] - runs["peft"]["val_accuracy"])
    metrics.update(r=args.r, alpha=args.alpha, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                   seed=args.seed, torch_threads=torch.get_num_threads(),
                   group_by_length=int(args.group_by_length))
    print(metrics, flush=True)
    if args.name and len(runs) == 2:
        path = write_result(args.name, metrics, command=command)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
