"""The small typed records that travel between the caller and the workers.

A task is one of three records, pickled by the caller (``_pickler``) and run
by a worker (``_worker``):

* :class:`Call`: ``fn(*args, **kwargs)``; its result is the value;
* :class:`Chunk`: ``fn(*args)`` for each ``args`` of a ``map`` chunk;
* :class:`Batch`: a list of :class:`Call` s (a ``Parallel`` batch).

A :class:`Chunk` or a :class:`Batch` returns :class:`Outcomes`: one failing
call does not hide the others' results. Nothing here imports anything of
mmexec's, so both sides (and any backend) can use these records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Batch", "Call", "Chunk", "Outcomes", "Task"]


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


@dataclass(slots=True)
class Outcomes:
    """What a task returns: one value per call, and the exception of each call
    that failed (its value is then None)."""

    values: list[Any]
    errors: dict[int, BaseException] = field(default_factory=dict)
    #: A batch stopped by an abort: the index of the call it stopped at (it and the next ones did not finish).
    stopped: int | None = None

    def first_error(self) -> BaseException | None:
        """The exception of the first failing call, if any."""
        return self.errors[min(self.errors)] if self.errors else None

    def checked(self) -> list[Any]:
        """The values, or the first failing call's exception raised."""
        error = self.first_error()
        if error is not None:
            raise error
        return self.values
