"""``--threads`` changes torch's process-wide thread count for the command only; MLMModule's validation
epoch end outside a Trainer."""

from __future__ import annotations

import pytest
import torch

from lncrna import cli
from lncrna.predict import EXAMPLE_FASTA


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_threads_puts_the_caller_s_thread_count_back(command, tmp_path, model_dir, capsys):
    """``cli.main([... "--threads", N])`` called in-process (tests, notebooks, API users) left torch at N
    threads for everything the caller ran afterwards."""
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2  # differs from the current setting, so the option does change it
    out = ["-o", str(tmp_path / "out.tsv")] if command == "predict" else ["-o", str(tmp_path / "ev")]
    try:
        rc = cli.main([command, str(EXAMPLE_FASTA), "--model", str(model_dir), "--no-cascade", "--threads",
                       str(wanted), *out, "-q"])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_threads_is_put_back_when_the_command_fails(tmp_path, model_dir, capsys, monkeypatch):
    """The same when the command fails after the option took effect (here: a full disk while writing)."""
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    seen: list[int] = []

    def failing(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_stream_predictions", failing)
    try:
        rc = cli.main(["predict", str(EXAMPLE_FASTA), "--model", str(model_dir), "--no-cascade", "--threads",
                       str(wanted), "-o", str(tmp_path / "out.tsv"), "-q"])
        assert rc != 0 and seen == [wanted], capsys.readouterr().err
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_mlm_validation_epoch_end_outside_a_trainer_logs_the_row_weighted_mean(monkeypatch):
    """Outside a Trainer (hooks driven by hand, as ClassifierModule's are in the tests) the validation
    loss is the row-weighted mean: an earlier form called ``self.trainer.strategy.reduce`` unguarded
    and raised 'not attached to a Trainer'. It is now an ExampleMean metric, logged as the object
    (Lightning computes it at epoch end; by hand, ``compute()``)."""
    from torchmetrics import Metric

    from lncrna.model import ModelConfig
    from lncrna.train import MLMModule

    cfg = ModelConfig(k=3, stride=1, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8, window_tokens=8)
    module = MLMModule(cfg)
    losses = iter([torch.tensor(2.0), torch.tensor(5.0)])
    monkeypatch.setattr(module, "_step", lambda batch: next(losses))
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.__setitem__(
        name, float(value.compute() if isinstance(value, Metric) else value)))
    module.on_validation_epoch_start()
    module.validation_step({"input_ids": torch.zeros(3, 4, dtype=torch.long)}, 0)
    module.validation_step({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, 1)
    module.on_validation_epoch_end()
    assert logged == {"val_mlm_loss": (2.0 * 3 + 5.0 * 1) / 4}
