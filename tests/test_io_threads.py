"""pvAccess's I/O threads under SCHED_BATCH (``ioThreads``), in this process and in a real consumer."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from channel_names import PREFIX
from edge_ptychonn.io_threads import IoThreads
from edge_ptychonn.tools.processes import OutputCollector, consumer_argv, realtime_allowed, sim_server_argv, start

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH") or not Path("/proc/self/task").is_dir(),
                                reason="SCHED_BATCH and /proc are Linux's")


class NamedThread:
    """A thread of this process with the OS name ``name`` (as pvAccess names its own), alive
    until closed."""

    def __init__(self, name: str):
        self._ready, self._done = threading.Event(), threading.Event()
        self.tid = 0
        self._thread = threading.Thread(target=self._run, args=(name,), daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def _run(self, name: str) -> None:
        self.tid = threading.get_native_id()
        Path(f"/proc/self/task/{self.tid}/comm").write_text(name)
        self._ready.set()
        self._done.wait(30)

    @property
    def policy(self) -> int:
        return os.sched_getscheduler(self.tid)

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)


@pytest.fixture
def named():
    made = []

    def make(name: str) -> NamedThread:
        made.append(NamedThread(name))
        return made[-1]

    yield make
    for thread in made:
        thread.close()


def test_the_io_threads_and_only_they_are_set_to_batch(named):
    rx, tx, other = named("TCP-rx"), named("TCP-tx"), named("worker")
    io = IoThreads("batch")
    assert io.apply() == 2 and io.set_threads == 2
    assert rx.policy == tx.policy == os.SCHED_BATCH
    assert other.policy == os.SCHED_OTHER
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER  # the caller's own
    assert io.apply() == 0  # seen: not set again
    later = named("TCP-tx")  # a connection made later
    assert io.apply() == 1 and later.policy == os.SCHED_BATCH and io.set_threads == 3


def test_a_thread_that_takes_its_name_after_a_scan_is_set_by_the_next(named):
    """A new thread has the process's name until it names itself: a scan in between must not
    pass it over for good."""
    thread = named("pvapy-hpc-consu")
    io = IoThreads("batch")
    assert io.apply() == 0
    Path(f"/proc/self/task/{thread.tid}/comm").write_text("TCP-rx")
    assert io.apply() == 1 and thread.policy == os.SCHED_BATCH


def test_poll_looks_again_only_once_its_interval_has_passed(named):
    io = IoThreads("batch", every_s=3600)
    first = named("TCP-rx")
    io.poll()
    assert first.policy == os.SCHED_BATCH
    second = named("TCP-rx")
    io.poll()  # within the hour: no scan
    assert second.policy == os.SCHED_OTHER
    io._next = 0.0  # the hour has passed
    io.poll()
    assert second.policy == os.SCHED_BATCH


def test_unchanged_leaves_every_thread_as_it_is(named):
    rx = named("TCP-rx")
    io = IoThreads("unchanged")
    io.poll()
    assert io.apply() == 0 and rx.policy == os.SCHED_OTHER


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="ioThreads must be one of batch, unchanged"):
        IoThreads("fifo")


def test_where_threads_cannot_be_found_it_says_so_once_and_does_nothing(named, tmp_path, caplog):
    rx = named("TCP-rx")
    with caplog.at_level(logging.WARNING):
        io = IoThreads("batch", tasks=tmp_path / "no-such-folder")
        io.poll()
        assert io.apply() == 0
    assert rx.policy == os.SCHED_OTHER
    assert [r.message for r in caplog.records if "ioThreads" in r.message] == [
        f"ioThreads batch: not possible here (no {tmp_path / 'no-such-folder'} to find the threads in); "
        "pvAccess's I/O threads keep the default policy"]


def test_a_child_started_without_realtime_cannot_take_it(tmp_path):
    """What the bench's --no-realtime gives the processes it starts: no SCHED_FIFO, as a user's."""
    take_fifo = [sys.executable, "-c", "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))"]
    without = start("without", take_fifo, dict(os.environ), tmp_path, realtime=False)
    assert without.wait(30) == 1 and "PermissionError" in without.log()
    if not realtime_allowed():
        pytest.skip("this process may not schedule in real time itself: nothing to take away")
    with_it = start("with", take_fifo, dict(os.environ), tmp_path)
    assert with_it.wait(30) == 0, with_it.log()


# a process that serves a channel (its pvAccess threads made before giving up real time: what
# made EPICS abort when the capability was taken from the running process) and monitors it, after
# giving up real time or not, and prints the name and policy of each of its threads
THREAD_POLICIES = """
import os, sys, time
import pvaccess as pva
from edge_ptychonn.tools import processes
print("pid", os.getpid())
server = pva.PvaServer(sys.argv[2], pva.PvObject({"value": pva.INT}, {"value": 7}))
if sys.argv[1] == "give-up":
    print("gave up:", processes.give_up_realtime())
channel, got = pva.Channel(sys.argv[2]), []
channel.subscribe("got", got.append)
channel.startMonitor()
names = lambda: {tid: open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task")}
deadline = time.monotonic() + 20
while not (got and {"TCP-rx", "TCP-tx"} <= set(names().values())) and time.monotonic() < deadline:
    time.sleep(0.05)
for tid, name in names().items():
    print("thread", "fifo" if os.sched_getscheduler(int(tid)) == os.SCHED_FIFO else "not-fifo", name)
channel.stopMonitor()
"""


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["give-up", "keep"])
def test_a_process_that_gave_up_real_time_makes_its_pvaccess_threads_as_a_users(pva_env, tmp_path, mode):
    """What bench's and soak's --no-realtime do to their own output collector: pvAccess threads
    made after give_up_realtime() are not SCHED_FIFO, where (root) they would be without it."""
    if not realtime_allowed():
        pytest.skip("this process may not schedule in real time itself: nothing to give up")
    channel = f"{PREFIX}:rt{os.getpid()}:{mode}"
    run = start(mode, [sys.executable, "-c", THREAD_POLICIES, mode, channel], pva_env, tmp_path)
    assert run.wait(60) == 0, run.log()
    threads = [line.split(maxsplit=2)[1:] for line in run.log().splitlines() if line.startswith("thread ")]
    connection = {policy for policy, name in threads if name in ("TCP-rx", "TCP-tx")}
    assert {name for _, name in threads} >= {"TCP-rx", "TCP-tx"}, run.log()
    if mode == "give-up":  # the command ran again (same pid), without real time
        assert "gave up: True" in run.log() and {policy for policy, _ in threads} == {"not-fifo"}, run.log()
        assert run.log().count(f"pid {run.pid}\n") == 2, run.log()
    else:
        assert connection == {"fifo"}, run.log()


@pytest.mark.e2e
def test_a_consumers_io_threads_run_under_batch_while_it_streams(pva_env, procs, small_model, tmp_path):
    """A real consumer: once frames flow, its pvAccess receive and send threads (input, and the
    test's client of its output) are SCHED_BATCH; it publishes every frame."""
    n_frames = 40
    np.save(tmp_path / "scan.npy", np.random.default_rng(3).poisson(25, (n_frames, 64, 64)).astype(np.int16))
    image_channel, prefix = f"{PREFIX}:io:image", f"{PREFIX}:io:inference"
    args = {"modelPath": str(small_model), "engine": "zero", "batchTimeout": 0.05}
    consumer = start("consumer", consumer_argv(image_channel, prefix, 1, "processors.ptychonn.PtychoNNProcessor", args),
                     pva_env, tmp_path)
    procs.append(consumer)
    procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", image_channel, fps=100, start_delay_s=5),
                       pva_env, tmp_path))
    collector = OutputCollector([f"{prefix}:1:output"])
    try:
        assert collector.wait_connected(4.5), consumer.log()[-3000:]
        assert collector.wait_count(n_frames, timeout_s=30, idle_s=10) == n_frames, consumer.log()[-3000:]
        threads = _io_threads(consumer.pid)  # while the test's client of the output is still connected
        names = {(task / "comm").read_text().strip() for task in Path(f"/proc/{consumer.pid}/task").iterdir()}
    finally:
        collector.close()
    assert {name for name, _ in threads.values()} == {"TCP-rx", "TCP-tx"}, threads
    assert "ptychonn-infer" in names, names  # our inference thread, named for the OS (top -H, bench)
    assert all(policy == os.SCHED_BATCH for _, policy in threads.values()), threads


def _io_threads(pid: int) -> dict[int, tuple[str, int]]:
    """Thread id -> (name, scheduling policy) of process ``pid``'s pvAccess TCP threads."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            if name in ("TCP-rx", "TCP-tx"):
                found[int(task.name)] = (name, os.sched_getscheduler(int(task.name)))
        except (OSError, ProcessLookupError):  # the thread ended meanwhile
            pass
    return found
