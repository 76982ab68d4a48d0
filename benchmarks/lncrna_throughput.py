"""Throughput of ``lncrna predict`` on the 8,000-transcript human test, on a GPU and on the CPU.

    python benchmarks/lncrna_throughput.py --device cuda            # on the GPU machine
    python benchmarks/lncrna_throughput.py --device cpu --with-cpc2 # here: 2 cores, CPC2 in the same run

Timed: the whole pipeline of :class:`lncrna.predict.Predictor` from the FASTA file (reading and
validation, features, tokenisation, transformer, stacking), after the model is loaded and one
small warm-up chunk has run; with the cascade (default) and without it (every transcript through
the transformer). The GPU run writes ``lncrna_throughput_gpu.json``; the CPU run writes
``lncrna_throughput.json`` and folds in the GPU file's figures when it timed the same model
(``model_crc32``, over the shipped model's files) with the same pipeline code (``code_crc32``, over
``lncrna/*.py``: session 7's batched features changed the speed, not the model), so the final file
holds ``gpu_seq_per_s``, ``cpu_seq_per_s`` and ``cpc2_cpu_seq_per_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lncrna.data import load_split  # noqa: E402
from lncrna.fasta import FastaRecord, read_fasta, write_fasta  # noqa: E402
from lncrna.predict import Predictor  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: the shipped model's files: a GPU figure is folded into the CPU file only if it timed the same model
MODEL_DIRS = (ROOT / "lncrna" / "weights" / "default", ROOT / "lncrna" / "weights" / "baseline")


def files_crc32(files) -> int:
    """CRC-32 over files' names and bytes, in the order given."""
    crc = 0
    for f in files:
        crc = zlib.crc32(f.name.encode() + f.read_bytes(), crc)
    return crc


def model_crc32() -> int:
    """CRC-32 over the shipped model's files (names and bytes, in name order per folder)."""
    return files_crc32(f for d in MODEL_DIRS for f in sorted(p for p in d.iterdir() if p.is_file()))


def code_crc32() -> int:
    """CRC-32 over the pipeline's code (``lncrna/*.py``), so figures of different code are not mixed."""
    return files_crc32(sorted((ROOT / "lncrna").glob("*.py")))


def time_predictor(fasta: Path, device: str, cascade: bool, workers: int | None) -> tuple[float, int, dict]:
    pred = Predictor(device=device, cascade=cascade, workers=workers)
    warm = [r for _, r in zip(range(256), read_fasta(fasta))]
    list(pred.predict_records(warm))
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    pred.stats.reset()
    t0 = time.perf_counter()
    n = sum(1 for _ in pred.predict_fasta(fasta))
    dt = time.perf_counter() - t0
    stats = {k: v for k, v in vars(pred.stats).items() if isinstance(v, (int, float))}
    info = {"workers": pred.workers, "batch_tokens": pred.batch_tokens, **stats}
    pred.close()
    return n / dt, n, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="only the first N sequences (to check the script)")
    ap.add_argument("--no-cascade", action="store_true",
                    help="also time the pipeline without the cascade (default on a GPU; hours on a laptop CPU)")
    ap.add_argument("--with-cpc2", action="store_true", help="time CPC2 on the same file in this run")
    args = ap.parse_args()
    df = load_split("test_human")
    if args.limit:
        df = df.head(args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        fasta = Path(tmp) / "test_human.fa"
        write_fasta((FastaRecord(f"s{i}", f"s{i}", s) for i, s in enumerate(df.seq)), fasta)
        kind = "gpu" if args.device.startswith("cuda") else "cpu"
        metrics: dict[str, float] = {"n_sequences": len(df), "loadavg_1m_at_start": os.getloadavg()[0],
                                     "model_crc32": model_crc32(), "code_crc32": code_crc32()}
        modes = (True, False) if (kind == "gpu" or args.no_cascade) else (True,)
        for cascade in modes:
            rate, n, info = time_predictor(fasta, args.device, cascade, args.workers)
            key = f"{kind}_seq_per_s" if cascade else f"{kind}_no_cascade_seq_per_s"
            metrics[key] = rate
            for k, v in info.items():
                metrics[f"{key.removesuffix('_seq_per_s')}_{k}"] = v
            print(f"{key}: {rate:.1f} ({info})", flush=True)
        if args.with_cpc2:
            from benchmarks.lncrna_peers.run import cpc2_predictor

            ids = [f"s{i}" for i in range(len(df))]
            t0 = time.perf_counter()
            cpc2_predictor(ids, list(df.seq), fasta, "human")
            metrics["cpc2_cpu_seq_per_s"] = len(df) / (time.perf_counter() - t0)
            print(f"cpc2_cpu_seq_per_s: {metrics['cpc2_cpu_seq_per_s']:.1f}", flush=True)
    name = "lncrna_throughput_gpu" if kind == "gpu" else "lncrna_throughput"
    if args.limit:
        print("--limit given: nothing written")
        return
    device = "cpu, %d cores" % os.cpu_count()
    if kind == "gpu":
        import torch

        device = f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    command = "python benchmarks/lncrna_throughput.py " + " ".join(sys.argv[1:])
    gpu_file = RESULTS / "lncrna_throughput_gpu.json"
    gpu = json.loads(gpu_file.read_text()) if kind == "cpu" and gpu_file.exists() else None
    for key, what in (("model_crc32", "another model"), ("code_crc32", "other pipeline code")):
        if gpu is not None and gpu["metrics"].get(key) != metrics[key]:
            print(f"lncrna_throughput_gpu.json timed {what} ({key} differs): its figures are left out; "
                  "run the GPU part again", flush=True)
            gpu = None
    if gpu is not None:
        metrics.update({k: v for k, v in gpu["metrics"].items() if k.startswith("gpu_")})
        command = f"{gpu['command']}  (on {gpu['device']});  {command}"
        device = f"{gpu['device']} for gpu_*; {device} for cpu_* and cpc2_*"
    result = {"name": name, "command": command, "device": device, "date": time.strftime("%Y-%m-%d"), "metrics": metrics}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
