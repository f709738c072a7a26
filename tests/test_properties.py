"""Property-based tests (hypothesis): arrays of every dtype, shape and layout come back as pickling gives them.

The drop-in contract: what a task gets, and what comes back from ``submit``,
``map`` and ``Parallel``, has the values, dtype (byte order, field offsets,
itemsize), shape and strides that ``ProcessPoolExecutor`` would give, that
is, what ``pickle.loads(pickle.dumps(a, protocol=5))`` gives here: an
argument pickled on the way in, the task run on that, its result pickled on
the way out (:func:`through_a_pool`). With ``max_nbytes=0`` every non-empty
array takes the memory-map path, both ways.

The deviations these tests found are stated once each, in their own tests
at the end (each failed before its fix).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from typing import Any

import hypothesis.extra.numpy as npst
import numpy as np
import pytest
from _tasks import as_seen, identity, leaf_bytes, live_dumps, make_array, returned
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mmexec import MemmapExecutor, Parallel, delayed, has_shareable_memory

SETTINGS = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
}
DEFAULT_LIMIT = 2**20  # MemmapExecutor's default max_nbytes ('1M')


# ---------------------------------------------------------------- dtypes
SCALAR_DTYPES = st.one_of(
    st.just(np.dtype(bool)),
    npst.integer_dtypes(endianness="?"),
    npst.unsigned_integer_dtypes(endianness="?"),
    npst.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
    npst.complex_number_dtypes(endianness="?", sizes=(64, 128)),
    npst.datetime64_dtypes(endianness="?", min_period="as"),
    npst.timedelta64_dtypes(endianness="?", min_period="as"),
    st.sampled_from([np.dtype("<M8[25s]"), np.dtype(">M8[3D]"), np.dtype(">m8[10ms]"), np.dtype("<m8[7W]")]),
    npst.byte_string_dtypes(min_len=1, max_len=8),
    npst.unicode_string_dtypes(endianness="?", min_len=1, max_len=6),
)


@st.composite
def structured_dtypes(draw: st.DrawFn, children: st.SearchStrategy[np.dtype]) -> np.dtype:
    """A structured dtype of 1 to 4 fields drawn from ``children`` (so nested ones too), some of them
    subarrays; packed, ``align=True`` (padding), or with explicit offsets (gaps, fields out of order,
    a larger itemsize)."""
    fields: list[Any] = []
    for i in range(draw(st.integers(1, 4))):
        child = draw(children)
        shape = draw(st.none() | npst.array_shapes(min_dims=1, max_dims=2, max_side=3))
        fields.append((f"f{i}", child) if shape is None else (f"f{i}", child, shape))
    kind = draw(st.sampled_from(["packed", "aligned", "offsets"]))
    if kind != "offsets":
        return np.dtype(fields, align=kind == "aligned")
    packed = np.dtype(fields)
    names = list(packed.names)
    offsets, pos = {}, 0
    for name in draw(st.permutations(names)):  # laid out in one order, named in another
        pos += draw(st.integers(0, 8))
        offsets[name] = pos
        pos += packed.fields[name][0].itemsize
    return np.dtype({
        "names": names,
        "formats": [packed.fields[n][0] for n in names],
        "offsets": [offsets[n] for n in names],
        "itemsize": pos + draw(st.integers(0, 8)),
    })


#: About half of them structured (a recursive strategy alone draws mostly nested ones).
DTYPES = SCALAR_DTYPES | st.recursive(SCALAR_DTYPES, structured_dtypes, max_leaves=8).filter(
    lambda d: d.itemsize <= 512
)


# ---------------------------------------------------------------- arrays and layouts
def random_array(shape: tuple[int, ...], dtype: np.dtype, order: str, seed: int, unaligned: bool = False) -> np.ndarray:
    """An array whose bytes are random (any bit pattern: NaNs with payloads, NaT, bools other than 0 and 1,
    padding: the bytes must travel, whatever they mean), but for its unicode strings' code points, which
    must be valid for NumPy to print the array (Hypothesis prints a failing example)."""
    rng = np.random.default_rng(seed)
    nbytes = dtype.itemsize * int(np.prod(shape)) + unaligned
    buf = rng.integers(0, 256, nbytes, dtype=np.uint8)
    a = np.ndarray(shape, dtype, buffer=buf, offset=int(unaligned), order=order)
    for leaf in unicode_leaves(a):
        n = leaf.dtype.itemsize // 4
        codes = rng.integers(0, 0xD800, leaf.shape + (n,), dtype=np.uint32)
        leaf[...] = codes.astype("<u4").view(f"<U{n}").reshape(leaf.shape)
    return a


def unicode_leaves(a: np.ndarray) -> Iterator[np.ndarray]:
    """Views of ``a``'s unicode strings, wherever they sit in its fields."""
    if a.dtype.kind == "U":
        yield a
    for name in a.dtype.names or ():
        yield from unicode_leaves(a[name])


def as_tuple(index: Any) -> tuple[Any, ...]:
    return index if isinstance(index, tuple) else (index,)


@st.composite
def views(draw: st.DrawFn, a: np.ndarray, read_only: bool = True) -> np.ndarray:
    """``a`` itself, or a view of it: basic indexing (steps, negative steps, integers, new axes), a transpose
    or permutation of its axes, a broadcast (stride 0); maybe made read-only."""
    kind = draw(st.sampled_from(["self", "index", "index+permute", "transpose", "reverse", "broadcast"]))
    if kind == "self":
        v = a
    elif kind == "transpose":
        v = a.T
    elif kind == "reverse":
        v = a[tuple(slice(None, None, -draw(st.integers(1, 3))) for _ in a.shape) + (...,)]
    elif kind == "broadcast":
        v = np.broadcast_to(a, (draw(st.integers(1, 3)),) + a.shape)
    else:
        index = as_tuple(draw(npst.basic_indices(a.shape, allow_ellipsis=False, allow_newaxis=True))) + (...,)
        v = a[index]
        if kind == "index+permute":
            v = v.transpose(draw(st.permutations(range(v.ndim))))
    if read_only and v.flags.writeable and draw(st.booleans()):
        v = v.view()
        v.flags.writeable = False
    return v


@st.composite
def shapes(draw: st.DrawFn, max_side: int = 4, max_dims: int = 4) -> tuple[int, ...]:
    """0 to ``max_dims`` dimensions, as many of each; a side is 0 (an empty array) one time in twenty."""
    ndim = draw(st.integers(0, max_dims))
    return tuple(0 if draw(st.integers(0, 19)) == 0 else draw(st.integers(1, max_side)) for _ in range(ndim))


@st.composite
def arrays(draw: st.DrawFn, dtypes: st.SearchStrategy[np.dtype] = DTYPES, max_side: int = 4) -> np.ndarray:
    """An array of any dtype and shape (0-d, empty, 1-d to 4-d), C or F ordered, maybe unaligned, seen
    through any view."""
    dtype = draw(dtypes)
    shape = draw(shapes(max_side))
    a = random_array(shape, dtype, draw(st.sampled_from("CF")), draw(st.integers(0, 2**32 - 1)), draw(st.booleans()))
    return draw(views(a))


@st.composite
def calls(draw: st.DrawFn, a: np.ndarray) -> tuple[Any, ...]:
    """The arguments of a :func:`_tasks.returned` call on ``a``: what the task gives back."""
    how = draw(st.sampled_from(["self", "view", "copy", "seen"]))
    if how != "view":
        return (a, how)
    index = as_tuple(draw(npst.basic_indices(a.shape, allow_ellipsis=False, allow_newaxis=True))) + (...,)
    ndim = a[index].ndim
    axes = draw(st.none() | st.permutations(range(ndim)).map(tuple))
    return (a, how, index, axes)


@st.composite
def call_lists(
    draw: st.DrawFn, array_strategy: st.SearchStrategy[np.ndarray], max_size: int = 4
) -> list[tuple[Any, ...]]:
    """1 to ``max_size`` calls, each on an array of its own."""
    return [draw(calls(draw(array_strategy))) for _ in range(draw(st.integers(1, max_size)))]


# ---------------------------------------------------------------- what pickling gives
def pickled(x: Any) -> Any:
    """What ProcessPoolExecutor's pipe makes of ``x``."""
    return pickle.loads(pickle.dumps(x, protocol=5))


def through_a_pool(call: tuple[Any, ...]) -> Any:
    """What ``ProcessPoolExecutor.submit(returned, *call).result()`` gives: the arguments pickled, the task run
    on them, its result pickled."""
    return pickled(returned(*pickled(call)))


def dtype_tree(d: np.dtype) -> Any:
    """Everything a dtype says about its bytes, nested fields and subarrays included: its ``str`` (byte order),
    itemsize, alignment, and each field's name, offset and dtype, in order."""
    fields = None if d.names is None else [(n, d.fields[n][1], dtype_tree(d.fields[n][0])) for n in d.names]
    sub = None if d.subdtype is None else (dtype_tree(d.subdtype[0]), d.subdtype[1])
    return (d.str, d.itemsize, d.alignment, d.isalignedstruct, fields, sub)


def has_padding(d: np.dtype) -> bool:
    """Whether some bytes of ``d`` belong to no field (nor to a nested field, or a subarray's)."""
    if d.subdtype is not None:
        return has_padding(d.subdtype[0])
    if d.names is None:
        return False
    fields = [d.fields[n] for n in d.names]
    return sum(f[0].itemsize for f in fields) != d.itemsize or any(has_padding(f[0]) for f in fields)


def assert_same_dtype(got: np.dtype, expected: np.dtype) -> None:
    """``got`` is ``expected``, offsets, itemsize, alignment and byte order included (on the map path too:
    NumPy pickles some arrays through their values, in native byte order, and the map path does the same)."""
    assert got == expected, (got, expected)
    assert dtype_tree(got) == dtype_tree(expected)


def assert_same_values(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal bytes (each leaf field's; a structured dtype's padding is undefined in any copy), and equal values
    where bytes alone do not say it (NaNs)."""
    dtype = expected.dtype
    assert leaf_bytes(got) == leaf_bytes(expected)
    if not has_padding(dtype):  # every byte defined: all of them
        assert got.tobytes() == expected.tobytes()
    if dtype.kind in "fc":
        with np.errstate(invalid="ignore"):  # (NumPy 2.5 warns comparing some complex NaN payloads)
            assert np.array_equal(got, expected, equal_nan=True)


def layout_name(a: np.ndarray) -> str:
    flags = a.flags
    if flags.c_contiguous or flags.f_contiguous:
        name = "C" if flags.c_contiguous else "F"
    else:
        name = "negative strides" if any(s < 0 for s in a.strides) else "strided"
    return name + ("" if flags.aligned else ", unaligned") + ("" if flags.writeable else ", read-only")


def raw_bytes(a: np.ndarray) -> bytes:
    """The bytes of a C- or F-contiguous array, as they are in its memory (padding included)."""
    return (a if a.flags.c_contiguous else a.T).reshape(-1).view(np.uint8).tobytes()


def assert_as_pickle_gives(got: Any, call: tuple[Any, ...], limit: int | None, result_by_map: bool = True) -> None:
    """``got``, the result of ``returned(*call)`` run by an executor with ``max_nbytes=limit``, is what pickling
    gives: type, shape, dtype, values, strides; a contiguous argument returned comes back with every byte, a
    structured dtype's padding too; and a large argument arrived as a map, and a large result (with
    ``result_by_map``) too."""
    expected = through_a_pool(call)
    a, how = call[0], call[1]
    on_map_path = limit is not None and a.size > 0 and a.nbytes > limit
    event(f"argument by map: {on_map_path}")
    event(f"argument: {a.ndim}-d, {'empty, ' if a.size == 0 else ''}{layout_name(a)}")
    event(f"dtype kind: {a.dtype.kind}{'' if a.dtype.names is None else ' (structured)'}")
    event(f"task: {how}")
    if how == "seen":
        assert got["shareable"] == on_map_path
        assert got["type"] is (np.memmap if on_map_path else np.ndarray)
        assert got["shape"] == expected["shape"]
        assert_same_dtype(got["dtype"], expected["dtype"])
        assert got["strides"] == expected["strides"]
        assert got["bytes"] == expected["bytes"]
        return
    assert type(got) is np.ndarray and type(expected) is np.ndarray
    assert got.shape == expected.shape
    assert_same_dtype(got.dtype, expected.dtype)
    assert got.strides == expected.strides  # (what pickling gives: the argument's layout, or a view's)
    assert_same_values(got, expected)
    contiguous = a.flags.c_contiguous or a.flags.f_contiguous
    if how == "self" and contiguous and got.dtype == a.dtype:
        assert raw_bytes(got) == raw_bytes(expected) == raw_bytes(a)  # every byte, a structured dtype's padding too
    if limit is not None and result_by_map:
        assert has_shareable_memory(got) == (got.size > 0 and got.nbytes > limit), "a large result comes by map"


# ---------------------------------------------------------------- fixtures
def checked_executor(request: pytest.FixtureRequest, **options: Any) -> Iterator[MemmapExecutor]:
    """A 2-worker executor with ``options`` for one test; once every example's arrays and results are gone, it
    holds no file (unless the test failed: its failing example's arrays are still alive in the traceback)."""
    ex = MemmapExecutor(2, **options)
    failed = request.session.testsfailed
    try:
        yield ex
        if request.session.testsfailed == failed:
            assert live_dumps(ex) == []
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def ex0(request: pytest.FixtureRequest) -> Iterator[MemmapExecutor]:
    """Every non-empty array takes the memory-map path, both ways."""
    yield from checked_executor(request, max_nbytes=0)


def run_calls(entry: str, runner: Any, items: list[tuple[Any, ...]], chunksize: int = 1) -> list[Any]:
    if entry == "submit":
        return [f.result(timeout=60) for f in [runner.submit(returned, *item) for item in items]]
    if entry == "map":
        # (each item padded to returned's four arguments: map zips its iterables)
        padded = [item + (None,) * (4 - len(item)) for item in items]
        return list(runner.map(returned, *zip(*padded, strict=True), chunksize=chunksize, timeout=60))
    return runner(delayed(returned)(*item) for item in items)


# ---------------------------------------------------------------- the properties
@settings(max_examples=500, **SETTINGS)
@given(items=call_lists(arrays()))
def test_submit_gives_what_pickle_gives(ex0, items):
    """Any array, through ``submit``: what the task gets and what comes back are what pickling gives."""
    for item, got in zip(items, run_calls("submit", ex0, items), strict=True):
        assert_as_pickle_gives(got, item, 0)


@settings(max_examples=200, **SETTINGS)
@given(items=call_lists(arrays(), max_size=6), chunksize=st.integers(1, 3))
def test_map_gives_what_pickle_gives(ex0, items, chunksize):
    """The same through ``map``, several items per chunk."""
    for item, got in zip(items, run_calls("map", ex0, items, chunksize), strict=True):
        assert_as_pickle_gives(got, item, 0)


@pytest.fixture
def parallel0() -> Iterator[Parallel]:
    with Parallel(n_jobs=2, max_nbytes=0) as parallel:
        yield parallel


@settings(max_examples=150, **SETTINGS)
@given(items=call_lists(arrays(), max_size=6))
def test_parallel_gives_what_pickle_gives(parallel0, items):
    """The same through ``Parallel(max_nbytes=0)``, its calls batched."""
    for item, got in zip(items, run_calls("parallel", parallel0, items), strict=True):
        assert_as_pickle_gives(got, item, 0)


@pytest.fixture
def ex0_read_only(request: pytest.FixtureRequest) -> Iterator[MemmapExecutor]:
    yield from checked_executor(request, max_nbytes=0, mmap_mode="r")


@settings(max_examples=200, **SETTINGS)
@given(items=call_lists(arrays()))
def test_mmap_mode_r_gives_what_pickle_gives(ex0_read_only, items):
    """With ``mmap_mode='r'`` a task that returns its argument (or a view of it) gives a copy made from the
    caller's own dump: the values, dtype, shape, strides and padding bytes pickling gives (see
    :func:`test_view_of_a_read_only_mapped_argument_comes_back_as_pickle_gives` and
    :func:`test_padding_of_a_read_only_mapped_argument_comes_back_as_pickle_gives`)."""
    for item, got in zip(items, run_calls("submit", ex0_read_only, items), strict=True):
        if item[1] in ("self", "view"):  # a copy of the caller's dump: not a map of its own
            assert_as_pickle_gives(got, item, 0, result_by_map=False)
            assert not has_shareable_memory(got)
        else:
            assert_as_pickle_gives(got, item, 0)


def test_a_view_of_a_read_only_mapped_argument_is_a_plain_array(ex0_read_only):
    """One case of the property above, always run: with ``mmap_mode='r'``, a task returning a non-contiguous view
    of its argument, of non-native byte order, gives a plain ndarray (a copy: the README's "plain, writable
    copy"), never an ``np.memmap``, with pickling's values."""
    a = np.array([24450, -15655], dtype=np.dtype(np.int16).newbyteorder())
    call = (a, "view", (slice(None, None, -1),), None)
    got = ex0_read_only.submit(returned, *call).result(timeout=60)
    assert type(got) is np.ndarray and got.flags.writeable
    assert got.tolist() == a[::-1].tolist() == through_a_pool(call).tolist()


# Arrays larger than the default threshold (1 MB): 2-d, up to about 2 MB, of scalar or small structured dtypes.
@st.composite
def large_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(SCALAR_DTYPES | structured_dtypes(SCALAR_DTYPES))
    rows = draw(st.integers(1, 300))
    cols = -(-(DEFAULT_LIMIT + draw(st.integers(1, DEFAULT_LIMIT))) // (rows * dtype.itemsize))
    a = random_array((rows, cols), dtype, draw(st.sampled_from("CF")), draw(st.integers(0, 2**32 - 1)))
    return draw(views(a))


@pytest.fixture
def ex_default(request: pytest.FixtureRequest) -> Iterator[MemmapExecutor]:
    yield from checked_executor(request)


@settings(max_examples=50, **SETTINGS)
@given(
    items=call_lists(st.one_of(large_arrays(), large_arrays(), arrays()), max_size=3),
    entry=st.sampled_from(["submit", "map"]),
)
def test_default_threshold_gives_what_pickle_gives(ex_default, items, entry):
    """With the default ``max_nbytes``: large arrays (and large views, results) by map, small ones pickled, all
    as pickling gives them."""
    for item, got in zip(items, run_calls(entry, ex_default, items), strict=True):
        assert_as_pickle_gives(got, item, DEFAULT_LIMIT)


# ---------------------------------------------------------------- the caller's own np.memmap
MEMMAP_BYTES = 1 << 16


@pytest.fixture
def memmap_file(tmp_path: Any) -> str:
    path = str(tmp_path / "data.bin")
    np.random.default_rng(0).integers(0, 256, MEMMAP_BYTES, dtype=np.uint8).tofile(path)
    return path


def has_unicode(d: np.dtype) -> bool:
    if d.subdtype is not None:
        return has_unicode(d.subdtype[0])
    return d.kind == "U" or any(has_unicode(d.fields[n][0]) for n in d.names or ())


@st.composite
def memmap_calls(draw: st.DrawFn, path: str) -> tuple[np.memmap, tuple[Any, ...]]:
    # (no unicode strings: the file's random bytes are no valid code points, and NumPy cannot print those)
    dtype = draw((SCALAR_DTYPES | structured_dtypes(SCALAR_DTYPES)).filter(lambda d: not has_unicode(d)))
    offset = draw(st.integers(0, 5000))
    room = (MEMMAP_BYTES - offset) // dtype.itemsize
    shape = draw(npst.array_shapes(min_dims=1, max_dims=3, max_side=6).filter(lambda s: np.prod(s) <= room))
    mode = draw(st.sampled_from(["r", "r+", "c"]))
    mm = np.memmap(path, dtype, mode, offset=offset, shape=shape, order=draw(st.sampled_from("CF")))
    return mm, draw(calls(draw(views(mm, read_only=False))))


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_views_of_a_callers_memmap(ex0, memmap_file, data):
    """Any view of an ``np.memmap`` the caller opened: the task gets, and a task returning it (or a view of it)
    gives back, a map of the same file with the exact offset, dtype and strides (the README's contract where it
    differs from pickling); one opened ``'c'`` travels as a plain array, as pickling gives it. The values are
    always pickling's."""
    mm, item = data.draw(memmap_calls(memmap_file))
    v, how = item[0], item[1]
    (got,) = run_calls("submit", ex0, [item])
    plain = (np.asarray(v),) + item[1:]  # the same values in a plain ndarray
    if v.size == 0:  # pickled as usual (a memmap's result comes back a plain array, as joblib gives it)
        if how != "seen":
            assert type(got) is np.ndarray and got.shape == through_a_pool(item).shape
        return
    if mm.mode == "c":  # an ordinary array, by a dump of its own
        assert_as_pickle_gives(got, plain, 0)
        return
    if how == "copy":  # a copy of what the task got (the caller's own map, in its own byte order), as an ndarray
        expected = pickled(np.asarray(returned(*item)))  # (then pickled back, as an ndarray)
        assert type(got) is np.ndarray
        assert (got.dtype, got.shape, got.strides) == (expected.dtype, expected.shape, expected.strides)
        assert leaf_bytes(got) == leaf_bytes(expected)
        return
    if how == "seen":
        assert got["type"] is np.memmap and got["shareable"]
        assert (got["dtype"], got["shape"], got["strides"]) == (v.dtype, v.shape, v.strides)
        assert got["bytes"] == leaf_bytes(v)
        return
    local = returned(*item)  # the same view, of the caller's own map
    if local.size == 0:  # an empty view: pickled, as a plain array
        assert type(got) is np.ndarray and got.shape == local.shape
        return
    assert type(got) is np.memmap and os.path.samefile(got.filename, memmap_file)
    assert (got.dtype, got.shape, got.strides) == (local.dtype, local.shape, local.strides)
    if mm.mode == "r":
        assert not got.flags.writeable
    assert leaf_bytes(got) == leaf_bytes(local)
    expected = through_a_pool(plain)  # pickling's values (in its byte order)
    assert leaf_bytes(got.astype(expected.dtype)) == leaf_bytes(expected)


# ---------------------------------------------------------------- object arrays
LEAVES = st.one_of(
    st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.binary(max_size=5),
    st.tuples(st.integers(), st.text(max_size=3)),
    arrays(SCALAR_DTYPES, max_side=3),
)


@st.composite
def object_arrays(draw: st.DrawFn) -> np.ndarray:
    shape = draw(shapes(max_side=3, max_dims=3))
    dtype = draw(st.sampled_from([np.dtype(object), np.dtype([("o", object), ("i", ">i4")])]))
    a = np.empty(shape, dtype, order=draw(st.sampled_from("CF")))
    for i in np.ndindex(shape):
        if dtype.names is None:
            a[i] = draw(LEAVES)
        else:
            a[i] = (draw(LEAVES), draw(st.integers(-(2**31), 2**31 - 1)))
    return draw(views(a))


def assert_same_objects(got: Any, expected: Any) -> None:
    assert type(got) is type(expected)
    if isinstance(got, np.ndarray) and got.dtype.hasobject:
        assert (got.dtype, got.shape, got.strides) == (expected.dtype, expected.shape, expected.strides)
        for g, e in zip(got.ravel(order="K").tolist(), expected.ravel(order="K").tolist(), strict=True):
            assert_same_objects(g, e)
    elif isinstance(got, np.ndarray):  # an array inside an object array: took the map path itself
        assert (got.shape, got.strides) == (expected.shape, expected.strides)
        assert_same_dtype(got.dtype, expected.dtype)
        assert_same_values(got, expected)
    elif isinstance(got, tuple):
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert_same_objects(g, e)
    else:
        assert got == expected


@settings(max_examples=150, **SETTINGS)
@given(a=object_arrays(), how=st.sampled_from(["self", "copy"]))
def test_object_arrays_are_pickled(ex0, a, how):
    """Object-dtype arrays (and structured ones with an object field) are pickled as usual, the arrays inside
    them mapped: they come back as pickling gives them."""
    got = ex0.submit(returned, a, how).result(timeout=60)
    assert_same_objects(got, through_a_pool((a, how)))


# ---------------------------------------------------------------- deviations found, and fixed
def test_non_contiguous_non_native_array_comes_back_as_pickle_gives():
    """``np.arange(6, dtype='>i2')[::2]``, (2,)-strided: pickling gives ``int16`` (native, values kept), and so
    does the map path (it gave ``>i2``: the dtype depended on the array's size)."""
    a = np.arange(6, dtype=np.dtype(np.int16).newbyteorder())[::2]
    assert pickled(a).dtype == np.dtype(np.int16)
    with MemmapExecutor(1, max_nbytes=0) as ex:
        got = ex.submit(identity, a).result(timeout=60)
    assert got.tolist() == a.tolist()
    assert got.dtype == np.dtype(np.int16)


def test_non_native_timedelta_comes_back_as_pickle_gives():
    """``np.arange(3, dtype='>m8[s]')``, C-contiguous: pickling gives ``timedelta64[s]`` in native order (NumPy
    cannot pickle these dtypes as buffers), and so does the map path (it gave ``>m8[s]``)."""
    a = np.arange(3).astype(np.dtype("m8[s]").newbyteorder())
    assert pickled(a).dtype == np.dtype("m8[s]")
    with MemmapExecutor(1, max_nbytes=0) as ex:
        got = ex.submit(identity, a).result(timeout=60)
    assert got.tolist() == a.tolist()
    assert got.dtype == np.dtype("m8[s]")


def test_view_of_a_read_only_mapped_argument_comes_back_as_pickle_gives():
    """A task returning ``x[:, ::2].T`` of its (5, 4) int8 argument: pickling gives strides (5, 1), C-contiguous,
    and so does ``MemmapExecutor(mmap_mode='r', max_nbytes=0)`` (it gave (1, 2): a copy in order 'K')."""
    a = np.arange(20, dtype=np.int8).reshape(5, 4)
    call = (a, "view", (slice(None), slice(None, None, 2)), (1, 0))
    assert through_a_pool(call).strides == (5, 1)
    with MemmapExecutor(1, max_nbytes=0, mmap_mode="r") as ex:
        got = ex.submit(returned, *call).result(timeout=60)
    assert got.tolist() == a[:, ::2].T.tolist()
    assert got.strides == (5, 1)


def test_padding_of_a_read_only_mapped_argument_comes_back_as_pickle_gives():
    """A contiguous array of ``np.dtype([('a', 'u1'), ('b', '<u4')], align=True)`` (3 padding bytes per item, set
    to 0xAB), 1 MiB, returned as is: pickling gives every byte back, padding included, and so does
    ``MemmapExecutor(mmap_mode='r', max_nbytes=0)`` (it gave the fields, with zero padding)."""
    dtype = np.dtype([("a", "u1"), ("b", "<u4")], align=True)
    raw = np.full(2**20, 0xAB, dtype=np.uint8)
    a = raw.view(dtype)
    assert raw_bytes(pickled(a)) == raw.tobytes()
    with MemmapExecutor(1, max_nbytes=0, mmap_mode="r") as ex:
        got = ex.submit(identity, a).result(timeout=60)
    assert leaf_bytes(got) == leaf_bytes(a)
    assert raw_bytes(got) == raw.tobytes()


def test_a_result_the_caller_dropped_is_not_held():
    """A result the caller no longer holds is freed at once (its file too): nothing in the executor keeps it.
    (The feeder thread's loop variable kept the last call it pickled, its future and result.)"""
    with MemmapExecutor(1, max_nbytes=0) as ex:
        out = Parallel(backend=ex)(delayed(make_array)(10) for _ in range(1))
        assert has_shareable_memory(out[0])
        del out
        assert live_dumps(ex) == []


def test_a_transposed_contiguous_argument_keeps_its_strides_as_pickle_does():
    """``np.arange(24).reshape(2, 3, 4).transpose(0, 2, 1)``: neither C- nor F-contiguous; NumPy 2 pickles it
    with strides (24, 2, 8) and its byte order, NumPy 1 in C order. The task gets, and a result comes back
    with, what pickling gives."""
    a = np.arange(24, dtype=">i2").reshape(2, 3, 4).transpose(0, 2, 1)
    with MemmapExecutor(1, max_nbytes=0) as ex:
        seen = ex.submit(as_seen, a).result(timeout=60)
        got = ex.submit(identity, a).result(timeout=60)
    expected = pickled(a)
    assert seen["strides"] == expected.strides and seen["type"] is np.memmap
    assert got.tolist() == a.tolist()
    assert (got.strides, got.dtype) == (expected.strides, expected.dtype)


def _transposed(dtype: Any) -> np.ndarray:
    return np.zeros((2, 3, 4), dtype).transpose(0, 2, 1)


TRANSPOSE_CASES = {
    "a new axis of length 1 (stride 0)": lambda: np.arange(24, dtype=">i2").reshape(2, 3, 4).transpose(0, 2, 1)[
        :, None
    ],
    "a reversed axis of length 1": lambda: np.arange(24, dtype=">i2").reshape(2, 3, 4, 1).transpose(0, 2, 1, 3)[
        ..., ::-1
    ],
    "a datetime64 field": lambda: _transposed([("t", "M8[s]"), ("i", "<i4")]),
    "fields out of order": lambda: _transposed(
        {"names": ["a", "b"], "formats": ["<i4", "<i2"], "offsets": [4, 0], "itemsize": 8}
    ),
}


@pytest.mark.parametrize("case", list(TRANSPOSE_CASES))
def test_transposes_numpy_pickles_through_their_values_or_with_odd_axes_travel_as_pickle_gives(case):
    """NumPy ignores the strides of axes of length 1 when it looks for a transpose of a contiguous array, and
    pickles through the values (in C order) a dtype it cannot export as a buffer."""
    a = TRANSPOSE_CASES[case]()
    with MemmapExecutor(1, max_nbytes=0) as ex:
        seen = ex.submit(as_seen, a).result(timeout=60)
        got = ex.submit(identity, a).result(timeout=60)
    expected = pickled(a)
    assert (seen["dtype"].str, seen["strides"]) == (expected.dtype.str, expected.strides)
    twice = through_a_pool((a, "self"))
    assert (got.dtype.str, got.strides) == (twice.dtype.str, twice.strides)
    assert leaf_bytes(got) == leaf_bytes(twice)
