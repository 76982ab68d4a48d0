"""GLUE data modules on the real files: counts, labels, splits, tokenised batches."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lightning_lora.tasks import (
    CoLADataModule,
    MRPCDataModule,
    RTEDataModule,
    SST2DataModule,
    pad_batch,
    read_split,
    split_dev,
)
from lightning_lora.tasks.glue import LengthGroupedSampler, subsample

# (task, split) -> (rows, {label: count}); the published GLUE / MSRP figures (data/nlp/PROVENANCE.md)
COUNTS = {
    ("sst2", "train"): (67349, {0: 29780, 1: 37569}),
    ("sst2", "validation"): (872, {0: 428, 1: 444}),
    ("mrpc", "train"): (3669, {0: 1191, 1: 2478}),
    ("mrpc", "validation"): (407, {0: 132, 1: 275}),
    ("mrpc", "test"): (1725, {0: 578, 1: 1147}),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "validation"): (277, {0: 146, 1: 131}),
    ("cola", "train"): (8551, {0: 2528, 1: 6023}),
    ("cola", "validation"): (1043, {0: 322, 1: 721}),
}


@pytest.mark.parametrize(("task", "split"), sorted(COUNTS))
def test_counts_and_labels(data_dir, task, split):
    rows = read_split(task, split, data_dir)
    n, labels = COUNTS[(task, split)]
    assert len(rows) == n
    assert dict(Counter(e.label for e in rows)) == labels
    pair = task in ("mrpc", "rte")
    assert all((e.text_b is not None) == pair and e.text_a for e in rows)


def test_first_rows_parse_as_in_the_files(data_dir):
    assert read_split("sst2", "train", data_dir)[0].text_a.strip() == "when are bears bears and"
    assert read_split("sst2", "train", data_dir)[0].label == 1
    cola = read_split("cola", "validation", data_dir)[0]
    assert (cola.text_a, cola.label) == ("The sailors rode the breeze clear of the rocks.", 1)
    rte = read_split("rte", "validation", data_dir)[0]
    assert rte.text_b == "Christopher Reeve had an accident." and rte.label == 1  # not_entailment
    mrpc = read_split("mrpc", "test", data_dir)[0]
    assert mrpc.text_a.startswith("PCCW's chief operating officer") and mrpc.label == 1


def test_sentences_keep_bare_quotes(data_dir):
    # QUOTE_NONE: a '"' inside a sentence stays in it instead of opening a quoted span across rows
    rows = read_split("mrpc", "train", data_dir) + read_split("mrpc", "validation", data_dir)
    quoted = [e for e in rows if '"' in e.text_a + e.text_b]
    assert len(quoted) > 100 and all("\t" not in e.text_a + e.text_b for e in quoted)


def test_mrpc_dev_split_is_seeded_stratified_and_disjoint(data_dir):
    train = read_split("mrpc", "train", data_dir)
    dev = read_split("mrpc", "validation", data_dir)
    test = read_split("mrpc", "test", data_dir)
    assert len(train) + len(dev) == 4076
    assert not set(train) & set(dev)
    assert read_split("mrpc", "validation", data_dir) == dev  # same seed, same split
    other = read_split("mrpc", "validation", data_dir, dev_seed=1)
    assert other != dev and len(other) == len(dev)
    assert not {(e.text_a, e.text_b) for e in dev} & {(e.text_a, e.text_b) for e in test}


def test_split_dev_rounds_per_class():
    from lightning_lora.tasks import Example

    rows = [Example(str(i), None, int(i < 30)) for i in range(100)]
    train, dev = split_dev(rows, 0.1, seed=3)
    assert Counter(e.label for e in dev) == {0: 7, 1: 3}
    assert len(train) == 90 and [int(e.text_a) for e in train] == sorted(int(e.text_a) for e in train)


def test_unknown_task_and_split(data_dir):
    with pytest.raises(ValueError, match="available: cola, mrpc, rte, sst2"):
        read_split("qnli", "train", data_dir)
    with pytest.raises(ValueError, match="no labelled 'test' split"):
        read_split("sst2", "test", data_dir)


def test_missing_data_dir_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="LIGHTNING_LORA_DATA"):
        read_split("sst2", "train", tmp_path)


def test_subsample_is_seeded_and_ordered():
    items = list(range(1000))
    a = subsample(items, 10, seed=0)
    assert a == subsample(items, 10, seed=0) and a == sorted(a) and len(a) == 10
    assert a != subsample(items, 10, seed=1)
    assert subsample(items, None, 0) is items and subsample(items, 5000, 0) is items


@pytest.mark.parametrize("cls", [SST2DataModule, MRPCDataModule, RTEDataModule, CoLADataModule])
def test_datamodule_batches(data_dir, minilm_tokenizer, cls):
    dm = cls(minilm_tokenizer, data_dir=data_dir, max_length=48, batch_size=4, eval_batch_size=5,
             max_samples=12, max_eval_samples=7, seed=0)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 12 and len(dm.datasets["validation"]) == 7
    assert dm.has_test == (cls is MRPCDataModule)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 48
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}
    # dynamic padding: the longest row of the batch has no padding
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]
    val = next(iter(dm.val_dataloader()))
    ex = dm.examples("validation")[:5]
    assert val["labels"].tolist() == [e.label for e in ex]
    first = minilm_tokenizer.decode(val["input_ids"][0][val["attention_mask"][0].bool()], skip_special_tokens=True)
    assert first.split()[:3] == minilm_tokenizer.decode(minilm_tokenizer(ex[0].text_a)["input_ids"],
                                                        skip_special_tokens=True).split()[:3]
    if cls in (MRPCDataModule, RTEDataModule):
        assert (val["token_type_ids"] == 1).any()  # second sentence marked


def test_mrpc_test_loader(data_dir, minilm_tokenizer):
    dm = MRPCDataModule(minilm_tokenizer, data_dir=data_dir, max_eval_samples=9)
    dm.setup("test")
    assert sum(len(b["labels"]) for b in dm.test_dataloader()) == 9
    with pytest.raises(ValueError, match="no labelled 'test' split"):
        SST2DataModule(minilm_tokenizer, data_dir=data_dir, max_samples=4, max_eval_samples=4).test_dataloader()


def test_training_order_is_seeded(data_dir, minilm_tokenizer):
    def first_labels(seed, group):
        dm = SST2DataModule(minilm_tokenizer, data_dir=data_dir, max_samples=64, batch_size=8, seed=seed,
                            group_by_length=group)
        widths = [b["input_ids"].shape[1] for b in dm.train_dataloader()]
        return widths, next(iter(dm.train_dataloader()))["labels"].tolist()

    for group in (False, True):
        assert first_labels(0, group) == first_labels(0, group)


def test_length_grouped_sampler():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    s = LengthGroupedSampler(lengths, batch_size=10, seed=0, mega_batch_mult=10)
    order = list(s)
    assert sorted(order) == list(range(1000))
    assert list(s) != order  # next epoch, new order
    batches = [order[i : i + 10] for i in range(0, 1000, 10)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches of this length mix spread about 80


def test_pad_batch():
    out = pad_batch([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
                     {"input_ids": [5], "attention_mask": [1], "labels": 0}], pad_token_id=9)
    assert out["input_ids"].tolist() == [[5, 6, 7], [5, 9, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [1, 0] and "token_type_ids" not in out
