"""Trans-LoRA (METHODS.md §11): move a trained adapter to a new base model without the training data.

Phase A, at source time (real data D available)::

    disc = TextClassifier(source_base_with_new_adapter_and_2way_head, encode)
    train_discriminator(disc, real=D_texts, synthetic=generate_synthetic(gen, tok, D_texts[:5], 1000))

Phase B, transfer (only 5 seed examples)::

    result = transfer(teacher, student, seeds, generate=lambda s, n, r: generate_synthetic(gen, tok, s, n, seed=r),
                      discriminator=disc, n_samples=2000)

Each stage is its own small function: :func:`generate_synthetic` (causal LM, few-shot prompt),
:func:`generate_synthetic_mlm` (masked LM resampling, for nucleotide BERTs),
:func:`train_discriminator`, :func:`filter_synthetic`, :func:`label_with_teacher`, :func:`distill`.

Choices where METHODS.md leaves the detail open or the setting differs from the paper:

- Generator: the paper generates with the base models themselves. Encoder bases (MiniLM, a
  nucleotide BERT) cannot continue a prompt, so the text generator is any causal LM the caller
  passes (SmolLM2-135M-Instruct in ``benchmarks/trans_lora.py``, which is also the target there),
  and nucleotide sequences are sampled from a masked LM.
- Discriminator: a 2-way sequence-classification head (see :mod:`.discriminator`), not a label word.
- Distillation loss: ``"kl"`` on class logits by default, ``"nll"`` on the teacher's argmax offered
  (see :mod:`.distill`).
- Candidates are de-duplicated before filtering in both the filtered and the unfiltered path.
- A classification target built on a causal LM can start from the LM's zero-shot answer
  (:func:`init_verbalizer_head`): in ``benchmarks/trans_lora.py`` that took SST-2 transfer from
  0.914 ± 0.030 of the source (fresh head) to 0.990 ± 0.005 over three seeds (docs/results.md).
"""

from .classifier import (
    TextClassifier,
    fit_text_classifier,
    hf_text_encoder,
    init_verbalizer_head,
    predict_logits,
    verbalizer_weights,
)
from .discriminator import (
    REAL,
    SYNTHETIC,
    FilterResult,
    discriminator_dataset,
    filter_synthetic,
    score_real,
    train_discriminator,
)
from .distill import KD_LOSSES, distill, kd_loss, label_with_teacher
from .pipeline import Generate, TransferResult, balance_by_teacher_class, synthesize_and_filter, transfer
from .synthetic import (
    build_prompt,
    generate_synthetic,
    generate_synthetic_mlm,
    sample_masked_lm,
    stitch_overlapping_tokens,
)

__all__ = [
    "KD_LOSSES", "REAL", "SYNTHETIC", "FilterResult", "Generate", "TextClassifier", "TransferResult",
    "balance_by_teacher_class", "build_prompt",
    "discriminator_dataset", "distill", "filter_synthetic", "fit_text_classifier", "generate_synthetic",
    "generate_synthetic_mlm", "hf_text_encoder", "init_verbalizer_head", "kd_loss", "label_with_teacher",
    "predict_logits",
    "sample_masked_lm", "score_real", "stitch_overlapping_tokens", "synthesize_and_filter", "train_discriminator",
    "transfer", "verbalizer_weights",
]
