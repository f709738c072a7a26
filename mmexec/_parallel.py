"""Parallel / delayed: joblib's calling convention on concurrent.futures executors.

``Parallel(n_jobs=2)(delayed(f)(x) for x in xs)`` runs on a
:class:`~mmexec.MemmapExecutor` (backend ``'loky'``), a
``ThreadPoolExecutor`` (``'threading'``), in the caller (``'sequential'``),
on the current dask.distributed client's cluster (``'dask'``: a
:class:`~mmexec.DaskExecutor`, imported only then), or on any
``concurrent.futures.Executor`` passed as ``backend``.

Calls are cut into batches (adaptive with ``batch_size='auto'``), at most
``pre_dispatch`` calls are in flight, and results are collected by blocking
on a queue fed by the futures' done callbacks, never by polling.
"""

from __future__ import annotations

import contextvars
import itertools
import queue
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

import loky

from ._base import QueueExecutor
from ._executor import MemmapExecutor
from ._options import DEFAULT_MAX_NBYTES
from ._records import Outcomes
from ._worker import in_worker

__all__ = ["Parallel", "delayed", "parallel_config"]

T = TypeVar("T")
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]

PROCESS_BACKENDS = ("loky", "processes", "multiprocessing")
BACKENDS = (*PROCESS_BACKENDS, "threading", "sequential", "dask")
RETURN_AS = ("list", "generator", "generator_unordered")
#: After an error or a timeout, a task still running this long after the abort has its worker killed.
ABORT_GRACE = 0.5
#: batch_size='auto' aims at batches lasting between these many seconds (as joblib).
MIN_BATCH_SECONDS, MAX_BATCH_SECONDS = 0.2, 2.0
_MAX_AUTO_BATCH = 10_000


class _Delayed:
    """``delayed(function)``: calling it returns ``(function, args, kwargs)``.

    A small object instead of ``functools.wraps`` on a closure, which costs
    about 5 us per ``delayed(f)`` (the generator in ``Parallel(...)(delayed(f)(x)
    for x in xs)`` makes one per item). It answers ``__name__``, ``__doc__``,
    ``__module__``, ``__wrapped__`` (so ``inspect.signature``) as the function.
    """

    __slots__ = ("__wrapped__",)

    def __init__(self, function: Callable[..., Any]) -> None:
        self.__wrapped__ = function

    def __call__(self, *args: Any, **kwargs: Any) -> Call:
        return self.__wrapped__, args, kwargs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__wrapped__, name)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return getattr(self.__wrapped__, "__doc__", None)

    @property
    def __module__(self) -> str:  # type: ignore[override]
        return getattr(self.__wrapped__, "__module__", __name__)

    def __repr__(self) -> str:
        return f"delayed({self.__wrapped__!r})"


def delayed(function: Callable[..., T]) -> Callable[..., Call]:
    """Capture ``function(*args, **kwargs)`` as a ``(function, args, kwargs)`` triple.

    .. versionadded:: 0.1.0
    """
    if not callable(function):
        raise TypeError(f"delayed() needs a callable, not {type(function).__name__}")
    return _Delayed(function)


_DEFAULTS: dict[str, Any] = {
    "n_jobs": None,
    "backend": None,
    "verbose": 0,
    "temp_folder": None,
    "max_nbytes": DEFAULT_MAX_NBYTES,
    "mmap_mode": "r",
    "prefer": None,
    "require": None,
}
_config: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("mmexec_parallel_config", default=None)
_UNSET: Any = object()


class parallel_config:  # noqa: N801 - joblib's name
    """Context manager setting the defaults of every ``Parallel`` created inside it.

    Accepts ``backend``, ``n_jobs``, ``verbose``, ``temp_folder``,
    ``max_nbytes``, ``mmap_mode``, ``prefer`` and ``require``; nested blocks
    override the outer ones and restore them on exit.

    .. versionadded:: 0.1.0
    """

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(_DEFAULTS)
        if unknown:
            raise TypeError(f"parallel_config got unknown options {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
        self._options = options
        self._token: contextvars.Token[dict[str, Any] | None] | None = None

    def __enter__(self) -> parallel_config:
        self._token = _config.set({**(_config.get() or {}), **self._options})
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _config.reset(self._token)


def _option(name: str, value: Any) -> Any:
    if value is not _UNSET:
        return value
    return (_config.get() or {}).get(name, _DEFAULTS[name])


def effective_n_jobs(n_jobs: int | None) -> int:
    """joblib's rule: None is 1, -1 all CPUs, -2 all but one, and so on; 0 is an error."""
    if n_jobs is None:
        return 1
    if not isinstance(n_jobs, int) or isinstance(n_jobs, bool):
        raise TypeError(f"n_jobs must be an int or None, not {n_jobs!r}")
    if n_jobs == 0:
        raise ValueError("n_jobs == 0 has no meaning: use n_jobs=1 to run sequentially, -1 for all CPUs")
    if n_jobs < 0:
        return max(1, int(loky.cpu_count()) + 1 + n_jobs)
    return n_jobs


def _run_batch(calls: list[Call]) -> Outcomes:
    """Run a batch in this process (threads, foreign executors)."""
    outcomes = Outcomes([])
    for i, (fn, args, kwargs) in enumerate(calls):
        try:
            outcomes.values.append(fn(*args, **kwargs))
        except Exception as exc:
            outcomes.values.append(None)
            outcomes.errors[i] = exc
    return outcomes


class Parallel:
    """joblib-compatible ``Parallel``: ``Parallel(n_jobs=2)(delayed(f)(x) for x in xs)``.

    Parameters follow joblib: ``n_jobs``, ``backend`` (``'loky'`` /
    ``'processes'`` / ``'multiprocessing'`` run on :class:`MemmapExecutor`,
    ``'threading'``, ``'sequential'``, or any ``concurrent.futures.Executor``),
    ``return_as`` (``'list'``, ``'generator'``, ``'generator_unordered'``),
    ``verbose``, ``timeout`` (seconds without any batch finishing; raises
    ``TimeoutError``), ``pre_dispatch``, ``batch_size`` (``'auto'`` or an int),
    ``temp_folder``, ``max_nbytes``, ``mmap_mode``, ``prefer`` and ``require``.
    mmexec adds ``progress_bar`` (tqdm if installed, else a text bar on stderr)
    and ``callback(index, result)``, called in the caller as each task finishes.

    Used as a context manager, the workers are kept across calls.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        n_jobs: int | None = _UNSET,
        backend: str | Executor | None = _UNSET,
        return_as: str = "list",
        verbose: int = _UNSET,
        timeout: float | None = None,
        pre_dispatch: int | str = "2 * n_jobs",
        batch_size: int | str = "auto",
        temp_folder: str | None = _UNSET,
        max_nbytes: int | float | str | None = _UNSET,
        mmap_mode: str = _UNSET,
        prefer: str | None = _UNSET,
        require: str | None = _UNSET,
        *,
        progress_bar: bool = False,
        callback: Callable[[int, Any], object] | None = None,
    ) -> None:
        if return_as not in RETURN_AS:
            raise ValueError(f"return_as must be one of {RETURN_AS}, got {return_as!r}")
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be 'auto' or a positive int, got {batch_size!r}")
        prefer, require = _option("prefer", prefer), _option("require", require)
        if prefer not in (None, "processes", "threads"):
            raise ValueError(f"prefer must be None, 'processes' or 'threads', got {prefer!r}")
        if require not in (None, "sharedmem"):
            raise ValueError(f"require must be None or 'sharedmem', got {require!r}")
        self.return_as = return_as
        self.timeout = timeout
        self.batch_size = batch_size
        self.verbose = _option("verbose", verbose)
        self.progress_bar = progress_bar
        self.callback = callback
        self.temp_folder = _option("temp_folder", temp_folder)
        self.max_nbytes = _option("max_nbytes", max_nbytes)
        self.mmap_mode = _option("mmap_mode", mmap_mode)
        self.backend = self._choose_backend(_option("backend", backend), prefer, require)
        requested = _option("n_jobs", n_jobs)
        if requested in (None, -1) and self.backend == "dask":
            from ._dask import cluster_threads

            requested = cluster_threads()  # every thread of the cluster (needs a client now)
        if requested is None and isinstance(self.backend, Executor):
            requested = getattr(self.backend, "_max_workers", 1)
        self.n_jobs = effective_n_jobs(requested)
        if self.n_jobs == 1 and not isinstance(self.backend, Executor) and self.backend != "dask":
            self.backend = "sequential"
        self.pre_dispatch = self._pre_dispatch_count(pre_dispatch)
        self._executor: Executor | None = None
        self._managed = False

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _choose_backend(backend: Any, prefer: str | None, require: str | None) -> str | Executor:
        if isinstance(backend, Executor):
            return backend
        if require == "sharedmem" and backend not in (None, "threading", "sequential"):
            raise ValueError(f"backend={backend!r} cannot share memory with the caller (require='sharedmem')")
        if backend is None:
            if require == "sharedmem" or prefer == "threads":
                return "threading"
            return "sequential" if in_worker() else "loky"
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS} or an Executor instance")
        return "loky" if backend in PROCESS_BACKENDS else backend

    def _pre_dispatch_count(self, pre_dispatch: int | str) -> int | None:
        if pre_dispatch == "all":
            return None
        if isinstance(pre_dispatch, str):
            expr = pre_dispatch.replace("n_jobs", str(self.n_jobs))
            if not all(c in "0123456789*+- ." for c in expr):
                raise ValueError(f"pre_dispatch must be 'all', an int or an expression of n_jobs, got {pre_dispatch!r}")
            pre_dispatch = int(eval(expr, {"__builtins__": {}}))  # digits and + - * only
        if pre_dispatch < 1:
            raise ValueError(f"pre_dispatch must be at least 1, got {pre_dispatch!r}")
        return int(pre_dispatch)

    def _make_executor(self) -> Executor | None:
        if isinstance(self.backend, Executor):
            return self.backend
        if self.backend == "loky":
            return MemmapExecutor(
                self.n_jobs, max_nbytes=self.max_nbytes, mmap_mode=self.mmap_mode, temp_folder=self.temp_folder
            )
        if self.backend == "threading":
            return ThreadPoolExecutor(self.n_jobs)
        if self.backend == "dask":
            from ._dask import DaskExecutor

            return DaskExecutor(max_nbytes=self.max_nbytes)
        return None

    def __enter__(self) -> Parallel:
        self._executor = self._make_executor()
        self._managed = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._managed = False
        executor, self._executor = self._executor, None
        if executor is not None and executor is not self.backend:
            executor.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        return f"Parallel(n_jobs={self.n_jobs})"

    # ------------------------------------------------------------------ run
    def __call__(self, iterable: Iterable[Call]) -> Any:
        """Run the calls; a list, or a generator as ``return_as`` says."""
        if self._managed:
            executor, owned = self._executor, False
        else:
            executor, owned = self._make_executor(), not isinstance(self.backend, Executor)
        run = _Run(self, executor, owned, iter(iterable))
        results = run.results()
        if self.return_as == "list":
            return list(results)
        return results


class _Run:
    """One call of a Parallel: dispatch, collect, report, clean up."""

    def __init__(self, parallel: Parallel, executor: Executor | None, owned: bool, calls: Iterator[Call]) -> None:
        self.p = parallel
        self.executor = executor
        self.owned = owned
        self.calls = calls
        self.scope = executor.new_scope() if isinstance(executor, QueueExecutor) else None
        self.completed = False
        self.done_queue: queue.SimpleQueue[tuple[Future[Any], int, int, float]] = queue.SimpleQueue()
        self.in_flight: dict[Future[Any], int] = {}
        self.n_dispatched = 0
        self.n_done = 0
        self.exhausted = False
        self.batch_size = 1 if parallel.batch_size == "auto" else int(parallel.batch_size)
        if parallel.pre_dispatch is None and executor is not None:  # 'all': take every call now
            everything = list(calls)
            if parallel.batch_size == "auto":
                self.batch_size = max(1, len(everything) // (8 * parallel.n_jobs))
            self.calls = iter(everything)
        self.start = time.monotonic()
        self.bar = _ProgressBar(parallel.progress_bar)
        if parallel.verbose:
            kind = type(executor).__name__ if executor is not None else "sequential"
            self.log(f"Using {kind} with {parallel.n_jobs} concurrent workers.")

    def log(self, message: str) -> None:
        print(f"[{self.p!r}]: {message}", file=sys.stderr, flush=True)

    def results(self) -> Iterator[Any]:
        try:
            if self.executor is None:
                yield from self._sequential()
            else:
                yield from self._parallel()
            if self.p.verbose:
                self.log(f"Done {self.n_done} out of {self.n_done} | elapsed: {self._elapsed()} finished")
            self.completed = True
        finally:
            self._finish()

    # sequential ------------------------------------------------------------
    def _sequential(self) -> Iterator[Any]:
        for index, (fn, args, kwargs) in enumerate(self.calls):
            value = fn(*args, **kwargs)
            self._completed(index, [value])
            yield value

    # parallel --------------------------------------------------------------
    def _dispatch_some(self) -> None:
        """Dispatch batches until ``pre_dispatch`` batches are in flight (joblib counts batches)."""
        limit = self.p.pre_dispatch
        while not self.exhausted and (limit is None or len(self.in_flight) < limit):
            batch = list(itertools.islice(self.calls, self.batch_size))
            if not batch:
                self.exhausted = True
                return
            self._submit(batch)

    def _submit(self, batch: list[Call]) -> None:
        first, count, sent = self.n_dispatched, len(batch), time.monotonic()
        executor = self.executor
        if isinstance(executor, QueueExecutor):
            fut = executor.submit_batch(batch, scope=self.scope)
        else:
            assert executor is not None
            fut = executor.submit(_run_batch, batch)
        self.n_dispatched += count
        self.in_flight[fut] = first
        fut.add_done_callback(lambda f: self.done_queue.put((f, first, count, sent)))

    def _next_done(self) -> tuple[Future[Any], int, int, float]:
        try:
            return self.done_queue.get(timeout=self.p.timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no task finished within timeout={self.p.timeout} s; the remaining tasks were cancelled"
            ) from None

    def _parallel(self) -> Iterator[Any]:
        ordered = self.p.return_as != "generator_unordered"
        waiting: dict[int, list[Any]] = {}  # first index -> values, for in-order delivery
        next_index = 0
        self._dispatch_some()
        while self.in_flight:
            fut, first, count, sent = self._next_done()
            del self.in_flight[fut]
            values = self._values(fut)
            self._adapt(count, time.monotonic() - sent)
            self._dispatch_some()  # first: the workers get the next batch while this one is reported
            self._completed(first, values)
            if not ordered:
                yield from values
                continue
            waiting[first] = values
            while next_index in waiting:
                chunk = waiting.pop(next_index)
                next_index += len(chunk)
                yield from chunk

    def _values(self, fut: Future[Any]) -> list[Any]:
        values: list[Any] = fut.result().checked()
        return values

    def _adapt(self, count: int, seconds: float) -> None:
        """joblib's auto batching: grow batches that finish too fast, shrink slow ones."""
        if self.p.batch_size != "auto" or count != self.batch_size:
            return
        if seconds < MIN_BATCH_SECONDS:
            ideal = int(count * MIN_BATCH_SECONDS / max(seconds, 1e-6))
            self.batch_size = min(_MAX_AUTO_BATCH, max(2 * count, ideal // 2, 1))
        elif seconds > MAX_BATCH_SECONDS:
            self.batch_size = max(1, count // 2)

    # reporting -------------------------------------------------------------
    def _completed(self, first: int, values: list[Any]) -> None:
        before, self.n_done = self.n_done, self.n_done + len(values)
        if self.p.callback is not None:
            for offset, value in enumerate(values):
                self.p.callback(first + offset, value)
        self.bar.update(self.n_done, None if not self.exhausted else self.n_dispatched)
        if self.p.verbose and _should_report(before, self.n_done, self.p.verbose):
            self.log(f"Done {self.n_done:4d} tasks      | elapsed: {self._elapsed()}")

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.start:6.1f}s"

    def _finish(self) -> None:
        """After the last result, an error, a timeout, an interrupt or an early close of the generator.

        Unless every result came in, the call's tasks are aborted: those not
        started are cancelled, the running ones interrupted (and their worker
        killed after :data:`ABORT_GRACE` seconds), so the error is raised at
        once and the warm workers stay.
        """
        in_flight = list(self.in_flight)
        self.in_flight.clear()
        if isinstance(self.executor, QueueExecutor) and in_flight and not self.completed:
            self.executor.abort(in_flight, grace=ABORT_GRACE)
        else:
            for fut in in_flight:
                fut.cancel()
        self.bar.close()
        if self.owned and self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _should_report(before: int, after: int, verbose: int) -> bool:
    """verbose >= 10 reports every finished batch; below, at powers of two, as joblib."""
    if verbose >= 10:
        return True
    return (after & (after - 1)) == 0 or (before.bit_length() != after.bit_length())


class _ProgressBar:
    """tqdm when installed, else a one-line text bar on stderr; nothing when off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._tqdm: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._tqdm = tqdm(unit="task")

    def update(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            if total is not None:
                self._tqdm.total = total
            self._tqdm.update(done - self._tqdm.n)
            return
        if total:
            filled = int(30 * done / total)
            text = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}"
        else:
            text = f"{done} tasks done"
        print(f"\r{text}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            print(file=sys.stderr, flush=True)

