"""LoRA / rsLoRA / DoRA specifics (METHODS.md §1 invariants 1-5), the fused autograd path, and the
worked parameter counts of METHODS.md on meta-device LLaMA models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.lora import LoRALinear


def _layer(in_f=48, out_f=32, base_bias=True, conv1d=False, seed=0, **kw) -> LoRALinear:
    torch.manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(out_f, in_f)  # weight (in, out)
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.1)
    else:
        base = nn.Linear(in_f, out_f, bias=base_bias)
    model = nn.Sequential(base)
    layers = ll.inject_adapter(model, "lora", dict(kw), target_modules=["0"])
    layer = layers["0"]
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    return layer


def _w(layer: LoRALinear) -> torch.Tensor:
    """Base weight in (out, in) layout, copied."""
    return layer.base_weight.detach().clone()


# ---- invariant 1: effective delta from the merged weight -----------------------------------------
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_effective_delta_read_from_merged_weight(conv1d, rslora):
    r, alpha = 4, 12.0
    layer = _layer(r=r, alpha=alpha, use_rslora=rslora, conv1d=conv1d)
    w0 = _w(layer)
    stored0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    delta = _w(layer) - w0
    s = alpha / math.sqrt(r) if rslora else alpha / r
    expected = s * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    # the stored tensor keeps its own layout (Conv1D: (in, out))
    assert layer.base_layer.weight.shape == stored0.shape
    if conv1d:
        torch.testing.assert_close(layer.base_layer.weight - stored0, expected.t(), atol=1e-6, rtol=1e-5)


def test_merged_conv1d_layer_matches_unmerged_output():
    layer = _layer(r=4, alpha=8, conv1d=True).eval()
    x = torch.randn(5, 48)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


# ---- invariant 2: dropout only in train mode, only on the adapter path ----------------------------
def test_dropout_only_in_train_mode_and_only_on_adapter_path():
    layer = _layer(r=4, alpha=8, dropout=0.5)
    x = torch.randn(64, 48)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
        assert torch.equal(layer(x), y_eval)  # deterministic
        expected = layer.base_layer(x) + layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t()
        torch.testing.assert_close(y_eval, expected, atol=1e-5, rtol=1e-5)
        layer.train()
        y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2), "dropout inactive in train mode"
    assert not torch.allclose(y1, y_eval)
    # base path is never dropped: with B = 0 the train-mode output is exactly the base output
    with torch.no_grad():
        layer.lora_B.zero_()
        torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


def test_injecting_into_eval_model_keeps_eval_mode():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    layers = ll.inject_adapter(model, "lora", r=2, dropout=0.5, target_modules=["0", "1"])
    assert not any(layer.training for layer in layers.values())
    model.train()
    assert all(layer.training for layer in layers.values())


# ---- invariant 3/4: DoRA ----------------------------------------------------------------------
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_dora_rows_have_norm_m_and_equal_w0_at_init(conv1d):
    torch.manual_seed(0)
    layer = _layer(r=4, alpha=8, use_dora=True, conv1d=conv1d)
    w0 = _w(layer)
    with torch.no_grad():
        layer.lora_B.zero_()
    torch.testing.assert_close(layer.lora_magnitude.detach(), w0.norm(dim=1), atol=0, rtol=0)
    torch.testing.assert_close(w0 + layer.delta_weight(), w0, atol=1e-6, rtol=1e-6)
    # after training-like changes: every row of W' has norm m_j
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
        layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
    w_eff = w0 + layer.delta_weight()
    torch.testing.assert_close(w_eff.norm(dim=1), layer.lora_magnitude.detach(), atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(_w(layer).norm(dim=1), layer.lora_magnitude.detach(), atol=1e-5, rtol=1e-5)


def _dora_manual(layer: LoRALinear, x: torch.Tensor, detach: bool) -> torch.Tensor:
    w0 = layer.base_weight
    w = w0 + layer.scaling * layer.lora_B @ layer.lora_A
    norm = w.norm(dim=1)
    if detach:
        norm = norm.detach()
    return x @ (layer.lora_magnitude.unsqueeze(1) * w / norm.unsqueeze(1)).t() + layer.base_layer.bias


@pytest.mark.parametrize("detach", [True, False])
def test_dora_gradient_matches_explicit_reference(detach):
    layer = _layer(r=4, alpha=8, use_dora=True, dora_detach_norm=detach)
    x = torch.randn(16, 48)
    g_out = torch.randn(16, 32)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude]
    grads = torch.autograd.grad((layer(x) * g_out).sum(), params)
    ref = torch.autograd.grad((_dora_manual(layer, x, detach) * g_out).sum(), params)
    other = torch.autograd.grad((_dora_manual(layer, x, not detach) * g_out).sum(), params)
    for g, gr, go in zip(grads, ref, other):
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-4)
    # the flag matters: detached and full gradients differ for A and B
    assert not torch.allclose(grads[0], other[0], atol=1e-5, rtol=1e-4)


# ---- fused autograd path == reference_forward ------------------------------------------------
def _fused_vs_reference(layer: LoRALinear, x: torch.Tensor, autocast: bool):
    params = [layer.lora_A, layer.lora_B, layer.base_layer.bias]
    results = []
    for fn in (layer.forward, layer.reference_forward):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(99)  # same dropout mask on both paths
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(xi)
        g_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
        grads = torch.autograd.grad((y * g_out).float().sum(), [xi, *params])
        results.append((y, grads))
    return results


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "dropout"])
def test_fused_path_equals_reference_fp32(conv1d, dropout):
    layer = _layer(r=4, alpha=8, bias="lora_only", dropout=dropout, conv1d=conv1d).train()
    assert layer.fused and layer.base_layer.bias.requires_grad
    x = torch.randn(2, 7, 48)
    (y, g), (y_ref, g_ref) = _fused_vs_reference(layer, x, autocast=False)
    assert y.shape == (2, 7, 32) and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["x", "A", "B", "bias"], g, g_ref):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")
    assert g[1].abs().sum() > 0 and g[2].abs().sum() > 0


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_fused_path_equals_reference_under_bf16_autocast(conv1d):
    layer = _layer(r=4, alpha=8, bias="lora_only", conv1d=conv1d).train()
    x = torch.randn(2, 7, 48)
    (y, g), (y_ref, g_ref) = _fused_vs_reference(layer, x, autocast=True)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(y, y_ref) < 1e-2
    for name, a, b in zip(["x", "A", "B", "bias"], g, g_ref):
        assert a.dtype == b.dtype, name  # adapter grads stay in the parameter dtype (fp32)
        assert rel(a, b) < 2e-2, f"grad {name}: rel err {rel(a, b):.3g}"
    assert g[1].dtype == torch.float32 and g[2].dtype == torch.float32


def test_fused_path_is_taken_and_unfused_flag_respected(monkeypatch):
    calls = []
    layer = _layer(r=2, alpha=2)
    orig = LoRALinear.reference_forward
    monkeypatch.setattr(LoRALinear, "reference_forward", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    layer(torch.randn(3, 48))
    assert calls == []
    layer.fused = False
    layer(torch.randn(3, 48))
    assert calls == [1]


# ---- fp32 merges and norms under autocast (METHODS.md S5) ------------------------------------
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_delta_and_merge_are_fp32_under_autocast(dora):
    layer = _layer(r=4, alpha=8, use_dora=dora)
    w0 = _w(layer)
    dw = layer.delta_weight()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dw_ac = layer.delta_weight()
        layer.merge()
    assert dw_ac.dtype == torch.float32
    torch.testing.assert_close(dw_ac, dw, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_w(layer), w0 + dw, atol=1e-6, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.unmerge()
    torch.testing.assert_close(_w(layer), w0, atol=1e-6, rtol=0)


# ---- METHODS.md worked parameter counts, on meta-device models (nothing allocated) --------------
def _meta_llama(hidden, ffn, layers, heads, kv_heads):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
    )
    with torch.device("meta"):
        return LlamaModel(cfg)


@pytest.mark.parametrize(
    "name,hidden,ffn,kv_heads,targets,r,expected",
    [
        ("llama2-7b", 4096, 11008, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
         128, 319_815_680),
        ("llama3-8b", 4096, 14336, 8, ["q_proj", "v_proj"], 8, 3_407_872),
    ],
)
def test_worked_parameter_counts_on_meta_models(name, hidden, ffn, kv_heads, targets, r, expected):
    model = _meta_llama(hidden, ffn, 32, 32, kv_heads)
    layers = ll.inject_adapter(model, "lora", r=r, alpha=2 * r, target_modules=targets)
    assert len(layers) == 32 * len(targets)
    trainable = ll.trainable_parameters(model)
    assert all(p.device.type == "meta" for p in trainable)
    assert sum(p.numel() for p in trainable) == expected
    if name == "llama3-8b":
        per_layer = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith("layers.0."))
        assert per_layer == 106_496
    # DoRA adds m per adapted matrix
    extra = sum(layer.out_features for layer in layers.values())
    dora = _meta_llama(hidden, ffn, 32, 32, kv_heads)
    ll.inject_adapter(dora, "lora", r=r, use_dora=True, target_modules=targets)
    assert sum(p.numel() for p in ll.trainable_parameters(dora)) == expected + extra


def test_model_built_under_inference_mode_runs():
    """Parameters created under inference_mode have no version counter (the fused path's cast cache
    keys on it); such a model must still run, e.g. in a prediction script."""
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(8, 6))
        ll.inject_adapter(model, "lora", r=2, target_modules=["0"])
        torch.nn.init.normal_(model[0].lora_B)
        x = torch.randn(3, 8)
        y = model(x)
        torch.testing.assert_close(y, model[0].reference_forward(x), atol=1e-6, rtol=1e-6)
        torch.nn.init.normal_(model[0].lora_B)  # changed weights must be seen (no stale cache)
        torch.testing.assert_close(model(x), model[0].reference_forward(x), atol=1e-6, rtol=1e-6)


def test_cast_cache_follows_parameter_updates():
    """The fused path caches casts of A, B; an optimizer step or load must invalidate it."""
    layer = _layer(r=2, alpha=4)
    x = torch.randn(4, 48)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.5)
    for _ in range(2):
        for ac in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
                y, y_ref = layer(x), layer.reference_forward(x)
            tol = 2e-2 if ac else 1e-5
            torch.testing.assert_close(y.float(), y_ref.float(), atol=tol * y_ref.abs().max().item(), rtol=0)
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    torch.testing.assert_close(layer(x), layer.reference_forward(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_base", "autocast"])
def test_cast_cache_follows_fused_adamw(autocast):
    """Fused AdamW (``_fused_adamw_``) updates parameters without bumping their version counter; the
    fused path's casts of fp32 A and B must still follow every step (they went stale before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    if not autocast:
        model.to(torch.bfloat16)
    layer = ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["0"])["0"]
    assert layer.lora_A.dtype == torch.float32
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=0.1, fused=True)
    x = torch.randn(8, 16, dtype=torch.float32 if autocast else torch.bfloat16)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x).float().pow(2).sum().backward()
        version = layer.lora_A._version
        opt.step()
        opt.zero_grad()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, y_ref = model(x).float(), layer.reference_forward(x).float()
        assert (y - y_ref).norm() < 1e-2 * y_ref.norm()
    assert layer.lora_A._version == version  # what made this test necessary: no version bump


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_options_train_and_round_trip(bias, tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8))

    model = build()
    ll.inject_adapter(model, "lora", r=2, target_modules=["0"], bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"0.lora_A", "0.lora_B", "0.base_layer.bias"}
    if bias == "all":
        expected |= {"2.bias", "3.bias"}
    assert trainable == expected
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    x = torch.randn(4, 8)
    y = model(x)
    ll.save_adapter(model, tmp_path / "a")
    fresh = ll.load_adapter(build(), tmp_path / "a")
    assert torch.equal(fresh(x), y)


# ---- the fused path's cost against PEFT's LoRA Linear (issue #2: lora_vs_peft.py) -----------------
_VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "expand", "detach", "alias", "as_strided", "reshape",
             "empty", "empty_strided", "empty_like", "new_empty", "unsqueeze", "squeeze", "slice", "select", "permute"}


def _kernel_ops(model: nn.Module | None, x: torch.Tensor | None, g: torch.Tensor | None, params: list[torch.Tensor],
                call=None):
    """aten ops that launch a kernel in one forward + backward (forward only when ``g`` is None) that
    follows a parameter update; with ``call``, the ops of ``call()`` instead."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name.rstrip("_") not in _VIEW_OPS:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        for p in params:
            p.add_(1e-3)  # as an optimizer step: the cast cache must be refreshed
    counter = Count()
    with counter:
        if call is not None:
            call()
            return counter.ops
        y = model(x)
        if g is not None:
            y.backward(g)
    return counter.ops


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_fused_kernel_count_per_linear(adapter_dtype):
    """One adapted Linear, bf16 activations, rank 16, s = 2 (the lora_vs_peft LLaMA settings), on the
    meta device (it has ``mm(out_dtype=)`` like CUDA): the 8 GEMMs of LoRA and, with fp32 parameters,
    one multi-tensor cast of A and B; no kernel scales, adds or copies activations (PEFT's LoRA
    Linear: 8 GEMMs, 2 muls, 2 adds)."""
    model = nn.Sequential(nn.Linear(64, 96, bias=False, device="meta", dtype=torch.bfloat16))
    ll.inject_adapter(model, "lora", r=16, alpha=32, target_modules=["0"], adapter_dtype=adapter_dtype)
    x = torch.empty(40, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    g = torch.empty(40, 96, device="meta", dtype=torch.bfloat16)
    ops = _kernel_ops(model, x, g, ll.trainable_parameters(model))
    gemms = sum(n for k, n in ops.items() if k in ("mm", "addmm", "addmm_"))
    assert gemms == 8, ops
    casts = ops.get("_to_copy", 0) + ops.get("copy_", 0) + ops.get("_foreach_copy_", 0)
    assert casts == (1 if adapter_dtype == "float32" else 0), ops
    assert sum(ops.values()) == gemms + casts, ops


def test_stale_casts_of_all_layers_refresh_in_one_copy():
    """An optimizer step casts every layer's fp32 A and B in one multi-tensor copy, in the step's
    post-hook (so the next forward launches no cast at all); the model still equals the plain
    formula, layer by layer, step after step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).to(torch.bfloat16)
    layers = ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=["0", "2"])
    params = ll.trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=0.5)
    x = torch.randn(5, 16, dtype=torch.bfloat16)

    def reference(inp):
        return layers["2"].reference_forward(model[1](layers["0"].reference_forward(inp)))

    for step in range(3):
        ops = _kernel_ops(model, x, None, [])  # forward only: on the CPU, backward casts bf16 grads
        # first run: each layer casts its own (2); after a step the step hook already did (0)
        assert ops.get("_to_copy", 0) == 0 and ops.get("_foreach_copy_", 0) == (0 if step else 2), (step, ops)
        with torch.no_grad():  # bf16 rounding differs; a stale cast would differ by the whole update
            y, y_ref = model(x).float(), reference(x).float()
            assert (y - y_ref).norm() < 1e-2 * y_ref.norm(), step
            if step:
                assert (y - y_prev).norm() > 0.1 * y_ref.norm(), step  # the updates are not small
            y_prev = y
        opt.zero_grad()
        model(x).float().pow(2).sum().backward()
        step_ops = _kernel_ops(None, None, None, [], call=opt.step)
        assert step_ops.get("_foreach_copy_", 0) == 1 and step_ops.get("_to_copy", 0) == 0, step_ops
        # B starts at 0, so A gets no gradient in the first step
        trained = [layer.lora_B for layer in layers.values()] if step == 0 else params
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the non-parameter storages saved for backward in one forward (deduplicated by storage,
    as the allocator holds them), plus the output."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    return sum(saved.values()), y


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_fused_path_holds_no_more_than_peft(adapter_dtype):
    """Saved-for-backward activations plus our cached casts of one bf16 LoRA Linear do not exceed what
    PEFT's LoRA Linear saves (bf16 adapters), and with bf16 parameters we hold no copy of A or B."""
    peft = pytest.importorskip("peft")

    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 96, bias=False)).to(torch.bfloat16)

    x = torch.randn(40, 64, dtype=torch.bfloat16).requires_grad_(True)
    ours = base()
    ll.inject_adapter(ours, "lora", r=16, alpha=32, target_modules=["0"], adapter_dtype=adapter_dtype)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(r=16, lora_alpha=32, target_modules=["0"]),
                                 autocast_adapter_dtype=False)
    ours_saved, y = _saved_activation_bytes(ours, x)
    peft_saved, y_peft = _saved_activation_bytes(theirs, x)
    layer = ours[0]
    param_ptrs = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    cast_bytes = sum(t.untyped_storage().nbytes() for t in layer._casts
                     if t.untyped_storage().data_ptr() not in param_ptrs)
    assert ours_saved <= peft_saved, (ours_saved, peft_saved)
    if adapter_dtype == "bfloat16":
        assert cast_bytes == 0
        assert ours_saved + cast_bytes <= peft_saved
    else:  # the bf16 copies of fp32 A and B, nothing else
        assert cast_bytes == (layer.lora_A.numel() + layer.lora_B.numel()) * 2
    y.float().sum().backward()
    y_peft.float().sum().backward()  # both graphs run on what they saved


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_fused_path_equals_reference_with_non_power_of_two_scale(adapter_dtype):
    """The scale rides in the GEMM alpha (forward s·x A^T, backward s·g B): checked with rsLoRA's
    s = alpha / sqrt(r) = 5/sqrt(3), not a power of two, in fp32 and with bf16 parameters."""
    dtype = getattr(torch, adapter_dtype)
    layer = _layer(r=3, alpha=5, use_rslora=True, bias="lora_only", adapter_dtype=adapter_dtype)
    layer.to(dtype)
    assert layer.scaling == pytest.approx(5 / math.sqrt(3))
    x = torch.randn(2, 7, 48, dtype=dtype)
    (y, g), (y_ref, g_ref) = _fused_vs_reference(layer, x, autocast=False)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(y, y_ref) < tol
    for name, a, b in zip(["x", "A", "B", "bias"], g, g_ref):
        assert a.dtype == b.dtype, name
        assert rel(a, b) < tol, f"grad {name}: rel err {rel(a, b):.3g}"
