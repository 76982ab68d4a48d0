"""`lightning-lora train`: errors the adapter injection finds (it needs the loaded model) reach the user
as the one-line ``lightning-lora: error: ...`` with exit status 2, like the config errors found before
the model loads, not as a Hydra traceback with status 1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# the conventions of tests/tasks/test_train_cli.py: the tiny random BERT on a small slice of SST-2
TINY = ["experiment=smoke", "model=tiny_bert", "data.max_samples=96", "data.max_eval_samples=32",
        "trainer.max_steps=6"]


def cli(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIGHTNING_LORA_DATA": str(REPO / "data" / "nlp"),
           "LIGHTNING_LORA_RESULTS": str(tmp_path / "results"), "PYTHONPATH": str(REPO)}
    exe = shutil.which("lightning-lora")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "lightning_lora.train", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(["adapter.target_modules=[nope]"],
                     "adapter: target_modules=['nope'] target_types=[] matched no module; "
                     "linear modules in this model include: ['bert.encoder.layer.0.attention.self.query'",
                     id="target_modules-match-nothing"),
        pytest.param(["adapter=bat", "adapter.r=7"],
                     "adapter: Bat needs the weight to split into r×r blocks: m % r == n % r == 0, got r=7 "
                     "(bert.encoder.layer.0.attention.self.query:",
                     id="bat-rank-does-not-divide"),
    ],
)
def test_injection_error_is_one_line_exit_2(train_cli, tmp_path, overrides, message):
    """In process (``train.main``, Hydra, Lightning's ``fit`` and the callback's ``setup`` as the console
    script runs them); the script's own exit path: test_an_override_hydra_cannot_apply_is_one_line_exit_2."""
    rc, out, err = train_cli("train", *TINY, *overrides)
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert "HYDRA_FULL_ERROR" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith("lightning-lora: error: " + message), errors[0]
    assert not list((tmp_path / "outputs").glob("*/*/logs/version_0/metrics.csv"))  # nothing trained


def test_setup_guard_keeps_the_callback_picklable_and_passes_other_errors():
    """The guard wraps ``AdapterCallback.setup`` (the injection stays where it was, inside ``fit``): the
    callback still pickles (``ddp_spawn``), and an error after a successful injection is not relabelled."""
    import pickle
    from types import SimpleNamespace

    import torch
    from torch import nn

    from lightning_lora import AdapterCallback, adapter_layers
    from lightning_lora.train import ConfigError, InjectionErrorsAsConfigErrors

    cb = AdapterCallback("lora", r=2, target_modules=["0"])
    cb.setup = InjectionErrorsAsConfigErrors(cb)
    clone = pickle.loads(pickle.dumps(cb))
    assert isinstance(clone.setup, InjectionErrorsAsConfigErrors) and clone.setup.callback is clone

    class Module(nn.Module):  # enough of a LightningModule for setup's wrapping
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 4))

        def on_save_checkpoint(self, checkpoint):
            pass

        def on_load_checkpoint(self, checkpoint):
            pass

        def validation_step(self, *args):
            pass

    trainer = SimpleNamespace(strategy=None, is_global_zero=True)
    bad = AdapterCallback("lora", r=2, target_modules=["nope"])
    bad.setup = InjectionErrorsAsConfigErrors(bad)
    with pytest.raises(ConfigError, match=r"^adapter: target_modules=\['nope'\].*matched no module"):
        bad.setup(trainer, Module(), "fit")

    module = Module()
    cb.setup(trainer, module, "fit")
    assert set(adapter_layers(module)) == {"net.0"}
    assert torch.equal(module.net[0].lora_B, torch.zeros(4, 2))
    cb.setup(trainer, module, "validate")  # again (validate, test): the existing adapter is kept
    assert set(adapter_layers(module)) == {"net.0"}

    def broken(pl_module):
        raise ValueError("not the config's fault")

    late = AdapterCallback("lora", r=2, target_modules=["0"])
    late.setup = InjectionErrorsAsConfigErrors(late)
    late._wrap_checkpoint_hooks = broken  # fails after the injection succeeded
    with pytest.raises(ValueError, match="not the config's fault"):
        late.setup(trainer, Module(), "fit")


def test_an_override_hydra_cannot_apply_is_one_line_exit_2(tmp_path):
    """An unknown key is found by composing the config before the run: one line, exit 2 (Hydra's own
    report exits 1 over several lines)."""
    r = cli(tmp_path, "train", "nonexistent_key=3", timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("lightning-lora: error: Could not override 'nonexistent_key'. "
                                "To append to your config use +nonexistent_key=3")


def test_lncrna_train_with_an_unknown_key_is_one_line_exit_2(capsys):
    from lncrna import cli as lncrna_cli

    rc = lncrna_cli.main(["train", "nonexistent_key=3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == ("lncrna train: error: Could not override 'nonexistent_key'. "
                                       "To append to your config use +nonexistent_key=3")
