"""The README's Hydra commands, through their real entry points (``main(argv)``, Hydra's app and its
multirun launcher) with only the training replaced by a recorder: each composes into the run the
README describes, without training.

- ``python -m lightning_lora.federated simulate task=sst2 method=ffa_lora num_clients=8``
- ``lightning-lora train -m experiment=sst2_lora adapter=lora,dora``: two runs, LoRA then DoRA
- ``lightning-lora train experiment=smoke``: a few steps of MiniLM on an SST-2 slice, on the CPU
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from lightning_lora import train


@pytest.fixture
def recorded_train(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``lightning-lora train`` runs every composed config through :func:`lightning_lora.train.run`:
    record each (resolved) instead of training."""
    seen: list[dict[str, Any]] = []

    def record(cfg: Any, command: str | None = None) -> dict[str, float]:
        seen.append({"cfg": OmegaConf.to_container(cfg, resolve=True), "command": command})
        return {}

    monkeypatch.setattr(train, "run", record)
    return seen


def test_federated_simulate_readme_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    from lightning_lora.federated import simulation
    from lightning_lora.federated.__main__ import main

    seen: list[simulation.FederationConfig] = []
    monkeypatch.setattr(simulation, "run_simulation", lambda cfg: seen.append(cfg) or {"rounds": 0})
    argv = ["simulate", "task=sst2", "method=ffa_lora", "num_clients=8", f"hydra.run.dir={tmp_path / 'run'}"]
    assert main(argv) == 0
    (cfg,) = seen  # one simulation, of the FederationConfig that config_from built from the composed config
    assert isinstance(cfg, simulation.FederationConfig)
    assert (cfg.task, cfg.method, cfg.num_clients) == ("sst2", "ffa_lora", 8)
    # conf/federated/task/sst2.yaml and config.yaml's defaults, as the README's command leaves them
    assert cfg.task_options == {"max_train": None, "max_eval": None, "max_length": 66}
    assert cfg.adapter == {"r": 8, "target_modules": None, "modules_to_save": None}  # alpha: the method's
    assert cfg.dp is None and cfg.num_rounds == 10 and cfg.local.optimizer == "sgd"
    assert json.loads(capsys.readouterr().out) == {"rounds": 0}  # the run's summary goes to stdout
    # a different task and client count reach the run: the overrides are read, not the defaults
    seen.clear()
    assert main(["simulate", "task=tiny", "method=lora", "num_clients=3", f"hydra.run.dir={tmp_path / 'run2'}"]) == 0
    assert (seen[0].task, seen[0].method, seen[0].num_clients) == ("tiny", "lora", 3)


def test_train_multirun_readme_command_is_two_runs(tmp_path: Path, recorded_train: list[dict[str, Any]]) -> None:
    sweep = tmp_path / "multirun"
    assert train.main(["train", "-m", "experiment=sst2_lora", "adapter=lora,dora", f"hydra.sweep.dir={sweep}"]) == 0
    assert len(recorded_train) == 2  # adapter=lora,dora expands to two runs, in that order
    lora, dora = (r["cfg"] for r in recorded_train)
    for cfg in (lora, dora):  # conf/experiment/sst2_lora.yaml: MiniLM + LoRA r=8 on SST-2, one epoch
        assert cfg["model"]["name"] == "minilm" and cfg["data"]["name"] == "sst2"
        assert cfg["adapter"]["method"] == "lora"
        assert (cfg["adapter"]["r"], cfg["adapter"]["alpha"]) == (8, 16)  # the experiment's, over both adapters
        assert cfg["optim"]["lr"] == 1e-3 and cfg["trainer"]["max_epochs"] == 1
    assert not lora["adapter"].get("use_dora") and dora["adapter"]["use_dora"] is True
    # apart from use_dora the two runs are the same config
    lora["adapter"]["use_dora"] = dora["adapter"]["use_dora"] = None
    assert lora == dora
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]  # Hydra's job folders


def test_train_smoke_readme_command(tmp_path: Path, recorded_train: list[dict[str, Any]]) -> None:
    assert train.main(["train", "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    (record,) = recorded_train
    cfg = record["cfg"]
    # README: "a few steps on a slice, CPU"; conf/experiment/smoke.yaml: MiniLM + LoRA on 512 SST-2 examples
    assert cfg["model"]["name"] == "minilm" and cfg["data"]["name"] == "sst2" and cfg["adapter"]["method"] == "lora"
    assert cfg["trainer"]["accelerator"] == "cpu" and cfg["trainer"]["max_steps"] == 30
    assert (cfg["data"]["max_samples"], cfg["data"]["max_eval_samples"]) == (512, 128)
    assert record["command"] == f"lightning-lora train experiment=smoke hydra.run.dir={tmp_path / 'run'}"
