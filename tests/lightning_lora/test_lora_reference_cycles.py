"""A LoRA training step leaves no reference cycles behind: whatever the fused paths keep for backward
(saved inputs, replay recipes, sibling outputs, cached casts) is freed by reference counting when the
graph is, not whenever Python's cyclic collector next runs. A cycle there holds activations: the C++
path's recipe encoding was once a recursive closure, which kept each replayed-from GELU input of a
BERT MLP allocated after backward (1.1 GiB on BERT-base at 32 x 512 on an H200) until a collection.

Tiny BERT (GELU MLP: an activation replay) and LLaMA (SiLU(gate) * up: a product replay; RMSNorm: a
cast chain under ``replay_inputs="all"``; q/k/v and gate/up sibling sets), bf16, every replay mode,
the Python autograd functions (the opt-in C++ ones: test_lora_cpp_path.py); the collector is off during the steps and
must then find nothing."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import lightning_lora as ll
from lightning_lora.core import _lora_cpp
from lightning_lora.methods import lora as lora_mod


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                         vocab_size=100)
        return BertForSequenceClassification(cfg), ["query", "key", "value", "dense"]
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg), "all-linear"


PARAMS = pytest.mark.parametrize("kind,mode", [(k, m) for k in ("bert", "llama") for m in ("products", "all", "none")])


@PARAMS
def test_training_steps_leave_no_cyclic_garbage(kind: str, mode: str) -> None:
    assert_steps_leave_no_cyclic_garbage(kind, mode, cpp=False)  # the C++ path: test_lora_cpp_path.py


def assert_steps_leave_no_cyclic_garbage(kind: str, mode: str, cpp: bool) -> None:
    model, targets = _model(kind)
    model = model.to(torch.bfloat16)
    ll.inject_adapter(model, "lora", r=4, alpha=8, target_modules=targets, replay_inputs=mode)
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-3)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = ids if kind == "llama" else torch.zeros(2, dtype=torch.long)
    lora_mod._CPP = _lora_cpp._build() if cpp else None
    # `import lightning` sets PYTORCH_NVML_BASED_CUDA_CHECK=1; with it, a CUDA build's torch.cuda.is_available()
    # (AdamW.step's graph-capture check, every step) opens NVML through a new ctypes.CDLL, whose _FuncPtr class
    # is a 6-object cycle: torch's, holding no tensors. Measure without it.
    nvml = os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    enabled = gc.isenabled()
    # Collect until nothing is left, not once: earlier tests' garbage can hold a second cycle through C++
    # tensor references the collector cannot see (dynamo's fake tensors after test_compile.py).
    for _ in range(10):
        if not gc.collect():
            break
    gc.disable()
    try:
        found = []
        for _ in range(2):
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            del out
            opt.step()
            opt.zero_grad(set_to_none=True)
            found.append(gc.collect())  # objects that only the cyclic collector could free
    finally:
        lora_mod._CPP = None
        if nvml is not None:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml
        if enabled:
            gc.enable()
    assert found == [0, 0]
