"""One process-wide thread that runs what finalizers and weakref callbacks ask for.

A weakref callback or a ``weakref.finalize`` can run inside any allocation of
any thread, including one that holds a store's lock: taking that lock there
deadlocks (or corrupts the state the lock protects). So mmexec's callbacks do
nothing but :func:`post` the work here: ``SimpleQueue.put`` is reentrant, safe
in ``__del__`` and in callbacks. The thread runs the posted calls in order,
in ordinary thread context, where taking locks is safe.

At interpreter exit the queue is run out in the exiting thread (and a call
posted later runs at once), so no file outlives the process's own clean-up.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["drain", "flush", "post"]

_queue: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...]] | None] = queue.SimpleQueue()
_start_lock = threading.Lock()
_thread: threading.Thread | None = None
_exiting = False
_pid = os.getpid()


def post(fn: Callable[..., object], *args: Any) -> None:
    """Run ``fn(*args)`` soon on the janitor thread. Safe in finalizers: takes no lock."""
    if _exiting:
        _run(fn, args)
        return
    _queue.put((fn, args))
    if _thread is None or _pid != os.getpid():
        _start()


def drain(q: queue.SimpleQueue[T]) -> Iterator[T]:
    """Take what ``q`` holds now, one item at a time, without blocking."""
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


def flush(timeout: float | None = None) -> bool:
    """Wait until every call posted before this one has run (tests use it); False on timeout."""
    if _exiting or _thread is None:
        return True
    done = threading.Event()
    post(done.set)
    return done.wait(timeout)


def _start() -> None:
    global _thread, _pid
    # Called from post(), maybe inside a finalizer: never block. If another thread is
    # starting the janitor right now, it sees our item.
    if not _start_lock.acquire(blocking=False):
        return
    try:
        if _thread is None or _pid != os.getpid():
            _pid = os.getpid()
            _thread = threading.Thread(target=_serve, name="mmexec-janitor", daemon=True)
            _thread.start()
    finally:
        _start_lock.release()


def _run(fn: Callable[..., object], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except Exception:  # a clean-up step failed: log it, keep serving the others
        logging.getLogger("mmexec").exception("mmexec clean-up step %r failed", fn)


def _serve() -> None:
    while True:
        item = _queue.get()
        if item is None:
            return
        _run(*item)
        del item


@atexit.register
def _drain_at_exit() -> None:
    global _exiting
    _exiting = True
    for item in drain(_queue):
        if item is not None:
            _run(*item)
    _queue.put(None)
