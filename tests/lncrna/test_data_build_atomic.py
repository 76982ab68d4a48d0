"""`lncrna.data build` is all-or-nothing: a build that fails or is interrupted after some outputs were
written leaves the earlier outputs (the splits and PROVENANCE.md) exactly as they were and no temporary
file; a successful one replaces all of them with the bytes the direct ``write_fasta`` path gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from lncrna import data
from lncrna.data import SPLITS
from lncrna.fasta import write_fasta

# the synthetic raw folder of test_data.py (the test directory is on sys.path)
from test_data import synthetic  # noqa: F401

OLD_PROVENANCE = "# Data provenance\n\n## NLP\n\nearlier text\n"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (folders map to None), hidden ones too, with the files' bytes."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def earlier_outputs(root: Path) -> Path:
    """``root/lncrna`` holding outputs of an earlier build (distinct bytes per file) and
    ``root/PROVENANCE.md`` beside it; returns the folder."""
    out = root / "lncrna"
    out.mkdir(parents=True)
    for name in SPLITS:
        (out / f"{name}.fa.gz").write_bytes(f"earlier {name}\n".encode())
    (root / "PROVENANCE.md").write_text(OLD_PROVENANCE)
    return out


def fail_on_second_split(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """``write_fasta`` as build() calls it writes the first split, then raises ``error``."""
    calls = 0

    def failing(records, path, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise error
        return write_fasta(records, path, **kwargs)

    monkeypatch.setattr(data, "write_fasta", failing)


@pytest.mark.parametrize("failure", ["disk full", "ctrl-c", "provenance"])
def test_failed_build_leaves_earlier_outputs_untouched(synthetic: dict, tmp_path: Path,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    out = earlier_outputs(tmp_path / "data")
    before = snapshot(tmp_path)
    error: type[BaseException]
    if failure == "disk full":
        error = OSError
        fail_on_second_split(monkeypatch, OSError(28, "No space left on device"))
    elif failure == "ctrl-c":
        error = KeyboardInterrupt
        fail_on_second_split(monkeypatch, KeyboardInterrupt())
    else:  # every split written, then PROVENANCE.md cannot be made
        error = RuntimeError

        def broken(*args, **kwargs):
            raise RuntimeError("provenance failed")

        monkeypatch.setattr(data, "_provenance_text", broken)
    with pytest.raises(error):
        data.build(synthetic["raw"], out)
    assert snapshot(tmp_path) == before  # byte for byte, and no temporary file or folder left


def test_failed_build_into_a_new_folder_leaves_no_folder(synthetic: dict, tmp_path: Path,  # noqa: F811
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fail_on_second_split(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        data.build(synthetic["raw"], tmp_path / "lncrna", tmp_path / "PROVENANCE.md")
    assert snapshot(tmp_path) == {}


def test_failed_build_command_is_one_line_and_writes_nothing(synthetic: dict, tmp_path: Path,  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = earlier_outputs(tmp_path / "data")
    before = snapshot(tmp_path)
    fail_on_second_split(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(SystemExit) as exit_info:
        data.main(["build", "--raw", str(synthetic["raw"]), "--out", str(out)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["python -m lncrna.data build: error: [Errno 28] No space left on device"]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("holdout", data.HOLDOUTS)
def test_successful_build_replaces_every_earlier_output_with_the_direct_bytes(
        synthetic: dict, tmp_path: Path, holdout: str) -> None:  # noqa: F811
    out = earlier_outputs(tmp_path / "data")
    counts = data.build(synthetic["raw"], out, holdout=holdout)
    assert snapshot(tmp_path / "data").keys() == {"PROVENANCE.md", "lncrna", *(f"lncrna/{n}.fa.gz" for n in SPLITS)}

    # the unstaged path: write_fasta straight to the final names, then PROVENANCE.md from those files
    ref = earlier_outputs(tmp_path / "ref")
    splits, report = data.make_splits(synthetic["raw"], holdout)
    for name, entries in splits.items():
        write_fasta((e.record(with_gene=holdout == "gene") for e in entries), ref / f"{name}.fa.gz")
    provenance = ref.parent / "PROVENANCE.md"
    data._write_section(provenance, data._provenance_text(synthetic["raw"], ref, provenance, splits, report), holdout)

    assert counts == {name: len(entries) for name, entries in splits.items()}
    for name in SPLITS:
        built = (out / f"{name}.fa.gz").read_bytes()
        assert built == (ref / f"{name}.fa.gz").read_bytes(), name
        fname = f"{name}.fa\0".encode()
        assert built[10:10 + len(fname)] == fname  # gzip FNAME: the final name, not a temporary one
    text = (out.parent / "PROVENANCE.md").read_text()
    assert text == provenance.read_text()
    assert text.startswith(OLD_PROVENANCE)  # the section is added to the earlier file, as before
