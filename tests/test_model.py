"""PtychoNN in PyTorch: shapes, ONNX export with a dynamic batch, reloading from ONNX."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx, from_onnx  # noqa: E402


def test_config_is_validated():
    with pytest.raises(ValueError, match="input_size must be a multiple of 2\\*\\*depth = 16"):
        ModelConfig(depth=4, input_size=100)
    with pytest.raises(ValueError, match="width must be 1..256"):
        ModelConfig(width=0)


def test_forward_shapes_and_phase_range():
    model = build_model(ModelConfig(width=4, depth=2, input_size=32, amplitude_head=True)).eval()
    phase, amplitude = model(torch.rand(3, 1, 32, 32) * 100)
    assert phase.shape == amplitude.shape == (3, 1, 32, 32)
    assert phase.abs().max() <= np.pi and 0 <= amplitude.min() and amplitude.max() <= 1


def test_seeded_builds_are_identical():
    a, b = build_model(ModelConfig(width=4, depth=2, input_size=32), seed=3), build_model(ModelConfig(width=4, depth=2, input_size=32), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("amplitude_head", [False, True])
def test_onnx_export_has_a_dynamic_batch_and_reloads(tmp_path, amplitude_head):
    model = build_model(ModelConfig(width=4, depth=2, input_size=32, amplitude_head=amplitude_head), seed=1)
    model.train()
    model(torch.rand(4, 1, 32, 32))  # move the BatchNorm running statistics away from their start
    path = export_onnx(model, tmp_path / "m.onnx")
    assert model.training  # export leaves the training mode as it was
    model.eval()
    session = ort.InferenceSession(str(path))
    assert session.get_inputs()[0].shape == ["batch", 1, 32, 32]
    reloaded = from_onnx(path)
    for n in (1, 5):
        x = np.random.default_rng(n).poisson(20, (n, 1, 32, 32)).astype(np.float32)
        onnx_out = session.run(None, {"diffraction": x})
        with torch.no_grad():
            torch_out = model(torch.from_numpy(x))
            again = reloaded(torch.from_numpy(x))
        torch_out = torch_out if amplitude_head else (torch_out,)
        again = again if amplitude_head else (again,)
        for a, b, c in zip(onnx_out, torch_out, again):
            np.testing.assert_allclose(a, b.numpy(), atol=1e-5)
            np.testing.assert_allclose(c.numpy(), a, atol=1e-5)
