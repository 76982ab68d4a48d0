"""CPAT-like alignment-free transcript features and a small, pickle-free baseline.

Features (per transcript, forward strand unless ``both_strands=True``):

* ``length``            transcript length (nt)
* ``orf_len``           length (nt, stop codon included) of the longest ORF. An ORF runs from an ATG
                        to the first in-frame stop (TAA/TAG/TGA); an ORF without a stop runs to the
                        last complete codon, exactly as CPAT 3.0.5 ``find_orfs.ORFFinder`` does.
                        0 when the transcript has no ATG.
* ``orf_cov``           ``orf_len / length``
* ``orf_start_frac``    ORF start / length (5'UTR fraction); 1.0 without ORF
* ``orf_complete``      1 if the longest ORF ends in a stop codon, 0 otherwise
* ``fickett_orf``       Fickett TESTCODE of the longest ORF (CPAT's feature)
* ``fickett_tx``        Fickett TESTCODE of the whole transcript (CPC2's feature)
* ``hexamer_orf``       CPAT hexamer log-likelihood ratio of the longest ORF (in-frame hexamers,
                        step 3) against a :class:`HexamerTable`
* ``k{k}_{KMER}``       overlapping k-mer frequencies, k = 1..kmax, each k normalised to sum 1

With ``extra=True`` (the shipped baseline since session 6) the 28 :data:`EXTRA_FEATURES` follow the
8 ORF features: the set of maximal ORFs (2nd longest, number >= 300 nt, best hexamer score among
those >= 90 nt), per-frame stop density and hexamer score, 5'/3'UTR hexamer and codon scores, upstream
in-frame stop, Kozak context, GC/GC3, the ORF peptide's pI (Biopython's pK set), GRAVY,
aromatic/charged fractions, and the 5'-open frame (see :func:`extra_features`). NaN marks "not
defined" (no ORF, UTR too short); the trees route NaN natively.

:meth:`FeatureExtractor.transform` computes the features of a whole batch of transcripts at once
(one concatenated code array, segment sums, no per-transcript numpy calls): about 3.5k human 2.6 kb
transcripts per second on one CPU core with ``extra=True`` (the per-sequence functions below, kept
as the definitions, run at about 1k/s). See ``tests/lncrna/test_features_batch.py``.

The baseline (:class:`FeatureBaseline`) is scikit-learn's ``HistGradientBoostingClassifier`` on these
features. It is persisted WITHOUT pickle: the fitted trees are exported as flat node arrays to an
``.npz`` file (loaded with ``allow_pickle=False``) plus a JSON config, and prediction after loading is
a pure-numpy traversal of those arrays (:class:`NumpyTreeEnsemble`), which reproduces sklearn's
``predict_proba`` to floating-point precision (same comparisons ``x <= threshold``, NaN routed by
``missing_go_to_left``, same summation order). Categorical splits are not supported (we never use
categorical features). Loading therefore never needs sklearn at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "encode",
    "longest_orf",
    "ORF",
    "fickett_score",
    "HexamerTable",
    "FeatureExtractor",
    "EXTRA_FEATURES",
    "NumpyTreeEnsemble",
    "FeatureBaseline",
    "DEFAULT_BASELINE_DIR",
]

DEFAULT_BASELINE_DIR = Path(__file__).resolve().parent / "weights" / "baseline"

# --------------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------------
_NT = "ACGT"
_LUT = np.full(256, 4, dtype=np.uint8)  # 4 = anything that is not A/C/G/T(U)
for _i, _c in enumerate(_NT):
    _LUT[ord(_c)] = _i
    _LUT[ord(_c.lower())] = _i
_LUT[ord("U")] = 3
_LUT[ord("u")] = 3
# whitespace bytes (a sequence pasted with its line breaks): dropped by :func:`encode`, as the
# tokenizer drops them, instead of being read as N
_IS_WS = np.zeros(256, dtype=bool)
_IS_WS[[ord(c) for c in " \t\r\n\v\f"]] = True

# codon codes in base 5 (so that codons containing N never collide with real ones)
_ATG = 0 * 25 + 3 * 5 + 2
_STOPS = np.array([3 * 25 + 0 * 5 + 0, 3 * 25 + 0 * 5 + 2, 3 * 25 + 2 * 5 + 0])  # TAA TAG TGA
_IS_STOP = np.zeros(125, dtype=bool)
_IS_STOP[_STOPS] = True
# base-5 codon code -> base-4 code of its bases (0 if it has a non-ACGT base) / "pure ACGT"
_C5_ALL = np.arange(125)
_CODON_OK_5 = (_C5_ALL // 25 < 4) & ((_C5_ALL // 5) % 5 < 4) & (_C5_ALL % 5 < 4)
_CODON4_5 = np.where(_CODON_OK_5, (_C5_ALL // 25) * 16 + ((_C5_ALL // 5) % 5) * 4 + _C5_ALL % 5, 0)


def encode(seq: str | bytes | np.ndarray) -> np.ndarray:
    """Map a nucleotide string to uint8 codes A=0 C=1 G=2 T/U=3, anything else=4; whitespace is
    removed (an already-encoded array is returned as is)."""
    if isinstance(seq, np.ndarray):
        return seq.astype(np.uint8, copy=False)
    if isinstance(seq, str):
        seq = seq.encode("ascii", "replace")
    raw = np.frombuffer(seq, dtype=np.uint8)
    # Why: a newline or space used to become an N that counted in the length and shifted every
    # downstream codon (a different ORF and Fickett score than the tokenizer's view of the same
    # string). FASTA records from lncrna.fasta never contain whitespace, so their codes are unchanged.
    ws = _IS_WS[raw]
    if ws.any():
        raw = raw[~ws]
    return _LUT[raw]


def _revcomp(b: np.ndarray) -> np.ndarray:
    rc = np.where(b < 4, 3 - b, 4).astype(np.uint8)
    return rc[::-1].copy()


# --------------------------------------------------------------------------------------------------
# ORF
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ORF:
    """Longest ORF. ``start``/``end`` are 0-based half-open on the strand it was found on
    (for ``strand == '-'`` the coordinates refer to the reverse complement)."""

    start: int
    end: int
    strand: str = "+"
    frame: int = 0
    complete: bool = False  # ends with a stop codon

    @property
    def length(self) -> int:
        return self.end - self.start


_NO_ORF = ORF(0, 0, "+", 0, False)


def _longest_orf_one_strand(b: np.ndarray, strand: str) -> ORF:
    n = b.shape[0]
    if n < 3:
        return _NO_ORF
    c = b[:-2].astype(np.int16) * 25 + b[1:-1].astype(np.int16) * 5 + b[2:]
    is_start = c == _ATG
    if not is_start.any():
        return _NO_ORF
    # a codon with an N is neither start nor stop, so ORFs run through N: CPAT 3.0.5 find_orfs.ORFFinder.run_one
    is_stop = _IS_STOP[c]
    best = _NO_ORF
    for f in range(3):
        starts = np.flatnonzero(is_start[f::3])
        if starts.size == 0:
            continue
        stops = np.flatnonzero(is_stop[f::3])
        ncod = is_start[f::3].shape[0]
        if stops.size:
            j = np.searchsorted(stops, starts)  # first in-frame stop at/after the ATG
            has_stop = j < stops.size
            end_cod = np.where(has_stop, stops[np.minimum(j, stops.size - 1)], ncod - 1)
        else:  # no stop in this frame: ORF runs to the last complete codon
            has_stop = np.zeros(starts.shape[0], dtype=bool)
            end_cod = np.full(starts.shape[0], ncod - 1)
        lengths = (end_cod - starts + 1) * 3
        k = int(np.argmax(lengths))  # first maximum = most upstream
        L = int(lengths[k])
        if L > best.length:  # strict: earlier frame wins ties (CPAT's stable sort)
            s = f + 3 * int(starts[k])
            best = ORF(s, s + L, strand, f, bool(has_stop[k]))
    return best


def longest_orf(seq: str | np.ndarray, both_strands: bool = False) -> ORF:
    """Longest ATG..stop ORF over the 3 forward frames (and the 3 reverse frames if ``both_strands``).

    Semantics follow CPAT 3.0.5 ``ORFFinder``: the ORF includes the stop codon; an ORF lacking an
    in-frame stop extends to the last complete codon; ties go to the earlier frame and then the more
    upstream ORF; the forward strand wins ties against the reverse strand.
    """
    b = encode(seq)
    best = _longest_orf_one_strand(b, "+")
    if both_strands:
        rev = _longest_orf_one_strand(_revcomp(b), "-")
        if rev.length > best.length:
            best = rev
    return best


# --------------------------------------------------------------------------------------------------
# Fickett TESTCODE (tables of Fickett 1982 as shipped in CPAT 3.0.5 cpmodule/fickett.py)
# --------------------------------------------------------------------------------------------------
_POS_PROB = np.array(
    [
        [0.94, 0.68, 0.84, 0.93, 0.58, 0.68, 0.45, 0.34, 0.20, 0.22],  # A
        [0.80, 0.70, 0.70, 0.81, 0.66, 0.48, 0.51, 0.33, 0.30, 0.23],  # C
        [0.90, 0.88, 0.74, 0.64, 0.53, 0.48, 0.27, 0.16, 0.08, 0.08],  # G
        [0.97, 0.97, 0.91, 0.68, 0.69, 0.44, 0.54, 0.20, 0.09, 0.09],  # T
    ]
)
_POS_WEIGHT = np.array([0.26, 0.18, 0.31, 0.33])
_POS_PARA = np.array([1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 0.0])
_CONTENT_PROB = np.array(
    [
        [0.28, 0.49, 0.44, 0.55, 0.62, 0.49, 0.67, 0.65, 0.81, 0.21],
        [0.82, 0.64, 0.51, 0.64, 0.59, 0.59, 0.43, 0.44, 0.39, 0.31],
        [0.40, 0.54, 0.47, 0.64, 0.64, 0.73, 0.41, 0.41, 0.33, 0.29],
        [0.28, 0.24, 0.39, 0.40, 0.55, 0.75, 0.56, 0.69, 0.51, 0.58],
    ]
)
_CONTENT_WEIGHT = np.array([0.11, 0.12, 0.15, 0.14])
_CONTENT_PARA = np.array([0.33, 0.31, 0.29, 0.27, 0.25, 0.23, 0.21, 0.17, 0.0])
# products as CPAT computes them: float(prob) * float(weight)
_POS_TAB = _POS_PROB * _POS_WEIGHT[:, None]
_CONTENT_TAB = _CONTENT_PROB[:, :9] * _CONTENT_WEIGHT[:, None]
_PHASE_CACHE = np.zeros(0, dtype=np.int64)


def _phase_offsets(n: int) -> np.ndarray:
    global _PHASE_CACHE
    if _PHASE_CACHE.shape[0] < n:
        m = max(n, 2 * _PHASE_CACHE.shape[0], 4096)
        _PHASE_CACHE = (np.arange(m, dtype=np.int64) % 3) * 5
    return _PHASE_CACHE[:n]


def fickett_score(seq: str | np.ndarray) -> float:
    """Fickett TESTCODE score, identical to CPAT's ``fickett.fickett_value`` (and CPC2's)."""
    b = encode(seq)
    n = b.shape[0]
    if n < 2:
        return 0.0
    pc = np.bincount(_phase_offsets(n) + b, minlength=15).reshape(3, 5)[:, :4]
    content = pc.sum(axis=0) / float(n)  # count(base) / total length (Ns count in the total)
    position = pc.max(axis=0) / (pc.min(axis=0) + 1.0)
    ci = np.argmax(content[:, None] >= _CONTENT_PARA[None, :], axis=1)  # first threshold reached
    pi = np.argmax(position[:, None] >= _POS_PARA[None, :], axis=1)
    cv = _CONTENT_TAB[np.arange(4), ci]
    pv = _POS_TAB[np.arange(4), pi]
    # same summation order as CPAT: content A,C,G,T then position A,C,G,T
    s = 0.0
    for v in cv:
        s += float(v)
    for v in pv:
        s += float(v)
    return s


# --------------------------------------------------------------------------------------------------
# k-mer codes
# --------------------------------------------------------------------------------------------------
def _kmer_codes(b: np.ndarray, k: int, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Overlapping k-mer codes (base 4, first base most significant) and validity mask (None = all
    valid). Length max(0, n-k+1)."""
    n = b.shape[0]
    if n < k:
        return np.zeros(0, dtype=np.int64), None
    bb = np.minimum(b, 3).astype(np.int64)
    code = bb[: n - k + 1].copy()
    for j in range(1, k):
        code = code * 4 + bb[j : n - k + 1 + j]
    if valid is None:
        return code, None
    ok = valid[: n - k + 1].copy()
    for j in range(1, k):
        ok &= valid[j : n - k + 1 + j]
    return code, ok


def _all_kmers(k: int) -> list[str]:
    out = [""]
    for _ in range(k):
        out = [p + c for p in out for c in _NT]
    return out


def _kmer_to_code(kmer: str) -> int:
    code = 0
    for ch in kmer:
        code = code * 4 + _NT.index(ch)
    return code


# --------------------------------------------------------------------------------------------------
# hexamer table
# --------------------------------------------------------------------------------------------------
@dataclass
class HexamerTable:
    """Coding / noncoding hexamer frequencies (length-4096 arrays indexed by base-4 code, A=0..T=3,
    first base most significant), with CPAT's scoring rule.

    ``score(orf)`` = mean over in-frame hexamers (step 3, frame 0, fully inside ``orf``) of
    ``log(c/n)`` if both > 0, ``+1`` if only c > 0, ``-1`` if only n > 0, skipped if both are 0 (or
    the hexamer contains a non-ACGT base); 0 if ``len(orf) < 6``; -1 if no hexamer was counted.
    This is CPAT 3.0.5 ``FrameKmer.kmer_ratio(orf, 6, 3, coding, noncoding)``.
    """

    coding: np.ndarray
    noncoding: np.ndarray
    _contrib: np.ndarray = field(init=False, repr=False)
    _counted: np.ndarray = field(init=False, repr=False)
    _codon_contrib: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Why: a negative or NaN frequency (a hand-edited or foreign *_Hexamer.tsv) used to be
        # "counted" with contribution 0 (or +-1 with inf), silently biasing hexamer scores toward 0;
        # a wrong size failed in numpy's reshape without saying which table.
        for name in ("coding", "noncoding"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.size != 4096:
                raise ValueError(f"HexamerTable: {name} must hold 4096 hexamer frequencies, got {arr.size}")
            if not (np.isfinite(arr).all() and (arr >= 0).all()):
                raise ValueError(f"HexamerTable: {name} frequencies must be finite and >= 0")
            setattr(self, name, arr.reshape(4096))
        c, nc = self.coding, self.noncoding
        both = (c > 0) & (nc > 0)
        contrib = np.zeros(4096)
        with np.errstate(divide="ignore", invalid="ignore"):
            contrib[both] = np.log(c[both] / nc[both])
        contrib[(c > 0) & (nc == 0)] = 1.0
        contrib[(c == 0) & (nc > 0)] = -1.0
        self._contrib = contrib
        self._counted = (c > 0) | (nc > 0)
        # codon-level table derived from the same frequencies: the coding marginal of the first
        # three bases of in-frame hexamers = in-frame codon usage of the CDS; the noncoding marginal
        # = 3-mer frequencies of noncoding transcripts. Used by the ``extra`` features only.
        c3 = c.reshape(64, 64).sum(axis=1)
        n3 = nc.reshape(64, 64).sum(axis=1)
        cc = np.zeros(64)
        ok3 = (c3 > 0) & (n3 > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cc[ok3] = np.log(c3[ok3] / n3[ok3])
        self._codon_contrib = cc
        self._pairs: tuple[np.ndarray, np.ndarray] | None = None

    def _pair_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Hexamer lookup by a pair of base-5 codon codes (``c1 * 125 + c2``, 15,625 entries): whether
        the hexamer is counted (pure ACGT and in the table) and its contribution. Lets the batched
        extractor score hexamers straight from its codon codes. Built on first use (``_counted`` may
        be narrowed after construction, see :meth:`from_cpat_tsv` and :meth:`FeatureBaseline.load`)."""
        if self._pairs is None:
            c1, c2 = np.divmod(np.arange(125 * 125), 125)
            ok = _CODON_OK_5[c1] & _CODON_OK_5[c2]
            hx = np.where(ok, _CODON4_5[c1] * 64 + _CODON4_5[c2], 0)
            keep = ok & self._counted[hx]
            self._pairs = (keep, np.where(keep, self._contrib[hx], 0.0))
        return self._pairs

    # ---- construction ----
    @classmethod
    def fit(
        cls,
        coding_seqs: Iterable[str],
        noncoding_seqs: Iterable[str],
        coding_is_cds: bool = False,
        pseudocount: float = 0.0,
    ) -> "HexamerTable":
        """Frequencies as CPAT's ``make_hexamer_tab``: coding = in-frame hexamers (step 3) of the CDS,
        noncoding = all overlapping hexamers (step 1) of the noncoding transcripts.

        Our FASTA files carry no CDS annotation, so unless ``coding_is_cds`` the CDS of a coding
        transcript is approximated by its longest forward ORF (what CPAT itself does for FASTA input
        in ``make_logitModel``). ``pseudocount`` is added to every count (0 = CPAT behaviour).
        """
        cod = np.zeros(4096, dtype=np.float64)
        for s in coding_seqs:
            b = encode(s)
            if not coding_is_cds:
                o = longest_orf(b)
                b = b[o.start : o.end]
            codes, ok = _hexamer_codes(b)
            codes, ok = codes[::3], (None if ok is None else ok[::3])
            if ok is not None:
                codes = codes[ok]
            cod += np.bincount(codes, minlength=4096)
        non = np.zeros(4096, dtype=np.float64)
        for s in noncoding_seqs:
            codes, ok = _hexamer_codes(encode(s))
            if ok is not None:
                codes = codes[ok]
            non += np.bincount(codes, minlength=4096)
        cod += pseudocount
        non += pseudocount
        return cls(cod / max(cod.sum(), 1e-300), non / max(non.sum(), 1e-300))

    @classmethod
    def from_cpat_tsv(cls, path: str | Path) -> "HexamerTable":
        """Read CPAT's ``*_Hexamer.tsv`` (``hexamer<TAB>coding<TAB>noncoding`` with header)."""
        cod = np.zeros(4096)
        non = np.zeros(4096)
        seen = np.zeros(4096, dtype=bool)
        with open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                f = line.split()
                if not f or f[0] == "hexamer":
                    continue
                kmer = f[0].upper()
                if len(kmer) != 6 or any(ch not in _NT for ch in kmer):
                    continue
                i = _kmer_to_code(kmer)
                # Why: a short or non-numeric row used to raise a bare IndexError / ValueError
                # naming neither the file nor the line.
                try:
                    cod[i], non[i], seen[i] = float(f[1]), float(f[2]), True
                except (IndexError, ValueError):
                    raise ValueError(f"{path}:{lineno}: expected 'hexamer<TAB>coding<TAB>noncoding', "
                                     f"got {line.strip()[:80]!r}") from None
        try:
            tab = cls(cod, non)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        tab._counted &= seen
        tab._pairs = None
        return tab

    def to_cpat_tsv(self, path: str | Path) -> None:
        with open(path, "w") as fh:
            fh.write("hexamer\tcoding\tnoncoding\n")
            for i, kmer in enumerate(_all_kmers(6)):
                fh.write(f"{kmer}\t{float(self.coding[i])!r}\t{float(self.noncoding[i])!r}\n")

    # ---- scoring ----
    def score_codes(self, b: np.ndarray, hex_codes: np.ndarray | None = None, hex_ok=None) -> float:
        """Score encoded ORF ``b`` (uint8 codes). Optionally pass precomputed hexamer codes."""
        n = b.shape[0]
        if n < 6:
            return 0.0
        if hex_codes is None:
            hex_codes, hex_ok = _hexamer_codes(b)
        codes = hex_codes[::3]
        keep = self._counted[codes]
        if hex_ok is not None:
            keep &= hex_ok[::3]
        cnt = int(keep.sum())
        if cnt == 0:
            return -1.0
        vals = self._contrib[codes[keep]]
        return float(vals.sum() / cnt)

    def score(self, orf_seq: str | np.ndarray) -> float:
        return self.score_codes(encode(orf_seq))


def _hexamer_codes(b: np.ndarray):
    valid = None if (b.size == 0 or int(b.max()) < 4) else (b < 4)
    return _kmer_codes(b, 6, valid)


# --------------------------------------------------------------------------------------------------
# extra coding-potential features (ORF set, frames, UTRs, codons, peptide)
# --------------------------------------------------------------------------------------------------
_AA = "ACDEFGHIKLMNPQRSTVWY"
_CODE_TCAG = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"
_B5 = {"A": 0, "C": 1, "G": 2, "T": 3}
_TRANS = np.full(125, 21, dtype=np.int64)  # base-5 codon code -> 0..19 amino acid, 20 stop, 21 X
_CODON4 = np.full(125, -1, dtype=np.int64)  # base-5 codon code -> base-4 code (-1 if it has an N)
for _i, _x in enumerate("TCAG"):
    for _j, _y in enumerate("TCAG"):
        for _k, _z in enumerate("TCAG"):
            _aa = _CODE_TCAG[16 * _i + 4 * _j + _k]
            _c5 = _B5[_x] * 25 + _B5[_y] * 5 + _B5[_z]
            _TRANS[_c5] = 20 if _aa == "*" else _AA.index(_aa)
            _CODON4[_c5] = _B5[_x] * 16 + _B5[_y] * 4 + _B5[_z]
# Kyte-Doolittle hydropathy (GRAVY) and Biopython ProtParam's pK set (IsoelectricPoint)
_KD = np.array([1.8, 2.5, -3.5, -3.5, 2.8, -0.4, -3.2, 4.5, -3.9, 3.8, 1.9, -3.5, -1.6, -3.5, -4.5,
                -0.8, -0.7, 4.2, -0.9, -1.3])
_POS_PK = {"K": 10.0, "R": 12.0, "H": 5.98}
_NEG_PK = {"D": 4.05, "E": 4.45, "C": 9.0, "Y": 10.0}
_PK_CTERM = {"D": 4.55, "E": 4.75}
_PK_NTERM = {"A": 7.59, "M": 7.0, "S": 6.93, "P": 8.36, "T": 6.82, "V": 7.44, "E": 7.7}
_POS_IDX = [(_AA.index(a), k) for a, k in _POS_PK.items()]
_NEG_IDX = [(_AA.index(a), k) for a, k in _NEG_PK.items()]
_AROM = np.array([_AA.index(a) for a in "FWY"])
_CHARGED = np.array([_AA.index(a) for a in "DEKR"])

EXTRA_FEATURES = [
    "utr5_len",           # nt before the longest ORF (NaN without ORF)
    "utr3_len",           # nt after it
    "orf2_len",           # 2nd longest maximal ORF (first ATG per stop-delimited stretch, any frame)
    "orf2_ratio",         # orf2_len / orf_len
    "n_orf_300",          # maximal ORFs of >= 300 nt
    "stopfree_max",       # longest stop-free stretch in any frame (nt)
    "stop_dens_min",      # in-frame stop codons per codon, frames sorted
    "stop_dens_mid",
    "stop_dens_max",
    "upstream_stop",      # 1 if an in-frame stop precedes the ORF's ATG (5' end of the CDS is complete)
    "kozak",              # (A/G at -3) + (G at +4); -1 where the context is cut off
    "hexamer_utr5",       # CPAT hexamer score of the 5'UTR / 3'UTR read in the ORF's frame
    "hexamer_utr3",
    "hexamer_frame_max",  # hexamer score of the whole transcript in each frame: best, worst,
    "hexamer_frame_min",
    "hexamer_frame_gap",  # ORF's frame minus the best other frame
    "codon_orf",          # in-frame codon log-ratio (codon usage) of the ORF
    "codon_utr3",         # ... of the 3'UTR in the ORF's frame
    "gc_orf",
    "gc3_orf",            # GC at third codon positions of the ORF
    "gc_utr",
    "pep_pi",             # isoelectric point of the ORF's peptide (Biopython's pK set, bisection)
    "pep_gravy",          # mean Kyte-Doolittle hydropathy
    "pep_aromatic",       # F+W+Y fraction
    "pep_charged",        # D+E+K+R fraction
    "orf_hexbest",        # best CPAT hexamer score among maximal ORFs of >= 90 nt (the longest ORF
    "orf_hexbest_len",    #   need not be the CDS) and that ORF's length
    "open5_len",          # longest stop-free run from the 5' end in any frame, no ATG needed (5'-truncated CDS)
]


def _isoelectric_point(cnt: np.ndarray, first: int, last: int) -> float:
    """Biopython ``IsoelectricPoint.pi()`` (same pKs, bisection on [4.05, 12] to 1e-4)."""
    pos = [(float(cnt[i]), k) for i, k in _POS_IDX if cnt[i]]
    neg = [(float(cnt[i]), k) for i, k in _NEG_IDX if cnt[i]]
    pk_n = _PK_NTERM.get(_AA[first], 9.0) if first < 20 else 9.0
    pk_c = _PK_CTERM.get(_AA[last], 2.0) if last < 20 else 2.0
    lo, hi, ph = 4.05, 12.0, 7.775
    while hi - lo > 0.0001:
        ch = 1.0 / (1.0 + 10.0 ** (ph - pk_n)) - 1.0 / (1.0 + 10.0 ** (pk_c - ph))
        for c, k in pos:
            ch += c / (1.0 + 10.0 ** (ph - k))
        for c, k in neg:
            ch -= c / (1.0 + 10.0 ** (k - ph))
        if ch > 0.0:
            lo = ph
        else:
            hi = ph
        ph = (lo + hi) / 2.0
    return ph


def _gc_counts(cnt: np.ndarray) -> float:
    """GC fraction from base counts (A, C, G, T, other); NaN without any ACGT."""
    acgt = cnt[0] + cnt[1] + cnt[2] + cnt[3]
    return float(cnt[1] + cnt[2]) / acgt if acgt else float("nan")


def extra_features(b: np.ndarray, orf: ORF, hexamer: HexamerTable | None) -> np.ndarray:
    """The :data:`EXTRA_FEATURES` of encoded sequence ``b`` (already on the ORF's strand) whose
    longest ORF is ``orf``. Hexamer scores follow :meth:`HexamerTable.score_codes` (mean over the
    counted in-frame hexamers lying fully inside the span), computed from per-frame prefix sums;
    NaN where a span has no counted hexamer or there is no hexamer table."""
    nan = float("nan")
    out = np.full(len(EXTRA_FEATURES), nan)
    n = b.shape[0]
    if n < 3:
        return out
    L = orf.length
    c = b[:-2].astype(np.int64) * 25 + b[1:-1].astype(np.int64) * 5 + b[2:]
    is_stop = _IS_STOP[c]
    is_start = c == _ATG
    # --- maximal ORFs (first ATG of every stop-delimited stretch) and stop densities per frame
    lens: list[np.ndarray] = []
    starts_nt: list[np.ndarray] = []
    open5 = 0
    dens = []
    stopfree = 0
    for f in range(3):
        st = np.flatnonzero(is_stop[f::3])
        ncod = is_stop[f::3].shape[0]
        dens.append(st.size / ncod if ncod else 0.0)
        if ncod:
            edges = np.concatenate(([-1], st, [ncod]))
            stopfree = max(stopfree, int(np.max(np.diff(edges)) - 1) * 3)
        open5 = max(open5, (int(st[0]) if st.size else ncod) * 3)
        sa = np.flatnonzero(is_start[f::3])
        if not sa.size:
            lens.append(np.zeros(0, dtype=np.int64))
            starts_nt.append(np.zeros(0, dtype=np.int64))
            continue
        j = np.searchsorted(st, sa)
        first = np.concatenate(([True], j[1:] != j[:-1]))
        sj, s1 = j[first], sa[first]
        if st.size:
            end_cod = np.where(sj < st.size, st[np.minimum(sj, st.size - 1)], ncod - 1)
        else:
            end_cod = np.full(sj.shape[0], ncod - 1)
        lens.append((end_cod - s1 + 1) * 3)
        starts_nt.append(f + 3 * s1)
    al = np.sort(np.concatenate(lens))[::-1]
    out[2] = float(al[1]) if al.size > 1 else 0.0
    out[3] = out[2] / L if L else nan
    out[4] = float(np.sum(al >= 300))
    out[5] = float(stopfree)
    out[6:9] = sorted(dens)
    out[27] = float(open5)
    fo = orf.start % 3
    # --- hexamer scores from per-frame prefix sums
    if hexamer is not None and n >= 6:
        hc, hok = _hexamer_codes(b)
        keep = hexamer._counted[hc] if hok is None else hexamer._counted[hc] & hok
        vals = np.where(keep, hexamer._contrib[hc], 0.0)
        cvs = [np.concatenate(([0.0], np.cumsum(vals[f::3]))) for f in range(3)]
        ccs = [np.concatenate(([0], np.cumsum(keep[f::3]))) for f in range(3)]

        def span(f: int, q0: int, q1: int) -> float:  # hexamers f+3q, q0 <= q < q1
            k = ccs[f][q1] - ccs[f][q0] if q1 > q0 else 0
            return float(cvs[f][q1] - cvs[f][q0]) / k if k > 0 else nan

        fs = [span(f, 0, cvs[f].shape[0] - 1) for f in range(3)]
        ok = [v for v in fs if v == v]
        if ok:
            out[13], out[14] = max(ok), min(ok)
            if L:
                oth = [fs[f] for f in range(3) if f != fo and fs[f] == fs[f]]
                if fs[fo] == fs[fo] and oth:
                    out[15] = fs[fo] - max(oth)
        # best-scoring maximal ORF of >= 90 nt (the longest ORF need not be the CDS)
        best, best_len = -np.inf, nan
        for f in range(3):
            sel = lens[f] >= 90
            if not sel.any():
                continue
            ln, sn = lens[f][sel], starts_nt[f][sel]
            cv, cc = cvs[f], ccs[f]
            a = (sn - f) // 3
            e = np.minimum((sn + ln - 6 - f) // 3 + 1, cv.shape[0] - 1)
            k = cc[e] - cc[a]
            good = k > 0
            if not good.any():
                continue
            sc = (cv[e][good] - cv[a][good]) / k[good]
            j = int(np.argmax(sc))
            if sc[j] > best:
                best, best_len = float(sc[j]), float(ln[good][j])
        if best > -np.inf:
            out[25], out[26] = best, best_len
        if L:
            s0, e0 = orf.start, orf.end
            out[11] = span(fo, 0, max(0, (s0 - 6 - fo) // 3 + 1))  # 5'UTR in the ORF's frame
            out[12] = span(fo, (e0 - fo) // 3, cvs[fo].shape[0] - 1)  # 3'UTR
    cnt_all = np.bincount(b, minlength=5)
    if not L:
        out[20] = _gc_counts(cnt_all)
        return out
    s0, e0 = orf.start, orf.end
    out[0] = float(s0)
    out[1] = float(n - e0)
    out[9] = 1.0 if is_stop[s0 % 3 : s0 : 3].any() else 0.0
    if s0 >= 3 and s0 + 3 < n:
        out[10] = float(b[s0 - 3] in (0, 2)) + float(b[s0 + 3] == 2)
    else:
        out[10] = -1.0
    cod = c[s0 : e0 - 2 : 3]
    if hexamer is not None:
        c4 = _CODON4[cod]
        c4 = c4[c4 >= 0]
        out[16] = float(hexamer._codon_contrib[c4].mean()) if c4.size else nan
        cu = _CODON4[c[e0 : n - 2 : 3]] if e0 < n - 2 else np.zeros(0, dtype=np.int64)
        cu = cu[cu >= 0]
        out[17] = float(hexamer._codon_contrib[cu].mean()) if cu.size else nan
    ob = b[s0:e0]
    cnt_orf = np.bincount(ob, minlength=5)
    out[18] = _gc_counts(cnt_orf)
    out[19] = _gc_counts(np.bincount(ob[2::3], minlength=5))
    out[20] = _gc_counts(cnt_all - cnt_orf)
    aa = _TRANS[cod]
    if orf.complete and aa.size:
        aa = aa[:-1]
    aa = aa[aa < 20]
    if aa.size:
        cnt = np.bincount(aa, minlength=20)
        out[21] = _isoelectric_point(cnt, int(aa[0]), int(aa[-1]))
        out[22] = float(cnt @ _KD) / aa.size
        out[23] = float(cnt[_AROM].sum()) / aa.size
        out[24] = float(cnt[_CHARGED].sum()) / aa.size
    return out


# --------------------------------------------------------------------------------------------------
# batched extraction (the hot path of FeatureExtractor.transform)
# --------------------------------------------------------------------------------------------------
# Why: per transcript, the per-sequence functions above make ~100 small numpy calls (ORF search per
# frame twice, Fickett twice, hexamer codes twice, per-frame prefix sums, a pI bisection in python),
# so at 1-3 kb the call overhead, not the arithmetic, costs ~1 ms per transcript. The batched path
# concatenates a whole batch of transcripts into one code array and computes every feature with a
# fixed number of array operations over the batch (segment sums via bincount, group-wise scans),
# so the per-transcript python cost is a few microseconds. It reproduces the per-sequence
# definitions (tests/lncrna/test_features_batch.py checks it against them on real transcripts).

# base-5 codon code -> base-4 code with non-ACGT clamped to 3 (as _kmer_codes clamps), and a flag
# "codon is pure ACGT"
_C5 = np.arange(125)
_CODON4M = np.minimum(_C5 // 25, 3) * 16 + np.minimum((_C5 // 5) % 5, 3) * 4 + np.minimum(_C5 % 5, 3)
_CODON_OK = (_C5 // 25 < 4) & ((_C5 // 5) % 5 < 4) & (_C5 % 5 < 4)
# codon code -> (phase, base) indicator, to turn codon counts into per-phase base counts
_CODON_PHASE_BASE = np.zeros((125, 15), dtype=np.int64)
_CODON_PHASE_BASE[_C5, _C5 // 25] += 1
_CODON_PHASE_BASE[_C5, 5 + (_C5 // 5) % 5] += 1
_CODON_PHASE_BASE[_C5, 10 + _C5 % 5] += 1
_COMP = np.array([3, 2, 1, 0, 4], dtype=np.uint8)
_PK_NTERM_AA = np.array([_PK_NTERM.get(a, 9.0) for a in _AA])
_PK_CTERM_AA = np.array([_PK_CTERM.get(a, 2.0) for a in _AA])
_BATCH_BASES = 1 << 20  # transcripts per batch are capped by total length (~1 Mnt: ~100 MB of temporaries)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices ``concat(arange(s, s + l))`` and the owner (row of ``starts``) of each."""
    lengths = np.maximum(lengths, 0)
    tot = int(lengths.sum())
    owner = np.repeat(np.arange(lengths.shape[0]), lengths)
    first = np.cumsum(lengths) - lengths
    idx = np.arange(tot) + np.repeat(starts - first, lengths)
    return idx, owner


def _first_per_owner(owner: np.ndarray) -> np.ndarray:
    """Positions of the first entry of every run of equal (sorted) ``owner`` values."""
    if owner.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], owner[1:] != owner[:-1])))


def _fickett_counts(pc: np.ndarray, n: np.ndarray) -> np.ndarray:
    """:func:`fickett_score` from per-phase base counts ``pc`` (S, 3, 5) and lengths ``n`` (S,)."""
    pc4 = pc[:, :, :4]
    content = pc4.sum(axis=1) / np.maximum(n, 1).astype(np.float64)[:, None]
    position = pc4.max(axis=1) / (pc4.min(axis=1) + 1.0)
    ci = np.argmax(content[:, :, None] >= _CONTENT_PARA[None, None, :], axis=2)
    pi = np.argmax(position[:, :, None] >= _POS_PARA[None, None, :], axis=2)
    cv = _CONTENT_TAB[np.arange(4)[None, :], ci]
    pv = _POS_TAB[np.arange(4)[None, :], pi]
    s = np.zeros(n.shape[0])
    for j in range(4):  # CPAT's summation order: content A,C,G,T then position A,C,G,T
        s = s + cv[:, j]
    for j in range(4):
        s = s + pv[:, j]
    return np.where(n >= 2, s, 0.0)


def _isoelectric_points(cnt: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """:func:`_isoelectric_point` for many peptides at once (same terms in the same order, and the
    same stopping rule per peptide, so the same bisection path)."""
    m = cnt.shape[0]
    pk_n, pk_c = _PK_NTERM_AA[first], _PK_CTERM_AA[last]
    cntf = cnt.astype(np.float64)
    lo, hi, ph = np.full(m, 4.05), np.full(m, 12.0), np.full(m, 7.775)
    act = np.ones(m, dtype=bool)
    while True:
        act &= hi - lo > 0.0001
        if not act.any():
            return ph
        p, a = ph[act], np.flatnonzero(act)
        ch = 1.0 / (1.0 + 10.0 ** (p - pk_n[a])) - 1.0 / (1.0 + 10.0 ** (pk_c[a] - p))
        for i, k in _POS_IDX:  # a zero count adds exactly 0.0, as skipping it does
            ch = ch + cntf[a, i] / (1.0 + 10.0 ** (p - k))
        for i, k in _NEG_IDX:
            ch = ch - cntf[a, i] / (1.0 + 10.0 ** (k - p))
        up = ch > 0.0
        lo[a] = np.where(up, p, lo[a])
        hi[a] = np.where(up, hi[a], p)
        ph[a] = (lo[a] + hi[a]) / 2.0


class _Batch:
    """A batch of encoded transcripts, concatenated: codes ``b`` (N,), lengths ``n`` (S,), offsets.

    Codons are laid out per (transcript, frame) group: group ``g = 3 * i + f`` holds the codons of
    transcript i at positions f, f + 3, ... (``G[g]`` of them), so every per-frame scan of the
    per-sequence code becomes one scan over the grouped array."""

    def __init__(self, b: np.ndarray, n: np.ndarray):
        self.b, self.n = b, n
        S = n.shape[0]
        self.S = S
        self.off = np.cumsum(n) - n
        N = b.shape[0]
        bi = b.astype(np.int16)
        c = np.zeros(N, dtype=np.int16)  # codon code at every position (garbage in the last 2 of a transcript)
        if N >= 3:
            c[: N - 2] = bi[:-2] * 25 + bi[1:-1] * 5 + bi[2:]
        m = np.maximum(n - 2, 0)  # codon positions per transcript
        G = np.maximum((m[:, None] - np.arange(3)[None, :] + 2) // 3, 0).reshape(-1)
        self.G = G
        self.gstart = np.cumsum(G) - G
        T = int(G.sum())
        self.T = T
        gbase = np.repeat(self.off, 3) + np.tile(np.arange(3), S) - 3 * self.gstart
        # grouped index -> position in b (int32 halves the memory traffic; |gbase| <= 3 N, so int64
        # for a batch of one huge transcript)
        it = np.int32 if 3 * N < 2**31 else np.int64
        pos = np.repeat(gbase.astype(it), G)
        pos += 3 * np.arange(T, dtype=it)
        self.cg = c[pos]
        self.is_stop = _IS_STOP[self.cg]
        ne = np.flatnonzero(G > 0)
        self.gend = self.gstart + G  # one past each group's last codon
        self.last = np.zeros(T, dtype=bool)
        self.last[self.gend[ne] - 1] = True
        # stops are sparse (~1 codon in 20): everything about them is done on their indices
        self.sp = np.flatnonzero(self.is_stop)
        self.sp_g = np.searchsorted(self.gstart, self.sp, side="right") - 1  # (last group starting there:
        st = np.flatnonzero(self.cg == _ATG)                                   # the earlier ones are empty)
        g = np.searchsorted(self.gstart, st, side="right") - 1
        self.st, self.st_g = st, g
        # end of the ORF of each ATG: the next stop of its group, or the group's last codon
        nsp = self.sp.shape[0]
        if nsp:
            j = np.searchsorted(self.sp, st)
            nstop = self.sp[np.minimum(j, nsp - 1)]
            stop_here = (j < nsp) & (nstop < self.gend[g])  # the next stop is in the ATG's group
            end = np.where(stop_here, nstop, self.gend[g] - 1)
        else:
            stop_here = np.zeros(st.shape[0], dtype=bool)
            end = self.gend[g] - 1
        self.st_end = end
        self.st_len = (end - st + 1) * 3
        self.st_complete = stop_here

    def longest(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Longest ORF of each transcript: (start, length, frame, complete); length 0 = none.
        Ties: earlier frame, then upstream (the first maximum in (frame, codon) order)."""
        S = self.S
        start = np.zeros(S, dtype=np.int64)
        length = np.zeros(S, dtype=np.int64)
        frame = np.zeros(S, dtype=np.int64)
        complete = np.zeros(S, dtype=bool)
        if self.st.shape[0]:
            sid = self.st_g // 3
            best = np.zeros(S, dtype=np.int64)
            np.maximum.at(best, sid, self.st_len)
            cand = np.flatnonzero(self.st_len == best[sid])
            k = cand[_first_per_owner(sid[cand])]
            i, g = sid[k], self.st_g[k]
            frame[i] = g % 3
            start[i] = frame[i] + 3 * (self.st[k] - self.gstart[g])
            length[i] = self.st_len[k]
            complete[i] = self.st_complete[k]
        return start, length, frame, complete


def _concat(seqs: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Encoded concatenation and lengths. Strings are joined and encoded in one go (same codes as
    :func:`encode` per string: ``encode('ascii', 'replace')`` maps each character to one byte)."""
    if all(isinstance(s, str) for s in seqs):
        n = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        b = encode("".join(seqs))
        if b.shape[0] == int(n.sum()):
            return b, n
        # whitespace was dropped by encode: the per-string lengths are wrong, encode one by one
    parts = [encode(s) for s in seqs]
    n = np.array([p.shape[0] for p in parts], dtype=np.int64)
    b = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return b.astype(np.uint8, copy=False), n


def _orf_and_extra(bt: _Batch, hexamer: HexamerTable | None, extra: bool, cnt_all: np.ndarray,
                   out: np.ndarray) -> None:
    """Columns 1..5 and 7 (ORF features) and, with ``extra``, the :data:`EXTRA_FEATURES` block
    (columns 8..35) for the transcripts of ``bt`` (already on the ORF's strand), into ``out``.
    ``cnt_all`` (S, 5): base counts A, C, G, T, other of each transcript (either strand: only the
    GC and ACGT totals are used, which reverse-complementing leaves unchanged)."""
    nan = float("nan")
    S, n, G, gstart = bt.S, bt.n, bt.G, bt.gstart
    s0, L, fo, complete = bt.longest()
    has = L > 0
    nf = n.astype(np.float64)
    out[:, 1] = L
    out[:, 2] = np.where(n > 0, L / np.maximum(nf, 1.0), 0.0)
    out[:, 3] = np.where(has, np.where(n > 0, s0 / np.maximum(nf, 1.0), 0.0), 1.0)
    out[:, 4] = complete
    # ORF codons (stop included): a contiguous run of the ORF frame's group
    gorf = 3 * np.arange(S) + fo
    q0 = (s0 - fo) // 3
    ncod = L // 3
    oidx, oown = _ranges(gstart[gorf] + q0, ncod)
    ocod = bt.cg[oidx]
    # per-phase base counts of the ORF (ORF-relative phase = position within the codon)
    c125 = np.bincount(oown * 125 + ocod, minlength=S * 125).reshape(S, 125)
    pc_orf = (c125 @ _CODON_PHASE_BASE).reshape(S, 3, 5)
    out[:, 5] = np.where(has, _fickett_counts(pc_orf, L), 0.0)

    # hexamers as pairs of consecutive codons of a group: hexamer q of group g = codons q, q + 1
    if hexamer is not None and bt.T:
        pair_keep, pair_val = hexamer._pair_tables()
        hx = np.zeros(bt.T, dtype=np.int32)
        hx[:-1] = bt.cg[:-1].astype(np.int32) * 125 + bt.cg[1:]
        keep = pair_keep[hx]
        keep[bt.last] = False  # a group's last codon starts no hexamer
        vals = pair_val[hx]  # 0.0 where not counted
        vals[bt.last] = 0.0
        ck = np.zeros(bt.T + 1, dtype=np.int64)
        np.cumsum(keep, out=ck[1:])
        # per-group prefix sums of the values, each group starting from 0.0 (a running sum over
        # the whole batch would round differently): one cumsum per group
        pv = np.zeros(bt.T + 3 * S)
        pvb = gstart + np.arange(3 * S)
        for g in np.flatnonzero(G > 1).tolist():
            a, gg = int(gstart[g]), int(G[g])
            p = int(pvb[g]) + 1
            np.cumsum(vals[a : a + gg], out=pv[p : p + gg])

        def span(g: np.ndarray, a: np.ndarray, e: np.ndarray) -> np.ndarray:
            """Mean of counted hexamers q, a <= q < e, of group g (NaN if none)."""
            e = np.maximum(e, a)
            k = ck[gstart[g] + e] - ck[gstart[g] + a]
            v = pv[pvb[g] + e] - pv[pvb[g] + a]
            return np.where(k > 0, v / np.maximum(k, 1), nan)

        gh = np.maximum(G - 1, 0)  # hexamers per group
        # hexamer_orf: in-frame hexamers inside the ORF (CPAT: -1 without a counted one, 0 if L < 6)
        hidx, hown = _ranges(gstart[gorf] + q0, np.where(L >= 6, ncod - 1, 0))
        hk = np.bincount(hown, weights=keep[hidx], minlength=S)
        hs = np.bincount(hown, weights=vals[hidx], minlength=S)
        out[:, 7] = np.where(L >= 6, np.where(hk > 0, hs / np.maximum(hk, 1), -1.0), 0.0)
    else:  # no table: NaN; no codon in the whole batch: no ORF, score 0
        out[:, 7] = nan if hexamer is None else 0.0
    if not extra:
        return

    x = np.full((S, len(EXTRA_FEATURES)), nan)
    T = bt.T
    # maximal ORFs: the first ATG of every stop-delimited stretch
    st, st_g, st_end = bt.st, bt.st_g, bt.st_end
    fm = _first_per_owner(st_end)
    m_len, m_g, m_q = bt.st_len[fm], st_g[fm], st[fm] - gstart[st_g[fm]]
    m_sid = m_g // 3
    order = np.lexsort((-m_len, m_sid))
    sl, ss = m_len[order], m_sid[order]
    firsts = _first_per_owner(ss)
    cnt_m = np.bincount(m_sid, minlength=S)
    orf2 = np.zeros(S)
    two = firsts[cnt_m[ss[firsts]] >= 2]
    orf2[ss[two]] = sl[two + 1]
    x[:, 2] = orf2
    x[:, 3] = np.where(has, orf2 / np.maximum(L, 1), nan)
    x[:, 4] = np.bincount(m_sid, weights=m_len >= 300, minlength=S)
    # stop densities per frame, sorted
    sp, sp_g = bt.sp, bt.sp_g
    nstop = np.bincount(sp_g, minlength=3 * S)
    dens = np.where(G > 0, nstop / np.maximum(G, 1), 0.0).reshape(S, 3)
    x[:, 6:9] = np.sort(dens, axis=1)
    # longest stop-free run per frame: gaps between consecutive stops of a group, before its first
    # and after its last stop, or the whole group without a stop (all on the sparse stop indices)
    if T:
        same = sp_g[1:] == sp_g[:-1]
        fst = _first_per_owner(sp_g)
        lst = np.concatenate((fst[1:] - 1, [sp.shape[0] - 1])) if sp.shape[0] else fst
        first_q = np.asarray(G, dtype=np.int64).copy()  # codons before the first stop (G: no stop)
        first_q[sp_g[fst]] = sp[fst] - gstart[sp_g[fst]]
        run_v = np.concatenate((first_q, bt.gend[sp_g[lst]] - sp[lst] - 1, (sp[1:] - sp[:-1] - 1)[same]))
        run_g = np.concatenate((np.arange(3 * S), sp_g[lst], sp_g[1:][same]))
        best_run = np.zeros(S, dtype=np.int64)
        np.maximum.at(best_run, run_g // 3, run_v)
        x[:, 5] = best_run * 3
        x[:, 27] = first_q.reshape(S, 3).max(axis=1) * 3  # stop-free run from the 5' end
    else:
        x[:, 5] = 0.0
        x[:, 27] = 0.0

    if hexamer is not None and T:
        fs = span(np.arange(3 * S), np.zeros(3 * S, dtype=np.int64), gh).reshape(S, 3)
        x[:, 13] = np.fmax(np.fmax(fs[:, 0], fs[:, 1]), fs[:, 2])
        x[:, 14] = np.fmin(np.fmin(fs[:, 0], fs[:, 1]), fs[:, 2])
        own = fs[np.arange(S), fo]
        oth = np.full(S, nan)
        for f in range(3):
            oth = np.where(fo != f, np.fmax(oth, fs[:, f]), oth)
        x[:, 15] = np.where(has & (own == own) & (oth == oth), own - oth, nan)
        # best-scoring maximal ORF of >= 90 nt: first maximum in (frame, position) order
        sel = np.flatnonzero(m_len >= 90)
        if sel.size:
            g, a, ln = m_g[sel], m_q[sel], m_len[sel]
            e = np.minimum(a + ln // 3 - 1, gh[g])
            k = ck[gstart[g] + e] - ck[gstart[g] + a]
            good = np.flatnonzero(k > 0)
            if good.size:
                g, a, e, ln, k = g[good], a[good], e[good], ln[good], k[good]
                sc = (pv[pvb[g] + e] - pv[pvb[g] + a]) / k
                sid = g // 3
                best = np.full(S, -np.inf)
                np.maximum.at(best, sid, sc)
                cand = np.flatnonzero(sc == best[sid])
                j = cand[_first_per_owner(sid[cand])]
                x[sid[j], 25] = sc[j]
                x[sid[j], 26] = ln[j]
        # 5'UTR / 3'UTR read in the ORF's frame
        h = np.flatnonzero(has)
        x[h, 11] = span(gorf[h], np.zeros(h.size, dtype=np.int64), np.maximum(0, q0[h] - 1))
        x[h, 12] = span(gorf[h], q0[h] + ncod[h], gh[gorf[h]])

    # base counts: whole transcript, ORF (from its codons), GC
    cnt_orf = pc_orf.sum(axis=1)

    def gc(cnt: np.ndarray) -> np.ndarray:
        acgt = cnt[:, 0] + cnt[:, 1] + cnt[:, 2] + cnt[:, 3]
        return np.where(acgt > 0, (cnt[:, 1] + cnt[:, 2]) / np.maximum(acgt, 1), nan)

    x[:, 20] = np.where(has, gc(cnt_all - cnt_orf), gc(cnt_all))
    x[:, 18] = np.where(has, gc(cnt_orf), nan)
    x[:, 19] = np.where(has, gc(pc_orf[:, 2, :]), nan)
    x[:, 0] = np.where(has, s0, nan)
    x[:, 1] = np.where(has, n - (s0 + L), nan)
    # upstream in-frame stop: a stop among codons 0..q0-1 of the ORF's group
    up = np.searchsorted(sp, gstart[gorf] + q0) - np.searchsorted(sp, gstart[gorf])
    x[:, 9] = np.where(has, (up > 0).astype(np.float64), nan)
    # Kozak: A/G at -3, G at +4 (-1 when the context is cut off)
    kz = has & (s0 >= 3) & (s0 + 3 < n)
    pk = np.flatnonzero(kz)
    kv = np.full(S, -1.0)
    if pk.size:
        p = bt.off[pk] + s0[pk]
        kv[pk] = np.isin(bt.b[p - 3], (0, 2)).astype(np.float64) + (bt.b[p + 3] == 2)
    x[:, 10] = np.where(has, kv, nan)
    # codon usage of the ORF (stop included) and of the 3'UTR in the ORF's frame
    if hexamer is not None:
        cc5 = np.where(_CODON_OK, hexamer._codon_contrib[_CODON4M], 0.0)  # per base-5 codon code
        cok = _CODON_OK[ocod]
        k = np.bincount(oown, weights=cok, minlength=S)
        sm = np.bincount(oown, weights=cc5[ocod], minlength=S)
        x[:, 16] = np.where(has & (k > 0), sm / np.maximum(k, 1), nan)
        uq = q0 + ncod
        uidx, uown = _ranges(gstart[gorf] + uq, np.where(has, G[gorf] - uq, 0))
        ucod = bt.cg[uidx]
        uok = _CODON_OK[ucod]
        k = np.bincount(uown, weights=uok, minlength=S)
        sm = np.bincount(uown, weights=cc5[ucod], minlength=S)
        x[:, 17] = np.where(has & (k > 0), sm / np.maximum(k, 1), nan)
    # peptide: translate the ORF's codons (stop dropped if complete), skip stops / X
    aa = _TRANS[ocod]
    drop = np.zeros(ocod.shape[0], dtype=bool)
    ends = np.cumsum(ncod) - 1
    ce = np.flatnonzero(complete & (ncod > 0))
    drop[ends[ce]] = True
    ka = np.flatnonzero((aa < 20) & ~drop)
    aa, aown = aa[ka], oown[ka]
    if aa.size:
        cnt = np.bincount(aown * 20 + aa, minlength=S * 20).reshape(S, 20)
        size = cnt.sum(axis=1)
        pp = np.flatnonzero(size > 0)
        fi = _first_per_owner(aown)
        la = np.concatenate((fi[1:] - 1, [aa.size - 1]))
        first_aa = np.zeros(S, dtype=np.int64)
        last_aa = np.zeros(S, dtype=np.int64)
        first_aa[aown[fi]] = aa[fi]
        last_aa[aown[la]] = aa[la]
        cp, szp = cnt[pp], size[pp].astype(np.float64)
        x[pp, 21] = _isoelectric_points(cp, first_aa[pp], last_aa[pp])
        gravy = np.zeros(pp.size)
        for j in range(20):  # fixed order (a BLAS matmul's order depends on the batch shape)
            gravy += cp[:, j] * _KD[j]
        x[pp, 22] = gravy / szp
        x[pp, 23] = cp[:, _AROM].sum(axis=1) / szp
        x[pp, 24] = cp[:, _CHARGED].sum(axis=1) / szp
    x[n < 3] = nan  # extra_features returns all-NaN below one codon
    out[:, 8 : 8 + len(EXTRA_FEATURES)] = x


def _kmer_block(b: np.ndarray, n: np.ndarray, kmax: int, out: np.ndarray) -> None:
    """Overlapping k-mer frequencies, k = 1..kmax, of every transcript into ``out`` (S, 4 + 16 + ...:
    the k-mer columns of :class:`FeatureExtractor`). One base-4 code of length ``kmax`` per position
    (non-ACGT clamped to T, as :func:`_kmer_codes`), prefixed by the transcript index
    (``key = i * 4**kmax + code``); the key of the k-mer starting there is ``key >> 2 (kmax - k)``."""
    S, N = n.shape[0], b.shape[0]
    if N == 0 or kmax < 1:
        return
    dt = np.int32 if S * 4**kmax < 2**31 else np.int64
    b3 = np.zeros(N + kmax - 1, dtype=dt)
    np.minimum(b, 3, out=b3[:N], casting="unsafe")
    code = b3[:N].copy()
    for j in range(1, kmax):
        code *= 4
        code += b3[j : N + j]
    off = np.cumsum(n) - n
    code += np.repeat((np.arange(S) * 4**kmax).astype(dt), n)
    bad = b >= 4
    if bad.any():  # windows containing a non-ACGT base do not count (rare: per k, mask everything)
        dend = np.repeat(off + n, n) - np.arange(N)  # bases left, this one included
        cb = np.zeros(N + kmax + 1, dtype=np.int64)
        np.cumsum(bad, out=cb[1 : N + 1])
        cb[N + 1 :] = cb[N]
        ar = np.arange(N)
        per_k = []
        for k in range(1, kmax + 1):
            sel = (dend >= k) & (cb[ar + k] == cb[ar])
            per_k.append(np.bincount(code[sel] >> (2 * (kmax - k)), minlength=S * 4**k))
    else:
        # a k-mer window starts either at a position with >= kmax bases left (counted once as
        # kmax-mers, then marginalised over the trailing bases) or in the last kmax - 1 positions
        # of a transcript (its tail: subtracted from the all-position count, then added per k)
        t0 = np.maximum(n - kmax + 1, 0)
        tidx, town = _ranges(off + t0, n - t0)
        tail = code[tidx]
        tail_left = n[town] - (tidx - off[town])
        full = np.bincount(code, minlength=S * 4**kmax) - np.bincount(tail, minlength=S * 4**kmax)
        per_k = []
        for k in range(1, kmax + 1):
            sh = 2 * (kmax - k)
            c = full.reshape(S * 4**k, 4**(kmax - k)).sum(axis=1)
            t = tail[tail_left >= k]
            if t.size:
                c += np.bincount(t >> sh, minlength=S * 4**k)
            per_k.append(c)
    pos = 0
    for k, c in zip(range(1, kmax + 1), per_k):
        c = c.reshape(S, 4**k)
        tot = c.sum(axis=1)
        out[:, pos : pos + 4**k] = np.where(tot[:, None] > 0, c / np.maximum(tot, 1)[:, None], 0.0)
        pos += 4**k


# --------------------------------------------------------------------------------------------------
# feature extraction
# --------------------------------------------------------------------------------------------------
ORF_FEATURES = [
    "length",
    "orf_len",
    "orf_cov",
    "orf_start_frac",
    "orf_complete",
    "fickett_orf",
    "fickett_tx",
    "hexamer_orf",
]


class FeatureExtractor:
    """Turns sequences into a float64 feature matrix (columns: :attr:`feature_names`)."""

    def __init__(self, hexamer: HexamerTable | None = None, kmax: int = 4, both_strands: bool = False,
                 use_kmers: bool = True, extra: bool = False):
        self.hexamer = hexamer
        # Why: int() used to truncate 2.5 to 2 and accept negatives (silently no k-mer columns); a
        # large kmax (4**kmax columns, 4**12 names built here) ran out of memory instead of failing.
        if isinstance(kmax, bool) or not isinstance(kmax, (int, np.integer)) or not 0 <= kmax <= 8:
            raise ValueError(f"kmax must be an integer in 0..8, got {kmax!r}")
        self.kmax = int(kmax)
        self.both_strands = bool(both_strands)
        self.use_kmers = bool(use_kmers)
        self.extra = bool(extra)
        names = list(ORF_FEATURES)
        if self.extra:
            names += EXTRA_FEATURES
        if self.use_kmers:
            for k in range(1, self.kmax + 1):
                names += [f"k{k}_{m}" for m in _all_kmers(k)]
        self._names = names

    @property
    def feature_names(self) -> list[str]:
        return list(self._names)

    @property
    def orf_feature_idx(self) -> np.ndarray:
        return np.arange(len(ORF_FEATURES))

    def one(self, seq: str | np.ndarray) -> np.ndarray:
        """Feature vector of one sequence (a batch of one; see :meth:`transform`)."""
        return self.transform([seq])[0]

    def transform(self, seqs: Sequence[str]) -> np.ndarray:
        """(n, n_features) float64. Sequences go through the batched code path in batches of at most
        ``_BATCH_BASES`` nucleotides (one longer sequence forms its own batch), so memory stays
        bounded whatever the input size; the result does not depend on the batching."""
        # Why: a bare string is a sequence of 1-nt "transcripts": it used to give one row per
        # nucleotide instead of failing (FeatureBaseline.predict_proba(seq) returned len(seq) values).
        if isinstance(seqs, (str, bytes)):
            raise TypeError("transform expects a list of sequences, got a single string; wrap it: [seq]")
        seqs = list(seqs)
        X = np.empty((len(seqs), len(self._names)), dtype=np.float64)
        i = 0
        while i < len(seqs):
            j, tot = i + 1, len(seqs[i])
            while j < len(seqs) and tot + len(seqs[j]) <= _BATCH_BASES:
                tot += len(seqs[j])
                j += 1
            X[i:j] = self._transform_batch(seqs[i:j])
            i = j
        return X

    def _transform_batch(self, seqs: Sequence) -> np.ndarray:
        b, n = _concat(seqs)
        S = n.shape[0]
        out = np.zeros((S, len(self._names)), dtype=np.float64)
        out[:, 0] = n
        fwd = _Batch(b, n)
        sb = fwd
        if self.both_strands and b.shape[0]:
            # reverse strand: transcript i reverse-complemented in place (same offsets)
            src = np.repeat(2 * fwd.off + n - 1, n) - np.arange(b.shape[0])
            rcb = _COMP[b[src]]
            use_rc = _Batch(rcb, n).longest()[1] > fwd.longest()[1]  # forward wins ties
            if use_rc.any():
                sb = _Batch(np.where(np.repeat(use_rc, n), rcb, b), n)
        # Fickett of the whole (forward) transcript from per-phase base counts. The phase used is
        # the position in the batch mod 3, not in the transcript: TESTCODE only uses the max, min
        # and sum over the three phases, which a rotation of the phases leaves unchanged.
        N = b.shape[0]
        key = _phase_offsets(N) + b
        key += np.repeat((np.arange(S) * 15).astype(np.int64), n)
        pc = np.bincount(key, minlength=S * 15).reshape(S, 3, 5)
        out[:, 6] = _fickett_counts(pc, n)
        _orf_and_extra(sb, self.hexamer, self.extra, pc.sum(axis=1), out)
        if self.use_kmers:
            pos = len(ORF_FEATURES) + (len(EXTRA_FEATURES) if self.extra else 0)
            _kmer_block(b, n, self.kmax, out[:, pos:])
        return out

    def config(self) -> dict:
        return {"kmax": self.kmax, "both_strands": self.both_strands, "use_kmers": self.use_kmers,
                "extra": self.extra}


# --------------------------------------------------------------------------------------------------
# pickle-free tree ensemble
# --------------------------------------------------------------------------------------------------
class NumpyTreeEnsemble:
    """Flat-array export of a fitted binary ``HistGradientBoostingClassifier`` with a numpy predictor.

    All trees' nodes are concatenated; ``left``/``right`` are global node indices; ``roots[t]`` is
    the root of tree t. raw(x) = baseline + sum_t value[leaf_t(x)] (summed in tree order, like
    sklearn), proba = expit(raw).
    """

    ARRAYS = ("feature", "threshold", "left", "right", "value", "is_leaf", "missing_left", "roots")

    def __init__(self, feature, threshold, left, right, value, is_leaf, missing_left, roots, baseline: float):
        self.feature = np.asarray(feature, dtype=np.int32)
        self.threshold = np.asarray(threshold, dtype=np.float64)
        self.left = np.asarray(left, dtype=np.int32)
        self.right = np.asarray(right, dtype=np.int32)
        self.value = np.asarray(value, dtype=np.float64)
        self.is_leaf = np.asarray(is_leaf, dtype=bool)
        self.missing_left = np.asarray(missing_left, dtype=bool)
        self.roots = np.asarray(roots, dtype=np.int32)
        self.baseline = float(baseline)

    @classmethod
    def from_sklearn(cls, model) -> "NumpyTreeEnsemble":
        if getattr(model, "n_trees_per_iteration_", 1) != 1:
            raise ValueError("only binary HistGradientBoostingClassifier is supported")
        if getattr(model, "is_categorical_", None) is not None and np.any(model.is_categorical_):
            raise ValueError("categorical features are not supported")
        parts, roots, off = [], [], 0
        for it in model._predictors:
            nodes = it[0].nodes
            if np.any(nodes["is_categorical"]):
                raise ValueError("categorical splits are not supported")
            parts.append(nodes)
            roots.append(off)
            off += nodes.shape[0]
        nodes = np.concatenate(parts) if parts else np.zeros(0, dtype=model._predictors[0][0].nodes.dtype)
        offs = np.repeat(np.asarray(roots, dtype=np.int64), [p.shape[0] for p in parts])
        leaf = nodes["is_leaf"].astype(bool)
        left = np.where(leaf, -1, nodes["left"].astype(np.int64) + offs)
        right = np.where(leaf, -1, nodes["right"].astype(np.int64) + offs)
        return cls(
            feature=nodes["feature_idx"],
            threshold=nodes["num_threshold"],
            left=left,
            right=right,
            value=nodes["value"],
            is_leaf=leaf,
            missing_left=nodes["missing_go_to_left"].astype(bool),
            roots=roots,
            baseline=float(np.ravel(model._baseline_prediction)[0]),
        )

    def raw(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        n = X.shape[0]
        T = self.roots.shape[0]
        node = np.broadcast_to(self.roots, (n, T)).copy()
        rows = np.broadcast_to(np.arange(n)[:, None], (n, T))
        active = ~self.is_leaf[node]
        while active.any():
            r = rows[active]
            nd = node[active]
            x = X[r, self.feature[nd]]
            go_left = np.where(np.isnan(x), self.missing_left[nd], x <= self.threshold[nd])
            node[active] = np.where(go_left, self.left[nd], self.right[nd])
            active = ~self.is_leaf[node]
        leafval = self.value[node]
        out = np.full(n, self.baseline, dtype=np.float64)
        for t in range(T):  # same order of additions as sklearn
            out += leafval[:, t]
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(class 1) for each row."""
        r = self.raw(X)
        return 1.0 / (1.0 + np.exp(-r))

    def arrays(self) -> dict[str, np.ndarray]:
        d = {k: getattr(self, k) for k in self.ARRAYS}
        d["baseline"] = np.array([self.baseline])
        return d

    @classmethod
    def from_arrays(cls, d) -> "NumpyTreeEnsemble":
        return cls(**{k: d[k] for k in cls.ARRAYS}, baseline=float(np.asarray(d["baseline"]).ravel()[0]))


# --------------------------------------------------------------------------------------------------
# baseline classifier
# --------------------------------------------------------------------------------------------------
class FeatureBaseline:
    """Gradient-boosted trees on CPAT-like features; label 1 = lncRNA.

    ``fit(seqs, labels)`` builds the hexamer table from the training sequences only (coding =
    label 0, noncoding = label 1), extracts features, fits ``HistGradientBoostingClassifier`` and
    converts it to a :class:`NumpyTreeEnsemble`. ``predict_proba`` always uses the numpy ensemble, so a
    fitted and a re-loaded baseline give bit-identical probabilities.

    On disk (``save(dir)``): ``baseline.json`` (config, feature names, metadata) and ``baseline.npz``
    (hexamer frequencies + tree arrays; read with ``allow_pickle=False``).
    """

    FORMAT = "lncrna-feature-baseline/1"

    def __init__(self, kmax: int = 4, both_strands: bool = False, use_kmers: bool = True,
                 hgb_params: dict | None = None, hexamer: HexamerTable | None = None,
                 threshold: float = 0.5, extra: bool = False):
        self.kmax = kmax
        self.both_strands = both_strands
        self.use_kmers = use_kmers
        self.extra = bool(extra)
        self.hgb_params = dict(
            max_iter=300, learning_rate=0.1, max_leaf_nodes=31, min_samples_leaf=20,
            l2_regularization=1.0, early_stopping=True, validation_fraction=0.1,
            n_iter_no_change=20, random_state=0,
        )
        if hgb_params:
            self.hgb_params.update(hgb_params)
        self.hexamer = hexamer
        self.threshold = float(threshold)
        self.ensemble: NumpyTreeEnsemble | None = None
        self.sklearn_model = None  # only set right after fit (never persisted)
        self.metadata: dict = {}

    @property
    def extractor(self) -> FeatureExtractor:
        return FeatureExtractor(self.hexamer, self.kmax, self.both_strands, self.use_kmers, self.extra)

    @property
    def feature_names(self) -> list[str]:
        return self.extractor.feature_names

    def features(self, seqs: Sequence[str]) -> np.ndarray:
        return self.extractor.transform(seqs)

    def fit(self, seqs: Sequence[str], labels: Sequence[int], refit_hexamer: bool = True,
            n_threads: int | None = 1) -> "FeatureBaseline":
        """Fit hexamer table (unless ``refit_hexamer=False`` and one is set) and the trees.

        ``n_threads`` caps sklearn's OpenMP threads during the fit (default 1: on a small shared
        machine multi-threaded HistGradientBoosting can be ~10x slower than single-threaded;
        ``None`` leaves the default).
        """
        from sklearn.ensemble import HistGradientBoostingClassifier

        y = np.asarray(labels, dtype=np.int64)
        if refit_hexamer or self.hexamer is None:
            self.hexamer = HexamerTable.fit([s for s, t in zip(seqs, y) if t == 0],
                                            [s for s, t in zip(seqs, y) if t == 1])
        X = self.features(seqs)
        model = HistGradientBoostingClassifier(**self.hgb_params)
        if n_threads is None:
            model.fit(X, y)
        else:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=n_threads, user_api="openmp"):
                model.fit(X, y)
        if list(model.classes_) != [0, 1]:
            raise ValueError("labels must contain both classes 0 (mRNA) and 1 (lncRNA)")
        self.sklearn_model = model
        self.ensemble = NumpyTreeEnsemble.from_sklearn(model)
        self.metadata["n_train"] = int(len(y))
        self.metadata["n_iter"] = int(model.n_iter_)
        return self

    def predict_proba_features(self, X: np.ndarray) -> np.ndarray:
        if self.ensemble is None:
            raise RuntimeError("FeatureBaseline is not fitted")
        return self.ensemble.predict_proba(X)

    def predict_proba(self, seqs: Sequence[str]) -> np.ndarray:
        """P(lncRNA) per sequence, shape (n,)."""
        return self.predict_proba_features(self.features(seqs))

    def predict(self, seqs: Sequence[str]) -> np.ndarray:
        return (self.predict_proba(seqs) >= self.threshold).astype(np.int64)

    # ---- persistence (no pickle) ----
    def save(self, path: str | Path) -> Path:
        if self.ensemble is None or self.hexamer is None:
            raise RuntimeError("nothing to save: FeatureBaseline is not fitted")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {f"tree_{k}": v for k, v in self.ensemble.arrays().items()}
        arrays["hexamer_coding"] = self.hexamer.coding
        arrays["hexamer_noncoding"] = self.hexamer.noncoding
        arrays["hexamer_counted"] = self.hexamer._counted
        # compact dtypes (lossless): node indices / features fit in int32, flags in uint8
        np.savez_compressed(path / "baseline.npz", **arrays)
        cfg = {
            "format": self.FORMAT,
            "kmax": self.kmax,
            "both_strands": self.both_strands,
            "use_kmers": self.use_kmers,
            "extra": self.extra,
            "threshold": self.threshold,
            "positive_class": "lncRNA",
            "hgb_params": self.hgb_params,
            "feature_names": self.feature_names,
            "n_trees": int(self.ensemble.roots.shape[0]),
            "n_nodes": int(self.ensemble.feature.shape[0]),
            "metadata": self.metadata,
        }
        (path / "baseline.json").write_text(json.dumps(cfg, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path = DEFAULT_BASELINE_DIR) -> "FeatureBaseline":
        path = Path(path)
        try:
            cfg = json.loads((path / "baseline.json").read_text())
            if not isinstance(cfg, dict):
                raise ValueError("expected a JSON object")
        except (ValueError, UnicodeDecodeError) as e:  # the file's name in the message: which one is broken
            raise ValueError(f"{path / 'baseline.json'}: {' '.join(str(e).split())}") from None
        if cfg.get("format") != cls.FORMAT:
            raise ValueError(f"unknown baseline format {cfg.get('format')!r} in {path}")
        try:
            with np.load(path / "baseline.npz", allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise
        except Exception as e:  # a truncated or foreign .npz: zipfile, numpy and OS errors
            raise ValueError(f"{path / 'baseline.npz'}: {' '.join(str(e).split())}") from None
        hexamer = HexamerTable(d["hexamer_coding"], d["hexamer_noncoding"])
        hexamer._counted &= d["hexamer_counted"].astype(bool)
        hexamer._pairs = None
        obj = cls(kmax=cfg["kmax"], both_strands=cfg["both_strands"], use_kmers=cfg["use_kmers"],
                  hgb_params=cfg.get("hgb_params"), hexamer=hexamer, threshold=cfg.get("threshold", 0.5),
                  extra=cfg.get("extra", False))
        obj.ensemble = NumpyTreeEnsemble.from_arrays({k[5:]: v for k, v in d.items() if k.startswith("tree_")})
        obj.metadata = cfg.get("metadata", {})
        if obj.feature_names != cfg["feature_names"]:
            raise ValueError("feature names in baseline.json do not match this code version")
        return obj
