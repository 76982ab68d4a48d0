"""Tests for lncrna.metrics.classification_metrics (lncRNA = 1 is the positive class)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lncrna.metrics import classification_metrics


def test_hand_computed_confusion():
    y = [1, 1, 0, 0]
    p = [0.9, 0.4, 0.6, 0.1]  # calls 1, 0, 1, 0 -> tp fn fp tn
    m = classification_metrics(y, p)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    assert m["mcc"] == pytest.approx(0.0)
    assert m["auroc"] == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ranked right
    assert m["n"] == 4 and m["n_pos"] == 2


def test_positive_class_is_lncrna_and_asymmetric():
    y = [1, 1, 1, 0]
    p = [0.9, 0.8, 0.2, 0.7]  # tp=2 fn=1 fp=1 tn=0
    m = classification_metrics(y, p)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(0.0)
    mcc = (2 * 0 - 1 * 1) / math.sqrt(3 * 3 * 1 * 1)
    assert m["mcc"] == pytest.approx(mcc)


def test_threshold_is_inclusive_and_configurable():
    y = [1, 0]
    assert classification_metrics(y, [0.5, 0.49])["accuracy"] == 1.0
    m = classification_metrics(y, [0.7, 0.65], threshold=0.68)
    assert m["accuracy"] == 1.0 and m["threshold"] == 0.68


def test_perfect_and_inverted():
    y = np.array([0, 1, 0, 1, 1])
    assert classification_metrics(y, y.astype(float))["mcc"] == pytest.approx(1.0)
    inv = classification_metrics(y, 1.0 - y)
    assert inv["mcc"] == pytest.approx(-1.0) and inv["auroc"] == pytest.approx(0.0)


def test_pred_override_keeps_auroc_from_prob():
    y = [1, 0, 1, 0]
    p = [0.9, 0.1, 0.8, 0.2]
    m = classification_metrics(y, p, pred=[0, 1, 0, 1])
    assert m["accuracy"] == 0.0
    assert m["auroc"] == pytest.approx(1.0)


def test_single_class_gives_nan_auroc():
    m = classification_metrics([1, 1, 1], [0.2, 0.9, 0.7])
    assert math.isnan(m["auroc"])
    assert m["recall"] == pytest.approx(2 / 3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        classification_metrics([1, 0], [0.5])
    with pytest.raises(ValueError):
        classification_metrics([1, 2], [0.5, 0.5])
    with pytest.raises(ValueError):
        classification_metrics([1, 0], [np.nan, 0.5])
    with pytest.raises(ValueError):
        classification_metrics([], [])
