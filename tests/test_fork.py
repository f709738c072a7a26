"""os.fork() after using mmexec: parent and child never share a file they did not mean to share."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROGRAM = os.path.join(os.path.dirname(__file__), "programs", "fork_side_by_side.py")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_parent_and_forked_child_run_side_by_side_with_no_wrong_answer():
    """The child keeps its inherited result although the parent reuses that size; it starts with no spares,
    cannot use its parent's executor (a clear error, no hang), and passes the inherited result to its own
    executor by value; parent and child tasks side by side give 0 wrong answers, and nothing is left in /dev/shm."""
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    proc = subprocess.run([sys.executable, PROGRAM], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # (loky's resource tracker may warn that the child's warm pool left its semaphores at os._exit(); it
    # removes them, as the /dev/shm check below shows)
    # nothing of mmexec's own on stderr: no traceback, no leaked folder of ours (whatever the checkout's path)
    assert "Traceback" not in proc.stderr and "/mmexec-" not in proc.stderr, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    child = seen["child"]
    n = 2**18
    assert seen["parent_wrong"] == 0 and seen["child_status"] == 0
    assert child.get("error") is None, child
    assert child["wrong"] == 0
    assert child["inherited"] == n  # not the parent's later data
    assert child["inherited_via_own_executor"] == n
    assert seen["spares_before_fork"] >= 1 and child["spares_after_fork"] == 0
    assert "fork" in child["parent_executor"] and "Create a new executor" in child["parent_executor"]
    # (only names of this program's two processes: other processes on the machine come and go meanwhile)
    prefixes = tuple(f"{kind}-{pid}-" for pid in (seen["pid"], child["pid"]) for kind in ("mmexec", "sem.loky"))
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {name for name in after - before if name.startswith(prefixes)}


FORK_WHILE_RESERVING = """
import os, sys
import numpy as np
from mmexec import MemmapExecutor
from mmexec._files import FILES

def total(a):
    return float(a.sum())

if __name__ == "__main__":
    FILES.reserve_lock.acquire()  # as if another thread were reserving room for a dump at the fork
    pid = os.fork()
    if pid == 0:
        with MemmapExecutor(1) as ex:  # the child's own executor: its first dump needs the lock
            ok = ex.submit(total, np.ones(300_000)).result(timeout=60) == 300_000
        os._exit(0 if ok else 3)
    FILES.reserve_lock.release()
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_a_dump_reserves_room_can_dump(tmp_path):
    """The reservation lock a parent thread held at the fork is not the child's: its first dump goes through."""
    script = tmp_path / "fork_reserve.py"
    script.write_text(FORK_WHILE_RESERVING)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "0", proc.stderr[-3000:]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (fork() of a process with threads, 3.12+)
def test_a_forked_child_touches_neither_the_workers_nor_the_pipes_of_its_parents_executor(tmp_path):
    """In a fork child, kill_workers(), terminate_workers() and abort() of the parent's executor do nothing
    (they once killed the parent's workers), and the child holds no copy of the executor's pipes; the
    parent's running call finishes."""
    from _tasks import started_then_wait, touch, wait_event

    from mmexec import MemmapExecutor

    started, flag = str(tmp_path / "started"), str(tmp_path / "flag")
    with MemmapExecutor(1) as ex:
        fut = ex.submit(started_then_wait, started, flag)
        wait_event(started, 60)
        [worker] = ex._core.workers.values()
        fds = [worker.call_fd, worker.reply_fd, worker.abort_fd, ex._core.wake_r, ex._core.wake_w]
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            code = 0
            try:
                ex.kill_workers()
                ex.terminate_workers()
                ex.abort()
                for fd in fds:
                    try:
                        os.fstat(fd)
                        code |= 2  # still open here
                    except OSError:
                        pass
            except BaseException:
                code |= 4
            os._exit(code)
        _, status = os.waitpid(child, 0)
        touch(flag)
        assert fut.result(timeout=60) == flag
        assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_forked_child_keeps_the_housekeepers_standing_needs():
    """The housekeeper's needs (a host while files are held in caller code) are the process's, registered at
    import: a fork child keeps them (it once dropped them, and freed results were never released there)."""
    from mmexec._housekeeper import HOUSEKEEPER

    parent = len(HOUSEKEEPER._needed)
    assert parent >= 1
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.write(w, str(len(HOUSEKEEPER._needed)).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    with os.fdopen(r) as f:
        assert int(f.read()) == parent
