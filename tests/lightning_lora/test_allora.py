"""ALLoRA specifics (METHODS.md §5 invariants 1-7): s = 1 and no dropout, the coefficient c(θ), the
scaled gradient on a hand-computed example, zero-norm units, hook == wrapper == function, the first
update of B, and the Lightning hook with gradient accumulation."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll
from lightning_lora.optim import (
    ALLoRAOptimizer,
    adapter_parameters,
    allora_coefficient,
    install_update_scaling,
    scale_gradients,
)

ETA = 4.0


def _model(seed: int = 0, method: str = "allora", **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    if method == "allora":
        kw = {"eta": ETA, **kw}
    ll.inject_adapter(model, method, dict(r=2, **kw), target_modules=["0", "2"])
    return model


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


# ---- invariant 1, 2 --------------------------------------------------------------------------
def test_config_forces_scale_one_and_no_dropout_and_needs_eta():
    model = _model()
    for layer in ll.adapter_layers(model).values():
        assert layer.scaling == 1.0 and layer.dropout_p == 0.0
        with torch.no_grad():
            layer.lora_B.normal_()
        w0 = layer.base_weight.detach().clone()
        layer.merge()
        torch.testing.assert_close(layer.base_weight - w0, layer.lora_B @ layer.lora_A, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="eta"):
        ll.make_config("allora", r=2)
    with pytest.raises(ValueError, match="unknown option"):
        ll.make_config("allora", r=2, eta=1.0, dropout=0.1)
    with pytest.raises(ValueError, match="granularity"):
        ll.make_config("allora", r=2, eta=1.0, granularity="column")


# ---- invariant 3: the coefficient ----------------------------------------------------------------
def test_coefficient_values():
    eta = 5.0
    assert allora_coefficient(torch.zeros(3, 4), eta).flatten().tolist() == [eta] * 3  # c(0) == η exactly
    norms = torch.tensor([0.0, 0.01, 0.1, 1.0, 10.0, 100.0])
    c = allora_coefficient(norms.unsqueeze(1), eta).flatten()  # rows of length 1: ‖θ‖ = |θ|
    assert bool((c[1:] < c[:-1]).all()), "c must strictly decrease in ‖θ‖"
    big = 1e3 / eta
    assert abs(allora_coefficient(torch.tensor([[big]]), eta).item() * big - 1) < 1e-3
    with pytest.raises(ValueError):
        allora_coefficient(torch.zeros(1), 0.0)


def test_scaled_gradient_equals_hand_computed_formula():
    """B = [[3, 4], [0, 0]] with grad [[1, 2], [3, 4]], η = 2, row granularity:
    row 0: ‖θ‖ = 5, c = 1/sqrt(25 + 1/4) = 1/sqrt(25.25); row 1: ‖θ‖ = 0, c = η = 2."""
    p = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    p.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    scale_gradients([p], eta=2.0, granularity="row")
    c0 = 1 / math.sqrt(25.25)
    torch.testing.assert_close(p.grad, torch.tensor([[c0, 2 * c0], [6.0, 8.0]]), atol=1e-7, rtol=1e-6)
    # tensor granularity: one norm 5 for the whole tensor; element: |θ| per entry
    q = nn.Parameter(p.detach().clone())
    q.grad = torch.ones(2, 2)
    scale_gradients([q], eta=2.0, granularity="tensor")
    torch.testing.assert_close(q.grad, torch.full((2, 2), c0))
    q.grad = torch.ones(2, 2)
    scale_gradients([q], eta=2.0, granularity="element")
    expected = torch.tensor([[1 / math.sqrt(9.25), 1 / math.sqrt(16.25)], [2.0, 2.0]])
    torch.testing.assert_close(q.grad, expected, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["row", "tensor", "element"])
def test_zero_norm_units_stay_finite(granularity):
    for eta in (1e-3, 1.0, 1e6):
        p = nn.Parameter(torch.zeros(4, 3))
        p.grad = torch.randn(4, 3)
        g0 = p.grad.clone()
        scale_gradients([p], eta=eta, granularity=granularity)
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, g0 * eta)
    p = nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
    p.grad = torch.randn(4, 3).bfloat16()
    scale_gradients([p], eta=1e3, granularity=granularity)
    assert p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()


# ---- invariant 4, 6: SGD update by hand; hook == wrapper == function -----------------------------
def _perturbed(seed: int = 0) -> nn.Module:
    model = _model(seed)
    with torch.no_grad():
        for p in ll.trainable_parameters(model):
            if bool((p == 0).all()):
                p.normal_(std=0.3)
    return model


def test_sgd_update_equals_hand_formula_and_all_mechanisms_agree_bitwise():
    lr = 0.1
    x, y = _data()
    ref = _perturbed()
    _loss(ref, x, y).backward()
    expected = {
        n: p.detach() - lr * allora_coefficient(p, ETA, "row") * p.grad
        for n, p in ref.named_parameters() if p.requires_grad
    }
    results = {}
    for mech in ("function", "wrapper", "hook"):
        model = _perturbed()
        opt = torch.optim.SGD(ll.trainable_parameters(model), lr=lr)
        _loss(model, x, y).backward()
        if mech == "function":
            scale_gradients(model)  # eta and granularity from the model's config
            opt.step()
        elif mech == "wrapper":
            ALLoRAOptimizer(opt, eta=ETA).step()
        else:
            method = ll.get_adapter_method(model)
            method.on_after_backward(None, None, ll.adapter_layers(model))
            opt.step()
        results[mech] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, want in expected.items():
        torch.testing.assert_close(results["function"][n], want, atol=1e-7, rtol=1e-6)
        assert torch.equal(results["function"][n], results["wrapper"][n]), n
        assert torch.equal(results["function"][n], results["hook"][n]), n


def test_coefficients_come_from_pre_step_parameters():
    """Invariant 6: with apply_to='update', c uses θ before the step, not after."""
    p = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    p.grad = torch.tensor([[1.0, 1.0]])
    c_pre = allora_coefficient(p, 2.0).item()
    ALLoRAOptimizer(torch.optim.SGD([p], lr=1.0), eta=2.0, apply_to="update").step()
    torch.testing.assert_close(p.detach(), torch.tensor([[3.0 - c_pre, 4.0 - c_pre]]))
    # under SGD, scaling the update == scaling the gradient
    a, b = nn.Parameter(torch.randn(3, 4)), None
    b = nn.Parameter(a.detach().clone())
    a.grad = torch.randn(3, 4)
    b.grad = a.grad.clone()
    ALLoRAOptimizer(torch.optim.SGD([a], lr=0.3), eta=2.0, apply_to="update").step()
    ALLoRAOptimizer(torch.optim.SGD([b], lr=0.3), eta=2.0, apply_to="grad").step()
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_wrapper_works_with_adam_and_shares_inner_state():
    model = _perturbed()
    inner = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-2)
    opt = ALLoRAOptimizer(inner, eta=ETA, params=adapter_parameters(model))
    x, y = _data()
    for _ in range(2):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and len(inner.state) == 4
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(5e-3)


# ---- invariant 5: first update of B ------------------------------------------------------------------
def test_first_update_of_b_is_eta_times_vanilla_lora():
    lr = 0.1
    x, y = _data()
    updates = {}
    for method in ("allora", "lora"):
        model = _model(method=method, **({} if method == "allora" else {"alpha": 2}))  # LoRA s = 2/2 = 1
        opt = torch.optim.SGD(ll.trainable_parameters(model), lr=lr)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        _loss(model, x, y).backward()
        ALLoRAOptimizer(opt, eta=ETA).step() if method == "allora" else opt.step()
        updates[method] = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    for n, u in updates["allora"].items():
        if n.endswith("lora_A"):
            assert torch.equal(u, torch.zeros_like(u)) and torch.equal(updates["lora"][n], u)  # ∇A ∝ Bᵀ = 0
        else:
            assert u.abs().max() > 0
            torch.testing.assert_close(u, ETA * updates["lora"][n], atol=1e-7, rtol=1e-5)


# ---- invariant 7 and the Lightning hook ----------------------------------------------------------
class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def training_step(self, batch, batch_idx):
        return _loss(self.net, *batch)

    def configure_optimizers(self):
        return torch.optim.SGD(ll.trainable_parameters(self), lr=0.2)


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_callback_scales_accumulated_gradients_once(tmp_path):
    x, y = _data()
    module = _Module()
    cb = ll.AdapterCallback("allora", r=2, eta=ETA, target="net", target_modules=["0", "2"])
    trainer = pl.Trainer(
        max_steps=2, accumulate_grad_batches=2, callbacks=[cb], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
    )
    with torch.random.fork_rng():
        torch.manual_seed(3)  # adapter init inside setup()
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert all(p.grad is None for n, p in module.named_parameters() if not p.requires_grad)  # invariant 7

    # the same run by hand: 2 optimizer steps, each over 2 micro-batches (loss / 2), scaled once
    _assert_matches_hand_loop(module, x, y, {}, lambda ref: ALLoRAOptimizer(
        torch.optim.SGD(ll.trainable_parameters(ref), lr=0.2), eta=ETA))


def _assert_matches_hand_loop(module, x, y, config: dict, make_opt) -> None:
    """``module`` (trained by the callback: seed 3 for the adapter, 2 steps of 2 micro-batches) equals
    the same model trained by a hand-written loop with ``make_opt(ref)``."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.random.fork_rng():
        torch.manual_seed(3)
        ll.inject_adapter(ref, "allora", dict(r=2, eta=ETA, **config), target_modules=["0", "2"])
    opt = make_opt(ref)
    for _ in range(2):
        opt.zero_grad()
        for xb, yb in ((x[:4], y[:4]), (x[4:], y[4:])):
            (_loss(ref, xb, yb) / 2).backward()
        opt.step()
    got = dict(module.net.named_parameters())
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("granularity", ["row", "tensor", "element"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_scaling_equals_one_tensor_at_a_time(granularity, dtype):
    """scale_gradients scales same-shape parameters together (stacked norms, one multi-tensor
    multiply); on the CPU that equals scaling each parameter alone, bit for bit, mixed shapes and
    missing gradients included."""
    torch.manual_seed(0)
    shapes = [(8, 24)] * 4 + [(24, 8)] * 3 + [(5,)] * 2 + [(3, 4, 5)] * 2 + [(6, 6)]
    together = [nn.Parameter((torch.randn(s) * 0.3).to(dtype)) for s in shapes]
    alone = [nn.Parameter(p.detach().clone()) for p in together]
    for i, (p, q) in enumerate(zip(together, alone)):
        if i != 2:  # one parameter without a gradient: skipped
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
    scale_gradients(together, eta=1.5, granularity=granularity)
    for q in alone:
        scale_gradients([q], eta=1.5, granularity=granularity)
    for p, q in zip(together, alone):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert p.grad.dtype == dtype and torch.equal(p.grad, q.grad)


# ---- apply_to="update": the update form, through the config and Lightning ------------------------
def test_update_form_config_is_validated():
    with pytest.raises(ValueError, match="apply_to"):
        ll.make_config("allora", r=2, eta=ETA, apply_to="gradient")
    assert ll.make_config("allora", r=2, eta=ETA, apply_to="update").apply_to == "update"


def _trainer(cb: ll.AdapterCallback, root, **kw) -> pl.Trainer:
    """A quiet CPU trainer with ``cb``: one step unless ``kw`` says otherwise."""
    return pl.Trainer(**{"max_steps": 1, **kw}, callbacks=[cb], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=root)


class _AdamModule(_Module):
    def configure_optimizers(self):
        return torch.optim.AdamW(ll.trainable_parameters(self), lr=1e-3, weight_decay=0.0)


def _fit_one_step(tmp_path, apply_to: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    x, y = _data()
    module = _AdamModule()
    cb = ll.AdapterCallback("allora", r=2, eta=10.0, apply_to=apply_to, target="net", target_modules=["0", "2"])
    trainer = _trainer(cb, tmp_path)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        ll.inject_adapter(module.net, "allora", cb.config)  # the same init in both runs, before fit
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    after = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return before, after


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_update_form_under_adam_gives_b_at_zero_an_eta_times_larger_step(tmp_path):
    """Adam's first step is ±lr per coordinate whatever the gradient's scale, so scaling B's gradient
    by c(0) = η changes nothing (apply_to="grad") while scaling the update moves B by η·lr."""
    steps = {}
    for apply_to in ("grad", "update"):
        before, after = _fit_one_step(tmp_path / apply_to, apply_to)
        steps[apply_to] = {n: after[n] - before[n] for n in before if n.endswith("lora_B")}
    for n, grad_step in steps["grad"].items():
        moved = grad_step.abs() > 0
        assert moved.any()
        torch.testing.assert_close(grad_step.abs()[moved], torch.full_like(grad_step[moved], 1e-3), rtol=1e-3, atol=0)
        torch.testing.assert_close(steps["update"][n], 10.0 * grad_step, rtol=1e-4, atol=1e-9)


def test_hooks_and_wrapper_agree_bitwise_and_use_pre_step_coefficients():
    x, y = _data()
    results = []
    for mechanism in ("wrapper", "hooks"):
        model = _perturbed()
        inner = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-2)
        if mechanism == "wrapper":
            opt = ALLoRAOptimizer(inner, eta=ETA, apply_to="update", params=adapter_parameters(model))
        else:
            opt = inner
            handles = install_update_scaling(inner, adapter_parameters(model), ETA)
        for _ in range(3):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for handle in handles:
        handle.remove()
    for n, p in results[0].items():
        assert torch.equal(p, results[1][n]), n
    # by hand, one step: θ_pre + c(θ_pre)·(θ_post − θ_pre) with the plain AdamW step
    model, plain = _perturbed(), _perturbed()
    for m in (model, plain):
        opt = torch.optim.AdamW(ll.trainable_parameters(m), lr=1e-2)
        if m is model:
            install_update_scaling(opt, adapter_parameters(m), ETA)
        pre = {n: p.detach().clone() for n, p in m.named_parameters()}
        _loss(m, x, y).backward()
        opt.step()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        if any(p is a for a in adapter_parameters(model)):
            expected = pre[n] + allora_coefficient(pre[n], ETA) * (q.detach() - pre[n])
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_callback_refuses_a_wrapped_optimizer_that_would_scale_twice(tmp_path):
    class Wrapped(_Module):
        def configure_optimizers(self):
            return ALLoRAOptimizer(torch.optim.SGD(ll.trainable_parameters(self), lr=0.2), eta=ETA)

    x, y = _data()
    cb = ll.AdapterCallback("allora", r=2, eta=ETA, target="net", target_modules=["0", "2"])
    trainer = _trainer(cb, tmp_path)
    with pytest.raises(ValueError, match="scaling would apply twice"):
        trainer.fit(Wrapped(), DataLoader(TensorDataset(x, y), batch_size=8))


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_update_form_leaves_the_optimizer_after_fit_and_refuses_when_it_cannot_apply(tmp_path):
    x, y = _data()
    module = _AdamModule()
    cb = ll.AdapterCallback("allora", r=2, eta=10.0, apply_to="update", target="net", target_modules=["0", "2"])
    trainer = _trainer(cb, tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    opt = trainer.optimizers[0]
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # taken off at fit end

    class HeadOnly(_Module):  # an optimizer that holds none of the adapter parameters
        def configure_optimizers(self):
            return torch.optim.AdamW(self.net[2].base_layer.parameters(), lr=1e-3)

    cb = ll.AdapterCallback("allora", r=2, eta=10.0, apply_to="update", target="net", target_modules=["0", "2"])
    trainer = _trainer(cb, tmp_path)
    with pytest.raises(ValueError, match="no optimizer of this fit holds the adapter parameters"):
        trainer.fit(HeadOnly(), DataLoader(TensorDataset(x, y), batch_size=8))


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_update_form_with_accumulation_matches_the_wrapper_by_hand(tmp_path):
    """Two optimizer steps of two micro-batches each, AdamW: the callback's hooks give what
    ALLoRAOptimizer(apply_to="update") gives around a hand-written loop."""
    x, y = _data()
    module = _AdamModule()
    cb = ll.AdapterCallback("allora", r=2, eta=ETA, apply_to="update", target="net", target_modules=["0", "2"])
    trainer = _trainer(cb, tmp_path, max_steps=2, accumulate_grad_batches=2)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    _assert_matches_hand_loop(module, x, y, {"apply_to": "update"}, lambda ref: ALLoRAOptimizer(
        torch.optim.AdamW(ll.trainable_parameters(ref), lr=1e-3, weight_decay=0.0), eta=ETA, apply_to="update",
        params=adapter_parameters(ref)))
