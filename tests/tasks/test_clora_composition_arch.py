"""benchmarks/clora_composition.py --base-arch: v2's data ties the prompt's word order to the sides
and pads the prompt; v1's data is drawn as before; the two archs' stages never share a checkpoint."""

from __future__ import annotations

import json

import torch

from benchmarks import clora_composition as cc


def test_v2_pairs_put_the_first_digit_left_and_pad_the_prompt():
    torch.manual_seed(0)
    comp, _ = cc.composers("cpu")
    n = 64
    pair = torch.ones(n, dtype=torch.bool)
    xs, _ = comp.layout(n, pair, tied=True)
    assert bool((xs[:, 0] + cc.GLYPH <= cc.CANVAS // 2).all()) and bool((xs[:, 1] >= cc.CANVAS // 2).all())
    img, tok = cc.base_batch(comp, n, cc.ARCHS["v2"])
    assert img.shape == (n, 3, cc.CANVAS, cc.CANVAS) and tok.shape == (n, 8)
    assert bool((tok[:, 0] == cc.BOS).all()) and bool((tok[:, 4:] == cc.NULL).all())
    pairs = tok[:, 2] == cc.AND
    assert bool(pairs.any())
    assert bool((img[pairs][..., : cc.CANVAS // 2].amax(dim=(1, 2, 3)) > -1).all())  # ink in both halves
    assert bool((img[pairs][..., cc.CANVAS // 2:].amax(dim=(1, 2, 3)) > -1).all())
    assert cc.null_tokens("cpu", 8).tolist() == [[cc.BOS] + [cc.NULL] * 7]


def test_v1_data_is_drawn_as_before():
    """tied=False is the recorded runs' layout, and tied=True draws the same random numbers."""
    comp, _ = cc.composers("cpu")
    pair = torch.ones(32, dtype=torch.bool)
    torch.manual_seed(1)
    cc.base_batch(comp, 32)  # v1 default
    after_v1 = torch.get_rng_state()
    torch.manual_seed(1)
    cc.base_batch(comp, 32, cc.ARCHS["v2"])
    assert torch.equal(after_v1, torch.get_rng_state())
    torch.manual_seed(2)
    xs, _ = comp.layout(32, pair)
    assert bool((xs[:, 0] < cc.CANVAS // 2).any()) and bool((xs[:, 0] >= cc.CANVAS // 2).any())  # random sides
    assert cc.prompt_tokens(torch.tensor([3]), torch.tensor([7])).tolist() == [[cc.BOS, 4, cc.AND, 8]]


def test_stage_cache_is_keyed_by_arch(tmp_path, capsys):
    """v1 and v2 base stages live side by side in one --ckpt-dir; a v1 run never takes a record of v2."""
    ck = tmp_path / "ck"
    common = ["--device", "cpu", "--width", "16", "--batch-size", "2", "--base-steps", "2", "--clf-steps", "1",
              "--ckpt-dir", str(ck), "--stop-after", "base"]
    assert cc.main([*common, "--base-arch", "v2"]) == 0
    stages = json.loads((ck / "stages.json").read_text())
    assert stages["v2_base"]["shape"]["base_arch"] == "v2" and "base" not in stages
    assert (ck / "v2_base_unet_fp16.safetensors").is_file() and not (ck / "base_unet_fp16.safetensors").exists()
    # a record named "base" whose shape says v2 (as a careless merge could leave): v1 must retrain
    stages["base"] = stages["v2_base"]
    (ck / "stages.json").write_text(json.dumps(stages))
    capsys.readouterr()
    assert cc.main([*common, "--base-arch", "v1"]) == 0
    out = capsys.readouterr().out
    assert "base model (v1): from" not in out and "classifier: from" in out  # classifier shared
    stages = json.loads((ck / "stages.json").read_text())
    assert "base_arch" not in stages["base"]["shape"] and stages["v2_base"]["shape"]["base_arch"] == "v2"
    # both reload into their own architecture
    assert cc.main([*common, "--base-arch", "v2"]) == 0
    assert cc.main([*common, "--base-arch", "v1"]) == 0
    out = capsys.readouterr().out
    assert "base model (v2): from" in out and "base model (v1): from" in out


def test_v2_text_encoder_sum_is_order_invariant():
    """v2's encoder does not mix tokens: the sum over a prompt's tokens (what uniform attention hands
    every pixel) is the same for "3 and 7" and "7 and 3", so only attending to a token tells its side;
    v1's (a transformer layer) tells the order apart, and keeps its recorded state-dict keys."""
    torch.manual_seed(0)
    v2 = cc.text_encoder(cc.ARCHS["v2"])
    p37 = cc.prompt_tokens(torch.tensor([3]), torch.tensor([7]), 8)
    p73 = cc.prompt_tokens(torch.tensor([7]), torch.tensor([3]), 8)
    with torch.no_grad():
        e37, e73 = v2(p37), v2(p73)
    assert e37.shape == (1, 8, 64)
    assert torch.allclose(e37.sum(1), e73.sum(1), atol=1e-5) and not torch.allclose(e37, e73)
    v1 = cc.text_encoder()
    assert set(v1.state_dict()) == set(cc.TinyTextEncoder().state_dict()) and "layer.linear1.weight" in v1.state_dict()
    with torch.no_grad():
        v1.pos.normal_()  # as trained (it starts at 0, where the layer cannot tell positions apart)
        s37 = v1(cc.prompt_tokens(torch.tensor([3]), torch.tensor([7]))).sum(1)
        s73 = v1(cc.prompt_tokens(torch.tensor([7]), torch.tensor([3]))).sum(1)
    assert not torch.allclose(s37, s73, atol=1e-3)
