"""`lncrna train adapter=<name>` really trains with every shared adapter config (conf/adapter/*.yaml).

Each case is a real in-process run of ``lncrna.cli.main(['train', 'experiment=smoke', ...])``: the tiny
model, 6 training sequences in 3 steps of 2, one validation batch. Issues #4/#5 promise every file of
conf/adapter/ works there; tests/tasks/test_train_cli.py checks only the keys.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

import lightning_lora as ll
from lightning_lora.core.state import read_adapter_config

from lncrna import cli
from lncrna.fasta import FastaRecord, write_fasta
from lncrna.model import ModelConfig, NucleotideClassifier
from lncrna.predict import TSV_COLUMNS
from lncrna.train import ClassifierModule

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = sorted(p.stem for p in (ROOT / "conf" / "adapter").glob("*.yaml"))
#: lncrna train saves a merged plain BERT; these cannot merge (and have no dense form)
REFUSED = {"smora"}
#: per-adapter settings: a value the config leaves open, a rank the tiny model's width (32) allows, and
#: schedules shortened so the method's own steps (selection, rank growth, init, SVD refresh) run in 3 steps
SETTINGS = {
    "allora": ["adapter.eta=1.0"],  # eta: ??? in allora.yaml
    "bone": ["adapter.r=8"],  # r=64 > in_features 32
    "bat": ["adapter.r=8"],  # r must divide 32 and 64
    "lq_lora": ["adapter.r=8"],  # r <= min(out, in)
    "flexora": ["adapter.search_steps=1"],  # gate search, selection, then retraining
    "increlora": ["adapter.init_warmup=1", "adapter.interval=1"],  # ranks added mid-fit
    "lora_sb": ["adapter.n_init_batches=2"],
    "gradnorm_lorp": ["adapter.update_proj_gap=1"],
}
#: registered method of the configs that set options of another one
METHOD = {"dora": "lora", "rslora": "lora"}
#: the optimizer a method brings (make_optimizer); AdamW for the rest
OPTIMIZER = {"gradnorm_lorp": "GradNormLoRPAdamW"}


def _seq(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("ACGT") for _ in range(n))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """6 training sequences (3 per class, mouse) and 2 validation ones, 240 nt."""
    root = tmp_path_factory.mktemp("adapter_data")
    recs = [FastaRecord(f"t{i}", f"t{i} label={'lncRNA' if i % 2 else 'mRNA'} species=mouse source=test",
                        _seq(240, i)) for i in range(6)]
    write_fasta(recs, root / "train.fa.gz")
    write_fasta(recs[:2], root / "val.fa.gz")
    return root


def _train(name: str, data_root: Path, run_dir: Path, capsys, extra: list[str] | None = None) -> tuple[int, str]:
    rc = cli.main(["train", "experiment=smoke", f"adapter={name}", f"data.root={data_root}", "batch_size=2",
                   "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", f"hydra.run.dir={run_dir}",
                   *(SETTINGS.get(name, []) if extra is None else extra)])
    return rc, capsys.readouterr().err


def _initial_model() -> NucleotideClassifier:
    """The model finetune starts from: the tiny config built right after seed_everything(seed=0)."""
    tiny = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "lncrna" / "model" / "tiny.yaml"))
    pl.seed_everything(0)
    return NucleotideClassifier(ModelConfig(**tiny))


@pytest.mark.parametrize("name", [a for a in ADAPTERS if a not in REFUSED])
def test_train_runs_with_adapter(name, data_root, tmp_path, capsys, monkeypatch):
    seen: dict[str, object] = {}
    configure = ClassifierModule.configure_optimizers

    def spy(self):  # what the fit really trained: the injected method and the optimizer
        out = configure(self)
        seen.update(method=ll.get_adapter_method(self.model.bert), optimizer=type(out["optimizer"]).__name__,
                    embeddings_train=self.model.bert.bert.embeddings.word_embeddings.weight.requires_grad)
        return out

    monkeypatch.setattr(ClassifierModule, "configure_optimizers", spy)
    run = tmp_path / "run"
    rc, err = _train(name, data_root, run, capsys)
    assert rc == 0, err[-3000:]
    method = METHOD.get(name, name)
    assert type(seen["method"]) is ll.get_method(method)
    assert seen["optimizer"] == OPTIMIZER.get(name, "AdamW") and seen["embeddings_train"] is False
    # the adapter the run exported records its method (and dora / rslora their option)
    saved_method, saved_cfg, _ = read_adapter_config(run / "adapter")
    assert saved_method == method
    if method == "lora":
        assert (saved_cfg.use_dora, saved_cfg.use_rslora) == (name == "dora", name == "rslora")
    # the saved classifier is plain BERT with the update folded in: frozen embeddings as initialised (full
    # fine-tuning moves them), adapted encoder weights moved
    saved = NucleotideClassifier.from_pretrained(run / "classifier").bert.state_dict()
    init = {k: v.half().float() for k, v in _initial_model().bert.state_dict().items()}
    assert torch.equal(saved["bert.embeddings.word_embeddings.weight"], init["bert.embeddings.word_embeddings.weight"])
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(saved[query], init[query])
    metrics = json.loads((run / "train_summary.json").read_text())["metrics"]
    assert math.isfinite(metrics["val_accuracy"]) and 0.0 <= metrics["val_accuracy"] <= 1.0, metrics
    assert math.isfinite(metrics["train_loss"]), metrics


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_train_refuses_unmergeable_adapter_before_fit(name, data_root, tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = _train(name, data_root, run, capsys)
    assert rc == 2
    assert err.strip().splitlines() == [
        f"lncrna train: error: adapter={name}: its update cannot be merged into the base weights, and lncrna "
        "train saves the classifier merged (a plain BERT for `lncrna predict`); choose a mergeable adapter"]
    assert not run.exists()  # refused before the fit: no adapter export, no run folder left


@pytest.mark.parametrize("name", ["bat", "bone", "lq_lora"])
def test_train_default_rank_wider_than_tiny_model_is_one_line(name, data_root, tmp_path, capsys):
    """r=64 (their configs' default) does not fit the smoke model's 32-wide layers: exit 2, one line."""
    rc, err = _train(name, data_root, tmp_path / "run", capsys, extra=[])
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lncrna train: error: adapter={name}: ") and "r=64" in line, err[-2000:]


@pytest.mark.parametrize("name", ["lora", "dylora", "bone", "lq_lora", "gradnorm_lorp"])
def test_trained_model_predicts(name, data_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(name, data_root, run, capsys)[0] == 0
    # `lncrna train` writes the cascade's stack.json beside the classifier: predict runs it as it is.
    # Two validation records cannot support a fit, so the transformer decides alone
    stack = json.loads((run / "classifier" / "stack.json").read_text())
    assert stack["fitted_on"].startswith("not fitted (2 held-out records") and (stack["low"], stack["high"]) == (0.0, 1.0)
    fasta = tmp_path / "three.fa"
    fasta.write_text("".join(f">q{i}\n{_seq(300 + 50 * i, 100 + i)}\n" for i in range(3)))
    probs = {}
    for flag in ([], ["--no-cascade"]):
        out = tmp_path / f"pred{len(flag)}.tsv"
        rc = cli.main(["predict", str(fasta), "--model", str(run / "classifier"), *flag, "-o", str(out), "-q"])
        assert rc == 0, capsys.readouterr().err
        header, *rows = [line.split("\t") for line in out.read_text().splitlines()]
        assert tuple(header) == TSV_COLUMNS and [r[0] for r in rows] == ["q0", "q1", "q2"]
        assert all(0.0 <= float(r[2]) <= 1.0 and r[3] in ("lncRNA", "mRNA") for r in rows), rows
        probs[bool(flag)] = [float(r[2]) for r in rows]
    assert probs[False] == probs[True]  # the transformer alone, with or without the cascade
    # the run folder itself, a likely slip, is refused with the folder to pass instead
    capsys.readouterr()
    assert cli.main(["predict", str(fasta), "--model", str(run), "-o", str(tmp_path / "x.tsv"), "-q"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{run / 'classifier'} is one: pass that")
