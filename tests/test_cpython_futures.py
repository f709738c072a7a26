"""CPython's own process-pool tests of concurrent.futures, run against MemmapExecutor.

The runner is ``tests/cpython_futures.py`` (see its docstring: it finds an
interpreter whose standard library still has ``test.test_concurrent_futures``
and, if needed, prepares a venv for it under ``.cache/``). The same selection
runs first against ``ProcessPoolExecutor`` as a baseline, so a runner that
silently selected nothing, or a suite that fails on this machine anyway,
shows up as such.

The runner's ``--inject sitecustomize`` mode runs the same selection with the
class injected into every child interpreter by a ``sitecustomize`` (as a
user would install it) instead of rewritten child scripts.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpython_futures.py")
SKIP_EXIT = 77
SUMMARY = re.compile(r"^cpython_futures: python=\S+ class=(\S+) .*$", re.M)


@functools.cache
def _run(spec: str, inject: str = "rewrite") -> dict[str, int]:
    proc = subprocess.run(
        [sys.executable, RUNNER, spec, "--inject", inject, "--timeout", "400"],
        capture_output=True,
        text=True,
        timeout=500,
    )
    if proc.returncode == SKIP_EXIT:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    match = SUMMARY.search(proc.stdout)
    assert match, f"no summary line (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert f" inject={inject} " in match.group(0)
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


@pytest.mark.slow
@pytest.mark.timeout(1100)
def test_cpython_process_pool_suite_passes_with_memmap_executor_injected_by_sitecustomize() -> None:
    """The same, with child scripts run as written and MemmapExecutor installed by a sitecustomize everywhere.

    The baseline is the rewrite mode's: the stdlib class skips test_hang_gh83386 there, as the injected
    class does here (the test skips whatever class is concurrent.futures.ProcessPoolExecutor).
    """
    baseline = _run(BASELINE)
    ours = _run("mmexec:MemmapExecutor", "sitecustomize")
    assert ours["ran"] == baseline["ran"]
    assert ours["excluded"] == baseline["excluded"]
    assert ours["expected_failures"] == 0
    assert ours["passed"] >= baseline["passed"]


def _runner_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("_cpython_futures_runner", RUNNER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_injected_sitecustomize_installs_the_class_after_the_one_it_shadows(tmp_path: Path) -> None:
    """The runner's sitecustomize: chained to a shadowed one, installed in both modules, its folder removed."""
    runner = _runner_module()
    shadowed = "import concurrent.futures\nSEEN = 'ProcessPoolExecutor' in vars(concurrent.futures)\n"
    (tmp_path / "sitecustomize.py").write_text(shadowed)
    probe = (
        "import sys, threading, concurrent.futures as f, concurrent.futures.process as p, sitecustomize as s;"
        "from concurrent.futures import MemmapExecutor as m;"
        "print(f.ProcessPoolExecutor.__module__, f.ProcessPoolExecutor is p.ProcessPoolExecutor is m,"
        " s.INJECTED_SPEC, s.CHAINED.SEEN, threading.active_count())"
    )
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tmp_path)
    try:
        with runner.injected_sitecustomize("mmexec:MemmapExecutor") as site:
            env = site.env()
            proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
            folder = site.folder
    finally:
        if env_before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = env_before
    assert env["PYTHONPATH"].split(os.pathsep) == [folder, str(tmp_path)]
    assert (proc.returncode, proc.stderr) == (0, "")
    # The shadowed sitecustomize ran first (before the class was installed); importing mmexec starts no thread.
    assert proc.stdout.split() == ["mmexec._executor", "True", "mmexec:MemmapExecutor", "False", "1"]
    assert not os.path.exists(folder)
