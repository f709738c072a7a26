"""What the reducer swaps for memory maps, and what it leaves to pickle."""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest
from _tasks import (
    describe,
    describe_tree,
    fill,
    identity,
    layout,
    live_dumps,
    make_array,
    relayout_in_place,
    run_script,
    slice_of,
)

from mmexec import MemmapExecutor, has_shareable_memory
from mmexec._memmap import backing_memmap

K64 = 2**16


def files_in(ex: MemmapExecutor) -> list[str]:
    return live_dumps(ex)


def test_threshold_is_exclusive_as_joblib(mx):
    """As joblib, only arrays larger than max_nbytes are memory-mapped: one of exactly max_nbytes is pickled."""
    above = np.zeros(K64 + 1, dtype=np.uint8)
    at = np.zeros(K64, dtype=np.uint8)
    assert mx.submit(describe, above).result()["type"] == "memmap"
    assert mx.submit(describe, at).result()["type"] == "ndarray"


@dataclasses.dataclass
class Box:
    payload: object


class Plain:
    def __init__(self, inner: object) -> None:
        self.inner = inner


def test_large_arrays_are_found_wherever_they_sit(mx):
    """Arrays nested in lists, tuples, dicts, objects and dataclasses all arrive as memmaps."""
    a = np.arange(20_000.0)
    tree = {"list": [a], "tuple": (1, (a,)), "obj": Plain(Box([a * 2]))}
    seen = mx.submit(describe_tree, tree).result()
    leaves = [seen["list"][0], seen["tuple"][1][0], seen["obj"]["inner"]["payload"][0]]
    assert [leaf["type"] for leaf in leaves] == ["memmap"] * 3
    assert [leaf["sum"] for leaf in leaves] == [a.sum(), a.sum(), 2 * a.sum()]


def test_keyword_arguments_are_reduced_too(mx):
    """Arrays passed by keyword are memory-mapped like positional ones."""
    a = np.ones(20_000)
    assert mx.submit(describe, x=a).result()["type"] == "memmap"


DTYPES = ["f4", "i1", "c16", "?", ">f8", "M8[s]", [("x", "f8"), ("n", "i4")]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_plain_dtype_round_trips_exactly(mx, dtype):
    """Numeric, bool, complex, big-endian, datetime and structured arrays arrive with identical bytes."""
    a = np.zeros(70_000, dtype=dtype)
    a.view(np.uint8)[:] = np.arange(a.nbytes, dtype=np.uint64).astype(np.uint8)
    back = mx.submit(identity, a).result()
    assert back.dtype == a.dtype and back.tobytes() == a.tobytes()
    assert mx.submit(describe, a).result()["type"] == "memmap"


def test_object_arrays_are_pickled_normally(mx):
    """Object-dtype arrays never become memory maps, whatever their size."""
    a = np.array([{"k": i} for i in range(20_000)], dtype=object)
    assert mx.submit(describe, a).result()["type"] == "ndarray"
    assert mx.submit(identity, a).result()[123] == {"k": 123}


def test_subclasses_keep_their_type():
    """ndarray subclasses (masked arrays) are pickled normally and keep their type."""
    a = np.ma.masked_array(np.arange(20_000.0), mask=np.arange(20_000) % 2 == 0)
    with MemmapExecutor(1, max_nbytes=0) as ex:
        back = ex.submit(identity, a).result()
    assert isinstance(back, np.ma.MaskedArray) and back.mask.sum() == 10_000


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[::3],
        lambda a: a.T,
        lambda a: a[::-1, ::-2],
        lambda a: np.asfortranarray(a),
        lambda a: a[5:7, 100:300],
    ],
    ids=["step", "transpose", "negative", "fortran", "block"],
)
def test_non_contiguous_arrays_arrive_with_the_same_values(mx, view):
    """Strided, transposed, reversed and Fortran-ordered arrays arrive equal, as memmaps when large."""
    a = view(np.arange(200 * 300, dtype=np.float64).reshape(200, 300))
    back = mx.submit(identity, a).result()
    np.testing.assert_array_equal(back, a)
    expected = "memmap" if a.nbytes >= K64 else "ndarray"
    assert mx.submit(describe, a).result()["type"] == expected


def test_fortran_order_is_kept(mx):
    """A Fortran-ordered array is still Fortran-ordered in the worker."""
    a = np.asfortranarray(np.ones((300, 200)))
    assert mx.submit(lambda x: (x.flags.f_contiguous, type(x).__name__), a).result() == (True, "memmap")


@pytest.mark.parametrize(
    "view",
    [lambda m: m, lambda m: m[2:5], lambda m: m.T, lambda m: m[::-1, ::-3], lambda m: np.asarray(m[10:20])],
    ids=["whole", "slice", "transpose", "negative", "asarray"],
)
def test_memmaps_and_their_views_travel_by_reference(tmp_path, view):
    """np.memmap views, even tiny and with max_nbytes=None, reach workers as maps of the same file."""
    m = np.memmap(tmp_path / "data.bin", dtype="f8", mode="w+", shape=(50, 40))
    m[:] = np.arange(2000).reshape(50, 40)
    v = view(m)
    with MemmapExecutor(2, max_nbytes=None) as ex:
        seen = ex.submit(describe, v).result()
    assert seen["type"] == "memmap" and seen["shareable"]
    assert seen["bytes"] == np.ascontiguousarray(v).tobytes()


def test_np_load_mmap_is_passed_by_reference(tmp_path):
    """np.load(..., mmap_mode='r') results (with a header offset) are read at the right offset."""
    path = tmp_path / "a.npy"
    np.save(path, np.arange(1000.0))
    m = np.load(path, mmap_mode="r")
    with MemmapExecutor(1, max_nbytes=None) as ex:
        seen = ex.submit(describe, m[100:110]).result()
    assert seen["type"] == "memmap"
    assert seen["sum"] == float(np.arange(100, 110).sum())


def test_workers_write_into_a_shared_output(tmp_path):
    """Writes into an 'r+'/'w+' memmap argument are visible in the caller (seed E7)."""
    out = np.memmap(tmp_path / "out.bin", dtype="f8", mode="w+", shape=(4, 1000))
    with MemmapExecutor(2) as ex:
        list(ex.map(fill, [out[i] for i in range(4)], [1.0, 2.0, 3.0, 4.0]))
    assert out.sum(axis=1).tolist() == [1000.0, 2000.0, 3000.0, 4000.0]


def test_max_nbytes_none_turns_dumping_off():
    """With max_nbytes=None, plain arrays are pickled, whatever their size."""
    with MemmapExecutor(1, max_nbytes=None) as ex:
        assert ex.submit(describe, np.ones(300_000)).result()["type"] == "ndarray"


def test_zero_size_and_zero_dim_arrays_are_pickled():
    """Empty and 0-d arrays have nothing to share and arrive as ordinary arrays."""
    with MemmapExecutor(1, max_nbytes=0) as ex:
        empty = ex.submit(identity, np.zeros((0, 5))).result()
        scalar = ex.submit(identity, np.array(3.5)).result()
    assert empty.shape == (0, 5) and scalar.shape == () and float(scalar) == 3.5


def test_same_array_is_dumped_once(mx):
    """One array passed to many tasks, by submit or map, is written to one file."""
    a = np.ones(100_000)
    futures = [mx.submit(describe, a) for _ in range(10)]
    assert all(f.result()["sum"] == 100_000 for f in futures)  # (submit dumps later, on the executor's thread)
    assert len(files_in(mx)) == 1
    list(mx.map(describe, [a] * 10, chunksize=2))
    assert len(files_in(mx)) == 1


def test_array_mutated_between_submits_is_never_stale(mx):
    """In-place changes between two submits reach the second task."""
    a = np.zeros(100_000)
    assert mx.submit(describe, a).result()["sum"] == 0
    a[:10] = 1
    assert mx.submit(describe, a).result()["sum"] == 10
    a[-1] = 5
    assert mx.submit(describe, a).result()["sum"] == 15


def test_shape_or_dtype_changed_in_place_is_never_stale(mx):
    """Reshaping, retyping or flattening an array in place reaches the next task (same bytes, new layout)."""
    a = np.arange(2**18, dtype=np.float64)
    expected = layout(a)
    assert mx.submit(layout, a).result() == expected
    relayout_in_place(a, shape=(512, 512))
    assert mx.submit(layout, a).result() == layout(a) == ((512, 512), "<f8", True, expected[3])
    relayout_in_place(a, dtype=np.int64)
    assert mx.submit(layout, a).result() == layout(a)
    relayout_in_place(a, shape=(-1,))
    assert mx.submit(layout, a).result() == layout(a)
    assert list(mx.map(layout, [a, a])) == [layout(a)] * 2


def test_dump_is_deleted_when_array_and_tasks_are_gone(mx):
    """Once the caller drops its array and its tasks are done, the dump is deleted."""
    a = np.ones(100_000)
    mx.submit(describe, a).result()
    assert len(files_in(mx)) == 1
    del a
    gc.collect()
    assert files_in(mx) == []


def test_large_results_come_back_through_shared_memory(mx):
    """A large result arrives as a plain ndarray backed by a map; its file goes with it."""
    r = mx.submit(make_array, 100_000, 2.0).result()
    assert type(r) is np.ndarray and has_shareable_memory(r) and r.flags.writeable
    assert r.sum() == 200_000
    assert len(files_in(mx)) == 1
    del r
    gc.collect()
    assert files_in(mx) == []


def _file_of(a: np.ndarray) -> str:
    mm = backing_memmap(a)
    assert mm is not None
    return str(mm.filename)


def test_freed_result_lends_its_pages_to_the_next_large_result(mx):
    """The next large result is written into a freed result's file (pages already allocated), correctly."""
    first = mx.submit(make_array, 100_000, 1.0).result()
    path = _file_of(first)
    del first
    gc.collect()
    small = mx.submit(make_array, 10, 5.0).result()  # the lent file goes back unused
    assert not has_shareable_memory(small)
    second = mx.submit(make_array, 90_000, 2.0).result()  # a little smaller: still fits
    assert _file_of(second) == path
    assert second.shape == (90_000,) and np.all(second == 2.0)
    third = mx.submit(make_array, 100_000, 3.0).result()  # the file is in use: a new one
    assert _file_of(third) != path and np.all(third == 3.0) and np.all(second == 2.0)
    del second, third
    gc.collect()
    assert files_in(mx) == []


def test_a_chunk_of_large_results_reuses_as_many_freed_files(mx):
    """A map chunk with several large results gets a freed file for each."""
    first = list(mx.map(make_array, [100_000] * 4, [1.0] * 4, chunksize=4))
    paths = {_file_of(r) for r in first}
    del first
    gc.collect()
    second = list(mx.map(make_array, [100_000] * 4, [2.0, 3.0, 4.0, 5.0], chunksize=4))
    assert {_file_of(r) for r in second} == paths
    assert [float(r[0]) for r in second] == [2.0, 3.0, 4.0, 5.0] and all(r.shape == (100_000,) for r in second)
    assert all(np.all(r == r[0]) for r in second)


def test_small_results_are_pickled(mx):
    """Results below max_nbytes come back through the pipe."""
    r = mx.submit(make_array, 10).result()
    assert not has_shareable_memory(r)


def test_result_that_is_a_view_of_an_argument(mx):
    """A worker returning a slice of its memory-mapped argument gives the right values."""
    a = np.arange(100_000.0)
    r = mx.submit(slice_of, a, 50_000, 100_000).result()
    np.testing.assert_array_equal(r, a[50_000:])
    del a
    gc.collect()
    np.testing.assert_array_equal(r[:3], [50_000.0, 50_001.0, 50_002.0])


def test_result_can_be_passed_back_by_reference(mx):
    """A large result passed to another task travels as a reference to its file, not a new dump."""
    r = mx.submit(make_array, 100_000, 3.0).result()
    files = files_in(mx)
    assert mx.submit(describe, r[10:]).result()["type"] == "memmap"
    assert files_in(mx) == files


def test_read_only_maps_say_how_to_write():
    """With mmap_mode='r', writing into a mapped argument fails with a hint naming mmap_mode."""
    with MemmapExecutor(1, max_nbytes="64K", mmap_mode="r") as ex, pytest.raises(ValueError, match="read-only") as info:
        ex.submit(fill, np.zeros(100_000), 1.0).result()
    assert "mmap_mode" in "".join(getattr(info.value, "__notes__", []))


def test_by_default_a_task_may_write_its_argument_and_the_caller_sees_no_change(mx):
    """The default mmap_mode is 'c' (#19): a task writes a private copy, as with ProcessPoolExecutor."""
    a = np.zeros(100_000)
    assert mx.submit(fill, a, 3.0).result() is None
    assert mx.submit(describe, a).result()["sum"] == 0 and a.sum() == 0


def test_copy_on_write_mode_gives_private_writable_copies():
    """mmap_mode='c' lets tasks write without changing the caller's data."""
    a = np.zeros(100_000)
    with MemmapExecutor(1, max_nbytes="64K", mmap_mode="c") as ex:
        ex.submit(fill, a, 7.0).result()
        assert ex.submit(describe, a).result()["sum"] == 0
    assert a.sum() == 0


def bump(a: np.ndarray) -> float:
    a += 1
    return float(a.sum())


@pytest.mark.parametrize("how", ["whole", "view", "map"])
def test_a_result_passed_back_is_never_written_by_tasks(how):
    """A large result passed back to its executor reaches tasks under the executor's mmap_mode: with 'r' a
    task cannot write it, with 'c' it writes a private copy; the caller's array never changes."""
    for mode in ("r", "c"):
        with MemmapExecutor(2, max_nbytes="64K", mmap_mode=mode) as ex:
            r = ex.submit(np.zeros, 2**17).result()  # 1 MiB: comes back as a map of a file
            arg = r[10:] if how == "view" else r
            if mode == "r":
                with pytest.raises(ValueError, match="read-only"):
                    ex.submit(bump, arg).result() if how != "map" else list(ex.map(bump, [arg]))
            else:
                got = ex.submit(bump, arg).result() if how != "map" else next(ex.map(bump, [arg]))
                assert got == arg.size
            assert float(r.sum()) == 0.0


def test_a_writable_memmap_the_caller_opened_is_still_written_by_tasks(tmp_path, mx):
    """Seed E7: an np.memmap the caller opened 'r+'/'w+' is shared for writing, whatever mmap_mode says."""
    out = np.memmap(tmp_path / "out.bin", dtype=np.float64, mode="w+", shape=(2**17,))
    assert mx.submit(bump, out).result() == 2**17
    assert float(out.sum()) == 2**17


TRACEBACK_SCRIPT = """
from mmexec import MemmapExecutor

def boom():
    raise RuntimeError(123)  # the failing line

if __name__ == "__main__":
    with MemmapExecutor(1) as ex:
        try:
            ex.submit(boom).result()
        except RuntimeError as exc:
            print(exc.__cause__.tb)
"""


def test_a_function_sent_by_value_keeps_its_file_in_the_workers_traceback(tmp_path):
    """A task defined in the main script travels by value (cloudpickle); its traceback still names the
    script and shows the failing line, as ProcessPoolExecutor's does (cloudpickle 3 says <dynamic-code>)."""
    proc = run_script(tmp_path, TRACEBACK_SCRIPT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f'File "{tmp_path / "script.py"}", line 5, in boom' in proc.stdout, proc.stdout
    assert "raise RuntimeError(123)  # the failing line" in proc.stdout
