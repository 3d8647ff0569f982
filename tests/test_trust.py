"""Trust under load, faults and signals, with real PvaPy processes on loopback.

Each test starts its own sim server(s) and consumers, checks what came out and
what the status channels say, and stops everything by process id.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time

import numpy as np
import pytest

from edge_ptychonn.tools.processes import (
    OutputCollector, child_pids, consumer_argv, read_status, rss_mb, sim_server_argv, start, tool_path, wait_until,
)
from edge_ptychonn.tools.soak import engine_rate
from channel_names import PREFIX

pytestmark = pytest.mark.e2e
# The sim servers start streaming this long after they start; by then the consumers, started at the
# same time, are up and connected (2-4 s), and the test's output monitors must be connected a second before.
START_DELAY_S = 6.0
CONNECTED_S = START_DELAY_S - 1
_ports = itertools.count(1)


def _names(kind: str) -> tuple[str, str]:
    n = next(_ports)
    return f"{PREFIX}:trust:{kind}{n}:image", f"{PREFIX}:trust:{kind}{n}:inference"


def _user_stats(prefix: str, consumer: int = 1) -> dict:
    record = read_status(f"{prefix}:{consumer}:status")
    return record["userStats"] if record else {}




def test_overload_is_dropped_at_the_door_counted_and_recovers(pva_env, procs, slow_model, tmp_path):
    """~3x the consumer's capacity for 12 s, then a new stream (ids restart at 1) at a
    tenth of it: during the overload the consumer publishes at >= 0.8 x its inference
    rate and counts every loss; afterwards every frame is published; memory stays flat."""
    capacity = engine_rate(slow_model, "onnxruntime", threads=1)
    overload_fps = min(3 * capacity, 1500.0)
    n_over = int(overload_fps * 12)
    rng = np.random.default_rng(11)
    np.save(tmp_path / "over.npy", rng.poisson(30, (n_over, 64, 64)).astype(np.int16))
    n_after = 20
    np.save(tmp_path / "after.npy", rng.poisson(30, (n_after, 64, 64)).astype(np.int16))
    image, prefix = _names("over")
    args = {"modelPath": str(slow_model), "engine": "onnxruntime", "cpuThreads": 1}
    consumer = start("consumer", consumer_argv(image, prefix, 1, "processors.ptychonn.PtychoNNProcessor", args,
                                               report_period_s=0.5), pva_env, tmp_path)
    procs.append(consumer)
    sim = start("sim1", sim_server_argv(tmp_path / "over.npy", image, fps=overload_fps, start_delay_s=START_DELAY_S),
                pva_env, tmp_path)
    procs.append(sim)
    collector = OutputCollector([f"{prefix}:1:output"], keep_images=False)
    try:
        assert collector.wait_connected(CONNECTED_S), consumer.log()[-3000:]
        assert wait_until(lambda: collector.count() > 0, START_DELAY_S + 10), consumer.log()[-3000:]
        rss_before = rss_mb(consumer.pid)  # running: the engine loaded and its first batch out
        # into the overload: the queue is full and the consumer says it drops frames
        s1 = wait_until(lambda: (lambda u: u if u.get("nDroppedOverload", 0) > 0 else None)(_user_stats(prefix)), 20)
        t1 = time.monotonic()
        assert s1, consumer.log()[-3000:]
        time.sleep(4.0)
        s2, t2 = _user_stats(prefix), time.monotonic()
        rss_during = rss_mb(consumer.pid)
        assert sim.wait(30) is not None, "the first sim server did not finish"
        settled = wait_until(lambda: (lambda u: u if u and u["nFramesQueued"] == 0 else None)(_user_stats(prefix)), 20)
        assert settled, consumer.log()[-3000:]
        published_rate = (s2["nFramesProcessed"] - s1["nFramesProcessed"]) / (t2 - t1)
        print(f"capacity {capacity:.0f} fps alone, offered {overload_fps:.0f} fps x {n_over}; during overload: "
              f"published {published_rate:.0f} fps, inferRate {s2['inferRate']:.0f} fps, "
              f"dropped {s2['nFramesDropped']}, RSS {rss_before:.0f} -> {rss_during:.0f} MB")
        assert s2["nDroppedOverload"] > s1["nDroppedOverload"] > 0  # it was overloaded, and said so
        assert published_rate >= 0.8 * s2["inferRate"], (published_rate, s2["inferRate"])
        # every frame the server delivered is published or counted as lost, by cause
        u = settled
        assert u["nFramesUnaccounted"] == 0
        assert u["nFramesProcessed"] + u["nFramesDropped"] + u["nBadFrames"] == u["nFramesReceived"]
        delivered = u["nFramesReceived"] + u["nFramesMissed"]
        assert delivered <= n_over and n_over - delivered <= 0.02 * n_over, (delivered, n_over)
        assert collector.count() == u["nFramesProcessed"]

        # a new stream at a tenth of the capacity: every frame published, no bad frame for the reconnect
        first = collector.count()
        procs.append(start("sim2", sim_server_argv(tmp_path / "after.npy", image, fps=max(capacity / 10, 5),
                                                   start_delay_s=4.0), pva_env, tmp_path))
        assert collector.wait_count(first + n_after, timeout_s=60, idle_s=20) == first + n_after, consumer.log()[-3000:]
        ids_after = [r.unique_id for r in collector.received[f"{prefix}:1:output"][first:]]
        assert ids_after == list(range(1, n_after + 1))
        u = wait_until(lambda: (lambda u: u if u and u["nStreamRestarts"] >= 1 and u["nFramesQueued"] == 0 else None)(
            _user_stats(prefix)), 10)
        assert u and u["nBadFrames"] == 0 and u["nFramesUnaccounted"] == 0, u
        rss_after = rss_mb(consumer.pid)
        print(f"after: {n_after} of {n_after} published; RSS {rss_after:.0f} MB")
        # measured from a running consumer: +21-32 MB during the overload, +42-54 MB after the second
        # stream (PvaPy's server queue of 1000 outputs, allocator arenas); keeping every frame of the
        # overload (its input and output image) would add another 80 MB
        assert rss_during - rss_before < 100 and rss_after - rss_before < 100, (rss_before, rss_during, rss_after)
    finally:
        collector.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize(
    "launcher, sig, target, batch_timeout, clean_parent",
    [
        ("edge-ptychonn", signal.SIGTERM, "group", 30.0, True),
        ("edge-ptychonn", signal.SIGTERM, "parent", 0.05, True),
        ("pvapy", signal.SIGTERM, "parent", 0.05, False),
        ("pvapy", signal.SIGINT, "group", 0.05, True),
        ("pvapy", signal.SIGINT, "group", 30.0, True),
        ("edge-ptychonn", signal.SIGINT, "parent", 30.0, True),
    ],
    ids=["sigterm-group", "sigterm-parent", "sigterm-parent-plain-pvapy", "sigint-group", "sigint-group-held",
         "sigint-parent-held"],
)
def test_signals_stop_cleanly_with_nothing_lost_and_no_orphan(
    pva_env, procs, small_model, tmp_path, launcher, sig, target, batch_timeout, clean_parent
):
    """Two consumers, 13 frames (the second consumer's batch is partial, held back for 30 s in the
    "held" cases: before, Ctrl-C counted it as dropped where SIGTERM published it), then a signal:
    every frame comes out, each consumer prints its final statistics, all exit, and the
    parent exits with 0 where it can (a SIGTERM to a plain pvapy-hpc-consumer parent
    kills it at once; its consumers notice and stop cleanly)."""
    frames = np.random.default_rng(3).poisson(25, (13, 64, 64)).astype(np.int16)
    np.save(tmp_path / "scan.npy", frames)
    image, prefix = _names("sig")
    args = {"modelPath": str(small_model), "engine": "onnxruntime", "cpuThreads": 1, "batchTimeout": batch_timeout}
    argv = consumer_argv(image, prefix, 2, "processors.ptychonn.PtychoNNProcessor", args, report_period_s=0.5)
    if launcher == "edge-ptychonn":
        argv = [tool_path("edge-ptychonn"), "consumer", *argv[1:]]
    consumers = start("consumers", argv, pva_env, tmp_path)
    procs.append(consumers)
    procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", image, fps=50, start_delay_s=START_DELAY_S),
                       pva_env, tmp_path))
    outputs = [f"{prefix}:{i}:output" for i in (1, 2)]
    collector = OutputCollector(outputs, keep_images=False)
    try:
        assert collector.wait_connected(CONNECTED_S), consumers.log()[-3000:]
        expected = 13 if batch_timeout < 1 else 8  # a long timeout holds the partial batch back
        assert collector.wait_count(expected, timeout_s=START_DELAY_S + 20) >= expected, consumers.log()[-3000:]
        # every frame has reached a consumer (the signal stops what is still on its way)
        assert wait_until(lambda: sum(_user_stats(prefix, i).get("nFramesReceived", 0) for i in (1, 2)) == 13, 10)
        children = child_pids(consumers.pid)
        assert len(children) == 2, children
        t0 = time.monotonic()
        if target == "group":
            os.killpg(consumers.pid, sig)
        else:
            os.kill(consumers.pid, sig)
        rc = consumers.wait(15)
        assert rc is not None, "the consumer parent did not exit\n" + consumers.log()[-3000:]
        assert wait_until(lambda: not any(_alive(c) for c in children), 10), "orphaned consumers: " + str(
            [c for c in children if _alive(c)])
        took = time.monotonic() - t0
        got = collector.wait_count(13, timeout_s=3)
    finally:
        collector.close()
    log = consumers.log()
    print(f"{launcher} {sig.name} to the {target}: exit {rc} after {took:.1f} s; {got} of 13 frames out")
    assert got == 13, log[-3000:]  # the last partial batch was published
    assert sorted(r.unique_id for name in outputs for r in collector.received[name]) == list(range(1, 14))
    for consumer in (1, 2):
        assert f"consumer {consumer} final statistics: received" in log, log[-3000:]
    assert "unaccounted 0" in log and "Traceback" not in log, log[-3000:]
    if clean_parent:
        assert rc == 0, log[-3000:]
    else:
        assert rc == -signal.SIGTERM


def _wait_last_out(out: OutputCollector, last_id: int, timeout_s: float, idle_s: float) -> int:
    """Wait until the frame with uniqueId ``last_id`` (the scan's last) came out, or nothing
    new came for ``idle_s``, or ``timeout_s`` passed; return the count. A consumer publishes
    in input order, so once the last frame is out every frame the live consumers took is out."""
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        current = out.count()
        if any(v and v[-1].unique_id >= last_id for v in list(out.received.values())):
            break
        if current != last:
            last, last_change = current, time.monotonic()
        elif current > 0 and time.monotonic() - last_change > idle_s:
            break
        time.sleep(0.05)
    return out.count()


def test_a_killed_consumers_frames_are_counted_downstream(pva_env, procs, small_model, tmp_path):
    """Two consumers; consumer 2 is killed (SIGKILL) while it holds frames it never
    published. Consumer 1 goes on with every later frame; PvaPy's collector, which
    sees both output channels, counts exactly the frames consumer 2 took with it."""
    n = 200
    np.save(tmp_path / "scan.npy", np.random.default_rng(4).poisson(25, (n, 64, 64)).astype(np.int16))
    image, prefix = _names("kill")
    # Batches of 64 that wait up to 3 s: consumer 2 holds what it received for seconds.
    args = {"modelPath": str(small_model), "engine": "onnxruntime", "cpuThreads": 1,
            "batchSize": 64, "batchTimeout": 3.0}
    consumers = start("consumers", consumer_argv(image, prefix, 2, "processors.ptychonn.PtychoNNProcessor", args,
                                                 report_period_s=0.5), pva_env, tmp_path)
    procs.append(consumers)
    # The collector's cache (-ccs) holds 100 frames (2.5 s of the stream) for reordering: a gap is judged
    # once it is full, or after 5 s without a new frame (with room for the whole scan: 5 s for every gap).
    collector_argv = [tool_path("pvapy-hpc-collector"), "-dc", "-id", "1", "-pid", "1,2", "-ic", f"{prefix}:*:output",
                      "-sc", f"{prefix}:collector:*:status", "-sqs", "1000", "-ccs", "100", "-rt", "3600", "-rp", "1"]
    collector_proc = start("collector", collector_argv, pva_env, tmp_path)
    procs.append(collector_proc)
    procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", image, fps=40, start_delay_s=START_DELAY_S),
                       pva_env, tmp_path))
    outputs = [f"{prefix}:{i}:output" for i in (1, 2)]
    out = OutputCollector(outputs, keep_images=False)
    try:
        assert out.wait_connected(CONNECTED_S), consumers.log()[-3000:]
        holding = wait_until(lambda: (lambda u: u if u and u["nFramesReceived"] > 0 else None)(_user_stats(prefix, 2)),
                        START_DELAY_S + 15, poll_s=0.05)
        assert holding and holding["nFramesProcessed"] == 0, holding
        victim = child_pids(consumers.pid)
        statuses = {c: open(f"/proc/{c}/cmdline").read() for c in victim}
        assert len(victim) == 2, statuses
        # the forked consumers are started in id order
        os.kill(victim[1], signal.SIGKILL)
        got = _wait_last_out(out, n, timeout_s=40, idle_s=8)
        collected = wait_until(lambda: (lambda r: r if r and r["collectorStats"]["nCollected"] + r["collectorStats"]["nMissed"] >= n - 8 else None)(
            read_status(f"{prefix}:collector:1:status")), 15)
        # its status once it counts every frame it published (statuses lag by up to a report period)
        survivor = wait_until(lambda: (lambda u: u if u.get("nFramesProcessed", -1) >= len(out.received[outputs[0]])
                                       else None)(_user_stats(prefix, 1)), 5) or _user_stats(prefix, 1)
    finally:
        out.close()
    seen = {r.unique_id for name in outputs for r in out.received[name]}
    lost = sorted(set(range(1, max(seen) + 1)) - seen)
    print(f"consumer 2 killed holding >= {holding['nFramesReceived']} frames; {got} of {n} came out; "
          f"lost ids {lost[:3]}..{lost[-3:]} ({len(lost)}); collector {collected and collected['collectorStats']}")
    assert len(lost) >= holding["nFramesReceived"] > 0
    assert max(seen) >= n - 8, "consumer 1 did not go on after the kill"
    assert survivor["nForeignFrames"] > 0  # it noticed it was given its sibling's share
    assert survivor["nFramesMissed"] == 0, survivor  # and learnt that every id is its own now
    assert collected, collector_proc.log()[-3000:]
    assert collected["collectorStats"]["nMissed"] == len(lost), collected["collectorStats"]


def test_configure_abuse_is_refused_briefly_and_frames_keep_flowing(pva_env, procs, small_model, tmp_path):
    from edge_ptychonn.tools.configure import send

    n = 240
    np.save(tmp_path / "scan.npy", np.random.default_rng(5).poisson(25, (n, 64, 64)).astype(np.int16))
    image, prefix = _names("cfg")
    args = {"modelPath": str(small_model), "engine": "onnxruntime", "cpuThreads": 1}
    consumer = start("consumer", consumer_argv(image, prefix, 1, "processors.ptychonn.PtychoNNProcessor", args,
                                               report_period_s=0.5), pva_env, tmp_path)
    procs.append(consumer)
    procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", image, fps=20, start_delay_s=START_DELAY_S),
                       pva_env, tmp_path))
    control = f"{prefix}:1:control"
    collector = OutputCollector([f"{prefix}:1:output"], keep_images=False)
    abuse = {
        "unknown key": '{"modelPathX": "x"}',
        "wrong type": '{"scale": "big"}',
        "out of range": '{"scale": -1}',
        "timeout out of range": '{"batchTimeout": 1e9}',
        "invalid JSON": '{"batchTimeout": ',
        "1 MB value": json.dumps({"transform": "x" * 1_000_000}),
    }
    try:
        assert collector.wait_connected(CONNECTED_S), consumer.log()[-3000:]
        assert wait_until(lambda: collector.count() > 0, START_DELAY_S + 10)
        settings = _user_stats(prefix)["settings"]
        for what, text in abuse.items():
            before = collector.count()
            reply = send(control, text)
            print(f"{what}: {reply[:150]!r} ({len(reply)} characters)")
            assert reply.startswith("Configuration failed"), (what, reply)
            assert len(reply) < 300, (what, len(reply))
            assert wait_until(lambda: collector.count() > before, 5), f"frames stopped after {what}"
        # a status refresh after the last refusal: the first record counting frames beyond one read now
        seen = _user_stats(prefix)["nFramesReceived"]
        refreshed = wait_until(lambda: (lambda u: u if u.get("nFramesReceived", 0) > seen else None)(_user_stats(prefix)), 5)
        assert refreshed and refreshed["settings"] == settings  # nothing changed
        assert send(control, '{"batchTimeout": 0.2}') == "Configuration successful"
        assert wait_until(lambda: json.loads(_user_stats(prefix)["settings"])["batchTimeout"] == 0.2, 5)
        got = collector.wait_count(n, timeout_s=30, idle_s=10)
    finally:
        collector.close()
    assert got == n, consumer.log()[-3000:]
    log = consumer.log()
    assert "x" * 200 not in log.split("Control channel: configuring")[0]  # our own log lines quote briefly


def test_a_source_restarted_mid_stream_gives_no_frame_twice(pva_env, procs, small_model, tmp_path):
    """The sim server exits after a scan and a new server comes up whose record already holds a
    frame (a source restarted mid-stream): each of two consumers reconnects and is handed that
    frame outside the distributor. Before, both published it: a uniqueId came out twice (the
    stitcher starts a new scan there). Now it is dropped and counted (nDroppedReconnect), the
    stream that follows comes out exactly once, and nothing is counted missed."""
    import pvaccess as pva
    from pvapy.utility.adImageUtility import AdImageUtility

    rng = np.random.default_rng(5)
    np.save(tmp_path / "first.npy", rng.poisson(25, (64, 64, 64)).astype(np.int16))
    images = rng.poisson(25, (200, 64, 64)).astype(np.int16)
    image, prefix = _names("reconnect")
    args = {"modelPath": str(small_model), "engine": "onnxruntime", "cpuThreads": 1, "batchTimeout": 0.05}
    consumers = start("consumers", consumer_argv(image, prefix, 2, "processors.ptychonn.PtychoNNProcessor", args,
                                                 report_period_s=0.5), pva_env, tmp_path)
    procs.append(consumers)
    sim = start("sim", sim_server_argv(tmp_path / "first.npy", image, fps=50, start_delay_s=START_DELAY_S),
                pva_env, tmp_path)
    procs.append(sim)
    outputs = [f"{prefix}:{i}:output" for i in (1, 2)]
    collector = OutputCollector(outputs, keep_images=False)
    server = None
    try:
        assert collector.wait_connected(CONNECTED_S), consumers.log()[-3000:]
        assert collector.wait_count(64, timeout_s=START_DELAY_S + 20) == 64, consumers.log()[-3000:]
        assert sim.wait(20) is not None, "the sim server did not exit after its scan"
        before = {name: len(collector.received[name]) for name in outputs}
        # the new source's record holds frame 1 when the consumers find it
        server = pva.PvaServer()
        server.addRecord(image, AdImageUtility.generateNtNdArray2D(1, images[0]))
        assert wait_until(lambda: all(_user_stats(prefix, i).get("nDroppedReconnect") for i in (1, 2)), 30), \
            consumers.log()[-3000:]
        for uid in range(2, 201):  # then the stream, through the distributor
            server.update(image, AdImageUtility.generateNtNdArray2D(uid, images[uid - 1]))
            time.sleep(0.005)
        assert wait_until(lambda: collector.count() >= 64 + 199, 30), collector.count()
        stats = wait_until(lambda: (lambda s: s if all(u.get("nFramesProcessed", 0) + u.get("nFramesDropped", 0)
                                                       == u.get("nFramesReceived", -1) for u in s) else None)(
            [_user_stats(prefix, i) for i in (1, 2)]), 10)
        assert stats, consumers.log()[-3000:]
    finally:
        collector.close()
        if server is not None:
            server.stop()
    again = [r.unique_id for name in outputs for r in collector.received[name][before[name]:]]
    print(f"after the restart: {len(again)} frames out, {len(again) - len(set(again))} twice; reconnect records "
          f"dropped {[s['nDroppedReconnect'] for s in stats]}, missed {[s['nFramesMissed'] for s in stats]}")
    assert sorted(again) == list(range(2, 201)), sorted(u for u in set(again) if again.count(u) > 1)
    assert [s["nDroppedReconnect"] for s in stats] == [1, 1], stats
    assert all(s["nFramesUnaccounted"] == 0 and s["nFramesMissed"] == 0 for s in stats), stats


def test_the_output_channel_is_there_before_the_source_is(pva_env, procs, small_model, tmp_path):
    """A consumer started before its source, then a client of its output, then the scan (the
    README's order). Before, PvaPy made the output channel only at the first input record, so the
    client found it seconds late (pvAccess backs off its searches) and missed the scan's first
    frames; now the channel is there from the consumer's start, and every frame reaches it."""
    frames = np.random.default_rng(6).poisson(25, (40, 64, 64)).astype(np.int16)
    np.save(tmp_path / "scan.npy", frames)
    image, prefix = _names("early")
    args = {"modelPath": str(small_model), "engine": "onnxruntime", "cpuThreads": 1, "batchTimeout": 0.05}
    consumer = start("consumer", consumer_argv(image, prefix, 1, "processors.ptychonn.PtychoNNProcessor", args,
                                               report_period_s=0.5), pva_env, tmp_path)
    procs.append(consumer)
    assert wait_until(lambda: _user_stats(prefix), 20), consumer.log()[-3000:]  # up, with no source
    collector = OutputCollector([f"{prefix}:1:output"], keep_images=False)
    try:
        assert collector.wait_connected(10), "the output channel is not there before the source\n" + consumer.log()[-3000:]
        procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", image, fps=50, start_delay_s=2.0),
                           pva_env, tmp_path))
        assert collector.wait_count(40, timeout_s=30) == 40, consumer.log()[-3000:]
    finally:
        collector.close()
    assert [r.unique_id for r in collector.received[f"{prefix}:1:output"]] == list(range(1, 41))
