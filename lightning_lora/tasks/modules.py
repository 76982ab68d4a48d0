"""LightningModules for the NLP tasks: sequence classification and causal language modelling.

Both wrap a Hugging Face model as ``self.model`` (adapt it with
``AdapterCallback(..., target="model")`` so saved adapter names match the bare model, as PEFT's
do) and optimise only ``lightning_lora.trainable_parameters(self)`` with AdamW under a linear
warmup / linear decay schedule, stepped every optimizer step, over
``trainer.estimated_stepping_batches`` steps (the same schedule as transformers'
``get_linear_schedule_with_warmup``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)

from ..core import get_adapter_method, modules_to_save_parameters, trainable_parameters


def linear_warmup_decay(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor ``s / warmup`` during warmup, then linear to 0 at ``total_steps``."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def method_optimizer(module: nn.Module, **kwargs: Any) -> torch.optim.Optimizer | None:
    """The optimizer of an injected method that brings its own (``make_optimizer``: GradNormLoRP's
    projected AdamW), over ``module``'s trainable parameters; None for every other method."""
    for sub in module.modules():
        method = get_adapter_method(sub)
        if method is not None and callable(getattr(method, "make_optimizer", None)):
            return method.make_optimizer(module, **kwargs)
    return None


def head_and_adapter_groups(module: nn.Module, head_lr: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: first every trainable parameter but the head's at the optimizer's lr
    (the adapter, and biases a ``bias="all"`` config trains), then the injected config's
    ``modules_to_save`` (a classifier head, a pooler) at ``head_lr``.

    Raises ``ValueError`` when either group would be empty: without ``modules_to_save`` there is no
    head to give a rate, and methods read the adapter's rate from the first group (LoRA-SB's init,
    IncreLoRA's new ranks)."""
    head = {id(p) for p in modules_to_save_parameters(module)}
    params = trainable_parameters(module)
    rest, mine = [p for p in params if id(p) not in head], [p for p in params if id(p) in head]
    if not mine:
        raise ValueError("head_lr is set but the adapter config has no trainable modules_to_save (the head)")
    if not rest:
        raise ValueError("head_lr is set but every trainable parameter is in modules_to_save: no adapter group")
    return [{"params": rest}, {"params": mine, "lr": head_lr}]


class _AdamWLinearSchedule(pl.LightningModule):
    lr: float
    weight_decay: float
    warmup_ratio: float
    warmup_steps: int | None
    #: lr of the adapter config's ``modules_to_save`` (the head); None: ``lr`` for all
    head_lr: float | None = None

    def configure_optimizers(self) -> dict[str, Any]:
        params = trainable_parameters(self)
        if not params:
            raise RuntimeError("no trainable parameters: was the adapter injected (AdapterCallback) before fit?")
        optimizer = method_optimizer(self, lr=self.lr, weight_decay=self.weight_decay, betas=tuple(self.betas))
        if optimizer is not None and self.head_lr is not None:
            raise ValueError(f"head_lr={self.head_lr}: the adapter method brings its own optimizer "
                             f"({type(optimizer).__name__}), which takes one lr; leave head_lr unset")
        if optimizer is None:
            groups = params if self.head_lr is None else head_and_adapter_groups(self, self.head_lr)
            optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay, betas=tuple(self.betas))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total)
        scheduler = linear_warmup_decay(optimizer, total, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class GlueMatthewsCorrCoef(MulticlassMatthewsCorrCoef):
    """Matthews correlation as GLUE scores CoLA (``sklearn.metrics.matthews_corrcoef``): torchmetrics'
    value, and 0 where the coefficient is undefined (every prediction, or every label, in one class).

    There torchmetrics returns Chicco et al.'s limit values instead, e.g. +0.0256 for a CoLA dev
    model that calls every sentence acceptable (721 vs 322), -0.0256 for all unacceptable, and +/-1
    when the labels hold one class: a model stuck at the majority class scored above chance where
    GLUE gives it 0.
    """

    def compute(self) -> torch.Tensor:
        confmat = self.confmat
        # the formula's denominator is 0 exactly when every prediction, or every label, is one class
        if int((confmat.sum(0) > 0).sum()) <= 1 or int((confmat.sum(1) > 0).sum()) <= 1:
            return torch.zeros((), device=confmat.device)
        return super().compute()


class ExampleMean(Metric):
    """Per-example mean of batch means: sum of ``value * n`` over sum of ``n``, in float32 as
    Lightning's own ``self.log`` mean (so one process gives its value bit for bit). Both sums add up
    over DDP processes, exact however the examples are split among them; a NaN stays NaN
    (torchmetrics' ``MeanMetric`` drops NaNs, and with ``nan_strategy="disable"`` drops the weights,
    torchmetrics issue 3434). ``dtype``: the sums' dtype (float64 for long evaluations: a language
    model's token sums); the mean is returned in float32 either way."""

    full_state_update = False

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=dtype), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, n: int) -> None:
        # out of place: a state reset under inference_mode may be an inference tensor
        self.total = self.total + value.detach().to(self.total.dtype) * n
        self.count = self.count + n

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


class TokenNLL(ExampleMean):
    """Mean negative log-likelihood per token: :class:`ExampleMean` of batch mean losses weighted by
    their predicted tokens, the sums in float64; an evaluation without a predicted token gives 0
    (perplexity 1), as the running sum CausalLM kept before did."""

    def __init__(self) -> None:
        super().__init__(torch.float64)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class TokenPerplexity(TokenNLL):
    """``exp`` of :class:`TokenNLL`'s float32 mean."""

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


def classification_metrics(names: tuple[str, ...] | list[str], num_labels: int) -> MetricCollection:
    """``accuracy`` (micro), ``f1`` (positive class 1 when binary, else macro), ``mcc``
    (:class:`GlueMatthewsCorrCoef`: 0 when undefined, as GLUE / scikit-learn)."""
    make = {
        "accuracy": lambda: MulticlassAccuracy(num_classes=num_labels, average="micro"),
        "f1": lambda: (BinaryF1Score() if num_labels == 2
                       else MulticlassF1Score(num_classes=num_labels, average="macro")),
        "mcc": lambda: GlueMatthewsCorrCoef(num_classes=num_labels),
    }
    unknown = [n for n in names if n not in make]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {sorted(make)}")
    return MetricCollection({n: make[n]() for n in names})


class SequenceClassifier(_AdamWLinearSchedule):
    """A transformers ``...ForSequenceClassification`` model trained with cross-entropy.

    Logs ``train_loss``; ``val_loss`` and ``val_<metric>`` per validation run; ``test_*`` likewise.
    A batch is the output of :func:`lightning_lora.tasks.glue.pad_batch`: ``input_ids``,
    ``attention_mask`` (and ``token_type_ids``) of shape (batch, length), ``labels`` (batch,).

    ``head_lr``: the peak lr of the adapter config's ``modules_to_save`` (classifier, pooler), under
    the same schedule; the adapter (and any trained bias) keeps ``lr``. Methods that train only a
    tiny core at a high rate (LoRA-SB, LoRA-XS) otherwise train a fresh head at that rate too;
    LoRA-XS's official GLUE code sets the head's rate apart. The adapter is the optimizer's first
    group, the head the second (:func:`head_and_adapter_groups`).
    """

    def __init__(self, model: nn.Module, num_labels: int = 2, metrics: tuple[str, ...] | list[str] = ("accuracy",),
                 lr: float = 5e-4, weight_decay: float = 0.0, warmup_ratio: float = 0.06,
                 warmup_steps: int | None = None, betas: tuple[float, float] = (0.9, 0.999),
                 head_lr: float | None = None) -> None:
        super().__init__()
        self.model = model
        # transformers' from_pretrained returns eval mode; Lightning keeps each module's mode at fit
        # start, so without this dropout would be off during training
        self.model.train()
        self.num_labels = num_labels
        self.lr, self.weight_decay, self.betas, self.head_lr = lr, weight_decay, betas, head_lr
        self.warmup_ratio, self.warmup_steps = warmup_ratio, warmup_steps
        self.save_hyperparameters(ignore=["model"])
        self.val_metrics = classification_metrics(tuple(metrics), num_labels).clone(prefix="val_")
        self.test_metrics = classification_metrics(tuple(metrics), num_labels).clone(prefix="test_")
        self.val_loss_mean = ExampleMean()
        self.test_loss_mean = ExampleMean()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (batch, num_labels)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**inputs).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch).float(), batch["labels"])
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["labels"].numel())
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, metrics: MetricCollection,
                   loss_mean: ExampleMean) -> None:
        logits = self(batch).float()
        n = batch["labels"].numel()
        # a metric whose states add up over DDP processes, as the metrics below do: self.log(...,
        # sync_dist=True) averaged the processes' example counts as integers, which rounds down once
        # the evaluation shards differ in length (unrepeated_eval_sampler: 5 examples on 2 processes,
        # the loss sum divided by 4)
        loss_mean.update(F.cross_entropy(logits, batch["labels"]), n)
        self.log(f"{stage}_loss", loss_mean, batch_size=n, prog_bar=True)
        metrics.update(logits.argmax(-1), batch["labels"])
        self.log_dict(metrics, prog_bar=True, batch_size=n)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics, self.val_loss_mean)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics, self.test_loss_mean)


class CausalLM(_AdamWLinearSchedule):
    """A transformers ``...ForCausalLM`` model trained on next-token prediction.

    Logs ``train_loss``; ``val_loss`` (mean per-token negative log-likelihood, nats) and
    ``val_ppl = exp(val_loss)``; ``test_*`` likewise. A batch is ``input_ids`` and ``labels`` of
    shape (batch, block) (``attention_mask`` optional; label ``-100`` is ignored). Both are
    torchmetrics objects logged from the step (:class:`TokenNLL`, :class:`TokenPerplexity`), so
    ``AdapterCallback(eval_ranks=...)`` logs each rank's own ``val_loss_rank<b>`` / ``val_ppl_rank<b>``.
    """

    def __init__(self, model: nn.Module, lr: float = 2e-4, weight_decay: float = 0.0, warmup_ratio: float = 0.03,
                 warmup_steps: int | None = None, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        super().__init__()
        self.model = model
        # transformers' from_pretrained returns eval mode; Lightning keeps each module's mode at fit
        # start, so without this dropout would be off during training
        self.model.train()
        self.lr, self.weight_decay, self.betas = lr, weight_decay, betas
        self.warmup_ratio, self.warmup_steps = warmup_ratio, warmup_steps
        self.save_hyperparameters(ignore=["model"])
        # metric states, not a running sum on the module: AdapterCallback(eval_ranks=...) gives each
        # rank's validation pass its own copies of these, where a sum here mixed every rank's passes
        # into val_loss (and no rank got its own value); their sums also add up over DDP processes.
        # named `*_loss_mean` as SequenceClassifier's: a Trainer remembers the attribute each logged
        # name came from and refuses another, so one Trainer could not validate both modules
        self.val_loss_mean, self.val_perplexity = TokenNLL(), TokenPerplexity()
        self.test_loss_mean, self.test_perplexity = TokenNLL(), TokenPerplexity()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss over the batch's predicted tokens (a scalar)."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        return self.model(**inputs).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, nll: TokenNLL, ppl: TokenPerplexity) -> None:
        # tokens that get a prediction: every label except the first of each row, minus ignored ones
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())
        if n_tokens:
            # a batch without one is left out: the model's mean loss over no tokens is NaN, and
            # NaN * 0 is NaN, which made the whole epoch's val_loss / val_ppl NaN (and
            # `lightning-lora train` then dropped them)
            loss = self(batch)
            nll.update(loss, n_tokens)
            ppl.update(loss, n_tokens)
        # logged at every step all the same: an evaluation without a predicted token logs 0 and 1
        n = batch["input_ids"].shape[0]
        self.log(f"{stage}_loss", nll, prog_bar=True, batch_size=n)
        self.log(f"{stage}_ppl", ppl, prog_bar=True, batch_size=n)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_loss_mean, self.val_perplexity)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_loss_mean, self.test_perplexity)
