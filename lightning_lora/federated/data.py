"""Non-IID client splits and the federated tasks (model factory + tensor datasets).

Every example is a row of fixed-shape tensors ``(input_ids (T,), attention_mask (T,), label ())``
in a ``TensorDataset``: Opacus's Poisson sampler can then build empty batches, and every client
and the server build identical data from the same seeds (real processes split the data the same
way without talking to each other).

Tasks (``build_task``):

- ``sst2``: all-MiniLM-L6-v2 on SST-2 (``lightning_lora.tasks``); eval on the GLUE validation set.
- ``lncrna``: the encoder of the shipped nucleotide BERT (``lncrna/weights/default``) with a new,
  seeded pooler and classifier; lncRNA (1) vs mRNA (0) on ``data/lncrna/train``; eval on ``val``.
  One seeded random window of ``window_tokens`` k-mer tokens per transcript (train and eval), so
  one example is one BERT row and Opacus's per-sample gradient is per transcript. Note: that
  encoder was already fine-tuned on this task (it ships merged), so this task is an easy one.
- ``tiny``: a random 2-layer BERT (``load_tiny_bert``) on an SST-2 slice: for tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset


def dirichlet_split(labels: np.ndarray | list[int], num_clients: int, alpha: float, seed: int = 0,
                    min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Label-skewed (non-IID) split: for each class, client shares ~ Dirichlet(alpha · 1_K).

    The LDA split of FedSA-LoRA / Hsu et al. 2019: small ``alpha`` (0.1) gives each client few
    labels, large ``alpha`` (100) is nearly IID. Redraws (same RNG stream) until every client has
    at least ``min_size`` examples. Returns ``num_clients`` sorted index arrays that partition
    ``range(len(labels))``.
    """
    y = np.asarray(labels)
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f"need num_clients >= 1 and alpha > 0, got {num_clients}, {alpha}")
    if len(y) < num_clients * min_size:
        raise ValueError(f"{len(y)} examples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) split gave every client >= {min_size} examples "
                     f"in {max_tries} draws; raise alpha or lower min_size")


@dataclass
class FederatedTask:
    """A base model factory and the data of a federated run.

    Attributes:
        make_model: builds the base model (a transformers ``*ForSequenceClassification``; same
            weights on every call). ``model(input_ids=, attention_mask=).logits`` is (N, labels).
        train: all training rows; :meth:`client_sets` splits them.
        eval: the held-out rows the server scores the global model on.
        target_modules / modules_to_save: default adapter placement for this model.
    """

    name: str
    make_model: Callable[[], nn.Module]
    train: TensorDataset
    eval: TensorDataset
    target_modules: list[str]
    modules_to_save: list[str] = field(default_factory=list)

    def labels(self) -> np.ndarray:
        return self.train.tensors[2].numpy()

    def client_sets(self, num_clients: int, alpha: float, seed: int = 0, min_size: int = 8) -> list[Subset]:
        parts = dirichlet_split(self.labels(), num_clients, alpha, seed=seed, min_size=min_size)
        return [Subset(self.train, p.tolist()) for p in parts]


def _pad_rows(rows: list[list[int]], labels: list[int], pad_id: int = 0) -> TensorDataset:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return TensorDataset(ids, mask, torch.as_tensor(labels, dtype=torch.long))


def _subset(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def _glue_rows(tokenizer, task: str, split: str, max_length: int, n: int | None, seed: int) -> TensorDataset:
    from ..tasks.glue import read_split

    ex = _subset(read_split(task, split), n, seed)
    enc = tokenizer([e.text_a for e in ex], truncation=True, max_length=max_length)
    return _pad_rows(enc["input_ids"], [e.label for e in ex], pad_id=tokenizer.pad_token_id or 0)


def _seeded_head(model: nn.Module, seed: int) -> nn.Module:
    """Draw the new classifier from ``seed`` (normal, std ``initializer_range``, zero bias: BERT's
    init, written out because transformers' ``_init_weights`` skips modules it marks initialised in
    some versions), so every process that builds the model gets the same head. The pooler keeps the
    checkpoint's weights, which every process loads alike."""
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for m in model.get_submodule("classifier").modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
    return model


def sst2_task(max_train: int | None = None, max_eval: int | None = None, max_length: int = 66, seed: int = 0,
              model: str = "minilm") -> FederatedTask:
    from ..tasks.models import load_minilm, load_tiny_bert, minilm_tokenizer

    tok = minilm_tokenizer()
    train = _glue_rows(tok, "sst2", "train", max_length, max_train, seed)
    eval_ = _glue_rows(tok, "sst2", "validation", max_length, max_eval, seed)
    if model == "minilm":
        def make() -> nn.Module:
            return _seeded_head(load_minilm(num_labels=2)[0], seed)
    elif model == "tiny_bert":
        def make() -> nn.Module:
            return load_tiny_bert(num_labels=2, seed=seed)[0]
    else:
        raise ValueError(f"sst2 task model must be 'minilm' or 'tiny_bert', got {model!r}")
    return FederatedTask(f"sst2-{model}", make, train, eval_,
                         target_modules=["query", "key", "value", "output.dense", "intermediate.dense"])


def lncrna_task(max_train: int | None = None, max_eval: int | None = None, window_tokens: int = 256, seed: int = 0,
                weights: str | None = None, data_root: str | None = None) -> FederatedTask:
    from dataclasses import replace
    from pathlib import Path

    from lncrna.data import load_split
    from lncrna.model import NucleotideClassifier, window_ids

    wdir = Path(weights) if weights else Path(__file__).resolve().parents[2] / "lncrna" / "weights" / "default"
    base = NucleotideClassifier.from_pretrained(wdir)
    cfg = replace(base.cfg, window_tokens=min(window_tokens, base.cfg.window_tokens))
    tok = base.tokenizer
    kw = {"root": data_root} if data_root else {}

    def rows(split: str, n: int | None, split_seed: int) -> TensorDataset:
        df = load_split(split, **kw)
        keep = _subset(list(range(len(df))), n, seed)
        rng = np.random.default_rng(split_seed)
        out = [window_ids(tok.encode_ids(df.seq.iloc[i]), cfg, tok.cls_token_id, tok.sep_token_id,
                          max_windows=1, rng=rng)[0].tolist() for i in keep]
        return _pad_rows(out, [int(df.label.iloc[i]) for i in keep], pad_id=tok.pad_token_id)

    train, eval_ = rows("train", max_train, seed), rows("val", max_eval, seed + 1)

    def make() -> nn.Module:
        return _seeded_head(NucleotideClassifier.from_pretrained(wdir).bert.train(), seed)

    return FederatedTask("lncrna", make, train, eval_, target_modules=["query", "key", "value", "dense"])


def build_task(name: str, **kwargs) -> FederatedTask:
    """``sst2`` | ``lncrna`` | ``tiny`` (keyword options of the matching builder)."""
    if name == "sst2":
        return sst2_task(**kwargs)
    if name == "lncrna":
        return lncrna_task(**kwargs)
    if name == "tiny":
        kwargs.setdefault("max_train", 256)
        kwargs.setdefault("max_eval", 64)
        kwargs.setdefault("max_length", 32)
        return sst2_task(model="tiny_bert", **kwargs)
    raise ValueError(f"unknown federated task {name!r}; available: lncrna, sst2, tiny")
