"""Trans-LoRA's SST-2 target before any training: SmolLM2-135M as ``trans_lora.py`` builds it, with a
fresh 2-way head (``--target head``) and with the verbalizer head (``--target verbalizer``: the review
in a prompt, the head started from the LM head's rows of " negative" / " positive").

    python benchmarks/trans_lora_zeroshot.py          # CPU is enough (about 3 minutes on 2 cores)

Accuracy on the SST-2 dev set (872 sentences). Keys: ``head_zero_shot_accuracy``,
``verbalizer_zero_shot_accuracy``, ``sentences``. The point: a target that starts at chance must
learn the task from the distillation set alone; one that starts from the base model's own answer
(the paper's causal-LM targets do) only has to be corrected by it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trans_lora  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402
from lightning_lora.tasks import load_smollm2  # noqa: E402
from lightning_lora.tasks.paths import nlp_data_dir  # noqa: E402
from lightning_lora.transfer import predict_logits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="first N dev sentences only (a quick check)")
    p.add_argument("--out", default=None, help="result folder (default benchmarks/results); not with --limit")
    args = p.parse_args(argv)
    start = time.perf_counter()
    causal, tok = load_smollm2()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    val = trans_lora._read_sst2(nlp_data_dir() / "sst2" / "validation.tsv")[: args.limit]
    labels = torch.tensor([y for _, y in val])
    metrics: dict[str, float] = {"sentences": len(val)}
    for name, verbalizer in (("head", False), ("verbalizer", True)):
        clf = trans_lora.llama_classifier(causal, tok, seed=1, verbalizer=verbalizer)
        pred = predict_logits(clf, [x for x, _ in val], batch_size=64).argmax(-1)
        metrics[f"{name}_zero_shot_accuracy"] = (pred == labels).float().mean().item()
        metrics[f"{name}_predicted_positive_share"] = pred.float().mean().item()
        print(f"{name}: zero-shot accuracy {metrics[f'{name}_zero_shot_accuracy']:.4f}", flush=True)
    metrics["seconds"] = time.perf_counter() - start
    if args.limit is None:
        print("wrote", write_result("trans_lora_zeroshot", metrics, command=current_command(), directory=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
