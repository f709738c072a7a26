"""Which pages of an array were written since it was last looked at, in O(pages written).

A dump is reused for an array passed again only if the array is unchanged.
Comparing every byte with the dump costs 8-30 ms per 200 MB on every hand-over.
Linux (6.7 and later) can say instead which pages were written since they were
write-protected, without trapping the writes: a ``userfaultfd`` registered in
*asynchronous write-protect* mode (``UFFD_FEATURE_WP_ASYNC``) lets every write
go through and only clears the page's protection bit, and the ``PAGEMAP_SCAN``
ioctl lists the pages whose bit is clear and sets it again, atomically
(``PM_SCAN_WP_MATCHING``). For 200 MB that takes about 0.01 ms. The store then
compares only those pages with the dump (:mod:`mmexec._store`).

A :class:`Watch` covers the whole pages inside one array's memory; the partial
pages at its head and tail are always compared by bytes (:meth:`Watch.dirty`).
What the user pays: the first write to a page after it was protected takes a
minor fault (about 1 us per 4 KiB page, and a huge page is split). So the store
protects only an array it has found unchanged once by comparing bytes, and stops
protecting one that keeps changing.

Only what the kernel tracks exactly is watched: private anonymous memory
(``malloc``'s, where NumPy's arrays live: its own maps, the heap, thread
arenas). A write through another map of
a shared or file mapping would not be seen there, so such arrays are compared
by bytes. Every failure (no ``userfaultfd``, a kernel without these features, a
seccomp filter, ``EPERM``, ``EBUSY`` because something else already watches the
range) means "no watch": the store compares bytes, as without this module, and
a debug message on the ``mmexec`` logger says why. ``MMEXEC_DIRTY_PAGES=0``
turns watching off. Devices write memory pinned for them (``io_uring`` fixed
buffers, RDMA) without the CPU, unseen: while the process has pinned memory
(``VmPin``), no watch is set or trusted.

A watch is undone (``UFFDIO_UNREGISTER``) when the store lets it go, and by a
weakref finalizer of the array, which runs before NumPy frees the memory (a
system call, no lock). After a fork the child never uses the parent's
descriptors (they act on the parent's memory): every call checks the pid, and
the child closes its copies.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._memmap import address_of

__all__ = ["ENV_SWITCH", "MAX_DROPS", "MIN_BYTES", "TRACKER", "Tracked", "Tracker", "Watch", "enabled"]

#: Environment variable: ``0`` (or ``off``, ``false``, ``no``) turns dirty-page tracking off.
ENV_SWITCH = "MMEXEC_DIRTY_PAGES"
#: Arrays smaller than this are compared by bytes (about 1 ms): a watch would not pay for its set-up.
MIN_BYTES = 16 * 2**20
#: Watches undone because an array had changed (or refused), after which it is checked without one for good: an
#: array rewritten between hand-overs would pay a fault per page on every rewrite, more than a full check costs.
MAX_DROPS = 2

_LOG = logging.getLogger("mmexec")
_PAGE = mmap.PAGESIZE

# The userfaultfd system call's number (the ioctl numbers below are the same on both).
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "arm64": 282}.get(platform.machine())
_UFFD_USER_MODE_ONLY = 1
_UFFD_API = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_API = 0xC018AA3F
_UFFDIO_REGISTER = 0xC020AA00
_UFFDIO_UNREGISTER = 0x8010AA01
_UFFDIO_WRITEPROTECT = 0xC018AA06
_UFFDIO_REGISTER_MODE_WP = 2
_UFFDIO_WRITEPROTECT_MODE_WP = 1
_PAGEMAP_SCAN = 0xC0606610
_PM_SCAN_WP_MATCHING = 1
_PM_SCAN_CHECK_WPASYNC = 2
_PAGE_IS_WRITTEN = 2
_REGIONS = 256  # page regions read per PAGEMAP_SCAN call
_MAX_RANGES = 64  # written ranges compared one by one; beyond, their whole span at once

_U64 = ctypes.c_uint64
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


def enabled() -> bool:
    """False when ``MMEXEC_DIRTY_PAGES`` turns tracking off (read on every new watch)."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() not in ("0", "off", "false", "no")


def _ioctl(fd: int, request: int, arg: Any) -> int:
    """``ioctl(fd, request, &arg)``; OSError on failure."""
    if _libc.ioctl(fd, request, ctypes.addressof(arg)) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return 0


def pinned_bytes() -> int:
    """Memory this process has pinned for devices (``VmPin``: ``io_uring`` fixed buffers, RDMA): devices write
    it without the CPU, so no write-protection sees their writes. 0 where the kernel does not say."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmPin:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _unregister(fd: int, start: int, length: int, pid: int) -> None:
    """Undo a watch (from a finalizer: a system call, no lock); nothing in another process, or if it is gone."""
    if os.getpid() != pid:
        return
    arg = (_U64 * 2)(start, length)  # (kept alive through the call)
    _libc.ioctl(fd, _UFFDIO_UNREGISTER, ctypes.addressof(arg))


class Watch:
    """The whole pages inside one array's memory, write-protected: :meth:`dirty` says which were written."""

    __slots__ = ("__weakref__", "_finalizer", "address", "end", "nbytes", "pid", "start", "tracker")

    def __init__(self, tracker: Tracker, a: np.ndarray, start: int, end: int) -> None:
        self.tracker = tracker
        self.address = address_of(a)
        self.nbytes = a.nbytes
        self.start, self.end = start, end  # page-aligned, inside the array's memory
        self.pid = os.getpid()
        self._finalizer = weakref.finalize(a, _unregister, tracker.uffd, start, end - start, self.pid)
        self._finalizer.atexit = False

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def covers(self, a: np.ndarray) -> bool:
        """True when ``a``'s memory is still the memory watched: the same address and size, contiguous (an
        array given a new buffer, ``__setstate__``, or new strides in place keeps its identity, not its memory)."""
        return (
            address_of(a) == self.address and a.nbytes == self.nbytes
            and (a.flags.c_contiguous or a.flags.f_contiguous)
        )

    @property
    def edges(self) -> list[tuple[int, int]]:
        """The byte ranges of the array (offsets from its first byte) outside the watched pages: the partial
        pages at its head and tail, which only a comparison of their bytes can judge."""
        ranges = [(0, self.start - self.address)] if self.start > self.address else []
        if self.address + self.nbytes > self.end:
            ranges.append((self.end - self.address, self.nbytes))
        return ranges

    def written(self) -> list[tuple[int, int]] | None:
        """The byte ranges of the array written since the watch was set or this was last called, whole pages
        (protected again at once, atomically). None when the answer is not known (the watch is then undone):
        compare every byte."""
        if not self.alive or os.getpid() != self.pid:
            return None
        if pinned_bytes():  # (a device may have written since, unseen)
            _LOG.debug("mmexec: memory pinned for devices (VmPin): comparing bytes")
            self.stop()
            return None
        written = self.tracker.scan(self.start, self.end)
        if written is None:
            self.stop()
            return None
        return [(lo - self.address, hi - self.address) for lo, hi in written]

    def dirty(self) -> list[tuple[int, int]] | None:
        """:meth:`written` and :attr:`edges`: every byte range that may differ from when the watch was set or
        this was last called; None when not known."""
        written = self.written()
        return None if written is None else self.edges + written

    def stop(self) -> None:
        """Undo the watch (idempotent): writes to the array cost nothing any more."""
        self._finalizer()


@dataclass(eq=False)
class Tracked:
    """What a store knows of one array's changes since it handed over its copy (a dump, a scattered copy), and
    when to watch the array: ``proven`` once a full check found it unchanged; from its next check on, ``watch``;
    ``drops``: watches undone because the array had changed, or refused (at :data:`MAX_DROPS` none is tried
    again). Checked one at a time (``lock``: a scan protects again the pages it reports, for that check only);
    ``discarded`` once the store let go of it."""

    proven: bool = False
    watch: Watch | None = None
    drops: int = 0
    discarded: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def let_go(self) -> None:
        """The store no longer checks the array against this copy: undo the watch. Waits for a check in
        progress, which then sets none."""
        with self.lock:
            self.discarded = True
            watch, self.watch = self.watch, None
        if watch is not None:
            watch.stop()

    def move(self) -> Tracked:
        """The state, moved out to the store adopting the copy (this one is let go, its watch not undone)."""
        with self.lock:
            self.discarded = True
            moved = Tracked(self.proven, self.watch, self.drops)
            self.watch = None
        return moved

    def unchanged(
        self, a: np.ndarray, watched: Callable[[Watch], bool | None], full: Callable[[Watch | None], bool],
        may_watch: bool = True,
    ) -> bool:
        """Whether ``a`` is unchanged since its copy was made (under ``lock``).

        ``watched(watch)`` judges the pages written since the last check
        (None: it cannot tell); ``full(new)`` checks everything, ``new`` being
        the watch set just before it (or None). An array found unchanged by
        ``full`` is watched from its next check on; the watch is set before
        that check, so a write made during it shows in the next scan.
        ``may_watch`` False: no watch, as where the copy may change other than
        through ``a``. Whatever watch does not end up on the state (the array
        changed, a watch was refused, an exception such as Ctrl-C) is undone.
        """
        watch, self.watch = self.watch, None
        new = None
        try:
            if watch is not None and (not may_watch or not watch.covers(a)):  # (``a`` got another buffer, or
                watch.stop()  # strides, in place)
            elif watch is not None:
                verdict = watched(watch)  # (the pages it lists are protected again: this check must conclude)
                if verdict:
                    self.watch, watch = watch, None
                    return True
                watch.stop()
                if verdict is False:  # changed: the next copy of ``a`` is proven and watched afresh, if ever
                    self.drops += 1
                    return False
            if self.proven and self.drops < MAX_DROPS and may_watch:
                new = TRACKER.watch(a)
                self.drops += new is None  # (refused: shared memory, EBUSY... tried again at most once)
            if not full(new):
                return False
            self.proven = True
            if new is not None and not self.discarded:  # (let go during the check: nothing would undo a watch)
                self.watch, new = new, None
            return True
        finally:
            for left in (watch, new):
                if left is not None and left is not self.watch:
                    left.stop()


class Tracker:
    """One process's ``userfaultfd`` and ``/proc/self/pagemap`` descriptors, opened on first use, and its
    watches (never two on the same page: a scan for one would clear what the other has yet to see)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self.uffd = -1
        self._pagemap = -1
        self._broken: str | None = None
        self._watches: list[Watch] = []

    # -- set-up --------------------------------------------------------
    def _open(self) -> bool:
        """Open the descriptors once per process (under the lock); False, with the reason kept, if unsupported."""
        if self._pid == os.getpid():
            return self.uffd >= 0
        self._pid = os.getpid()
        try:
            if _SYS_USERFAULTFD is None:
                raise OSError(errno.ENOSYS, f"no userfaultfd system call known for {platform.machine()}")
            flags = os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY
            fd = int(_libc.syscall(_SYS_USERFAULTFD, flags))
            if fd < 0:
                code = ctypes.get_errno()
                raise OSError(code, f"userfaultfd: {os.strerror(code)}")
            try:
                api = (_U64 * 3)(_UFFD_API, _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED, 0)
                _ioctl(fd, _UFFDIO_API, api)
                if not api[1] & _UFFD_FEATURE_WP_ASYNC:
                    raise OSError(errno.ENOTSUP, "userfaultfd has no asynchronous write-protect mode")
                pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            self._broken = f"{exc} (Linux 6.7 or later, without a seccomp filter that refuses userfaultfd)"
            _LOG.debug("mmexec: dirty-page tracking unavailable, comparing bytes instead: %s", self._broken)
            return False
        self.uffd, self._pagemap, self._broken = fd, pagemap, None
        return True

    @property
    def reason(self) -> str | None:
        """Why tracking is unavailable in this process (None: available, or not tried yet)."""
        return self._broken

    def available(self) -> bool:
        """True when this process can watch memory (opens the descriptors if needed)."""
        with self._lock:
            return self._open()

    # -- watches -------------------------------------------------------
    def watch(self, a: np.ndarray) -> Watch | None:
        """Write-protect the whole pages of ``a``'s memory (contiguous, at least :data:`MIN_BYTES`); None when
        that is not possible or not exact (then compare bytes)."""
        if not enabled() or a.nbytes < MIN_BYTES or not (a.flags.c_contiguous or a.flags.f_contiguous):
            return None
        address = address_of(a)
        start = -(-address // _PAGE) * _PAGE
        end = (address + a.nbytes) // _PAGE * _PAGE
        with self._lock:
            if not self._open():
                return None
            self._watches = [w for w in self._watches if w.alive]
            if any(w.start < end and start < w.end for w in self._watches):
                return None  # (another dump of the same memory is watched: this one compares bytes)
            why = "in a process with memory pinned for devices (VmPin)" if pinned_bytes() else ""
            why = why or _not_private_anonymous(start, end)
            if why:
                _LOG.debug("mmexec: array at %#x compared by bytes: its memory is %s", address, why)
                return None
            try:
                _ioctl(self.uffd, _UFFDIO_REGISTER, (_U64 * 4)(start, end - start, _UFFDIO_REGISTER_MODE_WP, 0))
            except OSError as exc:  # EBUSY: another userfaultfd watches it (a debugger, another library)
                _LOG.debug("mmexec: array at %#x compared by bytes: UFFDIO_REGISTER: %s", address, exc)
                return None
            try:
                watch = Watch(self, a, start, end)
            except BaseException:  # (Ctrl-C: nothing would undo the registration)
                _unregister(self.uffd, start, end - start, os.getpid())
                raise
            try:
                _ioctl(self.uffd, _UFFDIO_WRITEPROTECT, (_U64 * 3)(start, end - start, _UFFDIO_WRITEPROTECT_MODE_WP))
                self._watches.append(watch)
            except BaseException as exc:
                watch.stop()
                if not isinstance(exc, OSError):
                    raise
                _LOG.debug("mmexec: array at %#x compared by bytes: UFFDIO_WRITEPROTECT: %s", address, exc)
                return None
            return watch

    def scan(self, start: int, end: int) -> list[tuple[int, int]] | None:
        """The written page ranges in ``[start, end)``, each protected again as it is reported; None on failure
        (``EPERM``: the range is no longer watched, e.g. it was unmapped and mapped again). Beyond
        :data:`_MAX_RANGES` ranges, one range from the first written byte to the last (one comparison costs
        less than thousands)."""
        regions = (_U64 * (3 * _REGIONS))()
        found = np.frombuffer(regions, dtype=np.uint64).reshape(_REGIONS, 3)  # type: ignore[call-overload]
        arg = (_U64 * 12)(96, _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC, start, end, 0,
                          ctypes.addressof(regions), _REGIONS, 0, 0, _PAGE_IS_WRITTEN, 0, _PAGE_IS_WRITTEN)
        written: list[tuple[int, int]] = []
        while True:
            n = _libc.ioctl(self._pagemap, _PAGEMAP_SCAN, ctypes.addressof(arg))
            if n < 0:
                _LOG.debug("mmexec: PAGEMAP_SCAN failed (%s): comparing bytes", os.strerror(ctypes.get_errno()))
                return None
            if n:
                if len(written) + n <= _MAX_RANGES:
                    written += [(int(lo), int(hi)) for lo, hi in found[:n, :2].tolist()]
                else:
                    written = [(written[0][0] if written else int(found[0, 0]), int(found[n - 1, 1]))]
            walk_end = arg[4]
            if walk_end >= end:
                return written
            if walk_end <= arg[2]:
                return None  # (no progress: never loop)
            arg[2] = walk_end  # (the vector was full: go on from where the walk stopped)

    def _after_fork_in_child(self) -> None:
        """The descriptors act on the parent's memory: close the child's copies; the child opens its own."""
        for fd in (self.uffd, self._pagemap):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._lock = threading.Lock()
        self.uffd = self._pagemap = self._pid = -1
        self._watches = []


def _not_private_anonymous(start: int, end: int) -> str:
    """Why ``[start, end)`` is not all private, writable, anonymous memory ("" if it is)."""
    covered = start
    try:
        with open("/proc/self/maps", "rb") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        return f"unknown ({exc})"
    for line in lines:
        fields = line.split(None, 5)
        lo_hi, perms, inode = fields[0], fields[1], fields[4]
        lo, hi = (int(x, 16) for x in lo_hi.split(b"-"))
        if hi <= covered or lo >= end:
            continue
        if lo > covered:
            return "not mapped throughout"
        name = fields[5].strip() if len(fields) > 5 else b""
        anonymous = not name or name == b"[heap]" or name.startswith(b"[anon:")  # (malloc's memory)
        if perms[:2] != b"rw" or perms[3:4] != b"p" or inode != b"0" or not anonymous:
            return f"a {perms.decode()} mapping of {name.decode(errors='replace') or 'anonymous memory'}"
        covered = hi
        if covered >= end:
            return ""
    return "not mapped throughout"


#: The process-wide tracker.
TRACKER = Tracker()
os.register_at_fork(after_in_child=TRACKER._after_fork_in_child)
