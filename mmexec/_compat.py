"""Every private name of the standard library, loky or numpy that mmexec reads, and nothing else.

Each one is read here, once, behind a function or a constant, and
``tests/test_compat.py`` checks each on the running versions: a release
that renames one fails that test loudly instead of changing mmexec's
behaviour quietly. mmexec writes into no other library's private state but one entry, below.

============================================  ===========================================================
name                                          why
============================================  ===========================================================
``threading._register_atexit``                the exit hook the standard library's process pool uses: runs
                                              before ``atexit`` handlers and before threads are joined
``concurrent.futures.process._RemoteTraceback``  the cause a worker's exception carries, as the standard
                                              library's (its own tests check the type)
``numpy.memmap._mmap``                        the ``mmap`` an ``np.memmap`` (or a view of one) maps: tells
                                              whether an array lives in a file another process can open
``sys._getframe``                             the main-guard check walks the caller's frames
``multiprocessing.forkserver._forkserver``    the forkserver's preloaded modules, extended (through the
``._preload_modules``                         public ``set_forkserver_preload``) inside a loky worker
``multiprocessing.util.Finalize``             (undocumented) the exit hook of a ``multiprocessing`` child
                                              process, which joins its own children before ``threading``'s
                                              exit hooks run there
``multiprocessing.context._concrete_contexts``  the registry of start methods by name: see below
============================================  ===========================================================

One write, to undo one of loky's. Importing loky registers its ``'loky'``
context in ``multiprocessing``'s registry of start methods, replacing the
entry of the copy of loky that joblib vendors, if joblib was imported first.
joblib's next executor then started its workers with the other copy's
process class, which talks to the other copy's resource tracker: every
memory-mapped array produced ``KeyError`` tracebacks on stderr and files
left to the tracker at exit. So loky is first imported here, and the entries
it replaced are put back (:data:`LOKY_CONTEXT` is loky's own context, taken
from loky directly, whichever copy holds the registry's name).
"""

from __future__ import annotations

import mmap
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.util
import sys
import threading
from collections.abc import Callable
from concurrent.futures import process as _stdlib_process
from types import FrameType
from typing import Any

_REGISTRY = multiprocessing.context._concrete_contexts  # type: ignore[attr-defined]
_BEFORE_LOKY = {name: _REGISTRY.get(name) for name in ("loky", "loky_init_main")}
import loky.backend.context  # noqa: E402  (between the two looks at the registry)

#: loky's process context (fresh interpreters that never re-run the caller's script), never through the
#: registry: the name ``'loky'`` there may be joblib's vendored copy's.
LOKY_CONTEXT: Any = loky.backend.context.ctx_loky
for _name, _theirs in _BEFORE_LOKY.items():
    if _theirs is not None:
        _REGISTRY[_name] = _theirs  # (joblib's copy, imported first: its executors keep their own context)
del _name, _theirs

from loky import BrokenProcessPool  # noqa: E402  (loky's, raised by mmexec's executors too)

__all__ = [
    "LOKY_CONTEXT",
    "BrokenProcessPool",
    "RemoteTraceback",
    "caller_frame",
    "forkserver_preload",
    "mmap_of",
    "register_child_exit_hook",
    "register_exit_hook",
]

#: The standard library's wrapper for a worker's formatted traceback (an exception's ``__cause__``).
RemoteTraceback: type[Exception] = _stdlib_process._RemoteTraceback


def register_exit_hook(hook: Callable[[], object]) -> None:
    """Run ``hook`` when the interpreter starts to exit, before ``atexit`` handlers and thread joins."""
    threading._register_atexit(hook)  # type: ignore[attr-defined]


def register_child_exit_hook(hook: Callable[[], object]) -> None:
    """Run ``hook`` when this process, a ``multiprocessing`` child, ends, before it joins the processes it
    started (there that join comes before :func:`register_exit_hook` 's hooks); in a main process, at
    ``atexit`` time. Register it again in a forked child: ``multiprocessing`` forgets these there."""
    multiprocessing.util.Finalize(None, hook, exitpriority=100)


def mmap_of(a: Any) -> mmap.mmap | None:
    """The ``mmap`` behind an ``np.memmap`` (None for a plain array, or a memmap whose map is closed)."""
    m = getattr(a, "_mmap", None)
    return m if isinstance(m, mmap.mmap) else None


def caller_frame(depth: int) -> FrameType | None:
    """The frame ``depth`` levels above the caller of this function."""
    return sys._getframe(depth + 1)


def forkserver_preload() -> list[str]:
    """The modules the forkserver preloads now (empty if none were set)."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    modules = getattr(server, "_preload_modules", None)
    return list(modules) if isinstance(modules, list) else []
