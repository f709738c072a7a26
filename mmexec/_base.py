"""What mmexec's executors share above their core: ``map``, ``submit_batch`` and the results iterator.

An executor supplies :meth:`ExecutorBase._put` (queue one task record,
``_records``, and return its future) and :meth:`ExecutorBase.abort`;
everything else here is written once: ``submit``, ``map`` (``timeout``,
``chunksize``, ``buffersize``), ``submit_batch`` (what ``Parallel`` uses)
and the iterator that yields ``map``'s results in order.
"""

from __future__ import annotations

import itertools
import math
import pickle
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

from ._errors import MmexecError
from ._records import Batch, Call, Chunk, Outcomes, Task
from ._store import Session
from ._worker import run_chunk

__all__ = ["ExecutorBase", "batch_pickling_error"]

P = ParamSpec("P")
T = TypeVar("T")

#: map() with chunksize=None cuts the calls into about this many chunks per worker.
_CHUNKS_PER_WORKER = 4


def batch_pickling_error(exc: Exception) -> Exception:
    """A batch whose arguments could not be pickled fails as joblib's do (mmexec's own errors stay)."""
    if isinstance(exc, (MmexecError, OSError)):
        return exc
    error = pickle.PicklingError("Could not pickle the task to send it to the workers.")
    error.__cause__ = exc
    return error


class ExecutorBase(Executor):
    """A ``concurrent.futures.Executor`` whose subclasses queue task records (:meth:`_put`)."""

    _max_workers: int

    def _put(self, task: Task, scope: Session | None, batch: bool = False) -> Future[Any]:
        """Queue ``task`` (with ``scope``: arrays compared with their dump once for all its tasks); its future.

        ``batch``: a task that cannot be pickled fails as joblib's batches do.
        """
        raise NotImplementedError

    def abort(self, futures: Iterable[Future[Any]] | None = None, *, grace: float = 1.0) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ API
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` and return its future at once.

        The arguments are pickled later, on the executor's own thread, before
        the call is sent: a call sees each array's contents as of some moment
        between its ``submit`` and its start (as with ``ProcessPoolExecutor``).
        """
        return self._put(Call(fn, args, kwargs), None)

    def submit_batch(
        self, calls: Iterable[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]], /, *,
        scope: Session | None = None,
    ) -> Future[Outcomes]:
        """Run several ``(fn, args, kwargs)`` calls as one task; its future gives their outcomes.

        The result has ``.values`` (one per call that ran) and ``.error`` (the
        exception of the call that failed, after which none ran);
        ``.checked()`` returns the values or raises that error. Batches given
        the same ``scope`` (from :meth:`new_scope`) compare each array with
        its dump only once: pass one scope for batches whose arrays the caller
        does not change in between (``Parallel`` uses one per call).

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
        return self._put(task, scope, batch=True)

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
        put = self._map_put(Session())
        futures: list[Future[Any]] = []
        try:
            if size == 1:
                futures += [put(Call(fn, args)) for args in arglists]
            else:
                for i in range(0, len(arglists), size):
                    futures.append(put(Chunk(fn, arglists[i : i + size])))
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
        # No shared scope: the caller may change its arrays while it takes results, so each burst
        # compares them again (as separate submits would).
        put = self._map_put(None)

        def submit_next() -> Future[Any] | None:
            if size == 1:
                args = next(calls, None)
                return None if args is None else put(Call(fn, args))
            chunk = list(itertools.islice(calls, size))
            return put(Chunk(fn, chunk)) if chunk else None

        futures: list[Future[Any]] = []
        try:
            while len(futures) < buffersize and (fut := submit_next()) is not None:
                futures.append(fut)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        return _iter_results(futures, end, chunked=size != 1, refill=submit_next)

    def _map_put(self, scope: Session | None) -> Callable[[Call | Chunk], Future[Any]]:
        """How ``map`` queues its tasks: straight to :meth:`_put`, or, when ``submit`` is overridden (by a
        subclass, or on the instance as tqdm's ``process_map`` does to count finished tasks), through
        ``self.submit``, once per task, as the standard library's ``map`` does."""
        if type(self).submit is ExecutorBase.submit and "submit" not in self.__dict__:
            return lambda task: self._put(task, scope)

        def through_submit(task: Call | Chunk) -> Future[Any]:
            if isinstance(task, Call):
                return self.submit(task.fn, *task.args)
            return self.submit(run_chunk, task.fn, task.arglists)

        return through_submit

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
            values, error = outcomes.values, outcomes.error
            del outcomes
            values.reverse()
            while values:
                yield values.pop()
            if error is not None:
                raise error
    finally:
        for left in pending:
            left.cancel()
