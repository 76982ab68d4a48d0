"""Where the embedding + Conv1d LoRA step's memory goes, ours against PEFT's: the peak above what was
allocated before each phase (forward, backward, optimizer step), on CUDA under bf16 autocast, for the
``emb`` model of ``benchmarks/lora_conv_vs_peft.py`` (the step whose memory was 1.043 of PEFT's).

    python benchmarks/lora_conv_memory_phases.py [--models emb cnn attn] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.lora_conv_vs_peft import MODELS, build  # noqa: E402
from lightning_lora.results import write_result  # noqa: E402


def _phase_peak(fn) -> float:
    """MiB above the allocation before ``fn``, at its peak."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(spec: dict, variant: str, x: torch.Tensor) -> dict[str, float]:
    """Phase -> MiB of one warmed-up step of ``variant`` (ours / peft) on ``spec``'s model."""
    model, params = build(spec, variant, "cuda")
    opt = torch.optim.AdamW(params, lr=1e-4)
    state: dict[str, torch.Tensor] = {}

    def forward() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            state["loss"] = model(x).float().pow(2).mean()

    def backward() -> None:
        state.pop("loss").backward()

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm: optimizer state, caches
        forward(), backward(), step()
    return {phase: round(_phase_peak(fn), 2) for phase, fn in (("forward", forward), ("backward", backward), ("step", step))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["emb"], choices=list(MODELS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lora_conv_memory_phases.json"))
    args = ap.parse_args()
    metrics: dict[str, float] = {}
    for name in args.models:
        spec = MODELS[name]
        x = spec["inputs"](torch.Generator().manual_seed(1), "cuda")
        for variant in ("ours", "peft"):
            for phase, mib in measure(spec, variant, x).items():
                metrics[f"{name}_{variant}_{phase}_mib"] = mib
            torch.cuda.empty_cache()
        for phase in ("forward", "backward", "step"):
            metrics[f"{name}_{phase}_ratio"] = round(metrics[f"{name}_ours_{phase}_mib"] / metrics[f"{name}_peft_{phase}_mib"], 3)
        print(name, {k: v for k, v in metrics.items() if k.startswith(name)}, flush=True)
    print(write_result(Path(args.out).stem, metrics, directory=Path(args.out).parent))


if __name__ == "__main__":
    main()
