"""Worker side of the process boundary: run a payload, send the result back.

:func:`run_task` is the function loky runs. It unpickles the task record
(arrays come back as ``np.memmap`` s of the caller's files), runs its calls,
and returns the pickled :class:`~mmexec._records.Outcomes` as bytes: large
result arrays are written into the caller's private folder (or into a freed
file it lent) and travel as references. The caller decodes those bytes on
its own thread (``_pickler.decode_result``).

Abort: each task is given a slot in its executor's small shared table. The
worker writes its pid there while the task runs; to interrupt the task, the
caller sets the slot's flag and sends :data:`ABORT_SIGNAL`. The handler
(installed by ``_bootstrap.start_worker`` in every mmexec worker) raises
:class:`TaskAborted` only while that very task runs, so a late signal never
hits the next task or loky's own loop.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures.process import _RemoteTraceback
from dataclasses import dataclass
from types import FrameType
from typing import Any

import cloudpickle
import numpy as np
from loky import BrokenProcessPool

from ._bootstrap import ABORT_SIGNAL
from ._errors import FileChangedError
from ._memmap import ArrayRef, backing_memmap, file_offset_of, layout_order, write_array
from ._pickler import PROTOCOL, load_ref, load_result, loads
from ._records import Batch, Call, Outcomes, Task
from ._tempfolder import create_private_file

__all__ = [
    "ABORT_SIGNAL",
    "TaskAborted",
    "WorkerContext",
    "in_worker",
    "on_abort_signal",
    "run_calls",
    "run_initializer",
    "run_task",
]



@dataclass(frozen=True, slots=True)
class WorkerContext:
    """What a worker needs besides the task: where results go, the initializer, the abort table."""

    token: str
    folder: str | None
    max_nbytes: int | None
    initializer: bytes | None
    threads: int
    table: str | None = None  # the executor's abort table, ``/proc/<caller>/fd/<n>``


class TaskAborted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an ordinary error
    """Raised inside a task whose caller aborted it (``MemmapExecutor.abort``)."""


# --------------------------------------------------------------- results
class _ResultPickler(cloudpickle.Pickler):  # type: ignore[misc]
    def __init__(self, file: io.BytesIO, ctx: WorkerContext) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self._ctx = ctx

    def reducer_override(self, obj: Any) -> Any:  # noqa: D102
        if isinstance(obj, np.ndarray):
            reduced = self._reduce_array(obj)
            if reduced is not None:
                return reduced
            if type(obj) is np.memmap:  # a small view of a map: its values, as a plain ndarray (as joblib)
                return np.array(obj).__reduce_ex__(PROTOCOL)
        return super().reducer_override(obj)

    def _reduce_array(self, obj: np.ndarray) -> tuple[Any, tuple[ArrayRef]] | None:
        limit = self._ctx.max_nbytes
        if limit is None or obj.nbytes <= limit or obj.size == 0:
            return None
        if obj.dtype.hasobject or type(obj) not in (np.ndarray, np.memmap):
            return None
        mm = backing_memmap(obj)
        if mm is not None and mm.mode != "c":
            path = os.fspath(mm.filename)  # type: ignore[arg-type]
            mode = "r+" if mm.mode in ("r+", "w+") else "r"
            return load_ref, (ArrayRef(path, obj.dtype, obj.shape, obj.strides, file_offset_of(obj, mm), "C", mode),)
        ref = self._dump(obj)
        return None if ref is None else (load_result, (ref,))

    def _dump(self, a: np.ndarray) -> ArrayRef | None:
        if self._ctx.folder is None:
            return None
        ref = _write_into_spare(a)
        if ref is not None:
            return ref
        try:
            fd, path = create_private_file(self._ctx.folder, writer=os.getpid())
        except OSError:
            return None
        return _write_result(fd, path, a)  # None if there is no room: then it goes through the pipe


def _write_result(fd: int, path: str, a: np.ndarray) -> ArrayRef | None:
    """Write a result into ``fd`` (then closed); its reference, or None if the write failed."""
    try:
        write_array(fd, path, a, reserve=True)
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


def _encode_result(outcomes: Outcomes, ctx: WorkerContext) -> bytes:
    buf = io.BytesIO()
    try:
        _ResultPickler(buf, ctx).dump(outcomes)
    except Exception:  # as the stdlib: the error raised while pickling a result fails its future
        buf = io.BytesIO()
        _ResultPickler(buf, ctx).dump(_picklable(outcomes))
    return buf.getvalue()


def _picklable(outcomes: Outcomes) -> Outcomes:
    """``outcomes`` with each value or exception that cannot be pickled replaced by the error it raised."""
    values, errors = list(outcomes.values), dict(outcomes.errors)
    for i in range(len(values)):
        for part in (values[i], errors.get(i)):
            try:
                cloudpickle.dumps(part, protocol=PROTOCOL)
            except Exception as exc:
                values[i], errors[i] = None, _with_traceback(exc)
                break
    return Outcomes(values, errors, outcomes.stopped)


# ------------------------------------------------------------ worker state
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


def run_initializer(token: str, initializer: Callable[..., object], initargs: tuple[Any, ...]) -> None:
    """Run an executor's initializer in this worker and remember how it went.

    A failure is logged as the stdlib does (``concurrent.futures`` logger,
    CRITICAL) and breaks the executor at its first task here.
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


# ------------------------------------------------------------------ abort
_tables: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()  # (token, path) -> the executor's table
_MAX_TABLES = 8
_current: tuple[np.ndarray, int] | None = None  # (table, slot) of the task that may be interrupted now


def _table(ctx: WorkerContext) -> np.ndarray | None:
    if ctx.table is None:
        return None
    key = (ctx.token, ctx.table)
    table = _tables.get(key)
    if table is None:
        try:
            table = np.memmap(ctx.table, dtype=np.int64, mode="r+").reshape(-1, 2)
        except (OSError, ValueError):
            return None
        _tables[key] = table
        while len(_tables) > _MAX_TABLES:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return table


def on_abort_signal(signum: int, frame: FrameType | None) -> None:
    """The abort handler's work (installed by ``_bootstrap.start_worker``): stop the task if it is aborted."""
    current = _current
    if current is not None and current[0][current[1], 1]:
        raise TaskAborted("the caller aborted this task")


def _set_current(current: tuple[np.ndarray, int] | None) -> None:
    global _current
    _current = current


# ------------------------------------------------------------------- tasks
_READ_ONLY_HINT = (
    "mmexec passes large arrays to tasks as memory maps opened with mmap_mode='r' "
    "(read-only) by default. Pass mmap_mode='c' for a private writable copy in "
    "each task, or write results into an np.memmap opened with mode 'r+' or 'w+'."
)


def _read_only_hint(exc: BaseException) -> None:
    if not isinstance(exc, ValueError) or "read-only" not in str(exc):
        return
    if hasattr(exc, "add_note"):
        exc.add_note(_READ_ONLY_HINT)
    else:  # Python 3.10: no notes in tracebacks; the same text, as a note and in the message
        exc.__notes__ = [_READ_ONLY_HINT]
        exc.args = (f"{exc.args[0] if exc.args else exc}\n{_READ_ONLY_HINT}", *exc.args[1:])


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        _read_only_hint(exc)
        raise


def run_task(
    payload: bytes, ctx: WorkerContext, spares: list[tuple[str, int]] | None = None, slot: int = -1
) -> bytes:
    """Run one payload and return its pickled :class:`Outcomes`.

    ``spares`` are freed files of the caller's lent for large results;
    ``slot`` is this task's row in the executor's abort table.
    """
    global _in_worker
    _in_worker = True
    _limit_threads(ctx.threads)
    _ensure_initialized(ctx)
    table = _table(ctx) if slot >= 0 else None
    if table is not None:
        table[slot, 0] = os.getpid()
        _set_current((table, slot))
        if table[slot, 1]:
            _set_current(None)
            table[slot, 0] = 0
            raise TaskAborted("the caller aborted this task before it started")
    try:
        outcomes = _run_payload(payload)
    finally:
        _set_current(None)  # from here on, an abort signal is ignored: the result is encoded whole
        if table is not None:
            table[slot, 0] = 0
    _result_spares[:] = spares or ()
    try:
        return _encode_result(outcomes, ctx)
    finally:
        _result_spares.clear()


def _run_payload(payload: bytes) -> Outcomes:
    try:
        task = loads(payload)
    except BaseException as exc:
        if isinstance(exc, (TaskAborted, FileChangedError)):
            raise  # (a changed file fails this task only)
        # As in ProcessPoolExecutor, a task that cannot be rebuilt in the worker breaks
        # the executor (here without killing the shared worker).
        raise BrokenProcessPool(
            f"A task could not be unpickled in the worker ({type(exc).__name__}: {exc}); the "
            "executor cannot run tasks. Create a new executor, and check that the arguments "
            "can be unpickled in another process (pickle.loads(pickle.dumps(args)))."
        ) from exc
    del payload
    return run_calls(task)  # the arguments (and their maps) go when this frame ends


def run_calls(task: Task, call: Callable[..., Any] = _call) -> Outcomes:
    """Run a task record's calls with ``call(fn, args, kwargs)``; one failure never hides the others.

    Each exception carries the worker's traceback as its ``__cause__`` (the
    standard library's ``_RemoteTraceback``).
    """
    if isinstance(task, Call):
        try:
            return Outcomes([call(task.fn, task.args, task.kwargs)])
        except Exception as exc:
            return Outcomes([None], {0: _with_traceback(exc)})
    values: list[Any] = []
    errors: dict[int, Any] = {}
    for i, (fn, args, kwargs) in enumerate(task.calls()):
        try:
            values.append(call(fn, args, kwargs))
        except TaskAborted:
            if isinstance(task, Batch):  # the others may be sent again: say where it stopped
                return Outcomes(values, errors, stopped=i)
            raise
        except Exception as exc:
            values.append(None)
            errors[i] = _with_traceback(exc)
        except BaseException as exc:
            if not isinstance(task, Batch):  # a map chunk ends, as in the standard library
                raise
            values.append(None)  # a batch's calls stand alone (submitted one by one): SystemExit too
            errors[i] = _with_traceback(exc)
    return Outcomes(values, errors)


class _ExceptionWithTraceback:
    """An exception and its worker traceback; unpickled, the exception with the traceback as cause."""

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = f'\n"""\n{tb}"""'

    def __reduce__(self) -> tuple[Any, tuple[BaseException, str]]:
        return _rebuild_exception, (self.exc, self.tb)


def _with_traceback(exc: BaseException) -> Any:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return _ExceptionWithTraceback(exc, tb)


def _rebuild_exception(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = _RemoteTraceback(tb)  # type: ignore[arg-type]  # it takes the formatted text
    return exc
