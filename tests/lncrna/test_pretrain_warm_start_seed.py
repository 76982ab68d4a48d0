"""``pretrain(init_dir=...)`` is a warm start whose data order does not replay the earlier run's.

With the same ``seed`` a continued run used to draw the same shuffling, windows and masks as the
run it continues. Now the data-order seed is derived from ``seed``, the epochs already done and the
earlier run's data seed (from its pretrain_log.json, else a fixed offset) and recorded in the new
pretrain_log.json; a fresh run (no ``init_dir``) is seeded by ``seed`` as before.

Tiny MLM, 12 + 6 real records from data/lncrna, one epoch of two batches.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

import lncrna.train
from lncrna.model import ModelConfig
from lncrna.train import continued_data_seed, pretrain

from test_cli import ROOT, run  # the test directory is on sys.path

TINY = ModelConfig(k=3, stride=3, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                   window_tokens=64, max_windows=4, dropout=0.0)
TRAINER = {"accelerator": "cpu", "devices": 1, "limit_train_batches": 2, "limit_val_batches": 1,
           "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False}


def _head(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` records of a gzipped FASTA."""
    out, count = [], 0
    with gzip.open(src, "rt") as fh:
        for line in fh:
            if line.startswith(">"):
                count += 1
                if count > n:
                    break
            out.append(line)
    with gzip.open(dst, "wt") as fh:
        fh.write("".join(out))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lncrna_slice")
    _head(ROOT / "data" / "lncrna" / "train.fa.gz", root / "train.fa.gz", 12)
    _head(ROOT / "data" / "lncrna" / "val.fa.gz", root / "val.fa.gz", 6)
    return root


def _pretrain_recording(monkeypatch, out: Path, data_root: Path, modes: list[bool] | None = None,
                        **kw) -> tuple[Path, list[torch.Tensor]]:
    """Run a tiny pretrain; returns its mlm folder and the masked input ids of the training batches.
    ``modes`` collects whether every submodule of the MLM was in training mode at each training step."""
    seen: list[torch.Tensor] = []
    original = lncrna.train.mask_spans
    step = lncrna.train.MLMModule.training_step

    def recording_step(self, batch, batch_idx):
        if modes is not None:
            modes.append(all(m.training for m in self.model.modules()))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(lncrna.train.MLMModule, "training_step", recording_step)

    def recording(ids, attention, *a, **k):
        masked, labels = original(ids, attention, *a, **k)
        seen.append(masked.clone())
        return masked, labels

    monkeypatch.setattr(lncrna.train, "mask_spans", recording)
    path = pretrain(out, cfg=TINY, epochs=1, batch_size=4, lr=1e-3, trainer_kwargs=TRAINER, data_root=data_root,
                    seed=0, **kw)
    monkeypatch.setattr(lncrna.train, "mask_spans", original)
    monkeypatch.setattr(lncrna.train.MLMModule, "training_step", step)
    return path, seen[:2]  # the two training batches (no sanity check; validation comes after)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data_root) -> tuple[Path, list[torch.Tensor]]:
    mp = pytest.MonkeyPatch()
    try:
        return _pretrain_recording(mp, tmp_path_factory.mktemp("first"), data_root)
    finally:
        mp.undo()


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def test_continued_run_with_the_same_seed_sees_other_batches(first_run, data_root, tmp_path, monkeypatch):
    mlm, first_batches = first_run
    assert len(first_batches) == 2
    modes: list[bool] = []
    path, batches = _pretrain_recording(monkeypatch, tmp_path, data_root, modes, init_dir=mlm)
    assert len(batches) == 2 and not _same(batches, first_batches)
    assert modes == [True, True]  # the loaded MLM trains in training mode (dropout on), not eval mode
    first_log = json.loads((mlm / "pretrain_log.json").read_text())
    log = json.loads((path / "pretrain_log.json").read_text())
    assert first_log["run"] == {**first_log["run"], "seed": 0, "data_seed": 0, "epochs_total": 1, "warm_start": False}
    run_ = log["run"]
    assert run_["seed"] == 0 and run_["data_seed"] != 0 and run_["init_dir"] == str(mlm)
    assert run_["epochs_before"] == 1 and run_["epochs_this_run"] == 1 and run_["epochs_total"] == 2
    assert run_["warm_start"] is True and "restarted" in run_["optimizer_and_lr_schedule"]
    assert run_["data_seed"] == continued_data_seed(0, mlm)[0]  # what was used is what is recorded
    assert "val_mlm_loss" in log  # the metrics are still there, as before


def test_a_fresh_run_with_the_same_seed_still_replays_exactly(first_run, data_root, tmp_path, monkeypatch):
    _, first_batches = first_run
    path, batches = _pretrain_recording(monkeypatch, tmp_path, data_root)
    assert _same(batches, first_batches)  # seed alone fixes a fresh run, as before
    assert json.loads((path / "pretrain_log.json").read_text())["run"]["data_seed"] == 0


def test_data_seed_without_a_log_and_along_a_chain(tmp_path):
    assert continued_data_seed(7, None)[0] == 7
    bare = tmp_path / "bare"  # an MLM folder from before pretrain_log.json recorded the run
    bare.mkdir()
    (bare / "pretrain_log.json").write_text(json.dumps({"val_mlm_loss": 5.0}))
    s_bare, rec = continued_data_seed(7, bare)
    assert s_bare != 7 and rec["epochs_before"] is None and "fixed offset" in rec["data_seed_from"]
    assert continued_data_seed(7, tmp_path / "missing")[0] == s_bare  # no log at all: the same offset
    # a chain of runs that each stopped before finishing an epoch: every link still gets its own order
    seeds, prev = [7], bare
    for i in range(3):
        link = tmp_path / f"link{i}"
        link.mkdir()
        s, _ = continued_data_seed(7, prev)
        (link / "pretrain_log.json").write_text(json.dumps({"run": {"data_seed": s, "epochs_total": 0}}))
        seeds.append(s)
        prev = link
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**31 for s in seeds)


def test_help_calls_init_dir_a_warm_start(capsys):
    rc, out, _ = run(["--help"], capsys)
    flat = " ".join(out.split())
    assert rc == 0 and "init_dir=MLM is a warm start, not a resume" in flat and "warmup" in flat


def test_cli_pretrain_from_init_dir_says_it_is_a_warm_start(first_run, data_root, tmp_path, capsys):
    mlm, _ = first_run
    rc, out, err = run(["pretrain", "model=tiny", "epochs=1", "batch_size=4", f"data.root={data_root}",
                        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                        "trainer.enable_progress_bar=false",
                        f"init_dir={mlm}", f"out_dir={tmp_path / 'b'}", f"hydra.run.dir={tmp_path / 'h'}"], capsys)
    assert rc == 0, err
    data_seed = json.loads((tmp_path / "b" / "mlm" / "pretrain_log.json").read_text())["run"]["data_seed"]
    assert (f"lncrna pretrain: warm start from {mlm}: its weights only; the optimizer and the LR schedule (with "
            f"its warmup) restarted; data order seed {data_seed} (seed 0, 1 epochs before)") in out
