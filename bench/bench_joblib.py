"""joblib users' workloads P1 and J1: mmexec against joblib, in one run (see bench/README.md).

* ``P1``: repeated ``Parallel`` calls on one unchanged 160 MB array, as joblib
  users and scikit-learn write them: ``Parallel(n_jobs=2)(delayed(sum_slice)(X,
  i, 8) for i in range(8))``, a fresh ``Parallel`` each round, against the same
  calls inside one ``with Parallel(...)`` block. mmexec's target: a fresh call
  costs at most 1.3x a call in the block.
* ``J1``: scikit-learn's ``GridSearchCV(Ridge(), 4 alphas, cv=3, refit=False)``
  on a 160 MB ``X`` (12 fits), under ``joblib.parallel_config(backend=...,
  n_jobs=2)``: joblib's default backend (loky) against mmexec's joblib backend
  (``mmexec.register_joblib()``), and one job for reference. The same ``X``
  object every round, as a user running several searches on one dataset.

Skipped without joblib (P1's joblib rows, J1) or scikit-learn (J1).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import mmexec

from . import _tasks
from .bench_transfer import close
from .conftest import WORKERS, Bench, labelled

#: P1: rows x columns of float64 (160 MB) and calls per Parallel call.
P1_SHAPE, P1_CALLS = (20_000, 1_000), 8
#: J1: samples x features of float64 (160 MB), the grid and the folds.
J1_SHAPE, J1_ALPHAS, J1_FOLDS = (100_000, 200), (0.1, 1.0, 10.0, 100.0), 3


# ------------------------------------------------------------------------------- P1
@pytest.fixture(scope="module")
def p1_array() -> np.ndarray:
    return np.random.default_rng(11).random(P1_SHAPE)


P1_ROWS = {
    "mmexec": "mmexec.Parallel, calls in one with-block",
    "mmexec-Parallel": "mmexec.Parallel, a fresh call each round",
    "joblib-kept": "joblib.Parallel, calls in one with-block",
    "joblib": "joblib.Parallel, a fresh call each round",
}


@pytest.fixture
def p1_parallel(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    """(key, what runs a list of delayed calls): a kept block or a fresh Parallel per call."""
    key: str = request.param
    module: Any = mmexec
    if key.startswith("joblib"):
        module = pytest.importorskip("joblib")
    if key in ("mmexec", "joblib-kept"):
        with module.Parallel(n_jobs=WORKERS) as parallel:
            yield key, parallel
    else:
        yield key, lambda calls: module.Parallel(n_jobs=WORKERS)(calls)


@pytest.mark.parametrize("p1_parallel", list(P1_ROWS), indirect=True)
def test_P1(bench: Bench, p1_parallel: tuple[str, Any], p1_array: np.ndarray) -> None:
    key, run = p1_parallel
    delayed = mmexec.delayed if key.startswith("mmexec") else pytest.importorskip("joblib").delayed

    def call(a: np.ndarray) -> list[float]:
        return list(run(delayed(_tasks.sum_slice)(a, i, P1_CALLS) for i in range(P1_CALLS)))

    def check(out: list[float], a: np.ndarray) -> None:
        assert close(sum(out), float(a.sum()))

    bench("P1", labelled(key, P1_ROWS[key]), call, setup=lambda k: (p1_array,), check=check,
          ref_bytes=p1_array.nbytes, warmup=1, rounds=7)


# ------------------------------------------------------------------------------- J1
@pytest.fixture(scope="module")
def j1_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12)
    X = rng.random(J1_SHAPE)
    y = X @ rng.random(J1_SHAPE[1]) + rng.normal(0, 0.1, J1_SHAPE[0])
    return X, y


J1_ROWS = {
    "mmexec": ("mmexec", WORKERS, "joblib backend 'mmexec' (mmexec.register_joblib())"),
    "joblib": ("loky", WORKERS, "joblib's default backend (loky)"),
    "sequential": ("sequential", 1, "one job (n_jobs=1)"),
}


@pytest.mark.parametrize("key", list(J1_ROWS))
def test_J1(bench: Bench, key: str, j1_data: tuple[np.ndarray, np.ndarray]) -> None:
    joblib = pytest.importorskip("joblib")
    pytest.importorskip("sklearn")
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    mmexec.register_joblib()
    backend, n_jobs, label = J1_ROWS[key]
    X, y = j1_data

    def call() -> np.ndarray:
        with joblib.parallel_config(backend=backend, n_jobs=n_jobs):
            search = GridSearchCV(Ridge(), {"alpha": list(J1_ALPHAS)}, cv=J1_FOLDS, refit=False).fit(X, y)
        return np.asarray(search.cv_results_["mean_test_score"])

    def check(scores: np.ndarray) -> None:
        assert scores.shape == (len(J1_ALPHAS),) and np.all(scores > 0.9)

    bench("J1", labelled(key, label), call, check=check, ref_bytes=X.nbytes, warmup=1, rounds=3,
          fits=len(J1_ALPHAS) * J1_FOLDS)
