"""lncrna's fine-tuning module (``lncrna.train.ClassifierModule``) under
``AdapterCallback(eval_ranks=...)``: each DyLoRA rank's validation pass logs its own
``val_accuracy_rank<b>``, and ``val_accuracy`` is the deployed rank's. The probabilities used to be
kept in lists on the module and scored at epoch end: every rank's pass went into one accuracy, and
no rank got its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lightning.pytorch as pl
import lightning_lora as ll
from lightning_lora.methods.dylora import rank_context
from lncrna.model import ModelConfig, NucleotideClassifier
from lncrna.train import ClassifierModule, TranscriptWindows, _FitLoaders, _train_loader, _transcript_collate

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
]

TINY = dict(k=3, stride=3, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, window_tokens=16,
            max_windows=4, dropout=0.0)


def _transcripts(n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    seqs = ["".join(rng.choice(list("ACGT"), int(rng.integers(40, 120)))) for _ in range(n)]
    return seqs, [i % 2 for i in range(n)]


def _old_accuracy(module: ClassifierModule, loader) -> float:
    """val_accuracy as ClassifierModule computed it before the metric: the count of ``p >= 0.5`` calls
    that equal the label over the count of transcripts, in float64, cast to float32."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        p = torch.cat([torch.softmax(module(b).float(), 1)[:, 1] for b in loader])
        y = torch.cat([b["labels"] for b in loader])
    module.train(was_training)
    counts = torch.tensor([float(((p >= 0.5).long() == y).sum()), float(len(y))], dtype=torch.float64)
    return float((counts[0] / counts[1]).float())


def _trainer(callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=list(callbacks), **kwargs)


def test_eval_ranks_log_each_rank_s_own_validation_accuracy_inside_fit_and_in_validate():
    torch.manual_seed(0)
    model = NucleotideClassifier(ModelConfig(**TINY))
    module = ClassifierModule(model, lr=1e-3, total_steps=2, warmup=1)
    targets = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
    with torch.no_grad():  # a random tiny BERT pools every transcript alike: spread the head's logits
        model.bert.classifier.weight.mul_(100)
        model.bert.classifier.bias.zero_()
    # by hand first, then moved away from B = 0 so that the ranks call transcripts differently; the
    # callback adopts the injected adapter (same config)
    ll.inject_adapter(model.bert, "dylora", r=4, **targets)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.bert.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 3.0)
    cb = ll.AdapterCallback("dylora", target="model.bert", r=4, eval_ranks=[1, 4], **targets)
    seqs, labels = _transcripts(48, 0)
    val_ds = TranscriptWindows(model, seqs, labels, None)
    train_ds = TranscriptWindows(model, *_transcripts(8, 1), train_windows=1)
    data = _FitLoaders(_train_loader(train_ds, 4, _transcript_collate, num_workers=0), val_ds, 8, _transcript_collate)
    val = data.val_dataloader()  # no trainer: every transcript, in order
    trainer = _trainer([cb], max_steps=2, limit_train_batches=2, num_sanity_val_steps=0)

    def check(res: dict[str, float]) -> None:
        expected = {}
        for b in (1, 4):
            with rank_context(model.bert, b):
                expected[b] = _old_accuracy(module, val)
        assert expected[1] != expected[4]  # the ranks do differ
        assert {k: res[k] for k in ("val_accuracy", "val_accuracy_rank1", "val_accuracy_rank4")} == {
            "val_accuracy": expected[4], "val_accuracy_rank1": expected[1], "val_accuracy_rank4": expected[4]}

    (res,) = trainer.validate(module, datamodule=data, verbose=False)  # inference_mode, before fit's no_grad
    check(res)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    check({k: float(v) for k, v in trainer.callback_metrics.items()})  # the validation at the end of fit
    (res,) = trainer.validate(module, datamodule=data, verbose=False)
    check(res)
    # the module's own metric saw only the plain passes: nothing per rank was registered on it
    assert [n for n, _ in module.named_children()] == ["model", "val_metrics"]


class _Fixed(nn.Module):
    """Transcript logits [0, v - 5], v the second token of its first window: v = 5 gives equal logits
    (probability exactly 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, owner, n):
        first = torch.stack([input_ids[(owner == i).nonzero()[0, 0], 1] for i in range(n)])
        return torch.stack([torch.zeros(n), first.float() - 5], 1) + 0 * self.w


def test_without_eval_ranks_validation_accuracy_is_the_old_formula_and_one_half_is_lncrna():
    values, labels = [5, 5, 1, 9, 9, 1, 5], [1, 0, 0, 1, 0, 1, 1]
    transcripts = [([np.array([2, v, 3, 7])], y) for v, y in zip(values, labels)]
    module = ClassifierModule(_Fixed())
    data = _FitLoaders(None, transcripts, 3, _transcript_collate)
    (res,) = _trainer().validate(module, datamodule=data, verbose=False)
    # probability 0.5 (v = 5) is lncRNA (1), as predict's and lncrna.metrics' `>= threshold`: 4 of 7
    assert res == {"val_accuracy": float(torch.tensor(4 / 7, dtype=torch.float64).float())}
    assert res["val_accuracy"] == _old_accuracy(module, data.val_dataloader())


def test_validation_accuracy_counts_add_over_processes():
    """Each DDP process scores its own shard; the metric's sums are what torchmetrics adds over the
    processes (``merge_state`` applies the same reductions): 1 of 3 right here and 1 of 2 right on the
    other process give 2/5, not this shard's 1/3."""
    mine, other = ClassifierModule(None).val_metrics["accuracy"], ClassifierModule(None).val_metrics["accuracy"]
    mine.update(torch.tensor([0.9, 0.9, 0.9]), torch.tensor([1, 0, 0]))
    other.update(torch.tensor([0.9, 0.2]), torch.tensor([0, 0]))
    mine.merge_state(other)
    assert float(mine.compute()) == float(torch.tensor(2 / 5, dtype=torch.float32))


def test_one_trainer_validates_the_lm_the_sentence_classifier_and_this_module_in_turn():
    """A Trainer keeps, for its whole life, the attribute each name logged from validation_step came
    from, and refuses another: CausalLM's and SequenceClassifier's val_loss, and SequenceClassifier's
    and this module's val_accuracy, are logged from metric attributes of the same names."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from lightning_lora.tasks import CausalLM, SequenceClassifier

    class LM(nn.Module):  # next-token logits: row `token` of a seeded table
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))

        def forward(self, input_ids, labels, attention_mask=None):
            logits = self.table[input_ids[:, :-1]].reshape(-1, 8)
            return SimpleNamespace(loss=nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1)))

    class Sentences(nn.Module):  # logits: the first two input ids / 10
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask=None, **_):
            return SimpleNamespace(logits=input_ids[:, :2].float() / 10 + 0 * self.w)

    x = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 0, 1]])
    y = torch.tensor([0, 1, 1])
    trainer = _trainer()
    (lm,) = trainer.validate(CausalLM(LM()), DataLoader([{"input_ids": r, "labels": r} for r in x], batch_size=2),
                             verbose=False)
    (sentences,) = trainer.validate(SequenceClassifier(Sentences()), verbose=False, dataloaders=DataLoader(
        [{"input_ids": r, "attention_mask": torch.ones(3, dtype=torch.long), "labels": t} for r, t in zip(x, y)],
        batch_size=2))
    transcripts = [([np.array([2, v, 3, 7])], t) for v, t in zip([5, 1, 9], [1, 1, 1])]
    (lncrna,) = trainer.validate(ClassifierModule(_Fixed()), verbose=False,
                                 datamodule=_FitLoaders(None, transcripts, 2, _transcript_collate))
    assert set(lm) == {"val_loss", "val_ppl"} and set(sentences) == {"val_loss", "val_accuracy"}
    assert sentences["val_accuracy"] == pytest.approx(1 / 3) and lncrna == {"val_accuracy": pytest.approx(2 / 3)}
