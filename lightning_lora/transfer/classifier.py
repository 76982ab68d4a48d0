"""A classifier that reads raw strings, and the one training loop the pipeline's stages share.

Trans-LoRA moves an adapter between models whose tokenizers differ (MiniLM word pieces, SmolLM2
BPE, nucleotide k-mers), so every stage passes strings around and each model brings its own
``encode``. :class:`TextClassifier` pairs a model with that function; :func:`fit_text_classifier`
trains its trainable parameters (the adapter and any ``modules_to_save``, nothing else) with a
plain ``pl.Trainer``: the discriminator and the distilled student are ordinary LoRA
LightningModules on (string, target) pairs.
"""

from __future__ import annotations

import inspect
import string
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core import trainable_parameters
from ..core.config import whole_number
from ..tasks.modules import linear_warmup_decay

Encode = Callable[[list[str]], dict[str, torch.Tensor]]


class TextClassifier(nn.Module):
    """``model`` + ``encode``: ``forward(texts)`` returns class logits (B, C).

    ``encode(texts)`` returns the model's keyword inputs (CPU tensors, moved to the model's device
    here); ``model(**inputs)`` returns logits or an output with ``.logits``.
    """

    def __init__(self, model: nn.Module, encode: Encode) -> None:
        super().__init__()
        self.model = model
        self.encode = encode

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):  # one string is a sequence of characters: one row per character
            raise TypeError(f"TextClassifier takes a list of texts, got one string {texts[:40]!r}; wrap it in a list")
        inputs = {k: v.to(self.device) for k, v in self.encode(list(texts)).items()}
        if "token_type_ids" in inputs and not _accepts(self.model, "token_type_ids"):
            # a BERT-style tokenizer beside a model without segments (LLaMA): transformers 4.x's
            # LlamaForSequenceClassification.forward has no **kwargs and refuses the key; 5.x ignores it
            del inputs["token_type_ids"]
        out = self.model(**inputs)
        return getattr(out, "logits", out)


def _accepts(model: nn.Module, key: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``key`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: pass everything, as before
        return True
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def hf_text_encoder(tokenizer, max_length: int = 128, template: str | None = None) -> Encode:
    """``encode`` for a Hugging Face tokenizer: padded, truncated to ``max_length`` tokens.

    ``template``: a prompt around each text (``"Review: {text}\nSentiment:"``), for a causal LM read
    at its last token; over-long inputs then lose tokens from the left, so the prompt's end, where
    the answer is read, always survives. It must hold the field ``{text}`` and no other field (write
    literal braces as ``{{`` ``}}``); it is checked here, not at the first batch."""
    whole_number(max_length, "max_length", 1)
    if template is not None:
        _check_template(template)

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        if template is None:
            return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "left"
        try:
            return dict(tokenizer([template.format(text=t) for t in texts], padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt"))
        finally:
            tokenizer.truncation_side = side

    return encode


def _check_template(template: str) -> None:
    """Refuse a template that would encode every input to the same prompt (no ``{text}``: silently
    wrong results) or fail only at the first batch (another field, a stray brace)."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a string with a {{text}} field, got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:  # "Single '{' encountered in format string"
        raise ValueError(f"template {template!r} is not a valid format string ({e}); write literal braces as "
                         "{{ and }}") from None
    other = sorted({f for f in fields if f != "text"})
    if other:
        raise ValueError(f"template {template!r} has field(s) {other}; only {{text}} is filled in "
                         "(write literal braces as {{ and }})")
    if "text" not in fields:
        raise ValueError(f"template {template!r} has no {{text}} field: every input would encode to the same prompt")


def verbalizer_weights(causal_lm: nn.Module, tokenizer, words: Sequence[str]) -> torch.Tensor:
    """Rows (C, hidden) of ``causal_lm``'s LM head for the first token of each of ``words`` (class
    order), in fp32.

    A C-way head on the LM's last hidden state that starts from these rows gives, before any
    training, the LM's own next-token logits of the C answers: the classifier starts from the
    base model's zero-shot answer instead of chance, as a LoRA on the causal LM answering in tokens
    does (Trans-LoRA's targets are causal LMs). Words usually start with a space (``" positive"``).

    Raises ``ValueError`` when a word encodes to no token, starts with a bare-space token, starts with
    the tokenizer's unknown token (a word the tokenizer does not know) or two words share their first
    token.
    """
    ids = []
    for word in words:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if not tokens:
            raise ValueError(f"verbalizer word {word!r} encodes to no token")
        if not tokenizer.decode(tokens[:1]).strip():  # SentencePiece may split " positive" as " " + "positive"
            raise ValueError(f"verbalizer word {word!r} starts with a bare-space token in this tokenizer: "
                             "give the word without its leading space")
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and tokens[0] == unk:
            path = getattr(tokenizer, "name_or_path", "")
            name = type(tokenizer).__name__ + (f" ({path})" if path else "")
            raise ValueError(f"verbalizer word {word!r} is unknown to the tokenizer {name}: its first token is the "
                             f"unknown token {getattr(tokenizer, 'unk_token', None)!r} (id {unk}), whose LM-head "
                             "row answers no class")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"verbalizer words {tuple(words)} share their first token: the classes would start equal")
    head = causal_lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(causal_lm).__name__} has no LM head (get_output_embeddings() is None)")
    return head.weight[ids].detach().float().clone()


@torch.no_grad()
def init_verbalizer_head(head: nn.Linear, causal_lm: nn.Module, tokenizer, words: Sequence[str]) -> None:
    """Set ``head`` (a ``Linear(hidden, C)`` on the LM's last hidden state, e.g. the ``score`` of a
    ``*ForSequenceClassification`` built on ``causal_lm``'s body) to :func:`verbalizer_weights`, bias
    to zero. Read the classifier at the token where the LM would answer: wrap inputs in a prompt that
    ends before the answer (``hf_text_encoder(tokenizer, template=...)``)."""
    rows = verbalizer_weights(causal_lm, tokenizer, words)
    if tuple(head.weight.shape) != tuple(rows.shape):
        raise ValueError(f"head weight {tuple(head.weight.shape)} does not match {len(words)} verbalizer words "
                         f"of hidden size {rows.shape[1]}")
    head.weight.copy_(rows)
    if head.bias is not None:
        head.bias.zero_()


@torch.no_grad()
def predict_logits(classifier: TextClassifier, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Logits (N, C), fp32 on the CPU, in eval mode (bf16 autocast on CUDA); the mode is restored."""
    was_training = classifier.training
    classifier.eval()
    device = classifier.device
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out.append(classifier(texts[i : i + batch_size]).float().cpu())
    finally:
        classifier.train(was_training)
    if not out:
        raise ValueError("predict_logits got no texts")
    return torch.cat(out)


class _StringTargetsModule(pl.LightningModule):
    """Trains ``classifier`` on (string, target) batches with ``loss_fn(logits (B, C), targets)``."""

    def __init__(self, classifier: TextClassifier, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 lr: float, weight_decay: float, warmup_ratio: float) -> None:
        super().__init__()
        self.classifier = classifier
        self.loss_fn = loss_fn
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.losses: list[torch.Tensor] = []
        # transformers' from_pretrained returns eval mode and Lightning keeps each module's mode
        self.classifier.train()

    def training_step(self, batch: tuple[list[str], torch.Tensor], batch_idx: int) -> torch.Tensor:
        texts, targets = batch
        loss = self.loss_fn(self.classifier(texts).float(), targets)
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = trainable_parameters(self.classifier)
        if not params:
            raise RuntimeError("the classifier has no trainable parameters: inject an adapter into it first")
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.max_steps)
        sched = linear_warmup_decay(opt, total, int(self.warmup_ratio * total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit_text_classifier(
    classifier: TextClassifier,
    texts: Sequence[str],
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.06,
    seed: int = 0,
    accelerator: str = "auto",
    precision: str | None = None,
) -> list[float]:
    """Train the trainable parameters of ``classifier`` for ``steps`` optimizer steps.

    Args:
        texts: N strings; ``targets`` (N, ...) one target per string (class ids or teacher logits).
        loss_fn: ``(logits (B, C) fp32, targets (B, ...)) -> scalar``.
        precision: Lightning precision; default ``"bf16-mixed"`` on CUDA, ``"32-true"`` otherwise.

    Returns:
        the loss of every step. The classifier ends on the device it started on (Lightning's
        teardown moves a trained module to the CPU; it is moved back, so a model put on the GPU
        for generation or evaluation stays there).
    """
    if len(texts) != len(targets):
        raise ValueError(f"got {len(texts)} texts and {len(targets)} targets")
    if len(texts) == 0 or steps < 1:
        raise ValueError(f"need at least one text and one step; got {len(texts)} texts, {steps} steps")
    texts = list(texts)
    loader = DataLoader(
        range(len(texts)), batch_size=min(batch_size, len(texts)), shuffle=True, drop_last=False,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=lambda idx: ([texts[i] for i in idx], targets[torch.as_tensor(idx)]),
    )
    start_device = classifier.device
    module = _StringTargetsModule(classifier, loss_fn, lr, weight_decay, warmup_ratio)
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_steps=steps, precision=precision or ("bf16-mixed" if cuda else "32-true"),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout and adapter-free randomness inside the steps
        trainer.fit(module, loader)
    classifier.to(start_device)
    return [float(x) for x in module.losses]
