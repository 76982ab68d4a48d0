"""benchmarks/make_docs.py: docs/results.md and docs/benchmarks.md generated from result files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lightning_lora.results import write_result

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", REPO / "benchmarks" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def results(tmp_path):
    d = tmp_path / "results"
    write_result("sst2_run", {"val_accuracy": 0.8876, "peft_val_accuracy": 0.8853, "steps": 1000, "seconds": 812.25},
                 command="python benchmarks/sst2_minilm_lora.py --steps 1000", directory=d)
    write_result("speed", {"ours_ms": 45.3, "peak_gib": 5.25, "rel_err": 1.2e-7}, command="python b.py",
                 kind="benchmark", directory=d)
    return d


def test_generates_both_documents(make_docs, results, tmp_path):
    docs = tmp_path / "docs"
    assert make_docs.main(["--results-dir", str(results), "--docs-dir", str(docs)]) == 0
    res = (docs / "results.md").read_text()
    bench = (docs / "benchmarks.md").read_text()
    assert res.startswith("# Results") and "## sst2_run" in res and "## speed" not in res
    assert "```\npython benchmarks/sst2_minilm_lora.py --steps 1000\n```" in res
    assert "| val_accuracy | 0.8876 |" in res and "| steps | 1000 |" in res and "| seconds | 812.2 |" in res
    assert "## speed" in bench and "| rel_err | 1.2e-07 |" in bench and "| peak_gib | 5.2500 |" in bench
    # up to date now; a new result makes --check fail until regenerated
    assert make_docs.main(["--results-dir", str(results), "--docs-dir", str(docs), "--check"]) == 0
    write_result("cola_run", {"val_mcc": 0.4}, command="c", directory=results)
    assert make_docs.main(["--results-dir", str(results), "--docs-dir", str(docs), "--check"]) == 1
    make_docs.main(["--results-dir", str(results), "--docs-dir", str(docs)])
    text = (docs / "results.md").read_text()
    assert text.index("## cola_run") < text.index("## sst2_run")  # sorted by name


def test_keeps_text_outside_the_markers(make_docs, results, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n\nHand-written peer table.\n")
    make_docs.main(["--results-dir", str(results), "--docs-dir", str(docs)])
    text = (docs / "benchmarks.md").read_text()
    assert text.startswith("# Benchmarks\n\nHand-written peer table.\n\n" + make_docs.BEGIN)
    (docs / "benchmarks.md").write_text(text + "\n## Footer by hand\n")
    make_docs.main(["--results-dir", str(results), "--docs-dir", str(docs)])
    again = (docs / "benchmarks.md").read_text()
    assert again.count(make_docs.BEGIN) == 1 and again.endswith("## Footer by hand\n")
    assert "Hand-written peer table." in again


def test_empty_results(make_docs, tmp_path):
    (tmp_path / "r").mkdir()
    make_docs.main(["--results-dir", str(tmp_path / "r"), "--docs-dir", str(tmp_path / "d")])
    assert "_No result files yet._" in (tmp_path / "d" / "results.md").read_text()


def test_a_kept_earlier_run_gets_its_own_section_and_source(make_docs, results, tmp_path):
    """An earlier session's file kept beside the current one holds a record of the same name: each
    section must name its own file, or the docs would point both tables at one source."""
    kept = results / "sst2_run_session9.json"
    kept.write_text((results / "sst2_run.json").read_text().replace("0.8876", "0.8500"))
    docs = tmp_path / "docs"
    make_docs.main(["--results-dir", str(results), "--docs-dir", str(docs)])
    text = (docs / "results.md").read_text()
    assert "## sst2_run\n" in text and "## sst2_run_session9 (record `sst2_run`)" in text
    current, earlier = text.split("## sst2_run_session9")
    assert "Source: `benchmarks/results/sst2_run.json`" in current and "| val_accuracy | 0.8876 |" in current
    assert "Source: `benchmarks/results/sst2_run_session9.json`" in earlier and "| val_accuracy | 0.8500 |" in earlier
