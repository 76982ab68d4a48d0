"""Bone / Bat specifics (METHODS.md §9 invariants 2-9) and equality with PEFT's MiSS, both ways."""

from __future__ import annotations

import json

import pytest
import peft
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.core.state import CONFIG_NAME, WEIGHTS_NAME
from lightning_lora.methods.bone import BoneLinear


def _layer(in_f=48, out_f=32, r=4, seed=0, conv1d=False, **kw) -> BoneLinear:
    torch.manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(out_f, in_f)
        nn.init.normal_(base.weight, std=0.2)
    else:
        base = nn.Linear(in_f, out_f)
    model = nn.Sequential(base)
    layer = ll.inject_adapter(model, "bone", dict(r=r, **kw), target_modules=["0"])["0"]
    with torch.no_grad():
        layer.bone_block.normal_(std=0.1)
    return layer  # type: ignore[return-value]


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("in_f", [48, 50], ids=["divisible", "padded"])
def test_bone_forward_equals_tiled_dense_update(in_f, conv1d):
    """Invariant 2: y == x (W + tile(bᵀ))ᵀ + bias, including n % r != 0 (wrap of bᵀ's columns)."""
    layer = _layer(in_f=in_f, conv1d=conv1d)
    b = layer.bone_block.detach()
    dw = torch.cat([b.t()] * (in_f // 4 + 1), dim=1)[:, :in_f]
    x = torch.randn(2, 3, in_f)
    w = layer.base_weight.detach()
    expected = x @ (w + dw).t() + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), dw)


@pytest.mark.parametrize("variant", ["bone", "bat"])
def test_merge_unmerge_round_trip(variant):
    """Invariants 3 and 5."""
    layer = _layer(variant=variant)
    x = torch.randn(5, 48)
    w0 = layer.base_weight.detach().clone()
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_weight, w0, atol=1e-6, rtol=0)


def test_bat_merged_weight_equals_explicit_block_loops():
    """Invariant 4: W'_ij = W_ij (I + b_i) + b_i, with loops over i and j."""
    r = 4
    layer = _layer(variant="bat", r=r)
    w = layer.base_weight.detach().clone()
    b = layer.bone_block.detach()
    expected = torch.empty_like(w)
    eye = torch.eye(r)
    for i in range(32 // r):
        for j in range(48 // r):
            wij = w[i * r:(i + 1) * r, j * r:(j + 1) * r]
            expected[i * r:(i + 1) * r, j * r:(j + 1) * r] = wij @ (eye + b[i]) + b[i]
    layer.merge()
    torch.testing.assert_close(layer.base_weight, expected, atol=1e-5, rtol=0)
    x = torch.randn(3, 48)
    layer.unmerge()
    torch.testing.assert_close(layer(x), x @ expected.t() + layer.base_layer.bias, atol=1e-5, rtol=0)


def test_bat_unmerge_of_singular_block_raises():
    layer = _layer(variant="bat")
    layer.merge()
    with torch.no_grad():
        layer.bone_block[1] = -torch.eye(4)  # I + b_1 = 0
    with pytest.raises(RuntimeError, match="singular"):
        layer.unmerge()


def test_divisibility_constraints():
    """Invariant 6: Bat raises on n % r or m % r; Bone accepts non-divisible n but not r > n."""
    with pytest.raises(ValueError, match=r"m % r == n % r == 0.*0: out_features m=32, in_features n=50"):
        _layer(in_f=50, variant="bat")
    with pytest.raises(ValueError, match="m % r == n % r == 0"):
        _layer(out_f=30, variant="bat")
    with pytest.raises(ValueError, match="r <= in_features"):
        _layer(in_f=3, r=4)
    _layer(in_f=50, out_f=30)  # Bone: fine
    model = nn.Sequential(nn.Linear(48, 32), nn.Linear(32, 30))
    with pytest.raises(ValueError):  # a failing layer leaves the model untouched
        ll.inject_adapter(model, "bat", dict(r=4), target_modules=["0", "1"])
    assert ll.get_adapter_method(model) is None and isinstance(model[0], nn.Linear)


def test_bat_method_and_bone_variant_are_the_same_layer():
    a = nn.Sequential(nn.Linear(48, 32))
    ll.inject_adapter(a, "bat", dict(r=4), target_modules=["0"])
    assert a[0].variant == "bat" and a[0].bone_block.shape == (8, 4, 4)
    with pytest.raises(ValueError, match="use method 'bone'"):
        ll.make_config("bat", variant="bone")


@pytest.mark.parametrize("variant", ["bone", "bat"])
def test_weight_guide_gradient_at_zero(variant):
    """Invariant 8 (G = ∂L/∂W'): Bat ∂L/∂b_i = Σ_j (W_ijᵀ G_ij + G_ij) depends on W;
    Bone ∂L/∂b = Σ_j (G_{:, block j})ᵀ does not."""
    r = 4
    torch.manual_seed(0)
    layer = ll.inject_adapter(nn.Sequential(nn.Linear(48, 32)), "bone", dict(r=r, variant=variant),
                              target_modules=["0"])["0"]
    x = torch.randn(6, 48)
    probe = torch.randn(6, 32)
    (layer(x) * probe).sum().backward()
    g = probe.t() @ x  # ∂L/∂W', (32, 48)
    w = layer.base_weight.detach()
    if variant == "bone":
        expected = sum(g[:, j * r:(j + 1) * r].t() for j in range(48 // r))
    else:
        expected = torch.stack([
            sum(w[i * r:(i + 1) * r, j * r:(j + 1) * r].t() @ g[i * r:(i + 1) * r, j * r:(j + 1) * r]
                + g[i * r:(i + 1) * r, j * r:(j + 1) * r] for j in range(48 // r))
            for i in range(32 // r)
        ])
    torch.testing.assert_close(layer.bone_block.grad, expected, atol=1e-5, rtol=1e-5)


def test_scaling_request_warns_and_keeps_one():
    """Invariant 9."""
    with pytest.warns(UserWarning, match="scaling is not supported"):
        cfg = ll.make_config("bone", r=4, scaling=2.0)
    assert cfg.scaling == 1.0


# ---- PEFT MiSS ------------------------------------------------------------------------------
peft_variants = pytest.mark.parametrize("variant,r", [("bone", 4), ("bone", 5), ("bat", 4)])


def _x():
    return {"input_ids": torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))}


@peft_variants
def test_our_bone_equals_peft_miss_and_loads_in_peft(model_builders, variant, r, tmp_path):
    targets = ["query", "value", "intermediate.dense"]
    ours = model_builders["bert"](0)
    ll.inject_adapter(ours, "bone", dict(r=r, variant=variant), target_modules=targets)
    with torch.no_grad():
        for p in ll.trainable_parameters(ours):
            p.normal_(std=0.05)
    ll.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "MISS" and cfg["init_weights"] == ("bat" if variant == "bat" else True)
    theirs = peft.PeftModel.from_pretrained(model_builders["bert"](0), str(tmp_path / "a")).eval()
    assert sum(1 for n, _ in theirs.named_modules() if n.endswith("miss_block")) == len(ll.adapter_layers(ours))
    with torch.no_grad():
        y = ours(**_x()).last_hidden_state
        assert (y - model_builders["bert"](0)(**_x()).last_hidden_state).abs().max() > 1e-3
        torch.testing.assert_close(theirs(**_x()).last_hidden_state, y, atol=1e-5, rtol=0)


@peft_variants
def test_peft_miss_directory_loads_here(model_builders, variant, r, tmp_path):
    cfg = peft.MissConfig(r=r, target_modules=["query", "value"], init_weights="bat" if variant == "bat" else True)
    theirs = peft.get_peft_model(model_builders["bert"](0), cfg).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "miss_block" in n:
                p.normal_(std=0.05)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = ll.load_adapter(model_builders["bert"](0), tmp_path / "p").eval()
    method = ll.get_adapter_method(ours)
    assert method.config.method == "bone" and method.config.variant == variant
    with torch.no_grad():
        torch.testing.assert_close(ours(**_x()).last_hidden_state, theirs(**_x()).last_hidden_state, atol=1e-5, rtol=0)
    assert (tmp_path / "p" / WEIGHTS_NAME).is_file()


@pytest.mark.parametrize("init_weights,dropout,variant", [(False, 0.0, "bone"), ("bat", 0.1, "bat"), (True, 0.1, "bone")],
                         ids=["random_init", "bat_with_dropout", "bone_with_dropout"])
def test_peft_miss_options_peft_accepts_load_here(model_builders, init_weights, dropout, variant, tmp_path):
    """PEFT's init_weights=False (random init of the default block) is the Bone layer with other
    starting values, and PEFT's bat forward ignores miss_dropout: both directories must load."""
    cfg = peft.MissConfig(r=4, target_modules=["query", "value"], init_weights=init_weights, miss_dropout=dropout)
    theirs = peft.get_peft_model(model_builders["bert"](0), cfg).eval()
    if init_weights is not False:
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "miss_block" in n:
                    p.normal_(std=0.05)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = ll.load_adapter(model_builders["bert"](0), tmp_path / "p").eval()
    c = ll.get_adapter_method(ours).config
    assert c.variant == variant and c.dropout == (0.0 if variant == "bat" else dropout)
    with torch.no_grad():
        y = ours(**_x()).last_hidden_state
        assert (y - model_builders["bert"](0)(**_x()).last_hidden_state).abs().max() > 1e-3
        torch.testing.assert_close(y, theirs(**_x()).last_hidden_state, atol=1e-5, rtol=0)
