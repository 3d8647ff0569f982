"""PtychoNN in PyTorch: shapes, ONNX export with a dynamic batch, reloading from ONNX."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edge_ptychonn.science.model import (  # noqa: E402
    ModelConfig, add_head_blocks, build_model, export_onnx, from_onnx, widen)


def test_config_is_validated():
    with pytest.raises(ValueError, match="input_size must be a multiple of 2\\*\\*depth = 16"):
        ModelConfig(depth=4, input_size=100)
    with pytest.raises(ValueError, match="width must be 1..256"):
        ModelConfig(width=0)
    with pytest.raises(ValueError, match="head_blocks must be 0..8, got 9"):
        ModelConfig(head_blocks=9)


def test_forward_shapes_and_phase_range():
    model = build_model(ModelConfig(width=4, depth=2, input_size=32, amplitude_head=True)).eval()
    phase, amplitude = model(torch.rand(3, 1, 32, 32) * 100)
    assert phase.shape == amplitude.shape == (3, 1, 32, 32)
    assert phase.abs().max() <= np.pi and 0 <= amplitude.min() and amplitude.max() <= 1


def test_seeded_builds_are_identical():
    a, b = build_model(ModelConfig(width=4, depth=2, input_size=32), seed=3), build_model(ModelConfig(width=4, depth=2, input_size=32), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("amplitude_head,head_blocks", [(False, 0), (True, 0), (False, 2), (True, 1)])
def test_onnx_export_has_a_dynamic_batch_and_reloads(tmp_path, amplitude_head, head_blocks):
    model = build_model(ModelConfig(width=4, depth=2, input_size=32, amplitude_head=amplitude_head,
                                    head_blocks=head_blocks), seed=1)
    with torch.no_grad():  # head blocks that do something (they start at zero), so that their order matters
        for p in model.phase_blocks.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.train()
    model(torch.rand(4, 1, 32, 32))  # move the BatchNorm running statistics away from their start
    path = export_onnx(model, tmp_path / "m.onnx")
    assert model.training  # export leaves the training mode as it was
    model.eval()
    session = ort.InferenceSession(str(path))
    assert session.get_inputs()[0].shape == ["batch", 1, 32, 32]
    reloaded = from_onnx(path)
    assert reloaded.config.head_blocks == head_blocks and reloaded.config.amplitude_head == amplitude_head
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


def test_head_blocks_start_at_zero_keep_the_function_and_then_learn():
    """Head blocks added to a trained model compute nothing at first (eval and training mode);
    one training step moves the output; a model with head blocks is not widened, and blocks
    are not removed."""
    model = build_model(ModelConfig(width=4, depth=3), seed=1)
    x = torch.rand(6, 1, 128, 128)
    model.train()
    model(x)  # BatchNorm statistics that are not the defaults
    grown = add_head_blocks(model, 2)
    assert grown.config.head_blocks == 2 and len(grown.phase_blocks) == 2
    for mode in (True, False):
        model.train(mode)
        grown.train(mode)
        with torch.no_grad():
            assert torch.equal(model(x), grown(x))
    grown.train()
    before = grown(x).detach()
    grown(x).square().mean().backward()
    assert grown.phase_blocks[0][-1].weight.grad.abs().sum() > 0
    torch.optim.SGD(grown.parameters(), lr=1.0).step()
    assert not torch.allclose(grown(x).detach(), before)
    assert add_head_blocks(grown, 3).config.head_blocks == 3
    with pytest.raises(ValueError, match="cannot remove head blocks: the model has 2, asked for 1"):
        add_head_blocks(grown, 1)
    with pytest.raises(ValueError, match="cannot widen a model with head blocks"):
        widen(grown, 6)


def test_export_to_an_out_that_names_no_file_is_refused_in_words(tmp_path, capsys, monkeypatch):
    """``export --out .`` (or ``""``) gave a pathlib traceback, and ``--out models/`` wrote a file named
    ``models``: each is refused in one line, and nothing is written."""
    from edge_ptychonn import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    for out in (".", "", "models/", "folder"):
        assert cli.main(["export", "--out", out, "--width", "2", "--depth", "1", "--input-size", "8"]) == 2
        assert capsys.readouterr().err == (f"edge-ptychonn export: cannot write {out!r}: it names no file (a folder); "
                                           "give a file name, e.g. data/generated/random.onnx\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"] and not any((tmp_path / "folder").iterdir())


def test_sigterm_while_exporting_stops_like_ctrl_c_and_leaves_no_hidden_file(tmp_path):
    """A SIGTERM (``kill``) while ``export`` writes the model: one line, exit 130, and no hidden
    half-written ``.part`` file left (before: killed outright, the ``.part`` stayed)."""
    from signal_util import sigterm_while_writing

    code, err = sigterm_while_writing(["export", "--out", str(tmp_path / "m.onnx"), "--width", "64"], tmp_path,
                                      ".m.onnx.*.part")  # the model is written under a hidden name, renamed when whole
    assert code == 130, err
    assert err == "edge-ptychonn export: interrupted\n"
    assert list(tmp_path.iterdir()) == []
