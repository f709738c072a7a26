"""Caller side of the process boundary: tasks out, results in.

:func:`encode_task` pickles a task record (``_records``) with cloudpickle;
its ``reducer_override`` hook asks the store for a reference for every
ndarray, wherever it sits, so large arrays travel as a few bytes.

:func:`decode_result` rebuilds what a worker sent back. It runs on the
executor's own manager thread (never inside loky's result handling), with the
executor's store passed explicitly: large result arrays that the worker
wrote into the store's folder are adopted and mapped there.

:func:`loads` and :func:`load_ref` are shared with the worker side
(``_worker``), which unpickles task payloads the same way.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import threading
import types
import weakref
from collections import ChainMap
from collections.abc import Callable
from typing import Any

import cloudpickle
import numpy as np

from ._errors import FileChangedError, ResultError
from ._memmap import ArrayRef, open_ref, open_whole
from ._store import UNKNOWN_IDENTITY, ArrayStore, Holds, MemmapStore, owner_of

__all__ = ["PROTOCOL", "decode_result", "encode_task", "load_ref", "load_result", "loads"]

PROTOCOL = pickle.HIGHEST_PROTOCOL


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


class _TaskPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with ndarrays swapped for the store's references.

    ``reducer_override`` (unlike ``persistent_id``) is not called for ints,
    floats, strings, lists, tuples and dicts, so large argument lists stay cheap.
    """

    dispatch_table = (
        cloudpickle.Pickler.dispatch_table
        if _CLOUDPICKLE_CODE_REDUCE is None
        else ChainMap({types.CodeType: _reduce_code_keeping_its_file}, cloudpickle.Pickler.dispatch_table)
    )

    def __init__(self, file: io.BytesIO, store: ArrayStore, holds: Holds, load: Callable[[Any], Any]) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self._store = store
        self._holds = holds
        self._load = load

    def reducer_override(self, obj: Any) -> Any:  # noqa: D102
        if isinstance(obj, np.ndarray):
            ref = self._store.ref_for(obj, self._holds)
            if ref is not None:
                return self._load, (ref,)
        return super().reducer_override(obj)


def encode_task(task: Any, store: ArrayStore, holds: Holds, load: Callable[[Any], Any] | None = None) -> bytes:
    """Pickle ``task``, swapping arrays for the store's references (kept in ``holds``).

    Unpickling calls ``load(ref)`` for each reference: by default
    :func:`load_ref`, which maps an :class:`ArrayRef`; another store
    (``mmexec._dask``) passes the function that resolves its own references.
    """
    buf = io.BytesIO()
    _TaskPickler(buf, store, holds, load_ref if load is None else load).dump(task)
    return buf.getvalue()


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
        return np.array(open_ref(ref, open_whole(ref.path, "r")), copy=True)
    maps: dict[tuple[str, str], np.memmap] | None = getattr(_local, "maps", None)
    key = (ref.path, ref.mode)
    whole = None if maps is None else maps.get(key)
    if whole is None:
        whole = _open_shared(ref)
        if maps is not None:
            maps[key] = whole
    return open_ref(ref, whole)


def loads(data: bytes) -> Any:
    """Unpickle a payload, mapping each file it refers to once."""
    _local.maps = {}
    try:
        return pickle.loads(data)
    finally:
        _local.maps = None


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
    if store is not None and store.hold(ref.path, mapped=True):
        weakref.finalize(whole, store.release_later, ref.path, True)
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


def decode_result(data: bytes, store: MemmapStore) -> Any:
    """Rebuild a task's result, mapping the arrays a worker dumped into ``store``'s folder.

    Any failure raises :class:`ResultError` naming the cause (and, for
    too many open files, the way out); it fails that one result only.
    """
    _local.store = store
    try:
        return loads(data)
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
