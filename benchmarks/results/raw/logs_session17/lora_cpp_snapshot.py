import sys, gc, torch, collections
sys.path.insert(0, "benchmarks")
import lora_vs_peft as L
L.DEVICE = "cuda"
spec = L.SPECS["bert"]
L.cpp_switch("ours_cpp")
model, params = L.build(spec, "ours_cpp", 16)
g = torch.Generator(device="cuda").manual_seed(1)
ids = torch.randint(0, spec["vocab"], (32, 512), device="cuda", generator=g)
labels = torch.randint(0, 2, (32,), device="cuda", generator=g)
opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
def step(final=False):
    out = model(input_ids=ids, labels=labels); out.loss.backward(); del out
    if not final:
        opt.step(); opt.zero_grad(set_to_none=True)
step(); step()
torch.cuda.memory._record_memory_history(max_entries=200000, stacks="all")
step(final=True)
print("allocated after bwd", torch.cuda.memory_allocated() / 2**30)
snap = torch.cuda.memory._snapshot()
agg = collections.Counter(); cnt = collections.Counter()
for seg in snap["segments"]:
    for b in seg["blocks"]:
        if b["state"] != "active_allocated" or not b.get("frames"):
            continue
        py = [f for f in b["frames"] if f["filename"].endswith(".py")][:3]
        cc = [f for f in b["frames"] if any(s in f["name"] for s in ("FusedLoRA", "Siblings", "InputBuffer", "accumulate", "Engine::evaluate", "call_function", "validate_outputs", "CppNode", "lightning", "replay", "saved_input", "mm_to", "mm_scaled", "backward", "forward"))][:5]
        fr = cc + py
        key = " | ".join(f"{f['filename'].split('/')[-1]}:{f['line']}:{f['name'][:60]}" for f in fr)
        agg[key] += b["size"]; cnt[key] += 1
for k, v in agg.most_common(5):
    print(round(v / 2**20), "MiB", cnt[k], "blocks:", k[:1200])
