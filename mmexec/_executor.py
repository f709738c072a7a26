"""MemmapExecutor: a drop-in ``ProcessPoolExecutor`` that passes large arrays as memory maps.

The shape is CPython's ``concurrent/futures/process.py``: one scheduler (the
manager thread), one future per call. Data flow, in the order the data
travels (each module imports only those before it: ``tests/test_layout.py``)::

    caller            _core                        _manager thread               worker process
    ------            -----                        ---------------               --------------
    submit() -------> pending --> _pickler         ready --> an idle worker ---> _bootstrap.serve:
      a WorkItem and   encode_task: arrays and      of this executor, one call    _worker.handle maps the
      its Future,      large bytes -> _store        at a time, over its own       arguments, runs the call,
      returned at      references (dumped once,     pipes (_wire)                 writes large results into
      once             0600, unlinked at once)                                    the caller's folder
    Future <-------------------------------------- set_result <-- _pickler.decode_result <-- reply

    (pickling runs on the manager while it is quick, else on _core's feeder thread; workers come from
    _pool: the process's warm pool, or started for this executor alone)

Who owns what:

* The caller owns its arrays. The store (``_store``) counts the users of
  each file: the caller's array while it lives, each encoded call, each
  result array mapped from it; a file nobody uses is closed (or kept a
  moment for reuse, ``_spares``, unless a worker still maps it).
* Calls are pickled shortly before a worker needs them, never in ``submit``:
  by the manager itself while that is quick, else by the feeder thread
  (``_core``), a few calls ahead; calls queued together compare each array
  with its dump once.
* The manager thread (``_manager``) owns this executor's workers
  (``_pool``: leased from the process's warm pool): it sends one
  call to an idle worker, reads replies, decodes results, sets futures
  (user callbacks run there, as in the standard library), interrupts and
  kills for ``abort()``, replaces retired workers, and when it ends gives the
  workers back to the process's warm pool and closes the store, deleting
  the executor's folder.
* A worker runs one call at a time for one executor, so aborting, failing or
  killing a call touches no other call.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.context
import multiprocessing.reduction
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from types import FrameType, MappingProxyType
from typing import Any

import cloudpickle
import loky

from ._base import ExecutorBase
from ._compat import caller_frame, forkserver_preload
from ._core import Core
from ._errors import MainGuardError
from ._exit import EXECUTORS, at_exit
from ._manager import manager_for
from ._options import DEFAULT_MAX_NBYTES, parse_max_nbytes, validate_mmap_mode
from ._pickler import PROTOCOL
from ._pool import WARM, Source, loky_context
from ._records import Task
from ._store import MemmapStore, Session
from ._worker import WorkerContext, thread_caps

__all__ = ["MemmapExecutor"]


def _check_main_guard() -> None:
    """Refuse to start workers while a child process re-runs the parent's script.

    multiprocessing's spawn children run the parent's script as ``__mp_main__``;
    an executor created at its top level (no ``if __name__ == "__main__":``
    guard) would start workers in every child, and so on. (mmexec's own
    workers never re-run the script, so this only fires under other pools.)
    """
    frame: FrameType | None = caller_frame(2)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__":
            raise MainGuardError(
                "MemmapExecutor was created while a child process was importing the main "
                f"script {frame.f_globals.get('__file__', '?')!r}: its top-level code runs again "
                "in every child process. Move the code that creates executors or calls "
                'Parallel under `if __name__ == "__main__":`.'
            )
        frame = frame.f_back


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


def _check_grace(grace: object) -> float:
    if isinstance(grace, bool) or not isinstance(grace, (int, float)):
        raise TypeError(f"grace must be a number of seconds (int or float), not {type(grace).__name__}")
    if math.isnan(grace) or grace < 0:
        raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
    return float(grace)


class _ProbePopen:
    """Stands for a process being started while initargs are pickled as for one (see _needs_fork)."""

    DupFd = staticmethod(lambda fd: fd)

    @staticmethod
    def duplicate_for_child(fd: int) -> int:
        return fd


def _inheriting_context(mp_context: Any, initargs: tuple[Any, ...]) -> Any:
    """The context that starts workers able to receive ``initargs`` (locks, queues: passed at their start).

    The one given; else the standard library's default (what
    ``ProcessPoolExecutor`` would use), unless the objects come from a fork
    context it cannot send them to: then fork.
    """
    if mp_context is not None:
        return mp_context
    default = multiprocessing.get_context()
    if default.get_start_method() == "fork":
        return default
    multiprocessing.context.set_spawning_popen(_ProbePopen())  # type: ignore[arg-type]
    try:
        multiprocessing.reduction.ForkingPickler.dumps(initargs)
    except RuntimeError as exc:
        if "fork context" in str(exc):
            return multiprocessing.get_context("fork")
    except Exception:
        pass
    finally:
        multiprocessing.context.set_spawning_popen(None)
    return default


def _context_for_a_loky_worker(context: Any) -> Any:
    """In an mmexec worker (a task making its own executor), the start method is loky's: a standard-library
    spawn or forkserver child would be told to use it, and not know it. Spawn becomes loky's own (a fresh
    interpreter too); the forkserver preloads loky's contexts."""
    if multiprocessing.get_start_method(allow_none=True) not in ("loky", "loky_init_main"):
        return context
    method = context.get_start_method()
    if method == "spawn":
        return loky_context()
    if method == "forkserver":
        modules = forkserver_preload()
        if "loky.backend.context" not in modules:
            context.set_forkserver_preload([*modules, "loky.backend.context"])
    return context


def _finish_all_at_exit() -> None:
    """Interpreter exit: every executor finishes its calls (as the standard library's), then idle workers stop."""
    cores = EXECUTORS.live()
    for core in cores:
        core.finish_at_exit()
    for core in cores:
        core.join()
    WARM.stop_all(closing=True)


at_exit(_finish_all_at_exit)


class MemmapExecutor(ExecutorBase):
    """A drop-in ``ProcessPoolExecutor`` that passes large arrays as memory maps.

    Parameters
    ----------
    max_workers : int, optional
        Number of worker processes (default: the number of CPUs).
    mp_context : optional
        A ``multiprocessing`` context. ``'fork'`` or ``'forkserver'``: this
        executor starts workers of its own that way, so that they inherit the
        caller's state as with ``ProcessPoolExecutor``; they end with it.
        None, ``'spawn'`` or a loky context: warm workers of the process's
        shared pool, which are fresh interpreters as under ``'spawn'``.
    initializer, initargs : optional
        ``initializer(*initargs)`` runs once in each worker before its first
        call for this executor. If it raises, the executor is broken and its
        futures raise ``BrokenProcessPool``. A warm worker that ran one
        initializer is only ever handed to executors with the same one. If
        ``initargs`` hold objects that only new processes can inherit (a
        ``multiprocessing.Queue`` or lock), this executor starts workers of
        its own with them, with a context that can receive them.
    max_tasks_per_child : int, optional
        Replace each worker after it ran this many tasks (a ``map`` chunk is
        one task), as ``ProcessPoolExecutor`` does (Python 3.11 and later),
        to contain code that leaks. The executor's workers are its own
        (``mp_context``'s, else fresh interpreters); ``'fork'`` is refused.
    max_nbytes : int, float, str or None, default '1M'
        Arrays (and ``bytes``, ``bytearray``, out-of-band pickle buffers)
        larger than this many bytes travel through shared memory files;
        ``'1M'`` is 2**20 bytes. None turns that off (memory-mapped arrays
        still travel by reference).
    mmap_mode : {'c', 'r', 'r+', 'w+'}, default 'c'
        How workers open dumped arrays. ``'c'`` (copy-on-write) gives each
        task a private writable view: it may write its arguments, as with
        ``ProcessPoolExecutor``, and the pages it does not write stay shared.
        ``'r'`` makes them read-only. The caller's arrays never change.
    temp_folder : str or path, optional
        Where dumps go. Default: ``$MMEXEC_TEMP_FOLDER``, else ``/dev/shm``,
        else the system temp folder.
    inner_max_num_threads : int, optional
        BLAS/OpenMP threads each worker may use while it runs this executor's
        tasks. Default, as joblib: a thread-count variable the caller set
        (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``...)
        when the executor is made is passed on as it is; the others are the
        number of CPUs divided by ``max_workers`` (at least 1), so that
        workers times threads does not oversubscribe the machine.

    Notes
    -----
    ``submit`` returns at once: arguments are pickled (and large arrays
    dumped) on the executor's feeder thread shortly before the call is sent,
    as ``ProcessPoolExecutor`` does. Each worker runs one call at a time for
    one executor. When the executor shuts down its workers go back to the
    process's warm pool, so the next executor starts warm; idle workers exit
    after 300 s. A worker that dies breaks this executor only.
    :meth:`abort` stops running calls without losing the warm workers.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.2.0 ``mmap_mode`` defaults to ``'c'``; workers are leased, one executor at a time.
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
        mmap_mode: str = "c",
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
        source = _make_source(mp_context, method, initializer, tuple(initargs), max_tasks_per_child)
        caps = thread_caps(inner_max_num_threads, max(1, loky.cpu_count() // max_workers))
        settings = WorkerContext(None, limit, caps, max_tasks_per_child)
        self._max_workers = max_workers
        store = MemmapStore(limit, mode or "r", temp_folder)  # last: nothing to undo after it
        self._core = Core(store, source, settings, max_workers, manager_for)
        self._store = store
        weakref.finalize(self, self._core.executor_gone)

    # --------------------------------------------------------------------- API
    def _put(self, task: Task, scope: Session | None, batch: bool = False) -> Future[Any]:
        return self._core.put(task, scope, batch)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``wait``, return once every queued and running task is done,
        the workers are back in the warm pool and this executor's files are deleted.
        ``cancel_futures`` cancels the tasks not started yet.
        """
        core = self._core
        if core.pid != os.getpid():
            return  # (a fork of the process that made it: nothing here is ours)
        core.stop(cancel_futures)
        if wait:
            core.join()

    def abort(self, futures: Iterable[Future[Any]] | None = None, *, grace: float = 1.0) -> None:
        """Stop tasks now: cancel those not started, interrupt those running.

        ``futures`` picks the tasks (default: all of this executor's). When
        this returns, each chosen future is done: cancelled, or failed with
        :class:`~mmexec.AbortedError` if it had started. Each running task
        gets ``TaskAborted`` raised in its Python code; one still running
        ``grace`` seconds later (stuck in C code) has its worker process
        killed. No other call is touched, and the executor stays usable.

        .. versionadded:: 0.2.0
        """
        core = self._core
        grace = _check_grace(grace)
        if core.pid != os.getpid():
            return  # (a fork of the process that made it: nothing here is ours)
        core.abort(futures, grace, lambda: _apply_aborts_here(core))

    def terminate_workers(self) -> None:
        """Python 3.14's ``terminate_workers``: shut down (cancelling the calls not started) and terminate
        this executor's workers now; running calls fail with ``BrokenProcessPool``.

        .. versionadded:: 0.2.0
        """
        self._force(signal.SIGTERM)

    def kill_workers(self) -> None:
        """Python 3.14's ``kill_workers``: as :meth:`terminate_workers`, with ``SIGKILL``.

        .. versionadded:: 0.2.0
        """
        self._force(signal.SIGKILL)

    def _force(self, signum: int) -> None:
        if self._core.pid != os.getpid():
            return  # (a fork of the process that made it: its workers are the parent's)
        with self._core.lock:
            workers = list(self._core.workers.values())
        self.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.signal(signum)

    def workers(self) -> Mapping[int, Any]:
        """The worker processes serving this executor now: ``{pid: process}`` (a read-only snapshot).

        For monitoring and tests; empty before the first task started them.

        .. versionadded:: 0.2.0
        """
        with self._core.lock:
            return MappingProxyType({pid: w.process for pid, w in self._core.workers.items()})

    # ------------------------------------------------ the standard library's attributes
    @property
    def _processes(self) -> Mapping[int, Any]:
        """The standard library's attribute, read-only: :meth:`workers`."""
        return self.workers()

    @property
    def _executor_manager_thread(self) -> threading.Thread | None:
        """The thread that sends this executor's calls and sets its futures (None before the first
        ``submit``); it ends once the executor is shut down and its work is done."""
        return self._core.manager

    @property
    def _mp_context(self) -> Any:
        """The multiprocessing context that starts this executor's workers."""
        return self._core.source.context

    @property
    def _broken(self) -> str | bool:
        """False, or why the executor is broken."""
        broken = self._core.broken
        return False if broken is None else f"{type(broken).__name__}: {broken}"


def _apply_aborts_here(core: Core) -> None:
    """``abort()`` from the manager thread itself (a done-callback): apply it at once."""
    from ._manager import Manager

    Manager(core).apply_aborts()


def _make_source(
    mp_context: Any, method: str | None, initializer: Callable[..., object] | None, initargs: tuple[Any, ...],
    max_tasks_per_child: int | None,
) -> Source:
    """Where the executor's workers come from (see :class:`~mmexec._pool.Source`)."""
    init = None if initializer is None else (initializer, initargs)
    own = max_tasks_per_child is not None or method in ("fork", "forkserver")
    context = mp_context if method in ("fork", "forkserver") else loky_context()
    if own:
        if max_tasks_per_child is not None and mp_context is None:
            context = multiprocessing.get_context("spawn")  # the standard library's choice with it
        elif max_tasks_per_child is not None:
            context = mp_context
        return Source(_context_for_a_loky_worker(context), True, None, init)
    if init is None:
        return Source(context, False, None, None)
    try:
        blob = cloudpickle.dumps(init, protocol=PROTOCOL)
    except RuntimeError as exc:
        if "inheritance" not in str(exc):  # multiprocessing's assert_spawning
            raise
        # Arguments only a new process can inherit (a multiprocessing.Queue): workers of its own, started with them.
        given = mp_context if method not in (None, "loky", "loky_init_main") else None
        return Source(_context_for_a_loky_worker(_inheriting_context(given, initargs)), True, None, init)
    return Source(context, False, blob, None)
