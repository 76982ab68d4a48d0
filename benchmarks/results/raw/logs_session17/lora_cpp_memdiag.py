import sys, gc, torch
sys.path.insert(0, "benchmarks")
import lora_vs_peft as L
L.DEVICE = "cuda"
spec = L.SPECS["bert"]
G = 2**30
for variant in ["ours", "ours_cpp", "ours", "ours_cpp"]:
    L.cpp_switch(variant)
    model, params = L.build(spec, variant, 16)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, spec["vocab"], (32, 512), device="cuda", generator=g)
    labels = torch.randint(0, 2, (32,), device="cuda", generator=g)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    rows = []
    for i in range(4):
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        a0 = torch.cuda.memory_allocated()
        out = model(input_ids=ids, labels=labels)
        a1 = torch.cuda.memory_allocated(); p1 = torch.cuda.max_memory_allocated()
        out.loss.backward()
        a2 = torch.cuda.memory_allocated()
        del out
        a3 = torch.cuda.memory_allocated()
        opt.step(); opt.zero_grad(set_to_none=True)
        rows.append((round(a0/G,3), round(a1/G,3), round(p1/G,3), round(a2/G,3), round(a3/G,3), round(torch.cuda.max_memory_allocated()/G,3)))
    print(variant, "start, after fwd, peak fwd, after bwd, after del out, peak step:", rows, flush=True)
    del model, params, opt; gc.collect(); torch.cuda.empty_cache()
    print("  left after del:", round(torch.cuda.memory_allocated()/G, 3))
