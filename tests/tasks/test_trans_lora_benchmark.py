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


def test_verbalizer_target_is_its_own_sst2_variant_and_reuses_the_lncrna_part(tmp_path, monkeypatch):
    calls, argv = fake_parts(monkeypatch, tmp_path)
    out = tmp_path / "results"
    assert trans_lora.main(argv) == 0
    assert trans_lora.main(argv + ["--target", "verbalizer"]) == 0
    assert [c[0] for c in calls] == ["sst2", "lncrna", "sst2"]  # only SST-2 has a prompt to change
    keys = [json.loads(line)["key"] for line in (tmp_path / "parts.jsonl").read_text().splitlines()]
    assert keys[-1] == "sst2_classdemos_verbalizer/seed0"
    assert json.loads((out / "trans_lora_verbalizer.json").read_text())["metrics"]["verbalizer_target"] == 1.0


def test_verbalizer_head_starts_as_the_lm_heads_answer_rows():
    import torch

    from lightning_lora.tasks import load_tiny_llama

    causal, tok = load_tiny_llama(seed=0)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    clf = trans_lora.llama_classifier(causal, tok, seed=1, verbalizer=True)
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in trans_lora.SST2_WORDS]  # as the LM answers
    score = clf.model.score
    weight = getattr(score, "modules_to_save", None)
    weight = (weight["default"] if weight is not None else score).weight
    assert torch.equal(weight.detach(), causal.get_output_embeddings().weight[ids].float())
    # the classifier's logits are the LM's next-token logits of the two answers after the prompt
    texts = ["a gripping , funny film", "dull and lifeless"]
    enc = clf.encode(texts)
    with torch.no_grad():
        lm = causal(**enc).logits
        last = enc["attention_mask"].sum(1) - 1
        want = lm[torch.arange(len(texts)), last][:, ids]
        got = clf(texts)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-4)


def test_template_encoder_truncates_from_the_left_and_keeps_the_prompts_end():
    from lightning_lora.tasks import load_tiny_llama
    from lightning_lora.transfer import hf_text_encoder

    _, tok = load_tiny_llama(seed=0)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    encode = hf_text_encoder(tok, max_length=12, template="Review: {text}\nSentiment:")
    ids = encode(["word " * 40])["input_ids"][0].tolist()
    assert len(ids) == 12
    text = tok.decode(ids, skip_special_tokens=True).lower().replace(" ", "")
    assert text.endswith("sentiment:") and not text.startswith("review") and tok.truncation_side == "right"
