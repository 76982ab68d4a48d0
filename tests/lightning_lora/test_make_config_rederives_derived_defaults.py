"""``make_config(method, config, **changes)`` re-derives the fields ``__post_init__`` filled in from a
default (``alpha=None`` -> a multiple of r, NLoRA's ``residual=None`` -> ``init == "nystrom"``,
``target_modules=None`` -> ``"all-linear"``) and keeps the fields the user set; the record of which
fields were derived stays out of equality, ``repr`` and every serialised form."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.core.config import make_config
from lightning_lora.core.state import read_adapter_config

#: methods whose alpha defaults to a multiple of r
ALPHA_FROM_R = ["nlora", "slora", "inttune", "smora", "ffa_lora", "lora_xs"]


@pytest.mark.parametrize("method", ALPHA_FROM_R)
def test_default_alpha_follows_a_changed_rank(method):
    moved = make_config(method, make_config(method, r=8), r=16)
    fresh = make_config(method, r=16)
    assert moved.alpha == fresh.alpha != make_config(method, r=8).alpha
    assert moved == fresh
    # the re-derived config is itself re-derivable
    assert make_config(method, moved, r=32).alpha == make_config(method, r=32).alpha


@pytest.mark.parametrize("method", ALPHA_FROM_R)
def test_user_set_alpha_is_kept_when_the_rank_changes(method):
    moved = make_config(method, make_config(method, r=8, alpha=8.0), r=16)
    assert moved.r == 16 and moved.alpha == 8.0
    # a user alpha that happens to equal the derived value is still the user's
    assert make_config(method, make_config(method, r=8, alpha=make_config(method, r=8).alpha), r=16).alpha \
        == make_config(method, r=8).alpha


def test_derived_field_assigned_after_construction_is_kept():
    cfg = make_config("nlora", r=8)
    cfg.alpha = 4.0
    assert make_config("nlora", cfg, r=16).alpha == 4.0


def test_smora_alpha_is_twice_the_new_rank():
    assert make_config("smora", make_config("smora", r=8, top_k=2), r=16).alpha == 32.0


def test_nlora_residual_follows_a_changed_init_unless_set():
    assert make_config("nlora", make_config("nlora"), init="reference").residual is False
    assert make_config("nlora", make_config("nlora", residual=True), init="reference").residual is True
    # slora's init has no residual: a residual kept from another init would be refused
    assert make_config("inttune", make_config("inttune"), init="reference").residual is False


def test_all_linear_default_gives_way_to_target_types():
    cfg = make_config("lora", make_config("lora"), target_types=(nn.Conv2d,))
    assert cfg.target_modules is None and cfg == make_config("lora", target_types=(nn.Conv2d,))
    assert make_config("lora", make_config("lora", target_modules="all-linear"), target_types=(nn.Conv2d,)).target_modules \
        == "all-linear"


def test_record_stays_out_of_equality_repr_and_serialised_forms(tmp_path):
    cfg = make_config("nlora", r=4)
    assert "alpha" in cfg._derived_defaults
    d = cfg.to_dict()
    assert not any(k.startswith("_") for k in d) and "derived" not in repr(cfg)
    back = type(cfg).from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.alpha == 4.0
    assert pickle.loads(pickle.dumps(cfg))._derived_defaults == cfg._derived_defaults
    assert make_config("nlora", pickle.loads(pickle.dumps(cfg)), r=8).alpha == 8.0
    # saved adapter: metadata and adapter_config.json carry the resolved value, nothing private
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    ll.inject_adapter(model, "nlora", cfg, target_modules=["0"])
    ll.save_adapter(model, tmp_path)
    method, loaded, _ = read_adapter_config(tmp_path)
    assert method == "nlora" and loaded.alpha == 4.0 and loaded.r == 4
    assert "_derived_defaults" not in (tmp_path / "adapter_config.json").read_text()


def test_inject_adapter_rederives_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    layers = ll.inject_adapter(model, "lora_xs", make_config("lora_xs", r=2), r=4, target_modules=["0"])
    assert layers["0"].scaling == 1.0  # alpha = r = 4, not the r = 2 value (scale 0.5)
