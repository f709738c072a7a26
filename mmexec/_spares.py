"""Freed dumps and results kept for a moment, so the next dump or result can reuse their pages.

Writing into a fresh tmpfs file allocates and zeroes every page; writing into
pages that are already allocated is about twice as fast (50 MB: 16 ms against
36 ms here). Loops that pass a new array of the same size to every round of
tasks hit this case all the time. A freed dump is therefore kept for
:data:`SPARE_TTL` seconds (at most :data:`SPARE_LIMIT` bytes and
:data:`SPARE_COUNT` files in all, shared by every executor of the process, so
that back-to-back ``Parallel`` calls benefit too); a housekeeping timer closes
whatever was not reused in time. A spare is an unlinked file held only by its
descriptor: nothing is visible in any folder, and the kernel frees it if the
process dies.

A freed dump whose array is still alive (its executor was shut down: a
fresh ``Parallel`` call, or executor, after another) keeps what it holds
(``Spare.content``): the next executor given that same array adopts the file
instead of dumping the array again, once the bytes compare equal
(:meth:`SparePool.adopt`).

Spares are not mapped ahead of use: on this kind of VM, faulting pages in
(even with ``madvise(MADV_POPULATE_WRITE)`` off the GIL) cost more than it
saved, and ``mmap(MAP_POPULATE)`` from Python holds the GIL for the whole
populate (about 35 ms per 200 MB), stalling every thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ._housekeeper import HOUSEKEEPER

__all__ = ["SPARES", "SPARE_COUNT", "SPARE_LIMIT", "SPARE_TTL", "Spare", "SparePool"]

#: Seconds a freed dump is kept for reuse before it is deleted.
SPARE_TTL = 2.0
#: Bytes of freed dumps kept at most, in the whole process.
SPARE_LIMIT = 2**30
#: Freed dumps kept at most (each holds a descriptor).
SPARE_COUNT = 64


class Content(Protocol):
    """What a kept dump holds (the store's record of a live array's dump)."""

    def discard(self) -> None:
        """It will not be adopted: let go of what it keeps (its map, its watch)."""


@dataclass(eq=False)
class Spare:
    """A freed dump: its descriptor, the path tasks open, its size, and when it was freed."""

    fd: int
    path: str
    capacity: int
    where: str  # the temp folder it was made in: reused only for dumps bound there
    released: float
    content: Content | None = None  # what it holds, for :meth:`SparePool.adopt`

    def close(self) -> None:
        """Free the file (outside the pool's lock)."""
        self.forget_content()
        os.close(self.fd)

    def forget_content(self) -> None:
        content, self.content = self.content, None
        if content is not None:
            content.discard()


class SparePool:
    """A small pool of freed dump files; each expires :data:`SPARE_TTL` seconds after it was freed (a
    housekeeping timer, :mod:`mmexec._housekeeper`)."""

    def __init__(self, limit: int = SPARE_LIMIT, ttl: float = SPARE_TTL) -> None:
        self.limit = limit
        self.ttl = ttl
        self._lock = threading.Lock()
        self._items: list[Spare] = []
        self._timer_set = False
        self._closed = False

    def put(self, fd: int, path: str, capacity: int, where: str, content: Content | None = None) -> bool:
        """Keep a freed dump (``content``: what it holds, if it may be adopted as it is); False (and the caller
        closes it) when over the limits."""
        with self._lock:
            if (
                self._closed
                or len(self._items) >= SPARE_COUNT
                or capacity + sum(s.capacity for s in self._items) > self.limit
            ):
                return False
            self._items.append(Spare(fd, path, capacity, where, time.monotonic(), content))
            schedule, self._timer_set = not self._timer_set, True
        if schedule:
            HOUSEKEEPER.call_later(self.ttl, self._expire)
        return True

    def take(self, nbytes: int, where: str) -> Spare | None:
        """The smallest dump kept in ``where`` of at least ``nbytes`` (and at most twice that)."""
        with self._lock:
            fits = [s for s in self._items if s.where == where and nbytes <= s.capacity <= 2 * nbytes]
            if not fits:
                return None
            best = min(fits, key=lambda s: s.capacity)
            self._items.remove(best)
        best.forget_content()  # (its pages are about to hold something else)
        return best

    def adopt(self, where: str, claim: Callable[[Any], bool]) -> Spare | None:
        """The kept dump in ``where`` whose content ``claim`` accepts, taken out of the pool (None if none)."""
        with self._lock:
            for spare in self._items:
                if spare.content is not None and spare.where == where and claim(spare.content):
                    self._items.remove(spare)
                    return spare
        return None

    def drop(self, where: str | None = None) -> int:
        """Free every kept dump now, or those made in the temp folder ``where``; how many (the pool stays
        usable)."""
        with self._lock:
            items = [s for s in self._items if where is None or s.where == where]
            self._items = [s for s in self._items if s not in items]
        for spare in items:
            spare.close()
        return len(items)

    def after_fork_in_child(self) -> None:
        """In a forked child: the kept dumps are the parent's; close the child's copies, start afresh."""
        self._lock = threading.Lock()
        self._timer_set = False
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

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [s for s in self._items if now - s.released >= self.ttl]
            self._items = [s for s in self._items if s not in expired]
            oldest = min((s.released for s in self._items), default=None)
            self._timer_set = oldest is not None
        for spare in expired:
            spare.close()
        if oldest is not None:
            HOUSEKEEPER.call_later(max(0.0, oldest + self.ttl - now), self._expire)


#: The process-wide pool every store uses.
SPARES = SparePool()
