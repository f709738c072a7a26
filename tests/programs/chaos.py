"""A chaos loop for MemmapExecutor: threads submit, mutate and shut down at random while workers are killed.

Run by tests/test_chaos.py: ``python chaos.py TASKS SEED``. Prints one JSON line: the tasks run, the wrong
answers (must be 0), the failures by kind, and descriptors, /dev/shm entries and RSS before and after.
"""

import gc
import json
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import CancelledError

import numpy as np

from mmexec import BrokenProcessPool, MemmapExecutor
from mmexec._housekeeper import HOUSEKEEPER
from mmexec._pool import WARM
from mmexec._spares import SPARES

flush = HOUSEKEEPER.flush

THREADS = 8
KILLS = 6


def total(a, scale):
    return float(a.sum()) * scale


def make(n, value):
    return np.full(n, value)


def fds():
    """Descriptors open, less the four each idle warm worker holds (its three pipes, its exit sentinel)."""
    return len(os.listdir("/proc/self/fd")) - 4 * len(WARM.idle_pids())


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shm():
    """This process's folders in /dev/shm (loky's semaphores belong to warm pools still alive: the test
    checks them once this process has exited)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"mmexec-{os.getpid()}-"))


def worker_pids():
    me = str(os.getpid())
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[1] == me and fields[0] != "Z":
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read()
                    if b"popen_loky_posix" in cmdline:  # a worker (not loky's resource tracker)
                        pids.append(int(pid))
            except (OSError, IndexError):
                pass
    return pids


def run_thread(index, budget, stats, lock, seed):
    rng = random.Random(seed * 100 + index)
    arrays = [np.full(rng.choice([1_000, 200_000, 300_000]), float(i)) for i in range(3)]  # 1.6-2.4 MB: dumped
    ex = MemmapExecutor(1)
    done = 0
    while done < budget:
        kind = rng.random()
        try:
            if kind < 0.05:  # shut down at random, and start again
                ex.shutdown(wait=rng.random() < 0.5, cancel_futures=rng.random() < 0.5)
                ex = MemmapExecutor(1)
                continue
            if kind < 0.25:  # mutate an array in place (no task of this thread uses it now)
                a = arrays[rng.randrange(len(arrays))]
                a[rng.randrange(a.size)] += 1.0
                continue
            if kind < 0.35:  # a large result
                n = rng.choice([10, 300_000])
                fut = ex.submit(make, n, 2.0)
                r = fut.result(timeout=120)
                wrong = int(r.shape != (n,) or float(r.sum()) != 2.0 * n)
                done += 1
            else:  # a burst of submits of the same and other arrays
                picks = [rng.randrange(len(arrays)) for _ in range(rng.randrange(1, 20))]
                expected = [float(arrays[i].sum()) * 3.0 for i in picks]
                futures = [ex.submit(total, arrays[i], 3.0) for i in picks]
                got = [f.result(timeout=120) for f in futures]
                wrong = sum(int(g != e) for g, e in zip(got, expected, strict=True))
                done += len(picks)
            with lock:
                stats["tasks"] += 1 if kind < 0.35 else len(picks)
                stats["wrong"] += wrong
        except (BrokenProcessPool, CancelledError, RuntimeError) as exc:
            with lock:
                key = type(exc).__name__
                stats["failures"][key] = stats["failures"].get(key, 0) + 1
            if not isinstance(exc, (BrokenProcessPool, CancelledError)) and "shutdown" not in str(exc):
                raise  # a RuntimeError that is not "cannot schedule new futures after shutdown"
            ex.shutdown(wait=False, cancel_futures=True)
            ex = MemmapExecutor(1)
            done += 1
    ex.shutdown(wait=True)


def main():
    tasks, seed = int(sys.argv[1]), int(sys.argv[2])
    warm = MemmapExecutor(1)  # start loky's machinery before the baseline
    warm.submit(total, np.ones(300_000), 1.0).result()
    warm.shutdown()
    gc.collect()
    flush()
    before = {"fds": fds(), "rss": rss(), "shm": shm()}
    stats = {"tasks": 0, "wrong": 0, "failures": {}, "killed": 0}
    lock = threading.Lock()
    stop = threading.Event()
    rng = random.Random(seed)

    def killer():
        while not stop.wait(rng.uniform(0.5, 2.0)) and stats["killed"] < KILLS:
            pids = worker_pids()
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    stats["killed"] += 1
                except ProcessLookupError:
                    pass

    threads = [threading.Thread(target=run_thread, args=(i, tasks // THREADS, stats, lock, seed))
               for i in range(THREADS)]
    chaos = threading.Thread(target=killer)
    start = time.monotonic()
    for t in threads:
        t.start()
    chaos.start()
    for t in threads:
        t.join()
    stop.set()
    chaos.join()
    gc.collect()
    flush()
    SPARES.drop()
    gc.collect()
    after = {"fds": fds(), "rss": rss(), "shm": shm()}
    print(json.dumps({**stats, "seconds": round(time.monotonic() - start, 1), "before": before, "after": after,
                      "pid": os.getpid()}))


if __name__ == "__main__":
    main()
