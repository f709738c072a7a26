"""mmexec as joblib's backend ``'mmexec'`` (``mmexec.register_joblib()``): joblib's own Parallel, and
scikit-learn's ``n_jobs``, on MemmapExecutor's warm workers."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pytest

import mmexec
from mmexec import MemmapExecutor

pytest.importorskip("sklearn")

from _joblib_tasks import (  # noqa: E402
    WhereFitted,
    fail_after,
    fill_first,
    list_folder,
    nested_backend,
    nested_sum,
    wait_then_mark,
    where,
)
from _tasks import describe, get_env, set_env_from_initializer  # noqa: E402

mmexec.register_joblib()

BIG = 300_000  # float64 elements: 2.4 MB, above joblib's default max_nbytes ('1M')


@pytest.fixture(scope="module")
def classification():
    from sklearn.datasets import make_classification

    return make_classification(n_samples=3_000, n_features=20, random_state=0)


def test_cross_val_score_runs_its_folds_in_mmexec_workers_with_the_scores_of_one_job(classification):
    from sklearn.model_selection import cross_val_score, cross_validate

    X, y = classification
    alone = cross_val_score(WhereFitted(), X, y, cv=4, n_jobs=1)
    with joblib.parallel_config(backend="mmexec", n_jobs=2):
        scores = cross_val_score(WhereFitted(), X, y, cv=4)
        fitted = cross_validate(WhereFitted(), X, y, cv=4, return_estimator=True)["estimator"]
    np.testing.assert_array_equal(scores, alone)
    places = {est.fitted_in_ for est in fitted}
    assert all(in_worker for _, in_worker in places), places
    assert os.getpid() not in {pid for pid, _ in places}
    assert 1 <= len(places) <= 2


def test_grid_search_and_a_forest_give_the_results_of_one_job(classification):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    X, y = classification
    grid = {"C": [0.01, 0.1, 1.0]}
    alone = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3, n_jobs=1).fit(X, y)
    forest_alone = RandomForestClassifier(n_estimators=8, random_state=0, n_jobs=1).fit(X, y)
    with joblib.parallel_config(backend="mmexec", n_jobs=2):
        search = GridSearchCV(LogisticRegression(max_iter=500), grid, cv=3).fit(X, y)
        forest = RandomForestClassifier(n_estimators=8, random_state=0, n_jobs=2).fit(X, y)
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], alone.cv_results_["mean_test_score"])
    assert search.best_params_ == alone.best_params_
    np.testing.assert_array_equal(forest.predict_proba(X), forest_alone.predict_proba(X))


def test_large_arrays_travel_as_read_only_maps_as_with_joblibs_default_backend():
    a = np.arange(BIG, dtype=np.float64)
    with joblib.parallel_config(backend="mmexec", n_jobs=2):
        seen = joblib.Parallel()(joblib.delayed(describe)(a) for _ in range(4))
    assert all(s["shareable"] and not s["writeable"] for s in seen), seen  # joblib's mmap_mode='r'
    assert all(s["sum"] == float(a.sum()) for s in seen)


@pytest.mark.parametrize(
    ("options", "shareable", "writeable"),
    [
        ({"max_nbytes": None}, False, True),  # joblib: no memory maps at all
        ({"max_nbytes": "10M"}, False, True),  # below the threshold: pickled
        ({"mmap_mode": "c"}, True, True),  # copy-on-write maps
        ({"mmap_mode": None}, False, True),
    ],
)
def test_max_nbytes_and_mmap_mode_are_honoured(options, shareable, writeable):
    a = np.ones(BIG)
    with joblib.parallel_config(backend="mmexec", n_jobs=2, **options):
        seen = joblib.Parallel()(joblib.delayed(describe)(a) for _ in range(2))
    assert {(s["shareable"], s["writeable"]) for s in seen} == {(shareable, writeable)}


def test_mmap_mode_r_plus_writes_reach_the_dump_not_the_callers_array():
    a = np.zeros(BIG)
    with joblib.parallel_config(backend="mmexec", n_jobs=2, mmap_mode="r+"):
        assert joblib.Parallel()(joblib.delayed(fill_first)(a, 7.0) for _ in range(2)) == [7.0, 7.0]
    assert a[0] == 0.0  # (as joblib: the caller's array is not a map, its dump is)


def test_temp_folder_is_where_the_dumps_go(tmp_path):
    a = np.ones(BIG)
    with joblib.parallel_config(backend="mmexec", n_jobs=2, temp_folder=str(tmp_path)):
        listings = joblib.Parallel()(joblib.delayed(list_folder)(str(tmp_path), a) for _ in range(2))
    assert all(len(listing) == 1 and listing[0].startswith("mmexec-") for listing in listings), listings
    assert os.listdir(tmp_path) == []  # removed when the call ended


def test_n_jobs_is_honoured_and_one_job_runs_in_the_caller():
    with joblib.parallel_config(backend="mmexec", n_jobs=2):
        assert joblib.effective_n_jobs() == 2
        places = set(joblib.Parallel()(joblib.delayed(where)() for _ in range(8)))
    assert len(places) <= 2 and all(in_worker for _, in_worker in places)
    with joblib.parallel_config(backend="mmexec", n_jobs=-1):
        assert joblib.effective_n_jobs() == mmexec.cpu_count()
    with joblib.parallel_config(backend="mmexec", n_jobs=1):
        assert set(joblib.Parallel()(joblib.delayed(where)() for _ in range(3))) == {(os.getpid(), False)}
    with pytest.raises(ValueError, match="n_jobs == 0"), joblib.parallel_config(backend="mmexec", n_jobs=0):
        joblib.Parallel()(joblib.delayed(where)() for _ in range(2))


def test_fresh_parallel_calls_run_on_the_same_warm_workers():
    with joblib.parallel_config(backend="mmexec", n_jobs=2):
        first = {pid for pid, _ in joblib.Parallel()(joblib.delayed(where)() for _ in range(8))}
        second = {pid for pid, _ in joblib.Parallel()(joblib.delayed(where)() for _ in range(8))}
    assert first & second  # the second call got (some of) the same processes


def test_inner_max_num_threads_caps_the_workers_threads():
    with joblib.parallel_config(backend="mmexec", n_jobs=2, inner_max_num_threads=1):
        assert set(joblib.Parallel()(joblib.delayed(get_env)("OMP_NUM_THREADS") for _ in range(4))) == {"1"}


def test_a_nested_parallel_in_a_task_runs_on_joblibs_threads_one_level_down():
    with joblib.parallel_config(backend="mmexec", n_jobs=2):
        seen = joblib.Parallel()(joblib.delayed(nested_backend)() for _ in range(2))
    assert {(name, level) for name, level, _ in seen} == {("ThreadingBackend", 1)}


def test_a_task_can_name_the_backend_in_its_own_parallel():
    """joblib's registry is per process: the workers register the backend too before running a batch."""
    with joblib.parallel_config(backend="mmexec", n_jobs=2):
        assert joblib.Parallel()(joblib.delayed(nested_sum)("mmexec") for _ in range(2)) == [3, 3]


@pytest.mark.parametrize("return_as", ["list", "generator", "generator_unordered"])
def test_return_as_gives_every_result(return_as):
    with joblib.parallel_config(backend="mmexec", n_jobs=2):
        out = joblib.Parallel(return_as=return_as)(joblib.delayed(abs)(-i) for i in range(50))
        values = list(out)
    if return_as == "generator_unordered":
        values.sort()
    assert values == list(range(50))


def test_an_error_aborts_the_calls_still_running_and_the_next_call_runs(tmp_path):
    """The failing call's error is raised while another call waits on a flag never set: that call was
    interrupted (it writes ``done`` however it ends: it did not, once the Parallel call returned)."""
    started, flag, done = (str(tmp_path / name) for name in ("started", "flag", "done"))
    calls = [joblib.delayed(wait_then_mark)(started, flag, done), joblib.delayed(fail_after)(started, "boom")]
    with joblib.parallel_config(backend="mmexec", n_jobs=2), pytest.raises(ValueError, match="boom"):
        joblib.Parallel(batch_size=1)(calls)
    assert os.path.exists(started)
    assert not os.path.exists(done), "the waiting call ran on after the error was raised"
    open(flag, "w").close()
    with joblib.parallel_config(backend="mmexec", n_jobs=2):
        assert joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]
    assert not os.path.exists(done)


def test_a_with_block_keeps_one_executor_and_survives_an_error():
    with joblib.parallel_config(backend="mmexec", n_jobs=2), joblib.Parallel() as parallel:
        with pytest.raises(ZeroDivisionError):
            parallel(joblib.delayed(divmod)(1, i) for i in (1, 0, 2))
        assert parallel(joblib.delayed(divmod)(7, i) for i in (1, 2)) == [(7, 0), (3, 1)]


def test_unknown_backend_parameters_are_named():
    with pytest.raises(TypeError, match="unknown parameter.*bogus"), \
            joblib.parallel_config(backend="mmexec", n_jobs=2, bogus=1):
        joblib.Parallel()(joblib.delayed(abs)(1) for _ in range(2))


def test_executor_options_pass_as_backend_parameters():
    with joblib.parallel_config(backend="mmexec", n_jobs=2, initializer=set_env_from_initializer,
                                initargs=("MMEXEC_JOBLIB_INIT", "yes")):
        assert set(joblib.Parallel()(joblib.delayed(get_env)("MMEXEC_JOBLIB_INIT") for _ in range(4))) == {"yes"}


def test_register_joblib_without_joblib_names_the_extra():
    code = textwrap.dedent("""
        import sys
        sys.modules["joblib"] = None  # as if not installed
        import mmexec
        try:
            mmexec.register_joblib()
        except ImportError as exc:
            print("ImportError:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ImportError:" in out.stdout and "mmexec[joblib]" in out.stdout, out.stdout + out.stderr


def test_tqdm_process_map_runs_on_the_swapped_class_and_counts_every_task(monkeypatch):
    """tqdm's process_map builds a ProcessPoolExecutor with a lock in initargs and overrides ``submit`` on
    the instance to count finished tasks: ``map`` goes through it, as the standard library's does."""
    import concurrent.futures

    from tqdm import tqdm
    from tqdm.contrib.concurrent import process_map

    class Bar(tqdm):  # type: ignore[misc]
        counts: list[tuple[int, int]] = []

        def close(self) -> None:
            Bar.counts.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", MemmapExecutor)
    assert process_map(abs, range(-20, 0), max_workers=2, tqdm_class=Bar, file=io.StringIO()) == list(
        range(20, 0, -1))
    assert process_map(abs, range(-20, 0), max_workers=2, chunksize=6, tqdm_class=Bar, file=io.StringIO()) == list(
        range(20, 0, -1))
    assert Bar.counts == [(20, 20), (4, 20)]  # one update per call, then per chunk, as ProcessPoolExecutor
