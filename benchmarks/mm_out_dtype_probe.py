"""Probe: the adapter-gradient GEMMs of one LLaMA-1.1B step (N = 8,192 tokens), bf16 inputs.

    python benchmarks/mm_out_dtype_probe.py     # CUDA only; prints microseconds per GEMM

Compares ``torch.mm(a, b, out_dtype=torch.float32)`` (what the fused LoRA path uses for fp32
parameter gradients) with a bf16 ``mm`` followed by ``.float()`` and with a plain bf16 ``mm``. Run
on the H200 in session 4 beside the session's other GPU jobs (``mm_out_dtype_probe.json``):
out_dtype costs what bf16 does. Writes ``benchmarks/results/mm_out_dtype_probe.json``
(``<shape>_<variant>_us``).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_lora.results import current_command, write_result  # noqa: E402

torch.manual_seed(0)
N = 8192
def t(f, n=50):
    for _ in range(5): f()
    torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): f()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / n * 1000
metrics = {}
for (a_shape, b_shape, name) in [((16, N), (N, 2048), "gradA_r16"), ((48, N), (N, 2048), "gradA_r48_qkv"), ((32, N), (N, 2048), "gradA_r32_gate_up"),
                                 ((2048, N), (N, 16), "gradB_m2048"), ((256, N), (N, 16), "gradB_m256"), ((5632, N), (N, 16), "gradB_m5632"), ((16, N), (N, 5632), "gradA_n5632")]:
    a = torch.randn(*a_shape[::-1], device="cuda", dtype=torch.bfloat16).t()  # transposed views, as in backward
    b = torch.randn(*b_shape, device="cuda", dtype=torch.bfloat16)
    us_out = t(lambda: torch.mm(a, b, out_dtype=torch.float32))
    us_cast = t(lambda: torch.mm(a, b).float())
    us_bf16 = t(lambda: torch.mm(a, b))
    ac = a.contiguous()
    us_out_c = t(lambda: torch.mm(ac, b, out_dtype=torch.float32))
    metrics.update({f"{name}_out_dtype_us": us_out, f"{name}_mm_float_us": us_cast, f"{name}_mm_bf16_us": us_bf16,
                    f"{name}_out_dtype_contiguous_a_us": us_out_c})
    print(f"{name:22s} out_dtype {us_out:8.1f} us  mm+float {us_cast:8.1f} us  mm bf16 {us_bf16:8.1f} us  out_dtype(contig a) {us_out_c:8.1f} us", flush=True)
print("wrote", write_result("mm_out_dtype_probe", metrics, command=current_command(),
                            device=torch.cuda.get_device_name()))
