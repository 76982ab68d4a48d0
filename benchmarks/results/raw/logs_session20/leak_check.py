"""Whether lora_vs_peft.py's measure() leaves objects behind between variants (session 20).

    python benchmarks/results/raw/logs_session20/leak_check.py   # from the repository root, on the CPU

The same measure() as the GPU benchmark, on a two-layer BERT (hidden 64), three rounds of ours,
ours_merged and PEFT bf16; after each, the live nn.Modules and all gc-tracked objects. Output:
leak_check.txt beside this file.
"""
import gc, sys, torch, torch.nn as nn
sys.path.insert(0, '.')
import benchmarks.lora_vs_peft as L
from transformers import BertConfig, BertForSequenceClassification
L.DEVICE = "cpu"
spec = dict(L.SPECS["bert"]); spec["batch"] = 2; spec["seq"] = 16
spec["make"] = lambda: BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=spec["vocab"]))
L.SPECS["tiny"] = spec
def count():
    gc.collect()
    return sum(isinstance(o, nn.Module) for o in gc.get_objects()), len(gc.get_objects())
print("start", count())
for rnd in range(3):
    for v in ["ours", "ours_merged", "peft_bf16"]:
        L.measure("tiny", v, 4, 2, 3)
        print(rnd, v, count())
