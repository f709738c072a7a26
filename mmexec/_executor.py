"""MemmapExecutor: a concurrent.futures.Executor that shares large arrays.

Data flow, in the order the data travels (each stage imports only the ones
before it)::

    caller --submit(fn, *args)--> reducer --------> store ------> pool -------> worker
             map(fn, *its)        encode_task       MemmapStore    loky          run_task
                                  cloudpickle,      dumps each     reusable      maps refs as
                                  reducer_override  large array    executor,     np.memmap, runs
                                  swaps arrays      once into a    shared by     fn, dumps large
                                  for ArrayRefs     private 0700   every         results into the
                                                    folder         executor      same folder
    caller <--Future.result()-- decode_result (runs in loky's result thread: maps result files)

Who owns what:

* The caller owns its arrays. The store counts the users of each dump: the
  caller's array while it lives, each pending task, each result mapped from it.
* The executor owns its store and its futures (loky's, which are
  ``concurrent.futures.Future`` s). When a future is done, its task's holds are
  released; a dump nobody holds is deleted at once.
* ``shutdown()`` waits for or cancels this executor's futures, then deletes the
  store's folder. The loky pool is shared and stays warm for the next executor.
* If the parent dies, loky's resource tracker deletes the folder.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_futures
from functools import partial
from types import FrameType
from typing import Any, ParamSpec, TypeVar

import cloudpickle
import loky
from loky import BrokenProcessPool

from ._errors import MainGuardError
from ._options import DEFAULT_MAX_NBYTES, parse_max_nbytes, validate_mmap_mode
from ._reducer import WorkerContext, encode_task, run_task, start_worker
from ._store import Holds, MemmapStore, Session

__all__ = ["MemmapExecutor"]

P = ParamSpec("P")
T = TypeVar("T")

#: Idle workers of the shared pool exit after this many seconds (as joblib).
POOL_IDLE_TIMEOUT = 300
#: map() with chunksize=None cuts the calls into about this many chunks per worker.
_CHUNKS_PER_WORKER = 8


def _check_main_guard() -> None:
    """Refuse to start a pool while a child process re-runs the parent's script.

    multiprocessing's spawn children run the parent's script as ``__mp_main__``;
    an executor created at its top level (no ``if __name__ == "__main__":``
    guard) would start a pool in every child, and so on. (loky's own workers
    never re-run the script, so this only fires under other pools.)
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__":
            raise MainGuardError(
                "MemmapExecutor was created while a child process was importing the main "
                f"script {frame.f_globals.get('__file__', '?')!r}: its top-level code runs again "
                "in every child process. Move the code that creates executors or calls "
                'Parallel under `if __name__ == "__main__":`.'
            )
        frame = frame.f_back


class _Pools:
    """Hands out loky pools: the thread's shared reusable pool whenever that is safe.

    loky keeps one reusable pool per thread and resizes it when asked for
    another size, waiting first for the tasks it runs. So an executor whose
    size differs from that of a live executor still using the shared pool
    (not shut down) gets a pool of its own instead: it never waits for, nor
    resizes, another executor's workers.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[int, int] = {}  # id(shared pool) -> live executors on it
        self._local = threading.local()  # .pool (a weak reference), .size: this thread's shared pool

    def acquire(self, max_workers: int) -> tuple[Any, bool]:
        """A pool for a new executor, and whether it is the executor's own (True) or shared."""
        with self._lock:
            ref = getattr(self._local, "pool", None)
            pool = None if ref is None else ref()
            if pool is not None and self._local.size != max_workers and self._users.get(id(pool), 0):
                return _own_pool(max_workers), True
            return self._shared(max_workers), False

    def replace(self, old: Any, max_workers: int) -> Any:
        """The thread's new shared pool, after another user of loky's pool restarted it."""
        with self._lock:
            self._forget(old)
            return self._shared(max_workers)

    def release(self, pool: Any) -> None:
        with self._lock:
            self._forget(pool)

    def _forget(self, pool: Any) -> None:
        left = self._users.get(id(pool), 0) - 1
        if left > 0:
            self._users[id(pool)] = left
        else:
            self._users.pop(id(pool), None)

    def _shared(self, max_workers: int) -> Any:
        """The thread's shared pool, counted as used by one more executor (called under the lock)."""
        # Always the same options, so loky never restarts the pool for a new executor.
        pool = loky.get_reusable_executor(
            max_workers=max_workers, timeout=POOL_IDLE_TIMEOUT, initializer=start_worker, initargs=(os.getpid(),)
        )
        self._local.pool, self._local.size = weakref.ref(pool), max_workers
        self._users[id(pool)] = self._users.get(id(pool), 0) + 1
        return pool


def _own_pool(max_workers: int, context: Any = None, init: tuple[Any, ...] | None = None) -> Any:
    """A loky pool for one executor alone; ``init`` is ``(token, initializer, initargs)``."""
    return loky.ProcessPoolExecutor(
        max_workers, context=context, initializer=start_worker, initargs=(os.getpid(), init)
    )


_POOLS = _Pools()


class _Lease:
    """An executor's hold on its pool; given back once, by shutdown() or when the executor is dropped."""

    def __init__(self, pool: Any, own: bool, max_workers: int) -> None:
        self.pool = pool
        self.own = own
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._released = False

    def renew(self) -> Any:
        """After another user of loky's reusable pool restarted it: the new one."""
        with self._lock:
            if not self.own and not self._released:
                self.pool = _POOLS.replace(self.pool, self._max_workers)
            return self.pool

    def release(self, wait: bool = False) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        if self.own:
            self.pool.shutdown(wait=wait)
            if wait:
                # Drop it now: its semaphores are unlinked when it is freed, which must not
                # wait for a garbage collection (multiprocessing's tracker would report them).
                self.pool = None
        else:
            _POOLS.release(self.pool)


class MemmapExecutor(Executor):
    """A drop-in ``ProcessPoolExecutor`` that passes large arrays as memory maps.

    Parameters
    ----------
    max_workers : int, optional
        Number of worker processes (default: the number of CPUs).
    mp_context : optional
        Accepted for compatibility with ``ProcessPoolExecutor``; used only to
        start a pool of this executor's own (see ``initargs``). Shared workers
        are always started by loky.
    initializer, initargs : optional
        ``initializer(*initargs)`` runs once in each worker before the first
        task of this executor. If it raises, the executor is broken and its
        futures raise ``BrokenProcessPool``. If ``initargs`` hold objects that
        only new processes can inherit (a ``multiprocessing.Queue``), this
        executor starts a pool of its own with them, shut down with it.
    max_tasks_per_child : None
        Accepted for signature compatibility; only None is supported because
        loky reuses workers across executors.
    max_nbytes : int, float, str or None, default '1M'
        Arrays of at least this many bytes are dumped once and passed as
        memory maps; ``'1M'`` is 2**20 bytes. None turns dumping off
        (memory-mapped arrays still travel by reference).
    mmap_mode : {'r', 'r+', 'w+', 'c'}, default 'r'
        How workers open dumped arrays. ``'c'`` gives each task a private
        writable copy-on-write view.
    temp_folder : str or path, optional
        Where dumps go. Default: ``$MMEXEC_TEMP_FOLDER``, else ``/dev/shm``,
        else the system temp folder.

    Notes
    -----
    All executors of one thread share loky's reusable worker processes, so a
    second executor starts warm. A worker crash breaks that shared pool for
    every executor using it; new executors get a fresh pool.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        max_nbytes: int | float | str | None = DEFAULT_MAX_NBYTES,
        mmap_mode: str = "r",
        temp_folder: str | None = None,
    ) -> None:
        if max_workers is None:
            max_workers = loky.cpu_count()
        elif not isinstance(max_workers, int) or isinstance(max_workers, bool):
            raise TypeError(f"max_workers must be an int or None, not {type(max_workers).__name__}")
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            raise ValueError(
                "max_tasks_per_child is not supported by MemmapExecutor: loky reuses its "
                "workers across executors. Use concurrent.futures.ProcessPoolExecutor "
                "if workers must be replaced after a number of tasks."
            )
        _check_main_guard()
        self._max_workers = max_workers
        self._store = MemmapStore(parse_max_nbytes(max_nbytes), validate_mmap_mode(mmap_mode), temp_folder)
        self._token = secrets.token_hex(8)
        self._init_blob, dedicated = _pickle_initializer(initializer, tuple(initargs))
        self._ctx: WorkerContext | None = None
        self._lock = threading.RLock()
        self._pending: set[Future[Any]] = set()
        self._inflight = 0
        self._shutdown = False
        self._broken: str | bool = False
        # An initializer whose arguments can only be inherited at process start (a
        # multiprocessing.Queue, say) gets a pool of its own, started with them.
        if dedicated is not None:
            pool = _own_pool(max_workers, mp_context, (self._token, *dedicated))
            self._lease = _Lease(pool, True, max_workers)
        else:
            self._lease = _Lease(*_POOLS.acquire(max_workers), max_workers)
        self._finalizer = weakref.finalize(self, _close, self._store, self._lease)

    @property
    def _pool(self) -> Any:
        """The loky pool this executor submits to (None once its own pool was shut down)."""
        return self._lease.pool

    # ------------------------------------------------------------------ API
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; large arrays in the arguments go by memory map."""
        return self._submit(("call", (fn, args, kwargs)), Session())

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[T]:
        """Like ``Executor.map``; ``chunksize=None`` picks a chunk size from the input length.

        Every call is submitted before this returns, and each array is dumped
        at most once for the whole call.
        """
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else timeout + time.monotonic()
        arglists = list(zip(*iterables, strict=False))  # stops at the shortest, as the stdlib
        size = chunksize if chunksize is not None else self._auto_chunksize(len(arglists))
        session = Session()
        if size == 1:
            futures = [self._submit(("call", (fn, args, {})), session) for args in arglists]
        else:
            chunks = [arglists[i : i + size] for i in range(0, len(arglists), size)]
            futures = [self._submit(("map", fn, chunk), session) for chunk in chunks]
        del arglists
        return _iter_results(futures, end, chunked=size != 1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; wait for (or cancel) this executor's tasks; delete its files.

        The shared worker processes stay alive for the next executor.
        """
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for fut in pending:
                fut.cancel()
        if wait:
            wait_futures(pending)
            self._store.close()
            self._lease.release(wait=True)
            return
        if self._lease.own:
            self._lease.release(wait=False)  # its workers finish the queue, then exit
        self._close_if_idle()

    # ------------------------------------------------------------- internal
    def _auto_chunksize(self, n: int) -> int:
        return max(1, math.ceil(n / (self._max_workers * _CHUNKS_PER_WORKER)))

    def _context(self) -> WorkerContext:
        ctx = self._ctx
        if ctx is None:
            limit = self._store.max_nbytes
            folder = None if limit is None else self._store.folder
            threads = max(1, loky.cpu_count() // self._max_workers)
            ctx = self._ctx = WorkerContext(self._token, folder, limit, self._init_blob, threads)
        return ctx

    def _check_usable(self) -> None:
        if self._broken:
            raise BrokenProcessPool(
                f"{self._broken} Create a new MemmapExecutor: it gets a fresh worker pool."
            )
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _submit(self, task: tuple[Any, ...], session: Session) -> Future[Any]:
        with self._lock:
            self._check_usable()
            self._inflight += 1
        holds = Holds(session)
        try:
            try:
                payload = encode_task(task, self._store, holds)
                ctx = self._context()
            except Exception as exc:  # pickling errors belong on the future, as in the stdlib
                holds.release()
                failed: Future[Any] = Future()
                failed.set_exception(exc)
                return failed
            calls = len(task[2]) if task[0] == "map" else len(task[1]) if task[0] == "chunk" else 1
            return self._send(payload, ctx, holds, calls)
        finally:
            with self._lock:
                self._inflight -= 1
            if self._shutdown:
                self._close_if_idle()

    def _send(self, payload: bytes, ctx: WorkerContext, holds: Holds, calls: int = 1) -> Future[Any]:
        spares = self._store.lend_spares(calls)  # freed files for the payload's large results, if any
        if spares:
            holds.spares = (self._store, [path for path, _ in spares])
        try:
            try:
                pool = self._lease.pool
                if pool is None:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                fut: Future[Any] = pool.submit(run_task, payload, ctx, spares or None)
            except BrokenProcessPool as exc:
                self._mark_broken(exc)
                raise
            except RuntimeError:
                if _interpreter_exiting():
                    raise RuntimeError("cannot schedule new futures after interpreter shutdown") from None
                if self._lease.own:
                    raise
                # Another user of loky's reusable pool restarted it: take the new one.
                fut = self._lease.renew().submit(run_task, payload, ctx, spares or None)
        except BaseException:
            holds.release()
            raise
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(partial(self._task_done, holds))
        return fut

    def _task_done(self, holds: Holds, fut: Future[Any]) -> None:
        holds.release()
        if not fut.cancelled():
            exc = fut.exception()
            if isinstance(exc, BrokenProcessPool):
                self._mark_broken(exc)
        with self._lock:
            self._pending.discard(fut)
        if self._shutdown:
            self._close_if_idle()

    def _mark_broken(self, exc: BaseException) -> None:
        with self._lock:
            if not self._broken:
                self._broken = f"This executor is broken ({type(exc).__name__}: {exc})."

    def _close_if_idle(self) -> None:
        with self._lock:
            idle = not self._pending and self._inflight == 0
        if idle:
            self._store.close()
            self._lease.release()  # a shared pool is free to resize once our tasks are done


def _interpreter_exiting() -> bool:
    """True once loky's exit hook ran (it refuses new tasks from then on)."""
    return bool(getattr(loky.process_executor, "_global_shutdown", False)) or sys.is_finalizing()


def _close(store: MemmapStore, lease: _Lease) -> None:
    """An executor dropped without shutdown(): delete its files, give its pool back."""
    store.close()
    lease.release()


def _pickle_initializer(
    initializer: Callable[..., object] | None, initargs: tuple[Any, ...]
) -> tuple[bytes | None, tuple[Callable[..., object], tuple[Any, ...]] | None]:
    """``(blob, None)`` to send the initializer with tasks, or ``(None, (initializer, initargs))``
    when its arguments can only be inherited by new processes."""
    if initializer is None:
        return None, None
    try:
        return cloudpickle.dumps((initializer, initargs)), None
    except RuntimeError as exc:
        if "inheritance" not in str(exc):  # multiprocessing's assert_spawning
            raise
        return None, (initializer, initargs)


def _result_or_cancel(fut: Future[Any], timeout: float | None) -> Any:
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        del fut  # break the cycle through a stored exception's traceback


def _iter_results(futures: list[Future[Any]], end: float | None, chunked: bool) -> Iterator[Any]:
    """Yield results in order; on timeout, error or early close, cancel what is left.

    No local variable keeps a yielded result alive: once the caller drops it,
    it is freed (as in the stdlib).
    """
    futures.reverse()
    try:
        while futures:
            timeout = None if end is None else end - time.monotonic()
            if not chunked:
                yield _result_or_cancel(futures.pop(), timeout)
                continue
            values, errors = _result_or_cancel(futures.pop(), timeout)
            if errors:
                del values[min(errors) :]  # raise at the first failing item
            values.reverse()
            while values:
                yield values.pop()
            if errors:
                raise errors[min(errors)]
    finally:
        for fut in futures:
            fut.cancel()
