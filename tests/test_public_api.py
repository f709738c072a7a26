"""The public surface: exactly the documented names, typed and documented."""

from __future__ import annotations

import inspect
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool as StdBroken

import mmexec


def test_all_lists_exactly_the_public_names():
    """__all__ is the set of public attributes, sorted, and each one exists."""
    public = {n for n in dir(mmexec) if not n.startswith("_")} - {"annotations"}
    assert set(mmexec.__all__) - {"__version__"} == public
    assert mmexec.__all__ == sorted(mmexec.__all__, key=str.lower) or sorted(mmexec.__all__)


def test_executor_signature_starts_like_the_stdlib():
    """MemmapExecutor takes ProcessPoolExecutor's arguments in the same order."""
    ours = list(inspect.signature(mmexec.MemmapExecutor).parameters)
    theirs = list(inspect.signature(ProcessPoolExecutor).parameters)
    assert ours[: len(theirs) - 1] == theirs[: len(theirs) - 1]
    assert "max_tasks_per_child" in ours


def test_errors_subclass_what_users_already_catch():
    """Errors subclass MmexecError and a builtin; BrokenProcessPool is the stdlib's."""
    assert issubclass(mmexec.TempFolderError, OSError)
    assert issubclass(mmexec.TempFolderError, mmexec.MmexecError)
    assert issubclass(mmexec.MainGuardError, RuntimeError)
    assert issubclass(mmexec.BrokenProcessPool, StdBroken)


def test_every_public_callable_has_a_docstring():
    """Each public function and class says what it does."""
    for name in mmexec.__all__:
        obj = getattr(mmexec, name)
        if callable(obj):
            assert inspect.getdoc(obj), name
