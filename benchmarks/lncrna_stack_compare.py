"""Transformer runs compared inside the shipped cascade, on the test sets.

    python benchmarks/lncrna_stack_compare.py benchmarks/results/lncrna_gpu_probs.npz benchmarks/results/lncrna_gpu_probs_3.npz

Each ``probs.npz`` of ``benchmarks/lncrna_gpu_run.py`` holds one GPU run's transformer
probabilities on validation (``val_mouse_full``: the fully fine-tuned variant) and its chosen
variant's on both test sets. For each run the cascade of ``lncrna_stack.py`` is refitted on the
mouse part of validation only (logistic regression on the two logits; the band of baseline
probabilities sent to the transformer as in the shipped ``stack.json``) and scored on the human
and mouse test sets. This measures what shipping that run's transformer would give without
shipping it; the first file reproduces the shipped model's figures. Writes
``benchmarks/results/lncrna_stack_compare.json`` (``run<i>_<test>_<metric>``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.lncrna_stack import logit  # noqa: E402
from lncrna.data import load_split  # noqa: E402
from lncrna.features import FeatureBaseline  # noqa: E402
from lncrna.metrics import classification_metrics  # noqa: E402
from lncrna.predict import StackParams  # noqa: E402


def main() -> None:
    runs = sys.argv[1:]
    if not runs:
        raise SystemExit("usage: lncrna_stack_compare.py PROBS.npz [PROBS.npz ...]")
    baseline = FeatureBaseline.load()
    val = load_split("val")
    mouse = (val.species == "mouse").to_numpy()
    y_val = val.label.to_numpy()[mouse]
    pb_val = baseline.predict_proba(list(val.seq))[mouse]
    tests = {name: load_split(name) for name in ("test_human", "test_mouse")}
    pb_test = {name: baseline.predict_proba(list(df.seq)) for name, df in tests.items()}
    shipped = StackParams.load(ROOT / "lncrna/weights/default/stack.json")
    metrics: dict[str, float] = {"band_low": shipped.low, "band_high": shipped.high}
    for i, path in enumerate(runs, 1):
        probs = np.load(path)
        fit = LogisticRegression(C=1.0).fit(np.stack([logit(pb_val), logit(probs["val_mouse_full"][mouse])], 1), y_val)
        stack = StackParams(shipped.low, shipped.high, float(fit.coef_[0, 0]), float(fit.coef_[0, 1]),
                            float(fit.intercept_[0]))
        for name, df in tests.items():
            p_b = pb_test[name]
            p = np.where(stack.is_hard(p_b), stack.combine(p_b, probs[name]), p_b)
            m = classification_metrics(df.label.to_numpy(), p)
            for k in ("accuracy", "f1", "mcc", "auroc"):
                metrics[f"run{i}_{name}_{k}"] = float(m[k])
            print(f"run{i} ({path}) {name}: " + ", ".join(f"{k}={m[k]:.4f}" for k in ("accuracy", "f1", "mcc")), flush=True)
    result = {"name": "lncrna_stack_compare", "command": "python benchmarks/lncrna_stack_compare.py " + " ".join(runs),
              "device": "cpu", "date": time.strftime("%Y-%m-%d"), "metrics": metrics}
    (ROOT / "benchmarks/results/lncrna_stack_compare.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
