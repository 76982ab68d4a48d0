"""A stage-1 worker of ``lncrna predict --workers N`` that dies for a reason of its own (the
out-of-memory killer's SIGKILL, a crash): the run must end at once with one error line naming the
input and how the worker ended, exit 2, and no output file (``OUT.partial`` deleted, an old OUT left
as it was). ``multiprocessing.Pool`` never failed a task whose worker died, so the parent waited on
it for ever; every test here bounds its wait, so such a hang fails the test instead of stalling the
suite.

1. Through a real ``lncrna predict`` process: a worker SIGKILLs itself in the middle of a task, or
   half-way through writing its result (the executor's reader then waits for the rest of a
   message that never comes, and only the predictor's own watch of the workers notices the death).
2. The library: a worker killed by the parent (through the pool's list of worker processes) gives
   :class:`~lncrna.predict.WorkerDied` with the exit reason, again on every later use, and
   ``close()`` leaves no process or thread behind.

Tiny random model (``model_dir`` in conftest.py), shipped baseline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait as wait_for_handles
from typing import Any

import pytest

from termination_helpers import POSIX_ONLY, leftovers
from test_cli import ROOT, fasta_text, seq  # the test directory is on sys.path

pytestmark = POSIX_ONLY

RECORDS = [(f"r{i}", seq(400 + 13 * i, i)) for i in range(40)]
END_LIMIT_S = 60.0  # the runs take 3-6 s on 2 cores (model load included); the old code never ended
OOM = "killed by signal 9 (SIGKILL), possibly out of memory"

# `python -c DRIVER predict ...`: lncrna.cli.main with stage 1 patched before the workers are forked.
# In a worker, the DIE_AT-th call kills the worker: at once (DIE_HOW=task), or once half of its
# result is written to the result pipe (DIE_HOW=result: a message cut short).
DRIVER = """
import os, signal, sys
from multiprocessing import connection

import lncrna.predict as predict
from lncrna import cli

parent, calls, stage1 = os.getpid(), 0, predict._Stage1.__call__
send = connection.Connection._send


def half_then_die(self, buf, *args):
    if len(buf) > 512:  # the result (not a message header)
        send(self, memoryview(buf)[: len(buf) // 2], *args)
        os.kill(os.getpid(), signal.SIGKILL)
    return send(self, buf, *args)


def dying(self, seqs):
    global calls
    if os.getpid() != parent:
        calls += 1
        if calls == int(os.environ["DIE_AT"]):
            if os.environ["DIE_HOW"] == "task":
                os.kill(os.getpid(), signal.SIGKILL)
            connection.Connection._send = half_then_die
    return stage1(self, seqs)


predict._Stage1.__call__ = dying
sys.exit(cli.main(sys.argv[1:]))
"""


def _predict_with_a_dying_worker(args: list[Any], how: str, die_at: int) -> tuple[int, str, str, float]:
    """``(exit code, stdout, stderr, seconds)`` of the patched ``lncrna predict ARGS``; a run that
    does not end within END_LIMIT_S fails the test (its process group, workers included, is killed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIE_AT": str(die_at), "DIE_HOW": how}
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", DRIVER, "predict", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, err = p.communicate(timeout=END_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"lncrna predict did not end within {END_LIMIT_S:.0f} s after a worker died")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, stdout, err, time.monotonic() - t0


def _assert_one_error_line_and_no_output(rc: int, stdout: str, err: str, fa, out, old: bool) -> None:
    assert rc == 2 and stdout == "", err
    assert len(err.strip().splitlines()) == 1, err  # no traceback, no line per worker
    fate = "left as it was" if old else "not written"
    assert re.fullmatch(
        rf"lncrna predict: error: a feature worker died \({re.escape(OOM)}\) while processing {re.escape(str(fa))}; "
        rf"rerun with fewer --workers or --workers 0 \((\d+ finished rows discarded; {re.escape(str(out))} {fate}|"
        rf"no rows written)\)", err.strip()), err
    assert (out.read_text() == "OLD\n") if old else not out.exists()
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("how, extra, old", [("task", [], False), ("result", ["--no-cascade"], True)],
                         ids=["killed_mid_task", "killed_mid_result_old_out"])
def test_a_worker_killed_mid_run_ends_predict_with_one_error_line_and_no_output(tmp_path, model_dir, how, extra, old):
    fa = tmp_path / "in.fa"
    fa.write_text(fasta_text(RECORDS))
    out = tmp_path / "out.tsv"
    if old:
        out.write_text("OLD\n")
    rc, stdout, err, seconds = _predict_with_a_dying_worker(
        [fa, "-o", out, "--model", model_dir, "--workers", "2", "--chunk-size", "8", "-q", *extra], how, die_at=2)
    _assert_one_error_line_and_no_output(rc, stdout, err, fa, out, old)
    assert seconds < END_LIMIT_S


# ---- the library ------------------------------------------------------------------------------------
def _predict_within(predictor: Any, seconds: float) -> tuple[bool, Any]:
    """``(finished in time, the predictions or the exception)`` of ``predict_records(RECORDS)``, run in
    a daemon thread: a hang cannot stall pytest."""
    got: list[Any] = []

    def work() -> None:
        try:
            got.append([p.prob for p in predictor.predict_records(RECORDS)])
        except BaseException as e:  # noqa: BLE001 - handed to the test
            got.append(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive(), (got[0] if got else None)


def test_a_worker_killed_by_the_parent_raises_worker_died_every_time_and_close_cleans_up(model_dir):
    from lncrna.predict import Predictor, WorkerDied

    predictor = Predictor(model_dir, device="cpu", workers=2, chunk_size=8)
    try:
        done, first = _predict_within(predictor, END_LIMIT_S)
        assert done and len(first) == len(RECORDS)
        pool = predictor._pool
        workers = pool.ctx.started()
        assert len(workers) == 2
        os.kill(workers[0].pid, signal.SIGKILL)
        # dead before the next run (kill only sends the signal): the case is a worker lost while idle
        assert wait_for_handles([workers[0].sentinel], timeout=END_LIMIT_S)
        done, got = _predict_within(predictor, END_LIMIT_S)
        assert done, "predict_records hung on a dead worker"
        assert isinstance(got, WorkerDied) and got.reason == OOM
        assert str(got) == f"a stage-1 worker process died ({OOM}); use fewer workers, or workers=0"
        done, again = _predict_within(predictor, END_LIMIT_S)  # the pool is gone: the same error, at once
        assert done and isinstance(again, WorkerDied) and again.reason == OOM
    finally:
        t0 = time.perf_counter()
        predictor.close()
        assert time.perf_counter() - t0 < 5.0
    assert all(w.exitcode is not None for w in workers)
    assert not [t.name for t in threading.enumerate() if t.name == "lncrna-pool-stop" or "ExecutorManager" in
                type(t).__name__]


def test_a_worker_lost_while_idle_is_found_before_any_work_is_submitted(model_dir, monkeypatch):
    """The executor's own thread may not have marked the pool broken when the next run starts (CI saw
    the surviving worker do that whole run): the pool looks at its workers before it submits."""
    from lncrna.predict import Predictor, WorkerDied

    predictor = Predictor(model_dir, device="cpu", workers=2, chunk_size=8)
    try:
        done, first = _predict_within(predictor, END_LIMIT_S)
        assert done and len(first) == len(RECORDS)
        pool = predictor._pool
        worker = pool.ctx.started()[0]
        os.kill(worker.pid, signal.SIGKILL)
        assert wait_for_handles([worker.sentinel], timeout=END_LIMIT_S)

        def unaware_submit(*args: Any, **kwargs: Any) -> Any:  # an executor that has not noticed yet
            raise AssertionError("work submitted to a pool with a dead worker")

        monkeypatch.setattr(pool.executor, "submit", unaware_submit)
        done, got = _predict_within(predictor, END_LIMIT_S)
        assert done and isinstance(got, WorkerDied) and got.reason == OOM, got
    finally:
        predictor.close()


def test_exit_reasons_name_the_signal_and_the_status():
    from lncrna.predict import _exit_reason

    assert _exit_reason(-signal.SIGKILL) == OOM
    assert _exit_reason(-signal.SIGSEGV) == "killed by signal 11 (SIGSEGV)"
    assert _exit_reason(3) == "exited with status 3"
    assert _exit_reason(None) == "ended for an unknown reason"
