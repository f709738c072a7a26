"""The messages between the caller and a worker process: a fixed header, a small meta part, a body.

Each worker has two pipes of its own (calls in, replies out), so a message
never interleaves with another worker's and no lock is shared between
processes: a worker killed at any moment corrupts nothing but its own pipes.
A message is::

    header (24 bytes): kind, flags, meta length, message id, payload length
    payload: meta (plain pickle of small fields) then body (a task or a result, pickled)

Only the standard library is used here: the worker's start (``_bootstrap``)
reads messages before it imports numpy or the rest of mmexec.
"""

from __future__ import annotations

import os
import struct
from typing import Any

__all__ = [
    "CALL",
    "CONFIG",
    "HEADER",
    "INIT",
    "INIT_DONE",
    "REPLY_ABORTED",
    "REPLY_BROKEN",
    "REPLY_KEPT",
    "REPLY_RETIRE",
    "RESULT",
    "STOP",
    "Message",
    "Reader",
    "send",
]

#: kind (u8), flags (u8), 2 bytes unused, meta length (u32), message id (u64), payload length (u64).
HEADER = struct.Struct("<BBxxIQQ")

# Caller -> worker.
CONFIG = 1  #: meta: the executor's worker settings (where results go, thresholds); no reply
INIT = 2  #: body: the pickled (initializer, initargs); reply INIT_DONE
CALL = 3  #: meta: lent spares and result options; body: the pickled task; reply RESULT
STOP = 4  #: exit now; no reply

# Worker -> caller.
RESULT = 10  #: meta: kept maps; body: the pickled outcomes
INIT_DONE = 11  #: body: empty, or the initializer's error as text (the worker then exits)

#: RESULT flag: maps of this task's arguments outlived it in the worker (their paths are in the meta).
REPLY_KEPT = 1
#: RESULT flag: the worker exits after this reply (max_tasks_per_child reached, or it could not map memory).
REPLY_RETIRE = 2
#: RESULT flag: the task could not be rebuilt in the worker: the executor is broken, as the standard library's.
REPLY_BROKEN = 4
#: RESULT flag: the call was aborted (its future already says so); the body is empty.
REPLY_ABORTED = 8

_CHUNK = 1 << 16


class Message:
    """One message read off a pipe."""

    __slots__ = ("body", "flags", "ident", "kind", "meta")

    def __init__(self, kind: int, flags: int, ident: int, meta: bytes, body: memoryview) -> None:
        self.kind, self.flags, self.ident, self.meta, self.body = kind, flags, ident, meta, body


def send(fd: int, kind: int, ident: int = 0, body: bytes | memoryview = b"", meta: bytes = b"", flags: int = 0) -> None:
    """Write one message to ``fd`` (a blocking pipe), in one system call when the pipe takes it whole."""
    header = HEADER.pack(kind, flags, len(meta), ident, len(meta) + len(body))
    parts: list[Any] = [header, meta, body] if meta else [header, body]
    total = HEADER.size + len(meta) + len(body)
    n = os.writev(fd, parts)
    if n == total:
        return
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:  # a partial write (a large message): the rest
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
        if views:
            n = os.writev(fd, views)


class Reader:
    """Reads messages from one pipe: whole ones, blocking (:meth:`recv`), or as they come (:meth:`feed`).

    A large payload is read straight into a buffer of its size.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()  # bytes read and not yet part of a message
        self._head: tuple[int, int, int, int, int] | None = None  # the header of the message being read
        self._body: bytearray | None = None
        self._got = 0

    def recv(self) -> Message | None:
        """The next message, waiting for it; None once the other end is closed."""
        while True:
            message = self._take()
            if message is not None:
                return message
            if not self._read():
                return None

    def feed(self) -> tuple[list[Message], bool]:
        """Read what the pipe holds now (one read; call when it is readable): the messages completed,
        and False once the other end is closed."""
        open_ = self._read()
        messages = []
        while (message := self._take()) is not None:
            messages.append(message)
        return messages, open_

    def _read(self) -> bool:
        if self._body is not None:  # a large payload: straight into its buffer
            view = memoryview(self._body)[self._got :]
            n = os.readv(self.fd, [view])
            self._got += n
            return n > 0
        data = os.read(self.fd, _CHUNK)
        self._buf += data
        return bool(data)

    def _take(self) -> Message | None:
        if self._head is None:
            if len(self._buf) < HEADER.size:
                return None
            self._head = HEADER.unpack_from(self._buf)
            del self._buf[: HEADER.size]
            length = self._head[4]
            if len(self._buf) < length and length > _CHUNK:
                self._body = bytearray(length)
                self._got = len(self._buf)
                self._body[: self._got] = self._buf
                self._buf = bytearray()
        kind, flags, meta_len, ident, length = self._head
        if self._body is not None:
            if self._got < length:
                return None
            payload = memoryview(self._body)
            self._body = None
        else:
            if len(self._buf) < length:
                return None
            payload = memoryview(bytes(self._buf[:length]))
            del self._buf[:length]
        self._head = None
        return Message(kind, flags, ident, bytes(payload[:meta_len]), payload[meta_len:])
