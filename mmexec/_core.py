"""An executor's state, the caller's side of it (``put``, ``stop``, ``abort``) and its feeder thread.

The :class:`Core` is shared by a :class:`~mmexec.MemmapExecutor` (which holds
it) and its two threads (which hold it, never the executor, so an executor
dropped without ``shutdown()`` is collected and its threads end once its
calls are done):

* the *feeder* thread pickles calls ahead of the workers
  (:meth:`Core.encode`), at most :data:`AHEAD_PER_WORKER` per worker; while
  pickling is quick the manager does it itself, as a worker needs a call
  (``inline``), and the feeder does not even start;
* the *manager* thread (``_manager``) sends calls, reads replies, sets
  futures and ends everything.

Everything here that both threads and callers touch is guarded by
``Core.lock``; a finalizer (the executor collected) or a signal-free wake-up
writes a byte to a pipe and takes no lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from loky import BrokenProcessPool

from ._base import batch_pickling_error
from ._exit import EXECUTORS, interpreter_exiting
from ._housekeeper import HOUSEKEEPER
from ._pickler import PROTOCOL, encode_task
from ._pool import Source, Worker
from ._records import Call, Task
from ._store import Holds, MemmapStore, Session
from ._worker import WorkerContext

__all__ = ["AHEAD_PER_WORKER", "Core", "WorkItem", "broken_message"]

#: The feeder pickles at most this many calls per worker ahead of the workers.
AHEAD_PER_WORKER = 4


class WorkItem:
    """One call (or ``map`` chunk, or ``Parallel`` batch) on its way, with its future."""

    __slots__ = ("aborted", "batch", "count", "deadline", "future", "holds", "ident", "meta", "payload", "scope",
                 "single", "task", "worker")

    def __init__(self, future: Future[Any], task: Task, scope: Session | None, batch: bool) -> None:
        self.future = future
        self.task: Task | None = task
        self.single = isinstance(task, Call)  # its future gets the call's value, not Outcomes
        self.count = task.count
        self.scope = scope
        self.batch = batch
        self.payload: bytes | None = None
        self.meta: tuple[Any, ...] = ()  # (out-of-band buffers' references, large bytes as persistent ids)
        self.holds: Holds | None = None
        self.ident = 0
        self.worker: Worker | None = None
        self.aborted = False
        self.deadline = math.inf


class AbortRequest:
    __slots__ = ("done", "futures", "grace")

    def __init__(self, futures: frozenset[Future[Any]] | None, grace: float) -> None:
        self.futures, self.grace, self.done = futures, grace, threading.Event()


def broken_message(cause: BaseException | None) -> str:
    return (
        "This executor is broken; create a new MemmapExecutor: it gets fresh worker processes. "
        f"({type(cause).__name__}: {cause})"
    )


class Core:
    """An executor's state, shared with its two threads."""

    def __init__(self, store: MemmapStore, source: Source, settings: WorkerContext, max_workers: int,
                 manager: Callable[[Core], Callable[[], None]]) -> None:
        self.store = store
        self.source = source
        self.settings = settings  # what each worker is told (CONFIG); the folder is filled in at the first lease
        self._config: bytes | None = None
        self.max_workers = max_workers
        self._make_manager = manager
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.feed_cond = threading.Condition(self.lock)
        self.pending: deque[WorkItem] = deque()  # submitted, not yet taken for pickling
        self.burst: deque[WorkItem] = deque()  # taken as one burst, not yet pickled
        self.session = Session()  # the burst's: arrays compared with their dump once
        self.ready: deque[WorkItem] = deque()  # pickled, not yet sent
        self.items: set[WorkItem] = set()  # every item not finished
        self.encoding = 0  # items taken for pickling and not yet in ``ready`` (or dropped)
        self.workers: dict[int, Worker] = {}  # pid -> leased worker
        self.idle: list[Worker] = []  # leased workers running nothing (the manager pops, lease appends)
        self.workers_changed = True  # (the manager rebuilds what it watches)
        self.leasing = 0  # workers being leased (outside the lock)
        self.ended = False  # the manager ended: workers leased from now on go back at once
        self.running: dict[int, WorkItem] = {}  # ident -> item sent (the manager's)
        self.aborts: deque[AbortRequest] = deque()
        self.ahead = AHEAD_PER_WORKER * max_workers
        self.by_reference: dict[int, tuple[Any, bool]] = {}  # functions and classes known to travel by name
        #: The manager pickles the calls itself, as a worker needs one, while that is quick; after one slow
        #: pickle (or a batch: Parallel's), the feeder thread does, ahead of the workers.
        self.inline = True
        self.shutdown = False
        self.gone = False  # the executor was collected without shutdown()
        self.broken: BaseException | None = None
        self.manager: threading.Thread | None = None
        self.feeder: threading.Thread | None = None
        self.feeder_waiting = False
        self.feeder_ended = False  # set as its last act (the manager, once broken, waits for it)
        self.manager_sleeping = False
        self.manager_starving = False  # asleep with an idle worker: wake it when a call can go
        self.closed = False
        self.wake_r = self.wake_w = -1  # the manager's wake-up pipe, made as it starts
        EXECUTORS.add(self)

    # ============================================================ callers
    def put(self, task: Task, scope: Session | None, batch: bool) -> Future[Any]:
        if self.pid != os.getpid():
            raise RuntimeError(
                f"this executor was created in process {self.pid}, and this process is a fork of it: its "
                "workers and files belong to that process. Create a new executor here."
            )
        with self.lock:
            self.check_usable()
            future: Future[Any] = Future()
            item = WorkItem(future, task, scope, batch)
            self.pending.append(item)
            self.items.add(item)
            if batch:
                self.inline = False  # (Parallel: an error must reach the caller while later batches pickle)
            try:
                self.start_threads()
            except BaseException:
                self.pending.remove(item)
                self.items.discard(item)
                raise
            lease = self.needs_worker()
            if not self.inline:
                if self.feeder_waiting:
                    self.feed_cond.notify()
            elif self.manager_starving:  # (the manager pickles: it may send this call now)
                self.manager_starving = False
                self.wake()
        if lease:
            try:
                self.lease_worker()
            except BaseException:
                with self.lock:
                    alone = not self.workers and item in self.pending
                    if alone:
                        self.pending.remove(item)
                        self.items.discard(item)
                if alone:
                    raise
        return future

    def check_usable(self) -> None:
        """(under the lock)"""
        if self.broken is not None:
            raise BrokenProcessPool(broken_message(self.broken)) from None
        if self.shutdown or self.gone:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if interpreter_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def start_threads(self) -> None:
        """Start the manager and the feeder with the first call (under the lock), as the standard library
        starts its manager and queue feeder; a thread that cannot start (interpreter finalization) breaks the
        executor, as there."""
        if self.wake_r < 0:
            self.wake_r, self.wake_w = os.pipe()
            os.set_blocking(self.wake_r, False)
            os.set_blocking(self.wake_w, False)
        for name in ("manager", "feeder"):
            if getattr(self, name) is not None:
                continue
            target = self._make_manager(self) if name == "manager" else self._feed
            thread = threading.Thread(target=target, name=f"mmexec-{name}")
            try:
                thread.start()
            except RuntimeError as exc:
                self.set_broken(BrokenProcessPool(
                    f"the executor's {name} thread could not start ({exc}): the interpreter is shutting down"
                ))
                self.wake()
                raise BrokenProcessPool(broken_message(self.broken)) from exc
            setattr(self, name, thread)

    def needs_worker(self) -> bool:
        """Whether to lease one more worker: calls wait and no worker is idle (as the standard library, at
        most one per call queued); if so, it is counted as coming. Under the lock."""
        if len(self.workers) + self.leasing >= self.max_workers or self.broken is not None or self.ended:
            return False
        if len(self.pending) + len(self.burst) + self.encoding + len(self.ready) <= len(self.idle) + self.leasing:
            return False
        self.leasing += 1
        return True

    def lease_worker(self) -> None:
        """Lease the worker :meth:`needs_worker` counted, outside the lock (it may start a process: meanwhile
        the manager sends calls to the workers it has)."""
        try:
            worker = self.source.lease(self.config())
        except BaseException:
            with self.lock:
                self.leasing -= 1
            raise
        with self.lock:
            self.leasing -= 1
            late = self.ended
            if not late:
                self.workers[worker.pid] = worker
                self.idle.append(worker)
                self.workers_changed = True
        if late:  # (the executor ended meanwhile)
            self.source.give_back(worker)
        else:
            self.wake()  # (the manager watches the new worker, and may send it a call)

    def config(self) -> bytes:
        """The pickled worker settings (``CONFIG``), made at the first lease: it creates the private folder."""
        if self._config is None:
            folder = self.store.folder if self.store.max_nbytes is not None else None
            self._config = pickle.dumps(dataclasses.replace(self.settings, folder=folder), PROTOCOL)
        return self._config

    def stop(self, cancel_futures: bool) -> None:
        with self.lock:
            self.shutdown = True
            dropped: list[WorkItem] = []
            if cancel_futures:  # (cancelled below, outside the lock: cancel() runs the done-callbacks)
                dropped = [*self.pending, *self.burst, *self.ready]
                self.pending.clear()
                self.burst.clear()
                self.ready.clear()
                self.items.difference_update(dropped)
            started = self.manager is not None
            self.feed_cond.notify_all()
        for item in dropped:
            item.future.cancel()
            self.release(item)
        if started:
            self.wake()
        else:
            self.close()

    def executor_gone(self) -> None:
        """The executor was collected without shutdown(): finish the work and end. (A finalizer: takes no lock.)"""
        if self.pid != os.getpid():
            return
        self.gone = True
        if self.manager is not None:
            self.wake()
        else:
            HOUSEKEEPER.post(self._close_unstarted)

    def _close_unstarted(self) -> None:
        with self.lock:
            started = self.manager is not None
        if not started:
            self.close()

    def join(self) -> None:
        """Wait for the executor's threads to end; from one of them (a done-callback), return at once: they
        cannot end before the callback returns."""
        threads = [t for t in (self.feeder, self.manager) if t is not None]
        if threading.current_thread() in threads:
            return
        for thread in threads:
            thread.join()

    def abort(self, futures: Iterable[Future[Any]] | None, grace: float, apply: Callable[[], None]) -> None:
        """Cancel the chosen calls not sent, and have the manager abort the running ones (``apply`` is the
        manager's, for a call from its own thread: a done-callback)."""
        chosen = None if futures is None else frozenset(futures)
        with self.lock:
            targets = [i.future for i in self.items] if chosen is None else list(chosen)
        for fut in targets:
            fut.cancel()  # the ones not sent yet
        manager = self.manager
        if manager is None:
            return
        request = AbortRequest(chosen, grace)
        with self.lock:
            self.aborts.append(request)
        if manager is threading.current_thread():
            apply()
            return
        self.wake()
        while not request.done.wait(0.1):
            if not manager.is_alive():  # the manager finished: nothing of ours runs any more
                return

    def wake(self) -> None:
        """Wake the manager. Safe anywhere: takes no lock."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b"\0")

    # ============================================================ feeder
    def _feed(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self._can_feed():
                        if self._feeder_done():
                            return
                        self.feeder_waiting = True
                        self.feed_cond.wait()
                        self.feeder_waiting = False
                    batch, session = self.take(self.ahead - len(self.ready) - self.encoding)
                for item in batch:
                    ok = self.encode(item, session)
                    with self.lock:
                        self.encoding -= 1
                        if ok and self.broken is None:
                            self.ready.append(item)
                        elif ok:
                            self.release(item)
                    if self.manager_starving:
                        self.manager_starving = False
                        self.wake()
                    del item  # (the loop variable would keep the last call, its future and result, alive)
                del batch
        except BaseException as exc:  # a bug of ours: break the executor rather than leave futures pending
            self.crash(exc)
            raise
        finally:
            self.feeder_ended = True  # (before the wake: a thread still ending may report is_alive() a while)
            self.wake()  # (the manager may wait for the feeder to end)

    def _can_feed(self) -> bool:
        """(under the lock)"""
        if self.broken is not None or self.inline:
            return False
        return bool(self.burst or self.pending) and len(self.ready) + self.encoding < self.ahead

    def _feeder_done(self) -> bool:
        """(under the lock)"""
        if self.broken is not None:
            return True
        stopping = self.shutdown or self.gone or interpreter_exiting()
        return stopping and not self.burst and not self.pending

    def take(self, most: int) -> tuple[list[WorkItem], Session]:
        """Up to ``most`` items to pickle, and their burst's session (under the lock).

        The calls queued when a burst starts form it: each array is compared
        with its dump once for all of them, after the last of them was
        submitted.
        """
        if not self.burst:
            self.session = Session()
            self.burst, self.pending = self.pending, deque()
        batch = [self.burst.popleft() for _ in range(min(most, len(self.burst)))]
        self.encoding += len(batch)
        return batch, self.session

    def encode(self, item: WorkItem, session: Session) -> bool:
        """Pickle an item's task (dumping its arrays); False if it was cancelled or cannot be pickled."""
        if item.future.cancelled():
            self.forget(item)
            return False
        holds = Holds(item.scope or session)
        assert item.task is not None
        try:
            payload, buffers, blobs = encode_task(item.task, self.store, holds, by_reference=self.by_reference)
        except Exception as exc:  # pickling errors belong on the future, as in the stdlib
            holds.release()
            with contextlib.suppress(InvalidStateError):
                item.future.set_exception(batch_pickling_error(exc) if item.batch else exc)
            self.forget(item)
            return False
        item.payload, item.holds, item.meta, item.task = payload, holds, (buffers, blobs), None
        return True

    # ============================================================ breaking
    def set_broken(self, exc: BaseException) -> None:
        """(under the lock)"""
        if self.broken is None:
            self.broken = exc
        self.feed_cond.notify_all()

    def break_(self, exc: BaseException) -> None:
        """A worker died or the calls cannot go on: fail every call not finished, kill the busy workers."""
        with self.lock:
            self.set_broken(exc)
            items = [*self.pending, *self.burst, *self.ready, *self.running.values()]
            self.pending.clear()
            self.burst.clear()
            self.ready.clear()
            self.running.clear()
            workers = list(self.workers.values())
        # (loky's TerminatedWorkerError, a BrokenProcessPool, keeps its type: it says what happened)
        kind = type(exc) if isinstance(exc, BrokenProcessPool) else BrokenProcessPool
        error = kind(broken_message(self.broken))
        error.__cause__ = self.broken
        for item in items:
            with contextlib.suppress(InvalidStateError):
                item.future.set_exception(error)
            self.release(item)
            self.forget(item)
        for worker in workers:
            if worker.item is not None:  # (a retiring worker exits by itself: an initializer's failure flushes
                worker.kill()  # what it logged on a multiprocessing.Queue first)

    def crash(self, exc: BaseException) -> None:
        """A thread of ours failed (a bug): the executor is broken, and no future is left pending."""
        with self.lock:
            self.set_broken(BrokenProcessPool(f"an mmexec thread crashed: {type(exc).__name__}: {exc}"))
            items = list(self.items)
        error = BrokenProcessPool(broken_message(self.broken))
        for item in items:
            with contextlib.suppress(InvalidStateError):
                item.future.set_exception(error)
        self.wake()

    # ============================================================ items
    def release(self, item: WorkItem) -> None:
        """Let go of what an item holds (its files, its lent spares)."""
        holds, item.holds, item.payload = item.holds, None, None
        if holds is not None:
            holds.release()

    def forget(self, item: WorkItem) -> None:
        """An item is finished: it, its arguments and its future are no longer ours to keep."""
        with self.lock:
            self.items.discard(item)
        item.task = item.scope = None
        item.worker = None

    # ============================================================ end
    def close(self) -> None:
        """Delete the executor's files and its wake-up pipe (once its calls are done). Idempotent."""
        if self.closed or self.pid != os.getpid():
            return
        self.closed = True
        self.store.close()
        fds, self.wake_r, self.wake_w = (self.wake_r, self.wake_w), -1, -1  # (first: no wake() writes there)
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        EXECUTORS.discard(self)

    def after_fork_in_child(self) -> None:
        """In a forked child: this executor is the parent's; it refuses work here, touches none of its
        workers, and lets go of the child's copies of their pipes and of its wake-up pipe."""
        self.lock = threading.Lock()
        self.feed_cond = threading.Condition(self.lock)
        self.closed = True
        for worker in list(self.workers.values()):
            worker.close()
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                if fd >= 0:
                    os.close(fd)
        self.wake_r = self.wake_w = -1

    def finish_at_exit(self) -> None:
        """Interpreter exit: let the manager finish the work queued and running (as the standard library)."""
        with self.lock:
            self.feed_cond.notify_all()
            started = self.manager is not None
        if started:
            self.wake()
