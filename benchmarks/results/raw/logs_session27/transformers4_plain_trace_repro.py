"""torch.jit.trace / TorchScript ONNX export of plain tiny LLaMA / GPT-2 (no lightning_lora, no adapter)."""
import io, sys, traceback
import torch, transformers
from torch import nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

attn = sys.argv[1] if len(sys.argv) > 1 else None
print("torch", torch.__version__, "transformers", transformers.__version__, "attn_implementation", attn)
kw = {} if attn is None else {"attn_implementation": attn}

def llama():
    return LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                  use_cache=False, return_dict=False, **kw))
def gpt2():
    return GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False,
                                return_dict=False, **kw))

class Hidden(nn.Module):
    def __init__(s, m): super().__init__(); s.model = m
    def forward(s, ids): return s.model(input_ids=ids)[0]
class HiddenMasked(nn.Module):
    def __init__(s, m): super().__init__(); s.model = m
    def forward(s, ids, mask): return s.model(input_ids=ids, attention_mask=mask)[0]

torch.manual_seed(0)
ids = torch.randint(0, 64, (2, 8)); mask = torch.ones_like(ids)
for name, make in (("llama", llama), ("gpt2", gpt2)):
    m = make().eval()
    print(name, "attn:", m.config._attn_implementation)
    for what, fn in (
        ("jit.trace", lambda: torch.jit.trace(Hidden(m), (ids,))),
        ("onnx.export(dynamo=False)", lambda: torch.onnx.export(HiddenMasked(m), (ids, mask), io.BytesIO(), dynamo=False,
                                                                input_names=["ids", "mask"])),
    ):
        try:
            with torch.no_grad():
                fn()
            print(f"  {what}: OK")
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)
            where = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in tb if "masking_utils" in f.filename]
            print(f"  {what}: FAIL {type(e).__name__}: {str(e)[:80]!r} via {where[:3]}")
