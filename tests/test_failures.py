"""Failure paths, for real: each row breaks one phase of a task in one way.

After every row the caller sees the documented exception, nothing of ours is
left in the temp folder, and a new executor works (the old one too, unless a
worker died).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
from _tasks import describe, live_dumps, square

from mmexec import MemmapExecutor


def _die(how: str) -> None:
    if how == "exception":
        raise RuntimeError("failure on purpose")
    if how == "exit":
        os._exit(7)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sigsegv":
        os.kill(os.getpid(), signal.SIGSEGV)


class FailOnUnpickle:
    """Pickles fine in the caller; rebuilding it in the worker fails."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self):
        return _die, (self.how,)


class FailOnPickle:
    """Cannot even be pickled in the caller (or in the worker, as a result)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self):
        _die(self.how)
        raise TypeError("FailOnPickle cannot be pickled")


def run_and_fail(how: str, big: np.ndarray) -> None:
    _die(how)


def return_unpicklable(how: str, big: np.ndarray) -> FailOnPickle:
    return FailOnPickle(how)


def return_failing_on_load(how: str, big: np.ndarray) -> FailOnUnpickle:
    return FailOnUnpickle(how)


def unpickle_and_fail(how: str, big: np.ndarray):
    return FailOnUnpickle(how)


DEAD = (BrokenProcessPool,)
ROWS = [
    # phase, how, expected exception
    ("pickle-in-caller", "exception", RuntimeError),
    # As in ProcessPoolExecutor, a task that cannot be rebuilt breaks the executor.
    ("unpickle-in-worker", "exception", BrokenProcessPool),
    ("unpickle-in-worker", "exit", BrokenProcessPool),
    ("run", "exception", RuntimeError),
    ("run", "exit", BrokenProcessPool),
    ("run", "sigkill", BrokenProcessPool),
    ("run", "sigsegv", BrokenProcessPool),
    ("pickle-result", "exception", RuntimeError),
    ("pickle-result", "exit", BrokenProcessPool),
]


def submit_row(ex: MemmapExecutor, phase: str, how: str, big: np.ndarray):
    if phase == "pickle-in-caller":
        return ex.submit(describe, FailOnPickle(how), big)
    if phase == "unpickle-in-worker":
        return ex.submit(describe, FailOnUnpickle(how), big)
    if phase == "run":
        return ex.submit(run_and_fail, how, big)
    return ex.submit(return_unpicklable, how, big)


@pytest.mark.parametrize(("phase", "how", "expected"), ROWS, ids=[f"{p}-{h}" for p, h, _ in ROWS])
def test_failure_table(phase, how, expected):
    """Each failure reaches the caller as the documented exception and leaves nothing behind."""
    big = np.ones(300_000)
    ex = MemmapExecutor(2)
    try:
        healthy = ex.submit(describe, big)
        assert healthy.result(timeout=60)["type"] == "memmap"
        with pytest.raises(expected):
            submit_row(ex, phase, how, big).result(timeout=60)
        if expected is BrokenProcessPool:
            with pytest.raises(BrokenProcessPool, match="new MemmapExecutor"):
                ex.submit(square, 2)
        else:
            assert ex.submit(describe, big).result(timeout=60)["sum"] == 300_000
    finally:
        ex.shutdown(wait=True)
    with MemmapExecutor(2) as fresh:
        assert fresh.submit(describe, big).result(timeout=60)["type"] == "memmap"


def test_task_exception_fails_only_its_own_future():
    """Other tasks of the same map/submit batch still succeed."""
    with MemmapExecutor(2) as ex:
        bad = ex.submit(run_and_fail, "exception", None)
        good = [ex.submit(square, i) for i in range(10)]
        with pytest.raises(RuntimeError):
            bad.result(timeout=60)
        assert [f.result(timeout=60) for f in good] == [i * i for i in range(10)]


CRASH_SCRIPT = textwrap.dedent(
    """
    import ctypes
    from mmexec import MemmapExecutor

    def crash_in_native_code():
        ctypes.string_at(0)

    if __name__ == "__main__":
        with MemmapExecutor(1) as ex:
            try:
                ex.submit(crash_in_native_code).result(timeout=60)
            except Exception as exc:
                print("caller saw", type(exc).__name__, flush=True)
    """
)


def test_segfault_in_a_task_names_the_task_on_stderr(tmp_path):
    """A worker killed by a segfault prints the Python traceback of the task it ran (faulthandler)."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "caller saw TerminatedWorkerError" in done.stdout, done.stderr
    assert "Segmentation fault" in done.stderr
    assert "crash_in_native_code" in done.stderr


def test_concurrent_submit_from_threads_dumps_and_cleans():
    """Eight threads submitting large arrays at once all get correct results, and files go away."""
    arrays = [np.full(200_000, float(i)) for i in range(8)]
    results: dict[int, float] = {}
    with MemmapExecutor(2) as ex:

        def work(i: int, a: np.ndarray) -> None:
            results[i] = sum(ex.submit(describe, a).result(timeout=60)["sum"] for _ in range(5))

        threads = [threading.Thread(target=work, args=(i, arrays[i])) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(live_dumps(ex)) == 8
        del arrays
        gc.collect()
        assert live_dumps(ex) == []
    assert results == {i: 5 * 200_000.0 * i for i in range(8)}


SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from mmexec import MemmapExecutor

    def slow(a, i):
        time.sleep(0.05)
        return float(a[i])

    if __name__ == "__main__":
        a = np.arange(1_000_000.0)
        with MemmapExecutor(2) as ex:
            it = ex.map(slow, [a] * 400, range(400), chunksize=1)
            next(it)
            print(ex._store.folder, flush=True)
            list(it)
    """
)


def _start(tmp_path) -> tuple[subprocess.Popen[str], str]:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    folder = proc.stdout.readline().strip()
    proc.stdout.close()
    assert folder and os.path.isdir(folder), proc.stderr.read() if proc.stderr else ""
    return proc, folder


def _wait_gone(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
def test_ctrl_c_during_map_leaves_nothing(tmp_path):
    """SIGINT in the caller during map() raises KeyboardInterrupt and the folder is deleted."""
    proc, folder = _start(tmp_path)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    proc.stderr.close()
    proc.wait(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert not os.path.exists(folder)


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["parent", "process-group"])
def test_sigkill_of_the_caller_leaves_nothing(tmp_path, group):
    """After SIGKILL of the caller (or its whole process group) no dump is left in the temp folder.

    Dumps are unlinked as soon as written, so the kernel frees them with the
    processes; the (empty) folder goes when loky's resource tracker notices,
    or, if the tracker was killed too, when the next executor starts.
    """
    proc, folder = _start(tmp_path)
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    proc.wait(timeout=60)
    proc.stderr.close()
    assert not os.path.exists(folder) or os.listdir(folder) == []
    if not group:
        assert _wait_gone(folder, timeout=30), f"{folder} still there 30 s after SIGKILL"
    with MemmapExecutor(1) as ex:
        ex.submit(describe, np.ones(300_000)).result(timeout=60)
    assert not os.path.exists(folder)
    # loky's named semaphores of the killed caller: its tracker, killed with the group, left them
    parent = os.path.dirname(folder)
    assert [n for n in os.listdir(parent) if n.startswith(f"sem.loky-{proc.pid}-")] == []


def touch_all_then_wait(a: np.ndarray, seconds: float) -> int:
    """Read every page of a shared array (RSS grows by its size), then outlast loky's 1 s leak-check delay."""
    total = float(a.sum())
    time.sleep(seconds)
    return os.getpid() if total >= 0 else -1


@pytest.mark.slow
def test_mapped_arrays_do_not_make_loky_recycle_workers():
    """Workers that read 400 MB of shared arrays keep running: maps are released after each task."""
    pytest.importorskip("psutil")  # loky only checks worker memory when psutil is installed
    a = np.ones(50 * 2**20)
    with MemmapExecutor(1) as ex:
        reference = ex.submit(os.getpid).result(timeout=60)  # loky measures the worker's size after its first task
        first = ex.submit(touch_all_then_wait, a, 1.2).result(timeout=60)
        second = ex.submit(touch_all_then_wait, a, 1.2).result(timeout=60)
        last = ex.submit(os.getpid).result(timeout=60)
    assert reference == first == second == last


def test_a_worker_dying_while_writing_a_result_leaves_no_named_file(tmp_path):
    """The partial result file of a worker that died mid-write is removed as soon as the caller sees the
    death, not at shutdown: result files carry their writer's pid."""
    from _tasks import die_while_writing_a_result

    with MemmapExecutor(1, temp_folder=str(tmp_path)) as ex:
        folder = ex._store.folder
        with pytest.raises(BrokenProcessPool):
            ex.submit(die_while_writing_a_result, folder).result(timeout=60)
        assert os.listdir(folder) == []


KILL_LOOP = textwrap.dedent(
    """
    import sys
    import numpy as np
    from mmexec import MemmapExecutor

    def grow(a):
        return np.concatenate([a, a])  # a large result, written by the worker into the caller's folder

    if __name__ == "__main__":
        rng = np.random.default_rng(int(sys.argv[2]))
        with MemmapExecutor(2, temp_folder=sys.argv[1]) as ex:
            for i in range(10_000):
                a = rng.random(int(rng.integers(2**17, 2**21)))  # 1-16 MiB: dumped
                futures = [ex.submit(grow, a) for _ in range(3)]
                if i == 1:
                    print("busy", flush=True)
                for f in futures:
                    f.result()
    """
)


@pytest.mark.slow
def test_twenty_process_group_kills_mid_work_leave_nothing_once_the_next_executor_starts(tmp_path):
    """SIGKILL of the whole process group (caller, workers, loky's tracker) while dumps and results are being
    written, 20 times: once the next executor is created, nothing of theirs is left in the temp folder or
    /dev/shm (their folders, partial results, loky's semaphores)."""
    import random

    folder = tmp_path / "temp"
    folder.mkdir(mode=0o700)
    script = tmp_path / "loop.py"
    script.write_text(KILL_LOOP)
    killed = []
    for run in range(20):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(folder), str(run)], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "busy"
        time.sleep(random.uniform(0.0, 0.3))  # not synchronisation: a random moment of the work to kill at
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        killed.append(proc.pid)
    with MemmapExecutor(1, temp_folder=str(folder)) as ex:
        assert ex.submit(describe, np.ones(10)).result(timeout=60)["sum"] == 10.0
    assert [n for n in os.listdir(folder) if any(n.startswith(f"mmexec-{pid}-") for pid in killed)] == []
    shm = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    assert [n for n in shm if any(n.startswith((f"sem.loky-{p}-", f"mmexec-{p}-")) for p in killed)] == []


DESCRIPTORS = textwrap.dedent(
    """
    import os, resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    import numpy as np
    from mmexec import MemmapExecutor

    N = 2**14 + 8  # just above the 128 KiB threshold: every result and input is a file

    def make(i):
        return np.full(N, float(i))

    def total(a):
        return float(a.sum())

    if __name__ == "__main__":
        with MemmapExecutor(2, max_nbytes="128K") as ex:
            results = list(ex.map(make, range(10_000), chunksize=50))
            assert all(r[0] == i and r.shape == (N,) for i, r in enumerate(results))
            inputs = [np.full(N, float(i)) for i in range(5_000)]
            assert list(ex.map(total, inputs, chunksize=50)) == [float(i) * N for i in range(5_000)]
            assert [ex.submit(total, a).result() for a in inputs[:1_000]] == [float(i) * N for i in range(1_000)]
            print("ok", len(os.listdir("/proc/self/fd")), flush=True)
    """
)


@pytest.mark.slow
def test_ten_thousand_live_results_and_five_thousand_inputs_under_1024_descriptors(tmp_path):
    """Under ulimit -n 1024, 10,000 live large results and 5,000 distinct large inputs work (beyond the
    descriptor budget, results are copied into memory and inputs pickled), and the process exits cleanly."""
    from _tasks import run_script

    proc = run_script(tmp_path, DESCRIPTORS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, held = proc.stdout.split()
    assert status == "ok" and int(held) < 1024


CTRL_C = textwrap.dedent(
    """
    import signal, time
    from mmexec import Parallel, delayed

    def stuck(seconds):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # like C code: deaf to the abort signal
        time.sleep(seconds)
        return seconds

    if __name__ == "__main__":
        print("start", flush=True)
        Parallel(n_jobs=2)(delayed(stuck)(120) for _ in range(4))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_on_parallel_stops_tasks_stuck_in_c_and_exits(tmp_path, presses):
    """Ctrl-C during Parallel: nothing new starts, running tasks are aborted (their workers killed after the
    0.5 s grace when deaf to it), and the program ends with KeyboardInterrupt, not after the 120 s tasks;
    a second Ctrl-C during the abort ends it too."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "start"
    time.sleep(1.5)  # not synchronisation: let the tasks start (the outcome is the same if they have not)
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
    _, err = proc.communicate(timeout=60)  # far less than the tasks' 120 s
    # (after a second Ctrl-C, loky's resource tracker may add warnings as it removes the pool's semaphores)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err.strip().splitlines()
