"""lncrna.predict: stacking formula, cascade routing, streaming, workers, model-directory errors.

Every model here is a tiny random NucleotideClassifier saved to a tmp dir; the baseline is the real
one shipped in lncrna/weights/baseline (fast, numpy only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lncrna.fasta import FastaRecord, read_fasta
from lncrna.model import ModelConfig, NucleotideClassifier
from lncrna.predict import (
    EXAMPLE_FASTA,
    ModelError,
    Prediction,
    Predictor,
    StackParams,
    format_row,
)

TINY = ModelConfig(k=3, stride=3, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                   window_tokens=64, max_windows=4, dropout=0.0)


def save_tiny_model(directory: Path, stack: StackParams | None = None, seed: int = 0) -> Path:
    """A tiny random classifier + stack.json in ``directory`` (what tests use instead of the real model)."""
    torch.manual_seed(seed)
    NucleotideClassifier(TINY).save_pretrained(directory)
    (stack or StackParams(0.2, 0.8, 1.0, 1.0, 0.0)).save(directory / "stack.json")
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def model_with_stack(tmp_path: Path, source: Path, **stack) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    for name in ("lncrna_config.json", "model.safetensors"):
        shutil.copy(source / name, d / name)
    StackParams(**{"low": 0.2, "high": 0.8, "w_baseline": 1.0, "w_transformer": 1.0, "bias": 0.0, **stack}).save(
        d / "stack.json")
    return d


@pytest.fixture(scope="session")
def records() -> list[FastaRecord]:
    """60 real transcripts: the bundled example + 40 from the human test split."""
    recs = list(read_fasta(EXAMPLE_FASTA))
    test = Path(__file__).resolve().parents[2] / "data" / "lncrna" / "test_human.fa.gz"
    for i, r in enumerate(read_fasta(test)):
        if i % 200 == 0:
            recs.append(r)
        if len(recs) >= 60:
            break
    return recs


# ---- stacking -----------------------------------------------------------------------------------
def test_stack_formula_and_clipping():
    s = StackParams(low=0.3, high=0.7, w_baseline=0.5, w_transformer=2.0, bias=-0.25)
    pb = np.array([0.4, 0.5, 0.0, 1.0, 0.65])
    pt = np.array([0.9, 0.1, 1.0, 0.0, 0.5])

    def logit(p):
        p = min(max(p, 1e-6), 1 - 1e-6)
        return np.log(p / (1 - p))

    expected = [1 / (1 + np.exp(-(0.5 * logit(b) + 2.0 * logit(t) - 0.25))) for b, t in zip(pb, pt)]
    np.testing.assert_allclose(s.combine(pb, pt), expected, rtol=1e-12)
    assert np.isfinite(s.combine(pb, pt)).all()  # 0 and 1 are clipped before the logit
    # the band is open: low and high themselves are easy
    assert s.is_hard(np.array([0.3, 0.30001, 0.5, 0.69999, 0.7])).tolist() == [False, True, True, True, False]


def test_stack_identity_weights_is_product_of_odds():
    s = StackParams(0.0, 1.0, 1.0, 1.0, 0.0)
    pb, pt = np.array([0.8]), np.array([0.6])
    odds = (0.8 / 0.2) * (0.6 / 0.4)
    np.testing.assert_allclose(s.combine(pb, pt), [odds / (1 + odds)])


@pytest.mark.parametrize("content, expected", [
    (None, "missing stacker file"),
    ("{not json", "unreadable stacker file"),
    ('{"low": 0.2, "high": 0.8}', "missing keys w_baseline, w_transformer, bias"),
    ('{"low": 0.2, "high": 0.8, "w_baseline": "a", "w_transformer": 1, "bias": 0}', "not a finite number: w_baseline"),
    ('{"low": 0.9, "high": 0.1, "w_baseline": 1, "w_transformer": 1, "bias": 0}', "low <= high"),
    ("[1, 2]", "expected a JSON object"),
])
def test_stack_load_errors_name_the_file(tmp_path, content, expected):
    path = tmp_path / "stack.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ModelError) as e:
        StackParams.load(path)
    assert str(path) in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


def test_stack_extra_keys_are_ignored(tmp_path):
    path = tmp_path / "stack.json"
    path.write_text(json.dumps({"low": 0.3, "high": 0.7, "w_baseline": 1, "w_transformer": 2, "bias": 0,
                                "fitted_on": "validation"}))
    assert StackParams.load(path) == StackParams(0.3, 0.7, 1.0, 2.0, 0.0)


# ---- model directory errors ---------------------------------------------------------------------
def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelError, match="no such model directory") as e:
        Predictor(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_missing_default_model_names_the_path(tmp_path, monkeypatch):
    import lncrna.predict as predict

    monkeypatch.setattr(predict, "DEFAULT_MODEL_DIR", tmp_path / "weights" / "default")
    with pytest.raises(ModelError) as e:
        Predictor()
    msg = str(e.value)
    assert str(tmp_path / "weights" / "default") in msg and "default model is not installed" in msg
    assert "--model" in msg and "\n" not in msg


def test_incomplete_model_dir_lists_missing_files(tmp_path, tiny_model_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_model_dir / "lncrna_config.json", d)
    with pytest.raises(ModelError, match="missing model.safetensors, stack.json"):
        Predictor(d)


def test_corrupt_weights(tmp_path, tiny_model_dir):
    d = model_with_stack(tmp_path, tiny_model_dir)
    (d / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="cannot load the transformer"):
        Predictor(d, device="cpu")


def test_cuda_requested_without_cuda(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="CUDA is not available"):
        Predictor(tiny_model_dir, device="cuda")


def test_bad_device(tiny_model_dir):
    with pytest.raises(ModelError, match="device"):
        Predictor(tiny_model_dir, device="tpu")


# ---- prediction ---------------------------------------------------------------------------------
def test_cascade_routing_only_hard_records_reach_the_transformer(tmp_path, tiny_model_dir, records):
    d = model_with_stack(tmp_path, tiny_model_dir, low=0.1, high=0.9, w_baseline=0.7, w_transformer=1.3, bias=0.1)
    predictor = Predictor(d, device="cpu", chunk_size=16)
    seqs = [r.seq for r in records]
    p_b = predictor.baseline.predict_proba(seqs)
    hard = (p_b > 0.1) & (p_b < 0.9)
    assert 0 < hard.sum() < len(seqs), "the test needs both easy and hard records"

    seen: list[list[np.ndarray]] = []

    def fake_transformer(windows, progress=None):
        seen.extend(windows)
        return np.full(len(windows), 0.75)

    predictor._transformer_proba = fake_transformer
    out = list(predictor.predict_records(records))
    assert len(seen) == int(hard.sum())  # nothing outside (low, high) was sent
    for w, i in zip(seen, np.flatnonzero(hard)):  # ... and exactly the hard ones, with their windows
        assert [a.tolist() for a in w] == [a.tolist() for a in predictor.model.encode(seqs[i])]
    probs = np.array([p.prob for p in out])
    np.testing.assert_array_equal(probs[~hard], p_b[~hard])  # easy: baseline kept exactly
    np.testing.assert_allclose(probs[hard], predictor.stack.combine(p_b[hard], np.full(hard.sum(), 0.75)))
    assert [p.stage == "transformer" for p in out] == hard.tolist()
    assert predictor.stats.transformer == hard.sum() and predictor.stats.records == len(records)


def test_no_cascade_stacks_every_record_and_matches_predict_proba(tmp_path, tiny_model_dir, records):
    d = model_with_stack(tmp_path, tiny_model_dir, low=0.4, high=0.6, w_baseline=0.6, w_transformer=1.5, bias=-0.2)
    predictor = Predictor(d, device="cpu", cascade=False, batch_tokens=300, chunk_size=7)  # many small batches
    seqs = [r.seq for r in records]
    got = predictor.predict_sequences(seqs)
    expected = predictor.stack.combine(predictor.baseline.predict_proba(seqs), predictor.model.predict_proba(seqs))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert predictor.stats.transformer == len(seqs)


def test_labels_order_and_threshold(tiny_model_dir, records):
    predictor = Predictor(tiny_model_dir, device="cpu", threshold=0.7, chunk_size=9)
    out = list(predictor.predict_records(records))
    assert [p.id for p in out] == [r.id for r in records]
    assert [p.length for p in out] == [len(r.seq) for r in records]
    assert all((p.label == "lncRNA") == (p.prob >= 0.7) for p in out)
    assert all(0.0 <= p.prob <= 1.0 for p in out)


def test_streaming_yields_each_chunk_before_reading_the_next(tiny_model_dir, records):
    predictor = Predictor(tiny_model_dir, device="cpu", chunk_size=4)
    consumed = 0

    def source():
        nonlocal consumed
        for r in records[:10]:
            consumed += 1
            yield r

    it = predictor.predict_records(source())
    first = next(it)
    assert first.id == records[0].id and consumed == 4  # only the first chunk was read
    rest = list(it)
    assert len(rest) == 9 and consumed == 10 and predictor.stats.chunks == 3


def test_workers_give_the_same_predictions(tiny_model_dir, records):
    with Predictor(tiny_model_dir, device="cpu", workers=0, chunk_size=20) as p0:
        a = [(p.id, p.prob, p.stage) for p in p0.predict_records(records)]
    with Predictor(tiny_model_dir, device="cpu", workers=2, chunk_size=20, prefetch=1) as p2:
        b = [(p.id, p.prob, p.stage) for p in p2.predict_records(records)]
        assert p2._pool is not None
    assert a == b
    assert p2._pool is None  # closed by the context manager


def test_records_from_pairs_are_normalised_and_validated(tiny_model_dir):
    predictor = Predictor(tiny_model_dir, device="cpu")
    out = list(predictor.predict_records([("rna", "acgu" * 60)]))
    assert out[0].id == "rna" and out[0].length == 240
    with pytest.raises(ValueError, match=r"record 2 'prot'"):
        list(predictor.predict_records([("ok", "ACGT" * 60), ("prot", "MKVLAAGIVALLLAAGCSSEQPRTLEEFHK")]))


def test_empty_input_gives_nothing(tiny_model_dir):
    assert list(Predictor(tiny_model_dir, device="cpu").predict_records([])) == []


def test_format_row():
    assert format_row(Prediction("x1", 250, 0.12345678, "mRNA")) == "x1\t250\t0.123457\tmRNA\n"


def test_default_workers_cpu_is_zero(tiny_model_dir):
    assert Predictor(tiny_model_dir, device="cpu").workers == 0
