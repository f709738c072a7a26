"""Transfer workloads S1-S5 and warm start, on every contender (see bench/README.md).

Each test is one (workload, contender) pair; pytest-benchmark groups them per
workload. The timed part is from the first submit (or the Parallel call) to
the last result in the parent; building the round's arguments is untimed.

Rounds: ``(warmup, rounds)`` from :data:`PLAN`. Contenders that pickle the
big arrays take seconds per call: their pool is primed (workers started,
numpy imported) and they get no warmup and 1-2 rounds; everything else gets
one full warmup call and 5 timed rounds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from . import _tasks
from .conftest import Bench, Runner

MB = 10**6

#: S1: one 200 MB float64 array, 64 tasks each summing one slice of it.
S1_LEN, S1_TASKS = 25_000_000, 64
#: S2: 16 distinct 50 MB arrays, one task each.
S2_LEN, S2_COUNT = 6_250_000, 16
#: S3: 20,000 calls of x + 1.
S3_CALLS = 20_000
#: S4: 16 tasks, each returning a new 50 MB array.
S4_TASKS = 16
#: S5: row sums of a 10 x 1e6 float64 memmap into a 10-element output memmap.
S5_SHAPE = (10, 1_000_000)

ALL = ["ppe", "loky", "joblib", "mmexec", "mmexec-Parallel"]
#: Contenders that pickle whole arrays (or run 20,000 one-call tasks): seconds per call.
SLOW = {"ppe", "loky"}
DEFAULT_PLAN = (1, 5)
PLAN: dict[tuple[str, str], tuple[int, int]] = {
    ("S1", "ppe"): (0, 1),  # ~45 s a call on 2 cores: 64 x 200 MB through the pipe
    ("S1", "loky"): (0, 1),  # ~30 s
    ("warm", "*"): (2, 15),
}


def plan(workload: str, key: str) -> dict[str, int]:
    warmup, rounds = PLAN.get((workload, key)) or PLAN.get((workload, "*")) or (
        (0, 2) if key in SLOW else DEFAULT_PLAN
    )
    return {"warmup": warmup, "rounds": rounds}


def fresh_view(base: np.ndarray, k: int) -> np.ndarray:
    """A new array object with new content (first element = k) over ``base``'s memory.

    To mmexec (which recognises arrays by object) and to the others (which
    never reuse anything across calls) this is a freshly computed array, at no
    setup cost: copying 200 MB per round would cost more than most contenders.
    """
    a = base.view()
    a[0] = float(k)
    return a


def close(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-6)


# ------------------------------------------------------------------------------- S1
# Data fixtures are class-scoped: made once per workload (class), freed when it is done.
@pytest.fixture(scope="class")
def big() -> np.ndarray:
    return np.random.default_rng(1).random(S1_LEN)


class TestS1:
    @staticmethod
    def _call(runner: Runner):
        def call(a: np.ndarray) -> list[float]:
            return runner.run(_tasks.sum_slice, [(a, i, S1_TASKS) for i in range(S1_TASKS)])

        return call

    @staticmethod
    def _check(out: list[float], a: np.ndarray) -> None:
        assert len(out) == S1_TASKS and close(sum(out), float(a[: (a.size // S1_TASKS) * S1_TASKS].sum()))

    @pytest.mark.parametrize("runner", [*ALL[:4], "mmexec-map", "mmexec-Parallel"], indirect=True)
    def test_S1(self, bench: Bench, runner: Runner, big: np.ndarray) -> None:
        """A fresh 200 MB array object each round (the realistic case)."""
        bench(
            "S1", runner, self._call(runner), setup=lambda k: (fresh_view(big, k),), check=self._check,
            ref_bytes=big.nbytes, **plan("S1", runner.key),
        )

    @pytest.mark.parametrize("runner", ["joblib", "mmexec", "mmexec-map", "mmexec-Parallel"], indirect=True)
    def test_S1_reuse(self, bench: Bench, runner: Runner, big: np.ndarray) -> None:
        """The same unchanged array object every round (ProcessPoolExecutor/loky: same as S1)."""
        bench(
            "S1-reuse", runner, self._call(runner), setup=lambda k: (big,), check=self._check,
            ref_bytes=big.nbytes, **plan("S1-reuse", runner.key),
        )


# ------------------------------------------------------------------------------- S2
@pytest.fixture(scope="class")
def arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [rng.random(S2_LEN) for _ in range(S2_COUNT)]


class TestS2:
    @pytest.mark.parametrize("runner", ALL, indirect=True)
    def test_S2(self, bench: Bench, runner: Runner, arrays: list[np.ndarray]) -> None:
        def call(*fresh: np.ndarray) -> list[float]:
            return runner.run(_tasks.total, [(a,) for a in fresh])

        def check(out: list[float], *fresh: np.ndarray) -> None:
            assert all(close(s, float(a.sum())) for s, a in zip(out, fresh, strict=True))

        bench(
            "S2", runner, call, setup=lambda k: tuple(fresh_view(a, k) for a in arrays), check=check,
            ref_bytes=sum(a.nbytes for a in arrays), **plan("S2", runner.key),
        )


# ------------------------------------------------------------------------------- S3
@pytest.mark.parametrize("runner", ["ppe", "ppe-tuned", "loky", "joblib", "mmexec", "mmexec-Parallel"], indirect=True)
def test_S3(bench: Bench, runner: Runner) -> None:
    """20,000 tiny calls through map (Parallel) with default settings."""

    def call() -> list[int]:
        return runner.map(_tasks.inc, range(S3_CALLS))

    def check(out: list[int]) -> None:
        assert out == list(range(1, S3_CALLS + 1))

    bench("S3", runner, call, check=check, **plan("S3", runner.key), chunksize=runner.chunksize)


# ------------------------------------------------------------------------------- S4
@pytest.mark.parametrize("runner", ALL, indirect=True)
def test_S4(bench: Bench, runner: Runner) -> None:
    """16 tasks each returning a new 50 MB array; results are dropped after the timed part."""

    def call() -> list[np.ndarray]:
        return runner.run(_tasks.make_array, [(i,) for i in range(S4_TASKS)])

    def check(out: list[np.ndarray]) -> None:
        assert [(r.shape, r[0], r[-1]) for r in out] == [((_tasks.RESULT_LEN,), i, i) for i in range(S4_TASKS)]

    bench("S4", runner, call, check=check, ref_bytes=S4_TASKS * _tasks.RESULT_LEN * 8, **plan("S4", runner.key))


# ------------------------------------------------------------------------------- S5
@pytest.fixture(scope="class")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, np.ndarray]:
    """S5's input and output files (on disk, in pytest's temp folder) and the expected row sums."""
    folder = tmp_path_factory.mktemp("s5")
    inpath, outpath = str(folder / "input.f8"), str(folder / "output.f8")
    inp = np.memmap(inpath, dtype=np.float64, mode="w+", shape=S5_SHAPE)
    inp[:] = np.random.default_rng(5).random(S5_SHAPE)
    inp.flush()
    expected = np.asarray(inp).sum(axis=1)
    del inp
    np.memmap(outpath, dtype=np.float64, mode="w+", shape=(S5_SHAPE[0],)).flush()
    return inpath, outpath, expected


class TestS5:
    @pytest.mark.parametrize("runner", ["ppe", "ppe-paths", *ALL[1:]], indirect=True)
    def test_S5(self, bench: Bench, runner: Runner, files: tuple[str, str, np.ndarray]) -> None:
        """Row sums written by the tasks into an output np.memmap; memmaps opened in the parent."""
        inpath, outpath, expected = files
        rows = S5_SHAPE[0]

        def setup(k: int) -> tuple[np.memmap, np.memmap]:
            inp = np.memmap(inpath, dtype=np.float64, mode="r", shape=S5_SHAPE)
            out = np.memmap(outpath, dtype=np.float64, mode="r+", shape=(rows,))
            out[:] = 0.0
            return inp, out

        if runner.key == "ppe-paths":

            def call(inp: np.memmap, out: np.memmap) -> list[None]:
                return runner.run(_tasks.rowsum_paths, [(inpath, outpath, S5_SHAPE, i) for i in range(rows)])
        else:

            def call(inp: np.memmap, out: np.memmap) -> list[None]:
                return runner.run(_tasks.rowsum, [(inp, out, i) for i in range(rows)])

        def check(out_: object, inp: np.memmap, out: np.memmap) -> str:
            # ProcessPoolExecutor and loky pickle the memmaps: the tasks write into copies.
            return "correct" if np.allclose(out, expected) else "output memmap NOT written"

        bench(
            "S5", runner, call, setup=setup, check=check, ref_bytes=int(np.prod(S5_SHAPE)) * 8,
            **plan("S5", runner.key),
        )
        if runner.key not in ("ppe", "loky"):
            assert bench.benchmark.extra_info["check"] == "correct"


# ---------------------------------------------------------------------------- warm start
@pytest.mark.parametrize("runner", ALL, indirect=True)
def test_warm_start(bench: Bench, runner: Runner) -> None:
    """A second executor (Parallel call) on a warm pool, up to its first trivial result.

    ProcessPoolExecutor has no shared pool: it forks its workers every time.
    The executor is shut down after the timed part.
    """

    def after(new: object) -> None:
        if new is not None:
            new.shutdown(wait=True)

    bench("warm", runner, runner.first_result_of_new_executor, after=after, **plan("warm", runner.key))
