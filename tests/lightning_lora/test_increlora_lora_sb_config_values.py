"""Config values that used to slip through.

IncreLoRA's ``incre_rank_num=0`` (ranks per round from target_rank) is derived like a defaulted field:
``make_config(method, cfg, target_rank=...)`` re-derives it instead of keeping the old target_rank's
value, while a value the user set is kept. LoRA-SB's ``n_init_batches``, ``total_steps``,
``svd_niter`` and LoRA-XS's ``svd_niter`` are whole numbers: a float (2.5 passed the ``>=`` checks and
was truncated or failed late) or a bool is refused with a one-line ValueError naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_lora.core.config import make_config

def test_increlora_sentinel_rank_num_follows_a_changed_target_rank():
    cfg = make_config("increlora", incre_rank_num=0, target_rank=8)
    assert cfg.incre_rank_num == 4  # the code's mapping, resolved at construction
    moved = make_config("increlora", cfg, target_rank=4)
    assert moved.incre_rank_num == 2 and moved == make_config("increlora", incre_rank_num=0, target_rank=4)
    # the re-derived config is itself re-derivable, and other changes keep the mapping
    assert make_config("increlora", moved, target_rank=6).incre_rank_num == 3
    assert make_config("increlora", cfg, top_h=3).incre_rank_num == 4
    # like a fresh incre_rank_num=0 config, a target_rank outside the mapping is refused
    with pytest.raises(ValueError, match="incre_rank_num=0 maps target_rank"):
        make_config("increlora", cfg, target_rank=16)


def test_increlora_user_rank_num_is_kept_and_the_default_is_unchanged():
    assert make_config("increlora").incre_rank_num == 1  # the scripts' default, not the mapping's 4
    assert make_config("increlora", make_config("increlora"), target_rank=4).incre_rank_num == 1
    # a user value equal to the mapped one is still the user's
    assert make_config("increlora", make_config("increlora", incre_rank_num=4, target_rank=8),
                       target_rank=4).incre_rank_num == 4
    cfg = make_config("increlora", incre_rank_num=0, target_rank=8)
    cfg.incre_rank_num = 3  # assigned after construction: the user's
    assert make_config("increlora", cfg, target_rank=4).incre_rank_num == 3
    # set explicitly alongside the new target_rank: that value wins
    assert make_config("increlora", make_config("increlora", incre_rank_num=0, target_rank=8),
                       target_rank=4, incre_rank_num=1).incre_rank_num == 1


WHOLE_FIELDS = [("lora_sb", "n_init_batches"), ("lora_sb", "total_steps"), ("lora_sb", "svd_niter"),
                ("lora_xs", "svd_niter")]


@pytest.mark.parametrize("method,name", WHOLE_FIELDS)
@pytest.mark.parametrize("value", [2.5, 2.0, True, "4"])
def test_non_integer_count_is_a_config_error(method, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be (None or )?a whole number, got ") as info:
        make_config(method, **{name: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method,name,low", [("lora_sb", "n_init_batches", 0), ("lora_sb", "total_steps", 0),
                                             ("lora_sb", "svd_niter", -1), ("lora_xs", "svd_niter", -1)])
def test_counts_pass_as_ints_and_keep_their_bounds(method, name, low):
    cfg = make_config(method, **{name: np.int64(low + 3)})
    assert getattr(cfg, name) == low + 3 and type(getattr(cfg, name)) is int
    with pytest.raises(ValueError, match=rf"^{name} must be (None or )?>= {low + 1}, got {low}$"):
        make_config(method, **{name: low})


def test_lora_sb_total_steps_stays_optional_and_n_init_batches_is_required():
    assert make_config("lora_sb").total_steps is None
    assert make_config("lora_sb", total_steps=None).total_steps is None
    with pytest.raises(ValueError, match="^n_init_batches must be a whole number, got None$"):
        make_config("lora_sb", n_init_batches=None)
