"""GLUE-style sentence classification data: SST-2, MRPC, RTE, CoLA as LightningDataModules.

Files are read from ``data/nlp/`` (see ``data/nlp/PROVENANCE.md``) with ``csv.QUOTE_NONE``,
because the sentences contain bare ``"`` characters.

Splits (``train`` / ``validation`` / ``test``):

=======  ==========================  ==================================  =========================
task     train                       validation (model selection)        test (reported)
=======  ==========================  ==================================  =========================
sst2     GLUE train, 67,349          GLUE validation, 872                none: report validation
mrpc     MSRP train minus dev, 3,669 seeded, label-stratified 10% of     MSRP test, 1,725 (labelled)
                                     MSRP train, 407
rte      GLUE train, 2,490           GLUE validation, 277                none: report validation
cola     GLUE train, 8,551           GLUE validation, 1,043              none: report validation
=======  ==========================  ==================================  =========================

GLUE's own MRPC dev ids were not available, so the dev split is carved from train with
``dev_seed`` (default 0): the same seed always gives the same 407 pairs (275 paraphrases,
132 not; 10% of each class, rounded), and no test pair is ever used for selection.

Labels: SST-2 1 = positive; MRPC 1 = paraphrase; CoLA 1 = acceptable; RTE 0 = entailment,
1 = not_entailment (the order of GLUE / Hugging Face ``datasets``).

Batches are padded dynamically to the longest sequence in the batch (``pad_batch``), so short
SST-2 sentences cost short sequences. ``max_samples`` / ``max_eval_samples`` take a seeded random
subset (in file order) for quick runs.
"""

from __future__ import annotations

import csv
import functools
import os
import random
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from .paths import DataNotFound, nlp_data_dir


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int


def read_tsv(path: Path, header: bool = True) -> list[list[str]]:
    """Rows of a tab-separated file (no quoting; blank lines skipped; header dropped if ``header``)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    return rows[1:] if header else rows


def _sst2(path: Path) -> list[Example]:
    return [Example(s, None, int(y)) for s, y in read_tsv(path)]


def _cola(path: Path) -> list[Example]:
    # raw GLUE format, no header: source, label, original label, sentence
    return [Example(s, None, int(y)) for _, y, _, s in read_tsv(path, header=False)]


RTE_LABELS = ("entailment", "not_entailment")


def _rte(path: Path) -> list[Example]:
    return [Example(a, b, RTE_LABELS.index(y)) for _, a, b, y in read_tsv(path)]


def _mrpc(path: Path) -> list[Example]:
    # Quality, #1 ID, #2 ID, #1 String, #2 String
    return [Example(a, b, int(q)) for q, _, _, a, b in read_tsv(path)]


@dataclass(frozen=True)
class TaskSpec:
    """One task: its files (relative to the data dir), reader, label count and metrics."""

    name: str
    files: dict[str, str]
    reader: Callable[[Path], list[Example]]
    num_labels: int
    metrics: tuple[str, ...]
    monitor: str  # the metric used for model selection (logged as val_<monitor>)
    dev_from_train: bool = False  # carve `validation` out of `train` (MRPC)


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", {"train": "sst2/train.tsv", "validation": "sst2/validation.tsv"}, _sst2, 2,
                     ("accuracy",), "accuracy"),
    "mrpc": TaskSpec("mrpc", {"train": "mrpc/msr_paraphrase_train.txt", "test": "mrpc/msr_paraphrase_test.txt"},
                     _mrpc, 2, ("accuracy", "f1"), "accuracy", dev_from_train=True),
    "rte": TaskSpec("rte", {"train": "rte/train.tsv", "validation": "rte/validation.tsv"}, _rte, 2,
                    ("accuracy",), "accuracy"),
    "cola": TaskSpec("cola", {"train": "cola/train.tsv", "validation": "cola/validation.tsv"}, _cola, 2,
                     ("accuracy", "mcc"), "mcc"),
}


def split_dev(examples: list[Example], fraction: float = 0.1, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """``(train, dev)``: a seeded, label-stratified ``fraction`` of ``examples`` as dev; both keep file order."""
    rng = random.Random(seed)
    dev_idx: set[int] = set()
    for label in sorted({e.label for e in examples}):
        idx = [i for i, e in enumerate(examples) if e.label == label]
        rng.shuffle(idx)
        dev_idx.update(idx[: round(len(idx) * fraction)])
    train = [e for i, e in enumerate(examples) if i not in dev_idx]
    dev = [e for i, e in enumerate(examples) if i in dev_idx]
    return train, dev


def read_split(task: str, split: str, data_dir: str | os.PathLike | None = None, dev_fraction: float = 0.1,
               dev_seed: int = 0) -> list[Example]:
    """All labelled examples of ``split`` (``train``, ``validation`` or ``test``) of ``task``."""
    spec = get_task(task)
    root = nlp_data_dir(data_dir)
    if spec.dev_from_train and split in ("train", "validation"):
        train, dev = split_dev(_read(spec, "train", root), dev_fraction, dev_seed)
        return train if split == "train" else dev
    if split not in spec.files:
        raise ValueError(f"task {task!r} has no labelled {split!r} split; splits: {available_splits(task)}")
    return _read(spec, split, root)


def _read(spec: TaskSpec, split: str, root: Path) -> list[Example]:
    path = root / spec.files[split]
    if not path.is_file():
        raise DataNotFound(path)
    return spec.reader(path)


def get_task(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown GLUE task {task!r}; available: {', '.join(sorted(TASKS))}") from None


def available_splits(task: str) -> list[str]:
    spec = get_task(task)
    return sorted(set(spec.files) | ({"train", "validation"} if spec.dev_from_train else set()))


def subsample(items: list[Any], n: int | None, seed: int) -> list[Any]:
    """A seeded random subset of ``n`` items kept in their original order (all items if ``n`` is None)."""
    if n is None or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


class LengthGroupedSampler(Sampler[int]):
    """Random order in which each run of ``batch_size`` indices has similar lengths.

    Shuffle all indices, cut them into chunks of ``mega_batch_mult * batch_size``, sort each chunk
    by length (longest first), cut it into batches and shuffle the batches (the idea of
    transformers' ``group_by_length``). With dynamic padding a batch then costs about its real
    token count instead of its longest member; on SST-2 (13 tokens on average, 66 at most) that
    roughly halves training time. The order is fixed by ``seed`` and changes every epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.mega = max(1, mega_batch_mult) * batch_size
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), self.mega):
            chunk = sorted(order[start : start + self.mega], key=lambda i: -self.lengths[i])
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield from batches[b]


def unrepeated_eval_sampler(dataset: Sized, trainer: pl.Trainer | None) -> UnrepeatedDistributedSampler | None:
    """The sampler of a validation / test DataLoader: under a distributed strategy, this process's
    shard of ``dataset`` with no sample repeated; None (a plain in-order loader) otherwise.

    Why: Lightning shards evaluation loaders with torch's ``DistributedSampler``, which pads every
    shard to one length by repeating up to ``world_size - 1`` samples, so metrics added up over the
    processes counted those twice (5 samples on 2 processes: sample 0 scored twice, 6 in all). This
    is Lightning's own ``UnrepeatedDistributedSampler`` (what it uses for predict): rank ``r`` takes
    samples ``r, r + world_size, ...``, so shard lengths differ by at most one, and Lightning leaves a
    ``DistributedSampler`` in place. A metric over such shards must add counts across processes
    (torchmetrics states, ``strategy.reduce(..., reduce_op="sum")``), not average per-process means.

    Also None without a trainer, on one process, with ``Trainer(use_distributed_sampler=False)``
    (the user shards), and for a dataset smaller than the world: a process without a batch would
    not join the others' collectives at epoch end (Lightning's padded shards are kept there).
    """
    kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
    if not kwargs or kwargs.get("num_replicas", 1) <= 1 or len(dataset) < kwargs["num_replicas"]:
        return None
    # the flag has no public accessor; Lightning's own sampler injection reads it here too
    if not getattr(trainer._accelerator_connector, "use_distributed_sampler", True):
        return None
    return UnrepeatedDistributedSampler(dataset, shuffle=False, **kwargs)


class ListDataset(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def pad_batch(features: list[dict[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (with ``pad_token_id``), ``attention_mask`` and ``token_type_ids`` (with 0)
    to the longest sequence of the batch. Returns tensors of shape (batch, longest); ``labels`` (batch,)."""
    longest = max(len(f["input_ids"]) for f in features)
    out: dict[str, torch.Tensor] = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key not in features[0]:
            continue
        fill = pad_token_id if key == "input_ids" else 0
        out[key] = torch.tensor([f[key] + [fill] * (longest - len(f[key])) for f in features], dtype=torch.long)
    out["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    return out


class GLUEDataModule(pl.LightningDataModule):
    """Tokenised GLUE task with dynamic padding.

    Args:
        task: ``"sst2"``, ``"mrpc"``, ``"rte"`` or ``"cola"``.
        tokenizer: a Hugging Face tokenizer (sentence pairs are encoded as ``[CLS] a [SEP] b [SEP]``).
        data_dir: folder holding ``sst2/`` etc.; default :func:`~lightning_lora.tasks.paths.nlp_data_dir`.
        max_length: truncation length in tokens.
        batch_size / eval_batch_size: training / evaluation batch size.
        max_samples: train on a seeded random subset of this many examples.
        max_eval_samples: evaluate on a seeded random subset of this many examples (validation and test).
        seed: seed of the subsets and of the training shuffle (one fixed order per seed).
        dev_fraction / dev_seed: the dev split carved from train (MRPC only).
        group_by_length: train batches of similar length (:class:`LengthGroupedSampler`).
    """

    task: str = ""

    def __init__(self, tokenizer: Any, task: str | None = None, data_dir: str | os.PathLike | None = None,
                 max_length: int = 128, batch_size: int = 32, eval_batch_size: int | None = None,
                 max_samples: int | None = None, max_eval_samples: int | None = None, seed: int = 0,
                 num_workers: int = 0, dev_fraction: float = 0.1, dev_seed: int = 0,
                 group_by_length: bool = False) -> None:
        super().__init__()
        self.task = task or self.task
        self.spec = get_task(self.task)
        self.tokenizer = tokenizer
        self.data_dir = data_dir
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_samples = max_samples
        self.max_eval_samples = max_eval_samples
        self.seed = seed
        self.num_workers = num_workers
        self.dev_fraction = dev_fraction
        self.dev_seed = dev_seed
        self.group_by_length = group_by_length
        self.datasets: dict[str, ListDataset] = {}

    # ---- what the training code asks -------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return self.spec.num_labels

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.spec.metrics

    @property
    def monitor(self) -> str:
        return self.spec.monitor

    @property
    def has_test(self) -> bool:
        """Whether a labelled test split exists (then validation is for model selection only)."""
        return "test" in available_splits(self.task)

    # ---- data ------------------------------------------------------------------------------------
    def examples(self, split: str) -> list[Example]:
        """The (sub-sampled) raw examples of ``split``."""
        rows = read_split(self.task, split, self.data_dir, self.dev_fraction, self.dev_seed)
        n = self.max_samples if split == "train" else self.max_eval_samples
        return subsample(rows, n, self.seed)

    def encode(self, examples: list[Example]) -> list[dict[str, Any]]:
        a = [e.text_a for e in examples]
        b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
        enc = self.tokenizer(a, b, truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [{**{k: enc[k][i] for k in keys}, "labels": e.label} for i, e in enumerate(examples)]

    def setup(self, stage: str | None = None) -> None:
        for split in available_splits(self.task):
            if split not in self.datasets:  # idempotent: setup runs for fit, validate and test
                self.datasets[split] = ListDataset(self.encode(self.examples(split)))

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        if split not in self.datasets:
            raise ValueError(f"task {self.task!r} has no labelled {split!r} split")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        data = self.datasets[split]
        sampler = None
        if train and self.group_by_length:
            sampler = LengthGroupedSampler([len(f["input_ids"]) for f in data.items], self.batch_size, self.seed)
        if not train:  # under DDP every example once, not Lightning's padded shards
            sampler = unrepeated_eval_sampler(data, self.trainer)
        return DataLoader(
            data,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed) if train and sampler is None else None,
            collate_fn=functools.partial(pad_batch, pad_token_id=pad_id),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


class SST2DataModule(GLUEDataModule):
    task = "sst2"


class MRPCDataModule(GLUEDataModule):
    task = "mrpc"


class RTEDataModule(GLUEDataModule):
    task = "rte"


class CoLADataModule(GLUEDataModule):
    task = "cola"
