"""Fixtures shared by the lncrna CLI tests."""

from __future__ import annotations

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
