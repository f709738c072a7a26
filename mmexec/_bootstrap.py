"""A worker's start: what runs as each mmexec worker process starts, before its first task.

Only the standard library is imported here, and the package's ``__init__``
imports nothing heavy: an idle worker never imports numpy or the rest of
mmexec, so the workers a first executor starts do not compete for the CPUs
with the one that runs its first task (``_worker`` is imported with that
task, as loky imports a task's own module).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["ABORT_SIGNAL", "PARENT_CHECK_INTERVAL", "start_worker"]

#: The signal the caller sends to interrupt a task that an abort cancelled.
ABORT_SIGNAL = signal.SIGUSR1
#: How often a worker checks that the process that started it is still alive.
PARENT_CHECK_INTERVAL = 0.5

_watchdog: threading.Thread | None = None


def _exit_when_orphaned(parent: int) -> None:
    # A forkserver's worker is the forkserver's child, not the caller's: it watches both.
    ppid = os.getppid()
    while os.getppid() == ppid and (ppid == parent or _alive(parent)):
        time.sleep(PARENT_CHECK_INTERVAL)
    os._exit(1)  # the caller died: nobody wants our results, free our maps now


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds that pid: ours is gone
        return False
    return True


def _ensure_watchdog(parent: int) -> None:
    """Make this worker exit soon after its parent dies, even in the middle of a task.

    Then loky's resource tracker sees every process gone and removes the
    caller's folder within seconds instead of after the idle timeout.
    ``parent`` is the pid of the process that started the pool, passed by it
    (:func:`start_worker`): ``os.getppid()`` here would already name init if
    the caller died while this worker was starting.
    """
    global _watchdog
    if _watchdog is None:
        _watchdog = threading.Thread(target=_exit_when_orphaned, args=(parent,), name="mmexec-watchdog", daemon=True)
        _watchdog.start()


def _forget_watchdog() -> None:
    global _watchdog
    _watchdog = None  # a forked child has no thread of its parent's


os.register_at_fork(after_in_child=_forget_watchdog)


def _on_abort_signal(signum: int, frame: FrameType | None) -> None:
    handler = getattr(sys.modules.get("mmexec._worker"), "on_abort_signal", None)
    if handler is not None:  # (not imported yet: no task ran, none to stop)
        handler(signum, frame)


def start_worker(parent: int, init: tuple[Callable[..., object], tuple[Any, ...]] | None = None) -> None:
    """The initializer of mmexec's pools: runs once as each worker process starts.

    Starts the watchdog and installs the abort handler before the first task.
    ``init`` is ``(initializer, initargs)`` for an executor whose pool
    is its own: that initializer runs now, as in the standard library.
    """
    _ensure_watchdog(parent)
    signal.signal(ABORT_SIGNAL, _on_abort_signal)
    if init is not None:
        # A pool of the executor's own: a failure ends this worker, and the pool logs it once and
        # breaks, as the standard library's does (what the initializer sent, log records on a
        # Queue, is flushed first).
        initializer, initargs = init
        initializer(*initargs)
