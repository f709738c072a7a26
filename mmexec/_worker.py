"""Worker side of the process boundary: run a call, send its result back.

``_bootstrap.serve`` (the worker's loop) hands each message to
:func:`handle`, imported with the first one:

* ``CONFIG``: the settings of the executor that leased this worker
  (:class:`WorkerContext`: where large results go, the threshold, the
  thread cap, ``max_tasks_per_child``);
* ``INIT``: run that executor's initializer (a failure is logged as the
  standard library does, and the worker exits: its executor is broken);
* ``CALL``: unpickle the task (arrays come back as ``np.memmap`` s of the
  caller's files, large bytes are read from theirs), run its calls, and
  reply with the pickled :class:`~mmexec._records.Outcomes`: large result
  arrays and bytes are written into the caller's private folder (or into a
  freed file it lent) and travel as references. The reply also says which
  argument maps outlived the task (the caller then never reuses their
  files), and whether this worker retires.

Abort: the caller names the aborted call on the worker's abort pipe and sends
:data:`ABORT_SIGNAL` (``_bootstrap.ABORTS``); :class:`TaskAborted` is raised
in that call only, once: a late or stray signal never hits another call or
the loop, and a call aborted before it started never runs.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import pickle
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from loky import BrokenProcessPool

from ._bootstrap import ABORT_SIGNAL, ABORTS, TaskAborted
from ._compat import RemoteTraceback
from ._errors import FileChangedError
from ._memmap import (
    ArrayRef,
    BlobRef,
    as_pickled,
    backing_memmap,
    dump_strides,
    file_offset_of,
    layout_order,
    write_array,
)
from ._pickler import PROTOCOL, Side, dump, load_ref, load_result, loads
from ._records import Call, Chunk, Outcomes, Task, unpack
from ._tempfolder import create_private_file, unlink_quietly
from ._wire import (
    CALL,
    CONFIG,
    INIT,
    INIT_DONE,
    REPLY_ABORTED,
    REPLY_BROKEN,
    REPLY_KEPT,
    REPLY_RETIRE,
    RESULT,
    Message,
)

__all__ = ["ABORT_SIGNAL", "THREAD_VARS", "TaskAborted", "WorkerContext", "handle", "in_worker", "run_calls",
           "thread_caps"]


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """The leasing executor's settings, sent once per lease (``CONFIG``)."""

    folder: str | None  # the caller's private folder, for large results (None: results by pickle)
    max_nbytes: int | None
    threads: tuple[tuple[str, str], ...]  # the thread-count variables (:data:`THREAD_VARS`) to set, and values
    max_tasks: int | None = None  # max_tasks_per_child


class _State:
    """This worker process's state (one instance, :data:`_STATE`)."""

    def __init__(self) -> None:
        self.ctx = WorkerContext(None, None, ())
        self.in_worker = False
        self.tasks = 0  # tasks run under the current lease
        self.threads: tuple[tuple[str, str], ...] = ()  # what _limit_threads set last


_STATE = _State()


def in_worker() -> bool:
    """True inside a task run by an mmexec worker (nested Parallel calls then default to sequential)."""
    return _STATE.in_worker


def handle(message: Message) -> tuple[int, int, bytes, bytes, int] | None:
    """Act on one message; the reply ``(kind, ident, body, meta, flags)``, or None."""
    _STATE.in_worker = True
    if message.kind == CALL:
        return _call(message)
    if message.kind == CONFIG:  # a new lease: requests to abort the last one's calls are moot
        ABORTS.drain()
        ABORTS.requested.clear()
        ctx: WorkerContext = pickle.loads(message.meta)
        _STATE.ctx, _STATE.tasks = ctx, 0
        _limit_threads(ctx.threads)
        return None
    if message.kind == INIT:
        return _init(message)
    return None


# ------------------------------------------------------------------ set-up
#: The environment variables that cap BLAS/OpenMP threads (joblib's list, but NUMBA_NUM_THREADS: numba
#: refuses a new value once its threads run, and a warm worker serves one executor after another).
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
#: The library each variable caps, as threadpoolctl names it: a library already loaded is capped by its own
#: variable's value.
_LIBRARY_OF = {"OMP_NUM_THREADS": "openmp", "OPENBLAS_NUM_THREADS": "openblas", "MKL_NUM_THREADS": "mkl",
               "BLIS_NUM_THREADS": "blis"}


def thread_caps(explicit: int | None, default: int) -> tuple[tuple[str, str], ...]:
    """The caller's side: each of :data:`THREAD_VARS` with its value for the workers, as joblib gives them:
    ``explicit`` (``inner_max_num_threads``) for all, else the caller's own value where it set one, else
    ``default``."""
    if explicit is not None:
        return tuple((name, str(explicit)) for name in THREAD_VARS)
    return tuple((name, os.environ.get(name, str(default))) for name in THREAD_VARS)


def _limit_threads(caps: tuple[tuple[str, str], ...]) -> None:
    """Cap BLAS/OpenMP threads in this worker so that workers x threads <= CPUs (as joblib).

    Environment variables reach libraries loaded later; libraries already
    loaded are capped through threadpoolctl when it is installed.
    """
    if not caps or _STATE.threads == caps:
        return
    _STATE.threads = caps
    os.environ.update(caps)
    limits = {_LIBRARY_OF[name]: int(value) for name, value in caps
              if name in _LIBRARY_OF and value.isdigit() and int(value) > 0}  # (a variable may hold anything)
    if not limits:
        return
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # (threadpoolctl is optional; it has ThreadpoolController since 3.0)
        return
    controller = ThreadpoolController()
    for library, count in limits.items():  # (threadpool_limits' dict keys are user APIs or file prefixes)
        controller.select(internal_api=library).limit(limits=count)


def _init(message: Message) -> tuple[int, int, bytes, bytes, int]:
    """Run the executor's initializer; on failure log it as the standard library does and retire."""
    try:
        initializer, initargs = pickle.loads(message.body)
        initializer(*initargs)
    except BaseException as exc:
        logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return INIT_DONE, message.ident, text.encode(), b"", REPLY_RETIRE
    return INIT_DONE, message.ident, b"", b"", 0


# ------------------------------------------------------------------ abort
def _run_guarded(task: Task, ident: int) -> Outcomes | None:
    """Run a task's calls; None if it was aborted (before it started, or wherever the signal came)."""
    try:
        try:
            if not ABORTS.begin(ident):
                return None
            return run_calls(task)
        finally:
            ABORTS.running = 0
    except TaskAborted:
        return None


# ------------------------------------------------------------------- calls
READ_ONLY_HINT = (
    "mmexec passed this array to the task as a read-only memory map (mmap_mode='r'). With the default "
    "mmap_mode='c' each task gets a private writable copy; to write results where the caller sees them, "
    "pass an np.memmap opened with mode 'r+' or 'w+'."
)


def _add_hint(exc: BaseException, hint: str) -> None:
    """A note on a "read-only" ValueError saying why the array is read-only and what to do."""
    if not isinstance(exc, ValueError) or "read-only" not in str(exc):
        return
    if hasattr(exc, "add_note"):
        exc.add_note(hint)
    else:  # Python 3.10: no notes in tracebacks; the same text, as a note and in the message
        exc.__notes__ = [hint]
        exc.args = (f"{exc.args[0] if exc.args else exc}\n{hint}", *exc.args[1:])


def run_calls(task: Task, hint: str = READ_ONLY_HINT) -> Outcomes:
    """Run a task record's calls until one fails (as the standard library's ``map`` chunks and joblib's
    batches do); the loop adds nothing per call that the standard library's does not.

    The exception (any but :class:`TaskAborted`: ``SystemExit`` too, as in the
    standard library) carries the worker's traceback as its ``__cause__``;
    a "read-only" ``ValueError`` gets ``hint`` as a note.
    """
    values: list[Any] = []
    append = values.append
    try:
        if isinstance(task, Chunk):
            fn = task.fn
            for args in task.arglists:
                append(fn(*args))
        elif isinstance(task, Call):
            append(task.fn(*task.args, **task.kwargs))
        else:
            for call in task.items:
                append(call.fn(*call.args, **call.kwargs))
    except TaskAborted:
        raise
    except BaseException as exc:
        _add_hint(exc, hint)
        return Outcomes(values, _with_traceback(exc))
    return Outcomes(values)


def run_chunk(fn: Callable[..., Any], arglists: list[tuple[Any, ...]]) -> Outcomes:
    """A ``map`` chunk sent as one ordinary call (through an overridden ``submit``): its outcomes."""
    return run_calls(Chunk(fn, arglists))


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
    exc.__cause__ = RemoteTraceback(tb)
    return exc


# -------------------------------------------------------------------- CALL
def _call(message: Message) -> tuple[int, int, bytes, bytes, int]:
    ident = message.ident
    spares, files_ok, buffers, blobs = pickle.loads(message.meta) if message.meta else (None, True, None, False)
    maps: dict[tuple[str, str], np.memmap] = {}
    flags = 0
    try:
        task = unpack(loads(message.body, buffers, blobs, maps))
    except BaseException as exc:
        outcomes: Outcomes | None = Outcomes([], _load_error(exc))
        if _is_out_of_memory(exc):
            flags |= REPLY_RETIRE  # never hand this worker to another executor
        elif not isinstance(exc, FileChangedError):
            flags |= REPLY_BROKEN
    else:
        del message
        outcomes = _run_guarded(task, ident)
        del task
    _STATE.tasks += 1
    max_tasks = _STATE.ctx.max_tasks
    if max_tasks is not None and _STATE.tasks >= max_tasks:
        flags |= REPLY_RETIRE
    body: bytes = b""
    result_buffers: list[BlobRef] = []
    files: list[str] = []
    result_blobs = False
    if outcomes is None:
        flags |= REPLY_ABORTED
    else:
        body, result_buffers, files, result_blobs = _ResultEncoder(_STATE.ctx, files_ok, spares).encode(outcomes)
        del outcomes
    kept = _kept_maps(maps)
    if kept:
        flags |= REPLY_KEPT
    meta = b""
    if kept or result_buffers or files or result_blobs:
        meta = pickle.dumps((kept, result_buffers, files, result_blobs), PROTOCOL)
    return RESULT, ident, body, meta, flags


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM)


def _load_error(exc: BaseException) -> Any:
    """The error a task that could not be rebuilt here fails with."""
    if isinstance(exc, FileChangedError):
        return _with_traceback(exc)  # (a changed file fails this task only)
    if _is_out_of_memory(exc):
        error: BaseException = MemoryError(
            f"this task's arguments could not be mapped in the worker ({type(exc).__name__}: {exc}): the worker "
            "ran out of memory or address space (a ulimit -v / RLIMIT_AS?). This worker is replaced; pass smaller "
            "arguments or raise the limit."
        )
    else:  # as in ProcessPoolExecutor, a task that cannot be rebuilt in the worker breaks the executor
        error = BrokenProcessPool(
            f"A task could not be unpickled in the worker ({type(exc).__name__}: {exc}); the "
            "executor cannot run tasks. Create a new executor, and check that the arguments "
            "can be unpickled in another process (pickle.loads(pickle.dumps(args)))."
        )
    error.__cause__ = exc
    return _with_traceback(error)


def _kept_maps(maps: dict[tuple[str, str], np.memmap]) -> list[str]:
    """The paths of this task's argument maps that are still alive now that the task is over."""
    if not maps:
        return []
    refs = [(key[0], weakref.ref(whole)) for key, whole in maps.items()]
    maps.clear()
    alive = [path for path, ref in refs if ref() is not None]
    if alive:
        gc.collect()  # (a cycle may hold the last reference)
        alive = [path for path, ref in refs if ref() is not None]
    return alive


# ------------------------------------------------------------------ results
class _ResultEncoder(Side):
    """Pickles one task's outcomes; large arrays and bytes go to files in the caller's folder.

    Every file it wrote is known: those the final payload does not refer to
    (an attempt that failed) are removed before the reply goes, so nothing
    is left behind for a result that could not be sent.
    """

    def __init__(self, ctx: WorkerContext, files_ok: bool, spares: list[tuple[str, int]] | None) -> None:
        super().__init__()
        self.ctx = ctx
        self.limit = ctx.max_nbytes if files_ok and ctx.folder is not None else None
        self.spares = list(spares or ())
        self.written: dict[int, tuple[Any, Any]] = {}  # id(array) -> (array, its reduction), across attempts
        self.created: list[str] = []  # named files made, in order
        self.used: set[str] = set()  # files the current attempt refers to

    def encode(self, outcomes: Outcomes) -> tuple[bytes, list[BlobRef], list[str], bool]:
        """``(body, out-of-band buffers, files written, blobs)`` for the reply; a value or an exception that
        cannot be pickled fails in its place."""
        try:
            body, buffers, blobs = self._attempt(outcomes)
        except BaseException as exc:  # (SystemExit too: as the standard library, it fails the call only)
            outcomes = self._without_unpicklable(outcomes, exc)
            try:
                body, buffers, blobs = self._attempt(outcomes)
            except BaseException as last:  # the error itself cannot be pickled: its text then
                body, buffers, blobs = self._attempt(Outcomes(outcomes.values[:0], _with_traceback(
                    RuntimeError(f"the task's result could not be pickled: {type(last).__name__}: {last}"))))
        for path in self.created:
            if path not in self.used:
                unlink_quietly(path)
        return body, buffers, [p for p in self.created if p in self.used], blobs

    def _attempt(self, outcomes: Outcomes) -> tuple[bytes, list[BlobRef], bool]:
        self.used = set()
        self.refs = []
        body, blobs = dump((outcomes.values, outcomes.error), self)
        return body, list(self.refs), blobs

    def _without_unpicklable(self, outcomes: Outcomes, exc: BaseException) -> Outcomes:
        """``outcomes`` cut at its first value that cannot be pickled, which fails with the pickling error."""
        for i, value in enumerate(outcomes.values):
            try:
                self._attempt(Outcomes([value]))
            except BaseException as error:
                return Outcomes(outcomes.values[:i], _with_traceback(error))
        return Outcomes(outcomes.values, _with_traceback(exc))  # the exception is what cannot be pickled

    # -- arrays ----------------------------------------------------------
    def reduce_array(self, obj: np.ndarray) -> Any:
        done = self.written.get(id(obj))
        if done is not None and done[0] is obj:
            self._mark_used(done[1])
            return done[1]
        reduced = self._reduce_array(obj)
        if reduced is not None:
            self.written[id(obj)] = (obj, reduced)
            self._mark_used(reduced)
        elif type(obj) is np.memmap:  # a small view of a map: its values, as a plain ndarray (as joblib)
            return np.array(obj).__reduce_ex__(PROTOCOL)
        return reduced

    def _mark_used(self, reduced: Any) -> None:
        ref = reduced[1][0]
        if isinstance(ref, ArrayRef):
            self.used.add(ref.path)

    def _reduce_array(self, obj: np.ndarray) -> Any:
        limit = self.limit
        if limit is None or obj.nbytes <= limit or obj.size == 0:
            return None
        if obj.dtype.hasobject or type(obj) not in (np.ndarray, np.memmap):
            return None
        mm = backing_memmap(obj)
        if mm is not None and mm.mode != "c":  # the caller's file, unchanged by us: by reference
            path = os.fspath(mm.filename)  # type: ignore[arg-type]
            mode = "r+" if mm.mode in ("r+", "w+") else "r"
            return load_ref, (ArrayRef(path, obj.dtype, obj.shape, obj.strides, file_offset_of(obj, mm), "C", mode),)
        ref = self._dump(as_pickled(obj))
        return None if ref is None else (load_result, (ref,))

    def _dump(self, a: np.ndarray) -> ArrayRef | None:
        fd_path = self._spare_for(a.nbytes) or self._new_file()
        if fd_path is None:
            return None  # no file: through the pipe
        fd, path = fd_path
        try:
            write_array(fd, path, a, reserve=None if path.startswith("/proc/") else contextlib.nullcontext())
        except OSError:
            return None  # no room: through the pipe
        finally:
            os.close(fd)
        return ArrayRef(path, a.dtype, a.shape, dump_strides(a), 0, layout_order(a), "r+")

    def _spare_for(self, nbytes: int) -> tuple[int, str] | None:
        """A freed file of the caller's, lent with this task, that ``nbytes`` fits well (each is used once)."""
        spare = next((s for s in self.spares if s[1] // 2 <= nbytes <= s[1]), None)
        if spare is None:
            return None
        self.spares.remove(spare)
        try:
            return os.open(spare[0], os.O_RDWR | getattr(os, "O_CLOEXEC", 0)), spare[0]
        except OSError:
            return None

    def _new_file(self) -> tuple[int, str] | None:
        assert self.ctx.folder is not None
        try:
            fd, path = create_private_file(self.ctx.folder, writer=os.getpid())
        except OSError:
            return None
        self.created.append(path)
        return fd, path

    # -- bytes -----------------------------------------------------------
    def put_blob(self, view: memoryview, kind: str) -> BlobRef | None:
        made = self._new_file()
        if made is None:
            return None
        fd, path = made
        try:
            data = np.frombuffer(view.cast("B") if view.format != "B" or view.ndim != 1 else view, dtype=np.uint8)
            write_array(fd, path, data, reserve=contextlib.nullcontext())
        except OSError:
            return None
        finally:
            os.close(fd)
        self.used.add(path)
        return BlobRef(path, view.nbytes, kind)

