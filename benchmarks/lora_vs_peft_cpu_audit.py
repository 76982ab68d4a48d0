"""CPU audit of ``lora_vs_peft.py``'s LLaMA case: what our LoRA saves, holds and launches against PEFT's.

    python benchmarks/lora_vs_peft_cpu_audit.py --before <git rev>   # writes benchmarks/results/lora_vs_peft_cpu_audit.json

Device-independent figures only (no times): the same LLaMA shapes and settings as the GPU benchmark
(hidden 2048, MLP 5632, 32 heads / 4 KV heads, bf16 base, rank 16, alpha 32, all-linear, dropout 0),
scaled down to ``--layers`` layers, a ``--vocab`` vocabulary and ``--seq`` tokens so it runs on a CPU.
Per variant (``ours`` fp32 adapter params, ``ours_bf16``, ``peft_default``, ``peft_bf16``, ``frozen``):

- ``saved``: bytes and count of the tensors saved for backward in one forward
  (``saved_tensors_hooks``), deduplicated by storage as the allocator holds them, and the part of
  it that is not a model parameter (activations);
- ``cast_cache``: our cached low-precision copies of A and B (held on the autograd context, so the
  hooks above do not see them);
- ``params`` / ``grads`` / ``adam_state``: trainable parameter, gradient and AdamW state bytes;
- ``model_ops``: the same kernel count for a whole forward + backward of the model after an
  update, and its excess over the frozen model per adapted ``Linear`` (on the CPU, where
  ``mm(out_dtype=)`` is missing, our fp32-adapter variant also casts its two bf16 gradients);
- ``ops``: aten operations that launch a kernel (views, ``empty`` and ``detach`` excluded) in one
  forward + backward after a parameter update, per adapted ``Linear`` (2048 -> 5632, N tokens),
  minus the frozen ``Linear``'s; counted on the CPU and on the ``meta`` device (which has
  ``mm(out_dtype=)`` like CUDA, so it shows the kernels a GPU launches); ``big_temps``: how many of
  them write an activation-sized tensor (>= N x 2048 elements).

``fused_adamw_forward_rel_err``: our forward against the plain formula after three fused-AdamW
steps (fused AdamW does not bump version counters, which the cast cache once relied on alone).

``--before REV`` also measures the code at git revision ``REV`` (its ``lightning_lora`` extracted to
a temporary directory, measured in a subprocess) and records those figures as ``before.*``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("LL_AUDIT_SRC", str(ROOT)))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lightning_lora as ll  # noqa: E402

VARIANTS = ("frozen", "ours", "ours_bf16", "peft_default", "peft_bf16")
R, ALPHA = 16, 32
# aten ops that only create views or metadata (no kernel on a GPU)
NO_KERNEL = {
    "view", "_unsafe_view", "t", "transpose", "expand", "detach", "alias", "as_strided", "permute",
    "unsqueeze", "squeeze", "slice", "select", "empty", "empty_strided", "empty_like", "_reshape_alias", "reshape",
    "lift_fresh", "split", "unbind", "is_same_size", "_to_copy_noop", "new_empty", "new_empty_strided",
}


def llama(layers: int, vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=vocab, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def adapt(model: nn.Module, variant: str, targets) -> tuple[nn.Module, list[nn.Parameter]]:
    """The benchmark's ``build`` on the CPU: bf16 base, frozen, then the variant's adapter."""
    model = model.to(dtype=torch.bfloat16)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    if variant == "frozen":
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if inp is not None:
            inp.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        return model, []
    if variant.startswith("ours"):
        dtype = "bfloat16" if variant == "ours_bf16" else "float32"
        ll.inject_adapter(model, "lora", r=R, alpha=ALPHA, target_modules=targets, adapter_dtype=dtype)
        return model, ll.trainable_parameters(model)
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(model, cfg, autocast_adapter_dtype=(variant == "peft_default"))
    return model, [p for p in model.parameters() if p.requires_grad]


def cast_cache(model: nn.Module) -> tuple[int, int]:
    """(bytes, count) of our layers' cached casts that are not the parameters themselves."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    for m in model.modules():
        for t in getattr(m, "_casts", ()) or ():
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
    return sum(seen.values()), len(seen)


def memory_audit(variant: str, layers: int, vocab: int, seq: int) -> dict[str, float]:
    torch.manual_seed(0)
    model, params = adapt(llama(layers, vocab), variant, "all-linear")
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    # one full step first, so AdamW state exists and our cast cache is refreshed as in training
    if opt is not None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}
    n_saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal n_saved
        n_saved += 1
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    cache_b, cache_n = cast_cache(model)
    out.loss.backward()
    grads = sum(p.grad.nbytes for p in params if p.grad is not None)
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = sum(v.nbytes for s in (opt.state.values() if opt else ()) for v in s.values() if torch.is_tensor(v))
    # kernel ops of a whole forward + backward after the update (the optimizer step itself not counted)
    counter = OpCounter(big=seq * 2048)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    act = {k: v for k, v in saved.items() if k not in param_ptrs}
    res = {
        "saved_bytes": sum(saved.values()), "saved_storages": len(saved), "saved_calls": n_saved,
        "saved_activation_bytes": sum(act.values()), "saved_activation_storages": len(act),
        "cast_cache_bytes": cache_b, "cast_cache_tensors": cache_n,
        "param_bytes": sum(p.nbytes for p in params), "grad_bytes": grads, "adam_state_bytes": state,
    }
    res["held_bytes"] = res["saved_activation_bytes"] + cache_b + res["param_bytes"] + state
    res["model_ops_cpu"] = sum(counter.ops.values())
    res["model_big_temps_cpu"] = counter.big_temps
    res["adapted_linears"] = sum(1 for m in model.modules() if hasattr(m, "lora_A"))  # ours and PEFT's layers
    del model, params, opt, out
    gc.collect()
    return res


class OpCounter(TorchDispatchMode):
    """Counts aten ops that launch a kernel and how many of them write >= ``big`` elements."""

    def __init__(self, big: int) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.big_temps = 0
        self.big = big

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name.rstrip("_") not in NO_KERNEL:
            self.ops[name] += 1
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(torch.is_tensor(o) and o.numel() >= self.big for o in outs):
                self.big_temps += 1
        return out


def linear_ops(variant: str, device: str, tokens: int, n_in: int = 2048, n_out: int = 5632) -> tuple[Counter, int]:
    """Kernel ops of one forward + backward of one adapted Linear (n_in -> n_out) after an update."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, n_out, bias=False, device=device))
    model, params = adapt(model, variant, ["0"])
    x = torch.randn(tokens, n_in, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, n_out, device=device, dtype=torch.bfloat16)
    is_autocast_enabled = torch.is_autocast_enabled
    if device == "meta":  # autocast has no meta dispatch key; there is no autocast here anyway
        torch.is_autocast_enabled = lambda *a: False if a and a[0] == "meta" else is_autocast_enabled(*a)
    try:
        for _ in range(2):  # the second pass follows a parameter update, as every training step does
            with torch.no_grad():
                for p in params:
                    p.add_(1e-3)
            counter = OpCounter(big=tokens * min(n_in, n_out))
            with counter:
                model(x).backward(g)
            for p in params:
                p.grad = None
            x.grad = None
    finally:
        torch.is_autocast_enabled = is_autocast_enabled
    return counter.ops, counter.big_temps


def fused_adamw_forward_error(steps: int = 3) -> float:
    """Relative error of our forward against the plain formula after ``steps`` fused-AdamW steps
    (fp32 adapters on a bf16 Linear, the lora_vs_peft setting): large if the cast cache goes stale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    layer = ll.inject_adapter(model, "lora", r=R, alpha=ALPHA, target_modules=["0"])["0"]
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-2, fused=True)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    for _ in range(steps):
        model(x).float().pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        y, ref = model(x).float(), layer.reference_forward(x).float()
    return round(((y - ref).norm() / ref.norm()).item(), 5)


def measure(layers: int, vocab: int, seq: int, tokens: int) -> dict[str, float]:
    metrics: dict[str, float] = {"ours.fused_adamw_forward_rel_err": fused_adamw_forward_error()}
    for v in VARIANTS:
        for k, val in memory_audit(v, layers, vocab, seq).items():
            metrics[f"{v}.{k}"] = val
        for device in ("cpu", "meta"):
            ops, big = linear_ops(v, device, tokens)
            metrics[f"{v}.linear_ops_{device}"] = sum(ops.values())
            metrics[f"{v}.linear_big_temps_{device}"] = big
            for name, n in sorted(ops.items()):
                metrics[f"{v}.linear_op_{device}.{name}"] = n
    for v in VARIANTS[1:]:
        for device in ("cpu", "meta"):
            metrics[f"{v}.adapter_ops_{device}"] = metrics[f"{v}.linear_ops_{device}"] - metrics[f"frozen.linear_ops_{device}"]
        extra = metrics[f"{v}.model_ops_cpu"] - metrics["frozen.model_ops_cpu"]
        metrics[f"{v}.model_ops_over_frozen_per_linear_cpu"] = round(extra / metrics[f"{v}.adapted_linears"], 3)
        metrics[f"{v}.saved_activation_over_frozen_bytes"] = (
            metrics[f"{v}.saved_activation_bytes"] - metrics["frozen.saved_activation_bytes"])
    for v in ("ours", "ours_bf16"):
        metrics[f"{v}.held_minus_peft_bf16_bytes"] = metrics[f"{v}.held_bytes"] - metrics["peft_bf16.held_bytes"]
    return metrics


def measure_revision(rev: str, argv: list[str]) -> dict[str, float]:
    """The same figures for ``lightning_lora`` as of git revision ``rev`` (in a subprocess)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "lightning_lora"], check=True,
                                 capture_output=True).stdout
        tar_path = Path(tmp) / "src.tar"
        tar_path.write_bytes(archive)
        with tarfile.open(tar_path) as tar:
            tar.extractall(tmp, filter="data")
        out = Path(tmp) / "before.json"
        env = dict(os.environ, LL_AUDIT_SRC=tmp)
        subprocess.run([sys.executable, __file__, *argv, "--json-out", str(out)], check=True, env=env)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=64, help="tokens in the memory audit (batch 1)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens in the per-Linear op count")
    ap.add_argument("--before", default=None, help="git revision to measure as well (recorded as before.*)")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)  # subprocess of --before
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    shape_args = ["--layers", str(args.layers), "--vocab", str(args.vocab), "--seq", str(args.seq),
                  "--tokens", str(args.tokens)]
    metrics = measure(args.layers, args.vocab, args.seq, args.tokens)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(metrics))
        return
    if args.before:
        for k, v in measure_revision(args.before, shape_args).items():
            metrics[f"before.{k}"] = v
    for k in sorted(metrics):
        if k.endswith(("_bytes", "ops_cpu", "ops_meta", "big_temps_meta", "storages")):
            print(f"{k:55s} {metrics[k]:,}")
    from lightning_lora.results import write_result

    path = write_result("lora_vs_peft_cpu_audit", metrics, kind="benchmark", directory=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
