"""Score predictions against truth labels: metrics (JSON + table) and ROC / precision-recall plots.

    from lncrna.evaluate import read_predictions, read_truth, evaluate, write_report
    pred = read_predictions("pred.tsv")                 # id, length, lncRNA_probability, label
    truth = read_truth(fasta="data/lncrna/test_human.fa.gz")   # headers carry label=lncRNA|mRNA
    # or: read_truth(lnc="lnc.fa", mrna="mrna.fa")
    result = evaluate(pred, truth)
    write_report(result, "eval_out")                    # metrics.json metrics.tsv roc.png pr.png

Truth comes from FASTA headers only (``>ID ... label=lncRNA`` or ``label=mRNA``, case-insensitive),
or from which file a record is in (``--lnc`` / ``--mrna``). Headers are scanned line by line, not
validated as sequences: the id is the first word after ``>``, as Biopython reads it.

Every file is read as UTF-8 (gzip or plain): a byte that is not UTF-8, in a truth FASTA (header or
sequence line) or a predictions TSV, is an :class:`EvaluationError` naming the file, the line, the
record or row and the byte, worded as :func:`lncrna.fasta.read_fasta` words it. Why: decoded with
replacement characters, a Latin-1 id (``caf\\xe9``) became ``'caf\\ufffd'`` and silently failed to
match (or two such ids became one).

Predictions and truth are joined by id. Predicted ids without truth and truth ids without a
prediction (e.g. records skipped as invalid) are counted and reported, and the metrics use the
records that have both. Metrics are :func:`lncrna.metrics.classification_metrics` (lncRNA = 1)
plus ``auprc`` (average precision).

The thresholded metrics (accuracy ... MCC, tp/fp/tn/fn) come from the calls: ``evaluate(...,
labels=...)`` takes them as given (``lncrna evaluate`` passes a predictions TSV's own ``label``
column, so the counts match the labels ``predict`` wrote with whatever ``--threshold`` it had);
without ``labels`` they are ``probability >= threshold``. AUROC and AUPRC always use the probabilities.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fasta import (
    _GZIP_ERRORS,
    _escaped,
    _not_a_file,
    _not_utf8_message,
    _open_text,
    _undecodable,
    unsupported_compression,
)
from .metrics import classification_metrics
from .predict import TSV_COLUMNS

__all__ = ["EvaluationError", "EvalResult", "read_predictions", "read_predictions_with_labels", "read_truth",
           "evaluate", "write_report",
           "plot_curves", "format_table", "sniff_kind", "LABEL_VALUES"]

LABEL_VALUES = {"lncrna": 1, "mrna": 0}


class EvaluationError(ValueError):
    """Predictions or truth cannot be used. One-line message naming the file."""


def _check_readable(path: Path) -> None:
    """EvaluationError (one line) if ``path`` is missing, a folder or not a regular file."""
    problem = _not_a_file(path, what="a file")
    if problem is not None:
        raise EvaluationError(str(problem))


def _read_error(path: Path, e: BaseException) -> EvaluationError:
    """One-line EvaluationError for an exception raised while reading ``path``."""
    if isinstance(e, _GZIP_ERRORS):
        return EvaluationError(f"{path}: broken gzip file ({type(e).__name__}: {' '.join(str(e).split())})")
    if isinstance(e, OSError):
        return EvaluationError(f"{path}: cannot read ({e.strerror or type(e).__name__})")
    return EvaluationError(f"{path}: unreadable ({type(e).__name__}: {e})")


def sniff_kind(path: str | os.PathLike[str]) -> str:
    """``"fasta"`` (first non-blank line starts with ``>``), ``"predictions"`` (our TSV header) or
    ``"unknown"``. Missing / unreadable files raise :class:`EvaluationError`."""
    path = Path(path)
    _check_readable(path)
    try:
        if (other := unsupported_compression(path)) is not None:  # a clear line, not "neither FASTA nor TSV"
            raise EvaluationError(other)
        with _open_text(path) as fh:
            for line in fh:
                if not line.strip():
                    continue
                if line.lstrip().startswith(">"):
                    return "fasta"
                if tuple(line.rstrip("\r\n").split("\t")) == TSV_COLUMNS:
                    return "predictions"
                return "unknown"
    except (OSError, *_GZIP_ERRORS) as e:
        raise _read_error(path, e) from None
    raise EvaluationError(f"{path}: empty file")


def read_predictions(path: str | os.PathLike[str]) -> dict[str, float]:
    """``id -> lncRNA probability`` from a ``lncrna predict`` TSV (header ``id length lncRNA_probability label``)."""
    return _read_predictions_tsv(Path(path), with_labels=False)[0]


def read_predictions_with_labels(path: str | os.PathLike[str]) -> tuple[dict[str, float], dict[str, int]]:
    """``(id -> lncRNA probability, id -> label)`` from a ``lncrna predict`` TSV; label 1 = lncRNA, 0 = mRNA.

    A ``label`` other than ``lncRNA`` / ``mRNA`` (any case) is an :class:`EvaluationError` naming the line."""
    return _read_predictions_tsv(Path(path), with_labels=True)


def _read_predictions_tsv(path: Path, with_labels: bool) -> tuple[dict[str, float], dict[str, int]]:
    _check_readable(path)
    out: dict[str, float] = {}
    labels: dict[str, int] = {}
    try:
        with _open_text(path, errors="surrogateescape") as fh:  # bytes that are not UTF-8: _utf8_rows
            reader = csv.reader(_utf8_rows(fh, path), delimiter="\t")
            header = next(reader, None)
            if header is None:
                raise EvaluationError(f"{path}: empty file")
            if tuple(header) != TSV_COLUMNS:
                raise EvaluationError(f"{path}: not a predictions TSV: header must be "
                                      f"{' '.join(TSV_COLUMNS)!r} (tab-separated), got {' '.join(header)[:80]!r}")
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(TSV_COLUMNS):
                    raise EvaluationError(f"{path}: line {line_no}: expected {len(TSV_COLUMNS)} columns, "
                                          f"got {len(row)}")
                try:
                    p = float(row[2])
                except ValueError:
                    raise EvaluationError(f"{path}: line {line_no} {row[0]!r}: probability {row[2]!r} "
                                          f"is not a number") from None
                if not 0.0 <= p <= 1.0:
                    raise EvaluationError(f"{path}: line {line_no} {row[0]!r}: probability {p} outside [0, 1]")
                if row[0] in out:
                    raise EvaluationError(f"{path}: line {line_no}: duplicate id {row[0]!r}")
                out[row[0]] = p
                if with_labels:
                    y = LABEL_VALUES.get(row[3].strip().lower())
                    if y is None:
                        raise EvaluationError(f"{path}: line {line_no} {row[0]!r}: label {row[3]!r} is not "
                                              f"lncRNA or mRNA")
                    labels[row[0]] = y
    except (OSError, csv.Error, *_GZIP_ERRORS) as e:
        raise _read_error(path, e) from None
    if not out:
        raise EvaluationError(f"{path}: no predictions (header only)")
    return out, labels


def _utf8_rows(lines: Iterable[str], path: Path) -> Iterator[str]:
    """``lines`` (decoded with ``errors="surrogateescape"``) as they are; a line holding a byte that is
    not UTF-8 raises :class:`EvaluationError` naming the file, the line, the row's id and the byte."""
    for line_no, line in enumerate(lines, start=1):
        if not line.isascii() and (bad := _undecodable(line)) is not None:
            byte, column = bad
            rid = line.split("\t", 1)[0]
            row = "(the header)" if line_no == 1 else f"'{_escaped(rid)}'"
            raise EvaluationError(f"{path}: line {line_no} {row}: not UTF-8 text (byte 0x{byte:02x} at column "
                                  f"{column}); convert the file to UTF-8 (or ASCII) first")
        yield line


def _scan_headers(path: Path) -> list[tuple[str, str]]:
    """``(id, rest of header)`` of every record; FastaError-like one-line errors for non-FASTA files."""
    _check_readable(path)
    heads: list[tuple[str, str]] = []
    try:
        if (other := unsupported_compression(path)) is not None:  # truth files too (--truth, --lnc, --mrna)
            raise EvaluationError(other)
        with _open_text(path, errors="surrogateescape") as fh:  # bytes that are not UTF-8: raised below
            header_line = ""
            for line_no, line in enumerate(fh, start=1):
                if line.startswith(">"):
                    header_line = line
                    words = line[1:].strip().split(maxsplit=1)
                    heads.append((words[0] if words else "", words[1] if len(words) > 1 else ""))
                elif not heads and line.strip():
                    raise EvaluationError(f"{path}: not FASTA: line {line_no} does not start with '>'")
                # sequence lines too, as read_fasta does; isascii() is O(1), so ASCII files cost nothing
                if not line.isascii() and (
                        problem := _not_utf8_message(path, line, line_no, len(heads), header_line)) is not None:
                    raise EvaluationError(problem)
    except (OSError, *_GZIP_ERRORS) as e:
        raise _read_error(path, e) from None
    if not heads:
        raise EvaluationError(f"{path}: no FASTA records")
    return heads


def _label_of(rest: str) -> int | None:
    for word in rest.split():
        key, sep, value = word.partition("=")
        if sep and key.lower() == "label":
            return LABEL_VALUES.get(value.lower(), -1)
    return None


def read_truth(fasta: str | os.PathLike[str] | None = None, *, lnc: str | os.PathLike[str] | None = None,
               mrna: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """``id -> 1 (lncRNA) / 0 (mRNA)``, from ``label=`` tags in ``fasta``'s headers, or from the files
    ``lnc`` and ``mrna`` (give both). Records of ``fasta`` without a ``label=`` tag are left out."""
    if fasta is not None and (lnc is not None or mrna is not None):
        raise EvaluationError("give truth either as one labelled FASTA or as --lnc and --mrna, not both")
    truth: dict[str, int] = {}
    if fasta is not None:
        path = Path(fasta)
        for i, (rid, rest) in enumerate(_scan_headers(path), start=1):
            y = _label_of(rest)
            if y == -1:
                raise EvaluationError(f"{path}: record {i} {rid!r}: label must be lncRNA or mRNA ({rest[:60]!r})")
            if y is not None:
                # Why: a repeated id with the other label used to be dropped silently (first one won),
                # so the score depended on record order; the --lnc/--mrna path already refuses this.
                if truth.get(rid, y) != y:
                    raise EvaluationError(f"{path}: record {i} {rid!r}: id already labelled "
                                          f"{'lncRNA' if truth[rid] else 'mRNA'} by an earlier record")
                truth.setdefault(rid, y)
        if not truth:
            raise EvaluationError(f"{path}: no truth labels: headers need label=lncRNA or label=mRNA "
                                  f"(or give --lnc FASTA --mrna FASTA)")
        return truth
    if lnc is None or mrna is None:
        raise EvaluationError("truth needs both --lnc and --mrna (or one FASTA with label= in its headers)")
    for y, p in ((1, Path(lnc)), (0, Path(mrna))):
        for rid, _ in _scan_headers(p):
            if truth.get(rid, y) != y:
                raise EvaluationError(f"{p}: id {rid!r} is also in the other truth file")
            truth[rid] = y
    return truth


@dataclass
class EvalResult:
    """Joined labels and scores with their metrics; ``calls`` says where the thresholded metrics' calls
    came from (a label column, or ``lncRNA_probability >= threshold``)."""

    metrics: dict[str, Any]
    y: np.ndarray
    prob: np.ndarray
    ids: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    calls: str = ""


def evaluate(pred: dict[str, float], truth: dict[str, int], threshold: float = 0.5,
             labels: dict[str, int] | None = None, labels_from: str = "label column") -> EvalResult:
    """Join by id and compute the metrics. Raises :class:`EvaluationError` if no id is in both.

    ``labels`` (id -> 1 lncRNA / 0 mRNA, e.g. a predictions TSV's label column, named by
    ``labels_from``) are the calls of the thresholded metrics. ``metrics["threshold"]`` is then
    ``threshold`` only if every scored call equals ``pred >= threshold``, else ``None``; ``calls``
    says how many differ. Without ``labels`` the calls are ``pred >= threshold``. AUROC / AUPRC
    always use ``pred``."""
    ids = [i for i in pred if i in truth]
    if not ids:
        ex_p, ex_t = next(iter(pred), ""), next(iter(truth), "")
        raise EvaluationError(f"no predicted id has a truth label (e.g. prediction {ex_p!r}, truth {ex_t!r})")
    y = np.array([truth[i] for i in ids], dtype=np.int64)
    p = np.array([pred[i] for i in ids], dtype=np.float64)
    if labels is not None:
        missing = [i for i in ids if i not in labels]
        if missing:
            raise EvaluationError(f"no predicted label for {len(missing)} scored id(s), e.g. {missing[0]!r}")
        given = np.array([labels[i] for i in ids], dtype=np.int64)
        m = classification_metrics(y, p, threshold=threshold, pred=given)
        differ = int((given != (p >= threshold)).sum())
        rule = f"lncRNA_probability >= {threshold:g}"
        if differ:
            # Why None: the TSV does not record the threshold its labels came from; a number here
            # would claim a rule the calls did not follow
            m["threshold"] = None
            calls = f"{labels_from} (differs from {rule} on {differ} of {len(ids)} scored records)"
        else:
            calls = f"{labels_from} (the same calls as {rule})"
    else:
        m = classification_metrics(y, p, threshold=threshold)
        calls = f"lncRNA_probability >= {threshold:g}"
    from sklearn.metrics import average_precision_score

    m["auprc"] = float(average_precision_score(y, p)) if 0 < y.sum() < y.size else math.nan
    info = {
        "n_predicted": len(pred),
        "n_truth": len(truth),
        "n_scored": len(ids),
        "predicted_without_truth": len(pred) - len(ids),
        "truth_without_prediction": sum(1 for i in truth if i not in pred),
    }
    return EvalResult(m, y, p, ids, info, calls)


ORDER = ("accuracy", "precision", "recall", "specificity", "f1", "mcc", "auroc", "auprc")


def format_table(metrics: dict[str, Any], calls: str = "") -> str:
    """Two-column text table: the headline metrics, then the counts, then ``calls`` (where the
    thresholded metrics' calls came from) if given."""
    rows = [(k, f"{metrics[k]:.4f}") for k in ORDER if k in metrics]
    rows += [(k, str(metrics[k])) for k in ("n", "n_pos", "tp", "fp", "tn", "fn", "threshold")
             if metrics.get(k) is not None]
    if calls:
        rows.append(("calls", calls))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"


def plot_curves(y: np.ndarray, prob: np.ndarray, out_dir: str | os.PathLike[str], title: str = "") -> dict[str, Path]:
    """Write ``roc.png`` and ``pr.png`` (matplotlib, Agg backend) into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    out_dir = Path(out_dir)
    paths = {"roc": out_dir / "roc.png", "pr": out_dir / "pr.png"}
    both = 0 < y.sum() < y.size
    suffix = f" - {title}" if title else ""

    fig, ax = plt.subplots(figsize=(4.8, 4.5), dpi=120)
    if both:
        fpr, tpr, _ = roc_curve(y, prob)
        ax.plot(fpr, tpr, lw=1.8, label=f"lncRNA vs mRNA (AUROC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="chance")
    ax.set(xlabel="false positive rate (mRNA called lncRNA)", ylabel="true positive rate (lncRNA recall)",
           title=f"ROC{suffix}", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["roc"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.8, 4.5), dpi=120)
    if both:
        precision, recall, _ = precision_recall_curve(y, prob)
        from sklearn.metrics import average_precision_score

        ax.plot(recall, precision, lw=1.8, label=f"lncRNA (AP {average_precision_score(y, prob):.3f})")
    ax.axhline(float(y.mean()), ls="--", lw=0.8, color="grey", label=f"prevalence {y.mean():.2f}")
    ax.set(xlabel="recall (lncRNA)", ylabel="precision (lncRNA)", title=f"Precision-recall{suffix}",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["pr"])
    plt.close(fig)
    return paths


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def write_report(result: EvalResult, out_dir: str | os.PathLike[str], title: str = "",
                 extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """``metrics.json`` (metrics, join counts, ``extra``), ``metrics.tsv``, ``roc.png``, ``pr.png`` in ``out_dir``.

    NaN metrics (AUROC with a single class) are written as JSON ``null``. The four files are first
    written to a hidden temporary folder inside ``out_dir`` and moved into place only when all of them
    are complete: a failure while writing them (full disk, an error in a plot, Ctrl-C) leaves no
    half-written file and an earlier report in ``out_dir`` as it was, and a folder this call created is
    removed again. The moves themselves replace one file at a time, each atomically.
    """
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Why a staging folder: the files used to be written in place one after the other, so a failure
    # after roc.png left a new plot next to an old (or no) metrics.json, and a crash mid-write a
    # truncated metrics.json
    stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        staged = plot_curves(result.y, result.prob, stage, title)
        staged["json"] = stage / "metrics.json"
        staged["tsv"] = stage / "metrics.tsv"
        doc = {"metrics": result.metrics, "join": result.info, **({"calls": result.calls} if result.calls else {}),
               **(extra or {}), "files": {k: p.name for k, p in staged.items()}}
        staged["json"].write_text(json.dumps(_json_safe(doc), indent=2) + "\n")
        lines = ["metric\tvalue"] + [f"{k}\t{'' if v is None else v}" for k, v in result.metrics.items()]
        staged["tsv"].write_text("\n".join(lines) + "\n")
        paths = {k: out_dir / p.name for k, p in staged.items()}
        for k, p in staged.items():
            os.replace(p, paths[k])
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if still empty
        if isinstance(e, OSError) and e.filename and Path(e.filename).parent == stage:
            e.filename = str(out_dir / Path(e.filename).name)  # name the file the user asked for, not the stage
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return paths
