"""SIGTERM to the whole process group of ``lncrna predict --workers N`` (systemd stop, a batch
scheduler): the pool workers die of it too, and the run must still end at once with exit 143 and no
``OUT.partial``.

A worker waiting for its next task holds the task queue's read lock; killed there, it never releases
it. With ``multiprocessing.Pool``, ``Pool.terminate()`` in ``Predictor.close()`` used to wait for that
lock for ever (3 runs in 4 hung); stage 1 now runs in a ``ProcessPoolExecutor``, whose graceful
``shutdown()`` would wait just as long for the other workers, which can no longer read the sentinel
that stops them. In process (deterministic: the worker is killed once it is known to wait on the
queue) and through a real process group with the shipped model (slow).

Tiny random model (``model_dir`` in conftest.py) for the in-process tests.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from multiprocessing.connection import wait

import pytest

from lncrna import cli
from lncrna.predict import Predictor

from termination_helpers import POSIX_ONLY, assert_terminated_quietly, signal_running_predict
from test_cli import fasta_text, seq  # the test directory is on sys.path

pytestmark = POSIX_ONLY

RECORDS = [(f"r{i}", seq(300 + 11 * i, i)) for i in range(12)]
CLOSE_LIMIT_S = 10.0  # close() takes about 20 ms; the old code never returned


def _wait_until_idle_on_the_queue(pool) -> None:
    """Until the single worker holds the call queue's read lock (it holds it while it waits for a task)."""
    lock = pool.executor._call_queue._rlock
    deadline = time.monotonic() + 10
    while lock.acquire(False):
        lock.release()
        assert time.monotonic() < deadline, "the worker never went back to wait for a task"
        time.sleep(0.01)


def _close_within(predictor: Predictor, seconds: float) -> bool:
    """Whether ``predictor.close()`` returned in time (run in a daemon thread: a hang cannot stall pytest)."""
    t = threading.Thread(target=predictor.close, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def _executor_threads() -> list[str]:
    """The executor's manager threads and the pool's stopper thread still running."""
    return [t.name for t in threading.enumerate()
            if type(t).__name__ == "_ExecutorManagerThread" or t.name == "lncrna-pool-stop"]


def test_close_returns_when_a_worker_died_of_sigterm_while_waiting_for_a_task(model_dir):
    """The worker gets the SIGTERM that reaches the whole group (with the CLI's handler it dies as by
    default) while it waits on the queue; close() must still stop the workers and the executor's thread."""
    with cli._termination_raises():  # workers forked here carry the handler `lncrna predict` runs with
        predictor = Predictor(model_dir, device="cpu", workers=1, chunk_size=4)
        first = [p.prob for p in predictor.predict_records(RECORDS)]
        pool = predictor._pool
        worker = pool.ctx.started()[0]
        _wait_until_idle_on_the_queue(pool)
        os.kill(worker.pid, signal.SIGTERM)
        assert wait([worker.sentinel], 10), "the worker did not die of SIGTERM"
        assert _close_within(predictor, CLOSE_LIMIT_S), "close() hung on the task-queue lock of a dead worker"
    assert all(w.exitcode is not None for w in pool.ctx.started())
    assert _executor_threads() == []
    assert len(first) == len(RECORDS)


def test_close_after_a_normal_run_stops_workers_and_threads_and_keeps_the_rows(model_dir):
    with Predictor(model_dir, device="cpu", workers=0, chunk_size=4) as alone:
        expected = [(p.id, p.prob) for p in alone.predict_records(RECORDS)]
    predictor = Predictor(model_dir, device="cpu", workers=2, chunk_size=4)
    pool = predictor._pool
    got = [(p.id, p.prob) for p in predictor.predict_records(RECORDS)]
    t0 = time.perf_counter()
    predictor.close()
    assert time.perf_counter() - t0 < 2.0  # no timeout was waited out
    assert [i for i, _ in got] == [i for i, _ in expected]  # input order, as without workers
    assert [p for _, p in got] == pytest.approx([p for _, p in expected], abs=1e-9)
    assert len(pool.ctx.started()) == 2 and all(w.exitcode is not None for w in pool.ctx.started())
    assert _executor_threads() == []
    predictor.close()  # a second close does nothing


@pytest.mark.slow  # a real process group, the shipped model: about 8 s on 2 cores; the in-process test covers the logic
def test_sigterm_to_the_process_group_with_an_idle_worker_exits_143(tmp_path):
    """The shipped model on CPU with --no-cascade keeps the main process in the transformer for most of
    each chunk, so the worker is waiting for its next task when the group's SIGTERM arrives."""
    fa = tmp_path / "big.fa"
    fa.write_text(fasta_text((f"r{i}", seq(600, i)) for i in range(2_000)))  # minutes of work
    out = tmp_path / "out.tsv"
    partial = tmp_path / "out.tsv.partial"
    # settle: the worker has done the chunks it was given and waits on the queue
    got = signal_running_predict([fa, "-o", out, "--device", "cpu", "--no-cascade", "--workers", "1", "--chunk-size",
                                  "4"], partial, lambda p: os.killpg(p.pid, signal.SIGTERM), group=True, settle=0.3,
                                 timeout=90)
    assert_terminated_quietly(*got, out, partial, "SIGTERM")
