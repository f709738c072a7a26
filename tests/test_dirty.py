"""An array passed again is reused only if unchanged: every kind of write is seen, watched or compared by bytes.

The memmap store watches an array's pages (``mmexec._dirty``: userfaultfd
write-protect and PAGEMAP_SCAN) once a byte comparison has found it unchanged,
and then compares only the pages written since; DaskExecutor's scatter store
does the same with its hashes (only the hash blocks holding written pages are
hashed again). Each test runs on that path and on the fallbacks (tracking
turned off by the environment variable; the range already watched by another
userfaultfd, ``EBUSY``; no userfaultfd at all), and checks what a task would
read: the dump (or the scattered copy) the store hands out must hold the
array's bytes after every kind of write.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmexec._dask as dask_module
import mmexec._dirty as dirty
import mmexec._store as store_module
from mmexec import MemmapExecutor, Parallel, delayed
from mmexec._dask import DaskScatterStore
from mmexec._memmap import open_ref
from mmexec._spares import SPARES
from mmexec._store import Holds, MemmapStore, Session

N = dirty.MIN_BYTES // 8 + 1000  # float64 elements: just over the smallest watched size
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
MADV_DONTNEED = 4

TRACKING = dirty.TRACKER.available()
needs_tracking = pytest.mark.skipif(not TRACKING, reason=f"no dirty-page tracking here: {dirty.TRACKER.reason}")


def address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def registered(a: np.ndarray | tuple[int, int]) -> bool:
    """True when the kernel has any of ``a``'s memory (or the address range ``a``) registered with a
    userfaultfd for write-protection (VmFlags ``uw`` in /proc/self/smaps): what a watch leaves behind if it
    is not undone."""
    lo, hi = a if isinstance(a, tuple) else (address(a), address(a) + a.nbytes)
    span = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                span = (start, end)
            elif line.startswith("VmFlags:") and span is not None and span[0] < hi and lo < span[1]:
                if "uw" in line.split()[1:]:
                    return True
    return False


def whole_pages(a: np.ndarray) -> tuple[int, int]:
    """The byte offsets, in ``a``, of its first and last whole page (the watched span)."""
    start = -(-address(a) // PAGE) * PAGE - address(a)
    end = (address(a) + a.nbytes) // PAGE * PAGE - address(a)
    return start, end


class Harness:
    """One store; ``hand_over`` passes the array as a task would and returns the bytes the task would read."""

    def __init__(self, mmap_mode: str = "r") -> None:
        self.store = MemmapStore(max_nbytes=2**20, mmap_mode=mmap_mode)

    def hand_over(self, a: np.ndarray) -> bytes:
        holds = Holds(Session())
        try:
            ref = self.store.ref_for(a, holds)
            assert ref is not None
            return open_ref(ref).tobytes()
        finally:
            holds.release()

    def watch_of(self, a: np.ndarray) -> dirty.Watch | None:
        return self.store._dumps[id(a)].changes.watch

    def close(self) -> None:
        self.store.close()


class _Future:
    def __init__(self, key: str) -> None:
        self.key = key


class _Client:
    """What DaskScatterStore needs of a dask client: ``scatter``, which keeps a copy of what it was given."""

    def __init__(self) -> None:
        self.copies: dict[str, bytes] = {}

    def scatter(self, a: np.ndarray, hash: bool = False) -> _Future:
        key = f"k{len(self.copies)}"
        self.copies[key] = a.tobytes()
        return _Future(key)


class DaskHarness:
    """As :class:`Harness`, for DaskExecutor's scatter store (on a stand-in client): the bytes a task would
    read are those of the scattered copy."""

    def __init__(self) -> None:
        self.client = _Client()
        self.store = DaskScatterStore(self.client, max_nbytes=2**20)

    def hand_over(self, a: np.ndarray) -> bytes:
        return self.client.copies[self.store._future_for(a, Session()).key]

    def watch_of(self, a: np.ndarray) -> dirty.Watch | None:
        return self.store._entries[id(a)].changes.watch

    def close(self) -> None:
        self.store.close()


@pytest.fixture(params=["memmap", "dask"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness | DaskHarness]:
    h = Harness() if request.param == "memmap" else DaskHarness()
    yield h
    h.close()


def ready(h: Harness | DaskHarness, a: np.ndarray) -> None:
    """Three hand-overs: dumped, found unchanged by bytes, then watched (where the path allows)."""
    for _ in range(3):
        assert h.hand_over(a) == a.tobytes()


# ----------------------------------------------------------------- the paths
PATHS = ["watched", "off", "busy", "unsupported"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[np.ndarray], None]]:
    """Puts a fresh array on one path, and after ``ready`` checks that it is on that path."""
    name = request.param
    other: list[dirty.Tracker] = []
    if name == "watched" and not TRACKING:
        pytest.skip(f"no dirty-page tracking here: {dirty.TRACKER.reason}")
    if name == "off":
        monkeypatch.setenv(dirty.ENV_SWITCH, "0")
    if name == "unsupported":
        monkeypatch.setattr(dirty, "_SYS_USERFAULTFD", None)
        tracker = dirty.Tracker()
        monkeypatch.setattr(dirty, "TRACKER", tracker)

    def prepare(a: np.ndarray) -> None:
        if name == "busy":
            if not TRACKING:
                pytest.skip(f"no dirty-page tracking here: {dirty.TRACKER.reason}")
            other.append(dirty.Tracker())  # another userfaultfd (another library, a debugger) watches it first
            assert other[-1].watch(a) is not None

    prepare.name = name  # type: ignore[attr-defined]
    yield prepare
    for tracker in other:
        for watch in tracker._watches:
            watch.stop()
        os.close(tracker.uffd)


def on_path(h: Harness | DaskHarness, a: np.ndarray, name: str) -> None:
    ready(h, a)
    watch = h.watch_of(a)
    assert (watch is not None) == (name == "watched"), name


# ----------------------------------------------------------------- every kind of write
def write_element(a: np.ndarray) -> None:
    a[len(a) // 2] = -1.0


def write_view(a: np.ndarray) -> None:
    view = a[1000:3000:3]
    view[:] = -2.0


def write_ufunc_out(a: np.ndarray) -> None:
    part = a[len(a) // 3 : len(a) // 3 + 5000]
    np.add(part, 1.0, out=part)


def write_memset(a: np.ndarray) -> None:
    ctypes.memset(address(a) + a.nbytes // 2 + 123, 0xAB, 77)


def write_readinto(a: np.ndarray, tmp_path: os.PathLike[str]) -> None:
    """A kernel write: read(2) into the array's memory."""
    name = os.path.join(os.fspath(tmp_path), "payload")
    with open(name, "wb") as f:
        f.write(os.urandom(3 * PAGE + 100))
    with open(name, "rb", buffering=0) as f:
        target = memoryview(a.view(np.uint8))[a.nbytes // 4 + 5 : a.nbytes // 4 + 5 + 3 * PAGE + 100]
        assert f.readinto(target) == 3 * PAGE + 100  # type: ignore[attr-defined]


def write_uint8_view(a: np.ndarray) -> None:
    a.view(np.uint8)[a.nbytes - a.nbytes // 5] ^= 0xFF


def write_madv_dontneed(a: np.ndarray) -> None:
    """The kernel drops pages: they read back as zeros."""
    start, _ = whole_pages(a)
    at = address(a) + start + 10 * PAGE
    assert _libc.madvise(at, 4 * PAGE, MADV_DONTNEED) == 0, os.strerror(ctypes.get_errno())


def write_head_partial_page(a: np.ndarray) -> None:
    start, _ = whole_pages(a)
    a.view(np.uint8)[max(0, start - 1)] ^= 0x01  # the last byte before the first whole page (or the first byte)


def write_tail_partial_page(a: np.ndarray) -> None:
    a[-1] = -3.0


def write_span_edges(a: np.ndarray) -> None:
    start, end = whole_pages(a)
    raw = a.view(np.uint8)
    raw[start] ^= 0x01  # the first and last byte of the watched span
    raw[end - 1] ^= 0x01


def write_from_another_thread(a: np.ndarray) -> None:
    t = threading.Thread(target=np.copyto, args=(a[len(a) // 2 : len(a) // 2 + 50_000], 7.5))
    t.start()
    t.join()


def write_sort(a: np.ndarray) -> None:
    a[len(a) // 2 : len(a) // 2 + 2 * PAGE].sort()


WRITES = {
    "element": write_element,
    "view": write_view,
    "ufunc-out": write_ufunc_out,
    "memset": write_memset,
    "readinto": write_readinto,
    "uint8-view": write_uint8_view,
    "madv-dontneed": write_madv_dontneed,
    "head-partial-page": write_head_partial_page,
    "tail-partial-page": write_tail_partial_page,
    "span-edges": write_span_edges,
    "another-thread": write_from_another_thread,
    "sort": write_sort,
}


@pytest.mark.parametrize("kind", list(WRITES))
def test_every_kind_of_write_is_seen(harness, path, kind, tmp_path):
    a = np.random.default_rng(1).random(N)
    path(a)
    on_path(harness, a, path.name)
    before = a.tobytes()
    write = WRITES[kind]
    write(a, tmp_path) if kind == "readinto" else write(a)
    assert a.tobytes() != before, "the write changed nothing: the test would prove nothing"
    assert harness.hand_over(a) == a.tobytes()
    assert harness.hand_over(a) == a.tobytes()  # (and again, unchanged since)


def test_a_write_of_the_same_bytes_keeps_the_dump_and_its_watch(harness, path, monkeypatch):
    writes: list[int] = []
    real = store_module.write_array
    monkeypatch.setattr(store_module, "write_array", lambda *args, **kw: writes.append(1) or real(*args, **kw))
    a = np.random.default_rng(2).random(N)
    path(a)
    on_path(harness, a, path.name)
    a[100:200_000] = a[100:200_000].copy()  # every page of it written, no byte changed
    assert harness.hand_over(a) == a.tobytes()
    assert (len(harness.client.copies) if isinstance(harness, DaskHarness) else len(writes)) == 1
    assert (harness.watch_of(a) is not None) == (path.name == "watched")


def test_a_forked_child_writing_its_copy_leaves_the_parents_dump_valid(harness, path):
    a = np.random.default_rng(3).random(N)
    path(a)
    on_path(harness, a, path.name)
    before = a.tobytes()
    pid = fork_quietly()
    if pid == 0:  # the child: write its own copy, and leave at once
        a[:] = 0.0
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert a.tobytes() == before
    assert harness.hand_over(a) == before
    assert (harness.watch_of(a) is not None) == (path.name == "watched")


def test_the_parent_writing_after_a_fork_is_seen(harness, path):
    """The pages are shared copy-on-write with a live child when the parent writes them."""
    a = np.random.default_rng(4).random(N)
    path(a)
    on_path(harness, a, path.name)
    r, w = os.pipe()
    pid = fork_quietly()
    if pid == 0:  # the child: hold the pages shared until the parent has written
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        a[PAGE : 3 * PAGE] = -5.0
        assert harness.hand_over(a) == a.tobytes()
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def fork_quietly() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (multi-threaded fork: the child only writes and exits)
        return os.fork()


# ----------------------------------------------------------------- when a watch is set, kept and undone
@needs_tracking
def test_only_an_array_found_unchanged_by_bytes_is_watched(harness):
    a = np.random.default_rng(5).random(N)
    for k in range(4):  # rewritten before every hand-over: never watched (its rewrites cost no fault)
        a[k] = -float(k)
        assert harness.hand_over(a) == a.tobytes()
        assert harness.watch_of(a) is None
    harness.hand_over(a)  # found unchanged by bytes
    assert harness.watch_of(a) is None
    harness.hand_over(a)
    assert harness.watch_of(a) is not None


@needs_tracking
def test_an_array_that_keeps_changing_after_it_was_watched_stops_being_watched(harness):
    a = np.random.default_rng(6).random(N)
    for drop in range(dirty.MAX_DROPS):
        ready(harness, a)
        watch = harness.watch_of(a)
        assert watch is not None
        a[drop] = 42.0
        assert harness.hand_over(a) == a.tobytes()
        assert harness.watch_of(a) is None and not watch.alive
    for _ in range(5):
        assert harness.hand_over(a) == a.tobytes()
        assert harness.watch_of(a) is None


@needs_tracking
def test_a_watch_is_undone_when_the_array_is_freed_and_its_memory_can_be_watched_again(harness):
    a = np.random.default_rng(7).random(N)
    ready(harness, a)
    watch = harness.watch_of(a)
    assert watch is not None and registered(a)
    del a
    assert not watch.alive
    b = np.random.default_rng(8).random(N)  # (often at the same address)
    ready(harness, b)
    assert harness.watch_of(b) is not None


_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
PROT_RW, MAP_PRIVATE_ANONYMOUS, MAP_FIXED = 3, 0x22, 0x10


def private_memory(nbytes: int, at: int | None = None) -> int:
    """``nbytes`` of private anonymous memory mapped by hand (at ``at``, replacing what is there)."""
    ptr = _libc.mmap(at, nbytes, PROT_RW, MAP_PRIVATE_ANONYMOUS | (MAP_FIXED if at else 0), -1, 0)
    assert ptr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    return int(ptr)


def array_over(ptr: int, nbytes: int, value: float) -> np.ndarray:
    """A float64 array over memory at ``ptr`` that it does not own (it outlives the array), filled with ``value``."""
    a = np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=np.float64)
    a[:] = value
    return a


@needs_tracking
def test_an_array_freed_is_unregistered_before_its_memory_goes():
    """Memory that outlives the array (here mapped by hand, as the heap keeps freed memory): its finalizer
    undid the registration in the kernel."""
    nbytes = N * 8
    ptr = private_memory(nbytes)
    try:
        a = array_over(ptr, nbytes, 1.5)
        watch = dirty.TRACKER.watch(a)
        assert watch is not None and registered((ptr, ptr + nbytes))
        del a
        assert not watch.alive and not registered((ptr, ptr + nbytes))
    finally:
        _libc.munmap(ptr, nbytes)


UNDO_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import mmexec._dirty as dirty
from test_dirty import N, array_over, private_memory, registered
ptr = private_memory(N * 8)  # (memory that outlives the array object)
span = (ptr, ptr + N * 8)
for how in ("stop", "free"):
    a = array_over(ptr, N * 8, 1.0)
    watch = dirty.TRACKER.watch(a)
    assert watch is not None and registered(span), how
    if how == "stop":
        watch.stop()
    del a
    assert not registered(span), how + " left the range registered"
print("ok")
"""


@needs_tracking
def test_a_watch_undone_leaves_nothing_registered_under_a_debug_allocator(tmp_path):
    """With PYTHONMALLOC=debug freed memory is overwritten at once: a system call given a temporary that
    was already freed fails there (the range would stay registered)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONMALLOC": "debug"}
    here = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-c", UNDO_SCRIPT, os.path.dirname(here)], capture_output=True,
                          text=True, env=env, cwd=here, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@needs_tracking
def test_memory_mapped_again_under_a_watch_is_not_reported_clean():
    """Freed behind the array's back and mapped again at the same address (no longer registered): the scan
    must fail (PM_SCAN_CHECK_WPASYNC), never report the new pages unwritten."""
    nbytes = N * 8
    ptr = private_memory(nbytes)
    try:
        a = array_over(ptr, nbytes, 1.5)
        watch = dirty.TRACKER.watch(a)
        assert watch is not None and watch.written() == []
        assert private_memory(nbytes, at=ptr) == ptr  # (the range unmapped and mapped anew: zeros)
        a[: N // 2] = 2.5
        assert watch.written() is None and not watch.alive
    finally:
        _libc.munmap(ptr, nbytes)


@needs_tracking
def test_an_array_given_a_new_buffer_or_strides_in_place_is_compared_by_bytes(harness):
    """The same object, shape and dtype over other memory (``__setstate__``), or the same memory read with
    other strides: the watch covers memory the array no longer is."""
    a = np.random.default_rng(15).random(N)
    ready(harness, a)
    assert harness.watch_of(a) is not None
    new = a.copy()
    new[N // 2] = -1.0
    a.__setstate__((1, (N,), np.dtype(np.float64), False, new.tobytes()))
    assert harness.hand_over(a) == a.tobytes()
    b = np.random.default_rng(16).random(N)
    ready(harness, b)
    assert harness.watch_of(b) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (setting strides is deprecated in NumPy 2.4)
        b.strides = (0,)
    assert harness.hand_over(b) == b.tobytes()


@needs_tracking
def test_a_write_through_another_map_of_shared_memory_is_seen(harness, tmp_path):
    """Shared memory is never watched: a write through a second map of it would not mark the first's pages."""
    name = tmp_path / "shared"
    name.write_bytes(np.random.default_rng(17).random(N).tobytes())
    with open(name, "r+b") as f:
        one, two = mmap.mmap(f.fileno(), N * 8), mmap.mmap(f.fileno(), N * 8)
    a = np.frombuffer(one, dtype=np.float64)
    ready(harness, a)
    assert harness.watch_of(a) is None
    np.frombuffer(two, dtype=np.float64)[N // 2] = -7.0
    assert a[N // 2] == -7.0 and harness.hand_over(a) == a.tobytes()
    harness.close()
    del a
    one.close()
    two.close()


def test_a_dump_tasks_write_with_mmap_mode_r_plus_is_dumped_again(tmp_path):
    """Tasks may write the dump itself then, which no watch of the caller's array sees."""
    from _tasks import fill

    a = np.random.default_rng(18).random(N)
    with MemmapExecutor(1, mmap_mode="r+") as ex:
        for _ in range(3):
            assert ex.submit(np.sum, a).result() == a.sum()
        ex.submit(fill, a, 7.0).result()
        assert ex.submit(np.sum, a).result() == a.sum()


@needs_tracking
def test_a_dump_let_go_during_its_check_keeps_no_watch(monkeypatch):
    """An executor shut down (its dumps to the spares, then dropped) while another thread compares the array:
    the watch that comparison set must not stay on the dump let go, where nothing would ever undo it."""
    h = Harness()
    a = np.random.default_rng(19).random(N)
    h.hand_over(a)
    h.hand_over(a)  # (proven: the next check sets a watch, then compares)
    dump = h.store._dumps[id(a)]
    inside, go = threading.Event(), threading.Event()
    real = store_module.same_bytes

    def paused(x: np.ndarray, flat: np.ndarray) -> bool:
        inside.set()
        go.wait(10)
        return real(x, flat)

    monkeypatch.setattr(store_module, "same_bytes", paused)
    check = threading.Thread(target=h.store._still_valid, args=(dump, a, Session()))
    check.start()
    assert inside.wait(10)
    monkeypatch.setattr(store_module, "same_bytes", real)

    def let_go() -> None:
        h.close()
        SPARES.drop()

    closing = threading.Thread(target=let_go)
    closing.start()
    closing.join(0.2)  # (it waits for the check to end, or has let go before)
    go.set()
    check.join(10)
    closing.join(10)
    assert not check.is_alive() and not closing.is_alive()
    assert dump.changes.watch is None and not registered(a)
    again = Harness()
    try:
        ready(again, a)
        assert again.watch_of(a) is not None
    finally:
        again.close()


@needs_tracking
def test_an_array_that_keeps_changing_is_watched_at_most_twice_across_fresh_executors():
    a = np.random.default_rng(20).random(N)
    watches: list[dirty.Watch] = []  # (kept: ids of freed objects are reused)
    for k in range(12):
        with MemmapExecutor(1) as ex:
            assert ex.submit(np.sum, a).result() == a.sum()
            watch = ex._store._dumps[id(a)].changes.watch
            if watch is not None and not any(watch is w for w in watches):
                watches.append(watch)
        if k % 4 == 3:
            a[k] = -float(k)
    assert len(watches) == dirty.MAX_DROPS


@needs_tracking
def test_one_memory_is_watched_once_and_every_store_sees_its_writes():
    """Two executors at once, each with a dump of the same array: a scan for one would clear what the other has
    yet to see, so the second compares bytes."""
    one, two = Harness(), Harness()
    try:
        a = np.random.default_rng(9).random(N)
        ready(one, a)
        ready(two, a)
        assert one.watch_of(a) is not None and two.watch_of(a) is None
        a[12345] = -1.0
        assert one.hand_over(a) == a.tobytes()
        assert two.hand_over(a) == a.tobytes()
    finally:
        one.close()
        two.close()


@needs_tracking
def test_a_failed_scan_falls_back_to_comparing_bytes(harness, monkeypatch):
    a = np.random.default_rng(10).random(N)
    ready(harness, a)
    watch = harness.watch_of(a)
    assert watch is not None
    monkeypatch.setattr(dirty.TRACKER, "scan", lambda start, end: None)  # (as after EPERM)
    a[N // 2] = -1.0
    assert harness.hand_over(a) == a.tobytes()
    assert not watch.alive


@needs_tracking
def test_with_a_writable_mmap_mode_the_dump_is_compared_by_bytes():
    """Tasks may write the dump then, which no watch of the array sees."""
    h = Harness(mmap_mode="r+")
    try:
        a = np.random.default_rng(11).random(N)
        ready(h, a)
        assert h.watch_of(a) is None
    finally:
        h.close()


@needs_tracking
def test_shared_memory_is_compared_by_bytes_and_the_log_says_why(harness, caplog):
    """A write through another map of a shared mapping would not be seen by a watch."""
    region = mmap.mmap(-1, N * 8)
    a = np.frombuffer(region, dtype=np.float64)
    with caplog.at_level(logging.DEBUG, logger="mmexec"):
        ready(harness, a)
    assert harness.watch_of(a) is None
    assert "compared by bytes" in caplog.text
    a[7] = -1.0
    assert harness.hand_over(a) == a.tobytes()
    harness.close()
    del a
    region.close()


def test_an_unsupported_system_says_why_in_the_debug_log(caplog, monkeypatch):
    monkeypatch.setattr(dirty, "_SYS_USERFAULTFD", None)
    tracker = dirty.Tracker()
    with caplog.at_level(logging.DEBUG, logger="mmexec"):
        assert not tracker.available()
    assert "comparing bytes instead" in caplog.text and tracker.reason


@needs_tracking
def test_a_watch_moves_with_the_dump_to_the_next_executor(count_writes):
    """Fresh executors (fresh Parallel calls) adopt the dump an unchanged array left, watch included."""
    a = np.random.default_rng(12).random(N)
    watches = []
    for _ in range(4):
        with MemmapExecutor(2) as ex:
            assert ex.submit(np.sum, a).result() == a.sum()
            watches.append(ex._store._dumps[id(a)].changes.watch)
    assert len(count_writes) == 1
    assert watches[:2] == [None, None] and watches[2] is not None and watches[3] is watches[2]
    assert watches[2].alive  # (kept with the dump among the spares)
    a[N // 3] = 1e9
    assert Parallel(n_jobs=2)(delayed(np.sum)(a) for _ in range(2)) == [a.sum()] * 2
    assert not watches[2].alive and len(count_writes) == 2


@needs_tracking
def test_a_dropped_spare_lets_go_of_its_dumps_watch():
    a = np.random.default_rng(14).random(N)
    for _ in range(3):
        with MemmapExecutor(1) as ex:
            ex.submit(np.sum, a).result()
            watch = ex._store._dumps[id(a)].changes.watch
    assert watch is not None and watch.alive and registered(a)
    SPARES.drop()
    assert not watch.alive and not registered(a)


@pytest.fixture
def count_writes(monkeypatch):
    writes: list[int] = []
    real = store_module.write_array
    monkeypatch.setattr(store_module, "write_array", lambda *args, **kw: writes.append(1) or real(*args, **kw))
    return writes


def test_tasks_see_every_write_between_map_calls():
    """End to end, whichever path this machine takes."""
    a = np.zeros(N)
    with MemmapExecutor(2) as ex:
        for k in range(6):
            if k >= 3:
                a[k * 1000] = float(k)  # (once watched, where watching is possible)
            assert list(ex.map(np.sum, [a, a])) == [a.sum()] * 2


def test_after_a_fork_the_child_watches_its_own_arrays():
    if not TRACKING:
        pytest.skip(f"no dirty-page tracking here: {dirty.TRACKER.reason}")
    r, w = os.pipe()
    pid = fork_quietly()
    if pid == 0:
        ok = 0
        try:
            ok = dirty.TRACKER.uffd == -1 and dirty.TRACKER.available() and dirty.TRACKER.uffd >= 0
            a = np.random.default_rng(13).random(N)
            watch = dirty.TRACKER.watch(a)
            ok = ok and watch is not None and watch.dirty() is not None
            a[N // 2] = 0.0
            d = watch.dirty() if watch is not None else None
            ok = ok and d is not None and any(lo <= (N // 2) * 8 < hi for lo, hi in d)
        finally:
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)


# ----------------------------------------------------------------- what the second review found untested
@needs_tracking
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_change_among_hundreds_of_written_ranges_is_seen(harness, where):
    """600 separate written pages: more than one scan's worth of regions, and more ranges than are compared
    one by one (they are then compared as one span)."""
    a = np.random.default_rng(21).random(N)
    ready(harness, a)
    assert harness.watch_of(a) is not None
    start, _ = whole_pages(a)
    raw = a.view(np.uint8)
    pages = [start + (2 * k + 1) * PAGE for k in range(600)]
    for at in pages:
        raw[at] = raw[at]  # written, unchanged
    changed = {"first": pages[0], "middle": pages[300], "last": pages[-1]}[where] + 17
    raw[changed] ^= 0x5A
    assert harness.hand_over(a) == a.tobytes()


@needs_tracking
@pytest.mark.parametrize("where", ["head", "middle"])
def test_a_write_made_during_the_check_that_sets_the_watch_is_seen_next(harness, monkeypatch, where):
    """The watch is set (and, for dask, the head and tail bytes taken) before the full check that proves the
    array unchanged: a write landing just after that check ends is seen by the next one."""
    a = np.random.default_rng(22).random(N)
    harness.hand_over(a)
    harness.hand_over(a)  # (proven: the next check sets the watch)
    at = 0 if where == "head" else N // 2
    is_dask = isinstance(harness, DaskHarness)
    module, name = (dask_module, "_signature") if is_dask else (store_module, "same_bytes")
    real = getattr(module, name)

    def then_write(*args, **kwargs):
        out = real(*args, **kwargs)
        a[at] = -9.0  # (another thread's write, right after the check went past it)
        monkeypatch.setattr(module, name, real)
        return out

    monkeypatch.setattr(module, name, then_write)
    harness.hand_over(a)
    assert a[at] == -9.0 and harness.watch_of(a) is not None
    assert harness.hand_over(a) == a.tobytes()


@needs_tracking
def test_a_check_of_a_dump_already_let_go_sets_no_watch(harness):
    a = np.random.default_rng(23).random(N)
    harness.hand_over(a)
    harness.hand_over(a)
    if isinstance(harness, DaskHarness):
        entry = harness.store._entries[id(a)]
        entry.changes.let_go()  # (let go: an executor shut down, the array changed)
        with entry.changes.lock:
            assert dask_module._check(entry, a) == (True, None)
        assert entry.changes.watch is None
    else:
        dump = harness.store._dumps[id(a)]
        dump.discard()
        assert harness.store._still_valid(dump, a, Session())
        assert dump.changes.watch is None
    assert not registered(a)


@needs_tracking
def test_an_f_ordered_array_is_watched_and_every_write_seen(harness):
    a = np.asfortranarray(np.random.default_rng(24).random((N // 64, 64)))
    ready(harness, a)
    assert harness.watch_of(a) is not None
    a[5, 63] = -1.0  # (the last column: the end of its memory)
    assert harness.hand_over(a) == a.tobytes()
    a[N // 128, 0] = -2.0
    assert harness.hand_over(a) == a.tobytes()


@needs_tracking
def test_memory_pinned_for_devices_is_never_trusted_to_a_watch(harness, monkeypatch):
    """io_uring fixed buffers and RDMA are written by devices, unseen: while the process has pinned memory
    (VmPin), a watch says nothing and none is set."""
    a = np.random.default_rng(25).random(N)
    ready(harness, a)
    watch = harness.watch_of(a)
    assert watch is not None
    monkeypatch.setattr(dirty, "pinned_bytes", lambda: 4096)
    a[N // 2] = -1.0  # (as a device would, but seen by the byte comparison only)
    assert harness.hand_over(a) == a.tobytes()
    assert not watch.alive
    for _ in range(2):
        assert harness.hand_over(a) == a.tobytes()
        assert harness.watch_of(a) is None


@needs_tracking
def test_an_interrupted_check_leaves_nothing_registered(harness, monkeypatch):
    """Ctrl-C during the full check that follows a new watch, or during a watched check."""
    a = np.random.default_rng(26).random(N)
    harness.hand_over(a)
    harness.hand_over(a)
    is_dask = isinstance(harness, DaskHarness)
    module, name = (dask_module, "_signature") if is_dask else (store_module, "same_bytes")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(module, name, interrupted)
        with pytest.raises(KeyboardInterrupt):
            harness.hand_over(a)
    assert not registered(a)
    harness.hand_over(a)  # (the watch is set now)
    assert harness.watch_of(a) is not None and registered(a)
    module, name = (dask_module, "_block_digest") if is_dask else (store_module, "same_bytes_in")
    with monkeypatch.context() as patch:
        patch.setattr(module, name, interrupted)
        a[N // 2] = 3.0
        with pytest.raises(KeyboardInterrupt):
            harness.hand_over(a)
    assert not registered(a)
    assert harness.hand_over(a) == a.tobytes()


@needs_tracking
def test_dask_head_bytes_taken_during_a_change_and_back_are_never_trusted(monkeypatch):
    """Another thread changes the head page just as the watch is set and changes it back before the hash: the
    bytes taken of the head then differ from the scattered copy, so the hash that proves the array unchanged
    must be of those bytes (else, once the array holds them again, every check would say unchanged)."""
    h = DaskHarness()
    a = np.random.default_rng(27).random(N)
    h.hand_over(a)
    h.hand_over(a)  # (proven: the next check sets the watch)
    old, new = float(a[0]), -4.0

    tracker = dirty.TRACKER

    class Racing:
        def watch(self, x: np.ndarray) -> dirty.Watch | None:
            w = tracker.watch(x)
            a[0] = new  # (the other thread's write, as the head bytes are taken)
            return w

    real = dask_module._signature

    def reverted(x: np.ndarray, *args: object) -> tuple[object, ...]:
        a[0] = old  # (and back, before the hash)
        return real(x, *args)

    monkeypatch.setattr(dirty, "TRACKER", Racing())
    monkeypatch.setattr(dask_module, "_signature", reverted)
    h.hand_over(a)
    monkeypatch.undo()
    a[0] = new
    try:
        for _ in range(2):
            assert h.hand_over(a) == a.tobytes()
    finally:
        h.close()


# ----------------------------------------------------------------- any sequence of writes
_BASE = np.random.default_rng(28).random(N)
_WRITE = st.tuples(
    st.sampled_from(["add", "same", "memset", "dontneed"]),
    st.one_of(  # the first byte written: anywhere, in the head or tail pages, or next to a page boundary
        st.integers(0, N * 8 - 1),
        st.integers(0, 2 * PAGE),
        st.integers(N * 8 - 2 * PAGE, N * 8 - 1),
        st.tuples(st.integers(1, N * 8 // PAGE - 1), st.integers(-2, 1)).map(
            lambda p: max(0, p[0] * PAGE - address(_BASE) % PAGE + p[1])
        ),
    ),
    st.integers(1, 3 * PAGE),  # how many
)


def _apply(a: np.ndarray, what: str, at: int, n: int) -> None:
    raw = a.view(np.uint8)
    n = min(n, a.nbytes - at)
    if what == "add":
        raw[at : at + n] += 1
    elif what == "same":
        raw[at : at + n] = raw[at : at + n].copy()
    elif what == "memset":
        ctypes.memset(address(a) + at, at % 251, n)
    else:  # MADV_DONTNEED on the whole pages inside [at, at + n)
        lo = -(-(address(a) + at) // PAGE) * PAGE
        hi = (address(a) + at + n) // PAGE * PAGE
        if hi > lo:
            assert _libc.madvise(lo, hi - lo, MADV_DONTNEED) == 0


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rounds=st.lists(st.lists(_WRITE, max_size=4), min_size=1, max_size=6), kind=st.sampled_from(["memmap", "dask"]))
def test_any_sequence_of_writes_is_seen(rounds, kind):
    """Random writes (anywhere: head and tail pages, page edges, spans of pages; changing bytes or not) between
    hand-overs of one array, watched after its first three hand-overs where this machine can."""
    h = Harness() if kind == "memmap" else DaskHarness()
    try:
        a = _BASE.copy()
        ready(h, a)
        for writes in rounds:
            for what, at, n in writes:
                _apply(a, what, at, n)
            assert h.hand_over(a) == a.tobytes()
    finally:
        h.close()


@needs_tracking
@pytest.mark.parametrize("where", ["making the watch", "protecting"])
def test_an_interrupt_while_a_watch_is_set_leaves_nothing_registered(monkeypatch, where):
    a = np.random.default_rng(29).random(N)
    if where == "making the watch":
        class Interrupted(dirty.Watch):
            def __init__(self, *args: object) -> None:
                raise KeyboardInterrupt

        monkeypatch.setattr(dirty, "Watch", Interrupted)
    else:
        real = dirty._ioctl

        def interrupted(fd: int, request: int, arg: object) -> int:
            if request == dirty._UFFDIO_WRITEPROTECT:
                raise KeyboardInterrupt
            return real(fd, request, arg)

        monkeypatch.setattr(dirty, "_ioctl", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dirty.TRACKER.watch(a)
    assert not registered(a)
