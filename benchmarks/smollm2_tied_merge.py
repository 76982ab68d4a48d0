"""LoRA on SmolLM2-135M's tied embedding (its ``lm_head`` is ``embed_tokens``' table), ours against
PEFT's, both with ``ensure_weight_tying=True``: the same random factors (r = 8 on ``embed_tokens``,
``q_proj``, ``v_proj``), the unmerged logits of both, and each library's merged model against its own
unmerged one (max |Δ logit| over a short prompt), CPU, fp32.

    python benchmarks/smollm2_tied_merge.py [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import peft  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora.results import write_result  # noqa: E402
from lightning_lora.tasks.models import load_smollm2  # noqa: E402

TARGETS = ["embed_tokens", "q_proj", "v_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/smollm2_tied_merge.json"))
    args = ap.parse_args()
    base, tokenizer = load_smollm2()[:2]
    base.eval()
    ids = tokenizer("Long non-coding RNAs are transcripts longer than 200 nucleotides", return_tensors="pt")["input_ids"]
    metrics: dict[str, float] = {"tied": float(base.lm_head.weight is base.model.embed_tokens.weight)}
    with torch.no_grad():
        base_logits = base(ids).logits
    ours = copy.deepcopy(base)
    ll.inject_adapter(ours, "lora", r=8, alpha=16, target_modules=TARGETS, ensure_weight_tying=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                          ensure_weight_tying=True))
    theirs.eval()
    lookup = dict(theirs.named_parameters())
    with torch.no_grad():  # our factors into PEFT's layers, by PEFT's names
        for name, p in ours.named_parameters():
            if p.requires_grad:
                key = f"base_model.model.{name}"
                key = key if key in lookup else key.replace("lora_A", "lora_A.default.weight").replace("lora_B", "lora_B.default.weight")
                key = key if key in lookup else f"base_model.model.{name}".replace("lora_embedding_A", "lora_embedding_A.default").replace("lora_embedding_B", "lora_embedding_B.default")
                lookup[key].copy_(p)
    with torch.no_grad():
        ours_logits, peft_logits = ours(ids).logits, theirs(ids).logits
        metrics["adapter_effect"] = (ours_logits - base_logits).abs().max().item()
        metrics["ours_vs_peft_unmerged_max_diff"] = (ours_logits - peft_logits).abs().max().item()
        ll.merge_adapter(ours)
        metrics["ours_merged_vs_unmerged_max_diff"] = (ours(ids).logits - ours_logits).abs().max().item()
        merged = theirs.merge_and_unload()
        metrics["peft_merged_vs_unmerged_max_diff"] = (merged(ids).logits - peft_logits).abs().max().item()
    metrics["peft_version_major_minor"] = float(".".join(peft.__version__.split(".")[:2]))
    print(metrics)
    print(write_result(Path(args.out).stem, metrics, directory=Path(args.out).parent))


if __name__ == "__main__":
    main()
