"""``lncrna``: the command line. ``lncrna --help`` and ``lncrna COMMAND --help`` list every option.

    lncrna predict transcripts.fa.gz -o predictions.tsv
    lncrna evaluate predictions.tsv --truth labelled.fa      (or --lnc lnc.fa --mrna mrna.fa)
    lncrna evaluate data/lncrna/test_human.fa.gz             (predict + evaluate in one go)
    lncrna train adapter=lora data=mouse trainer=gpu         (Hydra, conf/lncrna/)
    lncrna pretrain trainer=gpu max_minutes=30               (Hydra, conf/lncrna/)

``predict`` and ``evaluate`` are argparse commands; ``train`` and ``pretrain`` hand the rest of
the command line to Hydra (so ``-m`` sweeps, ``--cfg job`` and every override work).

Errors a user can fix (bad input, unreadable input, unwritable output, missing model, unknown
adapter) are one line on stderr, prefixed ``lncrna COMMAND: error:``, exit status 2, no traceback;
per-record problems in an input FASTA (protein, non-nucleotide characters, empty record, duplicate
id) are one-line warnings and the record is skipped. Records shorter than 200 nt or more than half
N are predicted as usual and named in one summary warning per file. Exit 1 is an internal error
(set ``LNCRNA_DEBUG=1`` for its traceback), 130 an interrupt (Ctrl-C), 143 SIGTERM, 129 SIGHUP (the
terminal was closed; under ``nohup`` SIGHUP is ignored and the run goes on).

Output of ``predict`` (TSV ``id length lncRNA_probability label`` with a header), ``-o OUT``: rows
are written to ``OUT.partial`` in OUT's folder and flushed after every chunk of records; the file
is created (and its folder checked) before the model loads. When the run succeeds, ``OUT.partial``
is renamed to OUT. On Ctrl-C the finished rows are renamed to OUT too (an interrupted run keeps
every finished row, and says how many). On any error (exit 2 or 1), on SIGTERM (exit 143) and on
SIGHUP (exit 129) ``OUT.partial`` is deleted and an existing OUT is left as it was, so a failed run
never leaves a complete-looking partial TSV. SIGTERM and SIGHUP are treated like an error, not like
Ctrl-C, because they come from schedulers, timeouts, ``kill`` and closed terminals, where no one
reads the message and OUT's existence is what a pipeline takes as "done".
Standard output and devices are written directly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import stat
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError

PROG = "lncrna"
HYDRA_COMMANDS = {
    "train": "fine-tune the classifier with an adapter (Hydra; lncrna train --help)",
    "pretrain": "masked-LM pretraining of the encoder (Hydra; lncrna pretrain --help); init_dir=MLM is a warm "
                "start, not a resume: weights only, the optimizer and the LR schedule (with its warmup) "
                "restart, the data order gets a new seed",
}
MAX_WARNINGS = 20  # per-record warnings printed; the rest are counted
MIN_RELIABLE_LENGTH = 200  # nt; the training data has no shorter record (data/PROVENANCE.md)
MAX_N_SHARE = 0.5  # records with a larger share of N (unknown bases) get a warning
SHOW_IDS = 5  # ids named per low-signal warning line
DEFAULT_THRESHOLD = 0.5  # --threshold when none is given


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while ``predict`` / ``evaluate`` ran (raised by :func:`_termination_raises`).

    A ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception`` on the way (model
    loading, the progress-bar count) turns it into an ordinary error; the output clean-up in
    ``finally`` / ``except BaseException`` blocks runs, and :func:`main` returns 128 + the signal
    number (143 for SIGTERM, 129 for SIGHUP, the shell's convention)."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(signum)
        self.signum: int = signum

    @property
    def signal_name(self) -> str:
        """``"SIGTERM"``, ``"SIGHUP"``."""
        import signal

        return signal.Signals(self.signum).name


def _termination_signals() -> list[int]:
    """The signals turned into :class:`Terminated`: SIGTERM, and SIGHUP where the platform has it."""
    import signal

    return [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


@contextlib.contextmanager
def _termination_raises() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` in this process while the block runs.

    Python's default for both kills the process on the spot, so no ``finally`` ran and
    ``OUT.partial`` was left behind (SIGHUP: the terminal was closed). Only in the main thread
    (elsewhere a handler cannot be set). A forked stage-1 worker inherits the handler; there SIGTERM
    kills it as by default (a SIGTERM to the process group, and the executor's stopping of the other
    workers when one dies, must end it: a raise would print a traceback per worker; ``Predictor.close``
    copes with a worker killed at any point) and SIGHUP is ignored (a closed terminal hangs up the
    whole process group; the parent stops the workers). Later signals are ignored while the first one
    is being cleaned up.
    The previous handlers are restored on exit; a signal that was set to be ignored (``SIG_IGN``,
    e.g. SIGHUP under ``nohup``) stays ignored.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # no handler possible here
        return
    # a deliberately ignored signal is left so: nohup's promise is that a hangup does not stop the run
    signums = [s for s in _termination_signals() if signal.getsignal(s) != signal.SIG_IGN]
    owner = os.getpid()
    raised = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal raised
        if os.getpid() != owner:  # a forked worker
            if signum == signal.SIGTERM:  # the default action (terminate), without a traceback
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            else:
                # Why ignore: a hangup reaches the whole process group. A worker dying of it while it
                # waits for a task holds the task queue's lock, which the other workers then wait for
                # forever; the parent, hung up too, stops the workers itself (Predictor.close)
                signal.signal(signum, signal.SIG_IGN)
            return
        if not raised:
            raised = True
            raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


# ---- argument parsing -------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _workers(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {text!r}")
    return v


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def _output_file(text: str) -> Path:
    """``predict -o``: a file name; a name ending in ``/`` is refused.

    Why: ``Path("results/")`` drops the slash, so ``-o results/`` wrote the TSV to a *file* named
    ``results`` (exit 0) when the user meant a folder."""
    if text != "-" and text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} ends with '/', which names a folder; give a file name "
                                         f"for the output TSV (e.g. {text}predictions.tsv)")
    return Path(text)


def _add_model_options(p: argparse.ArgumentParser, threshold_help: str | None = None) -> None:
    g = p.add_argument_group("model and speed")
    g.add_argument("--model", metavar="DIR", type=Path, default=None,
                   help="model directory with lncrna_config.json, model.safetensors and stack.json, "
                        "e.g. the <out_dir>/classifier that `lncrna train` writes (default: the model "
                        "shipped in lncrna/weights/default)")
    g.add_argument("--baseline", metavar="DIR", type=Path, default=None,
                   help="feature-baseline directory (default: lncrna/weights/baseline)")
    g.add_argument("--no-cascade", dest="cascade", action="store_false",
                   help="send every sequence to the transformer; by default only those the fast "
                        "baseline is unsure about (baseline probability inside the model's "
                        "stack.json band low..high) go there, the rest keep the baseline's probability")
    g.add_argument("--device", metavar="DEV", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--batch-tokens", metavar="N", type=_positive_int, default=None,
                   help="padded tokens per transformer batch (default: 16384 on CPU, 524288 on CUDA); "
                        "lower it if the GPU runs out of memory")
    g.add_argument("--workers", metavar="N", type=_workers, default=None,
                   help="processes for the baseline features and tokenization: 'auto' (default: 0 on "
                        "CPU, min(16, cores - 1) on CUDA) or a number; 0 = in this process")
    g.add_argument("--threads", metavar="N", type=_positive_int, default=None,
                   help="CPU threads the transformer may use (torch.set_num_threads(N)); default: torch's own "
                        "(usually one per core). Set it when other jobs share the machine; --workers processes "
                        "come on top")
    g.add_argument("--chunk-size", metavar="N", type=_positive_int, default=4096,
                   help="sequences per chunk; rows are written and flushed after each chunk (default 4096)")
    # default None, not 0.5: evaluate must tell an explicit --threshold from none (see cmd_evaluate)
    g.add_argument("--threshold", metavar="P", type=_probability, default=None,
                   help=threshold_help or f"label = lncRNA when lncRNA_probability >= P, else mRNA "
                                          f"(default {DEFAULT_THRESHOLD})")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no summary line (warnings and errors are still printed); "
                        "the progress bar is also off when stderr is not a terminal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tell long non-coding RNA (lncRNA) from mRNA: a small nucleotide BERT behind a fast "
                    "CPAT-like feature baseline.",
        epilog="Exit status: 0 ok, 2 user error (bad input, missing model, bad option), 1 internal error, "
               "130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 129 hangup (SIGHUP: the terminal was "
               "closed). 'lncrna COMMAND --help' shows the options of a command.",
    )
    from . import __version__
    from .fasta import MAX_LENGTH

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "predict", help="lncRNA probability of every sequence of a FASTA file",
        description="Predict the lncRNA probability of every sequence of a FASTA / FASTA.gz file. Output: TSV "
                    "with header 'id length lncRNA_probability label', in input order.",
        # the length limit is named here because a long genomic region is skipped, not predicted
        epilog="Invalid records (protein, non-nucleotide characters, empty sequence, duplicate id: the first "
               f"record with an id is kept; longer than {MAX_LENGTH:,} nt) are skipped with a one-line warning "
               "each; a file that cannot be "
               "used at all (missing, unreadable, a directory, empty, not FASTA, broken gzip, a header line "
               "after the first indented by whitespace, a header or sequence line that is not UTF-8 text, no "
               "valid record) "
               "and an output that cannot be written are errors, exit 2. Records shorter than "
               f"{MIN_RELIABLE_LENGTH} nt (the training data's minimum) or with more than {MAX_N_SHARE:.0%} N "
               "are predicted as usual, but their probability has little signal behind it: they are counted "
               "and named (first few ids) in one warning line per file.")
    p.add_argument("input", metavar="INPUT", type=Path,
                   help="FASTA or FASTA.gz file (gzip detected from the content); a regular file, not standard "
                        "input or a pipe: it is read twice")
    p.add_argument("-o", "--output", metavar="OUT", type=_output_file, default=None,
                   help="output TSV (default, or '-': standard output); an OUT ending in .gz is written "
                        "gzip-compressed. Rows are written to OUT.partial (same folder) "
                        "and flushed after every chunk; OUT.partial is renamed to OUT when the run succeeds, "
                        "and also on Ctrl-C (exit 130: OUT then holds the finished rows, and the message says "
                        "how many). On an error (exit 2 or 1), SIGHUP (exit 129) or SIGTERM (exit 143) "
                        "OUT.partial is deleted "
                        "and an existing OUT is left untouched. An OUT that cannot be written is an error before "
                        "the model loads.")
    _add_model_options(p)
    p.set_defaults(command_parser=p)  # main() reports an unknown option with this command's usage

    e = sub.add_parser(
        "evaluate", help="metrics, ROC and precision-recall curves against truth labels",
        description="Score predictions against truth. INPUT is either a predictions TSV from 'lncrna predict' "
                    "(then give truth with --truth or --lnc/--mrna) or a FASTA file, which is predicted first "
                    "(truth from its headers' label=lncRNA|mRNA unless --truth or --lnc/--mrna is given). "
                    "Without INPUT, --lnc and --mrna are both predicted and scored.",
        epilog="Writes OUTDIR/metrics.json, metrics.tsv, roc.png, pr.png (and predictions.tsv when it predicts, "
               "written like predict's -o OUT: via predictions.tsv.partial) and prints the metrics table. "
               "Records missing from either side are counted and left out. Predicted records shorter than "
               f"{MIN_RELIABLE_LENGTH} nt or with more than {MAX_N_SHARE:.0%} N get one summary warning per file "
               "(their probability has little signal behind it); they are still scored.")
    e.add_argument("input", metavar="INPUT", type=Path, nargs="?", default=None,
                   help="predictions TSV, or FASTA(.gz) to predict and score")
    t = e.add_argument_group("truth")
    t.add_argument("--truth", metavar="FASTA", type=Path, default=None,
                   help="FASTA whose headers carry label=lncRNA or label=mRNA (like data/lncrna/*.fa.gz)")
    t.add_argument("--lnc", metavar="FASTA", type=Path, default=None, help="FASTA of the true lncRNAs")
    t.add_argument("--mrna", metavar="FASTA", type=Path, default=None, help="FASTA of the true mRNAs")
    e.add_argument("-o", "--out-dir", metavar="OUTDIR", type=Path, default=None,
                   help="output folder (default: <INPUT name>_eval, or lncrna_eval)")
    _add_model_options(e, threshold_help=(
        f"for a FASTA INPUT (predicted here): label = lncRNA when lncRNA_probability >= P, else mRNA "
        f"(default {DEFAULT_THRESHOLD}). For a predictions TSV the thresholded metrics (accuracy, precision, "
        f"recall, specificity, F1, MCC, tp/fp/tn/fn) use the TSV's own label column, i.e. the calls predict "
        f"wrote with its --threshold; give --threshold P to recompute the calls as lncRNA_probability >= P "
        f"instead (the table's 'calls' row and metrics.json say which). AUROC and AUPRC always use the "
        f"probabilities."))

    e.set_defaults(command_parser=e)
    for name, text in HYDRA_COMMANDS.items():  # listed here for --help; dispatched to Hydra in main()
        sub.add_parser(name, help=text, add_help=False)
    return parser


# ---- output helpers ----------------------------------------------------------------------------
_WARNING_KINDS = ("duplicate id", "looks like a protein", "non-nucleotide characters", "empty sequence",
                  "missing record id", "too long", "very long sequence")


class _Warnings:
    """Print per-record FastaWarnings as ``lncrna CMD: warning: ...`` lines (at most MAX_WARNINGS); the
    rest are counted by kind (duplicate id, protein, ...) and named in :meth:`summary`."""

    def __init__(self, cmd: str, write) -> None:
        self.cmd, self.write, self.count = cmd, write, 0
        self.hidden: dict[str, int] = {}

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.count += 1
        if self.count <= MAX_WARNINGS:
            self.write(f"{PROG} {self.cmd}: warning: {message}")
            return
        if self.count == MAX_WARNINGS + 1:
            self.write(f"{PROG} {self.cmd}: warning: more warnings follow; only their number is reported")
        text = str(message)
        kind = next((k for k in _WARNING_KINDS if k in text), "other")
        self.hidden[kind] = self.hidden.get(kind, 0) + 1

    def summary(self) -> str | None:
        if self.count > MAX_WARNINGS:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.hidden.items(), key=lambda kv: -kv[1]))
            return (f"{PROG} {self.cmd}: {self.count} warnings in total ({self.count - MAX_WARNINGS} not shown: "
                    f"{kinds})")
        return None


class _LowSignal:
    """Counts the records predicted with little signal (shorter than MIN_RELIABLE_LENGTH, or more
    than MAX_N_SHARE N); they are predicted as usual and reported as one summary line per file and
    kind (count and the first SHOW_IDS ids), not one line per record."""

    def __init__(self) -> None:
        self.found: dict[tuple[str, str], list[Any]] = {}  # (file, kind) -> [count, first ids]

    def _add(self, path: Path, kind: str, rid: str) -> None:
        entry = self.found.setdefault((str(path), kind), [0, []])
        entry[0] += 1
        if len(entry[1]) < SHOW_IDS:
            entry[1].append(rid)

    def wrap(self, path: Path, records: Iterable[Any]) -> Iterator[Any]:
        for rec in records:
            n = len(rec.seq)
            if n < MIN_RELIABLE_LENGTH:
                self._add(path, "short", rec.id)
            if rec.seq.count("N") > MAX_N_SHARE * n:
                self._add(path, "N", rec.id)
            yield rec

    def lines(self, cmd: str) -> list[str]:
        out = []
        for (path, kind), (count, ids) in self.found.items():
            what = (f"shorter than {MIN_RELIABLE_LENGTH} nt (the training data's minimum)" if kind == "short"
                    else f"more than {MAX_N_SHARE:.0%} N (unknown bases)")
            named = ", ".join(repr(i) for i in ids) + (f" and {count - len(ids)} more" if count > len(ids) else "")
            noun = "record" if count == 1 else "records"
            out.append(f"{PROG} {cmd}: warning: {path}: {count} {noun} {what}; predicted as usual, but the "
                       f"probability has little signal behind it: {named}")
        return out


@contextlib.contextmanager
def _warnings_to(handler: _Warnings) -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        saved = warnings.showwarning
        warnings.showwarning = handler.show
        try:
            yield
        finally:
            warnings.showwarning = saved


def _count_records(path: Path) -> int | None:
    """Number of '>' header lines (for the progress bar's total); None if the file cannot be scanned."""
    import gzip

    try:
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        n, prev = 0, b"\n"
        with opener(path, "rb") as fh:
            while block := fh.read(1 << 22):
                n += block.count(b"\n>") + (prev == b"\n" and block[:1] == b">")
                prev = block[-1:]
        return n
    except Exception:
        return None


class _RowWriter:
    """Writes the TSV: header + rows, flushed per chunk.

    A regular-file OUT is written as ``OUT.partial`` (same folder) and renamed to OUT by
    :meth:`finish` when the run succeeds, or when it is interrupted (Ctrl-C) after some rows were
    written; on any error ``OUT.partial`` is deleted and an existing OUT is left as it was. Standard
    output and devices (``/dev/stdout``, a FIFO) are written directly. :meth:`open` creates the file
    (and a missing folder) up front, so an output that cannot be written fails before any
    prediction; OSErrors while writing become one-line UserErrors naming the file.
    """

    def __init__(self, path: Path | None) -> None:
        self.path, self.fh, self.rows = path, None, 0
        self.partial: Path | None = None  # the file being written when OUT is replaced at the end
        self.final: Path | None = None  # what the partial file is renamed to (a symlink's target)
        self.header_written = False
        self.done = False
        self.outcome = ""  # " (3 finished rows kept in OUT)" etc., for the error / interrupt line
        self._made_dirs: list[Path] = []
        self._old_mode: int | None = None
        self._raw: Any = None  # the binary file under a gzip OUT's text stream (closed after it)

    def _cannot(self, e: OSError, what: str = "cannot write") -> UserError:
        return UserError(f"{self.where()}: {what} ({e.strerror or type(e).__name__})")

    def open(self) -> None:
        if self.fh is not None or self.done:
            return
        if self.path is None:
            self.fh = sys.stdout
            return
        path = self.path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise self._cannot(e) from None
        try:
            if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                self.fh = open(path, "w", encoding="utf-8", newline="\n")  # a device or FIFO: direct
                return
            if st is not None:
                with open(path, "ab"):  # an existing OUT we may not replace (read-only, immutable)
                    pass
                self._old_mode = stat.S_IMODE(st.st_mode)
            self.final = Path(os.path.realpath(path)) if path.is_symlink() else path
            missing, parent = [], self.final.parent
            while not parent.exists() and parent != parent.parent:
                missing.append(parent)
                parent = parent.parent
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs = missing
            self.partial = self.final.with_name(self.final.name + ".partial")
            self.fh = self._open_partial()
            self._write_header()
        except OSError as e:
            self.finish(keep=False)
            raise self._cannot(e) from None

    def _open_partial(self) -> Any:
        """The text stream for ``OUT.partial``: gzip-compressed when OUT's name ends in ``.gz``.

        Why: ``-o predictions.tsv.gz`` used to write plain text under a ``.gz`` name (``zcat`` fails
        on it). Each chunk's flush is a zlib sync flush, so the rows written so far can be read back
        from ``OUT.partial``; :meth:`finish` writes the gzip trailer before the rename."""
        assert self.partial is not None and self.final is not None
        if not self.final.name.endswith(".gz"):
            return open(self.partial, "w", encoding="utf-8", newline="\n")
        import gzip
        import io

        self._raw = open(self.partial, "wb")
        gz = gzip.GzipFile(filename=self.final.name.removesuffix(".gz"), mode="wb", fileobj=self._raw,
                           compresslevel=6, mtime=0)  # 6: gzip's default, much faster than 9 for 3% more bytes
        return io.TextIOWrapper(gz, encoding="utf-8", newline="\n")

    def _write_header(self) -> None:
        from .predict import TSV_COLUMNS

        assert self.fh is not None
        self.fh.write("\t".join(TSV_COLUMNS) + "\n")
        self.fh.flush()
        self.header_written = True

    def write_chunk(self, lines: list[str]) -> None:
        self.open()
        assert self.fh is not None
        try:
            if not self.header_written:
                self._write_header()
            self.fh.write("".join(lines))
            self.fh.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise self._cannot(e) from None
        self.rows += len(lines)

    def finish(self, keep: bool) -> None:
        """Close the output. ``keep``: rename ``OUT.partial`` to OUT (if it holds rows, or the run
        succeeded); otherwise delete it. Sets :attr:`outcome`. Idempotent."""
        if self.done:
            return
        self.done = True
        fh, self.fh = self.fh, None
        rows, where = self.rows, self.where()
        close_error: OSError | None = None
        if fh is not None and fh is not sys.stdout:
            # a gzip OUT writes its last block and trailer here: a failure must not be renamed to OUT
            for f in (fh, self._raw):
                try:
                    if f is not None:
                        f.close()
                except OSError as e:
                    close_error = close_error or e
        if self.partial is None:  # standard output or a device: the rows are already there
            self.outcome = f" ({rows} finished rows kept in {where})" if rows else " (no rows written)"
            return
        if keep and close_error is not None:
            self._discard()
            raise self._cannot(close_error)
        if keep:
            try:
                if self._old_mode is not None:
                    with contextlib.suppress(OSError):
                        os.chmod(self.partial, self._old_mode)
                os.replace(self.partial, self.final)  # type: ignore[arg-type]
                self.outcome = f" ({rows} finished rows kept in {where})" if rows else " (no rows written)"
                return
            except OSError as e:
                self._discard()
                raise self._cannot(e, f"cannot replace it with {self.partial}") from None
        self._discard()
        if rows:
            old = "left as it was" if self._old_mode is not None else "not written"
            self.outcome = f" ({rows} finished rows discarded; {where} {old})"
        else:
            self.outcome = " (no rows written)"

    def _discard(self) -> None:
        if self.partial is not None:
            with contextlib.suppress(OSError):
                self.partial.unlink()
        for d in self._made_dirs:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                d.rmdir()

    def where(self) -> str:
        return "standard output" if self.path is None else str(self.path)


def _predictor(args: argparse.Namespace):
    from .predict import Predictor

    predictor = Predictor(model_dir=args.model, device=args.device, cascade=args.cascade,
                          batch_tokens=args.batch_tokens, workers=args.workers, baseline_dir=args.baseline,
                          threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
                          chunk_size=args.chunk_size)
    if args.threads is not None:
        import torch

        # after the Predictor has forked its stage-1 workers (they run numpy only), before the model runs
        try:
            torch.set_num_threads(args.threads)
        except (ValueError, RuntimeError) as e:  # e.g. more than a C int: "Overflow when unpacking long"
            predictor.close()
            raise UserError(f"--threads {args.threads}: {' '.join(str(e).split())}") from None
    return predictor


@contextlib.contextmanager
def _torch_threads_restored(threads: int | None) -> Iterator[None]:
    """With ``--threads``: torch's thread count (process-wide) as it was before the command, once it ends.
    Why: ``main()`` called in-process (tests, notebooks, API users) left the caller's torch at N threads."""
    if threads is None:  # torch is not imported for nothing
        yield
        return
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _naming_lost_workers(inputs: Iterable[Path | None]) -> Iterator[None]:
    """A stage-1 worker that died (``lncrna.predict.WorkerDied``: the out-of-memory killer, a crash)
    becomes one error line naming the input and what to do (exit 2); what became of the rows stays."""
    from .predict import WorkerDied

    try:
        yield
    except WorkerDied as e:
        names = ", ".join(str(i) for i in inputs if i is not None)
        err = UserError(f"a feature worker died ({e.reason}) while processing {names}; rerun with fewer "
                        f"--workers or --workers 0")
        err.output_note = _kept(e)  # type: ignore[attr-defined]
        raise err from None


def _check_output_path(out: Path | None, inputs: Iterable[Path | None], *, parent_may_be_missing: bool = False) -> None:
    if out is None:
        return
    if out.is_dir():
        raise UserError(f"{out}: is a directory; give a file name for the output TSV")
    if not parent_may_be_missing and not out.parent.is_dir():
        problem = "is not a folder" if out.parent.exists() else "does not exist"  # e.g. -o input.fa/out.tsv
        raise UserError(f"{out}: output folder {out.parent} {problem}")
    partial = out.with_name(out.name + ".partial")
    for i in inputs:
        if i is None:
            continue
        for o in (out, partial):
            with contextlib.suppress(OSError):  # samefile: also hard links and bind mounts
                if o.exists() and i.exists() and (os.path.samefile(o, i) or o.resolve() == i.resolve()):
                    raise UserError(f"{out}: the output would overwrite the input {i}")


def _stream_predictions(cmd: str, args: argparse.Namespace, records: Iterable[Any], total: int | None,
                        writer: _RowWriter, predictor, low_signal: _LowSignal | None = None) -> dict[str, Any]:
    """Run the predictor over ``records`` into ``writer`` with a progress bar; returns a summary.

    Finishes ``writer``: on success and on Ctrl-C the rows go to OUT, on any error (and on
    SIGTERM or SIGHUP, :class:`Terminated`) they are discarded (see :class:`_RowWriter`). Re-raises any error
    with ``exc.output_note`` saying what became of the rows.
    """
    from tqdm import tqdm

    from .predict import format_row

    show_bar = not args.quiet and sys.stderr.isatty()
    # miniters=1: tqdm's default (dynamic miniters) waits for as many records as the last printed step
    # before it redraws; after stage 1 settles thousands of easy records in one step, the bar then
    # stood still through the transformer batches that follow
    bar = tqdm(total=total, unit="seq", desc=f"{PROG} {cmd}", file=sys.stderr, disable=not show_bar,
               dynamic_ncols=True, smoothing=0.1, miniters=1)
    emit = (lambda s: bar.write(s, file=sys.stderr)) if show_bar else (lambda s: print(s, file=sys.stderr, flush=True))
    handler = _Warnings(cmd, emit)
    t0 = time.perf_counter()
    n_transformer = 0
    low_lines: list[str] = []
    try:
        with _warnings_to(handler):
            chunk: list[str] = []
            # progress=bar.update: the predictor reports each transformer batch as it finishes; a bar
            # moved per written chunk (4096 records) sat at 0% through a smaller file on a CPU
            for pred in predictor.predict_records(records, progress=bar.update):
                chunk.append(format_row(pred))
                n_transformer += pred.stage == "transformer"
                if len(chunk) >= predictor.chunk_size:
                    writer.write_chunk(chunk)
                    chunk = []
            if chunk:
                writer.write_chunk(chunk)
        writer.finish(keep=True)
        low_lines = low_signal.lines(cmd) if low_signal is not None else []
    except KeyboardInterrupt as exc:
        with contextlib.suppress(Exception):
            writer.finish(keep=writer.rows > 0)  # Ctrl-C: the finished rows go to OUT
        exc.output_note = writer.outcome  # type: ignore[attr-defined]
        low_lines = low_signal.lines(cmd) if low_signal is not None and writer.rows else []
        raise
    except BaseException as exc:
        with contextlib.suppress(Exception):
            writer.finish(keep=False)  # an error: OUT.partial is deleted, an old OUT stays
        exc.output_note = writer.outcome  # type: ignore[attr-defined]
        raise
    finally:
        bar.close()
        for line in low_lines:
            print(line, file=sys.stderr)
        if (s := handler.summary()) is not None:
            print(s, file=sys.stderr)
    seconds = time.perf_counter() - t0
    return {"sequences": writer.rows, "transformer": n_transformer, "seconds": seconds,
            "seq_per_s": writer.rows / seconds if seconds > 0 else float("nan"),
            "warnings": handler.count + len(low_lines),
            "device": str(predictor.device), "cascade": predictor.cascade, "workers": predictor.workers}


def _summary_line(cmd: str, s: dict[str, Any], where: str) -> str:
    share = s["transformer"] / s["sequences"] if s["sequences"] else 0.0
    return (f"{PROG} {cmd}: {s['sequences']} sequences in {s['seconds']:.1f} s ({s['seq_per_s']:.0f} seq/s, "
            f"{s['device']}), {s['transformer']} ({share:.1%}) through the transformer; rows in {where}")


# ---- commands ----------------------------------------------------------------------------------
def cmd_predict(args: argparse.Namespace) -> int:
    from .fasta import read_fasta

    if args.output == Path("-"):  # the usual spelling of standard output
        args.output = None
    _check_output_path(args.output, [args.input])
    records = read_fasta(args.input)  # missing / empty / not FASTA / broken gzip header: raises here
    low_signal = _LowSignal()
    writer = _RowWriter(args.output)
    try:
        writer.open()  # an output that cannot be written fails here, before the model loads
        predictor = _predictor(args)  # missing model: raises here; OUT.partial is removed
        total = _count_records(args.input) if (not args.quiet and sys.stderr.isatty()) else None
        with predictor, _naming_lost_workers([args.input]):
            summary = _stream_predictions("predict", args, low_signal.wrap(args.input, records), total, writer,
                                          predictor, low_signal)
    finally:
        writer.finish(keep=False)  # no-op after _stream_predictions; cleans up when it never ran
    if not args.quiet:
        print(_summary_line("predict", summary, writer.where()), file=sys.stderr)
    return 0


def _eval_name(path: Path | None) -> str:
    if path is None:
        return "lncrna"
    name = path.name
    for suffix in (".gz", ".fa", ".fasta", ".fna", ".tsv", ".txt"):
        name = name.removesuffix(suffix)
    return name or "lncrna"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import (
        evaluate,
        format_table,
        read_predictions,
        read_predictions_with_labels,
        read_truth,
        sniff_kind,
        write_report,
    )
    from .fasta import read_fasta

    if args.truth is not None and (args.lnc is not None or args.mrna is not None):
        raise UserError("give truth either with --truth or with --lnc and --mrna, not both")
    if (args.lnc is None) != (args.mrna is None):
        raise UserError("--lnc and --mrna go together (the true lncRNAs and the true mRNAs)")
    if args.input is None and args.lnc is None:
        raise UserError("nothing to evaluate: give INPUT (predictions TSV or FASTA), or --lnc and --mrna")
    kind = sniff_kind(args.input) if args.input is not None else "fasta"
    if kind == "unknown":
        raise UserError(f"{args.input}: neither FASTA nor a predictions TSV (header 'id<TAB>length<TAB>"
                        f"lncRNA_probability<TAB>label')")
    out_dir = args.out_dir if args.out_dir is not None else Path(f"{_eval_name(args.input)}_eval")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")

    # truth first: it is cheap (headers only) and a run should not predict for nothing
    if args.truth is not None:
        truth = read_truth(args.truth)
    elif args.lnc is not None:
        truth = read_truth(lnc=args.lnc, mrna=args.mrna)
    elif kind == "fasta":
        truth = read_truth(args.input)
    else:
        raise UserError(f"{args.input}: predictions need truth labels: --truth FASTA, or --lnc FASTA --mrna FASTA")

    # argv[1:], not argv[2:]: the latter dropped "evaluate", so metrics.json's command did not rerun the evaluation
    extra: dict[str, Any] = {"command": shlex.join([PROG, *sys.argv[1:]]) if sys.argv[1:2] == ["evaluate"] else None}
    labels: dict[str, int] | None = None
    calls = ""
    if kind == "predictions":
        # Why the label column: predict may have run with another --threshold; recomputing with
        # 0.5 gave confusion counts that did not match the labels it wrote
        if args.threshold is None:
            pred, labels = read_predictions_with_labels(args.input)
        else:
            pred = read_predictions(args.input)
            calls = (f"lncRNA_probability >= {args.threshold:g} (recomputed: --threshold given; the TSV's label "
                     f"column is not used)")
            if not args.quiet:
                print(f"{PROG} evaluate: note: calls recomputed as lncRNA_probability >= {args.threshold:g} "
                      f"(--threshold given); the label column of {args.input} is not used", file=sys.stderr)
        extra["predictions"] = str(args.input)
    else:
        inputs = [args.input] if args.input is not None else [args.lnc, args.mrna]
        pred_path = out_dir / "predictions.tsv"
        _check_output_path(pred_path, [*inputs, args.truth], parent_may_be_missing=True)
        low_signal = _LowSignal()
        streams = [low_signal.wrap(p, read_fasta(p)) for p in inputs]  # file-level problems raise here
        import itertools

        writer = _RowWriter(pred_path)
        try:
            writer.open()  # an output folder that cannot be written fails here, before the model loads
            predictor = _predictor(args)
            total = None
            if not args.quiet and sys.stderr.isatty():
                counts = [_count_records(p) for p in inputs]
                total = None if None in counts else sum(counts)  # type: ignore[arg-type]
            with predictor, _naming_lost_workers(inputs):
                summary = _stream_predictions("evaluate", args, itertools.chain.from_iterable(streams), total,
                                              writer, predictor, low_signal)
        finally:
            writer.finish(keep=False)  # no-op after _stream_predictions; cleans up when it never ran
        if not args.quiet:
            print(_summary_line("evaluate", summary, str(pred_path)), file=sys.stderr)
        pred = read_predictions(pred_path)
        extra["predictions"] = str(pred_path)
        extra["prediction_run"] = summary
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    result = evaluate(pred, truth, threshold=threshold, labels=labels, labels_from=f"label column of {args.input}")
    if calls:
        result.calls = calls
    title = _eval_name(args.input) if args.input is not None else f"{_eval_name(args.lnc)} + {_eval_name(args.mrna)}"
    try:
        paths = write_report(result, out_dir, title=title, extra=extra)
    except OSError as e:  # a folder we may not write to, a full disk
        raise UserError(f"{e.filename or out_dir}: cannot write ({e.strerror or type(e).__name__})") from None
    info = result.info
    if info["predicted_without_truth"] or info["truth_without_prediction"]:
        print(f"{PROG} evaluate: warning: scored {info['n_scored']} records; {info['predicted_without_truth']} "
              f"predictions have no truth label, {info['truth_without_prediction']} truth records have no "
              f"prediction", file=sys.stderr)
    sys.stdout.write(format_table(result.metrics, result.calls))
    if not args.quiet:
        print(f"{PROG} evaluate: wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


# ---- Hydra commands ----------------------------------------------------------------------------
def hydra_config_dir() -> Path:
    """``conf/lncrna``: ``$LNCRNA_CONF``, the checkout's ``conf/lncrna``, or the copy installed with
    the wheel (``lightning_lora/conf/lncrna``, put there by setup.py)."""
    candidates = []
    if os.environ.get("LNCRNA_CONF"):
        candidates.append(Path(os.environ["LNCRNA_CONF"]))
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "conf" / "lncrna", here.parent / "lightning_lora" / "conf" / "lncrna"]
    with contextlib.suppress(Exception):
        import importlib.util

        spec = importlib.util.find_spec("lightning_lora")
        if spec is not None and spec.origin:
            candidates.append(Path(spec.origin).parent / "conf" / "lncrna")
    for c in candidates:
        if (c / "train.yaml").is_file():
            return c
    raise UserError(f"no Hydra configs (train.yaml) in {', '.join(map(str, candidates))}; reinstall the package")


def adapter_options(conf: Path) -> dict[str, dict[str, Any]]:
    """The ``adapter`` group: every ``conf/adapter/*.yaml`` (shared with lightning-lora), plus a bare
    ``{"method": name}`` for each registered method without a file of its own."""
    from omegaconf import OmegaConf

    import lightning_lora

    options: dict[str, dict[str, Any]] = {}
    shared = conf.parent / "adapter"
    if shared.is_dir():
        for path in sorted(shared.glob("*.yaml")):
            options[path.stem] = OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[assignment]
    for method in lightning_lora.available_methods():
        options.setdefault(method, {"method": method})
    return options


def _group_options(conf: Path, group: str, adapters: dict[str, Any]) -> list[str]:
    if group == "adapter":
        return sorted(adapters)
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def _check_overrides(cmd: str, args: list[str], conf: Path, adapters: dict[str, Any]) -> None:
    """Unknown options of a config group -> one-line UserError listing the choices (before Hydra starts)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    import lightning_lora

    groups = {"adapter", "model", "data", "trainer", "experiment"} if cmd == "train" else {"model", "data", "trainer"}
    candidates = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:
        return  # let Hydra report syntax errors itself
    for o in overrides:
        group = o.key_or_group.lstrip("+~")
        if group not in groups or o.is_delete() or o.package:
            continue
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # glob(...) and ranges: Hydra resolves those
                continue
        else:
            values = [o.get_value_element_as_str()]
        choices = _group_options(conf, group, adapters)
        for v in values:
            if v not in choices and not (group == "experiment" and v == "null"):
                extra = ""
                if group == "adapter":
                    extra = (f"; registered methods: {', '.join(lightning_lora.available_methods())} "
                             f"(adapter=<method> works for each)")
                raise UserError(f"unknown {group} {v!r}; choose one of: {', '.join(choices)}{extra}")


def _container(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _out_dir(cfg: Any) -> Path:
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # outside Hydra
        return Path("runs/lncrna")


def _model_config(cfg: Any):
    from .model import ModelConfig

    try:
        return ModelConfig(**_container(cfg.model))
    except TypeError as e:
        raise UserError(f"model: {e}") from None


def _trainer_kwargs(cfg: Any) -> dict[str, Any]:
    kw = {k: v for k, v in _container(cfg.trainer).items() if v is not None}
    reserved = {"max_epochs", "max_time", "logger", "enable_checkpointing", "callbacks"} & set(kw)
    if reserved:
        raise UserError(f"trainer: {', '.join(sorted(reserved))} are set by lncrna itself "
                        f"(use epochs= / max_minutes=); remove them from the trainer config")
    return kw


def _data_root(cfg: Any) -> str | None:
    root = cfg.data.get("root")
    if root and not Path(root).is_dir():
        raise UserError(f"data.root={root}: no such folder")
    return root


def _setting(cfg: Any, key: str, kind: type) -> Any:
    """``cfg[key]`` as ``kind`` (``int`` or ``float``), or a one-line :class:`UserError` naming the key.

    ``int(cfg.epochs)`` turned ``epochs=abc`` into a traceback and truncated ``epochs=2.5`` to 2 epochs;
    the ranges are checked later by ``lncrna.train._check_run_args``.
    """
    from lightning_lora.core.config import finite_number, whole_number

    try:
        return whole_number(cfg.get(key), key) if kind is int else finite_number(cfg.get(key), key)
    except ValueError as e:
        raise UserError(str(e)) from None


def _make_out_dir(out: Path) -> bool:
    """Create the run's output folder; return whether it was created here. One-line :class:`UserError`
    if it cannot be (``out_dir=`` names an existing file, a folder under a file, no permission).

    Why: ``Path.mkdir`` raised FileExistsError / NotADirectoryError as a Hydra traceback (exit 1)."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        problem = "exists and is not a folder" if out.exists() and not out.is_dir() else (
            e.strerror or type(e).__name__)
        raise UserError(f"out_dir={out}: cannot create the output folder ({problem})") from None
    return created


def run_train(cfg: Any) -> Path:
    """One ``lncrna train`` run from a composed config; returns the output folder."""
    import json

    import lightning_lora
    from lightning_lora.train import ConfigError, check_required

    from .train import PretrainedDirError, finetune

    try:
        check_required(cfg.adapter, "adapter")
    except ValueError as e:
        raise UserError(str(e)) from None
    adapter = dict(_container(cfg.adapter))
    method = adapter.pop("method", None)
    methods = lightning_lora.available_methods()
    if method is None:
        raise UserError("the adapter config has no 'method' (e.g. adapter=lora or adapter.method=lora)")
    if method != "full" and method not in methods:
        raise UserError(f"unknown adapter method {method!r}; registered methods: {', '.join(methods)} "
                        f"(or 'full' for full fine-tuning)")
    adapter = {k: v for k, v in adapter.items() if v is not None}  # null: lncrna.train's defaults
    mlm_dir = cfg.get("mlm_dir")
    if mlm_dir and not (Path(mlm_dir) / "lncrna_config.json").is_file():
        raise UserError(f"mlm_dir={mlm_dir}: not a pretrained MLM folder (no lncrna_config.json); "
                        f"`lncrna pretrain` writes one to <run dir>/mlm")
    model_cfg = _model_config(cfg)
    trainer_kwargs = _trainer_kwargs(cfg)
    data_root = _data_root(cfg)
    epochs, batch_size, lr = _setting(cfg, "epochs", int), _setting(cfg, "batch_size", int), _setting(cfg, "lr", float)
    train_windows, seed = _setting(cfg, "train_windows", int), _setting(cfg, "seed", int)
    weight_decay = _setting(cfg, "weight_decay", float)
    out = _out_dir(cfg)
    created = _make_out_dir(out)
    t0 = time.time()
    try:
        model = finetune(out, mlm_dir=mlm_dir, cfg=model_cfg, method=method, adapter=adapter or None,
                         species=str(cfg.data.species), epochs=epochs, batch_size=batch_size,
                         lr=lr, train_windows=train_windows,
                         max_minutes=cfg.get("max_minutes"), trainer_kwargs=trainer_kwargs, data_root=data_root,
                         seed=seed, weight_decay=weight_decay)
    except (TypeError, ConfigError) as e:  # e.g. an adapter option the method does not have, no target matches
        _remove_if_empty(out, created)
        raise UserError(f"adapter={method}: {str(e).removeprefix('adapter: ')}") from None
    except PretrainedDirError as e:
        _remove_if_empty(out, created)
        raise UserError(f"mlm_dir={e}") from None
    except _misconfiguration() as e:
        _remove_if_empty(out, created)
        raise _trainer_error(e) from None
    summary = {"command": "lncrna train", "config": _container(cfg), "seconds": time.time() - t0,
               "classifier": str(out / "classifier"),
               "adapter": str(out / "adapter") if method != "full" else None,
               "train_seconds": getattr(model, "train_seconds", None),
               "metrics": getattr(model, "final_metrics", None),
               "cascade_metrics": getattr(model, "cascade_metrics", None)}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    stack_note = json.loads((out / "classifier" / "stack.json").read_text()).get("fitted_on", "")
    print(f"{PROG} train: wrote {out / 'classifier'} with its cascade (stack.json: {stack_note}"
          f"); run it with `{PROG} predict FASTA --model {out / 'classifier'}`", flush=True)
    return out


def _misconfiguration() -> type[Exception]:
    """Lightning's ``MisconfigurationException``: a trainer setting the machine cannot honour."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return MisconfigurationException


def _trainer_error(e: Exception) -> UserError:
    """One line for a Lightning trainer misconfiguration.

    Why: ``lncrna train trainer=gpu`` on a machine without a GPU ended in a Lightning traceback
    ("No supported gpu backend found!", exit 1) and left an empty output folder."""
    return UserError(f"trainer: {' '.join(str(e).split())} (trainer=gpu needs a CUDA GPU; trainer=cpu runs anywhere)"
                     if "gpu" in str(e).lower() else f"trainer: {' '.join(str(e).split())}")


def _remove_if_empty(out: Path, created: bool) -> None:
    """A run that failed before writing anything leaves no empty output folder of its own making."""
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def run_pretrain(cfg: Any) -> Path:
    """One ``lncrna pretrain`` run from a composed config; returns the MLM folder."""
    from .train import PretrainedDirError, pretrain

    init_dir = cfg.get("init_dir")
    if init_dir and not Path(init_dir).is_dir():
        raise UserError(f"init_dir={init_dir}: no such folder")
    epochs, batch_size, lr = _setting(cfg, "epochs", int), _setting(cfg, "batch_size", int), _setting(cfg, "lr", float)
    seed = _setting(cfg, "seed", int)
    out = _out_dir(cfg)
    created = _make_out_dir(out)
    try:
        path = pretrain(out, cfg=_model_config(cfg), epochs=epochs, batch_size=batch_size,
                        lr=lr, max_minutes=cfg.get("max_minutes"), trainer_kwargs=_trainer_kwargs(cfg),
                        data_root=_data_root(cfg), seed=seed, init_dir=init_dir)
    except PretrainedDirError as e:
        _remove_if_empty(out, created)
        raise UserError(f"init_dir={e}") from None
    except _misconfiguration() as e:
        _remove_if_empty(out, created)
        raise _trainer_error(e) from None
    if init_dir:
        import json

        run = json.loads((path / "pretrain_log.json").read_text()).get("run", {})
        before = run.get("epochs_before")
        before_text = f"{before} epochs before" if before is not None else "epochs before unknown: fixed offset"
        print(f"{PROG} pretrain: warm start from {init_dir}: its weights only; the optimizer and the LR schedule "
              f"(with its warmup) restarted; data order seed {run.get('data_seed')} (seed {run.get('seed')}, "
              f"{before_text})", flush=True)
    print(f"{PROG} pretrain: wrote {path} (use it with `lncrna train mlm_dir={path}`)", flush=True)
    return path


def _hydra(cmd: str, args: list[str]) -> int:
    conf = hydra_config_dir()
    adapters = adapter_options(conf) if cmd == "train" else {}
    _check_overrides(cmd, args, conf, adapters)

    from hydra.core.config_store import ConfigStore

    from lightning_lora.train import discard_hydra_run_dir, run_hydra

    from .fasta import FastaError

    store = ConfigStore.instance()
    for name, node in adapters.items():
        store.store(group="adapter", name=name, node=node)
    runner = run_train if cmd == "train" else run_pretrain

    def task(cfg: Any) -> None:
        try:
            runner(cfg)
        except (UserError, FastaError) as e:
            discard_hydra_run_dir()
            print(f"{PROG} {cmd}: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    try:
        run_hydra(task, conf, cmd, f"{PROG} {cmd}", list(args))
    finally:
        _unstore(store, "adapter", adapters)
    return 0


def _unstore(store: Any, group: str, names: Iterable[str]) -> None:
    """Take our entries out of Hydra's process-wide ConfigStore again: left there, they would act as
    schemas for same-named files (conf/adapter/*.yaml) of any later Hydra app in this process."""
    entries = store.repo.get(group)
    if not isinstance(entries, dict):
        return
    for name in names:
        entries.pop(f"{name}.yaml", None)
    if not entries:
        store.repo.pop(group, None)


# ---- entry point -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Console script ``lncrna``; returns the exit status. ``argv`` defaults to ``sys.argv[1:]``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    cmd = args_list[0] if args_list else None
    try:
        if cmd in HYDRA_COMMANDS:
            return _hydra(cmd, args_list[1:])
        parser = build_parser()
        # Why parse_known_args: with parse_args an unknown option of a command was reported by the
        # top-level parser ("usage: lncrna [-h] [--version] COMMAND ..." / "lncrna: error: ..."), so
        # the message neither named the command nor showed its usage
        args, unknown = parser.parse_known_args(args_list)
        if unknown:
            getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        # SIGTERM / SIGHUP -> Terminated: OUT.partial is deleted, exit 143 / 129
        with _termination_raises(), _torch_threads_restored(getattr(args, "threads", None)):
            return {"predict": cmd_predict, "evaluate": cmd_evaluate}[args.command](args)
    except SystemExit as e:  # argparse (--help: 0, bad option: 2) and Hydra
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt as e:
        print(f"{PROG} {cmd}: interrupted{_kept(e)}", file=sys.stderr)
        return 130
    except Terminated as e:  # unlike Ctrl-C, the finished rows are discarded (see the module docstring)
        print(f"{PROG} {cmd}: terminated by {e.signal_name}{_kept(e)}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:  # e.g. `lncrna predict x.fa | head`
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as e:
        user = _is_user_error(e)
        if os.environ.get("LNCRNA_DEBUG") and not user:
            import traceback

            traceback.print_exc()
        msg = " ".join(str(e).split()) or type(e).__name__
        if user:
            print(f"{PROG} {cmd}: error: {msg}{_kept(e)}", file=sys.stderr)
            return 2
        print(f"{PROG} {cmd}: internal error: {type(e).__name__}: {msg}{_kept(e)} "
              f"(set LNCRNA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _is_user_error(e: BaseException) -> bool:
    from lightning_lora.train import ConfigError

    from .evaluate import EvaluationError
    from .fasta import FastaError
    from .predict import ModelError

    return isinstance(e, (UserError, FastaError, ModelError, EvaluationError, ConfigError))


def _kept(e: BaseException) -> str:
    """What became of the output rows, for the error / interrupt line ('' before any output)."""
    return getattr(e, "output_note", "") or ""


if __name__ == "__main__":
    sys.exit(main())
