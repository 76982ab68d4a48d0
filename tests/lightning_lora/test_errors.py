"""Errors say what is wrong and leave the model as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_lora as ll
from lightning_lora.core.state import CONFIG_NAME, WEIGHTS_NAME


class Net(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, hidden)
        self.norm = nn.LayerNorm(hidden)  # a module type no method adapts
        self.query = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(ids))
        return self.value(torch.relu(self.query(h)))


def _snapshot(model: nn.Module):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {
        n: p.requires_grad for n, p in model.named_parameters()
    }


def test_unknown_method_lists_known_methods():
    with pytest.raises(ValueError, match="unknown adapter method 'lorra'") as exc:
        ll.inject_adapter(Net(), "lorra", r=2)
    for name in ll.available_methods():
        assert name in str(exc.value)
    with pytest.raises(ValueError, match="lora"):
        ll.AdapterCallback("no_such_method")


def test_unknown_config_option_is_named():
    with pytest.raises((TypeError, ValueError), match="rank"):
        ll.inject_adapter(Net(), "lora", rank=4, target_modules=["query"])


def test_target_pattern_matching_nothing_lists_module_names():
    model = Net()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="matched no module") as exc:
        ll.inject_adapter(model, "lora", r=2, target_modules=["q_proj"])
    assert "query" in str(exc.value) and "value" in str(exc.value)
    with pytest.raises(ValueError, match="matched no module"):
        ll.inject_adapter(model, "lora", r=2, target_modules=r"blocks\.\d+\.attn")
    assert _snapshot(model) == before
    assert ll.get_adapter_method(model) is None


def test_unsupported_module_type_raises_type_error():
    model = Net()
    with pytest.raises(TypeError, match="norm.*LayerNorm"):
        ll.inject_adapter(model, "lora", r=2, target_modules=["norm"])
    with pytest.raises(TypeError, match="'emb' of type Embedding; supported: \\['Linear'\\]"):
        ll.inject_adapter(model, "dylora", r=2, target_modules=["emb"])  # LoRA adapts embeddings, DyLoRA does not


def test_unsupported_type_among_valid_targets_leaves_model_untouched():
    """All targets are checked before any is replaced: a failed injection must not half-adapt."""
    model = Net()
    before = _snapshot(model)
    with pytest.raises(TypeError, match="LayerNorm"):
        ll.inject_adapter(model, "lora", r=2, target_modules=["query", "norm"])
    with pytest.raises(TypeError, match="LayerNorm"):
        ll.inject_adapter(model, "lora", r=2, target_modules=r"query|value|norm")
    assert _snapshot(model) == before
    assert not ll.adapter_layers(model)
    # and the model can still be adapted properly afterwards
    ll.inject_adapter(model, "lora", r=2, target_modules=["query", "value"])
    assert set(ll.adapter_layers(model)) == {"query", "value"}


def test_unsupported_type_after_valid_target_leaves_model_untouched():
    class Late(Net):
        def __init__(self):
            super().__init__()
            self.tail = nn.LayerNorm(4)  # comes after query/value in model order

    model = Late()
    before = _snapshot(model)
    with pytest.raises(TypeError, match="tail"):
        ll.inject_adapter(model, "lora", r=2, target_modules=["query", "tail"])
    assert _snapshot(model) == before
    assert not ll.adapter_layers(model)


def test_injecting_twice_raises():
    model = Net()
    ll.inject_adapter(model, "lora", r=2, target_modules=["query"])
    with pytest.raises(RuntimeError, match="already has an adapter"):
        ll.inject_adapter(model, "lora", r=2, target_modules=["value"])
    assert set(ll.adapter_layers(model)) == {"query"}
    ll.unload(model)
    ll.inject_adapter(model, "lora", r=2, target_modules=["value"])  # fine after unload
    assert set(ll.adapter_layers(model)) == {"value"}


def test_merge_twice_and_unmerge_unmerged_raise():
    model = Net()
    layers = ll.inject_adapter(model, "lora", r=2, target_modules=["query"])
    with pytest.raises(RuntimeError, match="not merged"):
        layers["query"].unmerge()
    layers["query"].merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layers["query"].merge()


def _saved(tmp_path, hidden=16, **kw):
    model = Net(hidden)
    ll.inject_adapter(model, "lora", r=2, target_modules=["query", "value"], **kw)
    return ll.save_adapter(model, tmp_path / f"adapter{hidden}")


def test_load_wrong_shape_raises_naming_the_file(tmp_path):
    directory = _saved(tmp_path, hidden=16)
    model = Net(hidden=24)
    before = _snapshot(model)
    with pytest.raises(ll.AdapterFormatError, match=WEIGHTS_NAME) as exc:
        ll.load_adapter(model, directory)
    assert "shape" in str(exc.value)
    # the failed load left no half-injected adapter behind
    assert _snapshot(model) == before and ll.get_adapter_method(model) is None


def test_load_adapter_for_other_modules_raises_format_error(tmp_path):
    """An adapter whose target modules do not exist in this model is an incompatible directory."""
    directory = _saved(tmp_path)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

    model = Other()
    with pytest.raises(ll.AdapterFormatError, match=str(directory.name)):
        ll.load_adapter(model, directory)
    assert ll.get_adapter_method(model) is None and not ll.adapter_layers(model)


def test_load_with_missing_or_unexpected_tensor_raises(tmp_path):
    directory = _saved(tmp_path)
    tensors = load_file(str(directory / WEIGHTS_NAME))
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(directory / WEIGHTS_NAME), metadata=meta)
    model = Net()
    with pytest.raises(ll.AdapterFormatError, match="missing") as exc:
        ll.load_adapter(model, directory)
    assert dropped in str(exc.value) and WEIGHTS_NAME in str(exc.value)
    save_file({**tensors, "base_model.model.extra.lora_A.weight": torch.zeros(2, 2)}, str(directory / WEIGHTS_NAME),
              metadata=meta)
    with pytest.raises(ll.AdapterFormatError, match="unexpected"):
        ll.load_adapter(Net(), directory)
    # non-strict: loads what fits
    model = Net()
    ll.load_adapter(model, directory, strict=False)
    assert set(ll.adapter_layers(model)) == {"query", "value"}


def test_load_missing_directory_raises(tmp_path):
    with pytest.raises(ll.AdapterFormatError, match="no adapter weights file"):
        ll.load_adapter(Net(), tmp_path / "does_not_exist")


def test_load_corrupt_files_raise_format_error(tmp_path):
    directory = _saved(tmp_path)
    (directory / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ll.AdapterFormatError, match=WEIGHTS_NAME):
        ll.load_adapter(Net(), directory)
    # a PEFT-style directory (no lightning_lora metadata) with a broken / unsupported config
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file({"base_model.model.query.lora_A.weight": torch.zeros(2, 16)}, str(peft_dir / WEIGHTS_NAME))
    (peft_dir / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ll.AdapterFormatError, match="invalid JSON"):
        ll.load_adapter(Net(), peft_dir)
    (peft_dir / CONFIG_NAME).write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ll.AdapterFormatError, match="PREFIX_TUNING"):
        ll.load_adapter(Net(), peft_dir)


def test_load_into_model_with_other_adapter_config_raises(tmp_path):
    directory = _saved(tmp_path)
    model = Net()
    ll.inject_adapter(model, "lora", r=4, target_modules=["query", "value"])  # rank differs
    with pytest.raises(ll.AdapterFormatError, match="shape"):
        ll.load_adapter(model, directory)


def test_save_without_adapter_raises(tmp_path):
    with pytest.raises(ValueError, match="no adapter"):
        ll.save_adapter(Net(), tmp_path / "x")


def test_invalid_lora_options():
    with pytest.raises(ValueError, match="rank"):
        ll.LoRAConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        ll.LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="init"):
        ll.LoRAConfig(init="orthogonal")
    with pytest.raises(ValueError, match="bias"):
        ll.LoRAConfig(bias="some")
    for alpha in (None, "16", float("nan"), True):  # None failed only at injection, inside alpha / r
        with pytest.raises(ValueError, match="alpha"):
            ll.LoRAConfig(alpha=alpha)
    assert ll.make_config("ffa_lora", r=4).alpha == 4.0  # FFA-LoRA's None still means alpha = r
    # a numpy scalar is kept as a Python number: the config must save to JSON
    import numpy as np

    assert type(ll.LoRAConfig(alpha=np.float32(4)).alpha) is float and ll.LoRAConfig(alpha=16).alpha == 16


def test_layer_build_failure_rolls_back_injection():
    """A method whose make_layer fails on one target (a shape constraint) must not half-adapt."""
    from lightning_lora.methods.lora import LoRA

    class FailsOnValue(LoRA):
        def make_layer(self, base, name):
            if name == "value":
                raise ValueError("value: shape not supported")
            return super().make_layer(base, name)

    model = Net()
    before = _snapshot(model)
    method = FailsOnValue(ll.LoRAConfig(r=2, target_modules=["query", "value"]))
    with pytest.raises(ValueError, match="shape not supported"):
        ll.inject_adapter(model, method)
    assert _snapshot(model) == before  # query restored, requires_grad restored
    assert ll.get_adapter_method(model) is None
