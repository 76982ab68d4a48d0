"""Host time of ALLoRA's gradient scaling (``scale_gradients``) per optimizer step, on the CPU.

    python benchmarks/allora_scale_host.py --before b318631   # writes benchmarks/results/allora_scale_host.json

ALLoRA scales every adapter gradient after backward (``lightning_lora.optim.scale_gradients``, the
``allora`` method's ``on_after_backward`` hook). On a launch-bound GPU step (``method_overhead.py``'s
BERT-base encoder, where session 9 measured ALLoRA at 1.45 times LoRA's step) what that costs is the
host's time to issue its kernels. This measures it where no GPU is needed: the adapter tensors of
BERT-base with r = 16 on query, key, value and every dense layer (72 A and 72 B, the four shapes
of that model) at widths divided by 24, so that the arithmetic is negligible; one CPU thread,
process CPU time (``time.process_time``), ``--rounds`` rounds of ``--calls`` calls, median per call.
``--before REV`` also times the function of that git revision (a temporary worktree); children
alternate between the revisions ``--pairs`` times and each figure is the median over them. Keys:
``<granularity>_host_ms``, ``before_<granularity>_host_ms``, ``<granularity>_vs_before``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from host_timing import ROOT, alternate, run_child, write_result  # benchmarks/ is sys.path[0]
GRANULARITIES = ("row", "tensor", "element")


def child(root: str, rounds: int, calls: int) -> dict[str, float]:
    """ms per ``scale_gradients`` call with lightning_lora imported from ``root``, per granularity."""
    sys.path.insert(0, root)
    import torch
    from lightning_lora.optim.allora import scale_gradients

    torch.set_num_threads(1)
    torch.manual_seed(0)
    h, r, inter = 768 // 24, 16, 3072 // 24  # BERT-base's hidden and intermediate widths / 24; rank 16
    # per layer: q, k, v, attention.output.dense (h -> h), intermediate.dense (h -> inter), output.dense (inter -> h)
    shapes = 12 * ([(r, h), (h, r)] * 4 + [(r, h), (inter, r), (r, inter), (h, r)])
    params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    out = {}
    for gran in GRANULARITIES:
        times = []
        for _ in range(rounds):
            for p in params:
                p.grad = torch.randn_like(p)
            scale_gradients(params, eta=1.0, granularity=gran)  # warm-up
            t0 = time.process_time()
            for _ in range(calls):
                scale_gradients(params, eta=1.0, granularity=gran)
            times.append((time.process_time() - t0) * 1e3 / calls)
        out[gran] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="also time lightning_lora at this git revision")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "allora_scale_host.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds, args.calls)))
        return

    samples: dict[str, list[float]] = {}

    def record(prefix: str, res: dict[str, float]) -> None:
        for gran, ms in res.items():
            samples.setdefault(f"{prefix}{gran}_host_ms", []).append(ms)

    alternate(args.before, args.pairs,
              lambda root: run_child(__file__, root, ["--rounds", str(args.rounds), "--calls", str(args.calls)]), record)
    metrics = {k: statistics.median(v) for k, v in samples.items()}
    if args.before:
        for gran in GRANULARITIES:
            metrics[f"{gran}_vs_before"] = metrics[f"{gran}_host_ms"] / metrics[f"before_{gran}_host_ms"]
    write_result("allora_scale_host", __file__, args.out, metrics)


if __name__ == "__main__":
    main()
