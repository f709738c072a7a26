"""A small joblib program: run it with ``joblib`` or with ``mmexec`` as the library; the output is the same.

Usage: ``python joblib_style.py joblib|mmexec``. Only the import changes.
"""

import importlib
import multiprocessing
import sys
import time
from math import sqrt

lib = importlib.import_module(sys.argv[1])
Parallel, delayed, parallel_config = lib.Parallel, lib.delayed, lib.parallel_config


def inner(i):
    return sum(Parallel(n_jobs=2)(delayed(sqrt)(j * j) for j in range(i)))


def fail_on(i, bad):
    if i == bad:
        raise ValueError(f"task {i} failed")
    return i


def slow(seconds):
    time.sleep(seconds)
    return seconds


if __name__ == "__main__":
    print("list", Parallel(n_jobs=2)(delayed(sqrt)(i**2) for i in range(10)))
    print("nested", Parallel(n_jobs=2)(delayed(inner)(i) for i in range(5)))
    with parallel_config(backend="threading", n_jobs=2):
        print("config", Parallel()(delayed(pow)(i, 2) for i in range(5)))
    gen = Parallel(n_jobs=2, return_as="generator")(delayed(sqrt)(i) for i in (4, 9, 16))
    print("generator", type(gen).__name__, list(gen))
    unordered = Parallel(n_jobs=2, return_as="generator_unordered")(delayed(sqrt)(i) for i in (4, 9, 16))
    print("unordered", sorted(unordered))
    try:
        Parallel(n_jobs=2)(delayed(fail_on)(i, 3) for i in range(8))
    except ValueError as exc:
        print("error", type(exc).__name__, exc)
    try:
        Parallel(n_jobs=2, timeout=0.5)(delayed(slow)(s) for s in (0.0, 30.0))
    except multiprocessing.TimeoutError as exc:
        print("timeout", isinstance(exc, multiprocessing.TimeoutError))
    with Parallel(n_jobs=2) as parallel:
        print("reused", parallel(delayed(abs)(-i) for i in range(3)), parallel(delayed(abs)(i) for i in range(3)))
    sys.stdout.flush()
    Parallel(n_jobs=2)(delayed(fail_on)(i, 1) for i in range(3))  # uncaught: the traceback ends the program
