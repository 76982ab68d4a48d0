"""Run peer lncRNA predictors (CPAT, CPC2), our feature baseline and (when available) our main model
on the same test FASTA, time each, and write ``benchmarks/results/<name>.json``.

    python -m benchmarks.lncrna_peers.run                  # human + mouse test, all predictors found
    python -m benchmarks.lncrna_peers.run --test human --skip cpc2
    python -m benchmarks.lncrna_peers.run --model lncrna.predict:predict_proba

Every predictor sees exactly the same sequences: the test split is loaded with
``lncrna.data.load_split`` and written once to a plain FASTA whose ids are ``s0, s1, ...``; the
peer tools run on that file as subprocesses, our predictors run in-process on the same strings.
``seq_per_s`` = sequences / wall-clock seconds of the whole prediction (tool start-up, feature
extraction, model, file I/O of the tool included; loading our model weights included too).

Result keys (flat): for peers ``<prefix>_<metric>`` with prefixes ``cpat``, ``cpc2``, ``baseline``;
our main model gets unprefixed keys (``accuracy``, ``f1``, ``mcc``, ``auroc``, ``seq_per_s``, ...).
lncRNA is the positive class everywhere; peers' coding probability p gives P(lncRNA) = 1 - p.

Output files: ``lncrna_peers_{human,mouse}.json`` while no main model is plugged in;
``lncrna_human_cpat_test.json`` / ``lncrna_mouse_test.json`` once one is (see ``main_model``).
With ``--data`` naming another split folder the names end in ``_<folder>`` (the gene hold-out:
``lncrna_mouse_test_lncrna_gene.json``). ``--model-dir`` and ``--baseline-dir`` score a model
trained on that split instead of the shipped one:

    python -m benchmarks.lncrna_peers.run --data data/lncrna_gene --model-dir DIR --baseline-dir DIR
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lncrna.metrics import classification_metrics

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results"
RAW_DIR_CANDIDATES = [REPO.parent / "shared" / "data" / "raw", Path("/work/shared/data/raw")]

# test split name -> (CPAT model prefix, CPAT recommended cutoff, result-file stems)
TESTS = {
    "human": dict(split="test_human", cpat_species="Human", cpat_cutoff=0.364,
                  peers_name="lncrna_peers_human", final_name="lncrna_human_cpat_test"),
    "mouse": dict(split="test_mouse", cpat_species="Mouse", cpat_cutoff=0.44,
                  peers_name="lncrna_peers_mouse", final_name="lncrna_mouse_test"),
}

REPORTED = ("accuracy", "precision", "recall", "f1", "mcc", "auroc")


@dataclass
class Prediction:
    """P(lncRNA) per sequence (for AUROC) and, optionally, the tool's own lncRNA calls (1/0) for
    the thresholded metrics (otherwise ``prob >= threshold``)."""

    prob: np.ndarray
    pred: np.ndarray | None = None
    threshold: float = 0.5
    extra: dict = field(default_factory=dict)


# A predictor takes (ids, seqs, fasta_path, test_key) and returns a Prediction (or a bare array of
# P(lncRNA), which is thresholded at 0.5). Our in-process models simply ignore ids / fasta / test_key.
Predictor = Callable[[Sequence[str], Sequence[str], Path, str], "Prediction | np.ndarray"]


# ----------------------------------------------------------------------------------------------
# peers
# ----------------------------------------------------------------------------------------------
def _raw_dir() -> Path:
    for p in RAW_DIR_CANDIDATES:
        if p.is_dir():
            return p
    raise FileNotFoundError("shared/data/raw not found")


def _tool(name: str) -> str:
    """Locate a peer executable: $LNCRNA_PEER_BIN, then next to this python, then PATH."""
    cands = []
    if os.environ.get("LNCRNA_PEER_BIN"):
        cands.append(Path(os.environ["LNCRNA_PEER_BIN"]) / name)
    cands.append(Path(sys.executable).parent / name)
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (see benchmarks/lncrna_peers/README.md)")
    return found


def cpat_predictor(ids, seqs, fasta: Path, test_key: str) -> Prediction:
    """CPAT 3.0.5 with its own prebuilt human / mouse hexamer table + logit model and recommended
    cutoff. Sequences without any ORF > 75 nt are absent from CPAT's output: coding prob 0."""
    cfg = TESTS[test_key]
    raw = _raw_dir() / "cpat"
    sp = cfg["cpat_species"]
    with tempfile.TemporaryDirectory(prefix="cpat_") as wd:
        cmd = [_tool("cpat"), "-g", str(fasta), "-x", str(raw / f"{sp}_Hexamer.tsv"),
               "-d", str(raw / f"{sp}_logitModel.RData"), "-o", str(Path(wd) / "out"),
               "--log-file", str(Path(wd) / "cpat.log")]
        subprocess.run(cmd, cwd=wd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = Path(wd) / "out.ORF_prob.best.tsv"
        coding = {}
        with open(best) as fh:
            header = fh.readline().rstrip("\n").split("\t")
            col = header.index("Coding_prob")
            for line in fh:
                f = line.rstrip("\n").split("\t")
                coding[f[0]] = float(f[col])
    # CPAT upper-cases ids
    cp = np.array([coding.get(i.upper(), 0.0) for i in ids])
    n_missing = int(sum(i.upper() not in coding for i in ids))
    return Prediction(prob=1.0 - cp, pred=(cp < cfg["cpat_cutoff"]).astype(np.int64),
                      extra={"no_orf": n_missing, "cutoff": cfg["cpat_cutoff"]})


def cpc2_predictor(ids, seqs, fasta: Path, test_key: str) -> Prediction:
    """CPC2 (cpc2-standalone 1.0.9), forward strand (its default)."""
    with tempfile.TemporaryDirectory(prefix="cpc2_") as wd:
        out = Path(wd) / "out"
        subprocess.run([_tool("cpc2"), "-i", str(fasta), "-o", str(out)], cwd=wd, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        prob, label = {}, {}
        with open(str(out) + ".txt") as fh:
            header = fh.readline().lstrip("#").rstrip("\n").split("\t")
            ci, li = header.index("coding_probability"), header.index("label")
            for line in fh:
                f = line.rstrip("\n").split("\t")
                prob[f[0]] = float(f[ci])
                label[f[0]] = f[li]
    cp = np.array([prob[i] for i in ids])
    pred = np.array([1 if label[i] == "noncoding" else 0 for i in ids])
    return Prediction(prob=1.0 - cp, pred=pred)


def baseline_predictor(path: str | Path | None = None) -> Predictor:
    """Our shipped FeatureBaseline (``lncrna/weights/baseline``); weight loading is timed too."""

    def predict(ids, seqs, fasta, test_key):
        from lncrna.features import DEFAULT_BASELINE_DIR, FeatureBaseline

        model = FeatureBaseline.load(path or DEFAULT_BASELINE_DIR)
        return Prediction(prob=model.predict_proba(list(seqs)), threshold=model.threshold)

    return predict


def main_model(model_dir: str | Path | None = None, baseline_dir: str | Path | None = None) -> Predictor | None:
    """THE hook for our main model: return a predictor ``(ids, seqs, fasta, test_key) ->
    Prediction | P(lncRNA) array`` or None while it does not exist. Its metrics are written under
    unprefixed keys and the results go to the final files (``lncrna_human_cpat_test.json``,
    ``lncrna_mouse_test.json``). ``--model module:function`` overrides this with any callable
    ``function(seqs: list[str]) -> P(lncRNA) array``. ``model_dir`` / ``baseline_dir``: the
    cascade from these folders instead of the shipped ones (loaded inside the timed call, as the
    shipped model's lazy load is).
    """
    if model_dir is not None or baseline_dir is not None:
        from lncrna.predict import Predictor as CascadePredictor

        def predict(ids, seqs, fasta, test_key):
            with CascadePredictor(model_dir, baseline_dir=baseline_dir) as cascade:
                return np.asarray(cascade.predict_sequences(list(seqs)), dtype=np.float64)

        return predict
    try:
        mod = importlib.import_module("lncrna.predict")
    except ImportError:
        return None
    fn = getattr(mod, "predict_proba", None)
    if fn is None:
        return None
    return lambda ids, seqs, fasta, test_key: np.asarray(fn(list(seqs)), dtype=np.float64)


def _model_from_spec(spec: str) -> Predictor:
    mod, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(mod), name or "predict_proba")
    return lambda ids, seqs, fasta, test_key: np.asarray(fn(list(seqs)), dtype=np.float64)


PEERS: dict[str, Callable[..., Predictor]] = {
    "cpat": lambda baseline_dir=None: cpat_predictor,
    "cpc2": lambda baseline_dir=None: cpc2_predictor,
    "baseline": baseline_predictor,
}


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def device_string() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:
        ncpu = os.cpu_count()
    return f"CPU only: {cpu}, {ncpu} cores usable, no GPU"


def write_result(name: str, command: str, metrics: dict, out_dir: Path = RESULTS_DIR) -> Path:
    """``benchmarks/results/<name>.json`` = {name, command, device, date, metrics (flat str->number)}.
    NaN values become null."""
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, np.bool_)):
            v = int(v)
        if isinstance(v, (np.integer,)):
            v = int(v)
        if isinstance(v, (float, np.floating)):
            v = None if math.isnan(float(v)) else float(v)
        if v is not None and not isinstance(v, (int, float)):
            raise TypeError(f"metric {k!r} is not a number: {v!r}")
        flat[k] = v
    doc = {"name": name, "command": command, "device": device_string(),
           "date": _dt.date.today().isoformat(), "metrics": flat}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def run_one(pred_fn: Predictor, ids, seqs, y, fasta: Path, test_key: str) -> dict:
    t0 = time.perf_counter()
    out = pred_fn(ids, seqs, fasta, test_key)
    wall = time.perf_counter() - t0
    if not isinstance(out, Prediction):
        out = Prediction(prob=np.asarray(out, dtype=np.float64))
    m = classification_metrics(y, out.prob, threshold=out.threshold, pred=out.pred)
    res = {k: m[k] for k in REPORTED}
    res["seq_per_s"] = len(seqs) / wall
    res["wall_s"] = wall
    for k, v in out.extra.items():
        if isinstance(v, (int, float, np.integer, np.floating)):
            res[k] = v
    return res


def evaluate(test_key: str, predictors: dict[str, Predictor], log=print, data: Path | None = None) -> dict:
    """Run every predictor (key = metric prefix, '' for our main model) on one test split of the
    built splits in ``data`` (default ``data/lncrna``)."""
    from lncrna.data import DEFAULT_OUT, load_split

    df = load_split(TESTS[test_key]["split"], data if data is not None else DEFAULT_OUT)
    ids = [f"s{i}" for i in range(len(df))]
    seqs = df["seq"].tolist()
    y = df["label"].to_numpy()
    metrics = {"n_sequences": len(df), "n_lncrna": int(y.sum()), "n_mrna": int((y == 0).sum()),
               "mean_length": float(np.mean([len(s) for s in seqs]))}
    if hasattr(os, "getloadavg"):  # timings are wall clock: record how busy the machine was
        metrics["loadavg_1m_at_start"] = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lncrna_peers_") as wd:
        fasta = Path(wd) / f"{test_key}.fa"
        with open(fasta, "w") as fh:
            for i, s in zip(ids, seqs):
                fh.write(f">{i}\n")
                for j in range(0, len(s), 100):
                    fh.write(s[j : j + 100] + "\n")
        for prefix, fn in predictors.items():
            log(f"[{test_key}] running {prefix or 'main model'} on {len(seqs)} sequences ...")
            res = run_one(fn, ids, seqs, y, fasta, test_key)
            log(f"[{test_key}] {prefix or 'main model'}: " +
                ", ".join(f"{k}={v:.4f}" for k, v in res.items() if isinstance(v, float)))
            for k, v in res.items():
                metrics[f"{prefix}_{k}" if prefix else k] = v
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lncrna_peers.run", description=__doc__.split("\n")[0])
    ap.add_argument("--test", choices=["human", "mouse", "both"], default="both")
    ap.add_argument("--skip", default="", help="comma-separated peers to skip (cpat,cpc2,baseline)")
    ap.add_argument("--model", default=None,
                    help="our main model as module:function taking list[str] -> P(lncRNA); "
                         "default: main_model() (lncrna.predict.predict_proba if it exists)")
    ap.add_argument("--no-model", action="store_true", help="peers only, even if our model exists")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--data", type=Path, default=None,
                    help="built splits to test on (default data/lncrna; the gene hold-out: data/lncrna_gene); "
                         "result names then end in _<folder>")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="our cascade's transformer folder (lncrna_config.json, model.safetensors, stack.json) "
                         "instead of the shipped lncrna/weights/default")
    ap.add_argument("--baseline-dir", type=Path, default=None,
                    help="feature baseline folder (baseline.json, baseline.npz) for the cascade and the "
                         "baseline peer, instead of the shipped lncrna/weights/baseline")
    args = ap.parse_args(argv)
    if args.model and (args.model_dir or args.baseline_dir):
        ap.error("--model replaces the cascade; give either it or --model-dir/--baseline-dir")

    skip = {s for s in args.skip.split(",") if s}
    predictors: dict[str, Predictor] = {k: make(args.baseline_dir) for k, make in PEERS.items() if k not in skip}
    ours = None if args.no_model else (
        _model_from_spec(args.model) if args.model else main_model(args.model_dir, args.baseline_dir))
    from lncrna.data import DEFAULT_OUT

    suffix = "" if args.data is None or args.data.resolve() == Path(DEFAULT_OUT).resolve() else f"_{args.data.name}"
    if ours is not None:
        predictors[""] = ours
    command = "python -m benchmarks.lncrna_peers.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if os.environ.get("LNCRNA_PEER_BIN") and {"cpat", "cpc2"} - skip:
        command = f"LNCRNA_PEER_BIN={shlex.quote(os.environ['LNCRNA_PEER_BIN'])} " + command
    for key in (["human", "mouse"] if args.test == "both" else [args.test]):
        metrics = evaluate(key, predictors, log=lambda s: print(s, file=sys.stderr, flush=True), data=args.data)
        name = (TESTS[key]["final_name"] if ours is not None else TESTS[key]["peers_name"]) + suffix
        print(write_result(name, command.strip(), metrics, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
