import sys, torch, io, logging
from transformers import BertConfig, BertForSequenceClassification
p = float(sys.argv[1])
cfg = BertConfig(num_labels=2, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, attention_probs_dropout_prob=p)
cfg._attn_implementation = "sdpa"
m = BertForSequenceClassification(cfg).train()
ids = torch.randint(0, 30522, (2, 16))
from torch._functorch.aot_autograd import aot_module_simplified
from torch._inductor.decomposition import select_decomp_table
def fw(gm, ex):
    ops=[str(n.target) for n in gm.graph.nodes if n.op=="call_function"]
    print(f"dropout {p}: sdpa kernels {[o for o in ops if 'attention' in o]}, softmax-like {sum(('amax' in o) or ('softmax' in o) for o in ops)}")
    return gm
def backend(gm, ex):
    return aot_module_simplified(gm, ex, fw_compiler=fw, bw_compiler=lambda g,e: g, decompositions=select_decomp_table())
out = torch.compile(m, backend=backend)(input_ids=ids, labels=torch.tensor([0,1]))
