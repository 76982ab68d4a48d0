"""Does LoRA's ``merged_training`` learn what the exact fused path learns? SST-2 on all-MiniLM-L6-v2.

``merged_training`` (``LoRAConfig``) trains through ``W' = W + s·B A`` stochastically rounded to bf16
once per optimizer step: faster (one GEMM per layer forward and one backward, see
``lora_vs_peft.py --variants ours_merged``), exact in expectation, but each forward sees a rounded
``W'``. This script measures the cost in accuracy, side by side in one process on one GPU:

- ``fp32``: the model in fp32, default fused LoRA (the reference);
- ``bf16``: the model's weights in bf16 (as in ``lora_vs_peft.py``), default fused LoRA (fp32 adapters);
- ``bf16_merged``: the same with ``merged_training=True``;
- ``bf16_merged_rtn`` (diagnostic): ``W'`` rounded to nearest instead of stochastically, the form
  the rounding exists to avoid.

Same recipe for all (the ``sst2_minilm_lora.py`` recipe: r = 8, alpha = 16, every encoder Linear,
pooler and classifier trained, AdamW lr 1e-3 with 6 % linear warm-up and decay, batch 32, length-grouped
batches), plain PyTorch loop, ``--seeds`` seeds each. The GLUE validation set (872 sentences) is scored
once at the end, in eval mode (where every variant takes the exact path).

    python benchmarks/merged_training_fidelity.py --steps 1000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing it
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora.core import rounding  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402
from lightning_lora.tasks import SST2DataModule, load_minilm  # noqa: E402
from lightning_lora.tasks.modules import linear_warmup_decay  # noqa: E402

TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]
MODULES_TO_SAVE = ["classifier", "pooler"]
VARIANTS = ("fp32", "bf16", "bf16_merged", "bf16_merged_rtn")


def _rtn_merged_weight(weight, B, A, scaling, dtype, seed, fan_in_fan_out=False):  # type: ignore[no-untyped-def]
    """``merged_weight`` with round-to-nearest (the diagnostic variant)."""
    P, Q = (A.t(), B.t()) if fan_in_fan_out else (B, A)
    with torch.no_grad():
        return torch.addmm(weight.float(), P.float(), Q.float(), alpha=scaling).to(dtype)


def run(variant: str, seed: int, args: argparse.Namespace, tokenizer, device: torch.device) -> dict[str, float]:
    from lightning_lora.methods import lora as lora_mod

    torch.manual_seed(seed)
    model, _ = load_minilm(num_labels=2)
    model.to(device=device, dtype=torch.float32 if variant == "fp32" else torch.bfloat16).train()
    ll.inject_adapter(model, "lora", r=args.r, alpha=args.alpha, target_modules=TARGETS,
                      modules_to_save=MODULES_TO_SAVE, merged_training=variant.startswith("bf16_merged"))
    params = ll.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=args.lr)
    sched = linear_warmup_decay(opt, args.steps, int(0.06 * args.steps))
    dm = SST2DataModule(tokenizer, max_length=args.max_length, batch_size=args.batch_size, eval_batch_size=128,
                        seed=seed, group_by_length=True)
    dm.setup("fit")
    saved = lora_mod.merged_weight
    if variant == "bf16_merged_rtn":
        lora_mod.merged_weight = _rtn_merged_weight
    losses: list[float] = []
    start = time.perf_counter()
    try:
        step = 0
        while step < args.steps:
            for batch in dm.train_dataloader():
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch.pop("labels")
                loss = F.cross_entropy(model(**batch).logits.float(), labels)
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
                if step % 200 == 0:
                    print(f"[{variant} seed {seed}] step {step} loss {statistics.fmean(losses[-200:]):.4f}", flush=True)
                if step >= args.steps:
                    break
    finally:
        lora_mod.merged_weight = saved
    seconds = time.perf_counter() - start
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
            total += labels.numel()
    out = {"accuracy": correct / total, "train_loss_last100": statistics.fmean(losses[-100:]), "seconds": seconds}
    print(f"[{variant} seed {seed}] {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=66)
    p.add_argument("--name", default="merged_training_fidelity", help="result file name; '' writes nothing")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, tokenizer = load_minilm(num_labels=2)
    metrics: dict[str, float] = {}
    for v in args.variants:
        runs = [run(v, s, args, tokenizer, device) for s in args.seeds]
        for s, r in zip(args.seeds, runs):
            metrics[f"{v}_accuracy_seed{s}"] = round(r["accuracy"], 4)
        metrics[f"{v}_accuracy_mean"] = round(statistics.fmean(r["accuracy"] for r in runs), 4)
        metrics[f"{v}_train_loss_last100_mean"] = round(statistics.fmean(r["train_loss_last100"] for r in runs), 4)
        metrics[f"{v}_seconds_mean"] = round(statistics.fmean(r["seconds"] for r in runs), 2)
    if {"bf16", "bf16_merged"} <= set(args.variants):
        metrics["merged_minus_bf16_points"] = round(100 * (metrics["bf16_merged_accuracy_mean"]
                                                          - metrics["bf16_accuracy_mean"]), 2)
    metrics.update(steps=args.steps, seeds=len(args.seeds), r=args.r, alpha=args.alpha, lr=args.lr,
                   batch_size=args.batch_size, triton=int(rounding.triton_available() and device.type == "cuda"))
    print(metrics, flush=True)
    if args.name:
        print("wrote", write_result(args.name, metrics, command=current_command() if argv is None else
                                    " ".join(["python", "benchmarks/merged_training_fidelity.py", *argv])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
