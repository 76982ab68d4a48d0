"""``torch.jit.trace`` and the TorchScript-based ``torch.onnx.export`` of a model with unmerged
adapters in eval mode, on the default Python fused path.

The tracer records a custom ``autograd.Function`` as one opaque ``prim::PythonOp`` (which
``torch.jit.save`` cannot serialize); for the fused functions it failed outright (``RuntimeError:
unordered_map::at``: their forward reads the cached A/B casts, tensors passed inside a tuple argument,
which the tracer's subgraph of the op cannot map). While tracing, the layers take their plain formula,
which traces as ordinary ATen ops; outside a trace nothing changes. The same holds for LQ-LoRA's
quantized base (``QuantizedLinear``, whose dequantizing autograd function received the module itself):
while tracing it runs ``F.linear`` on its dequantized weight, which the graph holds as a constant.
"""

from __future__ import annotations

import copy
import io
import sys

import onnx
import onnxruntime
import pytest
import torch
import transformers
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

import lightning_lora as ll
from lightning_lora.methods import lora as lora_mod
from lightning_lora.quant import QuantizedLinear
from lightning_lora.quant import linear as quant_linear

FUSED_NODES = {"_FusedLoRABackward", "_FusedLoRASiblingsBackward"}


@pytest.fixture(autouse=True)
def _python_path(monkeypatch):
    """The default Python fused path, whatever LIGHTNING_LORA_CPP says."""
    monkeypatch.setattr(lora_mod, "_CPP", None)


def _masking_utils_breaks_trace(model: nn.Module) -> bool:
    """transformers 4.53-4.57's ``masking_utils.create_causal_mask`` (used by their LLaMA, and by 4.57's
    GPT-2) builds the mask under ``vmap`` with a tensor-indexing mode that ``torch.jit.trace`` fails on
    (``RuntimeError: unordered_map::at``, pytorch#172880; the plain model fails too, no adapter involved;
    transformers 5 builds it otherwise). A 4D mask is returned as-is, before that code."""
    return (int(transformers.__version__.split(".")[0]) < 5
            and hasattr(sys.modules[type(model).__module__], "create_causal_mask"))


def _causal_4d(mask: torch.Tensor) -> torch.Tensor:
    """A (batch, tokens) padding mask as the (batch, 1, tokens, tokens) causal one, True = attend."""
    t = mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    return causal[None, None] & mask.bool()[:, None, None, :]


class _Hidden(nn.Module):
    """The model's last hidden state for ``input_ids``: a plain tensor output for the tracer."""

    def __init__(self, model: nn.Module, causal: bool = False) -> None:
        super().__init__()
        self.model = model
        self.mask_4d = causal and _masking_utils_breaks_trace(model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mask_4d:  # transformers 4.53-4.57 workaround (users' too): pass a pre-built 4D causal mask
            return self.model(input_ids=ids, attention_mask=_causal_4d(torch.ones_like(ids)))[0]
        return self.model(input_ids=ids)[0]


def _bert() -> nn.Module:
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, return_dict=False)
    return BertModel(cfg)


def _llama() -> nn.Module:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      use_cache=False, return_dict=False)
    return LlamaModel(cfg)


def _gpt2() -> nn.Module:  # c_attn, c_proj, c_fc are transformers Conv1D (fan_in_fan_out)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False,
                     return_dict=False)
    return GPT2Model(cfg)


MODELS = {
    "bert": (_bert, ["query", "key", "value", "dense"]),
    "llama": (_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"]),
}


def _adapted(name: str, method: str = "lora", **kw) -> tuple[nn.Module, torch.Tensor]:
    """A tiny eval-mode model with adapters on every projection, its trainable adapter tensors
    perturbed (B starts at zero: the adapters must contribute), and an input batch."""
    torch.manual_seed(0)
    make, targets = MODELS[name]
    model = _Hidden(make(), causal=name != "bert").eval()
    ll.inject_adapter(model, method, r=4, alpha=8, target_modules=targets, **kw)
    with torch.no_grad():
        for p in ll.trainable_parameters(model):
            p.add_(torch.randn_like(p), alpha=0.1)
    ids = torch.randint(0, 64, (2, 8))
    return model, ids


def _fused_nodes_seen(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """The output of an eager forward, and the autograd node behind each LoRA layer's output."""
    seen: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: seen.append(type(out.grad_fn).__name__))
        for m in model.modules() if isinstance(m, lora_mod.LoRALinear)
    ]
    try:
        return model(ids), seen
    finally:
        for h in handles:
            h.remove()


def _assert_same_outputs(got: torch.Tensor, want: torch.Tensor) -> None:
    """The fused formula against the plain one (the trace's): fp32 round-off of a different
    accumulation order, bounded relative to the output's scale. A fixed ``atol=1e-6`` on LLaMA's
    order-1 hidden states is a few ulps: one element in 512 differed by 1.9e-6 with ATen's scalar
    kernels (``ATEN_CPU_CAPABILITY=default``), i.e. on another host. Allowed: 4e-6 of the largest
    output (at least 1); a wrong adapter term moves outputs by more than 1e-2 (``_assert_traced_like_eager``
    checks that the adapters contribute that much)."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=4e-6 * scale)


def _assert_traced_like_eager(model: nn.Module, ids: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad():
        eager = model(ids)
        ll.set_adapter_enabled(model, False)
        base = model(ids)
        ll.set_adapter_enabled(model, True)
    assert (eager - base).abs().max() > 1e-2  # the adapters do contribute
    traced = torch.jit.trace(model, (ids,))
    # ordinary ATen ops only: an opaque Python op could be neither saved nor exported to ONNX
    assert not [n for n in traced.inlined_graph.nodes() if n.kind() == "prim::PythonOp"]
    _assert_same_outputs(traced(ids), eager)
    other = torch.randint(0, 64, ids.shape)  # the trace is a graph, not the recorded numbers
    with torch.no_grad():
        _assert_same_outputs(traced(other), model(other))
    buf = io.BytesIO()  # torch.jit.save / load: the export path that needs no onnx package
    torch.jit.save(traced, buf)
    buf.seek(0)
    _assert_same_outputs(torch.jit.load(buf)(ids), eager)
    return traced


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trace_of_unmerged_lora_matches_eager(name):
    model, ids = _adapted(name)
    model(ids), model(ids)  # (grad on) two passes: the sibling plan (q/k/v, gate/up) is complete
    _, seen = _fused_nodes_seen(model, ids)
    assert set(seen) <= FUSED_NODES
    if name != "gpt2":  # GPT-2's q/k/v are one Conv1D: no siblings there
        assert "_FusedLoRASiblingsBackward" in seen
    _assert_traced_like_eager(model, ids)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_eager_after_trace_still_takes_fused_path(name):
    model, ids = _adapted(name)
    model(ids), model(ids)  # sibling plan complete
    # the plain formula on an identical copy: the yardstick for outputs and adapter gradients
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, lora_mod.LoRALinear):
            m.fused = False
    torch.jit.trace(model, (ids,))

    out, seen = _fused_nodes_seen(model, ids)
    assert set(seen) <= FUSED_NODES and "_FusedLoRASiblingsBackward" in seen
    # A fixed random projection of the last hidden state, not its sum of squares: both models end in
    # a LayerNorm / RMSNorm, whose output's sum of squares is constant up to eps, so that loss's
    # gradients are round-off (BERT's ~1e-6, LLaMA's plain fp32 path itself 1e-3 off fp64) and the
    # comparison below failed on an AMD EPYC host. With the projection both paths are within ~1e-6
    # of a float64 run (relative to each gradient's largest entry).
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    ref_out = reference(ids)
    (ref_out * weights).sum().backward()
    _assert_same_outputs(out, ref_out)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys()
    # (BERT's pooler is adapted too but not part of the last hidden state: no gradient on either side)
    assert all(g is not None for n, g in grads.items() if "pooler" not in n)
    for n, g in grads.items():
        if g is None:
            assert ref_grads[n] is None, n
        else:
            # fp32 round-off in a sum of products scales with its terms, not its (cancelled) result:
            # an absolute tolerance relative to the tensor's largest entry (observed: 7e-7 of it)
            scale = ref_grads[n].abs().max().item()
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


@pytest.mark.parametrize("method,kw", [
    ("lora", {"use_dora": True}),
    ("dylora", {}),
    ("ffa_lora", {}),
    ("lora_xs", {}),
    ("nlora", {}),
], ids=["dora", "dylora", "ffa_lora", "lora_xs", "nlora"])
def test_trace_of_other_fused_methods_matches_eager(method, kw):
    """Every fused autograd function of the library (LoRA's, reused by DoRA, FFA-LoRA and DyLoRA, and
    the LoRA-XS / nLoRA core) steps aside under the tracer."""
    model, ids = _adapted("bert", method, **kw)
    model(ids), model(ids)
    _assert_traced_like_eager(model, ids)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trace_of_lq_lora_over_quantized_base_matches_eager(name, monkeypatch):
    """LQ-LoRA's packed base: its dequantizing autograd function received the module itself, and the
    tracer failed on it (``unordered_map::at``); while tracing the base runs ``F.linear`` on its
    dequantized weight (a constant of the graph), and eager forwards afterwards still dequantize
    through the function (which keeps no dense weight for backward)."""
    model, ids = _adapted(name, "lq_lora", quant="nf3", max_iters=2)
    n_quantized = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    assert n_quantized > 0
    _assert_traced_like_eager(model, ids)
    # counted in the function's forward: the first layers' outputs get no autograd node to look at
    # (nothing before them requires grad)
    calls = []
    forward = quant_linear._DequantLinear.forward
    monkeypatch.setattr(quant_linear._DequantLinear, "forward",
                        staticmethod(lambda ctx, *a: calls.append(1) or forward(ctx, *a)))
    model(ids)
    assert len(calls) == n_quantized


class _HiddenMasked(nn.Module):
    """The last hidden state for ``input_ids`` and ``attention_mask``. The causal models are
    exported with a mask: without one, transformers' mask code (packed-sequence detection) uses
    ``aten::diff``, which the TorchScript ONNX exporter has no symbolic for, adapters or not."""

    def __init__(self, model: nn.Module, causal: bool = False) -> None:
        super().__init__()
        self.model = model
        self.mask_4d = causal and _masking_utils_breaks_trace(model)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mask_4d:  # transformers 4.53-4.57 workaround (users' too): pass a pre-built 4D causal mask
            mask = _causal_4d(mask)
        return self.model(input_ids=ids, attention_mask=mask)[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_export_of_unmerged_lora_runs_like_eager(name):
    """``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter, which traces) of a model
    with unmerged, non-trivial adapters; onnxruntime's outputs equal eager's on the traced batch
    shape and on another one (dynamic batch and sequence axes, a padded row)."""
    hidden, ids = _adapted(name)
    model = _HiddenMasked(hidden.model, causal=name != "bert").eval()
    mask = torch.ones_like(ids)
    model(ids, mask), model(ids, mask)  # sibling plan complete: export must not depend on it
    buf = io.BytesIO()
    torch.onnx.export(model, (ids, mask), buf, dynamo=False, input_names=["ids", "mask"],
                      output_names=["hidden"],
                      dynamic_axes={"ids": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"}})
    graph = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(graph)
    assert not [n for n in graph.graph.node if n.domain not in ("", "ai.onnx")]  # standard ops only
    session = onnxruntime.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 64, (3, 5))
    other_mask = torch.ones_like(other)
    other_mask[1, -2:] = 0
    for batch, m in ((ids, mask), (other, other_mask)):
        with torch.no_grad():
            want = model(batch, m)
        got = torch.from_numpy(session.run(None, {"ids": batch.numpy(), "mask": m.numpy()})[0])
        keep = m.bool()  # padded positions' hidden states are unspecified
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)


class _TripledLinear(nn.Linear):
    """A Linear subclass with a forward of its own: a traced adapter must still run it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * super().forward(x)


@pytest.mark.parametrize("method", ["bat", "lora"])
def test_trace_runs_the_base_layers_own_forward_and_hooks(method):
    """Bat computes ``base(x; W')`` with a weight derived from W: while tracing it must still call
    the base module (its forward hooks, a subclass's forward), not a written-out formula."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), _TripledLinear(16, 8))
    ll.inject_adapter(model, method, r=4, target_modules=["0", "2"])
    model[0].base_layer.register_forward_hook(lambda mod, args, out: out * 2)
    with torch.no_grad():
        for p in ll.trainable_parameters(model):
            p.add_(torch.randn_like(p), alpha=0.3)
    model.eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        other = torch.randn(5, 16)
        for inputs in (x, other):
            _assert_same_outputs(traced(inputs), model(inputs))
    weight = model[0].base_layer.weight
    assert isinstance(weight, nn.Parameter) and not weight.requires_grad  # put back after the trace
