"""The process's housekeeping: what finalizers, weakref callbacks and timers ask for, run in ordinary threads.

A weakref callback or a ``weakref.finalize`` can run inside any allocation of
any thread, including one that holds a store's lock: taking that lock there
deadlocks. So mmexec's callbacks only :func:`post` their work: a
``SimpleQueue.put`` and a byte written to a non-blocking pipe, both safe
anywhere. Timers (:func:`call_later`: freed files kept for reuse, idle warm
workers) are kept here too.

Who runs it (the *host*): while any executor's manager thread runs, the
managers do, between results (they watch :func:`wake_fd` and call
:func:`run_pending`), so no thread is added while tasks run. Otherwise one
thread of its own, ``mmexec-housekeeper``, does: it is started only from
ordinary thread context (when the last manager ends, or when a timer is set
with no host) and ends when nothing is left to do or a manager takes over.

At interpreter exit, whatever is queued runs in the exiting thread. What is
posted later (arrays freed as the interpreter tears down) is left to the
process's end, never run inside the finalizer that posts it (it may hold any
lock): the kernel closes the descriptors, and no name is left in a folder
(each file's name is unlinked once it is open).

The state is this module's one :class:`Housekeeper`, :data:`HOUSEKEEPER`,
owned by the process (a forked child starts a fresh one).
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["HOUSEKEEPER", "Housekeeper", "drain"]

Work = tuple[Callable[..., object], tuple[Any, ...]]


def drain(q: queue.SimpleQueue[T]) -> Iterator[T]:
    """Take what ``q`` holds now, one item at a time, without blocking."""
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


class Housekeeper:
    """Posted work and timers, and who runs them (see the module docstring)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self._lock = threading.Lock()  # timers, hosts, the thread; never taken by post()
        self._run_lock = threading.Lock()  # one host runs the work at a time
        self._timers: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self._first = math.inf  # the first timer's deadline (read without the lock)
        self._seq = itertools.count()
        self._hosts = 0  # manager threads running now
        self._thread: threading.Thread | None = None
        self._pipe: tuple[int, int] | None = None
        self._needed: list[Callable[[], Any]] = []  # (weak) references to predicates
        self.exiting = False

    # -- any context, finalizers included ----------------------------------
    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` soon on a host. Safe in finalizers: takes no lock, starts no thread, runs
        nothing (after interpreter exit began too: see the module docstring)."""
        self._queue.put((fn, args))
        self._wake()

    def _wake(self) -> None:
        pipe = self._pipe
        if pipe is not None:
            try:
                os.write(pipe[1], b"\0")
            except (BlockingIOError, OSError):  # full: a wake-up is pending anyway
                pass

    # -- ordinary thread context ----------------------------------------------
    def wake_fd(self) -> int:
        """The file descriptor a host watches: readable when there is work (creates it on first use)."""
        with self._lock:
            return self._ensure_pipe()[0]

    def _ensure_pipe(self) -> tuple[int, int]:
        if self._pipe is None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._pipe = (r, w)
        return self._pipe

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on a host in about ``delay`` seconds (a thread is started if there is no host)."""
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn, args))
            self._first = self._timers[0][0]
            self._ensure_pipe()
            self._ensure_host()
        self._wake()

    def need_while(self, predicate: Callable[[], bool]) -> None:
        """Keep a host while ``predicate()`` is true (posts may still come: files held in caller code).

        A bound method is held weakly: its object's end ends the need.
        """
        ref: Callable[[], Any] = weakref.WeakMethod(predicate) if hasattr(predicate, "__self__") else (
            lambda: predicate
        )
        with self._lock:
            if not any(r() == predicate for r in self._needed):
                self._needed.append(ref)

    def ensure_host(self) -> None:
        """Make sure someone hosts the work from now on (call after creating what posts may come for)."""
        with self._lock:
            self._ensure_pipe()
            self._ensure_host()

    def next_delay(self) -> float | None:
        """Seconds until the next timer (0 when work is queued), None when nothing is due. Takes no lock."""
        if not self._queue.empty():
            return 0.0
        first = self._first
        if first == math.inf:
            return None
        return max(0.0, first - time.monotonic())

    def run_pending(self) -> None:
        """Run the posted work and the timers that are due (a host calls this)."""
        if not self._run_lock.acquire(blocking=False):
            return  # another host is at it
        try:
            pipe = self._pipe
            if pipe is not None:
                try:
                    while os.read(pipe[0], 4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            for fn, args in drain(self._queue):
                _run(fn, args)
            while True:
                with self._lock:
                    if not self._timers or self._timers[0][0] > time.monotonic():
                        break
                    _, _, fn, args = heapq.heappop(self._timers)
                    self._first = self._timers[0][0] if self._timers else math.inf
                _run(fn, args)
        finally:
            self._run_lock.release()

    def host_started(self) -> None:
        """A manager thread starts: it hosts the work from now on (the housekeeper thread ends)."""
        with self._lock:
            self._hosts += 1
            self._ensure_pipe()
        self._wake()  # (the housekeeper thread, if any, sees a host and ends)

    def host_ended(self) -> None:
        """A manager thread ends: if it was the last one, the housekeeper thread takes over."""
        with self._lock:
            self._hosts -= 1
            self._ensure_host()

    def _ensure_host(self) -> None:
        """Start the housekeeper thread if nobody hosts the work and there is some (called under the lock)."""
        if self._hosts or self._thread is not None or self.exiting or not self._has_work():
            return
        thread = threading.Thread(target=self._serve, name="mmexec-housekeeper", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread can start (interpreter finalization): the exit hook runs the work
            return
        self._thread = thread

    def _has_work(self) -> bool:
        """(under the lock)"""
        if self._timers or not self._queue.empty():
            return True
        alive = [(ref, ref()) for ref in self._needed]
        self._needed = [ref for ref, need in alive if need is not None]
        return any(need() for _, need in alive if need is not None)

    def _serve(self) -> None:
        import select

        while True:
            with self._lock:
                if self._hosts or self.exiting or not self._has_work():
                    self._thread = None
                    return
                read_fd = self._ensure_pipe()[0]
            delay = self.next_delay()
            select.select([read_fd], [], [], delay)
            self.run_pending()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything posted before this call has run (tests use it); False on timeout."""
        if self.exiting:
            return True
        with self._lock:
            hosted = bool(self._hosts) or self._thread is not None
        if not hosted:
            self.run_pending()
            return True
        done = threading.Event()
        self.post(done.set)
        return done.wait(timeout)

    # -- process life ----------------------------------------------------------
    def at_exit(self) -> None:
        """Interpreter exit: run what is queued here (later posts wait for the process's end)."""
        self.exiting = True
        for fn, args in drain(self._queue):
            _run(fn, args)

    def after_fork_in_child(self) -> None:
        """A forked child: the parent's work and pipe are the parent's; start empty, but for the needs
        registered (they are the process's, registered once, at import)."""
        pipe, needed = self._pipe, self._needed
        self.__init__()  # type: ignore[misc]
        self._needed = needed
        for fd in pipe or ():
            try:
                os.close(fd)
            except OSError:
                pass


def _run(fn: Callable[..., object], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except Exception:  # a clean-up step failed: log it, keep serving the others
        logging.getLogger("mmexec").exception("mmexec clean-up step %r failed", fn)


#: The process's housekeeper.
HOUSEKEEPER = Housekeeper()
atexit.register(HOUSEKEEPER.at_exit)
os.register_at_fork(after_in_child=HOUSEKEEPER.after_fork_in_child)
