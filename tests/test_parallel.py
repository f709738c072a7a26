"""Parallel / delayed / parallel_config against joblib's documented behaviour."""

from __future__ import annotations

import io
import os
import sys
import traceback
import types
from concurrent.futures import ThreadPoolExecutor
from math import sqrt
from typing import Any

import loky
import numpy as np
import pytest
from _tasks import (
    add,
    describe,
    get_env,
    identity,
    library_threads,
    nested_parallel_warnings,
    raise_value_error,
    set_env_from_initializer,
    square,
    touch,
    wait_event,
)

import mmexec
import mmexec._parallel as parallel_module
from mmexec import MemmapExecutor, Parallel, delayed, parallel_config
from mmexec._parallel import effective_n_jobs

BACKENDS = ["loky", "processes", "multiprocessing", "threading", "sequential"]


def _pid_and_inner_backend() -> tuple[int, object, str | None]:
    return os.getpid(), Parallel(n_jobs=2).backend, os.environ.get("OMP_NUM_THREADS")


class Recorder:
    """An input generator that counts how far it was consumed."""

    def __init__(self, n: int, fn=square) -> None:
        self.n, self.fn, self.taken = n, fn, 0

    def __iter__(self):
        for i in range(self.n):
            self.taken += 1
            yield delayed(self.fn)(i)


@pytest.mark.parametrize("n_jobs", [None, 1, 2, -1, -2])
def test_n_jobs_follows_joblib(n_jobs):
    """None means 1, -1 all CPUs, -2 all but one, as joblib.effective_n_jobs says."""
    joblib = pytest.importorskip("joblib")
    expected = 1 if n_jobs is None else joblib.effective_n_jobs(n_jobs)
    assert effective_n_jobs(n_jobs) == max(1, expected)
    assert effective_n_jobs(-1) == loky.cpu_count()


def test_n_jobs_zero_is_an_error():
    """n_jobs=0 is a ValueError, as in joblib."""
    with pytest.raises(ValueError, match="n_jobs"):
        Parallel(n_jobs=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_the_same_results(backend):
    """Each named backend returns the same list in input order."""
    assert Parallel(n_jobs=2, backend=backend)(delayed(sqrt)(i * i) for i in range(20)) == [float(i) for i in range(20)]


@pytest.mark.parametrize("make", [lambda: ThreadPoolExecutor(2), lambda: MemmapExecutor(2)], ids=["threads", "memmap"])
def test_executor_instance_as_backend_is_used_and_left_open(make):
    """An Executor passed as backend runs the tasks and is not shut down by Parallel."""
    ex = make()
    try:
        assert Parallel(backend=ex)(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]
        assert ex.submit(square, 3).result() == 9
    finally:
        ex.shutdown()


def test_unknown_backends_say_so():
    """An unknown backend lists the known ones ('dask' is tested in test_dask.py, on a cluster)."""
    with pytest.raises(ValueError, match="threading"):
        Parallel(backend="nope")


def test_prefer_threads_and_require_sharedmem_run_in_the_caller():
    """prefer='threads' and require='sharedmem' pick threads (same process)."""
    me = os.getpid()
    assert set(Parallel(n_jobs=2, prefer="threads")(delayed(os.getpid)() for _ in range(4))) == {me}
    assert set(Parallel(n_jobs=2, require="sharedmem")(delayed(os.getpid)() for _ in range(4))) == {me}
    assert me not in set(Parallel(n_jobs=2)(delayed(os.getpid)() for _ in range(4)))
    with pytest.raises(ValueError, match="sharedmem"):
        Parallel(n_jobs=2, backend="loky", require="sharedmem")


@pytest.mark.parametrize("backend", ["loky", "threading", "sequential"])
def test_return_as_generator_yields_in_order(backend):
    """return_as='generator' gives a generator yielding results in input order."""
    out = Parallel(n_jobs=2, backend=backend, return_as="generator")(delayed(square)(i) for i in range(10))
    assert isinstance(out, types.GeneratorType)
    assert list(out) == [i * i for i in range(10)]


def test_return_as_generator_unordered_yields_everything():
    """return_as='generator_unordered' yields every result once, in completion order."""
    out = Parallel(n_jobs=2, return_as="generator_unordered")(delayed(square)(i) for i in range(30))
    assert isinstance(out, types.GeneratorType)
    assert sorted(out) == [i * i for i in range(30)]


def test_return_as_is_validated():
    """An unknown return_as is a ValueError."""
    with pytest.raises(ValueError, match="return_as"):
        Parallel(return_as="set")


def test_verbose_reports_progress_on_stderr(capsys):
    """verbose > 0 prints joblib-style progress lines to stderr; verbose=0 prints nothing."""
    Parallel(n_jobs=2, verbose=10)(delayed(square)(i) for i in range(5))
    err = capsys.readouterr().err
    assert "[Parallel(n_jobs=2)]: Done" in err and "Done 5 out of 5" in err
    Parallel(n_jobs=2)(delayed(square)(i) for i in range(5))
    assert capsys.readouterr().err == ""


def test_timeout_raises_builtin_timeout_error(tmp_path):
    """A task that does not finish within timeout raises TimeoutError in the caller."""
    never = str(tmp_path / "never")
    with pytest.raises(TimeoutError):
        Parallel(n_jobs=2, timeout=0.3)(delayed(wait_event)(never, 2.0) for _ in range(2))


def test_pre_dispatch_consumes_the_input_lazily():
    """With pre_dispatch=2 and a generator result, the first 2 calls are sent at call time (as joblib),
    the rest only as results are taken."""
    source = Recorder(200)
    out = Parallel(n_jobs=2, pre_dispatch=2, batch_size=1, return_as="generator")(source)
    assert source.taken == 2
    assert next(out) == 0
    assert source.taken < 200
    assert list(out) == [i * i for i in range(1, 200)] and source.taken == 200


def test_pre_dispatch_all_takes_everything_at_once():
    """pre_dispatch='all' reads the whole input before the first result."""
    source = Recorder(50)
    out = Parallel(n_jobs=2, pre_dispatch="all", return_as="generator")(source)
    next(out)
    assert source.taken == 50
    out.close()


def test_batch_size_int_is_honoured_and_auto_grows(monkeypatch):
    """batch_size=5 sends batches of 5; 'auto' grows batches of fast tasks beyond 1."""
    sizes: list[int] = []
    real = parallel_module._Run._submit
    monkeypatch.setattr(
        parallel_module._Run, "_submit", lambda self, batch: (sizes.append(len(batch)), real(self, batch))
    )
    assert Parallel(n_jobs=2, batch_size=5)(delayed(square)(i) for i in range(20)) == [i * i for i in range(20)]
    assert sizes == [5, 5, 5, 5]
    sizes.clear()
    assert Parallel(n_jobs=2)(delayed(square)(i) for i in range(3000)) == [i * i for i in range(3000)]
    assert sizes[0] == 1 and max(sizes) > 8 and sum(sizes) == 3000


@pytest.mark.parametrize("backend", ["loky", "threading", "sequential"])
def test_first_exception_is_reraised_with_worker_traceback_and_stops_dispatch(backend):
    """A failing task's exception reaches the caller with its traceback; later tasks are not dispatched."""
    calls = [delayed(raise_value_error)("first")] + [delayed(square)(i) for i in range(500)]
    source = iter(calls)
    taken = []

    def gen():
        for c in source:
            taken.append(c)
            yield c

    with pytest.raises(ValueError, match="first") as info:
        Parallel(n_jobs=2, backend=backend, batch_size=1, pre_dispatch=2)(gen())
    assert "raise_value_error" in "".join(traceback.format_exception(info.value))
    assert len(taken) < len(calls)


def test_context_manager_reuses_one_executor():
    """Within `with Parallel(...) as p`, calls share one executor, shut down on exit."""
    with Parallel(n_jobs=2) as p:
        p(delayed(square)(i) for i in range(3))
        ex = p._executor
        assert p(delayed(square)(i) for i in range(3)) == [0, 1, 4]
        assert p._executor is ex
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(square, 1)


def test_parallel_config_sets_defaults_and_restores_them():
    """parallel_config provides defaults for Parallel inside it; nested blocks restore on exit."""
    me = os.getpid()
    with parallel_config(backend="threading", n_jobs=2):
        assert set(Parallel()(delayed(os.getpid)() for _ in range(3))) == {me}
        with parallel_config(backend="loky"):
            assert me not in set(Parallel()(delayed(os.getpid)() for _ in range(3)))
        assert Parallel().backend == "threading" and Parallel().n_jobs == 2
    assert Parallel().n_jobs == 1
    with pytest.raises(ValueError, match="only supported when backend is not None"):
        parallel_config(workers=3)  # backend options need a backend, as in joblib


@pytest.mark.parametrize("backend,n_jobs", [("loky", 2), ("threading", 2), ("loky", 1)])
def test_callback_sees_every_result_with_its_index(backend, n_jobs):
    """callback(index, result) runs in the caller for every task, with n_jobs=1 too."""
    seen: dict[int, int] = {}
    Parallel(n_jobs=n_jobs, backend=backend, callback=lambda i, r: seen.__setitem__(i, r))(
        delayed(square)(i) for i in range(25)
    )
    assert seen == {i: i * i for i in range(25)}


def test_progress_bar_without_tqdm_draws_text(capsys, monkeypatch):
    """progress_bar=True draws a text bar on stderr when tqdm is not installed."""
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("no tqdm here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    Parallel(n_jobs=2, progress_bar=True, pre_dispatch="all")(delayed(square)(i) for i in range(10))
    err = capsys.readouterr().err
    # stderr is not a terminal here: plain lines, no carriage returns, ending with the total
    assert "\r" not in err and err.splitlines()[-1] == "mmexec: 10/10 tasks done"
    assert len(err.splitlines()) <= 11

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    Parallel(n_jobs=2, progress_bar=True, pre_dispatch=2, batch_size=1)(delayed(square)(i) for i in range(40))
    frames = [f for f in terminal.getvalue().split("\r") if f.strip()]
    assert len({len(f.rstrip("\n")) for f in frames}) == 1  # one bar, redrawn in place at a fixed width
    assert any(f.rstrip().endswith("+") for f in frames)  # drawn while the input was still being read
    assert frames[-1].split()[-1] == "40/40"


def test_nested_parallel_in_a_worker_runs_sequentially_with_capped_threads():
    """Inside a worker, Parallel defaults to sequential and BLAS threads are capped to cpus // workers."""
    pid, inner_backend, omp = Parallel(n_jobs=2)(delayed(_pid_and_inner_backend)() for _ in range(1))[0]
    assert pid != os.getpid() and inner_backend == "sequential"
    assert omp == str(max(1, loky.cpu_count() // 2))


def test_delayed_looks_like_the_function_and_captures_the_call():
    """delayed(f) answers f's name, doc and signature, and returns (f, args, kwargs) when called."""
    import inspect

    d = delayed(add)
    assert d(1, b=2) == (add, (1,), {"b": 2})
    assert (d.__name__, d.__qualname__, d.__doc__, d.__module__) == (
        add.__name__, add.__qualname__, add.__doc__, add.__module__
    )
    assert inspect.signature(d) == inspect.signature(add)
    with pytest.raises(TypeError, match="callable"):
        delayed(42)


# ------------------------------------------------------- joblib parity (#11)
RUNNING = ["loky", "threading", "sequential"]


@pytest.mark.parametrize("backend", RUNNING)
def test_a_running_instance_refuses_a_second_call_until_its_generator_is_gone(backend):
    """As joblib: a second call while a returned generator is open raises; once it is gone, calls work."""
    parallel = Parallel(n_jobs=2, backend=backend, return_as="generator")
    first = parallel(delayed(square)(i) for i in range(10))
    with pytest.raises(RuntimeError, match="already running"):
        parallel(delayed(square)(i) for i in range(3))
    assert next(first) == 0
    del first  # closing the generator ends the run (and aborts what it still had in flight)
    assert list(parallel(delayed(square)(i) for i in range(3))) == [0, 1, 4]


def test_a_failed_call_leaves_the_instance_usable():
    """An error inside a call ends the run: the same instance can be called again."""
    parallel = Parallel(n_jobs=2)
    with pytest.raises(ValueError, match="boom"):
        parallel(delayed(raise_value_error)("boom") for _ in range(3))
    assert parallel(delayed(square)(i) for i in range(3)) == [0, 1, 4]


@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_timeout_is_also_multiprocessing_timeout_error(backend, tmp_path):
    """joblib raises multiprocessing.TimeoutError; mmexec's error is that and the builtin TimeoutError."""
    import multiprocessing

    never = str(tmp_path / "never")
    with pytest.raises(multiprocessing.TimeoutError) as info:
        Parallel(n_jobs=2, backend=backend, timeout=0.3)(delayed(wait_event)(never, 5.0) for _ in range(2))
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, mmexec.ParallelTimeoutError)


def test_integer_batch_size_reads_the_input_a_batch_at_a_time_with_one_job():
    """n_jobs=1 with batch_size=5 takes 5 calls from the input before running the first, as joblib."""
    source = Recorder(12)
    out = Parallel(n_jobs=1, batch_size=5, return_as="generator")(source)
    assert next(out) == 0 and source.taken == 5
    assert list(out) == [i * i for i in range(1, 12)] and source.taken == 12


def test_invalid_backends_are_reported_as_joblib_does():
    """joblib's message, from Parallel and from parallel_config (at once, not at the first Parallel)."""
    with pytest.raises(ValueError, match=r"Invalid backend: nope, expected one of \[.*'loky'.*'threading'"):
        Parallel(backend="nope")
    with pytest.raises(ValueError, match="Invalid backend: nope"):
        parallel_config(backend="nope")
    with pytest.raises(ValueError, match="Invalid backend"):
        Parallel(backend=object())


def test_prefer_processes_with_require_sharedmem_is_an_error():
    """joblib raises for these inconsistent hints, from Parallel and from parallel_config."""
    with pytest.raises(ValueError, match="inconsistent"):
        Parallel(n_jobs=2, prefer="processes", require="sharedmem")
    with parallel_config(prefer="processes", require="sharedmem"), pytest.raises(ValueError, match="inconsistent"):
        Parallel(n_jobs=2)
    with pytest.raises(ValueError, match="prefer=wrong is not a valid"):
        Parallel(prefer="wrong")


def test_require_sharedmem_overrides_a_block_backend_but_not_an_explicit_one():
    """As joblib: a parallel_config process backend gives way to threads; Parallel(backend='loky') raises."""
    with parallel_config(backend="loky", n_jobs=2):
        assert Parallel(require="sharedmem").backend == "sequential"  # threads, with n_jobs=1 by default
        assert Parallel(n_jobs=2, require="sharedmem").backend == "threading"
    with pytest.raises(ValueError, match="does not support shared memory"):
        Parallel(n_jobs=2, backend="loky", require="sharedmem")


def test_an_argument_that_cannot_be_pickled_raises_joblibs_pickling_error():
    """Parallel raises PicklingError('Could not pickle the task ...') from the original error, as joblib;
    MemmapExecutor.submit keeps the standard library's behaviour (the original error). (dask: test_dask.py)"""
    import pickle
    import threading

    with pytest.raises(pickle.PicklingError, match="Could not pickle the task to send it to the workers") as info:
        Parallel(n_jobs=2)(delayed(identity)(threading.Lock()) for _ in range(2))
    assert isinstance(info.value.__cause__, TypeError)
    with MemmapExecutor(2) as ex:
        with pytest.raises(TypeError, match="pickle"):
            ex.submit(identity, threading.Lock()).result()


@pytest.mark.parametrize("backend", ["loky", "threading"])
@pytest.mark.parametrize("via", ["Parallel", "parallel_config"])
def test_backend_keyword_arguments_reach_the_executor(backend, via):
    """initializer/initargs given to Parallel or parallel_config run in every worker, as joblib passes them."""
    name = f"MMEXEC_TEST_INIT_{backend}_{via}".upper()
    options = {"initializer": set_env_from_initializer, "initargs": (name, "ran")}
    calls = (delayed(get_env)(name) for _ in range(4))
    if via == "Parallel":
        out = Parallel(n_jobs=2, backend=backend, **options)(calls)
    else:
        with parallel_config(backend, n_jobs=2, **options):
            out = Parallel()(calls)
    assert out == ["ran"] * 4
    os.environ.pop(name, None)


def test_inner_max_num_threads_caps_worker_threads():
    """parallel_config('loky', inner_max_num_threads=1) sets the workers' BLAS/OpenMP thread caps."""
    with parallel_config("loky", n_jobs=2, inner_max_num_threads=1):
        assert set(Parallel()(delayed(get_env)("OMP_NUM_THREADS") for _ in range(4))) == {"1"}
    with pytest.raises(ValueError, match="inner_max_num_threads"):
        parallel_config("threading", inner_max_num_threads=1)


def test_cpu_count_effective_n_jobs_and_parallel_backend():
    """cpu_count(), effective_n_jobs(None) reading parallel_config, parallel_backend returning (backend, n_jobs)."""
    assert mmexec.cpu_count() == loky.cpu_count() > 0
    assert mmexec.effective_n_jobs() == loky.cpu_count()
    assert mmexec.effective_n_jobs(None) == 1
    with parallel_config("threading", n_jobs=3):
        assert mmexec.effective_n_jobs(None) == 3 and Parallel().n_jobs == 3 and Parallel().backend == "threading"
    with mmexec.parallel_backend("threading", n_jobs=2) as (backend, n_jobs):
        assert (backend, n_jobs) == ("threading", 2)
        assert Parallel().backend == "threading"
    assert Parallel().backend == "sequential"


@pytest.mark.parametrize("n_jobs", [np.int64(2), 2.0, 2.7])
def test_numpy_and_float_n_jobs_are_accepted(n_jobs):
    """n_jobs=np.int64(2) and 2.0 work; floats are rounded down, as joblib does."""
    parallel = Parallel(n_jobs=n_jobs)
    assert parallel.n_jobs == 2 and parallel.backend == "loky"
    assert parallel(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]
    with pytest.raises(ValueError, match="n_jobs"):
        Parallel(n_jobs="two")


@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_a_generator_call_starts_the_work_before_the_first_next(backend, tmp_path):
    """As joblib, return_as='generator' dispatches at call time: a task runs although nobody iterates."""
    flag = str(tmp_path / "ran")
    out = Parallel(n_jobs=2, backend=backend, return_as="generator")(delayed(touch)(flag) for _ in range(1))
    assert wait_event(flag, 30.0) == flag  # it ran, without a next()
    assert list(out) == [flag]


def test_delayed_pickles_and_copies():
    """delayed(f) survives pickle, copy and cloudpickle, and still captures calls."""
    import copy
    import pickle

    import cloudpickle

    for clone in (pickle.loads(pickle.dumps(delayed(len))), copy.copy(delayed(len)), copy.deepcopy(delayed(add)),
                  cloudpickle.loads(cloudpickle.dumps(delayed(add)))):
        fn, args, kwargs = clone(1, b=2)
        assert fn in (len, add) and args == (1,) and kwargs == {"b": 2}
        assert clone.__name__ == fn.__name__ and clone.__module__ == fn.__module__


def test_a_returned_memmapped_argument_comes_back_as_a_plain_array():
    """As joblib: a task returning its memory-mapped argument (or a view) gives a private, writable ndarray
    (process backends only: threads return the caller's own object)."""
    a = np.arange(2**18, dtype=np.float64)  # 2 MiB: dumped and memory-mapped
    whole, part = Parallel(n_jobs=2)(delayed(identity)(x) for x in (a, a[10:20]))
    for got, expected in ((whole, a), (part, a[10:20])):
        assert type(got) is np.ndarray and got.flags.writeable and np.array_equal(got, expected)
    whole[0] = -1
    assert a[0] == 0


def test_registered_backend_runs_on_its_executor_and_is_shut_down():
    """register_parallel_backend(name, factory): Parallel(backend=name) runs on factory(n_jobs, **kwargs)."""
    made: list[ThreadPoolExecutor] = []

    def factory(n_jobs, **kwargs):
        made.append(ThreadPoolExecutor(n_jobs, thread_name_prefix="custom", **kwargs))
        return made[-1]

    mmexec.register_parallel_backend("custom-threads", factory)
    try:
        names = Parallel(n_jobs=2, backend="custom-threads")(delayed(_thread_name)() for _ in range(4))
        assert all(n.startswith("custom") for n in names) and len(made) == 1
        with pytest.raises(RuntimeError, match="shutdown"):
            made[0].submit(square, 1)  # Parallel shut it down
        with parallel_config("custom-threads", n_jobs=2):
            assert Parallel()(delayed(square)(i) for i in range(3)) == [0, 1, 4] and len(made) == 2
        mmexec.register_parallel_backend("custom-threads", lambda n: "not an executor")
        with pytest.raises(TypeError, match="not a concurrent.futures.Executor"):
            Parallel(n_jobs=2, backend="custom-threads")(delayed(square)(i) for i in range(3))
    finally:
        parallel_module._BACKENDS.registered.pop("custom-threads", None)
    with pytest.raises(ValueError, match="Invalid backend"):
        Parallel(backend="custom-threads")


def _thread_name() -> str:
    import threading

    return threading.current_thread().name


def test_a_joblib_program_runs_unchanged_with_the_import_swapped():
    """tests/programs/joblib_style.py (nested Parallel, parallel_config, generators, a failing task, a timeout)
    prints the same lines and ends with the same exception under joblib and under mmexec."""
    import subprocess
    import sys

    pytest.importorskip("joblib")
    program = os.path.join(os.path.dirname(__file__), "programs", "joblib_style.py")
    runs = {
        lib: subprocess.run([sys.executable, program, lib], capture_output=True, text=True, timeout=120)
        for lib in ("joblib", "mmexec")
    }
    ours, theirs = runs["mmexec"], runs["joblib"]
    assert theirs.stdout.count("\n") == 8, theirs.stderr
    assert ours.stdout == theirs.stdout
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.strip().splitlines()[-1] == theirs.stderr.strip().splitlines()[-1] == "ValueError: task 1 failed"


@pytest.mark.parametrize(
    "outer,inner,warning",
    [
        ("threading", "loky", "Loky-backed parallel loops cannot be nested below threads"),
        ("threading", "multiprocessing", "Multiprocessing-backed parallel loops cannot be nested below threads"),
        ("loky", "multiprocessing", "Multiprocessing-backed parallel loops cannot be nested, setting n_jobs=1"),
        ("loky", "loky", None),
    ],
)
def test_nested_process_backends_warn_and_run_sequentially_where_joblib_does(outer, inner, warning):
    """As joblib: a process backend below threads, or 'multiprocessing' in a worker, warns and uses one job."""
    values, warnings_seen, chosen = Parallel(n_jobs=2, backend=outer)(
        delayed(nested_parallel_warnings)(inner) for _ in range(2)
    )[0]
    assert values == [0, 1, 2]
    if warning is None:
        assert warnings_seen == [] and chosen == "loky"
    else:
        assert len(warnings_seen) == 1 and warnings_seen[0].startswith(warning) and chosen == "sequential"


def test_timeout_with_one_job_warns_that_it_is_not_used():
    """Parallel(n_jobs=1, timeout=1) warns once, with joblib's message, and runs the calls."""
    with pytest.warns(UserWarning) as caught:
        assert Parallel(n_jobs=1, timeout=1)(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]
    assert [str(w.message) for w in caught] == [
        "The backend class 'SequentialBackend' does not support timeout. "
        "You have set 'timeout=1' in Parallel but the 'timeout' parameter will not be used."
    ]


@pytest.mark.parametrize("outer", ["loky", "threading"])
def test_parallel_config_reports_joblibs_nesting_level(outer):
    """parallel_config gives the backend's name with joblib's nesting_level: 0 in the caller, 1 in a task."""
    from _tasks import backend_nesting_level

    with parallel_config(outer) as config:
        assert config["backend"] == outer and config["backend"].nesting_level == 0
    with mmexec.parallel_backend(outer) as (backend, n_jobs):
        assert backend == outer and backend.nesting_level == 0 and n_jobs == -1
    assert Parallel(n_jobs=2, backend=outer)(delayed(backend_nesting_level)("threading") for _ in range(3)) == [1] * 3


def test_inner_max_num_threads_on_a_thread_backend_is_refused_as_joblib_does():
    """joblib asserts; mmexec raises an error that is both ValueError and AssertionError."""
    for backend in ("threading", "sequential"):
        with pytest.raises(AssertionError, match="does not accept setting the inner_max_num_threads"):
            parallel_config(backend, inner_max_num_threads=1)
        with pytest.raises(ValueError):
            mmexec.parallel_backend(backend, inner_max_num_threads=2)


@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_leaving_the_with_block_aborts_an_open_generator_at_once(backend, tmp_path):
    """As joblib: the end of `with Parallel(...)` while a generator is open aborts its call instead of waiting
    for its tasks; taking its results afterwards raises AbortedError."""
    import time

    never = str(tmp_path / "never")
    start = time.monotonic()
    with Parallel(n_jobs=2, backend=backend, return_as="generator") as parallel:
        out = parallel(delayed(wait_event)(never, 30.0) for _ in range(6))
    assert time.monotonic() - start < 15  # not the tasks' 30 s
    with pytest.raises(mmexec.AbortedError, match="aborted"):
        list(out)
    with open(never, "w"):  # let the threads of the threading backend finish
        pass


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_the_end_of_the_with_block_while_another_thread_takes_results(backend):
    """The block ends (aborting the call) while another thread iterates its generator: that thread gets
    AbortedError, never an internal error."""
    import threading
    import time

    from _tasks import sleep_and_return

    for _ in range(5):
        errors: list[BaseException] = []
        with Parallel(n_jobs=2, backend=backend, return_as="generator_unordered", batch_size=1,
                      pre_dispatch="64") as parallel:
            results = parallel(delayed(sleep_and_return)(0.002, i) for i in range(5_000))

            thread = threading.Thread(target=_consume, args=(results, errors))
            thread.start()
            time.sleep(0.05)  # not synchronisation: let the consumer take a few results (either way is fine)
        thread.join(60)
        assert len(errors) == 1 and isinstance(errors[0], mmexec.AbortedError), errors


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_a_generator_whose_results_were_all_taken_ends_quietly_after_the_block(backend):
    """Every result taken inside the block, the generator not yet exhausted: it ends with no error (as joblib)."""
    with Parallel(n_jobs=2, backend=backend, return_as="generator") as parallel:
        results = parallel(delayed(square)(i) for i in range(4))
        assert [next(results) for _ in range(4)] == [0, 1, 4, 9]
    assert list(results) == []


def _consume(results: Any, errors: list[BaseException]) -> None:
    try:
        for _ in results:
            pass
    except BaseException as exc:  # recorded for the test's assertion
        errors.append(exc)


def test_a_parallel_config_left_in_another_thread_or_task_raises_nothing():
    """Exited in another thread or asyncio task (as fixtures and frameworks do), a block raises nothing, as
    joblib's; unregister() in the creating context still undoes it there."""
    import asyncio
    import threading

    config = parallel_config(n_jobs=3)
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(config.__exit__(None, None, None)))
    thread.start()
    thread.join()
    assert seen == [None] and Parallel().n_jobs == 3  # (still set in this thread)
    config.unregister()
    assert Parallel().n_jobs == 1

    async def main() -> int:
        holder: dict[str, parallel_config] = {}

        async def setup() -> None:
            holder["config"] = parallel_config(n_jobs=5)

        async def teardown() -> None:
            holder["config"].__exit__(None, None, None)

        await asyncio.create_task(setup())
        await asyncio.create_task(teardown())
        return Parallel().n_jobs

    assert asyncio.run(main()) == 1


def test_an_array_changed_between_calls_of_one_with_block_is_seen_by_the_next_call():
    """joblib 1.6 gives the second call's tasks the first value here (it does not look at an array again in
    one block); mmexec compares each array with its dump once per call."""
    a = np.zeros((1000, 300))
    with Parallel(n_jobs=2) as parallel:
        assert [d["sum"] for d in parallel(delayed(describe)(a) for _ in range(2))] == [0.0, 0.0]
        a[0, 0] = 5.0
        assert [d["sum"] for d in parallel(delayed(describe)(a) for _ in range(2))] == [5.0, 5.0]


def test_thread_variables_the_caller_set_reach_the_workers_as_joblib_passes_them(monkeypatch):
    """joblib keeps a thread-count variable the caller set (and its later value, in a later executor), fills
    in cpus // workers where it is unset, and sets inner_max_num_threads everywhere when given."""
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    with MemmapExecutor(2) as ex:
        assert {ex.submit(get_env, "OMP_NUM_THREADS").result() for _ in range(4)} == {"4"}
        assert ex.submit(get_env, "MKL_NUM_THREADS").result() == str(max(1, mmexec.cpu_count() // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with MemmapExecutor(2) as ex:  # (the same warm workers)
        assert {ex.submit(get_env, "OMP_NUM_THREADS").result() for _ in range(4)} == {"3"}
    with MemmapExecutor(2, inner_max_num_threads=1) as ex:
        assert {ex.submit(get_env, name).result() for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} == {"1"}


def test_each_loaded_library_gets_the_thread_count_of_its_own_variable(monkeypatch):
    """A warm worker has numpy's BLAS loaded before an executor's caps arrive: it is capped (threadpoolctl)
    to cpus // workers by default, and by its own variable's value where the caller set it (not by the
    smallest of all BLAS variables). The values differ from an uncapped library's (the CPU count)."""
    pytest.importorskip("threadpoolctl")
    cpus = mmexec.cpu_count()
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    with MemmapExecutor(cpus) as ex:  # (one thread each)
        capped = [ex.submit(library_threads).result() for _ in range(2 * cpus)]
    if not any("openblas" in libraries for libraries in capped):
        pytest.skip("numpy is not linked with OpenBLAS here")
    assert {libraries["openblas"] for libraries in capped} == {1}
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", str(cpus + 1))  # (what the caller asks for, as joblib's test of
    with MemmapExecutor(2) as ex:  # inner_max_num_threads=4 on 2 cores expects)
        seen = [ex.submit(library_threads).result() for _ in range(4)]
    assert {libraries["openblas"] for libraries in seen} == {cpus + 1}
