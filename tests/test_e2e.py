"""End to end: real pvapy-ad-sim-server -> real pvapy-hpc-consumer processes -> output channels.

Each test starts its own processes on loopback and stops them by process id.
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

from edge_ptychonn.tools.processes import OutputCollector, consumer_argv, sim_server_argv, start, tool_path, wait_status
from engines import EngineOptions, create_engine
from engines.base import cpu_layout, cpu_layout_device
from channel_names import PREFIX

pytestmark = pytest.mark.e2e
N_FRAMES = 61  # not a multiple of 8: the last batch is partial
START_DELAY_S = 6.0  # consumers and the test's monitors connect before frames flow (1-4 s after start)
_ports = itertools.count(1)


def _channel(prefix: str) -> str:
    return f"{prefix}{next(_ports)}"


def test_two_consumers_publish_every_frame_once(pva_env, procs, small_model, tmp_path):
    frames = np.random.default_rng(5).poisson(25, (N_FRAMES, 64, 64)).astype(np.int16)
    np.save(tmp_path / "scan.npy", frames)
    image_channel, prefix = _channel(f"{PREFIX}:e2e:image"), _channel(f"{PREFIX}:e2e:inference")
    args = {"modelPath": str(small_model), "engine": "onnxruntime", "cpuThreads": 1, "batchTimeout": 0.1}
    procs.append(start("consumers", consumer_argv(image_channel, prefix, 2, "processors.ptychonn.PtychoNNProcessor", args), pva_env, tmp_path))
    procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", image_channel, fps=200, start_delay_s=START_DELAY_S), pva_env, tmp_path))
    outputs = [f"{prefix}:{i}:output" for i in (1, 2)]
    collector = OutputCollector(outputs)
    try:
        assert collector.wait_connected(START_DELAY_S - 1), "output channels did not appear:\n" + procs[0].log()[-3000:]
        got = collector.wait_count(N_FRAMES, timeout_s=60, idle_s=15)
        statuses = wait_status(
            [f"{prefix}:{i}:status" for i in (1, 2)],
            lambda rs: sum(r["userStats"]["nFramesProcessed"] for r in rs) >= N_FRAMES,
        )
    finally:
        collector.close()
    assert got == N_FRAMES, f"received {got} of {N_FRAMES}\n" + procs[0].log()[-3000:]

    # every input uniqueId exactly once across the two output channels
    ids = sorted(r.unique_id for name in outputs for r in collector.received[name])
    assert ids == list(range(1, N_FRAMES + 1))

    # each output equals the engine's result on that input frame (frame k has uniqueId k+1)
    engine = create_engine("onnxruntime", EngineOptions(small_model, max_batch=8, cpu_threads=1))
    expected = np.concatenate([engine.infer(frames[i : i + 8, None].astype(np.float32)) for i in range(0, N_FRAMES, 8)])
    for name in outputs:
        for r in collector.received[name]:
            assert r.image.dtype == np.float32
            np.testing.assert_allclose(r.image, expected[r.unique_id - 1, 0], atol=1e-4)
            assert r.time_stamp["secondsPastEpoch"] > 0
            assert "ColorMode" in [a["name"] for a in r.attributes]

    # each consumer gets whole runs of 8 consecutive frames in turn, published in input order
    runs = {}
    for name in outputs:
        received = [r.unique_id for r in collector.received[name]]
        assert received == sorted(received), f"{name} out of order"
        for uid in received:
            runs.setdefault((uid - 1) // 8, set()).add(name)
    assert all(len(owners) == 1 for owners in runs.values()), "a run of 8 was split between consumers"
    owners = [runs[k].pop() for k in sorted(runs)]
    assert len(owners) == (N_FRAMES + 7) // 8
    assert all(a != b for a, b in zip(owners, owners[1:])), "consumers did not take runs in turn"
    last_owner = outputs.index(owners[-1])

    # the status channels agree: nothing missed, dropped or bad; the last batch was partial
    user = [s["userStats"] for s in statuses]
    assert sum(u["nFramesProcessed"] for u in user) == N_FRAMES
    assert all(u["nFramesDropped"] == 0 and u["nBadFrames"] == 0 for u in user)
    assert user[last_owner]["nPartialBatches"] >= 1
    assert all(s["processorStats"]["nMissed"] == 0 for s in statuses)
    assert {u["engine"] for u in user} == {"onnxruntime"}
    # two consumers of one distributor group share the cores (cpuThreads 1: workers fill each one's share)
    workers = cpu_layout(1, 0, consumers=2)[0]
    assert {u["device"] for u in user} == {cpu_layout_device("cpu", workers, 1)}


def test_bad_frames_over_pvapy_are_counted_and_good_ones_follow(pva_env, procs, small_model, tmp_path):
    """A stream of wrong-size frames then good ones: counted in the status, good ones published."""
    scan = tmp_path / "scans"
    scan.mkdir()
    np.save(scan / "a_wrong_size.npy", np.ones((5, 48, 48), np.int16))
    good = np.random.default_rng(6).poisson(25, (11, 64, 64)).astype(np.int16)
    np.save(scan / "b_good.npy", good)
    image_channel, prefix = _channel(f"{PREFIX}:bad:image"), _channel(f"{PREFIX}:bad:inference")
    args = {"modelPath": str(small_model), "engine": "onnxruntime", "cpuThreads": 1, "batchTimeout": 0.1}
    procs.append(start("consumer", consumer_argv(image_channel, prefix, 1, "processors.ptychonn.PtychoNNProcessor", args), pva_env, tmp_path))
    sim = [tool_path("pvapy-ad-sim-server"), "-dc", "-id", str(scan), "-cn", image_channel, "-fps", "100", "-std", str(START_DELAY_S), "-shd", "1", "-cs", "15", "-rt", "60"]
    procs.append(start("sim", sim, pva_env, tmp_path))
    collector = OutputCollector([f"{prefix}:1:output"])
    try:
        assert collector.wait_connected(START_DELAY_S - 1), procs[0].log()[-3000:]
        got = collector.wait_count(11, timeout_s=40, idle_s=10)
        status = wait_status([f"{prefix}:1:status"], lambda rs: rs[0]["userStats"]["nFramesProcessed"] >= 11)[0]
    finally:
        collector.close()
    assert got == 11, procs[0].log()[-3000:]
    assert [r.unique_id for r in collector.received[f"{prefix}:1:output"]] == list(range(6, 17))
    user = status["userStats"]
    assert user["nBadShape"] == 5 and user["nBadFrames"] == 5 and user["nFramesProcessed"] == 11


def test_outputs_chain_into_pvapys_file_saver(pva_env, procs, small_model, tmp_path):
    """inference output -> PvaPy's own AdOutputFileProcessor, no extra code: one file per frame."""
    Image = pytest.importorskip("PIL.Image")  # AdOutputFileProcessor writes with Pillow
    frames = np.random.default_rng(8).poisson(25, (13, 64, 64)).astype(np.int16)
    np.save(tmp_path / "scan.npy", frames)
    image_channel, prefix = _channel(f"{PREFIX}:chain:image"), _channel(f"{PREFIX}:chain:inference")
    args = {"modelPath": str(small_model), "engine": "onnxruntime", "cpuThreads": 1}
    procs.append(start("consumer", consumer_argv(image_channel, prefix, 1, "processors.ptychonn.PtychoNNProcessor", args), pva_env, tmp_path))
    saved = tmp_path / "saved"
    saver_args = {"outputDirectory": str(saved), "outputFileNameFormat": "{uniqueId:06}.tiff"}
    saver = [tool_path("pvapy-hpc-consumer"), "-dc", "-ic", f"{prefix}:1:output", "-sqs", "1000", "-rt", "3600",
             "-pc", "pvapy.hpc.adOutputFileProcessor.AdOutputFileProcessor", "-pa", json.dumps(saver_args)]
    procs.append(start("saver", saver, pva_env, tmp_path))
    procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", image_channel, fps=50, start_delay_s=START_DELAY_S), pva_env, tmp_path))

    def readable(f) -> bool:  # a file being written is not a whole image yet
        try:
            return np.asarray(Image.open(f)).shape == (64, 64)
        except (OSError, SyntaxError, ValueError):
            return False

    deadline = time.monotonic() + START_DELAY_S + 40
    while time.monotonic() < deadline:
        files = sorted(saved.glob("*.tiff"))
        if len(files) >= 13 and all(readable(f) for f in files):
            break
        time.sleep(0.2)
    assert [f.name for f in files] == [f"{i:06}.tiff" for i in range(1, 14)], procs[1].log()[-3000:]
    engine = create_engine("onnxruntime", EngineOptions(small_model, max_batch=8, cpu_threads=1))
    for f in files:
        uid = int(f.stem)
        expected = engine.infer(frames[uid - 1][None, None].astype(np.float32))[0, 0]
        np.testing.assert_allclose(np.asarray(Image.open(f)), expected, atol=1e-4)


def test_a_zero_cost_consumer_runs_its_batches_on_the_receive_thread(pva_env, procs, small_model, tmp_path):
    """engine zero: batchRunner auto puts the batches on PvaPy's receive thread; every frame
    comes out once, in order, equal to its input (no card: no preprocessing), and the status
    says which thread ran the batches."""
    n = 400
    frames = np.random.default_rng(8).poisson(25, (n, 64, 64)).astype(np.int16)
    np.save(tmp_path / "scan.npy", frames)
    image_channel, prefix = _channel(f"{PREFIX}:recv:image"), _channel(f"{PREFIX}:recv:inference")
    args = {"modelPath": str(small_model), "engine": "zero", "batchTimeout": 0.1}
    procs.append(start("consumer", consumer_argv(image_channel, prefix, 1, "processors.ptychonn.PtychoNNProcessor", args),
                       pva_env, tmp_path))
    procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", image_channel, fps=1000,
                                              start_delay_s=START_DELAY_S), pva_env, tmp_path))
    output = f"{prefix}:1:output"
    collector = OutputCollector([output])
    try:
        assert collector.wait_connected(START_DELAY_S - 1), procs[0].log()[-3000:]
        got = collector.wait_count(n, timeout_s=60, idle_s=15)
        status = wait_status([f"{prefix}:1:status"], lambda rs: rs[0]["userStats"]["nFramesProcessed"] >= n)[0]
    finally:
        collector.close()
    assert got == n, f"received {got} of {n}\n" + procs[0].log()[-3000:]
    received = collector.received[output]
    assert [r.unique_id for r in received] == list(range(1, n + 1))
    for r in received:
        np.testing.assert_array_equal(r.image, frames[r.unique_id - 1].astype(np.float32))
    user = status["userStats"]
    assert user["batchRunner"] == "receive" and user["engine"] == "zero"
    assert user["nFramesProcessed"] == n and user["nFramesDropped"] == 0 and user["nFramesUnaccounted"] == 0
    assert status["processorStats"]["nMissed"] == 0
