"""Pieces shared by the tests of how ``lncrna predict`` / ``evaluate`` end on a signal
(test_predict_robustness.py and test_predict_sigterm_process_group.py: SIGTERM; test_sighup.py: SIGHUP;
test_predict_lost_worker.py: SIGKILL; test_evaluate_label_column.py reads TSVs with tsv_rows)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from test_cli import HEADER  # the test directory is on sys.path


#: the signal tests' one platform condition: SIGHUP, SIGKILL, fork and process groups are POSIX
POSIX_ONLY = pytest.mark.skipif(
    not (hasattr(signal, "SIGHUP") and hasattr(signal, "SIGKILL") and hasattr(os, "fork")),
    reason="POSIX only: Windows has no SIGHUP, SIGKILL, fork or process groups (CI runs Linux, where these run)")


def leftovers(folder: Path) -> list[str]:
    """Every ``*.partial`` file below ``folder``."""
    return sorted(p.name for p in folder.rglob("*.partial"))


def tsv_rows(path: Path) -> list[list[str]]:
    """The data rows of a predictions TSV (its header checked)."""
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER
    return [line.split("\t") for line in lines[1:]]


class SignalReachedTest(BaseException):
    """Raised by the test's own handler: without the fix under test the signal ends up there (a
    clean test failure) instead of killing the pytest process."""


@contextlib.contextmanager
def signal_guard(signum: int) -> Iterator[Callable[[int, Any], None]]:
    """Install a handler for ``signum`` that raises :class:`SignalReachedTest`; yields it (a test can
    check that the code under test put it back), restores the previous handler on exit."""

    def guard(sig: int, frame: Any) -> None:
        raise SignalReachedTest(sig)

    previous = signal.signal(signum, guard)
    try:
        yield guard
    finally:
        signal.signal(signum, previous)


def sender(signum: int) -> Callable[[], None]:
    """An ``on_chunk`` action: ``signum`` to this process."""
    return lambda: os.kill(os.getpid(), signum)


def signal_running_predict(args: list[str], partial: Path, send: Callable[[Any], None], *, group: bool = False,
                           settle: float = 0.0, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``python -m lncrna.cli predict ARGS`` (``-q``; its own session when ``group``), wait until
    ``partial`` holds a finished chunk, wait ``settle`` seconds more, call ``send(process)``, and
    return ``(exit code, stdout, stderr)``. A run that ends too early or does not end within
    ``timeout`` fails the test; the process (group) is killed whatever happens."""
    import subprocess
    import sys
    import time

    import pytest

    from test_cli import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "lncrna.cli", "predict", *map(str, args), "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=group)
    try:
        deadline = time.monotonic() + timeout
        while p.poll() is None and time.monotonic() < deadline:
            if partial.exists() and len(partial.read_text().splitlines()) > 1:  # header + a finished chunk
                break
            time.sleep(0.02)
        assert p.poll() is None, f"predict ended before the signal: {p.stderr.read() if p.stderr else ''}"
        time.sleep(settle)
        send(p)
        stdout, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("lncrna predict did not end after the signal")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL) if group else p.kill()
            p.wait()
    return p.returncode, stdout, err


def assert_terminated_quietly(rc: int, stdout: str, err: str, out: Path, partial: Path, signame: str) -> None:
    """Exit 128 + the signal's number, nothing on stdout, one line on stderr, no OUT and no OUT.partial."""
    import re

    assert rc == 128 + getattr(signal, signame), err
    assert stdout == "" and len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(rf"lncrna predict: terminated by {signame} \((\d+ finished rows discarded; "
                        rf"{re.escape(str(out))} not written|no rows written)\)", err.strip()), err
    assert not out.exists() and not partial.exists()
