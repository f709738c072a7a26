"""dump / load / has_shareable_memory (seed example E6)."""

from __future__ import annotations

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
