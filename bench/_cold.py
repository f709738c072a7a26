"""One cold start, in a fresh process: ``python -m bench._cold CONTENDER`` (driven by bench_cold.py).

Imports numpy and the contender's library, prints ``ready``, waits for ``go``
on stdin, then makes the process's first executor (or Parallel call) and
waits for its first trivial result, prints ``done``, and on ``exit`` shuts
down and ends. The driver times ``go`` -> ``done``.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy  # noqa: F401  (imported before timing, as a NumPy program would have it)

from bench import _tasks

WORKERS = 2


def first_result(contender: str) -> Any:
    """Start the contender's first executor and get its first result; return what to shut down."""
    if contender.startswith("ppe-"):
        ex = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context(contender[4:]))
        ex.submit(_tasks.noop).result()
        return ex
    if contender == "loky":
        import loky

        ex = loky.get_reusable_executor(max_workers=WORKERS)
        ex.submit(_tasks.noop).result()
        return ex
    if contender in ("joblib", "mmexec-Parallel"):
        lib = __import__("joblib" if contender == "joblib" else "mmexec")
        lib.Parallel(n_jobs=WORKERS)([lib.delayed(_tasks.noop)()])
        return None
    import mmexec

    ex = mmexec.MemmapExecutor(WORKERS)
    ex.submit(_tasks.noop).result()
    return ex


def main() -> int:
    contender = sys.argv[1]
    if contender == "joblib":
        import joblib  # noqa: F401
    elif contender == "loky":
        import loky  # noqa: F401
    elif contender.startswith("mmexec"):
        import mmexec  # noqa: F401
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    ex = first_result(contender)
    print("done", flush=True)
    sys.stdin.readline()  # "exit"
    if ex is not None:
        ex.shutdown(wait=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
