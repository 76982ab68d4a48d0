"""Bar 1 of issue 6: LQ-LoRA on SmolLM2-135M's real weights, WikiText-2 validation perplexity and weight
reconstruction error at 2.5 / 2.75 / 3 / 4.13 average bits per parameter (scales included, exact packed
storage), LQ-LoRA with and without Fisher weighting against plain NormalFloat at the same bits (the ILP
with rank 0, QLoRA-style: the LoRA factors start at zero), the fixed NF2/NF3/NF4 presets and the
unquantized model. Writes ``<out>/lq_lora_smollm2.json``.

Keys: ``ppl_gain_vs_nf3_at_2_75`` = perplexity of the NF3 preset (3.127 bits) minus that of Fisher-weighted
LQ-LoRA at a 2.75-bit budget (the paper's headline configuration; ``..._no_fisher`` for the unweighted
one); ``ilp_seconds`` = the longest single ILP solve over all matrices (HiGHS, relative gap ``--ilp-gap``,
default 1e-4 as Gurobi's; ``benchmarks/lq_ilp_gap.py`` compares it with exact solves); per variant
``ppl/<variant>``, ``recon_rel_err/<variant>`` (‖W − Q − L1L2‖ / ‖W‖ over all targeted matrices) and
``bits/<variant>`` (exact packed bits per quantized parameter).

Protocol: all 210 linear matrices of the 30 blocks (q, k, v, o, gate, up, down; the tied embedding /
head stays fp32), rank 64 and α = 16 as the official code, randomized SVD. Cost table on the 24-config
``SMALL_GRID`` (b ∈ {2,3,4,8} × B0 ∈ {16,32,64} × b0 ∈ {4,8}, fp16 group absmax, B1 = 256) with
``--cost-iters`` alternations per entry (the code's full 432-config grid with T_max = 100 does not fit
the 8-minute budget; ``--grid full`` runs it). Fisher: per-example squared gradients of the fp model on
``--calib`` blocks of WikiText-2 *test* (the reported perplexity is on *validation*; the paper
calibrates on C4). Perplexity: non-overlapping blocks of ``--block`` tokens over all of valid.txt.

Model weights on the GPU machine (no ``gguf`` there, and the GGUF / fp32 files are larger than what a
device call can carry): export once on a CPU machine with ``gguf`` installed,

    python benchmarks/lq_lora_smollm2.py --export-hf /path/smollm2_hf [--export-dtype float32]

(``load_smollm2()`` de-quantised, ``save_pretrained`` in 50 MB safetensors shards + tokenizer), move that
folder over and run

    python benchmarks/lq_lora_smollm2.py --model-dir /path/smollm2_hf          # H200: ~5-7 min (estimate)
    python benchmarks/lq_lora_smollm2.py --smoke                              # CPU, tiny Llama, < 1 min

``--smoke`` uses a random 2-layer Llama and 4 short blocks; it writes nothing unless ``--out`` is given.

Resumable across GPU sessions (session 4 ran it 24 minutes beside other jobs and lost two finished
cost tables at the deadline): every finished cost table and every evaluated variant is appended to
``--raw`` (default ``benchmarks/results/raw/lq_lora_smollm2.jsonl``) under a signature of the
options that shape it, and a rerun with the same options takes them from there. The Fisher pass
is recomputed only while a Fisher-weighted table or variant is still missing.

The cost tables are the slow part (~25,000 small decompositions; 798 s for one table on a shared
H200), so they can be built on a CPU machine with ``--tables-only`` (about an hour on 2 cores) and
carried in the raw file. The Fisher-weighted variants are evaluated last and their table is looked
up in the raw file again just before, so a table appended there while the GPU run evaluates the
others is used.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning_lora as ll  # noqa: E402
from lightning_lora.methods.lq_lora import LQLoRA, quantized_storage_bits, target_weights  # noqa: E402
from lightning_lora.quant import FULL_GRID, SMALL_GRID, build_cost_table, estimate_fisher, parse_config, solve_ilp  # noqa: E402
from lightning_lora.quant.ilp import DEFAULT_MIP_REL_GAP, CostTable, storage_table  # noqa: E402
from benchmarks.glue_harness import read_jsonl  # noqa: E402
from lightning_lora.results import current_command, write_result  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUDGETS = (2.5, 2.75, 3.0, 4.13)


#: SmolLM2-135M's architecture (its config.json), for --random-init timing / memory runs
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0)


def load_model(model_dir: str | None, smoke: bool, device: torch.device, random_init: bool = False) -> tuple[Any, Any]:
    """SmolLM2 (fp32) from an exported folder, from the GGUF package, the tiny Llama for --smoke, or
    (``random_init``) SmolLM2's architecture with random weights and no tokenizer (memory / timing only)."""
    if random_init:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG)).float().to(device).eval(), None
    if smoke:
        from lightning_lora.tasks.models import load_tiny_llama

        model, tok = load_tiny_llama(hidden_size=64, num_layers=2)
    elif model_dir:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_dir)
    else:
        from lightning_lora.tasks import load_smollm2

        model, tok = load_smollm2()
    return model.float().to(device).eval(), tok


def export_hf(directory: str, dtype: str) -> None:
    from lightning_lora.tasks import load_smollm2

    model, tok = load_smollm2()
    model.to(getattr(torch, dtype)).save_pretrained(directory, max_shard_size="50MB")
    tok.save_pretrained(directory)
    print(f"wrote {directory}")


def wikitext_blocks(tok: Any, split: str, block: int, limit: int | None) -> torch.Tensor:
    from lightning_lora.tasks.lm import make_blocks, tokenize_corpus
    from lightning_lora.tasks.paths import nlp_data_dir

    name = {"validation": "valid.txt", "test": "test.txt"}[split]
    text = (nlp_data_dir() / "wikitext2" / name).read_text(encoding="utf-8")
    blocks = make_blocks(tokenize_corpus(text, tok), block)
    return blocks if limit is None else blocks[:limit]


@torch.no_grad()
def perplexity(model: Any, blocks: torch.Tensor, device: torch.device, batch: int) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = blocks[i : i + batch].to(device)
        logits = model(input_ids=ids).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def reconstruction_error(model: Any, reference: dict[str, torch.Tensor]) -> float:
    num = den = 0.0
    for name, layer in ll.adapter_layers(model).items():
        w = reference[name]
        num += float((w - layer.merged_weight()).square().sum())
        den += float(w.square().sum())
    return math.sqrt(num / den)


def build_variant(base: Any, r: int, configs: dict[str, str], iters: int, fisher: dict[str, torch.Tensor] | None,
                  zero_lora: bool = False) -> Any:
    """A deep copy of ``base`` with LQ-LoRA at rank ``r`` (``zero_lora``: plain NF + zero B, QLoRA-style)."""
    model = copy.deepcopy(base)
    rank = max(r, 1)
    cfg = ll.make_config("lq_lora", r=rank, alpha=16.0 * rank / 64, matrix_configs=configs, max_iters=iters,
                         target_modules=TARGETS)
    if zero_lora:  # Q = NF(W), B = 0: decompose at rank 0 and inject that
        from lightning_lora.quant import lq_decompose

        weights = target_weights(model, target_modules=TARGETS)
        decs = {}
        for n, w in weights.items():
            d = lq_decompose(w, 0, configs[n])
            d.L1 = torch.zeros(w.shape[0], rank, device=w.device)
            g = torch.Generator(device="cpu").manual_seed(0)
            d.L2 = (torch.randn(rank, w.shape[1], generator=g) / math.sqrt(w.shape[1])).to(w.device)
            decs[n] = d
        ll.inject_adapter(model, LQLoRA(cfg, decompositions=decs))
    else:
        ll.inject_adapter(model, LQLoRA(cfg, fisher=fisher))
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=None, help="exported HF folder (see the docstring); default: GGUF package")
    p.add_argument("--export-hf", default=None, help="only write SmolLM2 as an HF folder here and exit")
    p.add_argument("--export-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--grid", choices=["small", "full"], default="small")
    p.add_argument("--cost-iters", type=int, default=5)
    p.add_argument("--final-iters", type=int, default=5, help="alternations for the chosen configs (same seeds)")
    p.add_argument("--calib", type=int, default=64, help="Fisher calibration blocks (batch size 1)")
    p.add_argument("--calib-block", type=int, default=512)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--eval-blocks", type=int, default=None, help="limit validation blocks (default: all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--raw", default=None,
                   help="finished cost tables and evaluations; a rerun with the same options skips them "
                        "(default benchmarks/results/raw/lq_lora_smollm2.jsonl; --smoke: none)")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS),
                   help="evaluate only these budgets' variants (the others come from --raw if there); "
                        "until every budget's variants exist the figures go to lq_lora_smollm2_partial.json")
    p.add_argument("--tables-only", action="store_true",
                   help="only the Fisher pass and the cost tables, recorded in --raw, then exit: they take about "
                        "an hour of one CPU core, so a CPU machine can build them and the GPU run only evaluates")
    p.add_argument("--ilp-gap", type=float, default=DEFAULT_MIP_REL_GAP,
                   help="HiGHS relative MIP gap (default: Gurobi's 1e-4; 0 proves optimality, up to ~8x slower)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: nothing)")
    args = p.parse_args(argv)
    if args.smoke:
        args.r, args.cost_iters, args.final_iters, args.calib, args.calib_block = 4, 2, 2, 2, 32
        args.block, args.eval_blocks, args.batch = 64, 4, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_hf:
        export_hf(args.export_hf, args.export_dtype)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 perplexities, no TF32 rounding
    t0 = time.perf_counter()
    base, tok = load_model(args.model_dir, args.smoke, device)
    val = wikitext_blocks(tok, "validation", args.block, args.eval_blocks)
    calib = wikitext_blocks(tok, "test", args.calib_block, args.calib)
    weights = target_weights(base, target_modules=TARGETS)
    print(f"{len(weights)} matrices, {sum(w.numel() for w in weights.values()):,} parameters; "
          f"{len(val)} validation blocks of {args.block}", flush=True)
    metrics: dict[str, Any] = {"matrices": len(weights), "rank": args.r, "val_blocks": len(val), "block": args.block}
    # finished pieces of an earlier (interrupted) run with the same options
    raw = Path(args.raw) if args.raw else (None if args.smoke else Path("benchmarks/results/raw/lq_lora_smollm2.jsonl"))
    sig = (f"{args.model_dir or 'gguf'}|{args.grid}|r{args.r}|cost{args.cost_iters}|final{args.final_iters}|"
           f"calib{args.calib}x{args.calib_block}|block{args.block}|eval{args.eval_blocks}")
    done = [row for row in read_jsonl(raw) if row.get("sig") == sig] if raw is not None and raw.exists() else []
    done_tables = {row["key"]: row for row in done if row["kind"] == "table"}
    done_evals = {row["tag"]: row["metrics"] for row in done if row["kind"] == "eval"}
    # the configs an ILP variant was evaluated with: a solve that now picks others is evaluated again
    done_choices = {row["tag"]: row.get("choice") for row in done if row["kind"] == "eval"}

    def record(row: dict[str, Any]) -> None:
        if raw is not None:
            raw.parent.mkdir(parents=True, exist_ok=True)
            with raw.open("a") as f:
                f.write(json.dumps({"sig": sig, **row}) + "\n")

    grid = SMALL_GRID if args.grid == "small" else FULL_GRID
    cfgs = [parse_config(c) for c in grid]
    tables: dict[str, CostTable] = {}
    fisher: dict[str, torch.Tensor] | None = None

    def reread() -> None:
        """Take in what another process recorded meanwhile (a CPU machine's --tables-only run)."""
        if raw is not None and raw.exists():
            rows = [row for row in read_jsonl(raw) if row.get("sig") == sig]
            done_tables.update({row["key"]: row for row in rows if row["kind"] == "table"})
            done_evals.update({row["tag"]: row["metrics"] for row in rows if row["kind"] == "eval"})
            done_choices.update({row["tag"]: row.get("choice") for row in rows if row["kind"] == "eval"})

    def need_fisher() -> dict[str, torch.Tensor]:
        """Per-parameter Fisher from the calibration blocks (per-example squared gradients), once."""
        nonlocal fisher
        if fisher is None:
            t = time.perf_counter()
            modules = {n: base.get_submodule(n).weight for n in weights}
            fisher = estimate_fisher(base, [{"input_ids": calib.to(device)}],
                                     lambda m, ex: m(input_ids=ex["input_ids"], labels=ex["input_ids"]).loss, modules)
            metrics["fisher_seconds"] = time.perf_counter() - t
            record({"kind": "eval", "tag": "fisher", "metrics": {"fisher_seconds": metrics["fisher_seconds"]}})
        return fisher

    def table(key: str) -> CostTable:
        """``key``'s cost table: from the raw file, else built (and recorded)."""
        row = done_tables.get(key)
        if row is not None and row["names"] == list(weights) and row["configs"] == [c.name for c in cfgs]:
            numels = [int(weights[n].numel()) for n in row["names"]]
            tables[key] = CostTable(row["names"], numels, cfgs, np.array(row["cost"]), storage_table(numels, cfgs))
            metrics[f"cost_table_seconds/{key}"] = row["seconds"]
            print(f"cost table {key}: from {raw}", flush=True)
            return tables[key]
        rank = 0 if key == "nf" else args.r
        f = need_fisher() if key == "lq_fisher" else None
        t = time.perf_counter()
        n_done = [0]

        def progress(name: str) -> None:
            n_done[0] += 1
            if n_done[0] % 30 == 0:
                print(f"cost table {key}: {n_done[0]}/{len(weights)} matrices, {time.perf_counter() - t:.0f} s", flush=True)

        tables[key] = build_cost_table(weights, rank, grid, max_iters=args.cost_iters, fisher=f, progress=progress)
        metrics[f"cost_table_seconds/{key}"] = time.perf_counter() - t
        record({"kind": "table", "key": key, "names": tables[key].names, "numels": tables[key].numels,
                "configs": [c.name for c in cfgs],
                "cost": tables[key].cost.tolist(), "seconds": metrics[f"cost_table_seconds/{key}"]})
        print(f"cost table {key}: {metrics[f'cost_table_seconds/{key}']:.1f} s", flush=True)
        return tables[key]

    if args.tables_only:
        for key in ("nf", "lq", "lq_fisher"):
            table(key)
        print(f"cost tables recorded in {raw}; the evaluation is left to a run without --tables-only", flush=True)
        return 0
    if "fisher" in done_evals:
        metrics.update(done_evals["fisher"])

    def evaluate(tag: str, build: Any, choice: list[str] | None = None) -> None:
        """``tag``'s figures: from the raw file when an earlier run finished them (with the same
        per-matrix ``choice`` for ILP variants), else ``build()``'s model."""
        if tag in done_evals and choice is not None and done_choices.get(tag) != choice:
            print(f"{tag}: the ILP now picks other configs than the recorded evaluation; evaluating again", flush=True)
            del done_evals[tag]
        if tag in done_evals:
            metrics.update(done_evals[tag])
            print(f"{tag}: from {raw}", flush=True)
            return
        model = build()
        found = {f"ppl/{tag}": perplexity(model, val, device, args.batch),
                 f"recon_rel_err/{tag}": reconstruction_error(model, weights)}
        bits, numel = quantized_storage_bits(model)
        found[f"bits/{tag}"] = bits / numel
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        metrics.update(found)
        record({"kind": "eval", "tag": tag, "metrics": found, **({} if choice is None else {"choice": choice})})
        print(f"{tag}: ppl {found[f'ppl/{tag}']:.3f}  recon {found[f'recon_rel_err/{tag}']:.4f}  "
              f"bits {found[f'bits/{tag}']:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    if "fp32" in done_evals:
        metrics["ppl/fp32"] = done_evals["fp32"]["ppl/fp32"]
    else:
        metrics["ppl/fp32"] = perplexity(base, val, device, args.batch)
        record({"kind": "eval", "tag": "fp32", "metrics": {"ppl/fp32": metrics["ppl/fp32"]}})
    for preset in ("nf2", "nf3", "nf4"):  # QLoRA-style: every matrix at the preset, LoRA B = 0
        evaluate(preset, lambda preset=preset: build_variant(base, args.r, {n: preset for n in weights}, 1, None,
                                                             zero_lora=True))
    ilp_seconds = 0.0
    missing: list[str] = []  # variants of budgets left out by --budgets and not in the raw file
    # the Fisher-weighted variants last: their table may still be being built on a CPU machine
    # (--tables-only), and is taken from the raw file if it lands there before this point
    for key in ("nf", "lq", "lq_fisher"):
        if key == "lq_fisher":
            reread()
        tab = table(key)
        for budget in BUDGETS:
            tag = f"{key}_{budget:g}"
            if budget not in args.budgets and tag not in done_evals:
                missing.append(tag)
                continue
            sol = solve_ilp(tab, budget, mip_rel_gap=args.ilp_gap)
            ilp_seconds = max(ilp_seconds, sol.seconds)
            metrics[f"ilp_solve_seconds/{tag}"] = sol.seconds
            configs = {n: c.name for n, c in sol.choice.items()}
            metrics[f"ilp_bits/{tag}"] = sol.bits_per_param
            metrics[f"mean_weight_bits/{tag}"] = sum(parse_config(c).bits * weights[n].numel() for n, c in configs.items()) / sum(
                w.numel() for w in weights.values())
            evaluate(tag, lambda configs=configs, key=key: build_variant(
                base, args.r, configs, args.final_iters, need_fisher() if key == "lq_fisher" else None,
                zero_lora=key == "nf"), choice=[configs[n] for n in tab.names])
    metrics["ilp_seconds"], metrics["ilp_mip_rel_gap"] = ilp_seconds, args.ilp_gap
    for key, tag in (("ppl_gain_vs_nf3_at_2_75", "lq_fisher_2.75"), ("ppl_gain_vs_nf3_at_2_75_no_fisher", "lq_2.75")):
        if f"ppl/{tag}" in metrics:
            metrics[key] = metrics["ppl/nf3"] - metrics[f"ppl/{tag}"]
    name = "lq_lora_smollm2"
    if missing:
        # the figures so far under another name (the bar's file waits for every budget's variants)
        print(f"left for a later run (--budgets): {missing}", flush=True)
        name, metrics["variants_missing"] = "lq_lora_smollm2_partial", len(missing)
    metrics["seconds"] = time.perf_counter() - t0
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
           if k.startswith(("ppl_gain", "ilp_seconds", "seconds"))}, flush=True)
    out = args.out if args.out is not None else (None if args.smoke else "benchmarks/results")
    if out is not None:
        print("wrote", write_result(name + ("_smoke" if args.smoke else ""), metrics,
                                    command=current_command(), directory=out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
