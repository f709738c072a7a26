"""Run CPython's own process-pool tests of concurrent.futures against any executor class.

Usage::

    python tests/cpython_futures.py [mmexec:MemmapExecutor] [-v]
    python tests/cpython_futures.py --class concurrent.futures:ProcessPoolExecutor   # baseline
    python tests/cpython_futures.py mmexec:MemmapExecutor --inject sitecustomize

The tests are not copied here: they are imported, at run time, from the
standard library of an installed interpreter (``test.test_concurrent_futures``,
a package from 3.12 on, a single module before). Many distributions strip the
``test`` package (this machine's 3.11 has no such module), so this script
looks for an interpreter that has it: the current one, ``--python``,
``$CPYTHON_FUTURES_PYTHON``, ``python3.N`` on ``PATH`` and pyenv's versions.
The tests must run under the interpreter whose stdlib holds them (they import
that version's ``test.support``). If that interpreter cannot import the
executor's module, a virtual environment made from it is created once under
``<repo>/.cache/cpython-futures/`` with the project's dependencies installed
and the repository put on its path (a ``.pth`` file: the code is always the
working tree's), and the script re-runs itself there.

What it runs: every test case class that mixes in one of the suite's
``ProcessPool*Mixin`` classes, with the mixins' ``executor_type`` replaced by
the given class (the tests build it as ``executor_type(max_workers=...,
mp_context=..., initializer=..., initargs=...)``), minus :data:`EXCLUDED`.
Only the ``spawn`` variant runs by default (``--contexts all`` runs fork and
forkserver too): the suite builds each process-pool test three times, once
per ``mp_context``, and an executor that ignores ``mp_context`` (as
MemmapExecutor does: loky starts its workers) would run the same test three
times. Tests listed in :data:`KNOWN_BUGS` for the class under test run as
expected failures, so fixing the bug turns the run red until the entry goes.

loky's reusable pool (MemmapExecutor's shared workers) outlives executors by
design; the suite assumes every pool dies with its executor in two places, so
the runner shuts that pool down there, as an exiting application would: at
each module's end (the teardown waits for multiprocessing's resource tracker,
whose pipe the workers hold), and before :data:`WHOLE_PROCESS_TRACKER_TESTS`
(which stop that tracker and expect it to hold only their own objects).

How child interpreters get the class (``--inject``). Some tests run a
script in a child interpreter (``assert_python_ok``) that imports the class
under test as ``from concurrent.futures import <executor_type.__name__>``.

``rewrite`` (the default): that import is rewritten in the script, to import
the class from its module (``_rewrite_script``). Nothing else changes.

``sitecustomize``: nothing is rewritten. The class is injected into every
interpreter of the run before that interpreter's own code runs, as a user's
``sitecustomize`` would do it. The runner writes :data:`SITECUSTOMIZE` into a
private temporary folder, puts that folder first on ``PYTHONPATH`` and re-runs
itself in a new process with it (always, so the test process itself starts
injected: the suite's ``futures.ProcessPoolExecutor`` is the class under test
there too), and removes the folder when that process ends. Every child
inherits ``PYTHONPATH``: ``assert_python_ok`` children, multiprocessing
spawn and forkserver children, resource trackers, loky's workers. The
sitecustomize

* first runs the ``sitecustomize`` it shadows, if one is further on
  ``sys.path`` (a venv's, a distribution's), as ``site`` would have;
* imports the class and stores it as ``concurrent.futures.ProcessPoolExecutor``
  and ``concurrent.futures.process.ProcessPoolExecutor``: a module global, so
  ``concurrent.futures``' lazy module ``__getattr__`` never replaces it by the
  standard library's class;
* also stores it as ``concurrent.futures.<its __name__>`` (the one step a
  user would not take): the suite's scripts import it by that name.

``site`` runs ``sitecustomize`` after the ``.pth`` files of site-packages, so
the venv's own set-up (its ``.pth`` putting the repository on ``sys.path``)
is untouched and already done. ``assert_python_ok`` starts its children with
``-I`` (which ignores ``PYTHONPATH``) unless the interpreter needs its
environment to run, which this run's does: the runner says so to
``test.support.script_helper`` (its cached ``interpreter_requires_environment``
answer), and the children run without ``-I``/``-E``. Before the tests, the
runner checks that the parent, an ``assert_python_ok`` child, a spawn child
and a worker of the class each see the class as ``ProcessPoolExecutor``, and
fails otherwise. In this mode the suite's own ``if self.executor_type ==
futures.ProcessPoolExecutor: skip`` (``test_hang_gh83386``) skips that test,
as it does for the standard library's class.

Exit status: 0 when the suite passed, 1 when it failed, 2 for usage errors,
and :data:`SKIP_EXIT` (with a ``SKIP: reason`` line) when no interpreter with
the tests and the executor's module could be found or prepared. The last
line printed is a summary that ``tests/test_cpython_futures.py`` parses::

    cpython_futures: python=3.13.0 class=mmexec:MemmapExecutor contexts=spawn inject=rewrite ran=.. ...
"""

from __future__ import annotations

import argparse
import faulthandler
import fcntl
import fnmatch
import functools
import gc
import glob
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

#: Exit status meaning "could not run here", with a "SKIP: reason" line.
SKIP_EXIT = 77
SUITE = "test.test_concurrent_futures"
CONTEXTS = ("fork", "forkserver", "spawn")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache", "cpython-futures")
#: Oldest interpreter the project supports (pyproject's requires-python).
MIN_VERSION = (3, 10)
#: Suite versions this file's exclusion list was checked against, tried first.
CHECKED_VERSIONS = ((3, 13), (3, 10))
#: Test classes outside the mixin scheme that exercise process pools only.
EXTRA_PROCESS_POOL_CLASSES = ("FailingInitializerResourcesTest",)

# Test id patterns (fnmatch, against ids such as
# "test.test_concurrent_futures.test_process_pool.ProcessPoolSpawnProcessPoolExecutorTest.test_saturation"
# or, for 3.10's single module, "test.test_concurrent_futures.ProcessPoolSpawnProcessPoolExecutorTest...")
# that are left out for every executor class, each with why. Allowed reasons:
# the test reads private attributes of the stdlib class, tests
# tests fork/forkserver-specific mp_context behaviour, or
# relies on CPython-internal process bookkeeping.
_PRIVATE = "private attribute: reads ProcessPoolExecutor's "
_INTERNAL = "CPython internals: "
EXCLUDED: dict[str, str] = {
    "*ProcessPoolShutdownTest.test_processes_terminate": (
        "warm pool: expects the workers to exit at shutdown(); mmexec keeps them warm for the next executor "
        "by design"
    ),
    "*ProcessPoolShutdownTest.test_context_manager_shutdown": (
        "warm pool: joins the workers in _processes after shutdown(), expecting them to exit; mmexec keeps "
        "them warm by design (with the class injected, the ProcessPoolExecutor the test builds is "
        "MemmapExecutor: the join waits for the idle timeout)"
    ),
    "*ProcessPoolShutdownTest.test_del_shutdown": (
        "warm pool: joins the workers of the ProcessPoolExecutor it builds (MemmapExecutor when injected) "
        "after shutdown, expecting them to exit; mmexec keeps them warm by design (it also joins the "
        "private _call_queue's feeder thread)"
    ),
    "*ProcessPoolShutdownTest.test_shutdown_no_wait": (
        "warm pool: as test_del_shutdown, after shutdown(wait=False)"
    ),
    "*ExecutorDeadlockTest.test_error_during_result_unpickle_in_result_handler": (
        "deliberate difference: a result that cannot be unpickled in the caller fails that one future "
        "with mmexec.ResultError and never breaks the pool (the stdlib raises BrokenProcessPool)"
    ),
    "*ExecutorDeadlockTest.test_exit_during_result_unpickle_in_result_handler": (
        "deliberate difference: as test_error_during_result_unpickle_in_result_handler (SystemExit while "
        "unpickling a result fails that future with mmexec.ResultError)"
    ),
}

# Failures of a given class that are real drop-in bugs, not yet fixed: they run
# as expected failures (an unexpected success fails the run: remove the entry).
KNOWN_BUGS: dict[str, dict[str, str]] = {
    "mmexec:MemmapExecutor": {},
}


# ---------------------------------------------------------------- run here
def load_class(spec: str) -> type:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"error: expected module:Class, got {spec!r}")
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise SystemExit(f"error: {spec} is not a class")
    return obj


def suite_modules() -> list:
    """The suite's modules: each test_* of the package (3.12+), or the single module."""
    pkg = importlib.import_module(SUITE)
    if not hasattr(pkg, "__path__"):
        return [pkg]
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("test_"))
    return [importlib.import_module(f"{SUITE}.{name}") for name in names]


def process_pool_mixins(modules: list) -> list[type]:
    """The ProcessPool{Fork,Forkserver,Spawn}Mixin classes, wherever the suite defines them."""
    found: dict[int, type] = {}
    candidates = [*modules, sys.modules.get(f"{SUITE}.util")]
    for mod in filter(None, candidates):
        for name, obj in vars(mod).items():
            if (
                isinstance(obj, type)
                and name.startswith("ProcessPool")
                and name.endswith("Mixin")
                and getattr(obj, "ctx", None) in CONTEXTS
            ):
                found[id(obj)] = obj
    return list(found.values())


def _rewrite_script(code: str, cls: type, spec: str) -> str:
    """Child scripts say ``from concurrent.futures import <executor_type.__name__>``: import ours."""
    module_name, _, attr = spec.partition(":")
    stdlib = f"from concurrent.futures import {cls.__name__}"
    if module_name == "concurrent.futures" or stdlib not in code:
        return code
    # gh-83386's script calls multiprocessing.set_start_method() without
    # importing multiprocessing (upstream only runs it for thread pools).
    ours = f"import multiprocessing; from {module_name} import {attr} as {cls.__name__}"
    return code.replace(stdlib, ours)


def patch_child_scripts(modules: list, cls: type, spec: str) -> None:
    for mod in modules:
        for name in ("assert_python_ok", "assert_python_failure"):
            original = vars(mod).get(name)
            if original is None:
                continue

            @functools.wraps(original)
            def wrapper(*args, __original=original, **kwargs):
                args = tuple(_rewrite_script(a, cls, spec) if isinstance(a, str) else a for a in args)
                return __original(*args, **kwargs)

            setattr(mod, name, wrapper)


#: ``--inject`` modes: how the class under test reaches child interpreters.
INJECT_MODES = ("rewrite", "sitecustomize")

#: The ``sitecustomize.py`` of ``--inject sitecustomize`` (formatted with the class spec).
SITECUSTOMIZE = '''# Written by tests/cpython_futures.py --inject sitecustomize for one run, in a private
# folder put first on PYTHONPATH, and removed with it at the end of the run.
"""Install {spec} as concurrent.futures.ProcessPoolExecutor, as a user's sitecustomize would."""

import importlib as _importlib
import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys
import traceback as _traceback

#: The class this interpreter runs as ProcessPoolExecutor (the runner checks it in its own process).
INJECTED_SPEC = {spec!r}
_HERE = _os.path.dirname(_os.path.abspath(__file__))


def _chain():
    """Run the sitecustomize this one shadows (a venv's, a distribution's), as site would have."""
    path = [entry for entry in _sys.path if _os.path.abspath(entry or _os.curdir) != _HERE]
    spec = _machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return None
    module = _util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:  # what site does with a failing sitecustomize: report it, go on
        print("Error in the shadowed sitecustomize " + repr(spec.origin) + ":", file=_sys.stderr)
        _traceback.print_exc()
    return module


def _install():
    module_name, _, attr = INJECTED_SPEC.partition(":")
    cls = _importlib.import_module(module_name)
    for part in attr.split("."):
        cls = getattr(cls, part)
    import concurrent.futures
    import concurrent.futures.process

    # A module global: concurrent.futures' lazy __getattr__ (which would import the
    # stdlib class and store it there) is never asked for this name again.
    concurrent.futures.ProcessPoolExecutor = cls
    concurrent.futures.process.ProcessPoolExecutor = cls
    # The suite's child scripts import the class under test by its own name
    # ("from concurrent.futures import {{executor_type.__name__}}"): export it as such too.
    if getattr(concurrent.futures, cls.__name__, cls) is not cls:
        raise RuntimeError("concurrent.futures already has another " + cls.__name__)
    setattr(concurrent.futures, cls.__name__, cls)
    return cls


CHAINED = _chain()  # first: the venv's or the distribution's set-up comes before ours
INJECTED = _install()
'''


class injected_sitecustomize:
    """A private folder holding :data:`SITECUSTOMIZE` for ``spec``; ``.env()`` puts it first on PYTHONPATH."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.folder = ""

    def __enter__(self) -> injected_sitecustomize:
        self.folder = tempfile.mkdtemp(prefix="cpython-futures-inject-")
        with open(os.path.join(self.folder, "sitecustomize.py"), "w", encoding="utf-8") as f:
            f.write(SITECUSTOMIZE.format(spec=self.spec))
        return self

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.folder, os.environ.get("PYTHONPATH")]))
        return env

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


#: Evaluated in each kind of child interpreter by :func:`check_injection`.
_INJECTED_PROBE = (
    "__import__('concurrent.futures').futures.ProcessPoolExecutor.__module__ + ':' + "
    "__import__('concurrent.futures').futures.ProcessPoolExecutor.__qualname__ + ' ' + "
    "getattr(__import__('sys').modules.get('sitecustomize'), 'INJECTED_SPEC', '-')"
)


def check_injection(cls: type, spec: str) -> str | None:
    """Make ``assert_python_ok`` keep PYTHONPATH, then say why the injection is not in effect, or None.

    The parent (this process), an ``assert_python_ok`` child, a multiprocessing
    ``spawn`` child and a worker of the class under test must each see the
    class as ``concurrent.futures.ProcessPoolExecutor``, installed by our
    sitecustomize before their own code ran.
    """
    import concurrent.futures
    import concurrent.futures.process
    import multiprocessing

    from test.support import script_helper

    site = sys.modules.get("sitecustomize")
    if getattr(site, "INJECTED_SPEC", None) != spec:
        return f"this process did not run the injected sitecustomize (it has {site!r}): run without --here"
    if not (concurrent.futures.ProcessPoolExecutor is cls is concurrent.futures.process.ProcessPoolExecutor):
        return f"concurrent.futures.ProcessPoolExecutor is {concurrent.futures.ProcessPoolExecutor!r} here"
    # assert_python_ok runs its children with -I (no PYTHONPATH, so no injection) unless the
    # interpreter "requires its environment": as this run's does (PYTHONPATH carries the set-up).
    flag = "__cached_interp_requires_environment"
    if flag not in vars(script_helper):
        return f"test.support.script_helper has no {flag}: cannot keep PYTHONPATH for its children"
    setattr(script_helper, flag, True)
    expected = f"{cls.__module__}:{cls.__qualname__} {spec}"
    seen = {"parent": eval(_INJECTED_PROBE)}
    _rc, out, _err = script_helper.assert_python_ok("-c", f"print({_INJECTED_PROBE})")
    seen["assert_python_ok child"] = out.decode().strip()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        seen["spawn child"] = pool.apply(eval, (_INJECTED_PROBE,))
    with cls(max_workers=1) as executor:
        seen["worker of the class"] = executor.submit(eval, _INJECTED_PROBE).result()
    _release_reusable_workers()
    wrong = {where: what for where, what in seen.items() if what != expected}
    return f"expected {expected!r}, saw {wrong}" if wrong else None


def _release_reusable_workers() -> None:
    """Stop the idle warm workers, if the class under test is mmexec's and keeps some.

    They are meant to outlive executors (a second executor starts warm), but
    the suite's module teardown (``multiprocessing.util._cleanup_tests``)
    stops multiprocessing's resource tracker and waits for it, and the
    workers hold its pipe open: it would wait until they time out. An
    application exiting does the same through mmexec's exit hook.
    """
    module = sys.modules.get("mmexec._pool")
    warm = getattr(module, "WARM", None)
    if warm is not None:
        warm.stop_all(wait=30.0)
        gc.collect()


def release_workers_at_module_end(modules: list) -> None:
    """Add :func:`_release_reusable_workers` as each module's last-added (first-run) cleanup."""
    for mod in modules:
        original = vars(mod).get("setUpModule")
        if original is None:
            continue

        @functools.wraps(original)
        def setup(__original=original):
            __original()
            unittest.addModuleCleanup(_release_reusable_workers)

        mod.setUpModule = setup


#: Tests that stop multiprocessing's resource tracker and expect it to hold only their own
#: objects: loky's reusable pool (alive by design between executors) is shut down first.
WHOLE_PROCESS_TRACKER_TESTS = ("FailingInitializerResourcesTest",)


def release_workers_before(modules: list) -> None:
    for mod in modules:
        for name in WHOLE_PROCESS_TRACKER_TESTS:
            cls = vars(mod).get(name)
            if cls is None:
                continue
            original = cls.setUp

            @functools.wraps(original)
            def setup(self, __original=original):
                _release_reusable_workers()
                __original(self)

            cls.setUp = setup


def iter_tests(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from iter_tests(item)
        else:
            yield item


def context_of(test: unittest.TestCase) -> str | None:
    ctx = getattr(type(test), "ctx", None)
    if ctx in CONTEXTS:
        return ctx
    method = test.id().rsplit(".", 1)[-1]  # FailingInitializerResourcesTest.test_spawn / test_forkserver
    return method[len("test_") :] if method[len("test_") :] in CONTEXTS else None


def select_tests(modules, mixins, contexts, patterns, known, keyword):
    """Process-pool tests of the chosen contexts: (suite, excluded [(id, reason)], known [(id, reason)])."""
    loader = unittest.TestLoader()
    selected, excluded, expected = [], [], []
    for mod in modules:
        for test in iter_tests(loader.loadTestsFromModule(mod)):
            cls = type(test)
            if not (issubclass(cls, tuple(mixins)) or cls.__name__ in EXTRA_PROCESS_POOL_CLASSES):
                continue
            if context_of(test) not in contexts:
                continue
            if keyword and keyword not in test.id():
                continue
            reason = next((r for p, r in patterns.items() if fnmatch.fnmatchcase(test.id(), p)), None)
            if reason is not None:
                excluded.append((test.id(), reason))
                continue
            bug = next((r for p, r in known.items() if fnmatch.fnmatchcase(test.id(), p)), None)
            if bug is not None:
                expected.append((test.id(), bug))
                mark_expected_failure(test)
            selected.append(test)
    return unittest.TestSuite(selected), excluded, expected


def mark_expected_failure(test: unittest.TestCase) -> None:
    """Mark only this class's method (the function object is shared between the context variants)."""
    name = test._testMethodName
    original = getattr(type(test), name)

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    setattr(type(test), name, unittest.expectedFailure(method))


def run_here(args: argparse.Namespace) -> int:
    from test import support

    support.verbose = args.verbose >= 2  # else ExecutorMixin prints each test's duration
    cls = load_class(args.spec)
    modules = suite_modules()
    mixins = process_pool_mixins(modules)
    if not mixins:
        print(f"error: no ProcessPool*Mixin found in {SUITE}", file=sys.stderr)
        return 1
    for mixin in mixins:
        mixin.executor_type = cls
    if args.inject == "sitecustomize":
        why = check_injection(cls, args.spec)
        if why:
            print(f"error: --inject sitecustomize: {why}", file=sys.stderr)
            return 1
        print(
            f"injected by sitecustomize: {args.spec} is concurrent.futures.ProcessPoolExecutor here, in "
            "assert_python_ok children, spawn children and the class's workers",
            file=sys.stderr,
        )
    else:
        patch_child_scripts(modules, cls, args.spec)
    release_workers_at_module_end(modules)
    release_workers_before(modules)
    patterns = {} if args.no_exclude else EXCLUDED
    known = {} if args.no_exclude else KNOWN_BUGS.get(args.spec, {})
    suite, excluded, expected = select_tests(modules, mixins, args.contexts, patterns, known, args.keyword)
    out = sys.stderr
    for test_id, reason in excluded:
        if args.verbose:
            print(f"excluded: {test_id}: {reason}", file=out)
    for test_id, reason in expected:
        print(f"known bug (expected failure): {test_id}: {reason}", file=out)
    print(
        f"Running {suite.countTestCases()} process-pool tests of {SUITE} from Python "
        f"{sys.version.split()[0]} against {args.spec}, contexts {','.join(args.contexts)}, "
        f"injected into child interpreters by {args.inject}",
        file=out,
        flush=True,
    )
    faulthandler.dump_traceback_later(args.timeout, exit=True)  # a deadlock ends with tracebacks
    start = time.monotonic()
    runner = unittest.TextTestRunner(stream=out, verbosity=2 if args.verbose else 1)
    result = runner.run(suite)
    faulthandler.cancel_dump_traceback_later()
    bad = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    passed = result.testsRun - bad - len(result.skipped) - len(result.expectedFailures)
    print(
        f"cpython_futures: python={sys.version.split()[0]} class={args.spec} "
        f"contexts={','.join(args.contexts)} inject={args.inject} ran={result.testsRun} passed={passed} "
        f"failures={len(result.failures)} errors={len(result.errors)} skipped={len(result.skipped)} "
        f"expected_failures={len(result.expectedFailures)} "
        f"unexpected_successes={len(result.unexpectedSuccesses)} excluded={len(excluded)} "
        f"seconds={time.monotonic() - start:.1f}",
        flush=True,
    )
    return 0 if result.wasSuccessful() else 1


# ------------------------------------------------- find an interpreter, venv
_PROBE = r"""
import importlib.util, json, sys
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:
        return False
def imports(name):
    try:
        __import__(name)
        return True
    except Exception:
        return False
print(json.dumps({"version": list(sys.version_info[:3]), "tests": found(%r), "module": imports(sys.argv[1])}))
""" % SUITE  # noqa: UP031 - the braces of the script would need doubling


def probe(python: str, module: str) -> dict | None:
    try:
        proc = subprocess.run(
            [python, "-I", "-c", _PROBE, module], capture_output=True, text=True, timeout=60, cwd=REPO
        )
        return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def candidate_pythons(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    found = [sys.executable]
    for minor in range(30, MIN_VERSION[1] - 1, -1):
        exe = shutil.which(f"python3.{minor}")
        if exe:
            found.append(exe)
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found += sorted(glob.glob(os.path.join(pyenv_root, "versions", "*", "bin", "python3")), reverse=True)
    unique: dict[str, str] = {}
    for exe in found:
        unique.setdefault(os.path.realpath(exe), exe)
    return list(unique.values())


def choose_python(explicit: str | None, module: str) -> tuple[str, dict] | str:
    """The interpreter to use and its probe, or why there is none."""
    usable = []
    for exe in candidate_pythons(explicit):
        info = probe(exe, module)
        if info and info["tests"] and tuple(info["version"][:2]) >= MIN_VERSION:
            usable.append((exe, info))
    if not usable:
        return (
            f"no Python >= {MIN_VERSION[0]}.{MIN_VERSION[1]} with {SUITE} in its standard library "
            f"(tried {', '.join(candidate_pythons(explicit))})"
        )

    def rank(item: tuple[str, dict]) -> tuple:
        version = tuple(item[1]["version"][:2])
        return (item[1]["module"], version in CHECKED_VERSIONS, version)

    return max(usable, key=rank)


def project_dependencies() -> list[str]:
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
    return re.findall(r"[\"']([^\"']+)[\"']", match.group(1)) if match else []


def ensure_venv(base: str, version: list[int]) -> tuple[str | None, str]:
    """A venv from ``base`` with the project's dependencies and the repo on its path: (python, log)."""
    os.makedirs(CACHE, exist_ok=True)
    where = os.path.join(CACHE, "py{}.{}".format(*version))
    python = os.path.join(where, "bin", "python")
    wanted = {"base": os.path.realpath(base), "version": version, "deps": project_dependencies(), "repo": REPO}
    marker = os.path.join(where, "cpython-futures-ready.json")
    with open(where + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs wait for one builder
        try:
            with open(marker, encoding="utf-8") as f:
                if json.load(f) == wanted:
                    return python, ""
        except (OSError, ValueError):
            pass
        shutil.rmtree(where, ignore_errors=True)
        steps = [
            [base, "-m", "venv", where],
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wanted["deps"]],
        ]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                return None, f"{' '.join(step)} failed:\n{proc.stdout}{proc.stderr}"[-2000:]
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        with open(os.path.join(purelib, "_cpython_futures_repo.pth"), "w", encoding="utf-8") as f:
            f.write(REPO + "\n")
        with open(marker, "w", encoding="utf-8") as f:
            json.dump(wanted, f)
    return python, ""


def skip(reason: str) -> int:
    print(f"SKIP: {reason}", flush=True)
    return SKIP_EXIT


def delegate(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this script under an interpreter that has the tests (in a venv if it must)."""
    module = args.spec.partition(":")[0]
    chosen = choose_python(args.python or os.environ.get("CPYTHON_FUTURES_PYTHON"), module)
    if isinstance(chosen, str):
        return skip(chosen)
    python, info = chosen
    if not info["module"]:
        if args.no_venv:
            return skip(f"{python} has {SUITE} but cannot import {module} (and --no-venv)")
        python, log = ensure_venv(python, info["version"])
        if python is None:
            return skip(f"could not prepare a venv for the CPython tests: {log}")
        again = probe(python, module)
        if not again or not again["module"]:
            return skip(f"{python} cannot import {module}")
    print(f"cpython_futures: running under {python}", file=sys.stderr, flush=True)
    command = [python, os.path.abspath(__file__), "--here", *argv]
    if args.inject != "sitecustomize":
        return subprocess.run(command).returncode
    with injected_sitecustomize(args.spec) as site:  # every interpreter of the run starts with it
        return subprocess.run(command, env=site.env()).returncode


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", nargs="?", help="executor class as module:Class (default mmexec:MemmapExecutor)")
    parser.add_argument("--class", dest="cls", metavar="SPEC", help="same as the positional argument")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="list each test (-vv: durations)")
    parser.add_argument(
        "--contexts",
        default="spawn",
        help="mp_context variants to run, comma-separated, or 'all' (default: spawn)",
    )
    parser.add_argument(
        "--inject",
        choices=INJECT_MODES,
        default="rewrite",
        help="how child interpreters get the class: their scripts rewritten to import it (default), or a "
        "sitecustomize on PYTHONPATH installing it as concurrent.futures.ProcessPoolExecutor everywhere",
    )
    parser.add_argument("--no-exclude", action="store_true", help="ignore EXCLUDED and KNOWN_BUGS")
    parser.add_argument("-k", dest="keyword", help="only tests whose id contains this")
    parser.add_argument("--python", help="interpreter whose stdlib has the tests")
    parser.add_argument("--no-venv", action="store_true", help="never create a venv: skip instead")
    parser.add_argument("--timeout", type=float, default=600, help="abort with tracebacks after this many seconds")
    parser.add_argument("--list-excluded", action="store_true", help="print EXCLUDED and KNOWN_BUGS and exit")
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.spec and args.cls and args.spec != args.cls:
        parser.error("give the class once")
    args.spec = args.cls or args.spec or "mmexec:MemmapExecutor"
    args.contexts = CONTEXTS if args.contexts == "all" else tuple(args.contexts.split(","))
    if set(args.contexts) - set(CONTEXTS):
        parser.error(f"contexts are {', '.join(CONTEXTS)} or all")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list_excluded:
        for pattern, reason in EXCLUDED.items():
            print(f"{pattern}: {reason}")
        for spec, bugs in KNOWN_BUGS.items():
            for pattern, reason in bugs.items():
                print(f"[known bug of {spec}] {pattern}: {reason}")
        return 0
    if args.here:
        return run_here(args)
    here_ok = importlib.util.find_spec("test") is not None and _has_suite()
    if here_ok and _importable(args.spec.partition(":")[0]) and not args.python and args.inject == "rewrite":
        return run_here(args)  # (injection must be there before the interpreter runs: a new process)
    return delegate(args, argv)


def _has_suite() -> bool:
    try:
        return importlib.util.find_spec(SUITE) is not None
    except ImportError:
        return False


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
