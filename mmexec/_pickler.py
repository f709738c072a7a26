"""Pickling across the process boundary, both ways: large arrays and bytes travel as files.

Caller side: :func:`encode_task` pickles a task record (``_records``) with
cloudpickle. Its hooks ask the store for a reference instead of the data:

* ``reducer_override``: every ndarray, wherever it sits (the store decides:
  larger than ``max_nbytes``, an ``np.memmap``, ...);
* ``buffer_callback``: a protocol-5 out-of-band buffer (what pyarrow and
  other libraries' objects give) larger than ``max_nbytes``;
* ``persistent_id``: a ``bytes`` or ``bytearray`` larger than ``max_nbytes``
  (the pickler handles those before any other hook). As it is called for
  every object, it is used only when a first pass wrote such an object
  (:class:`_Sink` stops that pass at once), so small tasks never pay for it.

:func:`decode_result` rebuilds what a worker sent back, on the executor's
manager thread: large result arrays that the worker wrote into the store's
folder are adopted and mapped there, large bytes read and their files removed.

:func:`loads` is shared with the worker side (``_worker``): it unpickles a
payload, mapping each file it refers to once and recording the maps made.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import sys
import threading
import types
from collections import ChainMap
from collections.abc import Callable
from typing import Any

import cloudpickle
import numpy as np

from ._errors import FileChangedError, ResultError
from ._memmap import ArrayRef, BlobRef, copy_as_pickled, map_blob, open_ref, open_whole, read_blob
from ._records import Outcomes, Task, pack
from ._store import UNKNOWN_IDENTITY, ArrayStore, Holds, MemmapStore, owner_of
from ._tempfolder import unlink_quietly

__all__ = [
    "PROTOCOL",
    "Side",
    "decode_result",
    "dump",
    "encode_task",
    "load_ref",
    "load_result",
    "loads",
]

PROTOCOL = 5


def _reduce_code_keeping_its_file(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a function's code (one sent by value: defined in ``__main__``, say),
    but with its file name, which cloudpickle 3 replaces with ``<dynamic-code>``: the worker's
    traceback then names the caller's file and shows the failing line, as ProcessPoolExecutor's does."""
    assert _CLOUDPICKLE_CODE_REDUCE is not None
    reduced = _CLOUDPICKLE_CODE_REDUCE(code)
    ctor, args = reduced[0], reduced[1]
    if not isinstance(args, tuple):
        return reduced
    args = tuple(code.co_filename if isinstance(a, str) and a == "<dynamic-code>" else a for a in args)
    return (ctor, args, *reduced[2:])


_CLOUDPICKLE_CODE_REDUCE = cloudpickle.Pickler.dispatch_table.get(types.CodeType)
_DISPATCH = (
    cloudpickle.Pickler.dispatch_table
    if _CLOUDPICKLE_CODE_REDUCE is None
    else ChainMap({types.CodeType: _reduce_code_keeping_its_file}, cloudpickle.Pickler.dispatch_table)
)


# ------------------------------------------------------------ the picklers
class _LargeBlob(Exception):
    """A first pass wrote a bytes-like object larger than the limit: pickle again with ``persistent_id``."""


class _NeedCloudpickle(Exception):
    """The fast pass met a function or class that must travel by value (``__main__``, a lambda, a local one)."""


class _Sink(io.BytesIO):
    """The first pass's output: stops it as soon as a large bytes-like object is written whole.

    The C pickler writes an object of 64 KiB or more with one ``write`` of the
    object itself; below that (a limit under 64 KiB), the output's size
    tells.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.small_limit = limit < 2**16

    def write(self, data: Any) -> int:
        size = len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes
        if size > self.limit and (isinstance(data, (bytes, bytearray, pickle.PickleBuffer)) or self.small_limit):
            raise _LargeBlob
        n: int = super().write(data)
        if self.small_limit and self.tell() > self.limit:
            raise _LargeBlob
        return n


class Side:
    """What one side of the boundary does with arrays and large bytes while pickling (see :func:`dump`).

    ``limit``: bytes-like objects larger than this go through :meth:`put_blob`
    (None: never). ``refs``: the out-of-band buffers' references, in order.
    """

    limit: int | None = None

    def __init__(self, by_reference: dict[int, tuple[Any, bool]] | None = None) -> None:
        self.refs: list[BlobRef] = []
        #: id(function or class) -> (it, whether it is importable): a cache the caller may keep across calls.
        self.by_reference = {} if by_reference is None else by_reference

    def reduce_array(self, obj: np.ndarray) -> Any:
        """A reduction for ``obj`` (a reference), or None to pickle it normally."""
        return None

    def put_blob(self, view: memoryview, kind: str) -> BlobRef | None:
        """Write a large bytes-like object where the other side can read it: its reference, or None."""
        return None

    def undo(self) -> None:
        """A pass was abandoned: let go of what it took (the next pass takes it again)."""
        self.refs.clear()

    def on_buffer(self, buf: pickle.PickleBuffer) -> bool:
        """The picklers' ``buffer_callback`` (a method of the side, not of the pickler: no reference cycle):
        False (out of band) for a buffer larger than the limit that was written out."""
        limit = self.limit
        if limit is None:
            return True
        try:
            view = buf.raw()
        except BufferError:  # not contiguous: in band
            return True
        if view.nbytes <= limit:
            return True
        ref = self.put_blob(view, "rbuffer" if view.readonly else "buffer")
        if ref is None:
            return True
        self.refs.append(ref)
        return False

    def importable(self, obj: Any) -> bool:
        """Whether the other side finds ``obj`` (a function or class) by its name, as cloudpickle decides."""
        known = self.by_reference.get(id(obj))
        if known is not None and known[0] is obj:
            return known[1]
        module_name = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        found = False
        if (
            isinstance(module_name, str) and isinstance(qualname, str) and module_name != "__main__"
            and "<locals>" not in qualname and module_name not in cloudpickle.list_registry_pickle_by_value()
        ):
            target: Any = sys.modules.get(module_name)
            for part in qualname.split("."):
                target = getattr(target, part, None)
            found = target is obj and sys.modules.get(module_name) is not None
        if len(self.by_reference) > 4096:
            self.by_reference.clear()
        self.by_reference[id(obj)] = (obj, found)
        return found


class _Hooks:
    """The hooks both picklers share; ``side`` says what to do with arrays and bytes."""

    side: Side

    def blob_id(self, obj: Any) -> Any:
        """``persistent_id`` of the second pass's classes only (see :func:`dump`): the C pickler calls it for
        every object, so the first pass must not have it."""
        kind = type(obj)
        limit = self.side.limit
        if (kind is bytes or kind is bytearray) and limit is not None and len(obj) > limit:
            return self.side.put_blob(memoryview(obj), kind.__name__)
        return None

    def _other(self, obj: Any) -> Any:
        raise NotImplementedError

    def reducer_override(self, obj: Any) -> Any:  # noqa: D102
        if isinstance(obj, np.ndarray):
            reduced = self.side.reduce_array(obj)
            if reduced is not None:
                return reduced
        return self._other(obj)


class _Fast(_Hooks, pickle.Pickler):
    """The C pickler: functions and classes by name, as the standard library's executor sends them."""

    def __init__(self, file: io.BytesIO, side: Side) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=side.on_buffer)
        self.side = side

    def _other(self, obj: Any) -> Any:
        if (isinstance(obj, type) or isinstance(obj, types.FunctionType)) and not self.side.importable(obj):
            raise _NeedCloudpickle
        return NotImplemented


class _Full(_Hooks, cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle: what the other side cannot import travels by value."""

    dispatch_table = _DISPATCH

    def __init__(self, file: io.BytesIO, side: Side) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=side.on_buffer)
        self.side = side

    def _other(self, obj: Any) -> Any:
        return cloudpickle.Pickler.reducer_override(self, obj)


class _FastWithBlobs(_Fast):
    persistent_id = _Hooks.blob_id


class _FullWithBlobs(_Full):
    persistent_id = _Hooks.blob_id


def dump(obj: Any, side: Side) -> tuple[bytes, bool]:
    """Pickle ``obj`` for the other side; ``(payload, blobs)``: ``blobs`` says whether large bytes travel as
    persistent ids (read them back with :func:`loads` ``blobs=True``).

    The C pickler first, with functions and classes by name; cloudpickle if
    one must travel by value (or the C pickler cannot pickle something).
    Each runs without ``persistent_id`` first; if that pass meets a
    bytes-like object larger than ``side.limit`` it stops at once, and a
    class with ``persistent_id`` runs instead.
    """
    try:
        return _dump_with(obj, side, _Fast, _FastWithBlobs)
    except _NeedCloudpickle:
        side.undo()
    except Exception:
        side.undo()  # (cloudpickle may manage; if not, its error is the one raised)
    return _dump_with(obj, side, _Full, _FullWithBlobs)


def _dump_with(obj: Any, side: Side, plain: type[_Fast] | type[_Full], blobs: type[_Fast] | type[_Full]) -> tuple[
    bytes, bool
]:
    if side.limit is not None:
        sink = _Sink(side.limit)
        try:
            plain(sink, side).dump(obj)
        except _LargeBlob:
            side.undo()
        else:
            return sink.getvalue(), False
        out = io.BytesIO()
        blobs(out, side).dump(obj)
        return out.getvalue(), True
    out = io.BytesIO()
    plain(out, side).dump(obj)
    return out.getvalue(), False


# ---------------------------------------------------------------- caller
class _TaskSide(Side):
    """The caller's side: arrays and large bytes become the store's references, held by the task."""

    def __init__(
        self, store: ArrayStore, holds: Holds, load: Callable[[Any], Any],
        by_reference: dict[int, tuple[Any, bool]] | None,
    ) -> None:
        super().__init__(by_reference)
        self.store = store
        self.holds = holds
        self.load = load
        self.mark = len(holds.files)
        self.limit = getattr(store, "max_nbytes", None) if hasattr(store, "blob_ref") else None

    def reduce_array(self, obj: np.ndarray) -> Any:
        ref = self.store.ref_for(obj, self.holds)
        return None if ref is None else (self.load, (ref,))

    def put_blob(self, view: memoryview, kind: str) -> BlobRef | None:
        put = getattr(self.store, "blob_ref", None)
        ref: BlobRef | None = None if put is None else put(view, kind, self.holds)
        return ref

    def undo(self) -> None:
        super().undo()
        self.holds.release_from(self.mark)


def encode_task(
    task: Task, store: ArrayStore, holds: Holds, load: Callable[[Any], Any] | None = None,
    by_reference: dict[int, tuple[Any, bool]] | None = None,
) -> tuple[bytes, list[BlobRef], bool]:
    """Pickle ``task``, swapping arrays and large bytes for the store's references (kept in ``holds``).

    Returns the payload, the out-of-band buffers' references and whether the
    payload holds persistent ids (large bytes). Unpickling calls
    ``load(ref)`` for each array reference: by default :func:`load_ref`,
    which maps an :class:`ArrayRef`; another store (``mmexec._dask``) passes
    the function that resolves its own references. ``by_reference`` caches
    which functions and classes travel by name (the caller keeps it).
    """
    side = _TaskSide(store, holds, load_ref if load is None else load, by_reference)
    payload, blobs = dump(pack(task), side)
    return payload, side.refs, blobs


# ------------------------------------------------------------ both sides
_local = threading.local()  # .maps: files mapped while loading one payload; .store: the decoding store


def load_ref(ref: ArrayRef) -> np.ndarray:
    """Unpickling an array reference: map its file (once per payload) and view it.

    In a result, a reference to one of mmexec's own files (a task returned
    a memory-mapped argument, or a view of one) gives the caller a plain,
    writable copy, as joblib and ``ProcessPoolExecutor`` do, never a map of
    a file it does not own: the copy is made here, from the file, instead of
    through the pipe. A caller's own ``np.memmap`` comes back as a map of it.
    """
    if getattr(_local, "store", None) is not None and owner_of(ref.path) is not None:
        return copy_as_pickled(open_ref(ref, open_whole(ref.path, "r")))
    maps: dict[tuple[str, str], np.memmap] | None = getattr(_local, "maps", None)
    key = (ref.path, ref.mode)
    whole = None if maps is None else maps.get(key)
    if whole is None:
        whole = _open_shared(ref)
        if maps is not None:
            maps[key] = whole
    return open_ref(ref, whole)


class _BlobUnpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, BlobRef):
            return read_blob(pid)
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def loads(
    data: bytes | memoryview, buffers: list[BlobRef] | None = None, blobs: bool = False,
    maps: dict[tuple[str, str], np.memmap] | None = None,
) -> Any:
    """Unpickle a payload, mapping each file it refers to once (into ``maps``, if given).

    ``buffers`` are the out-of-band buffers' references, ``blobs`` says
    whether large bytes travel as persistent ids.
    """
    _local.maps = {} if maps is None else maps
    try:
        views = None if not buffers else [_map_buffer(ref, _local.maps) for ref in buffers]
        if blobs:
            return _BlobUnpickler(io.BytesIO(data), buffers=views).load()
        return pickle.loads(data, buffers=views)
    finally:
        _local.maps = None


def _map_buffer(ref: BlobRef, maps: dict[tuple[str, str], np.memmap]) -> memoryview:
    whole = map_blob(ref)
    maps[(ref.path, whole.mode)] = whole
    return memoryview(whole)  # type: ignore[arg-type]  # numpy's stubs lack the buffer protocol


def _open_shared(ref: ArrayRef) -> np.memmap:
    """Map a file; in the caller, keep it alive as long as the map if a store owns it.

    A caller's own ``np.memmap`` (``ref.ident`` set) must still be the same
    file: else :class:`~mmexec.FileChangedError`.
    """
    if ref.ident is not None:
        _check_identity(ref)
    try:
        whole = open_whole(ref.path, ref.mode)
    except OSError as exc:
        if ref.ident is None:
            raise
        # (a caller's own file, gone between the check and here)
        raise FileChangedError(exc.errno, f"cannot open {ref.path!r} in the worker: {exc.strerror}") from exc
    store = owner_of(ref.path)
    if store is not None:
        store.hold_map(ref.path, whole)
    return whole


def _check_identity(ref: ArrayRef) -> None:
    assert ref.ident is not None
    try:
        st = os.stat(ref.path)
    except OSError as exc:
        raise FileChangedError(
            exc.errno, f"the np.memmap passed to this task maps {ref.path!r}, which cannot be opened here "
            f"({exc.strerror}): it was deleted or moved after the caller mapped it"
        ) from exc
    if ref.ident != UNKNOWN_IDENTITY and (st.st_dev, st.st_ino) != ref.ident:
        raise FileChangedError(
            errno.ESTALE, f"the np.memmap passed to this task maps {ref.path!r}, but that path now names "
            "another file (replaced after the caller mapped it): the task was not run on the wrong data. "
            "Map the file again (np.memmap / np.load(mmap_mode=...)) to pass the new one."
        )


# ---------------------------------------------------------------- caller
def load_result(ref: ArrayRef) -> np.ndarray:
    """Unpickling a large result a worker wrote into the decoding store's folder."""
    store: MemmapStore | None = getattr(_local, "store", None)
    if store is None or not (store.owns_folder(os.path.dirname(ref.path)) or owner_of(ref.path) is store):
        raise ResultError(
            f"a task's result was written to {ref.path!r}, which is not a file of the executor decoding it"
        )
    return store.open_result(ref)


class _ResultUnpickler(pickle.Unpickler):
    """Large bytes of a result: read from the worker's file, which is removed."""

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, BlobRef):
            return _take_blob(pid)
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def _take_blob(ref: BlobRef) -> Any:
    store: MemmapStore | None = getattr(_local, "store", None)
    if store is None or not store.owns_folder(os.path.dirname(ref.path)):
        raise ResultError(f"a task's result was written to {ref.path!r}, which is not a file of this executor")
    try:
        return read_blob(ref, copy_buffers=True)
    finally:
        unlink_quietly(ref.path)


def decode_result(
    data: bytes | memoryview, store: MemmapStore, buffers: list[BlobRef] | tuple[BlobRef, ...] = (),
    blobs: bool = False, files: list[str] | tuple[str, ...] = (),
) -> Outcomes:
    """Rebuild a task's result, mapping the arrays a worker dumped into ``store``'s folder.

    ``buffers`` are the out-of-band buffers' references, ``blobs`` says
    whether large bytes travel as persistent ids, ``files`` names every file
    the worker wrote for this result. Any failure raises
    :class:`ResultError` naming the cause (and, for too many open files, the
    way out); it fails that one result only. Whatever happens, no file the
    worker wrote is left in the folder: each is adopted by the result or
    removed.
    """
    _local.store = store
    try:
        views = None if not buffers else [_take_blob(ref) for ref in buffers]
        if blobs:
            values, error = _ResultUnpickler(io.BytesIO(data), buffers=views).load()
        else:
            values, error = pickle.loads(data, buffers=views)
        return Outcomes(values, error)
    except OSError as exc:
        if exc.errno == errno.EMFILE:
            raise ResultError(
                "a task's result could not be mapped: this process has too many open files "
                f"({exc}). Free results you no longer need, raise the limit (ulimit -n), or pass "
                "max_nbytes=None to receive results by pickling."
            ) from exc
        raise ResultError(f"a task's result could not be mapped in the caller: {exc}") from exc
    except BaseException as exc:  # SystemExit too: it must not end the executor's thread
        raise ResultError(
            f"a task's result could not be unpickled in the caller ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        _local.store = None
        if files or buffers:
            store.discard_results(files, buffers)
