"""Knowing an array is unchanged: workloads U1 and U2 (see bench/README.md).

* ``U1``: S1's 64 tasks on one unchanged 200 MB array, through one
  ``MemmapExecutor.map`` per round, the same array object every round. Rows:
  the array as it is (its pages watched once a byte comparison has found it
  unchanged: only the pages written since are compared), the same ``map`` with
  dirty-page tracking off (``MMEXEC_DIRTY_PAGES=0``: every byte compared, the
  fallback), with an ``np.memmap`` of the same data as the argument (travels by
  reference, nothing to check), and the floor of change detection: the same
  ``map`` with the check skipped (the store told the array is unchanged).
  Targets: the array costs at most 1.15x the memmap argument and 1.2x that
  floor. For scale, a row without a target: workers that already map the data
  (an initializer faulted it in) and tasks that get only their slice's index,
  which no argument passing can beat.
* ``U2``: what the caller pays for a watch: the time of its own in-place rewrite
  (``a += 1.0``) of a 200 MB array handed to a ``map`` before every rewrite,
  against the same rewrite of an array never handed over (target: at most
  1.5x). An array rewritten every round is never watched; the worst case, the
  first rewrite of an array that was watched (after three unchanged hand-overs,
  a fresh array each round), is a row of its own, without a target.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest

import mmexec
from mmexec._dirty import ENV_SWITCH, TRACKER
from mmexec._store import MemmapStore

from . import _tasks
from .bench_transfer import S1_LEN, S1_TASKS, close
from .conftest import WORKERS, Bench, labelled

WARMUP, ROUNDS = 3, 7  # (three hand-overs before the array's pages are watched)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(21).random(S1_LEN)


@pytest.fixture(scope="module")
def shm_file(data: np.ndarray) -> Iterator[str]:
    """The data in a file in /dev/shm (or the temp folder): U1's memmap argument and floor."""
    folder = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    fd, path = tempfile.mkstemp(dir=folder, prefix="mmexec-bench-")
    with os.fdopen(fd, "wb") as f:
        data.tofile(f)
    yield path
    os.unlink(path)


def _check(out: list[float], *args: object) -> None:
    assert len(out) == S1_TASKS


U1_ROWS = {
    "mmexec": "MemmapExecutor.map, the same array (pages watched)",
    "mmexec-bytes": "the same, tracking off (every byte compared)",
    "mmexec-memmap": "MemmapExecutor.map, an np.memmap argument",
    "mmexec-floor": "floor: the same map, the check skipped",
    "mmexec-arena": "workers map the data already, tasks get an index (no target)",
}


@pytest.mark.parametrize("key", list(U1_ROWS))
def test_U1(bench: Bench, key: str, data: np.ndarray, shm_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if key == "mmexec" and not TRACKER.available():
        pytest.skip(f"no dirty-page tracking here: {TRACKER.reason}")
    if key == "mmexec-bytes":
        monkeypatch.setenv(ENV_SWITCH, "0")
    a: np.ndarray = data
    if key == "mmexec-memmap":
        a = np.memmap(shm_file, dtype=np.float64, mode="r")
    elif key == "mmexec-bytes":
        a = data.copy()  # (an array object no earlier row watched)
    expected = float(a[: (a.size // S1_TASKS) * S1_TASKS].sum())
    if key == "mmexec-floor":  # (every check says unchanged: true here, the array is never written)
        monkeypatch.setattr(MemmapStore, "_same_bytes", lambda self, dump, a: True)
    arena = key == "mmexec-arena"
    with mmexec.MemmapExecutor(WORKERS, initializer=_tasks.open_arena if arena else None,
                               initargs=(shm_file,) if arena else ()) as ex:
        if key == "mmexec-arena":
            def call() -> list[float]:
                return list(ex.map(_tasks.sum_arena_slice, range(S1_TASKS), [S1_TASKS] * S1_TASKS))
        else:
            def call() -> list[float]:
                return list(ex.map(_tasks.sum_slice, [a] * S1_TASKS, range(S1_TASKS), [S1_TASKS] * S1_TASKS))

        def check(out: list[float]) -> str:
            assert len(out) == S1_TASKS and close(sum(out), expected)
            if key != "mmexec":
                return "correct"
            dump = ex._store._dumps.get(id(a))
            return "correct" if dump is not None and dump.changes.watch is not None else "the array was not watched"

        list(ex.map(_tasks.prime, range(4 * WORKERS)))
        bench("U1", labelled(key, U1_ROWS[key]), call, check=check, ref_bytes=data.nbytes, warmup=WARMUP,
              rounds=ROUNDS)


U2_ROWS = {
    "mmexec": "rewrite of an array handed to a map before every rewrite",
    "untouched": "rewrite of an array never handed over",
    "mmexec-watched": "first rewrite of an array watched since (worst case, no target)",
}


@pytest.mark.parametrize("key", list(U2_ROWS))
def test_U2(bench: Bench, key: str, data: np.ndarray) -> None:
    if key == "mmexec-watched" and not TRACKER.available():
        pytest.skip(f"no dirty-page tracking here: {TRACKER.reason}")
    arrays = [data.copy()]
    with mmexec.MemmapExecutor(WORKERS) as ex:
        def hand_over(a: np.ndarray) -> None:
            assert len(list(ex.map(_tasks.sum_slice, [a] * 4, range(4), [4] * 4))) == 4

        def setup(k: int) -> tuple[np.ndarray]:
            a = arrays[-1]
            if key == "mmexec":
                hand_over(a)
            elif key == "mmexec-watched":
                arrays[:] = [data.copy()]  # (a fresh array: one that changed twice is never watched again)
                a = arrays[-1]
                for _ in range(3):
                    hand_over(a)
                dump = ex._store._dumps.get(id(a))
                assert dump is not None and dump.changes.watch is not None, "the array was not watched"
            return (a,)

        def call(a: np.ndarray) -> None:
            a += 1.0

        def after(out: None, a: np.ndarray) -> None:
            if key == "mmexec-watched":
                hand_over(a)  # (sees the change and lets the watch go, as a user's next call would)

        bench("U2", labelled(key, U2_ROWS[key]), call, setup=setup, after=after, ref_bytes=data.nbytes,
              warmup=WARMUP, rounds=ROUNDS)
