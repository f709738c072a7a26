"""The process's registry of mmexec's files, and its budget of open descriptors.

:data:`FILES` is owned by the process (a forked child empties it): which
store holds each file's reference path (``owners``), every live store, the
paths inherited from a parent at a fork, the size of the last large result
(to lend freed files of that size), the descriptor budget (:class:`Descriptors`),
the identity of the files behind a caller's own ``np.memmap`` s, and the lock
that serializes reservations of room. Stores (``_store``) keep everything
else about their own files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from ._compat import mmap_of
from ._housekeeper import HOUSEKEEPER
from ._memmap import address_of

if TYPE_CHECKING:
    from ._store import MemmapStore

__all__ = ["FILES", "UNKNOWN_IDENTITY", "Descriptors", "FileRegistry", "from_any_process", "identity"]


class Descriptors:
    """Descriptors this process holds open, against a budget.

    Each file mmexec holds costs about two: the store's descriptor and the
    one that Python's ``mmap`` keeps for a live map. The budget is half the
    soft ``RLIMIT_NOFILE``, counted against the process's real use (the
    program's own files included: ``/proc/self/fd``, read at most every
    :attr:`RECOUNT` seconds, plus what mmexec took since). Beyond it, new
    arrays are pickled and new results copied into memory instead of being
    held as files, so that neither mmexec nor the program runs out.
    """

    PER_FILE = 2
    RECOUNT = 0.05

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = 0  # files mmexec holds now
        self._counted = 0  # descriptors open at the last count
        self._held_then = 0  # ``held`` at the last count
        self._when = -1.0
        self._reserve = -1  # a descriptor on /dev/null, closed to make room in an emergency (see open)
        self._budget = 16

    def budget(self) -> int:
        """Half the soft ``RLIMIT_NOFILE`` (read again at each recount)."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 2**20
        return max(16, soft // 2)

    def add(self, n: int) -> None:
        with self._lock:
            self.held += n

    def in_use(self) -> int:
        """Descriptors open in this process now (recounted at most every RECOUNT seconds)."""
        now = time.monotonic()
        with self._lock:
            if now - self._when >= self.RECOUNT:
                try:
                    self._counted = len(os.listdir("/proc/self/fd"))
                except OSError:
                    self._counted = self.held * self.PER_FILE
                self._held_then, self._when, self._budget = self.held, now, self.budget()
            return self._counted + (self.held - self._held_then) * self.PER_FILE

    def left(self) -> int:
        """Descriptors left in the budget."""
        used = self.in_use()
        return self._budget - used

    def open(self, path: str, flags: int) -> int:
        """``os.open``; if the process is out of descriptors, one is borrowed from a reserve held for this
        (a result already written must still be read)."""
        try:
            return os.open(path, flags)
        except OSError as exc:
            if exc.errno != errno.EMFILE:
                raise
        with self._lock:
            reserve, self._reserve = self._reserve, -1
        if reserve < 0:
            return os.open(path, flags)  # (none left: raises EMFILE again)
        os.close(reserve)
        try:
            return os.open(path, flags)
        finally:
            self._restore_reserve()

    def _restore_reserve(self) -> None:
        try:
            fd = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return  # tried again next time
        with self._lock:
            if self._reserve < 0:
                self._reserve, fd = fd, -1
        if fd >= 0:
            os.close(fd)

    def ensure_reserve(self) -> None:
        """Hold the reserve descriptor (once per process)."""
        if self._reserve < 0:
            self._restore_reserve()


class FileRegistry:
    """The process's registry of mmexec's files: who holds each, and what the process as a whole uses.

    One instance, :data:`FILES`, owned by the process; a forked child empties
    it (``_after_fork_in_child``). Every other piece of state lives in a store.
    """

    def __init__(self) -> None:
        #: reference path -> the store that keeps it open; lets any store hold a dump another made
        #: (a result of one executor passed to another).
        self.owners: weakref.WeakValueDictionary[str, MemmapStore] = weakref.WeakValueDictionary()
        #: Every live store of this process (the fork hooks visit them).
        self.stores: weakref.WeakSet[MemmapStore] = weakref.WeakSet()
        #: In a forked child: the paths of the files its parent's stores held at the fork. Maps of them
        #: inherited by the child show the parent's file, which the parent may reuse: the child passes such
        #: arrays by value (a dump of its own), never by that path.
        self.inherited: set[str] = set()
        #: Bytes of the last large result any executor of this process received: tasks are lent
        #: freed files of about this size for theirs (so back-to-back Parallel calls benefit too).
        self.result_hint = 0
        self.descriptors = Descriptors()
        #: mmap -> ``(st_dev, st_ino)`` of the file it maps (a caller's own np.memmap).
        self.identities: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()
        #: Serializes the reservation of room for new files: two threads that each reserve part of the room
        #: they need before finding there is not enough for both would both fail.
        self.reserve_lock = threading.Lock()


FILES = FileRegistry()


def _files_held() -> bool:
    return FILES.descriptors.held > 0


HOUSEKEEPER.need_while(_files_held)  # a file held in caller code may be released at any time


def from_any_process(path: str) -> str:
    """``path`` as another process must open it: ``/proc/self/...`` and ``/dev/fd/N`` name the caller's."""
    for alias, real in (("/proc/self/", f"/proc/{os.getpid()}/"), ("/dev/fd/", f"/proc/{os.getpid()}/fd/"),
                        ("/proc/thread-self/", f"/proc/{os.getpid()}/task/{threading.get_native_id()}/")):
        if path.startswith(alias):
            return real + path[len(alias):]
    return path


#: ``(st_dev, st_ino)`` meaning "a caller's own file, identity unknown": workers only check it opens.
UNKNOWN_IDENTITY = (0, 0)


def identity(mm: np.memmap, path: str) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of the file ``mm``'s pages come from: the mapping's own file, not what ``path``
    names now (it may have been replaced or deleted since the map was made). Kept per ``mmap`` object, which
    every view of the map shares."""
    key = mmap_of(mm)
    ident = FILES.identities.get(key) if key is not None else None
    if ident is None:
        ident = _mapped_file_identity(address_of(mm)) or _path_identity(path) or UNKNOWN_IDENTITY
        if key is not None:
            with contextlib.suppress(TypeError):
                FILES.identities[key] = ident
    return ident


def _mapped_file_identity(address: int) -> tuple[int, int] | None:
    """The identity of the file mapped at ``address``, through ``/proc/self/map_files`` (same view as a stat
    of its path, overlayfs included); None where that is not readable."""
    try:
        with open("/proc/self/maps", "rb") as f:
            for line in f:
                span = line.split(b" ", 1)[0]
                start, end = (int(x, 16) for x in span.split(b"-"))
                if start <= address < end:
                    st = os.stat(f"/proc/self/map_files/{span.decode()}")
                    return (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return None
    return None


def _path_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
