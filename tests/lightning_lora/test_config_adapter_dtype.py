"""``adapter_dtype`` accepts a torch dtype or its name, for every method that has the option, and
stores the name (configs save to JSON); anything else is a ValueError at config time, naming the
accepted values (a ``torch.dtype`` used to fail deep in layer construction with a TypeError)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.core.config import AdapterConfig, available_methods, floating_dtype_name, get_method

WITH_DTYPE = sorted(name for name in available_methods()
                    if "adapter_dtype" in {f.name for f in dataclasses.fields(get_method(name).Config)})


def test_every_method_with_the_option_is_covered() -> None:
    assert {"lora", "dylora", "increlora", "lq_lora", "lora_sb"} <= set(WITH_DTYPE)


@pytest.mark.parametrize("given, name", [
    (torch.bfloat16, "bfloat16"), ("bfloat16", "bfloat16"), ("torch.float16", "float16"),
    ("half", "float16"), (torch.float64, "float64"), ("float32", "float32"), ("float", "float32"),
    ("torch.float32", "float32"),
])
def test_names_and_dtypes_normalise(given: object, name: str) -> None:
    assert floating_dtype_name(given) == name


@pytest.mark.parametrize("bad", ["int8", torch.int8, "bf16", None, torch.float8_e4m3fn, 3])
def test_anything_else_is_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match="adapter_dtype must be a floating torch dtype"):
        floating_dtype_name(bad)


#: options a method cannot be configured without
REQUIRED = {"allora": {"eta": 0.1}}


@pytest.mark.parametrize("method", WITH_DTYPE)
def test_config_stores_the_name_and_round_trips(method: str) -> None:
    cls = get_method(method).Config
    cfg = cls(adapter_dtype=torch.bfloat16, **REQUIRED.get(method, {}))
    assert cfg.adapter_dtype == "bfloat16"
    again = cls.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.adapter_dtype == "bfloat16"
    with pytest.raises(ValueError, match="adapter_dtype"):
        cls(adapter_dtype=torch.int32, **REQUIRED.get(method, {}))


def test_inject_with_a_torch_dtype_builds_adapters_of_that_dtype() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    ll.inject_adapter(model, "lora", r=2, target_modules=["0", "2"], adapter_dtype=torch.float64)
    params = ll.trainable_parameters(model)
    assert params and all(p.dtype == torch.float64 for p in params)


def test_base_config_without_the_field_is_untouched() -> None:
    assert not hasattr(AdapterConfig(), "adapter_dtype")


def test_a_dtype_assigned_after_construction_still_builds_and_saves() -> None:
    """``__post_init__`` normalises at construction; a field assigned afterwards is checked again
    where the layers are built and where the config is written."""
    cfg = get_method("lora").Config(r=2, target_modules=["0"])
    cfg.adapter_dtype = torch.float64
    model = nn.Sequential(nn.Linear(8, 8))
    ll.inject_adapter(model, "lora", cfg)
    assert all(p.dtype == torch.float64 for p in ll.trainable_parameters(model))
    assert json.loads(json.dumps(cfg.to_dict()))["adapter_dtype"] == "float64"
    cfg.adapter_dtype = torch.int8
    with pytest.raises(ValueError, match="adapter_dtype"):
        ll.inject_adapter(nn.Sequential(nn.Linear(8, 8)), "lora", cfg)
