"""Trans-LoRA pipeline (METHODS.md §11) on tiny models: generators, discriminator filter, distillation, transfer."""

from __future__ import annotations

import copy
import random
import re
import warnings

import pytest
import torch
from torch import nn

from lightning_lora import inject_adapter, trainable_parameters
from lightning_lora.tasks import load_tiny_bert, load_tiny_llama
from lightning_lora.transfer import (
    REAL,
    SYNTHETIC,
    TextClassifier,
    balance_by_teacher_class,
    build_prompt,
    discriminator_dataset,
    distill,
    filter_synthetic,
    fit_text_classifier,
    generate_synthetic,
    generate_synthetic_mlm,
    hf_text_encoder,
    kd_loss,
    predict_logits,
    sample_masked_lm,
    stitch_overlapping_tokens,
    synthesize_and_filter,
    train_discriminator,
    transfer,
)

BERT_TARGETS = ["query", "key", "value", "dense"]
GOOD = "wonderful lovely charming superb delightful brilliant moving great fine warm".split()
BAD = "seven eight nine ten eleven twelve thirteen fourteen fifteen twenty".split()


def sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def tiny_classifier(seed: int, hidden: int = 32, lora_seed: int | None = None) -> TextClassifier:
    """Tiny BERT + LoRA (r=4) with a trainable classifier head, reading strings."""
    model, tok = load_tiny_bert(num_labels=2, hidden_size=hidden, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed if lora_seed is None else lora_seed)
        inject_adapter(model, "lora", r=4, alpha=8, target_modules=BERT_TARGETS, modules_to_save=["classifier"])
    return TextClassifier(model, hf_text_encoder(tok, max_length=32))


class LengthDiscriminator(nn.Module):
    """logits (B, 2) = [0, word count - 4]: p(real) > 0.5 exactly when a text has more than 4 words."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(-4.0), requires_grad=False)

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.zeros_like(words), words + self.offset], dim=1)


def length_discriminator() -> TextClassifier:
    return TextClassifier(LengthDiscriminator(), lambda texts: {"words": torch.tensor([float(len(t.split())) for t in texts])})


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- generators ----------------------------------------------------------------------------
def test_build_prompt_lists_demos_and_leaves_an_open_item():
    assert build_prompt("Movie reviews:", ["a b ", "c"]) == "Movie reviews:\n- a b\n- c\n-"
    assert build_prompt("", ["x"]) == "- x\n-"


def test_generate_synthetic_count_determinism_and_postprocess():
    model, tok = load_tiny_llama(seed=0)
    mode = model.training
    seeds = sentences(GOOD, 5, 0)
    kw = dict(n=6, batch_size=4, max_new_tokens=6, demos_per_prompt=2, instruction=["pos:", "neg:"])
    a = generate_synthetic(model, tok, seeds, seed=3, postprocess=str.upper, **kw)
    b = generate_synthetic(model, tok, seeds, seed=3, postprocess=str.upper, **kw)
    c = generate_synthetic(model, tok, seeds, seed=4, postprocess=str.upper, **kw)
    assert len(a) == 6 and all(s and s == s.upper() and "\n" not in s for s in a)
    assert a == b  # invariant 7: fixed seed, same samples
    assert a != c
    assert tok.padding_side == "right" and model.training == mode  # restored after the call


class PromptSpy:
    """A tokenizer proxy that records the prompts it encodes."""

    def __init__(self, tok) -> None:
        self.__dict__["_tok"], self.__dict__["prompts"] = tok, []

    def __call__(self, texts, **kw):
        self.prompts.extend(texts)
        return self._tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)


def test_generate_synthetic_demo_pools_condition_each_instruction_on_its_own_demos():
    model, tok = load_tiny_llama(seed=0)
    spy = PromptSpy(tok)
    pos, neg = ["good film", "great fun", "a joy"], ["dull mess", "bad acting"]
    generate_synthetic(model, spy, pos + neg, 8, batch_size=4, max_new_tokens=4, demos_per_prompt=2,
                       instruction=["pos:", "neg:"], demo_pools=[pos, neg], seed=0)
    assert spy.prompts
    for prompt in spy.prompts:
        head, *demos = prompt.split("\n")[:-1]
        pool = pos if head == "pos:" else neg
        assert head in ("pos:", "neg:") and len(demos) == 2
        assert all(d.removeprefix("- ") in pool for d in demos), prompt
    spy.prompts.clear()  # an empty pool falls back to every seed
    generate_synthetic(model, spy, pos + neg, 4, batch_size=4, max_new_tokens=4, demos_per_prompt=5,
                       instruction=["pos:", "neg:"], demo_pools=[pos, []], seed=0)
    assert {len(p.split("\n")) - 2 for p in spy.prompts} == {3, 5}
    with pytest.raises(ValueError, match="one pool per instruction"):
        generate_synthetic(model, tok, pos, 2, instruction=["pos:", "neg:"], demo_pools=[pos])


def test_generate_synthetic_rejects_empty_seeds():
    model, tok = load_tiny_llama(seed=0)
    with pytest.raises(ValueError, match="at least one seed"):
        generate_synthetic(model, tok, [], 3)


def test_stitch_overlapping_kmers_round_trips_the_covered_sequence():
    from lncrna.tokenization import KmerTokenizer

    tok = KmerTokenizer(k=6, stride=3)
    seq = "".join(random.Random(0).choice("ACGT") for _ in range(300))  # (300 - 6) % 3 == 0: fully covered
    tokens = [tok.convert_ids_to_tokens(int(i)) for i in tok.encode_ids(seq)]
    assert stitch_overlapping_tokens(tokens, 3) == seq
    assert stitch_overlapping_tokens(["ACGTAC", "TACGGA"], 3) == "ACGTACGGA"
    assert stitch_overlapping_tokens([], 3) == ""


class PositionMLM(nn.Module):
    """A fake masked LM whose logits make token ``10 + position`` certain at every position."""

    def __init__(self, vocab: int = 64) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        B, T = input_ids.shape
        logits = torch.full((B, T, self.vocab), -1e4) + self.dummy
        logits[:, torch.arange(T), 10 + torch.arange(T)] = 0.0
        return type("Out", (), {"logits": logits})()


def test_sample_masked_lm_rewrites_exactly_the_masked_positions_with_their_own_draws():
    mlm = PositionMLM()
    bodies = [torch.full((12,), 5), torch.full((7,), 5)]  # different lengths: padding in the batch
    g = torch.Generator().manual_seed(0)
    out = sample_masked_lm(mlm, bodies, mask_token_id=4, allowed_ids=torch.arange(6, 64), prefix_ids=[2],
                           suffix_ids=[3], mask_fraction=0.5, rounds=1, generator=g)
    for body, new in zip(bodies, out):
        changed = (new != body).nonzero().squeeze(1)
        assert len(changed) == round(0.5 * len(body))
        # position p of the body sits at p + 1 in the model input ([CLS] first): token 10 + p + 1
        assert torch.equal(new[changed], 11 + changed)
    with pytest.raises(ValueError, match="mask_fraction"):
        sample_masked_lm(mlm, bodies, mask_token_id=4, allowed_ids=torch.arange(6, 64), mask_fraction=0.0)


def test_generate_synthetic_mlm_gives_new_valid_sequences_deterministically():
    from transformers import BertConfig, BertForMaskedLM

    from lncrna.tokenization import KmerTokenizer

    tok = KmerTokenizer(k=3, stride=1)
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64))
    rng = random.Random(1)
    seeds = ["".join(rng.choice("ACGT") for _ in range(80)) for _ in range(3)]
    kw = dict(encode=tok.encode_ids, decode=lambda ids: stitch_overlapping_tokens(tok.convert_ids_to_tokens(ids.tolist()), 1),
              mask_token_id=tok.mask_token_id, allowed_ids=torch.arange(6, len(tok)), prefix_ids=[tok.cls_token_id],
              suffix_ids=[tok.sep_token_id], window=30, mask_fraction=0.5, rounds=3, batch_size=4)
    a = generate_synthetic_mlm(mlm, seeds, 7, seed=0, **kw)
    b = generate_synthetic_mlm(mlm, seeds, 7, seed=0, **kw)
    assert a == b and len(a) == 7
    assert all(set(s) <= set("ACGT") and len(s) == 32 for s in a)  # 30 3-mers spell 32 nucleotides
    assert not any(s in seed for s in a for seed in seeds)  # rewritten, not copied windows


# ---- discriminator and filter ---------------------------------------------------------------
def test_discriminator_dataset_is_balanced_and_labelled():
    real, syn = [f"r{i}" for i in range(10)], [f"s{i}" for i in range(4)]
    texts, labels = discriminator_dataset(real, syn, seed=0)
    assert len(texts) == 8 and int((labels == REAL).sum()) == 4 and int((labels == SYNTHETIC).sum()) == 4
    assert all((t.startswith("r")) == (y == REAL) for t, y in zip(texts, labels.tolist()))
    assert discriminator_dataset(real, syn, seed=0)[0] == texts
    with pytest.raises(ValueError, match="real and synthetic"):
        discriminator_dataset(real, [])


def test_filter_synthetic_invariants():
    disc = length_discriminator()
    cands = ["a b c d e", "a b", "a b c d e", "x y z w v u", "one two three four", "p q r s t", "k l m n o p q"]
    res = filter_synthetic(disc, cands, threshold=0.5)
    assert res.candidates == list(dict.fromkeys(cands))  # duplicates scored once
    assert res.kept == ["a b c d e", "x y z w v u", "p q r s t", "k l m n o p q"]
    assert set(res.kept) <= set(cands) and len(set(res.kept)) == len(res.kept)
    scores = dict(zip(res.candidates, res.p_real.tolist()))
    assert all(scores[k] > 0.5 for k in res.kept)
    assert res.passed_share == pytest.approx(4 / 6)
    assert filter_synthetic(disc, cands, 2).kept == ["a b c d e", "x y z w v u"]  # size == n
    assert filter_synthetic(disc, cands, exclude=["a b c d e"]).kept[0] == "x y z w v u"
    # p(real) = sigmoid(words - 4): 6 words 0.881, 7 words 0.953
    assert filter_synthetic(disc, cands, threshold=0.9).kept == ["k l m n o p q"]
    with pytest.raises(ValueError, match="threshold"):
        filter_synthetic(disc, cands, threshold=1.0)


def test_trained_discriminator_keeps_real_like_samples():
    real, syn = sentences(GOOD, 64, 0), sentences(BAD, 64, 1)
    disc = tiny_classifier(seed=0)
    frozen = {k: v.clone() for k, v in disc.model.named_parameters() if not v.requires_grad}
    losses = train_discriminator(disc, real, syn, steps=60, batch_size=16, lr=1e-2, seed=0)
    assert losses[-1] < 0.2 < losses[0]
    real_like, fake_like = sentences(GOOD, 20, 7), sentences(BAD, 20, 8)
    res = filter_synthetic(disc, fake_like + real_like)
    assert len(set(res.kept) & set(real_like)) >= 18 and len(set(res.kept) & set(fake_like)) <= 2
    for k, v in disc.model.named_parameters():  # invariant 1: the discriminator's base did not move
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


# ---- distillation -----------------------------------------------------------------------------
def test_kd_loss_values_and_errors():
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    ref = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t), ref, atol=1e-6)
    T = 2.0
    ref_t = T**2 * (torch.softmax(t / T, -1) * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t, temperature=T), ref_t, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, "nll"), nn.functional.cross_entropy(s, t.argmax(-1)))
    with pytest.raises(ValueError, match="shape"):
        kd_loss(s, torch.randn(5, 2))
    with pytest.raises(ValueError, match="unknown distillation loss"):
        kd_loss(s, t, "mse")


def test_kl_student_equal_to_teacher_gives_zero_loss_and_gradient():
    teacher = tiny_classifier(seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in teacher.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter
    student = copy.deepcopy(teacher)
    texts = sentences(GOOD + BAD, 8, 3)
    t_logits = predict_logits(teacher, texts)
    student.eval()  # no dropout: the same function as the teacher's
    loss = kd_loss(student(texts), t_logits, "kl", temperature=2.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    for p in trainable_parameters(student):
        assert p.grad is not None and p.grad.abs().max() < 1e-6


@pytest.fixture(scope="module")
def sentiment_teacher() -> TextClassifier:
    """A source model: tiny BERT + LoRA trained to tell GOOD-word from BAD-word sentences."""
    teacher = tiny_classifier(seed=0)
    pos, neg = sentences(GOOD, 64, 0), sentences(BAD, 64, 1)
    fit_text_classifier(teacher, pos + neg, torch.tensor([1] * 64 + [0] * 64), nn.functional.cross_entropy,
                        steps=40, batch_size=16, lr=1e-2, seed=0)
    for p in teacher.parameters():
        p.grad = None  # what its own training left behind; the tests check that transfer adds none
    return teacher


def test_distill_drives_student_towards_teacher_and_trains_only_its_adapter(sentiment_teacher):
    teacher = sentiment_teacher
    student = tiny_classifier(seed=1, hidden=48)  # a different base, of a different size
    teacher_before, student_before = state_copy(teacher), state_copy(student)
    train_texts, held_out = sentences(GOOD + BAD, 256, 10), sentences(GOOD + BAD, 64, 11)
    t_train, t_held = predict_logits(teacher, train_texts), predict_logits(teacher, held_out)
    kl_before = float(kd_loss(predict_logits(student, held_out), t_held))
    losses = distill(student, train_texts, t_train, steps=60, batch_size=32, lr=1e-2, seed=0)
    kl_after = float(kd_loss(predict_logits(student, held_out), t_held))
    assert len(losses) == 60 and kl_after < 0.4 * kl_before
    agree = (predict_logits(student, held_out).argmax(-1) == t_held.argmax(-1)).float().mean()
    majority = max(float(t_held.argmax(-1).float().mean()), 1 - float(t_held.argmax(-1).float().mean()))
    assert agree >= 0.85 > majority  # the student learnt the teacher's function, not a constant
    for k, v in teacher.state_dict().items():  # the teacher is never updated ...
        assert torch.equal(v, teacher_before[k]), k
    assert all(p.grad is None for p in teacher.parameters())  # ... nor sees a gradient
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".classifier." in n for n in trainable)
    for k, v in student.state_dict().items():  # only the student's adapter and head moved
        moved = not torch.equal(v, student_before[k])
        if moved:
            assert "lora_" in k or ".classifier." in k, k
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items() if "lora_B" in k)


def test_distill_is_deterministic():
    teacher = tiny_classifier(seed=0)
    texts = sentences(GOOD + BAD, 32, 4)
    t = predict_logits(teacher, texts)
    runs = []
    for _ in range(2):
        student = tiny_classifier(seed=1, lora_seed=5)
        losses = distill(student, texts, t, steps=5, batch_size=8, lr=1e-2, seed=3)
        runs.append((losses, predict_logits(student, texts)))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_distill_needs_trainable_student_and_matching_lengths():
    model, tok = load_tiny_bert(num_labels=2, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = TextClassifier(model, hf_text_encoder(tok))
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        distill(frozen, ["a b"], torch.zeros(1, 2), steps=1)
    with pytest.raises(ValueError, match="1 texts and 2 targets"):
        distill(tiny_classifier(seed=0), ["a b"], torch.zeros(2, 2), steps=1)


# ---- the pipeline -----------------------------------------------------------------------------
class SentinelData:
    """The full training set at transfer time: reading past the seeds, or iterating, raises."""

    def __init__(self, texts: list[str], allowed: int) -> None:
        self.texts, self.allowed = texts, allowed

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        if not isinstance(i, int) or i >= self.allowed:
            raise AssertionError(f"transfer read item {i!r} beyond D_seed")
        return self.texts[i]

    def __iter__(self):
        raise AssertionError("transfer iterated the training set")


def word_generator(seen: list):
    """generate(seeds, n, round): n unique candidates; the odd ones are one word (the length filter drops them)."""

    def generate(seeds: list[str], n: int, r: int) -> list[str]:
        seen.append((list(seeds), n, r))
        return [f"short{r}x{i}" if i % 2 else f"{seeds[i % len(seeds)]} extra{r}x{i} w w w w" for i in range(n)]

    return generate


def test_transfer_reads_only_the_seeds_and_filters():
    data = SentinelData(sentences(GOOD, 50, 0), allowed=5)
    calls: list = []
    teacher, student = tiny_classifier(seed=0), tiny_classifier(seed=1)
    teacher_before = state_copy(teacher)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = transfer(teacher, student, data, generate=word_generator(calls), discriminator=length_discriminator(),
                       n_samples=12, round_size=8, steps=3, batch_size=4)
    assert not [w for w in caught if "requested synthetic samples" in str(w.message)]  # reached n_samples
    assert res.seeds == data.texts[:5]
    assert all(c[0] == data.texts[:5] for c in calls) and [c[2] for c in calls] == [0, 1, 2]
    assert len(res.texts) == 12 and len(set(res.texts)) == 12
    assert all(len(t.split()) > 4 for t in res.texts)
    assert res.n_generated == 24 and res.kept_share == pytest.approx(0.5)
    assert res.teacher_logits.shape == (12, 2) and len(res.losses) == 3
    assert torch.equal(res.teacher_logits, predict_logits(teacher, res.texts))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])


def test_transfer_ablations():
    seeds = sentences(GOOD, 5, 0)
    teacher = tiny_classifier(seed=0)

    class Refuse(nn.Module):
        def forward(self, **_):
            raise AssertionError("the discriminator must not be used with filter=False")

    unused = TextClassifier(Refuse(), lambda t: {})
    res = transfer(teacher, tiny_classifier(seed=1), seeds, generate=word_generator([]), discriminator=unused,
                   filter=False, n_samples=6, steps=2, batch_size=4)
    assert len(res.texts) == 6 and res.kept_share == 1.0  # unfiltered: every unique candidate kept
    res = transfer(teacher, tiny_classifier(seed=1), seeds, generate=None, steps=2, batch_size=4)
    assert res.texts == seeds and res.n_generated == 0  # seed-only
    with pytest.raises(ValueError, match="needs a discriminator"):
        transfer(teacher, tiny_classifier(seed=1), seeds, generate=word_generator([]), n_samples=4, steps=1)


def test_balance_by_teacher_class_keeps_the_first_of_each_class_in_order():
    texts = [f"t{i}" for i in range(7)]
    # teacher classes: 1 1 0 1 1 0 1 -> two of class 0, so the first two of class 1 stay
    logits = torch.tensor([[0.0, 1.0], [0.0, 2.0], [3.0, 0.0], [0.0, 1.0], [0.0, 1.5], [1.0, 0.0], [0.0, 1.0]])
    kept, kept_logits = balance_by_teacher_class(texts, logits)
    assert kept == ["t0", "t1", "t2", "t5"]
    assert torch.equal(kept_logits, logits[[0, 1, 2, 5]])
    one_class = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    with pytest.warns(UserWarning, match="labels all 2 inputs as class 1"):
        assert balance_by_teacher_class(["a", "b"], one_class) == (["a", "b"], one_class)


class IndexTeacher(nn.Module):
    """Class 0 for the generator's candidates whose index is a multiple of 6, class 1 otherwise: among
    the kept (even-index) candidates one third are class 0, a skewed set like SST-2's."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, zero: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.stack([zero, 1 - zero], -1)


def index_teacher() -> TextClassifier:
    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        idx = [int(re.search(r"x(\d+)", t).group(1)) for t in texts]
        return {"zero": torch.tensor([float(i % 6 == 0) for i in idx])}

    return TextClassifier(IndexTeacher(), encode)


def test_transfer_balance_distils_on_equal_classes():
    """``balance=True`` distils on as many inputs of each teacher class (the first of each, drawn from
    what the filter kept); without it the skewed set goes through whole."""
    seeds = sentences(GOOD, 5, 0)
    kw = dict(generate=word_generator([]), discriminator=length_discriminator(), n_samples=12, round_size=24,
              steps=1, batch_size=4)
    plain = transfer(index_teacher(), tiny_classifier(seed=1), seeds, **kw)
    assert plain.teacher_logits.argmax(-1).bincount(minlength=2).tolist() == [4, 8]
    res = transfer(index_teacher(), tiny_classifier(seed=1), seeds, balance=True, **kw)
    assert res.teacher_logits.argmax(-1).bincount(minlength=2).tolist() == [4, 4]
    assert res.texts == [t for t in plain.texts if t in set(res.texts)]  # a subset, in order
    assert res.texts == [t for i, t in enumerate(plain.texts) if i in (0, 1, 2, 3, 4, 5, 6, 9)]
    assert torch.equal(res.teacher_logits, predict_logits(index_teacher(), res.texts))
    # kept_share is the filter's (the "share the discriminator kept"), not the balanced set's
    assert res.n_kept == len(plain.texts) == 12 and res.kept_share == plain.kept_share == 12 / plain.n_generated


def test_synthesize_and_filter_warns_when_short():
    disc = length_discriminator()
    with pytest.warns(UserWarning, match="kept 2 of the 10"):
        kept, n_gen, n_scored, rounds = synthesize_and_filter(word_generator([]), ["s"], 10, disc, round_size=2,
                                                              max_rounds=2)
    assert len(kept) == 2 and n_gen == 4 and n_scored == 4 and rounds == 2


def test_load_smollm2_folder_must_exist(tmp_path):
    from lightning_lora.tasks.models import load_smollm2

    with pytest.raises(FileNotFoundError, match="export_smollm2"):
        load_smollm2(path=tmp_path)


@pytest.mark.slow
def test_export_smollm2_round_trip(tmp_path):
    from lightning_lora.tasks.models import export_smollm2, load_smollm2

    reference, tok = load_smollm2()
    folder = export_smollm2(tmp_path / "smollm2", dtype="float32")
    model, tok2 = load_smollm2(path=folder)
    x = tok(["a charming and often affecting journey ."], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**x).logits, reference(**x).logits)
    assert tok2.pad_token is not None


def test_verbalizer_head_gives_the_causal_lms_answer_logits():
    """A sequence-classification head started from the LM head's answer rows reproduces the causal
    LM's next-token logits of those answers at the last token, before any training."""
    import torch
    from transformers import LlamaForSequenceClassification

    from lightning_lora.tasks import load_tiny_llama
    from lightning_lora.transfer import init_verbalizer_head, verbalizer_weights

    causal, tok = load_tiny_llama(seed=0)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    words = (" no", " yes")
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in words]
    torch.testing.assert_close(verbalizer_weights(causal, tok, words), causal.lm_head.weight[ids].float())
    config = causal.config
    config.num_labels, config.pad_token_id = 2, tok.pad_token_id
    clf = LlamaForSequenceClassification(config).float()
    clf.model.load_state_dict(causal.model.state_dict())
    init_verbalizer_head(clf.score, causal, tok, words)
    # (the tiny LLaMA's tokenizer is BERT's: no token_type_ids, which transformers<4.54's
    # LlamaForSequenceClassification.forward, without **kwargs, refuses)
    enc = tok(["is it good", "a much longer question here"], padding=True, return_tensors="pt",
              return_token_type_ids=False)
    with torch.no_grad():
        lm = causal(**enc).logits
        last = enc["attention_mask"].sum(1) - 1
        want = lm[torch.arange(2), last][:, ids]
        got = clf(**enc).logits
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-4)


def test_verbalizer_rejects_words_that_cannot_separate_the_classes():
    import pytest
    from torch import nn

    from lightning_lora.tasks import load_tiny_llama
    from lightning_lora.transfer import init_verbalizer_head, verbalizer_weights

    causal, tok = load_tiny_llama(seed=0)
    with pytest.raises(ValueError, match="share their first token"):
        verbalizer_weights(causal, tok, (" yes", " yes"))
    with pytest.raises(ValueError, match="encodes to no token"):
        verbalizer_weights(causal, tok, ("", " yes"))
    with pytest.raises(ValueError, match="does not match 2 verbalizer words"):
        init_verbalizer_head(nn.Linear(causal.config.hidden_size, 3), causal, tok, (" no", " yes"))

    class SplitsSpace:  # as SentencePiece tokenizers may encode " positive": "▁" + "positive"
        def encode(self, word, add_special_tokens=False):
            return [7, 8] if word.startswith(" ") else [8]

        def decode(self, ids):
            return " " if ids == [7] else "word"

    with pytest.raises(ValueError, match="bare-space token"):
        verbalizer_weights(causal, SplitsSpace(), (" no", " yes"))


def test_text_classifier_drops_segment_ids_only_for_a_model_without_them():
    """A BERT tokenizer emits ``token_type_ids``; a model whose forward neither names them nor takes
    ``**kwargs`` (transformers 4.x's LlamaForSequenceClassification) must not receive them, while a
    model that takes them, by name or through ``**kwargs``, still does."""
    from lightning_lora.transfer.classifier import TextClassifier

    seen: list[set[str]] = []

    class NoSegments(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, input_ids, attention_mask=None):
            seen.append({"input_ids", "attention_mask"} if attention_mask is not None else {"input_ids"})
            return input_ids.float().sum(-1, keepdim=True) * self.w

    class Segments(NoSegments):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            seen.append({k for k, v in dict(input_ids=input_ids, attention_mask=attention_mask,
                                             token_type_ids=token_type_ids).items() if v is not None})
            return input_ids.float().sum(-1, keepdim=True) * self.w

    class Kwargs(NoSegments):
        def forward(self, input_ids, **kwargs):
            seen.append({"input_ids", *kwargs})
            return input_ids.float().sum(-1, keepdim=True) * self.w

    def encode(texts):
        n = len(texts)
        return {"input_ids": torch.ones(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3, dtype=torch.long),
                "token_type_ids": torch.zeros(n, 3, dtype=torch.long)}

    for model, want in ((NoSegments(), {"input_ids", "attention_mask"}),
                        (Segments(), {"input_ids", "attention_mask", "token_type_ids"}),
                        (Kwargs(), {"input_ids", "attention_mask", "token_type_ids"})):
        out = TextClassifier(model, encode)(["a", "b"])
        assert out.shape == (2, 1) and seen[-1] == want
