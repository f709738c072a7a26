"""Functions and estimators the joblib-backend tests send to worker processes (importable by name there)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression

from mmexec._worker import in_worker


class WhereFitted(ClassifierMixin, BaseEstimator):
    """A LogisticRegression that records where it was fitted: the process, and whether an mmexec worker."""

    def __init__(self, C: float = 1.0) -> None:
        self.C = C

    def fit(self, X: Any, y: Any) -> WhereFitted:
        self.model_ = LogisticRegression(C=self.C, max_iter=500).fit(X, y)
        self.classes_ = self.model_.classes_
        self.fitted_in_ = (os.getpid(), in_worker())
        return self

    def predict(self, X: Any) -> Any:
        return self.model_.predict(X)


def where(_: Any = None) -> tuple[int, bool]:
    return os.getpid(), in_worker()


def nested_backend() -> tuple[str, int, int]:
    """What a joblib Parallel nested in a task runs on: its backend's class, nesting level and workers."""
    from joblib.parallel import get_active_backend

    backend, n_jobs = get_active_backend()
    return type(backend).__name__, backend.nesting_level, n_jobs


def wait_then_mark(started: str, flag: str, done: str, timeout: float = 60.0) -> None:
    """Say it started, wait for ``flag`` (at most ``timeout`` s), then write ``done`` (unless interrupted)."""
    open(started, "w").close()
    deadline = time.monotonic() + timeout
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.005)
    open(done, "w").close()


def fail_after(path: str, message: str) -> None:
    """Raise ValueError(message) once ``path`` exists."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    raise ValueError(message)


def fill_first(a: np.ndarray, value: float) -> float:
    a.flat[0] = value
    return float(a.flat[0])


def list_folder(path: str, *_: Any) -> list[str]:
    """What ``path`` holds while this task runs (its other arguments only travel)."""
    return sorted(os.listdir(path))


def nested_sum(backend: str) -> int:
    """A task's own joblib Parallel on ``backend``, by name."""
    from joblib import Parallel, delayed

    return sum(Parallel(n_jobs=2, backend=backend)(delayed(abs)(-i) for i in range(3)))
