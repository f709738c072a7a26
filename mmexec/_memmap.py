"""Arrays <-> files: write an array, map it back, find the map an array lives in.

Public helpers :func:`dump`, :func:`load` and :func:`has_shareable_memory`
live here next to the internals they share with the store and the reducer.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import pickle
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._compat import mmap_of
from ._options import validate_mmap_mode
from ._tempfolder import no_room_error, unlink_quietly

__all__ = [
    "ArrayRef",
    "BlobRef",
    "address_of",
    "as_pickled",
    "backing_memmap",
    "copy_as_pickled",
    "dump",
    "dump_strides",
    "file_offset_of",
    "has_shareable_memory",
    "layout_order",
    "load",
    "memory_bytes",
    "map_blob",
    "open_ref",
    "open_whole",
    "pickles_native",
    "read_array",
    "read_blob",
    "same_bytes",
    "same_bytes_in",
    "write_array",
]

_BLOCK_BYTES = 16 * 2**20
_MAX_WRITE = 2**30
_libc_memcmp = ctypes.CDLL(None).memcmp
_libc_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_libc_memcmp.restype = ctypes.c_int


@dataclass(frozen=True, slots=True)
class ArrayRef:
    """What travels instead of an array: where its bytes are and how to view them.

    ``offset`` is the file offset of the first element; ``strides`` is None
    for a dump laid out contiguously in ``order`` (a dump of a transpose of a
    contiguous array may keep its strides, :func:`dump_strides`). ``ident`` is
    the file's ``(st_dev, st_ino)`` as the caller saw it, for a caller's own
    ``np.memmap``: the worker checks that ``path`` still names that file.
    """

    path: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    strides: tuple[int, ...] | None
    offset: int
    order: str
    mode: str
    ident: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class BlobRef:
    """What travels instead of a large bytes-like object: the file holding its bytes, and what to rebuild.

    ``kind``: ``'bytes'``, ``'bytearray'``, or an out-of-band pickle buffer,
    ``'buffer'`` (writable) or ``'rbuffer'`` (read-only).
    """

    path: str
    nbytes: int
    kind: str


def read_blob(ref: BlobRef, copy_buffers: bool = False) -> Any:
    """The bytes of a blob's file, as a new ``bytes`` or ``bytearray`` (buffers too, with ``copy_buffers``)."""
    fd = os.open(ref.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        writable = ref.kind in ("bytearray", "buffer")
        if ref.kind == "bytes" or (copy_buffers and not writable):
            data = os.pread(fd, ref.nbytes, 0)
            if len(data) != ref.nbytes:
                raise OSError(errno.EIO, f"{ref.path!r} holds {len(data)} bytes, not {ref.nbytes}")
            return data
        if ref.kind == "bytearray" or copy_buffers:
            buf = bytearray(ref.nbytes)
            view, pos = memoryview(buf), 0
            while pos < ref.nbytes:
                n = os.preadv(fd, [view[pos:]], pos)
                if n == 0:
                    raise OSError(errno.EIO, f"{ref.path!r} holds {pos} bytes, not {ref.nbytes}")
                pos += n
            return buf
    finally:
        os.close(fd)
    raise ValueError(f"a {ref.kind} blob is mapped (map_blob), not read")


def map_blob(ref: BlobRef) -> np.memmap:
    """Map an out-of-band buffer's file: read-only for a read-only buffer, else private copy-on-write."""
    view: np.memmap = open_whole(ref.path, "r" if ref.kind == "rbuffer" else "c")[: ref.nbytes]  # type: ignore[assignment]
    return view


def address_of(a: np.ndarray) -> int:
    """The address of ``a``'s first byte."""
    return int(a.__array_interface__["data"][0])


def backing_memmap(a: np.ndarray) -> np.memmap | None:
    """The open file-backed ``np.memmap`` that ``a``'s memory belongs to, if any."""
    b: Any = a
    while isinstance(b, np.ndarray):
        if isinstance(b, np.memmap) and mmap_of(b) is not None and getattr(b, "filename", None):
            return b
        b = b.base
    return None


def has_shareable_memory(a: Any) -> bool:
    """Return True if ``a``'s memory is a memory map that other processes can open.

    True for an ``np.memmap``, any view or slice of one, and a plain ndarray
    whose memory belongs to one (``np.asarray(memmap[2:5])``). Inside a task,
    True for every array that mmexec passed by memory map.

    .. versionadded:: 0.1.0
    """
    b: Any = a
    while isinstance(b, np.ndarray):
        if isinstance(b, np.memmap) and mmap_of(b) is not None:
            return True
        b = b.base
    return isinstance(b, mmap.mmap)


def file_offset_of(a: np.ndarray, mm: np.memmap) -> int:
    """File offset of ``a``'s first element, ``a`` being a view into ``mm``."""
    start = mm.offset - mm.offset % mmap.ALLOCATIONGRANULARITY
    base = np.frombuffer(mmap_of(mm), dtype=np.uint8)  # type: ignore[arg-type]
    return start + address_of(a) - address_of(base)


def _contiguous_blocks(a: np.ndarray) -> Iterator[np.ndarray]:
    """``a``'s bytes in C order (F order when ``a`` is F-contiguous; as they lie in memory for a transpose of a
    contiguous array that a dump keeps so, :func:`dump_strides`), as uint8 blocks."""
    if a.flags.c_contiguous or a.flags.f_contiguous or dump_strides(a) is not None:
        flat = memory_bytes(a)
        for start in range(0, flat.size, _MAX_WRITE):
            yield flat[start : start + _MAX_WRITE]
        return
    rows = max(1, _BLOCK_BYTES // max(1, a[0].nbytes))
    for start in range(0, a.shape[0], rows):
        yield np.ascontiguousarray(a[start : start + rows]).reshape(-1).view(np.uint8)


def memory_bytes(a: np.ndarray) -> np.ndarray:
    """The memory of ``a`` (C- or F-contiguous, or a transpose of a contiguous array) as uint8, in address order:
    no copy."""
    if a.flags.c_contiguous:
        laid = a
    elif a.flags.f_contiguous:
        laid = a.T
    else:
        laid = a.transpose(_axes_by_stride(a))
    return laid.reshape(-1).view(np.uint8)


def layout_order(a: np.ndarray) -> str:
    """The order in which :func:`write_array` lays ``a`` out."""
    return "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"


def _contiguous_once_permuted(a: np.ndarray) -> bool:
    """True when some order of ``a``'s axes makes it C-contiguous (a transpose of a contiguous array; as for
    NumPy, the strides of axes of length 1, even 0 or negative, do not count)."""
    return bool(a.transpose(_axes_by_stride(a)).flags.c_contiguous)


def _pickle_keeps_permuted() -> bool:
    """Whether this NumPy pickles a transposed contiguous array as a buffer (NumPy 2: strides and byte order
    kept) rather than through its values (NumPy 1: C order, native byte order)."""
    probe = np.zeros((2, 3, 4), dtype=">i2").transpose(0, 2, 1)  # (neither C- nor F-contiguous)
    return bool(pickle.loads(pickle.dumps(probe, protocol=5)).dtype == probe.dtype)


_PICKLE_KEEPS_PERMUTED = _pickle_keeps_permuted()


@functools.lru_cache(maxsize=256)
def _exports_buffer(dtype: np.dtype[Any]) -> bool:
    """Whether NumPy can export ``dtype`` as a buffer, which it needs to pickle an array as one: not datetime64 or
    timedelta64 (also inside a structured dtype), nor fields out of order or overlapping."""
    try:
        memoryview(np.empty(1, dtype))  # type: ignore[arg-type]  # numpy's stubs lack the buffer protocol
    except (ValueError, TypeError, BufferError, NotImplementedError):
        return False
    return True


def _axes_by_stride(a: np.ndarray) -> list[int]:
    """``a``'s axes from the largest stride to the smallest (ties in axis order), as NumPy orders them."""
    return sorted(range(a.ndim), key=lambda axis: -abs(a.strides[axis]))


def dump_strides(a: np.ndarray) -> tuple[int, ...] | None:
    """The strides a dump of ``a`` keeps, or None when it is laid out in C or F order (:func:`layout_order`).

    Where this NumPy pickles a transpose of a contiguous array as its buffer
    (NumPy 2; not for a dtype it cannot export as a buffer, such as
    datetime64, which it pickles through the values), pickling keeps its layout: the dump then holds its memory
    as it lies, and the strides are those pickling gives (the same but for
    axes of length 1).
    """
    if not _PICKLE_KEEPS_PERMUTED or a.flags.c_contiguous or a.flags.f_contiguous:
        return None
    if a.dtype.hasobject or not a.dtype.itemsize or not _exports_buffer(a.dtype) or not _contiguous_once_permuted(a):
        return None
    strides = [0] * a.ndim
    step = a.dtype.itemsize
    for axis in reversed(_axes_by_stride(a)):
        strides[axis] = step
        step *= a.shape[axis]
    return tuple(strides)


def pickles_native(a: np.ndarray) -> bool:
    """True when pickling gives ``a`` back in native byte order where ``a`` has another: NumPy pickles an array
    through its values (not as a buffer) when it is neither C- nor F-contiguous (nor, on NumPy 2, a transpose
    of a contiguous array), or of a datetime64 or
    timedelta64 dtype, and a simple (not structured) dtype then comes back native. A dump of ``a`` is made of
    ``a.astype(native)`` then, so that the map path gives what pickling does. (An ``np.memmap`` is judged as
    the ndarray it stands for: a task's mapped argument is one where pickling would have given an ndarray.)"""
    if a.dtype.fields is not None or a.dtype.isnative:
        return False
    if a.dtype.kind in "Mm":
        return True
    if a.flags.c_contiguous or a.flags.f_contiguous:
        return False
    return not (_PICKLE_KEEPS_PERMUTED and _contiguous_once_permuted(a))


def as_pickled(a: np.ndarray) -> np.ndarray:
    """``a``, or a native-byte-order copy where pickling would give that (:func:`pickles_native`)."""
    if not pickles_native(a):
        return a
    plain = a.view(np.ndarray)  # (a plain array, as pickling gives, never a memmap)
    native: np.ndarray = plain.astype(a.dtype.newbyteorder("="), order="F" if layout_order(a) == "F" else "C")
    return native


def copy_as_pickled(a: np.ndarray) -> np.ndarray:
    """A new array, in memory, equal to what pickling ``a`` gives: C order unless ``a`` is only F-contiguous,
    every byte of every item (a structured dtype's padding too), native byte order where pickling gives it."""
    if pickles_native(a):
        return as_pickled(a)
    out = _empty(a.shape, a.dtype, dump_strides(a), layout_order(a))
    if a.dtype.itemsize:
        raw = np.dtype((np.void, a.dtype.itemsize))  # (copied as bytes: a field-by-field copy drops the padding)
        np.copyto(out.view(raw), a.view(raw))
    return out


def write_array(fd: int, path: str, a: np.ndarray, reserve: AbstractContextManager[Any] | None = None) -> None:
    """Write ``a``'s bytes at the start of ``fd``; on a full disk remove ``path`` and raise TempFolderError.

    ``reserve`` (for a new file: a lock, or a null context in a process with
    one thread) makes it reserve the whole size first (``posix_fallocate``),
    holding it: concurrent dumps into a nearly full folder then either get
    all their room or fail at once, instead of all failing halfway.
    """
    pos = 0
    try:
        if reserve is not None and a.nbytes:
            with reserve:
                os.posix_fallocate(fd, 0, a.nbytes)
        for block in _contiguous_blocks(a):
            view = memoryview(block)  # type: ignore[arg-type]  # numpy's stubs lack the buffer protocol
            while view:
                n = os.pwrite(fd, view, pos)
                view = view[n:]
                pos += n
    except OSError as exc:
        unlink_quietly(path)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_room_error(os.path.dirname(path), a.nbytes) from exc
        raise


def same_bytes(a: np.ndarray, flat: np.ndarray) -> bool:
    """True when ``a``'s bytes equal ``flat``, a uint8 map of the file :func:`write_array` wrote."""
    pos = 0
    base = address_of(flat)
    for block in _contiguous_blocks(a):
        n = block.size
        if pos + n > flat.size or _libc_memcmp(address_of(block), base + pos, n) != 0:
            return False
        pos += n
    return pos == flat.size


def same_bytes_in(a: np.ndarray, flat: np.ndarray, ranges: list[tuple[int, int]]) -> bool:
    """True when ``a``'s bytes equal ``flat``'s within each ``(start, end)`` byte range; ``a`` is contiguous
    (C or F) and ``flat`` the file :func:`write_array` wrote for it, which holds its memory byte for byte."""
    at, base = address_of(a), address_of(flat)
    for lo, hi in ranges:
        if hi > flat.size or (hi > lo and _libc_memcmp(at + lo, base + lo, hi - lo) != 0):
            return False
    return True


def open_ref(ref: ArrayRef, whole: np.memmap | None = None) -> np.memmap:
    """Rebuild the array ``ref`` describes as an ``np.memmap``; ``whole`` maps the file (as uint8).

    The view's base is ``whole``: the map stays alive, and tells where the
    view's memory comes from, as long as the view does.
    """
    if whole is None:
        whole = open_whole(ref.path, ref.mode)
    view = np.ndarray.__new__(
        np.memmap, ref.shape, ref.dtype, buffer=whole, offset=ref.offset, strides=ref.strides,
        order=ref.order,  # type: ignore[arg-type]  # "C" or "F", checked when the ref was made
    )
    view.filename, view.offset, view.mode = whole.filename, whole.offset, whole.mode  # (public attributes)
    return view


def _empty(shape: tuple[int, ...], dtype: np.dtype[Any], strides: tuple[int, ...] | None, order: str) -> np.ndarray:
    """A new array in memory, laid out in ``order`` or with ``strides`` (over exactly its bytes)."""
    if strides is None:
        return np.empty(shape, dtype, order="F" if order == "F" else "C")
    memory = np.empty(dtype.itemsize * int(np.prod(shape)), np.uint8)
    return np.ndarray(shape, dtype, buffer=memory, strides=strides)


def read_array(fd: int, ref: ArrayRef) -> np.ndarray:
    """A new in-memory array holding what :func:`write_array` wrote at the start of ``fd`` for ``ref``."""
    out = _empty(ref.shape, ref.dtype, ref.strides, ref.order)
    flat = out.base if ref.strides is not None else (out.T if ref.order == "F" else out).reshape(-1).view(np.uint8)
    view, pos = memoryview(flat), 0  # type: ignore[arg-type]  # numpy's stubs lack the buffer protocol
    while pos < len(view):
        n = os.preadv(fd, [view[pos:]], pos)
        if n == 0:
            raise OSError(errno.EIO, f"a result file holds {pos} bytes, not {len(view)}")
        pos += n
    return out


def open_whole(path: str, mode: str) -> np.memmap:
    """Map a whole file as bytes; ``'w+'`` is opened as ``'r+'`` so nothing is truncated."""
    return np.memmap(path, dtype=np.uint8, mode="r+" if mode == "w+" else mode)  # type: ignore[call-overload,no-any-return]


def dump(array: np.ndarray, filename: str | os.PathLike[str]) -> list[str]:
    """Write ``array`` to ``filename`` (``.npy`` format) for :func:`load` to map.

    Returns the list of files written, like ``joblib.dump``. The file is the
    caller's: mmexec never deletes it.

    .. versionadded:: 0.1.0
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"dump() writes numpy arrays, not {type(array).__name__}; use joblib.dump for other objects")
    if array.dtype.hasobject:
        raise TypeError("dump() cannot write an object-dtype array as a memory map; pickle it instead")
    path = os.fspath(filename)
    with open(path, "wb") as f:
        np.save(f, np.asanyarray(array).view(np.ndarray), allow_pickle=False)
    return [path]


def _looks_like_joblib(head: bytes) -> bool:
    """A pickle, or one compressed as joblib.dump does (zlib, gzip, bz2, lzma, xz), not a ``.npy`` file."""
    zlib = len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
    return head[:1] == b"\x80" or zlib or head.startswith((b"\x1f\x8b", b"BZh", b"]\x00\x00", b"\xfd7zXZ"))


def load(filename: str | os.PathLike[str], mmap_mode: str | None = None) -> Any:
    """Read a file written by :func:`dump` (or ``np.save``).

    With ``mmap_mode`` (``'r'``, ``'r+'``, ``'w+'`` or ``'c'``) the result is a
    ``numpy.memmap`` that shares the file's pages; without, an ndarray in memory.

    .. versionadded:: 0.1.0
    """
    mmap_mode = validate_mmap_mode(mmap_mode)
    if mmap_mode == "w+":
        mmap_mode = "r+"
    path = os.fspath(filename)
    with open(path, "rb") as f:
        head = f.read(6)
    if _looks_like_joblib(head):
        raise ValueError(
            f"{path!r} looks like a joblib.dump file (a pickle, maybe compressed), not a .npy file: read it with "
            "joblib.load(filename, mmap_mode=...), or write arrays with mmexec.dump (or np.save) for mmexec.load"
        )
    return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)  # type: ignore[arg-type]
