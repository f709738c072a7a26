"""Parent and forked child use mmexec side by side; prints one JSON line of what each saw.

Run by tests/test_fork.py. The parent frees a result the child inherited and
reuses its size many times, while the child checks that inherited result,
passes it to an executor of its own and runs tasks of its own.
"""

import gc
import json
import os
import sys
import warnings

import numpy as np

import mmexec
from mmexec._spares import SPARES

N = 2**18  # 2 MiB of float64: memory-mapped both ways
ROUNDS = 10


def fill(n, value):
    return np.full(n, value, dtype=np.float64)


def total(a):
    return float(a.sum())


def child(ex, inherited, a, go, report):
    out = {"wrong": 0, "pid": os.getpid()}
    os.read(go, 1)  # the parent has freed the inherited result and reused its size
    out["inherited"] = float(inherited.sum())
    out["spares_after_fork"] = len(SPARES._items)
    try:
        ex.submit(total, a)
        out["parent_executor"] = "accepted"
    except RuntimeError as exc:
        out["parent_executor"] = str(exc)
    with mmexec.MemmapExecutor(2) as own:
        out["inherited_via_own_executor"] = own.submit(total, inherited).result()
        for i in range(ROUNDS):
            got = own.submit(fill, N, 1000.0 + i).result()
            out["wrong"] += int(got.sum() != (1000.0 + i) * N)
            out["wrong"] += int(own.submit(total, got).result() != (1000.0 + i) * N)
    os.write(report, json.dumps(out).encode())


def main():
    warnings.simplefilter("ignore", DeprecationWarning)  # fork() in a process with threads (3.12+)
    result = {"parent_wrong": 0, "pid": os.getpid()}
    with mmexec.MemmapExecutor(2) as ex:
        inherited = ex.submit(fill, N, 1.0).result()
        a = np.ones(N)
        assert ex.submit(total, a).result() == N
        freed = ex.submit(fill, N, 9.0).result()
        del freed
        gc.collect()
        ex._store.apply_releases()  # (the manager applies it soon anyway): the freed file is now a spare
        result["spares_before_fork"] = len(SPARES._items)
        go_r, go_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                child(ex, inherited, a, go_r, rep_w)
            except BaseException as exc:  # report, never fall back into the parent's code
                os.write(rep_w, json.dumps({"error": repr(exc)}).encode())
            finally:
                os._exit(0)
        del inherited
        gc.collect()
        for i in range(ROUNDS):  # same size as the freed result: its file would serve again
            got = ex.submit(fill, N, float(i + 2)).result()
            result["parent_wrong"] += int(got.sum() != (i + 2) * N)
            b = np.full(N, float(i + 2))
            result["parent_wrong"] += int(ex.submit(total, b).result() != (i + 2) * N)
        os.write(go_w, b"x")
        for i in range(ROUNDS):  # side by side with the child's tasks
            b = np.full(N, float(i + 50))
            result["parent_wrong"] += int(ex.submit(total, b).result() != (i + 50) * N)
        os.close(rep_w)
        data = b""
        while chunk := os.read(rep_r, 65536):
            data += chunk
        _, status = os.waitpid(pid, 0)
        result["child"] = json.loads(data) if data else None
        result["child_status"] = status
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
