"""Overlapping k-mer tokenizer for nucleotide sequences (LoRA-BERT style, METHODS.md §10).

A sequence of length L becomes the k-mers starting at 0, stride, 2*stride, ... that fit entirely,
i.e. ``(L - k) // stride + 1`` tokens (0 if L < k). With k=3, stride=1 that is L - 2 tokens, one per
overlapping 3-mer, as in LoRA-BERT. A tail shorter than ``stride`` after the last k-mer is not
covered (only possible with stride > 1).

Vocabulary (fixed by k; no training):

====  ==============================================================================
id    token
====  ==============================================================================
0-4   ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (LoRA-BERT's order and ids)
5     ``[NKMER]``: any k-mer containing ``N`` (every IUPAC ambiguity code is read as ``N``)
6..   the 4**k k-mers over ``ACGT`` in lexicographic order (``AAA`` = 6, ``AAC`` = 7, ...)
====  ==============================================================================

LoRA-BERT's WordPiece vocabulary also holds ``<S>`` and ``<T>``; they never occur in its encoded
inputs, so they are left out here. ``[UNK]`` is kept for HF compatibility but never produced by
:meth:`KmerTokenizer.encode_ids`: an ambiguous k-mer gets the explicit ``[NKMER]`` token, so
``[UNK]`` keeps meaning "a token string outside the vocabulary". Input is case-folded, ``U -> T``,
whitespace is ignored; characters that are not nucleotide IUPAC codes raise ``ValueError``
(validate files with :mod:`lncrna.fasta` first).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
from transformers import PreTrainedTokenizer

__all__ = ["KmerTokenizer", "kmers", "kmer3", "SPECIAL_TOKENS", "NKMER_TOKEN"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NKMER_TOKEN = "[NKMER]"
_FIRST_KMER_ID = len(SPECIAL_TOKENS) + 1  # 6

# byte -> base code: A C G T/U = 0..3, ambiguity codes = 4 (N), whitespace = -2 (dropped), else -1.
_BASE_CODE = np.full(256, -1, dtype=np.int8)
for _chars, _code in (("Aa", 0), ("Cc", 1), ("Gg", 2), ("TtUu", 3), ("NRYKMSWBDHVnrykmswbdhv", 4)):
    for _c in _chars:
        _BASE_CODE[ord(_c)] = _code
for _c in " \t\r\n":
    _BASE_CODE[ord(_c)] = -2


def kmers(seq: str, k: int = 3, stride: int = 1) -> list[str]:
    """Plain-Python overlapping k-mers of ``seq`` as strings (no normalisation): the reference."""
    return [seq[i : i + k] for i in range(0, len(seq) - k + 1, stride)]


def kmer3(seq: str) -> list[str]:
    """LoRA-BERT's tokenisation: overlapping 3-mers, stride 1; ``len(seq) - 2`` tokens."""
    return kmers(seq, 3, 1)


def _base_codes(seq: str) -> np.ndarray:
    """(L,) int8 codes 0..4 of ``seq`` with whitespace removed; ValueError on other characters."""
    try:
        raw = np.frombuffer(seq.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError as e:
        raise ValueError(f"non-ASCII character in sequence at position {e.start + 1}") from None
    codes = _BASE_CODE[raw]
    if codes.size and codes.min() < 0:
        if (codes == -1).any():
            pos = int(np.flatnonzero(codes == -1)[0])
            raise ValueError(f"invalid character {seq[pos]!r} in sequence at position {pos + 1}")
        codes = codes[codes >= 0]
    return codes


class KmerTokenizer(PreTrainedTokenizer):
    """Overlapping k-mer tokenizer, ``k`` in 1..6, ``stride`` >= 1; see the module docstring.

    Saves and loads with ``save_pretrained`` / ``KmerTokenizer.from_pretrained`` (``k`` and
    ``stride`` go to ``tokenizer_config.json``, the vocabulary to ``vocab.txt``, checked on load).
    ``tokenizer(seq)`` adds ``[CLS] ... [SEP]`` like BERT; :meth:`encode_ids` is the fast path.
    """

    vocab_files_names = {"vocab_file": "vocab.txt"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, k: int = 3, stride: int = 1, **kwargs):
        # Why `bool` is excluded: True is an int, so k=True built a 1-mer tokenizer (ModelConfig
        # already rejects booleans for k and stride).
        if isinstance(k, bool) or not (isinstance(k, int) and 1 <= k <= 6):
            raise ValueError(f"k must be an int in 1..6, got {k!r}")
        if isinstance(stride, bool) or not (isinstance(stride, int) and stride >= 1):
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        self.k, self.stride = k, stride
        kmer_tokens = ["".join(p) for p in itertools.product("ACGT", repeat=k)]
        self._id_to_token: list[str] = [*SPECIAL_TOKENS, NKMER_TOKEN, *kmer_tokens]
        self.vocab: dict[str, int] = {t: i for i, t in enumerate(self._id_to_token)}
        self._id_to_token_array = np.array(self._id_to_token, dtype=object)
        if vocab_file is not None:
            with open(vocab_file, encoding="utf-8") as fh:
                saved = [line.rstrip("\n") for line in fh if line.strip()]
            if saved != self._id_to_token:
                raise ValueError(f"{vocab_file}: vocabulary does not match k={k} (size {len(saved)})")
        for name, tok in zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"),
                             SPECIAL_TOKENS):
            kwargs.setdefault(name, tok)
        kwargs.setdefault("model_max_length", 1536)  # LoRA-BERT's max length incl. [CLS], [SEP]
        super().__init__(k=k, stride=stride, **kwargs)

    # --- fast path ---------------------------------------------------------------------------
    def encode_ids(
        self, seq: str, *, add_special_tokens: bool = False, max_length: int | None = None
    ) -> np.ndarray:
        """Token ids of ``seq``, vectorised: (T,) int64, T = (L - k) // stride + 1 (0 if L < k).

        ``add_special_tokens`` wraps them as ``[CLS] ... [SEP]`` (T + 2). ``max_length`` caps the
        total length (special tokens included) by keeping the 5' end, as LoRA-BERT does.
        """
        k, stride = self.k, self.stride
        codes = _base_codes(seq)
        if max_length is not None:
            budget = max_length - (2 if add_special_tokens else 0)
            if budget < 1:
                raise ValueError(f"max_length={max_length} leaves no room for sequence tokens")
            codes = codes[: (budget - 1) * stride + k]  # nucleotides the first `budget` k-mers use
        n = (len(codes) - k) // stride + 1 if len(codes) >= k else 0
        index = np.zeros(n, dtype=np.int64)
        has_n = np.zeros(n, dtype=bool)
        span = (n - 1) * stride + 1 if n else 0
        for j in range(k):  # k vectorised passes: rolling base-4 number of each window
            window = codes[j : j + span : stride]
            index = index * 4 + (window & 3)
            has_n |= window == 4
        ids = np.where(has_n, _FIRST_KMER_ID - 1, index + _FIRST_KMER_ID)
        if add_special_tokens:
            ids = np.concatenate([[self.cls_token_id], ids, [self.sep_token_id]]).astype(np.int64)
        return ids

    # --- PreTrainedTokenizer interface --------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self._id_to_token_array[self.encode_ids(text)].tolist()

    def _convert_token_to_id(self, token: str) -> int:
        return self.vocab.get(token, self.vocab["[UNK]"])

    def _convert_id_to_token(self, index: int) -> str:
        # Why: a negative id used to wrap around Python-style (-1 -> the last k-mer, 'TTTTTT'), and
        # a too-large one raised a bare "list index out of range".
        if not 0 <= index < len(self._id_to_token):
            raise ValueError(f"token id {index} is outside the vocabulary (0..{len(self._id_to_token) - 1})")
        return self._id_to_token[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Space-joined k-mers (LoRA-BERT's text form); not the original sequence when stride < k."""
        return " ".join(tokens)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        out = [self.cls_token_id, *token_ids_0, self.sep_token_id]
        return out if token_ids_1 is None else [*out, *token_ids_1, self.sep_token_id]

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return [int(t in self.all_special_ids) for t in token_ids_0]
        mask = [1, *([0] * len(token_ids_0)), 1]
        return mask if token_ids_1 is None else [*mask, *([0] * len(token_ids_1)), 1]

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        first = [0] * (len(token_ids_0) + 2)
        return first if token_ids_1 is None else first + [1] * (len(token_ids_1) + 1)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (f"{filename_prefix}-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("".join(t + "\n" for t in self._id_to_token))
        return (path,)
