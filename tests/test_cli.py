"""The command line: ``mmexec`` (console script) and ``python -m mmexec``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mmexec

SCRIPT = os.path.join(os.path.dirname(sys.executable), "mmexec")


def _run(*args: str, script: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [SCRIPT, *args] if script else [sys.executable, "-m", "mmexec", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_help_is_plain_text_and_names_the_program():
    """--help shows plain text (no reST markup); the console script calls itself mmexec."""
    out = _run("--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m mmexec")
    assert "``" not in out.stdout and ":class:" not in out.stdout
    if not os.path.exists(SCRIPT):
        pytest.skip("the console script is not installed next to this interpreter")
    out = _run("--help", script=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: mmexec ")


def test_version():
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"mmexec {mmexec.__version__}"


@pytest.mark.parametrize(
    "option,value", [("--workers", "0"), ("--size-mb", "-5"), ("--tasks", "0"), ("--size-mb", "0")]
)
def test_values_that_mean_no_work_are_one_line_errors(option, value):
    """No traceback, no "2.1x faster" for no work: one line naming the option, exit status 2."""
    out = _run("demo", option, value)
    assert out.returncode == 2 and out.stdout == ""
    expected = f"python -m mmexec demo: error: {option} must be at least 1, got {value}"
    assert out.stderr.strip().splitlines() == [expected]


@pytest.mark.parametrize(
    ("argv", "usage"),
    [(["--bogus"], "usage: python -m mmexec [-h]"), (["demo", "--bogus"], "usage: python -m mmexec demo [-h]"),
     (["--bogus", "demo"], "usage: python -m mmexec demo [-h]")],
)
def test_an_unknown_flag_is_named_with_the_usage_of_its_command(argv, usage):
    """Each CLI error names the bad flag, with the usage of the (sub)command it was given to."""
    proc = subprocess.run([sys.executable, "-m", "mmexec", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unrecognized arguments: --bogus" in proc.stderr, proc.stderr
    assert proc.stderr.startswith(usage), proc.stderr
