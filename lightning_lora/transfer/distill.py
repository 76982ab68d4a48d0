"""Teacher labelling and distillation into the target adapter (Trans-LoRA steps 6 and 7, METHODS.md §11).

The teacher (source base + source adapter) labels each kept input once, under ``no_grad`` and in
eval mode: it is never trained and never sees a gradient. The student (target base + a fresh
adapter, injected by the caller) trains on (input, teacher logits) pairs; only its trainable
parameters (adapter, plus a new head when the target needs one) move.

Losses (``loss=``):

- ``"kl"`` (default here): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, mean over the batch. The
  teacher and student share the label space (class logits), so this works across tokenizers too;
  METHODS.md's reason to prefer the sequence-level loss (tokenizers differ) does not arise for
  classification heads. Student == teacher gives loss 0 and gradient 0 (invariant 5).
- ``"nll"``: cross-entropy on the teacher's argmax: the sequence-level KD of the paper's
  text-generation tasks (NLL of the greedy teacher output) for a one-token answer.
Which of the two the paper uses is [unconfirmed].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .classifier import TextClassifier, fit_text_classifier, predict_logits

KD_LOSSES = ("kl", "nll")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str = "kl",
            temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss of student logits (B, C) against teacher logits (B, C); a scalar."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape (same number of classes?)")
    s, t = student_logits.float(), teacher_logits.float()
    if loss == "kl":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        log_p_t = F.log_softmax(t / temperature, dim=-1)
        log_p_s = F.log_softmax(s / temperature, dim=-1)
        return temperature**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    if loss == "nll":
        return F.cross_entropy(s, t.argmax(dim=-1))
    raise ValueError(f"unknown distillation loss {loss!r}; expected one of {KD_LOSSES}")


def label_with_teacher(teacher: TextClassifier, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Teacher logits (N, C), fp32 on the CPU; no gradients, eval mode."""
    return predict_logits(teacher, texts, batch_size)


def distill(student: TextClassifier, texts: Sequence[str], teacher_logits: torch.Tensor, *, loss: str = "kl",
            temperature: float = 1.0, steps: int = 500, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
            **fit_kwargs) -> list[float]:
    """Train the student's trainable parameters towards ``teacher_logits`` (N, C) on ``texts`` (N,).

    Returns the per-step losses (see :func:`fit_text_classifier` for ``fit_kwargs``).
    """
    if loss not in KD_LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r}; expected one of {KD_LOSSES}")
    teacher_logits = teacher_logits.detach().float().cpu()
    return fit_text_classifier(student, texts, teacher_logits,
                               lambda s, t: kd_loss(s, t, loss, temperature),
                               steps=steps, batch_size=batch_size, lr=lr, seed=seed, **fit_kwargs)
