"""Causal language-model data: Tiny Shakespeare (train / validation) and WikiText-2 (evaluation).

Both corpora are tokenised once, whole, and cut into non-overlapping blocks of ``block_size``
tokens (a trailing partial block is dropped); a batch is ``input_ids`` (batch, block_size) with
``labels`` equal to it (the model shifts them). Perplexity over such blocks is the plain
"non-overlapping windows" figure: the first tokens of every block see little context, so it is
higher than a sliding-window perplexity.

- Tiny Shakespeare: the common split by characters, first 90% train, last 10% validation.
- WikiText-2: only ``valid.txt`` and ``test.txt`` are in this repository (``train.txt`` could not
  be obtained), so :class:`WikiText2DataModule` evaluates only. The text is the tokenised v1
  release (it contains ``<unk>``); perplexity is per model sub-word token, not per word.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from .glue import subsample, unrepeated_eval_sampler
from .paths import DataNotFound, nlp_data_dir


def tokenize_corpus(text: str, tokenizer: Any, lines_per_chunk: int = 2000) -> torch.Tensor:
    """1-D tensor of token ids of ``text``.

    Tokenised in chunks of whole lines (each chunk keeps its newlines), which avoids the
    tokenizer's over-long-sequence warning and is identical for every tokenizer that does not
    merge tokens across a newline.
    """
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for i in range(0, len(lines), lines_per_chunk):
        chunk = "".join(lines[i : i + lines_per_chunk])
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def make_blocks(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n_blocks, block_size) view of ``ids`` cut into non-overlapping blocks."""
    n = ids.numel() // block_size
    if n == 0:
        raise ValueError(f"corpus of {ids.numel()} tokens is shorter than one block of {block_size}")
    return ids[: n * block_size].view(n, block_size)


def _collate(rows: list[tuple[torch.Tensor]]) -> dict[str, torch.Tensor]:
    x = torch.stack([r[0] for r in rows])
    return {"input_ids": x, "labels": x}


class _BlockDataModule(pl.LightningDataModule):
    def __init__(self, tokenizer: Any, data_dir: str | os.PathLike | None = None, block_size: int = 256,
                 batch_size: int = 8, eval_batch_size: int | None = None, max_samples: int | None = None,
                 max_eval_samples: int | None = None, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.data_dir = data_dir
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_samples = max_samples
        self.max_eval_samples = max_eval_samples
        self.seed = seed
        self.num_workers = num_workers
        self.blocks: dict[str, torch.Tensor] = {}

    metrics: tuple[str, ...] = ("ppl",)
    monitor = "loss"  # lower is better
    has_test = False

    def _read(self, relative: str) -> str:
        path = nlp_data_dir(self.data_dir) / relative
        if not path.is_file():
            raise DataNotFound(path)
        return path.read_text(encoding="utf-8")

    def texts(self) -> dict[str, str]:  # split -> raw text
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.blocks:
            return
        for split, text in self.texts().items():
            blocks = make_blocks(tokenize_corpus(text, self.tokenizer), self.block_size)
            n = self.max_samples if split == "train" else self.max_eval_samples
            keep = subsample(list(range(len(blocks))), n, self.seed)
            self.blocks[split] = blocks[keep]

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        if split not in self.blocks:
            raise ValueError(f"{type(self).__name__} has no {split!r} split; splits: {sorted(self.blocks)}")
        data = TensorDataset(self.blocks[split])
        return DataLoader(
            data,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            # under DDP every block once, not Lightning's padded shards (CausalLM sums over processes)
            sampler=None if train else unrepeated_eval_sampler(data, self.trainer),
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            collate_fn=_collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


class TinyShakespeareDataModule(_BlockDataModule):
    """Tiny Shakespeare (1,115,394 characters): first ``train_fraction`` of the characters train,
    the rest validate. ``max_samples`` / ``max_eval_samples`` count blocks."""

    def __init__(self, tokenizer: Any, train_fraction: float = 0.9, **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        self.train_fraction = train_fraction

    def texts(self) -> dict[str, str]:
        text = self._read("tiny_shakespeare/input.txt")
        cut = int(len(text) * self.train_fraction)
        return {"train": text[:cut], "validation": text[cut:]}


class WikiText2DataModule(_BlockDataModule):
    """WikiText-2 evaluation only: ``validation`` = valid.txt, ``test`` = test.txt."""

    has_test = True

    def texts(self) -> dict[str, str]:
        return {"validation": self._read("wikitext2/valid.txt"), "test": self._read("wikitext2/test.txt")}

    def train_dataloader(self) -> DataLoader:
        raise ValueError("WikiText-2 train.txt is not in this repository (see data/nlp/PROVENANCE.md); "
                         "use WikiText2DataModule for validate/test only")
