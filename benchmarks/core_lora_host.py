"""Host time of one training step of the r×r-core adapters (LoRA-XS, LoRA-SB, IntTune, SLoRA, NLoRA)
against LoRA, on the CPU.

    python benchmarks/core_lora_host.py --before REV   # writes benchmarks/results/core_lora_host.json

On the H200 (``method_overhead.py``: a launch-bound BERT-base step in bf16 with fp32 adapter factors)
these methods took 1.46-3.1 times LoRA's step although LoRA-XS, LoRA-SB and IntTune train only an
r×r core: there the GPU waits for the host, so the host's time per step decides. This measures it
where no GPU is needed: BERT-base's structure (12 layers; query, key, value and every dense layer
adapted, r = 16) at widths so small (hidden 32, intermediate 128, 4 heads) that the arithmetic is
negligible, fp32 activations with fp64 adapter factors (so every factor is cast to the activation
dtype as fp32 factors are on a bf16 GPU model). One step: forward + backward + AdamW (foreach) +
``zero_grad``; one CPU thread, process CPU time (``time.process_time``: other processes' load does
not count); every method is timed in turn for ``--rounds`` rounds of ``--steps`` steps, median per
step. ``--before REV`` times lightning_lora at that git revision too (a temporary worktree); the
children alternate between the revisions ``--pairs`` times and each figure is the median over them.
LoRA-SB runs on its placeholder factors (``B = I[:, :r]``, ``A = I[:r, :]``, ``R = 0``: the same
kernels as after its gradient init, which needs data). ``nlora`` is the default config (Nyström
init with the full residual, telescoped); ``nlora_plain`` is ``residual=False``. Keys:
``<method>_host_ms`` and ``before_<method>_host_ms`` (medians over the children),
``<method>_vs_before`` (their quotient), ``<method>_vs_lora`` and ``before_<method>_vs_lora``
(medians of the ratio inside each child, where the machine's drift between children cancels) and
``<method>_vs_before_lora_normalised`` (``<method>_vs_lora / before_<method>_vs_lora``: the change
with LoRA, whose code is the same in both revisions, as the yardstick). ``dylora`` (DyLoRA at its
full rank, not in the default set) is measured the same way:
``--methods lora dylora --out benchmarks/results/dylora_host.json``; the result's name follows ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from host_timing import ROOT, alternate, run_child, write_result  # benchmarks/ is sys.path[0]

#: name -> (registered method, config kwargs besides r, targets and the adapter dtype)
METHODS: dict[str, tuple[str, dict[str, object]]] = {
    "lora": ("lora", {"alpha": 32}),
    "lora_xs": ("lora_xs", {}),
    "lora_sb": ("lora_sb", {}),
    "inttune": ("inttune", {}),
    "slora": ("slora", {}),
    "nlora": ("nlora", {}),
    "nlora_plain": ("nlora", {"residual": False}),
    # not an r×r core: DyLoRA at its full rank (no sampler here), on LoRA's fused function since it got one
    "dylora": ("dylora", {"alpha": 32}),
}
TARGETS = ["query", "key", "value", "dense"]


def child(root: str, methods: list[str], rounds: int, steps: int) -> dict[str, float]:
    """ms of host time per training step, per method, with lightning_lora imported from ``root``."""
    sys.path.insert(0, root)
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import lightning_lora as ll

    torch.set_num_threads(1)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2, dtype=torch.long)
    step_fns = {}
    for name in methods:
        method, kw = METHODS[name]
        torch.manual_seed(0)
        cfg = BertConfig(num_labels=2, hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                         intermediate_size=128, vocab_size=100)
        cfg._attn_implementation = "sdpa"
        model = BertForSequenceClassification(cfg).train()
        for p in model.parameters():
            p.requires_grad_(False)
        ll.inject_adapter(model, method, r=16, target_modules=TARGETS, adapter_dtype="float64", **kw)
        params = ll.trainable_parameters(model)
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

        def step(model=model, opt=opt) -> None:
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(5):
            step()
        step_fns[name] = step
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, step in step_fns.items():
            t0 = time.process_time()
            for _ in range(steps):
                step()
            times[name].append((time.process_time() - t0) * 1e3 / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="also time lightning_lora at this git revision")
    ap.add_argument("--pairs", type=int, default=3, help="child processes per revision, alternating")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "dylora"], choices=list(METHODS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "core_lora_host.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.methods, args.rounds, args.steps)))
        return

    samples: dict[str, list[float]] = {}

    def record(prefix: str, res: dict[str, float]) -> None:
        for name, ms in res.items():
            samples.setdefault(f"{prefix}{name}_host_ms", []).append(ms)
            if name != "lora" and "lora" in res:  # against LoRA inside one child: drift between children cancels
                samples.setdefault(f"{prefix}{name}_vs_lora", []).append(ms / res["lora"])

    child_args = ["--rounds", str(args.rounds), "--steps", str(args.steps), "--methods", *args.methods]
    alternate(args.before, args.pairs, lambda root: run_child(__file__, root, child_args), record)
    metrics = {k: statistics.median(v) for k, v in samples.items()}
    if args.before:
        for name in args.methods:
            metrics[f"{name}_vs_before"] = metrics[f"{name}_host_ms"] / metrics[f"before_{name}_host_ms"]
            if f"{name}_vs_lora" in metrics:
                # LoRA's path is the same in both revisions: its ratio is the change with the drift removed
                ratio = metrics[f"{name}_vs_lora"] / metrics[f"before_{name}_vs_lora"]
                metrics[f"{name}_vs_before_lora_normalised"] = ratio
    write_result(Path(args.out).stem, __file__, args.out, metrics)  # the name follows --out


if __name__ == "__main__":
    main()
