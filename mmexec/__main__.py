"""``python -m mmexec demo``: measure the memmap win on this machine.

Sums slices of one large float64 array in worker processes, first with the
standard library's ProcessPoolExecutor (which pickles the array into every
task), then with MemmapExecutor (which dumps it once to shared memory), and
prints the time and the peak memory of the parent plus all workers (PSS, so
shared pages count once).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor

import numpy as np

from . import MemmapExecutor, __version__
from ._procmem import PeakMemory


def _slice_sum(a: np.ndarray, i: int, n: int) -> float:
    step = len(a) // n
    return float(a[i * step : (i + 1) * step].sum())


def _noop(x: int) -> int:
    return x


def _measure(make: Callable[[], Executor], a: np.ndarray, tasks: int) -> tuple[float, int, float]:
    with make() as ex:
        list(ex.map(_noop, range(4)))  # start the workers outside the timing
        with PeakMemory() as mem:
            start = time.perf_counter()
            total = sum(ex.map(_slice_sum, [a] * tasks, range(tasks), [tasks] * tasks))
            elapsed = time.perf_counter() - start
    return elapsed, mem.peak - mem.baseline, total


def demo(size_mb: int, tasks: int, workers: int) -> int:
    a = np.random.default_rng(0).random(size_mb * 2**20 // 8)
    print(f"mmexec demo: {tasks} tasks each sum a slice of one {a.nbytes / 2**20:.0f} MiB float64 array,")
    print(
        f"{workers} worker processes. Peak memory: parent + workers (PSS) + shared-memory files, "
        "above the baseline.\n"
    )
    rows = []
    for name, make in (
        ("ProcessPoolExecutor", lambda: ProcessPoolExecutor(workers)),
        ("MemmapExecutor", lambda: MemmapExecutor(workers)),
    ):
        elapsed, peak, total = _measure(make, a, tasks)
        rows.append((name, elapsed, peak, total))
        print(f"  {name:<20} {elapsed * 1000:9.1f} ms   peak memory {peak / 2**20:8.1f} MiB")
    (_, t_pool, m_pool, s_pool), (_, t_mm, m_mm, s_mm) = rows
    if not np.isclose(s_pool, s_mm):
        print("results differ!", s_pool, s_mm)
        return 1
    print(f"\nSame result ({s_mm:.6g}). MemmapExecutor: {t_pool / t_mm:.1f}x faster, "
          f"{m_pool / max(m_mm, 1):.1f}x less extra memory.")
    return 0


DESCRIPTION = (
    "Measure the memmap win on this machine: sum slices of one large array in worker processes, with "
    "ProcessPoolExecutor (which pickles the array into every task) and with MemmapExecutor (which writes "
    "it once to shared memory), and print the time and peak memory of each."
)


def _program_name() -> str:
    """``mmexec`` when run as the console script, ``python -m mmexec`` otherwise."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m mmexec" if name in ("", "__main__.py", "-c") or name.endswith(".py") else name


def main(argv: Sequence[str] | None = None) -> int:
    prog = _program_name()
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mmexec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="demo")
    run = sub.add_parser("demo", help="compare ProcessPoolExecutor and MemmapExecutor on a large array",
                         description=DESCRIPTION)
    run.add_argument("--size-mb", type=int, default=100, help="array size in MiB (default 100)")
    run.add_argument("--tasks", type=int, default=16, help="number of tasks (default 16)")
    run.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named, with the usage of the command they were given to
        (run if args.command == "demo" else parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error("the following arguments are required: demo")
    for option, value in (("--size-mb", args.size_mb), ("--tasks", args.tasks), ("--workers", args.workers)):
        if value < 1:
            print(f"{prog} demo: error: {option} must be at least 1, got {value}", file=sys.stderr)
            return 2
    return demo(args.size_mb, args.tasks, args.workers)


if __name__ == "__main__":
    sys.exit(main())
