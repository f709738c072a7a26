"""MemmapExecutor: a concurrent.futures.Executor that shares large arrays.

Data flow, in the order the data travels (each stage imports only the ones
before it)::

    caller --submit--> _base: queue --> manager thread --> _pickler ----> _store ------> loky pool --> _worker
                       a WorkItem,      (one per           encode_task:   MemmapStore:   reusable,    run_task: maps
                       its Future       executor) sends    cloudpickle,   dumps each     shared by    refs as memmaps,
                       returned at      at most `window`   arrays ->      large array    every        runs the calls,
                       once             tasks at a time    ArrayRefs      once, 0600     executor     writes big results
    caller <--Future-- manager thread: decode_result (maps result files into the store) <--- bytes <--/

Who owns what:

* The caller owns its arrays. The store counts the users of each dump: the
  caller's array while it lives, each sent task, each result mapped from it.
* The manager thread owns the store and the pool lease (see ``_base``):
  when a task is done its holds are released; a dump nobody holds is
  closed at once (or kept a moment for reuse, ``_spares``).
* ``shutdown()`` waits for this executor's tasks, then deletes the store's
  folder. The loky pool is shared and stays warm for the next executor.
* If the parent dies, loky's resource tracker deletes the folder.
"""

from __future__ import annotations

import mmap
import multiprocessing
import multiprocessing.forkserver
import os
import secrets
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import process as _stdlib_process
from concurrent.futures.process import BrokenProcessPool as _AnyBrokenPool  # loky's subclass it
from concurrent.futures.process import ProcessPoolExecutor as _StdlibPool  # bound at import: see _own_pool
from types import FrameType, MappingProxyType
from typing import Any

import cloudpickle
import loky
import numpy as np
from loky import BrokenProcessPool

from ._base import PACKET_MAX, QueueExecutor, WorkItem, finish_work_at_exit, interpreter_exiting
from ._bootstrap import ABORT_SIGNAL, start_worker
from ._errors import MainGuardError
from ._options import DEFAULT_MAX_NBYTES, parse_max_nbytes, validate_mmap_mode
from ._pickler import decode_result, encode_task
from ._records import Outcomes
from ._store import Holds, MemmapStore, Session
from ._worker import WorkerContext, run_task

__all__ = ["MemmapExecutor"]

#: Idle workers of the shared pool exit after this many seconds (as joblib).
POOL_IDLE_TIMEOUT = 300
#: Pools in which an abort killed a worker: the BrokenProcessPool that follows breaks no executor.
_KILLED_POOLS: weakref.WeakSet[Any] = weakref.WeakSet()


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


def _own_pool(
    max_workers: int, context: Any = None, init: tuple[Any, ...] | None = None, stdlib: bool = False,
    max_tasks_per_child: int | None = None,
) -> Any:
    """A pool for one executor alone; ``init`` is ``(initializer, initargs)``, run as each worker starts.

    A loky pool, or with ``stdlib`` the standard library's own
    ``ProcessPoolExecutor``: for a ``fork`` or ``forkserver`` context, whose
    workers inherit the caller's state as the user asked, and for
    ``max_tasks_per_child``, which only the standard library's pool honours.
    (``_StdlibPool`` is the class bound when mmexec was imported: a user's
    ``sitecustomize`` may have installed ``MemmapExecutor`` under the standard
    library's name since.)
    """
    initargs = (os.getpid(), init)
    if stdlib:
        extra = {} if max_tasks_per_child is None else {"max_tasks_per_child": max_tasks_per_child}
        context = _context_for_a_loky_worker(context, max_tasks_per_child)
        return _StdlibPool(
            max_workers, mp_context=context, initializer=start_worker, initargs=initargs, **extra
        )
    return loky.ProcessPoolExecutor(max_workers, context=context, initializer=start_worker, initargs=initargs)


def _context_for_a_loky_worker(context: Any, max_tasks_per_child: int | None) -> Any:
    """In a loky worker (a task making its own executor), a standard-library pool's children must find loky.

    Its start method there is loky's, which spawn and forkserver children
    are told to set but do not know: the forkserver preloads loky's contexts,
    and ``max_tasks_per_child`` without a context (spawn elsewhere) starts its
    workers with loky's own method, a fresh interpreter as spawn's.
    """
    if multiprocessing.get_start_method(allow_none=True) not in ("loky", "loky_init_main"):
        return context
    if context is None and max_tasks_per_child is not None:
        return loky.backend.context.get_context("loky")
    if context is not None and context.get_start_method() == "forkserver":
        preload = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_preload_modules", None)
        modules = list(preload) if isinstance(preload, list) else []
        if "loky.backend.context" not in modules:
            context.set_forkserver_preload([*modules, "loky.backend.context"])
    return context


def _start_stdlib_pool(pool: Any) -> None:
    """Start a standard-library pool's workers now, as its first ``submit`` would (they show in ``_processes``
    as soon as the caller's first ``submit`` returns, as with ``ProcessPoolExecutor``).

    With ``fork`` every worker starts; otherwise one, counted as idle so that
    the first task sent runs on it instead of starting another. (Reads the
    pool's private state, the same from Python 3.10 to 3.14.)
    """
    try:
        lock, idle = pool._shutdown_lock, pool._idle_worker_semaphore
        dynamic = pool._safe_to_dynamically_spawn_children
    except AttributeError:  # another layout: the pool starts its workers at the first task
        return
    with lock:
        if pool._broken or pool._shutdown_thread or interpreter_exiting() or _interpreter_exiting():
            return
        if dynamic and not pool._processes:
            pool._adjust_process_count()  # no worker is idle yet: starts one
            idle.release()
        pool._start_executor_manager_thread()


def _shutdown_soon(pool: Any) -> None:
    """Shut a broken pool down without waiting here.

    A standard-library pool is shut down with ``wait=True`` on a thread of
    its own: before Python 3.14, ``shutdown(wait=False)`` empties its
    ``_processes`` while its manager thread may still replace a worker that
    ended (``max_tasks_per_child``), which kills that thread and leaves its
    futures pending (CPython gh-132969).
    """
    if isinstance(pool, _StdlibPool):
        threading.Thread(target=pool.shutdown, kwargs={"wait": True}, name="mmexec-pool-shutdown", daemon=True).start()
    else:
        pool.shutdown(wait=False)


def _is_broken(pool: Any) -> bool:
    """Whether a loky or standard-library pool is broken (a worker died)."""
    return bool(getattr(pool, "_broken", False) or getattr(getattr(pool, "_flags", None), "broken", None))


def _start_method(mp_context: Any) -> str | None:
    """The start method of ``mp_context`` (None for None), or a TypeError naming what was given."""
    if mp_context is None:
        return None
    get = getattr(mp_context, "get_start_method", None)
    if not callable(get):
        raise TypeError(
            "mp_context must be a multiprocessing context, such as multiprocessing.get_context('forkserver'), "
            f"not {type(mp_context).__name__}"
        )
    method: str = get(allow_none=False)
    return method


def _check_max_tasks_per_child(max_tasks_per_child: object, method: str | None) -> None:
    """Refuse what the standard library refuses, with its messages."""
    if max_tasks_per_child is None:
        return
    if sys.version_info < (3, 11):
        raise TypeError(
            "max_tasks_per_child needs Python 3.11 or later, as concurrent.futures.ProcessPoolExecutor's; "
            f"this is Python {sys.version_info.major}.{sys.version_info.minor}"
        )
    if not isinstance(max_tasks_per_child, int) or isinstance(max_tasks_per_child, bool):
        raise TypeError("max_tasks_per_child must be an integer")
    if max_tasks_per_child <= 0:
        raise ValueError("max_tasks_per_child must be >= 1")
    if method == "fork":
        raise ValueError(
            "max_tasks_per_child is incompatible with the 'fork' multiprocessing start method; "
            "supply a different mp_context."
        )


_POOLS = _Pools()


def _after_fork_in_child() -> None:
    """A forked child starts its own pools: its parent's loky pool (and its workers) are not the child's."""
    _POOLS.__init__()  # type: ignore[misc]
    storage = getattr(getattr(loky, "reusable_executor", None), "_executor_storage", None)
    if storage is not None:  # loky keeps this thread's reusable pool here; forget the parent's
        storage.executor = storage.executor_kwargs = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Lease:
    """An executor's hold on its pool; given back once, by shutdown() or when the executor is dropped."""

    def __init__(self, pool: Any, own: bool, max_workers: int, rebuild: Callable[[], Any] | None = None) -> None:
        self.pool = pool
        self.own = own
        self._max_workers = max_workers
        self._rebuild = rebuild  # an own pool's factory, for a fresh one after an abort killed a worker
        self._lock = threading.Lock()
        self._released = False

    def renew(self) -> Any:
        """After another user of loky's reusable pool restarted it, or an abort broke it: the new one.

        Called on the executor's manager thread, whose loky reusable pool would be a new one nobody
        shares: the executor gets a pool of its own instead, shut down with it.
        """
        with self._lock:
            if self._released:
                return self.pool
            if not self.own:
                _POOLS.release(self.pool)
                self.own = True
                self.pool = _own_pool(self._max_workers)
            elif self.pool in _KILLED_POOLS or _is_broken(self.pool):
                _shutdown_soon(self.pool)
                self.pool = (self._rebuild or (lambda: _own_pool(self._max_workers)))()
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




class _AbortTable:
    """One row per task in flight, shared with the workers: ``[pid running it, abort flag]``.

    A memfd (no file anywhere), which workers map as ``/proc/<caller>/fd/<n>``.
    """

    def __init__(self, slots: int) -> None:
        self.fd = os.memfd_create("mmexec-abort", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, slots * 16)
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        self._map = mmap.mmap(self.fd, slots * 16)
        self.rows: Any = np.frombuffer(self._map, dtype=np.int64).reshape(slots, 2)
        self._free = list(range(slots - 1, -1, -1))

    def take(self) -> int:
        slot = self._free.pop()
        self.rows[slot] = 0
        return slot

    def give(self, slot: int) -> None:
        self.rows[slot] = 0
        self._free.append(slot)

    def close(self) -> None:
        self.rows = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere: the map goes with it
            pass
        os.close(self.fd)


class _PoolKilledByAbort(BrokenProcessPool):  # type: ignore[misc]
    """A task's worker was killed by an abort (this executor's or another's on the same pool)."""


class _MemmapBackend:
    """Runs tasks on a loky pool; arrays go through a :class:`MemmapStore` (see ``_base.Backend``)."""

    def __init__(
        self, store: MemmapStore, lease: _Lease, token: str, init_blob: bytes | None, workers: int,
        threads: int | None = None, max_packet: int = PACKET_MAX,
    ) -> None:
        self.store = store
        self.lease = lease
        self.window = 2 * workers + 1
        self.max_packet = max_packet
        self._token = token
        self._init_blob = init_blob
        self._workers = workers
        self._threads = threads
        self._ctx: WorkerContext | None = None
        self._table: _AbortTable | None = None
        self._pools: dict[int, Any] = {}  # slot -> the pool its task was sent to
        self._signalled: set[int] = set()
        self._closed = False

    def _context(self) -> WorkerContext:
        ctx = self._ctx
        if ctx is None:
            limit = self.store.max_nbytes
            folder = None if limit is None else self.store.folder
            threads = self._threads or max(1, loky.cpu_count() // self._workers)
            self._table = _AbortTable(self.window)
            ctx = self._ctx = WorkerContext(self._token, folder, limit, self._init_blob, threads, self._table.path)
        return ctx

    def start(self) -> None:
        """Start the pool's workers and loky's thread now, in the caller's thread (loky registers its
        exit hook then, before ours: see ``_base.finish_work_at_exit``)."""
        pool = self.lease.pool
        if isinstance(pool, _StdlibPool):
            _start_stdlib_pool(pool)
        flags = getattr(pool, "_flags", None)
        ensure_running = getattr(pool, "_ensure_executor_running", None)
        if flags is not None and ensure_running is not None:
            with flags.shutdown_lock:  # as loky's submit does
                if flags.broken is None and not flags.shutdown and not interpreter_exiting():
                    ensure_running()
        finish_work_at_exit(pool)

    def encode(self, item: WorkItem) -> None:
        holds = Holds(item.session or Session())
        try:
            item.payload = encode_task(item.task, self.store, holds)
        except BaseException:
            holds.release()
            raise
        item.holds = holds

    def send(self, item: WorkItem) -> Future[Any]:
        ctx = self._context()
        assert self._table is not None
        spares = self.store.lend_spares(item.task.count)  # freed files for the task's large results
        if spares:
            item.holds.spares = (self.store, [path for path, _ in spares])
        item.slot = self._table.take()
        pool = self.lease.pool
        if pool is None:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if pool in _KILLED_POOLS:
            pool = self.lease.renew()
        args = (run_task, item.payload, ctx, spares or None, item.slot)
        try:
            inner: Future[Any] = pool.submit(*args)
        except RuntimeError as exc:  # (BrokenProcessPool is a RuntimeError too)
            pool = self._replacement(pool, exc)
            inner = pool.submit(*args)
        self._pools[item.slot] = pool
        finish_work_at_exit(pool)
        return inner

    def _replacement(self, pool: Any, exc: RuntimeError) -> Any:
        """The pool to send to after ``pool.submit`` raised ``exc``, or ``exc`` raised again.

        A pool broken by an abort's kill, or a shared pool another user of loky
        restarted, is replaced; a pool broken otherwise, or the interpreter
        exiting, is final.
        """
        if isinstance(exc, _AnyBrokenPool):
            if pool not in _KILLED_POOLS:
                raise exc
        elif interpreter_exiting() or _interpreter_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown") from None
        elif self.lease.own:
            raise exc
        return self.lease.renew()

    def decode(self, item: WorkItem) -> Outcomes:
        inner = item.inner
        assert inner is not None
        exc = inner.exception()
        if exc is not None:
            broken = isinstance(exc, _AnyBrokenPool)
            if broken:  # a worker died, maybe while writing a result file
                self.store.sweep_partial_results()
            if broken and self._pools.get(item.slot) in _KILLED_POOLS:
                raise _PoolKilledByAbort(
                    "the worker running this task was killed by MemmapExecutor.abort() (of this executor or "
                    "another one sharing the worker pool) after its grace period; the executor moves to a "
                    "fresh pool and stays usable"
                ) from exc
            raise exc
        outcomes: Outcomes = decode_result(inner.result(), self.store)
        return outcomes

    def finished(self, item: WorkItem) -> None:
        if item.holds is not None:
            item.holds.release()
        if item.slot >= 0 and self._table is not None:
            self._table.give(item.slot)
            self._pools.pop(item.slot, None)
            self._signalled.discard(item.slot)
        item.slot = -1

    def is_fatal(self, exc: BaseException) -> bool:
        return isinstance(exc, _AnyBrokenPool) and not isinstance(exc, _PoolKilledByAbort)

    def wake(self) -> None:
        self.store.apply_releases()

    def _running_pid(self, item: WorkItem) -> int:
        """The pid of the worker running ``item`` (0 if none does yet), checked to be one of its pool's."""
        if self._table is None or item.slot < 0:
            return 0
        pid = int(self._table.rows[item.slot, 0])
        processes = getattr(self._pools.get(item.slot), "_processes", None) or {}
        return pid if pid in processes else 0

    def interrupt(self, item: WorkItem) -> None:
        if self._table is None or item.slot < 0:
            return
        self._table.rows[item.slot, 1] = 1  # first the flag, then the pid: a worker starting now sees it
        pid = self._running_pid(item)
        if pid and item.slot not in self._signalled:
            self._signalled.add(item.slot)
            try:
                os.kill(pid, ABORT_SIGNAL)
            except ProcessLookupError:
                pass
        elif not pid and item.inner is not None:
            item.inner.cancel()  # still queued in loky: it never starts

    def kill(self, item: WorkItem) -> None:
        pid = self._running_pid(item)
        if pid:
            _KILLED_POOLS.add(self._pools[item.slot])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.store.close()
        self.lease.release(wait=True)
        if self._table is not None:
            self._table.close()


class MemmapExecutor(QueueExecutor):
    """A drop-in ``ProcessPoolExecutor`` that passes large arrays as memory maps.

    Parameters
    ----------
    max_workers : int, optional
        Number of worker processes (default: the number of CPUs).
    mp_context : optional
        A ``multiprocessing`` context. ``'fork'`` or ``'forkserver'``: this
        executor starts workers of its own that way (a standard-library
        process pool, shut down with the executor), so that they inherit the
        caller's state as with ``ProcessPoolExecutor``. None, ``'spawn'`` or a
        loky context: the shared warm loky workers, which are fresh
        interpreters as under ``'spawn'``.
    initializer, initargs : optional
        ``initializer(*initargs)`` runs once in each worker before the first
        task of this executor. If it raises, the executor is broken and its
        futures raise ``BrokenProcessPool``. If ``initargs`` hold objects that
        only new processes can inherit (a ``multiprocessing.Queue``), this
        executor starts a pool of its own with them, shut down with it.
    max_tasks_per_child : int, optional
        Replace each worker after it ran this many tasks (a ``map`` chunk is
        one task), as ``ProcessPoolExecutor`` does (Python 3.11 and later),
        to contain code that leaks. The executor then starts a
        standard-library pool of its own (``'spawn'`` unless ``mp_context``
        says otherwise; ``'fork'`` is refused): it starts cold, and the shared
        warm pool is untouched.
    max_nbytes : int, float, str or None, default '1M'
        Arrays larger than this many bytes are dumped once and passed as
        memory maps; ``'1M'`` is 2**20 bytes. None turns dumping off
        (memory-mapped arrays still travel by reference).
    mmap_mode : {'r', 'r+', 'w+', 'c'}, default 'r'
        How workers open dumped arrays. ``'c'`` gives each task a private
        writable copy-on-write view.
    temp_folder : str or path, optional
        Where dumps go. Default: ``$MMEXEC_TEMP_FOLDER``, else ``/dev/shm``,
        else the system temp folder.
    inner_max_num_threads : int, optional
        BLAS/OpenMP threads each worker may use while it runs this executor's
        tasks. Default: the number of CPUs divided by ``max_workers`` (at
        least 1), so that workers times threads does not oversubscribe the
        machine, as joblib does.

    Notes
    -----
    ``submit`` returns at once: arguments are pickled (and large arrays
    dumped) on the executor's own thread when the task is sent, as
    ``ProcessPoolExecutor`` does. All executors of one thread share loky's
    reusable worker processes, so a second executor starts warm. A worker
    crash breaks that shared pool for every executor using it; new executors
    get a fresh pool. :meth:`abort` stops running tasks without losing the
    warm workers.

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
        inner_max_num_threads: int | None = None,
    ) -> None:
        if max_workers is None:
            max_workers = loky.cpu_count()
        elif not isinstance(max_workers, int) or isinstance(max_workers, bool):
            raise TypeError(f"max_workers must be an int or None, not {type(max_workers).__name__}")
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if inner_max_num_threads is not None and (
            not isinstance(inner_max_num_threads, int) or isinstance(inner_max_num_threads, bool)
            or inner_max_num_threads < 1
        ):
            raise ValueError(f"inner_max_num_threads must be a positive int or None, got {inner_max_num_threads!r}")
        method = _start_method(mp_context)
        _check_max_tasks_per_child(max_tasks_per_child, method)
        _check_main_guard()
        mode = validate_mmap_mode(mmap_mode)
        limit = None if mode is None else parse_max_nbytes(max_nbytes)  # mmap_mode=None: no maps (as joblib)
        self._store = MemmapStore(limit, mode or "r", temp_folder)
        token = secrets.token_hex(8)
        # fork and forkserver workers inherit state from the caller, as the user asked, and only the
        # standard library's pool replaces workers after max_tasks_per_child tasks: such an executor
        # gets a standard-library pool of its own, which runs its initializer as each worker starts.
        stdlib = max_tasks_per_child is not None or method in ("fork", "forkserver")
        if stdlib:
            init_blob, dedicated = None, (None if initializer is None else (initializer, tuple(initargs)))
        else:
            init_blob, dedicated = _pickle_initializer(initializer, tuple(initargs))
        # An initializer whose arguments can only be inherited at process start (a
        # multiprocessing.Queue, say) gets a pool of its own, started with them.
        if stdlib or dedicated is not None:

            def rebuild() -> Any:
                return _own_pool(max_workers, mp_context, dedicated, stdlib, max_tasks_per_child)

            lease = _Lease(rebuild(), True, max_workers, rebuild)
        else:
            lease = _Lease(*_POOLS.acquire(max_workers), max_workers)
        backend = _MemmapBackend(
            self._store, lease, token, init_blob, max_workers, inner_max_num_threads,
            max_packet=1 if max_tasks_per_child is not None else PACKET_MAX,  # the pool counts tasks, not calls
        )
        self._backend = backend
        self._context_used = getattr(lease.pool, "_mp_context", None) or getattr(lease.pool, "_context", None)
        self._start(backend, max_workers, "This executor is broken; create a new MemmapExecutor: it gets a fresh "
                    "worker pool.")
        self._store.waker = self._core.wake  # releases posted by finalizers are applied by the manager

    @property
    def _pool(self) -> Any:
        """The loky pool this executor submits to (None once its own pool was shut down)."""
        return self._backend.lease.pool

    def workers(self) -> Mapping[int, Any]:
        """The worker processes serving this executor now: ``{pid: process}`` (a read-only snapshot).

        They are loky's processes, shared with the other executors of this
        thread unless this one has a pool of its own. For monitoring and
        tests; empty before the first task started them.

        .. versionadded:: 0.2.0
        """
        processes = getattr(self._pool, "_processes", None) or {}
        return MappingProxyType(dict(processes))

    @property
    def _processes(self) -> Mapping[int, Any]:
        """The standard library's attribute, read-only: :meth:`workers`."""
        return self.workers()

    @property
    def _executor_manager_thread(self) -> threading.Thread | None:
        """The standard library's attribute: the thread that sends this executor's tasks and sets its futures
        (None before the first ``submit``); it ends once the executor is shut down and its work is done."""
        return self._core.thread

    @property
    def _mp_context(self) -> Any:
        """The standard library's attribute: the multiprocessing context that starts this executor's workers."""
        return self._context_used

    def terminate_workers(self) -> None:
        """Python 3.14's ``terminate_workers``, for a shared pool: stop this executor's tasks and shut it down.

        Tasks not started are cancelled; running ones are interrupted, and
        the worker of one still running a second later is killed. Then the
        executor shuts down. Workers idle or running other executors' tasks
        are left alone: loky's shared pool keeps serving them (a killed
        worker does break the tasks of other executors running on that pool
        at that moment; they fail with ``BrokenProcessPool``, and those
        executors move to a fresh pool).

        .. versionadded:: 0.2.0
        """
        self._stop_now(grace=1.0)

    def kill_workers(self) -> None:
        """Python 3.14's ``kill_workers``: as :meth:`terminate_workers`, but the workers running this
        executor's tasks are killed at once, without waiting for the tasks to stop.

        .. versionadded:: 0.2.0
        """
        self._stop_now(grace=0.0)

    def _stop_now(self, grace: float) -> None:
        self._core.stop(cancel_futures=True)  # refuse new work first, then stop what is running
        self.abort(grace=grace)
        self._core.join()


def _interpreter_exiting() -> bool:
    """True once loky's or the standard library's exit hook ran (they refuse new tasks from then on)."""
    return (
        bool(getattr(loky.process_executor, "_global_shutdown", False))
        or bool(getattr(_stdlib_process, "_global_shutdown", False))
        or sys.is_finalizing()
    )


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


