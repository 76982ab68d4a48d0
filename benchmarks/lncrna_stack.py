"""Fit the cascade of the default lncRNA model on the validation split only.

    python benchmarks/lncrna_stack.py --probs benchmarks/results/lncrna_gpu_probs.npz --key val_mouse_full

Stage 1 is the feature baseline (lncrna/weights/baseline); stage 2 the transformer
(lncrna/weights/default). A logistic regression on ``[logit p_baseline, logit p_transformer]``
is fitted on the mouse part of validation (the only part with both classes; the species-shortcut
rule of docs/results.md), and the band ``(low, high)`` of baseline probabilities sent to the
transformer is chosen there too: the narrowest candidate band that keeps at least 90% of the
full stack's cross-validated MCC gain over the baseline (narrow = fast on a CPU); the fit is
``lncrna.predict.StackParams.fit``, which ``lncrna train`` also runs for a new classifier. No test
sequence is looked at. Writes ``lncrna/weights/default/stack.json`` and
``benchmarks/results/lncrna_stack.json``.

``--probs`` holds the transformer's validation probabilities from the GPU run
(benchmarks/lncrna_gpu_run.py); without it they are computed here (slow on a CPU). ``--data`` and
``--baseline`` pick another split and its baseline (the gene hold-out: ``--data data/lncrna_gene``);
the result is then ``lncrna_stack_<data folder>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lncrna.data import DEFAULT_OUT, load_split  # noqa: E402
from lncrna.features import DEFAULT_BASELINE_DIR  # noqa: E402
from lncrna.features import FeatureBaseline  # noqa: E402
from lncrna.predict import StackParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probs", default=None, help="npz with the transformer's validation probabilities")
    ap.add_argument("--key", default="val_mouse_full", help="array name in --probs")
    ap.add_argument("--model", default=str(ROOT / "lncrna/weights/default"))
    ap.add_argument("--data", type=Path, default=DEFAULT_OUT, help=f"built splits (default {DEFAULT_OUT})")
    ap.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE_DIR, help="feature baseline folder")
    args = ap.parse_args()
    val = load_split("val", args.data)
    mouse = (val.species == "mouse").to_numpy()
    y = val.label.to_numpy()[mouse]
    p_b = FeatureBaseline.load(args.baseline).predict_proba(list(val.seq))[mouse]
    if args.probs:
        p_t = np.load(args.probs)[args.key][mouse]
    else:
        from lncrna.model import NucleotideClassifier

        p_t = NucleotideClassifier.from_pretrained(args.model).predict_proba(list(val.seq[mouse]))
    stack, fit_metrics = StackParams.fit(y, p_b, p_t)
    metrics: dict[str, float] = {f"val_mouse_{k}": v for k, v in fit_metrics.items()}
    params = {**{k: getattr(stack, k) for k in StackParams.KEYS},
              "fitted_on": f"mouse part of the validation split (data/{args.data.name}/val.fa.gz)"}
    stack.save(Path(args.model) / "stack.json", fitted_on=params["fitted_on"])
    metrics.update({k: v for k, v in params.items() if isinstance(v, float)})
    result = {"name": "lncrna_stack", "command": "python benchmarks/lncrna_stack.py " + " ".join(sys.argv[1:]),
              "device": "cpu", "date": time.strftime("%Y-%m-%d"), "metrics": metrics}
    default_data = args.data.resolve() == DEFAULT_OUT.resolve()
    name = "lncrna_stack" if default_data else f"lncrna_stack_{args.data.name}"
    result["name"] = name
    out = ROOT / f"benchmarks/results/{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
