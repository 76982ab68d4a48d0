"""The shipped model (``lncrna/weights/default``) on the bundled example, as the README's first
command runs it: the rows it printed when the model was committed
(``tests/lncrna/data/example_predictions_shipped.tsv``), so a change to the weights, the features,
the tokenizer or the cascade that moves any probability fails here and not only in the manual md5
check; probabilities within 1e-5 (BLAS builds may differ in the last printed digit), labels and
ids exactly; 19 of the 20 records are called as their header's ``label=`` says (the notebook's
figure; the one miss is an lncRNA called mRNA)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lncrna.cli import main
from lncrna.fasta import read_fasta
from lncrna.predict import EXAMPLE_FASTA

EXPECTED = Path(__file__).parent / "data/example_predictions_shipped.tsv"


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


def test_shipped_model_predicts_the_bundled_example_as_committed(capsys) -> None:
    assert main(["predict", str(EXAMPLE_FASTA)]) == 0
    got, expected = _rows(capsys.readouterr().out), _rows(EXPECTED.read_text())
    assert [r["id"] for r in got] == [r["id"] for r in expected] and len(got) == 20
    assert [(r["length"], r["label"]) for r in got] == [(r["length"], r["label"]) for r in expected]
    for g, e in zip(got, expected):
        assert abs(float(g["lncRNA_probability"]) - float(e["lncRNA_probability"])) <= 1e-5, (g, e)
    truth = {rec.id: rec.description.split("label=")[1].split()[0] for rec in read_fasta(EXAMPLE_FASTA)}
    misses = [(r["id"], r["label"]) for r in got if r["label"] != truth[r["id"]]]
    assert len(misses) == 1 and truth[misses[0][0]] == "lncRNA", misses
