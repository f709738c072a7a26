"""The interpreter-exit flag: set before every ``atexit`` handler runs, as the standard library's.

Imported by the package itself (``import mmexec``), which imports nothing
else eagerly: the hook is registered with ``threading._register_atexit`` as
soon as mmexec is imported, so a ``submit`` from any ``atexit`` handler
registered later is refused with the standard library's message.
"""

from __future__ import annotations

import threading

__all__ = ["interpreter_exiting", "refuse_new_work"]

_exiting = False


def interpreter_exiting() -> bool:
    """True once the interpreter started to exit (no new work is accepted then)."""
    return _exiting


def refuse_new_work() -> None:
    global _exiting
    _exiting = True


threading._register_atexit(refuse_new_work)  # type: ignore[attr-defined]
