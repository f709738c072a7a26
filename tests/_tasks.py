"""Functions the tests send to workers (importable by reference in workers)."""

from __future__ import annotations

import gc
import os
import threading
import time
import warnings
from typing import Any

import numpy as np

from mmexec import has_shareable_memory
from mmexec._housekeeper import HOUSEKEEPER


def add(a: Any, b: Any) -> Any:
    return a + b


def square(x: Any) -> Any:
    return x * x


def identity(x: Any) -> Any:
    return x


def raise_value_error(msg: str) -> None:
    raise ValueError(msg)


def pid(_: Any = None) -> int:
    return os.getpid()


def wait_event(path: str, timeout: float = 30.0) -> str:
    """Block until ``path`` exists (a cross-process event), then return it."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return path


def describe(x: Any) -> dict[str, Any]:
    """What a worker sees of an argument."""
    return {
        "type": type(x).__name__,
        "shareable": has_shareable_memory(x) if isinstance(x, np.ndarray) else None,
        "writeable": x.flags.writeable if isinstance(x, np.ndarray) else None,
        "sum": float(x.sum()) if isinstance(x, np.ndarray) and x.dtype.kind in "biuf" else None,
        "bytes": np.ascontiguousarray(x).tobytes() if isinstance(x, np.ndarray) and x.nbytes < 2**16 else None,
    }


def describe_tree(tree: Any) -> Any:
    """Apply :func:`describe` to every array in nested lists/tuples/dicts/objects."""
    if isinstance(tree, np.ndarray):
        return describe(tree)
    if isinstance(tree, dict):
        return {k: describe_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [describe_tree(v) for v in tree]
    if hasattr(tree, "__dict__"):
        return {k: describe_tree(v) for k, v in vars(tree).items()}
    return tree


def fill(a: np.ndarray, value: float) -> None:
    a[...] = value


def write_row_sum(inp: np.ndarray, out: np.ndarray, i: int) -> None:
    out[i] = inp[i].sum()


def make_array(n: int, value: float = 1.0) -> np.ndarray:
    return np.full(n, value)


def slice_of(a: np.ndarray, start: int, stop: int) -> np.ndarray:
    return a[start:stop]


def thread_count() -> int:
    return threading.active_count()


def settle() -> None:
    """Run the releases that freed arrays and maps posted (a weakref callback never releases inline)."""
    gc.collect()
    assert HOUSEKEEPER.flush(timeout=30)


def held_fds(ex: Any) -> dict[str, int]:
    """The files an executor's store holds now, path -> descriptor, once pending releases ran
    (queued releases are applied by the executor's thread or the janitor: apply them here)."""
    settle()
    ex._store.apply_releases()
    return ex._store.held_fds()  # type: ignore[no-any-return]


def live_dumps(ex: Any) -> list[str]:
    """Where the live dumps of an executor's store are (``... (deleted)`` once unlinked)."""
    return sorted(os.readlink(f"/proc/self/fd/{fd}") if fd >= 0 else path for path, fd in held_fds(ex).items())


def touch(path: str) -> str:
    """Create ``path`` (a cross-process event for :func:`wait_event`)."""
    with open(path, "w"):
        pass
    return path


def set_env_from_initializer(name: str, value: str) -> None:
    """An initializer: record that it ran, in this process's environment."""
    os.environ[name] = value


def get_env(name: str) -> str | None:
    return os.environ.get(name)


def nested_parallel_warnings(backend: str) -> tuple[list[int], list[str], str]:
    """Run a nested Parallel(n_jobs=2, backend=backend); its results, warnings and chosen backend."""
    import warnings

    from mmexec import Parallel, delayed

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallel = Parallel(n_jobs=2, backend=backend)
        values = parallel(delayed(abs)(-i) for i in range(3))
    return values, [str(w.message) for w in caught], str(parallel.backend)


def layout(x: np.ndarray) -> tuple[tuple[int, ...], str, bool, float]:
    """What a worker sees of an array's layout: shape, dtype, C-contiguity, and the sum of its values."""
    return x.shape, x.dtype.str, bool(x.flags.c_contiguous), float(x.sum())


def relayout_in_place(a: np.ndarray, shape: tuple[int, ...] | None = None, dtype: Any = None) -> None:
    """``a.shape = shape`` and/or ``a.dtype = dtype``: the same array object, a new layout of its bytes.

    NumPy 2.5 deprecates both assignments (a DeprecationWarning, an error
    under this suite's ``filterwarnings = error``) but still performs them,
    and older NumPy does so silently: code can still change an array this
    way between two submits, which is what the tests that call this check.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Setting the (shape|dtype) on a NumPy array", DeprecationWarning)
        if shape is not None:
            a.shape = shape
        if dtype is not None:
            a.dtype = dtype


def total(a: np.ndarray) -> float:
    return float(a.sum())


def add_into(a: np.ndarray, value: float) -> None:
    """Add ``value`` to every element of ``a`` in place (a writable memmap)."""
    a += value


def die_while_writing_a_result(folder: str) -> None:
    """Leave what a worker killed while writing a large result leaves: a named partial file, then die."""
    from mmexec._tempfolder import create_private_file

    fd, _ = create_private_file(folder, writer=os.getpid())
    os.write(fd, b"\0" * 4096)
    os._exit(9)


def backend_nesting_level(backend: str) -> int:
    """The nesting_level that parallel_config(backend) reports here."""
    from mmexec import parallel_config

    with parallel_config(backend) as config:
        return int(config["backend"].nesting_level)


def sleep_and_return(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def run_script(folder: Any, text: str, timeout: float = 300) -> Any:
    """Write ``text`` as a script in ``folder``, run it with this interpreter; its CompletedProcess (text)."""
    import subprocess
    import sys

    script = os.path.join(str(folder), "script.py")
    with open(script, "w") as f:
        f.write(text)
    return subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=timeout)


def use_an_executor_and_return(out: Any) -> None:
    """A multiprocessing child's target: use an executor (its workers stay warm), report, return."""
    from mmexec import MemmapExecutor

    with MemmapExecutor(1) as ex:
        out.put(ex.submit(abs, -3).result(timeout=60))


def started_then_wait(started: str, flag: str, timeout: float = 60.0) -> str:
    """Say it started (``started`` is created), then wait for ``flag``; return ``flag``."""
    touch(started)
    return wait_event(flag, timeout)


def leave_an_executor_running(mode: str, out: Any) -> None:
    """A multiprocessing child's target: start a call, then shut down without waiting (or drop the executor)
    while it runs, and return."""
    from mmexec import MemmapExecutor

    ex = MemmapExecutor(1)
    ex.submit(time.sleep, 0.5)
    if mode == "nowait":
        ex.shutdown(wait=False)
    out.put(mode)


def leaf_bytes(a: np.ndarray) -> bytes:
    """``a``'s values as bytes, in C order, one leaf field after another.

    A structured dtype's padding is left out: a copy need not keep it (NumPy
    copies a non-contiguous structured array field by field, so even
    ``np.ascontiguousarray`` and pickling leave its padding undefined).
    """
    if a.dtype.names is None:
        return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()
    return b"".join(leaf_bytes(a[name]) for name in a.dtype.names)


def as_seen(x: np.ndarray) -> dict[str, Any]:
    """What a worker got for an array argument: its type, dtype, shape, strides, values and whether it is a map."""
    return {
        "type": type(x), "dtype": x.dtype, "shape": x.shape, "strides": x.strides,
        "bytes": leaf_bytes(x), "shareable": has_shareable_memory(x),
    }


def returned(x: Any, how: str, index: Any = None, axes: tuple[int, ...] | None = None) -> Any:
    """A task for the property tests: ``how`` is ``'self'`` (return the argument itself), ``'view'``
    (``x[index]``, its axes then permuted by ``axes``: a view of the argument), ``'copy'`` (a new C-ordered
    array) or ``'seen'`` (:func:`as_seen`: what the worker got)."""
    if how == "self":
        return x
    if how == "view":
        y = x[index]
        return y if axes is None else y.transpose(axes)
    if how == "copy":
        return x.copy()
    if how == "seen":
        return as_seen(x)
    raise ValueError(how)


def library_threads() -> dict[str, int]:
    """The thread count of each BLAS/OpenMP library loaded here, by threadpoolctl's internal_api name."""
    from threadpoolctl import threadpool_info

    return {info["internal_api"]: info["num_threads"] for info in threadpool_info()}
