"""benchmarks/clora_mask_diagnosis.py reruns CLoRA's masked fusion step by step with every branch's
attention maps recorded; its trajectory must be the one ``clora_sample`` follows (else its maps and
masks would describe another run), and its mask figures must be shares."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import save_file

from benchmarks import clora_composition as cc
from benchmarks import clora_mask_diagnosis
from lightning_lora import inject_adapter, save_adapter, unload


def tiny_run(ckpt, width: int = 16) -> None:
    """The checkpoint files of a finished clora_composition run, with random weights (no training)."""
    ckpt.mkdir()
    torch.manual_seed(0)
    unet, text = cc.make_unet(width), cc.TinyTextEncoder()
    save_file({k: v.half().contiguous() for k, v in unet.state_dict().items()}, str(ckpt / "base_unet_fp16.safetensors"))
    save_file({k: v.contiguous() for k, v in text.state_dict().items()}, str(ckpt / "text_encoder.safetensors"))
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
