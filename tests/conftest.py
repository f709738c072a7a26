"""Shared fixtures: executors for contract tests, and a leak check after every test."""

from __future__ import annotations

import gc
import glob
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor

import pytest

from mmexec import MemmapExecutor
from mmexec._spares import SPARES
from mmexec._tempfolder import FOLDER_PREFIX


def our_folders() -> list[str]:
    """Private folders this process created, wherever they are."""
    pattern = f"{FOLDER_PREFIX}{os.getpid()}-*"
    found = []
    for base in {"/dev/shm", tempfile.gettempdir()}:
        found += glob.glob(os.path.join(base, pattern))
    return found


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """After each test, this process has no mmexec folder left anywhere.

    Freed files kept for reuse (process-wide, up to 2 s) are dropped before
    each test, so that which file a test's dump or result reuses never
    depends on the tests before it.
    """
    SPARES.drop()
    yield
    gc.collect()
    left = our_folders()
    assert not left, f"leftover mmexec folders: {left}"


EXECUTORS = {
    "ProcessPoolExecutor": ProcessPoolExecutor,
    "MemmapExecutor": MemmapExecutor,
}


@pytest.fixture(params=list(EXECUTORS))
def executor_class(request: pytest.FixtureRequest) -> type[Executor]:
    """Each executor class that must honour the concurrent.futures contract."""
    return EXECUTORS[request.param]  # type: ignore[return-value]


@pytest.fixture
def executor(executor_class: type[Executor]) -> Iterator[Executor]:
    """A 2-worker executor of each kind, shut down after the test."""
    ex = executor_class(max_workers=2)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def mx(tmp_path: os.PathLike[str]) -> Iterator[MemmapExecutor]:
    """A 2-worker MemmapExecutor with a small threshold (64 KiB)."""
    ex = MemmapExecutor(2, max_nbytes="64K")
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
