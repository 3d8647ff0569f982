"""PtychoNN in PyTorch: shapes, ONNX export with a dynamic batch, reloading from ONNX."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx, from_onnx, widen  # noqa: E402


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


@pytest.mark.parametrize("amplitude_head", [False, True])
def test_widen_keeps_the_function_and_separates_the_copies(amplitude_head):
    """A width-4 model widened to 7 (and to 12: some channels copied twice) computes the same
    outputs, in eval mode and with batch statistics; one training step then changes the copies
    of a channel differently (the uneven split breaks their symmetry)."""
    narrow = build_model(ModelConfig(width=4, depth=3, amplitude_head=amplitude_head), seed=1)
    x = torch.rand(6, 1, 128, 128)
    narrow.train()
    narrow(x)  # BatchNorm statistics that are not the defaults
    for width in (7, 12):
        wide = widen(narrow, width, seed=0)
        assert wide.config.width == width and sum(p.numel() for p in wide.parameters()) > sum(
            p.numel() for p in narrow.parameters())
        for mode in (True, False):
            narrow.train(mode)
            wide.train(mode)
            with torch.no_grad():
                a, b = narrow(x), wide(x)
            for u, v in zip(a if amplitude_head else [a], b if amplitude_head else [b]):
                assert torch.allclose(u, v, atol=2e-4), float((u - v).abs().max())
    wide = widen(narrow, 8, seed=0).train()
    first = wide.encoder[0]
    before = first.weight.detach().clone()
    out = wide(x)
    (out[0] if amplitude_head else out).square().mean().backward()
    torch.optim.SGD(wide.parameters(), lr=1.0).step()
    moved = (first.weight.detach() - before).flatten(1)
    # each new channel started as a copy of an old one and moves differently from it
    for c in range(4, 8):
        src = next(o for o in range(4) if torch.equal(before[c], before[o]))
        assert not torch.allclose(moved[c], moved[src])
    with pytest.raises(ValueError, match="cannot widen a width-4 model to width 3"):
        widen(narrow, 3)
