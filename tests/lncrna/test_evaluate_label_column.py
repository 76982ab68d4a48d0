"""``lncrna evaluate predictions.tsv`` takes the thresholded metrics' calls from the TSV's ``label``
column (what ``predict --threshold`` wrote), not from ``probability >= 0.5``; an explicit
``--threshold`` recomputes them and says so. FASTA input is unchanged.

Tiny random model (``model_dir`` in conftest.py), shipped baseline, the labelled example FASTA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lncrna.evaluate import read_truth
from lncrna.predict import EXAMPLE_FASTA

from termination_helpers import tsv_rows
from test_cli import HEADER, run  # the test directory is on sys.path


def _counts(rows: list[list[str]], truth: dict[str, int], call) -> dict[str, int]:
    c = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for r in rows:
        y, hat = truth[r[0]], call(r)
        c[("t" if y == hat else "f") + ("p" if hat else "n")] += 1
    return c


def by_label(r: list[str]) -> int:
    return int(r[3] == "lncRNA")


def by_prob(t: float):
    return lambda r: int(float(r[2]) >= t)


@pytest.fixture
def tsv_at_0_9(tmp_path) -> Path:
    """A predictions TSV as `predict --threshold 0.9` writes it: several rows with 0.5 <= p < 0.9 are
    labelled mRNA, so the label column and `p >= 0.5` disagree."""
    truth = read_truth(EXAMPLE_FASTA)
    probs = [0.95, 0.6, 0.7, 0.3, 0.99, 0.85, 0.55, 0.1, 0.92, 0.4] * 2
    lines = [HEADER] + [f"{rid}\t500\t{p:.6f}\t{'lncRNA' if p >= 0.9 else 'mRNA'}"
                        for rid, p in zip(truth, probs)]
    path = tmp_path / "pred.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluate_tsv_counts_follow_its_label_column(tmp_path, tsv_at_0_9, capsys):
    out_dir = tmp_path / "ev"
    rc, stdout, err = run(["evaluate", tsv_at_0_9, "--truth", EXAMPLE_FASTA, "-o", out_dir, "-q"], capsys)
    assert rc == 0, err
    rows, truth = tsv_rows(tsv_at_0_9), read_truth(EXAMPLE_FASTA)
    want = _counts(rows, truth, by_label)
    assert want != _counts(rows, truth, by_prob(0.5))  # the case where the two rules disagree
    doc = json.loads((out_dir / "metrics.json").read_text())
    assert {k: doc["metrics"][k] for k in want} == want
    differ = sum(by_label(r) != by_prob(0.5)(r) for r in rows)
    calls = f"label column of {tsv_at_0_9} (differs from lncRNA_probability >= 0.5 on {differ} of 20 scored records)"
    assert doc["metrics"]["threshold"] is None and doc["calls"] == calls  # no threshold it did not use
    table = dict(line.split(None, 1) for line in stdout.splitlines())
    assert {k: int(table[k]) for k in want} == want and "threshold" not in table and table["calls"] == calls
    # AUROC still ranks by probability: the same as for the probabilities alone
    from sklearn.metrics import roc_auc_score

    ids = [r[0] for r in rows]
    assert doc["metrics"]["auroc"] == pytest.approx(roc_auc_score([truth[i] for i in ids],
                                                                  [float(r[2]) for r in rows]))


def test_evaluate_tsv_with_explicit_threshold_recomputes_and_says_so(tmp_path, tsv_at_0_9, capsys):
    out_dir = tmp_path / "ev"
    rc, stdout, err = run(["evaluate", tsv_at_0_9, "--truth", EXAMPLE_FASTA, "-o", out_dir, "--threshold", "0.5"],
                          capsys)
    assert rc == 0, err
    want = _counts(tsv_rows(tsv_at_0_9), read_truth(EXAMPLE_FASTA), by_prob(0.5))
    doc = json.loads((out_dir / "metrics.json").read_text())
    assert {k: doc["metrics"][k] for k in want} == want and doc["metrics"]["threshold"] == 0.5
    assert doc["calls"].startswith("lncRNA_probability >= 0.5 (recomputed")
    assert "calls recomputed as lncRNA_probability >= 0.5" in err and "label column" in err
    assert "recomputed" in dict(line.split(None, 1) for line in stdout.splitlines())["calls"]


def test_evaluate_tsv_with_an_unknown_label_is_one_line_error(tmp_path, tsv_at_0_9, capsys):
    text = tsv_at_0_9.read_text().replace("\tmRNA\n", "\tcoding\n", 1)
    tsv_at_0_9.write_text(text)
    rc, _, err = run(["evaluate", tsv_at_0_9, "--truth", EXAMPLE_FASTA, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "label 'coding' is not lncRNA or mRNA" in err
    # with --threshold the label column is not read, so it cannot be in the way
    rc, _, err = run(["evaluate", tsv_at_0_9, "--truth", EXAMPLE_FASTA, "-o", tmp_path / "ev", "-q",
                      "--threshold", "0.9"], capsys)
    assert rc == 0, err


def test_predict_with_a_threshold_then_evaluate_counts_match_the_written_labels(tmp_path, model_dir, capsys):
    pred = tmp_path / "pred.tsv"
    rc, _, err = run(["predict", EXAMPLE_FASTA, "-o", pred, "--model", model_dir, "--threshold", "0.99", "-q"],
                     capsys)
    assert rc == 0, err
    rows, truth = tsv_rows(pred), read_truth(EXAMPLE_FASTA)
    assert any(r[3] == "mRNA" and float(r[2]) >= 0.5 for r in rows)  # 0.99 and 0.5 disagree on some record
    rc, _, err = run(["evaluate", pred, "--truth", EXAMPLE_FASTA, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    want = _counts(rows, truth, by_label)
    assert {k: doc["metrics"][k] for k in want} == want


def test_evaluate_tsv_labels_that_follow_0_5_report_threshold_0_5(tmp_path, model_dir, capsys):
    """A TSV predicted at the default threshold scores exactly as before, threshold 0.5 included."""
    pred = tmp_path / "pred.tsv"
    assert run(["predict", EXAMPLE_FASTA, "-o", pred, "--model", model_dir, "-q"], capsys)[0] == 0
    rc, _, err = run(["evaluate", pred, "--truth", EXAMPLE_FASTA, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert doc["metrics"]["threshold"] == 0.5
    assert doc["calls"] == f"label column of {pred} (the same calls as lncRNA_probability >= 0.5)"


def test_evaluate_fasta_input_still_thresholds_the_probability(tmp_path, model_dir, capsys):
    out_dir = tmp_path / "ev"
    rc, stdout, err = run(["evaluate", EXAMPLE_FASTA, "-o", out_dir, "--model", model_dir, "--threshold", "0.99",
                           "-q"], capsys)
    assert rc == 0, err
    rows = tsv_rows(out_dir / "predictions.tsv")
    want = _counts(rows, read_truth(EXAMPLE_FASTA), by_prob(0.99))
    doc = json.loads((out_dir / "metrics.json").read_text())
    assert {k: doc["metrics"][k] for k in want} == want and doc["metrics"]["threshold"] == 0.99
    assert doc["calls"] == "lncRNA_probability >= 0.99"


def test_evaluate_help_explains_the_label_column(capsys):
    rc, out, _ = run(["evaluate", "--help"], capsys)
    flat = " ".join(out.split())
    assert rc == 0
    assert "For a predictions TSV the thresholded metrics" in flat and "use the TSV's own label column" in flat
    assert "give --threshold P to recompute" in flat and "AUROC and AUPRC always use the probabilities" in flat
