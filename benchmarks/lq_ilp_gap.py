"""LQ-LoRA's ILP on SmolLM2-135M's recorded cost tables: exact solves (HiGHS ``mip_rel_gap=0``) against
the library default (relative gap 1e-4, Gurobi's default). Writes ``benchmarks/results/lq_ilp_gap.json``.

Reads the NF, LQ and Fisher-weighted LQ tables that ``lq_lora_smollm2.py`` recorded in its raw file
(210 matrices × 24 configs each) and solves every table at every budget both ways, on this machine's
CPU. Keys per ``<table>_<budget>``: ``seconds_exact/…``, ``seconds_default/…``, ``objective_rel_excess/…``
(default objective over exact, minus 1), ``matrices_differing/…``; and the maxima over all solves,
``max_seconds_exact``, ``max_seconds_default``, ``max_objective_rel_excess``.

    python benchmarks/lq_ilp_gap.py          # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.glue_harness import read_jsonl  # noqa: E402
from benchmarks.lq_lora_smollm2 import BUDGETS  # noqa: E402
from lightning_lora.quant import parse_config, solve_ilp  # noqa: E402
from lightning_lora.quant.ilp import DEFAULT_MIP_REL_GAP, CostTable, storage_table  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--raw", default="benchmarks/results/raw/lq_lora_smollm2.jsonl")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    tables = [row for row in read_jsonl(Path(args.raw)) if row["kind"] == "table" and "numels" in row]
    if not tables:
        raise SystemExit(f"{args.raw}: no cost tables with matrix sizes (run lq_lora_smollm2.py --tables-only)")
    metrics: dict[str, float] = {"mip_rel_gap_default": DEFAULT_MIP_REL_GAP, "tables": len(tables)}
    for row in tables:
        cfgs = [parse_config(c) for c in row["configs"]]
        table = CostTable(row["names"], row["numels"], cfgs, np.array(row["cost"]), storage_table(row["numels"], cfgs))
        for budget in BUDGETS:
            tag = f"{row['key']}_{budget:g}"
            exact = solve_ilp(table, budget, mip_rel_gap=0.0)
            default = solve_ilp(table, budget)
            metrics[f"seconds_exact/{tag}"] = exact.seconds
            metrics[f"seconds_default/{tag}"] = default.seconds
            metrics[f"objective_rel_excess/{tag}"] = default.objective / exact.objective - 1.0
            metrics[f"matrices_differing/{tag}"] = sum(exact.choice[n] != default.choice[n] for n in table.names)
            print(f"{tag}: exact {exact.seconds:.2f} s, default {default.seconds:.2f} s, "
                  f"excess {metrics[f'objective_rel_excess/{tag}']:.2e}, "
                  f"{metrics[f'matrices_differing/{tag}']} matrices differ", flush=True)
    for kind in ("seconds_exact", "seconds_default", "objective_rel_excess"):
        metrics[f"max_{kind}"] = max(v for k, v in metrics.items() if k.startswith(kind + "/"))
    print("wrote", write_result("lq_ilp_gap", metrics, command=current_command(), directory=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
