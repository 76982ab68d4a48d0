"""Hugging Face PEFT interop, both ways (ARCHITECTURE.md: a saved LoRA directory loads in PEFT, and a
PEFT LoRA directory loads here), for LoRA, rsLoRA and DoRA on BERT, LLaMA and GPT-2 (Conv1D)."""

from __future__ import annotations

import json

import pytest
import torch

import lightning_lora as ll
from lightning_lora.core.state import CONFIG_NAME, WEIGHTS_NAME

import peft  # noqa: E402  (a test dependency: pip install -e ".[test]")

TARGETS = {
    "bert": ["query", "value"],
    "bert_cls": ["query", "value"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj"],  # attn.c_proj and mlp.c_proj; all transformers Conv1D
}
VARIANTS = {
    "lora": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=8, use_rslora=True),
    "dora": dict(r=4, alpha=8, use_dora=True),
}


def _inputs(model: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids}


def _out(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@torch.no_grad()
def _randomize(params, seed: int = 11) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.2 * torch.randn(p.shape, generator=g))


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model", ["bert", "llama", "gpt2"])
def test_our_adapter_loads_in_peft(model_builders, model, variant, tmp_path):
    ours = model_builders[model](0)
    ll.inject_adapter(ours, "lora", dict(VARIANTS[variant]), target_modules=TARGETS[model])
    _randomize(ll.trainable_parameters(ours))
    x = _inputs(model)
    with torch.no_grad():
        y = _out(ours, x)
        y_base = _out(model_builders[model](0), x)
    assert (y - y_base).abs().max() > 1e-3, "adapter has no effect; test would be vacuous"
    ll.save_adapter(ours, tmp_path / "a")

    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == (variant == "dora")
    theirs = peft.PeftModel.from_pretrained(model_builders[model](0), str(tmp_path / "a")).eval()
    n_lora = sum(1 for n, _ in theirs.named_modules() if n.endswith("lora_A.default"))
    assert n_lora == len(ll.adapter_layers(ours))
    with torch.no_grad():
        _assert_close(_out(theirs, x), y)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model", ["bert", "llama", "gpt2"])
def test_peft_adapter_loads_here(model_builders, model, variant, tmp_path):
    kw = VARIANTS[variant]
    cfg = peft.LoraConfig(
        r=kw["r"], lora_alpha=kw["alpha"], target_modules=TARGETS[model], use_rslora=kw.get("use_rslora", False),
        use_dora=kw.get("use_dora", False), fan_in_fan_out=(model == "gpt2"), lora_dropout=0.0,
    )
    theirs = peft.get_peft_model(model_builders[model](0), cfg).eval()
    # B is zero after PEFT's init: make every adapter tensor non-trivial
    _randomize([p for n, p in theirs.named_parameters() if "lora_" in n])
    x = _inputs(model)
    with torch.no_grad():
        y = _out(theirs, x)
    theirs.save_pretrained(str(tmp_path / "p"))

    ours = model_builders[model](0)
    with torch.no_grad():
        assert (_out(ours, x) - y).abs().max() > 1e-3
    ll.load_adapter(ours, tmp_path / "p")
    assert len(ll.adapter_layers(ours)) == sum(1 for n, _ in theirs.named_modules() if n.endswith("lora_A.default"))
    with torch.no_grad():
        _assert_close(_out(ours, x), y)
    # and the loaded adapter still merges to the same function
    with torch.no_grad():
        ll.merge_adapter(ours)
        _assert_close(_out(ours, x), y)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_modules_to_save_both_ways(model_builders, variant, tmp_path):
    """A new classifier head trained in full travels with the adapter, in PEFT's key layout."""
    x = _inputs("bert_cls")
    ours = model_builders["bert_cls"](0)
    ll.inject_adapter(ours, "lora", dict(VARIANTS[variant]), target_modules=TARGETS["bert_cls"],
                      modules_to_save=["classifier"])
    assert ours.classifier.weight.requires_grad
    _randomize(ll.trainable_parameters(ours))
    with torch.no_grad():
        y = _out(ours, x)
    ll.save_adapter(ours, tmp_path / "a")
    # ours -> PEFT
    theirs = peft.PeftModel.from_pretrained(model_builders["bert_cls"](0), str(tmp_path / "a")).eval()
    with torch.no_grad():
        _assert_close(_out(theirs, x), y)
    # ours -> ours
    again = ll.load_adapter(model_builders["bert_cls"](0), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(_out(again, x), y)
    # PEFT -> ours (PEFT wraps the head in a ModulesToSaveWrapper and saves it under the plain name)
    theirs2 = peft.get_peft_model(
        model_builders["bert_cls"](1),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                        use_dora=variant == "dora"),
    ).eval()
    _randomize([p for p in theirs2.parameters() if p.requires_grad])
    with torch.no_grad():
        y2 = _out(theirs2, x)
    theirs2.save_pretrained(str(tmp_path / "p"))
    ours2 = ll.load_adapter(model_builders["bert_cls"](1), tmp_path / "p")
    assert ours2.classifier.weight.requires_grad
    with torch.no_grad():
        _assert_close(_out(ours2, x), y2)


def test_saved_keys_follow_peft_layout(model_builders, tmp_path):
    from safetensors import safe_open

    ours = model_builders["gpt2"](0)
    ll.inject_adapter(ours, "lora", r=2, use_dora=True, target_modules=["c_attn"])
    ll.save_adapter(ours, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    assert keys == {
        f"base_model.model.transformer.h.{i}.attn.c_attn.{t}"
        for i in range(2) for t in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    }
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["r"] == 2


PEFT_CONFIGS = {
    # task_type adds the classifier to modules_to_save (and the absent "score")
    "seq_cls": dict(task_type="SEQ_CLS", target_modules=["query", "value"]),
    "regex": dict(target_modules=r".*\.(query|value)"),
    "exclude": dict(target_modules=["query", "value", "dense"],
                    exclude_modules=["bert.encoder.layer.0.attention.output.dense"]),
    "all_linear": dict(target_modules="all-linear"),
    "bias_all": dict(target_modules=["query", "value"], bias="all"),
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_peft_config_variants_load_here(model_builders, name, tmp_path):
    theirs = peft.get_peft_model(
        model_builders["bert_cls"](0), peft.LoraConfig(r=4, lora_alpha=8, **PEFT_CONFIGS[name])
    ).eval()
    _randomize([p for p in theirs.parameters() if p.requires_grad])
    x = _inputs("bert_cls")
    with torch.no_grad():
        y = _out(theirs, x)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = ll.load_adapter(model_builders["bert_cls"](0), tmp_path / "p")
    n_theirs = sum(1 for n, _ in theirs.named_modules() if n.endswith("lora_A.default"))
    assert len(ll.adapter_layers(ours)) == n_theirs > 0
    with torch.no_grad():
        _assert_close(_out(ours, x), y)


def test_a_peft_field_unknown_here_passes_at_the_installed_peft_s_default(model_builders, tmp_path, monkeypatch):
    """A field this library does not list (a newer PEFT's) loads when it holds the installed PEFT's
    own default, and is refused when it does not: refusing every unknown field would make every
    adapter a newer PEFT saves unloadable."""
    from lightning_lora.methods import lora as lora_mod

    theirs = peft.get_peft_model(model_builders["bert"](0), peft.LoraConfig(r=4, target_modules=["query"]))
    theirs.save_pretrained(str(tmp_path / "p"))
    cfg_path = tmp_path / "p" / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    installed = lora_mod._peft_lora_defaults()
    monkeypatch.setattr(lora_mod, "_peft_lora_defaults", lambda: {**installed, "future_opt": 8})
    cfg_path.write_text(json.dumps({**cfg, "future_opt": 8}))
    ll.load_adapter(model_builders["bert"](0), tmp_path / "p")
    cfg_path.write_text(json.dumps({**cfg, "future_opt": 9}))
    with pytest.raises(ll.AdapterFormatError, match=r"future_opt=9"):
        ll.load_adapter(model_builders["bert"](0), tmp_path / "p")


def test_a_base_weight_in_the_file_loads_only_for_peft_s_embedding_layers(tmp_path):
    """PEFT saves a base weight only for embed_tokens / lm_head targets; a file carrying another
    layer's base weight is refused as unexpected, not written over the frozen weight."""
    from safetensors.torch import load_file, save_file

    from lightning_lora.tasks.models import load_tiny_llama

    model = load_tiny_llama(seed=0)[0]
    ll.inject_adapter(model, "lora", r=2, target_modules=["q_proj"])
    ll.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    tensors = load_file(str(weights))
    q = "model.layers.0.self_attn.q_proj"
    tensors[f"base_model.model.{q}.base_layer.weight"] = torch.zeros_like(model.get_submodule(q).base_layer.weight)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ll.AdapterFormatError, match="unexpected.*q_proj.base_layer.weight"):
        ll.load_adapter(load_tiny_llama(seed=0)[0], tmp_path / "a")


def test_unsupported_peft_options_fail_clearly(model_builders, tmp_path):
    theirs = peft.get_peft_model(
        model_builders["bert"](0), peft.LoraConfig(r=4, target_modules=["query", "value"], rank_pattern={"query": 2})
    )
    theirs.save_pretrained(str(tmp_path / "p"))
    with pytest.raises(ll.AdapterFormatError, match=f"{CONFIG_NAME}.*rank_pattern"):
        ll.load_adapter(model_builders["bert"](0), tmp_path / "p")


class _NestedHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@torch.no_grad()
def _warm_batchnorm(model) -> None:
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        model(torch.randn(16, 8, generator=g))
    model.eval()


def test_modules_to_save_with_nested_buffers(tmp_path):
    """modules_to_save = a nested head with buffers (BatchNorm running stats): all of it travels."""
    x = torch.randn(5, 8)
    ours = _NestedHead()
    ll.inject_adapter(ours, "lora", r=2, target_modules=["body"], modules_to_save=["head"])
    _randomize(ll.trainable_parameters(ours))
    _warm_batchnorm(ours)
    assert "head.1.running_mean" in ll.adapter_state_dict(ours)
    with torch.no_grad():
        y = ours(x)
    ll.save_adapter(ours, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(ll.load_adapter(_NestedHead().eval(), tmp_path / "a")(x), y)
        theirs = peft.PeftModel.from_pretrained(_NestedHead().eval(), str(tmp_path / "a")).eval()
        _assert_close(theirs(x), y)
    # PEFT -> ours
    theirs2 = peft.get_peft_model(_NestedHead(), peft.LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    _randomize([p for p in theirs2.parameters() if p.requires_grad])
    _warm_batchnorm(theirs2)
    with torch.no_grad():
        y2 = theirs2(x)
    theirs2.save_pretrained(str(tmp_path / "p"))
    with torch.no_grad():
        _assert_close(ll.load_adapter(_NestedHead().eval(), tmp_path / "p")(x), y2)


def test_peft_adapter_with_lm_head_target_loads_its_saved_base_weight(tmp_path):
    """PEFT counts ``lm_head`` as an embedding layer: with it among the targets it saves
    ``lm_head.base_layer.weight`` beside the adapter and loads it into the base layer. Before, that
    key failed the load here as unexpected. The source's head is changed before saving, so the
    outputs match PEFT's only if the saved base weight is loaded too."""
    from lightning_lora.tasks.models import load_tiny_llama

    source, _ = load_tiny_llama(seed=0)
    with torch.no_grad():
        source.lm_head.weight.mul_(1.5)
    theirs = peft.get_peft_model(source, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"],
                                                          init_lora_weights=False)).eval()
    theirs.save_pretrained(str(tmp_path / "p"))
    x = _inputs("llama")
    with torch.no_grad():
        y = _out(theirs, x)
        reloaded = peft.PeftModel.from_pretrained(load_tiny_llama(seed=0)[0], str(tmp_path / "p")).eval()
        _assert_close(_out(reloaded, x), y)  # PEFT itself restores the saved head
    ours = ll.load_adapter(load_tiny_llama(seed=0)[0], tmp_path / "p").eval()
    assert "lm_head" in ll.adapter_layers(ours)
    with torch.no_grad():
        _assert_close(_out(ours, x), y)
