"""benchmarks/clora_composition.py --base-continue-from: a finished base stage is continued to more
steps (a warm restart: fresh optimizer, the fp16 weights of the finished stage), recorded apart from
an uninterrupted base of as many steps, and reloaded by a rerun with the same flags; the gate on 8×8
maps reads it and names the base it judged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import clora_composition as cc
from benchmarks import clora_mask_diagnosis


def test_base_continues_from_a_finished_stage(tmp_path, capsys):
    ck = tmp_path / "ck"
    common = ["--device", "cpu", "--width", "16", "--batch-size", "2", "--clf-steps", "1", "--ckpt-dir", str(ck),
              "--stop-after", "base", "--base-arch", "v2"]
    # nothing to continue yet: a clear error, no silent training from scratch
    with pytest.raises(SystemExit, match="no finished v2 base stage of 2 steps"):
        cc.main([*common, "--base-steps", "4", "--base-continue-from", "2"])
    assert cc.main([*common, "--base-steps", "2"]) == 0
    before = load_file(str(ck / "v2_base_unet_fp16.safetensors"))
    capsys.readouterr()
    assert cc.main([*common, "--base-steps", "4", "--base-continue-from", "2"]) == 0
    assert "continuing the 2-step base" in capsys.readouterr().out
    rec = json.loads((ck / "stages.json").read_text())["v2_base"]
    assert rec["shape"]["base_steps"] == 4 and rec["shape"]["base_continue_from"] == 2
    assert rec["shape"]["base_continue_lr"] == 3e-4 and rec["continued"]["shape"]["base_steps"] == 2
    assert rec["seconds"] >= rec["continued"]["seconds"]
    after = load_file(str(ck / "v2_base_unet_fp16.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained on
    # the gate on 8×8 maps (session 10's plan) reads it and says which base it judged
    argv = ["--ckpt-dir", str(ck), "--base-arch", "v2", "--width", "16", "--samples", "2", "--steps", "2",
            "--runs", "real", "base", "--real-t", "900", "--attention-res", "8", "--gate", "--out", str(tmp_path / "g")]
    assert clora_mask_diagnosis.main(argv) == 3  # a 4-step base cannot pass
    m = json.loads((tmp_path / "g" / "clora_mask_diagnosis.json").read_text())["metrics"]
    assert m["attention_res"] == 8 and m["base_steps"] == 4 and m["base_continue_from"] == 2 and m["ddim_steps"] == 2
    assert 0.0 <= m["gate_maskA_area"] <= 1.0 and 0.0 <= m["real_r8_share_own_half_3"] <= 1.0
    # the same flags reload it; a chain continues the continued base
    assert cc.main([*common, "--base-steps", "4", "--base-continue-from", "2"]) == 0
    assert "base model (v2): from" in capsys.readouterr().out
    assert cc.main([*common, "--base-steps", "6", "--base-continue-from", "4"]) == 0
    rec = json.loads((ck / "stages.json").read_text())["v2_base"]
    assert rec["shape"]["base_steps"] == 6 and rec["continued"]["continued"]["shape"]["base_steps"] == 2
    # an uninterrupted base of as many steps is another stage: not taken from the warm-restarted record
    capsys.readouterr()
    assert cc.main([*common, "--base-steps", "6"]) == 0
    assert "base model (v2): from" not in capsys.readouterr().out
    assert "base_continue_from" not in json.loads((ck / "stages.json").read_text())["v2_base"]["shape"]


def test_continue_needs_fewer_steps_than_the_target():
    with pytest.raises(SystemExit):
        cc.parse_args(["--base-steps", "6000", "--base-continue-from", "6000"])
