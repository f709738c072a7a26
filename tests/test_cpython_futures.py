"""CPython's own process-pool tests of concurrent.futures, run against MemmapExecutor.

The runner is ``tests/cpython_futures.py`` (see its docstring: it finds an
interpreter whose standard library still has ``test.test_concurrent_futures``
and, if needed, prepares a venv for it under ``.cache/``). The same selection
runs first against ``ProcessPoolExecutor`` as a baseline, so a runner that
silently selected nothing, or a suite that fails on this machine anyway,
shows up as such.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import pytest

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpython_futures.py")
SKIP_EXIT = 77
SUMMARY = re.compile(r"^cpython_futures: python=\S+ class=(\S+) .*$", re.M)


@functools.cache
def _run(spec: str) -> dict[str, int]:
    proc = subprocess.run(
        [sys.executable, RUNNER, spec, "--timeout", "400"],
        capture_output=True,
        text=True,
        timeout=500,
    )
    if proc.returncode == SKIP_EXIT:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    match = SUMMARY.search(proc.stdout)
    assert match, f"no summary line (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    counts = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)(?=\s|$)", match.group(0))}
    assert proc.returncode == 0 and counts["failures"] == counts["errors"] == 0, proc.stderr[-8000:]
    return counts


BASELINE = "concurrent.futures:ProcessPoolExecutor"


# Two tests, each under pytest's faulthandler_timeout; the second reuses the first's run.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpython_process_pool_suite_passes_on_the_stdlib_class():
    """Baseline: the selection is not empty and passes on ProcessPoolExecutor on this machine."""
    assert _run(BASELINE)["ran"] >= 40


@pytest.mark.slow
@pytest.mark.timeout(1100)
def test_cpython_process_pool_suite_passes_on_memmap_executor():
    """The same tests pass on MemmapExecutor, minus the listed exclusions, with no known bug tolerated."""
    baseline = _run(BASELINE)
    ours = _run("mmexec:MemmapExecutor")
    assert ours["ran"] == baseline["ran"]
    assert ours["excluded"] == baseline["excluded"]
    assert ours["expected_failures"] == 0
    assert ours["passed"] >= baseline["passed"]
