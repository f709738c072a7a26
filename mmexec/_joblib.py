"""A joblib backend named ``'mmexec'``: any joblib user's code on :class:`~mmexec.MemmapExecutor`.

``mmexec.register_joblib()`` registers it with joblib's backend registry.
Then, inside ``joblib.parallel_config(backend='mmexec', n_jobs=...)``,
``joblib.Parallel`` (and what is built on it: scikit-learn's ``n_jobs``)
runs each batch of calls on the shared warm workers, with mmexec's array
passing. joblib stays in charge of what it owns (batching, ``pre_dispatch``,
``return_as``, ``timeout``, ordering, nested calls); this backend gives it
an executor per ``Parallel`` call (or per ``with Parallel(...)`` block), as
joblib's own ``'loky'`` backend does, and honours joblib's ``n_jobs``,
``max_nbytes``, ``mmap_mode``, ``temp_folder`` and
``inner_max_num_threads``. Options of :class:`~mmexec.MemmapExecutor`
(``initializer``, ``initargs``, ``max_tasks_per_child``, ``mp_context``)
are passed as backend parameters: ``parallel_config(backend='mmexec',
initializer=...)``.

When a call fails (or joblib's ``timeout`` passes), joblib calls
:meth:`MemmapBackend.abort_everything`: this executor's calls not started
are cancelled and the running ones interrupted (their worker killed after
a grace period), so the error is raised at once and the warm workers stay.

joblib is optional (``pip install 'mmexec[joblib]'``): this module is
imported only by :func:`register_joblib` and by a joblib worker unpickling
nothing of it (the backend itself never travels).
"""

from __future__ import annotations

import multiprocessing
import threading
import warnings
from concurrent.futures import Future
from typing import Any

from ._executor import MemmapExecutor
from ._parallel import ABORT_GRACE, cpu_count
from ._records import Outcomes
from ._store import Session

try:
    from joblib import parallel as _joblib_parallel
except ImportError as _exc:  # joblib is an optional dependency
    _joblib_parallel = None
    _MISSING: ImportError | None = _exc
else:
    _MISSING = None

__all__ = ["BACKEND_NAME", "register_joblib"]

#: The name joblib knows the backend by.
BACKEND_NAME = "mmexec"
#: Backend parameters passed on to :class:`~mmexec.MemmapExecutor` (joblib's own ones are handled here).
EXECUTOR_OPTIONS = ("initializer", "initargs", "max_tasks_per_child", "mp_context")
#: What joblib's ``Parallel`` passes to every backend's ``configure`` that does not concern this one.
_IGNORED = ("prefer", "require", "verbose", "context")


def register_joblib(make_default: bool = False) -> None:
    """Register mmexec as joblib's backend ``'mmexec'``.

    Then ``with joblib.parallel_config(backend='mmexec', n_jobs=4): ...``
    runs joblib's ``Parallel`` (scikit-learn's ``n_jobs`` too) on
    :class:`~mmexec.MemmapExecutor`'s warm workers, large arrays passed
    as memory maps. ``make_default=True`` makes it joblib's default backend
    for the whole process. Calling it again does no harm.

    Raises ``ImportError`` when joblib is not installed (``pip install
    'mmexec[joblib]'``).

    .. versionadded:: 0.2.0
    """
    if _joblib_parallel is None:
        raise ImportError(
            "mmexec.register_joblib() needs joblib, which is not installed: pip install 'mmexec[joblib]'"
        ) from _MISSING
    _joblib_parallel.register_parallel_backend(BACKEND_NAME, MemmapBackend, make_default=make_default)


class _Batch:
    """One of joblib's batches, run in a worker where the backend is registered too, so that a task's own
    ``Parallel(backend='mmexec')`` finds it (joblib's registry is per process)."""

    __slots__ = ("calls",)

    def __init__(self, calls: Any) -> None:
        self.calls = calls

    def __call__(self) -> Any:
        register_joblib()
        return self.calls()


if _joblib_parallel is not None:

    class MemmapBackend(
        _joblib_parallel.AutoBatchingMixin, _joblib_parallel.ParallelBackendBase  # type: ignore[misc]  # (untyped)
    ):
        """joblib's ``ParallelBackendBase`` on a :class:`~mmexec.MemmapExecutor` (see the module docstring)."""

        supports_retrieve_callback = True
        supports_inner_max_num_threads = True
        supports_sharedmem = False
        uses_threads = False
        default_n_jobs = 1

        def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None,
                     **backend_kwargs: Any) -> None:
            unknown = sorted(set(backend_kwargs) - set(EXECUTOR_OPTIONS) - set(_IGNORED))
            if unknown:
                raise TypeError(
                    f"the {BACKEND_NAME!r} joblib backend got unknown parameter(s) {', '.join(unknown)}; "
                    f"it takes joblib's n_jobs, max_nbytes, mmap_mode, temp_folder and inner_max_num_threads, "
                    f"and MemmapExecutor's {', '.join(EXECUTOR_OPTIONS)}"
                )
            super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads,
                             **backend_kwargs)
            self._executor: MemmapExecutor | None = None
            self._scope: Session | None = None
            self.parallel: Any = None

        # -- joblib's hooks ----------------------------------------------------
        def effective_n_jobs(self, n_jobs: int | None) -> int:
            """joblib's rules (as its ``'loky'`` backend): -1 is every CPU; 1 in a daemonic process or below a
            thread of a nested call, with joblib's warning."""
            if n_jobs == 0:
                raise ValueError("n_jobs == 0 in Parallel has no meaning")
            if n_jobs is None:
                return 1
            if multiprocessing.current_process().daemon:
                if n_jobs != 1:
                    warnings.warn("mmexec-backed parallel loops cannot be called in a daemonic process, "
                                  "setting n_jobs=1", stacklevel=3)
                return 1
            if threading.current_thread() is not threading.main_thread() and self.nesting_level != 0:
                if n_jobs != 1:
                    warnings.warn("mmexec-backed parallel loops cannot be nested below threads, setting n_jobs=1",
                                  stacklevel=3)
                return 1
            if n_jobs < 0:
                return max(cpu_count() + 1 + n_jobs, 1)
            return int(n_jobs)

        def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: str | None = None,
                      require: str | None = None, **backend_kwargs: Any) -> int:
            """Start this call's (or this ``with`` block's) executor, on the warm workers; the number of
            workers. One job falls back to joblib's sequential backend, as ``'loky'`` does."""
            n_jobs = self.effective_n_jobs(n_jobs)
            if n_jobs == 1:
                raise _joblib_parallel.FallbackToBackend(
                    _joblib_parallel.SequentialBackend(nesting_level=self.nesting_level)
                )
            options = {**self.backend_kwargs, **backend_kwargs}
            for name in _IGNORED:
                options.pop(name, None)
            array_options = {name: options.pop(name) for name in ("max_nbytes", "mmap_mode", "temp_folder")
                             if name in options}
            unknown = sorted(set(options) - set(EXECUTOR_OPTIONS))
            if unknown:
                raise TypeError(f"the {BACKEND_NAME!r} joblib backend does not take {', '.join(unknown)}")
            if self._executor is not None:  # (reconfigured: joblib's abort_everything with ensure_ready)
                self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = MemmapExecutor(
                n_jobs, options.get("mp_context"), options.get("initializer"), tuple(options.get("initargs", ())),
                max_tasks_per_child=options.get("max_tasks_per_child"),
                inner_max_num_threads=self.inner_max_num_threads, **array_options,
            )
            self.parallel = parallel
            return n_jobs

        def start_call(self) -> None:
            """A ``Parallel`` call starts: its batches compare each array with its dump once (as
            :class:`mmexec.Parallel`'s calls)."""
            self._scope = MemmapExecutor.new_scope()

        def stop_call(self) -> None:
            self._scope = None

        def submit(self, func: Any, callback: Any = None) -> Future[Outcomes]:
            """Send one of joblib's batches (a picklable callable) to a worker."""
            if self._executor is None:
                raise RuntimeError(
                    f"the {BACKEND_NAME!r} joblib backend has no executor: its Parallel call or block ended"
                )
            future = self._executor.submit_batch([(_Batch(func), (), {})], scope=self._scope)
            if callback is not None:
                future.add_done_callback(callback)
            return future

        def retrieve_result_callback(self, future: Future[Outcomes]) -> Any:
            return future.result().checked()[0]

        def abort_everything(self, ensure_ready: bool = True) -> None:
            """Cancel this executor's calls not started, interrupt the running ones; the workers stay warm."""
            executor = self._executor
            if executor is not None:
                executor.abort(grace=ABORT_GRACE)
            if not ensure_ready:
                self.terminate()

        def terminate(self) -> None:
            """The call (or block) ended: shut its executor down; its files go, the workers stay warm."""
            executor, self._executor = self._executor, None
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
            self.reset_batch_stats()
