"""The batched feature extractor (FeatureExtractor.transform) equals the per-sequence definitions.

``reference_one`` is the per-transcript extractor as it was before the batched path (commit
fa53f06's ``FeatureExtractor.one``), built from the per-sequence functions that stay in
lncrna.features (longest_orf, fickett_score, HexamerTable.score_codes, extra_features). It is slow
(~1 ms per transcript) and lives here only as the reference.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from lncrna import features as F
from lncrna.data import load_split
from lncrna.features import (
    EXTRA_FEATURES,
    ORF_FEATURES,
    FeatureBaseline,
    FeatureExtractor,
    HexamerTable,
    encode,
    extra_features,
    fickett_score,
    longest_orf,
)

TOL = 1e-9  # sums are taken in a different order in a few features: differences are ~1e-15


def reference_one(fx: FeatureExtractor, seq) -> np.ndarray:
    b = encode(seq)
    n = b.shape[0]
    out = np.zeros(len(fx.feature_names), dtype=np.float64)
    orf = longest_orf(b, fx.both_strands)
    sb = F._revcomp(b) if orf.strand == "-" else b
    ob = sb[orf.start : orf.end]
    L = orf.length
    out[0] = n
    out[1] = L
    out[2] = L / n if n else 0.0
    out[3] = (orf.start / n if n else 0.0) if L else 1.0
    out[4] = 1.0 if orf.complete else 0.0
    out[5] = fickett_score(ob) if L else 0.0
    out[6] = fickett_score(b)
    out[7] = (fx.hexamer.score_codes(ob) if L else 0.0) if fx.hexamer is not None else np.nan
    pos = len(ORF_FEATURES)
    if fx.extra:
        out[pos : pos + len(EXTRA_FEATURES)] = extra_features(sb, orf, fx.hexamer)
        pos += len(EXTRA_FEATURES)
    if fx.use_kmers:
        valid = None if (n == 0 or int(b.max()) < 4) else (b < 4)
        for k in range(1, fx.kmax + 1):
            code, ok = F._kmer_codes(b, k, valid)
            if code.size:
                cnt = np.bincount(code if ok is None else code[ok], minlength=4**k)
                if cnt.sum():
                    out[pos : pos + 4**k] = cnt / cnt.sum()
            pos += 4**k
    return out


def reference_transform(fx: FeatureExtractor, seqs) -> np.ndarray:
    return np.array([reference_one(fx, s) for s in seqs]).reshape(len(seqs), len(fx.feature_names))


def assert_same(a: np.ndarray, b: np.ndarray, names: list[str], tol: float = TOL) -> None:
    assert a.shape == b.shape
    na, nb = np.isnan(a), np.isnan(b)
    bad_nan = np.flatnonzero((na != nb).any(axis=0))
    assert not bad_nan.size, f"NaN pattern differs in {[names[j] for j in bad_nan]}"
    d = np.abs(np.where(na, 0.0, a - b))
    worst = np.unravel_index(int(np.argmax(d)), d.shape) if d.size else (0, 0)
    assert d.max(initial=0.0) <= tol, f"{names[worst[1]]} row {worst[0]}: {a[worst]} vs {b[worst]}"


@pytest.fixture(scope="module")
def shipped() -> FeatureBaseline:
    return FeatureBaseline.load()


@pytest.fixture(scope="module")
def val_seqs() -> list[str]:
    return list(load_split("val").seq[:2000])


def test_shipped_features_equal_reference_on_2000_val_transcripts(shipped, val_seqs):
    fx = shipped.extractor
    assert fx.extra and fx.use_kmers and fx.hexamer is not None  # the configuration that ships
    X = fx.transform(val_seqs)
    R = reference_transform(fx, val_seqs)
    assert_same(X, R, fx.feature_names)
    # integer-valued and table-lookup features are exact, not merely close
    exact = [j for j, nm in enumerate(fx.feature_names)
             if nm not in ("hexamer_orf", "codon_orf", "codon_utr3", "pep_gravy")]
    np.testing.assert_array_equal(X[:, exact], R[:, exact])
    np.testing.assert_allclose(shipped.predict_proba_features(X), shipped.predict_proba_features(R), rtol=0, atol=1e-12)


def test_batching_does_not_change_features(shipped, val_seqs, monkeypatch):
    fx = shipped.extractor
    seqs = val_seqs[:300]
    whole = fx.transform(seqs)
    monkeypatch.setattr(F, "_BATCH_BASES", 5000)  # many small batches, long transcripts alone
    np.testing.assert_array_equal(fx.transform(seqs), whole)
    np.testing.assert_array_equal(np.array([fx.one(s) for s in seqs[:20]]), whole[:20])


def _edge_cases() -> list:
    rng = random.Random(11)
    seqs: list = ["", "A", "AT", "ATG", "ATGA", "ATGTAA", "ATGAAATAG", "NNNNNN", "ATGNNNTAA",
                  "CCATGGCC", "atgaaacccgggtttuaa", "ACGU" * 5, "ATG" * 40, "ATGAAA" * 30 + "TGA"]
    for _ in range(250):
        n = rng.choice([rng.randint(0, 12), rng.randint(13, 200), rng.randint(200, 1500)])
        alphabet = rng.choice(["ACGT", "ACGT", "AACGTT", "ACGTN", "ATGC" * 20 + "N", "ACGTRYN"])
        s = "".join(rng.choice(alphabet) for _ in range(n))
        if rng.random() < 0.3 and n > 40:  # plant a long ORF
            i = rng.randint(0, n - 40)
            s = s[:i] + "GCCACCATG" + "".join(rng.choice(["GCT", "AAA", "GAC", "TGG", "CGC"]) for _ in range(rng.randint(10, 150))) + rng.choice(["TAA", "TAG", "TGA", ""]) + s[i:]
        if rng.random() < 0.1:
            s = s.lower()
        seqs.append(s)
    seqs.append(encode("ATGCCCGGGTAAATGNNN"))  # already-encoded input
    return seqs


@pytest.mark.parametrize("extra", [True, False])
@pytest.mark.parametrize("both_strands", [False, True])
@pytest.mark.parametrize("with_table", [True, False])
def test_edge_cases_equal_reference(shipped, extra, both_strands, with_table):
    tab = shipped.hexamer if with_table else None
    fx = FeatureExtractor(tab, kmax=4, both_strands=both_strands, extra=extra)
    seqs = _edge_cases()
    assert_same(fx.transform(seqs), reference_transform(fx, seqs), fx.feature_names)


@pytest.mark.parametrize("kmax,use_kmers", [(1, True), (3, True), (6, True), (4, False)])
def test_kmer_settings_equal_reference(kmax, use_kmers, val_seqs):
    rng = np.random.default_rng(5)
    cod, non = rng.random(4096), rng.random(4096)
    cod[:300] = 0.0  # +-1 and skipped hexamers
    non[200:500] = 0.0
    tab = HexamerTable(cod / cod.sum(), non / non.sum())
    fx = FeatureExtractor(tab, kmax=kmax, use_kmers=use_kmers, extra=True)
    seqs = _edge_cases()[:120] + val_seqs[:80]
    assert_same(fx.transform(seqs), reference_transform(fx, seqs), fx.feature_names)


def test_empty_input(shipped):
    fx = shipped.extractor
    assert fx.transform([]).shape == (0, len(fx.feature_names))
