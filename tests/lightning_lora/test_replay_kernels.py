"""``lightning_lora.core.replay_kernels``: A's gradient with the replayed input computed tile by tile.

The kernel runs on CUDA; here Triton's interpreter runs it on the CPU (in a subprocess: Triton reads
``TRITON_INTERPRET`` when it is imported). Checked: ``g^T act(h)`` and ``g^T (act(a) * b)`` for GELU
(erf and tanh forms) and SiLU, either factor order, ranks below and above 16, row counts that leave a
partial block and several programs' partial sums, a transposed ``g``; and LoRA's fused paths (one
layer, a sibling set, merged training) give the same A gradients with the kernel as with the replay in
torch ops. Outside CUDA (or switched off) the kernel is never asked.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

import lightning_lora as ll
from lightning_lora.core import replay_kernels
from lightning_lora.methods import lora as lora_mod


def _recipe_of(x: torch.Tensor) -> tuple:
    recipe = lora_mod._input_recipe(x, casts=False)
    assert recipe is not None
    return recipe


def _kernel_checks() -> None:
    """Run with ``TRITON_INTERPRET=1``."""
    import triton  # a test dependency

    assert triton.__version__
    torch.manual_seed(0)
    cases = [
        ("gelu", lambda a, b: F.gelu(a), 4, 700, 72),
        ("gelu_tanh", lambda a, b: F.gelu(a, approximate="tanh"), 20, 300, 64),
        ("silu_mul", lambda a, b: F.silu(a) * b, 16, 1100, 40),
        ("mul_silu", lambda a, b: b * F.silu(a), 8, 33, 130),
        ("saved_product", lambda a, b: F.silu(a) * b, 16, 257, 64),  # silu(a) kept by the product node
    ]
    for name, make, r, N, n in cases:
        a = torch.randn(N, n, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(N, n, dtype=torch.bfloat16, requires_grad=name != "silu_mul" and name != "mul_silu")
        # b without grad: the product node needs only b saved, so act(a) is replayed from a; with grad
        # (the saved_product case, as in an MLP whose up projection trains) it saves both factors
        x = make(a * 1.0, b * 1.0)
        recipe = _recipe_of(x)
        kinds = {"gelu": "act", "gelu_tanh": "act", "silu_mul": "mul", "mul_silu": "mul", "saved_product": "mul"}
        assert recipe[0] == kinds[name], (name, recipe[0])
        g = torch.randn(r, N, dtype=torch.bfloat16).t()  # (N, r), transposed strides
        got = replay_kernels.act_grad_a(g, recipe, x.shape, torch.float32, interpret=True)
        ref = g.float().t() @ x.detach().float()
        err = (got - ref).abs().max().item()
        # the kernel's x must be the forward's x: an x off by one bf16 ulp in many entries would show
        assert got.shape == (r, n) and err <= 1e-4 * ref.abs().max().item(), (name, err)
    # fp32 factors: not a bf16 forward's roundings, so the caller's torch replay (None)
    a = torch.randn(40, 16, requires_grad=True)
    x = F.gelu(a * 1.0)
    assert replay_kernels.act_grad_a(torch.randn(40, 4), _recipe_of(x), x.shape, torch.float32, interpret=True) is None


def test_kernel_under_the_interpreter():
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    code = ("import test_replay_kernels as t; t._kernel_checks(); t._lora_paths_match_with_the_kernel()")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=here, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


class _Block(nn.Module):
    """q/k (siblings on one input), a GELU MLP down projection and a gated (SiLU * up) one."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gate, self.up2 = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down2 = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(x) * self.k(x)
        h = self.down(F.gelu(self.up(h)))
        # the siblings gate/up2 read h; down2 reads silu(gate) * up2: a "mul" recipe
        return self.down2(F.silu(self.gate(h)) * self.up2(h))


def _lora_paths_match_with_the_kernel() -> None:
    """Run with ``TRITON_INTERPRET=1``: every A gradient equal with and without the kernel."""
    for merged in (False, True):
        torch.manual_seed(0)
        model = _Block().to(torch.bfloat16)
        ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["q", "k", "up", "down", "gate", "up2", "down2"],
                          merged_training=merged)
        with torch.no_grad():
            for layer in ll.adapter_layers(model).values():
                layer.lora_B.normal_(0, 0.1)
        x = torch.randn(3, 50, 32, dtype=torch.bfloat16)
        model.train()
        model(x), model(x)  # the sibling plan
        grads = []
        asked: list[int] = []
        real, real_supported = replay_kernels.act_grad_a, replay_kernels.supported
        try:
            for on in (False, True):
                if on:  # the CUDA dispatch, on the CPU under the interpreter
                    replay_kernels.supported = lambda recipe, g: replay_kernels._parts(recipe) is not None  # type: ignore[assignment]

                    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
                        asked.append(1)
                        return functools.partial(real, interpret=True)(*args, **kwargs)

                    replay_kernels.act_grad_a = spy  # type: ignore[assignment]
                model.zero_grad()
                model(x).float().square().sum().backward()
                grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_A" in n})
        finally:
            replay_kernels.act_grad_a, replay_kernels.supported = real, real_supported  # type: ignore[assignment]
        assert len(asked) >= 2, asked  # down (GELU) and down2 (SiLU * up) took the kernel
        # the wiring (recipe, strides, shapes, the sibling set's transposed rows): a wrong one is off by
        # O(1); the kernel's precision is _kernel_checks' (CPU bf16 GEMMs, the torch side here, are
        # themselves off by ~0.3 % of the largest entry)
        for name, g0 in grads[0].items():
            torch.testing.assert_close(grads[1][name], g0, atol=2e-2 * g0.abs().max().item(), rtol=0, msg=name)


def test_not_asked_outside_cuda_or_when_off():
    a = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    x = F.gelu(a * 1.0)
    recipe = _recipe_of(x)
    g = torch.randn(8, 4, dtype=torch.bfloat16)
    was = replay_kernels.enabled()
    try:
        replay_kernels.set_enabled(True)
        assert not replay_kernels.supported(recipe, g)  # a CPU tensor
        replay_kernels.set_enabled(False)
        assert not replay_kernels.supported(recipe, g.to("meta"))
    finally:
        replay_kernels.set_enabled(was)
    # what it takes: act(saved), act(saved) * saved in either order, saved * saved; nothing else
    saved = ("saved", None, "x")
    assert replay_kernels._parts(recipe) is not None
    assert replay_kernels._parts(("mul", saved, saved)) is not None
    assert replay_kernels._parts(("mul", ("mul", saved, saved), saved)) is None
    assert replay_kernels._parts(("to", recipe, torch.float32, "cpu")) is None
