"""Stage-1 feature extraction of ``lncrna predict``: this checkout against an earlier revision, side by side.

    python benchmarks/lncrna_feature_speed.py --before d4d4f68     # writes lncrna_feature_speed.json

The shipped baseline's extractor (``lncrna/weights/baseline``: k-mers to 4, the ``extra``
features, its hexamer table) built from this checkout's ``lncrna/features.py`` and from the one at
``--before`` (read with ``git show`` into a temporary module). Both transform the same transcripts
in one process on one thread, in turn, ``--reps`` times; the figure is the median. Speed on the
first ``--n`` human test transcripts (median 2.6 kb) and validation transcripts (median 0.8 kb);
equality on every validation and human test transcript: the largest feature difference, whether
missing values fall in the same places and whether the baseline's probabilities are bit-identical.
Keys: ``<split>_seq_per_s``, ``<split>_before_seq_per_s``, ``<split>_speedup``,
``max_abs_feature_diff``, ``nan_pattern_equal``, ``proba_bit_identical``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_lora.results import write_result  # noqa: E402
from lncrna import features  # noqa: E402
from lncrna.data import load_split  # noqa: E402


def module_at(rev: str, tmp: str):
    """``lncrna/features.py`` as it was at ``rev``, imported as a module of its own."""
    path = Path(tmp) / "features_before.py"
    path.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:lncrna/features.py"],
                                   check=True, capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location("features_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision whose lncrna/features.py is the reference")
    ap.add_argument("--n", type=int, default=2000, help="transcripts per split for the speed")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    baseline = features.FeatureBaseline.load()
    with tempfile.TemporaryDirectory() as tmp:
        old = module_at(args.before, tmp)
        table = old.HexamerTable(baseline.hexamer.coding, baseline.hexamer.noncoding)
        table._counted = baseline.hexamer._counted.copy()
        before = old.FeatureExtractor(table, baseline.kmax, baseline.both_strands, baseline.use_kmers, baseline.extra)
        now = baseline.extractor
        metrics: dict[str, float] = {"n": args.n, "reps": args.reps, "loadavg_1m_at_start": os.getloadavg()[0]}
        splits = {"test_human": list(load_split("test_human").seq), "val": list(load_split("val").seq)}
        for split, seqs in splits.items():
            part = seqs[: args.n]
            metrics[f"{split}_median_nt"] = float(np.median([len(s) for s in part]))
            now.transform(part[:50]), before.transform(part[:50])  # warm-up
            t_now, t_before = [], []
            for _ in range(args.reps):
                for ext, ts in ((before, t_before), (now, t_now)):
                    t0 = time.perf_counter()
                    ext.transform(part)
                    ts.append(time.perf_counter() - t0)
            metrics[f"{split}_seq_per_s"] = len(part) / statistics.median(t_now)
            metrics[f"{split}_before_seq_per_s"] = len(part) / statistics.median(t_before)
            metrics[f"{split}_speedup"] = statistics.median(t_before) / statistics.median(t_now)
            print(f"{split}: {metrics[f'{split}_before_seq_per_s']:.0f} -> {metrics[f'{split}_seq_per_s']:.0f} seq/s "
                  f"({metrics[f'{split}_speedup']:.2f}x)", flush=True)
        diff, nan_equal, proba_equal, count = 0.0, True, True, 0
        for seqs in splits.values():
            x_before, x_now = before.transform(seqs), now.transform(seqs)
            nan_equal &= bool((np.isnan(x_before) == np.isnan(x_now)).all())
            diff = max(diff, float(np.abs(np.where(np.isnan(x_before), 0.0, x_before - x_now)).max()))
            proba_equal &= bool(np.array_equal(baseline.predict_proba_features(x_before),
                                               baseline.predict_proba_features(x_now)))
            count += len(seqs)
        metrics.update(equality_transcripts=count, max_abs_feature_diff=diff, nan_pattern_equal=float(nan_equal),
                       proba_bit_identical=float(proba_equal))
    print(metrics)
    path = write_result("lncrna_feature_speed", metrics, command="python benchmarks/lncrna_feature_speed.py "
                        + " ".join(sys.argv[1:]), directory=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
