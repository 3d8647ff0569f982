"""The bench's optional fast frame source (``edge_ptychonn.tools.fast_source``) and its output
collector spread over child processes (``processes.CollectorProcesses``), with real processes
on loopback.

No speed is asserted beyond loose bounds that a loaded machine only moves towards (a source
that paces its frames can fall behind its schedule, never run ahead of it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from channel_names import PREFIX

from edge_ptychonn.tools import bench, bench_pipeline, bench_report
from edge_ptychonn.tools import processes as live

START_DELAY_S = 3.0  # the test's monitor connects meanwhile (well under a second on an idle machine)


class Monitor:
    """Every update of an NTNDArray channel, with what the consumers read of it."""

    def __init__(self, channel: str, queue_size: int):
        import pvaccess as pva

        self.updates: list[dict] = []
        self._lock = threading.Lock()
        self.channel = pva.Channel(channel)
        self.channel.monitor(self._on_update, f"record[queueSize={queue_size}]field()")

    def _on_update(self, pv) -> None:
        field = pv.getSelectedUnionFieldName()
        if not field:  # the empty record a monitor gets on connect
            return
        dims = pv["dimension"]
        update = {
            "id": pv.getInt("uniqueId"), "field": field,
            "image": np.array(pv["value"][0][field]).reshape(dims[1]["size"], dims[0]["size"]),
            "time_stamp": pv.getStructure("timeStamp"), "data_time_stamp": pv.getStructure("dataTimeStamp"),
            "attributes": {a["name"]: a["value"][0] for a in pv.getStructureArray("attribute")},
        }
        with self._lock:
            self.updates.append(update)

    def count(self) -> int:
        with self._lock:
            return len(self.updates)

    def close(self) -> None:
        live.stop_monitor(self.channel)  # kept alive: pvAccess may still be calling back


def seconds(stamp: dict) -> float:
    return stamp["secondsPastEpoch"] + stamp["nanoseconds"] * 1e-9


@pytest.mark.e2e
@pytest.mark.parametrize("fps", [500.0, 0.0])
def test_the_fast_source_publishes_every_frame_once_with_its_id_pixels_and_time(pva_env, procs, tmp_path, fps):
    """Frames k -> uniqueId k+1, the file's pixels (ny x nx, its dtype), a ColorMode attribute,
    timeStamp = dataTimeStamp = the publish time; at the rate asked (a paced source is never
    ahead of its schedule, so the span of the time stamps has a floor), or as fast as it can;
    and the sim server's 'Published frames' line."""
    n, shape = 300, (24, 40)
    frames = np.random.default_rng(3).integers(0, 60000, (n, *shape), dtype=np.uint16)
    scan = tmp_path / "scan.npy"
    np.save(scan, frames)
    channel = f"{PREFIX}:fast{int(fps)}:image"
    t0 = time.monotonic()
    source = live.start("source", live.fast_source_argv(scan, channel, fps, start_delay_s=START_DELAY_S,
                                                        shutdown_delay_s=0.5), pva_env, tmp_path)
    procs.append(source)
    monitor = Monitor(channel, queue_size=n + 10)
    try:
        assert live.wait_until(monitor.channel.isConnected, START_DELAY_S - 0.5), "the monitor did not connect in time"
        assert time.monotonic() - t0 < START_DELAY_S, "connected too late to see the first frame: machine overloaded?"
        assert source.wait(30.0) == 0, source.log()
        assert live.wait_until(lambda: monitor.count() >= n, 10.0)
    finally:
        monitor.close()
    updates = monitor.updates
    assert [u["id"] for u in updates] == list(range(1, n + 1))  # every frame once, in order
    for u in updates:
        assert u["field"] == "ushortValue"
        np.testing.assert_array_equal(u["image"], frames[u["id"] - 1])
        assert u["time_stamp"] == u["data_time_stamp"]
        assert "ColorMode" in u["attributes"]
    stamps = [seconds(u["time_stamp"]) for u in updates]
    assert stamps == sorted(stamps)
    log = source.log()
    assert live.sim_server_published(log) == n, log
    published, rate = bench_pipeline._published(log)
    if fps:  # never ahead of the schedule (by more than the 1 ms it does not sleep for)
        assert stamps[-1] - stamps[0] >= (n - 1) / fps - 2e-3, stamps[-1] - stamps[0]
        assert 0.5 * fps <= rate <= 1.05 * fps, log
    else:
        assert rate > 0, log


@pytest.mark.e2e
def test_sigterm_stops_the_fast_source_at_once_with_its_report(pva_env, procs, tmp_path):
    """Mid-stream, SIGTERM: no more frames, no shutdown delay, the report line, exit 0."""
    scan = tmp_path / "scan.npy"
    np.save(scan, np.zeros((5000, 8, 8), np.int16))
    source = live.start("source", live.fast_source_argv(scan, f"{PREFIX}:fastterm:image", 100.0, start_delay_s=0.0,
                                                        shutdown_delay_s=60.0), pva_env, tmp_path)
    procs.append(source)
    assert live.wait_until(lambda: "Built 5000 records" in source.log(), 20.0), source.log()
    os.kill(source.pid, signal.SIGTERM)
    assert source.wait(10.0) == 0, source.log()
    published = live.sim_server_published(source.log())
    assert published is not None and published < 5000, source.log()


def test_a_scan_the_fast_source_cannot_publish_is_a_one_line_error(tmp_path):
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((8, 8), np.int16))
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.tools.fast_source", "-if", str(flat)],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, **live.LOOPBACK_ENV))
    assert done.returncode == 2 and "needs frames of shape (n, ny, nx)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_fast_sources_attributes_change_from_frame_to_frame(tmp_path):
    """--attributes N: each record has ColorMode and N double attributes whose values change from
    frame to frame (what a detector sending motor positions costs the consumers); the consumers'
    decoder reads them as any NDAttributes. Out of range is a one-line error."""
    from edge_ptychonn.stream.frames import decode
    from edge_ptychonn.tools.fast_source import build_records

    frames = np.arange(3 * 4 * 4, dtype=np.int16).reshape(3, 4, 4)
    records = build_records(frames, attributes=2)
    assert [r["uniqueId"] for r in records] == [1, 2, 3]
    for k, record in enumerate(records):
        meta, image = decode(record)
        np.testing.assert_array_equal(image, frames[k])
        assert [a["name"] for a in meta.attributes] == ["ColorMode", "Attribute1", "Attribute2"]
        assert [a["value"][0]["value"] for a in meta.attributes[1:]] == [k + 0.001, k + 0.002]
    assert [a["name"] for a in decode(build_records(frames)[1])[0].attributes] == ["ColorMode"]  # none asked: as before
    np.save(tmp_path / "scan.npy", frames)
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.tools.fast_source", "-if", str(tmp_path / "scan.npy"),
                           "--attributes", "-1"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **live.LOOPBACK_ENV))
    assert done.returncode == 2 and "--attributes must be 0..1000, got -1" in done.stderr, done.stderr


@pytest.mark.e2e
def test_collector_processes_that_never_connect_say_so_and_stop(pva_env):
    """Channels no server publishes: wait_connected is False within its bound, count is 0, and
    close leaves no child process behind."""
    collector = live.output_collector([f"{PREFIX}:nobody:{i}" for i in range(3)], processes=2)
    try:
        assert isinstance(collector, live.CollectorProcesses) and len(collector.pids) == 2
        t0 = time.monotonic()
        assert not collector.wait_connected(1.0)
        assert time.monotonic() - t0 < 1.0 + live.CHILD_ANSWER_S
        assert collector.count() == 0
    finally:
        collector.close()
    assert collector.received == {f"{PREFIX}:nobody:{i}": [] for i in range(3)}
    assert all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in collector.pids)
    assert collector.count() == 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_the_default_bench_keeps_the_sim_server_and_its_own_collector(tmp_path):
    """Without --source and --collectors a point streams from pvapy-ad-sim-server and collects
    in the bench's own process, as before these options; a report written before them reads
    the same way."""
    args = bench.get_args_parser().parse_args([])
    assert (args.source, args.collectors) == ("sim", 1)
    np.save(tmp_path / "scan.npy", np.zeros((4, 8, 8), np.int16))  # the sim server's command line reads its length
    settings = bench_pipeline.PipelineSettings(model_path=tmp_path / "m.onnx")
    argv = bench_pipeline.source_argv(settings, tmp_path / "scan.npy", "x:image", 100.0, 5.0)
    assert os.path.basename(argv[0]) == "pvapy-ad-sim-server"
    fast = bench_pipeline.source_argv(bench_pipeline.PipelineSettings(model_path=tmp_path / "m.onnx", source="fast"),
                                      tmp_path / "scan.npy", "x:image", 100.0, 5.0)
    assert fast[1:3] == ["-m", "edge_ptychonn.tools.fast_source"]
    old = {"pipeline": {"points": [{"n_consumers": 2}]}}
    assert bench_report.pipeline_sources(old) == "source: pvapy-ad-sim-server; outputs collected by the bench's own process"
    point = {"n_consumers": 1, "source": "fast", "collectors": 4}
    assert bench_report.pipeline_sources({"pipeline": {"points": [point, {**point, "n_consumers": 8}]}}) == (
        "source: fast source (edge_ptychonn.tools.fast_source); outputs collected by 1 collector process, "
        "4 collector processes")


@pytest.mark.e2e
def test_a_zero_cost_point_from_the_fast_source_with_two_collector_processes_counts_every_frame(
        pva_env, small_model, tmp_path, capsys):
    """The smallest bench command with --source fast --collectors 2: one zero-cost point of two
    consumers (PvaPy's distributor shares the fast source's frames between them, as the sim
    server's), collected by two child processes: nothing lost, every frame counted once, and
    the report and the tables say which source and collectors ran."""
    out = tmp_path / "out"
    args = bench.get_args_parser().parse_args([
        "--skip", "warm,engine,framepath,pipeline,floor,passthrough", "--model", str(small_model), "--out", str(out),
        "--consumers", "2", "--source", "fast", "--collectors", "2", "--ceiling-start", "400", "--ceiling-points", "1",
        "--refine", "0", "--down", "0", "--duration", "1", "--no-plots",
    ])
    assert bench.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"]["settings"]["source"] == "fast" and report["pipeline"]["settings"]["collectors"] == "2"
    points = [p for p in report["pipeline"]["points"] if not (p["error"] or "").startswith(bench_pipeline.TOO_LATE)]
    assert len(points) == 1, report["pipeline"]["points"]
    (p,) = points
    assert p["error"] is None, p["error"]
    assert (p["source"], p["collectors"], p["collector_processes"]) == ("fast", 2, 2)
    assert p["n_offered"] == 400 and p["n_unique"] == p["n_received"] == 400, p  # each frame counted once
    assert p["n_lost"] == 0 and p["n_missed"] == 0 and p["n_lost_collector"] == 0, p
    # the distributor shared the frames (without it each consumer would receive all 400)
    assert p["n_consumer_received"] == 400 and p["n_published"] == 400, p
    # the children's arrival times and this process's clock agree (the same monotonic clock)
    assert 0 < p["e2e_p50_ms"] < 30_000, p
    assert "Built 400 records" in next((out / "logs").rglob("server.log")).read_text()
    printed = capsys.readouterr()
    assert ("Pipeline points (source: fast source (edge_ptychonn.tools.fast_source); outputs collected by "
            "2 collector processes)") in printed.out
    assert "source fast, outputs collected by 2 collector processes" in printed.err


def test_a_collector_process_that_dies_is_told_by_name_not_as_any_error(pva_env):
    """A child of the spread collector killed while it collects: the next count says which one is
    gone (CollectorFailed, which run_point records as that point's error, not an exception that
    ends the sweep), and close() still reads the other child's channels (here nothing came: no
    server publishes them); before, close() read that child's answer to the failed count."""
    collector = live.output_collector([f"{PREFIX}:dies:{i}" for i in range(2)], processes=2)
    try:
        assert collector.count() == 0
        os.kill(collector.pids[0], signal.SIGKILL)
        with pytest.raises(live.CollectorFailed, match=r"collector-1 \(pid \d+\) is gone"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until the kill has landed
                collector.count()
                time.sleep(0.05)
    finally:
        collector.close()
    assert collector.received == {f"{PREFIX}:dies:0": [], f"{PREFIX}:dies:1": []}


@pytest.mark.parametrize("args, says", [
    (["--fd", "99", "ch"], "--fd 99 is not an open file descriptor"),
    (["--fd", "0", "ch"], "--fd 0 is not a socket"),
    (["--fd", "3", "--queue-size", "0", "ch"], "--queue-size must be >= 1"),
])
def test_a_collector_process_started_by_hand_with_a_wrong_fd_says_so_in_one_line(args, says):
    """The collector process reads its parent's socket from --fd; started by hand with a wrong
    one it ended in a traceback of multiprocessing's (exit 0 even, from the closing handle)."""
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.tools.collector", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr
