"""Freed dumps and results kept for a moment, so the next dump or result can reuse their pages.

Writing into a fresh tmpfs file allocates and zeroes every page (about
3 GB/s here); copying into pages that are already allocated and mapped runs
at memory speed (about 11 GB/s). Loops that pass a new array of the same size
to every round of tasks hit this case all the time. A freed dump is therefore
kept for :data:`SPARE_TTL` seconds (at most :data:`SPARE_LIMIT` bytes in
all, shared by every executor of the process, so that back-to-back
``Parallel`` calls benefit too); a background thread maps and pre-faults it
off the critical path, and closes whatever was not reused in time. A spare is
an unlinked file held only by its descriptor: nothing is visible in any
folder, and the kernel frees it if the process dies.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SPARES", "SPARE_COUNT", "SPARE_LIMIT", "SPARE_TTL", "Spare", "SparePool", "map_spare"]

#: Seconds a freed dump is kept for reuse before it is deleted.
SPARE_TTL = 2.0
#: Bytes of freed dumps kept at most, in the whole process.
SPARE_LIMIT = 2**30
#: Freed dumps kept at most (each holds a descriptor).
SPARE_COUNT = 64
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
try:
    _madvise: Any = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # no libc madvise: spares are faulted in by their first use
    _madvise = None


@dataclass(eq=False)
class Spare:
    """A freed dump: its descriptor, the path tasks open, its size, maybe a parent map."""

    fd: int
    path: str
    capacity: int
    where: str  # the temp folder it was made in: reused only for dumps bound there
    released: float
    flat: np.ndarray | None = None


class SparePool:
    """A small pool of freed dump files, trimmed by a background thread."""

    def __init__(self, limit: int = SPARE_LIMIT, ttl: float = SPARE_TTL) -> None:
        self.limit = limit
        self.ttl = ttl
        self._lock = threading.Lock()
        self._items: list[Spare] = []
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False

    def put(self, fd: int, path: str, capacity: int, where: str) -> bool:
        """Keep a freed dump; False (and the caller closes it) when over the limit."""
        with self._lock:
            if (
                self._closed
                or len(self._items) >= SPARE_COUNT
                or capacity + sum(s.capacity for s in self._items) > self.limit
            ):
                return False
            self._items.append(Spare(fd, path, capacity, where, time.monotonic()))
            if self._thread is None:
                self._thread = threading.Thread(target=self._tend, name="mmexec-spares", daemon=True)
                self._thread.start()
            self._wake.notify()
            return True

    def take(self, nbytes: int, where: str) -> Spare | None:
        """The smallest dump kept in ``where`` of at least ``nbytes`` (and at most twice that)."""
        with self._lock:
            fits = [s for s in self._items if s.where == where and nbytes <= s.capacity <= 2 * nbytes]
            if not fits:
                return None
            best = min(fits, key=lambda s: s.capacity)
            self._items.remove(best)
            return best

    def drop(self) -> None:
        """Free every kept dump now (the pool stays usable)."""
        with self._lock:
            items, self._items = self._items, []
            self._wake.notify()
        for spare in items:
            _drop(spare)

    def close(self) -> None:
        """Free every kept dump and keep no more."""
        with self._lock:
            self._closed = True
        self.drop()

    def _tend(self) -> None:
        with self._lock:
            while self._items and not self._closed:
                todo = next((s for s in self._items if s.flat is None), None)
                if todo is not None:
                    self._lock.release()
                    try:
                        flat = map_spare(todo)
                    finally:
                        self._lock.acquire()
                    if todo in self._items:
                        if flat is None:  # cannot be mapped: useless as a spare, drop it
                            self._items.remove(todo)
                            _drop(todo)
                        else:
                            todo.flat = flat
                    continue
                now = time.monotonic()
                expired = [s for s in self._items if now - s.released >= self.ttl]
                for spare in expired:
                    self._items.remove(spare)
                    _drop(spare)
                if self._items:
                    oldest = min(s.released for s in self._items)
                    self._wake.wait(max(0.0, oldest + self.ttl - now))
            self._thread = None


def map_spare(spare: Spare) -> np.ndarray | None:
    """Map a spare and fault its pages in, writable, so that a dump into it runs at memory speed.

    The faulting is a ctypes call (``madvise(MADV_POPULATE_WRITE)``), which
    releases the GIL: ``mmap(MAP_POPULATE)`` from Python holds it for the
    whole populate (about 35 ms per 200 MB here), stalling every thread.
    """
    try:
        m = mmap.mmap(spare.fd, spare.capacity, flags=mmap.MAP_SHARED)
    except (OSError, ValueError):
        return None
    flat = np.frombuffer(m, dtype=np.uint8)
    if _madvise is not None:
        _madvise(flat.ctypes.data, spare.capacity, _MADV_POPULATE_WRITE)  # a failure only costs speed
    return flat


def _drop(spare: Spare) -> None:
    spare.flat = None
    os.close(spare.fd)


#: The process-wide pool every store uses.
SPARES = SparePool()
