"""Pretraining (masked-language model) and fine-tuning (lncRNA vs mRNA through AdapterCallback).

Both are Lightning runs over :mod:`lncrna.data` splits; ``lncrna pretrain`` / ``lncrna train``
(Hydra, ``conf/lncrna``) call :func:`pretrain` and :func:`finetune` with plain keyword arguments.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MetricCollection

import lightning_lora as ll
from lightning_lora.tasks import ExampleMean, method_optimizer, unrepeated_eval_sampler

from .model import (
    ModelConfig,
    NucleotideClassifier,
    classifier_from_mlm,
    collate_windows,
    make_tokenizer,
    mlm_model,
)
from .errors import UserError
from .tokenization import KmerTokenizer


# ---- masked-language pretraining ------------------------------------------------------------
class MLMWindows(Dataset):
    """One random window (``window_tokens`` with specials) of each sequence per epoch."""

    def __init__(self, seqs: Sequence[str], cfg: ModelConfig, tokenizer: KmerTokenizer, seed: int = 0) -> None:
        self.ids = [tokenizer.encode_ids(s) for s in seqs]
        self.cfg, self.tok = cfg, tokenizer
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> np.ndarray:
        ids, body = self.ids[i], self.cfg.window_tokens - 2
        start = int(self.rng.integers(0, max(1, len(ids) - body + 1)))
        return np.concatenate([[self.tok.cls_token_id], ids[start : start + body], [self.tok.sep_token_id]])


def mask_spans(ids: torch.Tensor, attention: torch.Tensor, tok: KmerTokenizer, prob: float, span: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking on spans of ``span`` tokens (overlapping k-mers leak a lone masked token).

    ``ids`` (B, T) -> ``(masked_ids, labels)`` with labels -100 where nothing is predicted;
    of the chosen tokens 80% become [MASK], 10% a random k-mer, 10% stay.
    """
    special = ids < 6  # [PAD] [UNK] [CLS] [SEP] [MASK] [NKMER]
    starts = torch.rand(ids.shape, generator=generator) < prob / span
    chosen = starts.clone()
    for s in range(1, span):
        chosen[:, s:] |= starts[:, :-s]
    chosen &= ~special & attention.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=generator)
    masked = ids.clone()
    masked[chosen & (r < 0.8)] = tok.mask_token_id
    rand_tok = torch.randint(6, len(tok), ids.shape, generator=generator)
    swap = chosen & (r >= 0.8) & (r < 0.9)
    masked[swap] = rand_tok[swap]
    return masked, labels


class MLMModule(pl.LightningModule):
    def __init__(self, cfg: ModelConfig, lr: float = 1e-3, warmup: int = 500, total_steps: int = 10000,
                 mask_prob: float = 0.15, span: int = 2) -> None:
        super().__init__()
        self.cfg, self.lr, self.warmup, self.total_steps = cfg, lr, warmup, total_steps
        self.tok = make_tokenizer(cfg)
        self.model = mlm_model(cfg, len(self.tok))
        self.mask_prob, self.span = mask_prob, span
        # validation loss: the row-weighted mean Lightning's self.log(..., sync_dist=True) took, in the
        # same float32 steps, but with its sums added over processes: Lightning averaged the processes'
        # row counts as integers, which rounds down once the shards (unrepeated, _FitLoaders) differ in length
        self.val_mlm_mean = ExampleMean()

    def _step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, att = batch["input_ids"], batch["attention_mask"]
        masked, labels = mask_spans(ids.cpu(), att.cpu(), self.tok, self.mask_prob, self.span)
        out = self.model(input_ids=masked.to(ids.device), attention_mask=att, labels=labels.to(ids.device))
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch)
        self.log("mlm_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        n = batch["input_ids"].shape[0]
        self.val_mlm_mean.update(self._step(batch), n)
        self.log("val_mlm_loss", self.val_mlm_mean, prog_bar=True, batch_size=n)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, self.warmup, self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _reseed_worker_rng(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a fresh numpy generator per worker and per epoch.

    Why: ``MLMWindows`` / ``TranscriptWindows`` draw their random windows from ``self.rng``. With
    ``num_workers > 0`` every worker gets a copy of the parent's generator, and the parent never
    draws from it, so each worker replayed the same draws and every epoch replayed the first one:
    "one random window per epoch" was the same window every epoch. ``info.seed`` (torch's base seed
    for this iterator + worker id) differs per worker and per epoch and follows ``seed_everything``.
    """
    info = torch.utils.data.get_worker_info()
    if info is not None and getattr(info.dataset, "rng", None) is not None:
        info.dataset.rng = np.random.default_rng(info.seed)


def _train_loader(ds: Dataset, batch_size: int, collate_fn: Any, num_workers: int = 2) -> DataLoader:
    """Shuffled training loader whose workers draw independent random windows (see above)."""
    return DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=collate_fn, num_workers=num_workers,
                      worker_init_fn=_reseed_worker_rng)


class _FitLoaders(pl.LightningDataModule):
    """``fit``'s loaders: the training one as given, the validation one built in each process, so
    that under DDP it is this process's shard with no sequence repeated
    (:func:`lightning_lora.tasks.unrepeated_eval_sampler`); Lightning's own shards repeat up to
    world_size - 1 sequences, which the validation metrics then counted twice."""

    def __init__(self, train_loader: DataLoader, val_dataset: Dataset, batch_size: int, collate_fn: Any) -> None:
        super().__init__()
        self.train_loader, self.val_dataset = train_loader, val_dataset
        self.batch_size, self.collate_fn = batch_size, collate_fn

    def train_dataloader(self) -> DataLoader:
        return self.train_loader

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, collate_fn=self.collate_fn,
                          sampler=unrepeated_eval_sampler(self.val_dataset, self.trainer))


def _pad_collate(windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    batch = collate_windows([[w] for w in windows])
    batch.pop("window_owner")
    return batch


class PretrainedDirError(ValueError):
    """A folder given as a pretrained MLM (``mlm_dir``, ``init_dir``) that cannot be used; the message
    names the folder and the problem, in one line."""


#: ModelConfig fields the MLM's weights depend on (the rest: dropout, pooling, windows at inference)
_MLM_SHAPE_FIELDS = ("k", "stride", "hidden_size", "num_layers", "num_heads", "intermediate_size", "window_tokens")


def load_mlm(directory: str | Path, expect: ModelConfig | None = None) -> tuple[ModelConfig, Any]:
    """The MLM that :func:`pretrain` wrote to ``directory`` and its :class:`ModelConfig`.

    Everything is checked before the weights load: the three files, that both configs parse and
    agree, that the folder holds a ``BertForMaskedLM`` (not a classifier), and, with ``expect``
    (the config a run builds its model and tokenizer from), that the weights have that config's
    shapes and k-mers. Raises :class:`PretrainedDirError`.
    """
    from transformers import BertForMaskedLM

    d = Path(directory)
    if not d.is_dir():
        raise PretrainedDirError(f"{d}: no such folder")
    missing = [n for n in ("lncrna_config.json", "config.json", "model.safetensors") if not (d / n).is_file()]
    if missing:
        raise PretrainedDirError(f"{d}: not a pretrained MLM folder (missing {', '.join(missing)}; "
                                 "`lncrna pretrain` writes one)")
    try:
        raw = json.loads((d / "lncrna_config.json").read_text())
        bert = json.loads((d / "config.json").read_text())
        if not isinstance(raw, dict) or not isinstance(bert, dict):
            raise ValueError("expected JSON objects")
        cfg = ModelConfig(**raw)
    except (OSError, ValueError, TypeError) as e:
        raise PretrainedDirError(f"{d}: unreadable config ({' '.join(str(e).split())})") from None
    arch = bert.get("architectures") or []
    if arch and "BertForMaskedLM" not in arch:
        raise PretrainedDirError(f"{d}: holds a {', '.join(arch)}, not a pretrained MLM (BertForMaskedLM)")
    pairs = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "intermediate_size": "intermediate_size", "window_tokens": "max_position_embeddings"}
    differ = [f"{ours} {getattr(cfg, ours)} against {theirs} {bert.get(theirs)}" for ours, theirs in pairs.items()
              if bert.get(theirs) != getattr(cfg, ours)]
    if differ:
        raise PretrainedDirError(f"{d}: lncrna_config.json and config.json disagree ({'; '.join(differ)})")
    if expect is not None:
        differ = [f"{f} {getattr(cfg, f)} (run: {getattr(expect, f)})" for f in _MLM_SHAPE_FIELDS
                  if getattr(cfg, f) != getattr(expect, f)]
        if differ:
            raise PretrainedDirError(f"{d}: the MLM does not match this run's model config: {'; '.join(differ)}")
    try:
        mlm = BertForMaskedLM.from_pretrained(d).float()
    except Exception as e:  # truncated or foreign weights: safetensors, torch and transformers raise their own
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PretrainedDirError(f"{d}: cannot load the MLM weights ({first})") from None
    return cfg, mlm


PRETRAIN_LOG = "pretrain_log.json"
#: stands in for the epochs already done when ``init_dir`` has no readable pretrain_log.json
_UNKNOWN_EPOCHS_OFFSET = 1_000_003


def continued_data_seed(seed: int, init_dir: str | Path | None) -> tuple[int, dict[str, Any]]:
    """The seed of a pretraining run's data order (shuffling, random windows, masks) and how it was made.

    Without ``init_dir`` it is ``seed``. With ``init_dir`` it is derived from ``seed``, the epochs
    already done and the earlier run's own data seed (both from ``init_dir/pretrain_log.json`` if it
    records them, else a fixed offset), so a continued run with the same ``seed`` does not replay
    the earlier run's batches, and nor does a continuation of a continuation. Returns
    ``(data_seed, record)``; ``record`` goes into the new run's pretrain_log.json."""
    if init_dir is None:
        return seed, {"seed": seed, "data_seed": seed, "init_dir": None, "epochs_before": 0}
    before: int | None = None
    previous_seed: int | None = None
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
        run = json.loads((Path(init_dir) / PRETRAIN_LOG).read_text())["run"]
        before, previous_seed = int(run["epochs_total"]), int(run["data_seed"])
    if before is None or previous_seed is None:
        before, previous_seed, source = None, seed, f"no epoch count in {PRETRAIN_LOG} of init_dir: fixed offset"
    else:
        source = f"seed, epochs_before and the data_seed in {PRETRAIN_LOG} of init_dir"
    offset = _UNKNOWN_EPOCHS_OFFSET if before is None else before
    # a hash, not seed + offset: runs of a chain, and a fresh run whose seed equals the sum, stay apart
    data_seed = int(np.random.SeedSequence([seed, previous_seed, offset]).generate_state(1)[0] & 0x7FFFFFFF)
    return data_seed, {"seed": seed, "data_seed": data_seed, "data_seed_from": source, "init_dir": str(init_dir),
                       "epochs_before": before}


def pretrain(
    out_dir: str | Path, *, cfg: ModelConfig | None = None, epochs: int = 10, batch_size: int = 256,
    lr: float = 1e-3, max_minutes: float | None = None, trainer_kwargs: dict[str, Any] | None = None,
    data_root: str | Path | None = None, seed: int = 0, init_dir: str | Path | None = None,
) -> Path:
    """MLM-pretrain a nucleotide BERT on the training split (never a test sequence).

    ``init_dir`` warm-starts from an earlier run's MLM: only its weights are loaded. It is not a
    resume: the optimizer state (AdamW moments) starts empty and the LR schedule starts again with
    its warmup, over this run's ``epochs``. The data order (shuffling, windows, masks) is seeded
    by :func:`continued_data_seed`, not by ``seed`` alone, so the continued run sees new batches.
    Writes ``out_dir/mlm`` (transformers folder, fp16 weights: small enough to move) with
    ``pretrain_log.json`` (final metrics, and under ``"run"`` the seeds, ``init_dir`` and the
    epochs before / in / after this run), and returns it.
    """
    from .data import load_split

    _check_run_args(epochs=epochs, batch_size=batch_size, lr=lr, max_minutes=max_minutes)
    data_seed, run_record = continued_data_seed(seed, init_dir)
    pl.seed_everything(data_seed)
    cfg = cfg or ModelConfig()
    kw = {"root": data_root} if data_root else {}
    train, val = load_split("train", **kw), load_split("val", **kw)
    tok = make_tokenizer(cfg)
    train_ds = MLMWindows(list(train.seq), cfg, tok, data_seed)
    val_ds = MLMWindows(list(val.seq), cfg, tok, data_seed + 1)
    steps = epochs * math.ceil(len(train_ds) / batch_size)
    module = MLMModule(cfg, lr=lr, warmup=min(500, steps // 10), total_steps=steps)
    if init_dir is not None:
        # train(): from_pretrained returns the model in eval mode, and Lightning keeps a submodule's
        # mode, so the warm-started run trained with its dropout off
        module.model = load_mlm(init_dir, expect=cfg)[1].train()
    trainer = pl.Trainer(
        max_epochs=epochs, max_time={"minutes": max_minutes} if max_minutes else None, logger=False,
        enable_checkpointing=False, **(trainer_kwargs or {}),
    )
    trainer.fit(module, datamodule=_FitLoaders(_train_loader(train_ds, batch_size, _pad_collate), val_ds, batch_size,
                                               _pad_collate))
    path = Path(out_dir) / "mlm"
    module.model.half().save_pretrained(path)
    (path / "lncrna_config.json").write_text(json.dumps(cfg.__dict__, indent=2))
    done = int(trainer.current_epoch)  # completed epochs (a max_minutes stop mid-epoch does not count it)
    run_record.update(epochs_this_run=done, epochs_total=(run_record["epochs_before"] or 0) + done,
                      warm_start=init_dir is not None, optimizer_and_lr_schedule="restarted (warmup)"
                      if init_dir is not None else "fresh")
    log = {**{k: float(v) for k, v in trainer.callback_metrics.items()}, "run": run_record}
    (path / PRETRAIN_LOG).write_text(json.dumps(log, indent=2))
    return path


# ---- fine-tuning --------------------------------------------------------------------------
class TranscriptWindows(Dataset):
    """Windows (up to ``train_windows`` random ones) and label of each transcript."""

    def __init__(self, model: NucleotideClassifier, seqs: Sequence[str], labels: Sequence[int], train_windows: int | None, seed: int = 0) -> None:
        self.ids = [model.tokenizer.encode_ids(s) for s in seqs]
        self.labels = np.asarray(labels)
        self.model, self.train_windows = model, train_windows
        self.rng = np.random.default_rng(seed) if train_windows else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[np.ndarray], int]:
        from .model import window_ids

        tok = self.model.tokenizer
        w = window_ids(self.ids[i], self.model.cfg, tok.cls_token_id, tok.sep_token_id, max_windows=self.train_windows, rng=self.rng)
        return w, int(self.labels[i])


def _transcript_collate(items: list[tuple[list[np.ndarray], int]]) -> dict[str, torch.Tensor]:
    batch = collate_windows([w for w, _ in items])
    batch["labels"] = torch.tensor([y for _, y in items], dtype=torch.long)
    return batch


class ThresholdAccuracy(ExampleMean):
    """Share of transcripts whose lncRNA probability ``p`` gives their label, lncRNA (1) when
    ``p >= 0.5``: as predict's call (label lncRNA if prob >= threshold) and lncrna.metrics; with ``>``
    a probability of exactly 0.5 (equal logits) counted as mRNA here and lncRNA everywhere else.
    :class:`ExampleMean`'s sums, in float64, of right calls (not of a batch mean times its size:
    counts stay exact), summed over DDP processes (each scores its own unrepeated shard,
    :class:`_FitLoaders`); the share returned in float32."""

    def __init__(self) -> None:
        super().__init__(torch.float64)

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:  # type: ignore[override]
        """``probs``: lncRNA probabilities (B,); ``labels``: 0 / 1 (B,)."""
        # out of place: a state reset under Lightning's inference_mode (trainer.validate) is an
        # inference tensor, which fit's no_grad validation could not update in place
        self.total = self.total + ((probs >= 0.5).long() == labels).sum().double()
        self.count = self.count + labels.numel()


class ClassifierModule(pl.LightningModule):
    """Fine-tuning: cross-entropy on transcript logits; logs ``train_loss`` and ``val_accuracy``
    (:class:`ThresholdAccuracy`, a metric object logged from ``validation_step``, so that
    ``AdapterCallback(eval_ranks=...)`` logs each rank's own ``val_accuracy_rank<b>``)."""

    def __init__(self, model: NucleotideClassifier, lr: float = 1e-3, total_steps: int = 1000, warmup: int = 100,
                 weight_decay: float = 0.01) -> None:
        super().__init__()
        self.model, self.lr, self.total_steps, self.warmup = model, lr, total_steps, warmup
        self.weight_decay = weight_decay
        # a metric, not lists of probabilities scored at epoch end: AdapterCallback(eval_ranks=...) gives
        # each rank's validation pass its own copy, where lists on the module took every rank's passes
        # into one val_accuracy (and no rank got its own). A collection named as SequenceClassifier's:
        # a Trainer remembers the attribute each logged name came from and refuses another, so one
        # Trainer could not validate both modules
        self.val_metrics = MetricCollection({"accuracy": ThresholdAccuracy()}, prefix="val_")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_ids"], batch["attention_mask"], batch["window_owner"], n=len(batch["labels"]))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(self(batch), batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch)
        self.val_metrics.update(torch.softmax(logits.float(), 1)[:, 1], batch["labels"])
        self.log_dict(self.val_metrics, prog_bar=True, batch_size=len(batch["labels"]))

    def configure_optimizers(self):
        # a method that brings its own optimizer (GradNormLoRP's projected AdamW: the projection is half
        # the method) gets it, as lightning_lora.tasks' modules do; plain AdamW trained only its layer
        opt = (method_optimizer(self, lr=self.lr, weight_decay=self.weight_decay)
               or torch.optim.AdamW(ll.trainable_parameters(self), lr=self.lr, weight_decay=self.weight_decay))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, self.warmup, self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


#: methods whose layers do not merge but fold into a dense nn.Linear otherwise (:func:`_fold_adapter`)
_DENSE_UNLOAD = ("lq_lora",)


def _fold_adapter(bert: torch.nn.Module, method: str) -> None:
    """Replace ``bert``'s adapter layers by plain layers computing what the adapted model computed.

    LQ-LoRA's ``merge`` refuses (its base is quantized): its dense ``Q + s·BA`` copy is the same function."""
    if method in _DENSE_UNLOAD:
        from lightning_lora.methods.lq_lora import unload_dense

        unload_dense(bert)
    ll.unload(bert, merge=True)  # the rest merge; also unwraps modules_to_save


class RunConfigError(UserError, ValueError):
    """A run setting (epochs, batch size, species, data root ...) that cannot train; one line.

    A :class:`lncrna.errors.UserError` so that ``lncrna train`` / ``lncrna pretrain`` print it as one
    ``error:`` line (exit 2) without an unrelated ``adapter=`` / ``init_dir=`` prefix."""


def _check_run_args(*, epochs: Any, batch_size: Any, lr: Any, max_minutes: Any,
                    train_windows: Any = 1, weight_decay: Any = 0.0) -> None:
    """One-line :class:`RunConfigError` for run settings that cannot train, before any data or model loads.

    Why: ``epochs=0`` used to "succeed" and save the untrained (or merely re-saved) model as if it
    were trained, and ``batch_size=0`` / ``train_windows=0`` / ``lr<=0`` failed deep inside the
    DataLoader or its worker processes with a traceback that did not name the setting.
    """
    def whole(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def number(v: Any) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

    problems = [f"{name} must be an integer >= 1, got {v!r}"
                for name, v in (("epochs", epochs), ("batch_size", batch_size), ("train_windows", train_windows))
                if not (whole(v) and v >= 1)]
    if not (number(lr) and lr > 0):
        problems.append(f"lr must be a finite number > 0, got {lr!r}")
    if not (number(weight_decay) and weight_decay >= 0):
        problems.append(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if max_minutes is not None and not (number(max_minutes) and max_minutes > 0):
        problems.append(f"max_minutes must be a number > 0 or null, got {max_minutes!r}")
    if problems:
        raise RunConfigError("; ".join(problems))


def select_training_rows(df, species: str):
    """Rows of a split for a training-set choice: ``"mouse"`` (both classes from mouse) or ``"mixed"``."""
    if species == "mouse":
        return df[df.species == "mouse"]
    if species == "mixed":
        return df
    raise ValueError(f"unknown training species {species!r}; expected 'mouse' or 'mixed'")


def finetune(
    out_dir: str | Path, *, mlm_dir: str | Path | None, cfg: ModelConfig | None = None, method: str = "lora",
    adapter: dict[str, Any] | None = None, species: str = "mouse", epochs: int = 8, batch_size: int = 64,
    lr: float = 1e-3, train_windows: int = 4, max_minutes: float | None = None,
    trainer_kwargs: dict[str, Any] | None = None, data_root: str | Path | None = None, seed: int = 0,
    weight_decay: float = 0.01, baseline_dir: str | Path | None = None,
) -> NucleotideClassifier:
    """Fine-tune the pretrained encoder for lncRNA vs mRNA with an adapter through AdapterCallback.

    ``weight_decay``: AdamW's, 0.01 as LoRA-BERT's code (and the shipped model); its README says 0.001
    (METHODS.md §10 leaves both open).

    The classifier head and pooler train in full (``modules_to_save``); the encoder gets the
    adapter; at the end the adapter is merged so the saved model is a plain BERT (no inference cost):
    LQ-LoRA's as its dense ``Q + s·BA``; a method that cannot merge (SMoRA) is refused before any data
    loads (:class:`RunConfigError`). Writes ``out_dir/classifier`` (with the cascade's ``stack.json``
    fitted on validation against the feature baseline of ``baseline_dir``: :func:`fit_cascade`, so
    ``lncrna predict --model out_dir/classifier`` runs it as it is) and ``out_dir/adapter`` (the
    adapter alone, PEFT format for LoRA). The returned model carries ``train_seconds``,
    ``final_metrics`` (the last logged values: ``train_loss``, ``val_accuracy``, ...) and
    ``cascade_metrics`` (the stack fit's).
    """
    from .data import load_split

    _check_run_args(epochs=epochs, batch_size=batch_size, lr=lr, max_minutes=max_minutes, train_windows=train_windows,
                    weight_decay=weight_decay)
    if species not in ("mouse", "mixed"):  # before the MLM and the data load, not after
        raise RunConfigError(f"unknown training species {species!r}; expected 'mouse' or 'mixed'")
    if method != "full" and method not in _DENSE_UNLOAD and not ll.get_method(method).mergeable:
        # Why: the saved classifier is a plain BERT (what `lncrna predict` loads); SMoRA's update cannot
        # be merged into it, and the run used to fail with a traceback only after the whole fit
        raise RunConfigError(f"adapter={method}: its update cannot be merged into the base weights, and lncrna "
                             "train saves the classifier merged (a plain BERT for `lncrna predict`); "
                             "choose a mergeable adapter")
    pl.seed_everything(seed)
    if mlm_dir is not None:
        cfg, mlm = load_mlm(mlm_dir)
        model = classifier_from_mlm(cfg, mlm)
    else:
        cfg = cfg or ModelConfig()
        model = NucleotideClassifier(cfg)
    kw = {"root": data_root} if data_root else {}
    train = select_training_rows(load_split("train", **kw), species)
    if len(train) == 0 or train.label.nunique() < 2:
        # Why: an empty or one-class training set failed inside Lightning (empty loader) or trained a
        # classifier that can only answer one class; say which data root and species did it.
        raise RunConfigError(f"training split under {data_root or 'the default data root'} has "
                          f"{len(train)} {species} row(s) with labels {sorted(set(train.label))}; need both classes")
    val = load_split("val", **kw)
    train_ds = TranscriptWindows(model, list(train.seq), list(train.label), train_windows, seed)
    val_ds = TranscriptWindows(model, list(val.seq), list(val.label), None)
    steps = epochs * math.ceil(len(train_ds) / batch_size)
    module = ClassifierModule(model, lr=lr, total_steps=steps, warmup=max(1, steps // 20), weight_decay=weight_decay)
    adapter_kwargs = {"target_modules": ["query", "key", "value", "dense"], "modules_to_save": ["classifier", "pooler"],
                      **(adapter or {})}
    if method == "full":
        callbacks = []
    else:
        from lightning_lora.train import InjectionErrorsAsConfigErrors

        callback = ll.AdapterCallback(method, target="model.bert", export_dir=Path(out_dir) / "adapter", **adapter_kwargs)
        # what the injection refuses (no target matches, a rank the shapes forbid) is the adapter
        # config's fault: lightning_lora.train.ConfigError, one line from the CLI
        callback.setup = InjectionErrorsAsConfigErrors(callback)
        callbacks = [callback]
    trainer = pl.Trainer(
        max_epochs=epochs, max_time={"minutes": max_minutes} if max_minutes else None, logger=False,
        enable_checkpointing=False, callbacks=callbacks, **(trainer_kwargs or {}),
    )
    t0 = time.time()
    trainer.fit(module, datamodule=_FitLoaders(_train_loader(train_ds, batch_size, _transcript_collate), val_ds,
                                               batch_size, _transcript_collate))
    model.train_seconds = time.time() - t0  # type: ignore[attr-defined]
    # the last logged values (val_accuracy, train_loss, ...): the run has no logger, so nothing else keeps them
    model.final_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # type: ignore[attr-defined]
    if method != "full":
        _fold_adapter(model.bert, method)
    model.save_pretrained(Path(out_dir) / "classifier")
    model.cascade_metrics = fit_cascade(model.eval(), val, Path(out_dir) / "classifier",  # type: ignore[attr-defined]
                                        baseline_dir=baseline_dir)
    return model.eval()


def fit_cascade(model: NucleotideClassifier, val: Any, classifier_dir: str | Path,
                baseline_dir: str | Path | None = None) -> dict[str, float]:
    """Write ``classifier_dir/stack.json``, the cascade ``lncrna predict --model`` needs: the band and
    stacking weights fitted (:meth:`lncrna.predict.StackParams.fit`) on the validation split ``val``
    (a :func:`lncrna.data.load_split` frame) with the feature baseline of ``baseline_dir`` (default:
    the shipped one, which ``lncrna predict`` uses unless given ``--baseline``). As for the shipped
    model, only the mouse part of validation is used where it has both classes (the species-shortcut
    rule, docs/results.md); otherwise all of it. Where the records cannot support a fit (fewer than
    five of a class), the file makes the transformer decide alone (every record is sent to it, its
    probability kept), with a warning. Returns the fit's metrics (empty for that fallback)."""
    import warnings

    from .features import DEFAULT_BASELINE_DIR, FeatureBaseline
    from .predict import StackParams

    mouse = (val.species == "mouse").to_numpy()
    part = val[mouse] if len(set(val.label[mouse])) == 2 else val
    where = "mouse part of the validation split" if part is not val else "validation split"
    seqs, y = list(part.seq), part.label.to_numpy()
    p_b = FeatureBaseline.load(baseline_dir or DEFAULT_BASELINE_DIR).predict_proba(seqs)
    p_t = model.predict_proba(seqs)
    try:
        stack, metrics = StackParams.fit(y, p_b, p_t)
    except ValueError as e:
        warnings.warn(f"stack.json: {e}; the cascade sends every record to the transformer and keeps its "
                      "probability", stacklevel=2)
        stack, metrics = StackParams(low=0.0, high=1.0, w_baseline=0.0, w_transformer=1.0, bias=0.0), {}
        note = f"not fitted ({e}): the transformer alone"
    else:
        note = f"{where} ({len(y)} records)"
        if stack.low >= stack.high:
            note += ("; the transformer gained no MCC over the feature baseline there, so the band is empty "
                     "and the baseline decides every record")
            warnings.warn(f"stack.json: {note}", stacklevel=2)
    stack.save(Path(classifier_dir) / "stack.json", fitted_on=note)
    return metrics
