"""``ll.parameter_counts`` / ``ll.print_trainable_parameters``: PEFT's figures for the same adapter, a
tied weight counted once."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import lightning_lora as ll


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 30, bias=False)
        self.head.weight = self.emb.weight  # tied: one parameter

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(ids)))


@pytest.mark.parametrize("kw", [dict(r=2, target_modules=["body"]), dict(r=4, target_modules=["body", "emb"], use_dora=True)])
def test_counts_equal_peft_and_a_tied_weight_counts_once(kw, capsys):
    base = Tied()
    assert ll.parameter_counts(base) == {"trainable": 30 * 8 + 8 * 8 + 8, "total": 30 * 8 + 8 * 8 + 8,
                                         "trainable_percent": 100.0}
    ours = copy.deepcopy(base)
    ll.inject_adapter(ours, "lora", **kw)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=kw["r"], target_modules=kw["target_modules"],
                                                                  use_dora=kw.get("use_dora", False)))
    trainable, total = pm.get_nb_trainable_parameters()
    counts = ll.parameter_counts(ours)
    assert (counts["trainable"], counts["total"]) == (trainable, total)
    assert counts["trainable_percent"] == pytest.approx(100 * trainable / total)
    ll.print_trainable_parameters(ours)
    assert capsys.readouterr().out == (f"trainable params: {trainable:,} || all params: {total:,} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")


def test_empty_model_has_zero_share():
    assert ll.parameter_counts(nn.ReLU()) == {"trainable": 0, "total": 0, "trainable_percent": 0.0}
