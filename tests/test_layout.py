"""The package's layout: imports flow one way, in the order the data travels, as the docs draw it."""

from __future__ import annotations

import json
import subprocess
import sys

import mmexec

#: The private modules in the order the data travels (caller -> reducer -> store -> pool -> worker), utilities
#: first: each may import, at its top, only modules before it (a later one only inside a function, lazily).
ORDER = [
    "_errors", "_compat", "_records", "_wire", "_options", "_exit", "_housekeeper",  # utilities
    "_tempfolder", "_memmap", "_dirty", "_spares", "_files", "_store",  # arrays <-> files, and who holds them
    "_pickler",  # the reducer: calls out, results in
    "_bootstrap", "_worker",  # the worker process
    "_pool",  # worker processes and the warm pool
    "_base", "_core", "_manager", "_executor",  # the executor: caller side, feeder, manager, public class
    "_parallel", "_joblib", "_dask", "_procmem",  # above it
]

CHECK = """
import builtins, importlib, json, sys
order = json.loads(sys.argv[1])
bad = {}
real_import = builtins.__import__
import mmexec  # (the package imports a few modules eagerly, unchecked: they are checked on their own)
eager = {m for m in sys.modules if m.startswith("mmexec.")}
for i, name in enumerate(order):
    later = {"mmexec." + m for m in order[i + 1:]}
    for mod in [m for m in sys.modules if m.startswith("mmexec.") and (m not in eager or m == "mmexec." + name)]:
        del sys.modules[mod]
    importing = [True]
    def guard(what, globals=None, locals=None, fromlist=(), level=0, __later=later, __name=name):
        package = (globals or {}).get("__package__") or ""
        full = what if not level else (package + "." + what if what else package)
        targets = {full} | {full + "." + f for f in fromlist or ()}
        importer = (globals or {}).get("__name__")
        hit = (targets & __later) if importing[0] and importer == "mmexec." + __name else set()
        if hit:
            raise ImportError(f"mmexec.{__name} imports {sorted(hit)} at its top")
        return real_import(what, globals, locals, fromlist, level)
    builtins.__import__ = guard
    try:
        importlib.import_module("mmexec." + name)
    except ImportError as exc:
        bad[name] = str(exc)
    finally:
        builtins.__import__ = real_import
print(json.dumps(bad))
"""


def test_every_private_module_is_in_the_order():
    """The layout list names every private module of the package, once."""
    import pkgutil

    modules = {m.name for m in pkgutil.iter_modules(mmexec.__path__) if m.name.startswith("_")} - {"__main__"}
    assert sorted(ORDER) == sorted(modules)


def test_imports_flow_one_way():
    """Each private module imports, at its top, only the modules before it in ORDER."""
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(ORDER)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


def test_the_docs_name_the_modules_in_that_order():
    """The diagram atop _executor and the layout in docs/architecture.md name the modules that exist."""
    import re
    from pathlib import Path

    architecture = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`mmexec/(_[a-z_]+)\.py`", architecture))
    assert named and named <= set(ORDER), named - set(ORDER)
    from mmexec import _executor

    doc = _executor.__doc__ or ""
    for module in ("_pickler", "_store", "_pool", "_core", "_manager", "_worker", "_bootstrap", "_wire"):
        assert module in doc, module
