"""benchmarks/clora_mask_diagnosis.py reruns CLoRA's masked fusion step by step with every branch's
attention maps recorded; its trajectory must be the one ``clora_sample`` follows (else its maps and
masks would describe another run), and its mask figures must be shares. The same for the v2 base
(``--base-arch v2``: 8-token prompts, cross-attention at 32×32), whose gate (``--gate``) and real-
composite run (``real``) must work right after the base stage, without LoRAs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import clora_composition as cc
from benchmarks import clora_mask_diagnosis
from lightning_lora import inject_adapter, save_adapter, unload


def tiny_run(ckpt, width: int = 16, arch: str = "v1") -> None:
    """The checkpoint files of a finished clora_composition run, with random weights (no training)."""
    ckpt.mkdir()
    torch.manual_seed(0)
    a = cc.ARCHS[arch]
    unet, text = cc.make_unet(width, arch=a), cc.text_encoder(a)
    unet_file, text_file = cc.base_files(ckpt, a)
    save_file({k: v.half().contiguous() for k, v in unet.state_dict().items()}, str(unet_file))
    save_file({k: v.contiguous() for k, v in text.state_dict().items()}, str(text_file))
    save_file({k: v.contiguous() for k, v in cc.Classifier().state_dict().items()}, str(ckpt / "classifier.safetensors"))
    unet.load_state_dict({k: v.half().float() for k, v in unet.state_dict().items()})  # as the run reloads it
    for stage in ("lora_a", "lora_b"):
        inject_adapter(unet, "lora", r=4, alpha=4.0, target_modules=cc.TARGETS)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)  # B = 0 would make every branch the base model
        save_adapter(unet, ckpt / stage)
        unload(unet)


def test_diagnosis_follows_clora_sample_and_reports_shares(tmp_path):
    tiny_run(tmp_path / "ck")
    argv = ["--ckpt-dir", str(tmp_path / "ck"), "--lora-a", "lora_a", "--lora-b", "lora_b", "--width", "16",
            "--samples", "2", "--steps", "3", "--runs", "base", "clora", "--check", "--out", str(tmp_path / "out")]
    assert clora_mask_diagnosis.main(argv) == 0
    m = json.loads((tmp_path / "out" / "clora_mask_diagnosis.json").read_text())["metrics"]
    assert m["check_max_abs_diff_vs_clora_sample"] <= 1e-4
    for key in ("clora_maskA_area", "clora_maskB_area", "clora_maskbase_area", "clora_maskAB_iou"):
        assert 0.0 <= m[key] <= 1.0, key
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))


def test_v2_diagnosis_follows_clora_sample_at_32(tmp_path):
    """v2 maps at 32×32 (the level v1 lacks): the traced trajectory is still clora_sample's."""
    tiny_run(tmp_path / "ck", arch="v2")
    argv = ["--ckpt-dir", str(tmp_path / "ck"), "--base-arch", "v2", "--lora-a", "lora_a", "--lora-b", "lora_b",
            "--width", "16", "--samples", "2", "--steps", "2", "--attention-res", "32", "--runs", "clora", "--check",
            "--out", str(tmp_path / "out")]
    assert clora_mask_diagnosis.main(argv) == 0
    m = json.loads((tmp_path / "out" / "clora_mask_diagnosis.json").read_text())["metrics"]
    assert m["check_max_abs_diff_vs_clora_sample"] <= 1e-4
    assert m["attention_res"] == 32 and m["base_arch_v2"] == 1


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_gate_and_real_run_need_no_lora(tmp_path, arch):
    """Right after the base stage (no LoRA directories): real composites + the base run's gate.
    A random base cannot localize: the gate must fail (exit 3) and every figure be a share."""
    tiny_run(tmp_path / "ck", arch=arch)
    for stage in ("lora_a", "lora_b"):  # the gate must not need them
        for f in (tmp_path / "ck" / stage).iterdir():
            f.unlink()
        (tmp_path / "ck" / stage).rmdir()
    argv = ["--ckpt-dir", str(tmp_path / "ck"), "--base-arch", arch, "--width", "16", "--samples", "2", "--steps", "2",
            "--runs", "real", "base", "--real-t", "900", "100", "--gate", "--out", str(tmp_path / "out")]
    assert clora_mask_diagnosis.main(argv) == 3
    m = json.loads((tmp_path / "out" / "clora_mask_diagnosis.json").read_text())["metrics"]
    assert m["gate_pass"] == 0
    res = cc.ARCHS[arch].cross_attn_res
    for r in res:
        for key in ("share_own_half_3", "share_own_half_7", "maskA_area", "maskB_area", "maskAB_iou", "left_share_gap"):
            assert 0.0 <= m[f"real_r{r}_{key}"] <= 1.0, (r, key)
            assert 0.0 <= m[f"real_r{r}_t900_{key}"] <= 1.0, (r, key)
    for key in ("gate_cos_3_7", "gate_maskA_area", "gate_maskAB_iou", "gate_readable"):
        assert -1.0 <= m[key] <= 1.0, key
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))


def test_gate_metrics_on_localized_maps():
    """Maps with "3" on the left half and "7" on the right (the 3 drawn left): own-half share 1,
    disjoint half-canvas masks, base branch empty; identical flat maps: share 0.5, masks everywhere."""
    s, b, r, t = 2, 3, 8, 8
    maps = torch.full((s, b, r, r, t), 0.01)
    maps[..., : r // 2, clora_mask_diagnosis.TOK3] = 1.0
    maps[..., r // 2:, clora_mask_diagnosis.TOK7] = 1.0
    side3, ok = torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.bool)
    m: dict = {}
    clora_mask_diagnosis.gate_metrics("g", maps, side3, ok, 0.3, m)
    assert m["g_share_own_half_3"] > 0.98 and m["g_share_own_half_7"] > 0.98
    assert m["g_maskA_area"] == pytest.approx(0.5) and m["g_maskB_area"] == pytest.approx(0.5)
    assert m["g_maskAB_iou"] == 0.0 and m["g_maskbase_area"] == 0.0 and m["g_cos_3_7"] < 0.05
    assert m["g_left_share_gap"] > 0.95
    flat: dict = {}
    clora_mask_diagnosis.gate_metrics("g", torch.rand(s, b, r, r, t) * 0.01 + 1.0, side3, ok, 0.3, flat)
    assert abs(flat["g_share_own_half_3"] - 0.5) < 0.05 and flat["g_maskAB_iou"] == 1.0
