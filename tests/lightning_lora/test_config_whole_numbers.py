"""Integer config fields (ranks, counts, steps, seeds) are whole numbers in every method.

A float (2.5) used to pass the bare ``>=`` checks and then fail late (``torch.zeros``, a slice) or be
truncated silently (``range``); a bool is not a count. Both are refused at config time with a
one-line ValueError naming the field; ints and numpy integers pass and are stored as ``int``."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_lora.core.config import make_config, whole_number

#: options a method needs besides the field under test
EXTRA = {"allora": {"eta": 1.0}}

#: (method, field, an accepted integer value)
FIELDS = [
    ("lora", "r", 2),
    ("allora", "r", 2),
    ("bone", "r", 2),
    ("bat", "r", 2),
    ("dylora", "r", 4),
    ("dylora", "r_min", 2),
    ("dylora", "eval_rank", 2),
    ("dylora", "seed", 3),
    ("ffa_lora", "r", 2),
    ("ffa_lora", "a0_seed", 3),
    ("flexora", "r", 2),
    ("flexora", "search_steps", 3),
    ("flexora", "gate_batches", 3),
    ("flexora", "gate_batch_size", 3),
    ("flexora", "gate_every", 3),
    ("flexora", "gate_power", 2),
    ("flexora", "top_k", 2),
    ("gradnorm_lorp", "r", 2),
    ("gradnorm_lorp", "proj_rank", 2),
    ("gradnorm_lorp", "update_proj_gap", 3),
    ("gradnorm_lorp", "optim_bits", 8),
    ("increlora", "r", 2),
    ("increlora", "target_rank", 4),
    ("increlora", "target_total_rank", 16),
    ("increlora", "budget_lora_r", 2),
    ("increlora", "init_warmup", 3),
    ("increlora", "interval", 3),
    ("increlora", "top_h", 3),
    ("increlora", "incre_rank_num", 2),
    ("increlora", "group_warmup_steps", 3),
    ("increlora", "total_steps", 30),
    ("increlora", "seed", 3),
    ("lq_lora", "r", 2),
    ("lq_lora", "max_iters", 3),
    ("lq_lora", "seed", 3),
    ("nlora", "r", 2),
    ("nlora", "seed", 3),
    ("slora", "r", 2),
    ("inttune", "seed", 3),
    ("smora", "r", 16),
    ("smora", "top_k", 2),
    ("lora_xs", "svd_seed", 3),
    ("lora_sb", "svd_seed", 3),
]
IDS = [f"{m}-{f}" for m, f, _ in FIELDS]


@pytest.mark.parametrize("method,name,good", FIELDS, ids=IDS)
@pytest.mark.parametrize("bad", [2.5, True], ids=["float", "bool"])
def test_non_integer_is_refused_naming_the_field(method, name, good, bad):
    with pytest.raises(ValueError, match=rf"\b{name} must be (None or )?a whole number, got {bad!r}$") as info:
        make_config(method, **EXTRA.get(method, {}), **{name: bad})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method,name,good", FIELDS, ids=IDS)
def test_int_and_numpy_int_are_accepted_as_int(method, name, good):
    for value in (good, np.int64(good)):
        cfg = make_config(method, **EXTRA.get(method, {}), **{name: value})
        assert getattr(cfg, name) == good and type(getattr(cfg, name)) is int


def test_whole_number_helper():
    assert whole_number(np.int32(-3), "seed") == -3  # no lower bound unless asked
    assert whole_number(None, "top_k", 1, optional=True) is None
    with pytest.raises(ValueError, match=r"^top_k must be None or >= 1, got 0$"):
        whole_number(0, "top_k", 1, optional=True)
    with pytest.raises(ValueError, match=r"^n must be a whole number, got None$"):
        whole_number(None, "n")
    with pytest.raises(ValueError, match=r"^n must be a whole number, got '3'$"):
        whole_number("3", "n")
