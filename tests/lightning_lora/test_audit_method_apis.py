"""Audit of the method-specific public APIs: values that used to be accepted silently (NaN scales,
sign-flipping init steps, double ALLoRA scaling) or to fail only at the first step / forward."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.core.config import make_config
from lightning_lora.methods.lora_sb import LoRASBLinear, init_lora_sb
from lightning_lora.optim.allora import ALLoRAOptimizer
from lightning_lora.optim.gradnorm_lorp import GradNormLoRPAdamW

NAN, INF = float("nan"), float("inf")


# ---- method configs: NaN / inf / non-number values are refused at config time -------------------------
@pytest.mark.parametrize("method,kw", [
    ("dylora", dict(alpha=NAN)),
    ("dylora", dict(alpha="16")),
    ("dylora", dict(r=2, rank_pmf=[NAN, NAN])),
    ("dylora", dict(r=2, rank_pmf=[1.0, INF])),
    ("smora", dict(r=4, top_k=2, alpha=NAN)),
    ("smora", dict(r=4, top_k=2, bias_update_rate=NAN)),
    ("smora", dict(r=4, top_k=2, bias_update_rate=INF)),
    ("nlora", dict(alpha=NAN)),
    ("slora", dict(alpha="8")),
    ("inttune", dict(pinv_rtol=-1.0)),
    ("nlora", dict(pinv_rtol=NAN)),
    ("increlora", dict(total_steps=0)),
    ("increlora", dict(total_steps=-5)),
    ("increlora", dict(group_warmup_steps=-3)),
    ("increlora", dict(alpha=NAN)),
    ("increlora", dict(orth_reg=NAN)),
    ("increlora", dict(reserve_e=INF)),
    ("increlora", dict(init_std=-1.0)),
    ("gradnorm_lorp", dict(proj_scale=NAN)),
    ("gradnorm_lorp", dict(eps=NAN)),
])
def test_method_config_refuses_non_finite_or_out_of_range_values(method, kw):
    with pytest.raises(ValueError, match="|".join(kw)):
        make_config(method, **kw)


def test_valid_values_still_pass_and_keep_their_meaning():
    assert make_config("dylora", r=2, rank_pmf=[1, 3]).rank_pmf == [0.25, 0.75]
    assert make_config("smora", r=4, top_k=2).alpha == 8.0
    assert make_config("nlora", r=4, pinv_rtol=0.0).alpha == 4.0
    cfg = make_config("increlora", total_steps=10, group_warmup_steps=0, alpha=0)
    assert cfg.scale_alpha == float(cfg.r)


def test_smora_nan_rate_used_to_poison_the_router_bias():
    # what the check prevents: one β update with u = NaN makes every routing score NaN
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="bias_update_rate"):
        ll.inject_adapter(nn.Sequential(nn.Linear(6, 4)), "smora", dict(r=4, top_k=2, bias_update_rate=NAN),
                          target_modules=["0"])


# ---- LoRA-SB init arguments ------------------------------------------------------------------------------
def _sb_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    ll.inject_adapter(model, "lora_sb", dict(r=2, svd="exact"), target_modules=["0"])
    return model


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


_BATCH = (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("kw", [dict(warmup_ratio=-0.1, total_steps=10), dict(warmup_ratio=NAN, total_steps=10),
                                dict(n_batches=0), dict(n_batches=-1), dict(n_batches=1.5)])
def test_init_lora_sb_refuses_bad_explicit_arguments_and_leaves_the_placeholder(kw):
    model = _sb_model()
    with pytest.raises(ValueError, match="warmup_ratio|n_batches"):
        init_lora_sb(model, [_BATCH] * 3, _ce, lr=1e-3, **kw)
    layer = model[0]
    assert isinstance(layer, LoRASBLinear) and not bool(layer.lora_sb_initialized)


def test_init_lora_sb_negative_warmup_would_flip_the_init_update():
    # the defect: η₁ = η / (warmup_ratio · T) < 0 gave ΔW = −(the right update), silently
    model = _sb_model()
    init_lora_sb(model, [_BATCH], _ce, lr=1e-3, warmup_ratio=0.1, total_steps=10, n_batches=1)
    good = model[0].delta_weight()
    assert good.abs().sum() > 0
    model2 = _sb_model()
    with pytest.raises(ValueError, match="warmup_ratio"):
        init_lora_sb(model2, [_BATCH], _ce, lr=1e-3, warmup_ratio=-0.1, total_steps=10)


def test_init_lora_sb_warns_when_the_data_is_shorter_than_asked():
    model = _sb_model()
    with pytest.warns(UserWarning, match="1 batch.*fewer than the 5"):
        init_lora_sb(model, [_BATCH], _ce, lr=1e-3, n_batches=5)
    assert bool(model[0].lora_sb_initialized)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly enough data: no warning
        init_lora_sb(_sb_model(), [_BATCH] * 2, _ce, lr=1e-3, n_batches=2)


# ---- ALLoRAOptimizer -------------------------------------------------------------------------------------
def test_allora_optimizer_refuses_to_wrap_itself():
    p = nn.Parameter(torch.ones(2, 3))
    once = ALLoRAOptimizer(torch.optim.SGD([p], lr=1.0), eta=0.5)
    with pytest.raises(ValueError, match="twice"):
        ALLoRAOptimizer(once, eta=0.5)
    # the single wrapper still gives c(θ) once: θ - lr · c · g with c = η / sqrt(1 + (η‖θ_row‖)²)
    p.grad = torch.ones(2, 3)
    once.step()
    c = 0.5 / math.sqrt(1 + 0.25 * 3)
    torch.testing.assert_close(p.detach(), torch.full((2, 3), 1 - c))


def test_allora_optimizer_refuses_a_parameter_list_at_construction():
    p = nn.Parameter(torch.ones(2, 3))
    with pytest.raises(TypeError, match="wraps a torch optimizer"):
        ALLoRAOptimizer([p], eta=0.5)


# ---- GradNormLoRPAdamW -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(block_size=0, optim_bits=8), dict(block_size=2.5, optim_bits=8),
                                dict(lr=NAN), dict(eps=INF), dict(betas=(1.5, 0.9)), dict(betas=(0.9,)),
                                dict(optim_bits=16)])
def test_gradnorm_optimizer_checks_its_arguments_at_construction(kw):
    p = nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match="block_size|lr|eps|betas|optim_bits"):
        GradNormLoRPAdamW([{"params": [p], "rank": 2}], **{"lr": 1e-3, **kw})


@pytest.mark.parametrize("group", [dict(rank=2.5), dict(rank=2, update_proj_gap=1.5), dict(rank=2, scale=NAN),
                                   dict(optim_bits=16), dict(block_size=0), dict(lr=NAN)])
def test_gradnorm_group_values_are_checked_when_added_later(group):
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4))
    opt = GradNormLoRPAdamW([{"params": [a], "rank": 2}], lr=1e-3)
    with pytest.raises(ValueError, match="rank|update_proj_gap|scale|optim_bits|block_size|lr"):
        opt.add_param_group({"params": [b], **group})
    assert len(opt.param_groups) == 1  # nothing half-added
    a.grad = torch.randn(6, 4)
    opt.step()  # still usable


def test_gradnorm_group_override_of_optim_bits_still_works():
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4))
    opt = GradNormLoRPAdamW([{"params": [a], "rank": 2}], lr=1e-3)
    opt.add_param_group({"params": [b], "rank": 2, "optim_bits": 8, "block_size": 8})
    a.grad, b.grad = torch.randn(6, 4), torch.randn(6, 4)
    opt.step()
    assert "exp_avg" in opt.state[a] and "exp_avg_q" in opt.state[b]


def test_dylora_eval_ranks_take_numpy_integers_and_increlora_refuses_a_zero_rank_budget():
    """``np.arange(1, 5)`` as eval_ranks was refused (only ``int`` passed); IncreLoRA's
    ``target_total_rank=0`` was accepted and failed only at fit start."""
    import numpy as np

    cfg = ll.make_config("dylora", r=4)
    assert cfg.resolve_eval_ranks(np.arange(1, 5)) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="eval_ranks must be whole numbers"):
        cfg.resolve_eval_ranks([1, 2.5])
    with pytest.raises(ValueError, match="target_total_rank must be None or >= 1"):
        ll.make_config("increlora", r=2, target_total_rank=0)
