"""What importing mmexec and starting a worker costs, and the exit hook registered at import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _tasks import run_script


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; before = set(sys.modules); {statement}; print(' '.join(sorted(set(sys.modules) - before)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


def test_import_mmexec_imports_neither_numpy_nor_the_executor():
    """The package is lazy (PEP 562): names are imported on first use."""
    loaded = _modules_after("import mmexec")
    assert "mmexec._exit" in loaded
    assert not {"numpy", "mmexec._executor", "mmexec._parallel", "distributed"} & loaded


def test_a_worker_starts_without_importing_numpy():
    """A worker process runs ``mmexec._bootstrap.serve``, whose module needs only the standard library: a
    worker imports numpy with its first call, not while it starts."""
    loaded = _modules_after("from mmexec._bootstrap import serve")
    assert "mmexec._bootstrap" in loaded and not {"numpy", "mmexec._worker"} & loaded
    import mmexec
    from mmexec._bootstrap import serve

    with mmexec.MemmapExecutor(1) as ex:
        assert ex.submit(abs, -1).result(timeout=60) == 1
        assert all(type(p).__name__ == "LokyProcess" for p in ex.workers().values())  # (loky starts them)
        assert serve.__module__ == "mmexec._bootstrap"


ATEXIT_SCRIPT = """
import atexit
{imports}

def late_submit():
    try:
        {cls}(1).submit(abs, -1)
    except RuntimeError as exc:
        print("refused:", exc)
    else:
        print("accepted")

atexit.register(late_submit)
"""


@pytest.mark.parametrize(
    ("imports", "cls"),
    [
        ("from concurrent.futures import ProcessPoolExecutor", "ProcessPoolExecutor"),
        ("import mmexec", "mmexec.MemmapExecutor"),  # first use of the name inside the handler
        ("from mmexec import MemmapExecutor", "MemmapExecutor"),
    ],
)
def test_submit_from_an_atexit_handler_is_refused_as_in_the_stdlib(tmp_path, imports, cls):
    """The exit hook is registered when mmexec is imported, so every atexit handler registered later (before
    any task ran) sees the interpreter exiting."""
    proc = run_script(tmp_path, ATEXIT_SCRIPT.format(imports=imports, cls=cls), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "refused: cannot schedule new futures after interpreter shutdown", proc.stderr
