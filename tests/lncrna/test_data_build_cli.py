"""README's `python -m lncrna.data build` and `... build --mouse-holdout gene`, run as written (a
subprocess of the module) on test_data.py's synthetic raw folders, pointed at tmp_path with --raw
and --out: the same files as :func:`lncrna.data.build` with the same arguments; bad options are one
line on stderr, exit status 2, and write nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lncrna import data
from lncrna.data import SPLITS

# the raw folders and build() outputs of test_data.py (the test directory is on sys.path)
from test_data import synthetic, synthetic_genes  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def data_cli(cwd: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lncrna.data", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def assert_same_build(built: Path, expected: Path, counts: dict[str, int], stdout: str) -> None:
    """``built`` (the command's --out) holds the bytes of ``expected`` (build()'s out), both folders'
    PROVENANCE.md beside them are equal, and the command printed build()'s counts."""
    assert sorted(p.name for p in built.iterdir()) == sorted(f"{name}.fa.gz" for name in SPLITS)
    for name in SPLITS:
        assert (built / f"{name}.fa.gz").read_bytes() == (expected / f"{name}.fa.gz").read_bytes(), name
    assert (built.parent / "PROVENANCE.md").read_text() == (expected.parent / "PROVENANCE.md").read_text()
    assert stdout.splitlines() == [f"{name}\t{n}" for name, n in counts.items()]


def test_build_command_writes_what_build_writes(synthetic: dict, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "lncrna"  # the name of synthetic's out: PROVENANCE.md names the folder
    p = data_cli(tmp_path, "build", "--raw", synthetic["raw"], "--out", out)
    assert p.returncode == 0, p.stderr
    assert_same_build(out, synthetic["out"], synthetic["counts"], p.stdout)
    assert "gene=" not in (tmp_path / "PROVENANCE.md").read_text()


def test_build_gene_holdout_command_writes_what_build_writes(synthetic_genes: dict,  # noqa: F811
                                                            tmp_path: Path) -> None:
    out = tmp_path / "lncrna_gene"
    p = data_cli(tmp_path, "build", "--raw", synthetic_genes["raw"], "--out", out, "--mouse-holdout", "gene")
    assert p.returncode == 0, p.stderr
    assert_same_build(out, synthetic_genes["out"], synthetic_genes["counts"], p.stdout)
    assert "--mouse-holdout gene: begin" in (tmp_path / "PROVENANCE.md").read_text()


@pytest.mark.parametrize("holdout, folder", [("transcript", "lncrna"), ("gene", "lncrna_gene")])
def test_build_without_out_writes_the_readmes_folder(synthetic_genes: dict, tmp_path: Path,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                     holdout: str, folder: str) -> None:
    # README: `build` writes data/lncrna/, `build --mouse-holdout gene` data/lncrna_gene/; the defaults
    # are redirected into tmp_path (in process) so that the checkout's data/ is not rewritten
    assert (data.DEFAULT_OUT, data.DEFAULT_OUT_GENE) == (REPO / "data" / "lncrna", REPO / "data" / "lncrna_gene")
    counts = data.build(synthetic_genes["raw"], tmp_path / "ref" / folder, holdout=holdout)
    monkeypatch.setattr(data, "DEFAULT_OUT", tmp_path / "data" / "lncrna")
    monkeypatch.setattr(data, "DEFAULT_OUT_GENE", tmp_path / "data" / "lncrna_gene")
    argv = ["build", "--raw", str(synthetic_genes["raw"])] + (["--mouse-holdout", "gene"] if holdout == "gene" else [])
    capsys.readouterr()
    assert data.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["PROVENANCE.md", folder]
    assert_same_build(tmp_path / "data" / folder, tmp_path / "ref" / folder, counts, capsys.readouterr().out)


@pytest.mark.parametrize("case", ["unknown holdout", "missing raw folder", "raw file missing", "out is a file"])
def test_bad_build_options_are_one_line_errors_and_write_nothing(synthetic: dict, tmp_path: Path,  # noqa: F811
                                                                 case: str) -> None:
    raw, out = synthetic["raw"], tmp_path / "built" / "lncrna"
    expected = {
        "unknown holdout": "argument --mouse-holdout: invalid choice: 'exon'",
        "missing raw folder": f"{tmp_path / 'nope' / 'cpat' / 'Human_test_coding_mRNA.fa.gz'}: no such file",
        "raw file missing": "mouse_lnc_test.fa.gz: no such file",
        "out is a file": "File exists",
    }[case]
    args: list[str | Path] = ["build", "--raw", raw, "--out", out]
    if case == "unknown holdout":
        args += ["--mouse-holdout", "exon"]
    elif case == "missing raw folder":
        args[2] = tmp_path / "nope"
    elif case == "raw file missing":  # a copy of the raw folder without one of the seven files
        partial = tmp_path / "raw"
        for rel in data.RAW_FILES:
            if not rel.endswith("mouse_lnc_test.fa.gz"):
                (partial / rel).parent.mkdir(parents=True, exist_ok=True)
                (partial / rel).write_bytes((raw / rel).read_bytes())
        args[2] = partial
    else:
        out.parent.mkdir()
        out.write_text("not a folder\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    p = data_cli(tmp_path, *args)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    # argparse's own refusal comes after its usage lines; every error is one line, prefixed as argparse's
    error = [line for line in lines if "error:" in line]
    assert len(error) == 1 and error == lines[-1:], p.stderr
    assert error[0].startswith("python -m lncrna.data build: error: ") and expected in error[0], error[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no folder, no PROVENANCE.md
