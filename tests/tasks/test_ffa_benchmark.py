"""benchmarks/ffa_federated.py resumes: a rerun with the same settings reads finished federations
from its raw file instead of training them again; a changed setting does not reuse them."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")
pytest.importorskip("opacus")

from benchmarks import ffa_federated  # noqa: E402


def test_a_rerun_reads_finished_federations_from_the_raw_file(tmp_path, capsys):
    raw = tmp_path / "ffa.jsonl"
    argv = ["--smoke", "--tasks", "sst2", "--workers", "1", "--raw", str(raw)]
    assert ffa_federated.main(argv) == 0
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    assert len(rows) == 4  # FFA-LoRA and LoRA, without and with DP, one seed
    first = capsys.readouterr().out
    assert ffa_federated.main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("from " + str(raw)) == 4 and len(raw.read_text().splitlines()) == 4
    summary = lambda out: json.loads(out[out.index("{"):out.rindex("}") + 1])  # noqa: E731
    assert summary(second)["sst2"]["bytes_ratio_ffa_vs_lora"] == summary(first)["sst2"]["bytes_ratio_ffa_vs_lora"]
    key = ffa_federated.run_key(ffa_federated.parse_args(["--lr-ffa", "4"]), "sst2", "ffa_lora", 0, False)
    assert key not in {r["key"] for r in rows}  # another lr, another key


def test_default_keys_do_not_reuse_the_session5_rows():
    # session 5 ran C = 2 for DP, LoRA lr 0.5 on lncRNA (NaN) and reported one random client's sigma;
    # the per-task defaults (C at the median per-example norm, LoRA lncRNA lr 0.2) get new keys
    args = ffa_federated.parse_args([])
    old = ffa_federated.parse_args(["--clip", "2", "--lr-lora", "0.5"])
    for task in ("sst2", "lncrna"):
        for method in ("ffa_lora", "lora"):
            new_dp = ffa_federated.run_key(args, task, method, 0, True)
            assert new_dp != ffa_federated.run_key(old, task, method, 0, True).replace("_sigma2", "")
            assert f"clip{ffa_federated.TASK_CLIP[task]:g}_sigma2" in new_dp
    assert "/lr0.2/" in ffa_federated.run_key(args, "lncrna", "lora", 0, False)
    assert ffa_federated.run_key(args, "sst2", "lora", 0, False) == ffa_federated.run_key(old, "sst2", "lora", 0, False)
