"""Batched lncRNA-vs-mRNA prediction, streamed chunk by chunk: a fast feature baseline first, the
transformer only where the baseline is unsure.

    from lncrna.predict import Predictor
    with Predictor() as predictor:                      # lncrna/weights/default, cuda if available
        for p in predictor.predict_fasta("transcripts.fa.gz"):
            print(p.id, p.length, p.prob, p.label)

The cascade (``stack.json`` next to the transformer weights; :class:`StackParams`):

1. stage 1, every record: the CPAT-like :class:`~lncrna.features.FeatureBaseline` gives ``p_b``
   (about 0.3 ms per 2.6 kb transcript on one CPU core: features are computed per worker call as
   one batch, see :meth:`~lncrna.features.FeatureExtractor.transform`);
2. records with ``low < p_b < high`` are "hard": the transformer gives ``p_t`` and the final
   probability is ``sigmoid(w_baseline * logit(p_b) + w_transformer * logit(p_t) + bias)``
   (probabilities clipped to ``[1e-6, 1 - 1e-6]`` before the logit); easy records keep ``p_b``.

``cascade=False`` sends every record through stage 2 with the same formula.

Streaming: records are taken ``chunk_size`` (4096) at a time; the predictions of a chunk are
yielded, in input order, as soon as that chunk is done, so a consumer writing rows per chunk keeps
every finished row when a run is interrupted. Inside a chunk, the hard records go to the
transformer sorted by length, in batches of at most ``batch_tokens`` padded tokens (windows x
tokens per window).

Parallelism: with ``workers > 0`` stage 1 and the tokenization of the hard records run in a
``concurrent.futures.ProcessPoolExecutor`` (each chunk split into ``workers`` parts, results
reassembled in order), up to ``prefetch`` chunks ahead of the transformer stage, which runs in this
process. A worker that dies (the out-of-memory killer's SIGKILL, a crash) raises :class:`WorkerDied`
(one line, saying how it ended) instead of leaving the caller waiting for its results for ever; the
predictor's workers are stopped then. Defaults:
``workers=0`` on CPU (the transformer already uses every core; a pool would compete with it) and
``min(16, usable cores - 1)`` on CUDA (stage 1 feeds the GPU: about 3.5k transcripts/s per core
with the shipped ``extra`` features; each chunk goes out as one part per worker, which the batched
feature extractor handles in one go). The workers are started with ``fork`` where the platform has it, before the transformer
is loaded (workers only run numpy code, never torch), and with ``spawn`` elsewhere.

Measured with the shipped model (6 layers, hidden 256) on human test transcripts:
one H200 with 16 host cores, cascade on (2-3% of records hard): 2.7k seq/s with ``workers=0``,
23k with 8, 33k with 15 (records in memory); ``lncrna predict`` end to end on a 40k-record
FASTA.gz, reading and writing included: 10.4k seq/s. ``cascade=False`` on the H200: 5.4k seq/s at
``batch_tokens=262144``, 6.0k at 524288 (the CUDA default). On 2 CPU cores, the 8,000-record human
test: 293 seq/s with the cascade (``benchmarks/results/lncrna_throughput.json``); without it the
transformer runs on every record, over an order of magnitude slower.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import signal
import threading
import time
import weakref
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_handles
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .fasta import FastaRecord, normalise_sequence, read_fasta
from .features import DEFAULT_BASELINE_DIR, FeatureBaseline

__all__ = [
    "Predictor",
    "Prediction",
    "StackParams",
    "ModelError",
    "WorkerDied",
    "DEFAULT_MODEL_DIR",
    "EXAMPLE_FASTA",
    "STACK_FILE",
    "CHUNK_SIZE",
    "TSV_COLUMNS",
    "default_workers",
    "format_row",
]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "default"
EXAMPLE_FASTA = Path(__file__).resolve().parent / "examples" / "example.fa"  # 10 lncRNA + 10 mRNA, labelled
STACK_FILE = "stack.json"
CONFIG_FILE = "lncrna_config.json"  # = lncrna.model.CONFIG_FILE (not imported: that pulls in torch)
WEIGHTS_FILE = "model.safetensors"  # = lncrna.model.WEIGHTS_FILE
CHUNK_SIZE = 4096
TSV_COLUMNS = ("id", "length", "lncRNA_probability", "label")
EPS = 1e-6
BATCH_TOKENS = {"cpu": 16_384, "cuda": 524_288}  # padded tokens per transformer batch


class ModelError(Exception):
    """The model directory (or its files, or the device) cannot be used. One-line message."""


class WorkerDied(RuntimeError):
    """A stage-1 worker process ended while the predictor needed it (killed by a signal, e.g. the
    out-of-memory killer's SIGKILL, or a crash). The predictor's workers are stopped: every later
    prediction with workers raises this again (make a new :class:`Predictor`, or use ``workers=0``).
    ``reason``: how the worker ended, e.g. ``"killed by signal 9 (SIGKILL), possibly out of memory"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"a stage-1 worker process died ({reason}); use fewer workers, or workers=0")
        self.reason = reason


# ---- stacking -------------------------------------------------------------------------------------
#: candidate cascade bands of :meth:`StackParams.fit`, narrowest first
STACK_BANDS: tuple[tuple[float, float], ...] = ((0.3, 0.7), (0.2, 0.8), (0.1, 0.9), (0.05, 0.95), (0.0, 1.0))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class StackParams:
    """The cascade band ``(low, high)`` and the logistic stacker of baseline and transformer."""

    low: float
    high: float
    w_baseline: float
    w_transformer: float
    bias: float

    KEYS = ("low", "high", "w_baseline", "w_transformer", "bias")

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "StackParams":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{path}: missing stacker file (cascade band and stacking weights)") from None
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: unreadable stacker file ({' '.join(str(e).split())})") from None
        if not isinstance(raw, dict):
            raise ModelError(f"{path}: expected a JSON object with keys {', '.join(cls.KEYS)}")
        missing = [k for k in cls.KEYS if k not in raw]
        # bool is an int subclass: "low": true used to load as 1.0 (an empty band) without a word
        bad = [k for k in cls.KEYS if k in raw and (isinstance(raw[k], bool) or not (
            isinstance(raw[k], (int, float)) and math.isfinite(raw[k])))]
        if missing or bad:
            raise ModelError(f"{path}: " + "; ".join(
                ([f"missing keys {', '.join(missing)}"] if missing else []) + ([f"not a finite number: {', '.join(bad)}"] if bad else [])))
        try:
            return cls(**{k: float(raw[k]) for k in cls.KEYS})
        except ValueError as e:
            raise ModelError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike[str], fitted_on: str | None = None) -> Path:
        """Write the five numbers (and ``fitted_on``, a note on the data, where given) as JSON."""
        path = Path(path)
        data: dict[str, Any] = {k: getattr(self, k) for k in self.KEYS}
        if fitted_on is not None:
            data["fitted_on"] = fitted_on
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def fit(cls, y: np.ndarray, p_baseline: np.ndarray, p_transformer: np.ndarray, *,
            bands: Sequence[tuple[float, float]] = STACK_BANDS, keep: float = 0.9,
            folds: int = 5) -> tuple["StackParams", dict[str, float]]:
        """Fit the cascade on held-out records (validation, never test): a logistic regression on
        ``[logit p_b, logit p_t]`` (scikit-learn, C = 1) and the band: the narrowest of ``bands`` whose
        cascade keeps at least ``keep`` of the full stack's cross-validated (``folds``-fold) MCC gain
        over the baseline (narrow = fast on a CPU); where the stack gains nothing, the empty band
        ``(0.5, 0.5)``: the baseline alone decides. What ``benchmarks/lncrna_stack.py`` fitted the
        shipped model's ``stack.json`` with, and what ``lncrna train`` writes beside a new classifier.

        ``y`` (n,) labels (1 = lncRNA), ``p_baseline`` / ``p_transformer`` (n,) probabilities. Returns the
        parameters and the metrics behind the choice (``baseline_mcc``, ``stack_cv_mcc``,
        ``cascade_<low>_<high>_mcc`` and ``_hard_share``). A ValueError where the records cannot
        support a fit: fewer than ``folds`` of either class.
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_predict

        from .metrics import classification_metrics

        y = np.asarray(y)
        p_b = np.asarray(p_baseline, dtype=np.float64)
        counts = [int((y == c).sum()) for c in (0, 1)]
        if min(counts) < folds:
            raise ValueError(f"{len(y)} held-out records ({counts[1]} lncRNA, {counts[0]} mRNA): a {folds}-fold "
                             f"cross-validated fit of the cascade needs at least {folds} of each class")
        X = np.stack([_logit(p_b), _logit(p_transformer)], 1)
        stack = LogisticRegression(C=1.0).fit(X, y)
        cv = cross_val_predict(LogisticRegression(C=1.0), X, y, cv=folds, method="predict_proba")[:, 1]
        mcc_base = classification_metrics(y, p_b)["mcc"]
        mcc_stack = classification_metrics(y, cv)["mcc"]
        metrics: dict[str, float] = {"baseline_mcc": mcc_base, "stack_cv_mcc": mcc_stack}
        for low, high in bands:
            hard = (p_b > low) & (p_b < high)
            metrics[f"cascade_{low}_{high}_mcc"] = classification_metrics(y, np.where(hard, cv, p_b))["mcc"]
            metrics[f"cascade_{low}_{high}_hard_share"] = float(hard.mean())
        gain = mcc_stack - mcc_base
        if gain <= 0:  # the transformer adds nothing on these records: an empty band, the baseline alone
            chosen = (0.5, 0.5)
        else:  # the narrowest band (bands run narrowest first) that keeps ``keep`` of the gain
            chosen = next(((low, high) for low, high in bands
                           if metrics[f"cascade_{low}_{high}_mcc"] - mcc_base >= keep * gain), bands[-1])
        params = cls(low=chosen[0], high=chosen[1], w_baseline=float(stack.coef_[0, 0]),
                     w_transformer=float(stack.coef_[0, 1]), bias=float(stack.intercept_[0]))
        return params, metrics

    def is_hard(self, p_baseline: np.ndarray) -> np.ndarray:
        """Boolean mask of the records the transformer sees: ``low < p_b < high`` (open interval)."""
        p = np.asarray(p_baseline)
        return (p > self.low) & (p < self.high)

    def combine(self, p_baseline: np.ndarray, p_transformer: np.ndarray) -> np.ndarray:
        """``sigmoid(w_b * logit(p_b) + w_t * logit(p_t) + bias)``, inputs clipped to [1e-6, 1-1e-6]."""
        z = self.w_baseline * _logit(p_baseline) + self.w_transformer * _logit(p_transformer) + self.bias
        return 1.0 / (1.0 + np.exp(-z))


# ---- results --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Prediction:
    """One transcript's call. ``stage``: ``"baseline"`` (easy, p_b kept) or ``"transformer"`` (stacked)."""

    id: str
    length: int
    prob: float
    label: str
    stage: str = "baseline"


def format_row(p: Prediction) -> str:
    """One TSV line (with ``\\n``) in :data:`TSV_COLUMNS` order."""
    return f"{p.id}\t{p.length}\t{p.prob:.6f}\t{p.label}\n"


@dataclass
class PredictStats:
    """Counters of a :class:`Predictor` since construction (or the last :meth:`reset`)."""

    records: int = 0
    transformer: int = 0
    chunks: int = 0
    seconds: float = 0.0
    stage1_seconds: float = 0.0  # waiting for stage 1 in this process (with workers: only the wait)
    transformer_seconds: float = 0.0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


# ---- stage 1: baseline + tokenization of the hard records (runs in workers when workers > 0) --------
class _Stage1:
    """Baseline probability of every record; transformer windows of the hard ones. numpy only."""

    def __init__(self, baseline: FeatureBaseline, tokenizer: Any, model_cfg: Any, stack: StackParams, cascade: bool):
        self.baseline, self.tokenizer, self.model_cfg = baseline, tokenizer, model_cfg
        self.stack, self.cascade = stack, cascade

    def encode(self, seq: str) -> list[np.ndarray]:
        """Windows of one sequence, exactly as ``NucleotideClassifier.encode``."""
        from .model import window_ids

        tok = self.tokenizer
        return window_ids(tok.encode_ids(seq), self.model_cfg, tok.cls_token_id, tok.sep_token_id)

    def __call__(self, seqs: list[str]) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
        """``(p_b (n,), hard indices (h,), windows of each hard record)``."""
        p_b = self.baseline.predict_proba(seqs) if seqs else np.zeros(0)
        hard = np.flatnonzero(self.stack.is_hard(p_b)) if self.cascade else np.arange(len(seqs))
        return p_b, hard, [self.encode(seqs[i]) for i in hard]


_WORKER_STAGE1: _Stage1 | None = None


def _worker_init(stage1: _Stage1) -> None:
    global _WORKER_STAGE1
    _WORKER_STAGE1 = stage1
    # Ctrl-C reaches the whole foreground process group: a worker would print a KeyboardInterrupt
    # traceback of its own. The parent handles it and stops the workers (Predictor.close).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # stage 1 is numpy only; keep any BLAS/OpenMP pool in a worker to one thread
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except Exception:  # pragma: no cover - threadpoolctl is optional
        pass


def _worker_stage1(seqs: list[str]):
    assert _WORKER_STAGE1 is not None, "worker not initialised"
    return _WORKER_STAGE1(seqs)


def _worker_ready() -> None:
    """A no-op task: submitting it starts the workers (with ``fork``, every one of them at once)."""


POOL_STOP_SECONDS = 5.0  # the most _stop_workers waits for one step (a healthy pool stops in well under 0.5 s)
WATCH_SECONDS = 0.5  # while waiting for a result, how often the workers' liveness is checked
EXIT_CODE_SECONDS = 2.0  # the most waited for a dead worker's exit status (it is reaped within milliseconds)


class _WorkerContext:
    """The ``mp_context`` of the stage-1 executor: the start method's own context, which it delegates
    to, keeping the worker processes it starts and the result queue it makes.

    ``ProcessPoolExecutor`` documents ``mp_context`` as an object providing ``Process``, ``Queue``
    and ``SimpleQueue``; keeping them here lets :class:`_WorkerPool` watch the workers' sentinels
    and stop them without the executor's private attributes.
    """

    def __init__(self, method: str) -> None:
        self._base = mp.get_context(method)
        self._processes: list[Any] = []
        self._result_queues: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - the context API's name
        process = self._base.Process(*args, **kwargs)
        self._processes.append(process)
        return process

    def SimpleQueue(self) -> Any:  # noqa: N802 - the context API's name
        queue = self._base.SimpleQueue()
        self._result_queues.append(queue)
        return queue

    def started(self) -> list[Any]:
        """The worker processes started so far."""
        return [p for p in self._processes if p.pid is not None]

    def close_result_writers(self) -> None:
        """Close this process's write end of the result pipe (it never writes there; the workers do).

        Once every worker is dead that is the last write end, so a reader left waiting for the rest of
        a message a killed worker had begun to write (the executor's thread, which would then never see
        the worker die) gets end-of-file instead of waiting for ever. ``SimpleQueue`` has no public
        way to close one end; ``_writer`` is its write end since Python 3.0."""
        for queue in self._result_queues:
            writer = getattr(queue, "_writer", None)
            if writer is not None:
                with contextlib.suppress(OSError):
                    writer.close()


def _exit_reason(exitcode: int | None) -> str:
    """How a worker ended, for :class:`WorkerDied`: ``"killed by signal 9 (SIGKILL), possibly out of memory"``."""
    if exitcode is None:
        return "ended for an unknown reason"
    if exitcode >= 0:
        return f"exited with status {exitcode}"
    try:
        name = f" ({signal.Signals(-exitcode).name})"
    except ValueError:
        name = ""
    oom = ", possibly out of memory" if -exitcode == getattr(signal, "SIGKILL", None) else ""
    return f"killed by signal {-exitcode}{name}{oom}"


def _stop_workers(executor: ProcessPoolExecutor, ctx: _WorkerContext) -> None:
    """Stop the stage-1 executor at once, whatever state its workers were left in, in bounded time.

    A graceful ``shutdown()`` can wait for ever: a worker that died waiting for its next task holds
    the call queue's read lock, so the others never read the sentinel that tells them to exit (a
    SIGTERM to the whole process group does that: the workers must die of it, see
    ``lncrna.cli._termination_raises``); a worker killed while writing a result leaves the executor's
    thread reading the rest of that message. So every worker is SIGKILLed (stage 1 holds nothing
    that needs cleaning up), this process's end of the result pipe is closed (that reader then gets
    end-of-file), and ``shutdown()`` runs in a thread of its own, given a bounded time: the executor's
    thread sees the dead workers and ends, and nothing is left for the interpreter's exit to wait on.
    """
    workers = ctx.started()
    try:
        for w in workers:
            with contextlib.suppress(Exception):  # already gone
                w.kill()
        for w in workers:
            w.join(POOL_STOP_SECONDS)
    finally:  # this runs once (see _WorkerPool.close): a signal arriving in the joins must not skip it
        ctx.close_result_writers()
    stopper = threading.Thread(target=executor.shutdown, name="lncrna-pool-stop", daemon=True)
    stopper.start()
    stopper.join(POOL_STOP_SECONDS)


class _WorkerPool:
    """Stage 1 in ``workers`` processes (``concurrent.futures.ProcessPoolExecutor``).

    Results are taken in the order the tasks were submitted (:meth:`result`). A worker that dies is
    found by the executor (``BrokenProcessPool``) or, should its thread be stuck, by this pool's own
    watch of the workers' sentinels; either way :meth:`result` raises :class:`WorkerDied` and the
    workers are stopped.
    """

    def __init__(self, workers: int, stage1: _Stage1) -> None:
        methods = mp.get_all_start_methods()
        self.ctx = _WorkerContext("fork" if "fork" in methods else "spawn")
        self.executor = ProcessPoolExecutor(workers, mp_context=self.ctx, initializer=_worker_init,
                                            initargs=(stage1,))
        self.lost: str | None = None  # how the worker that broke the pool ended
        self._stop = weakref.finalize(self, _stop_workers, self.executor, self.ctx)
        self.executor.submit(_worker_ready)  # the workers start now (with fork: before the transformer exists)

    def close(self) -> None:
        self._stop()  # _stop_workers, once: a second call (or the garbage collector) does nothing

    def submit(self, seqs: list[str]) -> Future:
        if self.lost is not None:
            raise WorkerDied(self.lost)
        # a worker that died while the pool was idle (between runs): the executor's thread may not have
        # marked the pool broken yet, and the other workers would then do the whole run; ask first
        if self._dead():
            raise self._died()
        try:
            return self.executor.submit(_worker_stage1, seqs)
        except BrokenProcessPool:
            raise self._died() from None

    def result(self, future: Future):
        """The task's result; :class:`WorkerDied` if a worker died, the task's own error if it raised."""
        while not futures_wait([future], timeout=WATCH_SECONDS).done:
            if self._dead():  # the executor's thread did not notice (see _stop_workers): do not wait on it
                raise self._died()
        try:
            return future.result()
        except BrokenProcessPool:
            raise self._died() from None

    def _dead(self) -> list[Any]:
        """The workers that have ended."""
        workers = {w.sentinel: w for w in self.ctx.started()}
        return [workers[s] for s in wait_for_handles(list(workers), timeout=0)] if workers else []

    def _died(self) -> WorkerDied:
        """Stop the workers; the error naming how the first dead one ended."""
        if self.lost is None:
            dead = self._dead()  # before the others are stopped: these broke the pool
            codes = [self._exitcode(w) for w in dead]
            # when one dies the executor stops the others with SIGTERM: name the one that did not get that
            own = [c for c in codes if c != -signal.SIGTERM] or codes or [None]
            self.lost = _exit_reason(own[0])
            self.close()
        return WorkerDied(self.lost)

    @staticmethod
    def _exitcode(worker: Any) -> int | None:
        deadline = time.monotonic() + EXIT_CODE_SECONDS
        while (code := worker.exitcode) is None and time.monotonic() < deadline:  # the executor may be reaping it
            time.sleep(0.01)
        return code


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers(device_type: str) -> int:
    """0 on CPU; ``min(16, usable cores - 1)`` on CUDA (stage 1 feeds the GPU). See the module docstring."""
    return 0 if device_type != "cuda" else max(0, min(16, usable_cores() - 1))


def _chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _refuse_single_string(seqs: Any, what: str) -> None:
    """``TypeError`` if ``seqs`` is one bare sequence instead of a collection of them.

    Why: a ``str`` (or ``bytes``) is itself an iterable of 1-nt "sequences"; ``predict_sequences(seq)``
    used to return one meaningless probability per nucleotide instead of failing (as
    ``NucleotideClassifier.predict_proba`` and ``FeatureExtractor.transform`` already refuse)."""
    if isinstance(seqs, (str, bytes)):
        raise TypeError(f"{what} expects a list of sequences, got a single string; wrap it: [seq]")


def _not_a_record(item: Any, index: int) -> TypeError:
    """The error for an item of ``predict_records`` that is no record (built only when raised: the
    item may hold a 2 Mb sequence)."""
    shown = f" {item[:40]!r}" if isinstance(item, (str, bytes)) else ""
    return TypeError(f"record {index}: expected an (id, seq) pair or a record with .id and .seq, got "
                     f"{type(item).__name__}{shown} (for a dict pass dict.items(); for plain sequences use "
                     "predict_sequences)")


def _as_record(item: Any, index: int) -> FastaRecord:
    """FastaRecord as is (already validated); ``(id, seq)`` pairs and objects with ``.id``/``.seq`` normalised."""
    if isinstance(item, FastaRecord):
        return item
    # a plain string unpacks as a "pair" of its letters: predict_records({"ab": seq}) (a dict iterates
    # over its keys) would predict record "a" with sequence "b"
    if isinstance(item, (str, bytes)):
        raise _not_a_record(item, index)
    try:
        rid, seq = (item.id, item.seq) if hasattr(item, "seq") else item
    except (TypeError, ValueError):  # not a pair (e.g. an int, a 3-tuple)
        raise _not_a_record(item, index) from None
    rid = str(rid)
    if any(c in rid for c in "\t\r\n"):  # would split or shift the row in the TSV output (format_row)
        raise ValueError(f"record {index} {rid!r}: id contains a tab or line break")
    try:
        # bytes (a file read in binary mode) as text: str(b"ACGT") is "b'ACGT'", refused for its quotes
        seq = normalise_sequence(seq.decode("ascii") if isinstance(seq, bytes) else str(seq))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"record {index} {rid!r}: {e}") from None
    return FastaRecord(str(rid), str(rid), seq)


# ---- the predictor --------------------------------------------------------------------------------
class Predictor:
    """Loads the baseline and the transformer once; predicts any number of records, streamed.

    Args:
        model_dir: folder with ``lncrna_config.json``, ``model.safetensors`` and ``stack.json``
            (default: the shipped ``lncrna/weights/default``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...; default cuda if available, else cpu.
        cascade: ``False`` sends every record to the transformer (stacked the same way).
        batch_tokens: padded tokens per transformer batch (default 16384 on CPU, 524288 on CUDA).
        workers: stage-1 processes; ``None`` = :func:`default_workers` (0 on CPU).
        baseline_dir: the feature baseline (default ``lncrna/weights/baseline``).
        threshold: ``label = "lncRNA" if prob >= threshold else "mRNA"``.
        chunk_size: records per chunk; predictions come out chunk by chunk.
        prefetch: with workers, how many chunks stage 1 may run ahead of the transformer.

    Raises :class:`ModelError` (one line, naming the path) when a model file is missing or
    unreadable, or the device is not available.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        device: str | None = None,
        cascade: bool = True,
        batch_tokens: int | None = None,
        workers: int | None = None,
        *,
        baseline_dir: str | os.PathLike[str] | None = None,
        threshold: float = 0.5,
        chunk_size: int = CHUNK_SIZE,
        prefetch: int = 2,
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
        self.cascade, self.threshold = bool(cascade), float(threshold)
        if not math.isfinite(self.threshold):  # NaN compared False everywhere: every record became mRNA
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if batch_tokens is not None and batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.chunk_size, self.prefetch = int(chunk_size), max(1, int(prefetch))
        self.stats = PredictStats()
        self._pool: _WorkerPool | None = None

        # 1. every file check first: cheap, and nothing heavy has happened when one fails
        self._check_model_dir()
        self.stack = StackParams.load(self.model_dir / STACK_FILE)
        baseline_dir = Path(baseline_dir) if baseline_dir is not None else DEFAULT_BASELINE_DIR
        try:
            self.baseline = FeatureBaseline.load(baseline_dir)
        except FileNotFoundError as e:
            raise ModelError(f"{e.filename or baseline_dir}: missing baseline file") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
            # a truncated .npz, a JSON of the wrong shape: the files are not a baseline this code wrote
            raise ModelError(f"{baseline_dir}: unreadable feature baseline ({' '.join(str(e).split())})") from None
        try:
            cfg_raw = json.loads((self.model_dir / CONFIG_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"{self.model_dir / CONFIG_FILE}: unreadable model config ({e})") from None

        import torch

        from .model import ModelConfig, make_tokenizer

        if not isinstance(cfg_raw, dict):
            raise ModelError(f"{self.model_dir / CONFIG_FILE}: not a lncrna model config (expected a JSON object)")
        try:
            self.model_cfg = ModelConfig(**cfg_raw)
        except TypeError as e:
            raise ModelError(f"{self.model_dir / CONFIG_FILE}: not a lncrna model config ({e})") from None
        except ValueError as e:
            raise ModelError(f"{self.model_dir / CONFIG_FILE}: {e}") from None
        self.device = self._pick_device(device, torch)
        self.batch_tokens = int(batch_tokens) if batch_tokens else BATCH_TOKENS.get(self.device.type, BATCH_TOKENS["cpu"])
        self.workers = default_workers(self.device.type) if workers is None else int(workers)
        self._stage1 = _Stage1(self.baseline, make_tokenizer(self.model_cfg), self.model_cfg, self.stack, self.cascade)

        # 2. the workers before the transformer exists (fork copies a process without torch state in use)
        if self.workers > 0:
            self._pool = _WorkerPool(self.workers, self._stage1)

        # 3. the transformer
        from .model import NucleotideClassifier

        try:
            self.model = NucleotideClassifier.from_pretrained(self.model_dir, device=self.device)
        except Exception as e:  # OSError, ValueError, safetensors' own errors: all mean "unusable file"
            self.close()
            raise ModelError(f"{self.model_dir}: cannot load the transformer ({' '.join(str(e).split())[:300]})") from None
        self.model.eval()

    # ---- set-up helpers ----
    def _check_model_dir(self) -> None:
        d = self.model_dir
        default = d == DEFAULT_MODEL_DIR
        if not d.is_dir():
            if default:
                raise ModelError(f"{d}: the default model is not installed (no such directory); "
                                 f"pass a model directory (--model DIR) holding {CONFIG_FILE}, {WEIGHTS_FILE}, {STACK_FILE}")
            if d.exists():  # Why: a --model naming a file (e.g. model.safetensors) was called "no such" directory
                raise ModelError(f"{d}: not a directory; --model needs the model directory holding {CONFIG_FILE}, "
                                 f"{WEIGHTS_FILE}, {STACK_FILE}")
            raise ModelError(f"{d}: no such model directory")
        missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE, STACK_FILE) if not (d / n).is_file()]
        if missing:
            # Why: `lncrna train` writes <out_dir>/classifier; giving it the run folder itself is the easy slip
            hint = (f"; {d / 'classifier'} is one: pass that" if len(missing) == 3 and all(
                (d / "classifier" / n).is_file() for n in (CONFIG_FILE, WEIGHTS_FILE, STACK_FILE)) else "")
            raise ModelError(f"{d}: not a complete lncrna model directory, missing {', '.join(missing)}{hint}")

    @staticmethod
    def _pick_device(device: str | None, torch: Any):
        if device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ModelError(f"unsupported device {device!r}; expected cpu, cuda or cuda:N") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ModelError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ModelError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        elif dev.type != "cpu":
            raise ModelError(f"unsupported device {device!r}; expected cpu or cuda[:N]")
        return dev

    # ---- lifetime ----
    def close(self) -> None:
        """Stop the worker pool (if any). The predictor is unusable with workers afterwards."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- prediction ----
    def predict_fasta(self, path: str | os.PathLike[str], progress: Callable[[int], Any] | None = None,
                      **read_kw: Any) -> Iterator[Prediction]:
        """Stream predictions for a FASTA(.gz) file (read and validated by :func:`lncrna.fasta.read_fasta`).

        ``progress``: as in :meth:`predict_records`; ``read_kw`` go to ``read_fasta``."""
        return self.predict_records(read_fasta(path, **read_kw), progress=progress)

    def predict_sequences(self, seqs: Iterable[str]) -> np.ndarray:
        """lncRNA probability of each sequence, (n,) float64, in input order.

        ``TypeError`` for one bare string (wrap it in a list)."""
        _refuse_single_string(seqs, "predict_sequences")
        return np.array([p.prob for p in self.predict_records((str(i), s) for i, s in enumerate(seqs))])

    def predict_records(self, records: Iterable[Any],
                        progress: Callable[[int], Any] | None = None) -> Iterator[Prediction]:
        """Predictions in input order, yielded chunk by chunk (see the module docstring).

        ``records``: :class:`~lncrna.fasta.FastaRecord` (taken as validated), ``(id, seq)`` pairs or
        objects with ``.id`` and ``.seq`` (normalised here; ``ValueError`` naming the record if invalid,
        ``TypeError`` for anything else, e.g. a plain string or a dict: pass ``dict.items()``).

        ``progress``: called with a count of records as they finish, before their chunk is yielded:
        once per chunk for the records stage 1 settles, once per transformer batch for the others
        (e.g. ``tqdm.update``); the counts add up to the number of records.
        """
        recs = (_as_record(r, i) for i, r in enumerate(records, start=1))
        for chunk, (p_b, hard, windows), t_wait in self._stage1_stream(_chunked(recs, self.chunk_size)):
            t0 = time.perf_counter()
            prob = np.asarray(p_b, dtype=np.float64).copy()
            if progress is not None and len(chunk) > len(hard):
                progress(len(chunk) - len(hard))  # the easy records are final after stage 1
            if len(hard):
                # progress per transformer batch: a chunk is 4096 records, and a bar moved once per
                # chunk stood still for minutes on a CPU without the cascade
                p_t = self._transformer_proba(windows, progress=progress)
                prob[hard] = self.stack.combine(p_b[hard], p_t)
            t1 = time.perf_counter()
            st = self.stats
            st.records += len(chunk)
            st.transformer += len(hard)
            st.chunks += 1
            st.stage1_seconds += t_wait
            st.transformer_seconds += t1 - t0
            st.seconds += t_wait + (t1 - t0)
            is_hard = np.zeros(len(chunk), dtype=bool)
            is_hard[hard] = True
            for rec, p, h in zip(chunk, prob.tolist(), is_hard.tolist()):
                yield Prediction(rec.id, len(rec.seq), p, "lncRNA" if p >= self.threshold else "mRNA",
                                 "transformer" if h else "baseline")

    def _stage1_stream(self, chunks: Iterator[list[FastaRecord]]):
        """``(chunk, stage-1 result, seconds waited)`` per chunk, in order; the workers run ahead
        (at most ``prefetch + 1`` chunks submitted and not yet taken). :class:`WorkerDied` if one dies."""
        pool = self._pool
        if pool is None:
            for chunk in chunks:
                t0 = time.perf_counter()
                result = self._stage1([r.seq for r in chunk])
                yield chunk, result, time.perf_counter() - t0
            return
        pending: deque = deque()
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.prefetch + 1:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                part = max(64, math.ceil(len(chunk) / self.workers))
                parts = [(lo, pool.submit([r.seq for r in chunk[lo : lo + part]])) for lo in range(0, len(chunk), part)]
                pending.append((chunk, parts))
            if not pending:
                return
            chunk, parts = pending.popleft()
            t0 = time.perf_counter()
            p_b, hard, windows = [], [], []
            for lo, future in parts:
                pb_i, hard_i, win_i = pool.result(future)
                p_b.append(pb_i)
                hard.append(hard_i + lo)
                windows.extend(win_i)
            yield chunk, (np.concatenate(p_b), np.concatenate(hard).astype(np.int64), windows), time.perf_counter() - t0

    def _transformer_proba(self, windows: list[list[np.ndarray]],
                           progress: Callable[[int], Any] | None = None) -> np.ndarray:
        """Transformer lncRNA probability of each record given its windows, (n,) float64.

        Records are sorted by length (longest window, then number of windows) and batched so that
        ``windows x longest window <= batch_tokens``; same result as ``NucleotideClassifier.predict_proba``.
        ``progress(k)`` is called after each batch of ``k`` records.
        """
        import torch

        from .model import collate_windows

        out = np.empty(len(windows), dtype=np.float64)
        if not windows:
            return out
        longest = np.array([max(len(w) for w in ws) for ws in windows])
        count = np.array([len(ws) for ws in windows])
        order = np.lexsort((count, longest))
        device, model = self.device, self.model
        batch: list[int] = []
        n_win = max_len = 0

        def run(idx: list[int]) -> None:
            b = collate_windows([windows[i] for i in idx])
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(b["input_ids"], b["attention_mask"], b["window_owner"], n=len(idx))
            out[idx] = torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
            if progress is not None:
                progress(len(idx))

        with torch.inference_mode():
            for i in order.tolist():
                new_max = max(max_len, int(longest[i]))
                if batch and (n_win + int(count[i])) * new_max > self.batch_tokens:
                    run(batch)
                    batch, n_win, new_max = [], 0, int(longest[i])
                batch.append(i)
                n_win += int(count[i])
                max_len = new_max
            if batch:
                run(batch)
        return out


_DEFAULT_PREDICTOR: Predictor | None = None


def predict_proba(seqs: Sequence[str]) -> np.ndarray:
    """lncRNA probability of each sequence with the shipped model (loaded once), in input order.

    ``TypeError`` for one bare string (wrap it in a list), before the model loads."""
    global _DEFAULT_PREDICTOR
    _refuse_single_string(seqs, "predict_proba")
    if _DEFAULT_PREDICTOR is None:
        _DEFAULT_PREDICTOR = Predictor()
    return _DEFAULT_PREDICTOR.predict_sequences(seqs)
