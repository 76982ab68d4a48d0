"""Robustness of ``lncrna predict``: interruption by SIGTERM, indented headers, unusual input.

1. SIGTERM while predicting: ``OUT.partial`` is deleted (an old OUT stays as it was), exit 143,
   one line on stderr; in process (deterministic) and through a real subprocess.
2. A header line indented by whitespace in the middle of a file (``"  >id2"``) is an error naming
   the file, the line and the record it follows (Biopython reads it as sequence).
3. Input probes: CRLF (plain and gzip), lowercase RNA, an empty record in the middle, a header with
   no id, an N-only record, records shorter than the model's k-mer, an output folder that is
   missing or is a file. Each gives correct rows or the one-line error.

Tiny random model (``model_dir`` in conftest.py), shipped baseline, as in test_cli.py.
"""

from __future__ import annotations

import gzip
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from lncrna import cli
from lncrna.fasta import FastaError, read_fasta
from lncrna.predict import EXAMPLE_FASTA

from termination_helpers import assert_terminated_quietly, leftovers, sender, signal_guard, signal_running_predict
from termination_helpers import tsv_rows as rows
from test_cli import GOOD, fasta_text, run, seq  # the test directory is on sys.path


# ---- 1. SIGTERM --------------------------------------------------------------------------------------
@pytest.fixture
def sigterm_guard() -> Iterator[Any]:
    with signal_guard(signal.SIGTERM) as guard:
        yield guard


send_sigterm = sender(signal.SIGTERM)


@pytest.mark.parametrize("old", [True, False], ids=["old_out", "no_old_out"])
def test_sigterm_mid_run_deletes_partial_and_exits_143(tmp_path, model_dir, capsys, on_chunk, sigterm_guard, old):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    out = tmp_path / "out.tsv"
    if old:
        out.write_text("OLD\n")
    on_chunk(2, send_sigterm)
    rc, stdout, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "3", "-q"], capsys)
    assert rc == 143 and stdout == ""
    fate = "left as it was" if old else "not written"
    assert err.strip() == f"lncrna predict: terminated by SIGTERM (3 finished rows discarded; {out} {fate})"
    assert (out.read_text() == "OLD\n") if old else not out.exists()
    assert leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # the caller's handler is back


def test_sigterm_while_the_model_loads_is_exit_143_not_a_model_error(tmp_path, model_dir, capsys, monkeypatch,
                                                                      sigterm_guard):
    # Predictor wraps loading in `except Exception` (-> ModelError, exit 2): Terminated must pass through
    import lncrna.model

    def load(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not delivered")

    monkeypatch.setattr(lncrna.model.NucleotideClassifier, "from_pretrained", load)
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    out = tmp_path / "out.tsv"
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "-q"], capsys)
    assert rc == 143 and err.strip() == "lncrna predict: terminated by SIGTERM"
    assert not out.exists() and leftovers(tmp_path) == []


def test_sigterm_during_evaluate_leaves_no_predictions(tmp_path, model_dir, capsys, on_chunk, sigterm_guard):
    on_chunk(2, send_sigterm)
    out_dir = tmp_path / "ev"
    rc, _, err = run(["evaluate", EXAMPLE_FASTA, "-o", out_dir, "--model", model_dir, "--chunk-size", "4", "-q"],
                     capsys)
    pred = out_dir / "predictions.tsv"
    assert rc == 143 and err.strip() == f"lncrna evaluate: terminated by SIGTERM (4 finished rows discarded; {pred} " \
                                        f"not written)"
    assert not out_dir.exists() and leftovers(tmp_path) == []  # the folder it made is removed again


def test_worker_pool_stays_quiet_with_the_sigterm_handler(tmp_path, model_dir, capfd, monkeypatch, sigterm_guard):
    """Stage-1 workers inherit the handler by fork; the executor stops the other workers with SIGTERM
    when one dies, and a SIGTERM to the process group reaches them too. They must die silently (no
    traceback per worker), on a normal run and on a SIGTERMed one."""
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    out = tmp_path / "out.tsv"
    argv = [str(a) for a in ["predict", fa, "-o", out, "--model", model_dir, "--workers", "1", "--chunk-size", "3",
                             "-q"]]
    assert cli.main(argv) == 0
    time.sleep(0.2)  # a worker's traceback would be written by the worker after terminate()
    _, err = capfd.readouterr()
    assert err == "" and len(rows(out)) == len(GOOD)

    original = cli._RowWriter.write_chunk

    def write_then_sigterm(self, lines):  # in this process: stage 1 runs in the worker here
        original(self, lines)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli._RowWriter, "write_chunk", write_then_sigterm)
    out.write_text("OLD\n")
    assert cli.main(argv) == 143
    time.sleep(0.2)
    _, err = capfd.readouterr()
    assert err.strip() == f"lncrna predict: terminated by SIGTERM (3 finished rows discarded; {out} left as it was)"
    assert out.read_text() == "OLD\n" and leftovers(tmp_path) == []


@pytest.mark.slow  # a real process and signal, 6-9 s on 2 cores; the in-process tests above cover the logic
def test_sigterm_subprocess_deletes_partial_and_exits_143(tmp_path, model_dir):
    """The real thing: a running `lncrna predict` is sent SIGTERM once OUT.partial holds rows."""
    fa = tmp_path / "big.fa"
    s = seq(600, 1)
    fa.write_text(fasta_text((f"r{i}", s) for i in range(20_000)))  # minutes of work at --no-cascade
    out = tmp_path / "out.tsv"
    partial = tmp_path / "out.tsv.partial"
    got = signal_running_predict([fa, "-o", out, "--model", model_dir, "--no-cascade", "--chunk-size", "8"], partial,
                                 lambda p: p.send_signal(signal.SIGTERM))
    # the row count is in the message unless the signal lands between the flush and the row counter
    # (then "(no rows written)"); the exact message is pinned by the in-process tests above
    assert_terminated_quietly(*got, out, partial, "SIGTERM")


# ---- 2. a header line indented by whitespace --------------------------------------------------------
A, B, C = seq(300, 11), seq(320, 12), seq(340, 13)


@pytest.mark.parametrize("indent, newline, gz", [("  ", "\n", False), ("\t", "\n", False), (" ", "\r\n", False),
                                                 ("  ", "\n", True)], ids=["spaces", "tab", "crlf", "gzip"])
def test_indented_header_mid_file_is_an_error_naming_the_line(tmp_path, indent, newline, gz):
    text = newline.join([">a first", A[:150], A[150:], f"{indent}>b", B, ">c", C]) + newline
    path = tmp_path / ("in.fa.gz" if gz else "in.fa")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    with pytest.raises(FastaError) as exc:
        list(read_fasta(path))
    n = len(indent)
    assert str(exc.value) == (f"{path}: line 4: header line '>b' is indented by {n} whitespace character"
                              f"{'s' if n > 1 else ''} (inside record 1 'a'); '>' must be the first character "
                              f"of a header line")


def test_indented_header_line_number_counts_leading_blank_lines_and_records(tmp_path):
    path = tmp_path / "in.fa"
    path.write_text("\n\n  >a\n" + A + "\n>b\n" + B + "\n>c\n" + C + "\n >d\n" + A + "\n")
    with pytest.raises(FastaError, match=r"in.fa: line 9: header line '>d' is indented by 1 whitespace character \(inside record 3 'c'\)"):
        list(read_fasta(path))


def test_indented_first_header_and_gt_inside_a_sequence_line_keep_their_old_handling(tmp_path):
    path = tmp_path / "in.fa"
    path.write_text(f"  >a\n{A}\n>b\n{B[:100]}>{B[100:]}\n>c\n{C}\n")  # '>' mid-line: a bad character
    with pytest.warns(UserWarning, match=r"record 2 'b': non-nucleotide characters '>'"):
        records = list(read_fasta(path))
    assert [r.id for r in records] == ["a", "c"]


def test_predict_indented_header_is_exit_2_and_discards_rows(tmp_path, model_dir, capsys):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD[:4]) + "  >late\n" + GOOD[5][1] + "\n")
    out = tmp_path / "out.tsv"
    out.write_text("OLD\n")
    rc, stdout, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "2", "-q"], capsys)
    assert rc == 2 and stdout == ""
    assert err.strip() == (f"lncrna predict: error: {fa}: line 9: header line '>late' is indented by 2 whitespace "
                           f"characters (inside record 4 'tx3'); '>' must be the first character of a header line "
                           f"(2 finished rows discarded; {out} left as it was)")
    assert out.read_text() == "OLD\n" and leftovers(tmp_path) == []


# ---- 3. input probes --------------------------------------------------------------------------------
def _predict(tmp_path: Path, model_dir: Path, capsys, name: str, data: bytes, *extra: str) -> tuple[list, str]:
    fa = tmp_path / name
    fa.write_bytes(data)
    out = tmp_path / f"{name}.tsv"
    rc, stdout, err = run(["predict", fa, "-o", out, "--model", model_dir, "-q", *extra], capsys)
    assert rc == 0 and stdout == "", err
    assert leftovers(tmp_path) == []
    return rows(out), err


def test_crlf_and_gzip_give_the_same_rows_as_lf(tmp_path, model_dir, capsys):
    records = GOOD[:4]
    lf = "".join(f">{rid} some description\n{s[:100]}\n{s[100:]}\n" for rid, s in records)
    crlf = lf.replace("\n", "\r\n")
    ref, err = _predict(tmp_path, model_dir, capsys, "lf.fa", lf.encode())
    assert err == "" and [r[0] for r in ref] == [rid for rid, _ in records]
    assert [r[1] for r in ref] == [str(len(s)) for _, s in records]  # no stray '\r' in the sequence
    for name, data in (("crlf.fa", crlf.encode()), ("crlf.fa.gz", gzip.compress(crlf.encode())),
                       ("lf.fa.gz", gzip.compress(lf.encode()))):
        got, err = _predict(tmp_path, model_dir, capsys, name, data)
        assert got == ref and err == "", name


def test_lowercase_rna_gives_the_same_rows_as_uppercase_dna(tmp_path, model_dir, capsys):
    records = GOOD[:4]
    ref, _ = _predict(tmp_path, model_dir, capsys, "dna.fa", fasta_text(records).encode(), "--no-cascade")
    rna = fasta_text((rid, s.lower().replace("t", "u")) for rid, s in records)
    got, err = _predict(tmp_path, model_dir, capsys, "rna.fa", rna.encode(), "--no-cascade")
    assert got == ref and err == ""


def test_empty_record_in_the_middle_and_header_without_id_are_skipped_with_a_warning(tmp_path, model_dir, capsys):
    text = f">tx0\n{GOOD[0][1]}\n>empty\n>tx1\n{GOOD[1][1]}\n>\n{GOOD[2][1]}\n>tx3\n{GOOD[3][1]}\n"
    got, err = _predict(tmp_path, model_dir, capsys, "holes.fa", text.encode())
    fa = tmp_path / "holes.fa"
    assert err.strip().splitlines() == [
        f"lncrna predict: warning: {fa}: record 2 'empty': empty sequence; skipped",
        f"lncrna predict: warning: {fa}: record 4 '': missing record id (empty header line); skipped",
    ]
    assert [r[0] for r in got] == ["tx0", "tx1", "tx3"]


@pytest.mark.parametrize("cascade", [[], ["--no-cascade"]], ids=["cascade", "transformer"])
def test_n_only_and_shorter_than_k_records_are_predicted_with_one_warning_each(tmp_path, model_dir, capsys, cascade):
    # the tiny model reads 3-mers: 1 and 2 nt give no k-mer at all; there is no minimum length (documented)
    records = [GOOD[0], ("n_only", "N" * 500), ("one", "A"), ("two", "CG"), ("n_short", "NN")]
    got, err = _predict(tmp_path, model_dir, capsys, "low.fa", fasta_text(records).encode(), *cascade)
    assert [(r[0], r[1]) for r in got] == [(rid, str(len(s))) for rid, s in records]
    assert all(math.isfinite(float(r[2])) and 0.0 <= float(r[2]) <= 1.0 for r in got)
    fa = tmp_path / "low.fa"
    warns = err.strip().splitlines()
    assert len(warns) == 2
    short = next(w for w in warns if "records shorter than 200 nt" in w)
    assert short.startswith(f"lncrna predict: warning: {fa}: 3 records shorter than 200 nt")
    assert short.endswith("'one', 'two', 'n_short'")
    mostly_n = next(w for w in warns if "records more than 50% N" in w)
    assert mostly_n.startswith(f"lncrna predict: warning: {fa}: 2 records more than 50% N")
    assert mostly_n.endswith("'n_only', 'n_short'")


def test_output_in_a_missing_folder_is_one_line_and_creates_nothing(tmp_path, model_dir, capsys):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD[:2]))
    out = tmp_path / "no" / "sub" / "o.tsv"
    rc, stdout, err = run(["predict", fa, "-o", out, "--model", model_dir], capsys)
    assert rc == 2 and stdout == ""
    assert err.strip() == f"lncrna predict: error: {out}: output folder {out.parent} does not exist"
    assert not (tmp_path / "no").exists()


def test_output_folder_that_is_a_file_is_named_as_such(tmp_path, model_dir, capsys):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD[:2]))
    out = fa / "o.tsv"  # -o in.fa/o.tsv
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir], capsys)
    assert rc == 2 and err.strip() == f"lncrna predict: error: {out}: output folder {fa} is not a folder"
    assert fa.read_text() == fasta_text(GOOD[:2])


def test_help_documents_sigterm_and_indented_headers(capsys):
    rc, out, _ = run(["predict", "--help"], capsys)
    flat = " ".join(out.split())
    assert rc == 0 and "SIGTERM (exit 143) OUT.partial is deleted" in flat and "indented by whitespace" in flat
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0 and "143 terminated (SIGTERM)" in " ".join(out.split())
