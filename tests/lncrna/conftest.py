"""Fixtures shared by the lncrna CLI tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lncrna.model import ModelConfig, NucleotideClassifier
from lncrna.predict import StackParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random classifier with a stack.json (stands in for lncrna/weights/default)."""
    directory = tmp_path_factory.mktemp("cli_model")
    torch.manual_seed(0)
    cfg = ModelConfig(k=3, stride=3, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      window_tokens=64, max_windows=4, dropout=0.0)
    NucleotideClassifier(cfg).save_pretrained(directory)
    StackParams(0.2, 0.8, 1.0, 1.0, 0.0).save(directory / "stack.json")
    return directory


@pytest.fixture
def on_chunk(monkeypatch: pytest.MonkeyPatch) -> Callable[[int, Callable[[], None]], None]:
    """``on_chunk(n, action)``: call ``action()`` when stage 1 of the n-th chunk starts (the chunks
    before it are predicted and written), e.g. to raise or to send a signal mid-run."""
    import lncrna.predict

    def install(n: int, action: Callable[[], None]) -> None:
        calls = 0
        original = lncrna.predict._Stage1.__call__

        def patched(self, seqs):
            nonlocal calls
            calls += 1
            if calls == n:
                action()
            return original(self, seqs)

        monkeypatch.setattr(lncrna.predict._Stage1, "__call__", patched)

    return install
