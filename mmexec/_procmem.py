"""Memory of a process tree: PSS, plus mmexec's shared-memory files counted once.

PSS alone misses a tmpfs file that no process has mapped right now, and
splits mapped ones between processes. So: every mapping of a file in one of
the tree's mmexec folders (named there, or unlinked from there and held by a
descriptor, as mmexec's dumps are) is left out of PSS, and those files are
counted once at their full size instead. Used by the demo and the benchmarks; Linux
only, no dependencies.
"""

from __future__ import annotations

import glob
import os
import tempfile
import threading
from types import TracebackType

from ._tempfolder import FOLDER_PREFIX

__all__ = ["PeakMemory", "tree_memory"]


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    kids = _children_map()
    found, todo = [pid], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pss_outside(pid: int, folders: tuple[str, ...]) -> int:
    """PSS of ``pid`` in bytes, leaving out mappings of files inside ``folders``."""
    total = 0
    skip = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    parts = line.split(None, 5)
                    path = parts[5].strip() if len(parts) > 5 else ""
                    skip = bool(folders) and path.startswith(folders)
                elif line.startswith("Pss:") and not skip:
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


def _folders_of(pids: list[int]) -> tuple[str, ...]:
    found: list[str] = []
    for base in {"/dev/shm", tempfile.gettempdir()}:
        for pid in pids:
            found += glob.glob(os.path.join(base, f"{FOLDER_PREFIX}{pid}-*"))
    return tuple(f + os.sep for f in found)


def _files_size(folders: tuple[str, ...], pids: list[int]) -> int:
    """Bytes of the files in ``folders``, and of those unlinked from there but held open by ``pids``, once each."""
    seen: dict[tuple[int, int], int] = {}

    def count(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512

    for folder in folders:
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    count(entry.path)
        except OSError:
            pass
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(folders):
                count(f"/proc/{pid}/fd/{fd}")
    return sum(seen.values())


def tree_memory(pids: list[int] | None = None) -> int:
    """Bytes used by ``pids`` (default: this process and its descendants), shared files once."""
    pids = descendants(os.getpid()) if pids is None else pids
    folders = _folders_of(pids)
    return sum(_pss_outside(p, folders) for p in pids) + _files_size(folders, pids)


class PeakMemory:
    """Sample :func:`tree_memory` in a thread while the block runs; bytes in ``peak``/``baseline``."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids = descendants(os.getpid())
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_memory(pids))
        self.peak = max(self.peak, tree_memory(pids))

    def __enter__(self) -> PeakMemory:
        self.baseline = self.peak = tree_memory()
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
