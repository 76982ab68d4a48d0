"""Edge cases of ALLoRA (optimizer wrapper, eta validation) and LoRA-XS / LoRA-SB (config validation,
the LoRA-SB init under an unsized train loader)."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.allora import ALLoRAConfig
from lightning_lora.methods.lora_sb import LoRASBConfig, LoRASBLinear, LoRAXSConfig, init_lora_sb
from lightning_lora.optim.allora import ALLoRAOptimizer, allora_coefficient, install_update_scaling, scale_gradients


def _model(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(6, 4)


def _grads(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(5, 6, generator=g)).pow(2).sum().backward()


# ---- ALLoRAOptimizer -----------------------------------------------------------------------------
def test_allora_optimizer_deepcopy_and_pickle_keep_the_wrapper():
    model = _model()
    opt = ALLoRAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), eta=2.0, granularity="tensor")
    _grads(model)
    opt.step()
    twin = copy.deepcopy((model, opt))
    model2, opt2 = twin
    assert (opt2.eta, opt2.granularity, opt2.apply_to) == (2.0, "tensor", "grad")
    assert opt2.param_groups[0]["params"][0] is model2.weight  # the copy drives the copied model
    restored = pickle.loads(pickle.dumps(opt))
    assert restored.eta == 2.0 and len(restored.state) == len(opt.state)
    # both keep stepping (a copy must not break the class's step for the other instances)
    _grads(model, 2)
    _grads(model2, 2)
    opt.step()
    opt2.step()
    assert torch.equal(model.weight, model2.weight) and torch.equal(model.bias, model2.bias)
    # with a scheduler attached and a step hook registered (closures), it still pickles, as torch's do
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    opt.register_step_pre_hook(lambda o, a, k: None)
    again = pickle.loads(pickle.dumps(opt))
    assert again.eta == 2.0 and not again._optimizer_step_pre_hooks


def test_allora_optimizer_runs_step_hooks_and_takes_install_update_scaling():
    model, ref = _model(), _model()
    opt = ALLoRAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), eta=3.0, apply_to="grad")
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    _grads(model)
    opt.step()
    assert calls == ["pre", "post"]
    # install_update_scaling on a (grad-mode) wrapper whose scaling set is empty: only the update form
    # acts, and it matches the update-mode wrapper on the reference model
    model, ref = _model(), _model()
    plain = ALLoRAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), eta=3.0, params=[])
    handles = install_update_scaling(plain, list(model.parameters()), 3.0)
    want = ALLoRAOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1), eta=3.0, apply_to="update")
    for opt_, m in ((plain, model), (want, ref)):
        _grads(m)
        opt_.step()
    for h in handles:
        h.remove()
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)


def test_allora_optimizer_scheduler_state_dict_and_added_group_round_trip():
    model, extra = _model(), nn.Parameter(torch.ones(3, 2))
    opt = ALLoRAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), eta=1.5)
    opt.add_param_group({"params": [extra], "lr": 5e-3})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _grads(model)
    extra.grad = torch.full_like(extra, 0.25)
    opt.step()
    sched.step()
    sd = opt.state_dict()
    model2, extra2 = _model(), nn.Parameter(torch.ones(3, 2))
    opt2 = ALLoRAOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2), eta=1.5)
    opt2.add_param_group({"params": [extra2], "lr": 5e-3})
    opt2.load_state_dict(sd)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups] == [5e-3, 2.5e-3]
    torch.testing.assert_close(opt2.state[extra2]["exp_avg"], opt.state[extra]["exp_avg"], rtol=0, atol=0)


# ---- eta -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [math.inf, math.nan, "1e-3", True, 0.0, -1.0])
def test_allora_eta_must_be_a_finite_positive_number(eta):
    with pytest.raises(ValueError, match="eta"):
        ALLoRAConfig(r=2, eta=eta)
    p = nn.Parameter(torch.zeros(3, 4))
    p.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match="eta"):
        scale_gradients([p], eta)
    with pytest.raises(ValueError, match="eta"):
        ALLoRAOptimizer(torch.optim.SGD([p], lr=0.1), eta=eta)
    assert torch.equal(p.grad, torch.ones(3, 4))


def test_allora_eta_accepts_numpy_and_int_scalars():
    import numpy as np
    assert ALLoRAConfig(r=2, eta=np.float32(2.0)).eta == 2.0 and ALLoRAConfig(r=2, eta=3).eta == 3
    assert LoRAXSConfig(r=2, alpha=np.float64(4.0)).alpha == 4.0


def test_allora_large_finite_eta_keeps_zero_rows_finite():
    c = allora_coefficient(torch.zeros(2, 3), 1e30)
    assert torch.isfinite(c).all() and torch.equal(c, torch.full((2, 1), 1e30))


# ---- LoRA-XS / LoRA-SB configs -------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(total_steps=0), dict(total_steps=-5), dict(init_lr=0.0), dict(init_lr=-1e-4),
                                dict(init_lr=math.inf), dict(svd_niter=-1)])
def test_lora_sb_config_rejects_values_that_flip_or_zero_the_init(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        LoRASBConfig(r=2, **kw)


@pytest.mark.parametrize("kw", [dict(alpha=0.0), dict(alpha=-4.0), dict(core_std=-1e-5), dict(svd_niter=-1)])
def test_lora_xs_config_rejects_dead_or_invalid_values(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        LoRAXSConfig(r=2, **kw)


def test_lora_xs_valid_alpha_still_sets_the_scale():
    torch.manual_seed(0)
    layer = ll.inject_adapter(nn.Sequential(nn.Linear(8, 6)), "lora_xs", dict(r=2, alpha=16, svd="exact"),
                              target_modules=["0"])["0"]
    assert layer.scaling == 8.0


def _sb_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    ll.inject_adapter(model, "lora_sb", dict(r=2, svd="exact"), target_modules=["0", "2"])
    return model


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("kw", [dict(lr=-1e-3), dict(lr=0.0), dict(lr=1e-3, total_steps=-10, warmup_ratio=0.1)])
def test_init_lora_sb_rejects_a_sign_flipping_step_and_leaves_the_placeholder(kw):
    model = _sb_model()
    batch = (torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="lr|total_steps"):
        init_lora_sb(model, [batch], _ce, **kw)
    layer = model[0]
    assert isinstance(layer, LoRASBLinear) and not bool(layer.lora_sb_initialized)
    assert torch.equal(layer.lora_core, torch.zeros(2, 2))


def test_lora_sb_unsized_loader_asks_for_total_steps(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(3)
            for _ in range(4):
                yield torch.randn(8, generator=g), torch.randint(0, 3, (), generator=g)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))

        def training_step(self, batch, batch_idx):
            return _ce(self.net, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(ll.trainable_parameters(self), lr=0.1)

        def train_dataloader(self):
            return DataLoader(Stream(), batch_size=2)

    def fit(**kw):
        module = Module()
        cb = ll.AdapterCallback("lora_sb", r=2, svd="exact", n_init_batches=1, target_modules=["net.0"], **kw)
        trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                             default_root_dir=tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module)
        return module

    with pytest.raises(ValueError, match="total_steps"):
        fit()
    # with T given, the same fit initialises
    module = fit(total_steps=2)
    assert bool(module.net[0].lora_sb_initialized)
