"""Start, watch and stop real PvaPy processes: used by the demo, the benchmarks and the tests.

Every process is started in its own session with the loopback-only EPICS
settings of :data:`LOOPBACK_ENV`, and stopped through its process id (SIGINT to
its process group, then SIGTERM, then SIGKILL), so ``pvapy-hpc-consumer``'s
forked consumers go with it. On Linux each also gets SIGTERM from the kernel
when the process that started it dies (``PR_SET_PDEATHSIG``). The kernel does
not pass that on to a child's own children: our processors ask for it in
``pvapy-hpc-consumer``'s forked consumers (``processors.shutdown``), other
processor classes' forked consumers may outlive a starter killed outright. :data:`LOOPBACK_ENV` is the
one definition of those settings; :func:`wait_status` the one way to poll
consumers' status; :func:`stop_on_signals` the one way for a tool to turn
SIGTERM and SIGHUP into a clean stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_ptychonn.callbacks import keep_thread_state
from edge_ptychonn.prctl import PR_CAPBSET_DROP, libc_prctl
from processors.shutdown import parent_death_preexec

# Keep every PVA search, beacon and server socket on the loopback interface: the one
# definition (the tests, the demo and the benchmarks use it; the scripts need none).
LOOPBACK_ENV = {
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
}
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def site_epics_settings() -> dict[str, str]:
    """The EPICS pvAccess settings (``EPICS_PVA*``) this process's environment holds."""
    return {key: value for key, value in os.environ.items() if key.startswith("EPICS_PVA")}


def use_loopback(keep_site: bool = False) -> dict:
    """Set the loopback EPICS settings in this process (before any PVA channel) and
    return an environment for child processes (with the project on PYTHONPATH).
    ``keep_site``: where the environment holds EPICS pvAccess settings of its own (a
    beamline's, which reach a detector on another host), they are kept instead."""
    if not (keep_site and site_epics_settings()):
        os.environ.update(LOOPBACK_ENV)
    env = dict(os.environ)
    paths = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


_IFF_MULTICAST = 0x1000
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914


def _loopback_multicast_ioctl() -> tuple[bool, str]:
    """``loopback_multicast`` without the ``ip`` command: the interface flags through
    the kernel's ioctl (reading needs nothing; setting needs root or CAP_NET_ADMIN)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            request = struct.pack("16sH", b"lo", 0)
            flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request)[:18])[1]
            if flags & _IFF_MULTICAST:
                return True, "already on"
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_MULTICAST))
        except OSError as exc:
            return False, (f"turning on multicast on lo failed (needs root; the 'ip' command is missing too: "
                           f"apt-get install iproute2): {exc}")
    return True, "turned on"


def loopback_multicast() -> tuple[bool, str]:
    """Turn on multicast on ``lo`` (needed when several PVA servers share a host).

    Returns (ok, reason). Needs root (or CAP_NET_ADMIN); with the ``ip`` command,
    else through the kernel's interface-flags ioctl.
    """
    ip = shutil.which("ip")
    if ip is None:
        return _loopback_multicast_ioctl()
    show = subprocess.run([ip, "link", "show", "lo"], capture_output=True, text=True)
    if "MULTICAST" in show.stdout:
        return True, "already on"
    done = subprocess.run([ip, "link", "set", "lo", "multicast", "on"], capture_output=True, text=True)
    if done.returncode != 0:
        return False, f"'ip link set lo multicast on' failed (needs root): {done.stderr.strip()}"
    return True, "turned on"


def child_pids(parent: int, zombies: bool = True) -> list[int]:
    """Process ids whose parent is ``parent`` (from /proc), in ascending order; without
    ``zombies``, only those that have not exited (PvaPy's parent leaves a consumer that
    failed unreaped)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and (zombies or fields[0] not in ("Z", "X")):
                kids.append(int(entry.name))
    return sorted(kids)


def exit_statuses(parent: int) -> dict[int, int]:
    """pid -> exit status (a negative signal number for a killed one) of the children of
    ``parent`` that have exited and that it has not reaped yet (from /proc; PvaPy's parent
    reaps the consumers of ``-nc N`` only as it stops)."""
    statuses = {}
    for pid in child_pids(parent):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and len(fields) > 49:  # exit_code (field 52): Linux >= 3.5
            statuses[pid] = os.waitstatus_to_exitcode(int(fields[49]))
    return statuses


def forked_consumers_gone(proc: "Proc", n_consumers: int, seen: set[int]) -> bool:
    """Whether every forked consumer of ``proc``, a ``pvapy-hpc-consumer -nc N`` started with
    ``n_consumers`` (N > 1), is gone while the parent lives on (as PvaPy's does when its
    processors fail at start, logging only that no statistics come): its consumers were seen
    by an earlier call (``seen``, the caller's set of such parents' pids, which this fills)
    and none is left; or none is left and its log holds a traceback (they died before any
    look). Always False with one consumer (PvaPy forks none) or without /proc (Linux)."""
    if n_consumers < 2 or not Path("/proc").is_dir():
        return False
    if child_pids(proc.pid, zombies=False):
        seen.add(proc.pid)
        return False
    return proc.pid in seen or "Traceback" in proc.log()


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (NaN once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) of process ``pid`` and of its running
    children (``pvapy-hpc-consumer`` runs each consumer of ``-nc N`` as a child), in
    seconds; NaN where there is no /proc or the process is gone."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in [pid, *child_pids(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            if p == pid:
                return float("nan")
            continue  # a child that ended meanwhile
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def thread_times(pid: int) -> dict[tuple[int, int], tuple[str, float, float]]:
    """Each thread of process ``pid`` and of its running children: (pid, thread id) ->
    (the thread's OS name, seconds it has run on a CPU, seconds it has waited for one while
    runnable), from ``/proc/PID/task/TID/schedstat``; {} where there is no such file."""
    times = {}
    for p in [pid, *child_pids(pid)]:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except (OSError, ValueError):
            continue  # ended meanwhile, or no /proc
        for tid in tids:
            try:
                name = Path(f"/proc/{p}/task/{tid}/comm").read_text().strip()
                on_cpu_ns, waiting_ns = Path(f"/proc/{p}/task/{tid}/schedstat").read_text().split()[:2]
            except (OSError, ValueError):
                continue  # the thread ended meanwhile
            times[(p, tid)] = (name, int(on_cpu_ns) / 1e9, int(waiting_ns) / 1e9)
    return times


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all cores
    (/proc/stat; idle and I/O wait are not busy); NaNs where there is no /proc."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, IndexError, ValueError):
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - values[3] - values[4]) / tick, total / tick


def tool_path(name: str) -> str:
    """A console script of this Python environment (else the bare name, from PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


@dataclass
class Proc:
    """A started process and where its output goes."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 5.0, say=None) -> int | None:
        """Stop it and its children by process id: SIGINT, SIGTERM after ``grace_s``, SIGKILL 2 s
        later; return the exit code, or None when it is still there :data:`KILL_WAIT_S` after
        SIGKILL (stuck in the kernel, in uninterruptible sleep: nothing ends it sooner, and
        waiting on would hang the caller). ``say``: called with a line each time it goes on to a
        harder signal, with what the process did meanwhile (its state and the CPU time it and
        its children used: none on a machine too busy to run it, some when it was stuck)."""
        steps = ((signal.SIGINT, grace_s), (signal.SIGTERM, 2.0), (signal.SIGKILL, KILL_WAIT_S / 2))
        cpu_before = float("nan")
        for i, (sig, wait_s) in enumerate(steps):
            if self.popen.poll() is not None:
                break
            if i and say is not None:
                before, waited_s = steps[i - 1]
                say(f"{self.name} (pid {self.pid}) did not stop within {waited_s:g} s of {before.name} "
                    f"({_doing(self.pid, cpu_before)}): {sig.name}")
            cpu_before = cpu_seconds(self.pid)
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            self.wait(wait_s)
        try:  # forked children may outlive the parent
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.wait(KILL_WAIT_S / 2)


# SIGKILL cannot be caught: a process still there this long after it is stuck in the kernel (or
# the machine gave it no time); on a loaded machine tearing down a large process takes seconds
KILL_WAIT_S = 10.0


def _doing(pid: int, cpu_before: float) -> str:
    """What process ``pid`` is doing: its state letter and the CPU seconds it and its children
    used since ``cpu_before`` (a :func:`cpu_seconds` reading), as far as /proc tells."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "state unknown"
    used = cpu_seconds(pid) - cpu_before
    return f"state {state}" + ("" if used != used else f", {used:.2f} s CPU since")


def _children_take_sigint() -> None:
    """Let started processes see the SIGINT that stops them cleanly.

    A program started with SIGINT ignored (under ``nohup``, or as ``cmd &`` in a
    script) hands that on to every process it starts, and ``pvapy-hpc-consumer``
    would then ignore the SIGINT of :meth:`Proc.stop` and be killed by the SIGTERM
    after it, before its processors save their files. A handler, unlike an ignored
    signal, is reset to the default at exec, so this process takes Python's own
    (Ctrl-C raises KeyboardInterrupt, which the demo and ``launch`` answer by
    stopping what they started). Only the main thread may set a handler.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


CAP_SYS_NICE = 23  # the capability that lets root schedule threads in real time


def realtime_allowed() -> bool:
    """Whether processes started from here may schedule threads in real time: root (or
    any process with CAP_SYS_NICE, or a non-zero RLIMIT_RTPRIO). pvAccess then creates
    its threads SCHED_FIFO (EPICS does whenever it may); a consumer started by a user
    has none of that, and its pvAccess threads run under the normal policy."""
    if resource.getrlimit(resource.RLIMIT_RTPRIO)[0] != 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except OSError:
        pass
    return os.geteuid() == 0


NO_REALTIME_HELP = ("run the sim server, the consumers and this process's own output collector without the right "
                    "to real-time scheduling, as a user's processes are (matters where this process has it: root, "
                    "or RLIMIT_RTPRIO; pvAccess then makes its I/O threads SCHED_FIFO)")  # bench's and soak's --no-realtime
REALTIME_NOTE = ("the processes started here may schedule threads in real time (root, or RLIMIT_RTPRIO): pvAccess "
                 "makes its I/O threads SCHED_FIFO, unlike a consumer a user starts; --no-realtime runs them as a "
                 "user's")  # what bench and soak say when they start processes that may


_GAVE_UP = "EDGE_PTYCHONN_GAVE_UP_REALTIME"  # set across give_up_realtime's exec, so that it runs once


def give_up_realtime() -> bool:
    """Make this process one without the right to schedule threads in real time, as a
    process that a user starts, and so the processes it starts: where it has the right
    (:func:`realtime_allowed`), it drops CAP_SYS_NICE from its bounding set, sets
    RLIMIT_RTPRIO to 0 and executes its own command line again (same pid), which then
    starts without the capability; pvAccess threads made from then on (a collector's
    connections) run under the normal policy. The capability is not dropped from the
    running process instead: EPICS creates its threads ``SCHED_FIFO`` once it has seen
    that it may, and when that later fails it frees memory twice and aborts.

    Call it first, before anything is printed or started: what was done before the exec
    is done again. Returns (only where nothing was executed) whether the right is gone."""
    if os.environ.pop(_GAVE_UP, None) is not None or not realtime_allowed():
        return not realtime_allowed()  # after the exec (or nothing to give up)
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))  # lowering a limit needs no privilege
    prctl = libc_prctl()
    if prctl is None or prctl(PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0) != 0:
        return not realtime_allowed()  # not Linux, or no CAP_SETPCAP: an exec would not change it
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[_GAVE_UP] = "1"
    os.execv(sys.executable, sys.orig_argv)


def _preexec(tie: bool, realtime: bool):
    """The child's ``preexec_fn``: SIGTERM at this process's death (``tie``); without
    ``realtime``, CAP_SYS_NICE dropped from what the exec keeps (root's child then runs
    its threads like a user's: no SCHED_FIFO for pvAccess). None when there is nothing to do."""
    death = parent_death_preexec(signal.SIGTERM) if tie else None
    prctl = None if realtime else libc_prctl()
    if prctl is None:
        return death

    def preexec() -> None:
        prctl(PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0)  # fails (harmlessly) without CAP_SETPCAP: nothing to drop
        if death is not None:
            death()

    return preexec


def start(name: str, argv: list[str], env: dict, log_dir: Path, cwd: Path | None = None,
          into: list | None = None, realtime: bool = True) -> Proc:
    """Start ``argv`` in its own session (so that its children stop with it), output to
    ``log_dir/<name>.log``, in ``cwd`` (default: the project root). The child takes
    SIGINT even when this process was started with it ignored.

    ``into``: the caller's list of what it started, which gets the new process before
    a Ctrl-C, SIGTERM or SIGHUP that arrived meanwhile is raised (see
    :func:`signals_held`): a tool's ``finally`` then stops every process it started,
    also one whose start a signal interrupted.

    Called on the main thread, the child gets SIGTERM when this process dies, however
    it dies (Linux; nothing elsewhere). The kernel sends it when the *thread* that
    started the child ends, so from any other thread (which may end first) no such
    signal is asked for; nor by a process with pid 1 (a container's first process),
    whose death ends the container anyway.

    ``realtime`` False: the child may not schedule threads in real time, even when this
    process may (:func:`realtime_allowed`), as a process that a user starts."""
    _children_take_sigint()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    tie = threading.current_thread() is threading.main_thread() and os.getpid() != 1
    with signals_held(), open(log_path, "wb") as log:
        popen = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=str(cwd or PROJECT_ROOT),
            preexec_fn=_preexec(tie, realtime),
        )
        proc = Proc(name, popen, log_path)
        if into is not None:
            into.append(proc)
    return proc


class Terminated(Exception):
    """SIGTERM or SIGHUP arrived inside :func:`stop_on_signals`."""


def _raise_terminated(signum, frame):
    raise Terminated(signal.Signals(signum).name)


# kill / systemd / docker stop; the terminal or ssh session that ran the tool closed
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_on_signals():
    """Inside the block SIGTERM and SIGHUP raise :class:`Terminated` (as Ctrl-C raises
    ``KeyboardInterrupt``), so that the tool's ``finally`` stops what it started
    instead of dying with its processes left running. The previous handlers come back
    at the end. Main thread only (Python's rule for signal handlers)."""
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C, SIGTERM and SIGHUP that arrive inside the block are raised at its end
    (the first of them, through the handler that was there before), not in its
    middle. Used by :func:`start`: a signal raised inside ``subprocess.Popen`` leaves
    a child running that no caller knows of. On other threads than the main one (which
    cannot set handlers, and where no handler runs) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum))
                for sig in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            signal.raise_signal(arrived[0])


@contextlib.contextmanager
def signals_ignored():
    """Ctrl-C, SIGTERM and SIGHUP ignored inside the block: a second one must not cut
    the stopping of what was started short. Main thread only."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def sim_server_argv(
    frames_npy: Path, channel: str, fps: float, start_delay_s: float = 5.0,
    runtime_s: float | None = None, replay_once: bool = True, shutdown_delay_s: float = 1.0,
) -> list[str]:
    """``pvapy-ad-sim-server`` replaying ``frames_npy``; with ``replay_once`` each frame
    is published exactly once (uniqueId k+1 for frame k), then the server exits; without
    it the file is published over and over until ``runtime_s``.
    ``runtime_s``: the longest it streams (the server stops there, mid-scan or not); by
    default an hour, and replaying once at least twice the scan's time at ``fps`` plus a
    minute, so that a long scan is never cut short. ``shutdown_delay_s``: how long the
    server lives on after its last frame; what it still has queued for a slow client is
    lost when it exits."""
    argv = [
        tool_path("pvapy-ad-sim-server"), "-dc", "-if", str(frames_npy), "-cn", channel,
        "-fps", str(fps), "-std", str(start_delay_s), "-shd", f"{shutdown_delay_s:g}", "-rp", "1000000",
    ]
    n_frames = len(np.load(frames_npy, mmap_mode="r"))
    if replay_once:
        # A frame cache smaller than the file makes the server stream the file once
        # (and exit); one frame less than the file lets it fill the cache ahead.
        if n_frames < 2:
            raise ValueError(f"{frames_npy}: replaying once needs at least 2 frames, has {n_frames}")
        argv += ["-cs", str(n_frames - 1)]
        if runtime_s is None:
            runtime_s = max(3600.0, 2 * n_frames / fps + 60)
    else:  # a cache that holds the whole file: its frames go out over and over
        argv += ["-cs", str(n_frames)]
    return argv + ["-rt", str(3600.0 if runtime_s is None else runtime_s)]


def fast_source_argv(frames_npy: Path, channel: str, fps: float, start_delay_s: float = 5.0,
                     shutdown_delay_s: float = 1.0, attributes: int = 0) -> list[str]:
    """``edge_ptychonn.tools.fast_source`` publishing ``frames_npy`` once on ``channel`` at
    ``fps`` (0: as fast as it can), uniqueId k+1 for frame k, as :func:`sim_server_argv` with
    ``replay_once`` does, each frame with ``attributes`` further NDAttributes that change from
    frame to frame; it prints the sim server's ``Published frames`` line as it exits
    (:func:`sim_server_published` reads it)."""
    return [
        sys.executable, "-m", "edge_ptychonn.tools.fast_source", "-if", str(frames_npy), "-cn", channel,
        "-fps", str(fps), "-std", str(start_delay_s), "-shd", f"{shutdown_delay_s:g}",
        *(["-na", str(attributes)] if attributes else []),
    ]


def sim_server_published(log: str) -> int | None:
    """The frames ``pvapy-ad-sim-server`` (or the fast source) published, from the report it
    prints as it exits (its log), or None where there is none (killed outright, or still running)."""
    reported = re.findall(r"^Published frames:\s*(\d+)", log, re.MULTILINE)
    return int(reported[-1]) if reported else None


def consumer_argv(
    input_channel: str, output_prefix: str, n_consumers: int, processor_class: str,
    processor_args: dict | None = None, batch_updates: int = 8, server_queue_size: int = 1000,
    runtime_s: float = 3600.0, report_period_s: float = 2.0, extra: list[str] | None = None,
) -> list[str]:
    """``pvapy-hpc-consumer`` with ``n_consumers`` consumers, each publishing on
    ``<prefix>:<id>:output`` (status ``:status``, control ``:control``). Several consumers
    take ``batch_updates`` frames each in turn (PvaPy's distributor, ``-du``; also for 1:
    without it every consumer receives every frame)."""
    argv = [
        tool_path("pvapy-hpc-consumer"), "-dc", "-ic", input_channel,
        "-oc", f"{output_prefix}:*:output", "-sc", f"{output_prefix}:*:status",
        "-cc", f"{output_prefix}:*:control", "-pc", processor_class,
        "-nc", str(n_consumers), "-sqs", str(server_queue_size),
        "-rt", str(runtime_s), "-rp", str(report_period_s),
    ]
    if n_consumers > 1:
        argv += ["-du", str(batch_updates)]
    if processor_args:
        argv += ["-pa", json.dumps(processor_args)]
    return argv + (extra or [])


@dataclass
class Received:
    unique_id: int
    arrival_s: float
    time_stamp: dict
    attributes: list
    image: np.ndarray | None


@dataclass
class OutputCollector:
    """Monitors output channels (with a server-side queue) and keeps what arrives.

    The empty record that a monitor gets on connect (no image yet) is ignored.
    ``keep_attributes`` False leaves each :class:`Received`'s attributes empty: reading
    them costs 19 us per frame of this process's Python (two attributes), the most of
    what the callback reads, where a bench needs only ids and times. Nothing is added
    once :meth:`close` has returned; its channels are stopped with :func:`stop_monitor`
    (kept for the rest of the process, without the frames this collector holds).
    """

    channels: list[str]
    keep_images: bool = True
    keep_attributes: bool = True
    queue_size: int = 2000  # server-side slots: each filled one costs the server a frame of memory
    received: dict[str, list[Received]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import pvaccess as pva

        self._pva = pva
        self._lock = threading.Lock()
        for name in self.channels:
            self.received[name] = []
        # What the callbacks reach this collector through: close() empties it, so that the
        # channels that stop_monitor keeps do not keep this collector and its frames too.
        self._owner = [self]
        self._channels = [self._monitor(name) for name in self.channels]
        self._made_s = time.monotonic()

    def _monitor(self, name: str):
        channel = self._pva.Channel(name)
        channel.monitor(_on_update(self._owner, name), f"record[queueSize={self.queue_size}]field()")
        return channel

    def _add(self, name: str, pv) -> None:
        field_name = pv.getSelectedUnionFieldName()
        if not field_name:
            return
        image = None
        if self.keep_images:
            dims = pv["dimension"]
            image = np.array(pv["value"][0][field_name]).reshape(dims[1]["size"], dims[0]["size"])
        attributes = pv.getStructureArray("attribute") if self.keep_attributes else []
        item = Received(pv.getInt("uniqueId"), time.perf_counter(), pv.getStructure("timeStamp"), attributes, image)
        with self._lock:
            self.received[name].append(item)

    def connected(self) -> bool:
        return all(c.isConnected() for c in self._channels)

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.received.values())

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until every channel is connected (True), at most ``timeout_s`` (False). Call it
        before frames flow. A channel still unconnected :data:`RESEARCH_S` after it was made is
        made afresh: pvAccess spaces a channel's searches ever further apart (0.2, 0.5, 0.9,
        1.8, 3.6, 7.2 s, ... after it was made), so a server that came up just after one search
        was found seconds later, after frames had begun to flow; a new channel searches at once."""
        deadline = time.monotonic() + timeout_s
        while not self.connected():
            now = time.monotonic()
            if now >= deadline:
                return False
            if now - self._made_s >= RESEARCH_S:
                self._made_s = now
                for i, channel in enumerate(self._channels):
                    if not channel.isConnected():
                        stop_monitor(channel)
                        self._channels[i] = self._monitor(self.channels[i])
            time.sleep(0.05)
        return True

    def wait_count(self, n: int, timeout_s: float, idle_s: float | None = None) -> int:
        """Wait until ``n`` frames arrived, or ``timeout_s`` passed, or nothing new
        came for ``idle_s``; return the count."""
        deadline = time.monotonic() + timeout_s
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            current = self.count()
            if current >= n:
                return current
            if current != last:
                last, last_change = current, time.monotonic()
            elif idle_s is not None and current > 0 and time.monotonic() - last_change > idle_s:
                break
            time.sleep(0.05)
        return self.count()

    def close(self) -> None:
        """Stop every monitor (:func:`stop_monitor`); what arrived stays in ``received``."""
        for channel in self._channels:
            stop_monitor(channel)
        self._channels = []
        self._owner[0] = None


def _on_update(owner: list, name: str):
    """A monitor callback that adds each frame of channel ``name`` to ``owner[0]`` (an
    :class:`OutputCollector`), and does nothing once that is None (the collector closed)."""

    def on_update(pv) -> None:
        keep_thread_state()  # pvAccess calls back on its own thread, once per frame
        collector = owner[0]
        if collector is not None:
            collector._add(name, pv)

    return on_update


RESEARCH_S = 1.0  # OutputCollector.wait_connected: how often an unconnected channel is made afresh
CHILD_ANSWER_S = 30.0  # CollectorProcesses: how long a child may take to answer (its start-up included)


class CollectorFailed(RuntimeError):
    """A :class:`CollectorProcesses` child is gone or gave no answer in time."""


class CollectorProcesses:
    """:class:`OutputCollector`'s interface (``channels``, ``received``, ``count``,
    ``connected``, ``wait_connected``, ``wait_count``, ``close``) over child processes: the
    channels are dealt out round robin to at most ``processes`` of them (``python -m
    edge_ptychonn.tools.collector``), each monitoring its share with an ``OutputCollector`` of
    its own, so that the collectors' Python (a monitor callback per frame) runs on several
    cores instead of in one interpreter.

    Ids and times only: each :class:`Received` has its uniqueId, its arrival
    (``time.perf_counter()`` in the child: CLOCK_MONOTONIC on Linux, the same clock in every
    process of the host) and its ``timeStamp``; no attributes, no image. ``received`` is
    filled by :meth:`close`, when the children send what they got; until then :meth:`count`
    asks them (a round trip through a socket pair each, all children at once).

    The children run in sessions of their own (a Ctrl-C reaches this process, which stops
    them), with this process's environment and scheduling rights; each exits when this process
    is gone (its end of the socket closed; on Linux also SIGTERM at this process's death, as
    :func:`start` asks for on the main thread). ``pids``: their process ids, for their CPU time."""

    def __init__(self, channels: list[str], processes: int, queue_size: int = 2000):
        from multiprocessing import Pipe

        self.channels = list(channels)
        self.received: dict[str, list[Received]] = {name: [] for name in self.channels}
        self._closed = False
        self._children: list[tuple] = []  # (name, Popen, connection, its channels)
        self._silent: set[str] = set()  # children that gave no answer in time (stopped): nothing more is read
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
            [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
        tie = threading.current_thread() is threading.main_thread() and os.getpid() != 1
        n = max(1, min(processes, len(self.channels)))
        try:
            for i in range(n):
                share = self.channels[i::n]
                ours, theirs = Pipe()  # a socket pair: no helper process, unlike multiprocessing.Process
                argv = [sys.executable, "-m", "edge_ptychonn.tools.collector", "--fd", str(theirs.fileno()),
                        "--queue-size", str(queue_size), *share]
                try:
                    with signals_held():
                        popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                 pass_fds=(theirs.fileno(),), start_new_session=True,
                                                 cwd=str(PROJECT_ROOT), preexec_fn=_preexec(tie, True))
                        self._children.append((f"collector-{i + 1}", popen, ours, share))
                finally:
                    theirs.close()
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [popen.pid for _, popen, _, _ in self._children]

    def _ask(self, request: str, argument=None, timeout_s: float = CHILD_ANSWER_S) -> list:
        """Send ``request`` to every child, then their answers, in order; CollectorFailed (naming
        each) where one is gone or gives none within ``timeout_s``. Every answer that comes is
        read, so that the next request's answers are not a late answer to this one; a child that
        gave none is stopped (it may be hung), and :meth:`close` reads nothing more from it."""
        def gone(name, popen) -> str:
            return f"{name} (pid {popen.pid}) is gone (exit code {popen.poll()})"

        failures: list[str] = []
        asked = []
        for child in self._children:
            name, popen, pipe, _ = child
            try:
                pipe.send((request, argument))
                asked.append(child)
            except OSError:
                failures.append(gone(name, popen))
        deadline = time.monotonic() + timeout_s
        answers = []
        for child in asked:
            name, popen, pipe, _ = child
            try:
                if pipe.poll(max(deadline - time.monotonic(), 0.0)):
                    answers.append(pipe.recv())
                    continue
                failures.append(f"{name} (pid {popen.pid}) gave no answer to {request!r} in {timeout_s:.0f} s")
                self._silent.add(name)
                popen.kill()
            except (EOFError, OSError):
                failures.append(gone(name, popen))
        if failures:
            raise CollectorFailed("; ".join(failures))
        return answers

    def count(self) -> int:
        if self._closed:
            return sum(len(v) for v in self.received.values())
        return sum(self._ask("count"))

    def connected(self) -> bool:
        return self.wait_connected(0.0)

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until every channel of every child is connected (True), at most ``timeout_s``
        from now (False; a child's start-up counts in); each child waits as
        :meth:`OutputCollector.wait_connected` does, until the same deadline (time.monotonic()
        is the host's clock)."""
        deadline = time.monotonic() + timeout_s
        return all(self._ask("connected", deadline, timeout_s + CHILD_ANSWER_S))

    wait_count = OutputCollector.wait_count

    def close(self) -> None:
        """Stop the monitors; fill ``received`` with what every child got (a child that does
        not answer within :data:`CHILD_ANSWER_S` is killed, and what it got is lost); the
        children exit. Only the first call does anything."""
        if self._closed:
            return
        self._closed = True
        for _, _, pipe, _ in self._children:
            try:
                pipe.send(("close", None))
            except OSError:
                continue
        deadline = time.monotonic() + CHILD_ANSWER_S
        for name, popen, pipe, share in self._children:
            try:
                if name not in self._silent and pipe.poll(max(deadline - time.monotonic(), 0.0)):
                    for name, columns in zip(share, pipe.recv()):
                        self.received[name] = _unpacked(columns)
            except (EOFError, OSError):
                pass
            pipe.close()
        for _, popen, _, _ in self._children:
            try:
                popen.wait(max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(KILL_WAIT_S)


def output_collector(channels: list[str], processes: int = 1, queue_size: int = 2000):
    """An output collector of ids and times for a bench: in this process (:class:`OutputCollector`,
    no images, no attributes) when ``processes`` is 1, else :class:`CollectorProcesses`."""
    if processes <= 1:
        return OutputCollector(channels, keep_images=False, keep_attributes=False, queue_size=queue_size)
    return CollectorProcesses(channels, processes, queue_size)


def collector_child(pipe, channels: list[str], queue_size: int) -> None:
    """A :class:`CollectorProcesses` child (``edge_ptychonn.tools.collector``): monitors
    ``channels`` and answers the parent's requests on ``pipe`` (a ``multiprocessing``
    connection: 'count'; 'connected' with a time.monotonic() deadline; 'close', answered with
    what it received, :func:`_packed`, per channel) until 'close' or until the parent is gone
    (its end of the pipe closed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    collector = OutputCollector(channels, keep_images=False, keep_attributes=False, queue_size=queue_size)
    try:
        while True:
            try:
                request, argument = pipe.recv()
            except (EOFError, OSError):
                return
            if request == "count":
                pipe.send(collector.count())
            elif request == "connected":
                pipe.send(collector.wait_connected(max(argument - time.monotonic(), 0.0)))
            elif request == "close":
                collector.close()
                pipe.send([_packed(collector.received[name]) for name in channels])
                return
    finally:
        collector.close()


def _packed(items: list[Received]) -> tuple[np.ndarray, ...]:
    """(uniqueIds, arrivals, seconds past epoch, nanoseconds) of ``items``, as arrays."""
    return (np.array([r.unique_id for r in items], np.int64), np.array([r.arrival_s for r in items], np.float64),
            np.array([r.time_stamp["secondsPastEpoch"] for r in items], np.int64),
            np.array([r.time_stamp["nanoseconds"] for r in items], np.int64))


def _unpacked(columns: tuple[np.ndarray, ...]) -> list[Received]:
    ids, arrivals, seconds, nanoseconds = (c.tolist() for c in columns)
    return [Received(i, a, {"secondsPastEpoch": s, "nanoseconds": ns}, [], None)
            for i, a, s, ns in zip(ids, arrivals, seconds, nanoseconds)]


# Channels whose monitor stop_monitor() stopped, kept until the process ends (see there).
_STOPPED_CHANNELS: list = []


def stop_monitor(channel) -> None:
    """Stop a ``pvaccess.Channel``'s monitor and keep the channel alive for the rest of the
    process. pvAccess can still be calling the monitor's callback, or connecting the channel,
    when ``stopMonitor()`` returns, and a channel destroyed then crashes the process (a
    segmentation fault, or "Fatal Python error: PyThreadState_Get: the function must be
    called with the GIL held"): a process that made and closed collectors of a channel
    streaming frames crashed within 400 rounds in each of four runs. This module holds the
    channel from then on: drop your own references to it, and give its callback nothing
    large to hold (it is kept as long as the channel)."""
    try:
        channel.stopMonitor()
    except Exception:  # already disconnected, or never connected: nothing left to stop
        pass
    _STOPPED_CHANNELS.append(channel)


def at_once(stop, procs) -> list[tuple]:
    """``stop(proc)`` for every one of ``procs``, each in a thread of its own, all at once
    (each stop takes seconds; none needs another); returns ``(proc, exception)`` for each
    call that raised (every one is called even when another raised)."""
    errors: list[tuple] = []

    def call(proc) -> None:
        try:
            stop(proc)
        except BaseException as exc:  # the others are stopped all the same; the caller decides
            errors.append((proc, exc))

    threads = [threading.Thread(target=call, args=(proc,), name=f"stop-{proc.name}") for proc in procs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def wait_until(predicate, timeout_s: float, poll_s: float = 0.05):
    """Poll ``predicate()`` until it returns something true (returned) or ``timeout_s``
    passes (then its last value)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    return predicate()


def wait_status(channels: list[str], done=None, timeout_s: float = 10.0, poll_s: float = 0.5) -> list[dict | None]:
    """The consumers' status records (one per channel) once every channel answers
    and ``done(records)`` holds, or at ``timeout_s``; a channel that never
    answered is ``None``. Consumers refresh their status every report period
    (``-rp``), so counters lag the outputs by up to that."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [read_status(c) for c in channels]
        if (all(records) and (done is None or done(records))) or time.monotonic() > deadline:
            return records
        time.sleep(poll_s)


def read_status(channel: str, timeout_s: float = 3.0) -> dict | None:
    """A consumer's status record as a dict (``userStats``, ``processorStats``, ...); None
    where the channel did not connect within ``timeout_s`` or gave no answer within
    :func:`answer_s` of it (see :func:`get_record`)."""
    import pvaccess as pva

    try:
        ch = pva.Channel(channel)
        ch.setTimeout(timeout_s)
    except pva.PvaException:
        return None
    return get_record(ch, answer_s(timeout_s))


def served(channels: list[str], timeout_s: float = 1.0) -> list[str]:
    """Those of ``channels`` that a server answers for now (each read as :func:`read_status`, all
    at once: the whole search takes about ``timeout_s`` however many there are), in their order."""
    answered: dict[str, bool] = {}

    def read(name: str) -> None:
        answered[name] = read_status(name, timeout_s) is not None

    threads = [threading.Thread(target=read, args=(c,), name="pva-search", daemon=True) for c in channels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(answer_s(timeout_s) + 1.0)
    return [c for c in channels if answered.get(c)]


def answer_s(connect_timeout_s: float) -> float:
    """How long a read of a channel whose ``setTimeout`` is ``connect_timeout_s`` may take in
    all: its connection and its introspection (each bounded by that timeout), then the
    server's answer (a second more)."""
    return 2 * connect_timeout_s + 1.0


def get_record(channel, timeout_s: float, request: str = "field()", raise_errors: bool = False) -> dict | None:
    """``channel.get(request)`` (a ``pvaccess.Channel``) as a dict; None where it failed
    (``pvaccess.PvaException``; with ``raise_errors`` that is raised) or gave no answer within
    ``timeout_s``.

    A channel's ``setTimeout`` bounds only its connection: a get on a connected channel
    waits for the server's answer without end, forever when the server stops answering or
    exits meanwhile (pvAccess drops the pending request without a word), and no Ctrl-C or
    SIGTERM handler runs until it returns. So the get runs on a daemon thread of its own,
    left behind with its channel when late (the caller should not use that channel again),
    and the wait for it takes signals."""
    import pvaccess as pva

    answer: list = []

    def get() -> None:
        try:
            answer.append(channel.get(request).toDict())
        except pva.PvaException as exc:
            answer.append(exc if raise_errors else None)
        except BaseException as exc:  # raised in the caller, as before
            answer.append(exc)

    thread = threading.Thread(target=get, name="pva-get", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not answer:
        return None
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return answer[0]
