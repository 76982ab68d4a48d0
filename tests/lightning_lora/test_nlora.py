"""SLoRA / NLoRA / IntTune specifics (METHODS.md §14 invariants 1-5): Nyström exactness, the
official-code `reference` slices, the stored residual, IntTune's trainable set, counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.nlora import nystrom_factors


def _model(method: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 48))
    layers = ll.inject_adapter(model, method, dict(r=4, **kw), target_modules=["0", "2"])
    return model, layers


def test_nystrom_is_exact_on_a_rank_r_matrix():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(40, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 30, generator=g, dtype=torch.float64)
    A, N, B = nystrom_factors(w0, 4, torch.Generator().manual_seed(1))
    assert A.shape == (4, 30) and N.shape == (4, 4) and B.shape == (40, 4)
    torch.testing.assert_close(B @ N @ A, w0, atol=1e-10, rtol=0)
    # on a full-rank matrix it is an approximation, not the identity
    w_full = torch.randn(40, 30, generator=g, dtype=torch.float64)
    A, N, B = nystrom_factors(w_full, 4, torch.Generator().manual_seed(1))
    assert (B @ N @ A - w_full).norm() > 1e-3


def test_nlora_nystrom_layer_uses_sampled_rows_and_columns_and_keeps_the_base():
    model, layers = _model("nlora")
    layer = layers["0"]
    w0 = layer.base_weight.detach()
    # B's columns are columns of W0 and A's rows are rows of W0 (C and R_w), N = U⁺
    cols = [int(torch.where((w0 == layer.lora_B[:, k : k + 1]).all(0))[0][0]) for k in range(4)]
    rows = [int(torch.where((w0 == layer.lora_A[k : k + 1]).all(1))[0][0]) for k in range(4)]
    U = w0.double()[rows][:, cols]
    torch.testing.assert_close(layer.lora_core.double(), torch.linalg.pinv(U), atol=1e-5, rtol=1e-5)
    assert cols != list(range(4)) or rows != list(range(4))  # random, not the code's first r
    x = torch.randn(3, 48)
    with torch.no_grad():
        y = model(x)
        with ll.disable_adapter(model):
            assert torch.equal(model(x), y)  # residual: bit-exact base output at init
    # another index seed (same weights) draws other rows and columns
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 48))
    assert torch.equal(other[0].weight, w0)
    other_layer = ll.inject_adapter(other, "nlora", dict(r=4, seed=1), target_modules=["0"])["0"]
    assert not torch.equal(other_layer.lora_A, layer.lora_A)


def test_reference_mode_slices_the_first_r_rows_and_columns():
    model, layers = _model("nlora", init="reference")
    for layer in layers.values():
        w0 = layer.base_weight.detach()
        assert torch.equal(layer.lora_A, w0[:4, :]) and torch.equal(layer.lora_B, w0[:, :4])
        assert torch.equal(layer.lora_core, w0[:4, :4])  # no pseudo-inverse
        assert not layer.residual and not layer.offset_names
        torch.testing.assert_close(layer.delta_weight(), w0[:, :4] @ w0[:4, :4] @ w0[:4, :], atol=1e-7, rtol=0)


def test_residual_merge_is_w0_plus_difference_and_offsets_are_saved(tmp_path):
    model, layers = _model("nlora", alpha=8)
    with torch.no_grad():
        for p in ll.trainable_parameters(model):
            p.mul_(1.1)
    layer = layers["0"]
    s = layer.scaling
    expected = s * (layer.lora_B @ layer.lora_core @ layer.lora_A - layer.lora_B0 @ layer.lora_core0 @ layer.lora_A0)
    torch.testing.assert_close(layer.delta_weight(), expected.detach(), atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 48)
    ll.save_adapter(model, tmp_path / "n")
    fresh = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 48))
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "base_layer" in k})
    ll.load_adapter(fresh, tmp_path / "n")
    assert torch.equal(fresh[0].lora_core0, layer.lora_core0)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_slora_starts_at_zero_update_and_trains_all_three():
    model, layers = _model("slora")
    for layer in layers.values():
        assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
        assert layer.lora_A.abs().sum() > 0 and layer.lora_core.abs().sum() > 0
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_core", "lora_B"}
    with pytest.raises(ValueError, match="residual"):
        _model("slora", residual=True)
    with pytest.raises(ValueError, match="init"):
        _model("inttune", init="slora")


def test_inttune_only_n_trains():
    model, layers = _model("inttune")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_core", "2.lora_core"]
    layer = layers["0"]
    assert layer.offset_names == ("lora_core0",)  # A, B frozen: only N0 is stored for the residual
    nn.functional.mse_loss(model(torch.randn(4, 48)), torch.randn(4, 48)).backward()
    assert layer.lora_core.grad is not None and layer.lora_core.grad.abs().sum() > 0
    assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad
    # reference mode IntTune: the code's init, not base-preserving
    _, ref_layers = _model("inttune", init="reference")
    w0 = ref_layers["0"].base_weight.detach()
    assert torch.equal(ref_layers["0"].lora_core, w0[:4, :4])


def test_llama2_7b_counts_on_meta():
    """METHODS S6 worked counts: IntTune r = 128 on 7 projections → 3,670,016; NLoRA = LoRA + that."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    counts = {}
    for method in ("inttune", "nlora"):
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        ll.inject_adapter(model, method, dict(r=128), target_modules=targets)
        counts[method] = sum(p.numel() for p in ll.trainable_parameters(model))
    assert counts["inttune"] == 3_670_016
    assert counts["nlora"] == 319_815_680 + 3_670_016


@pytest.mark.parametrize("method", ["slora", "nlora", "inttune"])
@pytest.mark.parametrize("bad", [dict(pinv_dtype="fp64"), dict(pinv_dtype="float16"), dict(adapter_dtype="bf16"),
                                 dict(adapter_dtype="int32")])
def test_bad_dtype_names_fail_in_the_config_with_a_clear_error(method, bad):
    """A typo'd dtype used to pass the config and fail at injection with ``AttributeError: module
    'torch' has no attribute 'fp64'`` (or a linalg error for a half-precision pinv)."""
    option = next(iter(bad))
    # adapter_dtype is checked for every method by AdapterConfig (its message names the floating dtypes)
    message = "must be one of" if option == "pinv_dtype" else "must be a floating torch dtype"
    with pytest.raises(ValueError, match=rf"{option} {message}.*got '{bad[option]}'"):
        ll.make_config(method, r=4, **bad)
    for good in ("float32", "float64"):  # both valid names still build a working layer
        _, layers = _model(method, **{option: good})
        assert torch.isfinite(layers["0"].delta_weight()).all()
