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


def _pair(dtype=torch.float64, adapter_dtype="float64", n_blocks=2, **kw):
    """The same adapted model twice: with sibling fusion and without; B random so the adapters matter."""
    torch.manual_seed(0)
    base = nn.Sequential(*[Attention() for _ in range(n_blocks)]).to(dtype)
    fused, plain = copy.deepcopy(base), copy.deepcopy(base)
    ll.inject_adapter(fused, "lora", r=4, alpha=8, target_modules="all-linear", adapter_dtype=adapter_dtype, **kw)
    ll.inject_adapter(plain, "lora", r=4, alpha=8, target_modules="all-linear", adapter_dtype=adapter_dtype,
                      fuse_siblings=False, **kw)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


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
    for _ in range(2):
        _assert_same(_run(twin, x), _run(plain, x))


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
