"""DaskExecutor: the same calls on a dask.distributed cluster (extra ``mmexec[dask]``).

Data flow, as in :mod:`mmexec._executor`, with a scatter store instead of
memory maps::

    caller --submit/map--> thread: encode_task -> DaskScatterStore ------> ClientExecutor -------> worker: _run
                           mmexec's reducer:      arrays > max_nbytes:     client.get_executor(    unpickles the
                           swaps each array       client.scatter once      pure=False).submit(     payload: each
                           for a placeholder      per array object,        _run, payload,          placeholder is a
                           (an index)             reused while it lives    *scattered futures)     read-only view of
                                                  and is unchanged                                 a scattered array
    caller <--Future.result()-- dask gathers the result (or re-raises the task's exception)

Who owns what:

* The caller owns its arrays. The store keeps one scattered future per live
  array object and drops it when the array is garbage collected, when its
  content changed (SHA-1s of its bytes in 8 MiB blocks, once per submit / per
  map or Parallel call; once they found it unchanged, its pages are watched,
  ``_dirty``, and only the blocks holding pages written since are hashed
  again), or at ``shutdown()``; dask then frees the data as soon as no task
  needs it.
* A task holds its scattered inputs as dask dependencies (the futures are
  top-level arguments of ``_run``, which dask resolves on the worker), so
  dropping the store's future never pulls data from under a queued task.
* Nothing here imports ``distributed`` until a ``DaskExecutor`` is created,
  so ``import mmexec`` works (and stays fast) without it.

Memory maps cannot cross machines: an ``np.memmap`` argument, or any view of
one, raises :class:`~mmexec.LocalMemmapError` at ``submit``, whatever its
size or mode (arrays that mmexec itself mapped, such as a
``MemmapExecutor`` result, count as plain data).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import queue
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import numpy as np

from ._base import ExecutorBase, batch_pickling_error
from ._dirty import Tracked, Watch
from ._errors import AbortedError, LocalMemmapError
from ._housekeeper import HOUSEKEEPER
from ._memmap import _contiguous_blocks, backing_memmap, memory_bytes
from ._options import DEFAULT_MAX_NBYTES, parse_max_nbytes
from ._pickler import encode_task
from ._records import Call, Outcomes, Task, unpack
from ._store import Holds, Session, owner_of
from ._worker import run_calls

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["DaskExecutor", "DaskScatterStore", "cluster_threads", "default_client"]

P = ParamSpec("P")
T = TypeVar("T")

_INSTALL = "pip install 'mmexec[dask]'"
#: Arrays are hashed in blocks of this many bytes, in parallel threads.
_HASH_BLOCK = 8 * 2**20


def default_client() -> Client:
    """The current dask.distributed ``Client``, with errors that say what to do."""
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(f"DaskExecutor and Parallel(backend='dask') need dask.distributed: {_INSTALL}") from exc
    try:
        return distributed.get_client()
    except ValueError:
        raise ValueError(
            "DaskExecutor and Parallel(backend='dask') run on an existing dask.distributed Client, and there "
            "is none: create one first (`client = Client('tcp://scheduler:8786')`, or `Client(LocalCluster())` "
            "on this machine), or pass it as DaskExecutor(client)."
        ) from None


def cluster_threads(client: Client | None = None) -> int:
    """How many tasks the cluster runs at once (its workers' threads); at least 1."""
    c: Any = default_client() if client is None else client
    return max(1, int(sum(c.nthreads().values())))


# --------------------------------------------------------------------- caller
@dataclass
class ScatterHolds(Holds):
    """One task's scattered inputs, in placeholder order (``Holds.files`` stays empty)."""

    futures: list[Any] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict)  # future key -> placeholder

    def add(self, future: Any) -> int:
        """The placeholder (argument index of ``_run``) for ``future``, once per task."""
        index = self._index.get(future.key)
        if index is None:
            index = self._index[future.key] = len(self.futures)
            self.futures.append(future)
        return index


@dataclass(eq=False)
class _Scattered:
    wref: weakref.ref[np.ndarray]
    future: Any
    signature: tuple[Any, ...]
    changes: Tracked = field(default_factory=Tracked)  # whether the array changed since (``_dirty``)
    # The bytes of the partial head and tail pages outside ``changes.watch``, taken when it was set.
    edges: list[tuple[int, int, bytes]] = field(default_factory=list)


_DIGEST = hashlib.sha1().digest_size


def _sha1(block: np.ndarray) -> bytes:
    return hashlib.sha1(block.data, usedforsecurity=False).digest()


#: Byte ranges of an array with the bytes taken of them: the partial head and tail pages outside a watch.
_Edges = Sequence[tuple[int, int, bytes]]


def _block_digest(flat: np.ndarray, i: int, edges: _Edges = ()) -> bytes:
    """The SHA-1 of block ``i`` of ``flat``, with ``edges``' bytes in place of the memory they cover."""
    lo, hi = i * _HASH_BLOCK, min((i + 1) * _HASH_BLOCK, flat.size)
    digest = hashlib.sha1(usedforsecurity=False)
    pos = lo
    for start, end, data in edges:  # (sorted, disjoint)
        cut_lo, cut_hi = max(start, lo), min(end, hi)
        if cut_lo < cut_hi:
            digest.update(flat[pos:cut_lo].data)
            digest.update(data[cut_lo - start : cut_hi - start])
            pos = cut_hi
    digest.update(flat[pos:hi].data)
    return digest.digest()


def _signature(a: np.ndarray, edges: _Edges = ()) -> tuple[Any, ...]:
    """Layout and SHA-1s of ``a``'s bytes: equal signatures mean the scattered copy is current.

    A contiguous array is hashed in blocks of :data:`_HASH_BLOCK` bytes, on
    all CPUs (hashlib releases the GIL), one digest per block (so a block can
    be hashed again alone), with ``edges``' bytes in place of the memory they
    cover (so that the hash proves them equal to the scattered copy too);
    other layouts are copied and hashed a block at a time, into one digest.
    """
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        digest = hashlib.sha1(usedforsecurity=False)
        for block in _contiguous_blocks(a):
            digest.update(block.data)
        return a.dtype, a.shape, a.strides, digest.digest()
    flat = memory_bytes(a)
    count = -(-flat.size // _HASH_BLOCK)
    threads = min(count, os.cpu_count() or 1)
    if threads <= 1:
        return a.dtype, a.shape, a.strides, b"".join(_block_digest(flat, i, edges) for i in range(count))
    with ThreadPoolExecutor(threads, thread_name_prefix="mmexec-hash") as pool:
        return a.dtype, a.shape, a.strides, b"".join(pool.map(partial(_block_digest, flat, edges=edges), range(count)))


def _check(entry: _Scattered, a: np.ndarray) -> tuple[bool, tuple[Any, ...] | None]:
    """Whether ``a`` is unchanged since ``entry`` was scattered (under ``entry.changes.lock``); when it is not,
    also its new signature if it was computed.

    Where the array's pages are watched, only the hash blocks holding pages
    written since the last check are hashed again, and the partial head and
    tail pages compared with the bytes taken of them when the watch was set.
    Those bytes are taken before the whole hash that proves the array
    unchanged, which hashes them in place of the array's: so they are proven
    equal to the scattered copy.
    """
    if (a.dtype, a.shape, a.strides) != entry.signature[:3]:
        return False, None
    signature = None

    def full(new: Watch | None) -> bool:
        nonlocal signature
        edges = [] if new is None else [(lo, hi, memory_bytes(a)[lo:hi].tobytes()) for lo, hi in new.edges]
        computed = _signature(a, edges)
        if computed != entry.signature:
            signature = None if edges else computed  # (hashed with the bytes taken: not the array's own)
            return False
        entry.edges = edges
        return True

    return entry.changes.unchanged(a, lambda watch: _unchanged_where_written(entry, watch, a), full), signature


def _unchanged_where_written(entry: _Scattered, watch: Watch, a: np.ndarray) -> bool | None:
    """True when the pages written since the last check leave every hash block as it was, and the head and
    tail bytes are as they were; None when the watch cannot tell."""
    written = watch.written()
    if written is None:
        return None
    flat = memory_bytes(a)
    if any(flat[lo:hi].tobytes() != before for lo, hi, before in entry.edges):
        return False
    digests: bytes = entry.signature[3]
    blocks = sorted({i for lo, hi in written for i in range(lo // _HASH_BLOCK, (hi - 1) // _HASH_BLOCK + 1)})
    return all(_block_digest(flat, i, entry.edges) == digests[i * _DIGEST : (i + 1) * _DIGEST] for i in blocks)


def _refuse_local_memmap(a: np.ndarray) -> None:
    mm = backing_memmap(a)
    if mm is None:
        return
    path = os.fspath(mm.filename)  # type: ignore[arg-type]
    if owner_of(path) is not None:
        return  # shared memory mmexec mapped itself (a MemmapExecutor result): plain data
    if mm.mode in ("r+", "w+"):
        advice = (
            "so tasks cannot write into it. Return each task's part of the result and store it in the "
            "caller (out[i] = future.result()); to send the file's current content as input, pass np.array(x)."
        )
    else:
        advice = "so it cannot be passed by reference. Pass a copy of its data instead: np.array(x)."
    raise LocalMemmapError(
        f"a task argument is an np.memmap of {path!r} (mode {mm.mode!r}), or a view of one. DaskExecutor "
        f"runs tasks on other machines, which cannot open this file, {advice}"
    )


class DaskScatterStore:
    """An :class:`~mmexec._store.ArrayStore` that scatters large arrays to a dask cluster.

    ``ref_for`` returns a placeholder index (into the task's
    :attr:`ScatterHolds.futures`) for arrays larger than ``max_nbytes``, None
    for the others, and raises :class:`LocalMemmapError` for memory maps.
    """

    def __init__(self, client: Client, max_nbytes: int | None) -> None:
        self.client: Any = client
        self.max_nbytes = max_nbytes
        self.scatters = 0  # how many arrays were sent (tests and benchmarks read it)
        self._lock = threading.Lock()
        self._entries: dict[int, _Scattered] = {}  # id(array) -> its scattered copy
        self._closed = False
        # (key, scatter key) of arrays that died, queued by their weakref callbacks (which take no lock)
        self._forgotten: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()

    def ref_for(self, a: np.ndarray, holds: Holds) -> int | None:
        """A placeholder for ``a`` in this task, or None to pickle ``a`` into the task."""
        _refuse_local_memmap(a)
        if self.max_nbytes is None or a.nbytes <= self.max_nbytes or a.size == 0 or a.dtype.hasobject:
            return None
        if type(a) is not np.ndarray:
            return None  # subclasses keep their type through normal pickling
        assert isinstance(holds, ScatterHolds)
        return holds.add(self._future_for(a, holds.session))

    def _future_for(self, a: np.ndarray, session: Session) -> Any:
        key = id(a)
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and entry.wref() is not a:
            entry = None  # a dead array's id, reused
        if entry is not None and key in session.checked:
            return entry.future
        signature = None
        if entry is not None:
            with entry.changes.lock:
                unchanged, signature = _check(entry, a)
            if unchanged:
                session.checked.add(key)
                return entry.future
        if signature is None:
            signature = _signature(a)
        session.checked.add(key)
        future = self.client.scatter(a, hash=False)
        new = _Scattered(weakref.ref(a, partial(self._forget, key, future.key)), future, signature)
        if entry is not None:
            new.changes.drops = entry.changes.drops  # (how often a watched array changed counts on)
        old = None
        with self._lock:
            self.scatters += 1
            if not self._closed:  # (a changed array's old copy is dropped: dask frees it once no task needs it)
                old = self._entries.pop(key, None)
                self._entries[key] = new
        if old is not None:
            old.changes.let_go()
        del old  # its future is released here, outside the lock (its __del__ may run a collection)
        HOUSEKEEPER.need_while(self._holds_copies)
        HOUSEKEEPER.ensure_host()  # (the array's death posts the release of its copy)
        return future

    def _holds_copies(self) -> bool:
        return bool(self._entries)

    def _forget(self, key: int, token: str, _: object = None) -> None:
        """The caller's array died (a weakref callback: takes no lock): drop its scattered copy soon."""
        self._forgotten.put((key, token))
        HOUSEKEEPER.post(self._drop_forgotten)

    def _drop_forgotten(self) -> None:
        dropped = []
        with self._lock:
            while True:
                try:
                    key, token = self._forgotten.get_nowait()
                except queue.Empty:
                    break
                entry = self._entries.get(key)
                if entry is not None and entry.future.key == token:
                    dropped.append(self._entries.pop(key))
        for entry in dropped:
            entry.changes.let_go()  # (done already: the array's finalizer undid it before its memory was freed)
        dropped.clear()  # the futures are released outside the lock

    def close(self) -> None:
        """Drop every scattered copy (dask frees each once no task needs it). Idempotent."""
        with self._lock:
            self._closed = True
            entries, self._entries = self._entries, {}
        for entry in entries.values():
            entry.changes.let_go()
        entries.clear()


# --------------------------------------------------------------------- worker
_local = threading.local()  # .arrays: the scattered arrays of the payload being unpickled


def _scattered(index: int) -> np.ndarray:
    """Unpickling a placeholder on a worker: a read-only view of the scattered array."""
    view: np.ndarray = _local.arrays[index].view()
    view.flags.writeable = False  # one copy per worker, shared by its tasks
    return view


_READ_ONLY_HINT = (
    "DaskExecutor passes arrays larger than max_nbytes as read-only views of one copy per "
    "worker, shared by its tasks: copy one (a.copy()) to modify it, or return results."
)


def _run(payload: bytes, *arrays: np.ndarray) -> Outcomes:
    """Worker entry point: unpickle a task record (``_records``) and run its calls."""
    _local.arrays = arrays
    try:
        task: Task = unpack(pickle.loads(payload))
    finally:
        _local.arrays = ()
    return run_calls(task, _READ_ONLY_HINT)


# ------------------------------------------------------------------- executor
class DaskExecutor(ExecutorBase):
    """A ``concurrent.futures.Executor`` on a dask.distributed cluster; large arrays are scattered once.

    Parameters
    ----------
    client : distributed.Client, optional
        The (synchronous) client to run on; default: the current client
        (``distributed.get_client()``). A clear ``ValueError`` if there is none.
    max_nbytes : int, float, str or None, default '1M'
        Arrays larger than this many bytes are scattered to the cluster once
        and reused by later tasks while the caller's array object lives and is
        unchanged; tasks get them as read-only views. None sends every array
        inside its task.

    Notes
    -----
    ``np.memmap`` arguments and views of them fail their future with
    :class:`~mmexec.LocalMemmapError`: other machines cannot open the file.
    Tasks run in the workers' threads; ``mmexec`` must be importable there.
    Calls are pickled (and their arrays scattered) on one thread of the
    executor's, in bursts: calls queued together hash each array once.
    :meth:`abort` cancels the dask tasks.

    .. versionadded:: 0.1.0
    """

    def __init__(self, client: Client | None = None, *, max_nbytes: int | float | str | None = DEFAULT_MAX_NBYTES):
        if client is None:
            client = default_client()
        if client.asynchronous:
            raise ValueError("DaskExecutor needs a synchronous Client (asynchronous=False)")
        self._client: Any = cast(Any, client)  # distributed is not fully typed
        self._store = DaskScatterStore(client, parse_max_nbytes(max_nbytes))
        self._max_workers = cluster_threads(client)  # Parallel's n_jobs=None
        self._executor: Executor = self._client.get_executor(pure=False)
        self._cond = threading.Condition()
        self._queue: deque[tuple[Future[Any], Task, Session | None, bool]] = deque()
        self._running: dict[Future[Any], Future[Any]] = {}  # ours -> dask's, while it runs
        # tasks on the cluster at most: as many as run, plus one queued there (as the standard library's call
        # queue: its round trip to the scheduler overlaps the others' runs); the rest stay here, cancellable
        self._window = self._max_workers + 1
        self._thread: threading.Thread | None = None
        self._shutdown = False
        self._cancel = False  # shutdown(cancel_futures=True): what was not sent is cancelled

    def _put(self, task: Task, scope: Session | None, batch: bool = False) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.append((future, task, scope, batch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="mmexec-dask", daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._shutdown:
                    self._cond.wait()
                if not self._queue:
                    return
                burst, self._queue = self._queue, deque()
            session = Session()  # the calls queued together hash each array once
            while burst:  # (popped: no local keeps a sent call's arguments alive)
                with self._cond:
                    while len(self._running) >= self._window and not self._shutdown:
                        self._cond.wait()
                    if self._shutdown and self._cancel:
                        for future, *_ in burst:
                            future.cancel()
                        burst.clear()
                        break
                self._send(*burst.popleft(), session)

    def _send(self, future: Future[Any], task: Task, scope: Session | None, batch: bool, session: Session) -> None:
        if not future.set_running_or_notify_cancel():
            return
        holds = ScatterHolds(scope or session)
        try:
            payload, _, _ = encode_task(task, self._store, holds, _scattered)
        except Exception as exc:  # pickling errors belong on the future, as in the stdlib
            future.set_exception(batch_pickling_error(exc) if batch else exc)
            return
        inner = self._executor.submit(_run, payload, *holds.futures)
        with self._cond:
            self._running[future] = inner
        inner.add_done_callback(partial(self._done, future, isinstance(task, Call)))

    def _done(self, future: Future[Any], single: bool, inner: Future[Any]) -> None:
        with self._cond:
            self._running.pop(future, None)
            self._cond.notify_all()
        if future.done():  # aborted
            return
        if inner.cancelled():
            with contextlib.suppress(InvalidStateError):
                future.set_exception(AbortedError("the task was cancelled on the cluster"))
            return
        exc = inner.exception()
        with contextlib.suppress(InvalidStateError):
            if exc is not None:
                _drop_relay_frame(exc)
                future.set_exception(exc)
                return
            outcomes: Outcomes = inner.result()
            if not single:
                future.set_result(outcomes)
            elif outcomes.error is not None:
                future.set_exception(outcomes.error)
            else:
                future.set_result(outcomes.values[0])

    def abort(self, futures: Iterable[Future[Any]] | None = None, *, grace: float = 1.0) -> None:
        """Cancel the chosen tasks (default: all of this executor's), queued or running on the cluster.

        .. versionadded:: 0.2.0
        """
        with self._cond:
            queued = [item[0] for item in self._queue]
            running = dict(self._running)
        chosen = None if futures is None else set(futures)
        for future in queued:
            if chosen is None or future in chosen:
                future.cancel()
        for future, inner in running.items():
            if chosen is None or future in chosen:
                with contextlib.suppress(InvalidStateError):
                    future.set_exception(AbortedError("the task was aborted while it ran"))
                inner.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``wait``, return once every task is done and the scattered copies are
        released. ``cancel_futures`` cancels the tasks not sent yet."""
        with self._cond:
            self._shutdown = True
            self._cancel = self._cancel or cancel_futures
            queued = [item[0] for item in self._queue] if cancel_futures else []
            self._cond.notify_all()
            thread = self._thread
        for future in queued:
            future.cancel()
        if not wait:
            return
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            while self._running:
                self._cond.wait()
        self._store.close()

    def _default_chunksize(self, n: int) -> int:
        return 1


def _drop_relay_frame(exc: BaseException | None) -> None:
    """Unlink the frame in which ``ClientExecutor`` re-raised a task's exception.

    That frame holds the dask future, and the future's state (kept by the
    client) holds the exception: a cycle through the client that kept a failed
    task's key on the cluster for good (distributed 2026.8). The frame may be
    anywhere in the chain if the caller already raised the exception.
    """
    tb = None if exc is None else exc.__traceback__
    previous = None
    while exc is not None and tb is not None:
        if tb.tb_frame.f_code.co_name == "_cascade_future":
            if previous is None:
                exc.__traceback__ = tb.tb_next
            else:
                previous.tb_next = tb.tb_next
            return
        previous, tb = tb, tb.tb_next
