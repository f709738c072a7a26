"""An executor's manager thread: the one scheduler between its calls and its workers.

The shape of CPython's ``_ExecutorManagerThread``, with each worker on pipes
of its own (``_wire``) and given one call at a time:

* **dispatch**: a call ready (pickled by the feeder, or here while pickling
  is quick) goes to an idle worker, which is then busy until its reply;
* **replies**: a result is decoded here (``_pickler.decode_result``: large
  arrays adopted from the executor's folder); a result that cannot be
  rebuilt fails its own future only; then the call's files are released and
  its future set (user callbacks run here, as in the standard library);
* **aborts**: a running call chosen by ``abort()`` gets its future failed at
  once, its worker the abort signal, and, ``grace`` seconds later if it has
  not replied, ``SIGKILL``: only that call was in that worker;
* **deaths**: a worker that dies otherwise breaks the executor (as a
  ``ProcessPoolExecutor``'s does); one that retires (``max_tasks_per_child``,
  or it could not map memory) is replaced when a call needs a worker;
* **end**: once the executor is shut down (or collected, or the interpreter
  exits) and every call is done, the workers go back to the warm pool
  (``_pool.WARM``) and the store is closed.

While it runs, it also hosts the process's housekeeping (``_housekeeper``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import time
from concurrent.futures import InvalidStateError
from typing import Any

from loky import BrokenProcessPool
from loky.process_executor import TerminatedWorkerError

from ._core import Core, WorkItem, broken_message
from ._errors import AbortedError
from ._exit import interpreter_exiting
from ._files import FILES
from ._housekeeper import HOUSEKEEPER
from ._pickler import PROTOCOL, decode_result
from ._pool import CALL_IDS, Worker, reap
from ._records import Outcomes
from ._store import Session, owner_of
from ._wire import CALL, INIT_DONE, REPLY_ABORTED, REPLY_BROKEN, REPLY_RETIRE, RESULT, Message

__all__ = ["INLINE_LIMIT", "Manager"]

#: Pickling moves from the manager to the feeder thread once one call took this long (seconds) to pickle, or
#: the calls took :data:`INLINE_AVERAGE` on average: the manager must stay free to read results.
INLINE_LIMIT = 0.05
INLINE_AVERAGE = 0.001
#: While aborted calls still run, the manager looks at them this often (seconds).
_ABORT_POLL = 0.05


class Manager:
    """The manager thread's work for one executor (:meth:`run` is the thread's target)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.hk = -1
        self.fds: list[int] = []
        self.fd_map: dict[int, tuple[Worker, bool]] = {}  # fd -> (worker, whether it is its reply pipe)
        self.average = 0.0  # seconds to pickle a call here (a moving average)

    def run(self) -> None:
        core = self.core
        HOUSEKEEPER.host_started()
        try:
            self.hk = HOUSEKEEPER.wake_fd()
            while True:
                if core.aborts:
                    self.apply_aborts()
                self.dispatch()
                if self.finished():
                    break
                core.manager_sleeping = True
                if self.has_work_now():
                    core.manager_sleeping = core.manager_starving = False
                    continue
                if core.workers_changed:
                    self.watch()
                ready = select.select(self.fds, [], [], self.timeout())[0]
                core.manager_sleeping = core.manager_starving = False
                for fd in ready:
                    self.on_ready(fd)
                self.tend_aborts()
                if HOUSEKEEPER.next_delay() == 0.0:
                    HOUSEKEEPER.run_pending()
        except BaseException as exc:  # a bug of ours: fail every future rather than leave one pending
            core.crash(exc)
            raise
        finally:
            self.end()

    # ------------------------------------------------------------ the loop
    def watch(self) -> None:
        core = self.core
        with core.lock:
            workers = list(core.workers.values())
            core.workers_changed = False
        self.fd_map = {}
        for worker in workers:
            self.fd_map[worker.reply_fd] = (worker, True)
            self.fd_map[worker.sentinel] = (worker, False)
        self.fds = [core.wake_r, self.hk, *self.fd_map]

    def timeout(self) -> float | None:
        delay = HOUSEKEEPER.next_delay()
        if any(item.aborted for item in self.core.running.values()):
            delay = _ABORT_POLL if delay is None else min(delay, _ABORT_POLL)
        return delay

    def has_work_now(self) -> bool:
        """Whether to loop again at once (``manager_sleeping`` is set first: see ``Core.put``)."""
        core = self.core
        core.manager_starving = bool(core.idle)
        if core.aborts:
            return True
        if core.broken is not None or not core.idle:
            return False
        return bool(core.ready or (core.inline and (core.pending or core.burst)))

    def finished(self) -> bool:
        core = self.core
        if core.broken is not None:
            return core.feeder is None or core.feeder_ended
        if not (core.shutdown or core.gone or interpreter_exiting()):
            return False
        with core.lock:
            core.feed_cond.notify_all()  # (the feeder ends once nothing is pending)
            return not core.items and not core.encoding

    def on_ready(self, fd: int) -> None:
        core = self.core
        if fd == core.wake_r:
            with contextlib.suppress(BlockingIOError, OSError):
                while os.read(fd, 4096):
                    pass
            return
        if fd == self.hk:
            HOUSEKEEPER.run_pending()
            return
        found = self.fd_map.get(fd)
        if found is None or found[0].pid not in core.workers:
            return  # (a worker already gone this turn)
        worker, replies = found
        if not replies:  # it ended with its reply pipe still open (a fork child holds a copy): read what is left
            with contextlib.suppress(OSError):
                os.set_blocking(worker.reply_fd, False)
        try:
            messages, open_ = worker.reader.feed()
        except (BlockingIOError, InterruptedError):
            messages, open_ = [], replies
        except OSError:
            messages, open_ = [], False
        for message in messages:
            self.on_reply(worker, message)
        del messages
        if not open_ or not replies:
            self.on_death(worker)

    # ------------------------------------------------------------ dispatch
    def dispatch(self) -> None:
        """Send ready calls to idle workers, one each (pickling them here first while that is quick)."""
        core = self.core
        while core.idle:
            with core.lock:
                if core.broken is not None:
                    return
                if core.ready:
                    item = core.ready.popleft()
                    session: Session | None = None
                    if core.feeder_waiting and len(core.ready) <= core.max_workers:
                        core.feed_cond.notify()
                elif core.inline and (core.pending or core.burst):
                    batch, session = core.take(1)
                    item = batch[0]
                else:
                    return
            if session is not None and not self.encode_inline(item, session):
                continue
            if not item.future.set_running_or_notify_cancel():
                core.release(item)
                core.forget(item)
                continue
            self.send(core.idle.pop(), item)
        if core.pending or core.burst or core.ready:
            with core.lock:
                lease = core.needs_worker()
            if lease:
                core.lease_worker()

    def encode_inline(self, item: WorkItem, session: Session) -> bool:
        """Pickle an item here; if pickling turns out slow, the feeder thread does it from now on."""
        core = self.core
        start = time.perf_counter()
        ok = core.encode(item, session)
        took = time.perf_counter() - start
        self.average = 0.9 * self.average + 0.1 * took
        slow = took > INLINE_LIMIT or self.average > INLINE_AVERAGE
        with core.lock:
            core.encoding -= 1
            if slow and core.inline:
                core.inline = False
                core.start_threads()
                core.feed_cond.notify()
        return ok

    def send(self, worker: Worker, item: WorkItem) -> None:
        core = self.core
        spares = core.store.lend_spares(item.count)
        assert item.holds is not None and item.payload is not None
        if spares:
            item.holds.spares = (core.store, [path for path, _ in spares])
        buffers, blobs = item.meta
        files_ok = FILES.descriptors.left() >= 8 * FILES.descriptors.PER_FILE
        meta = b"" if not (spares or buffers or blobs or not files_ok) else pickle.dumps(
            (spares or None, files_ok, buffers or None, blobs), PROTOCOL
        )
        item.ident = next(CALL_IDS)
        item.worker, worker.item = worker, item
        worker.served = True
        core.running[item.ident] = item
        payload, item.payload = item.payload, None
        try:
            worker.send(CALL, item.ident, payload, meta)
        except OSError:
            pass  # the worker died: its death is seen next (this call was running in it)

    # ------------------------------------------------------------ replies
    def on_reply(self, worker: Worker, message: Message) -> None:
        core = self.core
        worker.ready = True
        if message.kind == INIT_DONE:
            if message.flags & REPLY_RETIRE:  # the worker exits now; its end breaks the executor (on_death)
                worker.retiring = True
                worker.failure = bytes(message.body).decode(errors="replace")
            return
        if message.kind != RESULT:
            return
        flags = message.flags
        item = core.running.pop(message.ident, None)
        worker.item = None
        if flags & REPLY_RETIRE:
            worker.retiring = True
        kept, buffers, files, blobs = pickle.loads(message.meta) if message.meta else ((), (), (), False)
        for path in kept:
            owner = owner_of(path)
            if owner is not None:
                owner.mark_kept(path)
        if worker.retiring:
            self.retire(worker)
        elif worker.pid in core.workers and not worker.killed:
            core.idle.append(worker)
            if not flags & REPLY_BROKEN:
                self.dispatch()  # first: the worker gets its next call while this result is decoded and set
        outcome: Outcomes | BaseException | None = None
        if item is None or flags & REPLY_ABORTED:
            core.store.discard_results(files, buffers)
            if item is not None and not item.aborted:  # (never: a worker stops only calls it was asked to)
                outcome = AbortedError("the worker stopped this task unasked")
        else:
            try:
                outcome = decode_result(message.body, core.store, buffers, blobs, files)
            except BaseException as exc:  # (ResultError) fails this future only
                outcome = exc
        del message
        if item is not None:
            core.release(item)
            if outcome is not None:
                self.settle(item, outcome)
            core.forget(item)
        del outcome
        if flags & REPLY_BROKEN:
            core.break_(BrokenProcessPool(
                "A task could not be unpickled in a worker: the executor cannot run tasks (see the failed "
                "future's exception for the cause). Create a new executor."
            ))

    @staticmethod
    def settle(item: WorkItem, outcome: Outcomes | BaseException) -> None:
        """Set ``item``'s future, unless an abort already did."""
        future = item.future
        with contextlib.suppress(InvalidStateError):
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            elif not item.single:
                future.set_result(outcome)
            elif outcome.error is not None:
                future.set_exception(outcome.error)
            else:
                future.set_result(outcome.values[0])

    def retire(self, worker: Worker) -> None:
        """A worker that exits after its reply: forget it (its end is expected); another is leased when a call
        needs one."""
        core = self.core
        with core.lock:
            core.workers.pop(worker.pid, None)
            core.workers_changed = True
        worker.close()
        HOUSEKEEPER.call_later(1.0, reap, worker.process)

    def on_death(self, worker: Worker) -> None:
        core = self.core
        with core.lock:
            if core.workers.pop(worker.pid, None) is None:
                return
            core.workers_changed = True
            if worker in core.idle:
                core.idle.remove(worker)
        code = worker.exitcode()
        worker.close()
        item, worker.item = worker.item, None
        core.store.sweep_partial_results()  # it may have died while writing a result
        if worker.failure is not None:  # (as the standard library: after the process ended, so that what the
            core.break_(BrokenProcessPool(  # initializer logged on a multiprocessing.Queue has arrived)
                "A child process failed to run the executor's initializer; the executor cannot run tasks. "
                f"Fix the initializer and create a new executor.\n\nThe initializer raised:\n{worker.failure}"
            ))
            return
        if worker.killed or (worker.retiring and item is None):
            if item is not None:  # killed by an abort: its future says so already
                core.running.pop(item.ident, None)
                with contextlib.suppress(InvalidStateError):
                    item.future.set_exception(AbortedError(
                        "the task was aborted while it ran; its worker was killed after the grace period"
                    ))
                core.release(item)
                core.forget(item)
            return
        if item is None and not worker.served:  # a warm worker that died idle before its first call here (it
            return  # was leased as it died): nothing of this executor's was in it; another is leased
        core.break_(TerminatedWorkerError(
            "A worker process managed by the executor was unexpectedly terminated. This could be caused by a "
            "segmentation fault while calling the function or by an excessive memory usage causing the Operating "
            f"System to kill the worker.\n\nThe exit codes of the workers are {{{_exit_name(code)}}}"
        ))

    # ------------------------------------------------------------ aborts
    def apply_aborts(self) -> None:
        core = self.core
        with core.lock:
            requests = list(core.aborts)
            core.aborts.clear()
        now = time.monotonic()
        for request in requests:
            chosen = request.futures
            for item in list(core.running.values()):
                if chosen is not None and item.future not in chosen:
                    continue
                with contextlib.suppress(InvalidStateError):
                    item.future.set_exception(AbortedError("the task was aborted while it ran"))
                    item.aborted = True
                    item.deadline = now + request.grace
                    if item.worker is not None:
                        item.worker.abort(item.ident)
            request.done.set()
        self.tend_aborts()

    def tend_aborts(self) -> None:
        now = time.monotonic()
        for item in list(self.core.running.values()):
            if item.aborted and now >= item.deadline and item.worker is not None and not item.worker.killed:
                item.worker.kill()

    # ------------------------------------------------------------ end
    def end(self) -> None:
        """Every call is done (or failed): give the workers back, close the store."""
        core = self.core
        with core.lock:
            core.ended = True
            workers = list(core.workers.values())
            core.workers.clear()
            core.idle.clear()
            items = list(core.items)
            core.feed_cond.notify_all()
        error = BrokenProcessPool(broken_message(core.broken or RuntimeError("the manager thread ended")))
        for item in items:  # (a crash: whatever is left)
            with contextlib.suppress(InvalidStateError):
                item.future.set_exception(error)
            core.release(item)
            core.forget(item)
        ended = []
        for worker in workers:
            if core.broken is not None or worker.item is not None:
                if not worker.retiring:  # (one that retires exits by itself, after flushing what it logged)
                    worker.kill()
                worker.close()
                ended.append(worker)
            else:
                core.source.give_back(worker)
        for worker in ended:  # (as the standard library's shutdown, which joins its processes)
            if worker.exitcode(5.0) is None:
                worker.kill()
                worker.exitcode(1.0)
        core.close()
        HOUSEKEEPER.host_ended()


def _exit_name(code: int | None) -> str:
    if code is None:
        return "UNKNOWN"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{signal.Signals(-code).name}({code})"
    return f"EXIT({code})"


def manager_for(core: Core) -> Any:
    """The manager thread's target for ``core``."""
    return Manager(core).run
