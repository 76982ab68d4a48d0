"""``StackParams.fit``: the cascade fit that produced the shipped stack.json and that ``lncrna train``
runs for a new classifier (the band keeps 90 % of the stack's cross-validated MCC gain)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from lncrna.data import load_split
from lncrna.features import FeatureBaseline
from lncrna.predict import STACK_BANDS, StackParams

ROOT = Path(__file__).resolve().parents[2]


def _data(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    informative = 1 / (1 + np.exp(-(4 * (2 * y - 1) + rng.normal(0, 2, n))))
    noise = rng.uniform(0.01, 0.99, n)
    return y, informative, noise


def test_a_transformer_that_adds_nothing_gets_no_weight_and_no_record():
    """No cross-validated gain over the baseline: an empty band, so predict never runs the transformer."""
    y, informative, _ = _data()
    params, metrics = StackParams.fit(y, informative, np.full_like(informative, 0.5))
    assert abs(params.w_transformer) < 1e-6 and params.w_baseline > 0.5
    assert metrics["stack_cv_mcc"] <= metrics["baseline_mcc"]
    assert (params.low, params.high) == (0.5, 0.5) and not params.is_hard(np.linspace(0, 1, 101)).any()


def test_a_transformer_that_knows_better_than_a_random_baseline_gets_every_record():
    y, informative, noise = _data()
    params, metrics = StackParams.fit(y, noise, informative)
    assert params.w_transformer > 0.5 > abs(params.w_baseline)
    assert metrics["stack_cv_mcc"] > metrics["baseline_mcc"] + 0.5
    # the chosen band is the narrowest that keeps 90 % of the gain: a wide one, the baseline saying nothing
    gain = metrics["stack_cv_mcc"] - metrics["baseline_mcc"]
    i = STACK_BANDS.index((params.low, params.high))
    assert metrics[f"cascade_{params.low}_{params.high}_mcc"] - metrics["baseline_mcc"] >= 0.9 * gain
    assert all(metrics[f"cascade_{lo}_{hi}_mcc"] - metrics["baseline_mcc"] < 0.9 * gain for lo, hi in STACK_BANDS[:i])
    assert metrics[f"cascade_{params.low}_{params.high}_hard_share"] > 0.85


def test_too_few_records_of_a_class_are_refused_with_the_counts():
    y = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    p = np.linspace(0.1, 0.9, 10)
    with pytest.raises(ValueError, match=r"10 held-out records \(6 lncRNA, 4 mRNA\): a 5-fold .* at least 5 of each"):
        StackParams.fit(y, p, p)


def test_refit_reproduces_the_shipped_stack(tmp_path):
    """benchmarks/lncrna_stack.py's inputs (mouse validation, shipped baseline, the GPU run's transformer
    probabilities) give the shipped stack.json back through StackParams.fit."""
    val = load_split("val")
    mouse = (val.species == "mouse").to_numpy()
    p_b = FeatureBaseline.load().predict_proba(list(val.seq[mouse]))
    p_t = np.load(ROOT / "benchmarks/results/lncrna_gpu_probs.npz")["val_mouse_full"][mouse]
    params, _ = StackParams.fit(val.label.to_numpy()[mouse], p_b, p_t)
    shipped = json.loads((ROOT / "lncrna/weights/default/stack.json").read_text())
    assert (params.low, params.high) == (shipped["low"], shipped["high"])
    for key in ("w_baseline", "w_transformer", "bias"):
        assert getattr(params, key) == pytest.approx(shipped[key], rel=1e-9, abs=1e-12)
    params.save(tmp_path / "stack.json", fitted_on="test")
    assert StackParams.load(tmp_path / "stack.json") == params
    assert json.loads((tmp_path / "stack.json").read_text())["fitted_on"] == "test"


def _seq(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list("ACGT"), n))


@pytest.mark.parametrize("mouse_classes,expected", [((0, 1), "mouse part of the validation split (12 records)"),
                                                    ((1,), "validation split (22 records)")])
def test_fit_cascade_uses_the_mouse_part_where_it_has_both_classes(tmp_path, mouse_classes, expected):
    """lncrna train's stack.json: fitted on mouse validation records (the species-shortcut rule) when
    they hold both classes, else on all of validation; it loads as predict's StackParams."""
    import pandas as pd
    import torch

    from lncrna.model import ModelConfig, NucleotideClassifier
    from lncrna.train import fit_cascade

    rows = [(f"m{i}", _seq(300 + 7 * i, i), mouse_classes[i % len(mouse_classes)], "mouse") for i in range(12)]
    rows += [(f"h{i}", _seq(300 + 5 * i, 100 + i), i % 2, "human") for i in range(10)]
    val = pd.DataFrame(rows, columns=["id", "seq", "label", "species"])
    torch.manual_seed(0)
    model = NucleotideClassifier(ModelConfig(k=3, stride=3, hidden_size=32, num_layers=1, num_heads=2,
                                             intermediate_size=64, window_tokens=64)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = fit_cascade(model, val, tmp_path)
    saved = json.loads((tmp_path / "stack.json").read_text())
    # an untrained transformer gains nothing: the empty band, said in the file and a warning
    empty = saved["low"] >= saved["high"]
    assert saved["fitted_on"].startswith(expected) and ("band is empty" in saved["fitted_on"]) == empty
    assert any("band is empty" in str(w.message) for w in caught) == empty
    assert set(metrics) >= {"baseline_mcc", "stack_cv_mcc"}
    StackParams.load(tmp_path / "stack.json")


def test_fit_cascade_with_too_few_records_lets_the_transformer_decide(tmp_path):
    import pandas as pd
    import torch

    from lncrna.model import ModelConfig, NucleotideClassifier
    from lncrna.train import fit_cascade

    val = pd.DataFrame([(f"m{i}", _seq(300, i), i % 2, "mouse") for i in range(4)], columns=["id", "seq", "label", "species"])
    torch.manual_seed(0)
    model = NucleotideClassifier(ModelConfig(k=3, stride=3, hidden_size=32, num_layers=1, num_heads=2,
                                             intermediate_size=64, window_tokens=64)).eval()
    with pytest.warns(UserWarning, match=r"stack.json: 4 held-out records \(2 lncRNA, 2 mRNA\)"):
        assert fit_cascade(model, val, tmp_path) == {}
    stack = StackParams.load(tmp_path / "stack.json")
    p_t = model.predict_proba(list(val.seq))
    # every record goes to the transformer, whose probability is kept
    assert stack.is_hard(np.array([0.01, 0.5, 0.99])).all()
    np.testing.assert_allclose(stack.combine(np.full(4, 0.3), p_t), np.clip(p_t, 1e-6, 1 - 1e-6), rtol=1e-9)
