"""Fused LoRA paths against the plain formula: bases with their own forward or hooks, double backward, stale caches.

- a base module that is not a plain ``nn.Linear`` (a subclass overriding ``forward``) or that has hooks:
  the fused functions compute ``x W^T + b`` themselves and dropped what the base's forward or hooks do;
- second-order gradients (``create_graph=True``): the hand-written backward ran with detached casts,
  so a gradient penalty's gradients came out silently wrong; now a second backward raises;
- sibling sets with A already in the activation dtype (fp32 training): the cached ``[A_1; ...; A_k]``
  copy missed a ``p.data`` write that the per-layer path (which reads A itself) sees at once.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_lora as ll

from fused_reference import plain_formula_copy  # the test directory is on sys.path


class _Scaled(nn.Linear):
    """An ``nn.Linear`` subclass whose forward is not ``x W^T + b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0 + 1.0


class _Attn(nn.Module):
    """q, k, v read the same input (a sibling set once the plan is learned); o reads another tensor."""

    def __init__(self, d: int = 8, linear: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.q, self.k, self.v = linear(d, d), linear(d, 4), linear(d, d)
        self.o = linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.o(q + v) + k.mean(-1, keepdim=True)


def _inject(model: nn.Module, **kw) -> dict[str, nn.Module]:
    layers = ll.inject_adapter(model, "lora", r=2, alpha=4, target_modules=["q", "k", "v", "o"], **kw)
    with torch.no_grad():  # B starts at zero: make every adapter term count
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.3)
    return layers


def _out_and_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.pow(2).sum().backward()
    return [y.detach(), x.grad, *[p.grad for p in model.parameters() if p.requires_grad]]


def _assert_same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> None:
    assert len(a) == len(b)
    for i, (ta, tb) in enumerate(zip(a, b)):
        assert (ta is None) == (tb is None), i
        if ta is not None:
            torch.testing.assert_close(ta, tb, rtol=1e-10, atol=1e-10, msg=f"tensor {i}")


def test_base_subclass_with_its_own_forward_is_honoured():
    torch.manual_seed(0)
    model = _Attn(linear=_Scaled).double()
    _inject(model, adapter_dtype="float64")
    ref = plain_formula_copy(model)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    for _ in range(3):  # the first passes learn the sibling plan, then q/k/v run as one set
        _assert_same(_out_and_grads(model, x), _out_and_grads(ref, x))
    # what the reference computes is the base's own forward plus the adapter term
    with torch.no_grad():
        q = model.q
        expect = q.base_layer(x) + q.scaling * (x @ q.lora_A.t()) @ q.lora_B.t()
        torch.testing.assert_close(q(x), expect)


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_hooks_on_the_base_layer_run(kind):
    torch.manual_seed(0)
    model = _Attn().double()
    _inject(model, adapter_dtype="float64")
    calls = []
    for name in ("q", "k", "o"):  # k: a sibling; o: a layer on its own
        base = getattr(model, name).base_layer
        if kind == "forward":
            base.register_forward_hook(lambda m, i, o: o * 3.0)
        elif kind == "forward_pre":
            base.register_forward_pre_hook(lambda m, i: (i[0] * 0.5,))
        else:
            base.register_full_backward_hook(lambda m, gi, go, n=name: calls.append(n))
    ref = plain_formula_copy(model)  # (deepcopy keeps the hooks)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    for _ in range(3):
        calls.clear()
        _assert_same(_out_and_grads(model, x), _out_and_grads(ref, x))
        if kind == "full_backward":
            assert sorted(calls) == ["k", "k", "o", "o", "q", "q"]  # fused model, then the reference


def _penalty_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor | None]:
    """Gradients of a gradient penalty ``‖d loss / d x‖²`` (second order in the parameters)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    loss = model(x).pow(2).sum()
    gx, = torch.autograd.grad(loss, x, create_graph=True)
    gx.pow(2).sum().backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("siblings", [False, True])
def test_double_backward_raises_instead_of_giving_wrong_gradients(siblings):
    torch.manual_seed(0)
    model = _Attn().double()
    _inject(model, adapter_dtype="float64", fuse_siblings=siblings)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(3):  # learn the plan: q/k/v then run as one fused set
            model(x)
    ref = _penalty_grads(plain_formula_copy(model), x)
    assert all(g is not None and g.abs().sum() > 0 for g in ref)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        _penalty_grads(model, x)
    # first-order gradients under create_graph=True are still right (only a second backward raises)
    xx = x.clone().requires_grad_(True)
    gx, = torch.autograd.grad(model(xx).pow(2).sum(), xx, create_graph=True)
    xr = x.clone().requires_grad_(True)
    gr, = torch.autograd.grad(plain_formula_copy(model)(xr).pow(2).sum(), xr)
    torch.testing.assert_close(gx.detach(), gr, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sibling_stacked_a_follows_data_writes_when_a_is_not_cast(dtype):
    """A in the activation dtype: the per-layer path reads A itself, so ``p.data`` writes (model
    averaging, a collective) show at once; the sibling set must not serve an older copy of A."""
    torch.manual_seed(0)
    model = _Attn().to(dtype)
    layers = _inject(model, adapter_dtype=str(dtype).removeprefix("torch."))
    opt = torch.optim.SGD(ll.trainable_parameters(model), lr=1e-3)
    x = torch.randn(2, 3, 8, dtype=dtype)
    for _ in range(2):
        model(x).sum().backward()
        opt.step()  # the optimizer step marks the casts as managed (kept between forwards)
        opt.zero_grad()
    with torch.no_grad():
        model(x)  # a forward after the step: the set's [A_q; A_k; A_v] as it stands now
        for layer in layers.values():
            layer.lora_A.data.mul_(0.5)  # no version counter moves
    s = model.q._siblings.sets[model.q]
    assert set(s.members) == {model.q, model.k, model.v}
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for _ in range(2):
        with torch.no_grad():
            fused = model(x)
            plain = plain_formula_copy(model)(x)
        torch.testing.assert_close(fused, plain, **tol)
