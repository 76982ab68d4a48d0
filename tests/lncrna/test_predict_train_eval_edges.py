"""Edge cases of lncrna.predict / lncrna.train / lncrna.evaluate: cascade band edges, stacker file
validation, training-loader randomness, run-setting validation, conflicting truth labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lncrna.evaluate import EvaluationError, read_truth
from lncrna.fasta import FastaRecord, read_fasta, write_fasta
from lncrna.predict import EXAMPLE_FASTA, ModelError, Predictor, StackParams

# ---- predict --------------------------------------------------------------------------------------


def test_band_edges_are_open_and_degenerate_bands_work():
    p = np.array([0.0, 0.2, 0.2000001, 0.5, 0.7999999, 0.8, 1.0])
    hard = StackParams(0.2, 0.8, 1.0, 1.0, 0.0).is_hard(p)
    assert hard.tolist() == [False, False, True, True, True, False, False]
    # low == high: an empty band, nothing goes to the transformer
    assert not StackParams(0.5, 0.5, 1.0, 1.0, 0.0).is_hard(p).any()
    # (0, 1): everything but the exact extremes
    assert StackParams(0.0, 1.0, 1.0, 1.0, 0.0).is_hard(p).tolist() == [False, True, True, True, True, True, False]


def test_combine_clips_extreme_probabilities_to_finite_values():
    s = StackParams(0.2, 0.8, 0.6, 0.1, -0.3)
    out = s.combine(np.array([0.0, 1.0, 0.5]), np.array([1.0, 0.0, 0.5]))
    assert np.isfinite(out).all()
    lim = math.log((1 - 1e-6) / 1e-6)
    z = np.array([-0.6 * lim + 0.1 * lim - 0.3, 0.6 * lim - 0.1 * lim - 0.3, -0.3])
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-z)), rtol=1e-9)


def test_stack_file_rejects_booleans(tmp_path):
    path = tmp_path / "stack.json"
    path.write_text(json.dumps({"low": True, "high": 1.0, "w_baseline": 1.0, "w_transformer": 1.0, "bias": 0.0}))
    with pytest.raises(ModelError, match="not a finite number: low"):
        StackParams.load(path)


def test_predictor_rejects_nan_threshold():
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        Predictor(threshold=float("nan"), device="cpu")


# ---- evaluate -------------------------------------------------------------------------------------


def test_truth_refuses_one_id_with_both_labels(tmp_path):
    fa = tmp_path / "t.fa"
    fa.write_text(">a label=lncRNA\nACGT\n>b label=mRNA\nACGT\n>a label=mRNA\nACGT\n")
    with pytest.raises(EvaluationError, match=r"record 3 'a'.*already labelled lncRNA"):
        read_truth(fa)
    fa.write_text(">a label=lncRNA\nACGT\n>b label=MRNA\nACGT\n>a LABEL=lncrna\nACGT\n")  # same label twice: fine
    assert read_truth(fa) == {"a": 1, "b": 0}


# ---- train ----------------------------------------------------------------------------------------


def _split_root(root, *, labels=("lncRNA", "mRNA")):
    recs = [r for r in read_fasta(EXAMPLE_FASTA)
            if any(f"label={lab}" in r.description for lab in labels)]
    out = [FastaRecord(r.id, f"{r.id} label={'lncRNA' if 'label=lncRNA' in r.description else 'mRNA'} "
                             f"species=mouse source=example.fa gene=-", r.seq) for r in recs]
    root.mkdir(parents=True, exist_ok=True)
    write_fasta(out, root / "train.fa.gz")
    write_fasta(out[::2], root / "val.fa.gz")
    return root


def _epoch_windows(loader) -> list[tuple[int, ...]]:
    return sorted(tuple(row) for batch in loader for row in batch["input_ids"].tolist())


def test_train_loader_workers_draw_new_windows_each_epoch():
    from lncrna.model import ModelConfig, make_tokenizer
    from lncrna.train import MLMWindows, _pad_collate, _train_loader

    cfg = ModelConfig()
    seq = "".join(np.random.default_rng(1).choice(list("ACGT"), 20000))
    # identical sequences: a window's content is its offset, so replayed draws show up as equal windows
    ds = MLMWindows([seq] * 8, cfg, make_tokenizer(cfg), seed=0)

    def two_epochs():
        torch.manual_seed(123)
        loader = _train_loader(ds, 2, _pad_collate, num_workers=2)
        return _epoch_windows(loader), _epoch_windows(loader)

    first, second = two_epochs()
    assert len(set(first)) == 8, "the two workers drew the same offsets"
    assert first != second, "every epoch replayed the same windows"
    assert two_epochs() == (first, second)  # still reproducible from the torch seed


def test_finetune_rejects_untrainable_settings(tmp_path):
    from lncrna.train import RunConfigError as ConfigError
    from lncrna.train import finetune, pretrain

    root = _split_root(tmp_path / "data")
    for bad, name in (({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
                      ({"train_windows": 0}, "train_windows"), ({"lr": 0.0}, "lr"),
                      ({"max_minutes": -1}, "max_minutes")):
        with pytest.raises(ConfigError, match=name):
            finetune(tmp_path / "out", mlm_dir=None, data_root=root, **bad)
    with pytest.raises(ConfigError, match="species 'human'"):
        finetune(tmp_path / "out", mlm_dir=None, data_root=root, species="human")
    with pytest.raises(ConfigError, match="epochs"):
        pretrain(tmp_path / "out", epochs=0, data_root=root)
    assert not (tmp_path / "out").exists()


def test_finetune_refuses_one_class_training_set(tmp_path):
    from lncrna.model import ModelConfig
    from lncrna.train import RunConfigError as ConfigError
    from lncrna.train import finetune

    root = _split_root(tmp_path / "data", labels=("mRNA",))
    tiny = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    with pytest.raises(ConfigError, match=r"need both classes"):
        finetune(tmp_path / "out", mlm_dir=None, cfg=tiny, data_root=root, epochs=1, batch_size=4)
    assert not (tmp_path / "out" / "classifier").exists()


@pytest.mark.parametrize("cmd", ["pretrain", "train"])
def test_cli_reports_bad_run_setting_in_one_line(cmd, tmp_path, capsys):
    from lncrna.cli import main

    rc = main([cmd, "epochs=0", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == f"lncrna {cmd}: error: epochs must be an integer >= 1, got 0"
    assert not any("Traceback" in line for line in err)


def test_ids_that_would_break_the_tsv_are_refused():
    from lncrna.predict import _as_record, format_row, Prediction

    for bad in ("a\tb", "a\nb", "a\r"):
        with pytest.raises(ValueError, match="id contains a tab or line break"):
            _as_record((bad, "ACGT"), 1)
    rec = _as_record(("id with spaces", "acgt"), 1)  # spaces are fine in a tab-separated row
    assert rec.id == "id with spaces" and rec.seq == "ACGT"
    assert format_row(Prediction(rec.id, 4, 0.5, "lncRNA")).count("\t") == 3
