"""The process's pvAccess I/O threads, scheduled so that they do not preempt the work.

pvAccess moves every frame on threads of its own: a connection's ``TCP-rx`` (which
also calls a processor's ``process()``) and ``TCP-tx`` (which sends each output to a
client). Each wakes up for every frame, thousands of times a second, and preempts the
thread running on its core; the thread that needs long stretches of CPU (the inference
thread: preprocessing, the engine, encoding and publishing a batch) is interrupted for
each of them and then waits on the run queue. Where the process may schedule threads in
real time (root, or a non-zero RLIMIT_RTPRIO), EPICS creates these threads ``SCHED_FIFO``
(priority 50 and up): they then always run first, wherever they wake up.

Under ``SCHED_BATCH`` (any process may choose it for its own threads; no privilege
needed) a thread that wakes up does not preempt: it runs on an idle core at once, or
when the running thread's time slice ends. It keeps its share of the CPU and its nice
value. Measured figures: ``docs/benchmarks.md``, "pvAccess's I/O threads and the
inference thread".

:class:`IoThreads` finds the threads by name in ``/proc/self/task`` and sets them; a
connection made later (a new client of the output channel) brings new threads, so
:meth:`IoThreads.poll` looks again at most once per ``every_s``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

IO_THREAD_NAMES = ("TCP-rx", "TCP-tx")  # pvAccess's names for a connection's receive and send threads
POLICIES = {
    "batch": "pvAccess's I/O threads run under Linux's SCHED_BATCH: waking up for a frame, they do not preempt "
             "the inference thread",
    "unchanged": "pvAccess's I/O threads keep the policy pvAccess gave them: SCHED_FIFO where the process may (root, "
                 "RLIMIT_RTPRIO), else the normal one; either way they preempt the inference thread when they wake up",
}
_TASKS = Path("/proc/self/task")


class IoThreads:
    """Puts this process's pvAccess I/O threads under ``policy`` (one of :data:`POLICIES`).

    :meth:`apply` scans now; :meth:`poll` scans at most once per ``every_s`` (cheap to call
    for every frame). ``set_threads`` counts the threads set so far. Where the system cannot
    (no ``SCHED_BATCH``, no ``/proc``), the first scan logs why, once, and later ones do
    nothing: frames are processed as before.
    """

    def __init__(self, policy: str = "batch", log: logging.Logger | None = None, every_s: float = 1.0,
                 names: tuple[str, ...] = IO_THREAD_NAMES, tasks: Path = _TASKS):
        if policy not in POLICIES:
            raise ValueError(f"ioThreads must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.log = log or logging.getLogger(__name__)
        self.every_s = every_s
        self.names = names
        self._tasks = tasks
        self._seen: set[int] = set()  # the live I/O threads already set (or refused)
        self._next = 0.0
        self._lock = threading.Lock()  # one scan at a time; poll() never waits for it
        why_not = None if policy == "unchanged" else _unsupported(tasks)
        self._active = policy == "batch" and why_not is None  # whether scans set anything
        self.set_threads = 0
        if why_not:
            self.log.warning("ioThreads %s: not possible here (%s); pvAccess's I/O threads keep the default policy",
                             policy, why_not)

    def poll(self) -> None:
        """:meth:`apply` if ``every_s`` has passed since the last scan; else nothing."""
        if not self._active:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every_s
            self.apply()

    def apply(self) -> int:
        """Set the I/O threads not seen before; the number set by this call."""
        if not self._active or not self._lock.acquire(blocking=False):
            return 0
        try:
            n = 0
            alive = set()
            for entry in self._tasks.iterdir():
                tid = int(entry.name)
                alive.add(tid)
                if tid in self._seen:
                    continue
                try:  # read each scan until it is an I/O thread: a thread just made has its name a moment later
                    name = (entry / "comm").read_text().strip()
                except OSError:  # the thread ended meanwhile
                    continue
                if name in self.names:
                    self._seen.add(tid)
                    n += self._set(tid, name)
            self._seen &= alive  # threads that ended (a closed connection's)
            self.set_threads += n
            if n:
                self.log.info("ioThreads batch: %d pvAccess I/O thread(s) set to SCHED_BATCH (%d so far)",
                              n, self.set_threads)
            return n
        finally:
            self._lock.release()

    def _set(self, tid: int, name: str) -> bool:
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
            return True
        except ProcessLookupError:  # ended meanwhile
            return False
        except OSError as exc:
            self.log.warning("ioThreads batch: cannot set %s (thread %d) to SCHED_BATCH: %s", name, tid,
                             exc.strerror or exc)
            return False


def _unsupported(tasks: Path) -> str | None:
    """Why SCHED_BATCH cannot be set here, or None."""
    if not hasattr(os, "SCHED_BATCH") or not hasattr(os, "sched_setscheduler"):
        return "this system has no SCHED_BATCH (Linux only)"
    if not tasks.is_dir():
        return f"no {tasks} to find the threads in"
    return None

