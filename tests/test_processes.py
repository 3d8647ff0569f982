"""The process helpers keep PVA traffic on loopback and stop what they start."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import group_gone, lines_until
from edge_ptychonn.tools import processes
from edge_ptychonn.tools.processes import LOOPBACK_ENV, child_pids, start, use_loopback, wait_until

MODEL = Path(__file__).resolve().parent.parent / "data" / "ptychonn.onnx"


def test_loopback_multicast_reads_and_sets_the_flag_without_the_ip_command(monkeypatch):
    """Where iproute2 is missing (a bare container), the interface flags are read and set
    through the kernel: the answer agrees with what /sys says of lo."""
    flags = Path("/sys/class/net/lo/flags")
    if not flags.exists():
        pytest.skip("no /sys/class/net/lo here")
    monkeypatch.setattr(processes.shutil, "which", lambda name: None)
    ok, reason = processes.loopback_multicast()
    on = bool(int(flags.read_text(), 16) & 0x1000)  # IFF_MULTICAST
    if os.geteuid() == 0:
        assert ok and on and reason in ("already on", "turned on")
    else:  # without root it can only read: on, or a failure that says what it needs
        assert ok == on and (reason == "already on" if on else "needs root" in reason)


def test_child_processes_get_the_loopback_settings():
    # servers bind to loopback only, searches and beacons go to it only
    assert LOOPBACK_ENV["EPICS_PVAS_INTF_ADDR_LIST"] == LOOPBACK_ENV["EPICS_PVA_ADDR_LIST"] == "127.0.0.1"
    assert LOOPBACK_ENV["EPICS_PVA_AUTO_ADDR_LIST"] == LOOPBACK_ENV["EPICS_PVAS_AUTO_BEACON_ADDR_LIST"] == "NO"
    env = use_loopback()
    for key, value in LOOPBACK_ENV.items():
        assert env[key] == value and os.environ[key] == value


def test_a_replay_longer_than_an_hour_is_not_cut_short(tmp_path):
    """The sim server stops streaming at its runtime, mid-scan or not. Before: always an hour,
    so a replay of 2000 frames at 0.5 frames/s (4000 s) lost its last 200 frames."""
    scan = tmp_path / "scan.npy"
    np.save(scan, np.zeros((2000, 2, 2), np.int16))
    argv = processes.sim_server_argv(scan, "det:image", fps=0.5)
    assert float(argv[argv.index("-rt") + 1]) >= 2000 / 0.5
    assert float(argv[argv.index("-rt") + 1]) <= 3 * 2000 / 0.5  # still a bound
    short = processes.sim_server_argv(scan, "det:image", fps=100)
    assert float(short[short.index("-rt") + 1]) == 3600.0  # an hour covers a short scan



def test_a_looping_replay_caches_the_whole_file_and_waits_for_slow_clients(tmp_path):
    """Without replay_once the server publishes the file over and over (its cache holds every
    frame; one less would stream it once), and shutdown_delay_s is how long it lives on after
    its last frame (soak's 5 s, for the frames still queued for a slow consumer)."""
    scan = tmp_path / "scan.npy"
    np.save(scan, np.zeros((200, 2, 2), np.int16))
    argv = processes.sim_server_argv(scan, "det:image", fps=100, runtime_s=30, replay_once=False, shutdown_delay_s=5)
    assert argv[argv.index("-cs") + 1] == "200"
    assert argv[argv.index("-shd") + 1] == "5"
    assert argv[argv.index("-rt") + 1] == "30"
    once = processes.sim_server_argv(scan, "det:image", fps=100)
    assert once[once.index("-cs") + 1] == "199" and once[once.index("-shd") + 1] == "1"

def test_stop_ends_the_whole_process_group(tmp_path):
    # a parent that forks a child which ignores SIGINT, as consumers' workers may
    code = "import os, signal, time\nif os.fork() == 0:\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    proc = start("sleeper", [sys.executable, "-c", code], dict(os.environ), tmp_path)
    try:
        assert proc.running()
        # both are up: the parent and the child that ignores SIGINT
        assert wait_until(lambda: len(child_pids(proc.pid)) == 1, 10)
        proc.stop(grace_s=1.0)
        assert not proc.running()
        assert group_gone(proc.pid), "a child of the stopped process is still running"
    finally:  # whatever a failed check above left running
        if not group_gone(proc.pid, timeout_s=0):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="forked consumers are watched through /proc")
def test_forked_consumers_gone_is_seen_then_gone_or_none_and_a_traceback(tmp_path):
    """The one rule (launch and bench) for a pvapy-hpc-consumer -nc N whose forked consumers all
    exited while its parent lives on: seen, then gone; or none seen, none left and a traceback."""
    release = tmp_path / "release"
    code = (f"import os, pathlib, time\nif os.fork() == 0:\n    while not pathlib.Path({str(release)!r}).exists(): "
            f"time.sleep(0.05)\n    os._exit(0)\ntime.sleep(60)")
    proc = start("consumer", [sys.executable, "-c", code], dict(os.environ), tmp_path)
    try:
        assert wait_until(lambda: child_pids(proc.pid, zombies=False), 10)
        seen: set[int] = set()
        assert not processes.forked_consumers_gone(proc, 2, seen) and seen == {proc.pid}
        release.touch()
        assert wait_until(lambda: not child_pids(proc.pid, zombies=False), 10)
        assert processes.forked_consumers_gone(proc, 2, seen)  # seen, then gone (no traceback)
        assert not processes.forked_consumers_gone(proc, 2, set())  # never seen and no traceback: not yet known
        assert not processes.forked_consumers_gone(proc, 1, {proc.pid})  # -nc 1: PvaPy forks none
        proc.log_path.write_text("Process Process-1:\nTraceback (most recent call last):\nValueError: bad model\n")
        assert processes.forked_consumers_gone(proc, 2, set())  # died before any look: the log says so
    finally:
        proc.stop(grace_s=1.0)


@pytest.mark.parametrize("sig, raised", [(signal.SIGTERM, processes.Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_while_starting_is_raised_once_the_caller_knows_the_process(tmp_path, monkeypatch, sig, raised):
    """A signal that came while ``subprocess.Popen`` waited for the child's exec left
    the child running and unknown: soak's SIGTERM test once found the sim server
    alive after soak had exited. The signal now waits until ``into`` lists the child."""
    popen = subprocess.Popen

    def popen_then_signal(*args, **kwargs):
        child = popen(*args, **kwargs)
        os.kill(os.getpid(), sig)  # as if it came just before Popen returned
        return child

    monkeypatch.setattr(processes.subprocess, "Popen", popen_then_signal)
    started = []
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(raised), processes.stop_on_signals():
            start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), tmp_path,
                  into=started)
        assert len(started) == 1 and started[0].running()
    finally:
        for proc in started:
            proc.stop(grace_s=1.0)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers before are back


def test_stop_interrupts_cleanly_when_the_caller_ignores_sigint(tmp_path):
    # a caller started under nohup or as `cmd &` in a script has SIGINT ignored; its
    # children must still take the SIGINT of stop() (and save what they hold), not
    # wait for the SIGTERM after it
    code = ("import signal, sys, time\n"
            "print('handler', signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)\n"
            "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('interrupted', flush=True)\n    sys.exit(3)")
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    proc = None
    try:
        proc = start("interruptible", [sys.executable, "-c", code], dict(os.environ), tmp_path)
        assert wait_until(lambda: "handler" in proc.log(), 10), proc.log()
        assert proc.stop(grace_s=5.0) == 3, proc.log()
    finally:
        signal.signal(signal.SIGINT, before)
        if proc is not None and proc.running():  # the wait above failed: its sleep 60 must not outlive the test
            proc.stop(grace_s=1.0)
    assert "handler True" in proc.log() and "interrupted" in proc.log()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it has stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_left(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


STARTER = """
import os, sys, time
from pathlib import Path
from edge_ptychonn.tools.processes import start
procs = [start(f"child{i}", [sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ), Path(sys.argv[1]))
         for i in (1, 2)]
print(*(p.pid for p in procs), flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def starter(script: str, *args: str, env: dict | None = None):
    """A starter process running ``script``; yields (it, the first line it printed, a list
    to which the test adds the pids to kill at the end if they are still running)."""
    parent = subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    left: list[int] = []
    try:
        first = lines_until(parent.stdout, lambda lines: True, 60)
        assert first, "the starter printed nothing"
        yield parent, first[0], left
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        _kill_left(left)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_stop_when_their_starter_is_killed(tmp_path):
    """A starter killed outright (SIGKILL: no handler runs) leaves nothing running: the
    kernel sends each child SIGTERM (PR_SET_PDEATHSIG), though each is in its own session."""
    with starter(STARTER, str(tmp_path)) as (parent, first, left):
        left += [int(v) for v in first.split()]
        assert len(left) == 2 and all(map(_alive, left))
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert wait_until(lambda: not any(map(_alive, left)), 10), "a child outlived its killed starter"


WRITER_STARTER = """
import sys, time
from pathlib import Path
from edge_ptychonn.tools import processes as live
argv = live.consumer_argv(sys.argv[2] + ":image", sys.argv[2] + ":h5", 2, "processors.hdf5_writer.Hdf5WriterProcessor",
                          {"outputDirectory": sys.argv[1] + "/h5"}, batch_updates=8, server_queue_size=100, runtime_s=0)
proc = live.start("h5", argv, live.use_loopback(), Path(sys.argv[1]))
print(proc.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_forked_writers_stop_cleanly_when_the_starter_is_killed(tmp_path, pva_env):
    """A launcher killed outright: its HDF5-writer group (PvaPy's parent and 2 forked consumers)
    goes too: the kernel sends SIGTERM to the parent, and to each forked writer when the parent dies."""
    from channel_names import PREFIX

    with starter(WRITER_STARTER, str(tmp_path), f"{PREFIX}:pd", env=pva_env) as (parent, first, left):
        consumer = int(first)
        left.append(consumer)
        assert wait_until(lambda: len(child_pids(consumer)) == 2, 30), "the two forked consumers did not start"
        left += child_pids(consumer)
        log = tmp_path / "h5.log"
        assert wait_until(lambda: log.read_text().count("nFramesReceived") >= 2, 30), log.read_text()[-2000:]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        # without the forked writers' own parent-death signal they outlive it (checked)
        assert wait_until(lambda: not any(map(_alive, left)), 20), "a writer outlived its killed starter"


SOAK = """
import sys
from edge_ptychonn.tools import processes, soak

# sleepers for the consumers and the sim server, no PVA monitors: only the stopping is real
processes.consumer_argv = lambda *args, **kwargs: [sys.executable, "-c", "import time; time.sleep(120)"]
processes.tool_path = lambda name: sys.argv[1]


class Collector:
    def __init__(self, channels, **kwargs):
        self.received = {c: [] for c in channels}

    def count(self):
        return 0

    def close(self):
        pass


processes.OutputCollector = Collector
sys.exit(soak.main(soak.get_args_parser().parse_args(sys.argv[2:])))
"""


def _soak_stopped(tmp_path, sig, harness: str = SOAK, extra: tuple = (), started=None):
    """Run soak in ``harness`` (its processes stand-ins), wait until ``started()`` (default: both
    its processes are running) and send ``sig``; returns (exit status, output, the processes it
    had started, those of them still alive after it exited). Kills whatever is left."""
    sim = tmp_path / "sim"
    sim.write_text("#!/bin/sh\nexec sleep 120\n")
    sim.chmod(0o755)
    soak = subprocess.Popen([sys.executable, "-c", harness, str(sim), "--model", str(MODEL), "--fps", "10", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    kids = []
    try:
        ready = wait_until(lambda: len(child_pids(soak.pid)) == 2 and (started is None or started()), 60)
        kids = child_pids(soak.pid)
        assert ready, f"soak did not start its two processes ({len(kids)} running)"
        os.kill(soak.pid, sig)
        out, _ = soak.communicate(timeout=60)
        left = [pid for pid in kids if _alive(pid)]
    finally:
        if soak.poll() is None:
            os.killpg(soak.pid, signal.SIGKILL)
            soak.wait(10)
        _kill_left(kids)
    return soak.returncode, out, kids, left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_soak_stops_what_it_started_on_sigterm_and_sighup(tmp_path, sig):
    code, out, kids, left = _soak_stopped(tmp_path, sig)
    assert code == 130, out
    assert "soak: interrupted: stopping what it started" in out
    assert left == [], "soak left its processes running"


# the consumers' stand-in tries to take real-time scheduling, says whether it could, and sleeps
TAKE_FIFO = ("import os, time\ntry:\n    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))\n"
             "    print('fifo taken', flush=True)\nexcept PermissionError:\n    print('fifo refused', flush=True)\n"
             "time.sleep(120)")


@pytest.mark.parametrize("no_realtime", [False, True])
def test_soak_no_realtime_starts_its_processes_as_a_users(tmp_path, no_realtime):
    """--no-realtime: what soak starts may not schedule in real time (as bench's option)."""
    if not processes.realtime_allowed():
        pytest.skip("this process may not schedule in real time itself: nothing to take away")
    log = lambda: next(tmp_path.glob("edge-ptychonn-soak-*/consumers.log"), None)  # noqa: E731
    code, out, _, _ = _soak_stopped(tmp_path, signal.SIGTERM, SOAK.replace('"import time; time.sleep(120)"', repr(TAKE_FIFO)),
                                    ("--no-realtime",) if no_realtime else (), lambda: log() and "fifo" in log().read_text())
    assert code == 130, out
    assert ("fifo refused" if no_realtime else "fifo taken") in log().read_text()
    assert ("SCHED_FIFO" in out) != no_realtime, out  # the note on real time only where it applies


@pytest.mark.e2e
def test_soak_counts_the_frames_of_a_consumer_that_died_as_lost(pva_env, tmp_path):
    """The consumer is killed mid-run: every frame the sim server published after that is
    lost, and the soak fails. Before: "sent" was the highest uniqueId that came out, so the
    lost tail was not counted, and the run passed (exit status 0, "lost 0")."""
    from channel_names import PREFIX

    soak = subprocess.Popen(
        [sys.executable, "-m", "edge_ptychonn.cli", "soak", "--engine", "zero", "--fps", "20", "--minutes", "0.1",
         "--every", "1", "--start-delay", "4", "--prefix", f"{PREFIX}:soak{os.getpid()}"],
        cwd=MODEL.parent.parent, env={**pva_env, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        lines = lines_until(soak.stdout, lambda lines: " published " in lines[-1]
                            and int(lines[-1].split(" published ")[1].split(",")[0]) > 0, 90)
        assert lines and " published " in lines[-1], "".join(lines)
        [consumer] = [pid for pid in child_pids(soak.pid)
                      if b"pvapy-hpc-consumer" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(consumer, signal.SIGKILL)
        out, _ = soak.communicate(timeout=120)
    finally:
        if soak.poll() is None:
            os.killpg(soak.pid, signal.SIGKILL)
            soak.wait(10)
    summary = [ln for ln in out.splitlines() if ln.startswith("soak: sent ")]
    assert summary, out
    sent, published, lost = (int(summary[0].split(word)[1].split()[0].strip(",")) for word in
                             ("sent ", "published ", "lost "))
    assert lost == sent - published and lost > 0, summary[0]
    assert "a consumer exited during the run" in summary[0]
    assert soak.returncode == 1, out
    # the logs stay for reading; the generated frames (megabytes each run) are gone
    [work] = tmp_path.glob("edge-ptychonn-soak-*")
    assert not (work / "frames.npy").exists()
    assert {"consumers.log", "sim.log"} <= {p.name for p in work.iterdir()}, list(work.iterdir())


def test_soak_judges_memory_only_after_its_warm_up():
    from edge_ptychonn.tools import soak

    # the warm-up's growth (server queue and caches filling) is no leak: a short run is not judged
    short = [(40.0, [300.0]), (70.5, [420.0])]
    assert soak.memory_growth(short) is None
    long = short + [(100.0, [425.0]), (130.0, [431.5])]
    assert soak.memory_growth(long) == 11.5
    two = [(80.0, [100.0, 200.0]), (110.0, [101.0, 260.0])]
    assert soak.memory_growth(two) == 60.0


def test_soak_waits_for_the_output_queue_to_fill_before_it_judges_memory(capsys):
    """Each slot of the soak's output queue (2000) keeps a frame's memory once used: a consumer
    publishing 20 frames/s grew 64 kB a frame for 100 s, and a healthy, lossless 2-minute run
    was reported as leaking 50.6 MB (exit 1). The warm-up now lasts until the queue is full."""
    from edge_ptychonn.tools import soak

    assert soak.warmup_seconds(10.0, 800.0, 1) == 80.0  # a fast stream: the first minute
    assert soak.warmup_seconds(10.0, 20.0, 1) == 10.0 + 100.0 + 10.0  # 2000 frames at 20/s
    assert soak.warmup_seconds(5.0, 60.0, 4) == 5.0 + 2000 * 4 / 60 + 10.0
    # growth at 64 kB a frame while the queue fills, then flat: judged only once it is full
    samples = [(t, [150.0 + 0.064 * 20 * min(t - 10, 100)]) for t in range(20, 140, 10)]
    assert soak.memory_growth(samples, soak.warmup_seconds(10.0, 20.0, 1)) == 0.0


def test_soak_with_the_zero_engine_needs_a_rate(capsys):
    """Its default rate, 80 % of the engine's own, was 481,000 frames/s for the zero engine (a
    memory copy): the soak lost 653,441 of 724,478 frames."""
    from edge_ptychonn.tools import soak

    args = soak.get_args_parser().parse_args(["--engine", "zero", "--minutes", "0.1"])
    assert soak.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-ptychonn soak: --engine zero needs --fps") and len(err.splitlines()) == 1, err


def test_soak_takes_a_relative_model_from_where_it_is_called(tmp_path, monkeypatch):
    """scripts/soak.sh says so. Before: the consumers, which run in the project root, were given
    the relative path and could not start ("modelPath 'm.onnx' is not a file")."""
    import shutil

    from edge_ptychonn.tools import soak

    shutil.copy(MODEL, tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its logs and frames
    given = []

    def consumer_argv(*args, **kwargs):
        given.append(args[4])
        raise RuntimeError("no consumer started in this test")

    monkeypatch.setattr(processes, "consumer_argv", consumer_argv)
    with pytest.raises(RuntimeError, match="no consumer started"):
        soak.main(soak.get_args_parser().parse_args(["--model", "m.onnx", "--fps", "10", "--engine", "zero"]))
    assert Path(given[0]["modelPath"]) == tmp_path / "m.onnx", given


def test_soak_stopped_says_its_run_is_partial_and_keeps_its_figures(tmp_path, monkeypatch, capsys):
    """Ctrl-C (SIGTERM, SIGHUP): exit 130, a line that says the run is partial with what it counted,
    and --json written with "interrupted" (before: no figure, no --json, minutes of a soak lost)."""
    from edge_ptychonn.tools import soak

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its logs and frames

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(processes, "consumer_argv", stopped)
    out = tmp_path / "soak.json"
    argv = ["--model", str(MODEL), "--fps", "10", "--engine", "zero", "--json", str(out)]
    assert soak.main(soak.get_args_parser().parse_args(argv)) == 130
    assert "soak: interrupted: stopping what it started; a partial run, not judged: published 0" in capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["interrupted"] is True and figures["frames_published"] == 0


@pytest.mark.parametrize("limit", ["nan", "-1"])
def test_soak_refuses_a_memory_limit_no_run_can_meet(limit, capsys, monkeypatch):
    """Before: accepted; every run then failed its memory verdict (exit status 1) with no word
    of why, after its minutes of streaming."""
    from edge_ptychonn.tools import soak

    monkeypatch.setattr(soak, "engine_rate", lambda *a: pytest.fail("soak went on to measure the engine"))
    assert soak.main(soak.get_args_parser().parse_args(["--max-growth-mb", limit, "--model", str(MODEL)])) == 2
    assert "--max-growth-mb >= 0" in capsys.readouterr().err


# pvapy-hpc-consumer -nc 2 whose forked consumers both fail at start: the parent lives on
FORKED_FAIL = """
import os, time
for _ in range(2):
    if os.fork() == 0:
        print("Traceback (most recent call last):\\nRuntimeError: engine failed to start", flush=True)
        os._exit(1)
time.sleep(120)
"""


@pytest.mark.e2e
@pytest.mark.parametrize("consumers, code, said", [
    ("1", [sys.executable, "-c", "raise SystemExit('engine failed to start')"], "(code 1)"),
    # before: PvaPy's parent lives on, and the soak streamed its whole --minutes into nothing
    ("2", [sys.executable, "-c", FORKED_FAIL], "(every forked consumer of pid"),
])
def test_soak_ends_when_its_consumers_have_exited(pva_env, tmp_path, monkeypatch, capsys, consumers, code, said):
    """Consumers that exit (here: at once, as a consumer that cannot start does) leave nothing to
    measure. Before: the soak went on for its whole --minutes (10 by default) publishing nothing,
    and only then said that a consumer had exited."""
    from channel_names import PREFIX
    from edge_ptychonn.tools import soak

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its logs
    monkeypatch.setattr(processes, "consumer_argv", lambda *a, **k: code)
    args = soak.get_args_parser().parse_args(["--engine", "zero", "--fps", "10", "--minutes", "2", "--consumers",
                                              consumers, "--prefix", f"{PREFIX}:soakexit{os.getpid()}"])
    t0 = time.monotonic()
    assert soak.main(args) == 1
    out, err = capsys.readouterr()
    assert f"soak: the consumers exited before publishing a frame {said}" in err, err  # a failure: on stderr
    assert "a consumer exited during the run" in out, out
    assert time.monotonic() - t0 < 40, out  # not the two minutes


class _Unkillable:
    """A Popen stand-in for a process in uninterruptible sleep: SIGKILL does not end it, and a
    wait without a timeout never returns."""

    pid = 2**22 + 12345  # never signalled: os.killpg is replaced in the test
    returncode = None

    def poll(self):
        return None

    def wait(self, timeout=None):
        if timeout is None:
            threading.Event().wait()  # for ever
        time.sleep(min(timeout, 0.01))
        raise subprocess.TimeoutExpired("stuck", timeout)


def test_stop_gives_up_on_a_process_that_outlives_sigkill(monkeypatch):
    """A process stuck in the kernel (uninterruptible sleep) outlives SIGKILL. Before: stop()
    waited for it without a bound, and the tool that stopped it hung with it (deaf to Ctrl-C,
    its signals ignored while it stops); now it returns None and says so."""
    sent, said = [], []
    monkeypatch.setattr(processes.os, "killpg", lambda pid, sig: sent.append(sig))
    proc = processes.Proc("stuck", _Unkillable(), Path("stuck.log"))
    result = []
    stopper = threading.Thread(target=lambda: result.append(proc.stop(grace_s=0.1, say=said.append)), daemon=True)
    stopper.start()
    stopper.join(20)
    assert result == [None], "stop() did not return on a process that outlives SIGKILL"
    assert sent[:3] == [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
    assert said == ["stuck (pid 4206649) did not stop within 0.1 s of SIGINT (state unknown): SIGTERM",
                    "stuck (pid 4206649) did not stop within 2 s of SIGTERM (state unknown): SIGKILL"], said


def test_soak_refuses_more_consumers_than_the_launcher_takes(capsys, monkeypatch):
    """Before: any --consumers was taken, and pvapy-hpc-consumer forked that many consumers, each
    loading its own engine (--consumers 100000 on a two-core host)."""
    from edge_ptychonn.tools import launch, soak

    monkeypatch.setattr(processes, "start", lambda *a, **k: pytest.fail("soak started processes"))
    args = soak.get_args_parser().parse_args(["--consumers", str(launch.MAX_CONSUMERS + 1), "--fps", "10",
                                              "--model", str(MODEL)])
    assert soak.main(args) == 2
    assert f"--consumers 1..{launch.MAX_CONSUMERS}" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--fps", "1e-11"], "--fps must be >= 0.001, got 1e-11"),  # the sim server's timer thread failed
    (["--prefix", "a*b"], "--prefix must be a channel name part without '*'"),  # outputs never found
    (["--start-delay", "-1"], "--start-delay 0..600"),
    (["--start-delay", "nan"], "--start-delay 0..600"),
])
def test_soak_refuses_what_would_fail_late(extra, message, capsys, monkeypatch):
    from edge_ptychonn.tools import soak

    monkeypatch.setattr(processes, "start", lambda *a, **k: pytest.fail("soak started processes"))
    args = soak.get_args_parser().parse_args(["--fps", "10", "--model", str(MODEL), *extra])
    assert soak.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("n_consumers, batch_updates, du", [(2, 1, "1"), (3, 8, "8"), (1, 8, None), (1, 1, None)])
def test_several_consumers_always_share_the_frames(n_consumers, batch_updates, du):
    """Several consumers get PvaPy's distributor, also for runs of 1 frame (before: no ``-du``
    for 1, so no distributor, and every consumer processed every frame); one needs none."""
    argv = processes.consumer_argv("det:image", "inference", n_consumers, "processors.ptychonn.PtychoNNProcessor",
                              batch_updates=batch_updates)
    assert (argv[argv.index("-du") + 1] if "-du" in argv else None) == du, argv


def test_a_collector_finds_an_output_channel_that_appears_after_its_searches_backed_off(pva_env):
    """The output channels of PvaPy's consumers appear only once the sim server's first record
    reaches them, seconds after the test's collector was made. pvAccess spaces a channel's
    searches ever further apart (0.2, 0.5, 0.9, 1.8, 3.6, 7.2 s, ...), so before, a channel that
    appeared at 4 s was found at 7.2 s, after frames had begun to flow (seen in CI: "output
    channels did not appear" within 4 s). Now an unconnected channel is made afresh every
    RESEARCH_S while the collector waits, and is found within about a second."""
    import pvaccess as pva

    from channel_names import PREFIX

    name = f"{PREFIX}:late{os.getpid()}:output"
    collector = processes.OutputCollector([name])
    made = time.monotonic()
    server = None
    try:
        assert not collector.wait_connected(4.0)  # no server yet: its searches back off meanwhile
        server = pva.PvaServer(name, pva.NtNdArray())
        appeared = time.monotonic()
        assert collector.wait_connected(2.5), f"not found {time.monotonic() - appeared:.1f} s after it appeared"
        print(f"found {time.monotonic() - appeared:.2f} s after it appeared, {time.monotonic() - made:.2f} s "
              "after the collector was made")
        assert collector.count() == 0  # the empty record of a connect is no frame
    finally:
        collector.close()
        if server is not None:
            server.stop()


def test_a_collector_keeps_ids_times_and_attributes_unless_told_not_to(pva_env):
    """The bench's collectors leave the attributes out (19 us per frame of their Python);
    the id and the time stamp are read the same either way."""
    import pvaccess as pva
    from pvapy.utility.adImageUtility import AdImageUtility

    from channel_names import PREFIX

    name = f"{PREFIX}:attrs{os.getpid()}:output"
    server = pva.PvaServer(name, pva.NtNdArray())
    collectors = [processes.OutputCollector([name], keep_images=False, keep_attributes=keep) for keep in (True, False)]
    try:
        assert all(c.wait_connected(10.0) for c in collectors)
        frame = AdImageUtility.generateNtNdArray2D(42, np.arange(12, dtype=np.int16).reshape(3, 4))
        frame["attribute"] = [{"name": "ColorMode", "value": pva.PvObject({"value": pva.INT}, {"value": 0})}]
        frame["timeStamp"] = {"secondsPastEpoch": 7, "nanoseconds": 9}
        server.update(name, frame)
        assert wait_until(lambda: all(c.count() == 1 for c in collectors), 10.0)
        (kept,), (bare,) = (list(c.received.values())[0] for c in collectors)
        assert kept.unique_id == bare.unique_id == 42 and kept.image is None is bare.image
        assert kept.time_stamp["secondsPastEpoch"] == bare.time_stamp["secondsPastEpoch"] == 7
        assert kept.time_stamp["nanoseconds"] == bare.time_stamp["nanoseconds"] == 9
        assert [a["name"] for a in kept.attributes] == ["ColorMode"] and bare.attributes == []
    finally:
        for c in collectors:
            c.close()
        server.stop()


CLOSE_WHILE_STREAMING = r"""
import random, sys, threading, time
import numpy as np
import pvaccess as pva
from pvapy.utility.adImageUtility import AdImageUtility
from edge_ptychonn.tools.processes import OutputCollector

name, rounds = sys.argv[1], int(sys.argv[2])
server = pva.PvaServer(name, pva.NtNdArray())
streaming = threading.Event()
streaming.set()

def publish():
    frame = AdImageUtility.generateNtNdArray2D(1, np.zeros((32, 32), np.int16))
    unique_id = 0
    while streaming.is_set():
        unique_id += 1
        frame["uniqueId"] = unique_id
        server.update(name, frame)
        if unique_id % 20 == 0:
            time.sleep(0.001)

threading.Thread(target=publish, daemon=True).start()
rng = random.Random(0)
frames = 0
for _ in range(rounds):
    collector = OutputCollector([name], keep_images=False, keep_attributes=False, queue_size=10)
    time.sleep(rng.uniform(0, 0.02))  # closed before, while and after its channel connects
    frames += collector.count()
    collector.close()
    after = collector.count()
    time.sleep(0.001)
    if collector.count() != after:
        sys.exit("a closed collector still adds frames")
streaming.clear()
time.sleep(0.05)
server.stop()
print(f"rounds {rounds} frames {frames}")
"""


def test_collectors_closed_while_their_channel_streams_never_crash_the_process(pva_env):
    """pvAccess may still call a monitor back, or connect it, when stopMonitor() returns; a
    channel destroyed then crashed the process (a segmentation fault, or "PyThreadState_Get:
    the function must be called with the GIL held"): this script crashed within 400 rounds in
    each of four runs before collectors kept their stopped channels (processes.stop_monitor)."""
    from channel_names import PREFIX

    rounds = 400
    done = subprocess.run([sys.executable, "-c", CLOSE_WHILE_STREAMING, f"{PREFIX}:close{os.getpid()}:output",
                           str(rounds)], capture_output=True, text=True, timeout=180, env=pva_env)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    words = done.stdout.split()
    assert words[:2] == ["rounds", str(rounds)] and int(words[3]) > 0, done.stdout  # frames did flow
