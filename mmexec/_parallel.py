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
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from numbers import Integral
from typing import Any, TypeVar

import loky

from ._base import ExecutorBase
from ._errors import AbortedError, ParallelTimeoutError
from ._executor import MemmapExecutor
from ._options import DEFAULT_MAX_NBYTES
from ._records import Outcomes
from ._worker import in_worker

__all__ = [
    "Parallel",
    "cpu_count",
    "delayed",
    "effective_n_jobs",
    "parallel_backend",
    "parallel_config",
    "register_parallel_backend",
]

T = TypeVar("T")
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]

RETURN_AS = ("list", "generator", "generator_unordered")
#: After an error or a timeout, a task still running this long after the abort has its worker killed.
ABORT_GRACE = 0.5
#: batch_size='auto' aims at batches lasting between these many seconds (as joblib).
MIN_BATCH_SECONDS, MAX_BATCH_SECONDS = 0.2, 2.0
_MAX_AUTO_BATCH = 10_000
_STARTED: Any = object()  # what a run's generator yields first, once its first batches are sent


class _Delayed:
    """``delayed(function)``: calling it returns ``(function, args, kwargs)``.

    A small object instead of ``functools.wraps`` on a closure, which costs
    about 5 us per ``delayed(f)`` (the generator in ``Parallel(...)(delayed(f)(x)
    for x in xs)`` makes one per item). It answers ``__name__``, ``__doc__``,
    ``__module__``, ``__wrapped__`` (so ``inspect.signature``) as the function,
    and pickles and copies as ``delayed(function)``.
    """

    def __init__(self, function: Callable[..., Any]) -> None:
        # Instance attributes shadow the class's own __doc__ and __module__ (plain strings there, so
        # pickle still finds this class by name).
        attributes = self.__dict__
        attributes["__wrapped__"] = function
        attributes["__doc__"] = getattr(function, "__doc__", None)
        attributes["__module__"] = getattr(function, "__module__", __name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Call:
        return self.__wrapped__, args, kwargs

    def __getattr__(self, name: str) -> Any:
        try:
            function = self.__dict__["__wrapped__"]
        except KeyError:  # a copy being built: not set yet
            raise AttributeError(name) from None
        return getattr(function, name)

    def __reduce__(self) -> tuple[Any, tuple[Callable[..., Any]]]:
        return delayed, (self.__wrapped__,)

    def __repr__(self) -> str:
        return f"delayed({self.__wrapped__!r})"


def delayed(function: Callable[..., T]) -> Callable[..., Call]:
    """Capture ``function(*args, **kwargs)`` as a ``(function, args, kwargs)`` triple.

    .. versionadded:: 0.1.0
    """
    if not callable(function):
        raise TypeError(f"delayed() needs a callable, not {type(function).__name__}")
    return _Delayed(function)


# ------------------------------------------------------------------ backends
#: Backends known by name; a registered name maps to a factory of executors.
_BUILTIN = {"loky": "loky", "multiprocessing": "loky", "processes": "loky", "threading": "threading",
            "sequential": "sequential", "dask": "dask"}


class _Backends:
    """The backends registered by name (:func:`register_parallel_backend`) and the default one: the process's
    (one instance, :data:`_BACKENDS`), as joblib's registry."""

    def __init__(self) -> None:
        self.registered: dict[str, Callable[..., Executor]] = {}
        self.default = "loky"


_BACKENDS = _Backends()
VALID_PREFER = ("processes", "threads", None)
VALID_REQUIRE = ("sharedmem", None)


def register_parallel_backend(name: str, factory: Callable[..., Executor], make_default: bool = False) -> None:
    """Name a backend: ``Parallel(backend=name)`` then runs on ``factory(n_jobs, **backend_kwargs)``.

    The factory returns any ``concurrent.futures.Executor`` (a
    ``ProcessPoolExecutor``, a ``MemmapExecutor`` with options of your
    choice, an executor of your own). ``Parallel`` calls it with the number
    of workers and the keyword arguments given to ``Parallel`` or
    ``parallel_config``, for each call (or once per ``with Parallel(...)``
    block), and shuts the executor down after it. ``make_default=True``
    makes it the backend of every ``Parallel`` not given one. As in joblib,
    ``n_jobs=1`` runs the calls in the caller. This is joblib's
    ``register_parallel_backend``, with an executor factory in place of a
    ``ParallelBackendBase`` class.

    .. versionadded:: 0.2.0
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a backend name must be a non-empty string, not {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be a callable returning a concurrent.futures.Executor, not {factory!r}")
    _BACKENDS.registered[name] = factory
    if make_default:
        _BACKENDS.default = name


def _backend_names() -> list[str]:
    return sorted({*_BUILTIN, *_BACKENDS.registered})


def _check_backend(backend: Any) -> Any:
    """``backend`` if it names a backend or is an Executor; joblib's ``Invalid backend`` error otherwise."""
    if backend is None or isinstance(backend, Executor) or backend in _BACKENDS.registered or backend in _BUILTIN:
        return backend
    if isinstance(backend, str):
        raise ValueError(f"Invalid backend: {backend}, expected one of {_backend_names()}")
    if hasattr(backend, "Pool") and hasattr(backend, "Lock"):  # a multiprocessing context, as joblib takes
        return backend
    raise ValueError(
        f"Invalid backend: {backend!r}. Pass a backend name (one of {_backend_names()}), a "
        "concurrent.futures.Executor, or register a factory with register_parallel_backend(). joblib's "
        "backend objects (ParallelBackendBase) are not supported."
    )


def cpu_count(only_physical_cores: bool = False) -> int:
    """The number of CPUs this process may use (loky's count: affinity and container quotas included).

    .. versionadded:: 0.2.0
    """
    return int(loky.cpu_count(only_physical_cores=only_physical_cores))


class _BackendOptionError(ValueError, AssertionError):
    """An option the chosen backend cannot take (also an AssertionError, which joblib raises there)."""


class BackendName(str):
    """A backend's name as ``parallel_config`` gives it, with joblib's ``nesting_level``.

    ``nesting_level`` is 0 in the caller and 1 inside a task of a
    ``Parallel`` (in a worker process or a worker thread), as joblib's
    backend objects say.

    .. versionadded:: 0.2.0
    """

    nesting_level: int

    def __new__(cls, name: str, nesting_level: int = 0) -> BackendName:
        self = super().__new__(cls, name)
        self.nesting_level = nesting_level
        return self


_nesting = threading.local()  # .depth: how many Parallel batches this thread is running (threads backend)


def _nesting_level() -> int:
    return (1 if in_worker() else 0) + getattr(_nesting, "depth", 0)


# ------------------------------------------------------------------ config
_DEFAULTS: dict[str, Any] = {
    "n_jobs": None,
    "backend": None,
    "verbose": 0,
    "temp_folder": None,
    "max_nbytes": DEFAULT_MAX_NBYTES,
    "mmap_mode": "c",
    "prefer": None,
    "require": None,
    "backend_params": {},
}
_config: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("mmexec_parallel_config", default=None)
_UNSET: Any = object()


class parallel_config:  # noqa: N801 - joblib's name
    """Context manager setting the defaults of every ``Parallel`` created inside it.

    ``parallel_config(backend=None, *, n_jobs, verbose, temp_folder,
    max_nbytes, mmap_mode, prefer, require, inner_max_num_threads,
    **backend_params)``, as joblib's. Options not given keep the outer
    block's value; nested blocks restore the outer ones on exit. The backend
    may be given by position (``parallel_config("threading", n_jobs=2)``);
    ``inner_max_num_threads`` and other keyword arguments are passed to that
    backend's executor (``initializer``, ``initargs``, ...), and need a
    backend name.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        backend: str | Executor | None = _UNSET,
        *,
        n_jobs: int | None = _UNSET,
        verbose: int = _UNSET,
        temp_folder: str | None = _UNSET,
        max_nbytes: int | float | str | None = _UNSET,
        mmap_mode: str = _UNSET,
        prefer: str | None = _UNSET,
        require: str | None = _UNSET,
        inner_max_num_threads: int | None = None,
        **backend_params: Any,
    ) -> None:
        if inner_max_num_threads is not None:
            backend_params["inner_max_num_threads"] = inner_max_num_threads
        if backend is _UNSET or backend is None:
            if backend_params:
                raise ValueError(
                    "inner_max_num_threads and other constructor parameters backend_params are only "
                    f"supported when backend is not None (got {sorted(backend_params)})"
                )
        else:
            backend = _check_backend(backend)
            if backend_params and not isinstance(backend, str):
                raise ValueError("Constructor parameters backend_params are only supported when backend is a string.")
            if inner_max_num_threads is not None and isinstance(backend, str) and _BUILTIN.get(backend) in (
                "threading", "sequential"
            ):
                raise _BackendOptionError(
                    f"backend {backend!r} does not accept setting the inner_max_num_threads argument: "
                    "it runs tasks in this process"
                )
        given: dict[str, Any] = {"backend": backend, "n_jobs": n_jobs, "verbose": verbose, "temp_folder": temp_folder,
                 "max_nbytes": max_nbytes, "mmap_mode": mmap_mode, "prefer": prefer, "require": require}
        self._options = {k: v for k, v in given.items() if v is not _UNSET}
        if "backend" in self._options:
            self._options["backend_params"] = backend_params
        self._tokens: list[contextvars.Token[dict[str, Any] | None]] = []
        # As joblib's, the configuration applies from here (so a caller may skip the with block and
        # call unregister() later); entering the block returns it.
        self._tokens.append(_config.set({**(_config.get() or {}), **self._options}))

    def __enter__(self) -> dict[str, Any]:
        config = {**_DEFAULTS, **(_config.get() or {})}
        if isinstance(config["backend"], str):
            config["backend"] = BackendName(config["backend"], _nesting_level())
        return config

    def __exit__(self, *exc: object) -> None:
        self.unregister()

    def unregister(self) -> None:
        """Restore the configuration that held before this one (``__exit__`` does it).

        Called in another context than the one that created the block (another
        thread, another asyncio task), it restores the previous configuration
        there, as joblib does, and raises nothing; calling it again in the
        creating context then undoes the block there too.
        """
        while self._tokens:
            token = self._tokens[-1]
            try:
                _config.reset(token)
            except ValueError:  # a token of another context
                previous = token.old_value
                _config.set(None if previous is contextvars.Token.MISSING else previous)
                return
            self._tokens.pop()


class parallel_backend(parallel_config):  # noqa: N801 - joblib's name
    """joblib's older form of :class:`parallel_config`: ``parallel_backend(backend, n_jobs=-1, **params)``.

    Entering it returns ``(backend, n_jobs)``.

    .. versionadded:: 0.2.0
    """

    def __init__(
        self, backend: str | Executor, n_jobs: int | None = -1, inner_max_num_threads: int | None = None,
        **backend_params: Any,
    ) -> None:
        super().__init__(backend, n_jobs=n_jobs, inner_max_num_threads=inner_max_num_threads, **backend_params)

    def __enter__(self) -> tuple[Any, Any]:  # type: ignore[override]
        config = super().__enter__()
        return config["backend"], config["n_jobs"]


def _option(name: str, value: Any) -> Any:
    if value is not _UNSET:
        return value
    return (_config.get() or {}).get(name, _DEFAULTS[name])


def _as_n_jobs(n_jobs: Any) -> int | None:
    """``n_jobs`` as an int (numpy integers and floats too, floats rounded down, as joblib), or None."""
    if n_jobs is None:
        return None
    if isinstance(n_jobs, bool) or isinstance(n_jobs, str):
        raise ValueError(f"n_jobs must be an integer or None, got {n_jobs!r}")
    try:
        return int(n_jobs)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"n_jobs could not be converted to int: {n_jobs!r}") from None


def _workers(n_jobs: int | None) -> int:
    """joblib's rule: None is 1, -1 all CPUs, -2 all but one, and so on; 0 is an error."""
    n_jobs = _as_n_jobs(n_jobs)
    if n_jobs is None:
        return 1
    if n_jobs == 0:
        raise ValueError("n_jobs == 0 has no meaning: use n_jobs=1 to run sequentially, -1 for all CPUs")
    if n_jobs < 0:
        return max(1, cpu_count() + 1 + n_jobs)
    return n_jobs


def effective_n_jobs(n_jobs: int | None = -1) -> int:
    """How many calls can run at once for this ``n_jobs`` (joblib's function).

    ``-1`` is every CPU, ``-2`` all but one, and so on. ``None`` reads the
    ``n_jobs`` of the enclosing :class:`parallel_config`, and is 1 outside one.

    .. versionadded:: 0.2.0
    """
    if n_jobs is None:
        n_jobs = (_config.get() or {}).get("n_jobs")
    return _workers(n_jobs)


def _run_batch(calls: list[Call]) -> Outcomes:
    """Run a batch in this process (threads, foreign executors), until a call fails (as joblib's batches)."""
    outcomes = Outcomes([])
    _nesting.depth = getattr(_nesting, "depth", 0) + 1
    try:
        for fn, args, kwargs in calls:
            outcomes.values.append(fn(*args, **kwargs))
    except Exception as exc:
        outcomes.error = exc
    finally:
        _nesting.depth -= 1
    return outcomes


def _nesting_refusal(backend: Any) -> str | None:
    """joblib's warning when a process backend is nested where joblib runs it with one job, else None.

    Below a thread of a ``'threading'`` Parallel (each thread would start its
    own pool of processes), and ``'multiprocessing'`` inside a worker.
    """
    if not isinstance(backend, str) or _BUILTIN.get(backend) != "loky":
        return None
    kind = "Multiprocessing" if backend == "multiprocessing" else "Loky"
    if getattr(_nesting, "depth", 0) and threading.current_thread() is not threading.main_thread():
        return f"{kind}-backed parallel loops cannot be nested below threads, setting n_jobs=1"
    if backend == "multiprocessing" and in_worker():
        return "Multiprocessing-backed parallel loops cannot be nested, setting n_jobs=1"
    return None


class Parallel:
    """joblib-compatible ``Parallel``: ``Parallel(n_jobs=2)(delayed(f)(x) for x in xs)``.

    Parameters follow joblib: ``n_jobs``, ``backend`` (``'loky'`` /
    ``'processes'`` / ``'multiprocessing'`` run on :class:`MemmapExecutor`,
    ``'threading'``, ``'sequential'``, ``'dask'``, a name given to
    :func:`register_parallel_backend`, or any ``concurrent.futures.Executor``),
    ``return_as`` (``'list'``, ``'generator'``, ``'generator_unordered'``),
    ``verbose``, ``timeout`` (seconds without any batch finishing; raises
    :class:`~mmexec.ParallelTimeoutError`, a ``TimeoutError`` and a
    ``multiprocessing.TimeoutError``), ``pre_dispatch``, ``batch_size``
    (``'auto'`` or an int), ``temp_folder``, ``max_nbytes``, ``mmap_mode``,
    ``prefer`` and ``require``. Other keyword arguments (``initializer``,
    ``initargs``, ``inner_max_num_threads``, ...) go to the backend's
    executor, as joblib passes them to its backend. mmexec adds
    ``progress_bar`` (tqdm if installed, else a text bar on stderr) and
    ``callback(index, result)``, called in the caller as each task finishes.

    Work starts when the instance is called, for every ``return_as``; a
    generator then consumes the input lazily, ``pre_dispatch`` calls ahead.
    An instance runs one call at a time: calling it again while a generator
    it returned is still open raises ``RuntimeError``. Used as a context
    manager, the workers are kept across calls.

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
        **backend_kwargs: Any,
    ) -> None:
        if return_as not in RETURN_AS:
            raise ValueError(f"return_as must be one of {RETURN_AS}, got {return_as!r}")
        if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, Integral)
                                     or batch_size < 1):
            raise ValueError(f"batch_size must be 'auto' or a positive integer, got: {batch_size!r}")
        prefer, require = _option("prefer", prefer), _option("require", require)
        if prefer not in VALID_PREFER:
            raise ValueError(f"prefer={prefer} is not a valid backend hint, expected one of {VALID_PREFER}")
        if require not in VALID_REQUIRE:
            raise ValueError(f"require={require} is not a valid backend constraint, expected one of {VALID_REQUIRE}")
        if prefer == "processes" and require == "sharedmem":
            raise ValueError("prefer == 'processes' and require == 'sharedmem' are inconsistent settings")
        self.return_as = return_as
        self.timeout = timeout
        self.batch_size: int | str = batch_size if batch_size == "auto" else int(batch_size)
        self.verbose = _option("verbose", verbose)
        self.progress_bar = progress_bar
        self.callback = callback
        self.temp_folder = _option("temp_folder", temp_folder)
        self.max_nbytes = _option("max_nbytes", max_nbytes)
        self.mmap_mode = _option("mmap_mode", mmap_mode)
        n_jobs = _UNSET if n_jobs is None else n_jobs  # None means "not given", as joblib
        config = _config.get() or {}
        if backend is _UNSET or backend is None:
            chosen, from_config = config.get("backend"), True
            self._backend_kwargs = {**config.get("backend_params", {}), **backend_kwargs}
        else:
            chosen, from_config = _check_backend(backend), False
            self._backend_kwargs = dict(backend_kwargs)
        self.backend = self._choose_backend(chosen, from_config, prefer, require)
        if from_config and self.backend == "threading" and chosen not in (None, "threading"):
            n_jobs = 1 if n_jobs is _UNSET else n_jobs  # require='sharedmem' overrode the block's backend
        requested = _as_n_jobs(_option("n_jobs", n_jobs))
        if requested in (None, -1) and self.backend == "dask":
            from ._dask import cluster_threads

            requested = cluster_threads()  # every thread of the cluster (needs a client now)
        if requested is None and isinstance(self.backend, Executor):
            requested = getattr(self.backend, "_max_workers", 1)
        self._workers = _workers(requested)
        self.n_jobs = 1 if requested is None else requested
        refusal = _nesting_refusal(self.backend) if self._workers > 1 else None
        if refusal is not None:
            warnings.warn(refusal, UserWarning, stacklevel=2)
            self._workers = 1
        if self._workers == 1 and not isinstance(self.backend, Executor) and self.backend != "dask":
            self.backend = "sequential"
        self.pre_dispatch = self._pre_dispatch_count(pre_dispatch)
        self._executor: Executor | None = None
        self._managed = False
        self._lock = threading.Lock()
        self._running = False
        self._run: _Run | None = None  # the call running now (its generator may still be open)

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _choose_backend(backend: Any, from_config: bool, prefer: str | None, require: str | None) -> Any:
        """The backend: a name, an Executor, or a multiprocessing context, following joblib's hints."""
        if backend is None:
            if require == "sharedmem" or prefer == "threads":
                return "threading"
            return "sequential" if in_worker() else _BACKENDS.default
        shares_memory = backend in ("threading", "sequential") or isinstance(backend, ThreadPoolExecutor)
        if require == "sharedmem" and not shares_memory:
            if from_config:  # as joblib: the block's backend gives way to threads
                return "threading"
            raise ValueError(f"Backend {backend!r} does not support shared memory (require='sharedmem')")
        return backend

    def _pre_dispatch_count(self, pre_dispatch: int | str) -> int | None:
        if pre_dispatch == "all":
            return None
        if isinstance(pre_dispatch, str):
            expr = pre_dispatch.replace("n_jobs", str(self._workers))
            if not all(c in "0123456789*+- ." for c in expr):
                raise ValueError(f"pre_dispatch must be 'all', an int or an expression of n_jobs, got {pre_dispatch!r}")
            pre_dispatch = int(eval(expr, {"__builtins__": {}}))  # digits and + - * only
        if pre_dispatch < 1:
            raise ValueError(f"pre_dispatch must be at least 1, got {pre_dispatch!r}")
        return int(pre_dispatch)

    def _make_executor(self) -> Executor | None:
        backend, kwargs = self.backend, self._backend_kwargs
        if isinstance(backend, Executor):
            return backend
        if backend == "sequential":
            return None
        if backend in _BACKENDS.registered:
            executor = _BACKENDS.registered[backend](self._workers, **kwargs)
            if not isinstance(executor, Executor):
                raise TypeError(
                    f"the factory registered for backend {backend!r} returned {type(executor).__name__}, "
                    "not a concurrent.futures.Executor"
                )
            return executor
        kind = _BUILTIN.get(backend, "loky")  # a multiprocessing context runs on MemmapExecutor too
        if kind == "loky":
            if not isinstance(backend, str):
                kwargs = {"mp_context": backend, **kwargs}
            return MemmapExecutor(
                self._workers, max_nbytes=self.max_nbytes, mmap_mode=self.mmap_mode, temp_folder=self.temp_folder,
                **kwargs,
            )
        if kind == "threading":
            return ThreadPoolExecutor(self._workers, **kwargs)
        from ._dask import DaskExecutor

        return DaskExecutor(max_nbytes=self.max_nbytes, **kwargs)

    def __enter__(self) -> Parallel:
        self._executor = self._make_executor()
        self._managed = True
        return self

    def __exit__(self, *exc: object) -> None:
        """Shut the block's executor down; a call whose generator is still open is aborted first (as joblib)."""
        self._managed = False
        executor, self._executor = self._executor, None
        run = self._run
        if run is not None:
            run.abort()
        if executor is not None and executor is not self.backend:
            # threads cannot be interrupted: after an abort, do not wait for the running ones
            executor.shutdown(wait=run is None or isinstance(executor, ExecutorBase), cancel_futures=True)

    def __repr__(self) -> str:
        return f"Parallel(n_jobs={self.n_jobs})"

    # ------------------------------------------------------------------ run
    def __call__(self, iterable: Iterable[Call]) -> Any:
        """Run the calls; a list, or a generator as ``return_as`` says."""
        with self._lock:
            if self._running:
                message = "This Parallel instance is already running !"
                if self.return_as != "list":
                    message += (
                        " Before submitting new tasks, you must wait for the completion of all the previous "
                        "tasks, or clean all references to the output generator."
                    )
                raise RuntimeError(message)
            self._running = True
        try:
            if self._managed:
                executor, owned = self._executor, False
            else:
                executor, owned = self._make_executor(), not isinstance(self.backend, Executor)
            if executor is None and self.timeout is not None:
                warnings.warn(
                    "The backend class 'SequentialBackend' does not support timeout. You have set "
                    f"'timeout={self.timeout}' in Parallel but the 'timeout' parameter will not be used.",
                    UserWarning,
                    stacklevel=2,
                )
            self._run = run = _Run(self, executor, owned, iterable)
            results = run.results()
        except BaseException:
            self._running, self._run = False, None
            raise
        next(results)  # sends the first batches now; from here the generator's clean-up ends the run
        if self.return_as == "list":
            return list(results)
        return results

    def _done(self) -> None:
        self._running, self._run = False, None


class _Run:
    """One call of a Parallel: dispatch, collect, report, clean up."""

    def __init__(self, parallel: Parallel, executor: Executor | None, owned: bool, calls: Iterable[Call]) -> None:
        self.p = parallel
        self.executor = executor
        self.owned = owned
        self.calls: Iterator[Call] = calls  # type: ignore[assignment]  # made an iterator when the run starts
        self.scope = executor.new_scope() if isinstance(executor, ExecutorBase) else None
        self.completed = False
        self.done_queue: queue.SimpleQueue[tuple[Future[Any], int, int, float]] = queue.SimpleQueue()
        self.in_flight: dict[Future[Any], int] = {}
        self.n_dispatched = 0
        self.n_done = 0
        self.exhausted = False
        self.aborted = False
        self.batch_size = 1 if parallel.batch_size == "auto" else int(parallel.batch_size)
        self.start = time.monotonic()
        self.bar = _ProgressBar(parallel.progress_bar)

    def log(self, message: str) -> None:
        print(f"[{self.p!r}]: {message}", file=sys.stderr, flush=True)

    def results(self) -> Iterator[Any]:
        """The results; the first ``next()`` (by ``Parallel.__call__``) only starts the work."""
        try:
            self.calls = iter(self.calls)
            if self.p.verbose:
                kind = type(self.executor).__name__ if self.executor is not None else "sequential"
                self.log(f"Using {kind} with {self.p._workers} concurrent workers.")
            if self.executor is None:
                yield _STARTED
                yield from self._sequential()
            else:
                if self.p.pre_dispatch is None:  # 'all': take every call now
                    everything = list(self.calls)
                    if self.p.batch_size == "auto":
                        self.batch_size = max(1, len(everything) // (8 * self.p._workers))
                    self.calls = iter(everything)
                self._dispatch_some()
                yield _STARTED
                yield from self._parallel()
            if self.p.verbose:
                self.log(f"Done {self.n_done} out of {self.n_done} | elapsed: {self._elapsed()} finished")
            self.completed = True
        finally:
            self._finish()

    # sequential ------------------------------------------------------------
    def _sequential(self) -> Iterator[Any]:
        calls: Iterable[Call] = self.calls
        if self.batch_size > 1:  # the input is read a batch at a time, as joblib does
            batches = iter(lambda: list(itertools.islice(self.calls, self.batch_size)), [])
            calls = itertools.chain.from_iterable(batches)
        for index, (fn, args, kwargs) in enumerate(calls):
            value = fn(*args, **kwargs)
            self._completed(index, [value])
            yield value

    # parallel --------------------------------------------------------------
    def _dispatch_some(self) -> None:
        """Dispatch batches until ``pre_dispatch`` batches are in flight (joblib counts batches)."""
        limit = self.p.pre_dispatch
        while not self.exhausted and not self.aborted and (limit is None or len(self.in_flight) < limit):
            batch = list(itertools.islice(self.calls, self.batch_size))
            if not batch:
                self.exhausted = True
                return
            self._submit(batch)

    def _submit(self, batch: list[Call]) -> None:
        first, count, sent = self.n_dispatched, len(batch), time.monotonic()
        executor = self.executor
        if isinstance(executor, ExecutorBase):
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
            raise ParallelTimeoutError(
                f"no task finished within timeout={self.p.timeout} s; the remaining tasks were cancelled"
            ) from None

    def _parallel(self) -> Iterator[Any]:
        ordered = self.p.return_as != "generator_unordered"
        waiting: dict[int, list[Any]] = {}  # first index -> values, for in-order delivery
        next_index = 0
        while self.in_flight:
            fut, first, count, sent = self._next_done()
            if self.aborted:  # the with block ended meanwhile (maybe from another thread)
                break
            self.in_flight.pop(fut, None)
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
        if self.aborted:
            raise AbortedError(
                "this Parallel call was aborted before all its results were taken: its `with Parallel(...)` "
                "block ended while the generator it returned was still open"
            )

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
        self.bar.update(self.n_done, None if not self.exhausted else self.n_dispatched, self.n_dispatched)
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
        try:
            self.abort()
            self.bar.close()
            if self.owned and self.executor is not None:
                # threads cannot be interrupted: after an error, do not wait for the running ones (as joblib)
                wait = self.completed or isinstance(self.executor, ExecutorBase)
                self.executor.shutdown(wait=wait, cancel_futures=True)
        finally:
            self.p._done()

    def abort(self) -> None:
        """Stop this call's tasks in flight: cancel those not started, interrupt the running ones."""
        # (every result taken, the generator not yet at its end: nothing is aborted)
        self.aborted = not self.completed and (bool(self.in_flight) or not self.exhausted)
        in_flight = list(self.in_flight)
        self.in_flight.clear()
        if isinstance(self.executor, ExecutorBase) and in_flight and not self.completed:
            self.executor.abort(in_flight, grace=ABORT_GRACE)
        else:
            for fut in in_flight:
                fut.cancel()


def _should_report(before: int, after: int, verbose: int) -> bool:
    """verbose >= 10 reports every finished batch; below, at powers of two, as joblib."""
    if verbose >= 10:
        return True
    return (after & (after - 1)) == 0 or (before.bit_length() != after.bit_length())


class _ProgressBar:
    """tqdm when installed, else text on stderr; nothing when off.

    The text fallback draws one bar of fixed width on a terminal (while the
    input is still being read, against the calls sent so far, marked ``+``),
    and, when stderr is not a terminal (a log file, CI), plain lines without
    carriage returns: one per tenth of the work, or per second at most.
    """

    WIDTH = 30

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._tqdm: Any = None
        self._tty = False
        self._last_line = -1.0  # (plain lines) when the last one was written
        self._last_tenth = -1
        self._done = 0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                self._tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
                return
            self._tqdm = tqdm(unit="task")

    def update(self, done: int, total: int | None, sent: int | None = None) -> None:
        if not self.enabled:
            return
        self._done = done
        if self._tqdm is not None:
            if total is not None:
                self._tqdm.total = total
            self._tqdm.update(done - self._tqdm.n)
            return
        known = total if total is not None else max(sent or 0, done)
        more = "" if total is not None else "+"
        if self._tty:
            filled = int(self.WIDTH * done / known) if known else 0
            text = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{known}{more}"
            print(f"\r{text:<{self.WIDTH + 24}}", end="", file=sys.stderr, flush=True)
            return
        tenth = 10 * done // known if known and total is not None else -1
        now = time.monotonic()
        if tenth > self._last_tenth or now - self._last_line >= 1.0:
            self._last_tenth, self._last_line = max(tenth, self._last_tenth), now
            print(f"mmexec: {done}/{known}{more} tasks done", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._tty:
            print(file=sys.stderr, flush=True)
