"""Cold start: a fresh process's first executor (or Parallel call), up to its first trivial result.

Each round starts a new interpreter (``bench/_cold.py``) that imports numpy
and the contender's library, then times only the first executor's start and
first result (``go`` -> ``done`` over a pipe). ProcessPoolExecutor runs with
each start method: ``fork`` (Linux's default before 3.14), ``forkserver``
(3.14's default) and ``spawn``; mmexec's target is at most 2x ``forkserver``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ["ppe-fork", "ppe-forkserver", "ppe-spawn", "loky", "joblib", "mmexec", "mmexec-Parallel"]
LABELS = {
    "ppe-fork": "ProcessPoolExecutor (fork)",
    "ppe-forkserver": "ProcessPoolExecutor (forkserver)",
    "ppe-spawn": "ProcessPoolExecutor (spawn)",
    "loky": "loky",
    "joblib": "joblib.Parallel",
    "mmexec": "MemmapExecutor",
    "mmexec-Parallel": "mmexec.Parallel",
}
ROUNDS = 7


class _Process:
    """The fresh interpreter of one round."""

    def __init__(self, contender: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench._cold", contender], cwd=ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def go(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"

    def end(self) -> None:
        assert self.proc.stdin is not None
        with self.proc:  # (closes the pipes)
            self.proc.stdin.write("exit\n")
            self.proc.stdin.flush()
            assert self.proc.wait(timeout=120) == 0


@pytest.mark.parametrize("contender", CONTENDERS)
def test_cold_start(benchmark: Any, contender: str) -> None:
    rounds: list[_Process] = []

    def setup() -> tuple[tuple[_Process], dict[str, Any]]:
        if rounds:  # the previous round's process ends before this one starts
            rounds[-1].end()
        rounds.append(_Process(contender))
        return (rounds[-1],), {}

    benchmark.extra_info.update(workload="cold", contender=contender, label=LABELS[contender], workers=2)
    try:
        benchmark.pedantic(_Process.go, setup=setup, rounds=ROUNDS, warmup_rounds=0)
    finally:
        if rounds:
            rounds[-1].end()
