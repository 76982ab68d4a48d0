"""usage: python scratch_s9/prof.py <root containing lightning_lora> <tag>"""
import sys, time, warnings, statistics
root, tag = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import torch, lightning_lora as ll
print(tag, ll.__file__)
from transformers import LlamaConfig, LlamaForCausalLM
from torch.profiler import ProfilerActivity, profile
cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg)
model = model.to(torch.bfloat16).train()
for p in model.parameters(): p.requires_grad_(False)
ll.inject_adapter(model, "lora", r=16, alpha=32, target_modules="all-linear", adapter_dtype="float32")
params = ll.trainable_parameters(model)
opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
ids = torch.randint(0, 32000, (4, 2048), device="cuda")
def step():
    out = model(input_ids=ids, labels=ids); out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3): step()
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode(1)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    step(); torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode(0)
print(tag, "sync warnings:", len(w)); [print("  ", str(x.message)[:200], x.filename, x.lineno) for x in w[:5]]
ts = []
for _ in range(10):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter(); s.record(); step(); h = time.perf_counter() - t0; e.record(); e.synchronize(); ts.append((s.elapsed_time(e), h * 1e3))
print(tag, "median gpu ms %.1f host ms %.1f" % (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3): step()
    torch.cuda.synchronize()
t = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
open(f"/tmp/prof_{tag}.txt", "w").write(t)
import os; out = os.environ.get("OUT"); open(f"{out}/prof_{tag}.txt", "w").write(t) if out else None
print("\n".join(l[:160] for l in t.splitlines() if "Self CUDA time total" in l))
