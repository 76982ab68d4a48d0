"""Workaround check: trace / ONNX-export plain tiny LLaMA / GPT-2 with a pre-built 4D boolean mask."""
import io
import onnxruntime, torch, transformers
from torch import nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel
print("transformers", transformers.__version__)

def four_d(mask):  # (b, t) padding mask -> (b, 1, t, t) causal & padding, True = attend
    t = mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    return causal[None, None] & mask.bool()[:, None, None, :]

class M(nn.Module):
    def __init__(s, m, conv): super().__init__(); s.model = m; s.conv = conv
    def forward(s, ids, mask):
        return s.model(input_ids=ids, attention_mask=four_d(mask) if s.conv else mask)[0]

def llama():
    return LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                  use_cache=False, return_dict=False))
def gpt2():
    return GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False, return_dict=False))
torch.manual_seed(0)
ids = torch.randint(0, 64, (2, 8)); mask = torch.ones_like(ids)
other = torch.randint(0, 64, (3, 5)); om = torch.ones_like(other); om[1, -2:] = 0
for name, make in (("llama", llama), ("gpt2", gpt2)):
    base = make().eval()
    ref, wk = M(base, False).eval(), M(base, True).eval()
    with torch.no_grad():
        for b, m in ((ids, mask), (other, om)):  # eager: the 4D mask gives the 2D mask's outputs
            k = m.bool()
            print(name, "eager 4D vs 2D max diff", (wk(b, m) - ref(b, m))[k].abs().max().item())
        tr = torch.jit.trace(wk, (ids, mask))
        print(name, "trace vs eager", (tr(ids, mask) - ref(ids, mask)).abs().max().item())
        buf = io.BytesIO()
        torch.onnx.export(wk, (ids, mask), buf, dynamo=False, input_names=["ids", "mask"], output_names=["h"],
                          dynamic_axes={"ids": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}})
        s = onnxruntime.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        for b, m in ((ids, mask), (other, om)):
            got = torch.from_numpy(s.run(None, {"ids": b.numpy(), "mask": m.numpy()})[0])
            print(name, "onnx vs eager(2D)", tuple(b.shape), (got - ref(b, m))[m.bool()].abs().max().item())
