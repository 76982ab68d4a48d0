"""Operators per training step of each method's fused path against its plain formula, counted on the CPU.

    python benchmarks/adapter_op_counts.py          # writes benchmarks/results/adapter_op_counts.json

A launch-bound GPU step (``method_overhead.py``: BERT-base in bf16 on the H200) pays per kernel, and
the elementwise ones (the add of the adapter's output to the base's, a scale, a cast) each read and
write a whole activation. This counts, with ``torch.profiler`` on the CPU, the ATen operators of one
training step (forward + backward under bf16 autocast + AdamW foreach + ``zero_grad``) of a
BERT-base-shaped encoder at negligible widths (12 layers; query, key, value and every dense layer
adapted, r = 16, fp32 adapter parameters), once with every adapter layer's ``fused = True`` (the
default) and once with ``False`` (the reference formula). Counts are exact (no timing). Keys:
``<method>_<fused|plain>_<op>`` for the operators below and ``<method>_<fused|plain>_total`` (all
ATen operators the profiler records, nested ones included).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from host_timing import ROOT, write_result  # benchmarks/ is sys.path[0]

sys.path.insert(0, str(ROOT))  # the source tree's lightning_lora

OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::add", "aten::mul", "aten::_to_copy", "aten::copy_")
#: name -> (registered method, config kwargs besides r and the targets)
METHODS: dict[str, tuple[str, dict[str, object]]] = {
    "lora": ("lora", {"alpha": 32}),
    "dylora": ("dylora", {"alpha": 32}),
    "dora": ("lora", {"alpha": 32, "use_dora": True}),
    "lora_xs": ("lora_xs", {}),
    "inttune": ("inttune", {}),
    "nlora": ("nlora", {}),
}


def count(method: str, kw: dict[str, object], fused: bool) -> dict[str, int]:
    """ATen operator counts of one training step (after three warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import BertConfig, BertForSequenceClassification

    import lightning_lora as ll

    torch.manual_seed(0)
    cfg = BertConfig(num_labels=2, hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                     intermediate_size=128, vocab_size=100)
    cfg._attn_implementation = "sdpa"
    model = BertForSequenceClassification(cfg).bfloat16().train()  # the base in bf16, as on the GPU
    for p in model.parameters():
        p.requires_grad_(False)
    # the adapters in their default fp32, so the paths cast them as they do on a bf16 GPU model
    layers = ll.inject_adapter(model, method, r=16, target_modules=["query", "key", "value", "dense"], **kw)
    for layer in layers.values():
        layer.fused = fused
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-4, foreach=True)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2, dtype=torch.long)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    out = {op: counts.get(op, 0) for op in OPS}
    out["total"] = sum(counts.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adapter_op_counts.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    metrics: dict[str, float] = {}
    for name in args.methods:
        method, kw = METHODS[name]
        for fused in (True, False):
            for op, n in count(method, kw, fused).items():
                metrics[f"{name}_{'fused' if fused else 'plain'}_{op.removeprefix('aten::')}"] = n
    write_result(Path(args.out).stem, __file__, args.out, metrics)


if __name__ == "__main__":
    main()
