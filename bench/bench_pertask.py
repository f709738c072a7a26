"""Per-task cost workloads T1-T4: ProcessPoolExecutor, loky and MemmapExecutor side by side (see bench/README.md).

Each test is one (workload, contender) pair, driven like the transfer
workloads (:class:`~bench.conftest.Bench`: the timed part is from the first
submit to the last result in the parent; building the round's arguments is
untimed). The report gives each contender's time per task and its ratio to
ProcessPoolExecutor.

* ``T1``: :data:`TASKS` ``submit(tiny, i)`` calls, then every result in order.
* ``T2``: ``list(map(tiny, range(TASKS)))``: every executor on its defaults,
  plus ProcessPoolExecutor with the hand-tuned ``chunksize=2500`` (as in S3).
* ``T3``: :data:`T3_TASKS` ``bytes`` payloads of :data:`T3_SIZE` bytes, each
  sent to a task that returns a new ``bytes`` of the same size; fresh
  payload objects (new content) every round.
* ``T4``: dask's local scheduler with the executor as its pool,
  ``dask.multiprocessing.get(dsk, "total", pool=ex)``, on a graph of
  :data:`T4_TASKS` arrays of :data:`T4_LEN` float64 (literal data in the graph:
  dask pickles each into its task's bytes), one ``sum`` task each, and a
  reduction; fresh array objects every round, the graph built in the untimed
  setup. Skipped without dask.

``MMEXEC_BENCH_QUICK=1`` shrinks them (500 tasks, 1 MiB payloads and arrays)
to check the code, not to measure: ``MMEXEC_BENCH_QUICK=1 python -m bench -k
"T1 or T2 or T3 or T4"``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from . import _tasks
from .bench_transfer import SLOW, close, fresh_view
from .conftest import Bench, Runner

MiB = 2**20

#: Shrunk sizes to check the code quickly (not to measure).
QUICK = os.environ.get("MMEXEC_BENCH_QUICK", "") not in ("", "0")
#: T1, T2: tiny tasks per call.
TASKS = 500 if QUICK else 20_000
#: T3: bytes payloads per call, and the size of each (and of each result).
T3_TASKS, T3_SIZE = 8, (1 if QUICK else 32) * MiB
#: T4: arrays in the dask graph (one sum task each) and float64 per array (16 MiB).
T4_TASKS, T4_LEN = 8, (1 if QUICK else 16) * MiB // 8

EXECUTORS = ["ppe", "loky", "mmexec"]


def plan(workload: str, key: str) -> dict[str, int]:
    """1 warmup + 5 rounds; as in S3, no warmup and 2 rounds where one call runs TASKS one-call tasks
    through ProcessPoolExecutor or loky (seconds per call at full size)."""
    if workload in ("T1", "T2") and key in SLOW:
        return {"warmup": 0, "rounds": 2}
    return {"warmup": 1, "rounds": 5}


# ------------------------------------------------------------------------------- T1
@pytest.mark.parametrize("runner", EXECUTORS, indirect=True)
def test_T1(bench: Bench, runner: Runner) -> None:
    """TASKS submits of a tiny task, then every result taken in order."""

    def call() -> list[int]:
        return runner.run(_tasks.tiny, [(i,) for i in range(TASKS)])

    def check(out: list[int]) -> None:
        assert out == list(range(TASKS))

    bench("T1", runner, call, check=check, tasks=TASKS, quick=QUICK, **plan("T1", runner.key))


# ------------------------------------------------------------------------------- T2
@pytest.mark.parametrize("runner", ["ppe", "ppe-tuned", "loky", "mmexec"], indirect=True)
def test_T2(bench: Bench, runner: Runner) -> None:
    """``list(ex.map(tiny, range(TASKS)))``, default arguments (ProcessPoolExecutor also with chunksize=2500)."""

    def call() -> list[int]:
        return runner.map(_tasks.tiny, range(TASKS))

    def check(out: list[int]) -> None:
        assert out == list(range(TASKS))

    bench(
        "T2", runner, call, check=check, tasks=TASKS, chunksize=runner.chunksize, quick=QUICK,
        **plan("T2", runner.key),
    )  # fmt: skip


# ------------------------------------------------------------------------------- T3
@pytest.fixture(scope="module")
def payload_base() -> bytes:
    """T3's random content; each round's payloads are new objects made from it."""
    return np.random.default_rng(3).bytes(T3_SIZE)


def fresh_payloads(base: bytes, k: int) -> tuple[bytes, ...]:
    """T3_TASKS new ``bytes`` objects, distinct from each other and from the previous round's (one copy each)."""
    rest = memoryview(base)[2:]
    return tuple(b"".join((bytes((k % 256, i % 256)), rest)) for i in range(T3_TASKS))


@pytest.mark.parametrize("runner", EXECUTORS, indirect=True)
def test_T3(bench: Bench, runner: Runner, payload_base: bytes) -> None:
    """T3_TASKS bytes payloads there and back: submit each, then every result in order."""

    def call(*payloads: bytes) -> list[bytes]:
        return runner.run(_tasks.echo_bytes, [(p,) for p in payloads])

    def check(out: list[bytes], *payloads: bytes) -> None:
        assert len(out) == len(payloads)
        for r, p in zip(out, payloads, strict=True):
            assert type(r) is bytes and len(r) == len(p)
            assert r[0] == (p[0] + 1) % 256 and r[1:64] == p[1:64] and r[-64:] == p[-64:]

    bench(
        "T3", runner, call, setup=lambda k: fresh_payloads(payload_base, k), check=check,
        ref_bytes=2 * T3_TASKS * T3_SIZE, tasks=T3_TASKS, payload_bytes=T3_SIZE, quick=QUICK,
        **plan("T3", runner.key),
    )  # fmt: skip


# ------------------------------------------------------------------------------- T4
@pytest.fixture(scope="module")
def dask_get() -> Any:
    return pytest.importorskip("dask.multiprocessing").get


@pytest.fixture(scope="module")
def graph_arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(4)
    return [rng.random(T4_LEN) for _ in range(T4_TASKS)]


def graph(arrays: tuple[np.ndarray, ...]) -> dict[Any, Any]:
    """``("x", i)``: an array (literal data); ``("s", i)``: its sum; ``"total"``: the sum of the sums."""
    dsk: dict[Any, Any] = {}
    for i, a in enumerate(arrays):
        dsk["x", i] = a
        dsk["s", i] = (_tasks.total, ("x", i))
    dsk["total"] = (sum, [("s", i) for i in range(len(arrays))])
    return dsk


@pytest.mark.parametrize("runner", EXECUTORS, indirect=True)
def test_T4(bench: Bench, runner: Runner, dask_get: Any, graph_arrays: list[np.ndarray]) -> None:
    """dask's local scheduler with the executor as its pool, on a graph carrying T4_TASKS arrays."""

    def call(dsk: dict[Any, Any]) -> float:
        return dask_get(dsk, "total", pool=runner.executor)

    def check(out: float, dsk: dict[Any, Any]) -> None:
        assert close(out, sum(float(dsk["x", i].sum()) for i in range(T4_TASKS)))

    bench(
        "T4", runner, call, setup=lambda k: (graph(tuple(fresh_view(a, k) for a in graph_arrays)),), check=check,
        ref_bytes=T4_TASKS * T4_LEN * 8, dask_tasks=T4_TASKS + 1, array_bytes=T4_LEN * 8, quick=QUICK,
        **plan("T4", runner.key),
    )  # fmt: skip
