"""One figure per variant from several ``lora_vs_peft.py --interleave`` runs (#2, bar 1, BERT).

    python benchmarks/lora_vs_peft_interleaved_summary.py benchmarks/results/raw/logs_session22/lvp_interleaved_s22_*.json

Each run's ``<model>_<variant>_vs_<peft>_paired`` key is the median, over the run's cycles, of the
variant's step time over PEFT's in the same cycle (``lora_vs_peft.py``, ``--interleave``): the one
ratio a drift of the host's pace does not move, since both steps of a cycle see the same host. A
run order biases a variant (the rotation starts with the first-named one), so the runs are taken in
pairs with the variants named forward and reversed, and only figures that agree across the runs
count: this script reports, per variant, the number of runs, the lowest, the median and the highest
paired ratio against the faster PEFT (bf16 adapters: ``peft_bf16``, which every run here found
faster than PEFT's defaults; checked per run), and the spread (highest minus lowest). The bar's
figure is the highest: every run has to be under the bar for the bar to hold.

Keys (``<m>`` the model, ``<v>`` the variant): ``<m>_<v>_vs_best_peft_paired_{min,median,max}``,
``<m>_<v>_runs``, ``<m>_<v>_vs_best_peft_paired_spread``; ``<m>_peft_bf16_faster_runs`` (runs in which
PEFT bf16's median step beat PEFT's defaults; the script refuses a run where it did not, since the
paired key would then not be against the best PEFT).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_lora.results import write_result  # noqa: E402

#: the default result name (session 22's runs, when ``ours`` was the Python path)
NAME = "lora_vs_peft_bert_interleaved"
PAIRED = re.compile(r"^(?P<model>[a-z0-9]+)_(?P<variant>[a-z0-9_]+)_vs_peft_bf16_paired$")


def summarize(records: list[dict]) -> dict[str, float]:
    """The summary metrics (module docstring) of the interleaved run records ``records``."""
    ratios: dict[tuple[str, str], list[float]] = {}
    faster: dict[str, int] = {}
    for rec in records:
        m = rec["metrics"]
        if not m.get("interleaved"):
            raise ValueError(f"{rec.get('command')}: not an --interleave run")
        models = {match["model"] for k in m if (match := PAIRED.match(k))}
        for model in models:
            bf16, default = m.get(f"{model}_peft_bf16_ms"), m.get(f"{model}_peft_default_ms")
            if bf16 is None or default is None:
                raise ValueError(f"{rec.get('command')}: needs both peft_bf16 and peft_default to name the best PEFT")
            if bf16 > default:
                raise ValueError(f"{rec.get('command')}: PEFT's defaults were faster than bf16 adapters; "
                                 "the paired keys are against peft_bf16, not the best PEFT")
            faster[model] = faster.get(model, 0) + 1
        for k, v in m.items():
            match = PAIRED.match(k)
            if match and match["variant"] not in ("peft_default",):
                ratios.setdefault((match["model"], match["variant"]), []).append(float(v))
    if not ratios:
        raise ValueError("no *_vs_peft_bf16_paired keys in the runs given")
    out: dict[str, float] = {}
    for (model, variant), rs in sorted(ratios.items()):
        key = f"{model}_{variant}_vs_best_peft_paired"
        out[f"{model}_{variant}_runs"] = len(rs)
        out[f"{key}_min"], out[f"{key}_median"], out[f"{key}_max"] = min(rs), statistics.median(rs), max(rs)
        out[f"{key}_spread"] = max(rs) - min(rs)
    for model, n in faster.items():
        out[f"{model}_peft_bf16_faster_runs"] = n
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="JSON files written by lora_vs_peft.py --interleave")
    ap.add_argument("--name", default=NAME, help="result name (its file name)")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results/")
    args = ap.parse_args()
    records = [json.loads(p.read_text(encoding="utf-8")) for p in args.runs]
    devices = sorted({r.get("device", "?") for r in records})
    metrics = summarize(records)
    # the options that decide where the result goes are part of the command that reproduces it
    options = (([] if args.name == NAME else ["--name", args.name])
               + ([] if args.out_dir is None else ["--out-dir", args.out_dir]))
    command = " ".join(["python", "benchmarks/lora_vs_peft_interleaved_summary.py", *options, *map(str, args.runs)])
    path = write_result(args.name, metrics, command, kind="benchmark", device="; ".join(devices),
                        directory=args.out_dir)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
