"""Engines on the external edgePtychoNN model and on the project's own export."""

import numpy as np
import pytest

from engines import ENGINE_NAMES, EngineOptions, available_engines, create_engine
from engines.base import Engine
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


def test_registry_names_and_auto(small_model):
    with pytest.raises(ValueError, match="unknown engine 'tensorflow'; known: auto, onnxruntime, torch"):
        create_engine("tensorflow", EngineOptions(small_model))
    assert set(ENGINE_NAMES) == {"auto", "onnxruntime", "torch"}
    engine = create_engine("auto", EngineOptions(small_model, device="cpu"))
    assert engine.name == "onnxruntime" and engine.device == "cpu"  # no GPU: ONNX Runtime on the CPU


def test_cuda_request_without_gpu_is_a_clear_error(small_model):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from engines import EngineUnavailable

    with pytest.raises(EngineUnavailable, match="torch sees no CUDA GPU"):
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
