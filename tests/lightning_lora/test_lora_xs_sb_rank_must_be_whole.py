"""LoRA-XS and LoRA-SB ranks are whole numbers: a float or bool r is refused at config time with a
one-line ValueError naming r (2.5 used to fail late, with a TypeError inside torch.zeros)."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_lora.core.config import make_config


@pytest.mark.parametrize("method", ["lora_xs", "lora_sb"])
@pytest.mark.parametrize("r", [2.5, 2.0, True, "4", None])
def test_non_integer_rank_is_a_config_error(method, r):
    with pytest.raises(ValueError, match=r"rank r must be a whole number") as info:
        make_config(method, r=r)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["lora_xs", "lora_sb"])
def test_integer_ranks_pass_and_numpy_ints_become_ints(method):
    cfg = make_config(method, r=np.int64(4))
    assert cfg.r == 4 and type(cfg.r) is int
    with pytest.raises(ValueError, match=r"rank r must be >= 1"):
        make_config(method, r=0)
