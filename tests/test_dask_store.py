"""DaskScatterStore without a cluster: its weakref callbacks take no lock."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc, sys, faulthandler
import numpy as np
from mmexec._dask import DaskScatterStore
from mmexec._store import Session

class Future:
    def __init__(self, key):
        self.key = key
    def __del__(self):  # as distributed's Future.__del__: it allocates, so a collection may run here
        junk = [[i] for i in range(200)]

class Client:
    n = 0
    def scatter(self, a, hash=False):
        Client.n += 1
        return Future(f"k{Client.n}")

store = DaskScatterStore(Client(), 10)
a = np.ones(100)
store._future_for(a, Session())
class Box:
    pass
gc.collect(); gc.disable()
b = Box(); b.me = b; b.arr = np.ones(100)  # freed only by the cyclic collector
store._future_for(b.arr, Session())
del b
gc.set_threshold(gc.get_count()[0] + 50); gc.enable()
faulthandler.dump_traceback_later(20, exit=True)
a[0] = 2.0
store._future_for(a, Session())  # the old copy is dropped: its __del__ collects b.arr, whose callback runs
faulthandler.cancel_dump_traceback_later()
print("ok")
"""


def test_a_collection_inside_a_dropped_future_does_not_deadlock_the_store():
    """Dropping a scattered copy may run a collection that frees another scattered array; its weakref
    callback must not wait for the lock the dropping thread holds (it queues the drop instead)."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
