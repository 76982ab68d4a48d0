"""Fixtures for the lightning_lora tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine OpenMP spin-waiting made
    multi-threaded forward/backward of the tiny BERT ~50x slower. Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
