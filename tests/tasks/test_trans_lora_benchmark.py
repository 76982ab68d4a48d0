"""benchmarks/trans_lora.py keeps each finished part, so a rerun runs only the missing one and the
result file is written once both parts exist; each variant (prompt demos, round cap) keeps its own."""

from __future__ import annotations

import json

from benchmarks import trans_lora


def fake_parts(monkeypatch, tmp_path) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Replace both parts by bookkeeping only (the real parts train models); returns the calls made,
    as (part, demos, max_rounds), and the argv that points the raw file and results into tmp_path."""
    calls: list[tuple[str, str, int]] = []

    def fake(part):
        def run(args, device, metrics):
            calls.append((part, args.demos, args.scale["max_rounds"]))
            metrics[f"{part}_accuracy"] = 0.5 + len(calls) / 10
        return run

    monkeypatch.setattr(trans_lora, "run_sst2", fake("sst2"))
    monkeypatch.setattr(trans_lora, "run_lncrna", fake("lncrna"))
    return calls, ["--raw", str(tmp_path / "parts.jsonl"), "--out", str(tmp_path / "results")]


def test_parts_are_kept_and_reused(tmp_path, monkeypatch):
    calls, argv = fake_parts(monkeypatch, tmp_path)
    out = tmp_path / "results"
    assert trans_lora.main(argv + ["--parts", "sst2"]) == 0
    assert [c[0] for c in calls] == ["sst2"] and not (out / "trans_lora.json").exists()  # one part: no result yet
    assert trans_lora.main(argv) == 0
    assert [c[0] for c in calls] == ["sst2", "lncrna"]  # sst2 came from the raw file
    result = json.loads((out / "trans_lora.json").read_text())
    assert result["metrics"]["sst2_accuracy"] == 0.6 and result["metrics"]["lncrna_accuracy"] == 0.7
    assert len((tmp_path / "parts.jsonl").read_text().splitlines()) == 2


def test_demo_variants_keep_their_own_sst2_part_and_share_the_lncrna_part(tmp_path, monkeypatch):
    calls, argv = fake_parts(monkeypatch, tmp_path)
    out = tmp_path / "results"
    assert trans_lora.main(argv + ["--demos", "any"]) == 0
    assert trans_lora.main(argv) == 0  # default: class demos; the lncRNA part has no prompts, it is reused
    assert [c[:2] for c in calls] == [("sst2", "any"), ("lncrna", "any"), ("sst2", "class")]
    keys = [json.loads(line)["key"] for line in (tmp_path / "parts.jsonl").read_text().splitlines()]
    assert keys == ["sst2/seed0", "lncrna/seed0", "sst2_classdemos/seed0"]
    anydemos = json.loads((out / "trans_lora_anydemos.json").read_text())["metrics"]
    classdemos = json.loads((out / "trans_lora.json").read_text())["metrics"]
    assert anydemos["sst2_accuracy"] == 0.6 and classdemos["sst2_accuracy"] == 0.8
    assert anydemos["lncrna_accuracy"] == classdemos["lncrna_accuracy"] == 0.7
    assert classdemos["class_demos"] == 1.0 and anydemos["class_demos"] == 0.0


def test_a_round_cap_is_its_own_variant(tmp_path, monkeypatch):
    calls, argv = fake_parts(monkeypatch, tmp_path)
    out = tmp_path / "results"
    assert trans_lora.main(argv) == 0
    assert trans_lora.main(argv + ["--max-rounds", "10"]) == 0  # not served by the default run's parts
    assert [(c[0], c[2]) for c in calls] == [("sst2", 6), ("lncrna", 6), ("sst2", 10), ("lncrna", 10)]
    assert (out / "trans_lora.json").exists() and (out / "trans_lora_rounds10.json").exists()
    assert trans_lora.FULL["max_rounds"] == 6  # the override did not leak into the module's defaults
