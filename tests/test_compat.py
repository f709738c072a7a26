"""Each private name of another library that mmexec reads (all in mmexec/_compat.py) still means what it did.

A supported Python, loky or numpy that renames or changes one fails here, by name, instead of changing
mmexec's behaviour quietly. And mmexec reads no other library's private name anywhere else.
"""

from __future__ import annotations

import ast
import mmap
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mmexec import _compat

PACKAGE = Path(_compat.__file__).parent
#: Private names of other libraries read in mmexec/_compat.py (attribute names starting with one underscore).
READ_IN_COMPAT = {"_register_atexit", "_RemoteTraceback", "_mmap", "_getframe", "_forkserver", "_preload_modules",
                  "_concrete_contexts"}
#: Names that start with an underscore but are documented public API.
DOCUMENTED = {"_exit"}  # os._exit


def test_register_exit_hook_is_threadings_own_and_runs_before_atexit_handlers(tmp_path):
    """threading._register_atexit exists, and a hook registered through it runs before atexit handlers."""
    import subprocess

    assert callable(threading._register_atexit)  # type: ignore[attr-defined]
    script = tmp_path / "order.py"
    script.write_text(
        "import atexit\nfrom mmexec._compat import register_exit_hook\n"
        "atexit.register(lambda: print('atexit'))\nregister_exit_hook(lambda: print('hook'))\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["hook", "atexit"], out.stderr


def test_register_child_exit_hook_runs_as_a_multiprocessing_child_ends(tmp_path):
    """multiprocessing.util.Finalize(None, hook, exitpriority=...): the hook runs as a child process ends,
    before the child joins a process of its own that only the hook lets end."""
    import subprocess

    script = tmp_path / "child.py"
    script.write_text(
        "import multiprocessing as mp, os\nfrom mmexec._compat import register_child_exit_hook\n"
        "def grandchild(r):\n    r.recv_bytes()\n"
        "def child(path):\n    r, w = mp.Pipe(False)\n    mp.Process(target=grandchild, args=(r,)).start()\n"
        "    def hook():\n        open(path, 'w').close()\n        w.send_bytes(b'go')\n"
        "    register_child_exit_hook(hook)\n"
        "if __name__ == '__main__':\n    p = mp.get_context('spawn').Process(target=child, args=(os.environ['OUT'],))\n"
        "    p.start(); p.join(60); print(p.exitcode)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OUT": str(tmp_path / "ran")})
    assert out.stdout.split() == ["0"], out.stderr
    assert (tmp_path / "ran").exists()


def test_remote_traceback_is_the_stdlibs_cause_class():
    """concurrent.futures.process._RemoteTraceback: an Exception whose str() is the text it was given."""
    from concurrent.futures import process

    assert _compat.RemoteTraceback is process._RemoteTraceback
    assert issubclass(_compat.RemoteTraceback, Exception)
    assert str(_compat.RemoteTraceback("the worker's traceback")) == "the worker's traceback"


def test_mmap_of_finds_the_map_of_a_memmap_and_of_its_views(tmp_path):
    """numpy.memmap._mmap: the mmap of an np.memmap (shared by its slices), None for plain arrays."""
    mm = np.memmap(tmp_path / "f", dtype=np.uint8, mode="w+", shape=(8192,))
    assert isinstance(_compat.mmap_of(mm), mmap.mmap)
    assert _compat.mmap_of(mm[10:20]) is _compat.mmap_of(mm)
    assert _compat.mmap_of(np.zeros(3)) is None
    del mm


def test_caller_frame_walks_up_the_stack():
    """sys._getframe: caller_frame(0) is the caller's own frame, caller_frame(1) its caller's."""

    def inner():
        return _compat.caller_frame(0), _compat.caller_frame(1)

    here, above = inner()
    assert here.f_code.co_name == "inner" and above.f_code.co_name == "test_caller_frame_walks_up_the_stack"


def test_forkserver_preload_reads_what_set_forkserver_preload_set():
    """multiprocessing.forkserver._forkserver._preload_modules: the modules given to set_forkserver_preload."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no forkserver here")
    ctx = multiprocessing.get_context("forkserver")
    before = _compat.forkserver_preload()
    try:
        ctx.set_forkserver_preload([*before, "json"])
        assert _compat.forkserver_preload()[-1] == "json"
    finally:
        ctx.set_forkserver_preload(before or ["__main__"])


def _private_attributes(path: Path) -> set[str]:
    """Attribute names starting with a single underscore read on something other than self/cls/a module of ours."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls", "core", "worker", "spare", "record",
                                                            "exc", "item", "store", "owner", "side"):
                continue
            names.add(node.attr)
    return names


def test_no_other_module_reads_another_librarys_private_names():
    """Outside _compat, mmexec's modules read no private attribute of the standard library, loky or numpy."""
    own: set[str] = set(DOCUMENTED)
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # mmexec's own private names: defined somewhere in the package
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_"):
                own.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in ast.walk(node):
                    if isinstance(target, ast.Attribute) and target.attr.startswith("_"):
                        own.add(target.attr)
                    elif isinstance(target, ast.Name) and target.id.startswith("_"):
                        own.add(target.id)
    foreign = {}
    for path in PACKAGE.glob("*.py"):
        if path.name == "_compat.py":
            assert _private_attributes(path) - own <= READ_IN_COMPAT
            continue
        extra = _private_attributes(path) - own
        if extra:
            foreign[path.name] = sorted(extra)
    assert foreign == {}


JOBLIB_BESIDE_MMEXEC = """
import sys, importlib
import numpy as np
first, second = sys.argv[1:3]
importlib.import_module(first)
importlib.import_module(second)
import joblib, mmexec, loky
from mmexec import _pool

def total(a, i):
    return float(a[i].sum())

if __name__ == "__main__":
    X = np.random.rand(2_000, 200)  # 3.2 MB: joblib's default backend maps it
    for _ in range(2):
        assert joblib.Parallel(n_jobs=2)(joblib.delayed(total)(X, i) for i in range(40))[3] == float(X[3].sum())
    with mmexec.MemmapExecutor(2) as ex:
        assert ex.submit(total, X, 5).result() == float(X[5].sum())
    from multiprocessing import context
    print("joblib's context kept:", type(context._concrete_contexts["loky"]).__module__.startswith("joblib."))
    print("mmexec's context is loky's:", _pool.loky_context() is loky.backend.context.ctx_loky)
"""


@pytest.mark.parametrize("first, second", [("joblib", "mmexec"), ("mmexec", "joblib")])
def test_importing_mmexec_beside_joblib_leaves_each_its_own_loky_context(tmp_path, first, second):
    """loky registers its 'loky' context in multiprocessing's registry when imported, replacing the one of
    joblib's vendored copy: joblib's next executor then spawned workers that talked to the other copy's
    resource tracker (KeyError tracebacks on stderr, files left to the tracker at exit). mmexec keeps
    joblib's entry, and takes its own context from loky directly."""
    script = tmp_path / "both.py"
    script.write_text(JOBLIB_BESIDE_MMEXEC)
    out = subprocess.run([sys.executable, str(script), first, second], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "KeyError" not in out.stderr and "leaked" not in out.stderr, out.stderr[-3000:]
    assert "joblib's context kept: True" in out.stdout, out.stdout
    assert "mmexec's context is loky's: True" in out.stdout, out.stdout
