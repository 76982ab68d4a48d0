"""The installed (non-editable) package: what a wheel carries, and how it finds its files without a checkout.

CI installs the project with ``pip install -e .``, where every path can quietly fall back to the checkout.
These tests run the real build hooks (``setup.py egg_info build_py``: package-data, setup.py's copy of
``conf/``, MANIFEST.in) on a copy of the sources, without building a wheel, and then import the built
tree from a directory outside any checkout, as ``pip install lightning-lora`` would lay it out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_lora", "lncrna")
# what the build reads: the package trees, the Hydra configs, and the build files (readme is metadata)
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "conf", *PACKAGES)
# variables that point the code at a checkout's files; an installed copy must do without them
CHECKOUT_ENV = ("LIGHTNING_LORA_CONF", "LNCRNA_CONF", "LIGHTNING_LORA_DATA", "LIGHTNING_LORA_RESULTS", "PYTHONPATH")


def _package_files(root: Path) -> set[str]:
    """Every file of the source package trees and conf/, relative to ``root``, caches left out."""
    out = set()
    for top in (*PACKAGES, "conf"):
        for path in (root / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                out.add(path.relative_to(root).as_posix())
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A copy of the sources and the tree ``build_py`` makes of it (what a wheel's purelib holds)."""
    base = tmp_path_factory.mktemp("packaging")
    src, lib, outside = base / "src", base / "lib", base / "outside"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    outside.mkdir()
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "build_py", "--build-lib", str(lib)],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"src": src, "lib": lib, "outside": outside}


def test_every_package_file_and_config_is_built(built: dict[str, Path]) -> None:
    """Weights, examples and every Hydra config (for both CLIs) land in the built package; conf/ as
    lightning_lora/conf/, where lightning_lora.train.config_dir and lncrna.cli.hydra_config_dir look."""
    lib = built["lib"]
    built_files = {p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file()}
    expected = {f"lightning_lora/{f}" if f.startswith("conf/") else f for f in _package_files(built["src"])}
    missing = sorted(expected - built_files)
    assert not missing, f"not in the built package (package-data / setup.py): {missing}"
    for needed in ("lightning_lora/conf/config.yaml", "lightning_lora/conf/lncrna/train.yaml",
                   "lightning_lora/conf/lncrna/pretrain.yaml", "lightning_lora/conf/federated/config.yaml",
                   "lncrna/weights/default/model.safetensors", "lncrna/weights/baseline/baseline.npz",
                   "lncrna/examples/example.fa"):
        assert needed in built_files


def test_sdist_manifest_carries_configs_and_package_data(built: dict[str, Path]) -> None:
    """A wheel built from the sdist needs conf/ in the sdist (MANIFEST.in), else setup.py copies nothing."""
    sources = (built["src"] / "lightning_lora.egg-info" / "SOURCES.txt").read_text().split()
    missing = sorted(_package_files(built["src"]) - set(sources))
    assert not missing, f"not in the sdist manifest (MANIFEST.in / package-data): {missing}"


_PROBE = r"""
import json, sys
import lightning_lora, lncrna
from lightning_lora.train import config_dir
from lightning_lora.tasks.paths import nlp_data_dir, repo_root
from lncrna.cli import hydra_config_dir
from lncrna.predict import DEFAULT_MODEL_DIR, EXAMPLE_FASTA
from lncrna.features import DEFAULT_BASELINE_DIR
from lncrna import data
from lncrna.fasta import FastaError

try:
    data.load_split("train")
    split_error = None
except FastaError as e:
    split_error = str(e)
print(json.dumps({
    "lightning_lora": lightning_lora.__file__, "lncrna": lncrna.__file__, "repo_root": str(repo_root()),
    "config_dir": str(config_dir()), "lncrna_conf": str(hydra_config_dir()),
    "model_dir": str(DEFAULT_MODEL_DIR), "example": str(EXAMPLE_FASTA), "baseline": str(DEFAULT_BASELINE_DIR),
    "nlp_data": str(nlp_data_dir()), "lncrna_out": str(data.DEFAULT_OUT.resolve()),
    "lncrna_out_gene": str(data.DEFAULT_OUT_GENE.resolve()), "lncrna_raw": str(data.DEFAULT_RAW.resolve()),
    "split_error": split_error,
}))
"""


def _env(lib: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CHECKOUT_ENV}
    return {**env, "PYTHONPATH": str(lib), "HF_HUB_OFFLINE": "1"}


def test_installed_layout_finds_shipped_files_and_never_the_site_packages_data(built: dict[str, Path]) -> None:
    """Imported from the built tree in a directory outside the checkout: configs, weights and the example
    come from the package; data defaults are the current directory's data/ (never a data/ folder beside
    the installed packages, where `python -m lncrna.data build` would write into site-packages), and a
    missing lncRNA split says how to get one."""
    lib, outside = built["lib"], built["outside"]
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=outside, env=_env(lib),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    lib_r = lib.resolve()
    for key in ("lightning_lora", "lncrna"):
        assert Path(got[key]).is_relative_to(lib_r), got[key]
    assert got["repo_root"] == "None"
    assert Path(got["config_dir"]) == lib_r / "lightning_lora" / "conf"
    assert Path(got["lncrna_conf"]) == lib_r / "lightning_lora" / "conf" / "lncrna"
    for key in ("model_dir", "example", "baseline"):
        assert Path(got[key]).is_relative_to(lib_r) and Path(got[key]).exists(), got[key]
    out_r = outside.resolve()
    assert Path(got["nlp_data"]) == out_r / "data" / "nlp"
    assert Path(got["lncrna_out"]) == out_r / "data" / "lncrna"
    assert Path(got["lncrna_out_gene"]) == out_r / "data" / "lncrna_gene"
    assert Path(got["lncrna_raw"]) == out_r.parent / "shared" / "data" / "raw"  # ../shared/data/raw, as documented
    assert "no such file" in got["split_error"] and "python -m lncrna.data build" in got["split_error"]
    assert "data.root=" in got["split_error"]


def test_installed_train_without_data_is_one_line_error(built: dict[str, Path]) -> None:
    """lightning-lora train from an installed copy with no data/nlp/: one line naming LIGHTNING_LORA_DATA, exit 2
    (it was a Lightning traceback, exit 1)."""
    lib, outside = built["lib"], built["outside"]
    args = ["train", "experiment=smoke", "model=tiny_bert", "trainer.max_steps=1", "data.max_samples=8",
            "data.max_eval_samples=8", "hydra.run.dir=run"]
    proc = subprocess.run([sys.executable, "-m", "lightning_lora.train", *args], cwd=outside, env=_env(lib),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lightning-lora: error: ") and "LIGHTNING_LORA_DATA" in last, proc.stderr
    assert str(outside.resolve() / "data" / "nlp" / "sst2") in last
