"""The exceptions mmexec raises.

Each class subclasses :class:`MmexecError` *and* the builtin a caller already
catches, so ``except OSError`` or ``except TypeError`` keeps working::

    Exception
     +-- MmexecError
          +-- TempFolderError      (also OSError)
          +-- MainGuardError       (also RuntimeError)
          +-- LocalMemmapError     (also TypeError)
          +-- ResultError          (also RuntimeError)
          +-- AbortedError         (also concurrent.futures.CancelledError)
          +-- ParallelTimeoutError (also TimeoutError and multiprocessing.TimeoutError)
          +-- FileChangedError     (also OSError)

Worker deaths are reported with loky's ``TerminatedWorkerError``, a subclass
of :class:`concurrent.futures.process.BrokenProcessPool`.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from concurrent.futures import CancelledError

__all__ = [
    "AbortedError",
    "FileChangedError",
    "LocalMemmapError",
    "MainGuardError",
    "MmexecError",
    "ParallelTimeoutError",
    "ResultError",
    "TempFolderError",
]


class MmexecError(Exception):
    """Base class of every error raised by mmexec itself.

    .. versionadded:: 0.1.0
    """


class TempFolderError(MmexecError, OSError):
    """A dump could not be written: the temp folder is missing, not writable or full.

    The message names the folder, the bytes needed and free, and how to choose
    another folder (``temp_folder=`` or the ``MMEXEC_TEMP_FOLDER`` variable).

    .. versionadded:: 0.1.0
    """


class MainGuardError(MmexecError, RuntimeError):
    """A worker tried to start a pool while importing the caller's ``__main__``.

    This happens when a script creates an executor at module level without an
    ``if __name__ == "__main__":`` guard.

    .. versionadded:: 0.1.0
    """


class LocalMemmapError(MmexecError, TypeError):
    """A task for another machine was given an ``np.memmap`` (or a view of one).

    ``DaskExecutor`` runs tasks on machines that cannot open the caller's
    files, so a memmap can neither be passed by reference nor written into.
    The message names the file and says what to pass instead: a copy
    (``np.array(x)``) to send the data, or results returned by the tasks.

    .. versionadded:: 0.1.0
    """


class AbortedError(MmexecError, CancelledError):
    """The result of a task that ``abort()`` stopped while it ran.

    A subclass of :class:`concurrent.futures.CancelledError`, so code that
    handles cancelled futures handles aborted ones too (but ``cancelled()``
    is False: the task had started).

    .. versionadded:: 0.2.0
    """


class ResultError(MmexecError, RuntimeError):
    """A task finished, but its result could not be rebuilt in the caller.

    The message names the cause (a missing file, too many open files, an
    object that cannot be unpickled) and what to do. Only that task's future
    fails: the workers and the other tasks are unaffected.

    .. versionadded:: 0.2.0
    """


class FileChangedError(MmexecError, OSError):
    """A task's ``np.memmap`` argument names a file that is no longer the one the caller mapped.

    Memory-mapped arguments travel as their path; the worker checks that the
    path still leads to the same file (device and inode) and fails the task
    with this error when the file was replaced or deleted since the caller
    mapped it, instead of reading another file's data.

    .. versionadded:: 0.2.0
    """


_TIMEOUT_BASES: tuple[type, ...] = tuple(
    dict.fromkeys([multiprocessing.TimeoutError, concurrent.futures.TimeoutError, TimeoutError])
)


class ParallelTimeoutError(MmexecError, *_TIMEOUT_BASES):  # type: ignore[misc]
    """``Parallel(timeout=...)`` saw no task finish within ``timeout`` seconds.

    A subclass of the builtin :class:`TimeoutError` (which is also
    ``concurrent.futures.TimeoutError``) and of ``multiprocessing.TimeoutError``,
    which joblib raises: ``except`` clauses written for either catch it.

    .. versionadded:: 0.2.0
    """
