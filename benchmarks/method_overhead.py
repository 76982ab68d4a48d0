"""Issue #5, bar 4: training-step time and peak memory of every adapter method against LoRA of the same rank.

One process, one GPU, the methods one after another on the same model and batch: a BERT-base
shaped encoder (random weights: speed does not depend on them) in bf16, every encoder Linear
adapted at rank 16, batch 32 × 256 tokens, forward + backward + fused AdamW over the adapter.
Median step time over ``--steps`` timed steps after ``--warmup``; peak allocated memory.

"Rank 16" per method: LoRA, DoRA, rsLoRA-style variants, DyLoRA (r_max), ALLoRA, FFA-LoRA, SLoRA,
NLoRA, IntTune, LoRA-XS, LoRA-SB: r = 16; Bone / Bat: block width 16; SMoRA: 16 rank-1 experts,
top-4 per token. LoRA-SB's data-driven initialisation (a training-loop hook) is not part of a step
and is skipped: its step is that of LoRA-XS with a different init.

Keys: ``<method>_ms``, ``<method>_peak_gib``, ``<method>_trainable``, ``<method>_time_ratio_vs_lora``,
``<method>_mem_ratio_vs_lora``, and ``frozen_ms`` / ``frozen_peak_gib`` (no adapter: the floor).

DoRA is also timed through Hugging Face PEFT in the same process (``peft_dora``: its defaults, fp32
adapters; ``peft_dora_bf16``: ``autocast_adapter_dtype=False``), same targets, rank and scale:
``dora_time_ratio_vs_peft`` and ``dora_mem_ratio_vs_peft`` are ours over the faster of the two.

``--interleave`` (time): after the sequential pass (which keeps the memory figures), each method is
timed side by side with LoRA: the two models resident, turns alternating, ``--block`` steps a turn
(the first untimed: it starts cold on the host), the order rotated each cycle, ``--cycles`` cycles;
DoRA with both PEFT DoRA variants in one group of four. The H200's host pace drifts over seconds
(session 23: the frozen floor 12.4, 15.7 and 20.0 ms in three sequential runs), so only steps taken
side by side compare the code: ``<method>_ms`` is then the interleaved median, ``lora_ms`` LoRA's over
every group, and ``<method>_time_ratio_vs_lora`` the median over cycles of the method's step over
LoRA's in the same cycle; the sequential figures stay under ``<method>_ms_sequential``. Pairs, not
all sixteen models at once: the optimizer-step hook that refreshes the adapters' casts checks every
LoRA layer of the process (about 4 µs a layer on the host), so fifteen resident models made every
LoRA-form step slower than any user's single model (session 24's first run: LoRA 25 ms sequential,
35 ms among fifteen others).
``<method>_cpp_path_on``: every adapted layer of the method ran the C++ autograd function at its last
training step (the default on CUDA, ``LIGHTNING_LORA_CPP``).

    python benchmarks/method_overhead.py                                   # H200, sequential
    python benchmarks/method_overhead.py --interleave --block 4 --cycles 12  # H200, side by side
    python benchmarks/method_overhead.py --tiny [--interleave]             # CPU check, writes nothing
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning_lora as ll  # noqa: E402
from benchmarks.lora_vs_peft import settle, timed_steps  # noqa: E402
from lightning_lora.optim.allora import scale_gradients  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402

R = 16
#: method -> config at "rank 16" (see the module docstring)
CONFIGS: dict[str, dict[str, Any]] = {
    "lora": {"r": R, "alpha": 2 * R},
    "dora": {"r": R, "alpha": 2 * R, "use_dora": True},
    "dylora": {"r": R, "alpha": 2 * R},
    "allora": {"r": R, "eta": 1.0},
    "ffa_lora": {"r": R},
    "bone": {"r": R},
    "bat": {"r": R},
    "lora_xs": {"r": R},
    "lora_sb": {"r": R},
    "slora": {"r": R},
    "nlora": {"r": R},
    "inttune": {"r": R},
    "smora": {"r": R, "top_k": 4},
}
TARGETS = ["query", "key", "value", "dense"]
#: DoRA through PEFT -> its ``autocast_adapter_dtype`` (True: PEFT's default, fp32 adapters)
PEFT_VARIANTS: dict[str, bool] = {"peft_dora": True, "peft_dora_bf16": False}


def bert(tiny: bool) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if tiny else {}
    cfg = BertConfig(num_labels=2, **size)
    cfg._attn_implementation = "sdpa"
    return BertForSequenceClassification(cfg)


def build(name: str, device: str, tiny: bool, batch: int, seq: int) -> tuple[Any, nn.Module, list[nn.Parameter]]:
    """``(step, model, trainable parameters)`` of ``name``: a fresh model, its adapter, its optimizer
    and batch; ``step()`` is one forward + backward + optimizer step."""
    torch.manual_seed(0)
    with torch.device(device):
        model = bert(tiny)
    model = model.to(dtype=torch.bfloat16 if device == "cuda" else torch.float32).train()
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    if name == "frozen":
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    elif name in PEFT_VARIANTS:
        from peft import LoraConfig, get_peft_model

        cfg = CONFIGS["dora"]
        model = get_peft_model(model, LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=TARGETS,
                                                 use_dora=True, lora_dropout=0.0),
                               autocast_adapter_dtype=PEFT_VARIANTS[name])
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        method = "lora" if name == "dora" else name
        ll.inject_adapter(model, method, target_modules=TARGETS, **CONFIGS[name])
        params = ll.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda") if params else None
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device, generator=g)
    labels = torch.randint(0, 2, (batch,), device=device, generator=g)

    def step() -> None:
        model(input_ids=ids, labels=labels).loss.backward()
        if name == "allora":  # the method's on_after_backward hook, as AdapterCallback runs it
            scale_gradients(model)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, model, params


def cpp_path_on(model: nn.Module) -> bool:
    """Every adapted layer of ``model`` (ours) ran the C++ function at its last training forward: one
    more forward, its graph's nodes read at each layer's output (a PEFT or frozen model: False)."""
    layers = ll.adapter_layers(model)
    if not layers:
        return False
    names: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o: names.append(_node_names(o.grad_fn, depth=3)))
             for m in layers.values()]
    try:
        ids = torch.zeros(1, 8, dtype=torch.long, device=next(model.parameters()).device)
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return len(names) == len(layers) and all("CppNode" in n for n in names)


def _node_names(fn: Any, depth: int) -> str:
    """The names of the autograd nodes within ``depth`` edges of ``fn`` (DoRA's rescale sits above
    the C++ node), joined; the nodes are held while walking (a freed node's id can be reused)."""
    seen: dict[int, Any] = {}
    frontier = [fn]
    for _ in range(depth + 1):
        nxt = []
        for f in frontier:
            if f is not None and id(f) not in seen:
                seen[id(f)] = f
                nxt.extend(g for g, _ in f.next_functions)
        frontier = nxt
    return " ".join(f.name() for f in seen.values())


def measure(name: str, device: str, tiny: bool, batch: int, seq: int, warmup: int, steps: int) -> dict[str, float]:
    step, model, params = build(name, device, tiny, batch, seq)
    cuda = device == "cuda"
    ms, peak = timed_steps(step, warmup, steps, cuda)
    out = {"ms": ms, "peak_gib": peak, "trainable": sum(p.numel() for p in params),
           "cpp_path_on": float(cpp_path_on(model))}
    print(f"{name:14s} {out['ms']:8.2f} ms {out['peak_gib']:6.2f} GiB trainable {out['trainable']:,}"
          f"{'  (C++ path)' if out['cpp_path_on'] else ''}", flush=True)
    del model, params, step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def measure_interleaved(names: list[str], device: str, tiny: bool, batch: int, seq: int, warmup: int,
                        block: int, cycles: int) -> dict[str, list[float]]:
    """``{name: [ms per cycle]}`` from resident models whose timed turns alternate (module docstring,
    ``--interleave``); entry i of every list comes from the same cycle."""
    cuda = device == "cuda"
    steps = {}
    for name in names:
        steps[name] = build(name, device, tiny, batch, seq)[0]
        for _ in range(warmup):
            steps[name]()
        settle(steps[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    for cycle in range(cycles):
        k = cycle % len(names)
        for name in names[k:] + names[:k]:  # rotated: no method always follows the same one
            times[name].append(timed_steps(steps[name], 1, max(block - 1, 1), cuda)[0])
    for n in names:
        print(f"{n:14s} {statistics.median(times[n]):8.2f} ms  {paired(times, n, 'lora'):6.3f} of LoRA "
              f"(interleaved, {cycles} cycles)", flush=True)
    del steps
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return times


def groups(names: list[str]) -> list[list[str]]:
    """The interleaved groups, LoRA first in each: LoRA with each other method, and DoRA with the PEFT
    DoRA variants (its ``dora_time_ratio_vs_peft``) in one group; PEFT variants only there."""
    peft = [n for n in names if n in PEFT_VARIANTS]
    out = [["lora", n] for n in names if n not in ("lora", *PEFT_VARIANTS)]
    for g in out:
        if g[1] == "dora":
            g += peft
    if peft and "dora" not in names:
        out.append(["lora", *peft])
    return out


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over cycles of ``a``'s step time over ``b``'s in the same cycle."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interleave", action="store_true", help="time the methods side by side (module docstring)")
    p.add_argument("--block", type=int, default=4, help="with --interleave: steps per method per turn, the first untimed")
    p.add_argument("--cycles", type=int, default=None, help="with --interleave: turns per method (default 12; 2 with --tiny)")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="a subset of the methods (default: all; lora is always measured, the ratios' denominator)")
    p.add_argument("--out", default=None, help="directory of the result file (default benchmarks/results; "
                   "--tiny writes one only here)")
    args = p.parse_args(argv)
    if args.cycles is None:
        args.cycles = 2 if args.tiny else 12
    if args.block < 2 or args.cycles < 1:
        p.error("--block must be >= 2 (its first step is untimed) and --cycles >= 1")
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        args.batch, args.seq, args.warmup, args.steps = 2, 16, 1, 2
    names = ["frozen", *CONFIGS, *PEFT_VARIANTS]
    if args.methods:
        unknown = sorted(set(args.methods) - set(names))
        if unknown:
            p.error(f"unknown methods {unknown}; choose from {names}")
        names = [n for n in names if n in args.methods or n == "lora"]
    m: dict[str, float] = {"rank": R, "batch": args.batch, "seq": args.seq}
    res = {name: measure(name, device, args.tiny, args.batch, args.seq, args.warmup, args.steps) for name in names}
    if args.interleave:
        m.update({"interleaved_block": args.block, "interleaved_cycles": args.cycles})
        ratio, ms = {}, {}
        lora_times: list[float] = []
        for group in groups(names):
            times = measure_interleaved(group, device, args.tiny, args.batch, args.seq, args.warmup,
                                        args.block, args.cycles)
            lora_times += times["lora"]
            for name in group[1:]:
                ms[name], ratio[name] = statistics.median(times[name]), paired(times, name, "lora")
            if group[1] == "dora" and len(group) > 2:
                best = min(group[2:], key=lambda n: ms[n])  # the faster PEFT DoRA
                m["dora_time_ratio_vs_peft"] = paired(times, "dora", best)
        ms["lora"] = statistics.median(lora_times) if lora_times else res["lora"]["ms"]  # (LoRA alone: no pair)
        for name in names:
            res[name]["ms_sequential"] = res[name]["ms"]
            res[name]["ms"] = ms[name]
    for name, r in res.items():
        m.update({f"{name}_{k}": v for k, v in r.items()})
        if name not in ("frozen", "lora", *PEFT_VARIANTS):
            m[f"{name}_time_ratio_vs_lora"] = ratio[name] if args.interleave else r["ms"] / res["lora"]["ms"]
            m[f"{name}_mem_ratio_vs_lora"] = r["peak_gib"] / res["lora"]["peak_gib"] if res["lora"]["peak_gib"] else 0.0
    peft = [n for n in PEFT_VARIANTS if n in res]
    if "dora" in res and peft:
        best = min(peft, key=lambda n: res[n]["ms"])  # the faster PEFT DoRA
        if not args.interleave:  # (interleaved: set above, from DoRA's group)
            m["dora_time_ratio_vs_peft"] = res["dora"]["ms"] / res[best]["ms"]
        m["dora_mem_ratio_vs_peft"] = res["dora"]["peak_gib"] / res[best]["peak_gib"] if res[best]["peak_gib"] else 0.0
    if not args.tiny or args.out:
        print("wrote", write_result("method_overhead", m, command=current_command(), kind="benchmark",
                                    directory=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
