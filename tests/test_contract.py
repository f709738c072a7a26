"""The concurrent.futures contract, run on ProcessPoolExecutor and MemmapExecutor alike."""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
import traceback
import weakref
from concurrent.futures import (
    FIRST_COMPLETED,
    BrokenExecutor,
    CancelledError,
    Future,
    as_completed,
    wait,
)
from concurrent.futures.process import BrokenProcessPool

import psutil
import pytest
from _tasks import add, pid, raise_value_error, square, started_then_wait, wait_event

from mmexec import MemmapExecutor

_state: dict[str, object] = {}


def _init(value: object) -> None:
    _state["value"] = value


def _read_state() -> object:
    return _state.get("value")


def _bad_init() -> None:
    raise RuntimeError("initializer failed on purpose")


def _report_to(queue) -> None:
    queue.put(os.getpid())


class Box:
    """A result that can be weakly referenced."""


def make_box(i: int) -> Box:
    return Box()


def _exit_worker() -> None:
    os._exit(3)


def _wait_until_started(fut: Future) -> None:
    """Block until the pool has handed ``fut`` to a worker (its state says RUNNING)."""
    while not fut.running() and not fut.done():
        wait([fut], timeout=0.01)


def test_submit_returns_a_standard_future(executor):
    """submit() returns a concurrent.futures.Future holding the call's result."""
    fut = executor.submit(add, 2, b=3)
    assert isinstance(fut, Future)
    assert fut.result(timeout=60) == 5


def test_map_keeps_input_order_over_several_iterables(executor):
    """map() zips its iterables, stops at the shortest, and yields in input order."""
    assert list(executor.map(add, range(50), range(100, 140))) == [i + 100 + i for i in range(40)]


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_chunksize_does_not_change_results(executor, chunksize):
    """Any chunksize gives the same results in the same order."""
    assert list(executor.map(square, range(20), chunksize=chunksize)) == [i * i for i in range(20)]


def test_map_rejects_chunksize_below_one(executor):
    """chunksize < 1 is a ValueError, as in the stdlib."""
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(square, range(3), chunksize=0)


def test_map_raises_at_the_failing_item(executor):
    """Results before a failing call are yielded, then its exception is raised."""
    it = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(it) == (0, 1)
    assert next(it) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(it)


def test_map_timeout_raises_futures_timeout_error(executor, tmp_path):
    """A map() result not ready within ``timeout`` raises concurrent.futures.TimeoutError (the builtin
    TimeoutError from Python 3.11 on)."""
    import concurrent.futures

    never = str(tmp_path / "never")
    it = executor.map(wait_event, [never], [5.0], timeout=0.2)
    with pytest.raises(concurrent.futures.TimeoutError):
        next(it)
    open(never, "w").close()


def test_task_exception_reaches_caller_with_remote_traceback(executor):
    """A task's exception is re-raised with its type, message and the worker's traceback."""
    fut = executor.submit(raise_value_error, "boom")
    with pytest.raises(ValueError, match="boom") as info:
        fut.result(timeout=60)
    text = "".join(traceback.format_exception(info.value))
    assert "raise_value_error" in text


def test_as_completed_and_wait_accept_the_futures(executor):
    """as_completed() and wait() work with the executor's futures."""
    futures = [executor.submit(square, i) for i in range(10)]
    assert sorted(f.result() for f in as_completed(futures, timeout=60)) == [i * i for i in range(10)]
    done, not_done = wait(futures, timeout=60, return_when=FIRST_COMPLETED)
    assert done and len(done) + len(not_done) == 10


def test_done_callback_runs_with_the_future(executor):
    """add_done_callback() receives the finished future."""
    seen: list[int] = []
    called = threading.Event()

    def callback(f: Future) -> None:
        seen.append(f.result())
        called.set()

    executor.submit(square, 7).add_done_callback(callback)
    assert called.wait(timeout=60)
    assert seen == [49]


def test_submit_after_shutdown_raises_runtime_error(executor):
    """A shut-down executor refuses new work with RuntimeError."""
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(square, 2)


def test_context_manager_waits_for_tasks(executor_class):
    """Leaving the with-block waits for every submitted task."""
    with executor_class(max_workers=2) as ex:
        futures = [ex.submit(square, i) for i in range(8)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(8)]


def test_shutdown_cancel_futures_cancels_queued_tasks(executor_class, tmp_path):
    """shutdown(cancel_futures=True) cancels tasks that have not started."""
    go = str(tmp_path / "go")
    ex = executor_class(max_workers=1)
    try:
        blocker = ex.submit(wait_event, go)
        _wait_until_started(blocker)
        queued = [ex.submit(square, i) for i in range(20)]
        ex.shutdown(wait=False, cancel_futures=True)
        open(go, "w").close()
        assert blocker.result(timeout=60) == go
        cancelled = [f for f in queued if f.cancelled()]
        assert cancelled, "no queued task was cancelled"
        for f in cancelled:
            with pytest.raises(CancelledError):
                f.result()
    finally:
        open(go, "w").close()
        ex.shutdown(wait=True)


def test_cancel_running_future_returns_false(executor, tmp_path):
    """A running task cannot be cancelled; a finished one reports done."""
    go = str(tmp_path / "go")
    fut = executor.submit(wait_event, go)
    _wait_until_started(fut)
    assert fut.cancel() is False
    open(go, "w").close()
    assert fut.result(timeout=60) == go


def test_initializer_runs_before_tasks(executor_class):
    """initializer(*initargs) runs in each worker before its tasks."""
    with executor_class(2, None, _init, ("ready",)) as ex:
        assert set(ex.map(_read_state, *[[]] * 0)) == set()
        assert {ex.submit(_read_state).result(timeout=60) for _ in range(4)} == {"ready"}


def test_failing_initializer_breaks_the_executor(executor_class):
    """If the initializer raises, futures raise BrokenExecutor."""
    ex = executor_class(1, None, _bad_init)
    try:
        with pytest.raises(BrokenExecutor):
            ex.submit(square, 2).result(timeout=60)
    finally:
        ex.shutdown(wait=True)


def test_initializer_can_receive_a_queue(executor_class):
    """initargs may hold objects that only new processes can inherit (the logging-cookbook Queue)."""
    ctx = multiprocessing.get_context()
    queue = ctx.Queue()
    try:
        with executor_class(2, ctx, _report_to, (queue,)) as ex:
            worker = ex.submit(os.getpid).result(timeout=60)
            reported = {queue.get(timeout=60)}
            while worker not in reported:
                reported.add(queue.get(timeout=60))
            assert ex.submit(square, 4).result(timeout=60) == 16
    finally:
        queue.close()
        queue.join_thread()


@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_keeps_no_reference_to_yielded_results(executor, chunksize):
    """A result of map() is freed as soon as the caller drops it (CPython issue #14406)."""
    for obj in executor.map(make_box, range(8), chunksize=chunksize):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


def test_dead_worker_gives_broken_process_pool(executor_class):
    """A worker that exits abruptly fails its future with BrokenProcessPool, and the executor stays broken."""
    ex = executor_class(max_workers=2)
    try:
        fut = ex.submit(_exit_worker)
        with pytest.raises(BrokenProcessPool):
            fut.result(timeout=60)
        with pytest.raises(BrokenProcessPool):
            ex.submit(square, 2).result(timeout=60)
    finally:
        ex.shutdown(wait=True)
    with executor_class(max_workers=2) as fresh:
        assert fresh.submit(square, 3).result(timeout=60) == 9


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(executor_class, bad):
    """max_workers <= 0 is a ValueError."""
    with pytest.raises(ValueError):
        executor_class(max_workers=bad)


def test_second_executor_reuses_warm_workers():
    """A second MemmapExecutor, even with other memmap options, runs on the first one's worker processes."""
    with MemmapExecutor(2) as first:
        list(first.map(square, range(8), chunksize=1))
        workers = set(first.workers())
    with MemmapExecutor(2, max_nbytes=None, mmap_mode="r") as second:
        assert {second.submit(pid).result(timeout=60) for _ in range(4)} <= workers
        assert set(second.workers()) <= workers


def test_executor_of_another_size_does_not_wait_for_a_busy_one(executor_class, tmp_path):
    """Two live executors of different sizes are independent: the second neither waits for nor resizes the first."""
    go = str(tmp_path / "go")
    first = executor_class(1)
    try:
        blocked = first.submit(wait_event, go, 60.0)
        _wait_until_started(blocked)
        with executor_class(2) as second:  # used to wait for `blocked` (loky resized its pool)
            assert sorted(second.map(square, range(4))) == [0, 1, 4, 9]
        assert not blocked.done()
        open(go, "w").close()
        assert blocked.result(timeout=60) == go
    finally:
        first.shutdown(wait=True)


def test_shutdown_without_wait_frees_the_shared_pool_once_idle(tmp_path):
    """After shutdown(wait=False), a new executor of another size does not wait for the old tasks either."""
    go = str(tmp_path / "go")
    first = MemmapExecutor(1)
    blocked = first.submit(wait_event, go, 60.0)
    _wait_until_started(blocked)
    first.shutdown(wait=False)
    with MemmapExecutor(2) as second:
        assert second.submit(square, 5).result(timeout=60) == 25
    open(go, "w").close()
    assert blocked.result(timeout=60) == go
    first.shutdown(wait=True)  # (its thread deletes its folder once the last task is done)


# --------------------------------------------------- Python 3.14 additions (#12)
class Counted:
    """An input that counts how far it was read."""

    def __init__(self, n: int) -> None:
        self.n, self.taken = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.taken += 1
            yield i


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_with_buffersize_reads_the_input_lazily(chunksize):
    """map(buffersize=N) queues N tasks at the call and one more per result taken; results stay in order."""
    source = Counted(50)
    with MemmapExecutor(2) as ex:
        results = ex.map(square, source, chunksize=chunksize, buffersize=2)
        assert source.taken == 2 * chunksize
        assert next(results) == 0
        assert source.taken == 3 * chunksize
        assert list(results) == [i * i for i in range(1, 50)] and source.taken == 50
        with pytest.raises(ValueError, match="buffersize"):
            ex.map(square, range(3), buffersize=0)
        with pytest.raises(TypeError, match="buffersize"):
            ex.map(square, range(3), buffersize=2.0)


def test_closing_a_buffered_map_early_reads_no_more_input(tmp_path):
    """Closing the results of map(buffersize=3) before taking any: no more input is read, nothing more runs."""
    flag = str(tmp_path / "flag")

    def paths():
        for i in range(100):
            taken.append(i)
            yield flag

    taken: list[int] = []
    with MemmapExecutor(1) as ex:
        results = ex.map(wait_event, paths(), buffersize=3)
        results.close()
        with open(flag, "w"):  # lets a task that had started finish
            pass
    assert taken == [0, 1, 2]


BUFFERED = """
import resource, sys
import mmexec

def inc(x):
    return x + 1

if __name__ == "__main__":
    n = 10_000_000
    with mmexec.MemmapExecutor(2) as ex:
        list(ex.map(inc, range(100)))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        total = sum(ex.map(inc, (i for i in range(n)), chunksize=20_000, buffersize=4))
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(total == n * (n + 1) // 2, grown // 1024)
"""


@pytest.mark.slow
def test_map_with_buffersize_runs_ten_million_items_in_flat_memory(tmp_path):
    """A generator of 10 million items runs in bounded memory: the peak grows by a few MiB, where a list of
    the input alone would take hundreds."""
    from _tasks import run_script

    proc = run_script(tmp_path, BUFFERED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    right, grown_mib = proc.stdout.split()
    assert right == "True" and int(grown_mib) < 64


def _sleep_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


@pytest.mark.parametrize("how", ["terminate_workers", "kill_workers"])
def test_terminate_and_kill_workers_stop_this_executors_tasks_and_shut_it_down(how):
    """As Python 3.14's: pending tasks are cancelled, this executor's workers terminated (the running tasks
    fail with BrokenProcessPool), the executor refuses new work, and another executor keeps working."""
    other = MemmapExecutor(1)
    assert other.submit(square, 2).result(timeout=60) == 4
    ex = MemmapExecutor(2)
    futures = [ex.submit(_sleep_pid, 60) for _ in range(4)]
    while not any(f.running() for f in futures):  # wait for a task to start (bounded by the test's timeout)
        time.sleep(0.01)
    pids = set(ex.workers())
    getattr(ex, how)()
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert all(f.cancelled() or isinstance(f.exception(), BrokenProcessPool) for f in futures)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    with pytest.raises(RuntimeError):  # (BrokenProcessPool, a RuntimeError, as the stdlib's)
        ex.submit(square, 2)
    assert other.submit(square, 3).result(timeout=60) == 9
    other.shutdown()


def test_workers_and_processes_show_the_worker_processes():
    """workers() (and the stdlib's _processes, read-only) map pid -> process of the pool serving the executor."""
    with MemmapExecutor(2) as ex:
        pids = {ex.submit(pid).result() for _ in range(8)}
        workers = ex.workers()
        assert pids <= set(workers) and all(p.is_alive() for p in workers.values())
        assert dict(ex._processes) == dict(workers)
        with pytest.raises(TypeError):
            ex._processes[1] = None  # type: ignore[index]


def test_executor_manager_thread_is_the_thread_that_serves_the_executor():
    """The stdlib's attribute (CPython's test_shutdown_deadlock_pickle joins it): None before the first
    submit, alive while work runs, ended once shutdown(wait=False) has finished the work."""
    ex = MemmapExecutor(1)
    assert ex._executor_manager_thread is None
    assert ex.submit(square, 3).result(timeout=60) == 9
    thread = ex._executor_manager_thread
    assert thread is not None and thread.is_alive()
    fut = ex.submit(square, 4)
    ex.shutdown(wait=False)
    thread.join(timeout=60)
    assert not thread.is_alive() and fut.result() == 16


THREADS_WHILE_TASKS_RUN = """
import os, sys, threading, time
from concurrent.futures import ProcessPoolExecutor
import numpy as np
from mmexec import MemmapExecutor

def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.01)
    return 1

if __name__ == "__main__":
    go = {go!r}
    with {cls}(2) as ex:
        futures = [ex.submit(wait_for, go) for _ in range(4)] + [ex.submit(np.sum, np.ones(2**18)) for _ in range(8)]
        while not any(f.running() for f in futures):
            time.sleep(0.01)
        names = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
        open(go, "w").close()
        [f.result() for f in futures]
    print(len(names), names)
"""


@pytest.mark.parametrize("cls", ["ProcessPoolExecutor", "MemmapExecutor"])
def test_while_tasks_run_the_caller_has_two_threads_besides_its_own(tmp_path, cls):
    """While tasks run, the caller has two threads besides the main one: the stdlib's manager and queue
    feeder, mmexec's manager and feeder; no scheduler is stacked on another (#20)."""
    from _tasks import run_script

    proc = run_script(tmp_path, THREADS_WHILE_TASKS_RUN.format(cls=cls, go=str(tmp_path / "go")), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count = int(proc.stdout.split()[0])
    assert count <= 2, proc.stdout


# ---------------------------------------------------------------- done-callbacks that call the executor
def test_a_callback_of_a_future_cancelled_by_shutdown_may_call_the_executor(executor_class, tmp_path):
    """shutdown(cancel_futures=True) runs the cancelled futures' callbacks where no lock of the executor is
    held: a callback that submits more gets the stdlib's RuntimeError, and shutdown returns."""
    started, flag = str(tmp_path / "started"), str(tmp_path / "flag")
    ex = executor_class(1)
    blocker = ex.submit(started_then_wait, started, flag)
    wait_event(started, 60)
    queued = [ex.submit(square, i) for i in range(5)]
    seen: list[str] = []
    called = threading.Event()

    def chain(fut: Future) -> None:
        try:
            ex.submit(square, 3)
        except RuntimeError:
            seen.append("refused")
        called.set()

    queued[-1].add_done_callback(chain)
    closer = threading.Thread(target=ex.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True)
    closer.start()
    assert called.wait(60)
    assert queued[-1].cancelled()
    with open(flag, "w"):
        pass
    closer.join(60)
    assert not closer.is_alive(), "shutdown(cancel_futures=True) deadlocked in a done-callback"
    assert seen == ["refused"]
    assert blocker.result(timeout=60) == flag


def test_shutdown_with_wait_from_a_done_callback_lets_every_call_finish(executor_class):
    """shutdown(wait=True) in a done-callback (run by the executor's own thread) cannot wait for that thread:
    it returns (the stdlib's raises RuntimeError there), and every call queued still finishes."""
    ex = executor_class(1)
    futures = [ex.submit(square, i) for i in range(6)]
    outcomes: list[str] = []

    def stop(fut: Future) -> None:
        try:
            ex.shutdown(wait=True)
            outcomes.append("returned")
        except RuntimeError as exc:
            outcomes.append(f"RuntimeError: {exc}")

    futures[0].add_done_callback(stop)
    assert [f.result(timeout=60) for f in futures] == [i * i for i in range(6)]
    ex.shutdown()
    assert len(outcomes) == 1


def test_executors_dropped_unused_hold_no_descriptor():
    """An executor created and dropped without a call (nor shutdown) leaves no descriptor open."""
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        MemmapExecutor(2)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 1
