"""Executors that need workers of their own: ``max_tasks_per_child`` and a ``fork``/``forkserver`` ``mp_context``.

They get a standard-library process pool of their own (shut down with
them); every other executor stays on the shared warm loky pool.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import pytest
from _tasks import (
    describe,
    leave_an_executor_running,
    pid,
    raise_value_error,
    run_script,
    square,
    use_an_executor_and_return,
)

from mmexec import MemmapExecutor

needs_311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="max_tasks_per_child is new in Python 3.11")

_state: dict[str, object] = {}


def _read_state() -> object:
    return _state.get("value")


def _parent_and_pid() -> tuple[int, int]:
    return os.getppid(), os.getpid()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _exit_worker() -> None:
    os._exit(3)


@needs_311
def test_max_tasks_per_child_replaces_each_worker_after_that_many_tasks():
    """40 calls queued at once (a submit loop) on one worker with max_tasks_per_child=5: eight workers, five
    calls each. (A submit loop's calls are never packed together here: the pool counts tasks.)"""
    with MemmapExecutor(1, max_tasks_per_child=5) as ex:
        futures = [ex.submit(pid) for _ in range(40)]
        counts = Counter(f.result(timeout=60) for f in futures)
        assert sorted(counts.values()) == [5] * 8
        assert ex._mp_context.get_start_method() == "spawn"  # the standard library's default with it
        assert len(ex._processes) <= 1


@needs_311
def test_max_tasks_per_child_leaves_the_shared_pool_warm():
    """Only that executor starts cold: the shared pool's workers serve on, and the two never share a worker."""
    with MemmapExecutor(2) as shared:
        before = {shared.submit(pid).result(timeout=60) for _ in range(8)}
        workers = set(shared.workers())
        with MemmapExecutor(2, max_tasks_per_child=1) as own:
            theirs = {f.result(timeout=60) for f in [own.submit(pid) for _ in range(4)]}
        assert len(theirs) == 4 and not theirs & workers
        assert set(shared.workers()) == workers
        assert {shared.submit(pid).result(timeout=60) for _ in range(8)} <= workers | before


@needs_311
def test_max_tasks_per_child_still_passes_arrays_as_memory_maps():
    a = np.arange(2**18, dtype=np.float64)  # 2 MiB
    with MemmapExecutor(1, max_tasks_per_child=1) as ex:
        seen = [f.result(timeout=60) for f in [ex.submit(describe, a) for _ in range(3)]]
        got = ex.submit(square, a).result(timeout=60)
    assert all(s["type"] == "memmap" and s["sum"] == a.sum() for s in seen)
    np.testing.assert_array_equal(got, a**2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_tasks_per_child": 0}, ValueError, "max_tasks_per_child must be >= 1"),
        ({"max_tasks_per_child": "3"}, TypeError, "max_tasks_per_child must be an integer"),
        ({"max_tasks_per_child": 2, "mp_context": multiprocessing.get_context("fork")}, ValueError, "'fork'"),
        ({"mp_context": "fork"}, TypeError, "mp_context must be a multiprocessing context"),
    ],
)
@needs_311
def test_bad_max_tasks_per_child_or_mp_context_is_refused_at_construction(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        MemmapExecutor(1, temp_folder=str(tmp_path), **kwargs)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="Python 3.10 only")
def test_max_tasks_per_child_on_python_310_says_it_needs_311():
    with pytest.raises(TypeError, match="needs Python 3.11"):
        MemmapExecutor(1, max_tasks_per_child=2)


def test_fork_context_workers_inherit_the_callers_state():
    """mp_context=fork: workers are forked from the caller, so state set at run time is there; the shared
    (spawn-like) pool imports this module afresh."""
    _state["value"] = "set at run time"
    try:
        with MemmapExecutor(2, mp_context=multiprocessing.get_context("fork")) as ex:
            assert ex.submit(_read_state).result(timeout=60) == "set at run time"
            assert ex._mp_context.get_start_method() == "fork"
            a = np.ones(2**18)
            assert ex.submit(describe, a).result(timeout=60)["type"] == "memmap"
        with MemmapExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
            assert ex.submit(_read_state).result(timeout=60) is None
    finally:
        _state.clear()


def test_forkserver_context_workers_run_tasks():
    """A forkserver's workers are the server's children, not the caller's: they must not take that for the
    caller's death (the worker watchdog)."""
    with MemmapExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as ex:
        results = [f.result(timeout=60) for f in [ex.submit(_parent_and_pid) for _ in range(6)]]
        assert all(parent != os.getpid() for parent, _ in results)
        assert ex.submit(square, 7).result(timeout=60) == 49
        assert set(ex.workers()) >= {p for _, p in results[-1:]}


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_kill_workers_on_an_own_pool(method):
    """kill_workers() on workers of the executor's own: the running task fails with BrokenProcessPool."""
    ex = MemmapExecutor(1, mp_context=multiprocessing.get_context(method))
    fut = ex.submit(_sleep, 60)
    while not fut.running():
        time.sleep(0.01)
    ex.kill_workers()
    assert isinstance(fut.exception(timeout=60), BrokenProcessPool)  # (as Python 3.14's)
    with pytest.raises(RuntimeError):
        ex.submit(square, 2)
    ex.shutdown()


@pytest.mark.parametrize("kwargs", [{"mp_context": "fork"}, {"max_tasks_per_child": 5}])
def test_dead_worker_of_an_own_pool_breaks_only_that_executor(kwargs):
    if "max_tasks_per_child" in kwargs and sys.version_info < (3, 11):
        pytest.skip("max_tasks_per_child is new in Python 3.11")
    if "mp_context" in kwargs:
        kwargs = {"mp_context": multiprocessing.get_context(kwargs["mp_context"])}
    with MemmapExecutor(2) as shared:
        assert shared.submit(square, 2).result(timeout=60) == 4
        ex = MemmapExecutor(2, **kwargs)
        try:
            with pytest.raises(BrokenProcessPool):
                ex.submit(_exit_worker).result(timeout=60)
            with pytest.raises(BrokenProcessPool):
                ex.submit(square, 2).result(timeout=60)
        finally:
            ex.shutdown()
        assert shared.submit(square, 3).result(timeout=60) == 9


@pytest.mark.parametrize("kwargs", [{"mp_context": "forkserver"}, {"max_tasks_per_child": 1}])
def test_own_pools_work_with_memmap_executor_installed_as_the_stdlibs_class(monkeypatch, kwargs):
    """A sitecustomize that installs MemmapExecutor as concurrent.futures.ProcessPoolExecutor (a drop-in
    everywhere) must not make an own pool a MemmapExecutor that builds itself again (RecursionError)."""
    if "max_tasks_per_child" in kwargs and sys.version_info < (3, 11):
        pytest.skip("max_tasks_per_child is new in Python 3.11")
    import concurrent.futures
    import concurrent.futures.process

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", MemmapExecutor, raising=False)
    monkeypatch.setattr(concurrent.futures.process, "ProcessPoolExecutor", MemmapExecutor)
    if "mp_context" in kwargs:
        kwargs = {"mp_context": multiprocessing.get_context(kwargs["mp_context"])}
    with MemmapExecutor(1, **kwargs) as ex:
        assert ex.submit(square, 4).result(timeout=60) == 16
        assert len(ex.workers()) <= 1  # its workers are processes started for it, not another executor


def _double(x: int) -> int:
    return 2 * x


def _executor_inside_a_task(kind: str) -> list[int]:
    if kind == "max_tasks_per_child":
        ex = MemmapExecutor(2, max_tasks_per_child=2)
    else:
        ex = MemmapExecutor(2, mp_context=multiprocessing.get_context(kind))
    with ex:
        return [f.result(timeout=60) for f in [ex.submit(_double, i) for i in range(4)]]


@pytest.mark.parametrize("kind", ["fork", "forkserver", "spawn", "max_tasks_per_child"])
def test_a_task_can_start_an_executor_of_its_own(kind):
    """Inside a loky worker the start method is loky's, which a standard-library pool's spawn or forkserver
    children are told to set but did not know (BrokenProcessPool)."""
    if kind == "max_tasks_per_child" and sys.version_info < (3, 11):
        pytest.skip("max_tasks_per_child is new in Python 3.11")
    with MemmapExecutor(1) as ex:
        assert ex.submit(_executor_inside_a_task, kind).result(timeout=120) == [0, 2, 4, 6]


def test_threadings_exit_hooks_do_not_grow_with_tasks_on_two_pools():
    """mmexec registers its exit hook once, when it is imported, and never touches threading's list again."""
    import threading

    hooks = threading._threading_atexits  # type: ignore[attr-defined]
    before = len(hooks)
    with MemmapExecutor(1) as shared, MemmapExecutor(1, mp_context=multiprocessing.get_context("fork")) as own:
        for i in range(50):
            assert shared.submit(abs, -i).result(timeout=60) == i
            assert own.submit(abs, -i).result(timeout=60) == i
    assert len(hooks) == before


INIT_FAILS = """
import multiprocessing
from mmexec import MemmapExecutor

def bad_init():
    raise ValueError("initializer failed on purpose")

if __name__ == "__main__":
    with MemmapExecutor(1, mp_context=multiprocessing.get_context("{method}"), initializer=bad_init) as ex:
        try:
            ex.submit(abs, -1).result(timeout=60)
        except Exception as exc:
            print(type(exc).__name__)
"""


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_failing_initializer_on_an_own_pool_is_logged_once_and_breaks_it(tmp_path, method):
    """As in the standard library: one 'Exception in initializer' record, then BrokenProcessPool."""
    proc = run_script(tmp_path, INIT_FAILS.format(method=method), timeout=120)
    assert proc.stdout.strip() == "BrokenProcessPool", proc.stderr
    assert proc.stderr.count("Exception in initializer") == 1, proc.stderr
    assert proc.stderr.count("ValueError: initializer failed on purpose") == 1, proc.stderr


def test_shutdown_of_an_executor_broken_by_its_initializer_always_returns():
    """30 fork-context executors whose initializer fails: each future fails with BrokenProcessPool and each
    shutdown(wait=True) returns (the manager once waited for a feeder thread that had ended, now and then)."""
    for _ in range(30):
        ex = MemmapExecutor(1, mp_context=multiprocessing.get_context("fork"), initializer=raise_value_error,
                            initargs=("initializer failed on purpose",))
        with pytest.raises(BrokenProcessPool):
            ex.submit(abs, -1).result(timeout=60)
        done = threading.Event()
        closer = threading.Thread(target=lambda ex=ex, done=done: (ex.shutdown(wait=True), done.set()), daemon=True)
        closer.start()
        closer.join(30)
        assert done.is_set(), "shutdown(wait=True) of a broken executor never returned"


def _run_child_until_it_exits(method: str, target: Any, arg: Any) -> Any:
    """Run ``target(arg, out)`` in a multiprocessing child of ``method``; what it put on ``out`` once the child
    exited (it must, within 60 s; else it is killed and the test fails)."""
    ctx = multiprocessing.get_context(method)
    out = ctx.SimpleQueue()
    child = ctx.Process(target=target, args=(arg, out) if arg is not None else (out,))
    child.start()
    try:
        reported = out.get()
        child.join(60)
        assert child.exitcode == 0, "the child never exited"
        return reported
    finally:
        if child.exitcode is None:
            child.kill()
            child.join(10)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_multiprocessing_child_that_used_an_executor_exits(method):
    """A multiprocessing child joins its children before threading's exit hooks run: mmexec's warm workers
    must stop first, or the child waits for them (it hung until their 300 s idle timeout)."""
    assert _run_child_until_it_exits(method, use_an_executor_and_return, None) == 3


def test_mp_context_stays_readable_after_shutdown():
    ex = MemmapExecutor(1, mp_context=multiprocessing.get_context("fork"))
    ex.submit(abs, 1).result(timeout=60)
    ex.shutdown()
    assert ex._mp_context.get_start_method() == "fork"


def test_a_warm_worker_that_died_while_idle_is_collected_by_the_next_lease(tmp_path):
    """A worker killed while idle in the warm pool (not the one the next lease takes) is neither a zombie
    nor listed once another executor leases a worker."""
    import psutil
    from _tasks import started_then_wait, touch, wait_event

    from mmexec._pool import WARM

    flag = str(tmp_path / "flag")
    with MemmapExecutor(2) as ex:  # two workers, both given back
        futures = [ex.submit(started_then_wait, str(tmp_path / f"started-{i}"), flag) for i in range(2)]
        for i in range(2):
            wait_event(str(tmp_path / f"started-{i}"), 60)
        touch(flag)
        assert [f.result(timeout=60) for f in futures] == [flag, flag]
        pids = set(ex.workers())
    idle = WARM.idle_pids()
    assert len(pids) == 2 and set(idle) >= pids
    victim = idle[0]  # the oldest: the next lease takes the most recent
    assert victim in WARM.idle_pids()
    [sentinel] = [w.sentinel for _, w in WARM._idle if w.pid == victim]
    os.kill(victim, 9)
    assert multiprocessing.connection.wait([sentinel], 30) == [sentinel]  # (readable once every thread ended)
    with MemmapExecutor(1) as ex:
        assert ex.submit(pid).result(timeout=60) != victim
    assert victim not in WARM.idle_pids()
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() != psutil.STATUS_ZOMBIE


def test_multiprocessing_finalizers_run_mid_program_leave_executors_usable():
    """Test harnesses (CPython's among them) run multiprocessing's finalizers between tests; mmexec's (which
    stops idle warm workers as a multiprocessing child ends) must leave the process able to run executors."""
    import multiprocessing.util

    with MemmapExecutor(1) as ex:
        assert ex.submit(abs, -1).result(timeout=60) == 1
    multiprocessing.util._run_finalizers(0)
    with MemmapExecutor(1) as ex:
        assert ex.submit(abs, -2).result(timeout=60) == 2


def test_a_warm_worker_that_dies_as_it_is_leased_is_replaced(monkeypatch):
    """A warm worker that dies between the pool's liveness check and its first message: the lease takes
    another (it once raised BrokenPipeError from submit, or broke the new executor)."""
    from mmexec._pool import WARM

    with MemmapExecutor(1) as ex:
        victim = ex.submit(pid).result(timeout=60)
    assert victim in WARM.idle_pids()
    take = WARM.take

    def take_then_die(key: object) -> object:
        got = take(key)
        if got is not None and got[0].pid == victim:
            os.kill(victim, 9)
            deadline = time.monotonic() + 30
            while got[0].alive():  # (until its exit status is collected: all of it is gone)
                assert time.monotonic() < deadline
                time.sleep(0.005)
        return got

    monkeypatch.setattr(WARM, "take", take_then_die)
    with MemmapExecutor(1) as ex:
        assert ex.submit(pid).result(timeout=60) != victim


@pytest.mark.parametrize("mode", ["nowait", "dropped"])
def test_a_multiprocessing_child_that_left_a_call_running_exits_once_it_ends(mode):
    """A multiprocessing child that shut its executor down without waiting (or dropped it) while a call ran:
    the worker, given back after the child's exit hooks ran, stops too; the child exits."""
    assert _run_child_until_it_exits("spawn", leave_an_executor_running, mode) == mode
