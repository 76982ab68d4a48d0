"""lightning_lora.results: the result JSON schema."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_lora.results import (
    current_command,
    flat_metrics,
    make_result,
    read_results,
    result_kind,
    validate_result,
    write_result,
)


def test_write_result_schema(tmp_path):
    path = write_result("sst2_x", {"val_accuracy": torch.tensor(0.875), "steps": 10, "nested": {"a": 1.5}},
                        command="lightning-lora train experiment=smoke", directory=tmp_path)
    assert path == tmp_path / "sst2_x.json"
    record = json.loads(path.read_text())
    assert list(record) == ["name", "command", "device", "date", "kind", "metrics"]
    assert record["name"] == "sst2_x" and record["command"] == "lightning-lora train experiment=smoke"
    assert record["metrics"] == {"val_accuracy": 0.875, "steps": 10, "nested.a": 1.5}
    assert isinstance(record["metrics"]["steps"], int)
    assert record["device"].startswith(("cpu: ", "cuda: ")) and record["date"].endswith("+00:00")
    assert validate_result(record) == [] and read_results(tmp_path) == [record]
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_results_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_LORA_RESULTS", str(tmp_path / "r"))
    assert write_result("a", {"x": 1}, command="c") == tmp_path / "r" / "a.json"


@pytest.mark.parametrize("bad", ["a b", "../x", "", "x/y"])
def test_bad_names(bad, tmp_path):
    with pytest.raises(ValueError, match="result name"):
        write_result(bad, {"x": 1}, command="c", directory=tmp_path)


def test_metrics_must_be_finite_numbers():
    with pytest.raises(TypeError, match="metric 'model' must be a number"):
        flat_metrics({"model": "minilm"})
    with pytest.raises(ValueError, match="finite"):
        flat_metrics({"loss": math.nan})
    assert flat_metrics({"ok": True}) == {"ok": 1}


def test_kind():
    assert make_result("a", {"x": 1}, command="c", kind="benchmark")["kind"] == "benchmark"
    with pytest.raises(ValueError, match="kind"):
        make_result("a", {"x": 1}, command="c", kind="speed")
    # without "kind": quality metrics make a result, anything else a benchmark; bf16 is not f1
    assert result_kind({"metrics": {"cpat_mcc": 0.9, "wall_s": 3}}) == "results"
    assert result_kind({"metrics": {"ours_bf16_ms": 1.0, "peak_gib": 2.0}}) == "benchmark"
    assert result_kind({"kind": "benchmark", "metrics": {"val_accuracy": 0.9}}) == "benchmark"


def test_validate_and_read_reject_bad_files(tmp_path):
    assert "missing key 'command'" in validate_result({"name": "a", "device": "d", "date": "x", "metrics": {}})
    assert validate_result({"name": "a", "command": "c", "device": "d", "date": "x", "metrics": {"m": "1"}}) == [
        "metric 'm' is not a number"]
    (tmp_path / "bad.json").write_text('{"name": "bad"}')
    with pytest.raises(ValueError, match="bad.json: missing key"):
        read_results(tmp_path)


def test_current_command(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/usr/bin/lightning-lora", "train", "adapter.r=16", "a b"])
    assert current_command() == "lightning-lora train adapter.r=16 'a b'"
    monkeypatch.setattr("sys.argv", ["benchmarks/x.py", "--steps", "5"])
    assert current_command() == "python benchmarks/x.py --steps 5"
