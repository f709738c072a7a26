"""Pickling across the process boundary, both ways.

Caller side, :func:`encode_task` pickles ``(fn, args, kwargs)`` with
cloudpickle; its ``reducer_override`` hook asks the store for a reference for
every ndarray, wherever it sits, so large arrays travel as a few bytes.

Worker side, :func:`run_task` (the function loky actually runs) rebuilds the
arguments as ``np.memmap`` s, runs the call(s), and encodes the result: large
result arrays are written into the caller's private folder and come back as
references, which the caller maps in :func:`decode_result`.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle
import numpy as np
from loky import BrokenProcessPool

from ._memmap import ArrayRef, backing_memmap, file_offset_of, layout_order, open_ref, open_whole, write_array
from ._store import ArrayStore, Holds, folder_owner, owner_of
from ._tempfolder import create_private_file

__all__ = [
    "WorkerContext",
    "decode_result",
    "encode_task",
    "in_worker",
    "run_calls",
    "run_initializer",
    "run_task",
    "start_worker",
]

Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_PROTOCOL = pickle.HIGHEST_PROTOCOL


# --------------------------------------------------------------------- caller
class _TaskPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with ndarrays swapped for the store's references.

    ``reducer_override`` (unlike ``persistent_id``) is not called for ints,
    floats, strings, lists, tuples and dicts, so large argument lists stay cheap.
    """

    def __init__(
        self, file: io.BytesIO, store: ArrayStore, holds: Holds, load_ref: Callable[[Any], Any] | None = None
    ) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self._store = store
        self._holds = holds
        self._load_ref = _load_ref if load_ref is None else load_ref

    def reducer_override(self, obj: Any) -> Any:  # noqa: D102
        if isinstance(obj, np.ndarray):
            ref = self._store.ref_for(obj, self._holds)
            if ref is not None:
                return self._load_ref, (ref,)
        return super().reducer_override(obj)


def encode_task(
    task: Any, store: ArrayStore, holds: Holds, load_ref: Callable[[Any], Any] | None = None
) -> bytes:
    """Pickle ``task``, swapping arrays for the store's references (kept in ``holds``).

    Unpickling calls ``load_ref(ref)`` for each reference: by default
    :func:`_load_ref`, which maps an :class:`ArrayRef`; another store
    (``mmexec._dask``) passes the function that resolves its own references.
    """
    buf = io.BytesIO()
    _TaskPickler(buf, store, holds, load_ref).dump(task)
    return buf.getvalue()


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """What a worker needs besides the task: where results go, and the initializer."""

    token: str
    folder: str | None
    max_nbytes: int | None
    initializer: bytes | None
    threads: int


class _RemoteTraceback(Exception):
    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _rebuild_exception(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = _RemoteTraceback(tb)
    return exc


_local = threading.local()  # .maps: files mapped while loading one payload


def _load_ref(ref: ArrayRef) -> np.memmap:
    """Unpickling an array reference: map its file (once per payload) and view it."""
    maps: dict[tuple[str, str], np.memmap] | None = getattr(_local, "maps", None)
    key = (ref.path, ref.mode)
    whole = None if maps is None else maps.get(key)
    if whole is None:
        whole = _open_shared(ref)
        if maps is not None:
            maps[key] = whole
    return open_ref(ref, whole)


def _loads(data: bytes) -> Any:
    """Unpickle a payload, mapping each file it refers to once."""
    _local.maps = {}
    try:
        return pickle.loads(data)
    finally:
        _local.maps = None


def _open_shared(ref: ArrayRef) -> np.memmap:
    """Map a file; in the caller, keep it alive as long as the map if a store owns it."""
    whole = open_whole(ref.path, ref.mode)
    store = owner_of(ref.path)
    if store is not None and store.hold(ref.path, mapped=True):
        weakref.finalize(whole, store.release, ref.path, True)
    return whole


def _load_result(ref: ArrayRef) -> np.ndarray:
    """Unpickling a result a worker wrote into the caller's folder."""
    store = folder_owner(os.path.dirname(ref.path)) or owner_of(ref.path)  # our folder, or a lent spare
    if store is None:
        raise RuntimeError(
            f"a task's result was written to {ref.path!r}, but its executor was shut down "
            "and removed that folder before the result arrived"
        )
    return store.open_result(ref)


def decode_result(data: bytes) -> Any:
    """Caller side: rebuild a task's result, mapping the arrays a worker dumped."""
    return _loads(data)


class _EncodedResult:
    """A worker's result; unpickling it in the caller (in loky's thread) decodes it."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return decode_result, (self.data,)


# --------------------------------------------------------------------- worker
class _ResultPickler(cloudpickle.Pickler):  # type: ignore[misc]
    def __init__(self, file: io.BytesIO, ctx: WorkerContext) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self._ctx = ctx

    def reducer_override(self, obj: Any) -> Any:  # noqa: D102
        if isinstance(obj, np.ndarray):
            reduced = self._reduce_array(obj)
            if reduced is not None:
                return reduced
        return super().reducer_override(obj)

    def _reduce_array(self, obj: np.ndarray) -> tuple[Any, tuple[ArrayRef]] | None:
        limit = self._ctx.max_nbytes
        if limit is None or obj.nbytes < limit or obj.size == 0:
            return None
        if obj.dtype.hasobject or type(obj) not in (np.ndarray, np.memmap):
            return None
        mm = backing_memmap(obj)
        if mm is not None and mm.mode != "c":
            path = os.fspath(mm.filename)  # type: ignore[arg-type]
            mode = "r+" if mm.mode in ("r+", "w+") else "r"
            return _load_ref, (ArrayRef(path, obj.dtype, obj.shape, obj.strides, file_offset_of(obj, mm), "C", mode),)
        ref = self._dump(obj)
        return None if ref is None else (_load_result, (ref,))

    def _dump(self, a: np.ndarray) -> ArrayRef | None:
        if self._ctx.folder is None:
            return None
        ref = _write_into_spare(a)
        if ref is not None:
            return ref
        try:
            fd, path = create_private_file(self._ctx.folder)
        except OSError:
            return None
        return _write_result(fd, path, a)  # None if there is no room: then it goes through the pipe


def _write_result(fd: int, path: str, a: np.ndarray) -> ArrayRef | None:
    """Write a result into ``fd`` (then closed); its reference, or None if the write failed."""
    try:
        write_array(fd, path, a)
    except OSError:
        return None
    finally:
        os.close(fd)
    return ArrayRef(path, a.dtype, a.shape, None, 0, layout_order(a), "r+")


#: Freed files of the caller's that the running task may fill with large results, (path, capacity).
_result_spares: list[tuple[str, int]] = []


def _write_into_spare(a: np.ndarray) -> ArrayRef | None:
    """Write ``a`` into a spare lent with this task that it fits well (each is used once)."""
    spare = next((s for s in _result_spares if s[1] // 2 <= a.nbytes <= s[1]), None)
    if spare is None:
        return None
    _result_spares.remove(spare)
    path = spare[0]
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    return _write_result(fd, path, a)


def _encode_result(value: Any, ctx: WorkerContext) -> _EncodedResult:
    buf = io.BytesIO()
    _ResultPickler(buf, ctx).dump(value)
    return _EncodedResult(buf.getvalue())


_initialized: dict[str, BaseException | None] = {}
_in_worker = False
_thread_limit: int | None = None
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                "NUMEXPR_NUM_THREADS")


def in_worker() -> bool:
    """True inside a task run by an mmexec worker (nested Parallel calls then default to sequential)."""
    return _in_worker


def _limit_threads(limit: int) -> None:
    """Cap BLAS/OpenMP threads in this worker so that workers x threads <= CPUs (as joblib).

    Environment variables reach libraries loaded later; libraries already
    loaded are capped through threadpoolctl when it is installed.
    """
    global _thread_limit
    if _thread_limit == limit:
        return
    _thread_limit = limit
    for name in _THREAD_VARS:
        os.environ[name] = str(limit)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=limit)
_watchdog: threading.Thread | None = None
#: How often a worker checks that the process that started it is still alive.
PARENT_CHECK_INTERVAL = 0.5


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_INTERVAL)
    os._exit(1)  # the caller died: nobody wants our results, free our maps now


def _ensure_watchdog(parent: int) -> None:
    """Make this worker exit soon after its parent dies, even in the middle of a task.

    Then loky's resource tracker sees every process gone and removes the
    caller's folder within seconds instead of after the idle timeout.
    ``parent`` is the pid of the process that started the pool, passed by it
    (:func:`start_worker`, every mmexec pool's initializer): ``os.getppid()``
    here would already name init if the caller died while this worker was
    starting.
    """
    global _watchdog
    if _watchdog is None:
        _watchdog = threading.Thread(
            target=_exit_when_orphaned, args=(parent,), name="mmexec-watchdog", daemon=True
        )
        _watchdog.start()


def start_worker(parent: int, init: tuple[str, Callable[..., object], tuple[Any, ...]] | None = None) -> None:
    """loky's initializer for mmexec's pools: runs once as each worker process starts.

    The watchdog must run before the first task: a worker still waiting for
    one when its caller (``parent``) is killed would otherwise live on until
    loky's idle timeout, and keep the caller's folder from being removed.
    ``init`` is ``(token, initializer, initargs)`` for an executor whose
    pool is its own.
    """
    _ensure_watchdog(parent)
    if init is not None:
        run_initializer(*init)
        error = _initialized[init[0]]
        if error is not None:
            # A pool of the executor's own: the worker exits, as in the stdlib, so what the
            # initializer sent (log records on a Queue) is flushed before the pool is broken.
            raise error


def run_initializer(token: str, initializer: Callable[..., object], initargs: tuple[Any, ...]) -> None:
    """Run an executor's initializer in this worker and remember how it went.

    Also the initializer loky runs at process start for an executor with a
    pool of its own. A failure is logged as the stdlib does (``concurrent.futures``
    logger, CRITICAL) and breaks the executor at its first task here.
    """
    try:
        initializer(*initargs)
    except BaseException as exc:
        logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
        _initialized[token] = exc
    else:
        _initialized[token] = None


def _ensure_initialized(ctx: WorkerContext) -> None:
    """Run this executor's initializer once in this worker; fail like the stdlib if it failed."""
    if ctx.token not in _initialized:
        if ctx.initializer is None:
            return
        run_initializer(ctx.token, *pickle.loads(ctx.initializer))
    error = _initialized[ctx.token]
    if error is not None:
        raise BrokenProcessPool(
            "A child process failed to run the executor's initializer; the executor "
            "cannot run tasks. Fix the initializer and create a new executor."
        ) from error


def _read_only_hint(exc: BaseException) -> None:
    if isinstance(exc, ValueError) and "read-only" in str(exc) and hasattr(exc, "add_note"):
        exc.add_note(
            "mmexec passes large arrays to tasks as memory maps opened with mmap_mode='r' "
            "(read-only) by default. Pass mmap_mode='c' for a private writable copy in "
            "each task, or write results into an np.memmap opened with mode 'r+' or 'w+'."
        )


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        _read_only_hint(exc)
        raise


def run_task(payload: bytes, ctx: WorkerContext, spares: list[tuple[str, int]] | None = None) -> _EncodedResult:
    """Run one payload; ``spares`` are freed files of the caller's lent for large results."""
    _result_spares[:] = spares or ()
    try:
        return _run_payload(payload, ctx)
    finally:
        _result_spares.clear()


def _run_payload(payload: bytes, ctx: WorkerContext) -> _EncodedResult:
    """Worker entry point: decode, run, encode.

    A payload is one of

    * ``("call", (fn, args, kwargs))``: returns the value;
    * ``("map", fn, [args, ...])``: returns ``(values, {index: exception})``;
    * ``("chunk", [(fn, args, kwargs), ...])``: returns
      ``[(True, value) | (False, exception), ...]``.

    In a map or a chunk one failing call does not hide the others' results;
    each exception carries the worker's traceback as its ``__cause__``.
    """
    global _in_worker
    _in_worker = True
    _limit_threads(ctx.threads)
    _ensure_initialized(ctx)
    try:
        task = _loads(payload)
    except BaseException as exc:
        # As in ProcessPoolExecutor, a task that cannot be rebuilt in the worker breaks
        # the executor (here without killing the shared worker).
        raise BrokenProcessPool(
            f"A task could not be unpickled in the worker ({type(exc).__name__}: {exc}); the "
            "executor cannot run tasks. Create a new executor, and check that the arguments "
            "can be unpickled in another process (pickle.loads(pickle.dumps(args)))."
        ) from exc
    del payload
    value = run_calls(task)
    del task  # the arguments (and their maps) go before the result is encoded
    return _encode_result(value, ctx)


def run_calls(task: tuple[Any, ...], call: Callable[..., Any] = _call) -> Any:
    """Run a decoded payload (kinds as in :func:`_run_payload`) with ``call(fn, args, kwargs)``."""
    kind = task[0]
    if kind == "call":
        return call(*task[1])
    if kind == "map":
        values: list[Any] = []
        errors: dict[int, _ExceptionWithTraceback] = {}
        for i, args in enumerate(task[2]):
            try:
                values.append(call(task[1], args, {}))
            except Exception as exc:
                values.append(None)
                errors[i] = _ExceptionWithTraceback.of(exc)
        return values, errors
    outcomes: list[tuple[bool, Any]] = []
    for item in task[1]:
        try:
            outcomes.append((True, call(*item)))
        except Exception as exc:
            outcomes.append((False, _ExceptionWithTraceback.of(exc)))
    return outcomes


class _ExceptionWithTraceback:
    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = f'\n"""\n{tb}"""'

    @classmethod
    def of(cls, exc: BaseException) -> _ExceptionWithTraceback:
        return cls(exc, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    def __reduce__(self) -> tuple[Any, tuple[BaseException, str]]:
        return _rebuild_exception, (self.exc, self.tb)
