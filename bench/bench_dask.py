"""D1: one 100 MB array passed to 8 tasks on a dask LocalCluster, directly vs through mmexec.

The cluster is a ``LocalCluster`` on 127.0.0.1 with :data:`~bench.conftest.WORKERS`
worker processes of one thread each (the scheduler runs in this process).
Each task sums one eighth of the array (the whole array is passed).

Contenders:

* ``dask``: ``client.get_executor(pure=False).submit(f, a, i, 8)``, the array
  passed directly: dask pickles it into every task's graph (and warns about it).
* ``mmexec-dask``: ``DaskExecutor(client).submit`` per task: the array is
  scattered once per array object and its SHA-1 checked at each submit.
* ``mmexec-dask-map``: one ``DaskExecutor.map`` call: one check for all 8 tasks.

Workloads: ``D1`` passes a fresh array object (new content) each round;
``D1-reuse`` the same unchanged object every round (direct passing is the
same as in D1, so it is not repeated).

Run only these: ``python -m bench -k dask``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from . import _tasks
from .bench_transfer import fresh_view
from .conftest import WORKERS, Bench

distributed = pytest.importorskip("distributed")

from mmexec import DaskExecutor  # noqa: E402

#: D1: one 100 MB float64 array, 8 tasks each summing one slice of it.
D1_LEN, D1_TASKS = 12_500_000, 8
LABELS = {
    "dask": "dask ClientExecutor.submit, array passed directly",
    "mmexec-dask": "mmexec DaskExecutor.submit",
    "mmexec-dask-map": "mmexec DaskExecutor.map",
}
#: (warmup, rounds): direct passing sends 800 MB through the scheduler per call (seconds).
PLAN = {"dask": (1, 3), "mmexec-dask": (1, 5), "mmexec-dask-map": (1, 5)}


@dataclass(frozen=True)
class Contender:
    """What :class:`~bench.conftest.Bench` records about a contender."""

    key: str
    label: str


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A LocalCluster with WORKERS single-threaded worker processes, primed (numpy imported)."""
    with (
        distributed.LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        assert max(c.get_executor(pure=False).map(_tasks.prime, range(4 * WORKERS))) == 6 + 4 * WORKERS - 1
        yield c


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    return np.random.default_rng(6).random(D1_LEN)


def _caller(key: str, client: Any, ex: DaskExecutor) -> Callable[[np.ndarray], list[float]]:
    def direct(a: np.ndarray) -> list[float]:
        submit = client.get_executor(pure=False).submit
        futures = [submit(_tasks.sum_slice, a, i, D1_TASKS) for i in range(D1_TASKS)]
        return [f.result() for f in futures]

    def through_submit(a: np.ndarray) -> list[float]:
        futures = [ex.submit(_tasks.sum_slice, a, i, D1_TASKS) for i in range(D1_TASKS)]
        return [f.result() for f in futures]

    def through_map(a: np.ndarray) -> list[float]:
        return list(ex.map(_tasks.sum_slice, [a] * D1_TASKS, range(D1_TASKS), [D1_TASKS] * D1_TASKS))

    return {"dask": direct, "mmexec-dask": through_submit, "mmexec-dask-map": through_map}[key]


def _run(bench: Bench, client: Any, workload: str, key: str, setup: Callable[[int], tuple[np.ndarray]]) -> None:
    warmup, rounds = PLAN[key]
    with DaskExecutor(client) as ex:

        def check(out: list[float], a: np.ndarray) -> str | None:
            m = a.size // D1_TASKS
            assert math.isclose(sum(out), float(a[: m * D1_TASKS].sum()), rel_tol=1e-9)
            return None if key == "dask" else f"scattered {ex._store.scatters}x in {warmup + rounds} calls"

        bench(
            workload, Contender(key, LABELS[key]), _caller(key, client, ex), setup=setup, check=check,
            warmup=warmup, rounds=rounds, ref_bytes=D1_LEN * 8,
        )  # fmt: skip


# dask warns that the directly passed array makes each task's graph 100 MB: that is what is measured.
@pytest.mark.filterwarnings("ignore:Sending large graph:UserWarning")
@pytest.mark.parametrize("key", list(LABELS))
def test_D1(bench: Bench, client: Any, base: np.ndarray, key: str) -> None:
    """A fresh 100 MB array object (new content) each round, passed whole to 8 tasks."""
    _run(bench, client, "D1", key, lambda k: (fresh_view(base, k),))


@pytest.mark.parametrize("key", ["mmexec-dask", "mmexec-dask-map"])
def test_D1_reuse(bench: Bench, client: Any, base: np.ndarray, key: str) -> None:
    """The same unchanged array object every round: scattered once, checked at each submit / map."""
    _run(bench, client, "D1-reuse", key, lambda k: (base,))
