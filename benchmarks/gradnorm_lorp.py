"""Bar 3 of issue 6: GradNormLoRP optimizer-state memory against AdamW full fine-tuning on SmolLM2-135M,
and SST-2 / RTE accuracy with MiniLM against LoRA r = 8 (3 seeds). Writes ``<out>/gradnorm_lorp.json``.

Memory (``optimizer_mem_reduction`` = 1 − GradNormLoRP state bytes / AdamW state bytes, bar ≥ 0.85):
one training step (batch 2 × 256 tokens) of full-parameter fine-tuning of every parameter with
``torch.optim.AdamW`` (fp32 moments) against :class:`GradNormLoRPAdamW` in its full-parameter path
(METHODS §3 ii): weight-normalised, rank-``--proj-rank`` projected moments on every linear weight of the
30 blocks, plain moments on the rest (tied embedding, norms), all moments 8-bit blockwise; projectors
(fp32) and the weight-norm vectors are counted as state too. State bytes are summed over the optimizers'
state tensors; the CUDA allocation growth of the first ``step()`` is reported beside them. The weights'
values do not change state sizes: ``--random-init`` uses SmolLM2's architecture with random weights.

Accuracy: ``benchmarks/glue_harness.run_many`` (MiniLM, the harness's recipe: AdamW-style schedule, lr
``--lr``, batch 32) for ``gradnorm_lorp`` (DoRA-form layer r = 8, α = 16, dropout 0.1, projection rank 8,
scale 4, gap 500, std; the harness's ``SequenceClassifier`` builds GradNormLoRPAdamW through the method's
``make_optimizer``, so the harness is used unchanged) and ``lora`` (r = 8, α = 16), seeds 0-2, on SST-2
(``--sst2-epochs``) and RTE (``--rte-epochs``).

    python benchmarks/gradnorm_lorp.py --random-init          # H200: memory < 1 min + GLUE ~5 min (estimate)
    python benchmarks/gradnorm_lorp.py --smoke                # CPU: tiny Llama memory (< 1 min)
    python benchmarks/gradnorm_lorp.py --smoke --glue         # + 4 three-step GLUE runs (minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.lq_lora_smollm2 import TARGETS, load_model  # noqa: E402
from lightning_lora.optim.gradnorm_lorp import GradNormLoRPAdamW, optimizer_state_bytes  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402


def one_step(model: Any, opt: torch.optim.Optimizer, device: torch.device, vocab: int) -> int:
    """One step on random tokens; returns the CUDA allocation growth of ``opt.step()`` (0 on CPU)."""
    ids = torch.randint(0, vocab, (2, 256), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - before
    return 0


def memory_part(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for which in ("adamw", "gradnorm_lorp"):
        model, _ = load_model(args.model_dir, args.smoke, device, random_init=args.random_init)
        model.train()
        vocab = model.config.vocab_size
        if which == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        else:
            projected = [m.weight for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]
            ids = {id(p) for p in projected}
            rest = [p for p in model.parameters() if id(p) not in ids]
            rank = 4 if args.smoke else args.proj_rank
            opt = GradNormLoRPAdamW([{"params": projected, "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                                      "weight_norm": True}, {"params": rest}], lr=1e-5, optim_bits=8)
        grew = one_step(model, opt, device, vocab)
        out[f"state_mib/{which}"] = optimizer_state_bytes(opt) / 2**20
        out[f"step_alloc_growth_mib/{which}"] = grew / 2**20
        out["params"] = sum(p.numel() for p in model.parameters())
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["optimizer_mem_reduction"] = 1 - out["state_mib/gradnorm_lorp"] / out["state_mib/adamw"]
    return out


def glue_part(args: argparse.Namespace, device: str | None) -> dict[str, Any]:
    from benchmarks.glue_harness import GlueRun, run_many

    methods = {
        "gradnorm_lorp": dict(r=8, alpha=16.0, dropout=0.1, proj_rank=8, proj_scale=4.0, update_proj_gap=500),
        "lora": dict(r=8, alpha=16.0),
    }
    runs = []
    for task, epochs in (("sst2", args.sst2_epochs), ("rte", args.rte_epochs)):
        for method, kw in methods.items():
            for seed in range(args.seeds):
                extra = dict(steps=3, max_samples=64, max_eval_samples=32) if args.smoke else dict(epochs=epochs)
                runs.append(GlueRun(method=method, task=task, seed=seed, method_kwargs=kw, lr=args.lr, **extra))
    jsonl = Path(args.glue_jsonl) if args.glue_jsonl else Path(tempfile.mkdtemp()) / "gradnorm_lorp_glue.jsonl"
    results = run_many(runs, jsonl, workers=args.workers, device=device)
    out: dict[str, Any] = {}
    for task in ("sst2", "rte"):
        for method in methods:
            accs = [r["accuracy"] for r in results if r["task"] == task and r["method"] == method]
            out[f"{task}/{method}/accuracy_mean"] = statistics.mean(accs)
            out[f"{task}/{method}/accuracy_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
            out[f"{task}/{method}/runs"] = len(accs)
        out[f"{task}/gain_vs_lora"] = out[f"{task}/gradnorm_lorp/accuracy_mean"] - out[f"{task}/lora/accuracy_mean"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=None)
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--proj-rank", type=int, default=64)
    p.add_argument("--skip-glue", action="store_true")
    p.add_argument("--glue", action="store_true", help="with --smoke: also run the 4 tiny GLUE runs (minutes on CPU)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sst2-epochs", type=float, default=1.0)
    p.add_argument("--rte-epochs", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--glue-jsonl", default=None, help="resumable per-run results (default: a temp file)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:  # GLUE through the harness takes minutes on a busy CPU: --smoke --glue to include it
        args.seeds, args.workers = 1, 1
        args.skip_glue = args.skip_glue or not args.glue
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    metrics = memory_part(args, device)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, flush=True)
    if not args.skip_glue:
        metrics.update(glue_part(args, "cuda" if cuda else "cpu"))
    metrics["seconds"] = time.perf_counter() - t0
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, flush=True)
    out = args.out if args.out is not None else (None if args.smoke else "benchmarks/results")
    if out is not None:
        print("wrote", write_result("gradnorm_lorp", metrics, command=current_command(), directory=out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
