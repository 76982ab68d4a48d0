"""Text encoding of the files ``lncrna evaluate`` and ``read_fasta`` read.

- Bytes that are not UTF-8 in a truth FASTA (``--truth``, ``--lnc``/``--mrna``, a FASTA INPUT) or in a
  predictions TSV are a one-line error naming file, line, record / row and byte, exit 2 (they used to
  become U+FFFD, so an id silently failed to match).
- A FASTA sequence line holding valid UTF-8 that is not ASCII (``ACGTé``) skips that record with a
  warning naming file, record and character, like any other invalid character (it used to fail the
  whole file as "'ascii' codec can't decode ..."); undecodable bytes are still a whole-file error.
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import pytest

from lncrna.evaluate import EvaluationError, read_predictions, read_truth
from lncrna.fasta import FastaError, FastaWarning, check_sequence, normalise_sequence, read_fasta
from test_cli import HEADER, run, seq  # the test directory is on sys.path

def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error: " in line]


# ---- evaluate: bytes that are not UTF-8 ---------------------------------------------------------
IDS = ["tx0", "tx1", "tx2", "tx3"]
TRUTH_OK = [(f"{rid} label={'lncRNA' if i % 2 else 'mRNA'}".encode(), seq(60, i)) for i, rid in enumerate(IDS)]


def truth_bytes(records: list[tuple[bytes, str | bytes]]) -> bytes:
    return b"".join(b">" + head + b"\n" + (s if isinstance(s, bytes) else s.encode()) + b"\n" for head, s in records)


def predictions(path: Path, ids: list[bytes]) -> Path:
    rows = [HEADER.encode()] + [rid + f"\t500\t{0.1 + 0.2 * i:.6f}\t{'lncRNA' if i % 2 else 'mRNA'}".encode()
                                for i, rid in enumerate(ids)]
    return write(path, b"\n".join(rows) + b"\n")


TRUTH_NOT_UTF8 = {
    # name: (records, expected parts of the error line: the same wording as read_fasta's)
    "latin1_id": ([*TRUTH_OK[:2], (b"caf\xe9 label=mRNA", seq(60, 9)), *TRUTH_OK[2:]],
                  ["record 3 'caf\\xe9'", "header (line 5)", "byte 0xe9 at column 5"]),
    "latin1_label_word": ([*TRUTH_OK[:2], (b"tx9 tissue=f\xf6tal label=mRNA", seq(60, 9)), *TRUTH_OK[2:]],
                          ["record 3 'tx9'", "header (line 5)", "byte 0xf6 at column 14"]),
    "sequence_byte": ([*TRUTH_OK[:3], (b"tx9 label=mRNA", seq(20, 9).encode() + b"\xff" + seq(20, 8).encode()),
                       TRUTH_OK[3]],
                      ["record 4 'tx9'", "sequence line (line 8)", "byte 0xff at column 21"]),
}


@pytest.mark.parametrize("suffix", [".fa", ".fa.gz"])
@pytest.mark.parametrize("case", sorted(TRUTH_NOT_UTF8))
def test_evaluate_truth_not_utf8_is_one_line_error(case, suffix, tmp_path, capsys):
    records, parts = TRUTH_NOT_UTF8[case]
    truth = write(tmp_path / f"truth{suffix}", truth_bytes(records))
    pred = predictions(tmp_path / "pred.tsv", [rid.encode() for rid in IDS])
    out_dir = tmp_path / "ev"
    rc, stdout, err = run(["evaluate", pred, "--truth", truth, "-o", out_dir, "-q"], capsys)
    assert rc == 2, err
    errors = error_lines(err)
    assert len(errors) == 1 and errors[0].startswith(f"lncrna evaluate: error: {truth}: "), err
    assert "is not UTF-8 text" in errors[0] and all(p in errors[0] for p in parts), errors[0]
    assert "Traceback" not in err and "\ufffd" not in err and stdout == ""
    assert not out_dir.exists()


def test_evaluate_lnc_mrna_not_utf8_names_the_file(tmp_path, capsys):
    lnc = write(tmp_path / "lnc.fa", truth_bytes([(b"tx1", seq(60, 1)), (b"tx3", seq(60, 3))]))
    mrna = write(tmp_path / "mrna.fa.gz", truth_bytes([(b"tx0", seq(60, 0)), (b"t\xe9x2", seq(60, 2))]))
    pred = predictions(tmp_path / "pred.tsv", [rid.encode() for rid in IDS])
    rc, _, err = run(["evaluate", pred, "--lnc", lnc, "--mrna", mrna, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 2, err
    assert error_lines(err) == [f"lncrna evaluate: error: {mrna}: record 2 't\\xe9x2': header (line 3) is not "
                                f"UTF-8 text (byte 0xe9 at column 3); convert the file to UTF-8 (or ASCII) first"]


def test_read_truth_refuses_latin1_ids_that_replacement_made_equal(tmp_path):
    # 'caf\xe9' and 'caf\xe8' both used to read as 'caf\ufffd': one id, and a label conflict or a wrong match
    fa = write(tmp_path / "t.fa", truth_bytes([(b"caf\xe9 label=lncRNA", "ACGT"), (b"caf\xe8 label=lncRNA", "ACGT")]))
    with pytest.raises(EvaluationError, match=r"record 1 'caf\\xe9': header \(line 1\) is not UTF-8 text"):
        read_truth(fa)


@pytest.mark.parametrize("suffix", [".tsv", ".tsv.gz"])
def test_evaluate_predictions_not_utf8_is_one_line_error(suffix, tmp_path, capsys):
    truth = write(tmp_path / "truth.fa", truth_bytes(TRUTH_OK))
    pred = predictions(tmp_path / f"pred{suffix}", [b"tx0", b"tx1", b"caf\xe9", b"tx3"])
    out_dir = tmp_path / "ev"
    rc, stdout, err = run(["evaluate", pred, "--truth", truth, "-o", out_dir, "-q"], capsys)
    assert rc == 2, err
    assert error_lines(err) == [f"lncrna evaluate: error: {pred}: line 4 'caf\\xe9': not UTF-8 text (byte 0xe9 "
                                f"at column 4); convert the file to UTF-8 (or ASCII) first"], err
    assert stdout == "" and not out_dir.exists()


def test_read_predictions_refuses_a_bad_byte_in_a_later_column(tmp_path):
    pred = tmp_path / "pred.tsv"
    pred.write_bytes(f"{HEADER}\ntx0\t500\t0.1\tmRNA\ntx1\t500\t0.9\tlnc\xb5RNA\n".encode("latin-1"))
    with pytest.raises(EvaluationError, match=r"line 3 'tx1': not UTF-8 text \(byte 0xb5 at column 16\)"):
        read_predictions(pred)


def test_evaluate_fasta_input_not_utf8_fails_before_predicting(tmp_path, capsys, monkeypatch):
    import lncrna.predict

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load for a file that cannot be read")

    monkeypatch.setattr(lncrna.predict.Predictor, "__init__", no_model)
    fa = write(tmp_path / "in.fa.gz", truth_bytes(TRUTH_NOT_UTF8["latin1_id"][0]))
    rc, _, err = run(["evaluate", fa, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 2, err
    assert error_lines(err) == [f"lncrna evaluate: error: {fa}: record 3 'caf\\xe9': header (line 5) is not UTF-8 "
                                f"text (byte 0xe9 at column 5); convert the file to UTF-8 (or ASCII) first"]


def test_evaluate_utf8_ids_still_match(tmp_path, capsys):
    ids = ["café", "μ-tx", "tx2", "tx3"]
    heads = [f"{rid} label={'lncRNA' if i % 2 else 'mRNA'} déjà".encode() for i, rid in enumerate(ids)]
    truth = write(tmp_path / "truth.fa", b"\xef\xbb\xbf" + truth_bytes([(h, seq(60, i)) for i, h in enumerate(heads)]))
    pred = predictions(tmp_path / "pred.tsv", [rid.encode() for rid in ids])
    assert read_truth(truth) == {"café": 0, "μ-tx": 1, "tx2": 0, "tx3": 1}
    assert set(read_predictions(pred)) == set(ids)
    rc, stdout, err = run(["evaluate", pred, "--truth", truth, "-o", tmp_path / "ev", "-q"], capsys)
    assert rc == 0, err
    assert "warning" not in err and "accuracy" in stdout


# ---- FASTA: valid UTF-8 that is not ASCII in a sequence -----------------------------------------
def _read(path: Path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = list(read_fasta(path, **kw))
    return records, [str(w.message) for w in caught if issubclass(w.category, FastaWarning)]


NON_ASCII = {
    # name: (second sequence line of record 2 (its first: ACGT), expected parts of its warning)
    "latin_letter": ("ACGTé" + "ACGT" * 5, ["'é'", "U+00E9", "1 in total, first at position 9"]),
    "greek": ("ACGTACGT" + "μα" * 2 + "ACGT", ["'μα'", "U+03BC, U+03B1", "4 in total, first at position 13"]),
    "sharp_s": ("ACGTß", ["'ß'", "U+00DF"]),  # 'ß'.upper() is 'SS': must not pass as two S (= N) codes
    "no_break_space": ("ACGT\u00a0ACGT", ["'\\xa0'", "U+00A0", "first at position 9"]),
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", sorted(NON_ASCII))
def test_non_ascii_sequence_skips_only_its_record(case, gz, tmp_path):
    line, parts = NON_ASCII[case]
    fa = write(tmp_path / ("in.fa.gz" if gz else "in.fa"),
               f">good1 caf\u00e9\nACGTACGT\n>bad\u00e9 x\nACGT\n{line}\n>good2\nGGCCA\nTT\n".encode())
    records, warned = _read(fa)
    assert [(r.id, r.seq) for r in records] == [("good1", "ACGTACGT"), ("good2", "GGCCATT")]
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"{fa}: record 2 'badé': non-nucleotide characters "), warned[0]
    assert warned[0].endswith("; skipped") and all(p in warned[0] for p in parts), warned[0]


def test_non_ascii_sequence_with_strict_raises_naming_the_record(tmp_path):
    fa = write(tmp_path / "in.fa", ">good\nACGT\n>bad\nACGTé\n".encode())
    with pytest.raises(FastaError, match=r"record 2 'bad': non-nucleotide characters 'é' \(not ASCII: U\+00E9"):
        list(read_fasta(fa, strict=True))


def test_all_records_non_ascii_is_no_usable_records(tmp_path):
    fa = write(tmp_path / "in.fa", ">a\nACGTé\n>b\nμμ\n".encode())
    with pytest.raises(FastaError, match=r"no usable records, all 2 invalid \(first: .*record 1 'a': non-nucleotide"):
        _read(fa)


@pytest.mark.parametrize("gz", [False, True])
def test_bytes_that_are_not_utf8_still_fail_the_file(gz, tmp_path):
    # a record with valid non-ASCII is skipped; a later undecodable byte (even on a line that also
    # holds valid non-ASCII) is the whole-file error of read_fasta, not a skipped record
    data = ">a\nACGTé\n>b\nACGT\n>c\nACGTμ".encode() + b"\xff\n>d\nACGT\n"
    fa = write(tmp_path / ("in.fa.gz" if gz else "in.fa"), data)
    with pytest.raises(FastaError, match=r"record 3 'c': sequence line \(line 6\) is not UTF-8 text "
                                         r"\(byte 0xff at column 6\)"):
        _read(fa)


def test_check_sequence_refuses_non_ascii_before_upper_casing():
    # 'ß'.upper() == 'SS' and 'ſ'.upper() == 'S' (an IUPAC code): both used to pass as nucleotides
    for s in ("ACGTß", "ACGTſ", "ACGTé"):
        problem = check_sequence(s)
        assert problem is not None and problem.startswith("non-nucleotide characters") and "not ASCII" in problem
        with pytest.raises(ValueError, match="not ASCII"):
            normalise_sequence(s)
    assert check_sequence("acgtRYN") is None


def test_predict_skips_non_ascii_record_and_predicts_the_rest(tmp_path, model_dir, capsys):
    fa = write(tmp_path / "in.fa", f">bad\n{seq(150, 1)}é{seq(150, 2)}\n>good\n{seq(300, 3)}\n".encode())
    out = tmp_path / "out.tsv"
    rc, _, err = run(["predict", fa, "--model", model_dir, "-o", out], capsys)
    assert rc == 0, err
    warned = [line for line in err.splitlines() if ": warning: " in line]
    assert warned == [f"lncrna predict: warning: {fa}: record 1 'bad': non-nucleotide characters 'é' (not ASCII: "
                      f"U+00E9; 1 in total, first at position 151); skipped"], err
    rows = out.read_text().splitlines()
    assert rows[0] == HEADER and [r.split("\t")[:2] for r in rows[1:]] == [["good", "300"]]
