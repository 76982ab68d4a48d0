"""Nucleotide BERT classifier with window pooling for long transcripts.

A transcript is cut into windows of at most ``window_tokens`` k-mer tokens (``[CLS] ... [SEP]``
added to each). Every window goes through one BERT encoder; each window gets class logits from the
``[CLS]`` pooler; a transcript's logit is pooled over its windows:

- ``pool="max"`` (default): the transcript's mRNA-vs-lncRNA log-odds is the *largest* window
  log-odds. A transcript is coding if any window holds coding sequence; an mRNA's 3' UTR window
  looks non-coding and must not outvote its CDS window (multiple-instance learning).
- ``pool="mean"``: the mean of window logits.
- ``pool="first"``: only the 5'-most window, LoRA-BERT's truncation (the baseline the docs compare).

Shapes: ``input_ids`` (W, T) windows of the whole batch, ``window_owner`` (W,) index of the
transcript each window belongs to, output ``logits`` (B, 2) with class 1 = lncRNA.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from .tokenization import SPECIAL_TOKENS, KmerTokenizer

# id of ``[NKMER]`` (a k-mer holding N or another ambiguity code), fixed by the vocabulary layout
NKMER_ID = len(SPECIAL_TOKENS)

CONFIG_FILE = "lncrna_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ModelConfig:
    """Architecture and tokenisation of the nucleotide BERT."""

    k: int = 6
    stride: int = 3
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 1024
    window_tokens: int = 512  # per window, [CLS] and [SEP] included
    max_windows: int = 16  # per transcript at inference; longer ones get evenly spaced windows
    pool: str = "max"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        """Check every field up front: a bad value in a shipped or user ``config.json`` must fail when
        the model loads, not at the first transcript that reaches the transformer."""
        ints = ("k", "stride", "hidden_size", "num_layers", "num_heads", "intermediate_size", "window_tokens",
                "max_windows")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 1 <= self.k <= 6:
            raise ValueError(f"k must be in 1..6, got {self.k}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if self.window_tokens < 3:
            raise ValueError(f"window_tokens must be at least 3 ([CLS], one k-mer, [SEP]), got {self.window_tokens}")
        if self.pool not in ("max", "mean", "first"):
            raise ValueError(f"pool must be 'max', 'mean' or 'first', got {self.pool!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

    def bert_config(self, vocab_size: int) -> BertConfig:
        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.window_tokens,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            num_labels=2,
            pad_token_id=0,
        )
        cfg._attn_implementation = "sdpa"
        return cfg


def make_tokenizer(cfg: ModelConfig) -> KmerTokenizer:
    return KmerTokenizer(k=cfg.k, stride=cfg.stride, model_max_length=cfg.window_tokens)


def window_ids(
    ids: np.ndarray, cfg: ModelConfig, cls_id: int, sep_id: int, *, max_windows: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Split one transcript's token ids (T,) into windows of ``window_tokens`` (specials included).

    Windows tile the transcript without overlap. ``[NKMER]`` tokens (k-mers holding N or another
    ambiguity code) are left out unless the transcript has nothing else. When there are more than
    ``max_windows``, an evenly spaced subset is kept (or a random subset when ``rng`` is given, for
    training).
    """
    # Why drop [NKMER]: no training or evaluation record holds an N (checked on every split), so its
    # embedding is untrained; 30 N inserted into val lncRNAs flipped 8 of 20 to mRNA and 300 N 18 of
    # 20. Masking the tokens is not enough: real k-mers pushed behind a masked run sit at positions
    # the model never saw. Leaving them out (N = missing data) makes an N run of any length a no-op.
    # N-free input: ids unchanged.
    is_n = ids == NKMER_ID
    if is_n.any() and not is_n.all():
        ids = ids[~is_n]
    body = cfg.window_tokens - 2
    n = max(1, math.ceil(len(ids) / body))
    starts = np.arange(n) * body
    limit = max_windows if max_windows is not None else cfg.max_windows
    # Why: max_windows=0 (or a negative/non-int value) used to return no window at all, and the
    # transcript then crashed collate_windows or pooled to NaN far from the call that caused it.
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"max_windows must be a positive integer, got {limit!r}")
    if cfg.pool == "first":
        starts = starts[:1]
    elif n > limit:
        starts = np.sort(rng.choice(starts, limit, replace=False)) if rng is not None else starts[np.linspace(0, n - 1, limit).round().astype(int)]
    return [np.concatenate([[cls_id], ids[s : s + body], [sep_id]]).astype(np.int64) for s in starts]


def collate_windows(windows: Sequence[Sequence[np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad the windows of several transcripts into one batch.

    Returns ``input_ids`` and ``attention_mask`` (W, T) and ``window_owner`` (W,).
    """
    flat = [w for ws in windows for w in ws]
    owner = torch.tensor([i for i, ws in enumerate(windows) for _ in ws], dtype=torch.long)
    T = max(len(w) for w in flat)
    ids = torch.zeros(len(flat), T, dtype=torch.long)
    mask = torch.zeros(len(flat), T, dtype=torch.long)
    for j, w in enumerate(flat):
        ids[j, : len(w)] = torch.from_numpy(w)
        mask[j, : len(w)] = 1
    return {"input_ids": ids, "attention_mask": mask, "window_owner": owner}


def pool_window_logits(logits: torch.Tensor, owner: torch.Tensor, n: int, pool: str) -> torch.Tensor:
    """(W, 2) window logits -> (n, 2) transcript logits; see the module docstring."""
    logits = logits.float()
    if pool in ("mean", "first"):
        out = torch.zeros(n, 2, device=logits.device).index_add_(0, owner, logits)
        count = torch.zeros(n, device=logits.device).index_add_(0, owner, torch.ones_like(owner, dtype=torch.float))
        return out / count.clamp_min(1).unsqueeze(1)
    if pool == "max":
        coding = logits[:, 0] - logits[:, 1]  # log-odds of mRNA per window
        best = torch.full((n,), -torch.inf, device=logits.device).scatter_reduce(0, owner, coding, "amax")
        return torch.stack([best / 2, -best / 2], dim=1)  # softmax of this gives sigmoid(best) for mRNA
    raise ValueError(f"unknown pool {pool!r}; expected 'max', 'mean' or 'first'")


class NucleotideClassifier(nn.Module):
    """BERT over k-mer windows + window pooling; ``forward`` returns transcript logits (B, 2)."""

    def __init__(self, cfg: ModelConfig, bert: BertForSequenceClassification | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = make_tokenizer(cfg)
        self.bert = bert if bert is not None else BertForSequenceClassification(cfg.bert_config(len(self.tokenizer)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, window_owner: torch.Tensor, n: int | None = None) -> torch.Tensor:
        n = int(window_owner.max().item()) + 1 if n is None else n
        window_logits = self.bert(input_ids=input_ids, attention_mask=attention_mask).logits
        return pool_window_logits(window_logits, window_owner, n, self.cfg.pool)

    def encode(self, seq: str, rng: np.random.Generator | None = None, max_windows: int | None = None) -> list[np.ndarray]:
        ids = self.tokenizer.encode_ids(seq)
        return window_ids(ids, self.cfg, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, rng=rng, max_windows=max_windows)

    @torch.no_grad()
    def predict_proba(self, seqs: Sequence[str], batch_tokens: int = 65536, device: str | torch.device | None = None) -> np.ndarray:
        """lncRNA probability of each sequence, (len(seqs),). Batches are built by length."""
        # Why: a bare string is a Sequence[str] of 1-nt "transcripts"; it used to return one
        # meaningless probability per nucleotide instead of failing.
        if isinstance(seqs, (str, bytes)):
            raise TypeError("predict_proba expects a list of sequences, got a single string; wrap it: [seq]")
        device = torch.device(device) if device is not None else next(self.parameters()).device
        self.eval()
        out = np.zeros(len(seqs), dtype=np.float64)
        for idx, batch in iter_batches(self, seqs, batch_tokens):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = self(batch["input_ids"], batch["attention_mask"], batch["window_owner"], n=len(idx))
            out[idx] = torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
        return out

    # ---- persistence (safetensors + JSON; no pickle) ------------------------------------------
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write ``lncrna_config.json`` and ``model.safetensors`` (weights stored in ``dtype``)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in self.bert.state_dict().items()}
        # Why: fp16 tops out at 65504; a larger weight used to be written as inf without a word, and
        # the re-loaded model then predicted NaN for every transcript.
        for k, v in self.bert.state_dict().items():
            if v.is_floating_point() and not torch.isfinite(state[k]).all() and torch.isfinite(v).all():
                raise ValueError(f"weight {k} does not fit in {dtype} (max |w| = {v.abs().max().item():.3g}); "
                                 "save with dtype=torch.float32 or torch.bfloat16")
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "NucleotideClassifier":
        """Load a model written by :meth:`save_pretrained` (fp32 on ``device``)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing model file (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
        raw = json.loads(cfg_path.read_text())
        # Why: a JSON list or an unknown key used to surface as a bare TypeError from the dataclass
        # ("argument after ** must be a mapping", "unexpected keyword argument") naming no file.
        if not isinstance(raw, dict):
            raise ValueError(f"{cfg_path}: not a lncrna model config (expected a JSON object)")
        unknown = sorted(set(raw) - set(ModelConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{cfg_path}: unknown model config key(s) {unknown}")
        try:
            cfg = ModelConfig(**raw)
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        model = cls(cfg)
        state = {k: v.float() for k, v in load_file(str(w_path)).items()}
        try:
            missing, unexpected = model.bert.load_state_dict(state, strict=False)
        except RuntimeError as e:  # Why: shape mismatches raise even with strict=False; name the files
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise ValueError(f"{w_path}: weights do not fit {CONFIG_FILE}: {first}") from None
        missing = [m for m in missing if not m.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{w_path}: weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.to(device).eval()


def iter_batches(model: NucleotideClassifier, seqs: Sequence[str], batch_tokens: int) -> Iterable[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Yield ``(indices, batch)`` over ``seqs`` sorted by length, at most ``batch_tokens`` padded tokens each."""
    order = np.argsort([len(s) for s in seqs], kind="stable")
    idx: list[int] = []
    wins: list[list[np.ndarray]] = []
    n_windows, max_len = 0, 0
    for i in order:
        w = model.encode(seqs[i])
        new_max = max(max_len, max(len(x) for x in w))
        if idx and (n_windows + len(w)) * new_max > batch_tokens:
            yield np.array(idx), collate_windows(wins)
            idx, wins, n_windows, new_max = [], [], 0, max(len(x) for x in w)
        idx.append(int(i))
        wins.append(w)
        n_windows += len(w)
        max_len = new_max
    if idx:
        yield np.array(idx), collate_windows(wins)


def mlm_model(cfg: ModelConfig, vocab_size: int) -> BertForMaskedLM:
    """The masked-language model whose encoder the classifier starts from."""
    return BertForMaskedLM(cfg.bert_config(vocab_size))


def classifier_from_mlm(cfg: ModelConfig, mlm: BertForMaskedLM) -> NucleotideClassifier:
    """A classifier whose BERT encoder is copied from a pretrained MLM (head and pooler new)."""
    model = NucleotideClassifier(cfg)
    missing, unexpected = model.bert.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
    # Why: only the pooler is new (BertForMaskedLM has none). Any other missing key (an MLM with
    # fewer layers than ``cfg``) used to leave those encoder layers silently random, and the old
    # ``assert`` on unexpected keys vanished under ``python -O``.
    missing = [m for m in missing if not m.startswith("pooler.") and not m.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"the MLM's encoder does not fit the classifier config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model
