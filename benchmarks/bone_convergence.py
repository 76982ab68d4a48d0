"""Issue #5, bar 3: Bone, Bat and LoRA training SmolLM2-135M on Tiny Shakespeare for the same steps.

One recipe for all three (Bone's claim is faster convergence at the same budget): SmolLM2-135M-
Instruct (the de-quantised GGUF weights), every projection of every block adapted (q, k, v, o,
gate, up, down), bf16-mixed, AdamW lr ``--lr`` with 3% warm-up and linear decay, batch 8 × 256
tokens, ``--steps`` steps, seed 0. Sizes at equal adapter parameters on the square projections:
Bone and Bat with block width 64 (their papers' and PEFT's default), LoRA r = 32 (α = 64).

Measured: the training loss at fixed steps (mean over the 20 steps ending there, so one batch's
noise does not decide), the validation perplexity on the held-out last 10% of Tiny Shakespeare at
the end, adapter parameters and seconds. The loss curves go to ``docs/figures/bone_convergence.png``.

Keys: ``<m>_loss_at_<step>``, ``<m>_val_ppl``, ``<m>_adapter_params``, ``<m>_seconds`` for m in
bone, bat, lora; ``bone_val_ppl_ratio_vs_lora`` and ``bat_val_ppl_ratio_vs_lora``.

    python benchmarks/bone_convergence.py                 # H200, the three runs in parallel (~3 min)
    python benchmarks/bone_convergence.py --smoke         # CPU: tiny LLaMA, a few steps, writes nothing
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
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks.glue_harness import adapter_parameter_count, run_pool  # noqa: E402
from lightning_lora import AdapterCallback  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402
from lightning_lora.tasks import CausalLM, TinyShakespeareDataModule, load_smollm2, load_tiny_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "bone": ("bone", {"r": 64}),
    "bat": ("bat", {"r": 64}),
    "lora": ("lora", {"r": 32, "alpha": 64}),
}
WINDOW = 20


class LossRecorder(pl.Callback):
    """Every training step's loss, as a plain list (for the curves and the fixed-step readings)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def train_one(job: dict[str, Any], device: str | None) -> dict[str, Any]:
    smoke = job["smoke"]
    accelerator = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pl.seed_everything(0, workers=True, verbose=False)
    if smoke:
        model, tokenizer = load_tiny_llama()  # random 2-layer Llama, hidden 32
        kwargs = {"r": 8} if job["tag"] != "lora" else {"r": 4, "alpha": 8}
    else:
        model, tokenizer = load_smollm2()
        kwargs = METHODS[job["tag"]][1]
    dm = TinyShakespeareDataModule(tokenizer, block_size=64 if smoke else 256, batch_size=8, eval_batch_size=16,
                                   max_samples=32 if smoke else None, max_eval_samples=8 if smoke else None)
    recorder = LossRecorder()
    module = CausalLM(model, lr=job["lr"], warmup_ratio=0.03)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=job["steps"], max_epochs=-1, logger=False,
                         precision="bf16-mixed" if accelerator == "cuda" else "32-true",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[recorder, AdapterCallback(METHODS[job["tag"]][0], target="model",
                                                              target_modules=TARGETS, **kwargs)])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    evaluator = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False, precision=trainer.precision)
    (val,) = evaluator.validate(module, datamodule=dm, verbose=False)
    return {"tag": job["tag"], "lr": job["lr"], "steps": int(trainer.global_step), "seconds": seconds,
            "losses": recorder.losses, "val_ppl": float(val["val_ppl"]), "val_loss": float(val["val_loss"]),
            "adapter_params": adapter_parameter_count(module)}


def loss_at(losses: list[float], step: int) -> float:
    window = losses[max(0, step - WINDOW):step]
    return statistics.fmean(window)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for tag, r in results.items():
        losses = r["losses"]
        smooth = [loss_at(losses, i) for i in range(1, len(losses) + 1)]
        ax.plot(range(1, len(losses) + 1), smooth, label=f"{tag} (val ppl {r['val_ppl']:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of last {WINDOW} steps)")
    ax.set_title("SmolLM2-135M on Tiny Shakespeare")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--raw", default="benchmarks/results/raw/bone_convergence.jsonl")
    p.add_argument("--out", default=None)
    p.add_argument("--figure", default="docs/figures/bone_convergence.png")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, tmp = 6, Path(tempfile.mkdtemp())
        args.raw, args.figure = str(tmp / "smoke.jsonl"), str(tmp / "smoke.png")
    jobs = {f"{t}/lr{args.lr:g}/steps{args.steps}": {"tag": t, "lr": args.lr, "steps": args.steps, "smoke": args.smoke}
            for t in METHODS}
    results = {r["tag"]: r for r in run_pool(jobs, train_one, args.raw, workers=len(jobs), threads=1).values()}
    marks = [s for s in (50, 100, 200, 400, 600, 800, 1000, 1500, 2000) if s <= args.steps] or [args.steps]
    m: dict[str, float] = {"steps": args.steps, "lr": args.lr}
    for t, r in results.items():
        m.update({f"{t}_loss_at_{s}": loss_at(r["losses"], s) for s in marks})
        m.update({f"{t}_val_ppl": r["val_ppl"], f"{t}_adapter_params": r["adapter_params"], f"{t}_seconds": r["seconds"]})
    for t in ("bone", "bat"):
        m[f"{t}_val_ppl_ratio_vs_lora"] = m[f"{t}_val_ppl"] / m["lora_val_ppl"]
    print(json.dumps(m, indent=1))
    plot(results, Path(args.figure))
    print("figure:", args.figure)
    if not args.smoke:
        print("wrote", write_result("bone_convergence", m, command=current_command(), directory=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
