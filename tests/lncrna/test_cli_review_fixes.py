"""Fixes from the session-14 review of the ``lncrna`` CLI.

Numbers follow the report's "Real defects": 1 duplicate ids are named (also past the warning cap),
2 OUT is written as OUT.partial and renamed on success / Ctrl-C, removed on error, 3 a hard link
to the input is refused, 4 an unwritable OUT is exit 2 before the model loads, 5 an unreadable or
directory input is exit 2, 6 leading blank lines are accepted, 8 ``evaluate`` on a corrupt gzip is
exit 2, 9 short and mostly-N records get one summary warning (still predicted).

Every case calls ``lncrna.cli.main`` in this process with a tiny random model (as test_cli.py).
"""

from __future__ import annotations

import errno
import gzip
import os
import random
from pathlib import Path

import pytest

from lncrna import cli
from lncrna.predict import EXAMPLE_FASTA

from test_cli import GOOD, HEADER, fasta_text, run, seq  # the test directory is on sys.path; model_dir: conftest.py


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error: " in line]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def predict_raising_at(chunk: int, exc: BaseException, tmp_path: Path, model_dir: Path, capsys, on_chunk,
                       old: str | None = None) -> tuple[int, str, Path]:
    """``lncrna predict`` of GOOD in chunks of 3 into ``out.tsv`` (holding ``old`` first, if given),
    with stage 1 of chunk ``chunk`` raising ``exc``; returns (exit status, stderr, out)."""
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    out = tmp_path / "out.tsv"
    if old is not None:
        out.write_text(old)

    def act() -> None:
        raise exc

    on_chunk(chunk, act)
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "3", "-q"], capsys)
    return rc, err, out


# ---- 1. duplicate ids -------------------------------------------------------------------------------
def test_duplicate_id_warning_names_file_id_and_first_record(tmp_path, model_dir, capsys):
    fa = tmp_path / "dup.fa"
    fa.write_text(fasta_text([GOOD[0], GOOD[1], (GOOD[0][0], GOOD[2][1])]))
    out = tmp_path / "out.tsv"
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "-q"], capsys)
    assert rc == 0, err
    warns = [line for line in err.splitlines() if ": warning: " in line]
    assert warns == [f"lncrna predict: warning: {fa}: record 3 'tx0': duplicate id (record 1 has the same id); "
                     f"skipped"]
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["tx0", "tx1"] and rows[0][1] == str(len(GOOD[0][1]))  # the first one is kept


def test_duplicate_past_the_warning_cap_is_named_in_the_summary(tmp_path, model_dir, capsys):
    bad = [(f"bad{i}", "ACGT1ACGT") for i in range(cli.MAX_WARNINGS + 5)]
    fa = tmp_path / "many.fa"
    fa.write_text(fasta_text([GOOD[0], *bad, (GOOD[0][0], GOOD[1][1])]))
    rc, _, err = run(["predict", fa, "-o", tmp_path / "o.tsv", "--model", model_dir, "-q"], capsys)
    assert rc == 0, err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith(f"lncrna predict: {cli.MAX_WARNINGS + 6} warnings in total (6 not shown: ")
    assert "1 duplicate id" in summary and "5 non-nucleotide characters" in summary


# ---- 2. no half-written output ------------------------------------------------------------------------
def _truncated_gzip(path: Path) -> None:
    data = gzip.compress(fasta_text(GOOD).encode() + fasta_text([("late", seq(50_000, 99))]).encode())
    path.write_bytes(data[: len(data) - 2000])


def test_error_after_first_chunk_leaves_old_output_untouched(tmp_path, model_dir, capsys):
    fa = tmp_path / "in.fa.gz"
    _truncated_gzip(fa)
    out = tmp_path / "out.tsv"
    out.write_text("OLD\n")
    rc, stdout, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "2", "-q"], capsys)
    assert rc == 2 and stdout == ""
    (line,) = error_lines(err)
    assert "broken gzip" in line and str(fa) in line
    assert line.endswith(f"finished rows discarded; {out} left as it was)"), line
    assert out.read_text() == "OLD\n" and leftovers(tmp_path) == []


def test_error_after_first_chunk_leaves_no_new_output(tmp_path, model_dir, capsys):
    fa = tmp_path / "in.fa.gz"
    _truncated_gzip(fa)
    out = tmp_path / "out.tsv"
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "2", "-q"], capsys)
    assert rc == 2 and f"{out} not written)" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_internal_error_mid_run_removes_partial_output(tmp_path, model_dir, capsys, on_chunk):
    rc, err, out = predict_raising_at(2, RuntimeError("boom"), tmp_path, model_dir, capsys, on_chunk)
    assert rc == 1 and "internal error: RuntimeError: boom (3 finished rows discarded" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_ctrl_c_renames_finished_rows_into_place(tmp_path, model_dir, capsys, on_chunk):
    rc, err, out = predict_raising_at(2, KeyboardInterrupt(), tmp_path, model_dir, capsys, on_chunk, old="OLD\n")
    assert rc == 130 and err.strip() == f"lncrna predict: interrupted (3 finished rows kept in {out})"
    lines = out.read_text().splitlines()
    assert lines[0] == HEADER and [line.split("\t")[0] for line in lines[1:]] == ["tx0", "tx1", "tx2"]
    assert leftovers(tmp_path) == []


def test_ctrl_c_before_any_row_keeps_old_output(tmp_path, model_dir, capsys, on_chunk):
    rc, err, out = predict_raising_at(1, KeyboardInterrupt(), tmp_path, model_dir, capsys, on_chunk, old="OLD\n")
    assert rc == 130 and "(no rows written)" in err
    assert out.read_text() == "OLD\n" and leftovers(tmp_path) == []


def test_rows_are_flushed_per_chunk_to_the_partial_file(tmp_path, model_dir, capsys, monkeypatch):
    import lncrna.predict

    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    out = tmp_path / "out.tsv"
    partial = tmp_path / "out.tsv.partial"
    seen: list[tuple[bool, int]] = []
    original = lncrna.predict._Stage1.__call__

    def spy(self, seqs):
        seen.append((out.exists(), len(partial.read_text().splitlines()) if partial.exists() else -1))
        return original(self, seqs)

    monkeypatch.setattr(lncrna.predict._Stage1, "__call__", spy)
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "4", "-q"], capsys)
    assert rc == 0, err
    # OUT appears only at the end; OUT.partial holds the header, then the rows of every finished chunk
    assert seen == [(False, 1), (False, 1 + 4), (False, 1 + 8)]
    assert len(out.read_text().splitlines()) == 11 and not partial.exists()


def test_help_documents_partial_output(capsys):
    rc, out, _ = run(["predict", "--help"], capsys)
    flat = " ".join(out.split())
    assert rc == 0 and "OUT.partial" in flat and "Ctrl-C" in flat and "left untouched" in flat


# ---- 3. hard link ------------------------------------------------------------------------------------
def test_output_hard_linked_to_input_is_refused(tmp_path, model_dir, capsys):
    fa = tmp_path / "u.fa"
    text = fasta_text(GOOD)
    fa.write_text(text)
    out = tmp_path / "h.tsv"
    os.link(fa, out)
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "-q"], capsys)
    assert rc == 2 and err.strip() == f"lncrna predict: error: {out}: the output would overwrite the input {fa}"
    assert fa.read_text() == text


# ---- 4. unwritable output ----------------------------------------------------------------------------
def test_unwritable_output_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    out = tmp_path / "out.tsv"
    real_open = open

    def no_write(file, mode="r", *a, **k):  # running as root, chmod cannot deny this
        if str(file).endswith(".partial") and "w" in mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(cli, "open", no_write, raising=False)
    # a model that does not exist: the output error must come first
    rc, _, err = run(["predict", fa, "-o", out, "--model", tmp_path / "no_model"], capsys)
    assert rc == 2 and err.strip() == f"lncrna predict: error: {out}: cannot write (Permission denied)"
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"),
                    reason="/dev/full, the device whose every write fails with ENOSPC, exists on Linux only")
def test_output_dev_full_is_exit_2(tmp_path, model_dir, capsys):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    rc, _, err = run(["predict", fa, "-o", "/dev/full", "--model", model_dir, "-q"], capsys)
    assert rc == 2 and err.strip() == "lncrna predict: error: /dev/full: cannot write (No space left on device) " \
                                      "(no rows written)"


def test_write_error_mid_run_is_exit_2_naming_the_file(tmp_path, model_dir, capsys, monkeypatch):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    out = tmp_path / "out.tsv"
    out.write_text("OLD\n")
    real_open = open

    class FillsUp:
        def __init__(self, fh):
            self.fh, self.writes = fh, 0

        def write(self, text):
            self.writes += 1
            if self.writes > 2:  # header, first chunk, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(text)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def filling(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        return FillsUp(fh) if str(file).endswith(".partial") else fh

    monkeypatch.setattr(cli, "open", filling, raising=False)
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "3", "-q"], capsys)
    assert rc == 2 and err.strip() == (f"lncrna predict: error: {out}: cannot write (No space left on device) "
                                       f"(3 finished rows discarded; {out} left as it was)")
    assert out.read_text() == "OLD\n" and leftovers(tmp_path) == []


def test_failed_rename_at_the_end_is_exit_2(tmp_path, model_dir, capsys, monkeypatch):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    out = tmp_path / "out.tsv"

    def no_replace(src, dst, *a, **k):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(cli.os, "replace", no_replace)
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "-q"], capsys)
    assert rc == 2 and len(error_lines(err)) == 1 and f"{out}: cannot replace it with" in err
    assert "Operation not permitted" in err and not out.exists() and leftovers(tmp_path) == []


# ---- 5. unreadable input -----------------------------------------------------------------------------
def _deny_reading(monkeypatch, module, target: Path) -> None:
    real_open = open

    def deny(file, *a, **k):
        if str(file) == str(target):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(module, "open", deny, raising=False)


def test_unreadable_input_is_exit_2(tmp_path, model_dir, capsys, monkeypatch):
    import lncrna.fasta

    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    _deny_reading(monkeypatch, lncrna.fasta, fa)
    out = tmp_path / "o.tsv"
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir], capsys)
    assert rc == 2 and err.strip() == f"lncrna predict: error: {fa}: cannot read (Permission denied)"
    assert not out.exists() and leftovers(tmp_path) == []


def test_directory_input_says_is_a_directory(tmp_path, model_dir, capsys):
    folder = tmp_path / "adir"
    folder.mkdir()
    rc, _, err = run(["predict", folder, "-o", tmp_path / "o.tsv", "--model", model_dir], capsys)
    assert rc == 2 and err.strip() == f"lncrna predict: error: {folder}: is a directory, not a FASTA file"
    rc, _, err = run(["evaluate", folder, "-o", tmp_path / "ev", "--model", model_dir], capsys)
    assert rc == 2 and err.strip() == f"lncrna evaluate: error: {folder}: is a directory, not a file"


def test_evaluate_unreadable_inputs_are_exit_2(tmp_path, model_dir, capsys, monkeypatch):
    import lncrna.fasta  # evaluate opens files through lncrna.fasta._open_text

    pred = tmp_path / "pred.tsv"
    assert run(["predict", EXAMPLE_FASTA, "-o", pred, "--model", model_dir, "-q"], capsys)[0] == 0
    truth = tmp_path / "truth.fa"
    truth.write_bytes(Path(EXAMPLE_FASTA).read_bytes())
    _deny_reading(monkeypatch, lncrna.fasta, truth)
    rc, _, err = run(["evaluate", pred, "--truth", truth, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 2 and err.strip() == f"lncrna evaluate: error: {truth}: cannot read (Permission denied)"
    _deny_reading(monkeypatch, lncrna.fasta, pred)
    rc, _, err = run(["evaluate", pred, "--truth", EXAMPLE_FASTA, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 2 and err.strip() == f"lncrna evaluate: error: {pred}: cannot read (Permission denied)"


# ---- 6. leading blank lines ---------------------------------------------------------------------------
def test_leading_blank_lines_are_accepted(tmp_path, model_dir, capsys):
    fa = tmp_path / "blank_start.fa"
    fa.write_text("\n\n  \n" + fasta_text(GOOD[:2]))
    out = tmp_path / "o.tsv"
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "-q"], capsys)
    assert rc == 0 and err == ""
    assert [line.split("\t")[0] for line in out.read_text().splitlines()[1:]] == ["tx0", "tx1"]
    gz = tmp_path / "blank_start.fa.gz"
    gz.write_bytes(gzip.compress(fa.read_bytes()))
    rc, _, err = run(["predict", gz, "-o", out, "--model", model_dir, "-q"], capsys)
    assert rc == 0 and err == "" and len(out.read_text().splitlines()) == 3


def test_text_before_the_first_header_is_still_rejected(tmp_path, model_dir, capsys):
    fa = tmp_path / "text_start.fa"
    fa.write_text("\n\nsome notes\n" + fasta_text(GOOD[:2]))
    rc, _, err = run(["predict", fa, "-o", tmp_path / "o.tsv", "--model", model_dir, "-q"], capsys)
    assert rc == 2 and "not FASTA" in err and "line 3" in err and len(err.strip().splitlines()) == 1


# ---- 8. evaluate on a corrupt gzip -------------------------------------------------------------------
def _corrupt_gzip(path: Path, text: str) -> None:
    data = bytearray(gzip.compress(text.encode()))
    for i in range(40, 60):  # inside the deflate stream: zlib.error, not BadGzipFile
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_evaluate_corrupt_gzip_is_exit_2(tmp_path, model_dir, capsys):
    bad = tmp_path / "corrupt.fa.gz"
    _corrupt_gzip(bad, fasta_text(GOOD))
    rc, _, err = run(["evaluate", bad, "-o", tmp_path / "ev", "--model", model_dir, "-q"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"lncrna evaluate: error: {bad}: broken gzip file (error: Error -3")
    pred = tmp_path / "pred.tsv"
    assert run(["predict", EXAMPLE_FASTA, "-o", pred, "--model", model_dir, "-q"], capsys)[0] == 0
    rc, _, err = run(["evaluate", pred, "--truth", bad, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 2 and err.startswith(f"lncrna evaluate: error: {bad}: broken gzip file")


def test_evaluate_predictions_gzip_truncated_after_the_header_is_exit_2(tmp_path, capsys):
    rng = random.Random(0)
    rows = "".join(f"id{i}\t{rng.randint(200, 9000)}\t{rng.random():.6f}\tmRNA\n" for i in range(20_000))
    data = gzip.compress((HEADER + "\n" + rows).encode())
    pred = tmp_path / "pred.tsv.gz"
    pred.write_bytes(data[: len(data) // 2])  # the header reads fine, the rows do not
    rc, _, err = run(["evaluate", pred, "--truth", EXAMPLE_FASTA, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 2 and err.strip().startswith(f"lncrna evaluate: error: {pred}: broken gzip file (EOFError")
    assert len(err.strip().splitlines()) == 1


# ---- 9. short and mostly-N records ---------------------------------------------------------------------
def test_short_and_mostly_n_records_warned_once_and_still_predicted(tmp_path, model_dir, capsys):
    short = [(f"s{i}", seq(i, 100 + i)) for i in range(1, 13)]  # 1..12 nt
    records = [GOOD[0], *short, ("nn", "N" * 400 + seq(100, 7)), GOOD[1], ("edge", seq(200, 8))]
    fa = tmp_path / "low.fa"
    fa.write_text(fasta_text(records))
    out = tmp_path / "o.tsv"
    rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "-q"], capsys)
    assert rc == 0, err
    assert [line.split("\t")[0] for line in out.read_text().splitlines()[1:]] == [r for r, _ in records]
    warns = [line for line in err.splitlines() if ": warning: " in line]
    assert len(warns) == 2 and len(err.strip().splitlines()) == 2
    assert warns[0].startswith(f"lncrna predict: warning: {fa}: 12 records shorter than 200 nt")
    assert warns[0].endswith("'s1', 's2', 's3', 's4', 's5' and 7 more")
    assert warns[1].startswith(f"lncrna predict: warning: {fa}: 1 record more than 50% N") and warns[1].endswith("'nn'")
    assert "edge" not in err  # exactly 200 nt is fine


def test_low_signal_warning_does_not_change_predictions(tmp_path, model_dir, capsys):
    records = [("a", seq(150, 1)), ("b", "N" * 300 + seq(200, 2)), GOOD[0]]
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(records))
    out = tmp_path / "o.tsv"
    assert run(["predict", fa, "-o", out, "--model", model_dir, "-q"], capsys)[0] == 0
    from lncrna.predict import Predictor

    with Predictor(model_dir=model_dir, device="cpu", workers=0) as p:
        probs = p.predict_sequences([s for _, s in records])
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    assert [float(r[2]) for r in rows] == pytest.approx([float(f"{x:.6f}") for x in probs], abs=1e-6)


def test_help_mentions_the_low_signal_warning(capsys):
    rc, out, _ = run(["predict", "--help"], capsys)
    flat = " ".join(out.split())
    assert rc == 0 and "shorter than 200 nt" in flat and "50% N" in flat


def test_evaluate_report_that_cannot_be_written_is_exit_2(tmp_path, capsys, monkeypatch):
    import lncrna.evaluate

    pred = tmp_path / "pred.tsv"
    pred.write_text(f"{HEADER}\n" + "".join(f"{rid}\t300\t0.5\tlncRNA\n" for rid in ("a", "b")))
    truth = tmp_path / "truth.fa"
    truth.write_text(">a label=lncRNA\nACGT\n>b label=mRNA\nACGT\n")
    out_dir = tmp_path / "ev"

    def denied(y, prob, out, title=""):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(out) / "roc.png"))

    monkeypatch.setattr(lncrna.evaluate, "plot_curves", denied)
    rc, _, err = run(["evaluate", pred, "--truth", truth, "-o", out_dir, "-q"], capsys)
    assert rc == 2 and err.strip() == f"lncrna evaluate: error: {out_dir / 'roc.png'}: cannot write (Permission denied)"


def test_utf8_bom_at_the_start_is_accepted(tmp_path, model_dir, capsys):
    plain, bom = tmp_path / "plain.fa", tmp_path / "bom.fa"
    plain.write_text(fasta_text(GOOD[:3]))
    bom.write_bytes(b"\xef\xbb\xbf" + fasta_text(GOOD[:3]).encode())
    outs = []
    for fa in (plain, bom):
        rc, out, err = run(["predict", fa, "--model", model_dir, "-q"], capsys)
        assert rc == 0, err
        outs.append(out)
    assert outs[0] == outs[1]


def test_dash_output_is_standard_output(tmp_path, model_dir, capsys, monkeypatch):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD[:3]))
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(["predict", fa, "-o", "-", "--model", model_dir, "-q"], capsys)
    assert rc == 0, err
    assert out.splitlines()[0] == HEADER and len(out.splitlines()) == 4
    assert not (tmp_path / "-").exists()
