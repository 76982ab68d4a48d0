"""Edge cases of lncrna tokenization.py, features.py and model.py (N runs, bad inputs, file errors).

Every test here failed before its fix, except five guards that pin what must not change
(test_encode_max_windows_one_keeps_one_window, test_classifier_from_mlm_copies_a_matching_encoder,
test_from_pretrained_round_trip_is_unchanged, test_whitespace_free_batches_keep_their_features,
test_feature_extractor_accepts_the_kmax_range). No fix changes a number the shipped model computes
for the data it was evaluated on (no split holds whitespace or any non-ACGT character)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lncrna.features import FeatureBaseline, FeatureExtractor, HexamerTable, encode, fickett_score, longest_orf
from lncrna.model import ModelConfig, NucleotideClassifier, classifier_from_mlm, mlm_model
from lncrna.tokenization import KmerTokenizer

TINY = dict(k=3, stride=3, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
            window_tokens=16, max_windows=4, dropout=0.0)
SEQ = "GCCACCATGGCTAAAGACTGGCGCAAAGCTGACTGGTAAGGCTTACGATCG" * 4


@pytest.fixture(scope="module")
def tiny() -> NucleotideClassifier:
    torch.manual_seed(0)
    return NucleotideClassifier(ModelConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def shipped_baseline() -> FeatureBaseline:
    return FeatureBaseline.load()


# ---- a bare string where a list of sequences is expected ----------------------------------------
def test_model_predict_proba_rejects_a_bare_string(tiny):
    with pytest.raises(TypeError, match="single string"):
        tiny.predict_proba(SEQ)
    assert tiny.predict_proba([SEQ]).shape == (1,)  # the list form still works


def test_features_reject_a_bare_string(shipped_baseline):
    with pytest.raises(TypeError, match="single string"):
        FeatureExtractor().transform(SEQ)
    with pytest.raises(TypeError, match="single string"):
        shipped_baseline.predict_proba(SEQ)
    assert shipped_baseline.predict_proba([SEQ]).shape == (1,)


# ---- windowing --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_encode_rejects_a_non_positive_max_windows(tiny, bad):
    with pytest.raises(ValueError, match="max_windows must be a positive integer"):
        tiny.encode(SEQ * 5, max_windows=bad)


def test_encode_max_windows_one_keeps_one_window(tiny):
    assert len(tiny.encode(SEQ * 5, max_windows=1)) == 1
    assert len(tiny.encode(SEQ * 5, max_windows=np.int64(2))) == 2


# ---- MLM -> classifier ----------------------------------------------------------------------------
def test_classifier_from_mlm_rejects_an_encoder_with_fewer_layers():
    cfg = ModelConfig(**TINY)
    shallow = ModelConfig(**{**TINY, "num_layers": 1})
    mlm = mlm_model(shallow, len(KmerTokenizer(k=3)))
    with pytest.raises(ValueError, match="does not fit"):
        classifier_from_mlm(cfg, mlm)  # used to leave layer 1 silently random


def test_classifier_from_mlm_copies_a_matching_encoder():
    cfg = ModelConfig(**TINY)
    torch.manual_seed(1)
    mlm = mlm_model(cfg, len(KmerTokenizer(k=3)))
    model = classifier_from_mlm(cfg, mlm)
    for name, p in mlm.bert.state_dict().items():
        torch.testing.assert_close(model.bert.bert.state_dict()[name], p, rtol=0, atol=0)


# ---- from_pretrained errors name the file -------------------------------------------------------
def _saved(tiny, tmp_path: Path) -> Path:
    d = tmp_path / "m"
    tiny.save_pretrained(d)
    return d


@pytest.mark.parametrize("edit,expected", [
    (lambda c: {**c, "hidden_sise": 64}, "unknown model config key"),
    (lambda c: [1, 2], "not a lncrna model config"),
    (lambda c: {**c, "k": 9}, "k must be in 1..6"),
])
def test_from_pretrained_config_errors_name_the_file(tiny, tmp_path, edit, expected):
    d = _saved(tiny, tmp_path)
    cfg = json.loads((d / "lncrna_config.json").read_text())
    (d / "lncrna_config.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(ValueError, match=expected) as e:
        NucleotideClassifier.from_pretrained(d)
    assert "lncrna_config.json" in str(e.value)


def test_from_pretrained_shape_mismatch_names_the_weights_file(tiny, tmp_path):
    d = _saved(tiny, tmp_path)
    cfg = json.loads((d / "lncrna_config.json").read_text())
    (d / "lncrna_config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    with pytest.raises(ValueError, match="size mismatch") as e:
        NucleotideClassifier.from_pretrained(d)
    assert "model.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_from_pretrained_round_trip_is_unchanged(tiny, tmp_path):
    d = _saved(tiny, tmp_path)
    back = NucleotideClassifier.from_pretrained(d)
    # weights are stored in fp16: compare against the fp16-rounded originals
    for name, p in tiny.bert.state_dict().items():
        torch.testing.assert_close(back.bert.state_dict()[name], p.half().float(), rtol=0, atol=0)


# ---- whitespace inside a sequence ---------------------------------------------------------------
def test_features_ignore_whitespace_like_the_tokenizer(shipped_baseline):
    clean = "ATGAAACCCGGGTTTTAA" * 5
    pasted = "ATGAAACCC\nGGGTTTTAA" * 5  # a sequence pasted with its line breaks
    fx = shipped_baseline.extractor
    X = fx.transform([clean, pasted, " " + clean + "\r\n"])
    np.testing.assert_array_equal(X[1], X[0])  # used to read '\n' as N: length 95, orf_len 42
    np.testing.assert_array_equal(X[2], X[0])
    assert X[0, 0] == 90 and X[0, 1] == 18
    assert longest_orf(pasted) == longest_orf(clean)
    assert fickett_score(pasted) == fickett_score(clean)
    np.testing.assert_array_equal(encode(b"AC GT\t"), encode("ACGT"))
    tok = KmerTokenizer(k=3)
    np.testing.assert_array_equal(tok.encode_ids(pasted), tok.encode_ids(clean))


def test_whitespace_free_batches_keep_their_features(shipped_baseline):
    # the whitespace fallback must not touch a batch without whitespace (mixed str / encoded input)
    fx = shipped_baseline.extractor
    seqs = ["ATGAAACCCGGGTTTTAA" * 5, "acgunnnATGCCCTGA", ""]
    X = fx.transform(seqs)
    X_mixed = fx.transform([seqs[0], encode(seqs[1]), seqs[2]])
    np.testing.assert_array_equal(X, X_mixed)
    assert list(X[:, 0]) == [90, 16, 0]


# ---- hexamer table validation -------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["negative", "nan", "inf", "size"])
def test_hexamer_table_rejects_invalid_frequencies(bad):
    cod, non = np.full(4096, 1 / 4096), np.full(4096, 1 / 4096)
    if bad == "negative":
        cod[7] = -0.5  # used to be "counted" with contribution 0
    elif bad == "nan":
        non[3] = np.nan
    elif bad == "inf":
        cod[3] = np.inf
    else:
        cod = cod[:100]
    with pytest.raises(ValueError, match="HexamerTable"):
        HexamerTable(cod, non)


# ---- tokenizer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"k": True}, {"stride": True}])
def test_tokenizer_rejects_booleans(kw):
    with pytest.raises(ValueError, match="must be an int"):
        KmerTokenizer(**kw)


@pytest.mark.parametrize("bad", [-1, 70, 10**6])
def test_tokenizer_rejects_out_of_range_ids(bad):
    tok = KmerTokenizer(k=3)  # 6 + 64 = 70 ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.convert_ids_to_tokens([bad])
    assert tok.convert_ids_to_tokens([69, 5, 6]) == ["TTT", "[NKMER]", "AAA"]


@pytest.mark.parametrize("row,expected", [
    ("AAAAAA\t0.1\n", ":3: expected 'hexamer"),          # a missing column
    ("AAAAAA\t0.1\tabc\n", ":3: expected 'hexamer"),     # not a number
    ("AAAAAA\t-0.1\t0.2\n", "finite and >= 0"),          # a negative frequency
])
def test_cpat_hexamer_tsv_errors_name_file_and_line(tmp_path, row, expected):
    path = tmp_path / "bad_Hexamer.tsv"
    path.write_text("hexamer\tcoding\tnoncoding\nCCCCCC\t0.2\t0.1\n" + row)
    with pytest.raises(ValueError, match=expected) as e:
        HexamerTable.from_cpat_tsv(path)
    assert str(path) in str(e.value)


def test_save_pretrained_refuses_weights_that_overflow_fp16(tmp_path):
    torch.manual_seed(0)
    model = NucleotideClassifier(ModelConfig(**TINY)).eval()
    with torch.no_grad():
        model.bert.classifier.weight[0, 0] = 1e6  # > 65504, the largest fp16
    with pytest.raises(ValueError, match="does not fit in torch.float16"):
        model.save_pretrained(tmp_path / "fp16")  # used to write inf: NaN predictions after loading
    assert not (tmp_path / "fp16" / "model.safetensors").exists()
    back = NucleotideClassifier.from_pretrained(model.save_pretrained(tmp_path / "fp32", dtype=torch.float32))
    assert np.isfinite(back.predict_proba([SEQ])).all()


# ---- N runs (assembly gaps): [NKMER] was never trained ----------------------------------------
def test_window_ids_leave_out_nkmer_tokens():
    from lncrna.model import NKMER_ID, window_ids

    cfg = ModelConfig(**TINY)  # 14 k-mer tokens per window
    ids = np.array([6, 7] + [NKMER_ID] * 2000 + [8], dtype=np.int64)
    wins = window_ids(ids, cfg, 2, 3)
    assert [w.tolist() for w in wins] == [[2, 6, 7, 8, 3]]  # used to be 4 windows of mostly [NKMER]
    all_n = np.full(30, NKMER_ID, dtype=np.int64)  # nothing else to go on: kept
    assert np.concatenate(window_ids(all_n, cfg, 2, 3)).tolist().count(NKMER_ID) == 30
    clean = np.arange(6, 60, dtype=np.int64)
    assert [w.tolist() for w in window_ids(clean, cfg, 2, 3)] == [
        [2, *clean[s : s + 14].tolist(), 3] for s in range(0, 54, 14)]


def test_shipped_model_ignores_the_length_of_an_n_run():
    from lncrna.predict import DEFAULT_MODEL_DIR

    model = NucleotideClassifier.from_pretrained(DEFAULT_MODEL_DIR)
    rng = np.random.default_rng(3)
    a = "".join(rng.choice(list("ACGT"), 900))
    b = "".join(rng.choice(list("ACGT"), 900))
    short_gap, long_gap = a + "N" * 6 + b, a + "N" * 3000 + b
    p = [model.predict_proba([s])[0] for s in (short_gap, long_gap)]
    # before: the 1000 untrained [NKMER] tokens of the long gap moved p by about 0.4
    assert p[0] == p[1]


@pytest.mark.parametrize("bad", [-1, 2.5, True, 9])
def test_feature_extractor_rejects_a_bad_kmax(bad):
    with pytest.raises(ValueError, match="kmax must be an integer in 0..8"):
        FeatureExtractor(kmax=bad)  # -1: no k-mer columns, 2.5: read as 2, 9: 262,144 columns


def test_feature_extractor_accepts_the_kmax_range():
    assert len(FeatureExtractor(kmax=0).feature_names) == 8
    assert len(FeatureExtractor(kmax=np.int64(2)).feature_names) == 8 + 4 + 16
