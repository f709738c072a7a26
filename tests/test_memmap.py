"""dump / load / has_shareable_memory (seed example E6)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from mmexec import dump, has_shareable_memory, load


def test_dump_then_load_gives_a_memmap_of_the_same_data(tmp_path):
    """load(mmap_mode='r+') of a dump is a numpy.memmap with the dumped values."""
    a = np.arange(1e6)
    path = tmp_path / "a.mmap"
    assert dump(a, path) == [str(path)]
    m = load(path, mmap_mode="r+")
    assert type(m).__name__ == "memmap" and m.shape == a.shape and a.nbytes == 8_000_000
    np.testing.assert_array_equal(m, a)
    assert path.exists() and not (tmp_path / "a.mmap.npy").exists()


def test_load_without_mmap_mode_reads_into_memory(tmp_path):
    """Without mmap_mode, load returns an ordinary in-memory ndarray."""
    dump(np.ones(10), tmp_path / "x")
    back = load(tmp_path / "x")
    assert type(back) is np.ndarray and not has_shareable_memory(back)


def test_load_rejects_unknown_modes(tmp_path):
    """An unknown mmap_mode is a ValueError listing the valid ones."""
    dump(np.ones(10), tmp_path / "x")
    with pytest.raises(ValueError, match="mmap_mode"):
        load(tmp_path / "x", mmap_mode="rw")


def test_dump_refuses_objects_it_cannot_map(tmp_path):
    """Object arrays and non-arrays are a TypeError, not a silent pickle."""
    with pytest.raises(TypeError, match="object"):
        dump(np.array([{}, []], dtype=object), tmp_path / "o")
    with pytest.raises(TypeError, match="numpy arrays"):
        dump([1, 2], tmp_path / "l")


def test_has_shareable_memory_follows_the_base_chain(tmp_path):
    """Memmaps, their slices and plain arrays viewing them are shareable; in-memory arrays are not."""
    dump(np.ones(100), tmp_path / "x")
    m = load(tmp_path / "x", mmap_mode="r")
    assert has_shareable_memory(m) and has_shareable_memory(m[2:5])
    assert has_shareable_memory(np.asarray(m[2:5]))
    assert not has_shareable_memory(np.array(m[2:5]))
    assert not has_shareable_memory(np.ones(3)) and not has_shareable_memory([1, 2])


def test_a_memfd_mapped_through_proc_self_reaches_workers(mx):
    """An np.memmap of /proc/self/fd/N (a memfd) names the caller's descriptor, not the worker's own fd N."""
    from _tasks import add_into, total

    n = 2**18
    fd = os.memfd_create("mmexec-test")
    try:
        os.ftruncate(fd, 8 * n)
        m = np.memmap(f"/proc/self/fd/{fd}", dtype=np.float64, mode="r+", shape=(n,))
        m[:] = 3.0
        assert mx.submit(total, m).result() == 3.0 * n
        mx.submit(add_into, m, 1.0).result()  # written through the same file (mode r+)
        assert float(m[0]) == 4.0
        del m
    finally:
        os.close(fd)


@pytest.mark.parametrize("when", ["after a first task", "before any task"])
@pytest.mark.parametrize("change", ["replaced", "deleted"])
def test_a_memmap_whose_file_changed_fails_that_task_clearly(mx, tmp_path, change, when):
    """A file replaced (or deleted) at the path of a caller's np.memmap fails that task with FileChangedError,
    for the map and for any view of it, even if it changed before mmexec first saw the map (the identity is
    the mapping's own file); no task runs on another file's data, and the executor stays usable."""
    from _tasks import total

    import mmexec

    n = 2**18
    path = tmp_path / "data.bin"
    m = np.memmap(path, dtype=np.float64, mode="w+", shape=(n,))
    m[:] = 1.0
    m.flush()
    if when == "after a first task":
        assert mx.submit(total, m).result() == n
    if change == "replaced":
        other = tmp_path / "other.bin"
        np.full(n, 7.0).tofile(other)
        os.replace(other, path)
    else:
        os.unlink(path)
    for arg in (m, m[1000:], m[::2]):
        with pytest.raises(mmexec.FileChangedError, match=re.escape(str(path))):
            mx.submit(total, arg).result()
    assert float(m.sum()) == n  # the caller's map still shows its own file
    assert mx.submit(total, np.ones(10)).result() == 10.0


def test_a_changed_file_fails_only_the_call_that_uses_it_in_a_submit_burst(mx, tmp_path):
    """Calls of a submit loop travel together; a FileChangedError of one call fails that call only."""
    from _tasks import total

    import mmexec

    path = tmp_path / "data.bin"
    np.full(2**14, 1.0).tofile(path)
    m = np.memmap(path, dtype=np.float64, mode="r")
    assert mx.submit(total, m).result() == 2**14
    np.full(2**14, 2.0).tofile(tmp_path / "new.bin")
    os.replace(tmp_path / "new.bin", path)
    small = np.ones(10)
    futures = [mx.submit(total, m if i == 150 else small) for i in range(300)]
    failed = [i for i, f in enumerate(futures) if f.exception() is not None]
    assert failed == [150] and isinstance(futures[150].exception(), mmexec.FileChangedError)
    assert all(f.result() == 10.0 for i, f in enumerate(futures) if i != 150)
