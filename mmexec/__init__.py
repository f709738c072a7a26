"""mmexec: process-parallel NumPy without copies.

``MemmapExecutor`` is a drop-in ``concurrent.futures.ProcessPoolExecutor``
that passes large arrays to workers as memory maps, on loky's reusable
worker processes. ``DaskExecutor`` (extra ``mmexec[dask]``) runs the same
calls on a dask.distributed cluster; it is imported on first use, so
``import mmexec`` never imports dask.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

from . import _exit  # noqa: F401  (registers the exit hook now: see _exit)
from ._compat import BrokenProcessPool  # (loky's: _compat imports loky first, keeping joblib's start method)
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

if _TYPE_CHECKING:
    from ._dask import DaskExecutor
    from ._executor import MemmapExecutor
    from ._joblib import register_joblib
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

#: Imported on first use (PEP 562), as concurrent.futures does with its executors: a worker
#: process imports ``mmexec._bootstrap`` without numpy or the rest of the package, and
#: ``import mmexec`` never imports dask.
_LAZY = {
    "DaskExecutor": "._dask",
    "MemmapExecutor": "._executor",
    "dump": "._memmap",
    "has_shareable_memory": "._memmap",
    "load": "._memmap",
    "Parallel": "._parallel",
    "cpu_count": "._parallel",
    "delayed": "._parallel",
    "effective_n_jobs": "._parallel",
    "parallel_backend": "._parallel",
    "parallel_config": "._parallel",
    "register_parallel_backend": "._parallel",
    "register_joblib": "._joblib",
}

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
    "register_joblib",
    "register_parallel_backend",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
