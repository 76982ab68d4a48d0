"""benchmarks/lncrna_peers/run.py on another split folder: ``--data`` picks the test FASTA and the
result name, ``--model-dir``/``--baseline-dir`` score a cascade other than the shipped one."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.lncrna_peers import run
from lncrna.data import DEFAULT_OUT
from lncrna.fasta import read_fasta
from lncrna.features import DEFAULT_BASELINE_DIR
from lncrna.predict import DEFAULT_MODEL_DIR, Predictor


def _small_split(folder: Path, n_per_class: int = 3) -> int:
    """A split folder whose ``test_mouse.fa.gz`` holds the first ``n_per_class`` records of each
    class of the built mouse test (real sequences, the build's header tags)."""
    picked: dict[str, list] = {"lncRNA": [], "mRNA": []}
    for rec in read_fasta(Path(DEFAULT_OUT) / "test_mouse.fa.gz", strict=True):
        label = dict(kv.split("=", 1) for kv in rec.description.split()[1:])["label"]
        if len(picked[label]) < n_per_class and len(rec.seq) < 3000:
            picked[label].append(rec)
        if all(len(v) == n_per_class for v in picked.values()):
            break
    folder.mkdir(parents=True)
    with gzip.open(folder / "test_mouse.fa.gz", "wt") as fh:
        for rec in picked["lncRNA"] + picked["mRNA"]:
            fh.write(f">{rec.description}\n{rec.seq}\n")
    return 2 * n_per_class


def test_evaluate_reads_the_given_split_folder(tmp_path):
    n = _small_split(tmp_path / "tiny")
    seen = []

    def half(ids, seqs, fasta, key):
        seen.append(len(seqs))
        return np.full(len(seqs), 0.5)

    metrics = run.evaluate("mouse", {"const": half}, log=lambda s: None, data=tmp_path / "tiny")
    assert seen == [n] and metrics["n_sequences"] == n
    assert metrics["n_lncrna"] == metrics["n_mrna"] == n // 2


def test_data_option_names_the_result_after_the_folder(tmp_path):
    _small_split(tmp_path / "lncrna_tiny")
    assert run.main(["--test", "mouse", "--no-model", "--skip", "cpat,cpc2", "--data", str(tmp_path / "lncrna_tiny"),
                     "--out-dir", str(tmp_path / "out")]) == 0
    doc = json.loads((tmp_path / "out" / "lncrna_peers_mouse_lncrna_tiny.json").read_text())
    assert doc["metrics"]["n_sequences"] == 6 and "--data" in doc["command"]
    assert "baseline_accuracy" in doc["metrics"]


def test_baseline_dir_reaches_the_baseline_peer(tmp_path):
    missing = tmp_path / "no_baseline"
    with pytest.raises(Exception, match="no_baseline"):
        run.PEERS["baseline"](missing)(["s0"], ["ACGT" * 60], None, "mouse")


def test_model_dir_scores_the_cascade_in_that_folder(tmp_path):
    seqs = [rec.seq for rec, _ in zip(read_fasta(Path(DEFAULT_OUT) / "test_mouse.fa.gz", strict=True), range(4))]
    ours = run.main_model(DEFAULT_MODEL_DIR, DEFAULT_BASELINE_DIR)
    got = ours(["s0", "s1", "s2", "s3"], seqs, None, "mouse")
    with Predictor(DEFAULT_MODEL_DIR, baseline_dir=DEFAULT_BASELINE_DIR) as p:
        want = p.predict_sequences(seqs)
    np.testing.assert_array_equal(got, want)
    # the folders given are the ones loaded: a missing one is named in the error
    with pytest.raises(Exception, match="nowhere"):
        run.main_model(tmp_path / "nowhere", DEFAULT_BASELINE_DIR)(["s0"], seqs[:1], None, "mouse")
    with pytest.raises(Exception, match="no_baseline"):
        run.main_model(DEFAULT_MODEL_DIR, tmp_path / "no_baseline")(["s0"], seqs[:1], None, "mouse")


def test_model_and_model_dir_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(["--model", "lncrna.predict:predict_proba", "--model-dir", str(tmp_path)])
    assert e.value.code == 2 and "--model-dir" in capsys.readouterr().err
