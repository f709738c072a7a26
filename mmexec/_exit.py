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

from collections.abc import Callable

from ._compat import register_exit_hook

__all__ = ["at_exit", "interpreter_exiting"]


class _Exit:
    """The process's exit state (one instance)."""

    def __init__(self) -> None:
        self.exiting = False
        self.hooks: list[Callable[[], object]] = []

    def run(self) -> None:
        self.exiting = True
        for hook in list(self.hooks):
            hook()


_EXIT = _Exit()


def interpreter_exiting() -> bool:
    """True once the interpreter started to exit (no new work is accepted then)."""
    return _EXIT.exiting


def at_exit(hook: Callable[[], object]) -> None:
    """Run ``hook`` at interpreter exit, after new work is refused (once per hook)."""
    if hook not in _EXIT.hooks:
        _EXIT.hooks.append(hook)


register_exit_hook(_EXIT.run)
