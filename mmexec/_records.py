"""The small typed records that travel between the caller and the workers.

A task is one of three records, pickled by the caller (``_pickler``) and run
by a worker (``_worker``):

* :class:`Call`: ``fn(*args, **kwargs)``; its result is the value;
* :class:`Chunk`: ``fn(*args)`` for each ``args`` of a ``map`` chunk;
* :class:`Batch`: a list of :class:`Call` s (a ``Parallel`` batch).

A :class:`Chunk` or a :class:`Batch` returns :class:`Outcomes`: the values of
the calls that ran, and the exception of the one that failed, if any (the
calls after it do not run, as in the standard library's ``map`` chunks and
joblib's batches). Nothing here imports anything of mmexec's, so both sides
(and any backend) can use these records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Batch", "Call", "Chunk", "Outcomes", "Task", "pack", "unpack"]


@dataclass(slots=True)
class Call:
    """One call, ``fn(*args, **kwargs)``."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return 1


@dataclass(slots=True)
class Chunk:
    """A chunk of ``map``: ``fn(*args)`` for every ``args`` in ``arglists``."""

    fn: Callable[..., Any]
    arglists: list[tuple[Any, ...]]

    @property
    def count(self) -> int:
        return len(self.arglists)

    def calls(self) -> Iterator[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]:
        for args in self.arglists:
            yield self.fn, args, {}


@dataclass(slots=True)
class Batch:
    """Several calls that travel and run together (a ``Parallel`` batch)."""

    items: list[Call]

    @property
    def count(self) -> int:
        return len(self.items)

    def calls(self) -> Iterator[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]:
        for call in self.items:
            yield call.fn, call.args, call.kwargs


Task = Call | Chunk | Batch


def pack(task: Task) -> tuple[Any, ...]:
    """``task`` as plain tuples, which the C pickler writes without calling back into Python."""
    if isinstance(task, Call):
        return (0, task.fn, task.args, task.kwargs)
    if isinstance(task, Chunk):
        return (1, task.fn, task.arglists)
    return (2, [(c.fn, c.args, c.kwargs) for c in task.items])


def unpack(packed: tuple[Any, ...]) -> Task:
    """The task :func:`pack` made."""
    kind = packed[0]
    if kind == 0:
        return Call(packed[1], packed[2], packed[3])
    if kind == 1:
        return Chunk(packed[1], packed[2])
    return Batch([Call(*c) for c in packed[1]])


@dataclass(slots=True)
class Outcomes:
    """What a chunk or a batch returns: the values of the calls that ran, in order, and the exception of the
    call that failed (it was the last to run), if one did."""

    values: list[Any]
    error: BaseException | None = None

    def checked(self) -> list[Any]:
        """The values, or the failing call's exception raised."""
        if self.error is not None:
            raise self.error
        return self.values
