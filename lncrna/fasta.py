"""Read, validate and write FASTA / FASTA.gz files of nucleotide sequences (Biopython ``SeqIO``).

Normalisation of every sequence read: upper case, ``U -> T``, and every IUPAC ambiguity code
(``N R Y K M S W B D H V``) -> ``N``. Mapping all ambiguity codes to one symbol is a deliberate
choice: the tokenizer has a single token for "k-mer with an unknown base", and a two-base code such
as ``R`` (A or G) carries too little signal to be worth its own vocabulary.

Error policy (every message is one line naming the file, and the record by 1-based index and id):

- The whole file is unusable -> :class:`FastaError` (a ``ValueError``): missing, a directory or
  not a regular file (stdin, a pipe), unreadable (permission, I/O error), empty file, text before
  the first ``>`` (not FASTA), broken gzip, every record invalid, a later header line indented by
  whitespace (``"  >id2"``: the message names the line and the record it follows; Biopython only
  takes ``>`` in column 1 as a header and would glue the line onto that record's sequence), a
  header or sequence line that is not UTF-8 text (e.g. a Latin-1 header; the message names the
  record, its id with the bad bytes written as ``\\xNN``, the line and the byte).
  Missing / unreadable / empty / not-FASTA / unreadable gzip header are raised by
  :func:`read_fasta` itself, before any record is read; a gzip stream that is truncated or corrupt
  further in, an indented header and bytes that are not UTF-8 can only be noticed when the reader
  gets there, so those errors are raised during iteration. Blank lines before the first header
  (and whitespace before its ``>``) are allowed.
- Only some records are bad (missing id, duplicate id, empty sequence, protein-like, invalid
  characters (a valid UTF-8 letter that is not ASCII, such as ``é``, too: named with its code
  point), longer than ``max_length``) -> a :class:`FastaWarning` naming file and record, and the
  record is skipped (for a duplicate id: the later record; the warning names the first one); with
  ``strict=True`` the first bad record raises :class:`FastaError` instead.
- Very long sequences: above ``warn_length`` (500 kb; the longest transcript in the project's data
  is 205 kb) a warning is emitted and the record is kept (prediction handles long input);
  above ``max_length`` (2 Mb) the record is skipped as "too long".
- Records shorter than ``min_length`` are skipped silently: that is a filter, not an error.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import stat
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from Bio import SeqIO

__all__ = [
    "FastaError",
    "FastaWarning",
    "FastaRecord",
    "read_fasta",
    "write_fasta",
    "normalise_sequence",
    "check_sequence",
    "unsupported_compression",
    "MAX_LENGTH",
    "WARN_LENGTH",
]

MAX_LENGTH = 2_000_000  # longer records are skipped (warning) or raise (strict)
WARN_LENGTH = 500_000  # longer records are kept with a warning
PROTEIN_SHARE = 0.10  # share of non-nucleotide letters above which a record "looks like a protein"

_GZIP_MAGIC = b"\x1f\x8b"
_IUPAC = "ACGTUNRYKMSWBDHV"  # upper-case nucleotide IUPAC codes accepted on input
_DELETE_IUPAC = str.maketrans("", "", _IUPAC)
_TO_ACGTN = str.maketrans({"U": "T", **{c: "N" for c in "RYKMSWBDHV"}})


class FastaError(ValueError):
    """A FASTA file (or one of its records, with ``strict=True``) cannot be used. One-line message."""


class FastaWarning(UserWarning):
    """A record was skipped (or kept but is suspicious). One-line message naming file and record."""


@dataclass(frozen=True, slots=True)
class FastaRecord:
    """One sequence. ``description`` is the full header line without ``>`` (Biopython convention,
    so it starts with ``id``); ``seq`` is normalised: upper case over ``ACGTN``."""

    id: str
    description: str
    seq: str


def check_sequence(seq: str) -> str | None:
    """Return why ``seq`` is not a usable nucleotide sequence, or ``None`` if it is.

    Case-insensitive. Problems: empty, looks like a protein (letters only, and at least
    ``PROTEIN_SHARE`` of them outside the nucleotide IUPAC codes, e.g. E F I L P Q), or
    characters that are not nucleotide IUPAC codes (digits, symbols, stray letters; any character
    that is not ASCII, named as written with its code point).
    """
    if not seq:
        return "empty sequence"
    if not seq.isascii():  # O(1) for str. Before upper(): 'ß'.upper() is 'SS', 'ſ'.upper() 'S' (IUPAC codes)
        odd = [c for c in seq if not c.isascii()]
        chars = "".join(dict.fromkeys(odd))[:10]  # distinct, in order of appearance, as written in the file
        first = next(i for i, c in enumerate(seq) if not c.isascii())
        return (
            f"non-nucleotide characters {chars!r} (not ASCII: {', '.join(f'U+{ord(c):04X}' for c in chars)}; "
            f"{len(odd)} in total, first at position {first + 1})"
        )
    upper = seq.upper()
    bad = upper.translate(_DELETE_IUPAC)  # what is left after removing valid codes
    if not bad:
        return None
    if bad.replace("*", "").isalpha() and len(bad) >= PROTEIN_SHARE * len(upper):
        return (
            f"looks like a protein sequence ({len(bad)}/{len(upper)} letters are not nucleotide "
            f"codes, e.g. {''.join(sorted(set(bad)))[:10]!r})"
        )
    first = next(i for i, c in enumerate(upper) if c in bad)
    return (
        f"non-nucleotide characters {''.join(sorted(set(bad)))[:20]!r} "
        f"({len(bad)} in total, first at position {first + 1})"
    )


def normalise_sequence(seq: str) -> str:
    """Upper-case ``seq``, map ``U -> T`` and every IUPAC ambiguity code to ``N``.

    Raises ``ValueError`` (one line) if :func:`check_sequence` finds a problem.
    """
    problem = check_sequence(seq)
    if problem is not None:
        raise ValueError(problem)
    return seq.upper().translate(_TO_ACGTN)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


#: magic bytes of compressors other than gzip -> (name, command that decompresses)
_OTHER_COMPRESSION = {b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ\x00": ("xz", "unxz"),
                      b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"), b"PK\x03\x04": ("zip", "unzip")}


def unsupported_compression(path: Path) -> str | None:
    """One-line reason if ``path`` starts like a bzip2 / xz / zstd / zip file, else ``None``.

    Why: such a file used to fail as "not FASTA: ... line 1 starts with 'BZh91AY&SY\\x1c...'" (binary
    noise in the message, no hint what to do). Only plain and gzip input are read."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    for magic, (name, tool) in _OTHER_COMPRESSION.items():
        if head.startswith(magic):
            return (f"{path}: {name}-compressed file; only plain or gzip-compressed input is supported "
                    f"(decompress it first, e.g. {tool} {path})")
    return None


def _open_text(path: Path, errors: str = "replace") -> TextIO:
    """Open plain or gzip FASTA as text; gzip is detected by its magic bytes, not by the name.

    ``errors="replace"`` (the default: sniffing the first line here and in
    ``lncrna.evaluate.sniff_kind``) turns undecodable bytes into U+FFFD; the readers
    (:func:`_iter_records`, lncrna.evaluate's truth and predictions readers) pass
    ``"surrogateescape"``, which keeps them as lone surrogates that :func:`_not_utf8_message` reports
    (U+FFFD could be real text).
    A UTF-8 byte-order mark (some Windows editors write one) is dropped (``utf-8-sig``).
    """
    if _is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors=errors)
    return open(path, encoding="utf-8-sig", errors=errors)


_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def _undecodable(line: str) -> tuple[int, int] | None:
    """``(byte, 1-based column)`` of the first byte of ``line`` that was not UTF-8, or ``None``.

    ``line`` was decoded with ``errors="surrogateescape"``, which maps byte 0xNN to the lone
    surrogate U+DCNN; valid UTF-8 never decodes to a lone surrogate. Callers test ``line.isascii()``
    first (O(1) for str), so ASCII text costs nothing here."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        return ord(line[e.start]) - 0xDC00, e.start + 1
    return None


def _escaped(text: str) -> str:
    """``text`` with its undecodable bytes (surrogateescape) written as ``\\xNN``, for messages."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _not_utf8_message(path: Path, line: str, line_no: int, record: int, header_line: str) -> str | None:
    """One-line message if ``line`` (line ``line_no`` of ``path``, in record ``record`` whose header
    line is ``header_line``) holds a byte that is not UTF-8, else ``None``. Shared by
    :func:`read_fasta` and lncrna.evaluate's truth reader, so both word it the same way."""
    bad = _undecodable(line)
    if bad is None:
        return None
    byte, column = bad
    rid = (header_line[1:].split(maxsplit=1) or [""])[0]
    what = "header" if line[:1] == ">" else "sequence line"
    return (f"{path}: record {record} '{_escaped(rid)}': {what} (line {line_no}) is not UTF-8 text "
            f"(byte 0x{byte:02x} at column {column}); convert the file to UTF-8 (or ASCII) first")


def _cannot_read(path: Path, e: OSError) -> FastaError:
    return FastaError(f"{path}: cannot read ({e.strerror or type(e).__name__})")


#: why a stream cannot stand for a file (predict counts the records first, evaluate reads truth and
#: sequences separately)
_READ_TWICE = "the file is read more than once"


def _not_a_file(path: Path, what: str = "a FASTA file") -> FastaError | None:
    """Why ``path`` cannot be read as ``what`` by name (missing, a folder, not a regular file)."""
    if str(path) == "-":  # the usual name for standard input: say so rather than "no such file"
        return FastaError(f"-: standard input is not supported ({_READ_TWICE}); save it to a file first "
                          "(gzip is fine)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return FastaError(f"{path}: no such file")
    except OSError as e:
        return _cannot_read(path, e)
    if stat.S_ISDIR(st.st_mode):
        return FastaError(f"{path}: is a directory, not {what}")
    if not stat.S_ISREG(st.st_mode):
        return FastaError(f"{path}: not a regular file (standard input, pipes and devices are not supported: "
                          f"{_READ_TWICE}; save it to a file first)")
    return None


def _check_file_start(path: Path) -> None:
    """Raise FastaError if the file is missing, unreadable, empty, not FASTA, or an unreadable gzip."""
    if (problem := _not_a_file(path)) is not None:
        raise problem
    if path.stat().st_size == 0:
        raise FastaError(f"{path}: empty file")
    try:
        if (other := unsupported_compression(path)) is not None:
            raise FastaError(other)
        with _open_text(path) as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                if not line.lstrip().startswith(">"):
                    raise FastaError(
                        f"{path}: not FASTA: missing header, expected '>' but line {line_no} "
                        f"starts with {line.strip()[:40]!r}"
                    )
                return
            gz = _is_gzip(path)
    except _GZIP_ERRORS as e:
        raise FastaError(f"{path}: broken gzip file ({type(e).__name__}: {e})") from e
    except OSError as e:  # PermissionError, EIO, ...
        raise _cannot_read(path, e) from e
    raise FastaError(f"{path}: empty file (no content{' after decompression' if gz else ''})")


class _FromFirstHeader:
    """A text stream that starts at the first header line: leading blank lines are skipped and the
    header's leading whitespace is dropped (Biopython >= 1.85's ``"fasta"`` parser refuses anything
    before the first ``>``; :func:`_check_file_start` has already rejected real text there).

    Every later line is counted and checked: a header indented by whitespace (``"  >id2"``) raises
    :class:`FastaError` naming the file, the line and the record it would otherwise be glued onto.
    Biopython only takes a ``>`` in column 1 as a header, so it would read such a line as sequence
    of the record before (both records lost behind a misleading "non-nucleotide '>'" warning).

    Every line, the first header too, must be UTF-8 text: ``fh`` is opened with
    ``errors="surrogateescape"`` and a line holding an undecodable byte raises :class:`FastaError`
    naming the file, the record and the byte. Why: decoded with replacement characters, a Latin-1
    header (``>caf\\xe9``) silently became the id ``'caf\\ufffd'``, and such a byte in a sequence
    failed the whole file as "unreadable FASTA: 'ascii' codec can't decode ..." without saying where.
    """

    def __init__(self, fh: TextIO, path: Path) -> None:
        self._fh, self._path = fh, path
        self._first: str | None = None
        line_no = 0
        for line in iter(fh.readline, ""):
            line_no += 1
            if line.strip():
                self._first = line.lstrip()
                if not self._first.isascii():
                    self._check_utf8(self._first, line_no, 1, self._first)
                break
        self._lines = self._checked_lines(line_no, self._first or "")

    def _check_utf8(self, line: str, line_no: int, record: int, header_line: str) -> None:
        """Raise FastaError if ``line`` (of record ``record``, whose header is ``header_line``) holds a
        byte that is not UTF-8 (a lone surrogate from ``surrogateescape``)."""
        problem = _not_utf8_message(self._path, line, line_no, record, header_line)
        if problem is not None:
            raise FastaError(problem)

    def _checked_lines(self, line_no: int, header: str) -> Iterator[str]:
        """The lines after the first header; ``line_no`` is that header's 1-based line number."""
        record, header_line = 1, header  # the record (1-based) and its header, for the error message
        # a plain loop, not ``yield from self._fh``: that would close the file when the generator is dropped
        for line in self._fh:
            line_no += 1
            first = line[:1]
            if first == ">":
                record, header_line = record + 1, line
            if not line.isascii():  # ASCII, the usual case, needs no further check (a fast C-level test)
                self._check_utf8(line, line_no, record, header_line)
            if first.isspace() and line.lstrip()[:1] == ">":
                rid = (header_line[1:].split(maxsplit=1) or [""])[0]
                indent = len(line) - len(line.lstrip())  # a count: the CLI collapses runs of spaces
                raise FastaError(
                    f"{self._path}: line {line_no}: header line {line.strip()[:40]!r} is indented by "
                    f"{indent} whitespace character{'s' if indent > 1 else ''} (inside record {record} "
                    f"{rid!r}); '>' must be the first character of a header line"
                )
            yield line

    def read(self, size: int = -1) -> str:  # Biopython probes the mode with read(0)
        if size == 0:
            return ""
        raise io.UnsupportedOperation("read")

    def readline(self) -> str:
        first, self._first = self._first, None
        return first if first is not None else next(self._lines, "")

    def __iter__(self) -> Iterator[str]:
        # Biopython calls iter() on the stream for every record: hand out the same line iterator
        if self._first is not None:
            first, self._first = self._first, None
            return itertools.chain([first], self._lines)
        return self._lines


def read_fasta(
    path: str | os.PathLike[str],
    *,
    strict: bool = False,
    min_length: int = 0,
    max_length: int = MAX_LENGTH,
    warn_length: int = WARN_LENGTH,
) -> Iterator[FastaRecord]:
    """Stream the records of a FASTA or FASTA.gz file, validated and normalised.

    Whole-file problems found at the start (missing, empty, not FASTA, unreadable gzip) raise
    :class:`FastaError` here, at call time; the records themselves are read lazily. See the module
    docstring for the per-record policy. Records shorter than ``min_length`` are skipped silently.
    """
    path = Path(path)
    _check_file_start(path)
    return _iter_records(path, strict, min_length, max_length, warn_length)


def _iter_records(
    path: Path, strict: bool, min_length: int, max_length: int, warn_length: int
) -> Iterator[FastaRecord]:
    seen: dict[str, int] = {}  # id -> index of its first record
    n_yielded = n_bad = 0
    first_problem = ""
    try:
        with _open_text(path, errors="surrogateescape") as handle:  # bytes that are not UTF-8: _FromFirstHeader
            for index, rec in enumerate(SeqIO.parse(_FromFirstHeader(handle, path), "fasta"), start=1):
                try:
                    raw = str(rec.seq)
                except UnicodeDecodeError:
                    # Biopython stores the sequence lines encoded to bytes (UTF-8; every byte that was
                    # not UTF-8 has already raised in _FromFirstHeader) and str() decodes them as ASCII:
                    # a letter such as 'é' used to fail the whole file. As text, check_sequence names
                    # it and only this record is skipped. ASCII sequences never get here.
                    raw = bytes(rec.seq).decode("utf-8")
                where = f"{path}: record {index} {rec.id!r}"
                if not rec.id:
                    problem: str | None = "missing record id (empty header line)"
                elif rec.id in seen:
                    problem = f"duplicate id (record {seen[rec.id]} has the same id)"
                else:
                    problem = check_sequence(raw)
                    if problem is None and len(raw) > max_length:
                        problem = f"too long ({len(raw):,} nt > max_length {max_length:,})"
                seen.setdefault(rec.id, index)
                if problem is not None:
                    if strict:
                        raise FastaError(f"{where}: {problem}")
                    n_bad += 1
                    first_problem = first_problem or f"{where}: {problem}"
                    warnings.warn(f"{where}: {problem}; skipped", FastaWarning, stacklevel=2)
                    continue
                if len(raw) < min_length:
                    continue
                if len(raw) > warn_length:
                    warnings.warn(
                        f"{where}: very long sequence ({len(raw):,} nt > {warn_length:,}); kept",
                        FastaWarning,
                        stacklevel=2,
                    )
                n_yielded += 1
                yield FastaRecord(rec.id, rec.description, raw.upper().translate(_TO_ACGTN))
    except FastaError:
        raise
    except _GZIP_ERRORS as e:
        raise FastaError(f"{path}: broken gzip file ({type(e).__name__}: {e})") from e
    except OSError as e:  # PermissionError, EIO, ... (the start was readable: rare)
        raise _cannot_read(path, e) from e
    except ValueError as e:  # Biopython parse errors
        raise FastaError(f"{path}: unreadable FASTA: {' '.join(str(e).split())[:200]}") from e
    if n_yielded == 0 and n_bad > 0:
        raise FastaError(f"{path}: no usable records, all {n_bad} invalid (first: {first_problem})")


def write_fasta(
    records: Iterable[FastaRecord],
    path: str | os.PathLike[str],
    *,
    line_width: int = 60,
    compresslevel: int = 6,
) -> int:
    """Write ``records`` to ``path`` (gzip if the name ends in ``.gz``); return the number written.

    Gzip output has mtime 0 and a fixed ``compresslevel``, so the same records give the same bytes
    (for one zlib version). Level 6 (gzip's default) is 4x faster than 9 on DNA for 3% more bytes.
    ``line_width`` <= 0 writes each sequence on one line.
    """
    path = Path(path)
    raw = open(path, "wb")
    out = gzip.GzipFile(filename=path.name.removesuffix(".gz"), mode="wb", fileobj=raw,
                        compresslevel=compresslevel, mtime=0) if path.suffix == ".gz" else raw
    n = 0
    try:
        for rec in records:
            head = rec.description if rec.description.split(maxsplit=1)[:1] == [rec.id] else (
                f"{rec.id} {rec.description}".strip())
            width = line_width if line_width > 0 else max(len(rec.seq), 1)
            lines = [rec.seq[i : i + width] for i in range(0, len(rec.seq), width)]
            out.write((">" + head + "\n" + "".join(s + "\n" for s in lines)).encode("ascii"))
            n += 1
    finally:
        if out is not raw:
            out.close()
        raw.close()
    return n
