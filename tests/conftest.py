"""Shared test configuration: ``--runslow``, the ``slow`` / ``gpu`` markers, tiny random models.

Every model here is built from a config with random weights: no downloads, a few milliseconds each.
Dropout inside the base models is off so comparisons (fp32 vs bf16, ours vs PEFT) are deterministic;
adapter dropout is tested on its own.
"""

from __future__ import annotations

import contextlib

import sys
from pathlib import Path

# pytest puts tests/ first on sys.path (rootdir conftest, no __init__.py); tests/lightning_lora would
# then shadow the editable-installed package as an empty namespace package under plain `pytest`.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import os  # noqa: E402

# Under pytest-xdist (the README's test command runs two workers on CI's two cores) every worker, and
# every process a test starts, takes one OpenMP thread: two workers with two threads each spin-wait
# against each other, which made tiny models' forward passes tens of times slower (see
# tests/lightning_lora/conftest.py). Set before torch is imported.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running test, skipped unless --runslow")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow test: pass --runslow to run it")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: CI has none; these run on the GPU machine (gpu_sessions.md)")
    run_slow = config.getoption("--runslow")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


# ---- tiny models ------------------------------------------------------------------------------
VOCAB = 96


def tiny_bert_config(num_labels: int = 2):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
    )


def tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    )


def build_tiny_bert(seed: int = 0, classifier: bool = False) -> nn.Module:
    """``BertModel`` (or ``BertForSequenceClassification``), hidden 32, 2 layers, eval mode."""
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cls = BertForSequenceClassification if classifier else BertModel
    return cls(tiny_bert_config()).eval()


def build_tiny_llama(seed: int = 0) -> nn.Module:
    """``LlamaForCausalLM``, hidden 32, 2 layers, GQA (4 heads, 2 KV heads), eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def build_tiny_gpt2(seed: int = 0) -> nn.Module:
    """``GPT2LMHeadModel`` (attention and MLP are transformers ``Conv1D``), hidden 32, 2 layers, eval mode."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config()).eval()


class LinearStack(nn.Module):
    """Plain PyTorch: 48 -> 32 -> 48 -> 32 Linear layers (m = 32, n = 48 and the transpose shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(48, 32)
        self.fc2 = nn.Linear(32, 48)
        self.fc3 = nn.Linear(48, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def build_linear_stack(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LinearStack().eval()


@pytest.fixture
def tiny_bert() -> nn.Module:
    return build_tiny_bert()


@pytest.fixture
def tiny_llama() -> nn.Module:
    return build_tiny_llama()


@pytest.fixture
def tiny_gpt2() -> nn.Module:
    return build_tiny_gpt2()


@pytest.fixture
def linear_stack() -> nn.Module:
    return build_linear_stack()


@pytest.fixture
def model_builders() -> dict:
    """Name -> ``builder(seed=0)``; tests that need fresh identical copies call a builder twice."""
    return {
        "linear": build_linear_stack,
        "bert": build_tiny_bert,
        "bert_cls": lambda seed=0: build_tiny_bert(seed, classifier=True),
        "llama": build_tiny_llama,
        "gpt2": build_tiny_gpt2,
    }


@pytest.fixture(autouse=True)
def _python_fused_path_unless_asked():
    """The suite runs the fused LoRA layers on the Python path unless ``LIGHTNING_LORA_CPP`` says
    otherwise (``=1`` runs every test on the C++ path). The default, automatic mode would start a
    background build at the first CUDA test and switch every later test to the C++ path halfway
    through the suite, whenever the build ended; the C++ path has tests of its own
    (test_lora_cpp_path.py) and so does the automatic mode (test_cpp_auto_mode.py)."""
    from lightning_lora.core import _lora_cpp
    from lightning_lora.methods import lora

    before = lora._CPP
    if before is _lora_cpp.AUTO:
        lora._CPP = None
    yield
    lora._CPP = before


# ---- lightning-lora in process -------------------------------------------------------------------
@pytest.fixture
def train_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture):
    """``run(*args) -> (exit status, stdout, stderr)``: ``lightning-lora ARGS`` through ``train.main`` in
    this process, run in ``tmp_path`` with the repository's NLP data and results under ``tmp_path``, as
    the console script would. For refusals, which never train: a subprocess spends its seconds importing
    torch and Lightning to print one line (the console script's own exit path keeps subprocess tests)."""
    from lightning_lora import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LIGHTNING_LORA_DATA", str(Path(_ROOT) / "data" / "nlp"))
    monkeypatch.setenv("LIGHTNING_LORA_RESULTS", str(tmp_path / "results"))

    def run(*args: str) -> tuple[int, str, str]:
        capfd.readouterr()
        try:
            rc = train.main(list(args))
        except SystemExit as e:  # how a task refused inside Hydra ends the console script
            rc = e.code
        out, err = capfd.readouterr()
        return rc, out, err

    return run


def randomize_adapter(model: nn.Module, std: float = 0.3, match: str = "lora", seed: int = 7) -> None:
    """Overwrite every trainable parameter whose name holds ``match`` with N(0, std²) values (seeded), so
    zero-initialised factors give a non-zero update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and match in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@contextlib.contextmanager
def mha_fastpath_off():
    """torch's fused inference path of nn.MultiheadAttention / nn.TransformerEncoderLayer switched off
    inside the block (the layer-by-layer reference for it)."""
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
