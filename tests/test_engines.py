"""Engines on the external edgePtychoNN model and on the project's own export."""

import numpy as np
import pytest

from edge_ptychonn import devices
from engines import ENGINE_NAMES, EngineOptions, EngineUnavailable, available_engines, create_engine, registry
from engines.base import PRECISIONS, Engine, SlotRing
from engines.onnx_model import read_signature


@pytest.fixture(scope="module")
def diffraction(rng_module=np.random.default_rng(7)):
    return rng_module.poisson(5.0, (8, 1, 128, 128)).astype(np.float32)


@pytest.fixture(scope="module")
def ort_engine(external_model):
    return create_engine("onnxruntime", EngineOptions(external_model, max_batch=8))


@pytest.fixture(scope="module")
def torch_engine(external_model):
    pytest.importorskip("torch")
    return create_engine("torch", EngineOptions(external_model, device="cpu", max_batch=8))


def test_external_model_signature(external_model):
    sig = read_signature(external_model)
    assert (sig.input_name, sig.input_shape, sig.fixed_batch) == ("input.1", (128, 128), 8)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_torch_matches_onnxruntime_on_the_external_model(ort_engine, torch_engine, diffraction, n):
    a = ort_engine.infer(diffraction[:n])
    b = torch_engine.infer(diffraction[:n])
    assert a.shape == b.shape == (n, 1, 128, 128)
    assert np.abs(a).max() > 0.1  # a real phase image, not zeros
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


def test_partial_batches_equal_the_full_batch_rows(ort_engine, diffraction):
    full = ort_engine.infer(diffraction)
    np.testing.assert_allclose(ort_engine.infer(diffraction[2:5]), full[2:5], atol=1e-6)


def test_batches_larger_than_the_fixed_batch_are_split(external_model, diffraction):
    engine = create_engine("onnxruntime", EngineOptions(external_model, max_batch=16))
    doubled = np.concatenate([diffraction, diffraction[::-1]])
    out = engine.infer(doubled)
    np.testing.assert_allclose(out[8:], out[:8][::-1], atol=1e-6)


def test_bf16_is_close_to_fp32(external_model, ort_engine, diffraction):
    pytest.importorskip("torch")
    engine = create_engine("torch", EngineOptions(external_model, device="cpu", precision="bf16"))
    assert engine.precision == "bf16"
    np.testing.assert_allclose(engine.infer(diffraction), ort_engine.infer(diffraction), atol=0.1)


@pytest.mark.parametrize("name", ["onnxruntime", "torch"])
def test_dynamic_batch_export_runs_everywhere(small_model, name):
    if name not in available_engines():
        pytest.skip(f"{name} not installed")
    engine = create_engine(name, EngineOptions(small_model, device="cpu", max_batch=5))
    assert isinstance(engine, Engine) and engine.input_shape == (64, 64)
    x = np.random.default_rng(0).poisson(9, (5, 1, 64, 64)).astype(np.float32)
    out = engine.infer(x)
    assert out.shape == (5, 1, 64, 64) and out.dtype == np.float32
    assert np.all(np.abs(out) <= np.pi + 1e-5)  # phase head: pi * tanh
    with pytest.raises(ValueError, match="batch size must be 1..5"):
        engine.infer(np.zeros((6, 1, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"batch must be \(n, 1, 64, 64\)"):
        engine.infer(np.zeros((2, 1, 32, 32), np.float32))


def test_registry_names_and_auto(small_model, monkeypatch):
    with pytest.raises(ValueError, match="unknown engine 'tensorflow'; known: auto, tensorrt, torch, onnxruntime, zero"):
        create_engine("tensorflow", EngineOptions(small_model))
    assert set(ENGINE_NAMES) == {"auto", "tensorrt", "torch", "onnxruntime", "zero"}
    # a CPU without native bf16, no GPU: ONNX Runtime fp32
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2"}))
    engine = create_engine("auto", EngineOptions(small_model, device="cpu", precision="auto"))
    assert (engine.name, engine.device, engine.precision) == ("onnxruntime", "cpu", "fp32")
    # an explicit fp32 keeps fp32 everywhere
    engine = create_engine("auto", EngineOptions(small_model, device="cpu"))
    assert (engine.name, engine.precision) == ("onnxruntime", "fp32")


def test_auto_prefers_native_bf16_on_the_cpu_and_says_why(small_model, monkeypatch, caplog):
    pytest.importorskip("torch")
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    choice = registry.auto_choice(EngineOptions(small_model, device="cpu", precision="auto"))
    assert (choice.engine, choice.precision, choice.device_kind) == ("torch", "bf16", "cpu")
    assert "rank 1.55" in choice.reason and "tensorrt" not in choice.reason  # device cpu: GPUs not considered
    with caplog.at_level("INFO", logger="engines.registry"):
        engine = create_engine("auto", EngineOptions(small_model, device="auto", precision="auto"))
    assert (engine.name, engine.precision, engine.device) == ("torch", "bf16", "cpu")
    text = caplog.text
    assert "engine 'auto' chose torch bf16 on the CPU" in text
    assert "tensorrt (tensorrt, pycuda not installed)" in text or "tensorrt on a GPU" in text


def test_auto_never_picks_an_emulated_precision(small_model, monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset())
    with pytest.raises(EngineUnavailable, match="emulated"):
        registry.auto_choice(EngineOptions(small_model, device="cpu", precision="fp16"))


def test_specs_are_declared_and_read_by_the_registry():
    specs = registry.specs()
    assert list(specs) == list(registry.ENGINES)
    for name, spec in specs.items():
        assert spec.name == name and spec.precisions and set(spec.devices) <= {"cpu", "cuda"}
        assert set(spec.precisions) <= set(PRECISIONS)
        for candidate in spec.auto:
            assert candidate.device in spec.devices and candidate.precision in spec.precisions
    assert specs["tensorrt"].requires == ("tensorrt", "pycuda") and specs["tensorrt"].devices == ("cuda",)
    assert not specs["zero"].computes_model and not specs["zero"].auto
    assert "onnxruntime" in registry.available_engines() and "zero" in registry.available_engines()
    assert "zero" not in registry.available_engines(models_only=True)
    flags = frozenset({"avx512_bf16"})
    assert specs["torch"].native_on_cpu("bf16", flags) and not specs["torch"].native_on_cpu("fp16", flags)


def test_missing_library_is_a_clear_error(small_model):
    if "tensorrt" in registry.available_engines():
        pytest.skip("tensorrt is installed")
    with pytest.raises(EngineUnavailable, match=r"the tensorrt engine needs tensorrt.*edge-ptychonn\[gpu\]"):
        create_engine("tensorrt", EngineOptions(small_model))


def test_zero_engine_is_the_identity(small_model):
    engine = create_engine("zero", EngineOptions(small_model, max_batch=4))
    assert (engine.name, engine.device, engine.input_shape) == ("zero", "cpu", (64, 64))
    x = np.arange(3 * 64 * 64, dtype=np.float32).reshape(3, 1, 64, 64)
    out = engine.infer(x)
    np.testing.assert_array_equal(out, x)
    assert out is not x and not np.shares_memory(out, x)
    a, b = engine.submit(x[:1]), engine.submit(x[1:])
    with pytest.raises(RuntimeError, match="2 batches already in flight"):
        engine.submit(x)
    with pytest.raises(RuntimeError, match="in the order they were submitted"):
        engine.collect(b)
    np.testing.assert_array_equal(engine.collect(a), x[:1])
    np.testing.assert_array_equal(engine.collect(b), x[1:])
    with pytest.raises(EngineUnavailable, match="CPU only"):
        create_engine("zero", EngineOptions(small_model, device="cuda:0"))


def test_torch_submit_collect_on_the_cpu(small_model):
    pytest.importorskip("torch")
    engine = create_engine("torch", EngineOptions(small_model, device="cpu", max_batch=4))
    x = np.random.default_rng(3).poisson(9, (4, 1, 64, 64)).astype(np.float32)
    t1, t2 = engine.submit(x[:3]), engine.submit(x)
    first, second = engine.collect(t1), engine.collect(t2)
    np.testing.assert_allclose(first, engine.infer(x[:3]), atol=1e-6)
    np.testing.assert_allclose(second[:3], first, atol=1e-5)
    with pytest.raises(EngineUnavailable, match="tf32 is a GPU precision"):
        create_engine("torch", EngineOptions(small_model, device="cpu", precision="tf32"))


def test_torch_cpu_batches_reuse_freed_memory(torch_engine, diffraction):
    """glibc gives large freed blocks back to the OS; without keep_freed_memory() each
    batch of the external model faulted thousands of fresh pages in (16 % of the
    shipped model's time)."""
    import platform
    import resource

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("keep_freed_memory() tunes glibc's malloc only")
    for _ in range(3):  # warm: the heap grows to what a batch needs, once
        torch_engine.infer(diffraction)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    n = 10
    for _ in range(n):
        torch_engine.infer(diffraction)
    per_batch = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n
    assert per_batch < 300, f"{per_batch:.0f} page faults per batch"


def test_precision_not_offered_is_refused(small_model):
    with pytest.raises(EngineUnavailable, match="offers precisions fp32, not 'bf16'"):
        create_engine("onnxruntime", EngineOptions(small_model, precision="bf16"))


def test_slot_ring_alternates_buffer_sets():
    ring = SlotRing(2)
    a, b = ring.acquire(8), ring.acquire(3)
    assert (a.slot, b.slot, ring.in_flight) == (0, 1, 2)
    ring.release(a)
    c = ring.acquire(1)
    assert c.slot == 0 and c.n == 1
    ring.release(b)
    ring.release(c)
    assert ring.in_flight == 0


def test_cuda_request_without_gpu_is_a_clear_error(small_model):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(EngineUnavailable, match="the torch engine sees no CUDA GPU"):
        create_engine("torch", EngineOptions(small_model, device="cuda:0"))


def test_torch_engine_refuses_graphs_that_are_not_ptychonn(tmp_path):
    pytest.importorskip("torch")
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "softmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ValueError, match=r"operators \['Softmax'\] are not part of PtychoNN"):
        create_engine("torch", EngineOptions(path, device="cpu"))


# -- TensorRT (through the stand-ins in tests/fakes): fixed-batch models, contexts -------------
@pytest.fixture
def fake_gpu(monkeypatch):
    import sys

    from fakes import fake_pycuda, fake_tensorrt

    state = fake_pycuda.FakeCuda()
    package, driver = fake_pycuda.make_modules(state)
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make_module(state))
    return state


@pytest.fixture
def fixed8_model(tmp_path):
    """A batch-8 model (edgePtychoNN's kind) that doubles its input: y = 2 x."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 2.0, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 1, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 1, 16, 16])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = tmp_path / "fixed8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def _trt(model, tmp_path, max_batch=8, **kw):
    return create_engine("tensorrt", EngineOptions(model, device="cuda:0", max_batch=max_batch,
                                                   plan_cache_dir=tmp_path / "plans", **kw))


def _frames(n, seed):
    return np.random.default_rng(seed).poisson(9, (n, 1, 16, 16)).astype(np.float32)


def test_tensorrt_fixed_batch_partial_batch_while_a_batch_is_in_flight(fake_gpu, fixed8_model, tmp_path):
    """The pipeline submits batch k+1 before collecting batch k: a partial batch (padded)
    behind a full one in flight, then back to back, in order, nothing left in flight."""
    engine = _trt(fixed8_model, tmp_path)
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
    assert {c[2] for c in fake_gpu.calls if c[0] == "set_input_shape"} == {(8, 1, 16, 16)}
    engine.close()


def test_tensorrt_batch_size_16_on_the_fixed_8_model_with_two_in_flight(fake_gpu, fixed8_model, tmp_path):
    engine = _trt(fixed8_model, tmp_path, max_batch=16)
    a, b, c = _frames(16, 1), _frames(16, 2), _frames(11, 3)
    ta, tb = engine.submit(a), engine.submit(b)
    np.testing.assert_array_equal(engine.collect(ta), 2 * a)
    tc = engine.submit(c)
    np.testing.assert_array_equal(engine.collect(tb), 2 * b)
    np.testing.assert_array_equal(engine.collect(tc), 2 * c)
    assert engine._ring.in_flight == 0 and not engine._sync_results
    engine.close()


def test_tensorrt_external_model_partial_batch_behind_a_full_one(fake_gpu, external_model, ort_engine, diffraction,
                                                                  tmp_path):
    engine = _trt(external_model, tmp_path)
    t_full, t_part = engine.submit(diffraction), engine.submit(diffraction[:3])
    np.testing.assert_allclose(engine.collect(t_full), ort_engine.infer(diffraction), atol=1e-4)
    np.testing.assert_allclose(engine.collect(t_part), ort_engine.infer(diffraction[:3]), atol=1e-4)
    engine.close()


def test_tensorrt_a_failed_submit_leaves_the_batch_in_flight_alone(fake_gpu, fixed8_model, tmp_path, monkeypatch):
    import sys

    engine = _trt(fixed8_model, tmp_path)
    a, b = _frames(8, 1), _frames(3, 2)
    ta = engine.submit(a)
    trt = sys.modules["tensorrt"]
    with monkeypatch.context() as m:
        m.setattr(trt.IExecutionContext, "execute_async_v3", lambda self, handle: False)
        with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
            engine.submit(b)
    tb = engine.submit(b)
    assert tb.slot != ta.slot
    np.testing.assert_array_equal(engine.collect(ta), 2 * a)
    np.testing.assert_array_equal(engine.collect(tb), 2 * b)
    assert engine._ring.in_flight == 0


def test_tensorrt_bf16_of_the_external_model_builds_at_opset_22(fake_gpu, external_model, ort_engine, diffraction,
                                                                tmp_path):
    """edgePtychoNN's model is opset 12: its bf16 graph is moved to opset 22 (the stand-in's
    parser checks types strictly), and the plan is keyed on the bf16 recipe."""
    import json

    from engines.onnx_precision import recipe

    engine = _trt(external_model, tmp_path, precision="bf16")
    assert json.loads(engine.plan_path.with_suffix(".json").read_text())["recipe"] == recipe("bf16")
    np.testing.assert_allclose(engine.infer(diffraction[:3]), ort_engine.infer(diffraction[:3]), atol=0.2)
    engine.close()

def test_slot_ring_cancel_undoes_the_latest_acquire():
    ring = SlotRing(2)
    a, b = ring.acquire(8), ring.acquire(3)
    with pytest.raises(RuntimeError, match="most recently acquired"):
        ring.cancel(a)
    ring.cancel(b)
    c = ring.acquire(5)
    assert (c.seq, c.slot) == (b.seq, b.slot)  # never the slot of a, still in flight
    ring.release(a)
    ring.release(c)
    assert ring.in_flight == 0


def test_tensorrt_engines_share_one_primary_context_and_close_frees_streams_and_events(
        fake_gpu, fixed8_model, tmp_path):
    """Two engines on one GPU retain its primary context once (never detached: pycuda's
    detach does nothing off the retaining thread); close(), here on another thread as
    in a model swap, destroys the streams and events while the context is current."""
    import threading

    first = _trt(fixed8_model, tmp_path)
    second = _trt(fixed8_model, tmp_path, max_batch=16)
    assert first._context is second._context
    assert fake_gpu.retained == {0: 1}
    assert len([c for c in fake_gpu.calls if c[0] == "retain_primary_context"]) == 1
    streams = {second._copy_stream.handle, second._compute_stream.handle}
    events = {e.id for e in second._copied + second._done}
    closer = threading.Thread(target=second.close)
    closer.start()
    closer.join()
    freed_streams = {c[1]: c[2] for c in fake_gpu.calls if c[0] == "Stream.free"}
    freed_events = {c[1]: c[2] for c in fake_gpu.calls if c[0] == "Event.free"}
    assert streams <= set(freed_streams) and all(freed_streams[h] for h in streams)
    assert events <= set(freed_events) and all(freed_events[i] for i in events)
    assert not [c for c in fake_gpu.calls if c[0] == "detach"] and fake_gpu.retained == {0: 1}
    x = _frames(8, 4)
    np.testing.assert_array_equal(first.infer(x), 2 * x)  # the shared context still works
    first.close()
    assert fake_gpu.stack() == []


def test_torch_cuda_graphs_are_captured_thread_local(monkeypatch):
    """A swap captures the new engine's graphs on the configure thread while the old
    engine runs on the inference thread: the capture must be thread_local."""
    import contextlib
    import types

    from engines.torch_engine import CudaRunner

    captures = []

    def graph(cuda_graph, **kwargs):
        captures.append(kwargs)
        return contextlib.nullcontext()

    stream = types.SimpleNamespace(synchronize=lambda: None)
    fake_torch = types.SimpleNamespace(
        inference_mode=contextlib.nullcontext,
        cuda=types.SimpleNamespace(stream=lambda s: contextlib.nullcontext(), graph=graph, CUDAGraph=object),
    )
    runner = object.__new__(CudaRunner)
    runner.torch, runner.forward, runner.compute_stream = fake_torch, lambda x: x, stream
    runner.d_in, runner.graphs, runner.graph_out = [0, 1], [], []
    runner._capture(2)
    assert captures == [{"stream": stream, "capture_error_mode": "thread_local"}] * 2
