"""Issue #5, LoRA-SB: does a larger gradient estimate for its initialisation close the gap to LoRA?

LoRA-SB initialises its frozen factors from an SVD of the full-weight gradient averaged over
``n_init_batches`` training batches (default 8; the official code uses 2 on GLUE). This runs the
carved-slice run the learning-rate choice of ``structure_init_glue.py`` uses (SST-2, 400 steps,
seed 0, r = 16, dropout 0.05, lr 1e-2: LoRA-SB's chosen rate) at each ``--batches`` value and
reports the held-out slice accuracy; the GLUE dev set is not read for any choice. LoRA's figure on
the same slice is in ``raw/structure_init_glue.jsonl`` (``sweep/lora/lr0.002``).

Keys: ``holdout_accuracy_batches<N>`` and ``dev_accuracy_batches<N>`` (fractions), ``adapter_params``.

    python benchmarks/lora_sb_init_batches.py                 # 2 CPU cores: about 5 minutes per value
    python benchmarks/lora_sb_init_batches.py --batches 8 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.glue_harness import GlueRun, train_glue  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="result directory (default benchmarks/results)")
    args = p.parse_args(argv)
    metrics: dict[str, float] = {"steps": args.steps}
    for n in args.batches:
        run = GlueRun("lora_sb", "sst2", 0, {"r": 16, "dropout": 0.05, "n_init_batches": n}, lr=1e-2,
                      steps=args.steps, holdout=True, tag=f"lora_sb/init{n}")
        r = train_glue(run, device=args.device)
        metrics[f"holdout_accuracy_batches{n}"] = r["holdout_accuracy"]
        metrics[f"dev_accuracy_batches{n}"] = r["accuracy"]
        metrics["adapter_params"] = r["adapter_params"]
        print(f"n_init_batches {n}: holdout {r['holdout_accuracy']:.4f}, dev {r['accuracy']:.4f}", flush=True)
    print("wrote", write_result("lora_sb_init_batches", metrics, command=current_command(), directory=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
