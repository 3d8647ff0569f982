"""Engines on the external edgePtychoNN model and on the project's own export."""

import re
import time

import numpy as np
import pytest

from edge_ptychonn import devices
from engines import ENGINE_NAMES, EngineOptions, EngineUnavailable, available_engines, create_engine, registry
from engines.base import PRECISIONS, Engine, SlotRing, cpu_layout, cpu_layout_device
from engines.onnx_model import read_signature


def one_worker() -> str:
    """The ``device`` of a CPU engine made with the default options (one worker, its threads
    filling the cores)."""
    return cpu_layout_device("cpu", 1, cpu_layout(workers=1)[1])


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
    import onnxruntime as ort

    engine = create_engine("onnxruntime", EngineOptions(external_model, max_batch=16))
    doubled = np.concatenate([diffraction, diffraction[::-1]])
    out = engine.infer(doubled)
    assert out.shape == (16, 1, 128, 128)
    # each half is one whole batch of 8, run by ONNX Runtime itself
    session = ort.InferenceSession(str(external_model), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: diffraction})[0]
    np.testing.assert_allclose(out[:8], reference, atol=1e-6)
    np.testing.assert_allclose(out[8:], reference[::-1], atol=1e-6)


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
    assert (engine.name, engine.device, engine.precision) == ("onnxruntime", one_worker(), "fp32")
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
    assert (engine.name, engine.precision, engine.device) == ("torch", "bf16", one_worker())
    text = caplog.text
    assert "engine 'auto' chose torch bf16 on the CPU" in text
    assert "tensorrt (tensorrt, pycuda not installed)" in text or "tensorrt on a GPU" in text


def test_auto_says_why_through_the_processors_logger(small_model, caplog):
    """A consumer shows its processor's log lines, not the engines module's (no handler there):
    the choice and the reasons, which the README says are logged, never reached a consumer's log."""
    import logging

    from processors.ptychonn import PtychoNNProcessor

    processor = PtychoNNProcessor({"processorId": 1, "modelPath": str(small_model), "engine": "auto",
                                   "device": "cpu"})
    with caplog.at_level("INFO", logger=processor.logger.name):
        engine = processor._create_engine()
    try:
        chose = [r for r in caplog.records if "engine 'auto' chose" in r.getMessage()]
        assert chose and chose[0].name == processor.logger.name, [(r.name, r.getMessage()) for r in caplog.records]
    finally:
        engine.close()
    assert logging.getLogger(processor.logger.name) is processor.logger


def test_auto_never_picks_an_emulated_precision(small_model, monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset())
    with pytest.raises(EngineUnavailable, match="emulated"):
        registry.auto_choice(EngineOptions(small_model, device="cpu", precision="fp16"))


def test_auto_never_picks_a_gpu_precision_on_the_cpu(small_model, monkeypatch):
    """tf32 is a GPU precision (torch's SPEC: gpu_only): with no GPU, 'auto' says so
    instead of choosing torch tf32 on the CPU, which then fails to start."""
    pytest.importorskip("torch")
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    for device in ("auto", "cpu"):
        choices, rejected = registry.auto_candidates(EngineOptions(small_model, device=device, precision="tf32"))
        assert [c for c in choices if c.device_kind == "cpu"] == []
        assert "torch tf32 on the CPU (tf32 is a GPU precision)" in rejected
    with pytest.raises(EngineUnavailable, match=r"nothing to run device 'cpu' precision 'tf32'.*a GPU precision"):
        registry.auto_choice(EngineOptions(small_model, device="cpu", precision="tf32"))


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


class _ImportFails:
    """A meta path finder: ``name`` is found (installed, as ``importlib.util.find_spec`` sees
    it), and its import raises ``error``."""

    def __init__(self, name: str, error: ImportError):
        self.name, self.error = name, error

    def find_spec(self, fullname, path=None, target=None):
        import importlib.util

        return importlib.util.spec_from_loader(fullname, self) if fullname == self.name else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.error


def _import_fails(monkeypatch, name: str, error: ImportError) -> None:
    """Until the test ends, importing ``name`` (or a module in it) raises ``error``."""
    import sys

    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setattr(sys, "meta_path", [_ImportFails(name, error), *sys.meta_path])


@pytest.mark.parametrize("name, library", [("onnxruntime", "onnxruntime"), ("torch", "torch"), ("tensorrt", "pycuda")])
def test_a_library_installed_but_failing_to_import_is_not_called_missing(small_model, monkeypatch, name, library):
    """Before: a Ctrl-C in the middle of onnxruntime's import ("ImportError: initialization
    failed") was reported as "onnxruntime is not installed: pip install onnxruntime", telling the
    operator to reinstall it; so was the tensorrt engine's pycuda with a native library missing."""
    _import_fails(monkeypatch, library, ImportError("initialization failed\n(more detail)"))
    spec = registry.spec(name)
    with pytest.raises(EngineUnavailable) as failed:
        registry.engine_class(name)(EngineOptions(small_model, device="cpu"))
    assert str(failed.value) == (f"the {name} engine needs {' and '.join(spec.requires)}; {library} is installed "
                                 "but cannot be imported: ImportError: initialization failed")


def test_a_library_or_a_module_it_needs_not_installed_says_how_to_install(small_model, monkeypatch):
    from engines.onnxruntime_engine import OnnxRuntimeEngine
    from engines.tensorrt_engine import TensorRTEngine

    options = EngineOptions(small_model, device="cpu")
    _import_fails(monkeypatch, "pycuda", ModuleNotFoundError("No module named 'pycuda'", name="pycuda"))
    with pytest.raises(EngineUnavailable) as failed:
        TensorRTEngine(options)
    assert str(failed.value) == ("the tensorrt engine needs tensorrt and pycuda; pycuda is not installed: "
                                 + TensorRTEngine.SPEC.install)
    _import_fails(monkeypatch, "onnxruntime", ModuleNotFoundError("No module named 'flatbuffers'", name="flatbuffers"))
    with pytest.raises(EngineUnavailable) as failed:
        OnnxRuntimeEngine(options)
    assert str(failed.value) == ("the onnxruntime engine needs onnxruntime; onnxruntime needs flatbuffers, which is "
                                 "not installed: pip install onnxruntime (or onnxruntime-gpu)")


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
    assert engine.max_in_flight == 1  # submit() computes on the CPU: nothing to overlap
    x = np.random.default_rng(3).poisson(9, (4, 1, 64, 64)).astype(np.float32)
    first = engine.collect(engine.submit(x[:3]))
    t2 = engine.submit(x)
    with pytest.raises(RuntimeError, match="1 batches already in flight"):
        engine.submit(x)
    second = engine.collect(t2)
    np.testing.assert_allclose(first, engine.infer(x[:3]), atol=1e-6)
    np.testing.assert_allclose(second[:3], first, atol=1e-5)
    with pytest.raises(EngineUnavailable, match="tf32 is a GPU precision"):
        create_engine("torch", EngineOptions(small_model, device="cpu", precision="tf32"))


def test_torch_on_the_cpu_publishes_each_batch_before_running_the_next(small_model):
    """A second batch in flight would run (in submit) before the first one is published,
    delaying every batch's results by a batch's compute time under load."""
    pytest.importorskip("torch")
    from edge_ptychonn.stream.config import parse_processor_args
    from edge_ptychonn.stream.pipeline import InferencePipeline
    from frames_util import good_frame

    config, _ = parse_processor_args({"modelPath": str(small_model), "engine": "torch", "batchSize": 4})
    events = []
    pipeline = InferencePipeline(config, lambda pv: events.append("published"))
    engine = create_engine("torch", EngineOptions(small_model, device="cpu", max_batch=4, cpu_threads=1))
    submit = engine.submit  # infer() too runs each batch through submit()
    engine.submit = lambda batch: (events.append("run"), submit(batch))[1]
    images = np.random.default_rng(4).poisson(30, (12, 64, 64)).astype(np.int16)
    for i, image in enumerate(images):  # kept until the engine runs: three batches waiting
        pipeline.submit(good_frame(i + 1, image))
    pipeline.start(lambda: engine)
    deadline = time.monotonic() + 20
    while events.count("published") < 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    pipeline.stop()
    assert events == (["run"] + ["published"] * 4) * 3


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
    # The count is the whole process's: the best of three windows, so that a thread an earlier
    # test left finishing (its faults counted here too) cannot fail it.
    windows = []
    n = 10
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            torch_engine.infer(diffraction)
        windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n)
    assert min(windows) < 300, f"page faults per batch in three windows: {windows}"


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


def test_auto_runs_a_graph_the_torch_engine_refuses_with_the_next_engine(small_model, fixed8_model, monkeypatch,
                                                                           caplog):
    """Where torch bf16 ranks first, a model that is not PtychoNN's architecture (which
    ONNX Runtime runs) starts on ONNX Runtime, with the reason logged; it does not stop
    the consumer. A named torch engine still refuses it with the reason (a ValueError)."""
    pytest.importorskip("torch")
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert registry.auto_choice(EngineOptions(fixed8_model, device="cpu", precision="auto")).engine == "torch"
    with caplog.at_level("INFO", logger="engines.registry"):
        engine = create_engine("auto", EngineOptions(fixed8_model, device="cpu", precision="auto"))
    assert (engine.name, engine.precision) == ("onnxruntime", "fp32")
    x = np.arange(3 * 16 * 16, dtype=np.float32).reshape(3, 1, 16, 16)
    np.testing.assert_array_equal(engine.infer(x), 2 * x)  # the model doubles its input
    engine.close()
    assert "torch bf16 cannot start (the torch engine runs PtychoNN graphs only" in caplog.text
    with pytest.raises(ValueError, match="the torch engine runs PtychoNN graphs only: .*no MaxPool, so not PtychoNN"):
        create_engine("torch", EngineOptions(fixed8_model, device="cpu"))


def test_autos_first_choice_failing_is_said_at_pvapys_default_log_level(fixed8_model, monkeypatch, capsys):
    """A consumer's logger shows only errors unless -ll says otherwise (PvaPy's default): the
    warning that auto's first choice could not start, logged through it, went nowhere."""
    import logging

    pytest.importorskip("torch")
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    consumer_log = logging.getLogger("consumer.errors.only")
    consumer_log.setLevel(logging.ERROR)
    engine = create_engine("auto", EngineOptions(fixed8_model, device="cpu", precision="auto"), consumer_log)
    engine.close()
    out = capsys.readouterr().out
    assert "consumer.errors.only WARNING: engine 'auto': torch bf16 cannot start" in out, out


@pytest.mark.parametrize("grid", ["align_corners", "asymmetric"])
def test_the_torch_engine_never_runs_another_upsampling_grid_than_the_models(small_model, tmp_path, grid,
                                                                              monkeypatch):
    """A PtychoNN exported with PyTorch's align_corners=True (or an 'asymmetric' Resize) upsamples
    on another grid than the project's module: the torch engine ran it as half-pixel and differed
    from ONNX Runtime by ~0.15 rad RMS (1.35 rad at worst) on the shipped model's weights, without a
    word. Now it refuses it with the reason, and 'auto' runs it with ONNX Runtime."""
    pytest.importorskip("torch")
    import onnx

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))  # auto: torch bf16 first
    proto = onnx.load(str(small_model))
    for node in proto.graph.node:
        for attr in node.attribute:
            if node.op_type == "Resize" and attr.name == "coordinate_transformation_mode":
                attr.s = grid.encode()
    path = tmp_path / f"{grid}.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ValueError, match=f"coordinate_transformation_mode '{grid}'"):
        create_engine("torch", EngineOptions(path, device="cpu"))
    x = np.random.default_rng(3).poisson(4.0, (3, 1, 64, 64)).astype(np.float32)
    reference = create_engine("onnxruntime", EngineOptions(path, device="cpu", max_batch=4)).infer(x)
    for precision in ("fp32", "auto"):
        engine = create_engine("auto", EngineOptions(path, device="cpu", max_batch=4, precision=precision))
        np.testing.assert_allclose(engine.infer(x), reference, atol=1e-5)
        engine.close()
    # the project's own half-pixel export still runs on the torch engine, as ONNX Runtime computes it
    ours = create_engine("torch", EngineOptions(small_model, device="cpu", max_batch=4)).infer(x)
    np.testing.assert_allclose(ours, create_engine("onnxruntime", EngineOptions(small_model, device="cpu",
                                                                                  max_batch=4)).infer(x), atol=1e-4)


def test_onnxruntime_never_reports_a_gpu_it_fell_back_from(small_model, monkeypatch):
    """ONNX Runtime falls back to the CPU (with a warning) when its CUDA provider cannot start;
    the engine then said device 'cuda:0' while it computed on the CPU. Now a GPU asked for is
    refused, and 'auto' says it runs on the CPU."""
    import warnings

    import onnxruntime as ort

    from engines.onnxruntime_engine import OnnxRuntimeEngine

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    monkeypatch.setattr(OnnxRuntimeEngine, "count_gpus", staticmethod(lambda: 1))  # a GPU, but no CUDA provider
    with warnings.catch_warnings():  # ONNX Runtime's own warning about the provider
        warnings.simplefilter("ignore")
        with pytest.raises(EngineUnavailable, match="could not start its CUDA provider for cuda:0"):
            create_engine("onnxruntime", EngineOptions(small_model, device="cuda", max_batch=2))
        engine = create_engine("onnxruntime", EngineOptions(small_model, device="auto", max_batch=2))
    assert engine.device == one_worker() and engine._session.get_providers() == ["CPUExecutionProvider"]


def test_the_torch_engine_publishes_the_phase_of_a_graph_that_lists_the_amplitude_first(tmp_path):
    """The engines run the graph output named 'phase'. A graph that lists its outputs as
    (amplitude, phase) made the torch engine publish the amplitude (its module returns the phase
    first; it took the graph's index), 0.49 rad away from ONNX Runtime on a random model."""
    pytest.importorskip("torch")
    import onnx

    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx

    path = export_onnx(build_model(ModelConfig(width=4, depth=2, input_size=32, amplitude_head=True), seed=0),
                       tmp_path / "amp.onnx")
    proto = onnx.load(str(path))
    outputs = list(proto.graph.output)
    del proto.graph.output[:]
    proto.graph.output.extend(outputs[::-1])
    onnx.save(proto, str(tmp_path / "reversed.onnx"))
    assert read_signature(tmp_path / "reversed.onnx").output_names == ("amplitude", "phase")
    x = np.random.default_rng(0).poisson(3.0, (2, 1, 32, 32)).astype(np.float32)
    import onnxruntime as ort

    for model in (path, tmp_path / "reversed.onnx"):
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        phase, amplitude = session.run(["phase", "amplitude"], {"diffraction": x})
        assert np.abs(phase - amplitude).max() > 0.1  # telling them apart is a real test
        for name in ("onnxruntime", "torch"):
            got = create_engine(name, EngineOptions(model, device="cpu", max_batch=2)).infer(x)
            np.testing.assert_allclose(got, phase, atol=1e-5, err_msg=f"{name} on {model.name}")


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


def test_torch_cuda_partial_batches_skip_cudnn_autotuning():
    """A partial batch is a new input size: with cudnn.benchmark its first run timed every
    algorithm (477 ms on an H200 against 32 ms without, measured), so the stream's last batch
    came late. Partial batches run with the heuristics; full ones stay tuned."""
    import contextlib
    import types

    torch = pytest.importorskip("torch")
    from engines.base import Ticket
    from engines.torch_engine import CudaRunner

    cudnn = types.SimpleNamespace(benchmark=True)
    seen = []

    def forward(x):
        seen.append((x.shape[0], cudnn.benchmark))
        return x * 2

    noop = types.SimpleNamespace(wait_event=lambda e: None, record=lambda s: None, synchronize=lambda: None,
                                 query=lambda: True)
    runner = object.__new__(CudaRunner)
    runner.torch = types.SimpleNamespace(
        inference_mode=contextlib.nullcontext, backends=types.SimpleNamespace(cudnn=cudnn),
        cuda=types.SimpleNamespace(stream=lambda s: contextlib.nullcontext()))
    runner.forward, runner.max_batch, runner.graphs = forward, 4, []
    runner.copy_stream = runner.compute_stream = noop
    runner.copied = runner.done = [noop]
    runner.h_in = [torch.zeros(4, 1, 2, 2)]
    runner.h_in_np = [runner.h_in[0].numpy()]
    runner.h_out = [torch.zeros(4, 1, 2, 2)]
    runner.h_out_np = [runner.h_out[0].numpy()]
    runner.d_in = [torch.zeros(4, 1, 2, 2)]
    for n in (3, 4):
        batch = np.arange(n * 4, dtype=np.float32).reshape(n, 1, 2, 2)
        ticket = Ticket(seq=n, slot=0, n=n)
        runner.submit(ticket, batch)
        assert runner.ready(ticket)  # the event's query: reached
        assert np.array_equal(runner.collect(ticket), 2 * batch)
    assert seen == [(3, False), (4, True)] and cudnn.benchmark  # restored after the partial batch


@pytest.mark.parametrize("bad, why", [
    ({"max_batch": 0}, "max_batch must be an integer >= 1, got 0"),
    ({"max_batch": -3}, "max_batch must be an integer >= 1, got -3"),
    ({"max_batch": 2.5}, "max_batch must be an integer >= 1, got 2.5"),
    ({"cpu_threads": -1}, "cpu_threads must be an integer >= 0, got -1"),
    ({"cpu_workers": -1}, "cpu_workers must be an integer >= 0, got -1"),
])
def test_engine_options_no_engine_can_run_are_refused_naming_the_option(small_model, bad, why):
    """Before: the zero engine took max_batch 0, -3 or 2.5 (every batch then refused), the
    others failed in their warm-up with 'batch size must be 1..0' or numpy's 'negative
    dimensions'; cpu_workers -1 ran one worker without a word."""
    with pytest.raises(ValueError, match=re.escape(why)):
        EngineOptions(small_model, **bad)
    assert EngineOptions(small_model, max_batch=np.int64(4)).max_batch == 4  # numpy integers are integers


def test_a_gpu_the_torch_engine_cannot_start_on_is_unavailable_and_auto_goes_on(small_model, monkeypatch, caplog):
    """torch sees a GPU whose memory is full (or that another process holds): the engine's
    CUDA error is EngineUnavailable, so 'auto' goes on to the CPU (before: the driver's
    RuntimeError, e.g. torch.cuda.OutOfMemoryError, ended 'auto' and the consumer's start)."""
    import logging

    import torch

    from edge_ptychonn.science import model as model_module
    from engines.torch_engine import TorchEngine

    real_from_onnx = model_module.from_onnx

    def on_a_full_gpu(path):
        module = real_from_onnx(path)
        real_to = module.to

        def to(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
            return real_to(*args, **kwargs)

        module.to = to
        return module

    monkeypatch.setattr(TorchEngine, "count_gpus", staticmethod(lambda: 1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX A6000")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(model_module, "from_onnx", on_a_full_gpu)
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # torch bf16 next, on the CPU
    with pytest.raises(EngineUnavailable, match="CUDA failed on cuda:0: OutOfMemoryError: CUDA out of memory"):
        create_engine("torch", EngineOptions(small_model, device="cuda", precision="fp16", max_batch=2))
    with caplog.at_level(logging.INFO, logger="engines.registry"):
        engine = create_engine("auto", EngineOptions(small_model, precision="auto", max_batch=2, cpu_threads=1,
                                                     cpu_workers=1))
    assert engine.device == "cpu (1 worker x 1 thread)"
    assert "engine 'auto' chose torch fp16 on a GPU" in caplog.text and "torch fp16 cannot start" in caplog.text
    # the next candidate, torch on the CPU, runs on the CPU (before: device 'auto' sent it to the full GPU again)
    assert caplog.text.count("cannot start") == 1 and engine.name == "torch"
    engine.close()


def test_auto_runs_a_cpu_choice_on_the_cpu_where_its_engine_sees_a_gpu(small_model, monkeypatch, caplog):
    """onnxruntime-gpu installed (its CUDA provider listed) and a GPU visible, but 'auto' ranks
    ONNX Runtime fp32 on the CPU first (here: no native bf16 for torch, no GPU for torch): the
    engine runs on the CPU, as logged (before: it was handed device 'auto', resolved it to
    cuda:0 and asked ONNX Runtime for its CUDA provider while the log said 'on the CPU')."""
    import logging
    import warnings

    import onnxruntime as ort

    providers = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*providers, "CUDAExecutionProvider"])
    monkeypatch.setattr(devices, "visible_gpu_count", lambda: 1)
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2"}))
    asked = _record_providers(monkeypatch, ort)
    with caplog.at_level(logging.INFO, logger="engines"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = create_engine("auto", EngineOptions(small_model, precision="auto", max_batch=2, cpu_threads=1,
                                                     cpu_workers=1))
    assert "engine 'auto' chose onnxruntime fp32 on the CPU" in caplog.text
    assert (engine.name, engine.device) == ("onnxruntime", "cpu (1 worker x 1 thread)")
    assert asked == [["CPUExecutionProvider"]] and "CUDA provider" not in caplog.text
    engine.close()


def test_a_file_that_is_no_onnx_model_is_one_line_naming_it(tmp_path, capsys):
    """``evaluate --model data/ptychonn.json`` (the card given where the model belongs): onnx read it as a
    JSON-form model and its two-line parser error came out; an empty file was "expected one input,
    found []". Now one line saying it is not an ONNX model, naming the .onnx of that name when there is one."""
    import shutil

    from edge_ptychonn import cli
    from edge_ptychonn.model_card import default_model_path

    shipped = default_model_path()
    shutil.copy(shipped.with_suffix(".json"), tmp_path / "alone.json")
    (tmp_path / "empty.onnx").write_bytes(b"")
    for model, why in (
            (shipped.with_suffix(".json"), f"a .json is a model card, not a model; give {shipped}"),
            (tmp_path / "alone.json", "a .json is a model card, not a model"),
            (tmp_path / "empty.onnx", "it holds no graph (the file is empty)")):
        with pytest.raises(ValueError) as err:
            read_signature(model)
        assert str(err.value) == f"{model} is not a readable ONNX model: {why}"
    json_model = shipped.with_suffix(".json")
    assert cli.main(["evaluate", "--model", str(json_model), "--simulate", "mixed:1", "--n-positions", "2",
                     "--engine", "onnxruntime", "--quiet"]) == 2
    assert capsys.readouterr().err == (f"edge-ptychonn evaluate: {json_model} is not a readable ONNX model: a .json "
                                       f"is a model card, not a model; give {shipped}\n")


def test_cpu_workers_of_an_engine_that_fell_back_from_the_gpu_do_not_try_it_again(small_model, monkeypatch, caplog):
    """Device 'auto', a GPU seen but ONNX Runtime's CUDA provider failing: the first copy falls back
    to the CPU with a warning; the other workers' copies start on the CPU (before: each asked for the
    CUDA provider again, paid the failed start and logged the same warning: three for three workers)."""
    import logging
    import warnings

    import onnxruntime as ort

    from engines.onnxruntime_engine import OnnxRuntimeEngine
    from engines.workers import WorkerPool

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    monkeypatch.setattr(OnnxRuntimeEngine, "count_gpus", staticmethod(lambda: 1))
    asked = _record_providers(monkeypatch, ort)
    with caplog.at_level(logging.WARNING, logger="engines"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pool = create_engine("onnxruntime", EngineOptions(small_model, device="auto", max_batch=2, cpu_threads=1,
                                                          cpu_workers=3))
    assert isinstance(pool, WorkerPool) and pool.device == "cpu (3 workers x 1 thread)"
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"],
                     ["CPUExecutionProvider"]]
    assert caplog.text.count("could not start its CUDA provider") == 1
    pool.close()


def test_a_model_onnx_runtime_cannot_load_or_run_is_one_line_and_auto_goes_on(tmp_path, capsys):
    """ONNX Runtime's own errors derive from Exception only: a graph with an operator it does not
    know (or one that fails in the warm-up) came out of 'evaluate' and of a consumer's start as a
    traceback of onnxruntime's Fail. Now ModelNotSupported naming the model: one line, and 'auto'
    goes on to the next engine."""
    import onnx
    from onnx import TensorProto, helper

    from edge_ptychonn import cli
    from engines.base import ModelNotSupported

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])
    unknown = helper.make_model(helper.make_graph([helper.make_node("Mystery", ["x"], ["y"], domain="com.example")],
                                                  "g", [x], [y]), ir_version=9,
                                opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(unknown, tmp_path / "unknown.onnx")
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [3, -1])  # 3 rows of n * 64 values: fails for n=2
    fails = helper.make_model(helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, None])],
                                                [shape]), ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(fails, tmp_path / "fails.onnx")
    for name, what in (("unknown", "cannot load"), ("fails", "cannot run")):
        path = tmp_path / f"{name}.onnx"
        with pytest.raises(ModelNotSupported, match=f"onnxruntime {what} {re.escape(str(path))}: "):
            create_engine("onnxruntime", EngineOptions(path, device="cpu", max_batch=2))
    path = tmp_path / "unknown.onnx"
    assert cli.main(["evaluate", "--model", str(path), "--simulate", "mixed:1", "--n-positions", "2", "--engine",
                     "onnxruntime", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edge-ptychonn evaluate: onnxruntime cannot load {path}: ") and err.count("\n") == 1
    with pytest.raises(EngineUnavailable, match="engine 'auto' found nothing to run.*onnxruntime cannot load"):
        create_engine("auto", EngineOptions(path, device="cpu", max_batch=2))


def test_a_precision_the_cpu_only_emulates_runs_when_named_with_one_warning(small_model, monkeypatch, caplog):
    """torch fp16 on a CPU without AVX512-FP16/AMX-FP16 runs about 7x slower than fp32
    (docs/benchmarks.md): named on purpose it runs, but said once (not once per worker); before,
    a consumer so configured fell behind without a word. Native precisions say nothing."""
    pytest.importorskip("torch")
    import logging

    from engines import torch_engine

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(torch_engine, "_WARNED_EMULATED", set())
    with caplog.at_level(logging.WARNING, logger="engines"):
        for precision in ("fp32", "fp16", "fp16"):
            create_engine("torch", EngineOptions(small_model, device="cpu", precision=precision, max_batch=2,
                                                 cpu_threads=1, cpu_workers=2)).close()
    assert caplog.text.count("emulated") == 1
    assert "torch fp16 is emulated on this CPU (it has none of amx_fp16/avx512_fp16)" in caplog.text


def test_a_model_whose_phase_is_not_the_frames_shape_is_refused(small_model, tmp_path):
    """A graph declared for 60x60 frames whose three pool/upsample stages give 56x56: ONNX Runtime
    returned (n, 1, 56, 56) for (n, 1, 60, 60) without a word (the TensorRT engine refuses such a
    plan), and every batch then failed at the output mask or published images of another size."""
    import onnx

    from engines.base import ModelNotSupported

    proto = onnx.load(str(small_model))
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_value = dims[3].dim_value = 60
    path = tmp_path / "sixty.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelNotSupported, match=r"its output 'phase' is \(2, 1, 56, 56\) for a batch of \(2, 1, 60, 60\)"):
        create_engine("onnxruntime", EngineOptions(path, device="cpu", max_batch=2))


def _record_providers(monkeypatch, ort) -> list:
    """Each ONNX Runtime session's providers by name, in the order asked for (a real session each)."""
    asked = []
    real_session = ort.InferenceSession

    def session(path, so, providers=None):
        asked.append([p if isinstance(p, str) else p[0] for p in providers])
        return real_session(path, so, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", session)
    return asked


@pytest.mark.parametrize("precision, gpu, refusal", [
    ("bf16", ("Tesla T4", (7, 5)), "bf16 needs compute capability 8.0 or later; Tesla T4 has 7.5: use fp32 or fp16"),
    ("tf32", ("Tesla V100", (7, 0)),
     "tf32 needs compute capability 8.0 or later; Tesla V100 has 7.0: use fp32 or fp16"),
    ("fp16", ("Tesla M40", (5, 2)), "fp16 needs compute capability 5.3 or later; Tesla M40 has 5.2: use fp32"),
])
def test_the_torch_engine_refuses_a_precision_its_gpu_lacks_in_one_line(small_model, monkeypatch, precision, gpu,
                                                                         refusal):
    """Before any work on the GPU, as the TensorRT engine does (before: tf32 ran as fp32 while
    reporting tf32, and bf16 went on to fail deep in CUDA or ran emulated)."""
    torch = pytest.importorskip("torch")
    from engines.base import check_compute_capability
    from engines.torch_engine import TorchEngine

    monkeypatch.setattr(TorchEngine, "count_gpus", staticmethod(lambda: 1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu[1])
    with pytest.raises(EngineUnavailable, match=f"^{re.escape(refusal)}$"):
        create_engine("torch", EngineOptions(small_model, device="cuda", precision=precision, max_batch=2))
    for fine in (("fp32", (5, 2)), ("fp16", (7, 5)), ("bf16", (8, 0)), ("tf32", (9, 0))):
        check_compute_capability(fine[0], "a GPU", fine[1])  # no refusal


def test_the_engines_publish_the_phase_of_a_graph_with_unnamed_outputs_amplitude_first(tmp_path):
    """The original PtychoNN returns (amplitude, phase); exported without output names, its graph
    lists the amplitude (a Sigmoid's output) first. Both engines published the amplitude as the
    phase, silently (they took the first output when none is called 'phase')."""
    pytest.importorskip("torch")
    import onnx
    import onnxruntime as ort

    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx

    path = export_onnx(build_model(ModelConfig(width=4, depth=2, input_size=32, amplitude_head=True), seed=0),
                       tmp_path / "amp.onnx")
    proto = onnx.load(str(path))
    renamed = {"phase": "95", "amplitude": "94"}
    for node in proto.graph.node:
        for i, out in enumerate(node.output):
            node.output[i] = renamed.get(out, out)
    outputs = list(proto.graph.output)
    for out in outputs:
        out.name = renamed[out.name]
    del proto.graph.output[:]
    proto.graph.output.extend(outputs[::-1])  # amplitude ('94') first
    model = tmp_path / "unnamed.onnx"
    onnx.save(proto, str(model))
    assert read_signature(model).output_names == ("94", "95")
    assert read_signature(model).phase_output == "95"
    x = np.random.default_rng(0).poisson(3.0, (2, 1, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    amplitude, phase = session.run(["94", "95"], {"diffraction": x})
    assert np.abs(phase - amplitude).max() > 0.1
    for name in ("onnxruntime", "torch"):
        got = create_engine(name, EngineOptions(model, device="cpu", max_batch=2)).infer(x)
        np.testing.assert_allclose(got, phase, atol=1e-5, err_msg=name)


def test_a_batch_that_fails_in_onnxruntime_writes_nothing_to_stderr(tmp_path, capfd):
    """The pipeline counts a failed batch and logs it once; ONNX Runtime's own logger wrote an
    error line (with colour codes) to the process's stderr for every failed batch as well: 111
    lines in 7 s of a consumer whose model failed on partial batches."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 16, 16])
    shape = numpy_helper.from_array(np.array([2, 1, 16, 16], np.int64), "shape")  # runs a batch of 2 only
    model = helper.make_model(helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y],
                                                initializer=[shape]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "only2.onnx"))
    engine = create_engine("onnxruntime", EngineOptions(tmp_path / "only2.onnx", device="cpu", max_batch=2))
    capfd.readouterr()
    for _ in range(3):
        with pytest.raises(Exception, match="Reshape"):
            engine.infer(np.zeros((1, 1, 16, 16), np.float32))
    assert capfd.readouterr().err == ""
