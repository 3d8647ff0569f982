"""Swapping models while running (configure ``modelPath``), with real PvaPy processes.

A real ``pvapy-ad-sim-server`` replays a scan at a modest rate into a real
``pvapy-hpc-consumer``; halfway through, ``edge-ptychonn configure`` asks for
another model. Every uniqueId must come out exactly once; outputs before the
switch must equal model A's result and later ones model B's (computed here with
ONNX Runtime and B's card preprocessing, written out in numpy); each output's
``modelId`` attribute names its model. A model that does not fit is refused with
the reason and the stream goes on unchanged. Each test stops what it started.
"""

from __future__ import annotations

import itertools
import json
import subprocess

import numpy as np
import pytest

from edge_ptychonn.tools.processes import (
    OutputCollector, consumer_argv, read_status, sim_server_argv, start, tool_path, wait_status, wait_until,
)
from engines.base import cpu_layout, cpu_layout_device
from channel_names import PREFIX

START_DELAY_S = 6.0  # the consumer and the test's monitor connect before frames flow (1-4 s after start)
FPS = 40
BATCH = 8
_ports = itertools.count(1)


def _names(kind: str) -> tuple[str, str]:
    n = next(_ports)
    return f"{PREFIX}:swap:{kind}{n}:image", f"{PREFIX}:swap:{kind}{n}:inference"


def _start_stream(pva_env, procs, tmp_path, model, n, kind):
    """The sim server replaying ``n`` frames at FPS into one consumer (log level info)."""
    frames = np.random.default_rng(11).poisson(25, (n, 64, 64)).astype(np.int16)
    np.save(tmp_path / "scan.npy", frames)
    image, prefix = _names(kind)
    args = {"modelPath": str(model), "engine": "onnxruntime", "cpuThreads": 1, "batchSize": BATCH,
            "batchTimeout": 0.5}  # full batches of 8 at FPS: one every 200 ms
    consumer = start("consumer", consumer_argv(image, prefix, 1, "processors.ptychonn.PtychoNNProcessor", args,
                                               report_period_s=0.5, extra=["-ll", "info"]), pva_env, tmp_path)
    procs.append(consumer)
    procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", image, fps=FPS, start_delay_s=START_DELAY_S),
                       pva_env, tmp_path))
    return frames, prefix, consumer


def _configure(control: str, *pairs: str) -> subprocess.CompletedProcess:
    """``edge-ptychonn configure`` as a user runs it."""
    return subprocess.run([tool_path("edge-ptychonn"), "configure", control, *pairs],
                          capture_output=True, text=True, timeout=90)


def _model_id(attributes: list) -> str | None:
    """The ``modelId`` attribute's value in an output's attribute list."""
    return next((a["value"][0]["value"] for a in attributes if a["name"] == "modelId"), None)


def _run_model(model, inputs: np.ndarray) -> np.ndarray:
    """The model's phase output for float32 inputs (n, 64, 64), by ONNX Runtime directly."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(["phase"], {name: inputs[i : i + 50, None]})[0][:, 0]
                           for i in range(0, len(inputs), 50)])


def _identity(model, name) -> str:
    import hashlib

    return f"{name} sha256:{hashlib.sha256(model.read_bytes()).hexdigest()[:12]}"


def test_processor_swaps_reports_and_checks_the_input_size_before_building(small_model, model_b, model_32, rng,
                                                                             monkeypatch):
    """The processor class alone (no processes): the model stat, settings, and a model of
    another input size refused before any engine is built for it."""
    import processors.ptychonn as ptychonn
    from frames_util import good_frame

    published = []
    processor = ptychonn.PtychoNNProcessor({"processorId": 1, "modelPath": str(small_model), "engine": "onnxruntime",
                                            "cpuThreads": 1, "batchSize": 2, "batchTimeout": 0.05})

    class Publisher:  # what PvaPy's PvasDataPublisher offers
        def updateOutputChannel(self, pv):
            published.append((pv["uniqueId"], _model_id(pv["attribute"])))

    processor.outputChannel, processor.dataPublisher = "out", Publisher()
    builds = []
    real_create = ptychonn.create_engine
    monkeypatch.setattr(ptychonn, "create_engine", lambda *a, **k: builds.append(a) or real_create(*a, **k))
    processor.start()
    id_a, id_b = _identity(small_model, "small"), _identity(model_b, "model-b")
    assert processor.getStats()["model"] == id_a and len(builds) == 1
    with pytest.raises(ValueError, match="takes 32x32 input"):
        processor.configure({"modelPath": str(model_32)})
    assert len(builds) == 1  # refused before building
    processor.configure({"modelPath": str(model_b)})
    assert builds[-1][0] == "onnxruntime" and builds[-1][1].model_path == model_b  # the running kind
    processor.process(good_frame(1, rng.poisson(20, (64, 64)).astype(np.int16)))
    assert wait_until(lambda: published, 10)
    stats = processor.getStats()
    processor.stop()
    assert published == [(1, id_b)]
    assert stats["model"] == id_b and json.loads(stats["settings"])["modelPath"] == str(model_b)


@pytest.mark.e2e
def test_models_swap_halfway_through_a_scan_without_a_restart(pva_env, procs, small_model, model_b, tmp_path):
    n = 400  # 10 s at 40 frames/s
    frames, prefix, consumer = _start_stream(pva_env, procs, tmp_path, small_model, n, "live")
    id_a, id_b = _identity(small_model, "small"), _identity(model_b, "model-b")
    collector = OutputCollector([f"{prefix}:1:output"])
    try:
        assert collector.wait_connected(START_DELAY_S - 1), consumer.log()[-3000:]
        assert wait_until(lambda: collector.count() >= n // 2, START_DELAY_S + 30), consumer.log()[-3000:]
        done = _configure(f"{prefix}:1:control", f"modelPath={model_b}")
        at_reply = collector.count()
        got = collector.wait_count(n, timeout_s=40, idle_s=10)
        status = wait_status([f"{prefix}:1:status"], lambda rs: rs[0]["userStats"]["nFramesProcessed"] >= n)[0]
    finally:
        collector.close()
    assert done.returncode == 0 and done.stdout.strip() == "Configuration successful", (done.stdout, done.stderr)
    assert got == n, consumer.log()[-3000:]
    out = collector.received[f"{prefix}:1:output"]
    assert [r.unique_id for r in out] == list(range(1, n + 1))  # every frame exactly once, in order

    # which model made each output: A up to the switch, B after it, some of each
    ids = [_model_id(r.attributes) for r in out]
    switch = ids.index(id_b)
    assert ids == [id_a] * switch + [id_b] * (n - switch), sorted(set(map(str, ids)))
    assert n // 2 <= switch <= at_reply + 4 * BATCH, (switch, at_reply)  # the switch followed the answer

    # each output equals its model's result, with that model's card preprocessing
    counts = frames.astype(np.float32)
    expected_a = _run_model(small_model, counts[:switch])  # no card: the counts as they are
    expected_b = _run_model(model_b, np.sqrt(counts[switch:]) * np.float32(0.5))  # B's card: sqrt, scale 0.5
    for r, expected in zip(out, np.concatenate([expected_a, expected_b])):
        np.testing.assert_allclose(r.image, expected, atol=1e-4, err_msg=f"frame {r.unique_id}")

    # the status channel and the log agree; nothing unaccounted
    user = status["userStats"]
    assert user["model"] == id_b and json.loads(user["settings"])["modelPath"] == str(model_b)
    assert json.loads(user["settings"])["transform"] == "sqrt"
    assert (user["nFramesProcessed"], user["nFramesDropped"], user["nBadFrames"]) == (n, 0, 0)
    assert user["nFramesUnaccounted"] == 0 and user["nInferenceErrors"] == 0
    assert f"model switched from {id_a} to {id_b}" in consumer.log()
    # a consumer alone takes the cores as workers (cpuThreads 1); the new model's engine is the same layout
    workers = cpu_layout(1, 0, consumers=1)[0]
    assert user["device"] == cpu_layout_device("cpu", workers, 1)

    # no pause at the switch beyond a batch: the gaps between outputs there, against the rest
    arrival = np.array([r.arrival_s for r in out])
    gaps = np.diff(arrival)  # gaps[i]: output i -> i+1
    near = slice(max(switch - 2 * BATCH, 0), switch + 2 * BATCH)
    elsewhere = np.concatenate([gaps[BATCH : near.start], gaps[near.stop : -BATCH]])
    batch_period_s = BATCH / FPS
    print(*[line for line in consumer.log().splitlines() if "modelPath" in line or "switched" in line], sep="\n")
    print(f"configure answered with {at_reply} outputs in; switch after {switch} of {n} frames; longest gap between outputs around it "
          f"{gaps[near].max() * 1e3:.0f} ms; elsewhere max {elsewhere.max() * 1e3:.0f} ms, "
          f"p99 {np.percentile(elsewhere, 99) * 1e3:.0f} ms, median {np.median(elsewhere) * 1e3:.1f} ms; "
          f"a batch arrives every {batch_period_s * 1e3:.0f} ms")
    # twice the worst gap elsewhere plus a second: room for a loaded machine's scheduling,
    # still short of the seconds a consumer paused to load the new model would take
    assert gaps[near].max() <= 2 * max(elsewhere.max(), batch_period_s) + 1.0


@pytest.mark.e2e
def test_a_model_that_does_not_fit_is_refused_and_the_stream_goes_on(pva_env, procs, small_model, model_32,
                                                                     tmp_path):
    n = 200
    frames, prefix, consumer = _start_stream(pva_env, procs, tmp_path, small_model, n, "refuse")
    id_a = _identity(small_model, "small")
    text = tmp_path / "notes.onnx"
    text.write_text("these are notes, not a model\n")
    control = f"{prefix}:1:control"
    collector = OutputCollector([f"{prefix}:1:output"], keep_images=False)
    try:
        assert collector.wait_connected(START_DELAY_S - 1), consumer.log()[-3000:]
        assert wait_until(lambda: collector.count() >= BATCH, START_DELAY_S + 30), consumer.log()[-3000:]
        settings = read_status(f"{prefix}:1:status")["userStats"]["settings"]
        refusals = {}
        for what, model, reason in [
            ("other input size", model_32, "takes 32x32 input, but frames are preprocessed for the running model's 64x64"),
            ("not ONNX", text, "is not a readable ONNX model"),
        ]:
            before = collector.count()
            done = _configure(control, f"modelPath={model}", "scale=2")
            refusals[what] = done.stdout.strip()
            assert done.returncode == 1, (what, done.stdout, done.stderr)
            assert done.stdout.startswith("Configuration failed: ") and reason in done.stdout, (what, done.stdout)
            assert len(done.stdout) < 400, (what, len(done.stdout))
            assert wait_until(lambda: collector.count() > before, 5), f"frames stopped after {what}"
        print(*(f"{what}: {reply}" for what, reply in refusals.items()), sep="\n")
        got = collector.wait_count(n, timeout_s=40, idle_s=10)
        status = wait_status([f"{prefix}:1:status"], lambda rs: rs[0]["userStats"]["nFramesProcessed"] >= n)[0]
    finally:
        collector.close()
    assert got == n, consumer.log()[-3000:]
    out = collector.received[f"{prefix}:1:output"]
    assert [r.unique_id for r in out] == list(range(1, n + 1))
    assert {_model_id(r.attributes) for r in out} == {id_a}  # nothing changed
    user = status["userStats"]
    assert user["model"] == id_a and user["settings"] == settings
    assert user["nFramesProcessed"] == n and user["nFramesUnaccounted"] == 0 and user["nFramesDropped"] == 0
    assert "model switched" not in consumer.log()
