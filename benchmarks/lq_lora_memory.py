"""Bar 2 of issue 6: GPU memory of LQ-LoRA's packed quantized weights, measured with
``torch.cuda.max_memory_allocated``, against the exact bits accounting
(:func:`lightning_lora.quant.storage_bits`: codes + scale codes + group absmax + offset). Writes
``<out>/lq_lora_memory.json``.

For each config (NF2, NF3, NF4 presets and a mixed 2/3/4-bit plan averaging about 2.75 bits) every
linear matrix of SmolLM2-135M is decomposed (rank 64, one alternation: memory does not depend on the
iterations) and packed on the CPU; then the packed ``QuantizedLinear`` modules alone are moved to the
GPU and the allocation growth is compared with the accounting. Key ``mem_vs_accounting_rel_err`` = the
largest relative gap over the configs (bar: ≤ 0.10). Also: the whole adapted model (fp32 embedding /
norms, fp32 LoRA factors, packed Q) against its own accounting, the dense fp32 linears for comparison,
and the peak of one forward pass (batch 1 × 512 tokens: the dequantized weight of one layer at a time
is a transient).

Memory depends on shapes and configs only, not on weight values: ``--random-init`` uses SmolLM2's
architecture with random weights (no files needed); ``--model-dir`` / the GGUF package load the real
weights (see benchmarks/lq_lora_smollm2.py for the export step).

    python benchmarks/lq_lora_memory.py --random-init        # H200: ~1-2 min (decomposition on the CPU)
    python benchmarks/lq_lora_memory.py --smoke              # CPU, tiny Llama: accounting only, no CUDA
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning_lora as ll  # noqa: E402
from benchmarks.lq_lora_smollm2 import TARGETS, load_model  # noqa: E402
from lightning_lora.methods.lq_lora import LQLoRALinear, quantized_storage_bits  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402

MIXED_CYCLE = ("nf2", "nf3", "nf2", "nf4", "nf3", "nf2", "nf3")  # per projection: about 2.7 bits on average


def tensor_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def measure_to_cuda(module: nn.Module, device: torch.device) -> int:
    """Bytes allocated on ``device`` by moving ``module`` there (peak growth)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    module.to(device)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=None)
    p.add_argument("--random-init", action="store_true", help="SmolLM2 architecture, random weights")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    # the command line records --random-init; metrics are numbers only (results.write_result)
    metrics: dict[str, Any] = {"rank": args.r, "random_weights": float(args.random_init)}
    worst = 0.0
    for variant in ("nf2", "nf3", "nf4", "mixed"):
        model, _ = load_model(args.model_dir, args.smoke, torch.device("cpu"), random_init=args.random_init)
        names = ll.core.find_targets(model, ll.make_config("lq_lora", target_modules=TARGETS))
        configs = {n: (MIXED_CYCLE[i % len(MIXED_CYCLE)] if variant == "mixed" else variant) for i, n in enumerate(names)}
        dense_bytes = sum(model.get_submodule(n).weight.numel() * 4 for n in names)
        r = 4 if args.smoke else args.r
        ll.inject_adapter(model, "lq_lora", r=r, alpha=16.0 * r / 64, matrix_configs=configs, max_iters=1,
                          target_modules=TARGETS)
        bits, numel = quantized_storage_bits(model)
        q_modules = nn.ModuleList([l.base_layer for l in ll.adapter_layers(model).values() if isinstance(l, LQLoRALinear)])
        q_weight_bytes = sum(m.storage_bytes() for m in q_modules)
        assert q_weight_bytes * 8 == bits
        q_account = tensor_bytes(q_modules)  # packed weights + the few biases (none in SmolLM2)
        whole_account = tensor_bytes(model)
        metrics.update({f"bits_per_param/{variant}": bits / numel, f"quantized_mib_accounted/{variant}": q_account / 2**20,
                        f"dense_fp32_linears_mib/{variant}": dense_bytes / 2**20,
                        f"whole_model_mib_accounted/{variant}": whole_account / 2**20})
        if cuda:
            q_measured = measure_to_cuda(q_modules, device)
            rest_measured = measure_to_cuda(model, device)  # the rest (Q is already there)
            rel = abs(q_measured - q_account) / q_account
            whole_rel = abs(q_measured + rest_measured - whole_account) / whole_account
            worst = max(worst, rel)
            torch.cuda.reset_peak_memory_stats(device)
            base_alloc = torch.cuda.memory_allocated(device)
            with torch.no_grad():
                model(input_ids=torch.randint(0, 1000, (1, 512), device=device))
            metrics.update({f"quantized_mib_measured/{variant}": q_measured / 2**20, f"rel_err/{variant}": rel,
                            f"whole_model_mib_measured/{variant}": (q_measured + rest_measured) / 2**20,
                            f"whole_model_rel_err/{variant}": whole_rel,
                            f"forward_peak_extra_mib/{variant}": (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20})
        print(variant, {k: round(v, 4) for k, v in metrics.items() if k.endswith(variant)}, flush=True)
        del model, q_modules
    if cuda:
        metrics["mem_vs_accounting_rel_err"] = worst
    metrics["seconds"] = time.perf_counter() - t0
    out = args.out if args.out is not None else (None if args.smoke or not cuda else "benchmarks/results")
    if out is not None:
        print("wrote", write_result("lq_lora_memory", metrics, command=current_command(), directory=out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
