"""mmexec: process-parallel NumPy without copies.

``MemmapExecutor`` is a drop-in ``concurrent.futures.ProcessPoolExecutor``
that passes large arrays to workers as memory maps, on loky's reusable
worker processes.
"""

from __future__ import annotations

from loky import BrokenProcessPool

from ._errors import MainGuardError, MmexecError, TempFolderError
from ._executor import MemmapExecutor
from ._memmap import dump, has_shareable_memory, load
from ._parallel import Parallel, delayed, parallel_config

__version__ = "0.1.0"

__all__ = [
    "BrokenProcessPool",
    "MainGuardError",
    "MemmapExecutor",
    "MmexecError",
    "Parallel",
    "TempFolderError",
    "__version__",
    "delayed",
    "dump",
    "has_shareable_memory",
    "load",
    "parallel_config",
]
