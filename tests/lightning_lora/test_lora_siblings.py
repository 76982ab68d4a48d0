"""LoRA layers that read the same input (q, k, v; gate, up) run as one fused sibling set.

The sibling path must give exactly what the per-layer path gives (outputs, input gradient, every
adapter gradient), under every call pattern a model may use, and cost fewer GEMMs and no autograd
sum of per-sibling input gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lightning_lora as ll
from lightning_lora.methods.lora import _SiblingGroup

from test_lora import _kernel_ops  # the test directory is on sys.path (no package)


class Attention(nn.Module):
    """q, k, v read ``x`` (k, v narrower, as with grouped KV heads); o reads another tensor of the same
    width; ``cross`` feeds k and v from ``memory`` instead; ``skip_v`` leaves v out (a sibling whose
    output is never asked for)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d // 2)
        self.v = nn.Linear(d, d // 2, bias=False)
        self.o = nn.Linear(d, d)
        self.cross = False
        self.skip_v = False

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        kv_in = memory if self.cross else x
        k = self.k(kv_in)
        v = k if self.skip_v else self.v(kv_in)
        return self.o(torch.tanh(self.q(x)) * torch.cat([k, v], -1))


def _adapted_pair(base: nn.Module, targets, adapter_dtype: str = "float64", **kw):
    """``base`` adapted twice: with sibling fusion and without; B random so the adapters matter."""
    fused, plain = copy.deepcopy(base), copy.deepcopy(base)
    ll.inject_adapter(fused, "lora", r=4, alpha=8, target_modules=targets, adapter_dtype=adapter_dtype, **kw)
    ll.inject_adapter(plain, "lora", r=4, alpha=8, target_modules=targets, adapter_dtype=adapter_dtype,
                      fuse_siblings=False, **kw)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _pair(dtype=torch.float64, adapter_dtype="float64", n_blocks=2, **kw):
    """Two :class:`Attention` blocks, adapted with and without sibling fusion."""
    torch.manual_seed(0)
    base = nn.Sequential(*[Attention() for _ in range(n_blocks)]).to(dtype)
    return _adapted_pair(base, "all-linear", adapter_dtype, **kw)


def _run(model, x, memory=None):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = model[1](model[0](x, memory), memory)
    y.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def _assert_same(a, b, tol=1e-10):
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = a, b
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gx, gx_ref, atol=tol, rtol=tol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=tol, rtol=tol, msg=name)


def _sets(model):
    """The learned sibling sets of each block, as tuples of child names."""
    out = []
    for block in model:
        names = {id(m): n for n, m in block.named_children()}
        group = block.q._siblings
        sets = {tuple(names[id(m)] for m in s.members) for s in (group.sets or {}).values()}
        out.append(sorted(sets))
    return out


def test_siblings_learned_from_the_first_pass():
    fused, _ = _pair()
    assert isinstance(fused[0].q._siblings, _SiblingGroup)
    assert fused[0].q._siblings is fused[0].o._siblings  # one parent, same in_features: candidates
    assert fused[0].q._siblings is not fused[1].q._siblings
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    _run(fused, x)
    assert _sets(fused) == [[], []]  # still learning after one pass
    _run(fused, x)
    assert _sets(fused) == [[("k", "v", "q")], [("k", "v", "q")]]  # o reads another tensor


def test_siblings_equal_per_layer_path_over_training_steps():
    """Outputs, input gradient and every adapter gradient equal the per-layer path, step after step
    (SGD updates in between, so stale casts or stacked buffers would show)."""
    fused, plain = _pair()
    opts = [torch.optim.SGD(ll.trainable_parameters(m), lr=0.1) for m in (fused, plain)]
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    for _ in range(4):
        a, b = _run(fused, x), _run(plain, x)
        _assert_same(a, b)
        for opt in opts:
            opt.step()
    assert _sets(fused)[0] == [("k", "v", "q")]


def test_stacked_a_buffer_feeds_the_fused_gemm_under_autocast():
    """fp32 adapters under bf16 autocast: after an optimizer step every sibling's bf16 A is a row block
    of one stacked buffer (no concatenation kernel), and the model follows the per-layer path."""
    fused, plain = _pair(dtype=torch.float32, adapter_dtype="float32")
    opts = [torch.optim.AdamW(ll.trainable_parameters(m), lr=1e-2, fused=True) for m in (fused, plain)]
    x = torch.randn(4, 6, 16)
    for _ in range(4):
        outs = []
        for model, opt in zip((fused, plain), opts):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model[1](model[0](x))
            y.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            outs.append(y.detach().float())
        torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused[1](fused[0](x))  # the casts and the stacked buffer this forward uses
    s = fused[0].q._siblings.sets[fused[0].q]
    buf = s.a_buffers[torch.bfloat16]
    assert s._a_cat is not None and s._a_cat[1] is buf
    assert all(m._casts[0]._base is buf for m in s.members)
    torch.testing.assert_close(buf.float(), torch.cat([m.lora_A.detach() for m in s.members]), atol=1e-2, rtol=1e-2)


def test_call_patterns_that_break_the_plan_fall_back():
    """Cross-attention (k, v on another tensor) after the plan was learned on self-attention, and a
    sibling that is not called: each equals the per-layer path; a model that keeps breaking the plan
    stops fusing."""
    fused, plain = _pair()
    x, mem = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    for _ in range(2):
        _assert_same(_run(fused, x), _run(plain, x))
    for model in (fused, plain):
        for block in model:
            block.cross = True
    _assert_same(_run(fused, x, mem), _run(plain, x, mem))
    for model in (fused, plain):
        for block in model:
            block.cross, block.skip_v = False, True
    _assert_same(_run(fused, x), _run(plain, x))  # v's fused output unused: no gradient from it
    group = fused[0].q._siblings
    assert group.misses >= 1
    for _ in range(_SiblingGroup.MAX_MISSES):
        _assert_same(_run(fused, x), _run(plain, x))
    assert group.sets == {} and group._pending is None  # gave up fusing


def test_disabled_merged_and_inference_paths():
    fused, plain = _pair()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    for _ in range(2):
        _run(fused, x)
    with ll.disable_adapter(fused), ll.disable_adapter(plain), torch.no_grad():
        torch.testing.assert_close(fused[1](fused[0](x)), plain[1](plain[0](x)))
    with torch.inference_mode():
        torch.testing.assert_close(fused[1](fused[0](x)), plain[1](plain[0](x)))
        torch.testing.assert_close(fused[1](fused[0](x)), plain[1](plain[0](x)))
    ll.merge_adapter(fused)
    with torch.no_grad():
        torch.testing.assert_close(fused[1](fused[0](x)), plain[1](plain[0](x)))
    ll.unmerge_adapter(fused)
    ll.merge_adapter(plain)  # (the round trip rounds the base weights through fp32: do it to both)
    ll.unmerge_adapter(plain)
    _assert_same(_run(fused, x), _run(plain, x))


def test_gradient_checkpointing_and_deepcopy():
    """Recomputation in backward takes the sibling path again; a deep copy of a trained model relearns."""
    fused, plain = _pair()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    for _ in range(2):
        _run(fused, x)

    def run_ckpt(model):
        model.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        y = checkpoint(model[0], xi, use_reentrant=False)
        y = checkpoint(model[1], y, use_reentrant=False)
        y.pow(2).sum().backward()
        return y.detach(), xi.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    _assert_same(run_ckpt(fused), run_ckpt(plain))
    twin = copy.deepcopy(fused)
    assert twin[0].q._siblings is not fused[0].q._siblings and twin[0].q._siblings.sets is None
    assert twin[0].q._siblings.members[0] is twin[0].q
    # one group per parent in the copy too (each member's copy used to get a group of its own, so a
    # copied model never fused again)
    assert twin[0].k._siblings is twin[0].q._siblings is twin[0].v._siblings
    for _ in range(2):
        _assert_same(_run(twin, x), _run(plain, x))
    assert _sets(twin) == _sets(fused) and _sets(twin)[0]  # it relearned the same sets


def test_dropout_and_option_off_run_per_layer():
    fused, _ = _pair(dropout=0.1)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    for _ in range(3):
        _run(fused, x)
    assert _sets(fused)[0] == [("k", "v", "q")]
    assert fused[0].q._siblings._pending is None  # train-mode dropout: nothing computed ahead
    _, plain = _pair()
    assert plain[0].q._siblings is None


def test_sibling_set_saves_gemms_and_the_input_gradient_sum():
    """q, k, v on one input: per layer 5 GEMMs backward and 3 forward each, and autograd adds the three
    input gradients; as a set, 7 forward GEMMs (one for the stacked A) and 11 backward, and the input
    gradient accumulates in one buffer (no add kernel)."""

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(32, 32, bias=False), nn.Linear(32, 8, bias=False), nn.Linear(32, 8, bias=False)

        def forward(self, x):
            return torch.cat([self.q(x), self.k(x), self.v(x)], -1)

    counts = {}
    for siblings in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(QKV()).to(torch.bfloat16)
        ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["q", "k", "v"], adapter_dtype="bfloat16",
                          fuse_siblings=siblings)
        x = torch.randn(10, 32, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(10, 48, dtype=torch.bfloat16)
        for _ in range(2):  # learn the plan
            model(x).backward(g)
        counts[siblings] = _kernel_ops(model, x, g, [])
    gemm = ("mm", "addmm", "addmm_")
    fused_gemms = sum(counts[True][k] for k in gemm)
    plain_gemms = sum(counts[False][k] for k in gemm)
    assert (fused_gemms, plain_gemms) == (7 + 11, 3 * (3 + 5)), counts
    assert counts[True].get("add", 0) + counts[True].get("add_", 0) < counts[False].get("add", 0) + counts[False].get("add_", 0), counts


def _learned(model):
    """Sorted tuples of the leaf names of every learned sibling set in ``model``."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    sets = {id(s): s for m in model.modules() if getattr(m, "_siblings", None) is not None
            for s in (m._siblings.sets or {}).values()}
    return sorted(tuple(names[id(m)] for m in s.members) for s in sets.values())


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_transformers_models_learn_their_siblings_and_match_the_per_layer_path(arch):
    """On transformers' Llama (q/k/v and gate/up) and BERT (query/key/value) the sets are learned from
    the model's own forward, and a training step equals the per-layer path."""
    from lightning_lora.tasks import load_tiny_bert, load_tiny_llama

    if arch == "llama":
        fused, plain = _adapted_pair(load_tiny_llama(seed=0)[0].double(), "all-linear")
        expected = [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    else:
        fused, plain = _adapted_pair(load_tiny_bert(seed=0)[0].double(), ["query", "key", "value", "dense"])
        expected = [("query", "key", "value")] * 2
    ids = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids if arch == "llama" else torch.tensor([0, 1])
    opts = [torch.optim.SGD(ll.trainable_parameters(m), lr=0.1) for m in (fused, plain)]
    for step in range(3):
        losses, grads = [], []
        for model, opt in zip((fused, plain), opts):
            model.train()
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # BERT's own dropout draws the same masks in both
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            opt.step()
        torch.testing.assert_close(losses[0], losses[1], atol=1e-10, rtol=1e-10)
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-10, rtol=1e-10, msg=name)
    assert _learned(fused) == sorted(expected)


def test_conv1d_siblings():
    """transformers' Conv1D (weight stored transposed, fan_in_fan_out) as siblings."""
    from transformers.pytorch_utils import Conv1D

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Conv1D(12, 16), Conv1D(6, 16)  # (out, in)

        def forward(self, x):
            return self.a(x).sum(-1) * self.b(x).sum(-1)

    torch.manual_seed(0)
    fused, plain = _adapted_pair(nn.Sequential(TwoHeads()).double(), ["a", "b"])
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    for _ in range(3):
        outs = []
        for model in (fused, plain):
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            y = model(xi)
            y.pow(2).sum().backward()
            outs.append((y.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        _assert_same(outs[0], outs[1])
    assert _learned(fused) == [("a", "b")]


def test_non_reentrant_checkpointing_from_the_first_step():
    """HF gradient checkpointing (non-reentrant) enabled before the first step: the recompute in
    backward must take the path the forward took, so the sibling plan is not learned under
    saved-tensor hooks (it used to complete during the recompute: CheckpointError). Gradients equal
    those of a model without sibling fusion."""
    transformers = pytest.importorskip("transformers")
    grads = {}
    for siblings in (True, False):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=160, vocab_size=100)
        model = transformers.LlamaForCausalLM(cfg)
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules="all-linear", fuse_siblings=siblings)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.05)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name goes in v6
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert model.model.gradient_checkpointing  # the layers do recompute in backward
        model.enable_input_require_grads()
        ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
        grads[siblings] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-6)
