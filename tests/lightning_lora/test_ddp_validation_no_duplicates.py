"""Validation under DDP scores every sample once: `unrepeated_eval_sampler` in the evaluation loaders
of the task data modules and of lncrna's fit, and metrics that add counts over the processes.

Lightning's own evaluation shards (torch's DistributedSampler) pad every shard to one length by
repeating samples: 5 samples on 2 processes scored sample 0 twice. The two-process run is a
subprocess (gloo on CPU), so the pytest process is never re-launched by Lightning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, RandomSampler

from lightning_lora.tasks import SST2DataModule, unrepeated_eval_sampler
from lightning_lora.tasks.glue import ListDataset
from lightning_lora.tasks.lm import _BlockDataModule

REPO = Path(__file__).resolve().parents[2]
VOCAB = 16


def _trainer(rank: int, world: int = 2, use_distributed_sampler: bool = True) -> SimpleNamespace:
    """What `unrepeated_eval_sampler` reads of a Lightning Trainer under DDP."""
    return SimpleNamespace(distributed_sampler_kwargs={"num_replicas": world, "rank": rank},
                           _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler))


def test_each_sample_goes_to_exactly_one_process():
    data = list(range(5))
    shards = [list(unrepeated_eval_sampler(data, _trainer(rank))) for rank in (0, 1)]
    assert shards == [[0, 2, 4], [1, 3]]  # Lightning's padded shards were [0, 2, 4] and [1, 3, 0]
    shards = [list(unrepeated_eval_sampler(list(range(7)), _trainer(rank, world=3))) for rank in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(7))


def test_no_sampler_where_nothing_is_sharded_or_lightning_must_shard():
    data = list(range(5))
    assert unrepeated_eval_sampler(data, None) is None  # no trainer
    assert unrepeated_eval_sampler(data, SimpleNamespace(distributed_sampler_kwargs=None)) is None  # one device
    assert unrepeated_eval_sampler(data, _trainer(0, world=1)) is None
    assert unrepeated_eval_sampler(data, _trainer(0, use_distributed_sampler=False)) is None  # the user shards
    # fewer samples than processes: one would have no batch and miss the others' collectives
    assert unrepeated_eval_sampler([0], _trainer(0)) is None


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [ord(c) % VOCAB for c in text]}


class Blocks(_BlockDataModule):
    """5 validation blocks of 4 tokens (and 3 training blocks)."""

    def texts(self) -> dict[str, str]:
        return {"train": "abcdefghijkl", "validation": "the quick brown fox!"}


def test_block_datamodule_validation_shards_hold_every_block_once():
    shards = []
    for rank in (0, 1):
        dm = Blocks(CharTokenizer(), block_size=4, eval_batch_size=2)
        dm.trainer = _trainer(rank)
        loader = dm.val_dataloader()
        # a DistributedSampler already: Lightning leaves it instead of injecting its padded one
        assert isinstance(loader.sampler, DistributedSampler)
        shards.append(torch.cat([b["input_ids"] for b in loader]))
        assert isinstance(dm.train_dataloader().sampler, RandomSampler)  # training: Lightning shards it
    blocks = Blocks(CharTokenizer(), block_size=4)
    blocks.setup()
    assert [len(s) for s in shards] == [3, 2]
    assert torch.equal(torch.cat(shards).sort(0).values, blocks.blocks["validation"].sort(0).values)


GLUE_ROWS, GLUE_LABELS = [[9, 0], [0, 9], [9, 0], [0, 9], [0, 9]], [0, 0, 0, 1, 1]


def glue_datamodule() -> SST2DataModule:
    """SST-2's module over 5 given examples (no files read); the logits are the ids / 10."""
    dm = SST2DataModule(SimpleNamespace(pad_token_id=0), eval_batch_size=2)
    items = [{"input_ids": r, "attention_mask": [1, 1], "labels": y} for r, y in zip(GLUE_ROWS, GLUE_LABELS)]
    dm.datasets = {"train": ListDataset(items), "validation": ListDataset(items)}
    return dm


def test_glue_datamodule_validation_shards_hold_every_example_once():
    shards = []
    for rank in (0, 1):
        dm = glue_datamodule()
        dm.trainer = _trainer(rank)
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)
        shards.append([row for b in loader for row in b["input_ids"].tolist()])
        assert isinstance(dm.train_dataloader().sampler, RandomSampler)
    assert shards == [[GLUE_ROWS[0], GLUE_ROWS[2], GLUE_ROWS[4]], [GLUE_ROWS[1], GLUE_ROWS[3]]]


_DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings
    from types import SimpleNamespace
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from torch import nn
    import torch.nn.functional as F
    sys.path.insert(0, sys.argv[2])  # the test module: Blocks, CharTokenizer, VOCAB
    from test_ddp_validation_no_duplicates import VOCAB, Blocks, CharTokenizer, glue_datamodule
    from lightning_lora.tasks import CausalLM, SequenceClassifier
    from lncrna.model import ModelConfig
    from lncrna.train import ClassifierModule, MLMModule, _FitLoaders, _pad_collate, _transcript_collate

    class LM(nn.Module):  # fixed next-token logits: row `token` of a seeded table
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)))
        def forward(self, input_ids, labels, attention_mask=None):
            logits = self.table[input_ids[:, :-1]]
            return SimpleNamespace(loss=F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1)))

    class Classifier(nn.Module):  # transcript logits [0, v - 5], v the second token of its first window
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
        def forward(self, input_ids, attention_mask, owner, n):
            first = torch.stack([input_ids[(owner == i).nonzero()[0, 0], 1] for i in range(n)])
            return torch.stack([torch.zeros(n), first.float() - 5], 1) + 0 * self.w

    class Sentences(nn.Module):  # logits: the first two input ids / 10
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
        def forward(self, input_ids, attention_mask=None, **_):
            return SimpleNamespace(logits=input_ids[:, :2].float() / 10 + 0 * self.w)

    class FixedMLM(MLMModule):  # the batch's mean of each row's second token, in place of the masked loss
        def _step(self, batch):
            return batch["input_ids"][:, 1].float().mean()

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    out = {}
    (res,) = trainer.validate(CausalLM(LM()), datamodule=Blocks(CharTokenizer(), block_size=4, eval_batch_size=2),
                              verbose=False)
    out["lm"] = {k: float(v) for k, v in res.items()}
    (res,) = trainer.validate(SequenceClassifier(Sentences(), metrics=("accuracy", "f1", "mcc")),
                              datamodule=glue_datamodule(), verbose=False)
    out["glue"] = {k: float(v) for k, v in res.items()}
    values, labels = [9, 1, 9, 1, 9], [1, 1, 0, 0, 0]
    transcripts = [([np.array([2, v, 3, 7])], y) for v, y in zip(values, labels)]
    (res,) = trainer.validate(ClassifierModule(Classifier()), verbose=False,
                              datamodule=_FitLoaders(None, transcripts, 2, _transcript_collate))
    out["lncrna"] = {k: float(v) for k, v in res.items()}
    cfg = ModelConfig(k=3, stride=1, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8, window_tokens=8)
    windows = [np.array([2, v, 3]) for v in (10, 20, 30, 40, 50)]
    (res,) = trainer.validate(FixedMLM(cfg), datamodule=_FitLoaders(None, windows, 2, _pad_collate), verbose=False)
    out["mlm"] = {k: float(v) for k, v in res.items()}
    with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(out, f)
''')


def test_two_process_validation_equals_the_one_process_value(tmp_path):
    script = tmp_path / "ddp_validate.py"
    script.write_text(_DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)], cwd=REPO,
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # one process over all 5 blocks: per-token mean NLL of the same fixed model
    blocks = Blocks(CharTokenizer(), block_size=4)
    blocks.setup()
    x = blocks.blocks["validation"]
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0))
    nll = F.cross_entropy(table[x[:, :-1]].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    logits, labels = torch.tensor(GLUE_ROWS).float() / 10, torch.tensor(GLUE_LABELS)
    glue_loss = float(F.cross_entropy(logits, labels))
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # Lightning's padded shards scored block 0 twice (6 blocks)
        assert abs(out["lm"]["val_loss"] / float(nll) - 1) < 1e-6, (rank, out["lm"], float(nll))
        # predictions 0 1 0 1 1: 4 of 5 right; f1 of class 1: tp 2, fp 1, fn 0; mcc (2*2 - 1*0) / sqrt(3*2*3*2).
        # Padded: example 0 twice, 5 of 6 right
        glue = out["glue"]
        assert glue["val_accuracy"] == float(torch.tensor(0.8, dtype=torch.float32)), (rank, glue)
        assert abs(glue["val_f1"] - 0.8) < 1e-6 and abs(glue["val_mcc"] - 4 / 6) < 1e-6, (rank, glue)
        # self.log(..., sync_dist=True) gave the loss sum over 4, the processes' counts 3 and 2 averaged as integers
        assert abs(glue["val_loss"] / glue_loss - 1) < 1e-6, (rank, glue, glue_loss)
        # 2 of 5 transcripts right (0 and 3); padded: 3 of 6, and each process logged its own shard
        assert out["lncrna"]["val_accuracy"] == float(torch.tensor(0.4, dtype=torch.float32)), (rank, out)
        # row mean of 10..50; padded 160 / 6, and Lightning's sync_dist mean of the unrepeated shards
        # divided by the processes' row counts averaged as integers: 150 / 4
        assert out["mlm"]["val_mlm_loss"] == 30.0, (rank, out)
