"""Real-vs-synthetic discriminator and the filter it drives (Trans-LoRA steps 3 and 5, METHODS.md §11).

The discriminator is the source base ``M_s`` (by default; any model works) with its own adapter
and a 2-way head: class :data:`REAL` = 1, :data:`SYNTHETIC` = 0. The paper phrases it as
next-token prediction of a label word after "is this sample real?" [secondary]; on a causal LM
that is a softmax over two label-word logits, which is what a 2-way head computes, and our
source models are encoders (MiniLM, a nucleotide BERT) that have no next token to predict. So
here it is a sequence-classification head trained with cross-entropy [design].

Filtering keeps a candidate when ``p(real) > threshold`` (default 0.5, i.e. ``p(real) >
p(synthetic)``), drops duplicates, and stops at the requested size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .classifier import TextClassifier, fit_text_classifier, predict_logits

REAL, SYNTHETIC = 1, 0


def discriminator_dataset(real: Sequence[str], synthetic: Sequence[str], seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """A balanced, shuffled training set: ``m = min(len(real), len(synthetic))`` of each, seeded.

    Returns ``(texts (2m,), labels (2m,))`` with label :data:`REAL` = 1 and :data:`SYNTHETIC` = 0.
    """
    m = min(len(real), len(synthetic))
    if m == 0:
        raise ValueError(f"the discriminator needs real and synthetic samples; got {len(real)} and {len(synthetic)}")
    g = torch.Generator().manual_seed(seed)
    pick_real = torch.randperm(len(real), generator=g)[:m].tolist()
    pick_syn = torch.randperm(len(synthetic), generator=g)[:m].tolist()
    texts = [real[i] for i in pick_real] + [synthetic[i] for i in pick_syn]
    labels = torch.tensor([REAL] * m + [SYNTHETIC] * m)
    order = torch.randperm(2 * m, generator=g)
    return [texts[i] for i in order.tolist()], labels[order]


def train_discriminator(discriminator: TextClassifier, real: Sequence[str], synthetic: Sequence[str], *,
                        steps: int = 200, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                        **fit_kwargs) -> list[float]:
    """Train ``discriminator`` (2 logits; its adapter and head trainable) on a balanced real/synthetic mix.

    Returns the per-step cross-entropy losses (see :func:`fit_text_classifier` for ``fit_kwargs``).
    """
    texts, labels = discriminator_dataset(real, synthetic, seed)
    return fit_text_classifier(discriminator, texts, labels, F.cross_entropy, steps=steps, batch_size=batch_size,
                               lr=lr, seed=seed, **fit_kwargs)


def score_real(discriminator: TextClassifier, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """``p(real)`` of each text, (N,) fp32."""
    logits = predict_logits(discriminator, texts, batch_size)
    if logits.shape[-1] != 2:
        raise ValueError(f"a discriminator must output 2 logits (synthetic, real); got {logits.shape[-1]}")
    return torch.softmax(logits, dim=-1)[:, REAL]


@dataclass
class FilterResult:
    """What :func:`filter_synthetic` kept, and from what.

    ``candidates``: the unique candidates scored (first-occurrence order); ``p_real`` (U,) their
    scores; ``kept``: the passing ones, in candidate order, at most the requested ``n``.
    """

    kept: list[str]
    candidates: list[str]
    p_real: torch.Tensor
    threshold: float

    @property
    def passed_share(self) -> float:
        """Share of the unique candidates whose ``p(real)`` passed the threshold (before the cap ``n``)."""
        return float((self.p_real > self.threshold).float().mean()) if len(self.candidates) else 0.0


def filter_synthetic(discriminator: TextClassifier, candidates: Sequence[str], n: int | None = None, *,
                     threshold: float = 0.5, exclude: Sequence[str] = (), batch_size: int = 256) -> FilterResult:
    """Keep the candidates the discriminator calls real: ``p(real) > threshold``, no duplicates.

    Candidates equal to an earlier candidate or to an item of ``exclude`` (already kept in an
    earlier round) are not scored. ``n`` caps the number kept (candidate order).
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    seen = set(exclude)
    unique = []
    for c in candidates:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    p_real = score_real(discriminator, unique, batch_size) if unique else torch.zeros(0)
    kept = [c for c, p in zip(unique, p_real.tolist()) if p > threshold]
    return FilterResult(kept=kept if n is None else kept[:n], candidates=unique, p_real=p_real, threshold=threshold)
