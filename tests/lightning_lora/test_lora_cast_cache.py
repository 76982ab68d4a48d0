"""The fused LoRA path's cached adapter casts (A and B in the activation dtype) and its host-side shortcuts.

The casts are made once per optimizer step (in the step's post-hook, several layers per buffer) and
reused until A or B change: after an optimizer step, an in-place write (``load_state_dict``, init),
a merge / unmerge the layer must compute with the current parameters, bit for bit as the plain
formula with the same casts, and a graph built before a refresh must still run backward on the casts
it was built with.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods import lora as lora_mod

from fused_reference import plain_formula_copy  # the test directory is on sys.path


class _Block(nn.Module):
    """q/k/v (a sibling set), an output projection and an MLP, with 3-d activations."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.o(self.q(x) * self.k(x) + self.v(x))
        return self.down(torch.nn.functional.gelu(self.up(h)))


def _model(dtype: torch.dtype, adapter_dtype: str) -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block()).to(dtype)
    layers = ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["q", "k", "v", "o", "up", "down"],
                               adapter_dtype=adapter_dtype)
    with torch.no_grad():  # B starts at zero: make every adapter term count
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.1)
    return model, layers


def _x(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)


def _assert_casts_current(layers: dict[str, nn.Module], dtype: torch.dtype) -> None:
    """Every layer's cached casts equal its parameters converted now (stale casts would not)."""
    for name, layer in layers.items():
        A, B = layer._casts
        assert A.dtype == dtype and B.dtype == dtype, name
        assert torch.equal(A, layer.lora_A.detach().to(dtype)), name
        assert torch.equal(B, layer.lora_B.detach().to(dtype)), name


CASES = [(torch.float32, "float64"), (torch.bfloat16, "float32"), (torch.float32, "float32")]


@pytest.mark.parametrize("dtype,adapter_dtype", CASES)
@pytest.mark.parametrize("foreach", [True, False])
def test_casts_follow_optimizer_steps(dtype, adapter_dtype, foreach):
    model, layers = _model(dtype, adapter_dtype)
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-3, foreach=foreach)
    x = _x(dtype)
    prev = None
    for _ in range(3):
        y = model(x)
        _assert_casts_current(layers, dtype)
        if prev is not None:
            assert not torch.equal(y, prev)  # the update reached the output
        prev = y.detach()
        y.float().pow(2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if adapter_dtype != {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]:
            _assert_casts_current(layers, dtype)  # refreshed by the step hook, before any forward


@pytest.mark.parametrize("dtype,adapter_dtype", CASES)
def test_casts_follow_load_state_dict_and_in_place_writes(dtype, adapter_dtype):
    model, layers = _model(dtype, adapter_dtype)
    x = _x(dtype)
    model(x)
    other, _ = _model(dtype, adapter_dtype)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.5)
    other(x)  # both have learned their sibling plans (the first pass runs every layer alone)
    model.load_state_dict(other.state_dict())  # in-place copies: no optimizer step
    y = model(x)
    _assert_casts_current(layers, dtype)
    assert torch.equal(y, other(x))
    with torch.no_grad():
        layers["0.k"].lora_A.add_(1.0)  # one sibling of a set written in place
    y = model(x)
    _assert_casts_current(layers, dtype)
    assert not torch.equal(y, other(x))


@pytest.mark.parametrize("dtype,adapter_dtype", CASES)
def test_casts_after_merge_and_unmerge(dtype, adapter_dtype):
    model, layers = _model(dtype, adapter_dtype)
    opt = torch.optim.SGD(ll.trainable_parameters(model), lr=1e-3)
    x = _x(dtype)
    model(x).float().sum().backward()
    opt.step()
    y = model(x).detach()
    for layer in layers.values():
        layer.merge()
    with torch.no_grad():
        model(x)  # merged: the base layers only
    for layer in layers.values():
        layer.unmerge()
    y2 = model(x)
    _assert_casts_current(layers, dtype)
    if dtype == torch.float32:
        assert torch.allclose(y, y2, atol=1e-5)  # unmerge restores W0 up to fp32 rounding
    opt.zero_grad()
    y2.float().sum().backward()
    opt.step()
    model(x)
    _assert_casts_current(layers, dtype)


@pytest.mark.parametrize("dtype,adapter_dtype", CASES[:2])
def test_graph_built_before_a_refresh_keeps_its_casts(dtype, adapter_dtype):
    """A refresh writes new buffers: a pending graph's backward uses the casts of its forward. (Adapters
    already in the activation dtype are used as they are, not copied: see
    test_in_place_update_before_backward_raises_for_uncast_adapters.)"""
    model, layers = _model(dtype, adapter_dtype)
    params = ll.trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=1e-3)
    x = _x(dtype)
    for _ in range(2):  # learn the sibling plan, then a pass on the fused path
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).sum().backward()
    expected = [p.grad.clone() for p in params]
    opt.zero_grad(set_to_none=True)
    pending = model(x).float().pow(2).sum()  # the same pass again, its backward left pending
    for p, g in zip(params, expected):
        p.grad = g.clone()
    opt.step()  # the parameters change, the casts refresh while `pending` waits
    opt.zero_grad(set_to_none=True)
    model(x)  # and a forward with the new casts
    _assert_casts_current(layers, dtype)
    pending.backward()
    for p, g in zip(params, expected):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("siblings", [True, False])
def test_in_place_ops_on_fused_outputs(siblings):
    """The fused outputs are fresh tensors (not views made inside the function): in-place ops on them
    are allowed and give the same gradients as the plain formula."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block()).double()
    layers = ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["q", "k", "v", "o"],
                               fuse_siblings=siblings)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.1)
    ref = plain_formula_copy(model)
    x = _x(torch.float64)
    for m in (model, model, ref):  # twice: the first pass learns the sibling plan
        blk = m[0]
        outs = [blk.q(x), blk.k(x), blk.v(x)]
        for o in outs:
            assert not o._is_view()
            o.mul_(2.0)
        y = blk.o(outs[0] * outs[1] + outs[2])
        y.add_(1.0)
        m.zero_grad(set_to_none=True)
        y.pow(2).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12), n


def test_refresh_builds_few_buffers():
    """One optimizer step refreshes all casts with one multi-tensor copy into a handful of buffers:
    one per sibling set (its stacked A) and one per distinct shape of the others."""
    model, layers = _model(torch.bfloat16, "float32")
    opt = torch.optim.SGD(ll.trainable_parameters(model), lr=1e-3)
    x = _x(torch.bfloat16)
    for _ in range(2):  # learn the plan, then a step
        model(x).float().sum().backward()
        opt.step()
        opt.zero_grad()
    storages = {t.untyped_storage().data_ptr() for layer in layers.values() for t in layer._casts}
    sets = {id(s) for layer in layers.values() if layer._siblings is not None
            for s in (layer._siblings.sets or {}).values()}
    assert len(sets) == 2
    # A: 2 stacked sets + o (4, 16) + up (4, 16) + down (4, 32): shapes (4, 16), (4, 32); B: (16, 4), (32, 4)
    assert len(storages) == len(sets) + 4, len(storages)
    for s_layer in layers.values():
        s = s_layer._siblings.sets.get(s_layer) if s_layer._siblings is not None and s_layer._siblings.sets else None
        if s is not None:
            assert s_layer._casts[0]._base is s.a_buffers[torch.bfloat16]
    _assert_casts_current(layers, torch.bfloat16)


@pytest.mark.parametrize("targets", [["o", "up", "down"], ["q", "k", "v"]], ids=["single", "siblings"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_in_place_update_before_backward_raises_for_uncast_adapters(targets, fused):
    """Adapters already in the activation dtype are used as they are (no cast copy): an in-place update
    between forward and backward (a non-fused optimizer step) must raise as autograd does for an
    ``nn.Linear`` weight, on the fused path as on the plain formula, not give a silently wrong gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block())
    layers = ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=targets, adapter_dtype="float32")
    for layer in layers.values():
        layer.fused = fused
    params = ll.trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=1e-3)
    x = _x(torch.float32)
    for _ in range(2):  # learn the sibling plan, then a pass on the fused path
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
    pending = model(x).pow(2).sum()
    opt.step()  # in place on A and B (SGD bumps their version counters) while `pending` waits
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        pending.backward()


def test_input_recipe_rejects_by_node_type_first(monkeypatch):
    """``_input_recipe`` (asked per layer per forward) turns down an input whose autograd node cannot start
    a recipe (a LayerNorm's output, a view, a leaf) by the node's type alone, before the costlier checks;
    the inputs that do start one still get their recipe, and still take every check."""
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    recipe_input = torch.nn.functional.gelu(a) * b
    rejected = [torch.nn.functional.layer_norm(a, (8,)), (a * b)[:, :4], a, (a + b)]

    def costly_check() -> bool:
        raise AssertionError("checked although the node type rules a recipe out")

    monkeypatch.setattr(lora_mod, "_saved_tensor_hooks_active", costly_check)
    for x in rejected:
        assert lora_mod._input_recipe(x) is None
    with pytest.raises(AssertionError, match="checked although"):
        lora_mod._input_recipe(recipe_input)
    monkeypatch.undo()
    assert lora_mod._input_recipe(recipe_input) is not None


@pytest.mark.parametrize("targets", [["o", "up", "down"], ["q", "k", "v"]], ids=["single", "siblings"])
def test_unfrozen_base_weight_gets_its_gradient(targets):
    """A user who unfreezes an adapted layer's base weight gets its gradient (the fused functions do not
    compute one: such a layer takes the plain formula), equal to the reference path's."""
    torch.manual_seed(0)
    grads = {}
    for fused in (True, False):
        model = nn.Sequential(_Block(), _Block())
        layers = ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=targets)
        for layer in layers.values():
            layer.fused = fused
            layer.base_layer.weight.requires_grad_(True)
            with torch.no_grad():
                layer.lora_B.normal_(0, 0.1)
        x = _x(torch.float32)
        for _ in range(2):  # the sibling plan is learned on the first pass
            model.zero_grad(set_to_none=True)
            model(x).pow(2).sum().backward()
        grads[fused] = {n: layer.base_layer.weight.grad for n, layer in layers.items()}
        torch.manual_seed(0)
    for name, g in grads[True].items():
        assert g is not None, name
        torch.testing.assert_close(g, grads[False][name])


def _fresh_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s output from a deep copy, which shares no cast with it (new parameters: nothing
    cached) and runs the same fused path (its second pass, once the sibling plan is learned)."""
    fresh = copy.deepcopy(model)
    fresh(x)
    return fresh(x)


@pytest.mark.parametrize("siblings", [True, False])
def test_hand_written_training_loop_through_data(siblings):
    """A loop that updates the adapter by hand through ``.data`` (no torch.optim optimizer, no version
    counter moved) gets the current parameters at every forward: casts are kept between forwards only
    once an optimizer holding them has stepped. Outputs equal those of a copy with nothing cached."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block()).to(torch.bfloat16)
    layers = ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["q", "k", "v", "o", "up", "down"],
                               adapter_dtype="float32", fuse_siblings=siblings)
    x = _x(torch.bfloat16)
    params = ll.trainable_parameters(model)
    prev = None
    for step in range(4):
        y = model(x)
        _assert_casts_current(layers, torch.bfloat16)
        if step:  # (the first pass learns the sibling plan: every layer alone)
            assert torch.equal(y, _fresh_output(model, x))
        if prev is not None:
            assert not torch.equal(y, prev)  # the hand-made update reached the output
        prev = y.detach()
        y.float().pow(2).sum().backward()
        for p in params:
            p.data.add_(p.grad, alpha=-0.5)  # a hand-written SGD step: no version counter moves
            p.grad = None


@pytest.mark.parametrize("dtype,adapter_dtype", CASES)
def test_invalidate_after_writes_around_autograd(dtype, adapter_dtype):
    """After an optimizer has stepped, casts are kept between forwards; a write that moves no version
    counter (``.data``, as model averaging or a ``torch.distributed`` collective into a parameter does)
    is picked up after ``invalidate_cast_caches()``."""
    model, layers = _model(dtype, adapter_dtype)
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-3)
    x = _x(dtype)
    for _ in range(2):
        model(x).float().pow(2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model(x)
    for p in ll.trainable_parameters(model):
        p.data.mul_(0.5)  # e.g. all_reduce(p.data) then p.data /= world_size
    ll.invalidate_cast_caches()
    y = model(x)
    _assert_casts_current(layers, dtype)
    assert torch.equal(y, _fresh_output(model, x))


def test_core_frozen_casts_follow_invalidation():
    """LoRA-SB's cached casts of its frozen factors (buffers) are made again after
    ``invalidate_cast_caches()``, e.g. after ``set_factors``-like writes through ``.data``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    layers = ll.inject_adapter(model, "lora_sb", dict(r=4, svd="exact"), target_modules=["0", "2"])
    layer = layers["0"]
    buffers = [n for n in ("lora_A", "lora_B") if n in layer._buffers]
    assert buffers, "LoRA-SB's frozen factors are buffers"
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    name = buffers[0]
    layer._buffers[name].data.mul_(2.0)
    ll.invalidate_cast_caches()
    cast = layer._frozen_cast(name, layer._buffers[name], torch.bfloat16)
    assert torch.equal(cast, layer._buffers[name].to(torch.bfloat16))


def test_callback_invalidates_at_loop_starts():
    """``AdapterCallback`` invalidates the casts at the start of training (after the strategy's
    broadcast of rank 0's parameters), validation, test and predict."""
    cb = ll.AdapterCallback("lora", r=4, target_modules=["0"])
    for hook in ("on_train_start", "on_validation_start", "on_test_start", "on_predict_start"):
        before = lora_mod._CAST_INVALIDATIONS
        getattr(cb, hook)(None, None)
        assert lora_mod._CAST_INVALIDATIONS == before + 1, hook


@pytest.mark.parametrize("use_dora", [False, True])
def test_casts_kept_between_forwards_once_an_optimizer_steps(use_dora):
    """Before any optimizer step every forward casts afresh; after a step of an optimizer holding the
    adapter, forwards with unchanged parameters reuse the very same cast tensors (LoRA and DoRA,
    whose fused path reads the same cache)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)).to(torch.bfloat16)
    layers = ll.inject_adapter(model, "lora", r=4, target_modules=["0", "2"], use_dora=use_dora,
                               adapter_dtype="float32")
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    model(x)
    first = [layer._casts for layer in layers.values()]
    model(x)
    assert all(a[0] is not b[0] for a, b in zip(first, (layer._casts for layer in layers.values())))
    opt = torch.optim.SGD(ll.trainable_parameters(model), lr=1e-2)
    model(x).float().pow(2).sum().backward()
    opt.step()
    model(x)
    kept = [layer._casts for layer in layers.values()]
    model(x)
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(kept, (layer._casts for layer in layers.values())))
    _assert_casts_current(layers, torch.bfloat16)


def _recast_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with every cast made afresh from the parameters as they are now."""
    ll.invalidate_cast_caches()
    return model(x)


def test_another_model_s_optimizer_leaves_these_casts_and_the_outputs_stay_exact():
    """Two models trained in turn (GAN-like, or a gate optimizer beside the adapters' one): a step of
    the other model's optimizer keeps this model's casts, the very same tensors, and this model's
    output is the one fresh casts give; its own optimizer's step (fused: no version counter moves)
    refreshes them."""
    model_1, layers_1 = _model(torch.bfloat16, "float32")
    model_2, _ = _model(torch.bfloat16, "float32")
    opt_1 = torch.optim.AdamW(ll.trainable_parameters(model_1), lr=1e-2, fused=True)
    opt_2 = torch.optim.AdamW(ll.trainable_parameters(model_2), lr=1e-2, fused=True)
    x = _x(torch.bfloat16)
    for model, opt in ((model_1, opt_1), (model_2, opt_2)):
        model(x)  # the first pass runs every layer alone and learns the sibling sets
        model(x).float().pow(2).sum().backward()
        opt.step()  # from now on the casts are kept between this model's steps
        opt.zero_grad(set_to_none=True)
    model_1(x)
    kept = {name: layer._casts for name, layer in layers_1.items()}
    model_2(x).float().pow(2).sum().backward()
    opt_2.step()
    opt_2.zero_grad(set_to_none=True)
    y = model_1(x)
    assert all(layers_1[n]._casts[0] is kept[n][0] and layers_1[n]._casts[1] is kept[n][1] for n in kept)
    assert torch.equal(y, _recast_output(model_1, x))
    y = model_1(x)
    y.float().pow(2).sum().backward()
    opt_1.step()
    opt_1.zero_grad(set_to_none=True)
    assert all(layers_1[n]._casts[0] is not kept[n][0] for n in kept)
    _assert_casts_current(layers_1, torch.bfloat16)
    assert torch.equal(model_1(x), _recast_output(model_1, x))


def test_an_optimizer_holding_a_flat_buffer_that_a_is_a_view_of_refreshes_its_casts():
    """A managed layer whose A is also a view into a flat buffer that a fused optimizer updates (no
    version counter moves, and that optimizer does not hold A itself): the step still counts for the
    layer, through the shared storage, and its next forward uses the new A."""
    model, layers = _model(torch.bfloat16, "float32")
    layer = layers["0.o"]  # a layer alone (q/k/v form a sibling set)
    flat = nn.Parameter(layer.lora_A.detach().flatten().clone())
    layer.lora_A.data = flat.data.view_as(layer.lora_A)  # A now lives in flat's storage
    opt = torch.optim.SGD(ll.trainable_parameters(model), lr=1e-2)
    x = _x(torch.bfloat16)
    model(x)
    model(x).float().pow(2).sum().backward()
    opt.step()  # marks the layers managed: their casts are kept between forwards from now on
    opt.zero_grad(set_to_none=True)
    model(x)
    kept = layer._casts[0]
    flat.grad = torch.ones_like(flat)
    torch.optim.AdamW([flat], lr=0.5, fused=True).step()
    assert not torch.equal(kept, layer.lora_A.detach().to(torch.bfloat16))  # A moved under the cast
    y = model(x)
    _assert_casts_current(layers, torch.bfloat16)
    assert torch.equal(y, _recast_output(model, x))


class _NoStorageParameter(nn.Parameter):
    """A parameter whose storage cannot be read (as a tensor subclass or a traced tensor's)."""

    def untyped_storage(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("no storage here")


def test_an_optimizer_whose_storages_cannot_be_read_counts_as_moving_every_layer():
    """When the step hook cannot tell which storages an optimizer holds, every layer's casts are
    made afresh at the next forward (never kept stale)."""
    model, layers = _model(torch.bfloat16, "float32")
    opt = torch.optim.SGD(ll.trainable_parameters(model), lr=1e-2)
    x = _x(torch.bfloat16)
    model(x)
    model(x).float().pow(2).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model(x)
    kept = {name: layer._casts[0] for name, layer in layers.items()}
    other = _NoStorageParameter(torch.zeros(3))
    other.grad = torch.ones(3)
    torch.optim.SGD([other], lr=0.1).step()
    model(x)
    assert all(layers[n]._casts[0] is not kept[n] for n in kept)
    _assert_casts_current(layers, torch.bfloat16)
