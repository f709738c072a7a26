"""Freed dumps and results kept for a moment, so the next dump or result can reuse their pages.

Writing into a fresh tmpfs file allocates and zeroes every page; writing into
pages that are already allocated is about twice as fast (50 MB: 16 ms against
36 ms here). Loops that pass a new array of the same size to every round of
tasks hit this case all the time. A freed dump is therefore kept for
:data:`SPARE_TTL` seconds (at most :data:`SPARE_LIMIT` bytes and
:data:`SPARE_COUNT` files in all, shared by every executor of the process, so
that back-to-back ``Parallel`` calls benefit too); a background thread closes
whatever was not reused in time. A spare is an unlinked file held only by its
descriptor: nothing is visible in any folder, and the kernel frees it if the
process dies.

Spares are not mapped ahead of use: on this kind of VM, faulting pages in
(even with ``madvise(MADV_POPULATE_WRITE)`` off the GIL) cost more than it
saved, and ``mmap(MAP_POPULATE)`` from Python holds the GIL for the whole
populate (about 35 ms per 200 MB), stalling every thread.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

__all__ = ["SPARES", "SPARE_COUNT", "SPARE_LIMIT", "SPARE_TTL", "Spare", "SparePool"]

#: Seconds a freed dump is kept for reuse before it is deleted.
SPARE_TTL = 2.0
#: Bytes of freed dumps kept at most, in the whole process.
SPARE_LIMIT = 2**30
#: Freed dumps kept at most (each holds a descriptor).
SPARE_COUNT = 64


@dataclass(eq=False)
class Spare:
    """A freed dump: its descriptor, the path tasks open, its size, and when it was freed."""

    fd: int
    path: str
    capacity: int
    where: str  # the temp folder it was made in: reused only for dumps bound there
    released: float


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
        """Keep a freed dump; False (and the caller closes it) when over the limits."""
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

    def drop(self, where: str | None = None) -> None:
        """Free every kept dump now, or those made in the temp folder ``where`` (the pool stays usable)."""
        with self._lock:
            items = [s for s in self._items if where is None or s.where == where]
            self._items = [s for s in self._items if s not in items]
            self._wake.notify()
        for spare in items:
            os.close(spare.fd)

    def after_fork_in_child(self) -> None:
        """In a forked child: the kept dumps are the parent's; close the child's copies, start afresh."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread = None
        items, self._items = self._items, []
        for spare in items:
            try:
                os.close(spare.fd)
            except OSError:
                pass

    def close(self) -> None:
        """Free every kept dump and keep no more."""
        with self._lock:
            self._closed = True
        self.drop()

    def _tend(self) -> None:
        with self._lock:
            while self._items and not self._closed:
                now = time.monotonic()
                expired = [s for s in self._items if now - s.released >= self.ttl]
                for spare in expired:
                    self._items.remove(spare)
                    os.close(spare.fd)
                if self._items:
                    oldest = min(s.released for s in self._items)
                    self._wake.wait(max(0.0, oldest + self.ttl - now))
            self._thread = None


#: The process-wide pool every store uses.
SPARES = SparePool()
