"""One LoRA training step, ours against Hugging Face PEFT, in one process on one GPU.

    python benchmarks/lora_vs_peft.py            # both models, writes benchmarks/results/lora_vs_peft.json
    python benchmarks/lora_vs_peft.py --rounds 3 # every variant timed three times, in turn (the spread too)

Measured per model (same random weights, same batch, bf16 base, rank 16, same targets):

- ``frozen``: the base with no adapter, no weight gradients, input gradients on (the floor);
- ``ours``: lightning_lora LoRA, fp32 adapter parameters, adapter compute in bf16, fused path;
- ``peft_default``: PEFT LoRA with its defaults (adapter weights upcast to fp32);
- ``peft_bf16``: PEFT LoRA with ``autocast_adapter_dtype=False`` (bf16 adapters);
- ``ours_bf16`` (extra, not in the ratios): lightning_lora with bf16 adapter parameters, the
  like-for-like match of ``peft_bf16`` (optimizer state in bf16 too);
- ``ours_cpp`` (extra): ``ours`` with the C++ autograd functions switched on by hand
  (``lightning_lora.enable_cpp_path()``, compiled at once);
- ``ours_python`` (extra): ``ours`` with the C++ path off (``LIGHTNING_LORA_CPP=0``): the Python autograd
  functions, the default path before session 23. ``ours`` itself runs the default, automatic mode (the
  C++ path built in the background at the first CUDA forward where a compiler exists): every
  ``ours*`` variant but these two waits after its warm-up until that build has ended, so the steady
  state is timed, and ``<model>_<variant>_cpp_path_on`` says whether it ran on the C++ path (1) or not (0);
- ``ours_nosib`` (extra): ``ours`` with ``fuse_siblings=False`` (each LoRA layer alone), the A/B of
  the sibling fusion; ``<model>_<variant>_sibling_sets`` counts the sets the fused path learned;
- ``ours_noreplay`` (extra): ``ours`` with ``replay_inputs="none"`` (every adapter input saved for
  backward, as PEFT does), and ``ours_replay_all`` with ``replay_inputs="all"`` (RMSNorm outputs
  replayed too): the A/B of the input replay, its memory against its extra backward kernels
  (``ours`` is the default, ``"products"``; session 7 measured ``ours`` when the default was ``"all"``);
- ``ours_merged`` (extra): ``ours`` with ``merged_training=True``: each layer runs through
  ``W + s·B A`` formed once per optimizer step (stochastically rounded to bf16), one GEMM forward and
  one for the input gradient, as the frozen base; ``step_time_ratio_<model>_ours_merged`` beside the
  default path's ratio (an opt-in mode: the bars' ``step_time_ratio_<model>`` stays ``ours``);
- ``ours_tkernel``, ``ours_merged_tkernel`` (extra): ``ours`` / ``ours_merged`` with
  ``lightning_lora.core.replay_kernels`` on (A's gradient of a replayed input, BERT's ``gelu(h)`` or an
  MLP's ``act(gate) * up``, in one Triton kernel that computes the input tile by tile);
- ``<variant>_compiled`` (extra, any variant above): the same model under ``torch.compile`` (mode from
  ``--compile-mode``; compiled in the warm-up steps). Under compile our LoRA layers run the plain
  formula and the compiler fuses it (``LoRALinear.forward``), as it does PEFT's; ``reduce-overhead``
  also captures CUDA graphs, which removes the host time that bounds BERT's eager step.
  ``step_time_ratio_<model>_compiled`` = ``ours_compiled`` / the faster compiled PEFT variant measured
  (a diagnostic beside the bar's eager ratio, not a replacement for it);

A step is forward + backward + AdamW step (fused AdamW for every variant). Reported: median
step time over ``--steps`` timed steps after ``--warmup`` steps, and peak allocated memory.

``--interleave`` (time only): every variant's model is built and kept on the GPU, and the timed
steps go round the variants one step each (v1 v2 v3 v1 v2 v3 ..., the order rotated by one each
cycle), ``--rounds`` × ``--steps`` cycles. On a host-bound step the host's pace drifts over seconds
(session 20: one variant's rounds 20 ms apart, and two runs minutes apart gave 0.756 and 0.964 for
the same ratio); steps taken a few hundred ms apart share that pace, so the ratios compare the code.
``<model>_<a>_vs_<b>_paired`` is the median over cycles of ``a``'s step over ``b``'s in the same cycle.
Each turn's first step starts cold on the host (another model's Python objects and allocations ran
last): with ``--block 1`` that cold step is the sample, which slows every variant (BERT ``ours`` 48
against 29–35 ms sequentially, session 20) and tilts the ratios towards the host-time ratio;
``--block K`` takes K steps a turn and times the last K - 1, warm, as the sequential mode does.
No memory figures (every model is resident: the sequential mode measures memory), and at most one
``merged_training`` variant (their layers share the registry that forms every stale W' at once).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

DEVICE = "cuda"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning_lora as ll  # noqa: E402


TINY = False  # --tiny: small configs on the CPU, to check the script itself


def llama_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    if not TINY:
        size = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                    intermediate_size=5632)
    cfg = LlamaConfig(**size, vocab_size=32000, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def bert_model() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if TINY else {}
    cfg = BertConfig(num_labels=2, attention_probs_dropout_prob=BERT_ATTN_DROPOUT, **size)
    cfg._attn_implementation = "sdpa"
    return BertForSequenceClassification(cfg)


#: the input-replay A/B variants and their ``replay_inputs`` (``ours`` and the others: the default, "products")
REPLAY = {"ours_noreplay": "none", "ours_replay_all": "all"}

SPECS = {
    "llama": dict(make=llama_model, batch=4, seq=2048, targets="all-linear", vocab=32000, lm=True),
    "bert": dict(make=bert_model, batch=32, seq=512, targets=["query", "key", "value", "dense"], vocab=30522, lm=False),
}

#: BERT's attention-probability dropout (--bert-attn-dropout; BertConfig's 0.1 by default). Under
#: torch.compile a training SDPA with dropout > 0 is decomposed into plain matmul-softmax-matmul
#: (the attention matrix materialized); at 0 the fused attention kernel stays
BERT_ATTN_DROPOUT = 0.1

#: suffix of a variant run under torch.compile; --compile-mode sets the mode
COMPILED = "_compiled"
COMPILE_MODE = "default"
#: compile modes that capture CUDA graphs: their peak memory is not measured (0 in the file)
CUDAGRAPH_MODES = {"reduce-overhead", "max-autotune"}


def build(spec: dict, variant: str, r: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model of ``variant`` and its trainable parameters; ``<variant>_compiled`` wraps it in
    ``torch.compile`` (the parameters are the same objects)."""
    plain = variant.removesuffix(COMPILED)
    model, params = _build(spec, plain, r)
    if plain != variant:
        model = torch.compile(model, mode=COMPILE_MODE)
    return model, params


def _build(spec: dict, variant: str, r: int) -> tuple[nn.Module, list[nn.Parameter]]:
    torch.manual_seed(0)
    with torch.device(DEVICE):  # initialise on the GPU: a 1.1B random init on the CPU takes long
        model = spec["make"]()
    model = model.to(dtype=torch.bfloat16)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    if variant == "frozen":
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        return model, []
    variant = TKERNEL.get(variant, variant)  # (the kernel is a process switch: see measure)
    if variant in ("ours", "ours_bf16", "ours_nosib", "ours_cpp", "ours_python", "ours_merged", *REPLAY):
        dtype = "bfloat16" if variant == "ours_bf16" else "float32"
        ll.inject_adapter(model, "lora", r=r, alpha=2 * r, target_modules=spec["targets"], adapter_dtype=dtype,
                          fuse_siblings=variant != "ours_nosib", replay_inputs=REPLAY.get(variant, "products"),
                          merged_training=variant == "ours_merged")
        return model, ll.trainable_parameters(model)
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=spec["targets"], lora_dropout=0.0)
    model = get_peft_model(model, cfg, autocast_adapter_dtype=(variant == "peft_default"))
    return model, [p for p in model.parameters() if p.requires_grad]


def step_fn(model: nn.Module, params: list[nn.Parameter], spec: dict) -> Callable[[], None]:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), device=DEVICE, generator=g)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    labels = ids if spec["lm"] else torch.randint(0, 2, (spec["batch"],), device=DEVICE, generator=g)

    def step() -> None:
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def timed_steps(step: Callable[[], None], warmup: int, steps: int, cuda: bool) -> tuple[float, float]:
    """``(median ms, peak GiB)`` of ``steps`` calls of ``step`` after ``warmup`` untimed ones; on CUDA
    timed with events and the peak allocation counted from after the warm-up (0 on the CPU). The
    warm-up's first CUDA training forward may start the C++ path's background build: :func:`settle`
    waits for it, so the steady state is timed (method_overhead.py times through here too)."""
    for _ in range(warmup):
        step()
    settle(step)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        step()
        if cuda:
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def switches(variant: str) -> None:
    """The process-wide switches of ``variant``: the C++ autograd functions on for ``ours_cpp``, off
    for ``ours_python``, the default (``LIGHTNING_LORA_CPP``, automatic when unset) for every other
    variant (each also ``_compiled``); the replay kernel on for the ``TKERNEL`` variants only."""
    from lightning_lora.core import _lora_cpp, replay_kernels
    from lightning_lora.methods import lora as lora_mod

    base = variant.removesuffix(COMPILED)
    replay_kernels.set_enabled(base in TKERNEL)
    if base == "ours_cpp":
        assert _lora_cpp.enable(), "ours_cpp: the C++ extension could not be built"
    else:
        lora_mod._CPP = None if base == "ours_python" else _lora_cpp.mode_from_env()


def settle(step: Callable[[], None]) -> None:
    """After a variant's warm-up: wait for the automatic mode's background build of the C++ path to
    end (started by the first CUDA forward; about a minute on a fresh machine), then warm up on what
    it switched to. A long training run spends all but its first minute in that state."""
    from lightning_lora.core import _lora_cpp

    if _lora_cpp.status() != "building":
        return
    start = time.perf_counter()
    while _lora_cpp.status() == "building":
        time.sleep(1.0)
    print(f"(waited {time.perf_counter() - start:.0f} s for the background build of the C++ path: "
          f"{_lora_cpp.status()})", flush=True)
    for _ in range(5):
        step()


def cpp_path_on() -> int:
    """1 where the fused layers' next CUDA training forward runs the C++ functions, else 0."""
    from lightning_lora.core import _lora_cpp

    return int(_lora_cpp.status() == "on")


#: variants with ``lightning_lora.core.replay_kernels`` on (A's gradient read from the replayed
#: input's factors in one Triton kernel); off for every other variant
TKERNEL = {"ours_tkernel": "ours", "ours_merged_tkernel": "ours_merged"}


def sibling_sets(model: nn.Module) -> int:
    """Sibling sets the fused path learned (q/k/v, gate/up; query/key/value): proof it was taken."""
    return len({id(st) for m in model.modules() if getattr(m, "_siblings", None) is not None
                for st in (m._siblings.sets or {}).values()})


def measure(name: str, variant: str, r: int, warmup: int, steps: int) -> dict[str, float]:
    switches(variant)
    spec = SPECS[name]
    model, params = build(spec, variant, r)
    step = step_fn(model, params, spec)
    cuda = DEVICE == "cuda"
    ms, peak = timed_steps(step, warmup, steps, cuda)
    if variant.endswith(COMPILED) and COMPILE_MODE in CUDAGRAPH_MODES:
        # CUDA graphs replay from a private pool recorded in the warm-up: the allocator's peak after
        # the warm-up misses it (session 27: 0.26 GiB for a BERT whose eager step holds 3.6), so no figure
        peak = 0.0
    n_train = sum(p.numel() for p in params)
    sets = sibling_sets(model)
    on = cpp_path_on()
    del model, params, step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    res = {"ms": ms, "peak_gib": peak, "trainable": n_train, "sibling_sets": sets, "cpp_path_on": on}
    print(f"{name:6s} {variant:13s} {res['ms']:8.2f} ms  {peak:6.2f} GiB  trainable {n_train:,}", flush=True)
    return res


def measure_interleaved(name: str, variants: list[str], r: int, warmup: int, steps: int,
                        rounds: int, block: int = 1) -> list[dict[str, dict[str, float]]]:
    """``rounds`` dicts ``{variant: {"ms", "peak_gib" (0: not measured), "trainable", "sibling_sets"}}``
    from one set of resident models whose timed steps alternate (module docstring, ``--interleave``),
    and a last dict under the key ``"paired"``: ``{(a, b): [a's ms / b's ms per cycle]}``."""
    spec = SPECS[name]
    built = {}
    for v in variants:
        switches(v)
        model, params = build(spec, v, r)
        built[v] = (model, params, step_fn(model, params, spec))
        for _ in range(warmup):
            built[v][2]()
        settle(built[v][2])  # (the timed turns' own warm-up step is too short to wait in)
    cuda = DEVICE == "cuda"
    times: dict[str, list[float]] = {v: [] for v in variants}
    for cycle in range(rounds * steps):
        k = cycle % len(variants)
        for v in variants[k:] + variants[:k]:  # rotated: no variant always follows the same one
            switches(v)
            # --block K: K steps a turn, the first untimed (it starts cold on the host: another model
            # ran last) and the median of the other K - 1 the cycle's sample; K = 1: the one step, cold
            times[v].append(timed_steps(built[v][2], int(block > 1), max(block - 1, 1), cuda)[0])
    counts = {}
    for v, (model, params, _) in built.items():
        switches(v)
        counts[v] = {"peak_gib": 0.0, "trainable": sum(p.numel() for p in params), "sibling_sets": sibling_sets(model),
                     "cpp_path_on": cpp_path_on()}
    out = [{v: {"ms": statistics.median(times[v][i * steps:(i + 1) * steps]), **counts[v]} for v in variants}
           for i in range(rounds)]
    for v in variants:
        print(f"{name:6s} {v:13s} {statistics.median(times[v]):8.2f} ms  (interleaved, {len(times[v])} steps)",
              flush=True)
    paired = {(a, b): [x / y for x, y in zip(times[a], times[b])] for a in variants for b in variants if a != b}
    del built
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out + [{"paired": paired}]


PROFILED_STEPS = 3


def kernel_ms_per_step(table: str, steps: int = PROFILED_STEPS) -> float:
    """GPU kernel time per step from a profiler table's ``Self CUDA time total: <x>ms`` line (the
    step's wall time minus this is the time the GPU waited for the host)."""
    line = next(ln for ln in table.splitlines() if ln.startswith("Self CUDA time total:"))
    value = line.split(":", 1)[1].strip()
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[value.lstrip("0123456789.")]
    return float(value.rstrip("ums")) * scale / steps


def profile(name: str, variant: str, r: int, out_dir: Path) -> float:
    """Write the top CUDA kernels of 3 steps to ``out_dir/profile_<name>_<variant>.txt``; returns the
    kernel time per step (ms)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    switches(variant)
    spec = SPECS[name]
    model, params = build(spec, variant, r)
    step = step_fn(model, params, spec)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile_{name}_{variant}.txt").write_text(table)
    del model, params, step
    gc.collect()
    torch.cuda.empty_cache()
    return kernel_ms_per_step(table)


def check_fused_matches_reference() -> float:
    """Max relative error of the fused bf16 path against the plain formula on one layer."""
    torch.manual_seed(0)
    lin = nn.Linear(2048, 5632, bias=False).cuda().bfloat16()
    layer = ll.inject_adapter(nn.Sequential(lin), "lora", r=16, alpha=32, target_modules=["0"])["0"]
    nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(8192, 2048, device=DEVICE, dtype=torch.bfloat16)
    ref = layer.reference_forward(x).float()
    out = layer(x).float()
    return ((out - ref).norm() / ref.norm()).item()


def check_merged_matches_reference() -> float:
    """Max relative error of ``merged_training``'s bf16 forward (stochastically rounded ``W + s·B A``)
    against the plain formula on the same layer as :func:`check_fused_matches_reference`."""
    torch.manual_seed(0)
    lin = nn.Linear(2048, 5632, bias=False).cuda().bfloat16()
    layer = ll.inject_adapter(nn.Sequential(lin), "lora", r=16, alpha=32, target_modules=["0"],
                              merged_training=True)["0"]
    nn.init.normal_(layer.lora_B, std=0.02)
    x = torch.randn(8192, 2048, device=DEVICE, dtype=torch.bfloat16)
    ref = layer.reference_forward(x).float()
    out = layer.train()(x).float()
    return ((out - ref).norm() / ref.norm()).item()


def check_tkernel_matches_reference() -> float:
    """Relative error (norm) of A's gradient through ``replay_kernels`` against the torch replay, for
    BERT-base's down projection at 32 × 512 (``gelu(h)``), on the GPU's own bf16 tensor-core dot."""
    from lightning_lora.core import replay_kernels

    torch.manual_seed(0)
    up = nn.Linear(768, 3072).cuda().bfloat16()
    down = ll.inject_adapter(nn.Sequential(nn.Linear(3072, 768)).cuda().bfloat16(), "lora", r=16, alpha=32,
                             target_modules=["0"])["0"]
    nn.init.normal_(down.lora_B, std=0.02)
    x = torch.randn(16384, 768, device=DEVICE, dtype=torch.bfloat16)
    grads = []
    for on in (False, True):
        replay_kernels.set_enabled(on)
        down.lora_A.grad = None
        down(torch.nn.functional.gelu(up(x))).float().square().mean().backward()
        grads.append(down.lora_A.grad.clone())
    replay_kernels.set_enabled(False)
    return ((grads[1] - grads[0]).norm() / grads[0].norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama", "bert"], choices=list(SPECS))
    ap.add_argument("--variants", nargs="+", default=["frozen", "ours", "peft_default", "peft_bf16", "ours_bf16", "ours_nosib",
                                                       "ours_noreplay", "ours_replay_all"])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every variant this many times, in turn (v1 v2 ... v1 v2 ...); each figure is the "
                         "median over rounds of the per-round medians, and <model>_<variant>_ms_min/_max give the "
                         "spread: the host's load drifts, and a variant timed in a bad minute should not decide a ratio")
    ap.add_argument("--interleave", action="store_true",
                    help="all variants resident, timed steps alternating between them (time only; see the docstring)")
    ap.add_argument("--block", type=int, default=1,
                    help="with --interleave: steps per variant per turn; the first of each turn is untimed (a cold "
                         "host) and the median of the rest is the turn's sample (default 1: one cold step a turn)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/lora_vs_peft.json; "
                                                "with --tiny runs/lora_vs_peft_tiny.json)")
    ap.add_argument("--profile-dir", default=None, help="also write kernel profiles of every variant but peft_default here")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script, no figures)")
    ap.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune",
                                                                   "max-autotune-no-cudagraphs"],
                    help="torch.compile mode of the <variant>_compiled variants")
    ap.add_argument("--bert-attn-dropout", type=float, default=0.1,
                    help="BERT's attention_probs_dropout_prob (BertConfig's default 0.1); under torch.compile "
                         "a value > 0 turns the fused attention into the plain, materialized one")
    args = ap.parse_args()
    global TINY, DEVICE, COMPILE_MODE, BERT_ATTN_DROPOUT
    COMPILE_MODE = args.compile_mode
    BERT_ATTN_DROPOUT = args.bert_attn_dropout
    known = {"frozen", "ours", "peft_default", "peft_bf16", "ours_bf16", "ours_nosib", "ours_cpp", "ours_python",
             "ours_merged",
             *TKERNEL, *REPLAY}
    unknown = [v for v in args.variants if v.removesuffix(COMPILED) not in known]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(sorted(known))} "
                 f"(each also as <variant>{COMPILED})")
    if args.tiny:
        TINY, DEVICE = True, "cpu"
        for s in SPECS.values():
            s.update(batch=2, seq=32)
        args.out = args.out or str(ROOT / "runs/lora_vs_peft_tiny.json")
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    args.out = args.out or str(ROOT / "benchmarks/results/lora_vs_peft.json")
    if args.interleave and sum(v.removesuffix(COMPILED) in ("ours_merged", "ours_merged_tkernel")
                               for v in args.variants) > 1:
        ap.error("--interleave takes at most one merged_training variant (ours_merged, ours_merged_tkernel): "
                 "their layers share the registry that forms every stale W' at once, so one would pay for another")
    if args.block < 1:
        ap.error(f"--block must be at least 1, got {args.block}")
    if args.interleave and args.profile_dir:
        ap.error("--interleave measures time only; run --profile-dir without it")
    import peft
    import transformers

    metrics: dict[str, float] = {} if args.tiny else {"fused_rel_err_bf16": check_fused_matches_reference()}
    if not args.tiny and any(v.removesuffix(COMPILED) == "ours_merged" for v in args.variants):
        metrics["merged_rel_err_bf16"] = check_merged_matches_reference()
    if not args.tiny and any(v.removesuffix(COMPILED) in TKERNEL for v in args.variants):
        metrics["tkernel_grad_rel_err_bf16"] = check_tkernel_matches_reference()
    metrics["rounds"] = args.rounds
    metrics["interleaved"] = int(args.interleave)
    if args.interleave:
        metrics["interleave_block"] = args.block
    for name in args.models:
        if args.interleave:
            *rounds, last = measure_interleaved(name, args.variants, args.r, args.warmup, args.steps, args.rounds,
                                                args.block)
            for (a, b), ratios in last["paired"].items():
                if a.startswith("ours") and (b.startswith("peft") or b == "frozen"):
                    metrics[f"{name}_{a}_vs_{b}_paired"] = round(statistics.median(ratios), 4)
        else:
            rounds = [{v: measure(name, v, args.r, args.warmup, args.steps) for v in args.variants}
                      for _ in range(args.rounds)]
        res = {v: {**rounds[0][v], "ms": statistics.median(r[v]["ms"] for r in rounds),
                   "peak_gib": max(r[v]["peak_gib"] for r in rounds)} for v in args.variants}
        for v, d in res.items():
            metrics[f"{name}_{v}_ms"] = round(d["ms"], 3)
            if not args.interleave:
                metrics[f"{name}_{v}_peak_gib"] = round(d["peak_gib"], 3)
            if args.rounds > 1:
                metrics[f"{name}_{v}_ms_min"] = round(min(r[v]["ms"] for r in rounds), 3)
                metrics[f"{name}_{v}_ms_max"] = round(max(r[v]["ms"] for r in rounds), 3)
            if v.startswith("ours"):
                metrics[f"{name}_{v}_sibling_sets"] = d["sibling_sets"]
                metrics[f"{name}_{v}_cpp_path_on"] = d["cpp_path_on"]
        both_peft = {"peft_default", "peft_bf16"} <= set(res)
        if both_peft:  # the bars' yardsticks: the faster PEFT for time, the smaller for memory
            best = min(("peft_default", "peft_bf16"), key=lambda v: res[v]["ms"])
            best_mem = min(res["peft_default"]["peak_gib"], res["peft_bf16"]["peak_gib"])
        if both_peft and "ours" in res:
            metrics[f"step_time_ratio_{name}"] = round(res["ours"]["ms"] / res[best]["ms"], 4)
            if not args.interleave:
                metrics[f"peak_mem_ratio_{name}"] = round(res["ours"]["peak_gib"] / best_mem, 4) if best_mem else 0.0
            metrics[f"{name}_trainable_params"] = res["ours"]["trainable"]
            metrics[f"{name}_peft_trainable_params"] = res["peft_bf16"]["trainable"]
        for extra in ("ours_cpp", "ours_python", "ours_merged", *TKERNEL):
            if both_peft and extra in res:
                metrics[f"step_time_ratio_{name}_{extra}"] = round(res[extra]["ms"] / res[best]["ms"], 4)
                if not args.interleave:
                    metrics[f"peak_mem_ratio_{name}_{extra}"] = round(res[extra]["peak_gib"] / best_mem, 4) if best_mem else 0.0
        if {"ours_merged", "frozen"} <= set(res):
            metrics[f"overhead_vs_frozen_{name}_ours_merged"] = round(res["ours_merged"]["ms"] / res["frozen"]["ms"], 4)
        if {"ours", "frozen"} <= set(res):
            metrics[f"overhead_vs_frozen_{name}"] = round(res["ours"]["ms"] / res["frozen"]["ms"], 4)
        peft_compiled = [v for v in ("peft_default" + COMPILED, "peft_bf16" + COMPILED) if v in res]
        if "ours" + COMPILED in res and peft_compiled:
            best = min(peft_compiled, key=lambda v: res[v]["ms"])
            metrics[f"step_time_ratio_{name}{COMPILED}"] = round(res["ours" + COMPILED]["ms"] / res[best]["ms"], 4)
            if not args.interleave:
                metrics[f"peak_mem_ratio_{name}{COMPILED}"] = round(
                    res["ours" + COMPILED]["peak_gib"] / res[best]["peak_gib"], 4) if res[best]["peak_gib"] else 0.0
    if args.profile_dir:
        for name in args.models:
            # every variant but PEFT's fp32-adapter default (the slowest): wall time minus kernel time is
            # what the GPU waited for the host, so ours against frozen / PEFT is comparable kernel for kernel
            for v in [v for v in args.variants if v != "peft_default"]:
                metrics[f"{name}_{v}_kernel_ms_per_step"] = round(profile(name, v, args.r, Path(args.profile_dir)), 3)
    result = {
        "name": "lora_vs_peft",
        "command": "python benchmarks/lora_vs_peft.py " + " ".join(sys.argv[1:]),
        "device": f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'} (torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__})",
        "date": time.strftime("%Y-%m-%d"),
        "metrics": metrics,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
