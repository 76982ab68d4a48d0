"""AdapterCallback's DDP defaults (lightning_lora.core.ddp_defaults): which arguments it fills, and
that it never overrides the user's. The two-process run in test_ddp.py checks they reach the wrapper."""

from __future__ import annotations

import types

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

import lightning_lora as ll
from lightning_lora.core.ddp_defaults import apply_ddp_defaults, buffer_sync_argument, has_changing_buffers

SYNC = buffer_sync_argument()  # forward_sync_buffers (torch >= 2.13) or broadcast_buffers


class Module(pl.LightningModule):
    def __init__(self, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = norm if norm is not None else nn.Identity()
        self.register_buffer("position_ids", torch.arange(8))  # constant, as in transformers


def _setup(cb: ll.AdapterCallback, module: pl.LightningModule, strategy) -> dict:
    cb.setup(types.SimpleNamespace(strategy=strategy), module, "fit")
    return strategy._ddp_kwargs if isinstance(strategy, DDPStrategy) else {}


def test_fills_unset_arguments_for_a_model_with_constant_buffers():
    strategy = DDPStrategy()
    cb = ll.AdapterCallback("lora", r=2, target_modules=["fc"])
    kwargs = _setup(cb, Module(), strategy)
    assert kwargs == {"gradient_as_bucket_view": True, SYNC: False}
    assert cb.ddp_defaults_applied == kwargs


@pytest.mark.parametrize("buffers", ["broadcast_buffers", "forward_sync_buffers"])
def test_keeps_what_the_user_passed(buffers):
    strategy = DDPStrategy(**{buffers: True}, gradient_as_bucket_view=False, static_graph=True)
    cb = ll.AdapterCallback("lora", r=2, target_modules=["fc"])
    kwargs = _setup(cb, Module(), strategy)
    assert kwargs == {buffers: True, "gradient_as_bucket_view": False, "static_graph": True}
    assert cb.ddp_defaults_applied == {}


def test_a_second_fit_decides_again_for_its_model():
    strategy = DDPStrategy()
    cb = ll.AdapterCallback("lora", r=2, target_modules=["fc"])
    assert _setup(cb, Module(), strategy) == {"gradient_as_bucket_view": True, SYNC: False}
    # the same trainer fits a model with BatchNorm next: its running statistics need the sync
    cb2 = ll.AdapterCallback("lora", r=2, target_modules=["fc"])
    assert _setup(cb2, Module(nn.BatchNorm1d(8)), strategy) == {"gradient_as_bucket_view": True}


def test_only_fit_fills_and_deepspeed_is_left_alone():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DDPStrategy()
    cb = ll.AdapterCallback("lora", r=2, target_modules=["fc"])
    cb.setup(types.SimpleNamespace(strategy=strategy), Module(), "validate")  # DDP wraps only to fit
    assert strategy._ddp_kwargs == {} and cb.ddp_defaults_applied == {}
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # (deepspeed itself need not be installed)
    deepspeed._ddp_kwargs = {}
    assert apply_ddp_defaults(deepspeed, Module()) == {} and deepspeed._ddp_kwargs == {}


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(8), nn.InstanceNorm1d(8, track_running_stats=True)])
def test_running_statistics_keep_the_buffer_broadcast(norm):
    strategy = DDPStrategy()
    kwargs = _setup(ll.AdapterCallback("lora", r=2, target_modules=["fc"]), Module(norm), strategy)
    assert kwargs == {"gradient_as_bucket_view": True}


def test_norm_without_running_statistics_does_not_count():
    assert not has_changing_buffers(Module(nn.BatchNorm1d(8, track_running_stats=False)))


def test_adapter_layers_with_buffers_keep_the_broadcast():
    # SMoRA keeps its router bias and load counts in buffers, which training changes
    module = Module()
    ll.inject_adapter(module, "smora", ll.make_config("smora", r=4, top_k=2, target_modules=["fc"]))
    assert has_changing_buffers(module)
    plain = Module()
    ll.inject_adapter(plain, "lora", ll.make_config("lora", r=4, target_modules=["fc"]))
    assert not has_changing_buffers(plain)


def test_other_strategies_and_opt_out_are_left_alone():
    assert apply_ddp_defaults(SingleDeviceStrategy(device="cpu"), Module()) == {}
    assert apply_ddp_defaults(None, Module()) == {}
    strategy = DDPStrategy()
    kwargs = _setup(ll.AdapterCallback("lora", r=2, target_modules=["fc"], ddp_defaults=False), Module(), strategy)
    assert kwargs == {}


def test_buffer_watch_warns_once_when_training_changes_a_buffer():
    from lightning_lora.core.ddp_defaults import BufferWatch

    module = Module()
    watch = BufferWatch(module)
    watch.check()  # nothing changed
    module.position_ids.add_(1)  # e.g. a counter the heuristic could not know about
    with pytest.warns(UserWarning, match="position_ids"):
        watch.check()
    watch.check()  # once only
    # a BatchNorm built after the decision (configure_model) updates its statistics in a forward
    bn = nn.BatchNorm1d(4)
    watch = BufferWatch(bn)
    bn.train()(torch.randn(8, 4))
    with pytest.warns(UserWarning, match="running_mean"):
        watch.check()
