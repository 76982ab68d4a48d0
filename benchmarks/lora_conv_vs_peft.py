"""LoRA on convolutions, embeddings and torch's attention: our training step against PEFT's, side by
side in one process.

Five models, random weights, every target adapted at rank 8 (alpha 16; ``grouped``: 32, alpha 64) by
both libraries:

- ``cnn``: a small VGG-style image classifier, six 3x3 ``nn.Conv2d`` (64 to 256 channels, the last
  two dilated) on 32 x 32 images, batch 64; targets: every convolution;
- ``emb``: a token model whose ``nn.Embedding`` (32,000 x 512) feeds a ``nn.Conv1d`` stack,
  batch 32 x 256 tokens; targets: the embedding and the convolutions;
- ``grouped``: a ResNeXt-style stack of four 3x3 ``nn.Conv2d`` with 256 channels in 32 groups,
  32 x 32 images, batch 32, rank 32 (a multiple of the groups); PEFT's form for grouped bases (an
  ungrouped A, a grouped B) is another function than ours (one LoRA per group), and it cannot merge:
  the times compare the two ways of adapting the same layers;
- ``moe``: a Mixtral (transformers 5; four layers, hidden 512, eight experts of 1,024, top 2, vocabulary
  1,000), batch 8 x 256 tokens; targets: the fused expert parameters ``experts.gate_up_proj`` and
  ``experts.down_proj`` (``target_parameters``, PEFT's option of that name; one rank-8 update per expert);
- ``attn``: an ``nn.TransformerEncoder`` of six ``nn.TransformerEncoderLayer`` (E = 512, 8 heads,
  feed-forward 2,048, batch first, no dropout), batch 32 x 128; targets: every ``self_attn``
  (``nn.MultiheadAttention``: its packed input and output projections) and both feed-forward layers.
  PEFT's attention layer adds the output projection's update twice (huggingface/peft PR #3774): the
  same work as the right function, so the times compare.

The step is forward, backward and AdamW over the adapter parameters. The variants are timed in
turn, ``--rounds`` times (ours, PEFT, ours, PEFT, ...), and each figure is the median over rounds
of the per-round medians, so the machine's drift falls on both alike; ``step_time_ratio_<model>``
is ours / PEFT. PEFT's dilated convolution has no working unmerged forward (its ``lora_A`` ignores
the dilation: a shape mismatch, docs/architecture.md), so the ``cnn`` model's PEFT variant adapts
its undilated layers only, and ours is timed on the same set (``peft_targets``) as well as on all.
On CUDA the step runs under bf16 autocast, and each step's own peak memory (above what was
allocated before it, all variants' models staying resident) is recorded too.

    python benchmarks/lora_conv_vs_peft.py [--device cpu|cuda] [--rounds 5] [--steps 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning_lora as ll  # noqa: E402
from benchmarks.lora_vs_peft import timed_steps  # noqa: E402  (median ms of a step, CUDA events on a GPU)
from lightning_lora.results import write_result  # noqa: E402


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chans = [3, 64, 64, 128, 128, 256, 256]
        self.convs = nn.ModuleList()
        for i in range(6):
            dil = 2 if i >= 4 else 1
            self.convs.append(nn.Conv2d(chans[i], chans[i + 1], 3, padding=dil, dilation=dil))
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            if i in (1, 3):
                x = nn.functional.max_pool2d(x, 2)
        return self.head(x.mean((2, 3)))


class TokenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32000, 512)
        self.convs = nn.ModuleList([nn.Conv1d(512, 512, 5, padding=2) for _ in range(4)])
        self.head = nn.Linear(512, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).transpose(1, 2)
        for conv in self.convs:
            x = torch.relu(conv(x)) + x
        return self.head(x.mean(2))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 256, 3, padding=1)
        self.convs = nn.ModuleList([nn.Conv2d(256, 256, 3, padding=1, groups=32) for _ in range(4)])
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for conv in self.convs:
            x = torch.relu(conv(x)) + x
        return self.head(x.mean((2, 3)))


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
        self.lm = MixtralForCausalLM(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
        self.head = nn.Linear(512, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


MODELS = {
    "cnn": dict(make=CNN, inputs=lambda g, d: torch.randn(64, 3, 32, 32, generator=g).to(d),
                targets=[f"convs.{i}" for i in range(6)], peft_targets=[f"convs.{i}" for i in range(4)]),
    "emb": dict(make=TokenConv, inputs=lambda g, d: torch.randint(0, 32000, (32, 256), generator=g).to(d),
                targets=["emb", *[f"convs.{i}" for i in range(4)]], peft_targets=None),
    "grouped": dict(make=Grouped, inputs=lambda g, d: torch.randn(32, 3, 32, 32, generator=g).to(d),
                    targets=[f"convs.{i}" for i in range(4)], peft_targets=None, r=32),
    "moe": dict(make=MoE, inputs=lambda g, d: torch.randint(0, 1000, (8, 256), generator=g).to(d),
                targets=[], params=["experts.gate_up_proj", "experts.down_proj"], peft_targets=None),
    "attn": dict(make=Encoder, inputs=lambda g, d: torch.randn(32, 128, 512, generator=g).to(d),
                 targets=["self_attn", "linear1", "linear2"], peft_targets=None),
}


def build(spec: dict, variant: str, device: str) -> tuple[nn.Module, list[nn.Parameter]]:
    torch.manual_seed(0)
    model = spec["make"]().to(device)
    targets = spec["targets"] if variant == "ours_all" else (spec["peft_targets"] or spec["targets"])
    r = spec.get("r", 8)
    params = {"target_parameters": spec["params"]} if spec.get("params") else {}
    if variant.startswith("ours"):
        ll.inject_adapter(model, "lora", r=r, alpha=2 * r, target_modules=targets, **params)
        return model, ll.trainable_parameters(model)
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: its MultiheadAttention support is experimental
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **params))
    return model, [p for p in model.parameters() if p.requires_grad]


def step_fn(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, device: str) -> Callable[[], None]:
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lora_conv_vs_peft.json"))
    args = ap.parse_args()
    dev = args.device
    metrics: dict[str, float] = {"rounds": args.rounds, "steps": args.steps}
    for name in args.models:
        spec = MODELS[name]
        variants = ["ours", "peft"] + (["ours_all"] if spec["peft_targets"] else [])
        x = spec["inputs"](torch.Generator().manual_seed(1), dev)
        steps = {}
        for v in variants:
            model, params = build(spec, v, dev)
            steps[v] = step_fn(model, params, x, dev)
            metrics[f"{name}_{v}_trainable_params"] = sum(p.numel() for p in params)
            for _ in range(args.warmup):
                steps[v]()
        per_round: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                per_round[v].append(timed_steps(steps[v], 0, args.steps, dev == "cuda")[0])
        for v in variants:
            metrics[f"{name}_{v}_ms"] = round(statistics.median(per_round[v]), 3)
            metrics[f"{name}_{v}_ms_min"] = round(min(per_round[v]), 3)
            metrics[f"{name}_{v}_ms_max"] = round(max(per_round[v]), 3)
        metrics[f"step_time_ratio_{name}"] = round(metrics[f"{name}_ours_ms"] / metrics[f"{name}_peft_ms"], 3)
        if dev == "cuda":
            # every variant's model stays resident: a step's own memory is its peak above what was
            # allocated before it (activations, gradients, optimizer state already there)
            for v in variants:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                steps[v]()
                torch.cuda.synchronize()
                metrics[f"{name}_{v}_step_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 3)
            metrics[f"step_mem_ratio_{name}"] = round(metrics[f"{name}_ours_step_gib"] / metrics[f"{name}_peft_step_gib"], 3)
        print(name, {k: v for k, v in metrics.items() if k.startswith(name) or k.endswith(name)}, flush=True)
        del steps
    print(write_result(Path(args.out).stem, metrics, directory=Path(args.out).parent))


if __name__ == "__main__":
    main()
