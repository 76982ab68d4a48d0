"""Training throughput with Lightning's DDP on 2 GPUs over 1 GPU, LoRA through AdapterCallback.

    python benchmarks/ddp_scaling.py                      # needs 2 GPUs; writes benchmarks/results/ddp_scaling.json
    python benchmarks/ddp_scaling.py --accelerator cpu --tiny --steps 8 --warmup 2   # checks the script on a CPU (gloo)

Model: BERT-base (random weights, bf16-mixed), LoRA r = 16 on query/key/value/dense, batch
32 × 512 tokens per device, synthetic tokens (the input pipeline is not what is measured).
Throughput = samples per second over the steps after ``--warmup``, timed inside the training
loop on rank 0 (all ranks step together under DDP) between two synchronisations, with none in
between, so the host may run ahead of the GPU as in real training. Each device count runs in its
own process (``torchrun``-free: Lightning launches the DDP workers itself); 1-GPU and 2-GPU runs
alternate ``--repeats`` times and the figures are medians.

Diagnosis (session 8 measured 1.37, bar 1.8; docs/benchmarks.md, "DDP scaling"):

    python benchmarks/ddp_scaling.py --adapter none           # full fine-tuning: DDP's own scaling
    python benchmarks/ddp_scaling.py --static-graph --bucket-view --no-broadcast-buffers
    python benchmarks/ddp_scaling.py --profile runs/ddp_profile --repeats 1   # op tables and timelines of 6 steps, rank 0
    python benchmarks/ddp_scaling.py --compile --repeats 3   # torch.compile'd model: ddp_scaling_compiled.json

Lightning's per-step SIGTERM broadcast: Lightning 2.5+ broadcasts a flag from rank 0 and reads it
with ``.item()`` at the start of every batch when there is more than one rank, so the host waits for
the GPU to drain before it launches the next step (a one-GPU run skips it). ``AdapterCallback``
replaces it by the same check read one step later without that wait
(``lightning_lora.core.ddp_sync``). ``--with-lightning-sigterm`` adds two GPUs with Lightning's own
check (``AdapterCallback(async_sigterm_check=False)``: ``scaling_2gpu_lightning_sigterm``; sessions
10-12 timed it in every run).

DDP's arguments: ``AdapterCallback`` fills those the user left unset (``lightning_lora.core.ddp_defaults``:
``gradient_as_bucket_view=True``, and no per-forward buffer sync (``forward_sync_buffers=False``)
when no buffer changes in training, as here). With LoRA every repeat runs three configurations in turn: one GPU, two GPUs
(the callback's defaults: ``scaling_2gpu``, the bar's key) and two GPUs with DDP's own defaults
(``AdapterCallback(ddp_defaults=False)``: ``scaling_2gpu_ddp_defaults_off``). The flags
``--static-graph``, ``--bucket-view`` and ``--no-broadcast-buffers`` pass those values to
``DDPStrategy`` in every two-GPU configuration and write ``ddp_scaling_<flags>.json``, so a
diagnostic run never overwrites the bar's file (session 12 ran all three before the callback set any
of them: ``ddp_scaling_static_graph_bucket_view_no_broadcast_buffers*.json``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_one(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_lora.core.ddp_defaults import buffer_sync_argument
    from torch.utils.data import DataLoader, Dataset
    from transformers import BertConfig, BertForSequenceClassification

    import lightning_lora as ll

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if args.tiny else {}
    seq = 32 if args.tiny else args.seq

    class Tokens(Dataset):
        """Random tokens drawn once: a lookup per sample, so the input pipeline cannot set the pace
        (session 8's first runs drew 512 tokens per sample inside the two workers; the 1-GPU figure
        moved between 494 and 765 samples/s with and without that, so the host, not the loader,
        is what varies)."""

        def __init__(self, pool: int = 4096) -> None:
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, 30522, (pool, seq), generator=g)
            self.labels = torch.randint(0, 2, (pool,), generator=g)

        def __len__(self) -> int:
            return 10**6

        def __getitem__(self, i: int):
            return self.ids[i % len(self.ids)], self.labels[i % len(self.ids)]

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = BertForSequenceClassification(BertConfig(num_labels=2, **size))
            self.times: list[float] = []

        def training_step(self, batch, batch_idx):
            ids, y = batch
            return self.model(input_ids=ids, labels=y).loss

        def on_train_batch_start(self, batch, batch_idx) -> None:
            if args.profile and self.trainer.is_global_zero and batch_idx == args.warmup:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                                   + ([torch.profiler.ProfilerActivity.CUDA] if self.device.type == "cuda" else []))
                self.prof.start()

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            # no sync inside the timed window: the host may run ahead of the GPU as in real training;
            # the window starts and ends with one (steps after warm-up, the last step)
            if batch_idx in (args.warmup, args.steps - 1) and self.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            if getattr(self, "prof", None) is not None and batch_idx == args.warmup + 5:
                self.prof.stop()
                out = Path(args.profile)
                out.mkdir(parents=True, exist_ok=True)
                stem = f"ddp_profile_{args.devices}gpu_{args.adapter}"
                averages = self.prof.key_averages()
                tables = [averages.table(sort_by="self_cpu_time_total", row_limit=40)]
                if self.device.type == "cuda":  # what the GPU spends its time on (NCCL, the bucket copies)
                    tables.append(averages.table(sort_by="self_device_time_total", row_limit=40))
                (out / f"{stem}.txt").write_text("\n\n".join(tables))
                # the timeline (6 steps: where the GPU idles, waiting for the host or for the other rank),
                # gzipped for the 16 MiB a returned file may have
                trace = out / f"{stem}.json"
                self.prof.export_chrome_trace(str(trace))
                with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                trace.unlink()
                self.prof = None

        def configure_optimizers(self):
            params = ll.trainable_parameters(self) if args.adapter == "lora" else self.parameters()
            return torch.optim.AdamW(params, lr=1e-4)

    module = Module()
    if args.compile:  # compiled at the first forward, after AdapterCallback injected (LoRA's plain formula)
        module.model = torch.compile(module.model)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices,
        # only the flags given reach DDPStrategy: what is left unset, AdapterCallback's DDP defaults fill
        strategy=DDPStrategy(**({"static_graph": True} if args.static_graph else {}),
                             **({"gradient_as_bucket_view": True} if args.bucket_view else {}),
                             **({buffer_sync_argument(): False} if args.no_broadcast_buffers else {}))
        if args.devices > 1 else "auto",
        precision="bf16-mixed" if args.accelerator == "gpu" else "32-true", max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[ll.AdapterCallback("lora", r=16, alpha=32, target_modules=["query", "key", "value", "dense"],
                                      modules_to_save=["classifier"],
                                      async_sigterm_check=not args.lightning_sigterm_sync,
                                      ddp_defaults=not args.no_ddp_defaults)]
        if args.adapter == "lora" else [],
    )
    trainer.fit(module, DataLoader(Tokens(), batch_size=args.batch, num_workers=2))
    if trainer.is_global_zero:
        t = module.times[args.warmup:]  # t[0] and t[-1] after a sync; the steps between on the host's clock
        rate = (len(t) - 1) * args.batch * args.devices / (t[-1] - t[0])
        steps = sorted(b - a for a, b in zip(t, t[1:]))
        from lightning_lora.core import _lora_cpp

        cpp_on = int(_lora_cpp.status() == "on")  # whether the run ended on the C++ path
        Path(args.part).write_text(json.dumps({"devices": args.devices, "samples_per_s": rate,
                                               "median_step_ms": 1e3 * steps[len(steps) // 2], "cpp_path_on": cpp_on}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--devices", type=int, default=0, help="internal: run one device count")
    ap.add_argument("--part", default=None, help="internal: where one run writes its figure")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--adapter", choices=["lora", "none"], default="lora",
                    help="none: full fine-tuning, DDP's own scaling on the same model (the reference)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="1-GPU and 2-GPU runs alternate this many times; figures are medians (the host's "
                         "speed drifts: session 8's 1-GPU runs spread 494-765 samples/s)")
    ap.add_argument("--static-graph", action="store_true", help="DDP static_graph=True")
    ap.add_argument("--bucket-view", action="store_true", help="DDP gradient_as_bucket_view=True")
    ap.add_argument("--no-broadcast-buffers", action="store_true",
                    help="no buffer sync at the start of every forward (DDP forward_sync_buffers=False; "
                         "broadcast_buffers=False on a torch without it)")
    ap.add_argument("--profile", default=None,
                    help="directory: rank 0 profiles 6 steps after warm-up, a table per device count")
    ap.add_argument("--lightning-sigterm-sync", action="store_true",
                    help="internal (one run): AdapterCallback(async_sigterm_check=False)")
    ap.add_argument("--no-ddp-defaults", action="store_true",
                    help="internal (one run): AdapterCallback(ddp_defaults=False), DDP's own defaults")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model in every configuration (fewer, fused kernels: less host time "
                         "per step, which is what bounds this step); writes ddp_scaling_compiled.json")
    ap.add_argument("--with-lightning-sigterm", action="store_true",
                    help="also time 2 GPUs with Lightning's own per-step SIGTERM check (sessions 10-12)")
    args = ap.parse_args()
    if args.devices:
        return run_one(args)
    # label -> (devices, extra flags); the LoRA runs also time DDP's own defaults (AdapterCallback's
    # off) and, on request, Lightning's own per-step SIGTERM check
    configs = {"1gpu": (1, []), "2gpu": (2, [])}
    if args.adapter == "lora":
        configs["2gpu_ddp_defaults_off"] = (2, ["--no-ddp-defaults"])
        if args.with_lightning_sigterm:
            configs["2gpu_lightning_sigterm"] = (2, ["--lightning-sigterm-sync"])
    if args.accelerator == "gpu" and not args.compile and args.adapter == "lora":
        from lightning_lora.core import _lora_cpp

        # The C++ path (automatic on CUDA) built here once, before any run: every run's ranks then load it
        # at their first forward, and the figure is the steady state, not a minute of the Python path
        # while a background build runs (compiled runs take the plain formula: nothing to build)
        if _lora_cpp.mode_from_env() is _lora_cpp.AUTO and _lora_cpp._toolchain():
            _lora_cpp._build()
    runs: dict[str, list[dict]] = {label: [] for label in configs}
    for _ in range(args.repeats):
        for label, (n, extra) in configs.items():
            part = ROOT / f"runs/ddp_scaling_{label}.json"
            part.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "--devices", str(n), "--part", str(part)] + sys.argv[1:] + extra
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            runs[label].append(json.loads(part.read_text()))
    med = {label: {k: statistics.median(r[k] for r in runs[label]) for k in ("samples_per_s", "median_step_ms")}
           for label in runs}
    metrics = {"samples_per_s_1gpu": med["1gpu"]["samples_per_s"], "samples_per_s_2gpu": med["2gpu"]["samples_per_s"],
               "scaling_2gpu": med["2gpu"]["samples_per_s"] / med["1gpu"]["samples_per_s"],
               "median_step_ms_1gpu": med["1gpu"]["median_step_ms"], "median_step_ms_2gpu": med["2gpu"]["median_step_ms"],
               "repeats": args.repeats}
    for label in ("2gpu_ddp_defaults_off", "2gpu_lightning_sigterm"):
        if label in med:
            suffix = label.removeprefix("2gpu")
            metrics.update({f"samples_per_s_2gpu{suffix}": med[label]["samples_per_s"],
                            f"scaling_2gpu{suffix}": med[label]["samples_per_s"] / med["1gpu"]["samples_per_s"],
                            f"median_step_ms_2gpu{suffix}": med[label]["median_step_ms"]})
    for label in runs:  # every run, in order, so the drift is visible
        for i, r in enumerate(runs[label]):
            metrics[f"samples_per_s_{label}_run{i}"] = r["samples_per_s"]
        # 1 where every run of this configuration ended on the C++ path (rank 0's view)
        metrics[f"cpp_path_on_{label}"] = min(r.get("cpp_path_on", 0) for r in runs[label])
    import torch

    device = f"2 x {torch.cuda.get_device_name()}" if args.accelerator == "gpu" else "cpu (gloo)"
    # the bar's file only from the default configuration; diagnostic flags get their own file
    flags = [f for f in ("static_graph", "bucket_view", "no_broadcast_buffers") if getattr(args, f)]
    flags += [f"adapter_{args.adapter}"] if args.adapter != "lora" else []
    flags += [f"batch{args.batch}"] if args.batch != 32 else []
    flags += [f"seq{args.seq}"] if args.seq != 512 else []
    flags += ["profiled"] if args.profile else []
    flags += ["compiled"] if args.compile else []
    flags += ["tiny"] if args.tiny else []
    flags += [f"steps{args.steps}"] if args.steps != 60 else []
    name = "ddp_scaling" + "".join(f"_{f}" for f in flags)
    result = {"name": name, "command": "python benchmarks/ddp_scaling.py " + " ".join(sys.argv[1:]),
              "device": device, "date": time.strftime("%Y-%m-%d"), "metrics": metrics}
    out = ROOT / "benchmarks/results" / (f"{name}.json" if args.accelerator == "gpu" else "ddp_scaling_cpu_check.json")
    if args.accelerator == "gpu":
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
