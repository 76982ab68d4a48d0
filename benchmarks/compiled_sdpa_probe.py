"""Which attention kernel ``torch.compile`` gives BERT-base's SDPA, and what forcing one changes (GPU).

Session 28's profile (``lora_vs_peft_compiled_bert_profile.json``) found the compiled frozen BERT-base
step (32 x 512 tokens, bf16, attention dropout 0) running its attention as fp32 ``bmm`` plus Triton
softmax kernels (the math decomposition of ``scaled_dot_product_attention``) where eager runs cuDNN's
flash kernel. This probe times, eager and compiled, forward + backward of

- one SDPA call on BERT-base's shapes (q, k, v: 32 x 12 x 512 x 64, bf16, requiring grad), with
  the default backend choice and with each backend forced (``torch.nn.attention.sdpa_kernel``);
- the frozen BERT-base step of ``lora_vs_peft.py`` (``frozen``), default and with the backends
  that worked for the lone call forced around the compiled step,

and records for each whether its kernels include ``bmm`` (the math path) and which fused attention
kernel ran. No adapter is involved: a finding for users who compile BERT.

    python benchmarks/compiled_sdpa_probe.py [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import lora_vs_peft as lvp  # noqa: E402
from lightning_lora.results import write_result  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def _kernels(step) -> dict[str, float]:
    """What one profiled call of ``step`` ran: 1 where its CUDA kernels include a bmm / a fused
    attention kernel of each kind."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    return {"bmm": float("bmm" in names or "xmma_gemm_f32" in names),
            "flash": float("flash" in names), "cudnn": float("cudnn" in names),
            "efficient": float("fmha" in names or "efficient" in names or "mem_eff" in names)}


def _record(metrics: dict, key: str, make_step) -> None:
    """Time ``make_step()``'s step and list its kernels under ``key``; an error is recorded as such."""
    torch._dynamo.reset()
    try:
        step = make_step()
        metrics[f"{key}_ms"] = round(lvp.timed_steps(step, warmup=3, steps=10, cuda=True)[0], 3)
        for k, v in _kernels(step).items():
            metrics[f"{key}_{k}"] = v
    except Exception as exc:  # a forced backend that cannot run these shapes
        metrics[f"{key}_error"] = 1
        print(f"{key}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
    print(key, {k: v for k, v in metrics.items() if k.startswith(key)}, flush=True)


def sdpa_step(compiled: bool, backend: str | None):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(32, 12, 512, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    fn = torch.compile(F.scaled_dot_product_attention) if compiled else F.scaled_dot_product_attention

    def step() -> None:
        ctx = sdpa_kernel([BACKENDS[backend]]) if backend else torch.autocast("cuda", enabled=False)
        with ctx:
            fn(q, k, v).float().sum().backward()

    return step


def bert_step(compiled: bool, backend: str | None):
    lvp.BERT_ATTN_DROPOUT = 0.0
    spec = lvp.SPECS["bert"]
    model, params = lvp.build(spec, "frozen_compiled" if compiled else "frozen", 16)
    inner = lvp.step_fn(model, params, spec)
    if backend is None:
        return inner

    def step() -> None:
        with sdpa_kernel([BACKENDS[backend]]):
            inner()

    return step


def explain() -> None:
    """Print what the compiled frozen BERT step hands each SDPA (q, k, v dtype, shape, stride; the
    call's arguments) and the full error of the step with only the efficient backend allowed."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        for n in gm.graph.nodes:
            if "scaled_dot_product" in str(n.target):
                qkv = [a.meta.get("example_value") for a in n.args[:3] if hasattr(a, "meta")]
                print("SDPA", n.target, {k: str(v) for k, v in n.kwargs.items()},
                      [(tuple(t.shape), t.dtype, t.stride(), t.requires_grad) for t in qkv if t is not None], flush=True)
        return compile_fx(gm, example_inputs)

    lvp.BERT_ATTN_DROPOUT = 0.0
    spec = lvp.SPECS["bert"]
    model, params = lvp._build(spec, "frozen", 16)
    step = lvp.step_fn(torch.compile(model, backend=backend), params, spec)
    step()
    torch._dynamo.reset()
    model, params = lvp._build(spec, "frozen", 16)
    step = lvp.step_fn(torch.compile(model), params, spec)
    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            step()
    except Exception as exc:
        print("efficient only:", str(exc)[:3000], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/compiled_sdpa_probe.json"))
    ap.add_argument("--explain", action="store_true", help="print the compiled step's SDPA inputs and the "
                                                           "forced backend's error instead of timing")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this probe needs a CUDA GPU"
    if args.explain:
        return explain()
    metrics: dict[str, float] = {}
    t0 = time.time()
    for compiled in (False, True):
        for backend in (None, *BACKENDS):
            _record(metrics, f"sdpa_{'compiled' if compiled else 'eager'}_{backend or 'default'}",
                    lambda: sdpa_step(compiled, backend))
    ok = [b for b in BACKENDS if b != "math" and f"sdpa_compiled_{b}_ms" in metrics]
    for compiled in (False, True):
        for backend in (None, *(ok if compiled else ())):
            _record(metrics, f"bert_{'compiled' if compiled else 'eager'}_{backend or 'default'}",
                    lambda: bert_step(compiled, backend))
            torch.cuda.empty_cache()
    metrics["probe_seconds"] = round(time.time() - t0, 1)
    write_result(Path(args.out).stem, metrics, directory=Path(args.out).parent)


if __name__ == "__main__":
    main()
