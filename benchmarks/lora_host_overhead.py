"""Host (Python + dispatch) time of one LoRA training step, ours against PEFT, on the CPU.

    python benchmarks/lora_host_overhead.py                      # writes benchmarks/results/lora_host_overhead.json
    python benchmarks/lora_host_overhead.py --before 5494263     # also an earlier revision of lightning_lora

On a launch-bound GPU step (BERT-base at 32 × 512 on the H200, `lora_vs_peft.py`) the GPU waits for
the host, so the host's time per step is what decides. This measures it where it can be measured
without a GPU: BERT-base's structure (12 layers; query, key, value and every dense layer adapted,
r = 16) at widths so small (hidden 32) that the arithmetic is negligible, in fp32 on one CPU thread.
Our adapters are fp64 there, so our fused path casts them to the activation dtype after every
optimizer step exactly as fp32 adapters on a bf16 model do on the GPU; PEFT's fp32 adapters run as
they are. Forward + backward + AdamW (foreach) per step, in process CPU time (``time.process_time``:
other processes on the machine do not count); every variant is timed in turn for
``--rounds`` rounds of ``--steps`` steps and the median per-step time is reported, so a drift of
the machine's load hits every variant alike. ``--before REV`` times lightning_lora at that git
revision too (a temporary worktree), every variant again; the children alternate between the
revisions ``--pairs`` times and each figure is the median over them. Keys: ``<variant>_host_ms``
(``before_<variant>_host_ms``), ``ours_vs_peft`` and ``before_ours_vs_peft`` (medians of the ratio
inside each child), ``ours_vs_before`` (their quotient: PEFT is the yardstick in both),
``siblings_vs_nosib``.

``--variants frozen ours ours_nosib peft ours_cpp`` also times ``ours`` with the opt-in C++ autograd
functions (``lightning_lora.core._lora_cpp``, switched on around that variant's steps only; compiled
once into torch's extension cache); keys ``ours_cpp_vs_ours`` and ``ours_cpp_vs_peft`` (medians of the
per-child ratios). ``ours_merged`` is ``merged_training=True`` (W + sBA formed once per optimizer
step, in fp32 here, where the GPU forms it in bf16 in a few grouped Triton launches: on this CPU the
merge is one torch expression per layer); keys ``ours_merged_vs_ours`` and ``ours_merged_vs_peft``.
``ours_pair`` and ``ours_merged_pair`` train two such models in turn, each with its own optimizer
(two models in one loop, or a gate optimizer beside the adapters' one), and report the time per model
step: ``ours_pair_vs_ours`` is what the other model's optimizer costs this one (1 when nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from host_timing import ROOT, alternate, run_child, write_result  # benchmarks/ is sys.path[0]


#: variants beside the default ones whose ratios to ``ours`` and to PEFT are reported per child
EXTRA_VARIANTS = ("ours_cpp", "ours_merged", "ours_pair", "ours_merged_pair")
#: suffix of a variant trained as two models in turn, each with its own optimizer
PAIR = "_pair"


def child(root: str, variants: list[str], rounds: int, steps: int) -> dict[str, float]:
    """Time ``variants`` with lightning_lora imported from ``root``; returns ms per step."""
    sys.path.insert(0, root)
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import lightning_lora as ll

    torch.set_num_threads(1)
    targets = ["query", "key", "value", "dense"]

    def build(variant: str):
        torch.manual_seed(0)
        cfg = BertConfig(num_labels=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100)
        cfg._attn_implementation = "sdpa"
        model = BertForSequenceClassification(cfg).train()
        for p in model.parameters():
            p.requires_grad_(False)
        if variant == "frozen":
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
            return model, []
        if variant == "peft":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
            return model, [p for p in model.parameters() if p.requires_grad]
        kw = {"fuse_siblings": False} if variant == "ours_nosib" else {}
        if variant == "ours_merged":
            kw = {"merged_training": True}
        ll.inject_adapter(model, "lora", r=16, alpha=32, target_modules=targets, adapter_dtype="float64", **kw)
        return model, ll.trainable_parameters(model)

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2, dtype=torch.long)
    lora_mod, cpp = None, None
    if "ours_cpp" in variants:  # the C++ path, on around the ours_cpp steps only
        from lightning_lora.core import _lora_cpp
        from lightning_lora.methods import lora as lora_mod

        cpp = _lora_cpp._build()
        assert cpp is not None, "ours_cpp: the C++ extension could not be built"
    steps_fn = {}
    for v in variants:
        # <variant>_pair: two models of <variant>, each with its own optimizer, stepped in turn (a
        # step of the pair is one step of each: its time is halved, per model step)
        copies = 2 if v.endswith(PAIR) else 1
        built = [build(v.removesuffix(PAIR)) for _ in range(copies)]
        opts = [torch.optim.AdamW(params, lr=1e-4, foreach=True) if params else None for _, params in built]

        def step(models=[m for m, _ in built], opts=opts, on=cpp if v == "ours_cpp" else None) -> None:
            if lora_mod is not None:
                lora_mod._CPP = on
            for model, opt in zip(models, opts):
                model(input_ids=ids, labels=labels).loss.backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)

        for _ in range(5):
            step()
        steps_fn[v] = (step, copies)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v, (step, copies) in steps_fn.items():
            t0 = time.process_time()  # this process's CPU time: other processes' load does not count
            for _ in range(steps):
                step()
            times[v].append((time.process_time() - t0) / steps / copies * 1000)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="git revision of lightning_lora to time as well")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--pairs", type=int, default=3, help="child processes per revision, alternating")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lora_host_overhead.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variants", nargs="+", default=["frozen", "ours", "ours_nosib", "peft"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.variants, args.rounds, args.steps)))
        return

    samples: dict[str, list[float]] = {}

    def record(prefix: str, res: dict[str, float]) -> None:
        for v, ms in res.items():
            samples.setdefault(f"{prefix}{v}_host_ms", []).append(ms)
        # ours / PEFT inside one child: the machine's drift between children cancels
        samples.setdefault(f"{prefix}ours_vs_peft_per_child", []).append(res["ours"] / res["peft"])
        for extra in EXTRA_VARIANTS:
            if extra in res:
                samples.setdefault(f"{prefix}{extra}_vs_ours_per_child", []).append(res[extra] / res["ours"])
                samples.setdefault(f"{prefix}{extra}_vs_peft_per_child", []).append(res[extra] / res["peft"])

    # children alternate (now, before, now, before, ...): each figure is the median over --pairs children;
    # both revisions time every variant in their children: a child that builds fewer models runs faster
    # (session 8: ours alone in a child beat ours beside PEFT)
    child_args = ["--rounds", str(args.rounds), "--steps", str(args.steps), "--variants", *args.variants]
    alternate(args.before, args.pairs, lambda root: run_child(__file__, root, child_args), record)
    metrics: dict[str, float] = {k: statistics.median(v) for k, v in samples.items() if not k.endswith("_per_child")}
    # the ratios are medians of the per-child ratios (each child times ours and PEFT side by side)
    metrics["ours_vs_peft"] = statistics.median(samples["ours_vs_peft_per_child"])
    for key in (f"{prefix}{extra}_vs_{peer}" for prefix in ("", "before_") for extra in EXTRA_VARIANTS
                for peer in ("ours", "peft")):
        if f"{key}_per_child" in samples:
            metrics[key] = statistics.median(samples[f"{key}_per_child"])
    if "ours_nosib_host_ms" in metrics:
        metrics["siblings_vs_nosib"] = metrics["ours_host_ms"] / metrics["ours_nosib_host_ms"]
    if args.before:
        metrics["before_ours_vs_peft"] = statistics.median(samples["before_ours_vs_peft_per_child"])
        # PEFT is the yardstick in both revisions' children: ours' change with the machine's drift removed
        metrics["ours_vs_before"] = metrics["ours_vs_peft"] / metrics["before_ours_vs_peft"]
    for k, v in samples.items():
        if k.endswith("_per_child"):
            for i, x in enumerate(v):
                metrics[f"{k[:-len('_per_child')]}_child{i}"] = x
    write_result("lora_host_overhead", __file__, args.out, metrics)


if __name__ == "__main__":
    main()
