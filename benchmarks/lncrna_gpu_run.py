"""The lncRNA model's GPU run: MLM pretraining, adapter fine-tuning, evaluation, GPU throughput.

    python benchmarks/lncrna_gpu_run.py --out runs/lncrna --pretrain-minutes 6

Resumable across GPU sessions: ``--mlm-init DIR`` starts pretraining from an earlier run's MLM
(fp16 safetensors, small enough to come back from the lent GPU); ``--save-mlm DIR`` copies the MLM
this run ends with there (``benchmarks/checkpoints/...``: into git, since ignored files do not
survive from one session's checkout to the next). Every figure goes to
``<out>/lncrna_gpu_run.json`` and the chosen classifier to ``<out>/classifier``. ``--data`` picks
the built splits (``data/lncrna``, or ``data/lncrna_gene`` for the gene hold-out); pretraining and
fine-tuning read only its ``train`` and ``val``.

Choice of training set (species shortcut, see docs/results.md): fine-tuning on mouse only and on
mixed species (mouse + human lncRNA) are both run; the choice is made on the validation split
only, by the mouse part of validation (the only part that holds both classes) — never on a test set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lncrna.data import DEFAULT_OUT  # noqa: E402
from lncrna.data import load_split as _load_split  # noqa: E402
from lncrna.metrics import classification_metrics  # noqa: E402
from lncrna.model import ModelConfig  # noqa: E402
from lncrna.train import finetune, pretrain  # noqa: E402


DEVICE = "cuda"


def evaluate(model, name: str, df, metrics: dict, prefix: str) -> np.ndarray:
    t0 = time.perf_counter()
    prob = model.predict_proba(list(df.seq), device=DEVICE)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    m = classification_metrics(df.label.to_numpy(), prob)
    for k, v in m.items():
        metrics[f"{prefix}{name}_{k}"] = float(v)
    metrics[f"{prefix}{name}_seq_per_s"] = len(df) / dt
    print(f"{prefix}{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()) + f", {len(df) / dt:.0f} seq/s", flush=True)
    return prob


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/lncrna")
    ap.add_argument("--mlm-init", default=None, help="MLM folder of an earlier run to continue from")
    ap.add_argument("--pretrain-epochs", type=int, default=40,
                    help="epochs of the MLM pretraining; it stops at this or at --pretrain-minutes, whichever comes "
                         "first, and the LR schedule (warmup, cosine decay) is sized by the epochs, so pick them to fit "
                         "the minutes (the gene split: 40 epochs in 318 s on one H200)")
    ap.add_argument("--pretrain-minutes", type=float, default=6.0)
    ap.add_argument("--finetune-epochs", type=int, default=8)
    ap.add_argument("--finetune-minutes", type=float, default=2.0)
    ap.add_argument("--species", nargs="+", default=["mouse", "mixed"])
    ap.add_argument("--variants", nargs="+", default=["lora:16"],
                    help="fine-tuning variants, each METHOD:RANK or 'full'; species x variants are all run")
    ap.add_argument("--data", type=Path, default=DEFAULT_OUT, help=f"built splits (default {DEFAULT_OUT})")
    ap.add_argument("--save-mlm", type=Path, default=None, help="copy the final MLM folder here")
    ap.add_argument("--smoke", action="store_true", help="tiny model, data slices, CPU: checks the script only")
    args = ap.parse_args()
    data_root = args.data
    load_split = lambda name: _load_split(name, data_root)  # noqa: E731
    global DEVICE
    model_cfg = ModelConfig()
    tk = {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "enable_progress_bar": False}
    if args.smoke:
        DEVICE = "cpu"
        full = _load_split
        load_split = lambda name, root=data_root: full(name, root).groupby(["species", "label"]).head(10)  # noqa: E731
        import lncrna.data
        lncrna.data.load_split = load_split
        model_cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, window_tokens=64)
        tk = {"accelerator": "cpu", "enable_progress_bar": False}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    metrics: dict[str, float] = {}
    t0 = time.time()
    if args.pretrain_minutes > 0:
        mlm = pretrain(out, cfg=model_cfg, epochs=args.pretrain_epochs, max_minutes=args.pretrain_minutes,
                       trainer_kwargs=tk, init_dir=args.mlm_init, data_root=data_root)
    else:
        mlm = Path(args.mlm_init)
    metrics["pretrain_seconds"] = time.time() - t0
    if args.pretrain_minutes > 0 and metrics["pretrain_seconds"] < 0.8 * 60 * args.pretrain_minutes:
        # the epoch cap, not the time budget, ended pretraining: say so, the run's minutes were not all used
        print(f"pretraining stopped by --pretrain-epochs {args.pretrain_epochs} after "
              f"{metrics['pretrain_seconds']:.0f} s of the {args.pretrain_minutes:g} minutes", flush=True)
    if args.save_mlm is not None and args.pretrain_minutes > 0:
        shutil.copytree(mlm, args.save_mlm, dirs_exist_ok=True)
        print(f"MLM copied to {args.save_mlm}", flush=True)

    val = load_split("val")
    val_mouse = val[val.species == "mouse"]
    tests = {"test_human": load_split("test_human"), "test_mouse": load_split("test_mouse")}
    models = {}
    val_probs = {}
    for species in args.species:
        for variant in args.variants:
            key = species if len(args.variants) == 1 else f"{species}_{variant.replace(':', '')}"
            method, _, rank = variant.partition(":")
            adapter = {"r": int(rank), "alpha": 2 * int(rank)} if rank else None
            t1 = time.time()
            lr = 3e-4 if method == "full" else 1e-3
            model = finetune(out / f"ft_{key}", mlm_dir=mlm, method=method, adapter=adapter, species=species, lr=lr,
                             epochs=args.finetune_epochs, max_minutes=args.finetune_minutes, trainer_kwargs=tk,
                             data_root=data_root)
            metrics[f"{key}_finetune_seconds"] = time.time() - t1
            model = model.to(DEVICE)
            val_probs[key] = evaluate(model, "val", val, metrics, f"{key}_")
            evaluate(model, "val_mouse", val_mouse, metrics, f"{key}_")
            models[key] = model
    chosen = max(models, key=lambda s: metrics[f"{s}_val_mouse_mcc"])
    metrics["chosen_is_mouse_only"] = float(chosen.startswith("mouse"))
    print("chosen on validation:", chosen, flush=True)
    model = models[chosen]
    probs = {f"val_{k}": v for k, v in val_probs.items()}
    for name, df in tests.items():
        probs[name] = evaluate(model, name, df, metrics, "")
    np.savez(out / "probs.npz", **probs)  # for the stacker, fitted on validation only (lncrna/stack.py)
    for species in models:
        if species != chosen:
            for name, df in tests.items():  # reported for the species-shortcut table, not used to choose
                evaluate(models[species], name, df, metrics, f"{species}_")
    # LoRA-BERT's truncation (first window only) with the same weights, for the long-transcript table
    model.cfg.pool = "first"
    for name, df in tests.items():
        evaluate(model, name, df, metrics, "first_window_")
    model.cfg.pool = "max"
    model.save_pretrained(out / "classifier")
    metrics = {k: v for k, v in metrics.items() if not k.endswith(("_tp", "_fp", "_tn", "_fn", "_threshold", "_n", "_n_pos"))}
    result = {
        "name": "lncrna_gpu_run",
        "command": "python benchmarks/lncrna_gpu_run.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "data": f"data/{Path(data_root).name}",
        "date": time.strftime("%Y-%m-%d"),
        "metrics": metrics,
    }
    (out / "lncrna_gpu_run.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
