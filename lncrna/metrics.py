"""Binary classification metrics with lncRNA (label 1) as the positive class."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["classification_metrics", "METRIC_KEYS"]

METRIC_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "mcc", "auroc")


def classification_metrics(y_true: Sequence[int], prob: Sequence[float], threshold: float = 0.5,
                           pred: Sequence[int] | None = None) -> dict:
    """Metrics for P(lncRNA) scores ``prob`` against labels ``y_true`` (1 = lncRNA, 0 = mRNA).

    A sequence is called lncRNA when ``prob >= threshold``. Returns a flat dict: ``accuracy``,
    ``precision``, ``recall`` (sensitivity on lncRNA), ``specificity`` (recall on mRNA), ``f1``,
    ``mcc``, ``auroc`` (NaN when only one class is present), ``n``, ``n_pos``, ``tp``, ``fp``,
    ``tn``, ``fn``, ``threshold``. Precision/F1/MCC are 0 when undefined (sklearn's
    ``zero_division=0`` convention).

    ``pred`` (optional, 1 = lncRNA) overrides the thresholded calls, for tools whose own decision
    rule is not ``prob >= threshold`` (e.g. CPAT's cutoff on the coding probability); ``auroc`` is
    always computed from ``prob``.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        matthews_corrcoef,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true and prob differ in length: {y.shape[0]} vs {p.shape[0]}")
    if y.size == 0:
        raise ValueError("no samples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must be 0 (mRNA) or 1 (lncRNA)")
    if np.isnan(p).any():
        raise ValueError("prob contains NaN")
    if pred is None:
        pred = (p >= threshold).astype(np.int64)
    else:
        pred = np.asarray(pred).astype(np.int64).ravel()
        if pred.shape != y.shape or not np.isin(pred, (0, 1)).all():
            raise ValueError("pred must be 0/1 with the same length as y_true")
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    both = 0 < y.sum() < y.size
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, pos_label=1, zero_division=0)),
        "recall": float(recall_score(y, pred, pos_label=1, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if (tn + fp) else math.nan,
        "f1": float(f1_score(y, pred, pos_label=1, zero_division=0)),
        "mcc": float(matthews_corrcoef(y, pred)),
        "auroc": float(roc_auc_score(y, p)) if both else math.nan,
        "n": int(y.size),
        "n_pos": int(y.sum()),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": float(threshold),
    }
