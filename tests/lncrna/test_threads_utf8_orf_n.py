"""``predict``/``evaluate --threads N``; FASTA input that is not UTF-8 is a one-line error
naming file and record; ORFs run through N codons as in CPAT."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest
import torch

from lncrna.fasta import FastaError, read_fasta
from lncrna.features import FeatureExtractor, longest_orf
from lncrna.predict import EXAMPLE_FASTA, Predictor
from test_cli import run, seq  # the test directory is on sys.path


def fasta_bytes(records: list[tuple[bytes, str]]) -> bytes:
    return b"".join(b">" + head + b"\n" + s.encode() + b"\n" for head, s in records)


@pytest.fixture
def torch_threads():
    """Restore torch's thread count after a test that lets the CLI change it (a process-wide setting)."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


# ---- --threads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_threads_caps_torch_threads_while_the_model_runs(command, tmp_path, model_dir, capsys, monkeypatch,
                                                         torch_threads):
    wanted = 1 if torch_threads != 1 else 2  # differs from the current setting, so the option must act
    seen: list[int] = []
    original = Predictor._transformer_proba

    def recording(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "_transformer_proba", recording)
    out = ["-o", tmp_path / "out.tsv"] if command == "predict" else ["-o", tmp_path / "ev"]
    rc, _, err = run([command, EXAMPLE_FASTA, "--model", model_dir, "--no-cascade", "--threads", wanted, *out, "-q"],
                     capsys)
    assert rc == 0, err
    assert seen and set(seen) == {wanted}


def test_without_threads_torch_keeps_its_setting(tmp_path, model_dir, capsys, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    rc, _, err = run(["predict", EXAMPLE_FASTA, "--model", model_dir, "-o", tmp_path / "out.tsv", "-q"], capsys)
    assert rc == 0, err
    assert calls == []


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "two", ""])
def test_bad_threads_is_a_one_line_option_error(value, tmp_path, model_dir, capsys):
    out = tmp_path / "out.tsv"
    rc, stdout, err = run(["predict", EXAMPLE_FASTA, "--model", model_dir, "-o", out, "--threads", value], capsys)
    assert rc == 2 and stdout == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert errors == [f"lncrna predict: error: argument --threads: expected a positive integer, got {value!r}"]
    assert not out.exists()


def test_threads_torch_cannot_take_is_a_one_line_error(tmp_path, model_dir, capsys, torch_threads):
    out = tmp_path / "out.tsv"
    rc, _, err = run(["predict", EXAMPLE_FASTA, "--model", model_dir, "-o", out, "--threads", 2**31], capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert err.splitlines()[0].startswith(f"lncrna predict: error: --threads {2**31}: ")
    assert torch.get_num_threads() == torch_threads
    assert not out.exists() and not out.with_name("out.tsv.partial").exists()


# ---- FASTA that is not UTF-8 --------------------------------------------------------------------
GOOD = [(f"tx{i}".encode(), seq(300 + 37 * i, i)) for i in range(4)]
NOT_UTF8 = {
    # name: (records, expected parts of the error line)
    "latin1_header": ([*GOOD[:2], (b"caf\xe9 tissue=liver", seq(400, 9)), *GOOD[2:]],
                      ["record 3 'caf\\xe9'", "header (line 5)", "byte 0xe9 at column 5"]),
    "latin1_description": ([*GOOD[:2], (b"tx9 caf\xe9", seq(400, 9)), *GOOD[2:]],
                           ["record 3 'tx9'", "header (line 5)", "byte 0xe9 at column 9"]),
    "bad_byte_in_sequence": ([*GOOD[:2], (b"tx9", seq(40, 9) + "\udcff" + seq(40, 10)), *GOOD[2:]],
                             ["record 3 'tx9'", "sequence line (line 6)", "byte 0xff at column 41"]),
    "first_header": ([(b"\xff\xfetx0", seq(400, 9)), *GOOD],
                     ["record 1 '\\xff\\xfetx0'", "header (line 1)", "byte 0xff at column 2"]),
}


def _write(path: Path, records: list[tuple[bytes, str]]) -> None:
    data = b"".join(b">" + head + b"\n" + s.encode("utf-8", "surrogateescape") + b"\n" for head, s in records)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize("suffix", [".fa", ".fa.gz"])
@pytest.mark.parametrize("case", sorted(NOT_UTF8))
def test_fasta_not_utf8_is_one_line_error_and_no_output(case, suffix, tmp_path, model_dir, capsys):
    records, parts = NOT_UTF8[case]
    fa = tmp_path / f"in{suffix}"
    _write(fa, records)
    out = tmp_path / "out.tsv"
    # --chunk-size 1: the records before the bad one are predicted and written first
    rc, stdout, err = run(["predict", fa, "--model", model_dir, "-o", out, "--chunk-size", "1", "-q"], capsys)
    assert rc == 2, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"lncrna predict: error: {fa}: "), err
    assert "is not UTF-8 text" in errors[0] and all(p in errors[0] for p in parts), errors[0]
    assert "Traceback" not in err and "\ufffd" not in err and stdout == ""
    assert not out.exists() and not out.with_name("out.tsv.partial").exists()


@pytest.mark.parametrize("suffix", [".fa", ".fa.gz"])
def test_read_fasta_refuses_bytes_that_are_not_utf8(suffix, tmp_path):
    fa = tmp_path / f"in{suffix}"
    _write(fa, NOT_UTF8["latin1_header"][0])
    with pytest.raises(FastaError, match=r"record 3 'caf\\xe9': header \(line 5\) is not UTF-8 text"):
        list(read_fasta(fa))


def test_utf8_headers_still_read_unchanged(tmp_path):
    fa = tmp_path / "in.fa"
    fa.write_bytes(b"\xef\xbb\xbf" + fasta_bytes([(b"tx0 caf\xc3\xa9 \xce\xbc", "ACGT"), (b"d\xc3\xa9j\xc3\xa0", "ACGT")]))
    recs = list(read_fasta(fa))
    assert [(r.id, r.description) for r in recs] == [("tx0", "tx0 café μ"), ("déjà", "déjà")]


# ---- ORFs through N: as CPAT --------------------------------------------------------------------
def cpat_longest_orf(seq: str) -> tuple[int, int]:
    """(length, start) of the longest ORF as CPAT 3.0.5 ``find_orfs.ORFFinder.run_one`` finds it
    (liguowang/cpat lib/cpmodule/find_orfs.py): codons are compared with ``c in ['ATG']`` and
    ``c in ['TAG','TAA','TGA']``, so a codon holding N is an ordinary coding codon. Ties: first frame,
    then upstream (its stable sort by length)."""
    best = (0, 0)
    for frame in range(3):
        codons = [(seq[i : i + 3], i) for i in range(frame, len(seq) - 2, 3)]
        k = 0
        while k < len(codons):
            c, start = codons[k]
            k += 1
            if c != "ATG":
                continue
            end = codons[-1][1] + 3  # no stop: to the last complete codon
            while k < len(codons):
                c, index = codons[k]
                k += 1
                if c in ("TAG", "TAA", "TGA"):
                    end = index + 3
                    break
            if end - start > best[0]:
                best = (end - start, start)
    return best


def test_orf_runs_through_codons_with_n_as_cpat_does():
    s = "CC" + "ATG" + "NNN" + "TNA" + "TAN" + "NGA" + "GCC" + "TAA" + "GG"
    o = longest_orf(s)
    assert (o.start, o.end, o.complete) == (2, 23, True)
    assert cpat_longest_orf(s) == (21, 2)
    assert longest_orf("ANG" + "AAA" * 5 + "TAA").length == 0  # N never makes a start codon either
    fx = FeatureExtractor(None, kmax=1)
    assert fx.one(s)[fx.feature_names.index("orf_len")] == 21


def test_orf_matches_cpat_on_random_sequences_with_n():
    rng = random.Random(22)
    for _ in range(300):
        alphabet = rng.choice(["ACGTN", "ACGTNNNN", "ACGT" * 4 + "N"])
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        length, start = cpat_longest_orf(s)
        o = longest_orf(s)
        assert o.length == length, s
        if length:
            assert o.start == start, s
