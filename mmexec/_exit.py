"""Interpreter exit: refuse new work, let executors finish theirs, stop the idle workers.

Imported by the package itself (``import mmexec``), which imports nothing
else eagerly: the hook is registered (``_compat.register_exit_hook``, the
standard library's own mechanism) as soon as mmexec is imported. It runs
before every ``atexit`` handler, so a ``submit`` from any ``atexit`` handler
is refused with the standard library's message, and before threads are
joined: it first marks the interpreter as exiting, then runs what the
executor module registered with :func:`at_exit` (finish every executor's
queued and running calls, as the standard library does, then stop the idle
warm workers).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

from ._compat import register_exit_hook

__all__ = ["EXECUTORS", "at_exit", "interpreter_exiting"]


class _Exit:
    """The process's exit state (one instance, :data:`_EXIT`): whether it exits, and what runs then."""

    def __init__(self) -> None:
        self.exiting = False
        self.hooks: list[Callable[[], object]] = []

    def run(self) -> None:
        self.exiting = True
        for hook in list(self.hooks):
            hook()


_EXIT = _Exit()


class Executors:
    """The executors of this process whose threads may still run (held weakly: an executor collected ends
    them), for the exit hook to let them finish. One instance, :data:`EXECUTORS`; a forked child keeps none:
    its parent's executors refuse work there and close nothing (their ``after_fork_in_child``)."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, core: Any) -> None:
        self._live.add(core)

    def discard(self, core: Any) -> None:
        self._live.discard(core)

    def live(self) -> list[Any]:
        return list(self._live)

    def after_fork_in_child(self) -> None:
        for core in list(self._live):
            core.after_fork_in_child()
        self._live = weakref.WeakSet()


EXECUTORS = Executors()
os.register_at_fork(after_in_child=EXECUTORS.after_fork_in_child)


def interpreter_exiting() -> bool:
    """True once the interpreter started to exit (no new work is accepted then)."""
    return _EXIT.exiting


def at_exit(hook: Callable[[], object]) -> None:
    """Run ``hook`` at interpreter exit, after new work is refused (once per hook)."""
    if hook not in _EXIT.hooks:
        _EXIT.hooks.append(hook)


register_exit_hook(_EXIT.run)
