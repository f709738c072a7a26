"""The executor skeleton that every mmexec executor shares: a work queue and a manager thread.

The shape is CPython's ``concurrent.futures.process``::

    submit() ----> events (SimpleQueue) ----> manager thread -----------------> backend
      returns      WorkItem: task record,      drains a burst of items,          encode(item)
      its own      future, scope               encodes each when it is sent      send(item) -> inner future
      Future                                   (one content check per array      decode(item) -> Outcomes
                                               per burst), keeps at most
      abort() ---> _Abort ------------------>  ``backend.window`` in flight,
      shutdown() -> _STOP ------------------>  decodes results, sets futures
    inner future done (any thread) -> _Done ->

Who owns what:

* ``submit`` only checks that the executor is usable, queues a
  :class:`WorkItem` and returns a standard ``concurrent.futures.Future``.
  No array is read or written in the caller's thread.
* The manager thread owns the backend: it alone encodes tasks (dumping
  arrays), sends them, decodes results (mapping result files), releases
  what a finished task held, and finally closes the backend. A failure to
  decode one result fails that one future.
* A future stays PENDING (cancellable) until its task is sent, as in the
  standard library, whose call queue holds a few more tasks than workers.
* ``shutdown(wait=True)`` returns once every queued and running task is
  done and the backend is closed. ``abort()`` cancels what was not sent and
  asks the backend to interrupt what runs, then kill it after a grace period.

A backend supplies only its store and its way of sending a payload
(:class:`Backend`): ``MemmapExecutor`` (loky workers, memory maps) and
``DaskExecutor`` (a dask cluster, scattered arrays).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

from loky import BrokenProcessPool

from . import _janitor
from ._errors import AbortedError, FileChangedError, MmexecError
from ._exit import interpreter_exiting, refuse_new_work
from ._records import Batch, Call, Chunk, Outcomes, Task
from ._store import Session

__all__ = ["PACKET_MAX", "Backend", "QueueExecutor", "WorkItem", "finish_work_at_exit", "interpreter_exiting"]

P = ParamSpec("P")
T = TypeVar("T")

#: While aborted tasks still run, the manager looks at them this often (seconds).
_ABORT_POLL = 0.05
#: map() with chunksize=None cuts the calls into about this many chunks per worker.
_CHUNKS_PER_WORKER = 8
#: Most single calls sent together as one packet when many wait (see ``_Core._pack``).
PACKET_MAX = 32

_live_cores: weakref.WeakSet[_Core] = weakref.WeakSet()


def _finish_work_at_exit() -> None:
    """At exit, let every executor finish its queued and running tasks (as the standard library)."""
    refuse_new_work()
    for core in list(_live_cores):
        core.post_stop()
    for core in list(_live_cores):
        core.join()


_exit_hook_after: int | None = None  # id() of the pool our exit hook was last registered after


def finish_work_at_exit(pool: object) -> None:
    """Make :func:`_finish_work_at_exit` run before the exit hook of ``pool``.

    Backends call it once ``pool`` runs: threading's exit hooks run in reverse
    order, and loky registers one each time a pool starts, after which that
    pool refuses new tasks. Registering ours again after it lets queued tasks
    still reach the pool at exit.
    """
    global _exit_hook_after
    if _exit_hook_after == id(pool):
        return
    _exit_hook_after = id(pool)
    hooks = getattr(threading, "_threading_atexits", None)  # partial(function) each, in the order registered
    if isinstance(hooks, list) and not getattr(threading, "_SHUTTING_DOWN", False):
        if hooks and _is_ours(hooks[-1]):
            return  # already the last one registered: it runs first
        hooks[:] = [hook for hook in hooks if not _is_ours(hook)]  # one at most, or the list grows per pool
    try:
        threading._register_atexit(_finish_work_at_exit)  # type: ignore[attr-defined]
    except RuntimeError:  # already exiting
        pass


def _is_ours(hook: object) -> bool:
    """Whether an entry of threading's exit-hook list (a partial, or a lambda on 3.13) is ours."""
    if getattr(hook, "func", None) is _finish_work_at_exit:
        return True  # functools.partial (3.10-3.12)
    for cell in getattr(hook, "__closure__", None) or ():  # lambda: func(*arg, **kwargs) (3.13)
        try:
            if cell.cell_contents is _finish_work_at_exit:
                return True
        except ValueError:  # an empty cell
            pass
    return hook is _finish_work_at_exit


def _after_fork_in_child() -> None:
    """The parent's executors are not this process's: fresh locks, and no work for them at exit."""
    for core in list(_live_cores):
        core.lock = threading.Lock()
        core.closed = True
    _live_cores.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class WorkItem:
    """One task on its way: its record, its future, and what the backend attached to it."""

    __slots__ = (
        "aborted", "batch", "deadline", "future", "holds", "inner", "members", "payload", "scope", "session",
        "single", "slot", "task",
    )

    def __init__(self, future: Future[Any], task: Task, scope: Session | None, batch: bool = False) -> None:
        self.future = future
        self.task = task
        self.scope = scope
        self.batch = batch  # from submit_batch: a task that cannot be pickled fails as joblib's do
        self.session: Session | None = None
        self.payload: Any = None
        self.holds: Any = None
        self.inner: Future[Any] | None = None
        self.slot = -1
        self.aborted = False
        self.deadline = 0.0
        self.members: list[WorkItem] | None = None  # a packet: the submitted calls it carries
        self.single = False  # taken back from a packet: already RUNNING, sent alone


class Backend(Protocol):
    """Where a :class:`QueueExecutor` runs its tasks. All calls come from the manager thread."""

    #: How many tasks are sent at most before the first is done.
    window: int
    #: Most single calls sent together as one task (1: never pack, each call is one task of the pool).
    max_packet: int

    def start(self) -> None:
        """Called in the caller's thread before the first task is queued: start what must run then."""

    def encode(self, item: WorkItem) -> None:
        """Set ``item.payload`` and ``item.holds`` (what the payload keeps alive) from ``item.task``."""

    def send(self, item: WorkItem) -> Future[Any]:
        """Send ``item.payload``; return the future of its run."""

    def decode(self, item: WorkItem) -> Outcomes:
        """The outcomes of a sent item whose run is done; raises what went wrong with the run."""

    def finished(self, item: WorkItem) -> None:
        """Release what ``item`` held (its files, its slot); called once per sent item."""

    def is_fatal(self, exc: BaseException) -> bool:
        """True when ``exc`` (from send or decode) breaks the executor for good."""

    def interrupt(self, item: WorkItem) -> None:
        """Ask the running ``item`` to stop (called again while it runs, until its deadline)."""

    def kill(self, item: WorkItem) -> None:
        """The grace period is over: stop ``item`` by force."""

    def wake(self) -> None:
        """The manager was woken by :meth:`_Core.wake` (releases to apply, say)."""

    def close(self) -> None:
        """Nothing runs any more: free everything. Idempotent."""


@dataclass(frozen=True, slots=True)
class _Done:
    item: WorkItem


@dataclass(frozen=True, slots=True)
class _Abort:
    futures: frozenset[Future[Any]] | None
    grace: float
    processed: threading.Event


_STOP = object()
_WAKE = object()


class _Core:
    """The state shared by an executor and its manager thread (which never holds the executor)."""

    def __init__(self, backend: Backend, broken_hint: str) -> None:
        self.backend = backend
        self.broken_hint = broken_hint
        self.lock = threading.Lock()
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.items: set[WorkItem] = set()  # queued or running, not finished
        self.shutdown = False
        self.broken: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.closed = False
        self.pid = os.getpid()  # a forked child may not use (nor close) its parent's executors
        _live_cores.add(self)

    # -- any thread ------------------------------------------------------
    def put(self, task: Task, scope: Session | None, batch: bool = False) -> Future[Any]:
        if self.pid != os.getpid():
            raise RuntimeError(
                f"this executor was created in process {self.pid}, and this process is a fork of it: its "
                "workers and files belong to that process. Create a new executor here."
            )
        future: Future[Any] = Future()
        item = WorkItem(future, task, scope, batch)
        if self.thread is None:
            with self.lock:
                self.check_usable()
            self.backend.start()  # outside the lock (it may start processes); idempotent
        with self.lock:
            self.check_usable()
            self.items.add(item)
            self.events.put(item)
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="mmexec-manager", daemon=True)
                self.thread.start()
        return future

    def check_usable(self) -> None:
        if self.broken is not None:
            raise self._broken_error()
        if self.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if interpreter_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def stop(self, cancel_futures: bool) -> None:
        with self.lock:
            self.shutdown = True
            futures = self._futures() if cancel_futures else []
        for fut in futures:
            fut.cancel()  # only futures still PENDING (not sent) are cancelled
        self.post_stop()

    def wake(self) -> None:
        """Have the manager call ``backend.wake()`` soon. Safe in a finalizer: takes no lock."""
        self.events.put(_WAKE)

    def post_stop(self) -> None:
        """Ask the manager to finish once all work is done. Safe in a finalizer: takes no lock."""
        if self.thread is not None:
            self.events.put(_STOP)
        else:
            _janitor.post(self._close_unstarted)

    def _close_unstarted(self) -> None:
        with self.lock:
            started = self.thread is not None
        if started:
            self.events.put(_STOP)
        else:
            self._close()

    def join(self, timeout: float | None = None) -> None:
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        elif thread is None:
            self._close_unstarted()

    def abort(self, futures: Iterable[Future[Any]] | None, grace: float) -> None:
        chosen = None if futures is None else frozenset(futures)
        if chosen is None:
            with self.lock:
                targets = self._futures()
        for fut in chosen if chosen is not None else targets:
            fut.cancel()  # the ones not sent yet
        thread = self.thread
        if thread is None:
            return
        event = _Abort(chosen, grace, threading.Event())
        self.events.put(event)
        if thread is threading.current_thread():  # (a user's done-callback runs on the manager)
            return
        while not event.processed.wait(0.1):
            if not thread.is_alive():  # the manager finished: nothing of ours runs any more
                return

    def _futures(self) -> list[Future[Any]]:
        """The futures of the items not finished (called under the lock)."""
        return [item.future for item in self.items if item.future is not None]

    def _close(self) -> None:
        if not self.closed and self.pid == os.getpid():
            self.closed = True
            self.backend.close()
        _live_cores.discard(self)

    # -- manager thread --------------------------------------------------
    def _serve(self) -> None:
        waiting: deque[WorkItem] = deque()
        running: dict[WorkItem, None] = {}
        stopping = False
        try:
            while not (stopping and not waiting and not running):
                events = self._next_events(running)
                burst = Session()  # items queued together share one content check per array
                for event in events:
                    if isinstance(event, WorkItem):
                        event.session = event.scope or burst
                        waiting.append(event)
                    elif isinstance(event, _Done):
                        running.pop(event.item, None)
                        self._finish(event.item, waiting)
                    elif isinstance(event, _Abort):
                        self._abort(event, waiting, running)
                    elif event is _STOP:
                        stopping = True
                    elif event is _WAKE:
                        self.backend.wake()
                del events
                self._tend_aborted(running)
                self._fill(waiting, running)
        except BaseException as exc:  # a bug of ours: fail every future rather than leave one pending
            self._break(exc)
            for item in [*waiting, *running]:
                self._fail(item, self._broken_error())
            raise
        finally:
            self._close()
            self._release_aborts()

    def _release_aborts(self) -> None:
        """The manager is done: wake every abort() still waiting for it."""
        for event in _janitor.drain(self.events):
            if isinstance(event, _Abort):
                event.processed.set()

    def _next_events(self, running: dict[WorkItem, None]) -> list[Any]:
        timeout = _ABORT_POLL if any(item.aborted for item in running) else None
        try:
            events = [self.events.get(timeout=timeout)]
        except queue.Empty:
            return []
        events.extend(_janitor.drain(self.events))
        return events

    def _fill(self, waiting: deque[WorkItem], running: dict[WorkItem, None]) -> None:
        backend = self.backend
        while waiting and len(running) < backend.window:
            item = waiting.popleft()
            if self.broken is not None:
                self._fail(item, self._broken_error())
                continue
            if not item.single and not item.future.set_running_or_notify_cancel():
                self._forget(item)
                continue
            if isinstance(item.task, Call) and not item.single and len(waiting) >= 2 * backend.window:
                in_flight = sum(len(r.members) if r.members else 1 for r in running)
                share = (2 * backend.window - in_flight) // (backend.window - len(running))
                item = self._pack(item, waiting, share)
            try:
                backend.encode(item)
            except Exception as exc:  # pickling errors belong on the future, as in the stdlib
                if item.members:  # find the one that cannot be pickled: send them one by one
                    self._take_back(item.members, waiting)
                else:
                    self._fail(item, _batch_pickling_error(exc) if item.batch else exc)
                continue
            try:
                inner = item.inner = backend.send(item)
            except BaseException as exc:
                backend.finished(item)
                if backend.is_fatal(exc):
                    self._break(exc)
                self._fail(item, exc)
                continue
            running[item] = None
            inner.add_done_callback(_DoneCallback(self.events, item))

    def _pack(self, first: WorkItem, waiting: deque[WorkItem], share: int) -> WorkItem:
        """Many single calls wait (a submit loop): send ``first`` and the next ones of its burst together.

        One packet of up to ``backend.max_packet`` calls travels and runs as one
        task, which spares a round trip per call; each call's future still
        gets its own result. A packet takes about a ``2 * window``-th of what
        waits, so every worker stays busy, and at most ``share`` calls: no more
        than ``2 * window`` calls are in flight in all, so that, as in the
        standard library, most queued futures can still be cancelled.
        """
        size = min(self.backend.max_packet, len(waiting) // (2 * self.backend.window) + 1, share)
        members = [first]
        while len(members) < size and waiting:
            item = waiting[0]
            if not isinstance(item.task, Call) or item.single or item.session is not first.session:
                break
            waiting.popleft()
            if item.future.set_running_or_notify_cancel():
                members.append(item)
            else:
                self._forget(item)
        if len(members) == 1:
            return first
        packet = WorkItem(Future(), Batch([m.task for m in members]), None)  # type: ignore[misc]
        packet.session, packet.members = first.session, members
        packet.future.set_running_or_notify_cancel()
        return packet

    def _finish(self, item: WorkItem, waiting: deque[WorkItem]) -> None:
        """A sent item's run is done: decode, release, set its future (each member's, for a packet)."""
        try:
            outcome: Outcomes | BaseException = self.backend.decode(item)
        except BaseException as exc:
            outcome = exc
            if self.backend.is_fatal(exc):
                self._break(exc)
        self.backend.finished(item)
        item.payload = item.holds = item.inner = None
        if item.members is None:
            self._settle(item, outcome)
        elif isinstance(outcome, FileChangedError):  # one call's file: find it, sending them one by one
            self._take_back(item.members, waiting)
            item.members = None
        elif isinstance(outcome, BaseException):
            for member in item.members:
                self._settle(member, outcome)
        else:
            ran = len(item.members) if outcome.stopped is None else outcome.stopped
            for i, member in enumerate(item.members[:ran]):
                error = outcome.errors.get(i)
                self._settle(member, Outcomes([outcome.values[i]], {} if error is None else {0: error}))
            self._take_back(item.members[ran:], waiting)  # an abort stopped the packet there
            item.members = None
        del outcome

    def _take_back(self, members: list[WorkItem], waiting: deque[WorkItem]) -> None:
        """Members of a packet that did not run (or could not be pickled together): send them again,
        one by one, first; those an abort already finished are dropped."""
        for member in reversed(members):
            if member.future is None or member.future.done():
                self._forget(member)
            else:
                member.single = True
                waiting.appendleft(member)

    def _settle(self, item: WorkItem, outcome: Outcomes | BaseException) -> None:
        """Set ``item``'s future from its outcome, unless it is done already (aborted), and forget it."""
        future = item.future
        with contextlib.suppress(InvalidStateError):
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            elif isinstance(item.task, Call):
                error = outcome.first_error()
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(outcome.values[0])
            else:
                future.set_result(outcome)
        del outcome, future
        self._forget(item)

    def _fail(self, item: WorkItem, exc: BaseException) -> None:
        for target in item.members or [item]:
            with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
                target.future.set_exception(exc)
            self._forget(target)

    def _forget(self, item: WorkItem) -> None:
        with self.lock:
            self.items.discard(item)
        # loky may still hold the inner future, whose callback holds the item: let go of the
        # caller's future (and its result) and arguments now.
        item.future = item.task = item.scope = item.session = None  # type: ignore[assignment]

    def _break(self, exc: BaseException) -> None:
        with self.lock:
            if self.broken is None:
                self.broken = exc

    def _broken_error(self) -> BaseException:
        error: BaseException = BrokenProcessPool(f"{self.broken_hint} ({type(self.broken).__name__}: {self.broken})")
        return error

    def _abort(self, event: _Abort, waiting: deque[WorkItem], running: dict[WorkItem, None]) -> None:
        chosen = event.futures
        for item in list(waiting):
            if chosen is None or item.future in chosen:
                item.future.cancel()
        deadline = time.monotonic() + event.grace
        for item in running:
            if item.aborted:
                continue
            futures = [m.future for m in item.members] if item.members else [item.future]
            hit = [f for f in futures if f is not None and (chosen is None or f in chosen)]
            for fut in hit:
                with contextlib.suppress(InvalidStateError):
                    fut.set_exception(AbortedError("the task was aborted while it ran"))
            if hit:  # a packet's other calls that did not run yet are sent again (see _finish)
                item.aborted, item.deadline = True, deadline
                self.backend.interrupt(item)
        event.processed.set()

    def _tend_aborted(self, running: dict[WorkItem, None]) -> None:
        now = time.monotonic()
        for item in running:
            if item.aborted:
                if now >= item.deadline:
                    self.backend.kill(item)
                    item.deadline = math.inf
                elif item.deadline != math.inf:
                    self.backend.interrupt(item)


def _batch_pickling_error(exc: Exception) -> Exception:
    """A batch whose arguments could not be pickled fails as joblib's do (mmexec's own errors stay)."""
    if isinstance(exc, (MmexecError, OSError)):
        return exc
    error = pickle.PicklingError("Could not pickle the task to send it to the workers.")
    error.__cause__ = exc
    return error


class _DoneCallback:
    """An inner future's done callback: queues the item for the manager, nothing else."""

    __slots__ = ("events", "item")

    def __init__(self, events: queue.SimpleQueue[Any], item: WorkItem) -> None:
        self.events, self.item = events, item

    def __call__(self, _: Future[Any]) -> None:
        self.events.put(_Done(self.item))


class QueueExecutor(Executor):
    """A ``concurrent.futures.Executor`` whose tasks go through a queue to a manager thread.

    Subclasses build a :class:`Backend` and call :meth:`_start`.
    """

    _core: _Core
    _max_workers: int

    def _start(self, backend: Backend, max_workers: int, broken_hint: str) -> None:
        self._max_workers = max_workers
        self._core = _Core(backend, broken_hint)
        self._finalizer = weakref.finalize(self, self._core.post_stop)

    # ------------------------------------------------------------------ API
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` and return its future at once.

        The arguments are pickled later, on the executor's own thread, when
        the task is sent: a task sees each array's contents as of some moment
        between its ``submit`` and its start (as with ``ProcessPoolExecutor``).
        """
        return self._core.put(Call(fn, args, kwargs), None)

    def submit_batch(
        self, calls: Iterable[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]], /, *,
        scope: Session | None = None,
    ) -> Future[Outcomes]:
        """Run several ``(fn, args, kwargs)`` calls as one task; its future gives their outcomes.

        The result has ``.values`` (one per call, None where it failed) and
        ``.errors`` (``{index: exception}``); ``.checked()`` returns the
        values or raises the first error. Batches given the same ``scope``
        (from :meth:`new_scope`) compare each array with its dump only once:
        pass one scope for batches whose arrays the caller does not change in
        between (``Parallel`` uses one per call).

        If the calls cannot be pickled, the future raises
        ``pickle.PicklingError("Could not pickle the task to send it to the
        workers.")`` with the original error as its ``__cause__``, as joblib's
        batches do (``submit`` and ``map`` raise the original error, as the
        standard library's executor does).

        .. versionadded:: 0.2.0
        """
        triples = [(c.fn, c.args, c.kwargs) if isinstance(c, Call) else (*c, {}) if len(c) == 2 else c for c in calls]
        task: Task
        if triples and all(c[0] is triples[0][0] and not c[2] for c in triples):
            task = Chunk(triples[0][0], [c[1] for c in triples])  # (no record per call: Parallel sends thousands)
        else:
            task = Batch([Call(*c) for c in triples])
        return self._core.put(task, scope, batch=True)

    @staticmethod
    def new_scope() -> Session:
        """A scope for :meth:`submit_batch`: see there.

        .. versionadded:: 0.2.0
        """
        return Session()

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Like ``Executor.map``; ``chunksize=None`` picks a chunk size from the input length.

        Every call is queued before this returns, and each array is compared
        with its dump at most once for the whole call. With ``buffersize``
        (Python 3.14's argument), the input is read lazily instead: at most
        ``buffersize`` tasks (of ``chunksize`` calls, 1 by default) are queued
        or running at a time, and one more is queued as each result is
        taken, so an endless or huge input runs in bounded memory.

        .. versionchanged:: 0.2.0 ``buffersize``.
        """
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else timeout + time.monotonic()
        if buffersize is not None:
            return self._map_buffered(fn, iterables, end, chunksize or 1, buffersize)
        arglists = list(zip(*iterables, strict=False))  # stops at the shortest, as the stdlib
        size = chunksize if chunksize is not None else self._default_chunksize(len(arglists))
        scope = Session()
        futures: list[Future[Any]] = []
        try:
            if size == 1:
                futures += [self._core.put(Call(fn, args), scope) for args in arglists]
            else:
                for i in range(0, len(arglists), size):
                    futures.append(self._core.put(Chunk(fn, arglists[i : i + size]), scope))
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        del arglists
        return _iter_results(futures, end, chunked=size != 1)

    def _map_buffered(
        self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], end: float | None, size: int,
        buffersize: int,
    ) -> Iterator[Any]:
        if not isinstance(buffersize, int) or isinstance(buffersize, bool):
            raise TypeError(f"buffersize must be an integer or None, not {type(buffersize).__name__}")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        calls = zip(*iterables, strict=False)
        core = self._core

        def submit_next() -> Future[Any] | None:
            # No shared scope: the caller may change its arrays while it takes results, so each burst
            # compares them again (as separate submits would).
            if size == 1:
                args = next(calls, None)
                return None if args is None else core.put(Call(fn, args), None)
            chunk = list(itertools.islice(calls, size))
            return core.put(Chunk(fn, chunk), None) if chunk else None

        futures: list[Future[Any]] = []
        try:
            while len(futures) < buffersize and (fut := submit_next()) is not None:
                futures.append(fut)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        return _iter_results(futures, end, chunked=size != 1, refill=submit_next)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``wait``, return once every queued and running task is done
        and this executor's files are deleted. ``cancel_futures`` cancels the tasks not started yet.
        """
        core = self._core
        core.stop(cancel_futures)
        if wait:
            core.join()

    def abort(self, futures: Iterable[Future[Any]] | None = None, *, grace: float = 1.0) -> None:
        """Stop tasks now: cancel those not started, interrupt those running.

        ``futures`` picks the tasks (default: all of this executor's). When
        this returns, each chosen future is done: cancelled, or failed with
        :class:`~mmexec.AbortedError` if it had started. Each running task
        gets :class:`~mmexec._worker.TaskAborted` raised in its Python code;
        one still running ``grace`` seconds later (stuck in C code) has its
        worker process killed. The executor stays usable.

        .. versionadded:: 0.2.0
        """
        self._core.abort(futures, grace)

    # ------------------------------------------------------------- internal
    @property
    def _broken(self) -> str | bool:
        """False, or why the executor is broken (the standard library's attribute)."""
        broken = self._core.broken
        return False if broken is None else f"{type(broken).__name__}: {broken}"

    def _default_chunksize(self, n: int) -> int:
        return max(1, math.ceil(n / (self._max_workers * _CHUNKS_PER_WORKER)))


def _result_or_cancel(fut: Future[Any], timeout: float | None) -> Any:
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        del fut  # break the cycle through a stored exception's traceback


def _take(pending: deque[Future[Any]], refill: Callable[[], Future[Any] | None] | None) -> Future[Any]:
    """The next future; with ``refill``, the next task is queued in its place (no local keeps either)."""
    fut = pending.popleft()
    if refill is not None:
        following = refill()
        if following is not None:
            pending.append(following)
    return fut


def _iter_results(
    futures: list[Future[Any]], end: float | None, chunked: bool,
    refill: Callable[[], Future[Any] | None] | None = None,
) -> Iterator[Any]:
    """Yield results in order; on timeout, error or early close, cancel what is left.

    ``refill`` (``map(buffersize=...)``) queues the next task, if any, each
    time one is taken. No local variable keeps a yielded result alive: once
    the caller drops it, it is freed (as in the stdlib).
    """
    pending = deque(futures)
    del futures
    try:
        while pending:
            timeout = None if end is None else end - time.monotonic()
            if not chunked:
                yield _result_or_cancel(_take(pending, refill), timeout)
                continue
            outcomes = _result_or_cancel(_take(pending, refill), timeout)
            values, errors, error = outcomes.values, outcomes.errors, None
            del outcomes
            if errors:
                first = min(errors)
                error = errors[first]
                del values[first:]  # raise at the first failing item
            values.reverse()
            while values:
                yield values.pop()
            if error is not None:
                raise error
    finally:
        for left in pending:
            left.cancel()

