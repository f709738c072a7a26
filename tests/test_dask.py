"""DaskExecutor and Parallel(backend='dask') on a real LocalCluster (2 worker processes on 127.0.0.1).

After every test the cluster must hold no keys at all: each test's executor
is shut down and its arrays dropped, so everything it scattered or computed
has to be released (checked by polling the scheduler, with a deadline).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FuturesTimeoutError
from typing import Any

import numpy as np
import pytest
from _tasks import relayout_in_place

distributed = pytest.importorskip("distributed")

from mmexec import DaskExecutor, LocalMemmapError, Parallel, delayed, parallel_config  # noqa: E402

#: Arrays of at least this many bytes are scattered in these tests.
LIMIT = 64 * 2**10
BIG = LIMIT // 8 + 2  # float64 elements of an array that is scattered (larger than max_nbytes, as joblib; even)


# ------------------------------------------------------------------ tasks
def total(a: np.ndarray, b: np.ndarray | None = None) -> float:
    return float(a.sum()) + (0.0 if b is None else float(b.sum()))


def first(a: np.ndarray) -> float:
    return float(a.flat[0])


def same(a: Any, b: Any) -> bool:
    return a is b


def write(a: np.ndarray) -> None:
    a[0] = 1.0


def boom(x: int) -> int:
    if x == 3:
        raise ValueError(f"boom {x}")
    return x


def sleep_then(x: float) -> float:
    time.sleep(x)
    return x


def pid(_: Any = None) -> int:
    return os.getpid()


# --------------------------------------------------------------- fixtures
def cluster_keys(client: Any) -> list[str]:
    """Every key the scheduler knows (read in the scheduler's event loop)."""

    def keys(dask_scheduler: Any) -> list[str]:
        return sorted(str(k) for k in dask_scheduler.tasks)

    return client.run_on_scheduler(keys)  # type: ignore[no-any-return]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """One LocalCluster for the module: 2 worker processes, 1 thread each, on 127.0.0.1."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.fixture(autouse=True)
def cluster_released(client: Any) -> Iterator[None]:
    """After each test the cluster holds nothing: every scattered array and result was released.

    Collected at each poll: when a cancel races a finishing task, distributed's
    ClientExecutor leaves the dask future in a garbage cycle, released at the next GC.
    """

    def released() -> bool:
        gc.collect()
        return not cluster_keys(client)

    yield
    wait_until(released, f"cluster still holds {cluster_keys(client)}")


@pytest.fixture
def ex(client: Any) -> Iterator[DaskExecutor]:
    """A DaskExecutor that scatters arrays of 64 KiB or more."""
    e = DaskExecutor(client, max_nbytes=LIMIT)
    try:
        yield e
    finally:
        e.shutdown(wait=True, cancel_futures=True)


def scattered_keys(client: Any) -> list[str]:
    return [k for k in cluster_keys(client) if k.startswith("ndarray-")]


# ------------------------------------------------------------- scattering
def test_a_large_array_is_scattered_once_for_many_tasks(ex: DaskExecutor, client: Any) -> None:
    """The same unchanged array in many submits and a map is sent to the cluster once."""
    a = np.arange(BIG, dtype=np.float64)
    expected = float(a.sum())
    assert [ex.submit(total, a).result() for _ in range(4)] == [expected] * 4
    assert list(ex.map(total, [a] * 6, chunksize=4)) == [expected] * 6
    assert ex._store.scatters == 1
    assert len(scattered_keys(client)) == 1


def test_small_arrays_and_subclasses_travel_inside_the_task(ex: DaskExecutor, client: Any) -> None:
    """Arrays under max_nbytes, ndarray subclasses and max_nbytes=None are not scattered."""
    small = np.ones(LIMIT // 8)  # exactly max_nbytes: not larger, so not scattered (as joblib)
    masked = np.ma.masked_array(np.ones(2 * BIG), mask=np.arange(2 * BIG) % 2 == 0)
    assert ex.submit(total, small).result() == LIMIT // 8
    assert ex.submit(total, masked).result() == BIG  # the mask survived: a normal pickle
    with DaskExecutor(client, max_nbytes=None) as never:
        assert never.submit(total, np.ones(2 * BIG)).result() == 2 * BIG
        assert never._store.scatters == 0
    assert ex._store.scatters == 0


def test_one_array_twice_in_a_task_is_one_object(ex: DaskExecutor) -> None:
    """An array passed twice (positional, keyword, nested) arrives as one object, scattered once."""
    a = np.ones(BIG)
    assert ex.submit(same, a, b=a).result() is True
    assert ex.submit(lambda d: d["x"][0] is d["y"], {"x": [a], "y": a}).result() is True
    assert ex._store.scatters == 1


def test_an_array_changed_between_submits_is_sent_again(ex: DaskExecutor, client: Any) -> None:
    """In-place changes (a value, the shape) between submits never give a task stale data."""
    a = np.zeros(BIG)
    assert ex.submit(first, a).result() == 0.0
    a[0] = 7.0
    assert ex.submit(first, a).result() == 7.0
    assert ex.submit(total, a).result() == 7.0  # unchanged since: reused
    a[-1] = 1.0
    assert list(ex.map(total, [a, a, a])) == [8.0] * 3  # changed: sent again, once for the map
    relayout_in_place(a, shape=(2, -1))
    assert ex.submit(lambda x: x.shape, a).result() == (2, BIG // 2)
    assert ex._store.scatters == 4
    wait_until(lambda: len(scattered_keys(client)) == 1, "the outdated copies are released")


@pytest.mark.parametrize(
    "make",
    [lambda: np.zeros((1250, 2000)), lambda: np.zeros((1250, 2000), order="F"), lambda: np.zeros((1250, 4000))[:, ::2]],
    ids=["C", "Fortran", "strided"],
)
def test_the_content_check_sees_a_change_anywhere(make: Callable[[], np.ndarray]) -> None:
    """The content signature of a 20 MB array changes with any one element (first, middle, last block)."""
    from mmexec._dask import _signature

    a = make()
    before = _signature(a)
    for index in [(0, 0), (625, 1000), (1249, 1999)]:
        a[index] = 1.0
        assert _signature(a) != before
        a[index] = 0.0
        assert _signature(a) == before


def test_the_copy_is_released_when_the_caller_array_dies(ex: DaskExecutor, client: Any) -> None:
    """Once the caller's array is garbage collected, its scattered copy leaves the cluster."""
    a = np.ones(BIG)
    assert ex.submit(total, a).result() == BIG
    assert len(scattered_keys(client)) == 1
    del a
    gc.collect()
    wait_until(lambda: not scattered_keys(client), "the scattered copy is released")
    assert not ex._store._entries


def test_shutdown_releases_scattered_arrays_of_live_arrays(client: Any) -> None:
    """shutdown() drops the executor's scattered copies even while the caller keeps its arrays."""
    a = np.ones(BIG)
    with DaskExecutor(client, max_nbytes=LIMIT) as e:
        assert e.submit(total, a).result() == BIG
        assert len(scattered_keys(client)) == 1
    wait_until(lambda: not scattered_keys(client), "shutdown released the copy")
    assert a.sum() == BIG


def test_tasks_get_read_only_views(ex: DaskExecutor) -> None:
    """A scattered array is shared by the tasks of a worker, so tasks cannot write into it."""
    with pytest.raises(ValueError, match="read-only") as info:
        ex.submit(write, np.zeros(BIG)).result()
    if sys.version_info >= (3, 11):
        assert "a.copy()" in "".join(info.value.__notes__)


# ------------------------------------------------------------------ memmaps
@pytest.mark.parametrize("mode", ["r", "c", "r+", "w+"])
@pytest.mark.parametrize(
    "wrap",
    [lambda m: m, lambda m: m[2:5], lambda m: np.asarray(m).T, lambda m: {"out": [m[::-1]]}],
    ids=["memmap", "slice", "asarray-view", "nested-view"],
)
def test_memmap_arguments_raise_a_clear_error(ex: DaskExecutor, client: Any, tmp_path: Any, mode: str, wrap: Any):
    """np.memmaps and their views cannot cross machines, whatever their size or mode: LocalMemmapError.

    As every pickling error, it fails the task's future (submit returns at once).
    """
    path = tmp_path / "data.f8"
    np.memmap(path, dtype=np.float64, mode="w+", shape=(10,)).flush()
    mm = np.memmap(path, dtype=np.float64, mode=mode, shape=(10,))
    with pytest.raises(LocalMemmapError, match="np.array") as info:
        ex.submit(total, wrap(mm)).result()
    assert isinstance(info.value, TypeError)
    assert str(path) in str(info.value)
    if mode in ("r+", "w+"):
        assert "future.result()" in str(info.value)
    assert ex.submit(total, np.array(mm)).result() == 0.0  # a copy is fine
    del info, mm


def test_memmap_errors_in_map_and_parallel(ex: DaskExecutor, client: Any, tmp_path: Any) -> None:
    """map and Parallel raise LocalMemmapError and cancel what they had sent; the executor stays usable."""
    path = tmp_path / "out.f8"
    out = np.memmap(path, dtype=np.float64, mode="w+", shape=(4,))
    with pytest.raises(LocalMemmapError):
        list(ex.map(sleep_then, [0.0, 0.0, out]))
    with pytest.raises(LocalMemmapError):
        Parallel(backend=ex)(delayed(total)(x) for x in [np.ones(3), out])
    assert ex.submit(total, np.ones(3)).result() == 3.0
    del out


# ---------------------------------------------------------------- contract
def test_exceptions_carry_the_task_traceback(ex: DaskExecutor) -> None:
    """A failing task re-raises its exception with the worker's traceback, in submit and in map."""
    exc = ex.submit(boom, 3).exception()
    assert isinstance(exc, ValueError) and str(exc) == "boom 3"
    assert "in boom" in "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    results = ex.map(boom, range(6), chunksize=4)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="boom 3") as info:
        next(results)
    assert "in boom" in str(info.value.__cause__)  # the worker's traceback, as MemmapExecutor gives it


def test_map_keeps_order_and_honours_timeout_and_chunksize(ex: DaskExecutor) -> None:
    """map returns results in order for any chunksize, raises TimeoutError, and rejects chunksize < 1."""
    for chunksize in (1, 3, 50):
        assert list(ex.map(boom, [0, 1, 2, 4, 5], chunksize=chunksize)) == [0, 1, 2, 4, 5]
    results = ex.map(sleep_then, [0.0, 1.0], timeout=0.3)
    assert next(results) == 0.0
    with pytest.raises(FuturesTimeoutError):
        next(results)
    with pytest.raises(ValueError, match="chunksize"):
        ex.map(boom, [1], chunksize=0)


def test_shutdown_cancels_and_refuses_new_tasks(client: Any) -> None:
    """shutdown(cancel_futures=True) cancels what was not sent to the cluster (as the standard library, at most
    one call beyond those running is sent ahead); submit afterwards raises RuntimeError."""
    e = DaskExecutor(client)
    running = [e.submit(sleep_then, 0.3) for _ in range(2)]
    queued = [e.submit(sleep_then, 0.3) for _ in range(4)]
    e.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in running + queued)
    cancelled = [f for f in queued if f.cancelled()]
    assert len(cancelled) >= len(queued) - 1
    assert all(f.result() == 0.3 for f in running + queued if not f.cancelled())
    with pytest.raises(RuntimeError, match="after shutdown"):
        e.submit(pid)
    e.shutdown()  # idempotent


def test_a_pickling_error_is_set_on_the_future(ex: DaskExecutor) -> None:
    """An unpicklable argument fails its future, as in the stdlib; the executor stays usable."""
    import threading

    fut = ex.submit(same, threading.Lock(), None)
    with pytest.raises(TypeError, match="pickle"):
        fut.result()
    assert ex.submit(boom, 1).result() == 1


# ---------------------------------------------------------------- Parallel
def test_parallel_backend_dask_runs_on_the_cluster(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel(backend='dask') and parallel_config(backend='dask') run on the workers; one scatter per call."""
    workers = set(client.run(os.getpid).values())
    scatters: list[object] = []
    real = client.scatter
    monkeypatch.setattr(client, "scatter", lambda *a, **k: scatters.append(1) or real(*a, **k))
    a = np.ones(200_000)  # 1.6 MB: over the default '1M'
    parallel = Parallel(backend="dask")
    assert parallel.n_jobs == 2  # the cluster's threads
    assert set(parallel(delayed(pid)(i) for i in range(8))) <= workers
    assert parallel(delayed(total)(a) for _ in range(20)) == [a.sum()] * 20
    assert len(scatters) == 1
    with parallel_config(backend="dask"):
        assert set(Parallel(n_jobs=1)(delayed(pid)(i) for i in range(4))) <= workers
        with pytest.raises(ValueError, match="boom 3"):
            Parallel()(delayed(boom)(i) for i in range(6))
    with pytest.raises(ValueError, match="boom 3"):
        Parallel(backend="dask")(delayed(boom)(i) for i in range(6))


def test_a_dask_executor_as_parallel_backend(ex: DaskExecutor) -> None:
    """A DaskExecutor instance is used as is: n_jobs is the cluster's threads, and it stays open."""
    a = np.ones(BIG)
    parallel = Parallel(backend=ex)
    assert parallel.n_jobs == 2
    assert parallel(delayed(total)(a, b=a) for _ in range(10)) == [2.0 * BIG] * 10
    assert ex._store.scatters == 1
    assert ex.submit(total, a).result() == BIG


# --------------------------------------------------------- optional extra
def test_without_a_client_or_distributed_the_errors_say_what_to_do() -> None:
    """`import mmexec` never imports dask; no client or no distributed gives errors that say what to do."""
    script = textwrap.dedent(
        """
        import sys
        import mmexec
        assert "distributed" not in sys.modules and "mmexec._dask" not in sys.modules
        for make in (mmexec.DaskExecutor, lambda: mmexec.Parallel(backend="dask")):
            try:
                make()
            except ValueError as exc:
                assert "Client(" in str(exc), exc
            else:
                raise AssertionError("no error without a client")
        sys.modules["distributed"] = None  # as if it were not installed
        try:
            mmexec.DaskExecutor()
        except ImportError as exc:
            assert "pip install 'mmexec[dask]'" in str(exc), exc
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_parallel_on_dask_reports_an_unpicklable_argument_as_joblib(client):
    """Parallel(backend='dask') raises joblib's PicklingError, from the original error."""
    import pickle
    import threading

    from mmexec import Parallel, delayed

    with pytest.raises(pickle.PicklingError, match="Could not pickle the task") as info:
        Parallel(backend="dask")(delayed(repr)(threading.Lock()) for _ in range(2))
    assert info.value.__cause__ is not None
