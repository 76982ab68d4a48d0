"""SIGHUP during ``lncrna predict`` (the terminal was closed) is handled like SIGTERM: ``OUT.partial``
is deleted, an old OUT stays as it was, one line on stderr, exit 129 (128 + 1). Under ``nohup``
(SIGHUP ignored) it stays ignored and the run completes. A forked pool worker ignores SIGHUP (the
parent ends the pool). In process, and through a real process group with a pool worker (a closed
terminal signals every process of the group).

Tiny random model (``model_dir`` in conftest.py), shipped baseline, the labelled example FASTA.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Iterator

import pytest

from lncrna import cli

from termination_helpers import (POSIX_ONLY, assert_terminated_quietly, leftovers, sender, signal_guard, signal_running_predict,
                                 tsv_rows)
from test_cli import GOOD, fasta_text, run, seq  # the test directory is on sys.path

pytestmark = POSIX_ONLY


@pytest.fixture
def sighup_guard() -> Iterator[Any]:
    with signal_guard(signal.SIGHUP) as guard:
        yield guard


send_sighup = sender(signal.SIGHUP)


def test_sighup_mid_run_deletes_partial_keeps_old_out_and_exits_129(tmp_path, model_dir, capsys, on_chunk,
                                                                    sighup_guard):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(GOOD))
    out = tmp_path / "out.tsv"
    out.write_text("OLD\n")
    on_chunk(2, send_sighup)
    rc, stdout, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "3", "-q"], capsys)
    assert rc == 129 and stdout == ""
    assert err.strip() == f"lncrna predict: terminated by SIGHUP (3 finished rows discarded; {out} left as it was)"
    assert out.read_text() == "OLD\n" and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGHUP) is sighup_guard  # the caller's handler is back


def test_sighup_stays_ignored_under_nohup_and_the_run_completes(tmp_path, model_dir, capsys, on_chunk):
    """nohup sets SIGHUP to SIG_IGN: the handler must not replace that (the hangup is not an exit)."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        fa = tmp_path / "in.fa"
        fa.write_text(fasta_text(GOOD))
        out = tmp_path / "out.tsv"
        seen: list[Any] = []
        on_chunk(2, lambda: (seen.append(signal.getsignal(signal.SIGHUP)), send_sighup()))
        rc, _, err = run(["predict", fa, "-o", out, "--model", model_dir, "--chunk-size", "3", "-q"], capsys)
        assert seen == [signal.SIG_IGN]  # still ignored while predict ran
        assert rc == 0 and err == ""
        assert [r[0] for r in tsv_rows(out)] == [rid for rid, _ in GOOD] and leftovers(tmp_path) == []
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def _forked_child_fate(signum: int) -> int:
    """Exit code of a child forked inside the handler's block that sends itself ``signum``
    (negative: killed by that signal; 0: it went on, with the signal now ignored)."""
    with cli._termination_raises():
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 5
            try:
                os.kill(os.getpid(), signum)
                time.sleep(0.05)
                code = 0 if signal.getsignal(signum) == signal.SIG_IGN else 3
            except BaseException:
                code = 4  # the handler raised in the child (a traceback per worker)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_worker_ignores_sighup_and_dies_of_sigterm(sighup_guard):
    """A worker that died of the group's hangup while waiting for a task held the task queue's
    lock, and the parent's Pool.terminate then waited for it forever; SIGTERM (what the stage-1
    executor sends the other workers when one dies) must still end a worker at once."""
    assert _forked_child_fate(signal.SIGHUP) == 0
    assert _forked_child_fate(signal.SIGTERM) == -signal.SIGTERM
    assert signal.getsignal(signal.SIGHUP) is sighup_guard


def test_help_lists_exit_129_for_sighup(capsys):
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0 and "129 hangup (SIGHUP" in " ".join(out.split())
    rc, out, _ = run(["predict", "--help"], capsys)
    assert rc == 0 and "SIGHUP (exit 129) or SIGTERM (exit 143) OUT.partial is deleted" in " ".join(out.split())


@pytest.mark.slow  # a real process group and signal, several seconds on 2 cores; the in-process tests cover the logic
def test_sighup_to_the_process_group_with_a_worker_exits_129_quietly(tmp_path, model_dir):
    """A closed terminal: SIGHUP to every process of the group, the pool worker included. The main
    process cleans up and exits 129; the worker dies as by default (no traceback of its own)."""
    fa = tmp_path / "big.fa"
    s = seq(600, 1)
    fa.write_text(fasta_text((f"r{i}", s) for i in range(5_000)))  # minutes of work at --no-cascade
    out = tmp_path / "out.tsv"
    partial = tmp_path / "out.tsv.partial"
    got = signal_running_predict([fa, "-o", out, "--model", model_dir, "--no-cascade", "--workers", "1",
                                  "--chunk-size", "8"], partial, lambda p: os.killpg(p.pid, signal.SIGHUP), group=True)
    assert_terminated_quietly(*got, out, partial, "SIGHUP")
