"""Storms for MemmapExecutor's drop-in promises, a few thousand calls each: aborts, kept arguments, reused
files, failing results.

Run by tests/test_dropin.py: ``python storms.py [SCALE]`` (SCALE 1.0: 3,000 / 1,600 / 2,000 / 2,000 calls).
Prints one JSON line of counts: every count must be 0 except those whose name ends in ``_total``.

* abort: 3,000 logged calls on 2 workers; about one in ten is aborted at random, queued or running
  (one abort in twenty with ``grace=0``, which kills a worker whose call is still running). No other call
  may fail, none may run twice, a cancelled call never runs, and every future is done when ``abort``
  returns.
* kept: a task keeps its 2 MiB argument in the worker; fresh arrays of the same size follow once the caller
  dropped its own. What the worker kept never changes.
* spares: 2,000 calls with fresh 2 MiB arguments and 2 MiB results (files freed and reused all the time);
  every result is right, and results the caller holds do not change later.
* failing: 2,000 calls, one in twenty returns a large result that cannot be pickled, one in twenty a result
  the caller cannot rebuild. Only those fail, and no file of theirs is left behind.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any

import numpy as np

N = 2**18  # float64: 2 MiB, above the 1 MB threshold
_KEPT: dict[str, np.ndarray] = {}


# ------------------------------------------------------------------------- tasks (run in the workers)
def logged(i: int, log: str, seconds: float) -> int:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{i} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    time.sleep(seconds)
    return i * i


def keep(a: np.ndarray) -> float:
    _KEPT["a"] = a
    return float(a.sum())


def kept_sum() -> float:
    return float(_KEPT["a"].sum())


def forget() -> None:
    _KEPT.clear()


def total(a: np.ndarray) -> float:
    return float(a.sum())


def doubled(a: np.ndarray) -> np.ndarray:
    return a * 2


class _Unloadable:
    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __reduce__(self) -> Any:
        return _load, (self.parent,)


def _load(parent: int) -> str:
    if os.getpid() == parent:
        raise FileNotFoundError(2, "No such file or directory", "/dev/shm/gone")
    return "loaded"


def maybe_bad(i: int, parent: int) -> Any:
    if i % 20 == 0:
        return np.ones(N), threading.Lock()  # cannot be pickled (after the array was written)
    if i % 20 == 10:
        return _Unloadable(parent)
    return i


# ------------------------------------------------------------------------- the caller
def settle() -> None:
    from mmexec._housekeeper import HOUSEKEEPER

    gc.collect()
    HOUSEKEEPER.flush(timeout=30)


def our_folders() -> list[str]:
    pattern = f"mmexec-{os.getpid()}-*"
    return [f for base in {"/dev/shm", tempfile.gettempdir()} for f in glob.glob(os.path.join(base, pattern))]


def our_files() -> list[str]:
    return [name for folder in our_folders() for name in os.listdir(folder)]


def _aborted_or_done(future: Any, value: int) -> bool:
    """An aborted call's future: cancelled, failed with AbortedError, or (it ended first) its value."""
    from mmexec import AbortedError

    if future.cancelled():
        return True
    exc = future.exception()
    return isinstance(exc, AbortedError) if exc is not None else future.result() == value


def abort_storm(calls: int, seed: int, log: str) -> dict[str, int]:
    from mmexec import MemmapExecutor

    rng = random.Random(seed)
    aborted: set[int] = set()
    not_done_after_abort = 0
    with MemmapExecutor(2) as ex:
        futures = [ex.submit(logged, i, log, rng.random() * 0.003) for i in range(calls)]
        lo = 0
        while lo < calls:
            while lo < calls and futures[lo].done():
                lo += 1
            window = [i for i in range(lo, min(lo + 8, calls)) if not futures[i].done() and i not in aborted]
            if window and rng.random() < 0.1:
                i = rng.choice(window)
                ex.abort([futures[i]], grace=0.0 if rng.random() < 0.05 else 1.0)
                aborted.add(i)
                not_done_after_abort += not futures[i].done()
            else:
                futures[lo].exception() if lo < calls and rng.random() < 0.5 else time.sleep(0.0005)
        for f in futures:
            f.exception(timeout=120) if not f.cancelled() else None
    with open(log) as f:
        lines = [line.split() for line in f.read().splitlines()]
    ran = [int(i) for i, _ in lines]
    counts: dict[int, int] = {}
    for i in ran:
        counts[i] = counts.get(i, 0) + 1
    innocent_failed = wrong = 0
    for i, f in enumerate(futures):
        if i in aborted:
            continue
        if f.cancelled() or f.exception() is not None:
            innocent_failed += 1
        elif f.result() != i * i:
            wrong += 1
    return {
        "abort_innocent_failures": innocent_failed,
        "abort_wrong_answers": wrong,
        "abort_double_runs": sum(1 for n in counts.values() if n > 1),
        "abort_innocent_never_ran": sum(1 for i in range(calls) if i not in aborted and i not in counts),
        "abort_cancelled_but_ran": sum(1 for i in aborted if futures[i].cancelled() and i in counts),
        "abort_neither_aborted_nor_done": sum(1 for i in aborted if not _aborted_or_done(futures[i], i * i)),
        "abort_not_done_after_abort": not_done_after_abort,
        "abort_calls_total": calls,
        "abort_aborts_total": len(aborted),
        "abort_workers_killed_total": len({pid for _, pid in lines}) - 2,
    }


def kept_storm(trials: int, seed: int) -> dict[str, int]:
    from mmexec import MemmapExecutor

    rng = np.random.default_rng(seed)
    changed = 0
    with MemmapExecutor(1) as ex:
        for trial in range(trials):
            a = rng.random(N)
            expected = ex.submit(keep, a).result(timeout=60)
            del a
            settle()
            for j in range(2):
                b = np.full(N, float(trial + j))
                ex.submit(total, b).result(timeout=60)
                del b
                settle()
            changed += ex.submit(kept_sum).result(timeout=60) != expected
        ex.submit(forget).result(timeout=60)
    return {"kept_changed": changed, "kept_trials_total": trials}


def spare_storm(calls: int) -> dict[str, int]:
    from mmexec import MemmapExecutor

    wrong = held_changed = 0
    held: list[tuple[int, np.ndarray]] = []
    with MemmapExecutor(2) as ex:
        window: deque[tuple[int, Any]] = deque()
        for i in range(calls):
            window.append((i, ex.submit(doubled, np.full(N, float(i)))))
            if len(window) >= 16:
                j, fut = window.popleft()
                result = fut.result(timeout=60)
                wrong += not (result.shape == (N,) and (result == 2.0 * j).all())
                if j % 50 == 0:
                    held.append((j, result))
                del result
        for j, fut in window:
            wrong += not (fut.result(timeout=60) == 2.0 * j).all()
        held_changed = sum(1 for j, r in held if not (r == 2.0 * j).all())
    return {"spare_wrong_answers": wrong, "spare_held_changed": held_changed, "spare_calls_total": calls}


def failing_storm(calls: int) -> dict[str, int]:
    from mmexec import MemmapExecutor

    innocent = missed = left = 0
    me = os.getpid()
    with MemmapExecutor(2) as ex:
        for start in range(0, calls, 100):
            futures = [(i, ex.submit(maybe_bad, i, me)) for i in range(start, min(start + 100, calls))]
            for i, fut in futures:
                exc = fut.exception(timeout=60)
                bad = i % 10 == 0
                if bad and exc is None:
                    missed += 1
                elif not bad and (exc is not None or fut.result() != i):
                    innocent += 1
            del futures, fut, exc
            settle()
            left = max(left, len(our_files()))
    return {"failing_innocent_failures": innocent, "failing_missed": missed, "failing_files_left": left,
            "failing_calls_total": calls}


def main() -> int:
    scale = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    seen: dict[str, int] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        seen.update(abort_storm(int(3000 * scale), 0, os.path.join(tmp, "log")))
    seen.update(kept_storm(int(400 * scale), 1))
    seen.update(spare_storm(int(2000 * scale)))
    seen.update(failing_storm(int(2000 * scale)))
    settle()
    seen["folders_left"] = len(our_folders())
    seen["seconds_total"] = round(time.monotonic() - started)
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import storms  # the tasks by reference, from a module the workers import

    sys.exit(storms.main())
