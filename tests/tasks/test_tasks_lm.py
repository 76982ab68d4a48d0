"""Causal-LM data (Tiny Shakespeare, WikiText-2) and the CausalLM / SequenceClassifier modules."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_lora import AdapterCallback
from lightning_lora.tasks import (
    CausalLM,
    SequenceClassifier,
    TinyShakespeareDataModule,
    WikiText2DataModule,
    linear_warmup_decay,
    make_blocks,
    tokenize_corpus,
)


def test_make_blocks_drops_the_partial_block():
    blocks = make_blocks(torch.arange(10), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="shorter than one block"):
        make_blocks(torch.arange(3), 4)


def test_tokenize_corpus_chunks_by_lines(char_tokenizer):
    text = "ab\ncd\n" * 5 + "e"
    assert tokenize_corpus(text, char_tokenizer, lines_per_chunk=3).tolist() == char_tokenizer(text)["input_ids"]


def test_shakespeare_split_is_first_90_last_10(data_dir, char_tokenizer):
    dm = TinyShakespeareDataModule(char_tokenizer, data_dir=data_dir, block_size=100, batch_size=4)
    dm.setup()
    # 1,115,394 characters: 1,003,854 train / 111,540 validation, one token per character
    assert dm.blocks["train"].shape == (10038, 100)
    assert dm.blocks["validation"].shape == (1115, 100)
    text = (data_dir / "tiny_shakespeare" / "input.txt").read_text()
    assert dm.blocks["train"][0].tolist() == [ord(c) % 1000 for c in text[:100]]
    assert dm.blocks["validation"][0].tolist() == [ord(c) % 1000 for c in text[1003854:1003954]]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 100) and torch.equal(batch["input_ids"], batch["labels"])


def test_shakespeare_slices(data_dir, char_tokenizer):
    dm = TinyShakespeareDataModule(char_tokenizer, data_dir=data_dir, block_size=64, max_samples=10, max_eval_samples=3)
    dm.setup()
    assert len(dm.blocks["train"]) == 10 and len(dm.blocks["validation"]) == 3


def test_wikitext2_is_eval_only(data_dir, char_tokenizer):
    dm = WikiText2DataModule(char_tokenizer, data_dir=data_dir, block_size=1000, max_eval_samples=2)
    assert len(list(dm.val_dataloader())) == 1 and len(list(dm.test_dataloader())) == 1
    with pytest.raises(ValueError, match="train.txt is not in this repository"):
        dm.train_dataloader()


def test_linear_warmup_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_warmup_decay(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def _trainer(steps, callbacks=()):
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=2, callbacks=list(callbacks))


def test_causal_lm_trains_only_the_adapter_and_lowers_loss(data_dir, char_tokenizer):
    dm = TinyShakespeareDataModule(char_tokenizer, data_dir=data_dir, block_size=32, batch_size=8,
                                   max_samples=64, max_eval_samples=16)
    module = CausalLM(_tiny_llama(), lr=1e-2, warmup_steps=0)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    (val0,) = _trainer(1).validate(module, datamodule=dm, verbose=False)
    cb = AdapterCallback("lora", target="model", r=4, target_modules=["q_proj", "v_proj"])
    trainer = _trainer(30, [cb])
    trainer.fit(module, datamodule=dm)
    (val1,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert val1["val_loss"] < val0["val_loss"]
    assert val1["val_ppl"] == pytest.approx(math.exp(val1["val_loss"]), rel=1e-4)
    for name, p in module.model.named_parameters():
        if "lora_" not in name:  # the frozen base is untouched
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name


def test_sequence_classifier_metrics_and_train_mode():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    model.eval()  # what from_pretrained returns
    module = SequenceClassifier(model, num_labels=2, metrics=("accuracy", "f1", "mcc"))
    assert all(m.training for m in module.model.modules())  # dropout on during training
    assert set(module.val_metrics.keys()) == {"val_accuracy", "val_f1", "val_mcc"}
    with pytest.raises(ValueError, match="unknown metric"):
        SequenceClassifier(model, metrics=("bleu",))


def _tiny_bert_classifier(**kwargs):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    return SequenceClassifier(model, num_labels=2, **kwargs)


def _fit_steps(module, steps, tmp_path, method="lora", callbacks=(), **method_kwargs):
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 50, (16, 6), generator=g), torch.randint(0, 2, (16,), generator=g)
    data = DataLoader(list(range(16)), batch_size=4,
                      collate_fn=lambda i: {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]),
                                            "labels": labels[i]})
    kwargs = {"modules_to_save": ["classifier", "pooler"], **method_kwargs}
    cb = AdapterCallback(method, r=2, target="model", target_modules=["query", "value"], **kwargs)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[cb, *callbacks])
    trainer.fit(module, data)
    return trainer


class _GroupRates(pl.Callback):
    """Each optimizer group's lr before every step."""

    def __init__(self) -> None:
        self.rates: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_head_lr_puts_the_head_in_its_own_group_under_the_same_schedule(tmp_path):
    module = _tiny_bert_classifier(lr=1e-2, head_lr=1e-3, warmup_ratio=0.5)
    rates = _GroupRates()
    trainer = _fit_steps(module, 6, tmp_path, callbacks=[rates])
    adapter_group, head_group = trainer.optimizers[0].param_groups
    assert (adapter_group["initial_lr"], head_group["initial_lr"]) == (1e-2, 1e-3)
    names = {id(p): n for n, p in module.named_parameters()}
    assert all("lora_" in names[id(p)] for p in adapter_group["params"])
    head_names = [names[id(p)] for p in head_group["params"]]
    assert all(".pooler." in n or ".classifier." in n for n in head_names)
    assert any(".pooler." in n for n in head_names) and any(".classifier." in n for n in head_names)
    # one schedule for both: warm-up over 3 steps, then decay; the head always at a tenth of the adapter
    adapter_rates = [a for a, _ in rates.rates]
    assert max(adapter_rates) == pytest.approx(1e-2) and len(set(adapter_rates)) > 2
    for a, h in rates.rates:
        assert h == pytest.approx(a / 10)
    # the default is unchanged: one group at lr
    module = _tiny_bert_classifier(lr=1e-2)
    assert len(_fit_steps(module, 1, tmp_path).optimizers[0].param_groups) == 1


def test_head_lr_keeps_trained_biases_with_the_adapter_and_needs_a_head(tmp_path):
    module = _tiny_bert_classifier(lr=1e-2, head_lr=1e-3)
    adapter_group, head_group = _fit_steps(module, 1, tmp_path, bias="all").optimizers[0].param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    biases = [names[id(p)] for p in adapter_group["params"] if names[id(p)].endswith("bias")]
    assert any(".key." in n for n in biases) and any("LayerNorm" in n for n in biases)  # not adapted, not head
    assert all(".pooler." in names[id(p)] or ".classifier." in names[id(p)] for p in head_group["params"])
    with pytest.raises(ValueError, match="no trainable modules_to_save"):
        _fit_steps(_tiny_bert_classifier(lr=1e-2, head_lr=1e-3), 1, tmp_path, modules_to_save=[])


def test_head_lr_is_refused_with_a_methods_own_optimizer(tmp_path):
    module = _tiny_bert_classifier(lr=1e-2, head_lr=1e-3)
    with pytest.raises(ValueError, match="brings its own optimizer"):
        _fit_steps(module, 1, tmp_path, method="gradnorm_lorp", proj_rank=2, update_proj_gap=2)
