"""The chaos loop (tests/programs/chaos.py): 8 threads submit, mutate and shut down at random over 10,000
tasks while workers are killed at random; every answer is checked, and descriptors, /dev/shm and RSS too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

PROGRAM = os.path.join(os.path.dirname(__file__), "programs", "chaos.py")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_chaos_loop_gives_no_wrong_answer_and_leaks_nothing():
    proc = subprocess.run([sys.executable, PROGRAM, "10000", "0"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-5000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["tasks"] >= 9_900 and seen["wrong"] == 0, seen
    assert seen["killed"] >= 1 and set(seen["failures"]) <= {"TerminatedWorkerError", "BrokenProcessPool",
                                                               "CancelledError", "RuntimeError"}, seen
    before, after = seen["before"], seen["after"]
    assert after["fds"] <= before["fds"] + 2, seen
    assert [n for n in after["shm"] if n not in before["shm"]] == [], seen
    assert after["rss"] - before["rss"] < 300 * 2**20, seen
    # once the process has exited, nothing of it is left: no folder, no loky semaphore of its pools (loky's
    # resource tracker, which outlives it by a moment, unlinks those)
    prefixes = (f"mmexec-{seen['pid']}-", f"sem.loky-{seen['pid']}-")
    deadline = time.monotonic() + 30
    while (left := [n for n in os.listdir("/dev/shm") if n.startswith(prefixes)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], left
