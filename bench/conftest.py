"""Benchmark harness: tree memory sampler, contenders (pools), and the timed-run driver.

Timing
    Every workload goes through :class:`Bench`, a thin layer over
    ``benchmark.pedantic``: an untimed ``setup`` builds the round's arguments
    (a fresh array object, freshly opened memmaps...), the target is timed
    from the first submit until every result is in the parent, and an
    untimed teardown drops the results (and shuts down the executors of the
    warm-start workload). Pools are primed before the first round (workers
    started, numpy imported in them) and stay warm across rounds.

Memory
    :class:`TreeMemory` measures the parent and all its descendants: PSS
    (``/proc/<pid>/smaps_rollup``) without its shared-memory part, plus every
    tmpfs file the tree holds (open, mapped, or sitting in one of its
    mmexec/joblib folders), each counted once at its allocated size. PSS
    alone would miss the pages of a dump that no worker has mapped yet.
    :class:`PeakSampler` samples it in a background thread.

    The baseline is taken before the first (warmup) round: the pool is primed
    and the workload's input data exist, but nothing the contender keeps
    between calls (mmexec's spare dumps, say) does yet. Only the last round is
    sampled (sampler started in its untimed setup, stopped in its untimed
    teardown, so the results it returned are included); the median time over
    the rounds is insensitive to that one round's sampler overhead, and
    single-round benchmarks last seconds. ``peak_bytes`` is the highest sample
    above the baseline; ``peak_call_bytes`` the rise during the sampled call.
"""

from __future__ import annotations

import gc
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import loky
import psutil
import pytest

import mmexec
from mmexec._spares import SPARES

from . import _tasks

#: Worker processes per pool (the targets are for 2 cores).
WORKERS = int(os.environ.get("MMEXEC_BENCH_WORKERS", "2"))
#: loky's reusable pool is asked for with mmexec's own options, so the loky
#: contender and MemmapExecutor share it without restarting it.
LOKY_TIMEOUT = getattr(getattr(mmexec, "_executor", None), "POOL_IDLE_TIMEOUT", 300)
#: The ProcessPoolExecutor reference chunksize for S3, tuned by hand on a 2-core
#: machine (swept 100..10000 for 20,000 calls: 2500-5000 are best).
PPE_TUNED_CHUNKSIZE = 2500

CONTENDERS = {
    "ppe": "ProcessPoolExecutor",
    "ppe-tuned": "ProcessPoolExecutor(chunksize=2500)",
    "ppe-paths": "ProcessPoolExecutor, task opens memmaps by path",
    "loky": "loky reusable executor",
    "joblib": "joblib.Parallel",
    "mmexec": "MemmapExecutor",
    "mmexec-map": "MemmapExecutor.map",
    "mmexec-Parallel": "mmexec.Parallel",
    "joblib-kept": "joblib.Parallel, one with-block",
    "sequential": "one job",
}


# ----------------------------------------------------------------------------- memory
def _dev(path: str) -> int | None:
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


SHM_FOLDER = "/dev/shm"
SHM_DEV = _dev(SHM_FOLDER)
_SHM_DEV_TEXT = "-" if SHM_DEV is None else f" {os.major(SHM_DEV):02x}:{os.minor(SHM_DEV):02x} "
#: Shared memory that lives on the kernel's internal tmpfs (shared anonymous maps, SysV, memfd).
_SHMEM_PATHS = ("/dev/zero", "/SYSV", "/memfd:")
#: Folders in /dev/shm that belong to a process of the tree (its pid in the name).
_FOLDER_RE = re.compile(r"^(?:mmexec-|joblib_memmapping_folder_|loky-)(\d+)[-_]")


@dataclass(frozen=True)
class MemSample:
    """Bytes used by a process tree at one instant."""

    total: int
    private: int  # PSS without shared memory, summed over the tree
    shared: int  # tmpfs files held by the tree, each counted once
    nprocs: int


def _rollup(pid: int) -> tuple[int, int] | None:
    """(Pss, Pss_Shmem) of ``pid`` in bytes, or None if it is gone."""
    pss = shmem = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss_Shmem:"):
                    shmem = int(line.split()[1]) * 1024
    except OSError:
        return None
    return pss, shmem


class TreeMemory:
    """Memory of a process and all its descendants, shared-memory files counted once."""

    def __init__(self, root: int | None = None, refresh_every: int = 4) -> None:
        self.root = os.getpid() if root is None else root
        self.refresh_every = refresh_every
        self._pids: list[int] = []
        self._count = 0

    def pids(self) -> list[int]:
        try:
            kids = psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            kids = []
        return [self.root] + [k.pid for k in kids]

    def sample(self) -> MemSample:
        # Listing the tree scans all of /proc (~1.5 ms): done every few samples only.
        if self._count % self.refresh_every == 0:
            self._pids = self.pids()
        self._count += 1
        pids = self._pids
        private = 0
        files: dict[tuple[int, int], int] = {}
        for pid in pids:
            r = _rollup(pid)
            if r is None:
                continue
            private += r[0] - r[1]
            self._mapped(pid, files)
            self._open(pid, files)
        self._folders(pids, files)
        shared = sum(files.values())
        return MemSample(private + shared, private, shared, len(pids))

    @staticmethod
    def _mapped(pid: int, files: dict[tuple[int, int], int]) -> None:
        """Shared-memory files mapped by ``pid`` (also deleted ones, kept alive by the map)."""
        seen: set[tuple[str, str]] = set()
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines = f.readlines()
        except OSError:
            return
        for line in lines:
            if _SHM_DEV_TEXT not in line and "/dev/zero" not in line and "/SYSV" not in line and "/memfd:" not in line:
                continue  # cheap filter: most of the ~300 lines are libraries
            parts = line.split(None, 5)
            if len(parts) < 5 or parts[4] == "0":
                continue
            path = parts[5].rstrip("\n") if len(parts) > 5 else ""
            major, minor = parts[3].split(":")
            dev = os.makedev(int(major, 16), int(minor, 16))
            if dev != SHM_DEV and not path.startswith(_SHMEM_PATHS):
                continue
            if (parts[3], parts[4]) in seen:
                continue
            seen.add((parts[3], parts[4]))
            try:
                st = os.stat(f"/proc/{pid}/map_files/{parts[0]}")
                files[(st.st_dev, st.st_ino)] = st.st_blocks * 512
            except OSError:  # no CAP_SYS_ADMIN: count what is mapped of it
                key = (dev, int(parts[4]))
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                files[key] = max(files.get(key, 0), hi - lo)

    @staticmethod
    def _open(pid: int, files: dict[tuple[int, int], int]) -> None:
        """Shared-memory files ``pid`` holds open (mmexec keeps its dumps open, unlinked)."""
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if st.st_dev == SHM_DEV and stat.S_ISREG(st.st_mode):
                files[(st.st_dev, st.st_ino)] = st.st_blocks * 512

    @staticmethod
    def _folders(pids: list[int], files: dict[tuple[int, int], int]) -> None:
        """Files in the tree's mmexec / joblib / loky folders in /dev/shm (e.g. in transit)."""
        wanted = {str(p) for p in pids}
        try:
            entries = list(os.scandir(SHM_FOLDER))
        except OSError:
            return
        for entry in entries:
            m = _FOLDER_RE.match(entry.name)
            if m is None or m.group(1) not in wanted:
                continue
            for folder, _, names in os.walk(entry.path):
                for name in names:
                    try:
                        st = os.lstat(os.path.join(folder, name))
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        files[(st.st_dev, st.st_ino)] = st.st_blocks * 512


class PeakSampler:
    """Sample :class:`TreeMemory` every ``interval`` seconds in a thread between start() and stop()."""

    def __init__(self, tree: TreeMemory | None = None, interval: float = 0.005) -> None:
        self.tree = tree or TreeMemory()
        self.interval = interval
        self.baseline: MemSample | None = None
        self.peak: MemSample | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory-sampler", daemon=True)

    def _take(self) -> None:
        s = self.tree.sample()
        self.samples += 1
        if self.peak is None or s.total > self.peak.total:
            self.peak = s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def start(self) -> PeakSampler:
        self.baseline = self.peak = self.tree.sample()
        self._thread.start()
        return self

    def stop(self) -> PeakSampler:
        self._stop.set()
        self._thread.join()
        self._take()
        return self

    def __enter__(self) -> PeakSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------- contenders
class Runner:
    """One contender: runs a list of calls (or a map) and returns the results in order."""

    def __init__(
        self,
        key: str,
        executor: Any = None,
        parallel: tuple[Any, Any] | None = None,
        use_map: bool = False,
        chunksize: int | None = None,
    ) -> None:
        self.key = key
        self.label = CONTENDERS.get(key, key)
        self.executor = executor
        self.parallel = parallel
        self.use_map = use_map
        self.chunksize = chunksize

    def run(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        """``fn(*c)`` for every ``c``: one submit each (or one map), or one Parallel call."""
        if self.parallel is not None:
            Parallel, delayed = self.parallel
            return list(Parallel(n_jobs=WORKERS)(delayed(fn)(*c) for c in calls))
        if self.use_map:
            return self.map(fn, *zip(*calls, strict=True))
        futures = [self.executor.submit(fn, *c) for c in calls]
        return [f.result() for f in futures]

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
        """``map(fn, *iterables)`` with the contender's defaults (or the tuned chunksize)."""
        if self.parallel is not None:
            Parallel, delayed = self.parallel
            return list(Parallel(n_jobs=WORKERS)(delayed(fn)(*args) for args in zip(*iterables, strict=False)))
        if self.chunksize is not None:
            return list(self.executor.map(fn, *iterables, chunksize=self.chunksize))
        return list(self.executor.map(fn, *iterables))

    def first_result_of_new_executor(self) -> Any:
        """Warm-start workload: a new executor (or Parallel) and its first trivial result.

        Returns the executor to shut down after the timed part, if any.
        """
        if self.parallel is not None:
            Parallel, delayed = self.parallel
            (pid,) = Parallel(n_jobs=WORKERS)([delayed(_tasks.noop)()])
            new = None
        elif self.key.startswith("ppe"):
            new = ProcessPoolExecutor(max_workers=WORKERS)
            pid = new.submit(_tasks.noop).result()
        elif self.key == "loky":
            new = None
            pid = loky.get_reusable_executor(max_workers=WORKERS, timeout=LOKY_TIMEOUT).submit(_tasks.noop).result()
        else:
            new = mmexec.MemmapExecutor(WORKERS)
            pid = new.submit(_tasks.noop).result()
        assert pid != os.getpid(), "the trivial task ran in the parent"
        return new

    def prime(self) -> None:
        """Start the workers and import numpy in them (several tasks, so every worker gets one)."""
        assert self.run(_tasks.prime, [(i,) for i in range(4 * WORKERS)])[-1] == 6 + 4 * WORKERS - 1


def labelled(key: str, label: str) -> Runner:
    """A row of its own (no pool): ``key`` for the report, ``label`` for its table."""
    runner = Runner(key)
    runner.label = label
    return runner


def _parallel_of(module: Any) -> tuple[Any, Any] | None:
    P, d = getattr(module, "Parallel", None), getattr(module, "delayed", None)
    return None if P is None or d is None else (P, d)


def _uses_ppe(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(str(v).startswith("ppe") for v in callspec.params.values())


@pytest.fixture(scope="session")
def ppe_pool() -> Iterator[ProcessPoolExecutor]:
    """The ProcessPoolExecutor of all workloads, started (forked) before any benchmark array exists."""
    ex = ProcessPoolExecutor(max_workers=WORKERS)
    assert max(ex.map(_tasks.prime, range(4 * WORKERS))) == 6 + 4 * WORKERS - 1
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session", autouse=True)
def _ppe_first(request: pytest.FixtureRequest) -> None:
    if any(_uses_ppe(item) for item in request.session.items):
        request.getfixturevalue("ppe_pool")


@pytest.fixture
def runner(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """The contender named by the test's ``runner`` parameter, primed (pool warm)."""
    key: str = request.param
    to_close = None
    if key.startswith("ppe"):
        r = Runner(key, executor=request.getfixturevalue("ppe_pool"))
        if key == "ppe-tuned":
            r.chunksize = PPE_TUNED_CHUNKSIZE
    elif key == "loky":
        # Asked for at each test: joblib restarts loky's reusable pool with its own options.
        r = Runner(key, executor=loky.get_reusable_executor(max_workers=WORKERS, timeout=LOKY_TIMEOUT))
    elif key == "joblib":
        import joblib

        r = Runner(key, parallel=(joblib.Parallel, joblib.delayed))
    elif key in ("mmexec", "mmexec-map"):
        to_close = mmexec.MemmapExecutor(WORKERS)
        r = Runner(key, executor=to_close, use_map=key == "mmexec-map")
    elif key == "mmexec-Parallel":
        parallel = _parallel_of(mmexec)
        if parallel is None:
            pytest.skip("mmexec.Parallel / mmexec.delayed do not exist yet")
        r = Runner(key, parallel=parallel)
    else:
        raise ValueError(f"unknown contender {key!r}")
    r.prime()
    try:
        yield r
    finally:
        if to_close is not None:
            to_close.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- driver
class Bench:
    """Run one workload for one contender under ``benchmark.pedantic``; record memory."""

    def __init__(self, benchmark: Any) -> None:
        self.benchmark = benchmark

    def __call__(
        self,
        workload: str,
        runner: Runner,
        call: Callable[..., Any],
        *,
        setup: Callable[[int], tuple[Any, ...]] | None = None,
        after: Callable[..., None] | None = None,
        check: Callable[..., object] | None = None,
        rounds: int,
        warmup: int,
        ref_bytes: int | None = None,
        **info: Any,
    ) -> None:
        """Time ``call(*setup(k))`` over ``warmup + rounds`` calls (k = 1, 2, ...).

        ``after(out, *args)`` runs untimed after each call; ``check(out, *args)``
        after the last one (its return value, if not None, is recorded as
        ``extra_info['check']``).
        """
        bm = self.benchmark
        bm.group = workload
        total_calls = warmup + rounds
        state: dict[str, Any] = {"k": 0, "out": None, "sampler": None, "check": None}
        load_before = os.getloadavg()

        def _setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            state["k"] += 1
            args = setup(state["k"]) if setup is not None else ()
            gc.collect()
            if state["k"] == total_calls:
                state["sampler"] = PeakSampler().start()
            return args, {}

        calls: list[float] = []

        def _target(*args: Any) -> None:
            t = time.perf_counter()
            state["out"] = call(*args)
            calls.append(time.perf_counter() - t)

        def _teardown(*args: Any) -> None:
            out, state["out"] = state["out"], None
            if state["k"] == total_calls:
                state["sampler"].stop()
                if check is not None:
                    state["check"] = check(out, *args)
            if after is not None:
                after(out, *args)
            del out

        gc.collect()
        SPARES.drop()  # freed dumps kept by an earlier workload must not hide in the baseline
        start = TreeMemory().sample()  # pool primed, data made, nothing of this workload yet
        t0 = time.perf_counter()
        bm.pedantic(_target, setup=_setup, teardown=_teardown, rounds=rounds, warmup_rounds=warmup)
        wall = time.perf_counter() - t0
        sampler: PeakSampler = state["sampler"]
        assert sampler.baseline is not None and sampler.peak is not None
        bm.extra_info.update(
            workload=workload,
            contender=runner.key,
            label=runner.label,
            workers=WORKERS,
            rounds=rounds,
            warmup_rounds=warmup,
            ref_bytes=ref_bytes,
            peak_bytes=sampler.peak.total - start.total,
            peak_call_bytes=sampler.peak.total - sampler.baseline.total,
            peak_abs_bytes=sampler.peak.total,
            baseline_bytes=start.total,
            peak_shared_bytes=sampler.peak.shared,
            peak_nprocs=sampler.peak.nprocs,
            mem_samples=sampler.samples,
            loadavg_before=load_before[0],
            loadavg_after=os.getloadavg()[0],
            wall_s=round(wall, 3),
            first_call_s=calls[0],  # the first (warmup) call: nothing kept from an earlier call yet
            call_s=calls,
            **info,
        )
        if state["check"] is not None:
            bm.extra_info["check"] = state["check"]


@pytest.fixture
def bench(benchmark: Any) -> Bench:
    """``bench(workload, runner, call, setup=..., rounds=..., warmup=...)``: see :class:`Bench`."""
    return Bench(benchmark)
