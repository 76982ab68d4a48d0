"""``modules_to_save`` / ``exclude_modules``: a single name as a string, and names that match nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.core import multi


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
        self.classifier = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(x))


def test_modules_to_save_as_a_string_is_one_name():
    m = Net()
    ll.inject_adapter(m, "lora", r=2, target_modules=["0", "1", "2"], modules_to_save="classifier")
    assert m.classifier.weight.requires_grad
    assert any(k.startswith("classifier.") for k in ll.adapter_state_dict(m)), "the head is not saved"


def test_exclude_modules_as_a_string_is_one_name():
    m = Net()
    layers = ll.inject_adapter(m, "lora", r=2, target_modules="all-linear", exclude_modules="1")
    assert sorted(layers) == ["layers.0", "layers.2"]


@pytest.mark.parametrize("field", ["modules_to_save", "exclude_modules"])
def test_non_string_names_are_rejected(field):
    with pytest.raises(ValueError, match=field):
        ll.inject_adapter(Net(), "lora", r=2, target_modules=["0"], **{field: [3]})


def test_unmatched_modules_to_save_fails_and_leaves_the_model_alone():
    m = Net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"modules_to_save=\['classifer'\] matched no module.*classifier"):
        ll.inject_adapter(m, "lora", r=2, target_modules=["0", "1", "2"], modules_to_save=["classifer"])
    assert not ll.adapter_layers(m) and ll.get_adapter_method(m) is None
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(p.requires_grad for p in m.parameters())


def test_unmatched_modules_to_save_fails_for_named_adapters_too():
    m = Net()
    with pytest.raises(ValueError, match="matched no module"):
        multi.add_adapter(m, "a", "lora", dict(r=2, target_modules=["0"], modules_to_save=["classifer"]))
    assert not ll.adapter_layers(m)


def test_unmatched_exclude_modules_warns():
    with pytest.warns(UserWarning, match=r"exclude_modules=\['proj1'\] matched no module"):
        layers = ll.inject_adapter(Net(), "lora", r=2, target_modules="all-linear", exclude_modules=["proj1"])
    assert len(layers) == 3


def test_tied_head_in_modules_to_save_saves_and_loads(model_builders, tmp_path):
    """GPT-2's ``lm_head`` is the input embedding (tied): trained in full as ``modules_to_save`` it
    saves (safetensors refuses shared storage, so the file holds a copy) and loads with the tie kept."""
    m = model_builders["gpt2"](0)
    assert m.lm_head.weight is m.transformer.wte.weight
    ll.inject_adapter(m, "lora", r=2, target_modules=["c_attn"], modules_to_save=["lm_head"])
    with torch.no_grad():
        m.lm_head.weight.add_(0.1)
    ll.save_adapter(m, tmp_path)
    fresh = model_builders["gpt2"](0)
    ll.load_adapter(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    torch.testing.assert_close(fresh.lm_head.weight, m.lm_head.weight, rtol=0, atol=0)


def test_partly_unmatched_modules_to_save_warns():
    m = Net()
    with pytest.warns(UserWarning, match=r"modules_to_save=\['pooler'\] matched no module"):
        ll.inject_adapter(m, "lora", r=2, target_modules=["0"], modules_to_save=["classifier", "pooler"])
    assert m.classifier.weight.requires_grad


def test_peft_sequence_classification_head_pair_is_quiet():
    """PEFT's SEQ_CLS configs list ``classifier`` and ``score``; a model has one of them."""
    import warnings

    m = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll.inject_adapter(m, "lora", r=2, target_modules=["0"], modules_to_save=["classifier", "score"])
    assert m.classifier.weight.requires_grad
