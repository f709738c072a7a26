"""A worker process's life: what runs in each mmexec worker process, from its start to its exit.

:func:`serve` is the target the pool starts (``_pool.start_worker``). It
reads messages (``_wire``) from its own pipe until told to stop, or until the
pipe closes: the caller is gone. Only the standard library is imported here,
and the package's ``__init__`` imports nothing heavy: an idle worker never
imports numpy or the rest of mmexec, so the workers an executor starts do not
compete for the CPUs with the one that runs its first task (``_worker`` is
imported with the first message that needs it).

Signals: the caller aborts a call by writing its id into the worker's abort
pipe, then sending :data:`ABORT_SIGNAL`; the handler (:data:`ABORTS`) raises
:class:`TaskAborted` in that call only, once. A signal with no request for
the running call (a stray ``kill -USR1``, a request that came after its call
ended) changes nothing. Ctrl-C in a terminal reaches
every worker of the process group: an idle worker ignores it (it stays warm),
a running call gets ``KeyboardInterrupt`` as it would in the caller.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from ._wire import INIT_DONE, REPLY_RETIRE, STOP, Reader, send

__all__ = ["ABORTS", "ABORT_SIGNAL", "CALL_ID", "PARENT_CHECK_INTERVAL", "Aborts", "TaskAborted", "serve"]

#: The signal the caller sends to interrupt a call that an abort cancelled.
ABORT_SIGNAL = signal.SIGUSR1
#: An abort request on the abort pipe: the id of the call to stop.
CALL_ID = struct.Struct("<Q")
#: How often a worker checks that the process that started it is still alive.
PARENT_CHECK_INTERVAL = 0.5


def _exit_when_orphaned(parent: int) -> None:
    # A forkserver's worker is the forkserver's child, not the caller's: it watches both.
    ppid = os.getppid()
    while os.getppid() == ppid and (ppid == parent or _alive(parent)):
        time.sleep(PARENT_CHECK_INTERVAL)
    os._exit(1)  # the caller died: nobody wants our results, free our maps now


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds that pid: ours is gone
        return False
    return True


def _start_watchdog(parent: int) -> None:
    """Make this worker exit soon after its parent dies, even in the middle of a call (once per process:
    :func:`serve` is the process's whole life).

    Then loky's resource tracker sees every process gone and removes the
    caller's folder within seconds. ``parent`` is the pid of the process that
    started the worker, passed by it: ``os.getppid()`` here would already name
    init if the caller died while this worker was starting.
    """
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="mmexec-watchdog", daemon=True).start()


class TaskAborted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an ordinary error
    """Raised inside a task whose caller aborted it (``MemmapExecutor.abort``)."""


class Aborts:
    """This worker's abort requests (one instance, :data:`ABORTS`; :func:`serve` gives it the abort pipe, and
    ``_worker`` marks the call that runs).

    Call ids are unique in the caller's process and grow, so a request for a
    call that already ended can never match a later one.
    """

    def __init__(self) -> None:
        self.fd = -1  # the abort pipe's read end (non-blocking)
        self.requested: set[int] = set()  # ids of calls the caller aborted
        self.running = 0  # the id of the call that runs now (0: none)
        self.handling = False  # the handler runs (a signal storm would nest it)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: raise :class:`TaskAborted` in the running call if the caller aborted it."""
        if self.handling:  # (a signal storm nests handlers: the outer one drains; the call start drains too)
            return
        self.handling = True
        try:
            self.drain()
            ident = self.running
            hit = bool(ident) and ident in self.requested
            if hit:
                self.running = 0
        finally:
            self.handling = False
        if hit:
            raise TaskAborted("the caller aborted this task")

    def drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # (BlockingIOError: nothing more)
                return
            if not data:
                return
            self.requested.update(ident for (ident,) in CALL_ID.iter_unpack(data))

    def begin(self, ident: int) -> bool:
        """Mark call ``ident`` as running; False if it was aborted before it started (it must not run)."""
        self.drain()  # (a request may come without the signal: to a worker that had not replied yet)
        if self.requested:  # forget requests for calls that ended (the handler, which may run between any two
            old, self.requested = self.requested, set()  # steps here, adds to the new set: none is lost)
            self.requested.update(i for i in old if i >= ident)
        self.running = ident  # (first: a signal from here on raises in the call)
        if ident in self.requested:
            self.running = 0
            return False
        return True


#: This worker's abort requests.
ABORTS = Aborts()


def serve(
    calls: Any, replies: Any, aborts: Any, parent: int, init: tuple[Callable[..., object], tuple[Any, ...]] | None
) -> None:
    """A worker's loop: read a message, act on it, reply; return (the process exits) on STOP or end of input.

    ``calls``, ``replies`` and ``aborts`` are this worker's pipe ends
    (``multiprocessing`` connections: only their descriptors are used).
    ``init`` is ``(initializer, initargs)`` for arguments that only a new
    process can inherit (a ``multiprocessing.Queue``): it runs now, and a
    failure ends the worker, which breaks its executor, as in the standard
    library. Other initializers come as an ``INIT`` message.
    """
    _start_watchdog(parent)
    ABORTS.fd = aborts.fileno()
    os.set_blocking(ABORTS.fd, False)
    signal.signal(ABORT_SIGNAL, ABORTS.on_signal)
    if "PYTHONFAULTHANDLER" not in os.environ:  # a crash in native code prints the call's Python traceback
        faulthandler.enable()
    reader, reply_fd = Reader(calls.fileno()), replies.fileno()
    if init is not None:
        try:
            init[0](*init[1])
        except BaseException as exc:
            logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
            send(reply_fd, INIT_DONE, 0, f"{type(exc).__name__}: {exc}".encode(), b"", REPLY_RETIRE)
            sys.exit(1)
        del init
    handle: Callable[[Any], tuple[Any, ...] | None] | None = None
    while True:
        try:
            message = reader.recv()
        except KeyboardInterrupt:
            continue  # Ctrl-C while idle: stay warm
        if message is None or message.kind == STOP:
            return
        if handle is None:
            from ._worker import handle as handle_message

            handle = handle_message
        reply = handle(message)
        del message
        if reply is None:
            continue
        kind, ident, body, meta, flags = reply
        send(reply_fd, kind, ident, body, meta, flags)
        del reply, body
        if flags & REPLY_RETIRE:
            return
