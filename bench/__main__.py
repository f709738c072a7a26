"""``python -m bench [pytest args]``: run every benchmark, then print the markdown table.

Writes ``bench/results/bench-<time>.json`` (pytest-benchmark's data) and
``bench-<time>.md`` (the table), and copies them to ``latest.json`` / ``latest.md``.
Extra arguments go to pytest, e.g. ``python -m bench -k "S1 and not ppe"``.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def pytest_command(json_path: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "pytest", "bench",
        "--benchmark-only",
        "-p", "no:cacheprovider",
        # pyproject.toml points pytest at tests/ with test_*.py files, a 120 s timeout and faulthandler dumps.
        "-o", "python_files=bench_*.py",
        "-o", "testpaths=bench",
        "-o", "timeout=1200",
        "-o", "faulthandler_timeout=0",
        f"--benchmark-json={json_path}",
        "--benchmark-group-by=group",
        "--benchmark-columns=median,min,max,rounds",
        "--benchmark-sort=name",
        "-q",
        *extra,
    ]  # fmt: skip


def main(argv: list[str]) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = RESULTS / f"bench-{stamp}.json"
    rc = subprocess.call(pytest_command(json_path, argv), cwd=ROOT)
    if not json_path.exists():
        print("pytest wrote no benchmark data", file=sys.stderr)
        return rc or 1
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report.main([str(json_path)])
    text = buf.getvalue()
    md_path = json_path.with_suffix(".md")
    md_path.write_text(text)
    shutil.copyfile(json_path, RESULTS / "latest.json")
    shutil.copyfile(md_path, RESULTS / "latest.md")
    print()
    print(text, end="")
    print(f"\n(data: {json_path.relative_to(ROOT)}, table: {md_path.relative_to(ROOT)})")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
