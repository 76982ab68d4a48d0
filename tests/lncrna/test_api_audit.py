"""Python-API and progress audit of ``lncrna.predict`` (beyond the CLI audit in test_cli_audit.py).

- ``Predictor.predict_sequences`` / ``lncrna.predict.predict_proba`` given one bare string used to
  predict every nucleotide as a 1-nt "transcript" (one probability per base, no error).
- ``Predictor.predict_records`` given a dict or plain strings used to unpack each string as an
  ``(id, seq)`` pair: ``{"ab": seq}`` silently predicted record ``"a"`` with sequence ``"b"``; other
  strings failed with a bare "too many values to unpack" naming no record.
- The progress bar of ``lncrna predict`` / ``evaluate`` only moved when a whole chunk (4096 records)
  was done: on CPU a file under 4096 records sat at 0% for the whole run, and ``--no-cascade`` (about
  11 seq/s on 2 cores) showed no movement for minutes. Progress now comes per transformer batch, and
  the bar redraws for each (tqdm's dynamic ``miniters`` skipped small steps after a large one).

Tiny random model (``model_dir`` in conftest.py); the baseline is the shipped one.
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import lncrna.predict
from lncrna import cli
from lncrna.predict import Predictor, StackParams


def _seq(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("ACGT") for _ in range(n))


SEQS = [_seq(300 + 41 * i, i) for i in range(3)]


# ---- a single string is not a list of sequences ----------------------------------------------------
def test_predict_sequences_refuses_a_single_string(model_dir: Path) -> None:
    predictor = Predictor(model_dir, device="cpu")
    with pytest.raises(TypeError, match="single string"):
        predictor.predict_sequences(SEQS[0])
    with pytest.raises(TypeError, match="single string"):
        predictor.predict_sequences(SEQS[0].encode())
    out = predictor.predict_sequences([SEQS[0]])  # the wrapped form still works
    assert out.shape == (1,) and out.dtype == np.float64


def test_module_predict_proba_refuses_a_single_string_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[object] = []
    monkeypatch.setattr(lncrna.predict, "_DEFAULT_PREDICTOR", None)
    monkeypatch.setattr(lncrna.predict, "Predictor", lambda *a, **k: loaded.append(1))
    with pytest.raises(TypeError, match="single string"):
        lncrna.predict.predict_proba(SEQS[0])
    assert loaded == []  # refused before the shipped model would load


# ---- predict_records takes (id, seq) pairs, not strings ------------------------------------------
@pytest.mark.parametrize("bad", [{"ab": SEQS[0]}, {"tx1": SEQS[0]}, [SEQS[0]], ["ab"]],
                         ids=["dict_two_letter_key", "dict", "plain_strings", "two_letter_string"])
def test_predict_records_refuses_strings_naming_the_record(model_dir: Path, bad) -> None:
    predictor = Predictor(model_dir, device="cpu")
    with pytest.raises(TypeError, match=r"record 1\b.*\(id, seq\)"):
        list(predictor.predict_records(bad))


def test_predict_records_takes_pairs_and_dict_items(model_dir: Path) -> None:
    predictor = Predictor(model_dir, device="cpu")
    pairs = [(f"tx{i}", s) for i, s in enumerate(SEQS)]
    a = [(p.id, p.length, p.prob) for p in predictor.predict_records(pairs)]
    b = [(p.id, p.length, p.prob) for p in predictor.predict_records(dict(pairs).items())]
    c = [(p.id, p.length, p.prob) for p in predictor.predict_records([list(x) for x in pairs])]
    assert a == b == c
    assert [x[:2] for x in a] == [(f"tx{i}", len(s)) for i, s in enumerate(SEQS)]


# ---- progress comes per transformer batch, not per chunk -----------------------------------------
def test_progress_callback_counts_every_record_per_transformer_batch(model_dir: Path) -> None:
    # batch_tokens=1: every record is a batch of its own; one chunk holds all three
    predictor = Predictor(model_dir, device="cpu", cascade=False, batch_tokens=1)
    calls: list[int] = []
    with_progress = [p.prob for p in predictor.predict_records(
        [(f"tx{i}", s) for i, s in enumerate(SEQS)], progress=calls.append)]
    assert calls == [1, 1, 1]
    assert with_progress == [p.prob for p in predictor.predict_records([(f"tx{i}", s) for i, s in enumerate(SEQS)])]


def test_progress_callback_counts_easy_records_with_the_cascade(model_dir: Path) -> None:
    predictor = Predictor(model_dir, device="cpu", chunk_size=2)
    calls: list[int] = []
    out = list(predictor.predict_records([(f"tx{i}", s) for i, s in enumerate(SEQS * 3)], progress=calls.append))
    assert sum(calls) == len(out) == 9 and all(c > 0 for c in calls)


def test_predict_fasta_takes_the_progress_callback(model_dir: Path, tmp_path: Path) -> None:
    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">tx{i}\n{s}\n" for i, s in enumerate(SEQS)))
    predictor = Predictor(model_dir, device="cpu", cascade=False, batch_tokens=1)
    calls: list[int] = []
    out = list(predictor.predict_fasta(fasta, progress=calls.append, min_length=0))
    assert calls == [1, 1, 1] and [p.id for p in out] == ["tx0", "tx1", "tx2"]


def test_cli_progress_bar_moves_before_the_chunk_is_done(model_dir: Path, tmp_path: Path, capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm

    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">tx{i}\n{s}\n" for i, s in enumerate(SEQS)))
    updates: list[int] = []
    original = tqdm.tqdm.update

    def update(self, n=1):
        updates.append(n)
        return original(self, n)

    monkeypatch.setattr(tqdm.tqdm, "update", update)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is shown on a terminal only
    rc = cli.main(["predict", str(fasta), "--model", str(model_dir), "--no-cascade", "--batch-tokens", "1",
                   "-o", str(tmp_path / "out.tsv")])
    out, err = capsys.readouterr()
    assert rc == 0 and out == ""
    assert updates == [1, 1, 1]  # one per transformer batch; it used to be [3], once the chunk was done
    rows = (tmp_path / "out.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["tx0", "tx1", "tx2"]


def test_cli_progress_bar_redraws_transformer_batches_after_the_easy_records(
        model_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 settles the easy records in one large step; each transformer batch after it must redraw
    the bar (tqdm's default dynamic ``miniters`` waited for as many records as that large step)."""
    import tqdm

    seqs = [_seq(250 + 13 * i, 100 + i) for i in range(24)]
    p_b = np.sort(Predictor(model_dir, device="cpu").baseline.predict_proba(seqs))
    d = tmp_path / "model"  # a band that sends the 4 highest baseline probabilities to the transformer
    d.mkdir()
    for name in ("lncrna_config.json", "model.safetensors"):
        shutil.copy(model_dir / name, d / name)
    assert p_b[-5] < p_b[-4], "the test needs distinct baseline probabilities"
    StackParams(float(p_b[-5]), 1.0, 1.0, 1.0, 0.0).save(d / "stack.json")
    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">tx{i}\n{s}\n" for i, s in enumerate(seqs)))

    drawn: list[tuple[int, bool]] = []
    original_init, original_update = tqdm.tqdm.__init__, tqdm.tqdm.update

    def init(self, *args, **kwargs):
        kwargs["mininterval"] = 0  # as if every batch took longer than the redraw interval
        original_init(self, *args, **kwargs)

    def update(self, n=1):
        drew = original_update(self, n)
        drawn.append((n, bool(drew)))
        return drew

    monkeypatch.setattr(tqdm.tqdm, "__init__", init)
    monkeypatch.setattr(tqdm.tqdm, "update", update)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc = cli.main(["predict", str(fasta), "--model", str(d), "--batch-tokens", "1", "-o", str(tmp_path / "o.tsv")])
    capsys.readouterr()
    assert rc == 0
    assert drawn == [(20, True)] + [(1, True)] * 4


def test_bytes_sequences_are_read_as_text(model_dir):
    """A sequence given as bytes was predicted as the text "b'ACGT...'" and refused for its quotes."""
    seq = "ACGT" * 60
    predictor = Predictor(model_dir, device="cpu", cascade=False)
    assert predictor.predict_sequences([seq.encode()]).tolist() == predictor.predict_sequences([seq]).tolist()
    with pytest.raises(ValueError, match=r"record 1 '0'"):
        predictor.predict_sequences([b"ACGT\xff"])
