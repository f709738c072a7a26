"""Run joblib's own tests of its public parallel API against mmexec, with only the imports changed.

Usage::

    python tests/joblib_suite.py [-k EXPR] [-v] [--list-failures] [--list-excluded] [--keep]

Nothing of joblib's is in this repository: at run time, the installed joblib's ``test_parallel.py``
and ``test_config.py`` are copied to a temporary directory, rewritten, and run there by pytest in a
subprocess with a generated ``pytest.ini`` (none of the repository's settings, such as
``filterwarnings = error``; a :data:`PER_TEST_TIMEOUT` timeout per test). Their helpers
(``joblib.test.common``, ``joblib.testing``) stay joblib's; its ``conftest.py`` is not needed.

The rewrite: each import of a :data:`PUBLIC` name from ``joblib`` or ``joblib.parallel`` (statements,
and lines of the scripts tests run in child interpreters) is split into an import of those names from
``mmexec`` and one of the rest from joblib; ``joblib.X``, ``joblib.parallel.X`` and ``parallel.X``
become ``X`` in code. A public name that mmexec lacks comes from a generated ``_mmexec_missing``: its
stub raises ``NotImplementedError("mmexec lacks X")`` when a function calls it and returns None when
module-level code does (joblib calls some at import), so the module still imports, in workers too.

Selection: a test function is excluded, all its parametrized ids, when its body, its decorators, or the
module-level functions, classes and variables they name (transitively, with the conditions of a
module-level ``if`` that binds them) refer, statically (``ast``), to:

* a name imported from a joblib module with a private part in its dotted path
  (``joblib._parallel_backends.ThreadingBackend``) or from ``joblib.externals`` (its vendored loky);
* a non-public name imported from ``joblib.parallel`` (``BACKENDS``, ``DEFAULT_BACKEND``...), except
  ``mp``: joblib's ``mp`` is the standard library's ``multiprocessing`` (None where joblib disabled
  it), and the tests use it as such (``mp.Manager()``, ``mp.get_context()``, ``if mp is None``);
* ``joblib.X`` for an X outside ``joblib.__all__``, ``parallel.X`` (the module) for a non-public X;
* a private attribute ``obj._x`` (``p._backend``), or a private method defined in a class (``_print``).

The values of a ``parametrize`` are the exception: there, joblib's backend registries (``BACKENDS``,
``DEFAULT_BACKEND``..., and lists built from them such as ``ALL_VALID_BACKENDS``) and backend classes
(``ThreadingBackend()``) do not exclude the test. Its ids are sorted at collection instead, by the
generated ``conftest.py``: an id whose parameters (``item.callspec.params``) include an instance or a
subclass of joblib's ``ParallelBackendBase`` is excluded ("passes a joblib backend object"); the others
(backend names such as ``"loky"``, ``None``, a ``multiprocessing`` context) run.

``--list-excluded`` prints each test with excluded ids, their number and the reasons.
``--list-failures`` prints each failing id and its error's summary line.

:data:`DELIBERATE` lists the tests that fail because of a difference kept by design (each is in the
docs/differences.md ("Differences from joblib") with its reason). The last line printed is a summary (skipped
counts xfailed, failed counts errors, ``deliberate`` the failures listed there); the exit status is 0
when every failure is listed there and every listed test failed, 1 otherwise (a new failure, or a
listed difference that is gone), 2 when pytest could not run the suite::

    joblib_suite: joblib=1.6.0 selected=N passed=P failed=F skipped=S excluded=E deliberate=D unexpected=U
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import joblib  # noqa: E402

import mmexec  # noqa: E402

PUBLIC = ("Parallel", "delayed", "parallel_config", "parallel_backend", "cpu_count", "effective_n_jobs",
          "register_parallel_backend")  # fmt: skip
FILES = ("test_parallel.py", "test_config.py")
STDLIB_ALIASES = ("joblib._multiprocessing_helpers.mp", "joblib.parallel.mp")
PER_TEST_TIMEOUT, TOTAL_TIMEOUT = 60, 3600  # seconds
#: Failing test ids (as "file::test[params]") that are differences kept by design, and why.
DELIBERATE = {
    "test_parallel.py::test_nested_parallel_warnings[multiprocessing-loky-True]":
        "'multiprocessing' runs on mmexec's workers (loky processes), where a nested loky Parallel works",
    "test_config.py::test_threadpool_limitation_in_child_context_error[parallel_config-multiprocessing]":
        "'multiprocessing' runs on mmexec's workers (loky processes), which take inner_max_num_threads",
    "test_config.py::test_threadpool_limitation_in_child_context_error[parallel_backend-multiprocessing]":
        "'multiprocessing' runs on mmexec's workers (loky processes), which take inner_max_num_threads",
}
MISSING_MODULE = """import sys  # public joblib names that mmexec lacks (written by tests/joblib_suite.py)
def _stub(name):
    def stub(*args, **kwargs):
        if sys._getframe(1).f_code.co_name != "<module>":  # import-time calls return None: the module imports
            raise NotImplementedError(f"mmexec lacks {name}")
    stub.__name__ = stub.__qualname__ = name  # test ids as with joblib's (parallel_backend, not stub)
    return stub
"""
CONFTEST = """import json, pathlib, pytest
from joblib._parallel_backends import ParallelBackendBase
HERE = pathlib.Path(__file__).parent
EXCLUDED = json.loads((HERE / "excluded.json").read_text())
def backend_object(value):
    return isinstance(value, ParallelBackendBase) or isinstance(value, type) and issubclass(value, ParallelBackendBase)
def reason(item):
    if item.originalname in EXCLUDED.get(item.path.name, ()):
        return "; ".join(EXCLUDED[item.path.name][item.originalname])
    if any(map(backend_object, getattr(getattr(item, "callspec", None), "params", {}).values())):
        return "passes a joblib backend object"
@pytest.hookimpl(tryfirst=True)  # before -k, so that excluded_ids.json lists them all
def pytest_collection_modifyitems(config, items):
    why = {item.nodeid: reason(item) for item in items if reason(item)}
    (HERE / "excluded_ids.json").write_text(json.dumps(why))
    out = [item for item in items if item.nodeid in why]
    config.hook.pytest_deselected(items=out)
    items[:] = [item for item in items if item not in out]
"""
PYTEST_INI = f"[pytest]\ntimeout = {PER_TEST_TIMEOUT}\nmarkers =\n    thread_unsafe: joblib's\n    no_cover: joblib's\n"
MODULES = ("joblib", "joblib.parallel", "parallel")  # parallel: the joblib.parallel module, as the tests import it
BACKEND_VALUES = re.compile(r"joblib\.(parallel\.[A-Z_]*BACKENDS?|_parallel_backends\.\w*Backend(Base)?)$")
STRING_IMPORT = re.compile(r"^([ \t]*)from (joblib(?:\.parallel)?) import ([\w, ]+)$", re.M)


def _split_import(indent: str, module: str, names: list[tuple[str, str | None]]) -> list[str]:
    """``from <module> import <names>``, the public names imported from mmexec instead."""
    groups: dict[str, list[str]] = {"mmexec": [], "_mmexec_missing": [], module: []}
    for name, asname in names:
        where = module if name not in PUBLIC else "mmexec" if hasattr(mmexec, name) else "_mmexec_missing"
        groups[where].append(f"{name} as {asname}" if asname else name)
    note = {"_mmexec_missing": "  # MISSING from mmexec: stubs that raise NotImplementedError"}
    return [f"{indent}from {m} import {', '.join(n)}{note.get(m, '')}" for m, n in groups.items() if n]


def rewrite(source: str) -> str:
    lines = source.splitlines()
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.Attribute, ast.ImportFrom))]
    for node in sorted(nodes, key=lambda n: (n.lineno, n.col_offset), reverse=True):  # edits keep earlier positions
        if isinstance(node, ast.Attribute) and node.attr in PUBLIC and ast.unparse(node.value) in MODULES:
            line = lines[node.lineno - 1].encode()  # ast offsets count UTF-8 bytes
            line = line[: node.col_offset] + node.attr.encode() + line[node.end_col_offset :]
            lines[node.lineno - 1] = line.decode()
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES[:2] and not node.level:
            names = [(alias.name, alias.asname) for alias in node.names]
            if any(name in PUBLIC for name, _ in names):
                lines[node.lineno - 1 : node.end_lineno] = _split_import(" " * node.col_offset, node.module, names)

    def in_string(match: re.Match[str]) -> str:  # the scripts run in child interpreters
        names: list[tuple[str, str | None]] = [(n.strip(), None) for n in match.group(3).split(",") if n.strip()]
        return "\n".join(_split_import(match.group(1), match.group(2), names))

    return STRING_IMPORT.sub(in_string, "\n".join(lines) + "\n")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def _import_reasons(node: ast.Import | ast.ImportFrom) -> dict[str, str]:
    """Names an import binds to joblib internals -> the internal's dotted name."""
    found = {}
    for alias in node.names:
        if isinstance(node, ast.Import):  # only "import a.b as c" binds a module's own name
            bound, module, dotted = alias.asname, alias.name, alias.name
        else:
            module = ("joblib.test." if node.level else "") + (node.module or "")
            bound, dotted = alias.asname or alias.name, f"{module}.{alias.name}"
        parts = module.split(".")
        private = any(map(_private, parts)) or parts[:2] == ["joblib", "externals"]
        private |= module == "joblib.parallel" and dotted != module and alias.name not in PUBLIC
        if bound and parts[0] == "joblib" and private and dotted not in STDLIB_ALIASES:
            found[bound] = dotted
    return found


def _direct(node: ast.AST) -> tuple[set[str], set[str]]:
    """(the internals a statement refers to by itself, the free names it reads)."""
    reasons, names, local = set(), set(), set()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):  # its own names are not free
        local = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        local |= {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in local:
            names.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            owner = sub.value.id if isinstance(sub.value, ast.Name) and sub.value.id not in local else None
            if owner == "joblib" and sub.attr not in joblib.__all__ and not sub.attr.startswith("__"):
                reasons.add(f"joblib.{sub.attr}")
            elif owner == "parallel" and sub.attr not in PUBLIC:
                reasons.add(f"joblib.parallel.{sub.attr}")
            elif _private(sub.attr):
                reasons.add(f"private attribute .{sub.attr}")
        elif isinstance(sub, ast.ClassDef):
            reasons |= {f"defines private method {f.name}" for f in sub.body if _private(getattr(f, "name", ""))}
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            reasons |= set(_import_reasons(sub).values())
    return reasons, names


def _parts(test: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[list[ast.AST], list[ast.AST]]:
    """(a test's body, argument defaults and decorators, less its parametrize values; those values)."""
    body = copy.copy(test)
    body.decorator_list = []
    strict: list[ast.AST] = [body]
    values: list[ast.AST] = []
    for dec in test.decorator_list:
        if isinstance(dec, ast.Call) and ast.unparse(dec.func).split(".")[-1] == "parametrize":
            keywords = {k.arg: k.value for k in dec.keywords}
            value = dec.args[1] if len(dec.args) > 1 else keywords.get("argvalues")
            strict += [a for a in [dec.func, *dec.args, *keywords.values()] if a is not value]
            values += [value] if value is not None else []
        else:
            strict.append(dec)
    return strict, values


def excluded_tests(source: str) -> dict[str, list[str]]:
    """Test function -> its reasons, for the tests of a module that refer to joblib internals."""
    tree = ast.parse(source)
    internal: dict[str, str] = {}
    binds: dict[str, list[ast.AST]] = defaultdict(list)  # module-level name -> what binds or mutates it

    def visit(statements: list[ast.stmt], guards: list[ast.AST]) -> None:
        for st in statements:
            if isinstance(st, ast.If):
                visit(st.body + st.orelse, [*guards, st.test])
            elif isinstance(st, ast.Try):
                visit(st.body + [s for h in st.handlers for s in h.body] + st.orelse + st.finalbody, guards)
            elif isinstance(st, (ast.Import, ast.ImportFrom)):
                internal.update(_import_reasons(st))
            else:
                if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    bound = {st.name}
                elif isinstance(st, ast.Expr) and isinstance(st.value, ast.Call):  # X.append(...)
                    owner = getattr(st.value.func, "value", None)
                    bound = {owner.id} if isinstance(owner, ast.Name) else set()
                else:
                    bound = {n.id for n in ast.walk(st) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
                for name in bound:
                    binds[name] += [st, *guards]

    visit(tree.body, [])
    cache: dict[str, set[str]] = {}

    def resolve(name: str) -> set[str]:
        if name in internal:
            return {internal[name]}
        if name not in cache:
            cache[name] = found = set()  # a cycle adds nothing
            for node in binds.get(name, ()):
                reasons, names = _direct(node)
                found |= reasons.union(*map(resolve, names - {name}))
        return cache[name]

    def refers(node: ast.AST, values: bool) -> dict[str, str]:  # internal -> " (via NAME)" or ""
        direct, names = _direct(node)
        found = dict.fromkeys(direct, "")
        for name in sorted(names):
            for reason in resolve(name):
                found.setdefault(reason, "" if name in internal else f" (via {name})")
        return {r: via for r, via in found.items() if not (values and BACKEND_VALUES.match(r))}  # conftest sorts ids

    result = {}
    for st in tree.body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)) and st.name.startswith("test"):
            strict, values = _parts(st)
            reasons: dict[str, str] = {}
            for node, is_values in [(n, False) for n in strict] + [(n, True) for n in values]:
                for reason, via in refers(node, is_values).items():
                    reasons.setdefault(reason, via)
            if reasons:
                result[st.name] = sorted(reason + via for reason, via in reasons.items())
    return result


def prepare(folder: str) -> dict[str, dict[str, list[str]]]:
    """Write the rewritten tests and their harness to folder; return file -> excluded test -> reasons."""
    excluded = {}
    for name in FILES:
        source = Path(joblib.__file__).with_name("test").joinpath(name).read_text(encoding="utf-8")
        excluded[name] = excluded_tests(source)
        Path(folder, name).write_text(rewrite(source), encoding="utf-8")
    missing = "".join(f"{n} = _stub({n!r})\n" for n in PUBLIC if not hasattr(mmexec, n))
    generated = {"_mmexec_missing.py": MISSING_MODULE + missing, "conftest.py": CONFTEST, "pytest.ini": PYTEST_INI}
    for name, text in {**generated, "excluded.json": json.dumps(excluded)}.items():
        Path(folder, name).write_text(text, encoding="utf-8")
    return excluded


def run_pytest(folder: str, extra: list[str], verbose: bool) -> int:
    path = os.pathsep.join(filter(None, [REPO, folder, os.environ.get("PYTHONPATH")]))  # workers import tests too
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", folder, "-c", "pytest.ini"]
    with open(os.path.join(folder, "pytest.log"), "w") as log:
        output = {"stdout": None if verbose else log, "stderr": subprocess.STDOUT}
        env = dict(os.environ, PYTHONPATH=path)
        cmd += ["-v" if verbose else "-q", *extra, *FILES]
        proc = subprocess.Popen(cmd, cwd=folder, env=env, start_new_session=True, **output)  # type: ignore[call-overload]
        rc = -1  # pytest ran over TOTAL_TIMEOUT
        with contextlib.suppress(subprocess.TimeoutExpired):
            rc = proc.wait(TOTAL_TIMEOUT)
        deadline = time.monotonic() + 10  # pytest's process group (workers, managers) gets 10 s, then is killed
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline and os.killpg(proc.pid, 0) is None:
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, among the selected tests")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pytest's output as it runs")
    parser.add_argument("--list-failures", action="store_true", help="print each failing test and its error")
    parser.add_argument("--list-excluded", action="store_true", help="print the excluded tests and why; run none")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="joblib-suite-")
    try:
        excluded = prepare(folder)
        extra = ["--collect-only"] if args.list_excluded else ["--junitxml", "junit.xml"]
        rc = run_pytest(folder, extra + (["-k", args.keyword] if args.keyword else []), args.verbose)
        ids, junit = Path(folder, "excluded_ids.json"), Path(folder, "junit.xml")
        excluded_ids: dict[str, str] = json.loads(ids.read_text()) if ids.exists() else {}
        if args.list_excluded:  # the tests excluded whole, then those with ids passing backend objects
            per_test = Counter((nodeid.split("[")[0], why) for nodeid, why in excluded_ids.items())
            whole = [(f"{name}::{test}", "; ".join(r)) for name, tests in excluded.items() for test, r in tests.items()]
            for test, why in [*whole, *(key for key in per_test if key not in whole)]:
                print(f"{test} ({per_test[test, why]} ids): {why}")
            tests = {test for test, _ in [*whole, *per_test]}
            print(f"joblib_suite: excluded {len(excluded_ids)} ids of {len(tests)} tests")
            return 0 if excluded_ids else 2
        if rc not in (0, 1) or not junit.exists():
            log = Path(folder, "pytest.log").read_text()[-5000:]
            print(log, f"joblib_suite: pytest exited with status {rc}", file=sys.stderr)
            return 2
        counts = dict.fromkeys(["selected", "passed", "failed", "skipped"], 0)
        failed: set[str] = set()
        for case in ET.parse(junit).iter("testcase"):
            bad = [e for e in case if e.tag in ("failure", "error")]
            state = "failed" if bad else "skipped" if case.find("skipped") is not None else "passed"
            counts["selected"], counts[state] = counts["selected"] + 1, counts[state] + 1
            test_id = f"{case.get('classname')}.py::{case.get('name')}"
            if bad:
                failed.add(test_id)
            if bad and (args.list_failures or test_id not in DELIBERATE):  # the id, and the error's summary line
                message = ((bad[0].get("message") or bad[0].text or "").strip() + "\n").splitlines()[0][:300]
                print(f"FAILED {test_id}: {message}{'' if test_id in DELIBERATE else '  (unexpected)'}")
        gone = [] if args.keyword else sorted(set(DELIBERATE) - failed)
        for test_id in gone:
            print(f"PASSED {test_id}: listed as a deliberate difference ({DELIBERATE[test_id]}); update DELIBERATE")
        unexpected = len(failed - set(DELIBERATE)) + len(gone)
        summary = " ".join(f"{state}={n}" for state, n in counts.items())
        print(f"joblib_suite: joblib={joblib.__version__} {summary} excluded={len(excluded_ids)} "
              f"deliberate={len(failed & set(DELIBERATE))} unexpected={unexpected}")
        return 1 if unexpected else 0
    finally:
        if args.keep:
            print(f"joblib_suite: kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
