"""Where dumped arrays live, and for how long.

A :class:`MemmapStore` turns arrays into :class:`ArrayRef` s. It dumps each
qualifying array once, into a private folder, and counts who still needs each
file: the caller's array while it is alive, every pending task that refers to
it, and every result array mapped from it. When the count drops to zero the
file is deleted; :meth:`MemmapStore.close` deletes everything that is left.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ._memmap import (
    ArrayRef,
    backing_memmap,
    file_offset_of,
    layout_order,
    open_ref,
    open_whole,
    same_bytes,
    write_array,
)
from ._options import fallback_temp_folder, resolve_temp_folder
from ._tempfolder import (
    create_private_file,
    free_bytes,
    make_private_folder,
    no_room_error,
    remove_private_folder,
    unlink_quietly,
)

__all__ = ["ArrayStore", "Holds", "MemmapStore", "Session", "owner_of"]

# folder -> the live store that owns it; lets any store hold a file another made.
_OWNERS: weakref.WeakValueDictionary[str, MemmapStore] = weakref.WeakValueDictionary()


def owner_of(path: str) -> MemmapStore | None:
    """The open store whose private folder holds ``path``, if any."""
    return _OWNERS.get(os.path.dirname(path))


@dataclass
class Session:
    """One submit time: arrays already checked against their dump in this call."""

    checked: set[int] = field(default_factory=set)


@dataclass
class Holds:
    """The files one pending task keeps alive; released when its future is done."""

    session: Session
    files: list[tuple[MemmapStore, str]] = field(default_factory=list)

    def release(self) -> None:
        files, self.files = self.files, []
        for store, path in files:
            store.release(path)


class ArrayStore(Protocol):
    """What the reducer needs from a store. ``ref_for`` returns None to pickle normally."""

    def ref_for(self, a: np.ndarray, holds: Holds) -> Any: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class _Dump:
    """A caller's array and the file holding its bytes."""

    key: int
    wref: weakref.ref[np.ndarray]
    path: str
    ref: ArrayRef
    flat: np.ndarray | None = None


class MemmapStore:
    """Dumps arrays into a private folder and deletes each file when unused."""

    def __init__(self, max_nbytes: int | None, mmap_mode: str, temp_folder: str | None = None) -> None:
        self.max_nbytes = max_nbytes
        self.mmap_mode = mmap_mode
        self._base, self._explicit = resolve_temp_folder(temp_folder)
        self._lock = threading.RLock()
        self._folders: dict[str, str] = {}  # base folder -> our private folder in it
        self._counts: dict[str, int] = {}
        self._dumps: dict[int, _Dump] = {}
        self._closed = False

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
                folder = self._folders[base] = make_private_folder(base)
                _OWNERS[folder] = self
            return folder

    def _folder_for(self, nbytes: int) -> str:
        folder = self.folder
        if free_bytes(folder) >= nbytes:
            return folder
        if not self._explicit:
            other = self._private_folder(fallback_temp_folder())
            if free_bytes(other) >= nbytes:
                return other
        raise no_room_error(self._base, nbytes)

    # -- reference counts ------------------------------------------------
    def hold(self, path: str) -> bool:
        """Count one more user of ``path``; False if it is already gone."""
        with self._lock:
            count = self._counts.get(path)
            if count is None:
                return False
            self._counts[path] = count + 1
            return True

    def release(self, path: str) -> None:
        """Count one user fewer; delete the file when none is left."""
        with self._lock:
            count = self._counts.get(path)
            if count is None:
                return
            if count > 1:
                self._counts[path] = count - 1
                return
            del self._counts[path]
        unlink_quietly(path)

    def adopt(self, path: str) -> None:
        """Start counting a file a worker wrote into our folder (one user)."""
        with self._lock:
            self._counts[path] = self._counts.get(path, 0) + 1

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
        if self.max_nbytes is None or a.nbytes < self.max_nbytes:
            return None
        if type(a) is not np.ndarray and type(a) is not np.memmap:
            return None  # subclasses keep their type through normal pickling
        return self._dump_ref(a, holds)

    def _memmap_ref(self, a: np.ndarray, mm: np.memmap, holds: Holds) -> ArrayRef | None:
        path = os.path.abspath(mm.filename)  # type: ignore[arg-type]
        owner = owner_of(path)
        if owner is not None:
            if not owner.hold(path):
                return None  # its file is gone: treat ``a`` as an ordinary array
            holds.files.append((owner, path))
        mode = "r+" if mm.mode in ("r+", "w+") else "r"
        return ArrayRef(path, a.dtype, a.shape, a.strides, file_offset_of(a, mm), "C", mode)

    def _dump_ref(self, a: np.ndarray, holds: Holds) -> ArrayRef:
        key = id(a)
        with self._lock:
            dump = self._dumps.get(key)
        if dump is not None and dump.wref() is a and self._still_valid(dump, a, holds.session):
            if self.hold(dump.path):
                holds.files.append((self, dump.path))
                return dump.ref
        dump = self._new_dump(a)
        holds.session.checked.add(key)
        self.hold(dump.path)
        holds.files.append((self, dump.path))
        return dump.ref

    def _still_valid(self, dump: _Dump, a: np.ndarray, session: Session) -> bool:
        """True when ``a`` is unchanged since it was dumped (checked once per session)."""
        if dump.key in session.checked:
            return True
        if dump.flat is None:
            dump.flat = open_whole(dump.path, "r")
        if not same_bytes(a, dump.flat):
            return False
        session.checked.add(dump.key)
        return True

    def _new_dump(self, a: np.ndarray) -> _Dump:
        folder = self._folder_for(a.nbytes)
        fd, path = create_private_file(folder)
        try:
            write_array(fd, path, a)
        finally:
            os.close(fd)
        order = layout_order(a)
        ref = ArrayRef(path, a.dtype, a.shape, None, 0, order, self.mmap_mode)
        key = id(a)
        dump = _Dump(key, weakref.ref(a, lambda _, k=key, p=path: self._forget(k, p)), path, ref)
        with self._lock:
            if self._closed:
                unlink_quietly(path)
                raise RuntimeError("this executor's temp folder was removed at shutdown")
            self._counts[path] = 1  # held by the caller's array while it lives
            old = self._dumps.get(key)
            self._dumps[key] = dump
        if old is not None:
            self.release(old.path)
        return dump

    def _forget(self, key: int, path: str) -> None:
        with self._lock:
            dump = self._dumps.get(key)
            if dump is not None and dump.path == path:
                del self._dumps[key]
        self.release(path)

    # -- results ---------------------------------------------------------
    def open_result(self, ref: ArrayRef) -> np.ndarray:
        """Map a result a worker dumped into our folder; the file goes with the array."""
        whole = open_whole(ref.path, "r+")
        self.adopt(ref.path)
        weakref.finalize(whole, self.release, ref.path)
        return open_ref(ref, whole).view(np.ndarray)

    # -- end -------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Delete every file and folder this store made. Idempotent; returns when done."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._counts.clear()
            self._dumps.clear()
            for folder in self._folders.values():
                _OWNERS.pop(folder, None)
                remove_private_folder(folder)
