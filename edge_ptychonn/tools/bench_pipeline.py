"""Pipeline benchmark: ``pvapy-ad-sim-server`` -> N ``pvapy-hpc-consumer``s -> output
channels, at a series of offered frame rates; and the warm-start time.

Each sweep point starts its own processes on channel names of its own: a consumer
group (waited for until every consumer reports its engine ready), an output
collector in this process (or, with ``PipelineSettings.collectors`` > 1, in that many
child processes, each monitoring its share of the outputs), then a sim server (or,
with ``PipelineSettings.source`` 'fast', the faster source of
``edge_ptychonn.tools.fast_source``) that streams a generated ``.npy`` exactly once
(uniqueId k+1 for frame k) at the offered rate. The warm start always uses the sim
server and a collector in this process. Fresh processes
per point cost a few seconds each but keep every point independent: no backlog,
latency samples or uniqueId history carried over from the previous rate, and
PvaPy's ``nMissed`` counted from a clean start.

Per point:
- offered rate: what the server reports it published (frames / its runtime);
- lost: frames offered minus distinct uniqueIds received on the outputs, split by
  cause: ``lost at source`` (published by the server but never received by any
  consumer and not a gap PvaPy saw: the frames still queued for a slow client when
  the sim server exits), ``nMissed`` (the sum of PvaPy's ``processorStats.nMissed``:
  gaps in uniqueId, i.e. lost in transport), ``lost by processor`` (received
  by a consumer, per its ``receiverStats.nReceived`` less its connect update, but
  never published, per the consumers' own count of frames published: see
  :func:`consumer_published`), and ``missed by the collector`` (published by a
  consumer, never received by the bench's output collector);
- delivered rate: (frames received - 1) / (last arrival - first arrival), leaving out
  the last batch x N arrivals (:func:`delivered_rate`: each consumer's last, partial
  batch waits for its batch timeout);
- latency: the processor's receive-to-publish p50 / p99 (``userStats``; the worst
  consumer), and end to end (server time stamp -> arrival here) for every processor;
- lossless: nothing lost by the processor, in transport (nMissed 0) or on the way
  out to the bench's collector (a frame published that no client receives is lost
  to the chain all the same; the column says whose it was); frames the source
  dropped at its exit are reported apart, they say the consumer had a backlog
  when the stream ended, not that it lost what it received;
- sustained: lossless and delivered >= ``KEEP_UP`` x offered. A short stream can
  be lossless above the pipeline's capacity while the server queue fills up; such
  a point is not counted as sustained, since a longer run would lose frames;
- server-limited: the server published below ``SERVER_LIMITED`` x the target rate:
  the point measures the source, and a sweep stops there.

Processors: ``ptychonn`` (the PtychoNN processor with the pipeline's engine),
``zero`` (the same processor with the zero-cost engine: the frame path alone),
``floor`` (PvaPy's calls alone to republish each frame as a float32 image:
:mod:`~edge_ptychonn.tools.floor_processor`), ``passthrough`` (PvaPy's own processor
republishing each frame: the transport).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engines.base import usable_cores

from . import processes as live

PTYCHONN = "processors.ptychonn.PtychoNNProcessor"
PASSTHROUGH = "pvapy.hpc.userDataProcessor.UserDataProcessor"
FLOOR = "edge_ptychonn.tools.floor_processor.FloorProcessor"
KEEP_UP = 0.97
SERVER_LIMITED = 0.9
TOO_LATE = "consumers not ready before streaming began"
_PUBLISHED = re.compile(r"Published frames:\s*(\d+)\s*@\s*([0-9.]+)\s*fps")


@dataclass
class PipelineSettings:
    model_path: Path
    engine: str = "onnxruntime"
    device: str = "cpu"  # the consumers' device ('auto' spreads them over the GPUs by processorId)
    precision: str = "fp32"
    batch: int = 8
    duration_s: float = 3.0  # stream length per point
    min_frames: int = 64
    max_frames: int = 4000
    server_queue_size: int = 1000
    start_delay_s: float = 6.0  # first guess of server start -> first frame; adapted to the consumers' start-up
    ready_timeout_s: float = 90.0
    cores: int = usable_cores()
    consumer_threads: int = 0  # cpuThreads per consumer; 0: the consumer's own layout (engines.base.cpu_layout)
    consumer_workers: int = 0  # cpuWorkers per consumer; 0: the consumer's own layout
    consumer_io_threads: str = "batch"  # ioThreads per consumer (edge_ptychonn.io_threads.POLICIES)
    consumer_batch_runner: str = "auto"  # batchRunner per consumer (stream.config.BATCH_RUNNERS)
    consumer_forward_attributes: bool = True  # forwardAttributes per consumer
    source_attributes: int = 0  # further NDAttributes on each frame, changing from frame to frame (fast source only)
    source: str = "sim"  # the frames' source: 'sim' (pvapy-ad-sim-server) or 'fast' (tools.fast_source); SOURCES
    collectors: int = 1  # processes that collect the outputs: 1, this one; more, processes.CollectorProcesses


@dataclass
class PointResult:
    processor: str  # 'ptychonn' or 'passthrough'
    n_consumers: int
    target_fps: float
    offered_fps: float
    n_offered: int
    n_received: int
    n_unique: int
    n_lost: int  # offered - distinct uniqueIds received (all causes)
    n_missed: int | None  # PvaPy's count of uniqueId gaps, summed over consumers (transport)
    n_dropped: int | None  # the processor's own nFramesDropped, summed
    delivered_fps: float
    latency_p50_ms: float | None  # receive -> publish inside the consumer (worst consumer)
    latency_p99_ms: float | None
    e2e_p50_ms: float | None  # server time stamp -> arrival at the collector
    e2e_p99_ms: float | None
    cpu_layout: str | None  # the consumers' engine device as their status reports it, e.g. 'cpu (2 workers x 1 thread)'
    ready_s: float | None  # server start -> consumers ready and outputs connected
    start_delay_s: float  # server start -> first frame
    wall_s: float
    error: str | None = None
    n_consumer_received: int | None = None  # frames the consumers received (receiverStats.nReceived less the connect updates)
    n_lost_source: int | None = None  # published, never received, no gap: dropped by the server at exit
    n_lost_processor: int | None = None  # received by a consumer, not published
    n_published: int | None = None  # frames the consumers published, by their own statistics
    n_lost_collector: int | None = None  # published by a consumer, never received by the bench's output collector
    # CPU over the stream (first output -> 90 % of the frames out), per frame out (see CpuSample):
    cpu_consumer_us: float | None = None  # the consumer process(es), every thread
    cpu_server_us: float | None = None  # the source (sim server or fast source)
    cpu_collector_us: float | None = None  # the monitors that collect the outputs: this process, and its collector processes
    machine_busy_pct: float | None = None  # of all cores, whatever ran on them
    # the consumers' threads over the same window, by OS name (see thread_split)
    consumer_threads: list[dict] | None = None
    source: str = "sim"  # the frames' source (PipelineSettings.source)
    collectors: int = 1  # PipelineSettings.collectors: 1, the collector ran in this process; more, in child processes
    collector_processes: int = 1  # processes that collected the outputs: 1 in this process, else min(collectors, N) children
    engine: str | None = None  # the consumers' engine and precision as their status reports them ('auto' resolved), e.g. 'torch bf16'

    @property
    def lossless(self) -> bool:
        if self.error is not None or self.n_missed:
            return False
        if self.n_lost_processor is not None:  # source exit drops are not the processor's loss
            return self.n_lost_processor == 0 and not self.n_lost_collector
        return self.n_lost == 0

    @property
    def server_limited(self) -> bool:
        """The server published below ``SERVER_LIMITED`` x the target; never said of a point
        with an error (one that ended before the stream, e.g. consumers not ready, has
        nothing published: that is no limit of the server)."""
        return self.error is None and self.target_fps > 0 and self.offered_fps < SERVER_LIMITED * self.target_fps

    @property
    def sustained(self) -> bool:
        return self.lossless and self.delivered_fps >= KEEP_UP * self.offered_fps

    @property
    def kept_up_fps(self) -> float:
        """The rate this point kept up with: delivered, but never above what was offered (the
        outputs of a short stream come in batches, so their arrivals can span less time than
        the server took to publish them, and a delivered rate above the offered one was never
        offered)."""
        return min(self.delivered_fps, self.offered_fps)

    def to_dict(self) -> dict:
        return {**asdict(self), "lossless": self.lossless, "sustained": self.sustained,
                "server_limited": self.server_limited}


@dataclass
class Procs:
    """Every process started, so that all are stopped on error or Ctrl-C."""

    procs: list = field(default_factory=list)
    realtime: bool = True  # False: started without the right to real-time scheduling (processes.start)

    def start(self, name: str, argv: list[str], env: dict, log_dir: Path) -> live.Proc:
        return live.start(name, argv, env, log_dir, into=self.procs, realtime=self.realtime)

    def stop(self, proc: live.Proc) -> None:
        proc.stop(grace_s=3.0)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            self.stop(self.procs[-1])


def make_frames(n: int, shape=(128, 128), seed: int = 0) -> np.ndarray:
    """Diffraction-like int16 frames (a bright centre with Poisson noise): ``n`` distinct ones."""
    rng = np.random.default_rng(seed)
    y, x = np.indices(shape) - np.array(shape)[:, None, None] / 2
    envelope = 2000.0 * np.exp(-(x**2 + y**2) / (2 * (shape[0] / 8) ** 2)) + 2.0
    return rng.poisson(envelope, size=(n, *shape)).astype(np.int16)


SCANS = "scans"  # the folder of the results where the sim server's scans are written; removed at the end


def write_scan(work_dir: Path, name: str, base: np.ndarray, n_frames: int) -> Path:
    """``base`` repeated to ``n_frames`` frames, saved as ``work_dir/scans/<name>.npy`` for the
    sim server."""
    path = work_dir / SCANS / f"{name}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.resize(base, (n_frames, *base.shape[1:])))
    return path


def remove_scans(work_dir: Path) -> None:
    """Remove the scans :func:`write_scan` wrote (a 4000-frame scan is 131 MB: the results
    keep the report, the plots and the logs)."""
    shutil.rmtree(work_dir / SCANS, ignore_errors=True)


def _processor_args(settings: PipelineSettings, n_consumers: int, engine: str | None = None) -> dict:
    return {
        "modelPath": str(settings.model_path), "engine": engine or settings.engine, "device": settings.device,
        "precision": settings.precision, "batchSize": settings.batch,
        "cpuThreads": settings.consumer_threads, "cpuWorkers": settings.consumer_workers,
        "ioThreads": settings.consumer_io_threads, "batchRunner": settings.consumer_batch_runner,
        "forwardAttributes": settings.consumer_forward_attributes,
    }


PROCESSORS = {"ptychonn": (PTYCHONN, None), "zero": (PTYCHONN, "zero"), "floor": (FLOOR, None),
              "passthrough": (PASSTHROUGH, None)}
# the sweep points' frame sources: what each is called in the reports
SOURCES = {"sim": "pvapy-ad-sim-server", "fast": "fast source (edge_ptychonn.tools.fast_source)"}


def source_argv(settings: PipelineSettings, scan: Path, channel: str, fps: float, start_delay_s: float) -> list[str]:
    """The command line of a point's source (``settings.source``): ``scan`` published once on
    ``channel`` at ``fps``, the first frame ``start_delay_s`` after its start."""
    if settings.source == "fast":
        return live.fast_source_argv(scan, channel, fps, start_delay_s=start_delay_s, attributes=settings.source_attributes)
    if settings.source != "sim":
        raise ValueError(f"unknown source {settings.source!r}; known: {', '.join(SOURCES)}")
    if settings.source_attributes:
        raise ValueError("source attributes need the fast source (the sim server sends ColorMode alone)")
    return live.sim_server_argv(scan, channel, fps, start_delay_s=start_delay_s, runtime_s=3600.0, replay_once=True)


def _forked_exited(proc: live.Proc, n_consumers: int) -> int:
    """How many of the consumers that ``proc`` (``pvapy-hpc-consumer -nc N``, N > 1) forked
    have exited: PvaPy's parent lives on and leaves them unreaped until it stops. 0 with one
    consumer (none forked) or without /proc."""
    if n_consumers < 2 or not Path("/proc").is_dir():
        return 0
    return len(live.child_pids(proc.pid)) - len(live.child_pids(proc.pid, zombies=False))


def _wait_ready(status_channels: list[str], need_engine: bool, timeout_s: float, procs: list) -> str | None:
    """None once every consumer's status says it is ready; else the reason it is not.

    With several consumers (``-nc N``) PvaPy forks them and its parent lives on when one
    or all fail at start (it only logs that no statistics come): that is told at once, not
    after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    forked = set()  # the pids of the procs seen with their forked consumers
    n = len(status_channels)
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.running():
                return f"{proc.name} exited early (code {proc.popen.returncode}); log: {proc.log_path}"
            if live.forked_consumers_gone(proc, n, forked):
                return f"{proc.name}: its consumers exited at start; log: {proc.log_path}"
            exited = _forked_exited(proc, n)
            if exited:  # the others may be ready, but this one's status never comes
                return f"{proc.name}: {exited} of {n} consumers exited at start; log: {proc.log_path}"
        statuses = [live.read_status(c, timeout_s=1.0) for c in status_channels]
        if all(s is not None for s in statuses):
            if not need_engine or all(s.get("userStats", {}).get("engine") for s in statuses):
                return None
        time.sleep(0.3)
    return f"consumers not ready after {timeout_s:.0f} s; logs: {[str(p.log_path) for p in procs]}"


def _read_statuses(channels: list[str], consumer: live.Proc, earlier: list | None = None) -> list[dict | None]:
    """The consumers' status records (None where none came), not asked of a consumer known to
    be gone, since each such read waits its whole timeout: none when the consumer group has
    exited; with forked consumers of which some exited, not the channels that gave none in
    ``earlier`` (a read of the same channels)."""
    if not consumer.running():
        return [None] * len(channels)
    gone = earlier is not None and _forked_exited(consumer, len(channels)) > 0
    return [None if gone and earlier[k] is None else live.read_status(c) for k, c in enumerate(channels)]


def _statuses_after(wall_s: float, channels: list[str], consumer: live.Proc, earlier: list | None,
                    timeout_s: float = 3.0) -> list[dict | None]:
    """The consumers' status records (:func:`_read_statuses`) once each one that answers was
    taken at ``wall_s`` (``time.time()``) or later: the statistics then include the frames that
    were out by then. A consumer refreshes its status every report period; after ``timeout_s``
    the last read is returned as it is."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = _read_statuses(channels, consumer, earlier)
        taken = [float(s.get("objectTime", 0.0)) for s in statuses if s]
        if all(t >= wall_s for t in taken) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.1)


def delivered_rate(arrivals: list[float], tail: int) -> float:
    """Frames per second between the first arrival and the last one, leaving out the last
    ``tail`` arrivals (batch x N) where at least half of them stay: each consumer's last batch
    of a stream is partial and is published by its batch timeout (``batchTimeout``), a
    latency of the stream's end, not a rate the pipeline could not keep (on a GPU, a 1.5 s
    stream at 1500 frames/s read as 1403 delivered with them, nothing lost).
    ``arrivals`` sorted; 0.0 for fewer than two."""
    n = len(arrivals) - tail if len(arrivals) - tail >= len(arrivals) / 2 else len(arrivals)
    span = arrivals[n - 1] - arrivals[0] if n > 1 else 0.0
    return (n - 1) / span if span > 0 else 0.0


def _published(log: str) -> tuple[int, float] | None:
    match = _PUBLISHED.search(log)
    return (int(match.group(1)), float(match.group(2))) if match else None


def _percentiles(values) -> tuple[float | None, float | None]:
    if len(values) == 0:
        return None, None
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return float(p50), float(p99)


def run_point(
    settings: PipelineSettings, processor: str, n_consumers: int, target_fps: float,
    base_frames: np.ndarray, work_dir: Path, env: dict, procs: Procs, tag: str, start_delay_s: float,
) -> PointResult:
    """One sweep point with fresh processes (all stopped before returning)."""
    t_start = time.perf_counter()
    # target 0: as fast as the server can publish
    wanted = round(target_fps * settings.duration_s) if target_fps > 0 else settings.max_frames
    n_frames = int(np.clip(wanted, settings.min_frames, settings.max_frames))
    n_frames = max(n_frames, 2 * settings.batch * n_consumers)
    scan = write_scan(work_dir, f"scan_{n_frames}", base_frames, n_frames)
    prefix = f"eb{os.getpid()}{tag}"
    input_channel, out_prefix = f"{prefix}:image", f"{prefix}:out"
    ids = range(1, n_consumers + 1)
    processor_class, engine = PROCESSORS[processor]
    is_ptychonn = processor_class == PTYCHONN
    log_dir = work_dir / "logs" / tag
    argv = live.consumer_argv(
        input_channel, out_prefix, n_consumers, processor_class,
        _processor_args(settings, n_consumers, engine) if is_ptychonn else None,
        batch_updates=settings.batch, server_queue_size=settings.server_queue_size, report_period_s=1.0,
    )
    # The server goes first (its channel must exist when the consumers search for it,
    # or their search backs off for seconds), with a start delay long enough for the
    # consumers to get their engines ready; the collector connects once the outputs exist.
    server = procs.start("server", source_argv(settings, scan, input_channel, target_fps, start_delay_s), env, log_dir)
    t_server = time.perf_counter()
    consumer = procs.start("consumer", argv, env, log_dir)
    collector = None
    ready_s = None
    cpu: dict = {}
    statuses: list[dict | None] = []
    flowing: list[dict | None] = []  # statuses read while the stream flows
    try:
        error = _wait_ready([f"{out_prefix}:{i}:status" for i in ids], is_ptychonn, settings.ready_timeout_s, [consumer])
        if error is None:
            collector = live.output_collector([f"{out_prefix}:{i}:output" for i in ids], settings.collectors)
            if not collector.wait_connected(10.0):
                error = "the output channels did not connect in 10 s"
            ready_s = time.perf_counter() - t_server
            if error is None and ready_s > start_delay_s - 0.2:
                error = f"{TOO_LATE}: ready {ready_s:.1f} s after the server started, its start delay is {start_delay_s:.1f} s"
        if error is None:
            expected_s = start_delay_s - ready_s + n_frames / (target_fps or 1000.0)
            deadline = time.monotonic() + 2 * expected_s + 15.0
            left = lambda: max(deadline - time.monotonic(), 0.0)  # noqa: E731
            # consumers all gone before their first output: none will come (the error says why)
            gone = lambda: (not consumer.running()  # noqa: E731
                            or _forked_exited(consumer, n_consumers) >= n_consumers > 1)
            live.wait_until(lambda: collector.count() > 0 or gone(), left())
        if error is None and (collector.count() > 0 or not gone()):
            # CPU is sampled over the stream itself: from the first output to 90 % of the
            # frames out (or until outputs stop for half a second), not the start-up before it.
            before = CpuSample.take(consumer, server, collector.count(), _pids(collector))
            collector.wait_count(int(0.9 * n_frames), timeout_s=left(), idle_s=0.5)
            cpu = before.per_frame_us(CpuSample.take(consumer, server, collector.count(), _pids(collector)))
            # latency over the stream: the processors' percentiles cover their last 5 s, which
            # after the stream would be only the last frames (the drain, at a lossy point)
            flowing = _read_statuses([f"{out_prefix}:{i}:status" for i in ids], consumer)
            collector.wait_count(n_frames, timeout_s=left(), idle_s=3.0)
            server.wait(10.0)
            statuses = _statuses_after(time.time(), [f"{out_prefix}:{i}:status" for i in ids], consumer, flowing)
    except live.CollectorFailed as exc:  # a collector process died or hung: this point's error, not the sweep's end
        error = f"the output collector failed: {exc}"
    finally:
        # consumers that died during the point (before they are stopped here): the group itself,
        # or, with -nc N, forked ones (PvaPy's parent leaves them unreaped until it stops)
        exited = consumer.popen.poll()
        n_exited = _forked_exited(consumer, n_consumers) if exited is None else 0
        if collector is not None:
            collector.close()
        procs.stop(server)
        procs.stop(consumer)

    received = [r for rs in collector.received.values() for r in rs] if collector is not None else []
    published = _published(server.log())
    if error is None and published is None:
        error = f"the {'fast source' if settings.source == 'fast' else 'sim server'} reported no published frames; " \
                f"log: {server.log_path}"
    n_offered, offered_fps = published if published else (n_frames, 0.0)
    unique = {r.unique_id for r in received if 1 <= r.unique_id <= n_offered}
    arrivals = sorted(r.arrival_s for r in received)
    delivered = delivered_rate(arrivals, settings.batch * n_consumers)
    wall_offset = time.time() - time.perf_counter()
    e2e_ms = [
        (r.arrival_s + wall_offset - (r.time_stamp["secondsPastEpoch"] + r.time_stamp["nanoseconds"] * 1e-9)) * 1e3
        for r in received
    ]
    e2e_p50, e2e_p99 = _percentiles(e2e_ms)
    ok = [s for s in statuses if s]
    n_missed = sum(int(s.get("processorStats", {}).get("nMissed", 0)) for s in ok) if ok else None
    n_consumer_received = lost_source = lost_processor = n_published = lost_collector = None
    if ok and len(ok) == n_consumers:
        n_consumer_received = consumer_frames(s.get("receiverStats", {}).get("nReceived", 0) for s in ok)
        n_published = consumer_published(ok, is_ptychonn)
        lost_source, lost_processor, lost_collector = split_losses(
            n_offered, n_consumer_received, n_missed, len(unique), n_published)
    user = [s.get("userStats", {}) for s in ok]
    n_dropped = sum(int(u.get("nFramesDropped", 0)) for u in user) if is_ptychonn and user else None
    # a status read while the stream flowed, unless its report predates the first outputs (a
    # short stream can end within one report period): then the final one
    during = [u for u in (s.get("userStats", {}) for s in flowing if s) if u.get("latencyP99Ms", 0.0) > 0] or user
    p50 = max((u.get("latencyP50Ms", 0.0) for u in during), default=None) if is_ptychonn else None
    p99 = max((u.get("latencyP99Ms", 0.0) for u in during), default=None) if is_ptychonn else None
    if error is None and exited is not None:
        error = f"{consumer.name} exited during the point (code {exited}); log: {consumer.log_path}"
    if error is None and n_exited:
        error = f"{n_exited} of {n_consumers} consumers exited during the point; log: {consumer.log_path}"
    if error is None and len(ok) < n_consumers:
        error = f"read the status of {len(ok)} of {n_consumers} consumers; log: {consumer.log_path}"
    return PointResult(
        processor=processor, n_consumers=n_consumers, target_fps=float(target_fps), offered_fps=offered_fps,
        n_offered=n_offered, n_received=len(received), n_unique=len(unique), n_lost=n_offered - len(unique),
        n_missed=n_missed, n_dropped=n_dropped, delivered_fps=delivered, latency_p50_ms=p50, latency_p99_ms=p99,
        e2e_p50_ms=e2e_p50, e2e_p99_ms=e2e_p99,
        cpu_layout=", ".join(sorted({str(u.get("device", "")) for u in user})) if is_ptychonn and user else None,
        engine=", ".join(sorted({f"{u.get('engine', '')} {u.get('precision', '')}".strip() for u in user}))
        if is_ptychonn and user else None,
        ready_s=ready_s, start_delay_s=start_delay_s, wall_s=time.perf_counter() - t_start, error=error,
        n_consumer_received=n_consumer_received, n_lost_source=lost_source, n_lost_processor=lost_processor,
        n_published=n_published, n_lost_collector=lost_collector, **cpu, source=settings.source,
        collectors=settings.collectors, collector_processes=collector_processes(settings.collectors, n_consumers),
    )


def collector_processes(collectors: int, n_consumers: int) -> int:
    """The processes that collect N consumers' outputs: this one (1) for ``collectors`` 1, else
    one child process per consumer's output channel at most (processes.CollectorProcesses)."""
    return 1 if collectors <= 1 else min(collectors, n_consumers)


def collected_by(collectors: int, n_consumers: int) -> str:
    """Where a point's outputs were collected, in words."""
    if collectors <= 1:
        return "the bench's own process"
    n = collector_processes(collectors, n_consumers)
    return f"{n} collector process{'es' if n > 1 else ''}"


def _pids(collector) -> list[int]:
    """The process ids of ``collector``'s own processes (none for an in-process one)."""
    return list(getattr(collector, "pids", []))


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by the point's processes and the machine, and frames out."""

    consumer_s: float
    server_s: float
    collector_s: float
    machine_busy_s: float
    machine_total_s: float
    n_out: int
    wall_s: float = 0.0  # time.monotonic()
    consumer_threads: dict = field(default_factory=dict)  # live.thread_times of the consumer(s)

    @classmethod
    def take(cls, consumer: live.Proc, server: live.Proc, n_out: int, collector_pids=()) -> "CpuSample":
        """``collector_pids``: the collector's processes (processes.CollectorProcesses), counted
        with this one's."""
        own = os.times()
        collector_s = own.user + own.system + sum(live.cpu_seconds(pid) for pid in collector_pids)
        busy, total = live.machine_cpu_seconds()
        return cls(live.cpu_seconds(consumer.pid), live.cpu_seconds(server.pid), collector_s, busy, total, n_out,
                   time.monotonic(), live.thread_times(consumer.pid))

    def per_frame_us(self, later: "CpuSample", min_frames: int = 16) -> dict:
        """PointResult's cpu_* (us per frame out) and machine_busy_pct from ``self`` to
        ``later``; None where a process was gone or too few frames came out between."""
        frames = later.n_out - self.n_out

        def us(a: float, b: float):
            value = (b - a) / frames * 1e6 if frames >= min_frames else float("nan")
            return None if value != value else round(value, 1)  # NaN: unknown

        busy = later.machine_busy_s - self.machine_busy_s
        total = later.machine_total_s - self.machine_total_s
        return {
            "cpu_consumer_us": us(self.consumer_s, later.consumer_s),
            "cpu_server_us": us(self.server_s, later.server_s),
            "cpu_collector_us": us(self.collector_s, later.collector_s),
            "machine_busy_pct": round(100.0 * busy / total, 1) if frames >= min_frames and total > 0 else None,
            "consumer_threads": thread_split(self.consumer_threads, later.consumer_threads, later.wall_s - self.wall_s)
                                if frames >= min_frames else None,
        }


def thread_split(before: dict, after: dict, wall_s: float, min_cpu_pct: float = 1.0) -> list[dict] | None:
    """Where the consumers' threads spent the window of ``wall_s`` seconds between two
    ``live.thread_times`` samples, by OS name (our threads carry their Python names; pvAccess
    names its own, e.g. ``TCP-rx``, ``TCP-tx``; the main thread has the program's name): for
    each name, the threads of that name (``n``, over all consumers) and, in % of their wall
    time, ``cpu`` (running), ``wait_cpu`` (runnable, waiting for a core: the machine is
    short of cores) and ``off_cpu`` (the rest: asleep, waiting for work, a lock, the
    interpreter lock or I/O). Threads alive over the whole window; names whose threads ran
    less than ``min_cpu_pct`` left out; busiest first. None where there is nothing to split."""
    by_name: dict[str, list[float]] = {}
    for key, (name, cpu_s, wait_s) in after.items():
        if key in before and before[key][0] == name:
            entry = by_name.setdefault(name, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += cpu_s - before[key][1]
            entry[2] += wait_s - before[key][2]
    if wall_s <= 0 or not by_name:
        return None
    split = []
    for name, (n, cpu_s, wait_s) in by_name.items():
        cpu, wait = 100.0 * cpu_s / (n * wall_s), 100.0 * wait_s / (n * wall_s)
        if cpu >= min_cpu_pct:
            split.append({"thread": name, "n": n, "cpu": round(cpu, 1), "wait_cpu": round(wait, 1),
                          "off_cpu": round(max(100.0 - cpu - wait, 0.0), 1)})
    return sorted(split, key=lambda t: -t["cpu"]) or None


# PvaPy's receiverStats.nReceived counts the update a monitor gets when it connects (the
# record as it stands, before any frame), which the framework skips (skipInitialUpdates 1).
CONNECT_UPDATES = 1


def consumer_frames(n_received) -> int:
    """Frames the consumers received: their ``receiverStats.nReceived`` summed, less each
    one's connect update (counted there, never a frame of the stream)."""
    return sum(max(int(n) - CONNECT_UPDATES, 0) for n in n_received)


def consumer_published(statuses: list[dict], is_ptychonn: bool) -> int | None:
    """Frames the consumers published on their outputs, by their own statistics, summed;
    None when a status lacks the count. The PtychoNN processor publishes from its own
    threads, after PvaPy's ``process()`` returned: its ``userStats.nFramesProcessed``
    (frames published) is current at every report, where PvaPy's ``publisherStats`` is
    refreshed only when a frame comes in. The passthrough publishes inside ``process()``:
    ``publisherStats.nPublished``."""
    counts = [s.get("userStats", {}).get("nFramesProcessed") if is_ptychonn
              else s.get("publisherStats", {}).get("nPublished") for s in statuses]
    return None if any(c is None for c in counts) else sum(int(c) for c in counts)


def split_losses(n_offered: int, n_consumer_received: int, n_missed: int, n_unique_out: int,
                 n_published: int | None = None) -> tuple[int, int, int | None]:
    """(lost at the source, lost by the processor, missed by the collector) of one point.

    Frames the server published that no consumer received, beyond the gaps PvaPy
    counted (nMissed), never left the server: it dropped them at exit, still queued
    for a slow client. Frames a consumer received but did not publish (``n_published``,
    the consumers' own count) were lost by the processor; frames published that the
    bench's output collector never received were missed by the collector (or on the way
    to it), not lost by the processor. Without ``n_published`` every frame received
    that did not come out is the processor's, and the collector's share is None."""
    source = max(0, n_offered - n_consumer_received - (n_missed or 0))
    received = min(n_consumer_received, n_offered)
    if n_published is None:
        return source, max(0, received - n_unique_out), None
    published = max(n_published, n_unique_out)  # what came out was published, whenever the count was read
    return source, max(0, received - published), max(0, min(published, received) - n_unique_out)


class StartDelay:
    """The server's start delay: long enough for the consumers' start-up seen so far."""

    def __init__(self, first_guess_s: float, margin: float = 1.4, extra_s: float = 1.0):
        self.delay_s, self.margin, self.extra_s = first_guess_s, margin, extra_s
        self.slowest_s = 0.0

    def next(self) -> float:
        return round(self.delay_s, 1)

    def update(self, result: PointResult) -> None:
        if result.ready_s is not None:
            self.slowest_s = max(self.slowest_s, result.ready_s)
            self.delay_s = max(2.0, self.margin * self.slowest_s + self.extra_s)


def _measure(settings, processor, n_consumers, rate, base_frames, work_dir, env, procs, delay: "StartDelay",
             results: list, progress) -> PointResult:
    """One point (redone once, with a longer start delay, if streaming began too early),
    appended to ``results`` and reported."""
    # channel names and the log folder: one per processor, N and rate (to 0.1 fps, as rates are rounded)
    tag = f"{processor}{n_consumers}r" + (f"{rate:.1f}".rstrip("0").rstrip(".").replace(".", "_") if rate else "max")
    r = run_point(settings, processor, n_consumers, rate, base_frames, work_dir, env, procs, tag, delay.next())
    delay.update(r)
    if r.error and r.error.startswith(TOO_LATE):  # once more, with the delay this start-up needed
        r = run_point(settings, processor, n_consumers, rate, base_frames, work_dir, env, procs, tag + "b", delay.next())
        delay.update(r)
    results.append(r)
    if progress:
        progress(describe(r))
    return r


def sweep(
    settings: PipelineSettings, processor: str, n_consumers: int, rates: list[float], base_frames: np.ndarray,
    work_dir: Path, env: dict, procs: Procs, stop_after: int = 2, refine: int = 1, progress=None,
    delay: StartDelay | None = None, extend: int = 0, down: int = 4, into: list | None = None,
) -> list[PointResult]:
    """Points at increasing offered rates, stopping after ``stop_after`` unsustained
    ones, at one with an error, or at a server-limited one (a higher target measures the
    server again); while the highest still keeps up, up to ``extend`` more at x1.2 each;
    when none kept up, up to ``down`` more at /1.5 each until one does; then ``refine``
    bisections between the best sustained rate and the next. Rates are to 0.1 frames/s;
    each is measured once (a step that rounds to a rate already measured, or down to 0,
    which would mean as fast as the server can, ends that stage). ``into`` gets each
    point as it is measured."""
    delay = delay or StartDelay(settings.start_delay_s)
    results: list[PointResult] = []

    def point(rate: float) -> PointResult:
        r = _measure(settings, processor, n_consumers, rate, base_frames, work_dir, env, procs, delay,
                     results, progress)
        if into is not None:
            into.append(r)
        return r

    failed = 0
    for rate in sorted(set(rates), key=lambda r: r or float("inf")):  # 0 (server maximum) last
        r = point(rate)
        if not r.sustained:
            failed += 1
        if failed >= stop_after or r.server_limited or r.error:  # a higher rate mends no error
            break
    for _ in range(extend):
        if failed or not results or results[-1].target_fps <= 0 or results[-1].server_limited:
            break
        higher = round(results[-1].target_fps * 1.2, 1)
        if higher <= results[-1].target_fps:  # a rate this low rounds back to itself
            break
        if not point(higher).sustained:
            failed += 1
    for _ in range(down):  # nothing kept up: go down until something does
        rated = [r.target_fps for r in results if r.target_fps > 0]
        if not rated or any(r.sustained for r in results) or results[-1].error:  # a lower rate mends no error
            break
        lower = round(min(rated) / 1.5, 1)
        if not 0 < lower < min(rated):  # no lower rate to offer
            break
        point(lower)
    for _ in range(refine):
        good = [r.target_fps for r in results if r.sustained and r.target_fps > 0]
        low = max(good, default=None)
        above = [r.target_fps for r in results if not r.sustained and r.target_fps > 0 and (low is None or r.target_fps > low)]
        if low is None or not above:
            break
        high = min(above)
        middle = round((low + high) / 2, 1)
        if high / low < 1.04 or middle in (low, high):
            break
        point(middle)
    return sorted(results, key=lambda r: r.offered_fps)


def ceiling_sweep(
    settings: PipelineSettings, processor: str, n_consumers: int, start_fps: float, base_frames: np.ndarray,
    work_dir: Path, env: dict, procs: Procs, factor: float = 1.5, max_points: int = 8, refine: int = 2,
    progress=None, delay: StartDelay | None = None, down: int = 3, into: list | None = None,
) -> list[PointResult]:
    """The highest sustained rate, found from below: ``start_fps``, then x ``factor`` while
    each point is sustained (at most ``max_points``); if the first is not, /``factor``
    up to ``down`` times until one is; then ``refine`` bisections between the best
    sustained rate and the first one above it that was not. A server-limited point
    ends the climb (the ceiling is then at least that rate). Rates are to 0.1 frames/s;
    none is measured twice, and none rounds down to 0 (as fast as the server can): a
    step to such a rate ends that stage. ``into`` gets each point as it is measured."""
    delay = delay or StartDelay(settings.start_delay_s)
    results: list[PointResult] = []

    def point(rate: float) -> PointResult:
        r = _measure(settings, processor, n_consumers, round(rate, 1), base_frames, work_dir, env, procs, delay,
                     results, progress)
        if into is not None:
            into.append(r)
        return r

    rate = start_fps
    r = point(rate)
    steps = 0
    # down also from a server-limited point that did not keep up with what the server did publish
    while not r.sustained and not r.error and steps < down:  # a lower rate mends no error
        if not 0 < round(rate / factor, 1) < round(rate, 1):  # no lower rate to offer (0 is the server's maximum)
            break
        rate /= factor
        r = point(rate)
        steps += 1
    tried = {round(p.target_fps, 1) for p in results}
    while r.sustained and not r.server_limited and len(results) < max_points:
        rate *= factor
        if round(rate, 1) in tried:  # climbing back to a rate that already failed on the way down
            break
        r = point(rate)
        tried.add(round(rate, 1))
    for _ in range(refine):
        good = [p.target_fps for p in results if p.sustained]
        low = max(good, default=None)
        above = [p.target_fps for p in results if not p.sustained and low is not None and p.target_fps > low]
        if low is None or not above or min(above) / low < 1.04:
            break
        middle = round((low + min(above)) / 2, 1)
        if middle in (low, min(above)):  # rates this close round to one already measured
            break
        point(middle)
    return sorted(results, key=lambda p: p.target_fps)


def best_sustained(results: list[PointResult]) -> PointResult | None:
    """The sustained point with the highest :attr:`~PointResult.kept_up_fps`."""
    good = [r for r in results if r.sustained]
    return max(good, key=lambda r: r.kept_up_fps) if good else None


def is_lower_bound(results: list[PointResult], best: PointResult | None) -> bool:
    """Whether ``best`` (of :func:`best_sustained`) gives only a lower bound of what the
    pipeline sustains: no point at a higher target fell short of keeping up (without an
    error, which says nothing of the rate): the sweep ended, or the server could offer no
    more, before one did."""
    return best is not None and not any(
        not r.sustained and r.error is None and r.target_fps > best.target_fps for r in results)


def _us(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f} us"


def _thread_text(t: dict) -> str:
    count = f" x{t['n']}" if t["n"] > 1 else ""
    return f"{t['thread']}{count} {t['cpu']:.0f}/{t['wait_cpu']:.0f}/{t['off_cpu']:.0f}"


def describe(r: PointResult) -> str:
    lat = f", latency p50/p99 {r.latency_p50_ms:.0f}/{r.latency_p99_ms:.0f} ms" if r.latency_p99_ms is not None else ""
    e2e = f", end-to-end p99 {r.e2e_p99_ms:.0f} ms" if r.e2e_p99_ms is not None else ""
    state = "sustained" if r.sustained else ("lossless, falling behind" if r.lossless else
                                             ("error" if r.error else "LOSS"))
    if r.server_limited:
        state += ", server-limited"
    split = ""
    if r.n_lost and r.n_lost_source is not None:
        collector = f", by collector {r.n_lost_collector}" if r.n_lost_collector is not None else ""
        split = f" (at source {r.n_lost_source}, by processor {r.n_lost_processor}{collector})"
    text = (
        f"{r.processor} N={r.n_consumers} offered {r.offered_fps:.0f} fps (target {r.target_fps or 'max'}): "
        f"delivered {r.delivered_fps:.0f} fps, lost {r.n_lost}/{r.n_offered}{split}, nMissed {r.n_missed}{lat}{e2e} "
        f"[{state}, {r.wall_s:.0f} s]" + (f" engine {r.engine}" if r.engine else "")
        + (f" on {r.cpu_layout}" if r.cpu_layout else "")
    )
    if r.cpu_consumer_us is not None:
        text += (f"; CPU per frame: consumer {r.cpu_consumer_us:.0f} us, server {_us(r.cpu_server_us)}, "
                 f"collector {_us(r.cpu_collector_us)}; machine "
                 + ("?" if r.machine_busy_pct is None else f"{r.machine_busy_pct:.0f} %") + " busy")
    if r.source != "sim" or r.collectors > 1:  # the defaults go unsaid, as before these options
        text += f"; source {r.source}, outputs collected by {collected_by(r.collectors, r.n_consumers)}"
    if r.consumer_threads:
        text += "; consumer threads, % of wall running / waiting for a core / off a core: " + ", ".join(
            _thread_text(t) for t in r.consumer_threads)
    return text + (f" ERROR: {r.error}" if r.error else "")


# -- warm start ------------------------------------------------------------------------------
@dataclass
class WarmStart:
    engine: str
    launch: str  # 'first' or 'second'
    first_output_s: float | None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def warm_start(
    settings: PipelineSettings, engines: list[str], base_frames: np.ndarray, work_dir: Path, env: dict,
    procs: Procs, fps: float = 20.0, timeout_s: float = 120.0, progress=None, into: list | None = None,
) -> list[WarmStart]:
    """Consumer launch -> first published output, twice per engine, with a server streaming.
    ``into`` gets each launch as it is measured (a run cut short keeps those)."""
    scan = write_scan(work_dir, "warm_scan", base_frames, 64)
    prefix = f"eb{os.getpid()}ws"
    input_channel = f"{prefix}:image"
    log_dir = work_dir / "logs" / "warm"
    server = procs.start("server", live.sim_server_argv(
        scan, input_channel, fps, start_delay_s=0.5, runtime_s=3600.0, replay_once=False), env, log_dir)
    results = []
    try:
        for engine in engines:
            for launch in ("first", "second"):
                out_prefix = f"{prefix}{engine[:2]}{launch[0]}"
                args = {**_processor_args(settings, 1), "engine": engine, "precision": "fp32"}
                argv = live.consumer_argv(input_channel, out_prefix, 1, PTYCHONN, args,
                                          batch_updates=1, server_queue_size=settings.server_queue_size)
                collector = live.OutputCollector([f"{out_prefix}:1:output"], keep_images=False, keep_attributes=False)
                consumer = None
                try:  # the collector is closed however the launch ends, also one that cannot start
                    t0 = time.perf_counter()
                    consumer = procs.start(f"consumer_{engine}_{launch}", argv, env, log_dir)
                    deadline = t0 + timeout_s
                    while collector.count() == 0 and consumer.running() and time.perf_counter() < deadline:
                        time.sleep(0.02)
                    items = collector.received[f"{out_prefix}:1:output"]
                    if items:
                        result = WarmStart(engine, launch, items[0].arrival_s - t0)
                    elif not consumer.running():
                        result = WarmStart(engine, launch, None, f"consumer exited (code {consumer.popen.returncode}); log: {consumer.log_path}")
                    else:
                        result = WarmStart(engine, launch, None, f"no output in {timeout_s:.0f} s; log: {consumer.log_path}")
                finally:
                    collector.close()
                    if consumer is not None:
                        procs.stop(consumer)
                results.append(result)
                if into is not None:
                    into.append(result)
                if progress:
                    took = f"{result.first_output_s:.2f} s" if result.first_output_s is not None else result.error
                    progress(f"warm start {engine} {launch} launch: first output after {took}")
    finally:
        procs.stop(server)
    return results
