"""CausalLM's val_loss / val_ppl under AdapterCallback(eval_ranks=...): each DyLoRA rank's validation
pass logs its own ``val_loss_rank<b>`` / ``val_ppl_rank<b>``, and the plain names are the deployed
rank's. The per-token NLL used to be a running sum on the module, updated by every rank's pass and
logged at epoch end: one mean over all the ranks, and no per-rank value at all."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

import lightning_lora as ll
from lightning_lora.methods.dylora import rank_context
from lightning_lora.tasks import CausalLM

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
]

VOCAB = 32


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def _blocks(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """6 rows of 8 tokens; labels right-padded to unequal lengths, row 3 with nothing to predict."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (6, 8), generator=g)
    labels = x.clone()
    for i in range(6):
        labels[i, 8 - i:] = -100
    labels[3] = -100
    return x, labels


def _loader(x: torch.Tensor, labels: torch.Tensor, batch_size: int = 2) -> DataLoader:
    return DataLoader(list(range(len(x))), batch_size=batch_size,
                      collate_fn=lambda i: {"input_ids": x[i], "labels": labels[i]})


def _old_formula(module: CausalLM, loader: DataLoader) -> tuple[float, float]:
    """(val_loss, val_ppl) as CausalLM computed them before the metrics: a float64 sum of each batch's
    mean loss times its predicted tokens (batches without one skipped) over the token count, cast to
    float32, and exp of that float32."""
    total, count = 0.0, 0
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for batch in loader:
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                total += float(module(batch)) * n
                count += n
    module.train(was_training)
    value = (torch.tensor(total, dtype=torch.float64) / max(count, 1)).float()
    return float(value), float(torch.exp(value))


def _trainer(callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=list(callbacks), **kwargs)


def test_eval_ranks_log_each_rank_s_own_causal_lm_loss_inside_fit_and_in_validate_and_test():
    module = CausalLM(_tiny_llama(), lr=1e-3, warmup_steps=0)
    # by hand first, then moved away from B = 0 so that the ranks give different losses; the callback
    # adopts the injected adapter (same config)
    ll.inject_adapter(module.model, "dylora", r=4, target_modules=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ll.trainable_parameters(module.model):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    cb = ll.AdapterCallback("dylora", target="model", r=4, target_modules=["q_proj", "v_proj"], eval_ranks=[1, 4])
    x, labels = _blocks(0)
    val = _loader(x, labels)
    trainer = _trainer([cb], max_steps=2, limit_train_batches=2, num_sanity_val_steps=0)

    def by_rank() -> dict[int, tuple[float, float]]:
        out = {}
        for b in (1, 4):
            with rank_context(module.model, b):
                out[b] = _old_formula(module, val)
        return out

    def check(res: dict[str, float]) -> None:
        expected = by_rank()
        assert abs(expected[1][0] - expected[4][0]) > 1e-3  # the ranks do differ
        for b in (1, 4):
            assert res[f"val_loss_rank{b}"] == pytest.approx(expected[b][0], rel=1e-6), (b, res)
            assert res[f"val_ppl_rank{b}"] == pytest.approx(expected[b][1], rel=1e-6), (b, res)
        # the plain names: the deployed rank's pass alone (r = 4), not a mean over the ranks' passes
        assert res["val_loss"] == pytest.approx(expected[4][0], rel=1e-6), res
        assert res["val_ppl"] == pytest.approx(expected[4][1], rel=1e-6), res

    # validate (inference_mode) before fit: the metric states it resets must stay usable by fit's
    # no_grad validation, and the reverse afterwards
    (res,) = trainer.validate(module, val, verbose=False)
    check(res)
    train = _loader(*_blocks(1), batch_size=3)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    assert trainer.global_step == 2
    check({k: float(v) for k, v in trainer.callback_metrics.items()})  # the validation at the end of fit
    (res,) = trainer.validate(module, val, verbose=False)
    check(res)
    (res,) = trainer.test(module, val, verbose=False)  # test runs the deployed rank only (no variants)
    expected = by_rank()
    assert res == {"test_loss": pytest.approx(expected[4][0], rel=1e-6),
                   "test_ppl": pytest.approx(expected[4][1], rel=1e-6)}


def test_without_eval_ranks_causal_lm_logs_the_old_float64_token_mean_exactly():
    module = CausalLM(_tiny_llama())
    x, labels = _blocks(2)
    for batch_size in (1, 4):  # batch size 1: a batch with no predicted token (row 3)
        val = _loader(x, labels, batch_size)
        loss, ppl = _old_formula(module, val)
        trainer = _trainer()
        (res,) = trainer.validate(module, val, verbose=False)
        assert res == {"val_loss": loss, "val_ppl": ppl}, batch_size
        (res,) = trainer.test(module, val, verbose=False)
        assert res == {"test_loss": loss, "test_ppl": ppl}, batch_size
        assert math.isfinite(loss)
