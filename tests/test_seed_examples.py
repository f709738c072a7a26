"""The seed examples E1-E8 (shared/SEED-EXAMPLES.md), through Parallel and through MemmapExecutor."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from math import sqrt

import numpy as np
import pytest
from conftest import our_folders

from mmexec import MemmapExecutor, Parallel, delayed, dump, has_shareable_memory, load


def test_e1_basic_call_returns_list_in_input_order():
    """E1: Parallel(n_jobs=2) over delayed(sqrt) returns the list of results in order."""
    assert delayed(sqrt)(4) == (sqrt, (4,), {})
    out = Parallel(n_jobs=2)(delayed(sqrt)(i**2) for i in range(10))
    assert out == [float(i) for i in range(10)] and type(out) is list


def _run_script(tmp_path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)


def test_e2_functions_from_main_lambdas_and_closures_work_in_a_script(tmp_path):
    """E2: a guarded script's own functions, lambdas and closures run in the workers."""
    done = _run_script(
        tmp_path,
        """
        from mmexec import Parallel, delayed, MemmapExecutor

        def triple(x):
            return 3 * x

        if __name__ == "__main__":
            k = 10
            closure = lambda x: x + k
            print(Parallel(n_jobs=2)(delayed(f)(i) for f in (triple, closure) for i in range(3)))
            with MemmapExecutor(2) as ex:
                print(list(ex.map(lambda x: x * k, range(3))))
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[0, 3, 6, 10, 11, 12]", "[0, 10, 20]"]


def test_e2_script_without_main_guard_does_not_fork_bomb(tmp_path):
    """E2: without the guard the script still finishes, and its top level runs once (workers never re-run it)."""
    done = _run_script(
        tmp_path,
        """
        import os
        from mmexec import Parallel, delayed
        print("top level ran", flush=True)
        print(Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4)))
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("top level ran") == 1 and "[0, 1, 2, 3]" in done.stdout


def test_e2_spawn_child_rerunning_an_unguarded_script_gets_a_clear_error(tmp_path):
    """E2: a stdlib spawn child re-running a script that makes an executor at top level gets MainGuardError."""
    done = _run_script(
        tmp_path,
        """
        import multiprocessing as mp
        from mmexec import MemmapExecutor
        ex = MemmapExecutor(1)
        p = mp.get_context("spawn").Process(target=print, args=("child",))
        p.start(); p.join()
        print("child exit code", p.exitcode)
        ex.shutdown()
        """,
    )
    assert "MainGuardError" in done.stderr and 'if __name__ == "__main__":' in done.stderr
    assert "child exit code 1" in done.stdout


def test_e3_threading_backend_gives_the_same_list():
    """E3: backend='threading' computes the same list in threads (nothing is memory-mapped)."""
    out = Parallel(n_jobs=2, backend="threading")(delayed(sqrt)(i**2) for i in range(10))
    assert out == [float(i) for i in range(10)]
    big = np.ones(10**6)
    assert Parallel(n_jobs=2, backend="threading")(delayed(has_shareable_memory)(big) for _ in range(2)) == [
        False,
        False,
    ]


def test_e4_large_arrays_become_memory_maps():
    """E4: with max_nbytes=1e6 only the 8 MB array reaches the worker as a shareable memmap."""
    sizes = [1e2, 1e4, 1e6]
    out = Parallel(n_jobs=2, max_nbytes=1e6)(delayed(has_shareable_memory)(np.ones(int(i))) for i in sizes)
    assert out == [False, False, True]
    with MemmapExecutor(2, max_nbytes=1e6) as ex:
        assert list(ex.map(has_shareable_memory, [np.ones(int(i)) for i in sizes])) == [False, False, True]
    assert Parallel(n_jobs=2, max_nbytes=None)(delayed(has_shareable_memory)(np.ones(10**6)) for _ in range(1)) == [
        False
    ]


def _folder_seen(a: np.ndarray) -> str:
    return os.path.dirname(os.readlink(a.filename)) if a.filename.startswith("/proc/") else os.path.dirname(a.filename)


def test_e5_temp_folder_and_environment_variable_choose_where_dumps_go(tmp_path, monkeypatch):
    """E5: temp_folder= and MMEXEC_TEMP_FOLDER put the dumps there; nothing is left afterwards."""
    big = np.ones(10**6)
    seen = Parallel(n_jobs=2, temp_folder=str(tmp_path / "a"))(delayed(_folder_seen)(big) for _ in range(2))
    assert all(os.path.dirname(s) == str(tmp_path / "a") for s in seen)
    monkeypatch.setenv("MMEXEC_TEMP_FOLDER", str(tmp_path / "b"))
    seen = Parallel(n_jobs=2)(delayed(_folder_seen)(big) for _ in range(2))
    assert all(os.path.dirname(s) == str(tmp_path / "b") for s in seen)
    # mmexec made both folders (they did not exist) and removed them with its files
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_e6_memory_maps_by_hand_travel_by_reference(tmp_path):
    """E6: dump/load give a memmap; it, a slice and an ndarray view of the slice are all shared."""
    filename = str(tmp_path / "large.mmap")
    large_array = np.ones(int(1e6))
    dump(large_array, filename)
    large_memmap = load(filename, mmap_mode="r+")
    assert (type(large_memmap).__name__, large_array.nbytes, large_memmap.shape) == ("memmap", 8000000, (1000000,))
    del large_array
    small_memmap = large_memmap[2:5]
    assert (small_memmap.nbytes, small_memmap.shape) == (24, (3,))
    small_array = np.asarray(small_memmap)
    assert (small_array.nbytes, small_array.shape) == (24, (3,))
    arrays = [large_memmap, small_memmap, small_array]
    assert Parallel(n_jobs=2, max_nbytes=None)(delayed(has_shareable_memory)(a) for a in arrays) == [True] * 3
    with MemmapExecutor(2, max_nbytes=None) as ex:
        assert list(ex.map(has_shareable_memory, arrays)) == [True] * 3


def sum_row(input, output, i):  # noqa: A002 - the tutorial's names
    output[i] = input[i, :].sum()
    print("[Worker %d] Sum for row %d is %f" % (os.getpid(), i, output[i]), flush=True)  # noqa: UP031 - as in E7


def test_e7_workers_write_results_into_a_shared_output(tmp_path):
    """E7: each task writes one row sum into an output memmap; the parent sees every write."""
    samples = np.random.default_rng(0).random((10, 1_000_000))
    sums = np.memmap(tmp_path / "sums", dtype=samples.dtype, shape=samples.shape[0], mode="w+")
    Parallel(n_jobs=2)(delayed(sum_row)(samples, sums, i) for i in range(samples.shape[0]))
    assert np.allclose(samples.sum(axis=1), sums)
    sums[:] = 0
    with MemmapExecutor(2) as ex:
        list(ex.map(sum_row, [samples] * 10, [sums] * 10, range(10)))
    assert np.allclose(samples.sum(axis=1), sums)


def test_e7_worker_prints_reach_the_parent_terminal(tmp_path):
    """E7: what workers print reaches the parent's stdout."""
    done = _run_script(
        tmp_path,
        """
        import os
        import numpy as np
        from mmexec import Parallel, delayed

        def sum_row(input, output, i):
            output[i] = input[i, :].sum()
            print("[Worker %d] Sum for row %d is %f" % (os.getpid(), i, output[i]), flush=True)

        if __name__ == "__main__":
            samples = np.ones((4, 1000))
            sums = np.memmap("sums.mmap", dtype=float, shape=4, mode="w+")
            Parallel(n_jobs=2)(delayed(sum_row)(samples, sums, i) for i in range(4))
            os.remove("sums.mmap")
        """,
    )
    assert done.returncode == 0, done.stderr
    # Two workers share the terminal: with PYTHONUNBUFFERED=1, print() writes the text and
    # its newline separately, so another worker's line may land between the two.
    found = re.findall(r"\[Worker \d+\] Sum for (row \d is 1000\.000000)", done.stdout)
    assert sorted(found) == [f"row {i} is 1000.000000" for i in range(4)], done.stdout


def test_e8_user_folder_stays_and_mmexec_files_go(tmp_path):
    """E8: the user's own folder and dumps stay; everything mmexec made is gone after the call or with-block."""
    folder = tmp_path / "joblib_memmap"
    folder.mkdir()
    dump(np.arange(10.0), folder / "data")
    data = load(folder / "data", mmap_mode="r")
    big = np.ones(10**6)
    Parallel(n_jobs=2)(delayed(np.sum)(x) for x in (big, data))
    assert our_folders() == []
    with Parallel(n_jobs=2) as parallel:
        parallel(delayed(np.sum)(big) for _ in range(3))
        parallel(delayed(np.sum)(big) for _ in range(3))
    assert our_folders() == []
    assert sorted(os.listdir(folder)) == ["data"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
