"""The core-LoRA layer's merge / unmerge (LoRA-XS, LoRA-SB, SLoRA) and ALLoRA's scaling
mechanisms used together.

- LoRA-XS's merge then unmerge restores the base weight as every method's does (METHODS.md S2:
  1e-6 in fp32; in bf16 merge and unmerge fold the same fp32 delta, so the weight comes back as the
  rounding of ``(W0 + ΔW) − ΔW`` says, no worse), and an fp64 core layer merges in fp64: its
  ``delta_weight`` was computed in fp32 (``.float()``), so the merged fp64 model's outputs moved by
  ~1e-8 while LoRA's moved by ~1e-16.
- ALLoRA scales each parameter once: ``install_update_scaling`` twice on one optimizer, its hooks
  together with an :class:`ALLoRAOptimizer` on the same parameters (either order, inner or wrapper),
  or the user's hooks under the ``allora`` method's callback applied c(θ) twice per step, silently;
  each is refused with a one-line ValueError, and disjoint parameter sets still combine.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lora as ll
from lightning_lora.optim import ALLoRAOptimizer, adapter_parameters, allora_coefficient, install_update_scaling

ETA = 3.0


# ---- LoRA-XS / core layer merge and unmerge --------------------------------------------------------
def _core_model(method: str, dtype: torch.dtype, **kw) -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 12)).to(dtype)
    layers = ll.inject_adapter(model, method, target_modules=["0", "2"], r=4, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained core: a delta of the weights' order, not LoRA-XS's 1e-5 init
        for layer in layers.values():
            layer.lora_core.add_(torch.randn(layer.lora_core.shape, generator=g, dtype=torch.float64)
                                 .to(layer.lora_core.dtype) * 0.3)
    return model, layers


def test_lora_xs_merge_unmerge_restores_fp32_weights_at_the_s2_tolerance():
    model, layers = _core_model("lora_xs", torch.float32, svd="exact", alpha=16)
    w0 = {n: layer.base_weight.detach().clone() for n, layer in layers.items()}
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    y = model(x)
    ll.merge_adapter(model)
    assert any(not torch.equal(layer.base_weight, w0[n]) for n, layer in layers.items())
    torch.testing.assert_close(model(x), y, atol=1e-5 * y.abs().max().item(), rtol=0)
    ll.unmerge_adapter(model)
    for n, layer in layers.items():
        torch.testing.assert_close(layer.base_weight, w0[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), y, atol=1e-5 * y.abs().max().item(), rtol=0)


def test_lora_xs_bf16_unmerge_subtracts_the_delta_merge_added():
    """bf16 rounds ``W0 + ΔW`` to bf16 (what any method's merge does), so unmerge cannot give W0 bit for
    bit; it must give exactly ``bf16(bf16(W0 + ΔW) − ΔW)`` with ΔW the fp32 delta of the merge, which is
    within one bf16 rounding of W0."""
    model, layers = _core_model("lora_xs", torch.bfloat16, svd="exact")
    for layer in layers.values():
        w0 = layer.base_weight.detach().clone()
        dw = layer.delta_weight()
        assert dw.dtype == torch.float32
        layer.merge()
        merged = layer.base_weight.detach().clone()
        assert torch.equal(merged, (w0.float() + dw).to(torch.bfloat16))
        layer.unmerge()
        assert torch.equal(layer.base_weight, (merged.float() - dw).to(torch.bfloat16))
        ulp = torch.finfo(torch.bfloat16).eps * torch.maximum(w0.float().abs(), merged.float().abs())
        assert ((layer.base_weight.float() - w0.float()).abs() <= ulp).all()


@pytest.mark.parametrize("method", ["lora_xs", "lora_sb", "slora"])
def test_fp64_core_layer_merges_in_fp64(method):
    model, layers = _core_model(method, torch.float64, adapter_dtype="float64")
    assert all(layer.delta_weight().dtype == torch.float64 for layer in layers.values())
    w0 = [layer.base_weight.detach().clone() for layer in layers.values()]
    x = torch.randn(5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = model(x)
    ll.merge_adapter(model)
    torch.testing.assert_close(model(x), y, atol=1e-13, rtol=0)  # was ~1e-8: the delta was fp32
    ll.unmerge_adapter(model)
    torch.testing.assert_close(model(x), y, atol=1e-13, rtol=0)
    for layer, w in zip(layers.values(), w0):
        torch.testing.assert_close(layer.base_weight, w, atol=1e-14, rtol=0)


# ---- ALLoRA: one scaling per parameter ------------------------------------------------------------
def _linear() -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    model(torch.randn(5, 6, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
    return model


def test_update_hooks_then_wrapping_the_same_optimizer_is_refused():
    model = _linear()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    install_update_scaling(inner, list(model.parameters()), ETA)
    with pytest.raises(ValueError, match=r"would apply twice to 2 parameter\(s\): install_update_scaling"):
        ALLoRAOptimizer(inner, eta=ETA)


@pytest.mark.parametrize("apply_to", ["grad", "update"])
def test_update_hooks_on_the_inner_optimizer_after_wrapping_are_refused_at_step(apply_to):
    model = _linear()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ALLoRAOptimizer(inner, eta=ETA, apply_to=apply_to)
    install_update_scaling(inner, [model.weight], ETA)  # the inner optimizer cannot see the wrapper
    w = model.weight.detach().clone()
    with pytest.raises(ValueError, match=r"would apply twice to 1 parameter\(s\)"):
        opt.step()
    assert torch.equal(model.weight, w)  # refused before anything moved


def test_update_hooks_on_a_wrapper_that_scales_the_same_parameters_are_refused():
    model = _linear()
    opt = ALLoRAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), eta=ETA)
    with pytest.raises(ValueError, match="the ALLoRAOptimizer scales them already"):
        install_update_scaling(opt, [model.bias], ETA)


def test_update_hooks_twice_on_one_optimizer_are_refused_and_a_removed_pair_frees_the_parameters():
    model, ref = _linear(), _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handles = install_update_scaling(opt, [model.weight], ETA)
    with pytest.raises(ValueError, match=r"install_update_scaling was already called on this optimizer"):
        install_update_scaling(opt, list(model.parameters()), ETA)
    for h in handles:
        h.remove()
    install_update_scaling(opt, list(model.parameters()), ETA)  # scaled once again
    want = ALLoRAOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1), eta=ETA, apply_to="update")
    opt.step()
    want.step()
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)


def test_hooks_and_wrapper_on_disjoint_parameters_scale_each_once():
    """The weight through the wrapper's gradient form, the bias through update hooks on the inner
    optimizer: SGD moves each by exactly one c(θ)."""
    model = _linear()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = model.weight.grad.clone(), model.bias.grad.clone()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    install_update_scaling(inner, [model.bias], ETA)
    ALLoRAOptimizer(inner, eta=ETA, params=[model.weight]).step()
    torch.testing.assert_close(model.weight, w - 0.1 * allora_coefficient(w, ETA) * gw, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.bias, b - 0.1 * allora_coefficient(b, ETA) * gb, rtol=1e-6, atol=1e-7)


class _HookedModule(pl.LightningModule):
    """Installs ALLoRA's update hooks on its own optimizer, on top of the callback's scaling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(ll.trainable_parameters(self), lr=0.2)
        install_update_scaling(opt, adapter_parameters(self.net), ETA)
        return opt


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
@pytest.mark.parametrize("apply_to", ["grad", "update"])
def test_callback_refuses_user_update_hooks_on_its_optimizer(tmp_path, apply_to):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    cb = ll.AdapterCallback("allora", r=2, eta=ETA, apply_to=apply_to, target="net", target_modules=["0", "2"])
    trainer = pl.Trainer(max_steps=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="would apply twice.*AdapterCallback scales them too"):
        trainer.fit(_HookedModule(), DataLoader(TensorDataset(x, y), batch_size=8))
