"""Broken model and baseline files: one line naming the file, exit 2, when the model loads (not part-way
through a run, not as an internal error)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lncrna import cli
from lncrna.features import DEFAULT_BASELINE_DIR
from lncrna.model import ModelConfig
from lncrna.predict import DEFAULT_MODEL_DIR, EXAMPLE_FASTA


def run(argv, capsys) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return rc, err


@pytest.mark.parametrize("field,value,expected", [
    ("k", "six", "k must be a positive integer"),
    ("k", 7, "k must be in 1..6"),
    ("pool", "median", "pool must be 'max', 'mean' or 'first'"),
    ("window_tokens", 2, "window_tokens must be at least 3"),
    ("num_heads", 3, "multiple of num_heads"),
    ("dropout", 1.5, "dropout must be a number in [0, 1)"),
    ("max_windows", True, "max_windows must be a positive integer"),
])
def test_bad_model_config_values_fail_at_load(tmp_path, capsys, field, value, expected):
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    cfg = json.loads((model / "lncrna_config.json").read_text())
    cfg[field] = value
    (model / "lncrna_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out.tsv"
    rc, err = run(["predict", EXAMPLE_FASTA, "--model", model, "-o", out], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "lncrna_config.json" in lines[0] and expected in lines[0], err
    assert not out.exists()


def test_model_config_must_be_a_json_object(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    (model / "lncrna_config.json").write_text("[1, 2]")
    rc, err = run(["predict", EXAMPLE_FASTA, "--model", model, "-o", tmp_path / "o.tsv"], capsys)
    assert rc == 2 and "not a lncrna model config" in err and len(err.strip().splitlines()) == 1


def test_the_shipped_config_is_valid():
    ModelConfig(**json.loads((DEFAULT_MODEL_DIR / "lncrna_config.json").read_text()))


def _truncate_npz(d: Path) -> None:
    npz = next(d.glob("*.npz"))
    npz.write_bytes(npz.read_bytes()[:100])


def _json_as_list(d: Path) -> None:
    js = next(d.glob("*.json"))
    js.write_text("[]")


@pytest.mark.parametrize("damage,broken", [(_truncate_npz, "baseline.npz"), (_json_as_list, "baseline.json")],
                         ids=["truncated_npz", "json_list"])
def test_broken_baseline_files_fail_at_load(tmp_path, capsys, damage, broken):
    baseline = tmp_path / "baseline"
    shutil.copytree(DEFAULT_BASELINE_DIR, baseline)
    damage(baseline)
    rc, err = run(["predict", EXAMPLE_FASTA, "--baseline", baseline, "-o", tmp_path / "o.tsv"], capsys)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "unreadable feature baseline" in err
    assert str(baseline / broken) in err  # the broken file is named
