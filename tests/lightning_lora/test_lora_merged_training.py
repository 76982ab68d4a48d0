"""LoRA's ``merged_training`` mode: train-mode layers run through ``W' = W + s·B A`` formed once per
optimizer step, stochastically rounded in bf16 (``lightning_lora.core.rounding``).

Promises checked here: the config refuses what cannot share one GEMM; in fp32 the outputs and every
gradient equal the plain LoRA formula; in bf16 the output is the GEMM with the cached ``W'`` and A, B
get that forward's exact gradients; ``W'`` is formed once per optimizer step and again after one;
at init ``W' = W`` bit for bit; the rounding is unbiased (a delta below half a bf16 ulp of ``W``, which
round-to-nearest loses, survives in the mean), deterministic per seed, in both the torch form and the
Triton kernel (run by Triton's interpreter on the CPU); eval mode takes the exact fused path.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_lora as ll
from lightning_lora.core import rounding
from lightning_lora.methods import lora as lora_mod

from fused_reference import plain_formula_copy  # the test directory is on sys.path


class _MLP(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.up = nn.Linear(d, 3 * d)
        self.down = nn.Linear(3 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.q(x) * self.k(x))))


def _model(merged: bool, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(seed)
    model = _MLP().to(dtype)
    layers = ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["q", "k", "up", "down"],
                               merged_training=merged)
    with torch.no_grad():  # B starts at zero: make every adapter term count
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.1)
    return model, layers


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)


def _ulp_bf16(v: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at ``v`` (fp32, nonzero entries)."""
    return torch.exp2(torch.floor(torch.log2(v.abs())) - 7)


def _assert_same_outputs_and_grads(model: nn.Module, ref: nn.Module, x: torch.Tensor, x_ref: torch.Tensor,
                                   out: torch.Tensor, out_ref: torch.Tensor) -> None:
    """fp32: the outputs, the input gradient and every parameter gradient of ``model`` equal ``ref``'s."""
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    named_ref = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, named_ref[name].grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dropout=0.1), "dropout"),
    (dict(use_dora=True), "DoRA"),
    (dict(fused=False), "fused=True"),
])
def test_config_refuses_what_cannot_share_one_gemm(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ll.LoRAConfig(merged_training=True, **kwargs)


def test_lora_subclasses_refuse_it():
    with pytest.raises(ValueError, match="plain LoRA"):
        ll.inject_adapter(nn.Sequential(nn.Linear(8, 8)), "ffa_lora", r=2, target_modules=["0"], merged_training=True)


def test_fp32_outputs_and_gradients_equal_the_plain_formula():
    model, layers = _model(merged=True)
    ref = plain_formula_copy(model)
    model.train(), ref.train()
    x = _x()
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = model(x), ref(x_ref)
    assert all(layer._merged_cache is None for layer in layers.values())  # no optimizer yet: formed per call
    _assert_same_outputs_and_grads(model, ref, x, x_ref, out, out_ref)


def test_gpt2_conv1d_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8))
    ll.inject_adapter(model, "lora", r=3, alpha=6, target_modules=["0"], merged_training=True)
    assert model[0].fan_in_fan_out
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.1)
    ref = plain_formula_copy(model)
    x = _x()[..., :8]
    torch.testing.assert_close(model.train()(x), ref.train()(x), atol=1e-5, rtol=1e-5)


def test_merged_weight_formed_once_per_optimizer_step_and_again_after():
    model, layers = _model(merged=True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model(_x()).square().sum().backward()
        opt.step()
        opt.zero_grad()
        model(_x())
        cached = {name: layer._merged_cache for name, layer in layers.items()}
        assert all(c is not None for c in cached.values())
        model(_x())  # same parameters: the same W' tensors
        for name, layer in layers.items():
            assert layer._merged_cache[1] is cached[name][1], name
            expected = layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
            torch.testing.assert_close(layer._merged_cache[1], expected.detach(), atol=1e-6, rtol=1e-6)
    ref = plain_formula_copy(model)  # after three steps, still the plain formula
    torch.testing.assert_close(model(_x()), ref.train()(_x()), atol=1e-5, rtol=1e-5)


def test_bf16_forward_is_the_gemm_with_w_merged_and_gradients_are_exact_for_it():
    model, layers = _model(merged=True, dtype=torch.bfloat16)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model(_x(torch.bfloat16)).sum().backward()
    opt.step()  # the optimizer now manages A and B: W' is cached and can be read back
    opt.zero_grad()
    layer = layers["down"]
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    model(_x(torch.bfloat16)).float().square().sum().backward()
    w_merged = layer._merged_cache[1]
    assert w_merged.dtype == torch.bfloat16
    x, out = seen["x"].detach(), seen["out"]
    torch.testing.assert_close(out, x @ w_merged.t(), atol=0, rtol=0)
    # A's and B's gradients: those of s·(x A^T) B^T at this x, whatever W' rounded to
    g = torch.autograd.grad(model(_x(torch.bfloat16)).float().square().sum(), seen["out"])[0].float()
    x32 = seen["x"].detach().float().reshape(-1, layer.in_features)
    g32 = g.reshape(-1, layer.out_features)
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    grad_A = s * (g32 @ B).t() @ x32
    grad_B = s * g32.t() @ (x32 @ A.t())
    model.zero_grad()
    model(_x(torch.bfloat16)).float().square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, grad_A, atol=0.03 * grad_A.abs().max().item(), rtol=0)
    torch.testing.assert_close(layer.lora_B.grad, grad_B, atol=0.03 * grad_B.abs().max().item(), rtol=0)


def test_at_init_the_bf16_model_is_the_base_bit_for_bit():
    torch.manual_seed(0)
    base = _MLP().to(torch.bfloat16)
    model = _MLP().to(torch.bfloat16)
    model.load_state_dict(base.state_dict())
    ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["q", "k", "up", "down"], merged_training=True)
    x = _x(torch.bfloat16)
    assert torch.equal(model.train()(x), base.train()(x))


def test_rounding_keeps_a_delta_below_half_an_ulp_in_expectation():
    # W' = W + d with |d| < ulp(W)/2 everywhere: round-to-nearest gives W back, stochastic rounding
    # gives W + d in the mean over seeds (the mode's reason to exist)
    torch.manual_seed(0)
    w = (1 + torch.randint(0, 128, (64, 48)) / 128).to(torch.bfloat16)  # bf16 values in [1, 2): ulp 2^-7
    B = torch.full((64, 1), 1.0)
    A = torch.full((1, 48), 2 ** -10)  # d = 2^-10 = ulp / 8
    exact = w.float() + 2 ** -10
    assert torch.equal(exact.to(torch.bfloat16), w)  # round-to-nearest loses it
    draws = torch.stack([rounding.merged_weight(w, B, A, 1.0, torch.bfloat16, seed).float() for seed in range(400)])
    assert ((draws == w.float()) | (draws == w.float() + 2 ** -7)).all()  # one of the two neighbours
    mean_delta = (draws - w.float()).mean().item()  # 64*48*400 draws of 0 or 2^-7, P(up) = 1/8
    assert abs(mean_delta - 2 ** -10) < 0.02 * 2 ** -10


def test_stochastic_round_bf16_is_unbiased_for_both_signs_and_exact_on_bf16_values():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4096, generator=g) * torch.logspace(-3, 3, 4096)
    draws = torch.stack([rounding.stochastic_round_bf16(v, g).float() for _ in range(256)])
    ulp = _ulp_bf16(v)
    assert ((draws - v).abs() < ulp).all()
    z = (draws.mean(0) - v) / (ulp / (2 * math.sqrt(256)))  # |z| <= N(0, <=1) in distribution
    assert z.abs().max() < 6 and abs(z.mean().item()) < 0.15
    on_grid = v.to(torch.bfloat16).float()
    assert torch.equal(rounding.stochastic_round_bf16(on_grid, g).float(), on_grid)
    with pytest.raises(TypeError, match="fp32"):
        rounding.stochastic_round_bf16(v.double())


def test_merged_weight_is_deterministic_per_seed_and_refuses_fp16():
    torch.manual_seed(0)
    w, B, A = torch.randn(8, 6).bfloat16(), torch.randn(8, 2), torch.randn(2, 6)
    assert torch.equal(rounding.merged_weight(w, B, A, 0.5, torch.bfloat16, 7),
                       rounding.merged_weight(w, B, A, 0.5, torch.bfloat16, 7))
    assert not torch.equal(rounding.merged_weight(w, B, A, 0.5, torch.bfloat16, 7),
                           rounding.merged_weight(w, B, A, 0.5, torch.bfloat16, 8))
    with pytest.raises(TypeError, match="bf16 or fp32"):
        rounding.merged_weight(w, B, A, 0.5, torch.float16, 7)


def _triton_kernel_checks() -> None:
    """Run in a subprocess with ``TRITON_INTERPRET=1`` (Triton reads it when it is imported)."""
    import triton  # a test dependency (the CUDA path's kernel)

    assert triton.__version__
    for r, fan_in_fan_out in [(4, False), (16, True), (80, False)]:
        torch.manual_seed(r)
        m, n = 72, 40
        w = (torch.randn(m, n) * 0.03).bfloat16()
        B, A = torch.randn(m, r) * 1e-3, torch.randn(r, n) * 0.03
        exact = w.float() + 2.0 * (B @ A)

        def draw(seed: int, b: torch.Tensor = B) -> torch.Tensor:
            if fan_in_fan_out:  # weight stored (n, m), product A^T B^T, non-contiguous views
                return rounding._merged_weight_triton(w.t().contiguous(), A.t(), b.t(), 2.0, seed).t()
            return rounding._merged_weight_triton(w, b, A, 2.0, seed)

        draws = torch.stack([draw(seed).float() for seed in range(64)])
        ulp = _ulp_bf16(exact)
        assert ((draws - exact).abs() < ulp).all(), (r, fan_in_fan_out)
        z = (draws.mean(0) - exact) / (ulp / (2 * math.sqrt(64)))
        assert z.abs().max() < 6 and abs(z.mean().item()) < 0.2, (r, fan_in_fan_out, z.abs().max(), z.mean())
        assert torch.equal(draw(3), draw(3))
        assert not torch.equal(draw(3), draw(4))
        assert torch.equal(draw(1, torch.zeros_like(B)), w)
    # the grouped launch (merged_weights on CUDA): layers of one shape share a launch, each with its own
    # scale and random stream; other shapes and layouts form their own groups, outputs in input order
    rounding._use_triton = lambda t: True  # the interpreter runs the CUDA dispatch on CPU tensors
    torch.manual_seed(0)
    shapes = [(48, 40, 4, False), (48, 40, 4, False), (40, 48, 4, True), (48, 40, 4, False), (24, 40, 20, False)]
    ws, Bs, As, fifo, exact = [], [], [], [], []
    scalings = [2.0, 0.5, 1.0, 1.5, 1.0]
    for (m, n, r, f), s in zip(shapes, scalings):
        w = (torch.randn(m, n) * 0.03).bfloat16()
        B, A = torch.randn(n if f else m, r) * 1e-3, torch.randn(r, m if f else n) * 0.03
        ws.append(w), Bs.append(B), As.append(A), fifo.append(f)
        exact.append(w.float() + s * ((A.t() @ B.t()) if f else (B @ A)))
    draws = [rounding.merged_weights(ws, Bs, As, scalings, torch.bfloat16, seed, fifo) for seed in range(48)]
    for i, e in enumerate(exact):
        d = torch.stack([ds[i].float() for ds in draws])
        ulp = _ulp_bf16(e)
        assert d.shape[1:] == e.shape and ((d - e).abs() < ulp).all(), i
        z = (d.mean(0) - e) / (ulp / (2 * math.sqrt(48)))
        assert z.abs().max() < 6 and abs(z.mean().item()) < 0.25, (i, z.abs().max(), z.mean())
    # same inputs in layers 0 and 1 but for the scale: their noise must differ (one stream per layer)
    same = rounding.merged_weights([ws[0], ws[0]], [Bs[0], Bs[0]], [As[0], As[0]], [1.0, 1.0], torch.bfloat16, 5,
                                   [False, False])
    assert not torch.equal(same[0], same[1])
    zeros = rounding.merged_weights(ws[:2], [torch.zeros_like(b) for b in Bs[:2]], As[:2], scalings[:2],
                                    torch.bfloat16, 3, fifo[:2])
    assert all(torch.equal(z, w) for z, w in zip(zeros, ws[:2]))


def test_triton_kernel_rounds_like_the_torch_form():
    """The CUDA kernels, run by Triton's interpreter on the CPU: within one ulp of the exact sum, on
    a neighbour of it, unbiased over seeds, deterministic per seed, exact at B = 0; ranks below 16
    (masked padding), 16 and above 64 (several K blocks); the Conv1D layout; the grouped launch's
    per-layer scales, streams and output order."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", "import test_lora_merged_training as t; t._triton_kernel_checks()"],
                          env=env, cwd=here, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_eval_mode_takes_the_exact_fused_path():
    merged, _ = _model(merged=True)
    fused, _ = _model(merged=False)
    x = _x()
    assert torch.equal(merged.eval()(x), fused.eval()(x))


def test_fp16_activations_warn_and_take_the_fused_path(monkeypatch):
    monkeypatch.setattr(lora_mod, "_MERGED_DTYPE_WARNED", [])
    merged, layers = _model(merged=True, dtype=torch.float16)
    fused, _ = _model(merged=False, dtype=torch.float16)
    x = _x(torch.float16)
    with pytest.warns(UserWarning, match="bf16 or fp32 only"):
        out = merged.train()(x)
    assert torch.equal(out, fused.train()(x))
    assert all(layer._merged_cache is None for layer in layers.values())


def test_autocast_forms_w_merged_in_bf16_from_fp32_weights():
    model, layers = _model(merged=True)
    ref = plain_formula_copy(model)
    x = _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = model.train()(x), ref.train()(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), out_ref.float(), atol=0.05, rtol=0.05)


def test_siblings_run_merged_in_one_function_and_match_the_formula(monkeypatch):
    """q and k read the same tensor: once the plan is learned they run as one sibling set, with their
    W' (``merged`` in the function's meta), and still give the plain formula's outputs and gradients."""
    model, layers = _model(merged=True)
    ref = plain_formula_copy(model)
    model.train(), ref.train()
    model(_x()), model(_x())  # the first pass learns the plan, the second completes it
    metas = []
    real = lora_mod._FusedLoRASiblings.forward

    def spy(ctx, x, a_cat, meta, *tensors):  # type: ignore[no-untyped-def]
        metas.append(meta)
        return real(ctx, x, a_cat, meta, *tensors)

    monkeypatch.setattr(lora_mod._FusedLoRASiblings, "forward", staticmethod(spy))
    x = _x()
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = model(x), ref(x_ref)
    assert len(metas) == 1 and metas[0][-1] is True  # one set (q, k), merged
    _assert_same_outputs_and_grads(model, ref, x, x_ref, out, out_ref)
    model.eval()
    metas.clear()
    model(_x())
    assert len(metas) == 1 and metas[0][-1] is False  # eval: the exact fused sibling path


def _train_two_steps(model: nn.Module) -> torch.optim.Optimizer:
    """Two SGD steps in train mode (step 1 forms W' per layer, with no cache yet; step 2 finds them
    all stale); returns the optimizer."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(_x()).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _count_merges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the number of layers of every ``merged_weights`` call, appended to the list returned."""
    calls: list[int] = []
    real = lora_mod.merged_weights

    def spy(weights, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(weights))
        return real(weights, *args, **kwargs)

    monkeypatch.setattr(lora_mod, "merged_weights", spy)
    return calls


def test_after_a_step_every_stale_layer_is_merged_in_one_call(monkeypatch):
    """The first train-mode forward after an optimizer step forms every merged layer's new W' in one
    ``merged_weights`` call (grouped launches on CUDA), and each gets its own ``W + s·B A``."""
    gc.collect()  # earlier tests' models, kept by reference cycles, would join the refresh
    model, layers = _model(merged=True)
    _train_two_steps(model)
    calls = _count_merges(monkeypatch)
    model(_x())
    assert calls == [len(layers)]
    for name, layer in layers.items():
        expected = layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
        torch.testing.assert_close(layer._merged_cache[1], expected.detach(), atol=1e-6, rtol=1e-6, msg=name)
    model(_x())
    assert calls == [len(layers)]  # nothing stale: no merge


def test_another_model_s_optimizer_step_leaves_this_model_s_merged_weights(monkeypatch):
    """Two merged models trained in turn: after the other model's optimizer steps, this model's
    forward forms no W' and keeps its own (the very same tensors); over a step of each optimizer
    every layer's W' is formed once, each its own ``W + s·B A``."""
    gc.collect()  # earlier tests' models, kept by reference cycles, would join the refresh
    model_1, layers_1 = _model(merged=True)
    model_2, layers_2 = _model(merged=True, seed=1)
    opts = {}
    for model in (model_1, model_2):
        opts[id(model)] = _train_two_steps(model)
        model(_x())  # every W' current
    calls = _count_merges(monkeypatch)
    kept = {name: layer._merged_cache[1] for name, layer in layers_1.items()}
    model_2(_x()).square().sum().backward()
    opts[id(model_2)].step()
    opts[id(model_2)].zero_grad()
    model_1(_x())
    assert calls == []
    assert all(layers_1[n]._merged_cache[1] is kept[n] for n in kept)
    model_1(_x()).square().sum().backward()
    opts[id(model_1)].step()
    model_1(_x())
    # model 1's W' and model 2's, stale since model 2's step, in one call; then nothing is left
    assert calls == [len(layers_1) + len(layers_2)]
    model_2(_x())
    assert calls == [len(layers_1) + len(layers_2)]  # one W' per layer per step of its own optimizer
    for name, layer in [*layers_1.items(), *layers_2.items()]:
        expected = layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
        torch.testing.assert_close(layer._merged_cache[1], expected.detach(), atol=1e-6, rtol=1e-6, msg=name)


def test_a_new_scaling_forms_a_new_merged_weight():
    """``W' = W + s·B A`` holds s: a layer whose ``scaling`` is set between two forwards with no
    optimizer step in between (an annealed α, a gate) forms W' again with the new s, so its output
    is the plain formula's and not the kept W' of the old s."""
    model, layers = _model(merged=True)
    _train_two_steps(model)
    model(_x())  # every W' current and kept
    layer = layers["up"]
    layer.scaling *= 0.5
    expected = layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    ref = plain_formula_copy(model)
    out = model(_x())
    torch.testing.assert_close(layer._merged_cache[1], expected.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, ref.train()(_x()), atol=1e-5, rtol=1e-5)
