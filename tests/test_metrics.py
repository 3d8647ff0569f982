"""Reconstruction scores on known cases."""

import math

import numpy as np
import pytest

from edge_ptychonn.science.metrics import baseline_scores, patch_errors, phase_offset, score_phase, ssim_map


def ramp(h=48, w=48):
    return np.add.outer(np.linspace(0, 1, h), np.linspace(0, 1, w)) / 2


def test_perfect_reconstruction():
    t = ramp()
    s = score_phase(t.copy(), t)
    assert s["ssim"] == pytest.approx(1.0)
    assert s["rmse_rad"] == 0.0 and math.isinf(s["psnr_db"])


def test_constant_offset_is_removed():
    t = ramp()
    s = score_phase(t + 0.7, t)
    assert s["offset_rad"] == pytest.approx(0.7)
    assert s["rmse_rad"] < 1e-12 and s["ssim"] == pytest.approx(1.0)
    assert phase_offset(t - 2.0, t, np.ones_like(t, bool)) == pytest.approx(-2.0)


def test_known_rmse_and_psnr():
    t = ramp()  # range exactly 1
    checker = np.where(np.add.outer(np.arange(48), np.arange(48)) % 2 == 0, 0.1, -0.1)
    s = score_phase(t + checker, t)
    assert abs(s["offset_rad"]) < 1e-12
    assert s["rmse_rad"] == pytest.approx(0.1)
    assert s["psnr_db"] == pytest.approx(20.0)
    assert 0 < s["ssim"] < 1


def test_mask_limits_scoring():
    t = ramp()
    p = t.copy()
    p[:, 30:] = 5.0  # garbage outside the mask
    mask = np.zeros_like(t, bool)
    mask[:, :28] = True
    assert score_phase(p, t, mask)["rmse_rad"] < 1e-12
    assert score_phase(p, t)["rmse_rad"] > 0.5


def test_ssim_orders_reconstructions_and_is_symmetric():
    rng = np.random.default_rng(0)
    t = np.kron(rng.uniform(size=(12, 12)), np.ones((4, 4)))
    good = t + 0.05 * rng.standard_normal(t.shape)
    bad = t + 0.5 * rng.standard_normal(t.shape)
    assert score_phase(good, t)["ssim"] > score_phase(bad, t)["ssim"] > score_phase(np.zeros_like(t), t)["ssim"]
    a, b = ssim_map(t, good, 1.0), ssim_map(good, t, 1.0)
    np.testing.assert_allclose(a, b)


def test_ssim_of_a_constant_against_known_formula():
    # constant x against a y with local variance v: SSIM = (2 mx my + c1)/(mx^2 + my^2 + c1) * c2/(v + c2)
    y = np.tile([0.0, 1.0], (32, 16))  # stripes: local mean ~0.5, variance ~0.25
    x = np.full_like(y, 0.5)
    m = ssim_map(x, y, 1.0)[16, 16]
    c1, c2 = 1e-4, 9e-4
    from edge_ptychonn.science.metrics import _gaussian_filter
    my = _gaussian_filter(y)[16, 16]
    v = _gaussian_filter(y * y)[16, 16] - my**2
    expected = (2 * 0.5 * my + c1) / (0.25 + my**2 + c1) * c2 / (v + c2)
    assert m == pytest.approx(expected)
    assert m < 0.01


def test_patch_errors_remove_each_patch_offset():
    t = np.zeros((3, 8, 8))
    p = t.copy()
    p[0] += 1.0  # offset only: no error
    p[1, :, :4] += 0.2  # half the pixels off by 0.2
    p[1, :, 4:] -= 0.2
    w = np.ones((8, 8))
    e = patch_errors(p, t, w)
    np.testing.assert_allclose(e, [0.0, 0.2, 0.0], atol=1e-12)


def test_baselines():
    rng = np.random.default_rng(1)
    t = np.kron(rng.uniform(size=(10, 10)), np.ones((6, 6)))
    mask = np.ones_like(t, bool)
    pos = np.array([[0, 0], [0, 30], [30, 0], [30, 30]], float)
    patches = np.stack([t[y : y + 30, x : x + 30] for y, x in pos.astype(int)])
    b = baseline_scores(t, mask, patches_phase=patches, positions_px=pos, weight=np.ones((30, 30)))
    assert set(b) == {"zeros", "mean_patch"}
    assert b["zeros"]["rmse_rad"] == pytest.approx(t.std(), rel=1e-6)
    assert b["zeros"]["ssim"] < 0.2


def test_bad_inputs():
    t = ramp()
    with pytest.raises(ValueError, match="same 2-D shape"):
        score_phase(t[:10], t)
    with pytest.raises(ValueError, match="no pixels"):
        score_phase(t, t, np.zeros_like(t, bool))
    thin = np.zeros_like(t, bool)
    thin[:, 5] = True
    with pytest.raises(ValueError, match="too thin"):
        score_phase(t, t, thin)


def test_shipped_model_beats_the_baselines_on_a_held_out_scan():
    from edge_ptychonn.model_card import default_model_path, load_card
    from edge_ptychonn.science.accuracy import held_out_settings, open_engine, predict, score_scan
    from edge_ptychonn.science.simulate import simulate_scan

    model = default_model_path()
    card = load_card(model)
    frames, truth = simulate_scan(held_out_settings(card, 1005, n_positions=144), progress=False)
    engine = open_engine(model, "onnxruntime", device="cpu", threads=2)
    result = score_scan("held-out", predict(engine, frames, card.preprocess), truth, card.stitch)
    zeros = result.baselines["zeros"]
    assert result.scores["ssim"] > 0.6 and result.scores["ssim"] > zeros["ssim"] + 0.2
    assert result.scores["rmse_rad"] < 0.5 * zeros["rmse_rad"]
