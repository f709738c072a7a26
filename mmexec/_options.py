"""Parse and validate user options. Pure functions, no side effects."""

from __future__ import annotations

import errno
import os
import re
import tempfile

from ._errors import TempFolderError

__all__ = [
    "DEFAULT_MAX_NBYTES",
    "ENV_TEMP_FOLDER",
    "parse_max_nbytes",
    "resolve_temp_folder",
    "validate_mmap_mode",
]

#: Environment variable that overrides where dumps go (after ``temp_folder=``).
ENV_TEMP_FOLDER = "MMEXEC_TEMP_FOLDER"
#: Default threshold, as joblib: arrays larger than 1 MiB are memory-mapped.
DEFAULT_MAX_NBYTES = "1M"
SHM_FOLDER = "/dev/shm"

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
MMAP_MODES = ("r", "r+", "w+", "c")


def parse_max_nbytes(value: int | float | str | None) -> int | None:
    """Return the threshold in bytes, or None when memory-mapping is off.

    Accepts a number of bytes (``1e6``) or a string with a binary unit as
    joblib does (``'1M'`` is 2**20 bytes; ``'500K'``, ``'2G'``).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"max_nbytes must be a number of bytes, a string like '1M' or None, not {value!r}")
    if isinstance(value, (int, float)):
        if value != value or value < 0:
            raise ValueError(f"max_nbytes must be >= 0, got {value!r}")
        if value == float("inf"):
            return None  # no array is larger than infinity: never map (as None)
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None:
            raise ValueError(
                f"max_nbytes={value!r} is not a size: use a number of bytes or a "
                "string such as '500K', '1M' or '2G' (binary units), or None"
            )
        return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    raise TypeError(
        f"max_nbytes must be a number of bytes, a string like '1M' or None, not {type(value).__name__}"
    )


def validate_mmap_mode(mode: str | None) -> str | None:
    """Return a valid mode for opening dumped arrays in the workers; None (as joblib) turns mapping off."""
    if mode is None:
        return None
    if mode not in MMAP_MODES:
        raise ValueError(
            f"mmap_mode must be one of {MMAP_MODES}, or None to pass arrays by pickling, got {mode!r}"
        )
    return mode


def resolve_temp_folder(temp_folder: str | os.PathLike[str] | None) -> tuple[str, bool]:
    """Return ``(folder, explicit)``: where dumps go and whether the user chose it.

    Order: the ``temp_folder`` argument, the ``MMEXEC_TEMP_FOLDER`` variable,
    ``/dev/shm`` when it exists and is writable, the system temp folder.
    """
    chosen = os.fspath(temp_folder) if temp_folder is not None else ""
    if chosen:
        return _usable_folder(os.path.abspath(os.path.expanduser(chosen)), "temp_folder"), True
    env = os.environ.get(ENV_TEMP_FOLDER, "")  # '' means unset, for the variable and the argument alike
    if env:
        return _usable_folder(os.path.abspath(os.path.expanduser(env)), ENV_TEMP_FOLDER), True
    if os.path.isdir(SHM_FOLDER) and os.access(SHM_FOLDER, os.W_OK | os.X_OK):
        return SHM_FOLDER, False
    return tempfile.gettempdir(), False


def _usable_folder(folder: str, origin: str) -> str:
    """``folder`` if it is an existing folder where files can live; else a clear error at construction."""
    real = os.path.realpath(folder)
    problem = None
    if real == "/proc" or real.startswith(("/proc/", "/sys/")) or real == "/sys":
        problem = "is in a virtual file system (/proc or /sys), where no file can be created"
    elif os.path.exists(real) and not os.path.isdir(real):
        problem = "is a file, not a folder"
    else:  # a missing folder is created by the store (and removed at shutdown): its parent must be a folder
        parent = real
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            problem = f"cannot be created: {parent!r} is a file, not a folder"
    if problem is not None:
        raise TempFolderError(
            errno.ENOTDIR,
            f"{origin}={folder!r} {problem}. Choose an existing folder, or leave temp_folder and "
            f"{ENV_TEMP_FOLDER} unset to use /dev/shm.",
        )
    return folder


def fallback_temp_folder() -> str:
    """The folder used when ``/dev/shm`` has no room for a dump."""
    return tempfile.gettempdir()
