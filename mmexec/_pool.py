"""Worker processes: starting one, talking to it, and the process's warm pool of idle ones.

A :class:`Worker` is one process and its two pipes (calls in, replies out;
``_wire``). An executor *leases* its workers: while it holds one, no other
executor sends it anything, so a worker killed or broken by one executor
never touches another's calls.

:data:`WARM` is the process's pool of idle warm workers (the *shared warm
pool*): an executor shut down gives its healthy workers back, and the next
executor takes them instead of starting processes, so it starts warm. A
worker is handed out again only under the same *key*: the initializer it ran
(None for none). A worker that never ran an initializer may be given one (the
executor sends it ``INIT``), never the other way round. Workers started with
a fork or forkserver context, with arguments only a new process can inherit,
or under ``max_tasks_per_child`` are the executor's alone and never come
here. An idle worker is stopped after :data:`IDLE_TIMEOUT` seconds (a
housekeeping timer), and all are stopped when the interpreter exits.

Who owns what: the executor's manager thread owns the workers it leased and
gives them back (or stops them) when it ends; :data:`WARM` owns idle ones.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ._bootstrap import ABORT_SIGNAL, CALL_ID, serve
from ._compat import LOKY_CONTEXT, register_child_exit_hook
from ._housekeeper import HOUSEKEEPER
from ._wire import CONFIG, INIT, STOP, Reader, send

__all__ = ["CALL_IDS", "IDLE_TIMEOUT", "WARM", "Source", "WarmPool", "Worker", "loky_context", "reap", "start_worker"]

#: Idle warm workers exit after this many seconds (as joblib's).
IDLE_TIMEOUT = 300.0
#: Idle warm workers kept at most, beyond which the oldest are stopped.
MOST_IDLE = max(8, 2 * (os.cpu_count() or 1))
#: Ids of calls, unique in this process (a warm worker serves one executor after another, and an abort
#: request names its call by id: a late request can never match another executor's call).
CALL_IDS = itertools.count(1)


def loky_context() -> Any:
    """loky's process context: fresh interpreters (as ``spawn``) that never re-run the caller's script."""
    return LOKY_CONTEXT


class Worker:
    """One worker process as the caller sees it: its pipes, and what it runs now (the manager's business)."""

    __slots__ = ("_aborts", "_calls", "_replies", "abort_fd", "call_fd", "failure", "item", "key", "killed", "pid",
                 "process", "reader", "ready", "reply_fd", "retiring", "served")

    def __init__(self, process: Any, calls: Any, replies: Any, aborts: Any, key: object) -> None:
        self.process = process
        self.pid: int = process.pid
        # multiprocessing connections: they own the descriptors
        self._calls, self._replies, self._aborts = calls, replies, aborts
        self.call_fd: int = calls.fileno()
        self.abort_fd: int = aborts.fileno()
        os.set_blocking(self.abort_fd, False)
        self.reply_fd: int = replies.fileno()
        self.reader = Reader(self.reply_fd)
        self.key = key
        self.item: Any = None  # the call it runs (None: idle)
        self.killed = False  # an abort killed it: its death breaks nothing
        self.retiring = False  # it said it exits after its reply, or was told to stop
        self.failure: str | None = None  # its initializer failed (what it raised): it exits
        self.served = False  # it was sent a call under its current lease
        self.ready = False  # it replied once: its abort-signal handler is in place

    @property
    def sentinel(self) -> int:
        return int(self.process.sentinel)

    def send(self, kind: int, ident: int = 0, body: bytes | memoryview = b"", meta: bytes = b"") -> None:
        send(self.call_fd, kind, ident, body, meta)

    def alive(self) -> bool:
        """False once the process ended, or is ending: its sentinel is readable before the kernel makes it a
        zombie that ``is_alive()`` (``waitpid``) can see."""
        try:
            if multiprocessing.connection.wait([self.sentinel], 0):
                return False
            return bool(self.process.is_alive())
        except (ValueError, OSError):  # closed
            return False

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signum)

    def abort(self, ident: int) -> None:
        """Interrupt call ``ident`` if it still runs in this worker (``_bootstrap.Aborts``)."""
        with contextlib.suppress(OSError):  # (a dead worker, or a full pipe: then the grace period decides)
            os.write(self.abort_fd, CALL_ID.pack(ident))
        if self.ready:  # (one still starting would die of the signal: it reads the request as the call starts)
            self.signal(ABORT_SIGNAL)

    def kill(self) -> None:
        self.killed = True
        self.signal(signal.SIGKILL)

    def stop(self) -> None:
        """Ask the worker to exit (it finishes nothing: it is idle) and let go of its pipes."""
        self.retiring = True
        with contextlib.suppress(OSError):
            self.send(STOP)
        self.close()
        HOUSEKEEPER.call_later(1.0, reap, self.process)

    def close(self) -> None:
        """Let go of the pipes (the process exits once it reads the end of its input)."""
        for conn in (self._calls, self._replies, self._aborts):
            with contextlib.suppress(OSError):
                conn.close()

    def exitcode(self, timeout: float = 1.0) -> int | None:
        """The worker's exit code once it ended (waiting up to ``timeout`` seconds), else None."""
        with contextlib.suppress(ValueError, AssertionError):
            self.process.join(timeout)
            return self.process.exitcode  # type: ignore[no-any-return]
        return None


def reap(process: Any) -> None:
    """Collect a stopped worker's exit status (no zombie), killing it if it did not exit."""
    with contextlib.suppress(ValueError, AssertionError, OSError):
        process.join(0)
        if process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.join(1.0)


def start_worker(context: Any, init: tuple[Callable[..., object], tuple[Any, ...]] | None, key: object) -> Worker:
    """Start a worker process with ``context``; ``init`` runs in it first (arguments passed at its start)."""
    WARM.watch_exit()
    calls_r, calls_w = context.Pipe(duplex=False)
    replies_r, replies_w = context.Pipe(duplex=False)
    aborts_r, aborts_w = context.Pipe(duplex=False)
    process = context.Process(target=serve, args=(calls_r, replies_w, aborts_r, os.getpid(), init))
    # One start at a time: a start makes the child's ends inheritable until they are closed here, and a worker
    # started meanwhile would keep copies of them (a dead worker's pipe would still have a reader).
    with WARM.start_lock:
        try:
            process.start()
        except BaseException:
            for conn in (calls_w, replies_r, aborts_w):
                conn.close()
            raise
        finally:
            for conn in (calls_r, replies_w, aborts_r):
                conn.close()
    return Worker(process, calls_w, replies_r, aborts_w, key)


class WarmPool:
    """Idle warm workers of this process, handed to the next executor (see the module docstring)."""

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT, most: int = MOST_IDLE) -> None:
        self.idle_timeout = idle_timeout
        self.most = most
        self._lock = threading.Lock()
        self._idle: list[tuple[float, Worker]] = []  # (when it was given back, worker), oldest first
        self._timer_set = False
        self._closed = False
        self._exit_hook_pid = 0  # the process whose multiprocessing exit stops the idle workers
        self.start_lock = threading.Lock()  # workers start one at a time (see start_worker)

    def take(self, key: object) -> tuple[Worker, bool] | None:
        """A live idle worker for an executor whose initializer is ``key``, and whether it must run it."""
        with self._lock:
            dead = [w for _, w in self._idle if not w.alive()]
            if dead:
                self._idle = [(t, w) for t, w in self._idle if w not in dead]
        for worker in dead:  # (outside the lock: collecting an ending process's status may wait a moment)
            worker.close()
            reap(worker.process)
        with self._lock:
            for wanted in (key, None) if key is not None else (None,):
                for i in range(len(self._idle) - 1, -1, -1):  # the most recently used first: its pages are warm
                    worker = self._idle[i][1]
                    if worker.key != wanted:
                        continue
                    del self._idle[i]
                    if worker.alive():
                        return worker, worker.key != key
                    worker.close()
        return None

    def give(self, worker: Worker) -> None:
        """Keep an idle worker for later (or stop it, over the limit or after exit)."""
        stopped: list[Worker] = []
        schedule = False
        with self._lock:
            if self._closed or not worker.alive():
                stopped.append(worker)
            else:
                worker.item = None
                self._idle.append((time.monotonic(), worker))
                while len(self._idle) > self.most:
                    stopped.append(self._idle.pop(0)[1])
                if not self._timer_set:
                    self._timer_set = schedule = True
        for old in stopped:
            old.stop()
        if schedule:
            HOUSEKEEPER.call_later(self.idle_timeout, self._expire)

    def watch_exit(self) -> None:
        """Called as this process starts a worker. A ``multiprocessing`` child process (a task of another
        pool that used an executor) joins its children as it ends, before ``threading``'s exit hooks run:
        the idle workers must stop first, or it waits for them while they wait for it."""
        if self._exit_hook_pid != os.getpid():
            self._exit_hook_pid = os.getpid()
            register_child_exit_hook(self._at_process_end)

    def _at_process_end(self) -> None:
        # In a multiprocessing child, it ends: workers given back later (an executor not waited for) stop too.
        # Elsewhere (a test harness running multiprocessing's finalizers mid-run) only the idle ones stop.
        self._exit_hook_pid = 0  # (a finalizer runs once: registered again at the next start)
        self.stop_all(closing=multiprocessing.parent_process() is not None)

    def idle_pids(self) -> list[int]:
        with self._lock:
            return [w.pid for _, w in self._idle]

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            old = [w for t, w in self._idle if now - t >= self.idle_timeout]
            self._idle = [(t, w) for t, w in self._idle if now - t < self.idle_timeout]
            first = self._idle[0][0] if self._idle else None
            self._timer_set = first is not None
        for worker in old:
            worker.stop()
        if first is not None:
            HOUSEKEEPER.call_later(max(0.0, first + self.idle_timeout - now), self._expire)

    def stop_all(self, closing: bool = False, wait: float = 0.0) -> None:
        """Stop every idle worker now (``closing``: and keep none from now on, at interpreter exit); ``wait``
        seconds at most for them to exit."""
        with self._lock:
            idle, self._idle = [w for _, w in self._idle], []
            self._closed = self._closed or closing
        for worker in idle:
            worker.stop()
        if wait:
            deadline = time.monotonic() + wait
            for worker in idle:
                worker.exitcode(max(0.0, deadline - time.monotonic()))

    def after_fork_in_child(self) -> None:
        """A forked child: the idle workers are the parent's; let go of our copies of their pipes."""
        self._lock = threading.Lock()
        self.start_lock = threading.Lock()
        idle, self._idle = self._idle, []
        self._timer_set = False
        for _, worker in idle:
            worker.close()


#: The key of a worker started for one executor alone: it never goes to the warm pool.
_OWN = object()


class Source:
    """Where an executor's workers come from: the warm pool (shared), or started for it alone (own).

    ``config`` is the pickled :class:`~mmexec._worker.WorkerContext` sent to each
    worker leased (``CONFIG``). A shared worker runs the initializer from an
    ``INIT`` message (``init_blob``, also its key in the warm pool); an own
    worker runs ``init`` as it starts (arguments that only a new process can
    inherit).
    """

    def __init__(self, context: Any, own: bool, init_blob: bytes | None, init: tuple[Any, ...] | None) -> None:
        self.context = context
        self.own = own
        self.init_blob = init_blob
        self.init = init

    def lease(self, config: bytes) -> Worker:
        """A worker for the executor, told its settings (and its initializer, if it must run it)."""
        if self.own:
            worker = start_worker(self.context, self.init, _OWN)
            worker.send(CONFIG, meta=config)
            return worker
        while True:
            got = WARM.take(self.init_blob)
            if got is None:
                worker, needs_init = start_worker(self.context, None, self.init_blob), self.init_blob is not None
                self._configure(worker, config, needs_init)
                return worker
            worker, needs_init = got
            try:
                self._configure(worker, config, needs_init)
            except OSError:  # it died since take() saw it alive: another one
                worker.close()
                HOUSEKEEPER.call_later(0.0, reap, worker.process)
                continue
            return worker

    def _configure(self, worker: Worker, config: bytes, needs_init: bool) -> None:
        worker.served = False
        worker.send(CONFIG, meta=config)
        if needs_init:
            assert self.init_blob is not None
            worker.key = self.init_blob
            worker.send(INIT, body=self.init_blob)

    def give_back(self, worker: Worker) -> None:
        """The executor is done with ``worker``: to the warm pool, or stopped."""
        if self.own or worker.retiring or worker.killed:
            worker.stop()
        else:
            WARM.give(worker)


#: The process's warm pool.
WARM = WarmPool()
os.register_at_fork(after_in_child=WARM.after_fork_in_child)
