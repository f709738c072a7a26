"""mmexec: process-parallel NumPy without copies.

``MemmapExecutor`` is a drop-in ``concurrent.futures.ProcessPoolExecutor``
that passes large arrays to workers as memory maps, on loky's reusable
worker processes. ``DaskExecutor`` (extra ``mmexec[dask]``) runs the same
calls on a dask.distributed cluster; it is imported on first use, so
``import mmexec`` never imports dask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING

from loky import BrokenProcessPool

from ._errors import (
    AbortedError,
    FileChangedError,
    LocalMemmapError,
    MainGuardError,
    MmexecError,
    ParallelTimeoutError,
    ResultError,
    TempFolderError,
)
from ._executor import MemmapExecutor
from ._memmap import dump, has_shareable_memory, load
from ._parallel import (
    Parallel,
    cpu_count,
    delayed,
    effective_n_jobs,
    parallel_backend,
    parallel_config,
    register_parallel_backend,
)

if _TYPE_CHECKING:
    from ._dask import DaskExecutor

__version__ = "0.2.0.dev0"

__all__ = [
    "AbortedError",
    "BrokenProcessPool",
    "DaskExecutor",
    "FileChangedError",
    "LocalMemmapError",
    "MainGuardError",
    "MemmapExecutor",
    "MmexecError",
    "Parallel",
    "ParallelTimeoutError",
    "ResultError",
    "TempFolderError",
    "__version__",
    "cpu_count",
    "delayed",
    "dump",
    "effective_n_jobs",
    "has_shareable_memory",
    "load",
    "parallel_backend",
    "parallel_config",
    "register_parallel_backend",
]


def __getattr__(name: str) -> object:
    # DaskExecutor lives in an optional part: import it on first use (as
    # concurrent.futures does with its executors).
    if name == "DaskExecutor":
        from ._dask import DaskExecutor

        return DaskExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "DaskExecutor"})
