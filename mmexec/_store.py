"""Where dumped arrays live, and for how long.

A :class:`MemmapStore` turns arrays into :class:`ArrayRef` s. It dumps each
qualifying array once, into a private 0700 folder as a 0600 file with an
unguessable name, then keeps the file open and **unlinks its name at once**:
workers open it as ``/proc/<caller pid>/fd/<n>``. So no dump can outlive its
users, even if the caller and all workers are killed together: the kernel
frees the memory when the last descriptor and map are gone.

The store keeps one :class:`_File` record per file and counts who still
needs it: the caller's array while it is alive, every pending task that
refers to it, and every result array mapped from it. When the count drops to
zero the descriptor is closed (or the file kept a moment for reuse, see
``_spares``). :meth:`MemmapStore.close` drops everything but the maps still
alive in caller code (those close with their arrays) and removes the folder.

Results travel the other way: a worker writes a large result as a named file
in the caller's folder; the caller opens it, unlinks it, and keeps it like a
dump for as long as the result array lives.

A file is reused (its pages rewritten for another dump or result,
``_spares``) only once nothing maps it: not the caller (its counts), and not a
worker, which says at the end of each task whether a map of one of its
arguments outlived the task (:meth:`MemmapStore.mark_kept`: such a file is
never reused).

Large ``bytes``, ``bytearray`` and out-of-band pickle buffers are written the
same way (:meth:`MemmapStore.blob_ref`), once per task that holds them.

Locks: the store's lock is taken in ordinary thread context only. Weakref
callbacks and finalizers (an array or a result map freed) never take it:
they queue the release on the store and post its application to the
housekeeper (``_housekeeper``: an executor's manager thread, or the
housekeeping thread), which applies it (:meth:`MemmapStore.apply_releases`).
Lock order: the apply lock, then the store's, then the spare pool's, then
the housekeeper's.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ._dirty import Tracked, Watch
from ._errors import TempFolderError
from ._files import FILES, UNKNOWN_IDENTITY, from_any_process, identity
from ._housekeeper import HOUSEKEEPER, drain
from ._memmap import (
    ArrayRef,
    BlobRef,
    as_pickled,
    backing_memmap,
    dump_strides,
    file_offset_of,
    layout_order,
    open_ref,
    open_whole,
    pickles_native,
    read_array,
    same_bytes,
    same_bytes_in,
    write_array,
)
from ._options import SHM_FOLDER, fallback_temp_folder, resolve_temp_folder
from ._spares import SPARES, Spare
from ._tempfolder import (
    check_safe_folder,
    create_private_file,
    free_bytes,
    make_missing_folders,
    make_private_folder,
    no_room_error,
    remove_folders_made,
    remove_private_folder,
    sweep_partial_results,
    sweep_stale_folders,
    unlink_quietly,
)

__all__ = ["FILES", "UNKNOWN_IDENTITY", "ArrayStore", "Holds", "MemmapStore", "Session", "owner_of"]

_DESCRIPTORS = FILES.descriptors  # (the same object: read often)

_PROC_FD = os.path.isdir(f"/proc/{os.getpid()}/fd")


def owner_of(path: str) -> MemmapStore | None:
    """The store that keeps the dump at ``path`` alive, if any."""
    return FILES.owners.get(path)


@dataclass
class Session:
    """Arrays already checked against their dump: by one drained burst of submits, or one call
    of ``map`` / ``Parallel``."""

    checked: set[int] = field(default_factory=set)


@dataclass
class Holds:
    """The files one pending task keeps alive; released when its future is done."""

    session: Session
    files: list[tuple[MemmapStore, str]] = field(default_factory=list)
    spares: tuple[MemmapStore, list[str]] | None = None  # freed files lent for the task's results

    def release(self) -> None:
        self.release_from(0)
        spares, self.spares = self.spares, None
        if spares is not None:
            for path in spares[1]:
                spares[0].return_spare(path)

    def release_from(self, mark: int) -> None:
        """Release the files held since ``len(files)`` was ``mark``."""
        files, self.files[mark:] = self.files[mark:], []
        for store, path in files:
            store.release(path)


class ArrayStore(Protocol):
    """What the pickler needs from a store. ``ref_for`` returns None to pickle normally."""

    def ref_for(self, a: np.ndarray, holds: Holds) -> Any: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class _File:
    """One file the store keeps open: a dump or a result."""

    fd: int  # -1 without procfs: the file is then known by its name, deleted when unused
    users: int
    mapped: int = 0  # users that are live maps in caller code (they outlive close())
    reuse: tuple[int, str] | None = None  # (capacity, temp folder): its pages may serve again (None: never)


@dataclass(eq=False)
class _Dump:
    """A caller's array and the file holding its bytes."""

    key: int
    wref: weakref.ref[np.ndarray]
    path: str
    ref: ArrayRef
    flat: np.ndarray | None = None  # the file's bytes, mapped once compared (under ``changes.lock``)
    changes: Tracked = field(default_factory=Tracked)  # whether the array changed since (``_dirty``)

    def discard(self) -> None:
        """This dump no longer stands for its array: let go of its watch and its map (the file is released by
        the store)."""
        self.changes.let_go()
        self.flat = None


class MemmapStore:
    """Dumps arrays into a private folder and deletes each file when unused."""

    def __init__(self, max_nbytes: int | None, mmap_mode: str, temp_folder: str | None = None) -> None:
        self.max_nbytes = max_nbytes
        self.mmap_mode = mmap_mode
        self._base, self._explicit = resolve_temp_folder(temp_folder)
        self._made: list[str] = []  # folders created for a temp_folder that did not exist, removed at close
        if self._explicit:
            self._made = make_missing_folders(self._base)
            try:
                check_safe_folder(self._base)  # at construction, not at the first large array
            except BaseException:
                remove_folders_made(self._made)
                raise
        # What a process killed with its whole group left (its folder, loky's semaphores in /dev/shm):
        # removed when the next executor is created, wherever its own files go.
        dead: set[int] = set()
        for parent in dict.fromkeys((self._base, SHM_FOLDER)):
            dead = sweep_stale_folders(parent, dead)  # (/dev/shm last: loky's semaphores of callers found dead)
        FILES.descriptors.ensure_reserve()
        self._lock = threading.RLock()
        self._folders: dict[str, str] = {}  # base folder -> our private folder in it
        self._files: dict[str, _File] = {}  # reference path -> the file's record
        self._dumps: dict[int, _Dump] = {}  # id(caller's array) -> its dump
        self._lent: dict[str, Spare] = {}  # reference path -> freed file lent to a task for its result
        self._spares = SPARES
        self._closed = False
        # Releases posted by finalizers and weakref callbacks (a path and whether it was a map, or a
        # freed array's dump), applied by apply_releases() on a housekeeping host.
        self._released: queue.SimpleQueue[tuple[str, bool] | _Dump] = queue.SimpleQueue()
        self._drain_posted = False
        self._apply_lock = threading.RLock()  # (a finalizer may post, and at exit apply, inside it)
        FILES.stores.add(self)

    # -- folders ---------------------------------------------------------
    @property
    def folder(self) -> str:
        """Our private folder in the chosen base folder (created on first use)."""
        return self._private_folder(self._base)

    def _private_folder(self, base: str) -> str:
        with self._lock:
            if self._closed:
                raise RuntimeError("this executor's temp folder was removed at shutdown")
            folder = self._folders.get(base)
            if folder is None:
                if self._explicit and not os.path.isdir(base):  # removed since (by another executor that made
                    self._made[:0] = make_missing_folders(base)  # it): made again, 0700, removed by this one
                if base not in (self._base, SHM_FOLDER):  # (those two were swept when the store was made)
                    sweep_stale_folders(base)
                folder = self._folders[base] = make_private_folder(base)
            return folder

    def sweep_partial_results(self) -> None:
        """Remove the named files that dead workers were writing results into (after a worker died)."""
        with self._lock:
            folders = list(self._folders.values())
        for folder in folders:
            sweep_partial_results(folder)

    def owns_folder(self, folder: str) -> bool:
        with self._lock:
            return folder in self._folders.values()

    def _folder_for(self, nbytes: int) -> str:
        folder = self.folder
        if free_bytes(folder) >= nbytes:
            return folder
        if not self._explicit:
            other = self._private_folder(fallback_temp_folder())
            if free_bytes(other) >= nbytes:
                return other
        raise no_room_error(self._base, nbytes)

    def held_paths(self) -> list[str]:
        """The reference paths of the files held now (tests and introspection)."""
        with self._lock:
            return list(self._files)

    def held_fds(self) -> dict[str, int]:
        with self._lock:
            return {path: f.fd for path, f in self._files.items()}

    # -- reference counts ------------------------------------------------
    def _keep(self, fd: int, path: str, users: int, reuse: tuple[int, str] | None, mapped: int = 0) -> str:
        """Start counting a freshly written file; return the path tasks use to open it."""
        if _PROC_FD:
            unlink_quietly(path)
            ref_path = f"/proc/{os.getpid()}/fd/{fd}"
        else:  # no procfs: keep the name, delete it when unused
            os.close(fd)
            fd, ref_path = -1, path
        self._register(ref_path, _File(fd, users, mapped, reuse))
        return ref_path

    def _register(self, ref_path: str, record: _File) -> None:
        with self._lock:
            self._files[ref_path] = record
            FILES.owners[ref_path] = self
        _DESCRIPTORS.add(1)

    def hold(self, path: str, mapped: bool = False) -> bool:
        """Count one more user of ``path``; False if it is gone or the store is closed.

        ``mapped`` users are live maps in caller code; they outlive :meth:`close`.
        """
        with self._lock:
            record = self._files.get(path)
            if record is None or (self._closed and not mapped):
                return False
            record.users += 1
            record.mapped += mapped
            return True

    def release(self, path: str, mapped: bool = False, content: _Dump | None = None) -> None:
        """Count one user fewer; close (or delete) the file when none is left (or keep it as a spare, with
        ``content``: the dump of a live array it holds, which the next executor may adopt)."""
        with self._lock:
            record = self._files.get(path)
            if record is None:
                return
            record.mapped -= mapped
            record.users -= 1
            if record.users > 0:
                return
            del self._files[path]
            FILES.owners.pop(path, None)
            kept = (
                record.fd >= 0 and record.reuse is not None and not (self._closed and self._explicit)
                and self._spares.put(record.fd, path, *record.reuse, content=content)
            )  # (after shutdown, a chosen folder keeps nothing: it may be unmounted)
        _DESCRIPTORS.add(-1)
        if not kept and content is not None:
            content.discard()
        if record.fd < 0:
            unlink_quietly(path)
        elif not kept:
            os.close(record.fd)

    def hold_map(self, path: str, whole: np.memmap) -> None:
        """Count a map of ``path`` made in caller code (a result handed on): it holds the file while it lives."""
        if self.hold(path, mapped=True):
            weakref.finalize(whole, self.release_later, path, True)

    def mark_kept(self, path: str) -> None:
        """A worker still maps ``path`` after the task that passed it ended: its pages never serve again."""
        with self._lock:
            record = self._files.get(path)
            if record is not None:
                record.reuse = None

    def release_later(self, path: str, mapped: bool = False) -> None:
        """:meth:`release` from a finalizer or a weakref callback: queued, takes no lock."""
        self._post_release((path, mapped))

    def _post_release(self, item: tuple[str, bool] | _Dump) -> None:
        self._released.put(item)
        if not self._drain_posted:
            self._drain_posted = True
            HOUSEKEEPER.post(self.apply_releases)

    def apply_releases(self) -> None:
        """Apply the releases queued by finalizers (on the janitor thread, or before the store
        decides whether a freed file can serve again). Never call it while holding the store's lock."""
        with self._apply_lock:
            self._drain_posted = False  # a release queued from now on posts a new drain
            for item in drain(self._released):
                if isinstance(item, _Dump):
                    self._forget(item)
                else:
                    self.release(*item)

    # -- arrays -> refs --------------------------------------------------
    def ref_for(self, a: np.ndarray, holds: Holds) -> ArrayRef | None:
        """A reference to ``a`` for a task, or None to pickle ``a`` normally."""
        if a.size == 0 or a.dtype.hasobject:
            return None
        mm = backing_memmap(a)
        if mm is not None and mm.mode != "c":
            ref = self._memmap_ref(a, mm, holds)
            if ref is not None:
                return ref
        if self.max_nbytes is None or a.nbytes <= self.max_nbytes:
            return None  # as joblib: only arrays larger than max_nbytes are mapped
        if type(a) is not np.ndarray and type(a) is not np.memmap:
            return None  # subclasses keep their type through normal pickling
        if pickles_native(a):  # (a copy: what pickling would give, dumped for this task)
            return self._dump_ref(as_pickled(a), holds)
        return self._dump_ref(a, holds)

    def _memmap_ref(self, a: np.ndarray, mm: np.memmap, holds: Holds) -> ArrayRef | None:
        path = os.fspath(mm.filename)  # type: ignore[arg-type]
        if path in FILES.inherited:
            return None  # the parent's file, seen through a map inherited at a fork: dumped anew
        owner = owner_of(path)
        ident = None
        if owner is not None:  # mmexec's own file (a result, a dump): tasks get it as any dump, never writable
            if not owner.hold(path):  # (unless the executor's mmap_mode says so)
                return None  # its file is gone: treat ``a`` as an ordinary array
            holds.files.append((owner, path))
            mode = "c" if self.mmap_mode in ("r+", "w+") else self.mmap_mode  # (writable modes: tasks write the
            # dump, never a result array the caller holds: their own copy-on-write pages then)
        else:  # a caller's own np.memmap: by its path as seen from any process, and its identity; writable
            path = from_any_process(path)  # if the caller opened it so on purpose (seed E7)
            ident = identity(mm, path)
            mode = "r+" if mm.mode in ("r+", "w+") else "r"
        return ArrayRef(path, a.dtype, a.shape, a.strides, file_offset_of(a, mm), "C", mode, ident)

    def _dump_ref(self, a: np.ndarray, holds: Holds) -> ArrayRef | None:
        key = id(a)
        with self._lock:
            dump = self._dumps.get(key)
        if dump is not None and dump.wref() is a and self._still_valid(dump, a, holds.session):
            if self.hold(dump.path):
                holds.files.append((self, dump.path))
                return dump.ref
        if _DESCRIPTORS.left() < _DESCRIPTORS.PER_FILE:
            return None  # out of descriptors: pickle this array into the task
        # (held by the array and this task at once: another thread's new dump of the same array may release
        # the array's hold at any moment)
        dump, drops = self._adopt(a, holds.session)
        if dump is None:
            dump = self._new_dump(a, users=2)
            dump.changes.drops = max(dump.changes.drops, drops)
        holds.session.checked.add(key)
        holds.files.append((self, dump.path))
        return dump.ref

    def _adopt(self, a: np.ndarray, session: Session) -> tuple[_Dump | None, int]:
        """The dump of ``a`` an executor shut down since left among the spares, if ``a`` is unchanged since:
        taken over, held twice (as :meth:`_new_dump`); else None. And how often ``a`` changed while watched,
        which the next dump of it carries on."""
        key = id(a)
        spare = self._spares.adopt(self._base, lambda held: held.key == key and held.wref() is a)
        if spare is None:
            return None, 0
        old = spare.content
        spare.content = None
        assert isinstance(old, _Dump)
        try:
            valid = self._still_valid(old, a, Session())  # (always a check: ``session`` may have checked ``a``
        except BaseException:  # against another dump of it)
            old.discard()
            os.close(spare.fd)
            raise
        if not valid:
            old.discard()
            if not self._spares.put(spare.fd, spare.path, spare.capacity, spare.where):
                os.close(spare.fd)  # (its pages may still serve the new dump, as any spare's)
            return None, old.changes.drops
        session.checked.add(key)
        self._register(spare.path, _File(spare.fd, 2, 0, (spare.capacity, spare.where)))
        return self._record_dump(a, spare.path, old), 0

    def _still_valid(self, dump: _Dump, a: np.ndarray, session: Session) -> bool:
        """True when ``a`` is unchanged since it was dumped: its layout every time, its bytes once per session.

        An array reshaped, retyped or flattened in place (``a.shape = ...``,
        ``a.dtype = ...``) keeps its bytes, so the bytes alone would let the
        old dump, with its old shape and dtype, stand for it.
        """
        ref = dump.ref
        if (ref.shape, ref.dtype, ref.order, ref.strides) != (a.shape, a.dtype, layout_order(a), dump_strides(a)):
            return False
        if dump.key in session.checked:
            return True
        with dump.changes.lock:
            if dump.flat is None:
                dump.flat = open_whole(dump.path, "r")[: dump.ref.dtype.itemsize * _size(dump.ref.shape)]
            if not self._same_bytes(dump, a):
                return False
        session.checked.add(dump.key)
        return True

    def _same_bytes(self, dump: _Dump, a: np.ndarray) -> bool:
        """True when ``a``'s bytes equal its dump's: where its pages are watched, only those written since the
        last check (and its partial head and tail pages), else every byte (under ``dump.changes.lock``).

        A watch sees writes to the array only, so none is used where tasks
        may write the dump (``mmap_mode`` ``'r+'`` or ``'w+'``).
        """
        flat = dump.flat
        assert flat is not None

        def watched(watch: Watch) -> bool | None:
            ranges = watch.dirty()
            return None if ranges is None else same_bytes_in(a, flat, ranges)

        return dump.changes.unchanged(
            a, watched, lambda new: same_bytes(a, flat), may_watch=self.mmap_mode not in ("r+", "w+")
        )

    def _new_dump(self, a: np.ndarray, users: int = 1) -> _Dump:
        return self._record_dump(a, self._write(a, users))  # held by the array (and the task that dumps it)

    def _record_dump(self, a: np.ndarray, ref_path: str, adopted: _Dump | None = None) -> _Dump:
        """Remember that the file at ``ref_path`` holds ``a``'s bytes, for as long as ``a`` lives (``adopted``:
        the dump another executor left of it, checked: its map and watch carry over)."""
        ref = ArrayRef(ref_path, a.dtype, a.shape, dump_strides(a), 0, layout_order(a), self.mmap_mode)
        key = id(a)
        dump = _Dump(key, None, ref_path, ref)  # type: ignore[arg-type]
        if adopted is not None:
            dump.flat, dump.changes, adopted.flat = adopted.flat, adopted.changes.move(), None
        dump.wref = weakref.ref(a, _ForgetWhenFreed(self, dump))
        with self._lock:
            old = self._dumps.get(key)
            self._dumps[key] = dump
        if old is not None:
            if old.wref() is a:  # (a new dump of a changed array: how often it changed counts on)
                dump.changes.drops = max(dump.changes.drops, old.changes.drops)
            old.discard()
            self.release(old.path)
        return dump

    def _write(self, a: np.ndarray, users: int = 1) -> str:
        """Dump ``a`` into a new file (or a freed one's pages); return the path tasks open it by.

        Freed files kept for reuse hold room: when the folder is full they are
        let go first, then the room is checked again. When the default folder
        turns out full while reserving (another dump took the room after the
        free-space check), the dump goes to the system temp folder, as when
        the check itself finds no room.
        """
        self.apply_releases()  # files freed a moment ago (queued by finalizers) become spares first
        spare = self._spares.take(a.nbytes, self._base) if a.nbytes else None
        if spare is not None:
            return self._reuse(spare, a, users)
        try:
            folder = self._folder_for(a.nbytes)
        except TempFolderError:
            if not self._spares.drop():
                raise
            folder = self._folder_for(a.nbytes)  # (spares held room: freed now)
        try:
            return self._write_in(folder, a, users)
        except TempFolderError:
            if self._spares.drop():
                return self._write_in(folder, a, users)
            if self._explicit or os.path.dirname(folder) == fallback_temp_folder():
                raise
            return self._write_in(self._private_folder(fallback_temp_folder()), a, users)

    def _write_in(self, folder: str, a: np.ndarray, users: int) -> str:
        fd, path = create_private_file(folder)
        try:
            write_array(fd, path, a, reserve=FILES.reserve_lock)
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        return self._keep(fd, path, users=users, reuse=(a.nbytes, os.path.dirname(folder)))

    def _reuse(self, spare: Spare, a: np.ndarray, users: int) -> str:
        """Dump ``a`` into a freed dump's pages (already allocated)."""
        try:
            write_array(spare.fd, spare.path, a)
        except BaseException:
            os.close(spare.fd)
            raise
        self._register(spare.path, _File(spare.fd, users, 0, (spare.capacity, spare.where)))
        return spare.path

    def blob_ref(self, view: memoryview, kind: str, holds: Holds) -> BlobRef | None:
        """A reference to a large bytes-like object for one task (it holds the file), or None to pickle it.

        ``kind`` says what the worker rebuilds (:class:`~mmexec._memmap.BlobRef`).
        """
        if self.max_nbytes is None or view.nbytes <= self.max_nbytes or self._closed:
            return None
        if _DESCRIPTORS.left() < _DESCRIPTORS.PER_FILE:
            return None
        data = np.frombuffer(view.cast("B") if view.format != "B" or view.ndim != 1 else view, dtype=np.uint8)
        path = self._write(data, users=1)  # held by the task
        holds.files.append((self, path))
        return BlobRef(path, view.nbytes, kind)

    def _forget(self, dump: _Dump) -> None:
        """``dump``'s array was freed: release its file, unless a newer dump of the same id replaced
        it (:meth:`_new_dump` released it then) or :meth:`close` already did."""
        with self._lock:
            if self._dumps.get(dump.key) is not dump:
                return
            del self._dumps[dump.key]
        self.release(dump.path)

    # -- results ---------------------------------------------------------
    def lend_spares(self, most: int) -> list[tuple[str, int]]:
        """Up to ``most`` freed files for a task's large results, ``(path, capacity)`` each,
        if this executor's tasks return large results and files of about that size are kept.

        Writing into their pages (already allocated) is about twice as fast as
        into a new tmpfs file. :meth:`open_result` adopts each one used, and
        :meth:`return_spare` takes back the others when the task is done.
        """
        lent: list[tuple[str, int]] = []
        hint = FILES.result_hint
        if not hint:
            return lent
        self.apply_releases()  # results freed a moment ago become spares first
        with self._lock:
            while not self._closed and len(lent) < most:
                spare = self._spares.take(hint, self._base)
                if spare is None:
                    break
                self._lent[spare.path] = spare
                FILES.owners[spare.path] = self
                lent.append((spare.path, spare.capacity))
        return lent

    def discard_results(self, files: Iterable[str], buffers: Iterable[BlobRef] = ()) -> None:
        """Remove the named files a worker wrote for a result, those the result did not adopt (a result that
        could not be rebuilt, or one nobody waits for)."""
        for path in (*files, *(ref.path for ref in buffers)):
            if os.path.dirname(path) in self._folders.values() and path not in self._files:
                unlink_quietly(path)

    def return_spare(self, path: str) -> None:
        """A task is done: keep its lent file for later if its result did not use it."""
        with self._lock:
            spare = self._lent.pop(path, None)
            if spare is None:
                return
            FILES.owners.pop(path, None)
            kept = self._spares.put(spare.fd, spare.path, spare.capacity, spare.where)
        if not kept:
            os.close(spare.fd)

    def open_result(self, ref: ArrayRef) -> np.ndarray:
        """Map a result a worker wrote into our folder (or into a lent spare); it lives as long as the array.

        Beyond the descriptor budget the result is copied into memory instead,
        and its file freed at once.
        """
        nbytes = ref.dtype.itemsize * _size(ref.shape)
        with self._lock:
            spare = self._lent.pop(ref.path, None)
            FILES.result_hint = nbytes
        if spare is not None:
            fd, where, reuse = spare.fd, spare.path, (spare.capacity, spare.where)
        else:
            fd = _DESCRIPTORS.open(ref.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            where, reuse = ref.path, (nbytes, os.path.dirname(os.path.dirname(ref.path)))
        if _DESCRIPTORS.left() < _DESCRIPTORS.PER_FILE:
            try:
                return read_array(fd, ref)
            finally:
                if spare is None or not self._spares.put(spare.fd, spare.path, spare.capacity, spare.where):
                    os.close(fd)
                if spare is None:
                    unlink_quietly(ref.path)
        if spare is not None:
            ref_path = spare.path
            self._register(ref_path, _File(fd, 1, 1, reuse))
        else:
            ref_path = self._keep(fd, where, users=1, reuse=reuse, mapped=1)
        whole = open_whole(ref_path, "r+")
        weakref.finalize(whole, self.release_later, ref_path, True)
        return open_ref(ref, whole).view(np.ndarray)

    # -- fork ------------------------------------------------------------
    def _no_reuse(self) -> None:
        with self._lock:
            for record in self._files.values():
                record.reuse = None

    def _after_fork_in_child(self) -> None:
        """This store is the parent's: in the child it only lets go of its copies of the descriptors.

        Its folders, dumps and spares stay the parent's: the child never
        removes, reuses or writes them.
        """
        self._lock = threading.RLock()  # another thread of the parent may have held them at the fork
        self._apply_lock = threading.RLock()
        self._released = queue.SimpleQueue()
        self._drain_posted = False
        for path, record in list(self._files.items()):
            record.reuse = None
            if record.fd < 0 or not record.mapped:  # nothing of the child's needs it (never unlink: a name
                del self._files[path]  # is the parent's)
                if record.fd >= 0:
                    os.close(record.fd)
                    _DESCRIPTORS.add(-1)
        self._dumps.clear()
        for spare in self._lent.values():  # the child's copies of files lent for the parent's results
            with contextlib.suppress(OSError):
                os.close(spare.fd)
        self._lent.clear()
        self._folders.clear()
        self._made = []
        self._closed = True

    # -- end -------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Drop every file not mapped in caller code and remove the folders. Idempotent."""
        self.apply_releases()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live: dict[str, _Dump] = {}  # dumps of arrays still alive: their files may serve the next executor
            for old in self._dumps.values():
                if old.wref() is not None:
                    live[old.path] = old
                else:
                    old.discard()
            self._dumps.clear()
            lent, self._lent = list(self._lent.values()), {}
            for spare in lent:
                FILES.owners.pop(spare.path, None)
            unused = []
            for path, record in self._files.items():
                if record.mapped:
                    record.users = record.mapped
                else:
                    unused.append(path)
            folders = list(self._folders.values())
        for spare in lent:
            os.close(spare.fd)
        for path in unused:
            with self._lock:
                left = self._files.get(path)
                if left is None:
                    continue
                left.users = 1
            self.release(path, content=live.get(path))
        for folder in folders:
            remove_private_folder(folder)
        remove_folders_made(self._made)
        if self._explicit:  # a folder the user chose may be unmounted next: hold nothing there
            self._spares.drop(where=self._base)


class _ForgetWhenFreed:
    """The weakref callback of a dumped array: posts the release, takes no lock."""

    __slots__ = ("dump", "store")

    def __init__(self, store: MemmapStore, dump: _Dump) -> None:
        # A weak reference: the dump holds the array's weakref, which holds this callback; a
        # strong one would make a cycle that keeps a replaced dump's map alive until a collection.
        self.store, self.dump = store, weakref.ref(dump)

    def __call__(self, _: weakref.ref[np.ndarray]) -> None:
        dump = self.dump()
        if dump is not None:  # (gone: replaced by a newer dump, which released its file)
            self.store._post_release(dump)


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


# ------------------------------------------------------------------ fork
def _before_fork() -> None:
    """A child is about to map every file we hold: none of them may serve again for other data.

    (Before the fork, not after it in the parent: a file freed in between
    would otherwise still be recycled while the child maps it.)
    """
    for store in list(FILES.stores):
        store._no_reuse()


def _after_fork_in_child() -> None:
    """Start clean: no spares, no reuse, fresh locks; the parent's files stay the parent's."""
    FILES.inherited.update(FILES.owners.keys())
    FILES.owners.clear()
    _DESCRIPTORS._lock = threading.Lock()
    _DESCRIPTORS._when = -1.0
    FILES.reserve_lock = threading.Lock()  # (another thread of the parent may have held it at the fork)
    SPARES.after_fork_in_child()
    for store in list(FILES.stores):
        store._after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
