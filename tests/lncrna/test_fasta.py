"""lncrna.fasta: every bad-input case, the skip-vs-raise policy, normalisation, round trips."""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import pytest

from lncrna.fasta import (
    FastaError,
    FastaRecord,
    FastaWarning,
    normalise_sequence,
    read_fasta,
    write_fasta,
)


def _write(path: Path, text: str, *, gz: bool = False) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def _read(path: Path, **kw) -> tuple[list[FastaRecord], list[str]]:
    """Records and the FastaWarning messages emitted while reading."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = list(read_fasta(path, **kw))
    return records, [str(w.message) for w in caught if issubclass(w.category, FastaWarning)]


def _one_line_error(exc: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


# --- whole-file errors: raised by read_fasta itself, before iteration ------------------------
def test_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.fa", "")
    with pytest.raises(FastaError) as exc:
        read_fasta(path)  # no iteration needed
    _one_line_error(exc, "empty.fa", "empty file")


def test_whitespace_only_gzip_is_empty(tmp_path: Path) -> None:
    path = _write(tmp_path / "blank.fa.gz", "\n\n  \n", gz=True)
    with pytest.raises(FastaError) as exc:
        read_fasta(path)
    _one_line_error(exc, "blank.fa.gz", "empty file")


def test_missing_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "nohead.fa", "ACGTACGT\n>r1\nACGT\n")
    with pytest.raises(FastaError) as exc:
        read_fasta(path)
    _one_line_error(exc, "nohead.fa", "not FASTA", "missing header", "line 1")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FastaError) as exc:
        read_fasta(tmp_path / "nope.fa")
    _one_line_error(exc, "nope.fa", "no such file")


def test_dash_names_standard_input_which_is_refused_plainly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no file named "-" here
    with pytest.raises(FastaError) as exc:
        read_fasta("-")
    _one_line_error(exc, "-: standard input is not supported", "save it to a file first")
    assert "no such file" not in str(exc.value)


def test_a_device_is_refused_by_name_before_anything_is_read() -> None:
    # the null device is not a regular file, as a pipe is not (the same check): it reads as empty,
    # so the refusal must come from the name's file type, not from its content
    with pytest.raises(FastaError) as exc:
        read_fasta(os.devnull)
    _one_line_error(exc, os.devnull, "not a regular file", "save it to a file first")


def test_broken_gzip_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.fa.gz"
    path.write_bytes(b"\x1f\x8b" + b"this is not deflate data" * 4)
    with pytest.raises(FastaError) as exc:
        read_fasta(path)
    _one_line_error(exc, "bad.fa.gz", "broken gzip")


def test_truncated_gzip_raises_during_iteration(tmp_path: Path) -> None:
    text = "".join(f">r{i}\n{'ACGT' * 200}\n" for i in range(200))
    full = gzip.compress(text.encode(), mtime=0)
    path = tmp_path / "cut.fa.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(FastaError) as exc:
        list(read_fasta(path))
    _one_line_error(exc, "cut.fa.gz", "broken gzip")


def test_every_record_bad_raises(tmp_path: Path) -> None:
    path = _write(tmp_path / "allbad.fa", ">p1\nMKELLPQFIEE\n>p2\nACGT123\n")
    with pytest.raises(FastaError) as exc, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(read_fasta(path))
    _one_line_error(exc, "allbad.fa", "no usable records", "all 2 invalid", "record 1 'p1'")


# --- per-record problems: warn and skip, or raise with strict=True ---------------------------
BAD_RECORDS = {
    "protein": (">good\nACGTACGT\n>prot\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n", "looks like a protein sequence"),
    "digits": (">good\nACGTACGT\n>dig\nACGT12ACGT\n", "non-nucleotide characters '12'"),
    "symbols": (">good\nACGTACGT\n>sym\nACG-T.ACGT\n", "non-nucleotide characters '-.'"),
    "duplicate_id": (">good\nACGTACGT\n>good\nTTTTAAAA\n", "duplicate id"),
    "empty_sequence": (">good\nACGTACGT\n>empty\n", "empty sequence"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_is_skipped_with_warning(tmp_path: Path, case: str) -> None:
    text, problem = BAD_RECORDS[case]
    path = _write(tmp_path / f"{case}.fa", text)
    records, messages = _read(path)
    assert [(r.id, r.seq) for r in records] == [("good", "ACGTACGT")]
    assert len(messages) == 1
    assert f"{case}.fa: record 2 " in messages[0] and problem in messages[0]
    assert "skipped" in messages[0] and "\n" not in messages[0]


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_raises_when_strict(tmp_path: Path, case: str) -> None:
    text, problem = BAD_RECORDS[case]
    path = _write(tmp_path / f"{case}.fa", text)
    with pytest.raises(FastaError) as exc:
        list(read_fasta(path, strict=True))
    _one_line_error(exc, f"{case}.fa", "record 2", problem)


def test_protein_vs_invalid_characters_are_told_apart() -> None:
    from lncrna.fasta import check_sequence

    assert "protein" in check_sequence("MSTNPKPQRKTKRNTNRRPQDVKFPGG")
    assert "protein" not in check_sequence("ACGTACGTACGTACGTACGTACGTACGTACGTE")  # 1 stray letter
    assert check_sequence("ACGTNRYKMSWBDHVU") is None


def test_megabase_sequence_is_kept_with_warning(tmp_path: Path) -> None:
    seq = "ACGT" * 250_000  # 1 Mb
    path = _write(tmp_path / "long.fa.gz", f">chr_piece\n{seq}\n", gz=True)
    records, messages = _read(path)
    assert len(records) == 1 and records[0].seq == seq
    assert len(messages) == 1 and "very long sequence (1,000,000 nt" in messages[0] and "kept" in messages[0]


def test_too_long_sequence_is_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path / "toolong.fa", ">ok\nACGTACGT\n>big\n" + "A" * 101 + "\n")
    records, messages = _read(path, max_length=100)
    assert [r.id for r in records] == ["ok"]
    assert len(messages) == 1 and "record 2 'big'" in messages[0] and "too long" in messages[0]


def test_min_length_skips_silently(tmp_path: Path) -> None:
    path = _write(tmp_path / "short.fa", ">a\nACGT\n>b\nACGTACGTAC\n")
    records, messages = _read(path, min_length=5)
    assert [r.id for r in records] == ["b"] and messages == []


# --- normalisation ------------------------------------------------------------------------------
def test_lowercase_and_u_to_t(tmp_path: Path) -> None:
    path = _write(tmp_path / "rna.fa.gz", ">r1 some description\nacgu\nUUAG\n", gz=True)
    (rec,), messages = _read(path)
    assert rec == FastaRecord("r1", "r1 some description", "ACGTTTAG") and messages == []


def test_iupac_codes_become_n(tmp_path: Path) -> None:
    path = _write(tmp_path / "iupac.fa", ">r1\nACGTNRYKMSWBDHVnrykmswbdhv\n")
    (rec,), _ = _read(path)
    assert rec.seq == "ACGT" + "N" * 22
    assert normalise_sequence("aRu") == "ANT"
    with pytest.raises(ValueError, match="non-nucleotide"):
        normalise_sequence("AC#GT")


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "plain_named.fa.gz", ">a\nACGT\n")  # not compressed
    assert [r.seq for r in read_fasta(path)] == ["ACGT"]
    path = _write(tmp_path / "compressed.fa", ">a\nACGT\n", gz=True)
    assert [r.seq for r in read_fasta(path)] == ["ACGT"]


def test_reading_is_streaming(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.fa", ">a\nACGT\n>b\nGGCC\n")
    it = read_fasta(path)
    assert iter(it) is it and not isinstance(it, list)
    assert next(it).id == "a"


# --- writing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["out.fa", "out.fa.gz"])
def test_write_read_round_trip(tmp_path: Path, name: str) -> None:
    recs = [FastaRecord("a", "a label=x", "ACGT" * 40), FastaRecord("b", "", "GGCCA")]
    assert write_fasta(recs, tmp_path / name, line_width=7) == 2
    back = list(read_fasta(tmp_path / name))
    assert [(r.id, r.seq) for r in back] == [("a", "ACGT" * 40), ("b", "GGCCA")]
    assert back[0].description == "a label=x"


def test_write_gzip_is_byte_reproducible(tmp_path: Path) -> None:
    recs = [FastaRecord("a", "a", "ACGT" * 100)]
    write_fasta(recs, tmp_path / "x.fa.gz")
    first = (tmp_path / "x.fa.gz").read_bytes()
    write_fasta(recs, tmp_path / "x.fa.gz")
    assert (tmp_path / "x.fa.gz").read_bytes() == first
    assert first[4:8] == b"\x00\x00\x00\x00"  # gzip mtime field
