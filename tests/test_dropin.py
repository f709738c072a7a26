"""Drop-in behaviour after the core redesign: tasks may write their arguments, an abort touches only the
calls it names, a failing call fails only its future, kept arguments never change, and limits (address
space, descriptors) or stray signals break nothing."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import numpy as np
import pytest
from _tasks import add, pid, run_script, settle, square, total, touch, wait_event
from conftest import our_folders

from mmexec import AbortedError, MemmapExecutor, Parallel, ResultError, delayed

PROGRAMS = os.path.join(os.path.dirname(__file__), "programs")


# ---------------------------------------------------------------- tasks (importable by reference in workers)
def center(x: np.ndarray) -> tuple[float, float]:
    """Write the argument in place, as code written for ProcessPoolExecutor may."""
    x -= x.mean()
    return float(x.mean()), float(x[0])


def wait_then(started: str, flag: str, value: Any) -> Any:
    """Say it started, then wait for ``flag`` (Python code: an abort interrupts it)."""
    touch(started)
    wait_event(flag, 60)
    return value


def log_and_sleep(i: int, log: str, seconds: float) -> int:
    """Append ``i`` to ``log`` (O_APPEND: one write, whole), then sleep: a call whose start the caller sees."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    time.sleep(seconds)
    return i


def stuck_in_c_until(started: str, flag: str) -> str:
    """Ignore the abort signal (as a long C call does) until ``flag`` exists."""
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        touch(started)
        wait_event(flag, 60)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
    return "stuck call done"


def mark(i: int, folder: str) -> int:
    """Leave a file saying call ``i`` ran."""
    touch(os.path.join(folder, f"ran-{i}"))
    return i


class FailsToLoadInCaller:
    """A result that cannot be rebuilt in the caller (unpickling raises FileNotFoundError there)."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __reduce__(self) -> Any:
        return _load_in, (self.parent,)


def _load_in(parent: int) -> str:
    if os.getpid() == parent:
        raise FileNotFoundError(2, "No such file or directory", "/dev/shm/gone")
    return "loaded"


def unloadable_or_value(i: int, bad: int, parent: int) -> Any:
    return FailsToLoadInCaller(parent) if i == bad else i


_KEPT: dict[str, np.ndarray] = {}


def keep(a: np.ndarray) -> float:
    """Keep the argument in this worker after the call (a cache), and return its sum."""
    _KEPT["a"] = a
    return float(a.sum())


def kept_sum() -> float:
    return float(_KEPT["a"].sum())


def forget_kept() -> None:
    _KEPT.clear()


_LOCK: Any = None


def set_lock(lock: Any) -> None:
    global _LOCK
    _LOCK = lock


def try_lock(timeout: float) -> bool:
    """Acquire (and release) the lock the initializer set; False if it is held elsewhere."""
    if not _LOCK.acquire(timeout=timeout):
        return False
    _LOCK.release()
    return True


def unpicklable_large_result() -> tuple[np.ndarray, Any]:
    return np.ones(2**20), threading.Lock()


def fail_or_mark(i: int, path: str | None = None) -> int:
    if i == 0:
        raise ValueError("call 0 fails")
    assert path is not None
    touch(path)
    return i


class SlowToPickle:
    """An argument whose pickling takes a second; it arrives as ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        time.sleep(1.0)
        return str, (self.path,)


def _futures_settle(futures: list[concurrent.futures.Future[Any]], timeout: float = 60) -> None:
    done, not_done = concurrent.futures.wait(futures, timeout=timeout)
    assert not not_done, f"{len(not_done)} futures never finished"


def _aborted(fut: concurrent.futures.Future[Any]) -> bool:
    return fut.cancelled() or isinstance(fut.exception(), AbortedError)


def _log_lines(log: str) -> list[int]:
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [int(line) for line in f.read().split()]


# ---------------------------------------------------------------- 1. tasks write their arguments
def test_a_task_may_write_its_large_argument_and_the_callers_array_is_unchanged(executor_class):
    """A task that writes its (2 MiB) argument in place runs, and the caller's array is unchanged."""
    a = np.random.default_rng(0).random(2**18) + 1.0
    before = a.copy()
    with executor_class(2) as ex:
        futures = [ex.submit(center, a) for _ in range(4)]
        results = [f.result(timeout=60) for f in futures]
    for mean, first in results:
        assert abs(mean) < 1e-9
        assert first == pytest.approx(before[0] - before.mean())
    np.testing.assert_array_equal(a, before)


def test_parallel_tasks_may_write_their_large_argument():
    """Parallel(n_jobs=2) with default options: tasks may write a large argument in place; the caller's is intact."""
    a = np.random.default_rng(1).random(2**18) + 1.0
    before = a.copy()
    results = Parallel(n_jobs=2)(delayed(center)(a) for _ in range(4))
    for mean, first in results:
        assert abs(mean) < 1e-9
        assert first == pytest.approx(before[0] - before.mean())
    np.testing.assert_array_equal(a, before)


# ---------------------------------------------------------------- 2. an abort touches no other call
def test_aborting_running_calls_never_fails_or_reruns_another_call(tmp_path):
    """Aborting the running call several times among 30 submits on one worker: every other call runs once
    and returns its value."""
    log = str(tmp_path / "log")
    aborted: set[int] = set()
    with MemmapExecutor(1) as ex:
        futures = [ex.submit(log_and_sleep, i, log, 0.1) for i in range(30)]
        deadline = time.monotonic() + 60
        target = 3
        while len(aborted) < 5:
            assert time.monotonic() < deadline, f"aborted only {sorted(aborted)}"
            lines = _log_lines(log)
            if lines and lines[-1] >= target and lines[-1] not in aborted and not futures[lines[-1]].done():
                running = lines[-1]
                ex.abort([futures[running]])
                aborted.add(running)
                target = running + 4
            else:
                time.sleep(0.005)
        _futures_settle(futures)
    innocent = [i for i in range(30) if i not in aborted]
    failed = {i: repr(futures[i].exception()) for i in innocent if futures[i].exception() is not None}
    assert failed == {}, f"innocent calls failed: {failed}"
    assert [futures[i].result() for i in innocent] == innocent
    counts = {i: _log_lines(log).count(i) for i in range(30)}
    assert {i: n for i, n in counts.items() if i in innocent and n != 1} == {}, "a call ran twice or never"
    assert all(counts[i] <= 1 for i in aborted), "an aborted call ran again"
    assert all(_aborted(futures[i]) or futures[i].result() == i for i in aborted)


# ---------------------------------------------------------------- 3. aborting a queued call behind a stuck one
def test_aborting_a_queued_call_behind_a_call_stuck_in_c_touches_nothing_else(tmp_path):
    """abort([queued], grace=0) behind a call that ignores the abort signal cancels that call only: the stuck
    call and the 24 others queued complete."""
    started, flag = str(tmp_path / "started"), str(tmp_path / "flag")
    with MemmapExecutor(1) as ex:
        try:
            stuck = ex.submit(stuck_in_c_until, started, flag)
            wait_event(started, 60)
            queued = [ex.submit(square, i) for i in range(25)]
            victim = queued[12]
            ex.abort([victim], grace=0)
            assert victim.done() and victim.cancelled()
            assert not stuck.done()
            assert not any(f.done() for i, f in enumerate(queued) if i != 12)
            pids = set(ex.workers())
        finally:
            touch(flag)
        assert stuck.result(timeout=60) == "stuck call done"
        assert [f.result(timeout=60) for i, f in enumerate(queued) if i != 12] == [
            i * i for i in range(25) if i != 12
        ]
        assert set(ex.workers()) == pids


# ---------------------------------------------------------------- 4. an aborted queued call is done and stays so
def test_an_aborted_queued_call_is_done_when_abort_returns_and_never_runs(tmp_path):
    """abort([f]) of a call queued in a submit loop: f is done when abort() returns, and never runs later."""
    started, flag = str(tmp_path / "started"), str(tmp_path / "flag")
    marks = tmp_path / "marks"
    marks.mkdir()
    with MemmapExecutor(1) as ex:
        try:
            blocker = ex.submit(wait_then, started, flag, "blocker")
            wait_event(started, 60)
            futures = [ex.submit(mark, i, str(marks)) for i in range(40)]
            f = futures[20]
            ex.abort([f])
            assert f.done()
        finally:
            touch(flag)
        assert blocker.result(timeout=60) == "blocker"
        assert [g.result(timeout=60) for i, g in enumerate(futures) if i != 20] == [i for i in range(40) if i != 20]
    assert _aborted(f)
    assert not (marks / "ran-20").exists()


# ---------------------------------------------------------------- 5. a result the caller cannot rebuild
def test_one_result_that_cannot_be_rebuilt_fails_only_its_future():
    """In a loop of 80 submits, the one result that cannot be rebuilt in the caller fails with ResultError;
    the 79 others succeed."""
    with MemmapExecutor(2) as ex:
        futures = [ex.submit(unloadable_or_value, i, 41, os.getpid()) for i in range(80)]
        _futures_settle(futures)
    failed = {i: f.exception() for i, f in enumerate(futures) if f.exception() is not None}
    assert list(failed) == [41], failed
    assert isinstance(failed[41], ResultError)
    assert [f.result() for i, f in enumerate(futures) if i != 41] == [i for i in range(80) if i != 41]


# ---------------------------------------------------------------- 6. arguments kept by a worker
def test_an_argument_a_worker_keeps_never_changes_under_it(executor_class):
    """A task keeps its 4 MiB argument in the worker; new same-size arrays sent after the caller dropped its
    own never change what the worker kept."""
    rng = np.random.default_rng(2)
    with executor_class(1) as ex:
        try:
            for trial in range(20):
                a = rng.random(2**19)
                expected = ex.submit(keep, a).result(timeout=60)
                assert expected == float(a.sum())
                del a
                settle()
                for j in range(3):
                    b = np.full(2**19, float(trial * 10 + j + 2))
                    assert ex.submit(total, b).result(timeout=60) == float(b.sum())
                    del b
                    settle()
                assert ex.submit(kept_sum).result(timeout=60) == expected, f"trial {trial}"
        finally:
            ex.submit(forget_kept).result(timeout=60)


# ---------------------------------------------------------------- 7. multiprocessing locks in initargs
@pytest.mark.parametrize("make_lock", [multiprocessing.RLock, lambda: multiprocessing.get_context("spawn").Lock()],
                         ids=["RLock", "spawn-Lock"])
def test_an_initializer_may_receive_a_multiprocessing_lock(executor_class, make_lock):
    """initargs may hold a multiprocessing lock: the tasks share it with the caller."""
    lock = make_lock()
    with executor_class(2, None, set_lock, (lock,)) as ex:
        assert ex.submit(try_lock, 10).result(timeout=60) is True
        with lock:
            assert ex.submit(try_lock, 0.05).result(timeout=60) is False  # held here: the same lock
        assert ex.submit(try_lock, 10).result(timeout=60) is True


# ---------------------------------------------------------------- 8. address space
def test_an_address_space_limit_in_one_executor_leaves_later_executors_alone(tmp_path):
    """A worker under RLIMIT_AS fails a 400 MB argument with MemoryError; three new executors then run
    400 MB tasks."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ValueError, OSError) as exc:
        pytest.skip(f"RLIMIT_AS cannot be set here: {exc}")
    done = run_script(tmp_path, textwrap.dedent(
        """
        import json, resource
        import numpy as np
        from mmexec import MemmapExecutor

        def limit_address_space(extra):
            with open("/proc/self/status") as f:
                size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (size + extra, resource.getrlimit(resource.RLIMIT_AS)[1]))

        def total(a):
            return float(a.sum())

        if __name__ == "__main__":
            a = np.ones(50_000_000)  # 400 MB
            seen = {}
            with MemmapExecutor(1, initializer=limit_address_space, initargs=(150 * 2**20,)) as ex:
                try:
                    ex.submit(total, a).result(timeout=120)
                    seen["limited"] = "ok"
                except BaseException as exc:
                    seen["limited"] = type(exc).__name__
            seen["later"] = []
            for _ in range(3):
                with MemmapExecutor(1) as ex:
                    try:
                        seen["later"].append(ex.submit(total, a).result(timeout=120))
                    except BaseException as exc:
                        seen["later"].append(f"{type(exc).__name__}: {exc}"[:200])
            print(json.dumps(seen))
        """
    ), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"limited": "MemoryError", "later": [5e7, 5e7, 5e7]}, seen


# ---------------------------------------------------------------- 9. descriptors
@pytest.mark.parametrize("kind", ["ProcessPoolExecutor", "MemmapExecutor"])
def test_many_live_large_results_with_few_descriptors_left(tmp_path, kind):
    """With RLIMIT_NOFILE 256 and 200 descriptors already open, 300 live 2 MiB results all arrive, right."""
    done = run_script(tmp_path, textwrap.dedent(
        f"""
        import json, os, resource
        import numpy as np
        from concurrent.futures import ProcessPoolExecutor
        from mmexec import MemmapExecutor

        def make(i):
            return np.full(2**18, float(i))

        if __name__ == "__main__":
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            held = [os.open("/dev/null", os.O_RDONLY) for _ in range(200)]
            failures, wrong, kinds = 0, 0, set()
            with {kind}(2) as ex:
                futures = [ex.submit(make, i) for i in range(300)]
                for i, f in enumerate(futures):
                    try:
                        r = f.result(timeout=120)
                    except BaseException as exc:
                        failures += 1
                        kinds.add(f"{{type(exc).__name__}}: {{exc}}"[:200])
                    else:
                        wrong += r.shape != (2**18,) or r[0] != i or r[-1] != i
            print(json.dumps({{"submits": len(futures), "failures": failures, "wrong": int(wrong),
                              "kinds": sorted(kinds)}}))
        """
    ), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    print(seen)
    assert seen == {"submits": 300, "failures": 0, "wrong": 0, "kinds": []}, seen


# ---------------------------------------------------------------- 10. a result that fails to pickle
def _files_in_our_folders() -> list[str]:
    return [os.path.join(folder, name) for folder in our_folders() for name in os.listdir(folder)]


def test_a_large_result_that_fails_to_pickle_leaves_no_file():
    """A result holding a large array and a lock fails its future; no file of it is left in the executor's
    folder once the future is done, 20 times over."""
    with MemmapExecutor(1) as ex:
        ex.submit(square, 2).result(timeout=60)  # the folder exists
        assert our_folders()
        for _ in range(20):
            fut = ex.submit(unpicklable_large_result)
            exc = fut.exception(timeout=60)
            assert isinstance(exc, TypeError) or "pickl" in repr(exc).lower(), repr(exc)
            assert _files_in_our_folders() == []


# ---------------------------------------------------------------- 11. abort(grace=...) is checked
def test_abort_checks_its_grace_and_the_executor_stays_usable(tmp_path):
    """abort(grace=None) is a TypeError, a negative or NaN grace a ValueError; the executor still works,
    and abort with a valid grace still aborts."""
    with MemmapExecutor(1) as ex:
        assert ex.submit(square, 3).result(timeout=60) == 9
        with pytest.raises(TypeError):
            ex.abort(grace=None)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            ex.abort(grace=-1)
        with pytest.raises(ValueError):
            ex.abort(grace=float("nan"))
        assert ex.submit(square, 4).result(timeout=60) == 16
        started, flag = str(tmp_path / "started"), str(tmp_path / "flag")
        fut = ex.submit(wait_then, started, flag, "late")
        wait_event(started, 60)
        ex.abort([fut], grace=1.0)
        assert isinstance(fut.exception(timeout=0), AbortedError)
        assert ex.submit(square, 5).result(timeout=60) == 25


# ---------------------------------------------------------------- 12. a Parallel error is prompt
def test_a_parallel_error_is_raised_promptly_and_later_calls_never_run(tmp_path):
    """Call 0 fails at once while calls 1..6 take a second each to pickle: the error comes in under 1.5 s,
    and none of calls 1..6 ever runs."""
    marks = [str(tmp_path / f"ran-{i}") for i in range(1, 7)]
    calls = [delayed(fail_or_mark)(0)] + [delayed(fail_or_mark)(i, SlowToPickle(p)) for i, p in enumerate(marks, 1)]
    start = time.monotonic()
    with pytest.raises(ValueError, match="call 0 fails"):
        Parallel(n_jobs=2)(calls)
    took = time.monotonic() - start
    deadline = time.monotonic() + 30
    while our_folders():  # the executor is done once its folder is gone
        assert time.monotonic() < deadline, "the executor never finished"
        time.sleep(0.01)
    assert took < 1.5, f"the error took {took:.2f} s"
    assert [p for p in marks if os.path.exists(p)] == []


# ---------------------------------------------------------------- 13. an initializer that cannot be pickled
def test_an_unpicklable_initializer_fails_the_constructor_and_creates_no_folder(tmp_path):
    """An initializer that cannot be pickled makes the constructor raise, and the temp folder is not created."""
    lock = threading.Lock()
    folder = tmp_path / "missing"
    with pytest.raises((TypeError, Exception)) as info:
        MemmapExecutor(2, initializer=lambda: lock.locked(), temp_folder=str(folder))
    assert "pickle" in str(info.value).lower() or isinstance(info.value, TypeError), repr(info.value)
    assert not folder.exists()
    assert our_folders() == []


# ---------------------------------------------------------------- 14. abort(grace=0) on one of three executors
def test_abort_with_no_grace_in_one_executor_leaves_two_others_alone(tmp_path):
    """abort(grace=0) on one of three executors running at once: the other two's running and queued calls
    complete."""
    flag = str(tmp_path / "flag")
    executors = [MemmapExecutor(1) for _ in range(3)]
    try:
        running, queued = [], []
        for k, ex in enumerate(executors):
            started = str(tmp_path / f"started-{k}")
            running.append(ex.submit(wait_then, started, flag, f"running {k}"))
            queued.append([ex.submit(add, k, i) for i in range(10)])
        for k in range(3):
            wait_event(str(tmp_path / f"started-{k}"), 60)
        executors[0].abort(grace=0)
        assert _aborted(running[0]) and all(f.done() for f in queued[0])
        touch(flag)
        for k in (1, 2):
            assert running[k].result(timeout=60) == f"running {k}"
            assert [f.result(timeout=60) for f in queued[k]] == [k + i for i in range(10)]
    finally:
        touch(flag)
        for ex in executors:
            ex.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- 15. stray abort signals
def test_stray_abort_signals_never_break_a_call_or_its_worker():
    """SIGUSR1 sent to the worker in a tight loop while 2,000 tiny calls run (none aborted): every call
    returns its value and the worker lives on."""
    with MemmapExecutor(1) as ex:
        ex.submit(pid).result(timeout=60)
        [worker] = list(ex.workers())
        stop = threading.Event()
        sent = [0]

        def storm() -> None:
            while not stop.is_set():
                try:
                    os.kill(worker, signal.SIGUSR1)
                except ProcessLookupError:
                    return
                sent[0] += 1
                time.sleep(0)

        thread = threading.Thread(target=storm, daemon=True)
        thread.start()
        try:
            futures = [ex.submit(square, i) for i in range(2000)]
            done, not_done = concurrent.futures.wait(futures, timeout=60)
        finally:
            stop.set()
            thread.join(10)
        assert sent[0] > 100
        assert not not_done, f"{len(not_done)} calls never finished"
        errors = [repr(f.exception()) for f in futures if f.exception() is not None]
        assert errors == [], f"{len(errors)} calls failed, e.g. {errors[:3]}"
        assert [f.result() for f in futures] == [i * i for i in range(2000)]
        assert list(ex.workers()) == [worker]
        assert ex.submit(pid).result(timeout=60) == worker


# ---------------------------------------------------------------- storms (the long run)
@pytest.mark.slow
@pytest.mark.timeout(330)
def test_storms_leave_no_innocent_failure_double_run_or_wrong_answer():
    """tests/programs/storms.py at half scale (1,500 calls with about 130 aborts, 200 kept arguments, 1,000
    reused result files, 1,000 calls with 100 failing results): all counts zero."""
    proc = subprocess.run([sys.executable, os.path.join(PROGRAMS, "storms.py"), "0.5"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    print(seen)
    bad = {k: v for k, v in seen.items() if isinstance(v, int) and not k.endswith("_total") and v != 0}
    assert bad == {}, seen

