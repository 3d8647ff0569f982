"""Shared fixtures: small exported models, the external reference model, PVA set-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_ptychonn.tools.processes import LOOPBACK_ENV, at_once

# Keep every PVA search, beacon and server socket on loopback (EPICS_PVA_ADDR_LIST,
# EPICS_PVAS_INTF_ADDR_LIST, beacons: tools.processes.LOOPBACK_ENV, their one home), in
# this process (its monitors) and in every process the tests start (they inherit it).
os.environ.update(LOOPBACK_ENV)

ROOT = Path(__file__).resolve().parent.parent
# the nearest shared/models/ above the checkout (normally ../shared beside it)
EXTERNAL_MODEL = next(
    (p / "shared" / "models" / "edgeptychonn_ptychoNN_8.onnx" for p in ROOT.parents
     if (p / "shared" / "models" / "edgeptychonn_ptychoNN_8.onnx").is_file()),
    ROOT.parent / "shared" / "models" / "edgeptychonn_ptychoNN_8.onnx",
)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A deterministic random PtychoNN for 64x64 frames, dynamic batch (ONNX)."""
    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx

    path = tmp_path_factory.mktemp("models") / "small.onnx"
    return export_onnx(build_model(ModelConfig(width=8, depth=3, input_size=64), seed=0), path)


@pytest.fixture(scope="session")
def external_model() -> Path:
    """The external edgePtychoNN model (fixed batch 8, 128x128) beside the repository."""
    if not EXTERNAL_MODEL.is_file():
        pytest.skip(f"external reference model not found at {EXTERNAL_MODEL}")
    return EXTERNAL_MODEL


@pytest.fixture(scope="module")
def diffraction() -> np.ndarray:
    """A batch of 8 diffraction frames for the external model (128x128)."""
    return np.random.default_rng(7).poisson(5.0, (8, 1, 128, 128)).astype(np.float32)


@pytest.fixture(scope="module")
def ort_engine(external_model):
    """ONNX Runtime on the external model: the reference the other engines are checked against."""
    from engines import EngineOptions, create_engine

    return create_engine("onnxruntime", EngineOptions(external_model, max_batch=8))


@pytest.fixture
def fixed8_model(tmp_path) -> Path:
    """A batch-8 model (edgePtychoNN's kind) that doubles its 16x16 input: y = 2 x."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 2.0, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 1, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 1, 16, 16])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = tmp_path / "fixed8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


@pytest.fixture
def dead_pid() -> int:
    """The process id of a process that has exited (what a killed writer leaves in its file names)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(60)
    return child.pid


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def pva_env() -> dict:
    """Loopback-only EPICS settings for this process and its children; multicast on lo."""
    from edge_ptychonn.tools.processes import loopback_multicast, use_loopback

    env = use_loopback()
    ok, reason = loopback_multicast()
    if not ok:
        pytest.skip(f"several PVA servers on one host need multicast on lo: {reason}")
    return env


def group_gone(pgid: int, timeout_s: float = 5.0) -> bool:
    """Whether process group ``pgid`` has no process left within ``timeout_s`` (a killed
    orphan is reaped by init shortly after its parent's group was stopped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # the id now names a group of another user's processes: ours are gone
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def lines_until(stream, done, timeout_s: float) -> list[str]:
    """Lines read from ``stream`` (a process's text pipe) until ``done(lines)`` is true, the
    stream ends or ``timeout_s`` passes: read on a thread, so a process that prints nothing
    cannot hang the test. On success the reader has stopped, so the pipe can be read on."""
    lines: list[str] = []
    finished = threading.Event()

    def read():
        try:
            for line in stream:
                lines.append(line)
                if done(lines):
                    break
        finally:
            finished.set()

    threading.Thread(target=read, daemon=True).start()
    finished.wait(timeout_s)
    return list(lines)


@pytest.fixture
def procs():
    """Processes a test starts (tools.processes.start); stopped by pid at the end, all at
    once (each takes seconds to stop: a consumer's final statistics, a sim server's grace):
    every one, even when stopping another failed; each one's process group must be gone.
    SIGINT gets 2 s before SIGTERM: what a test checks is done by then, and a process that
    does not take SIGINT (a Qt viewer, a consumer whose child was killed) need not cost 5 s."""
    started = []
    yield started
    problems = [f"{proc.name} (pid {proc.pid}): stop() raised {exc!r}"
                for proc, exc in at_once(lambda proc: proc.stop(grace_s=2.0), started)]
    for proc in started:
        if not group_gone(proc.pid):
            problems.append(f"{proc.name} (pid {proc.pid}): its process group was still running (killed)")
            try:  # leave nothing running for the next test
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not problems, "; ".join(problems)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory) -> Path:
    """A random PtychoNN for 64x64 frames wide enough to run ~100 frames/s on one core:
    a consumer that a sim server can overload many times over."""
    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx

    path = tmp_path_factory.mktemp("models") / "slow.onnx"
    return export_onnx(build_model(ModelConfig(width=48, depth=3, input_size=64), seed=0), path)


@pytest.fixture(scope="session")
def model_b(tmp_path_factory):
    """64x64 like small_model, other weights; its card asks for sqrt and scale 0.5 (model swaps)."""
    from model_util import export_small_model

    return export_small_model(tmp_path_factory.mktemp("swap") / "b.onnx", seed=1, name="model-b",
                              transform="sqrt", scale=0.5)


@pytest.fixture(scope="session")
def model_32(tmp_path_factory):
    """A model with 32x32 input: does not fit where small_model runs."""
    from model_util import export_small_model

    return export_small_model(tmp_path_factory.mktemp("swap32") / "m32.onnx", seed=2, input_size=32)


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_SESSION_HANDLERS = {s: signal.getsignal(s) for s in _SIGNALS}  # as the test session started


def _restore_signal_handlers() -> None:
    for s, handler in _SESSION_HANDLERS.items():
        if handler is not None and signal.getsignal(s) is not handler:
            signal.signal(s, handler)


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Each test runs, and leaves, SIGTERM, SIGINT and SIGHUP as the session started with them: a
    processor started in-process installs its SIGTERM handler (processors.shutdown.on_sigterm),
    which stays after its test, and one used once ignores every later SIGTERM. A command that
    takes SIGTERM only where it has its default action (cli.sigterm_interrupts) then ran without
    it: test_cli's SIGTERM test failed after the stitcher's or the writer's tests, and finetune's
    after a module fixture had started an HDF5 writer."""
    _restore_signal_handlers()  # what module or session fixtures set up for this test left
    yield
    _restore_signal_handlers()
