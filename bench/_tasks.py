"""Task functions run in the workers.

They live in their own small module (numpy only) so that every worker
process imports them cheaply by reference, whatever the pool.
"""

from __future__ import annotations

import os

import numpy as np

#: S4: each task returns a new array of this many float64 (50 MB).
RESULT_LEN = 6_250_000


def prime(i: int) -> int:
    """Warm a worker: numpy is imported and the pipe is open."""
    return int(np.arange(4).sum()) + i


def noop() -> int:
    """The trivial first task of the warm-start workload: returns the worker's pid."""
    return os.getpid()


def sum_slice(a: np.ndarray, i: int, n: int) -> float:
    """S1: sum slice ``i`` of ``n`` equal slices of ``a`` (the whole array is passed)."""
    m = a.shape[0] // n
    return float(a[i * m : (i + 1) * m].sum())


def total(a: np.ndarray) -> float:
    """S2: sum a whole array."""
    return float(a.sum())


def inc(x: int) -> int:
    """S3: the smallest possible task."""
    return x + 1


def make_array(i: int) -> np.ndarray:
    """S4: a new 50 MB array."""
    return np.full(RESULT_LEN, float(i))


def rowsum(inp: np.ndarray, out: np.ndarray, i: int) -> None:
    """S5: ``out[i] = inp[i].sum()``, ``out`` being an ``np.memmap`` opened by the parent."""
    out[i] = inp[i].sum()


def rowsum_paths(inpath: str, outpath: str, shape: tuple[int, int], i: int) -> None:
    """S5 by hand for ProcessPoolExecutor: the task opens the memmaps itself."""
    inp = np.memmap(inpath, dtype=np.float64, mode="r", shape=shape)
    out = np.memmap(outpath, dtype=np.float64, mode="r+", shape=(shape[0],))
    out[i] = inp[i].sum()  # a shared map: the parent sees it without msync


def tiny(i: int) -> int:
    """T1/T2: a task that does next to nothing; returns its argument."""
    return i


def echo_bytes(b: bytes) -> bytes:
    """T3: a new ``bytes`` of the same size: the payload with its first byte incremented (one copy)."""
    return b"".join((bytes(((b[0] + 1) % 256,)), memoryview(b)[1:]))


_ARENA: np.ndarray | None = None


def open_arena(path: str) -> None:
    """U1's floor: map the array's file once per worker and fault every page in (the initializer)."""
    global _ARENA
    _ARENA = np.memmap(path, dtype=np.float64, mode="r")
    float(_ARENA.sum())


def sum_arena_slice(i: int, n: int) -> float:
    """U1's floor: :func:`sum_slice` on the array the worker already maps (nothing travels but ``i``)."""
    assert _ARENA is not None
    return sum_slice(_ARENA, i, n)
