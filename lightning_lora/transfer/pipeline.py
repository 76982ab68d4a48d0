"""Trans-LoRA phase B end to end: seeds -> synthetic inputs -> filter -> teacher labels -> distilled student.

    from lightning_lora.transfer import transfer
    result = transfer(teacher, student, seed_examples, generate=gen, discriminator=disc, n_samples=2000)

Only ``seed_examples[:n_seed]`` is read (indexed, never iterated), so a caller may hand over the
whole training set and still be sure the transfer saw 5 examples (invariant 4). Ablations
(invariant 6): ``filter=False`` distils on unfiltered synthetic data; ``generate=None`` on the seeds
alone.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core import trainable_parameters
from ..core.config import finite_number, whole_number
from .classifier import TextClassifier, fit_text_classifier, predict_logits
from .discriminator import filter_synthetic
from .distill import KD_LOSSES, distill, label_with_teacher

#: ``generate(seed_texts, n, round) -> list[str]``: ``n`` candidates for round ``round`` (a seed offset)
Generate = Callable[[list[str], int, int], list[str]]


@dataclass
class TransferResult:
    """The data the student was distilled on and how it was made."""

    seeds: list[str]
    texts: list[str]  # inputs the student trained on
    teacher_logits: torch.Tensor  # (len(texts), C)
    n_generated: int  # candidates drawn from the generator, duplicates included
    n_scored: int  # unique candidates the discriminator scored
    rounds: int
    losses: list[float] = field(default_factory=list)
    n_kept: int | None = None  # inputs the filter kept, before ``balance`` (None: every text in ``texts``)

    @property
    def kept_share(self) -> float:
        """Inputs the filter kept over generated candidates, before any balancing (1.0 for the
        seed-only ablation)."""
        kept = len(self.texts) if self.n_kept is None else self.n_kept
        return kept / self.n_generated if self.n_generated else 1.0


def synthesize_and_filter(generate: Generate, seeds: list[str], n: int, discriminator: TextClassifier | None, *,
                          threshold: float = 0.5, round_size: int | None = None,
                          max_rounds: int = 10) -> tuple[list[str], int, int, int]:
    """Generate rounds of candidates until ``n`` unique ones pass the discriminator (or ``max_rounds``).

    With ``discriminator=None`` every unique candidate passes (the unfiltered ablation).
    Returns ``(kept, n_generated, n_scored, rounds)``; warns when fewer than ``n`` were kept.
    """
    round_size = round_size or n
    kept: list[str] = []
    n_generated = n_scored = rounds = 0
    while len(kept) < n and rounds < max_rounds:
        candidates = generate(seeds, round_size, rounds)
        rounds += 1
        n_generated += len(candidates)
        if discriminator is None:
            seen = set(kept)
            fresh = [c for c in dict.fromkeys(candidates) if c not in seen]
            n_scored += len(fresh)
            kept.extend(fresh[: n - len(kept)])
        else:
            result = filter_synthetic(discriminator, candidates, n - len(kept), threshold=threshold, exclude=kept)
            n_scored += len(result.candidates)
            kept.extend(result.kept)
    if len(kept) < n:
        warnings.warn(f"kept {len(kept)} of the {n} requested synthetic samples after {rounds} rounds "
                      f"({n_generated} generated); raise max_rounds or round_size, or lower the threshold",
                      stacklevel=2)
    return kept, n_generated, n_scored, rounds


def balance_by_teacher_class(texts: list[str], teacher_logits: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """The first ``k`` inputs of every class the teacher predicts, in their order, ``k`` = the smallest
    class's count. ``teacher_logits`` (N, C); returns the kept texts and their logit rows.

    When the teacher predicts a single class there is nothing to balance: a warning, and the inputs
    come back unchanged.
    """
    labels = teacher_logits.argmax(-1)
    classes, counts = labels.unique(return_counts=True)
    if len(classes) < 2:
        warnings.warn(f"balance=True: the teacher labels all {len(texts)} inputs as class {int(classes[0])}; "
                      "distilling on them unbalanced", stacklevel=3)
        return texts, teacher_logits
    k = int(counts.min())
    keep = torch.cat([(labels == c).nonzero().flatten()[:k] for c in classes]).sort().values
    return [texts[i] for i in keep.tolist()], teacher_logits[keep]


def _check_transfer_args(seed_examples: Sequence[str], n_seed: int, generate: Generate | None, n_samples: int,
                         round_size: int | None, max_rounds: int, threshold: float, loss: str, temperature: float,
                         distill_kwargs: dict[str, Any]) -> None:
    """Argument checks of :func:`transfer`, all before any generation, labelling or training. Without
    them an empty seed list gave "the generator and filter kept nothing" (or a ZeroDivisionError in
    the generator), a string was read as its characters, and a bad loss, temperature, threshold or
    misspelt distillation option failed only after the synthetic set had been generated and labelled."""
    if isinstance(seed_examples, str):
        raise TypeError(f"seed_examples must be a list of texts, got one string {seed_examples[:40]!r}")
    whole_number(n_seed, "n_seed", 1)
    if len(seed_examples) == 0:
        raise ValueError("seed_examples is empty: the transfer needs at least one seed example")
    if generate is not None:
        whole_number(n_samples, "n_samples", 1)
        whole_number(max_rounds, "max_rounds", 1)
        whole_number(round_size, "round_size", 1, optional=True)
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if loss not in KD_LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r}; expected one of {KD_LOSSES}")
    if loss == "kl" and finite_number(temperature, "temperature") <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    known = ({p for p in inspect.signature(distill).parameters if p not in ("student", "texts", "teacher_logits",
                                                                          "loss", "temperature", "fit_kwargs")}
             | {p for p in inspect.signature(fit_text_classifier).parameters
                if p not in ("classifier", "texts", "targets", "loss_fn")})
    unknown = sorted(set(distill_kwargs) - known)
    if unknown:
        raise TypeError(f"transfer got unknown distillation option(s) {unknown}; known: {sorted(known)}")
    if "steps" in distill_kwargs:
        whole_number(distill_kwargs["steps"], "steps", 1)


def _check_same_classes(teacher: TextClassifier, student: TextClassifier, probe: list[str]) -> None:
    """ValueError, with :func:`~.distill.kd_loss`'s message, when the teacher's and the student's logits
    on ``probe`` (one seed) differ in shape. kd_loss found a mismatch (a 2-way source, a 3-way target)
    only at the first distillation step, after the whole synthetic set had been generated, filtered and
    labelled; one eval-mode forward of each (no gradient, no random draw) finds it first."""
    try:
        with torch.no_grad():
            t, s = predict_logits(teacher, probe), predict_logits(student, probe)
    except Exception:  # noqa: BLE001 - a classifier that cannot read a seed alone keeps kd_loss's later check
        return
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits "
                         f"{tuple(t.shape)} differ in shape (same number of classes?)")


def transfer(teacher: TextClassifier, student: TextClassifier, seed_examples: Sequence[str], *,
             generate: Generate | None, discriminator: TextClassifier | None = None, n_samples: int = 1000,
             n_seed: int = 5, filter: bool = True, threshold: float = 0.5, round_size: int | None = None,
             max_rounds: int = 10, loss: str = "kl", temperature: float = 1.0, balance: bool = False,
             **distill_kwargs) -> TransferResult:
    """Distil ``teacher`` (source base + adapter) into ``student`` (target base + fresh adapter).

    Args:
        teacher: labels the inputs (never trained).
        student: trained in place; inject its adapter before calling.
        seed_examples: only items ``0 .. n_seed - 1`` are read.
        generate: candidate generator (see :data:`Generate`); ``None`` distils on the seeds alone.
        discriminator: real-vs-synthetic filter; required when ``filter`` and ``generate`` are set.
        n_samples: inputs to distil on (the original training-set size in the paper [unconfirmed]).
        balance: keep, of the labelled inputs, the same number per teacher class (the first ones of
            each, in order; the smallest class sets the count) before distilling. Not in the paper:
            a filtered set skewed towards one class (SST-2, session 4: 77% positive) teaches the
            student that skew. Off by default.
        distill_kwargs: ``steps``, ``batch_size``, ``lr``, ... of :func:`distill`.
    """
    if not trainable_parameters(student):
        raise ValueError("the student has no trainable parameters: inject the target adapter first")
    _check_transfer_args(seed_examples, n_seed, generate, n_samples, round_size, max_rounds, threshold, loss,
                         temperature, distill_kwargs)
    if generate is not None and filter and discriminator is None:
        raise ValueError("filter=True needs a discriminator (or pass filter=False for the unfiltered ablation)")
    seeds = [seed_examples[i] for i in range(min(n_seed, len(seed_examples)))]
    _check_same_classes(teacher, student, seeds[:1])
    if generate is None:
        texts, n_generated, n_scored, rounds = list(dict.fromkeys(seeds)), 0, 0, 0
    else:
        texts, n_generated, n_scored, rounds = synthesize_and_filter(
            generate, seeds, n_samples, discriminator if filter else None, threshold=threshold,
            round_size=round_size, max_rounds=max_rounds)
    if not texts:
        raise ValueError("no inputs to distil on: the generator and filter kept nothing")
    teacher_logits = label_with_teacher(teacher, texts)
    n_kept = len(texts)
    if balance:
        texts, teacher_logits = balance_by_teacher_class(texts, teacher_logits)
    losses = distill(student, texts, teacher_logits, loss=loss, temperature=temperature, **distill_kwargs)
    return TransferResult(seeds=seeds, texts=texts, teacher_logits=teacher_logits, n_generated=n_generated, n_kept=n_kept,
                          n_scored=n_scored, rounds=rounds, losses=losses)
