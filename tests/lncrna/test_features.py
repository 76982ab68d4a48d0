"""Tests for lncrna.features: ORF finder, Fickett, hexamer score, numpy trees, FeatureBaseline."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from lncrna.data import load_split
from lncrna.features import (
    FeatureBaseline,
    FeatureExtractor,
    HexamerTable,
    NumpyTreeEnsemble,
    fickett_score,
    longest_orf,
)

REPO = Path(__file__).resolve().parents[2]
# CPAT's human hexamer table (liguowang/cpat, GPL-2.0-or-later), copied so the test needs no ../shared
HUMAN_HEXAMER = Path(__file__).parent / "data" / "Human_Hexamer.tsv"

STOPS = {"TAA", "TAG", "TGA"}
COMP = {"A": "T", "C": "G", "G": "C", "T": "A", "N": "N"}


# ----------------------------------------------------------------------------------------------
# straightforward reference implementations (loops, no numpy)
# ----------------------------------------------------------------------------------------------
def ref_longest_orf(seq: str):
    """Every ATG to its first in-frame stop (inclusive) or to the last full codon. Returns
    (length, start) of the longest; ties: earlier frame, then upstream (CPAT order)."""
    best = (0, 0)
    for frame in range(3):
        i = frame
        while i + 3 <= len(seq):
            if seq[i : i + 3] == "ATG":
                j = i
                while j + 3 <= len(seq) and seq[j : j + 3] not in STOPS:
                    j += 3
                end = j + 3 if j + 3 <= len(seq) else j
                L = end - i
                if L > best[0]:
                    best = (L, i)
                i = end  # CPAT resumes after the ORF
                continue
            i += 3
    return best


_POS_PROB = {"A": [0.94, 0.68, 0.84, 0.93, 0.58, 0.68, 0.45, 0.34, 0.20, 0.22],
             "C": [0.80, 0.70, 0.70, 0.81, 0.66, 0.48, 0.51, 0.33, 0.30, 0.23],
             "G": [0.90, 0.88, 0.74, 0.64, 0.53, 0.48, 0.27, 0.16, 0.08, 0.08],
             "T": [0.97, 0.97, 0.91, 0.68, 0.69, 0.44, 0.54, 0.20, 0.09, 0.09]}
_POS_W = {"A": 0.26, "C": 0.18, "G": 0.31, "T": 0.33}
_POS_PARA = [1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 0.0]
_CON_PROB = {"A": [0.28, 0.49, 0.44, 0.55, 0.62, 0.49, 0.67, 0.65, 0.81, 0.21],
             "C": [0.82, 0.64, 0.51, 0.64, 0.59, 0.59, 0.43, 0.44, 0.39, 0.31],
             "G": [0.40, 0.54, 0.47, 0.64, 0.64, 0.73, 0.41, 0.41, 0.33, 0.29],
             "T": [0.28, 0.24, 0.39, 0.40, 0.55, 0.75, 0.56, 0.69, 0.51, 0.58]}
_CON_W = {"A": 0.11, "C": 0.12, "G": 0.15, "T": 0.14}
_CON_PARA = [0.33, 0.31, 0.29, 0.27, 0.25, 0.23, 0.21, 0.17, 0.0]


def ref_fickett(dna: str) -> float:
    """Fickett (1982) TESTCODE as written out in CPAT's fickett.py."""
    if len(dna) < 2:
        return 0.0
    score = 0.0
    parts = [dna[p::3] for p in range(3)]
    for b in "ACGT":
        c = dna.count(b) / len(dna)
        for idx, t in enumerate(_CON_PARA):
            if c >= t:
                score += _CON_PROB[b][idx] * _CON_W[b]
                break
    for b in "ACGT":
        counts = [p.count(b) for p in parts]
        v = max(counts) / (min(counts) + 1.0)
        for idx, t in enumerate(_POS_PARA):
            if v >= t:
                score += _POS_PROB[b][idx] * _POS_W[b]
                break
    return score


def ref_hexamer(orf: str, cod: dict, non: dict) -> float:
    if len(orf) < 6:
        return 0.0
    tot, n = 0.0, 0
    for i in range(0, len(orf) - 5, 3):
        k = orf[i : i + 6]
        c, g = cod.get(k, 0.0), non.get(k, 0.0)
        if c > 0 and g > 0:
            tot += math.log(c / g)
        elif c > 0:
            tot += 1
        elif g > 0:
            tot -= 1
        else:
            continue
        n += 1
    return tot / n if n else -1.0


# ----------------------------------------------------------------------------------------------
# ORF
# ----------------------------------------------------------------------------------------------
def test_orf_simple_known():
    s = "CC" + "ATG" + "AAA" * 5 + "TAG" + "CCCC"
    o = longest_orf(s)
    assert (o.start, o.end, o.length, o.strand, o.complete) == (2, 23, 21, "+", True)
    assert s[o.start : o.start + 3] == "ATG" and s[o.end - 3 : o.end] == "TAG"


def test_orf_picks_longest_across_frames_and_nested_atg():
    short = "ATG" + "GCC" * 3 + "TAA"  # 15 nt, frame 0
    long_ = "ATG" + "ATG" + "GCA" * 10 + "TGA"  # 39 nt, inner ATG must not shorten it
    s = short + "C" + long_ + "GG"  # long ORF starts at 16 -> frame 1
    o = longest_orf(s)
    assert (o.start, o.length, o.frame) == (16, 39, 1)


def test_no_atg_gives_empty_orf():
    o = longest_orf("CCCGGGTTTAAACCCGGGTTTAAA" * 5)
    assert o.length == 0 and o.complete is False
    f = FeatureExtractor(None, kmax=1).one("CCCGGGTTTAAACCCGGGTTTAAA" * 5)
    assert f[1] == 0 and f[2] == 0 and f[3] == 1.0


def test_orf_without_stop_runs_to_last_full_codon():
    s = "GGATGAAACCCGGGTT"  # ATG at 2, no stop; last full codon in frame 2 ends at 14
    o = longest_orf(s)
    assert (o.start, o.end, o.complete) == (2, 14, False)


def test_orf_reverse_strand_only_when_enabled():
    orf = "ATG" + "GCC" * 20 + "TAA"  # 66 nt
    rc = "".join(COMP[b] for b in reversed(orf))
    s = "CCCC" + rc + "CCCC"
    fwd = longest_orf(s)
    both = longest_orf(s, both_strands=True)
    assert fwd.length < 66
    assert both.strand == "-" and both.length == 66 and both.complete
    rcs = "".join(COMP[b] for b in reversed(s))
    assert rcs[both.start : both.end] == orf


def test_orf_matches_reference_on_random_sequences():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(0, 400)
        s = "".join(rng.choice("ACGT") for _ in range(n))
        L, start = ref_longest_orf(s)
        o = longest_orf(s)
        assert o.length == L, s
        if L:
            assert o.start == start, s


# ----------------------------------------------------------------------------------------------
# Fickett and hexamer
# ----------------------------------------------------------------------------------------------
KNOWN = ("ATGGCGTACGCTTAGCCGATCGATCGGATTACAGGCATGCAAGCTTGGCACTGGCCGTCGTTTTACAACGTCGTGACTGGGAAAACCCTG"
         "GCGTTACCCAACTTAATCGCCTTGCAGCACATCCCCCTTTCGCCAGCTGGCGTAATAGCGAAGAGGCCCGCACCGATCGCCCTTCCCAACAG"
         "TTGCGCAGCCTGAATGGCGAATGG")


def test_fickett_known_values():
    # reference values from CPAT 3.0.5 cpmodule.fickett.fickett_value
    assert fickett_score(KNOWN) == pytest.approx(1.178, abs=1e-12)
    assert fickett_score("ATGAAACCCGGGTTTTAA") == pytest.approx(0.3482, abs=1e-12)
    assert fickett_score(KNOWN) == pytest.approx(ref_fickett(KNOWN), abs=1e-12)
    assert fickett_score("A") == 0.0


def test_fickett_matches_reference_on_random_sequences():
    rng = random.Random(3)
    for _ in range(200):
        s = "".join(rng.choice("ACGT" if rng.random() < 0.5 else "AACGTT") for _ in range(rng.randint(2, 600)))
        assert fickett_score(s) == pytest.approx(ref_fickett(s), abs=1e-12)


def test_hexamer_score_matches_reference_and_tsv_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    cod = rng.random(4096)
    non = rng.random(4096)
    cod[:50] = 0.0  # exercise the +-1 / skip rules
    non[25:75] = 0.0
    tab = HexamerTable(cod / cod.sum(), non / non.sum())
    tab.to_cpat_tsv(tmp_path / "h.tsv")
    tab2 = HexamerTable.from_cpat_tsv(tmp_path / "h.tsv")
    cd, nd = {}, {}
    for line in open(tmp_path / "h.tsv").read().splitlines()[1:]:
        k, c, g = line.split("\t")
        cd[k], nd[k] = float(c), float(g)
    r = random.Random(1)
    for _ in range(100):
        s = "".join(r.choice("ACGT") for _ in range(r.randint(0, 300)))
        ref = ref_hexamer(s, cd, nd)
        assert tab.score(s) == pytest.approx(ref, abs=1e-9)
        assert tab2.score(s) == pytest.approx(ref, abs=1e-9)
    assert tab.score("AAAAA") == 0.0
    assert tab.score("A" * 12) == pytest.approx(ref_hexamer("A" * 12, cd, nd))  # AAAAAA is code 0


def test_hexamer_with_cpat_human_table():
    tab = HexamerTable.from_cpat_tsv(HUMAN_HEXAMER)
    cd, nd = {}, {}
    for line in open(HUMAN_HEXAMER):
        f = line.split()
        if f[0] != "hexamer":
            cd[f[0]], nd[f[0]] = float(f[1]), float(f[2])
    # reference values from CPAT 3.0.5 FrameKmer.kmer_ratio(seq, 6, 3, coding, noncoding)
    assert tab.score(KNOWN) == pytest.approx(-0.0717010294496607, abs=1e-12)
    assert tab.score(KNOWN[:15]) == pytest.approx(-0.03059546583344419, abs=1e-12)
    assert tab.score(KNOWN) == pytest.approx(ref_hexamer(KNOWN, cd, nd), abs=1e-12)


def test_kmer_features_are_normalised_frequencies():
    fx = FeatureExtractor(None, kmax=3)
    f = fx.one("ACGTACGTAA")
    names = fx.feature_names
    for k in (1, 2, 3):
        idx = [i for i, n in enumerate(names) if n.startswith(f"k{k}_")]
        assert len(idx) == 4**k
        assert f[idx].sum() == pytest.approx(1.0)
    assert f[names.index("k1_A")] == pytest.approx(4 / 10)
    assert f[names.index("k2_AC")] == pytest.approx(2 / 9)
    assert f[names.index("length")] == 10


# ----------------------------------------------------------------------------------------------
# baseline on real data
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_slices():
    # slices of the committed splits: mouse mRNA and lncRNA from train, held-out ones from test_mouse
    train, test = load_split("train"), load_split("test_mouse")
    pc = list(train.seq[(train.species == "mouse") & (train.label == 0)][:300]) + list(test.seq[test.label == 0][:200])
    lnc = list(train.seq[(train.species == "mouse") & (train.label == 1)][:300])
    lnc_test = list(test.seq[test.label == 1][:200])
    train_s = pc[:300] + lnc[:300]
    train_y = np.array([0] * 300 + [1] * 300)
    test_s = pc[300:500] + lnc_test
    test_y = np.array([0] * 200 + [1] * 200)
    return train_s, train_y, test_s, test_y


@pytest.fixture(scope="module")
def fitted(real_slices):
    train_s, train_y, _, _ = real_slices
    m = FeatureBaseline(kmax=3, hgb_params={"max_iter": 60, "early_stopping": False})
    return m.fit(train_s, train_y)


def test_small_fit_beats_085_on_held_out(fitted, real_slices):
    _, _, test_s, test_y = real_slices
    acc = float(np.mean((fitted.predict_proba(test_s) >= 0.5) == test_y))
    assert acc > 0.85, acc


def test_numpy_trees_equal_sklearn(fitted, real_slices):
    _, _, test_s, _ = real_slices
    X = fitted.features(test_s)
    X[::17, 5] = np.nan  # also exercise missing-value routing
    ref = fitted.sklearn_model.predict_proba(X)[:, 1]
    ours = fitted.ensemble.predict_proba(X)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert fitted.ensemble.roots.shape[0] == fitted.sklearn_model.n_iter_


def test_save_load_round_trip(fitted, real_slices, tmp_path):
    _, _, test_s, _ = real_slices
    p1 = fitted.predict_proba(test_s[:100])
    fitted.save(tmp_path / "bl")
    assert {p.name for p in (tmp_path / "bl").iterdir()} == {"baseline.json", "baseline.npz"}
    with np.load(tmp_path / "bl" / "baseline.npz", allow_pickle=False) as z:  # no object arrays
        assert all(z[k].dtype != object for k in z.files)
    loaded = FeatureBaseline.load(tmp_path / "bl")
    assert loaded.sklearn_model is None
    np.testing.assert_array_equal(loaded.predict_proba(test_s[:100]), p1)
    np.testing.assert_array_equal(loaded.hexamer.coding, fitted.hexamer.coding)


def test_tree_ensemble_hand_made():
    # one stump: x0 <= 1.5 -> -1 else +2 ; NaN goes right; baseline 0.5
    ens = NumpyTreeEnsemble(feature=[0, 0, 0], threshold=[1.5, 0, 0], left=[1, -1, -1], right=[2, -1, -1],
                            value=[0, -1.0, 2.0], is_leaf=[False, True, True], missing_left=[False, False, False],
                            roots=[0], baseline=0.5)
    raw = ens.raw(np.array([[1.0], [1.5], [3.0], [np.nan]]))
    np.testing.assert_array_equal(raw, [-0.5, -0.5, 2.5, 2.5])


def test_shipped_baseline_loads_and_is_small():
    from lncrna.features import DEFAULT_BASELINE_DIR

    size = sum(p.stat().st_size for p in DEFAULT_BASELINE_DIR.iterdir() if p.is_file())
    assert size < 2 * 1024 * 1024
    m = FeatureBaseline.load()
    coding = "GCCACC" + "ATG" + "GCTGAAGCCAAGCTGGACGAG" * 30 + "TAA" + "AAAAA" * 20
    p = m.predict_proba([coding, "CCCTTTGGGAAA" * 60])
    assert p.shape == (2,) and np.all((p >= 0) & (p <= 1))
    assert p[0] < 0.5  # a long ORF is coding


# ----------------------------------------------------------------------------------------------
# extra features (ORF set, frames, UTRs, codon usage, peptide)
# ----------------------------------------------------------------------------------------------
def test_extra_features_hand_made():
    from lncrna.features import EXTRA_FEATURES, encode, extra_features

    # 5'UTR with an in-frame stop (TAA at 3), Kozak ACC ATG G, ORF of 5 codons + stop, 3'UTR
    utr5 = "GGCTAAGCCACC"  # 12 nt, ATG at 12 (frame 0), -3 = A
    orf = "ATGGCTAAAGAAGATTGA"  # M A K E D stop = 18 nt
    utr3 = "CCCCCCCCC"
    s = utr5 + orf + utr3
    o = longest_orf(s)
    assert (o.start, o.end, o.complete) == (12, 30, True)
    f = dict(zip(EXTRA_FEATURES, extra_features(encode(s), o, None)))
    assert f["utr5_len"] == 12 and f["utr3_len"] == 9
    assert f["upstream_stop"] == 1.0
    assert f["kozak"] == 2.0  # A at -3, G at +4
    kd = {"M": 1.9, "A": 1.8, "K": -3.9, "E": -3.5, "D": -3.5}
    assert f["pep_gravy"] == pytest.approx(sum(kd.values()) / 5)
    assert f["pep_charged"] == pytest.approx(3 / 5)
    assert f["pep_aromatic"] == 0.0
    assert f["gc3_orf"] == pytest.approx(1 / 6)  # G T A A T A at 3rd positions (stop included)
    assert math.isnan(f["hexamer_utr5"]) and math.isnan(f["codon_orf"])  # no hexamer table


def test_extra_peptide_matches_biopython():
    from Bio.Seq import Seq
    from Bio.SeqUtils.ProtParam import ProteinAnalysis

    from lncrna.features import EXTRA_FEATURES, encode, extra_features

    rng = random.Random(3)
    i_pi, i_gr = EXTRA_FEATURES.index("pep_pi"), EXTRA_FEATURES.index("pep_gravy")
    n = 0
    while n < 20:
        s = "".join(rng.choice("ACGT") for _ in range(600))
        o = longest_orf(s)
        if o.length < 60:
            continue
        pep = str(Seq(s[o.start : o.end]).translate()).rstrip("*")
        pa = ProteinAnalysis(pep)
        f = extra_features(encode(s), o, None)
        assert f[i_gr] == pytest.approx(pa.gravy(), abs=1e-9)
        assert f[i_pi] == pytest.approx(pa.isoelectric_point(), abs=0.02)
        n += 1


def test_extra_flag_layout_and_round_trip(real_slices, tmp_path):
    from lncrna.features import EXTRA_FEATURES

    train_s, train_y, test_s, _ = real_slices
    tab = HexamerTable.fit([s for s, y in zip(train_s, train_y) if y == 0], [s for s, y in zip(train_s, train_y) if y == 1])
    a = FeatureExtractor(tab, kmax=2).transform(test_s[:20])
    b = FeatureExtractor(tab, kmax=2, extra=True).transform(test_s[:20])
    ne = len(EXTRA_FEATURES)
    np.testing.assert_array_equal(b[:, :8], a[:, :8])
    np.testing.assert_array_equal(b[:, 8 + ne :], a[:, 8:])
    m = FeatureBaseline(kmax=2, extra=True, hgb_params={"max_iter": 30, "early_stopping": False})
    m.fit(train_s, train_y)
    m.save(tmp_path / "bx")
    loaded = FeatureBaseline.load(tmp_path / "bx")
    assert loaded.extra and loaded.feature_names == m.feature_names
    np.testing.assert_array_equal(loaded.predict_proba(test_s[:50]), m.predict_proba(test_s[:50]))
