"""The TensorRT engine against stand-ins of the ``tensorrt`` (10.x and 11.x) and ``pycuda`` APIs.

No TensorRT or GPU is reachable here: ``tests/fakes`` provide the 10/11 Python API
names and signatures, record every call, run queued GPU work only when it is
waited for, and compute outputs with ONNX Runtime. What these tests show: the
engine uses only the 10/11 API, builds, caches and rebuilds plans as specified,
sets shapes and addresses, orders its copies and compute on its streams, and
returns the model's own numbers. What they cannot show: real TensorRT speed,
kernel choice, or numerics of fp16/bf16 kernels on a GPU.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engines import EngineOptions, EngineUnavailable, create_engine
from engines import tensorrt_engine as te
from fakes import fake_pycuda, fake_tensorrt

ROOT = Path(__file__).resolve().parent.parent


class Gpu:
    """The fake driver state plus the fake tensorrt module, installed in sys.modules."""

    def __init__(self, monkeypatch, version="10.16.1.11", gpus=(("NVIDIA RTX A6000", (8, 6)),)):
        self.monkeypatch = monkeypatch
        self.cuda = fake_pycuda.FakeCuda(gpus)
        package, driver = fake_pycuda.make_modules(self.cuda)
        monkeypatch.setitem(sys.modules, "pycuda", package)
        monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
        self.install_trt(version)

    def install_trt(self, version: str, build_delay_s: float = 0.0) -> None:
        self.trt = fake_tensorrt.make_module(self.cuda, version, build_delay_s=build_delay_s)
        self.monkeypatch.setitem(sys.modules, "tensorrt", self.trt)

    def calls(self, name: str) -> list[tuple]:
        return [c for c in self.cuda.calls if c[0] == name]

    def clear(self) -> None:
        self.cuda.calls.clear()


@pytest.fixture(params=["10.16.1.11", "11.4.1.2"], ids=["trt10", "trt11"])
def gpu(request, monkeypatch):
    return Gpu(monkeypatch, request.param)


@pytest.fixture
def gpu10(monkeypatch):
    return Gpu(monkeypatch)


@pytest.fixture(scope="module")
def frames():
    # bright enough that the small random model's outputs for two frames differ by far more
    # than the 1e-5 the results are compared at (at 0.05x they differed by less: a result of
    # the wrong frame or batch passed); see test_the_frames_results_are_told_apart
    return np.random.default_rng(5).poisson(9, (8, 1, 64, 64)).astype(np.float32) * 10


@pytest.fixture(scope="module")
def reference(small_model):
    return create_engine("onnxruntime", EngineOptions(small_model, device="cpu", max_batch=8))


def make(model, tmp_path, **kw) -> te.TensorRTEngine:
    options = dict(model_path=model, device="cuda:0", max_batch=8, plan_cache_dir=tmp_path / "plans")
    options.update(kw)
    return create_engine("tensorrt", EngineOptions(**options))


def test_the_frames_results_are_told_apart(frames, reference):
    """The comparisons below at atol=1e-5 can tell one frame's result from another's."""
    out = reference.infer(frames)
    gaps = [np.abs(out[i] - out[j]).max() for i in range(len(out)) for j in range(i)]
    assert min(gaps) > 50 * 1e-5, min(gaps)
    assert np.abs(reference.infer(np.zeros_like(frames)) - out).max() > 50 * 1e-5


# -- contract: the API names we rely on ----------------------------------------------------------
def _trt_objects(trt):
    """One instance (or class) per API group, from the stand-in or the real module."""
    logger = te.tensorrt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    return {
        "module": trt, "ILogger": logger, "ILogger.Severity": trt.ILogger.Severity, "Builder": builder,
        "OnnxParser": trt.OnnxParser(network, logger),
        "IBuilderConfig": builder.create_builder_config(), "IOptimizationProfile": builder.create_optimization_profile(),
        "Runtime": trt.Runtime(logger), "ICudaEngine": trt.ICudaEngine, "IExecutionContext": trt.IExecutionContext,
        "MemoryPoolType": trt.MemoryPoolType, "BuilderFlag": trt.BuilderFlag, "TensorIOMode": trt.TensorIOMode,
    }


def test_contract_the_stand_in_offers_every_name_the_engine_uses(gpu):
    gpu.cuda.initialised = True
    objects = _trt_objects(gpu.trt)
    for group, names in te.TRT_API.items():
        for name in names:
            assert hasattr(objects[group], name), f"{group}.{name}"
    driver = sys.modules["pycuda.driver"]
    for group, names in te.PYCUDA_API.items():
        holder = {"driver": driver, "Device": driver.Device, "Context": driver.Context, "Stream": driver.Stream,
                  "Event": driver.Event}[group]
        for name in names:
            if group == "Stream" and name == "handle":
                continue  # an instance attribute
            assert hasattr(holder, name), f"pycuda {group}.{name}"


def test_contract_removed_apis_are_absent_from_the_stand_in_and_unused():
    trt10 = fake_tensorrt.make_module(fake_pycuda.FakeCuda(), "10.16.1.11")
    trt11 = fake_tensorrt.make_module(fake_pycuda.FakeCuda(), "11.4.1.2")
    for trt in (trt10, trt11):
        assert not hasattr(trt.Builder, "build_engine")
        assert not hasattr(trt.IExecutionContext, "execute_async_v2")
        assert not hasattr(trt.IBuilderConfig, "max_workspace_size")
        assert not hasattr(trt.ICudaEngine, "get_binding_shape")
    assert hasattr(trt10.BuilderFlag, "FP16") and not hasattr(trt11.BuilderFlag, "FP16")
    assert not hasattr(trt11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    code = (ROOT / "engines" / "tensorrt_engine.py").read_text()
    body = code.split("TRT_REMOVED = (", 1)[1].split(")", 1)[1]  # everything after the list itself
    for removed in ("build_engine", "execute_async_v2", "max_workspace_size", "EXPLICIT_BATCH", "BuilderFlag.FP16",
                    "BuilderFlag.BF16", "get_binding", "num_bindings", "binding_is_input", "pycuda.autoinit",
                    "make_context"):
        assert re.search(rf"\b{re.escape(removed)}\b", body) is None, removed


def test_contract_the_stand_ins_flag_values_and_errors_are_tensorrts():
    """As TensorRT's bindings have them, where the engine relies on them: STRONGLY_TYPED is
    bit 1 in 10 and bit 0 in 11 (deprecated there and ignored; EXPLICIT_BATCH, bit 0 in 10,
    is gone), so the engine passes 2 and 1; set_shape raises RuntimeError for inconsistent
    shapes; nptype raises TypeError for bf16, which numpy lacks."""
    trt10 = fake_tensorrt.make_module(fake_pycuda.FakeCuda(), "10.16.1.11")
    trt11 = fake_tensorrt.make_module(fake_pycuda.FakeCuda(), "11.4.1.2")
    assert int(trt10.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) == 0
    assert int(trt10.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1 and te._network_flags(trt10) == 2
    assert int(trt11.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0 and te._network_flags(trt11) == 1
    for trt in (trt10, trt11):
        builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
        assert builder.create_network(te._network_flags(trt)).flags == te._network_flags(trt)
        with pytest.raises(RuntimeError):
            builder.create_optimization_profile().set_shape("x", (8, 1), (1, 1), (8, 1))
        with pytest.raises(TypeError):
            trt.nptype(trt.DataType.BF16)


def test_contract_against_the_real_tensorrt_when_installed():
    if "tensorrt" in sys.modules and getattr(sys.modules["tensorrt"], "fail_next_build", None) is not None:
        pytest.skip("stand-in installed")
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here (expected: see README)")
    objects = _trt_objects(trt)
    for group, names in te.TRT_API.items():
        for name in names:
            assert hasattr(objects[group], name), f"{group}.{name}"


# -- build, run, results ------------------------------------------------------------------------
def test_build_then_run_matches_onnxruntime(gpu, small_model, tmp_path, frames, reference):
    engine = make(small_model, tmp_path)
    assert engine.plan_source == "built" and engine.plan_path.is_file()
    assert engine.device == "cuda:0 (NVIDIA RTX A6000)" and engine.input_shape == (64, 64)
    out = engine.infer(frames)
    assert out.shape == (8, 1, 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference.infer(frames), atol=1e-5)
    # one profile, batches 1..8, opt = max; network strongly typed where the flag exists
    build = gpu.calls("build_serialized_network")
    assert len(build) == 1 and "BuilderFlag.TF32" not in build[0][1]  # fp32: TF32 cleared
    assert ("clear_flag", "BuilderFlag.TF32") in gpu.cuda.calls
    assert ("set_memory_pool_limit", "MemoryPoolType.WORKSPACE", te.WORKSPACE_BYTES) in gpu.cuda.calls
    key = json.loads(engine.plan_path.with_suffix(".json").read_text())
    assert key["profile"] == "diffraction:1x1x64x64/8x1x64x64/8x1x64x64"
    assert key["tensorrt_version"] == gpu.trt.__version__ and key["compute_capability"] == "8.6"
    engine.close()


def test_partial_batches_run_at_their_own_size_without_padding(gpu10, small_model, tmp_path, frames, reference):
    engine = make(small_model, tmp_path)
    gpu10.clear()
    for n in (1, 3, 8, 5):
        np.testing.assert_allclose(engine.infer(frames[:n]), reference.infer(frames[:n]), atol=1e-5)
    shapes = [c[2] for c in gpu10.calls("set_input_shape")]
    assert shapes == [(1, 1, 64, 64), (3, 1, 64, 64), (8, 1, 64, 64), (5, 1, 64, 64)]
    copies_in = [c[2] for c in gpu10.calls("memcpy_htod_async")]
    assert copies_in == [n * 64 * 64 * 4 for n in (1, 3, 8, 5)]  # only the real frames travel
    with pytest.raises(ValueError, match="batch size must be 1..8"):
        engine.infer(np.zeros((9, 1, 64, 64), np.float32))


def test_addresses_streams_and_order_of_work(gpu10, small_model, tmp_path, frames):
    engine = make(small_model, tmp_path)
    gpu10.clear()
    t1 = engine.submit(frames[:4])
    t2 = engine.submit(frames[4:])
    calls = gpu10.cuda.calls
    executes = gpu10.calls("execute_async_v3")
    assert len(executes) == 2
    # nothing has run yet: submit only queues (results come back asynchronously)
    streams = gpu10.cuda.streams
    assert any(not s.is_done() for s in streams.values())
    # two buffer sets: the two batches use different device input buffers
    inputs = [c[2] for c in gpu10.calls("set_tensor_address") if c[1] == "diffraction"]
    assert len(inputs) == 2 and inputs[0] != inputs[1]
    for c in gpu10.calls("set_tensor_address"):
        assert any(base <= c[2] < base + buf.nbytes for base, buf in gpu10.cuda.memory.items())
    # copies in on one stream, inference and copy out on another
    h2d = {c[3] for c in gpu10.calls("memcpy_htod_async")}
    d2h = {c[3] for c in gpu10.calls("memcpy_dtoh_async")}
    compute = {c[1] for c in executes}
    assert len(h2d) == 1 and h2d != compute and d2h == compute
    # the compute stream waits for each copy-in; each copy-in waits for its slot's last compute
    assert [c[0] for c in calls].count("Stream.wait_for_event") == 4
    out1, out2 = engine.collect(t1), engine.collect(t2)
    np.testing.assert_allclose(np.concatenate([out1, out2]), engine.infer(frames), atol=1e-6)
    # every CUDA call ran with the primary context pushed, and every push was popped
    assert gpu10.cuda.stack() == []
    assert not gpu10.calls("make_context")


def test_reusing_the_input_array_after_submit_is_safe(gpu10, small_model, tmp_path, frames, reference):
    engine = make(small_model, tmp_path)
    batch = frames.copy()
    ticket = engine.submit(batch)
    batch[:] = 0.0  # the caller reuses its buffer at once: the engine copied it into pinned memory
    np.testing.assert_allclose(engine.collect(ticket), reference.infer(frames), atol=1e-5)


def test_copy_in_of_the_next_batch_overlaps_compute(gpu10, small_model, tmp_path, frames, reference):
    """Batch 2's copy-in is queued (on the copy stream) before batch 1's result is collected,
    and runs before batch 1's compute when the copy stream is drained first."""
    engine = make(small_model, tmp_path)
    t1 = engine.submit(frames[:4])
    t2 = engine.submit(frames[4:])
    copy_stream = engine._copy_stream
    copy_stream.synchronize()  # the copy engine races ahead: both copies done
    assert not engine._compute_stream.is_done()  # compute of batch 1 still pending
    np.testing.assert_allclose(engine.collect(t1), reference.infer(frames[:4]), atol=1e-5)
    np.testing.assert_allclose(engine.collect(t2), reference.infer(frames[4:]), atol=1e-5)
    t3 = engine.submit(frames[:2])  # batch 1's slot again, after its ticket was collected
    assert t3.slot == t1.slot != t2.slot
    np.testing.assert_allclose(engine.collect(t3), reference.infer(frames[:2]), atol=1e-5)


def test_done_says_whether_collect_would_wait_and_never_waits(gpu10, small_model, tmp_path, frames, reference):
    """``done(ticket)``: the batch's event on the compute stream reached. It never runs the
    stream itself (the pipeline's receive thread asks at each frame and goes on receiving)."""
    engine = make(small_model, tmp_path)
    t1 = engine.submit(frames[:4])
    t2 = engine.submit(frames[4:])
    assert not engine.done(t1) and not engine.done(t2)  # queued, not run: asking ran nothing
    assert not engine._compute_stream.is_done()
    engine._compute_stream.synchronize()  # the GPU gets there
    assert engine.done(t1) and engine.done(t2)
    np.testing.assert_allclose(engine.collect(t1), reference.infer(frames[:4]), atol=1e-5)
    np.testing.assert_allclose(engine.collect(t2), reference.infer(frames[4:]), atol=1e-5)


def test_at_most_two_in_flight_and_in_order(gpu10, small_model, tmp_path, frames, reference):
    engine = make(small_model, tmp_path)
    a, b = engine.submit(frames[:1]), engine.submit(frames[1:3])
    with pytest.raises(RuntimeError, match="2 batches already in flight"):
        engine.submit(frames[:3])
    with pytest.raises(RuntimeError, match="in the order they were submitted"):
        engine.collect(b)
    # each ticket gives its own batch's results, untouched by the refused calls
    np.testing.assert_allclose(engine.collect(a), reference.infer(frames[:1]), atol=1e-5)
    np.testing.assert_allclose(engine.collect(b), reference.infer(frames[1:3]), atol=1e-5)


def test_engine_runs_from_another_thread(gpu10, small_model, tmp_path, frames, reference):
    """The pipeline's inference thread is not the thread that created the engine."""
    import threading

    engine = make(small_model, tmp_path)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", engine.infer(frames)))
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "infer() on another thread did not return"
    np.testing.assert_allclose(result["out"], reference.infer(frames), atol=1e-5)


def test_consumer_n_takes_gpu_n_minus_1_mod_gpus(monkeypatch, small_model, tmp_path):
    gpus = (("NVIDIA RTX A6000", (8, 6)), ("NVIDIA RTX A6000", (8, 6)))
    Gpu(monkeypatch, gpus=gpus)
    devices = [make(small_model, tmp_path, device="auto", processor_id=k).device for k in (1, 2, 3)]
    assert devices == ["cuda:0 (NVIDIA RTX A6000)", "cuda:1 (NVIDIA RTX A6000)", "cuda:0 (NVIDIA RTX A6000)"]
    assert make(small_model, tmp_path, device="cuda:1,0", processor_id=2).device.startswith("cuda:0")
    with pytest.raises(EngineUnavailable, match="GPUs only, not on the CPU"):
        make(small_model, tmp_path, device="cpu")
    with pytest.raises(EngineUnavailable, match="sees 2 GPU"):
        make(small_model, tmp_path, device="cuda:2")


# -- plan cache ----------------------------------------------------------------------------------
def test_cache_hit_skips_the_build(gpu, small_model, tmp_path, dead_pid):
    from edge_ptychonn.files import partial_name

    (tmp_path / "plans").mkdir()
    half = partial_name(tmp_path / "plans" / "model.plan", dead_pid)  # a build killed while saving
    half.write_bytes(b"half a plan")
    first = make(small_model, tmp_path)
    first.close()
    assert not half.exists() and first.plan_path.exists()
    gpu.clear()
    second = make(small_model, tmp_path)
    assert second.plan_source == "cache" and second.plan_path == first.plan_path
    assert not gpu.calls("build_serialized_network") and not gpu.calls("OnnxParser.parse")
    assert len(gpu.calls("deserialize_cuda_engine")) == 1


@pytest.mark.parametrize("change", ["tensorrt_version", "gpu_name", "compute_capability", "onnx", "profile",
                                    "precision"])
def test_cache_is_invalidated_by_each_key_element(monkeypatch, small_model, tmp_path, change):
    import shutil

    gpu = Gpu(monkeypatch)
    model = tmp_path / "model.onnx"
    shutil.copy(small_model, model)
    first = make(model, tmp_path)
    plans = tmp_path / "plans"
    assert len(list(plans.glob("*.plan"))) == 1
    kwargs = {}
    if change == "tensorrt_version":
        gpu.install_trt("10.17.0.4")
    elif change == "gpu_name":
        gpu.cuda.gpus = [("NVIDIA RTX A5000", (8, 6))]
    elif change == "compute_capability":
        gpu.cuda.gpus = [("NVIDIA RTX A6000", (8, 9))]
    elif change == "onnx":
        import onnx
        from onnx import numpy_helper

        m = onnx.load(str(model))
        w = m.graph.initializer[0]
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
        onnx.save(m, str(model))
    elif change == "profile":
        kwargs["max_batch"] = 16
    elif change == "precision":
        kwargs["precision"] = "fp16"
    gpu.clear()
    second = make(model, tmp_path, **kwargs)
    assert second.plan_source == "built", change
    assert second.plan_path != first.plan_path
    assert len(gpu.calls("build_serialized_network")) == 1
    assert len(list(plans.glob("*.plan"))) == 2


def test_a_stale_plan_is_rebuilt_with_a_log_line(gpu10, small_model, tmp_path, caplog, frames, reference):
    first = make(small_model, tmp_path)
    first.close()
    sidecar = first.plan_path.with_suffix(".json")
    key = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**key, "onnx_sha256": "0" * 64}))  # e.g. a file replaced under the same name
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt_engine"):
        second = make(small_model, tmp_path)
    assert second.plan_source == "built"
    assert "is stale (onnx_sha256 differ); rebuilding it" in caplog.text
    np.testing.assert_allclose(second.infer(frames), reference.infer(frames), atol=1e-5)


@pytest.mark.parametrize("damage", ["garbage", "empty", "other_version", "no_sidecar", "sidecar_not_a_key"])
def test_an_unreadable_plan_is_rebuilt_never_a_crash(gpu10, small_model, tmp_path, caplog, damage):
    first = make(small_model, tmp_path)
    first.close()
    if damage == "garbage":
        first.plan_path.write_bytes(b"\x00not a plan")
    elif damage == "empty":
        first.plan_path.write_bytes(b"")
    elif damage == "other_version":  # a plan from another TensorRT under a matching key: deserialize -> None
        first.plan_path.write_bytes(first.plan_path.read_bytes().replace(b"10.16.1.11", b"10.99.0.0"))
    elif damage == "sidecar_not_a_key":  # JSON, but not the key (before: AttributeError on list.get)
        first.plan_path.with_suffix(".json").write_text("[]")
    else:
        first.plan_path.with_suffix(".json").unlink()
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt_engine"):
        second = make(small_model, tmp_path)
    assert second.plan_source in ("rebuilt", "built")
    assert "rebuilding it" in caplog.text
    assert second.infer(np.zeros((2, 1, 64, 64), np.float32)).shape == (2, 1, 64, 64)
    # and the rebuilt plan is good for the next start
    assert make(small_model, tmp_path).plan_source == "cache"


def test_warm_start_with_a_cached_plan_is_fast(gpu10, small_model, tmp_path):
    """A stand-in whose build takes 3.5 s (a real one takes minutes): the cold start
    pays it, the warm start deserializes the cached plan and is ready within 3 s."""
    gpu10.install_trt("10.16.1.11", build_delay_s=3.5)
    t0 = time.perf_counter()
    make(small_model, tmp_path).close()
    cold_s = time.perf_counter() - t0
    assert len(gpu10.calls("build_serialized_network")) == 1 and cold_s >= 3.5
    gpu10.clear()
    t0 = time.perf_counter()
    engine = make(small_model, tmp_path)
    out = engine.infer(np.ones((8, 1, 64, 64), np.float32))
    elapsed = time.perf_counter() - t0
    assert engine.plan_source == "cache" and out.shape == (8, 1, 64, 64)
    assert gpu10.calls("build_serialized_network") == [], "the warm start built the plan again"
    assert elapsed <= 3.0, f"warm start took {elapsed:.2f} s (cold: {cold_s:.2f} s)"


def test_default_plan_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGE_PTYCHONN_PLAN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert te.default_plan_cache_dir() == tmp_path / "edge-ptychonn" / "tensorrt"
    monkeypatch.setenv("EDGE_PTYCHONN_PLAN_CACHE", str(tmp_path / "x"))
    assert te.default_plan_cache_dir() == tmp_path / "x"


# -- precisions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("precision, tol", [("fp16", 0.05), ("bf16", 0.2), ("tf32", 1e-5)])
def test_reduced_precisions_build_from_a_typed_graph(gpu, small_model, tmp_path, frames, reference, precision, tol):
    engine = make(small_model, tmp_path, precision=precision)
    build = gpu.calls("build_serialized_network")[0][1]
    assert ("BuilderFlag.TF32" in build) == (precision == "tf32")
    assert "BuilderFlag.FP16" not in build and "BuilderFlag.BF16" not in build  # never the weak-typing flags
    out = engine.infer(frames)
    np.testing.assert_allclose(out, reference.infer(frames), atol=tol)
    assert engine.precision == precision


def test_precision_needs_the_compute_capability(monkeypatch, small_model, tmp_path):
    Gpu(monkeypatch, gpus=(("Tesla T4", (7, 5)),))
    with pytest.raises(EngineUnavailable, match=r"bf16 needs compute capability 8.0 or later; Tesla T4 has 7.5: use fp32 or fp16"):
        make(small_model, tmp_path, precision="bf16")
    with pytest.raises(EngineUnavailable, match="offers precisions fp32, tf32, fp16, bf16, not 'int8'"):
        make(small_model, tmp_path, precision="int8")
    assert make(small_model, tmp_path, precision="fp16").precision == "fp16"


# -- TensorRT's messages in Python logging -------------------------------------------------------
TRT_LOG = "engines.tensorrt_engine"


def trt_records(caplog) -> list[tuple[str, int, str]]:
    """(logger name, level, message) of the records that carry TensorRT's own messages."""
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith("TensorRT: ")]


def test_tensorrts_messages_reach_python_logging_at_their_levels(gpu, small_model, tmp_path, caplog, frames,
                                                                 reference):
    """TensorRT's messages come as records of the engine module's logger, prefixed 'TensorRT:':
    a warning at WARNING, its information at DEBUG, its verbose messages below DEBUG; and
    the engine builds and runs as before (before: a trt.Logger that kept them to itself)."""
    options = EngineOptions(small_model, device="cuda:0", max_batch=8, plan_cache_dir=tmp_path / "plans")
    with caplog.at_level(1, logger=TRT_LOG):  # everything
        engine = te.TensorRTEngine(options, workspace_bytes=16 << 20)  # under what the best tactics ask for
    records = trt_records(caplog)
    assert {name for name, _, _ in records} == {TRT_LOG}
    assert (TRT_LOG, logging.WARNING, "TensorRT: Tactic Device request: 64MB Available: 16MB. Device memory is "
            "insufficient to use tactic.") in records
    levels = {message: level for _, level, message in records}
    assert levels["TensorRT: Global timing cache in use. Profiling results in this builder pass will be stored."] \
        == logging.DEBUG
    assert levels["TensorRT: Engine generation completed in 0.1 seconds."] == logging.DEBUG
    assert {levels[m] for m in levels if m.startswith("TensorRT: Loaded engine size:")} == {logging.DEBUG}
    assert {levels[m] for m in levels if m.startswith("TensorRT: Parsing node: ")} == {te.TRT_VERBOSE}
    assert engine.plan_source == "built"
    np.testing.assert_allclose(engine.infer(frames), reference.infer(frames), atol=1e-5)
    engine.close()


def test_tensorrts_information_and_verbose_messages_stay_out_of_the_info_log(gpu10, small_model, tmp_path, caplog,
                                                                            frames, reference):
    with caplog.at_level(logging.INFO, logger=TRT_LOG):
        engine = make(small_model, tmp_path)
        np.testing.assert_allclose(engine.infer(frames), reference.infer(frames), atol=1e-5)
        engine.close()
    assert "building the TensorRT fp32 plan" in caplog.text  # the engine's own lines stay
    assert trt_records(caplog) == []  # a build with nothing to warn of: none of TensorRT's chatter
    with caplog.at_level(logging.DEBUG, logger=TRT_LOG):
        make(small_model, tmp_path / "again").close()
    assert [r for r in trt_records(caplog) if "Global timing cache" in r[2]]  # at DEBUG: its information
    assert not [r for r in trt_records(caplog) if "Parsing node" in r[2]]  # its verbose messages only below


def test_tensorrts_errors_reach_python_logging_and_the_plan_is_rebuilt(gpu10, small_model, tmp_path, caplog,
                                                                       frames, reference):
    """A cached plan (its key matching) that TensorRT will not deserialize: TensorRT's error is
    an ERROR record of the engine's logger, before the engine's own warning; then rebuilt."""
    make(small_model, tmp_path).close()
    plan = next((tmp_path / "plans").glob("*.plan"))
    plan.write_bytes(b"NOTAPLAN" + plan.read_bytes()[8:])
    with caplog.at_level(logging.WARNING, logger=TRT_LOG):
        engine = make(small_model, tmp_path)
    refused = (TRT_LOG, logging.ERROR, "TensorRT: deserializeCudaEngine: magic tag does not match")
    assert trt_records(caplog) == [refused]
    messages = [r.getMessage() for r in caplog.records]
    assert messages.index(refused[2]) < next(i for i, m in enumerate(messages) if "could not deserialize plan" in m)
    assert engine.plan_source == "rebuilt"
    np.testing.assert_allclose(engine.infer(frames), reference.infer(frames), atol=1e-5)
    caplog.clear()
    gpu10.trt.fail_next_build = True  # and a build that fails says why in the log
    with caplog.at_level(logging.WARNING, logger=TRT_LOG), pytest.raises(EngineUnavailable, match="could not build"):
        make(small_model, tmp_path / "other")
    assert (TRT_LOG, logging.ERROR, "TensorRT: simulated build failure") in trt_records(caplog)


def test_the_tensorrt_logger_maps_each_severity_and_is_one_per_process(gpu, caplog, capsys):
    trt = gpu.trt
    logger = te.tensorrt_logger(trt)
    assert isinstance(logger, trt.ILogger) and not isinstance(logger, trt.Logger)
    assert te.tensorrt_logger(trt) is logger  # every engine's builder and runtime get this one
    severity = trt.ILogger.Severity
    with caplog.at_level(1, logger=TRT_LOG):
        for member in (severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING, severity.INFO, severity.VERBOSE):
            logger.log(member, f"said at {member.name}\n")
    assert trt_records(caplog) == [
        (TRT_LOG, logging.CRITICAL, "TensorRT: said at INTERNAL_ERROR"),
        (TRT_LOG, logging.ERROR, "TensorRT: said at ERROR"),
        (TRT_LOG, logging.WARNING, "TensorRT: said at WARNING"),
        (TRT_LOG, logging.DEBUG, "TensorRT: said at INFO"),
        (TRT_LOG, te.TRT_VERBOSE, "TensorRT: said at VERBOSE"),
    ]
    assert trt.Builder(logger).logger is logger and trt.Runtime(logger).logger is logger

    class Broken(logging.Logger):
        def isEnabledFor(self, level):
            raise RuntimeError("a broken handler")

    # an exception must not get back to TensorRT, which cannot take one: the message goes to stderr
    type(logger)(Broken("broken")).log(severity.ERROR, "still said")
    assert "TensorRT: still said" in capsys.readouterr().err


def test_contract_the_stand_ins_loggers_are_tensorrts():
    """As pybind11 and TensorRT have them: a subclass of ILogger must call ILogger.__init__;
    the severities are also ILogger's attributes; Logger is an ILogger that keeps what is at
    or above its min_severity; builders, parsers and runtimes take only an ILogger."""
    trt = fake_tensorrt.make_module(fake_pycuda.FakeCuda())

    class Forgetful(trt.ILogger):
        def __init__(self):
            pass

        def log(self, severity, msg):
            pass

    with pytest.raises(TypeError, match="__init__"):
        Forgetful()
    assert [int(getattr(trt.ILogger.Severity, n)) for n in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")] \
        == [0, 1, 2, 3, 4]
    assert trt.ILogger.WARNING == trt.ILogger.Severity.WARNING == trt.Logger.WARNING
    kept = trt.Logger(trt.Logger.WARNING)
    for member in (trt.ILogger.ERROR, trt.ILogger.WARNING, trt.ILogger.INFO, trt.ILogger.VERBOSE):
        kept.log(member, member.name)
    assert isinstance(kept, trt.ILogger) and kept.messages == ["ERROR", "WARNING"]
    for make_one in (trt.Builder, trt.Runtime, lambda logger: trt.OnnxParser(None, logger)):
        with pytest.raises(TypeError, match="incompatible constructor arguments"):
            make_one(logging.getLogger(TRT_LOG))


# -- error paths ---------------------------------------------------------------------------------
def test_onnx_parse_failure_is_a_clear_error(gpu10, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # a readable signature, but a graph TensorRT's parser rejects (unknown operator domain)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])
    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), ir_version=9,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "odd.onnx"
    onnx.save(model, path)
    with pytest.raises(EngineUnavailable, match=r"TensorRT cannot parse .*odd.onnx: .*No importer registered for op: Mystery"):
        make(path, tmp_path)
    assert gpu10.cuda.stack() == []  # the context was popped
    assert gpu10.cuda.retained[0] == 1  # retained once per process, never detached (primary_context)


def test_build_failure_returning_none_is_a_clear_error(gpu10, small_model, tmp_path):
    gpu10.trt.fail_next_build = True
    with pytest.raises(EngineUnavailable, match="TensorRT could not build a fp32 plan"):
        make(small_model, tmp_path)
    assert not list((tmp_path / "plans").glob("*.plan"))  # nothing half-written cached
    assert make(small_model, tmp_path).plan_source == "built"


def test_deserialize_returning_none_after_a_build_is_a_clear_error(gpu10, small_model, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu10.trt.Runtime, "deserialize_cuda_engine", lambda self, plan: None)
    with pytest.raises(EngineUnavailable, match="could not deserialize the plan it has just built"):
        make(small_model, tmp_path)


def test_a_plan_tensor_with_no_numpy_type_is_unavailable(gpu10, small_model, tmp_path, monkeypatch):
    """trt.nptype raises TypeError for a type numpy lacks (e.g. a model with a bf16 output):
    EngineUnavailable, so that 'auto' goes on to the next engine (not a TypeError traceback)."""
    trt = gpu10.trt
    dtype = trt.ICudaEngine.get_tensor_dtype

    def bf16_outputs(self, name):
        return trt.DataType.BF16 if self.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT else dtype(self, name)

    monkeypatch.setattr(trt.ICudaEngine, "get_tensor_dtype", bf16_outputs)
    with pytest.raises(EngineUnavailable, match=r"the plan's tensor \S+ is DataType.BF16, which has no numpy type"):
        make(small_model, tmp_path)
    assert gpu10.cuda.stack() == []  # the context was popped
    options = dict(precision="auto", plan_cache_dir=tmp_path / "plans", cpu_threads=1)
    assert create_engine("auto", EngineOptions(small_model, **options)).device == "cpu (1 worker x 1 thread)"


def test_fixed_batch_models_are_padded(gpu10, tmp_path, fixed8_model):
    """A model exported with batch 8 (edgePtychoNN's kind): profile fixed at 8, partial batches padded."""
    path = fixed8_model
    engine = make(path, tmp_path, max_batch=16)
    batch = np.arange(3 * 256, dtype=np.float32).reshape(3, 1, 16, 16)
    np.testing.assert_allclose(engine.infer(batch), 2 * batch)
    big = np.ones((12, 1, 16, 16), np.float32)
    np.testing.assert_allclose(engine.infer(big), 2 * big)
    assert {c[2] for c in gpu10.calls("set_input_shape")} == {(8, 1, 16, 16)}


def test_auto_prefers_tensorrt_when_it_and_a_gpu_are_there(gpu10, small_model, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="engines.registry"):
        engine = create_engine("auto", EngineOptions(small_model, precision="auto", plan_cache_dir=tmp_path / "p"))
    assert (engine.name, engine.precision) == ("tensorrt", "fp16")
    assert "engine 'auto' chose tensorrt fp16 on a GPU" in caplog.text


def test_auto_falls_back_when_tensorrt_cannot_start(gpu10, small_model, tmp_path, caplog):
    gpu10.trt.fail_next_build = True
    with caplog.at_level(logging.INFO, logger="engines.registry"):
        engine = create_engine("auto", EngineOptions(small_model, precision="auto", plan_cache_dir=tmp_path / "p"))
    assert engine.name != "tensorrt" and engine.device.startswith("cpu (1 worker x ")
    assert "tensorrt fp16 cannot start" in caplog.text


# -- build-engine command ------------------------------------------------------------------------
def test_build_engine_command_prebuilds_plans(gpu10, small_model, tmp_path, capsys):
    from edge_ptychonn.tools import build_engine

    argv = ["--model", str(small_model), "--batch", "8", "--precision", "fp32,fp16",
            "--plan-cache-dir", str(tmp_path / "plans")]
    assert build_engine.main(build_engine.get_args_parser().parse_args(argv)) == 0
    out = capsys.readouterr().out
    assert out.count("built") == 2 and "NVIDIA RTX A6000" in out and out.count("batch 1..8:") == 2
    assert len(list((tmp_path / "plans").glob("*.plan"))) == 2
    assert build_engine.main(build_engine.get_args_parser().parse_args(argv)) == 0
    assert capsys.readouterr().out.count("cache") == 2
    gpu10.clear()
    engine = make(small_model, tmp_path, precision="fp16")  # a consumer now starts from the cache
    assert engine.plan_source == "cache" and not gpu10.calls("build_serialized_network")


def test_build_engine_bad_inputs_are_one_line_errors(gpu10, small_model, tmp_path, capsys, monkeypatch):
    """A file that is not an ONNX model and a batch out of the consumers' range are bad arguments
    (exit 2); a driver that cannot start is exit 1; one line each, never a traceback (before: a
    ValueError traceback for the file, a FAILED line per device and precision for --batch 0, and
    pycuda's error as a traceback)."""
    from edge_ptychonn import cli

    (tmp_path / "notes.onnx").write_text("not a model")
    cache = ["--plan-cache-dir", str(tmp_path / "plans")]
    for argv, code, why in ((["--model", str(tmp_path / "notes.onnx")], 2, "is not a readable ONNX model"),
                            (["--model", str(small_model), "--batch", "0"], 2, "--batch must be 1..256"),
                            (["--model", str(small_model), "--batch", "257"], 2, "--batch must be 1..256")):
        assert cli.main(["build-engine", *argv, *cache]) == code
        captured = capsys.readouterr()
        assert captured.out == "" and why in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "plans").exists()

    def no_driver(flags=0):
        raise fake_pycuda.LogicError("cuInit failed: no CUDA-capable device is detected")

    monkeypatch.setattr(sys.modules["pycuda.driver"], "init", no_driver)
    assert cli.main(["build-engine", "--model", str(small_model), *cache]) == 1
    err = capsys.readouterr().err
    assert "cannot count the GPUs" in err and "no CUDA-capable device" in err and len(err.strip().splitlines()) == 1


def test_build_engine_says_a_fixed_batch_models_plan_is_for_its_batch(gpu10, external_model, tmp_path, capsys):
    """edgePtychoNN's batch-8 model: its plan is for batch 8, whatever --batch says (before:
    "batch 1..16")."""
    from edge_ptychonn.tools import build_engine

    argv = ["--model", str(external_model), "--batch", "16", "--precision", "fp32",
            "--plan-cache-dir", str(tmp_path / "plans")]
    assert build_engine.main(build_engine.get_args_parser().parse_args(argv)) == 0
    assert "fp32 batch 8 (fixed by the model): built" in capsys.readouterr().out


def test_the_external_fixed_batch_model_matches_onnxruntime(gpu10, external_model, tmp_path):
    """edgePtychoNN's batch-8 model: partial batches padded to 8, results as ONNX Runtime's."""
    reference = create_engine("onnxruntime", EngineOptions(external_model, device="cpu", max_batch=8))
    engine = make(external_model, tmp_path)
    x = np.random.default_rng(7).poisson(5.0, (8, 1, 128, 128)).astype(np.float32)
    for n in (8, 3):
        np.testing.assert_allclose(engine.infer(x[:n]), reference.infer(x[:n]), atol=1e-4)
    assert {c[2] for c in gpu10.calls("set_input_shape")} == {(8, 1, 128, 128)}


# -- fixed-batch models with a batch in flight; the shared primary context ---------------------------
def _frames(n, seed):
    return np.random.default_rng(seed).poisson(9, (n, 1, 16, 16)).astype(np.float32)


def test_fixed_batch_partial_batch_while_a_batch_is_in_flight(gpu10, fixed8_model, tmp_path):
    """The pipeline submits batch k+1 before collecting batch k: a partial batch (padded)
    behind a full one in flight, then back to back, in order, nothing left in flight."""
    engine = make(fixed8_model, tmp_path)
    sizes = [8, 3, 8, 5, 1, 8, 8, 2]
    batches = [_frames(n, seed) for seed, n in enumerate(sizes)]
    results, pending = [], []
    for batch in batches:
        pending.append(engine.submit(batch))
        if len(pending) == 2:
            results.append(engine.collect(pending.pop(0)))
    results.append(engine.collect(pending.pop(0)))
    for batch, out in zip(batches, results):
        np.testing.assert_array_equal(out, 2 * batch)
    assert engine._ring.in_flight == 0 and not engine._sync_results
    assert {c[2] for c in gpu10.calls("set_input_shape")} == {(8, 1, 16, 16)}
    engine.close()


def test_batch_size_16_on_the_fixed_8_model_with_two_in_flight(gpu10, fixed8_model, tmp_path):
    engine = make(fixed8_model, tmp_path, max_batch=16)
    a, b, c = _frames(16, 1), _frames(16, 2), _frames(11, 3)
    ta, tb = engine.submit(a), engine.submit(b)
    np.testing.assert_array_equal(engine.collect(ta), 2 * a)
    tc = engine.submit(c)
    np.testing.assert_array_equal(engine.collect(tb), 2 * b)
    np.testing.assert_array_equal(engine.collect(tc), 2 * c)
    assert engine._ring.in_flight == 0 and not engine._sync_results
    engine.close()


def test_external_model_partial_batch_behind_a_full_one(gpu10, external_model, ort_engine, diffraction, tmp_path):
    engine = make(external_model, tmp_path)
    t_full, t_part = engine.submit(diffraction), engine.submit(diffraction[:3])
    np.testing.assert_allclose(engine.collect(t_full), ort_engine.infer(diffraction), atol=1e-4)
    np.testing.assert_allclose(engine.collect(t_part), ort_engine.infer(diffraction[:3]), atol=1e-4)
    engine.close()


def test_a_failed_submit_leaves_the_batch_in_flight_alone(gpu10, fixed8_model, tmp_path, monkeypatch):
    engine = make(fixed8_model, tmp_path)
    a, b = _frames(8, 1), _frames(3, 2)
    ta = engine.submit(a)
    trt = gpu10.trt
    with monkeypatch.context() as m:
        m.setattr(trt.IExecutionContext, "execute_async_v3", lambda self, handle: False)
        with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
            engine.submit(b)
    tb = engine.submit(b)
    assert tb.slot != ta.slot
    np.testing.assert_array_equal(engine.collect(ta), 2 * a)
    np.testing.assert_array_equal(engine.collect(tb), 2 * b)
    assert engine._ring.in_flight == 0


def test_bf16_of_the_external_model_builds_at_opset_22(gpu10, external_model, ort_engine, diffraction, tmp_path):
    """edgePtychoNN's model is opset 12: its bf16 graph is moved to opset 22 (the stand-in's
    parser checks types strictly), and the plan is keyed on the bf16 recipe."""
    from engines.onnx_precision import recipe

    engine = make(external_model, tmp_path, precision="bf16")
    assert json.loads(engine.plan_path.with_suffix(".json").read_text())["recipe"] == recipe("bf16")
    np.testing.assert_allclose(engine.infer(diffraction[:3]), ort_engine.infer(diffraction[:3]), atol=0.2)
    engine.close()


def test_engines_share_one_primary_context_and_close_frees_streams_and_events(gpu10, fixed8_model, tmp_path):
    """Two engines on one GPU retain its primary context once (never detached: pycuda's
    detach does nothing off the retaining thread); close(), here on another thread as
    in a model swap, destroys the streams and events while the context is current."""
    import threading

    first = make(fixed8_model, tmp_path)
    second = make(fixed8_model, tmp_path, max_batch=16)
    assert first._context is second._context
    assert gpu10.cuda.retained == {0: 1}
    assert len(gpu10.calls("retain_primary_context")) == 1
    streams = {second._copy_stream.handle, second._compute_stream.handle}
    events = {e.id for e in second._copied + second._done}
    closer = threading.Thread(target=second.close)
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "close() on another thread did not return"
    freed_streams = {c[1]: c[2] for c in gpu10.calls("Stream.free")}
    freed_events = {c[1]: c[2] for c in gpu10.calls("Event.free")}
    assert streams <= set(freed_streams) and all(freed_streams[h] for h in streams)
    assert events <= set(freed_events) and all(freed_events[i] for i in events)
    assert not gpu10.calls("detach") and gpu10.cuda.retained == {0: 1}
    x = _frames(8, 4)
    np.testing.assert_array_equal(first.infer(x), 2 * x)  # the shared context still works
    first.close()
    assert gpu10.cuda.stack() == []


def test_a_gpu_that_refuses_a_context_memory_or_an_execution_context_is_unavailable(gpu10, small_model, tmp_path,
                                                                                    monkeypatch):
    """The driver's errors at start (a GPU that another process holds in exclusive mode, GPU
    memory full) and TensorRT's None for an execution context are EngineUnavailable, so that
    'auto' goes on to the next engine (before: pycuda's LogicError or MemoryError, or an
    AttributeError on None, ended 'auto' with a traceback)."""
    driver = sys.modules["pycuda.driver"]
    options = dict(precision="auto", plan_cache_dir=tmp_path / "plans", cpu_threads=1)

    def busy(self):
        raise driver.LogicError("cuDevicePrimaryCtxRetain failed: all CUDA-capable devices are busy or unavailable")

    def full(nbytes):
        raise driver.MemoryError("cuMemAlloc failed: out of memory")

    retain, alloc = driver.Device.retain_primary_context, driver.mem_alloc
    monkeypatch.setattr(driver.Device, "retain_primary_context", busy)
    with pytest.raises(EngineUnavailable, match="CUDA cannot start on cuda:0: LogicError: .*busy"):
        make(small_model, tmp_path)
    assert create_engine("auto", EngineOptions(small_model, **options)).device == "cpu (1 worker x 1 thread)"
    monkeypatch.setattr(driver.Device, "retain_primary_context", retain)
    monkeypatch.setattr(driver, "mem_alloc", full)
    with pytest.raises(EngineUnavailable, match="CUDA failed on cuda:0: .*out of memory"):
        make(small_model, tmp_path)
    assert create_engine("auto", EngineOptions(small_model, **options)).device == "cpu (1 worker x 1 thread)"
    monkeypatch.setattr(driver, "mem_alloc", alloc)
    monkeypatch.setattr(gpu10.trt.ICudaEngine, "create_execution_context", lambda self: None)
    with pytest.raises(EngineUnavailable, match="could not create an execution context"):
        make(small_model, tmp_path)
    assert create_engine("auto", EngineOptions(small_model, **options)).device == "cpu (1 worker x 1 thread)"


# -- a plan cache this process may read but not write ----------------------------------------------
def refuse_writes_under(monkeypatch, folder: Path) -> None:
    """What a folder this process may read but not write does (these tests may run as root,
    whom file permissions do not stop): opening a file for writing, creating one or a folder,
    or renaming inside it fails with EACCES; reading works."""
    import builtins
    import errno
    import io
    import os

    top = os.path.abspath(folder)

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        path = os.path.abspath(os.fspath(path))
        return path == top or path.startswith(top + os.sep)

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    real_open, real_os_open = builtins.open, os.open
    real_mkdir, real_replace, real_rename = os.mkdir, os.replace, os.rename

    def fake_open(file, mode="r", *args, **kwargs):
        if inside(file) and set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            if os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path))
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def fake_move(real):
        def move(src, dst, *args, **kwargs):
            if inside(src) or inside(dst):
                refuse(dst)
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "replace", fake_move(real_replace))
    monkeypatch.setattr(os, "rename", fake_move(real_rename))


def test_a_read_only_plan_cache_with_the_plan_loads_it(gpu10, small_model, tmp_path, frames, reference, monkeypatch):
    """A shared plan cache prebuilt by its owner (build-engine), read-only to the consumers'
    user, lock files included: the plan loads from it (before: PermissionError opening the
    .lock file for writing, so the engine failed, and 'auto' with a traceback)."""
    make(small_model, tmp_path).close()
    plans = tmp_path / "plans"
    gpu10.clear()
    with monkeypatch.context() as m:
        refuse_writes_under(m, plans)
        engine = make(small_model, tmp_path)
        assert engine.plan_source == "cache" and not gpu10.calls("build_serialized_network")
        np.testing.assert_allclose(engine.infer(frames), reference.infer(frames), atol=1e-5)
        engine.close()
        for lock in plans.glob("*.lock"):  # a cache whose lock files are not there either
            lock.unlink()
        assert make(small_model, tmp_path).plan_source == "cache"


@pytest.mark.parametrize("where", ["cache", "parent"])
def test_a_plan_that_cannot_be_cached_is_built_and_run_with_a_log_line(gpu10, small_model, tmp_path, frames,
                                                                        reference, monkeypatch, caplog, where):
    """A plan missing from a read-only cache (or a cache folder that cannot be made): built and
    run without caching, with a warning that says what to do; 'auto' takes it too."""
    plans = tmp_path / "plans"
    if where == "cache":
        plans.mkdir()
    refuse_writes_under(monkeypatch, plans if where == "cache" else tmp_path)
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt_engine"):
        engine = make(small_model, tmp_path)
    assert engine.plan_source == "built, not cached"
    assert f"the plan cache {plans} is not writable" in caplog.text and "build-engine --plan-cache-dir" in caplog.text
    np.testing.assert_allclose(engine.infer(frames), reference.infer(frames), atol=1e-5)
    engine.close()
    assert not plans.exists() or list(plans.iterdir()) == []
    auto = create_engine("auto", EngineOptions(small_model, precision="auto", plan_cache_dir=plans))
    assert (auto.name, auto.plan_source) == ("tensorrt", "built, not cached")
    auto.close()


def test_build_engine_fails_when_the_plan_cannot_be_saved(gpu10, small_model, tmp_path, capsys, monkeypatch):
    """build-engine exists to save plans: one it cannot save is a failure, never 'built -> path'
    for a file that is not there; a folder it cannot write in is refused before any build
    (exit 2; before: the failure was said after building every plan), and a folder that turns
    read-only during the build fails that plan (exit 1)."""
    from edge_ptychonn.tools import build_engine

    plans = tmp_path / "plans"
    plans.mkdir()
    argv = ["--model", str(small_model), "--precision", "fp32", "--plan-cache-dir", str(plans)]
    with monkeypatch.context() as m:
        refuse_writes_under(m, plans)
        assert build_engine.main(build_engine.get_args_parser().parse_args(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not gpu10.calls("build_serialized_network")
    assert captured.err.startswith(f"edge-ptychonn build-engine: cannot save plans in --plan-cache-dir {plans}: ")
    assert "not writable" in captured.err and captured.err.count("\n") == 1, captured.err

    real_folder_check = build_engine.check_folder
    monkeypatch.setattr(build_engine, "check_folder", lambda folder: (real_folder_check(folder),
                                                                      refuse_writes_under(monkeypatch, plans)))
    assert build_engine.main(build_engine.get_args_parser().parse_args(argv)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"cuda:0 fp32: FAILED: the plan was built but cannot be saved in {plans}" in captured.err


def test_a_plan_tensorrt_will_not_run_is_unavailable_and_auto_goes_on(gpu10, small_model, tmp_path, monkeypatch):
    """execute_async_v3 returns False in the warm-up (e.g. a GPU without the memory the plan
    needs): EngineUnavailable, so 'auto' goes on to the CPU (before: a RuntimeError ended it)."""
    monkeypatch.setattr(gpu10.trt.IExecutionContext, "execute_async_v3", lambda self, handle: False)
    with pytest.raises(EngineUnavailable, match="TensorRT cannot run its plan on cuda:0: .*execute_async_v3 failed"):
        make(small_model, tmp_path)
    assert gpu10.cuda.stack() == []
    engine = create_engine("auto", EngineOptions(small_model, precision="auto", plan_cache_dir=tmp_path / "plans",
                                                 cpu_threads=1, cpu_workers=1))
    assert engine.device == "cpu (1 worker x 1 thread)"


def test_a_driver_that_cannot_start_is_unavailable(gpu10, small_model, tmp_path, monkeypatch):
    """cuInit fails (no driver loaded, no usable device): EngineUnavailable naming the driver's
    error (before: pycuda's LogicError itself)."""
    def no_driver(flags=0):
        raise fake_pycuda.LogicError("cuInit failed: no CUDA-capable device is detected")

    monkeypatch.setattr(sys.modules["pycuda.driver"], "init", no_driver)
    with pytest.raises(EngineUnavailable, match="CUDA cannot start: LogicError: cuInit failed: no CUDA-capable"):
        make(small_model, tmp_path)


def test_build_engine_refuses_an_unknown_precision_before_building_anything(gpu10, small_model, tmp_path, capsys):
    """A typo in --precision is a bad argument (exit 2, before any build), not a FAILED line after
    the other precisions have been built (minutes each on a real GPU); repeats build once."""
    from edge_ptychonn import cli

    cache = ["--plan-cache-dir", str(tmp_path / "plans")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["build-engine", "--model", str(small_model), "--precision", "fp32,fp61", *cache])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --precision: fp61: not a precision; give some of fp32, tf32, fp16, bf16" in err
    assert not gpu10.calls("build_serialized_network") and not (tmp_path / "plans").exists()
    assert cli.main(["build-engine", "--model", str(small_model), "--precision", "fp32, fp32", *cache]) == 0
    assert capsys.readouterr().out.count("fp32 batch 1..8: built") == 1


def test_a_cuda_error_in_the_cleanup_after_a_failed_start_keeps_the_first_error(gpu10, small_model, tmp_path,
                                                                                monkeypatch, caplog):
    """A sticky CUDA error (an illegal memory access) in the warm-up makes every later call fail,
    close()'s stream synchronisation too: the engine is EngineUnavailable naming the warm-up's
    error, the cleanup's failure is logged, and 'auto' goes on (before: close()'s LogicError
    replaced the first error and ended 'auto'). close() after such an error still drops its
    buffers, streams and events while the context is current, then raises (before: it kept them)."""
    driver = sys.modules["pycuda.driver"]
    running = make(small_model, tmp_path)

    def sticky(self):
        raise driver.LogicError("cuStreamSynchronize failed: an illegal memory access was encountered")

    def sticky_event(self):
        raise driver.LogicError("cuEventSynchronize failed: an illegal memory access was encountered")

    monkeypatch.setattr(driver.Stream, "synchronize", sticky)
    monkeypatch.setattr(driver.Event, "synchronize", sticky_event)
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt_engine"):
        with pytest.raises(EngineUnavailable, match="CUDA failed on cuda:0: LogicError: cuEventSynchronize failed"):
            make(small_model, tmp_path)
    assert "cuStreamSynchronize failed" in caplog.text  # the cleanup's own failure, logged
    assert gpu10.cuda.stack() == []
    with pytest.raises(driver.LogicError, match="cuStreamSynchronize failed"):
        running.close()
    assert not [n for n in ("_exec", "_d_in", "_h_out", "_done", "_compute_stream") if hasattr(running, n)]
    assert gpu10.cuda.stack() == []
    engine = create_engine("auto", EngineOptions(small_model, precision="auto", plan_cache_dir=tmp_path / "plans",
                                                 cpu_threads=1, cpu_workers=1))
    assert engine.device == "cpu (1 worker x 1 thread)"
    engine.close()


def test_plans_stored_at_once_in_one_process_are_whole_and_both_stores_succeed(monkeypatch, tmp_path, caplog):
    """Two threads store the same plan at once (no file lock to be had: the same hidden file name,
    one per process), while a reader loads it: every plan read is one of the two whole, never
    without its sidecar, and neither store fails (before: the second writer truncated the first's
    hidden file, a mix of both plans was renamed into place and read, and the second store failed
    with FileNotFoundError, which the engine reports as a cache it may not write)."""
    import threading

    real_write = Path.write_bytes
    halfway = threading.Event()

    def slow_write(self, data):  # a large plan: the reader and the other writer get in between
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            halfway.set()
            time.sleep(0.2)
            f.write(data[len(data) // 2 :])
        return len(data)

    monkeypatch.setattr(Path, "write_bytes", slow_write)
    key = te.PlanKey("10.16.1.11", "NVIDIA RTX A6000", "8.6", "0" * 64, "input:1x1x64x64", "fp32", "lowp-v1")
    cache = te.PlanCache(tmp_path / "plans")
    plans = [b"A" * 4096, b"B" * 4096]
    errors, seen = [], []

    def store(plan):
        try:
            cache.store(key, "model", plan)
        except Exception as exc:  # noqa: BLE001 - the test reports any
            errors.append(repr(exc))

    writers = [threading.Thread(target=store, args=(plan,)) for plan in plans]
    writers[0].start()
    assert halfway.wait(10)
    writers[1].start()
    deadline = time.monotonic() + 30
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt_engine"):
        while any(w.is_alive() for w in writers):
            assert time.monotonic() < deadline, "a store did not end within 30 s"
            plan = cache.load(key, "model")
            if plan is not None:
                seen.append(plan)
            time.sleep(0.005)
    monkeypatch.setattr(Path, "write_bytes", real_write)
    assert errors == []
    assert all(plan in plans for plan in seen), "a reader loaded a plan made of both writers' bytes"
    assert cache.load(key, "model") in plans
    assert "rebuilding it" not in caplog.text
    assert sorted(p.name for p in cache.directory.iterdir()) == sorted(
        [cache.path(key, "model").name, cache.path(key, "model").with_suffix(".json").name])
