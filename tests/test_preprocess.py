import numpy as np
import pytest

from edge_ptychonn.stream.preprocess import PreprocessConfig, preprocess, preprocess_into


def test_default_is_a_float32_cast():
    frame = np.arange(12, dtype=np.int16).reshape(3, 4)
    out = preprocess(frame, PreprocessConfig())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, frame.astype(np.float32))


def test_centred_crop_then_bin_sums_blocks():
    frame = np.arange(36, dtype=np.uint16).reshape(6, 6)
    config = PreprocessConfig(crop_hw=(4, 4), bin_factor=2)
    assert config.output_shape((6, 6)) == (2, 2)
    # crop rows/cols 1..4; top-left 2x2 block is [[7, 8], [13, 14]]
    expected = np.array([[7 + 8 + 13 + 14, 9 + 10 + 15 + 16], [19 + 20 + 25 + 26, 21 + 22 + 27 + 28]])
    np.testing.assert_array_equal(preprocess(frame, config), expected)


def test_crop_origin_transform_and_affine():
    frame = np.array([[0, 1, 4], [9, 16, -4]], dtype=np.int32)
    config = PreprocessConfig(crop_hw=(2, 2), crop_origin_yx=(0, 1), transform="sqrt", offset=1.0, scale=2.0)
    # crop -> [[1, 4], [16, -4]]; sqrt (negatives clipped) -> [[1, 2], [4, 0]]; (x - 1) * 2
    np.testing.assert_allclose(preprocess(frame, config), [[0, 2], [6, -2]])


def test_log1p():
    out = preprocess(np.array([[0, np.e - 1]]), PreprocessConfig(transform="log1p"))
    np.testing.assert_allclose(out, [[0.0, 1.0]], rtol=1e-6)


def test_seed_geometry_516_to_128():
    config = PreprocessConfig(crop_hw=(512, 512), bin_factor=4)
    assert config.output_shape((516, 516)) == (128, 128)
    frame = np.ones((516, 516), dtype=np.int16)
    out = np.empty((128, 128), np.float32)
    preprocess_into(frame, out, config)
    assert np.all(out == 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bin_factor": 0}, "bin must be an integer 1..64"),
        ({"bin_factor": 2.0}, "bin must be an integer 1..64, got 2.0"),
        ({"bin_factor": "4"}, "bin must be an integer 1..64"),
        ({"bin_factor": None}, "bin must be an integer 1..64"),
        ({"transform": "cube"}, "transform must be one of"),
        ({"scale": 0.0}, "scale must be > 0"),
        ({"scale": -1.0}, "scale must be > 0"),
        ({"scale": 1e-300}, "scale must be > 0, within 1e-12..1e\\+06"),  # 0 in float32: every input 0
        ({"offset": float("nan")}, "offset must be a number within"),
        ({"crop_origin_yx": (0, 0)}, "cropOrigin needs crop"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**kwargs)


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        PreprocessConfig(crop_hw=(10, 10)).output_shape((8, 8))
    with pytest.raises(ValueError, match="does not divide"):
        PreprocessConfig(bin_factor=3).output_shape((8, 8))


# -- per-frame normalisation (dose) ------------------------------------------------------

def test_total_normalisation_scales_each_frame_to_the_reference_total(rng):
    frames = rng.poisson(5.0, (4, 16, 16)).astype(np.int16) * np.array([1, 3, 10, 100], np.int16)[:, None, None]
    config = PreprocessConfig(normalize="total", reference_total=1000.0)
    out = preprocess(frames, config)
    np.testing.assert_allclose(out.sum(axis=(1, 2)), 1000.0, rtol=1e-5)
    # each frame keeps its shape: only one factor per frame
    np.testing.assert_allclose(out[0] * frames[0].sum() / 1000.0, frames[0], rtol=1e-5, atol=1e-5)
    # the live path (one frame into a slot) gives the same as the stack
    slot = np.empty((16, 16), np.float32)
    preprocess_into(frames[2], slot, config)
    np.testing.assert_allclose(slot, out[2], rtol=1e-6)


def test_normalised_input_does_not_depend_on_the_dose(rng):
    frame = rng.poisson(20.0, (32, 32)).astype(np.int32)
    config = PreprocessConfig(normalize="total", reference_total=5e4, transform="sqrt", scale=0.02)
    np.testing.assert_allclose(preprocess(frame * 10, config), preprocess(frame, config), rtol=1e-5)
    plain = PreprocessConfig(transform="sqrt", scale=0.02)
    assert not np.allclose(preprocess(frame * 10, plain), preprocess(frame, plain))


def test_normalisation_after_crop_and_bin_and_empty_frames_left_alone():
    frame = np.zeros((8, 8), np.uint16)
    frame[2:6, 2:6] = 3  # 48 counts inside the crop, 0 outside
    frame[0, 0] = 1000  # outside the crop: does not count
    config = PreprocessConfig(crop_hw=(4, 4), crop_origin_yx=(2, 2), bin_factor=2, normalize="total", reference_total=96.0)
    np.testing.assert_allclose(preprocess(frame, config), np.full((2, 2), 24.0))
    empty = np.zeros((2, 4, 4), np.int16)
    np.testing.assert_array_equal(preprocess(empty, PreprocessConfig(normalize="total", reference_total=10.0)), 0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"normalize": "peak"}, "normalize must be one of"),
        ({"normalize": "total"}, "normalize 'total' needs referenceTotal"),
        ({"normalize": "running"}, "normalize 'running' needs referenceTotal"),
        ({"normalize": "total", "reference_total": 0.0}, "referenceTotal must be > 0"),
        ({"reference_total": float("inf")}, "referenceTotal must be > 0"),
        ({"reference_total": True}, "referenceTotal must be > 0"),
    ],
)
def test_invalid_normalisation_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**kwargs)


def test_normalize_is_a_processor_argument_and_changes_at_run_time(small_model):
    from edge_ptychonn.stream.config import apply_runtime_changes, parse_processor_args, runtime_settings

    with pytest.raises(ValueError, match="referenceTotal"):
        parse_processor_args({"modelPath": str(small_model), "normalize": "total"})
    config, _ = parse_processor_args({"modelPath": str(small_model), "normalize": "total", "referenceTotal": 1e6})
    assert (config.preprocess.normalize, config.preprocess.reference_total) == ("total", 1e6)
    assert runtime_settings(config)["normalize"] == "total"
    new, applied = apply_runtime_changes(config, {"normalize": "none"})
    assert applied == {"normalize": "none"} and new.preprocess.normalize == "none"
    assert new.preprocess.reference_total == 1e6  # kept: 'total' can be turned on again
    for bad in ({"normalize": "peak"}, {"normalize": 3}, {"referenceTotal": 5.0}):
        with pytest.raises(ValueError):
            apply_runtime_changes(config, bad)


def test_running_normalisation_follows_the_dose_and_keeps_differences_between_frames(rng):
    from edge_ptychonn.stream.preprocess import RunningTotal

    frames = rng.poisson(20.0, (12, 16, 16)).astype(np.float32)
    frames[1::2] *= 0.9  # every other frame absorbs 10 % more
    config = PreprocessConfig(normalize="running", reference_total=1000.0, normalize_window=4)
    out = preprocess(frames, config)
    totals = frames.sum(axis=(1, 2))
    for k in range(12):  # each frame over the mean of the last 4 (fewer at the start)
        np.testing.assert_allclose(out[k].sum(), 1000.0 * totals[k] / totals[max(0, k - 3) : k + 1].mean(), rtol=1e-5)
    # the 10 % difference between neighbours stays (within the window's drift); 'total' removes it
    assert out[5].sum() / out[4].sum() == pytest.approx(totals[5] / totals[4], rel=0.01)
    assert abs(totals[5] / totals[4] - 1) > 0.05
    # a ten times higher dose gives the same input once the window has filled
    high = preprocess(frames * 10, config)
    np.testing.assert_allclose(high, out, rtol=1e-5)
    # the live path: one frame at a time with the caller's RunningTotal, the same as the stack
    running, slot = RunningTotal(4), np.empty((16, 16), np.float32)
    for k in range(12):
        preprocess_into(frames[k], slot, config, running)
        np.testing.assert_allclose(slot, out[k], rtol=1e-5)
    with pytest.raises(ValueError, match="RunningTotal"):
        preprocess_into(frames[0], slot, config)
    # empty frames are neither scaled nor counted
    assert RunningTotal(3).add(0.0) == 0.0
    with pytest.raises(ValueError, match="normalizeWindow"):
        PreprocessConfig(normalize="running", reference_total=1.0, normalize_window=0)


def test_the_shipped_card_normalises_to_its_training_total():
    from edge_ptychonn.model_card import default_model_path, load_card

    card = load_card(default_model_path())
    pp = card.preprocess
    assert pp.normalize == "running" and pp.normalize_window == 1024
    photons = card.training.scan_settings["photons"]
    # the reference is the mean total of frames at the training photons (a little below: absorption)
    assert 0.8 * photons < pp.reference_total <= photons


def test_a_frame_whose_binned_sums_overflow_does_not_spoil_the_running_mean():
    """Finite float32 pixels whose 2x2 sums overflow float32 give a frame total of inf: counted in
    the running mean, it held the mean at inf (later frames scaled to 0), then NaN (not
    scaled at all), for two windows of good frames."""
    from edge_ptychonn.stream.preprocess import RunningTotal

    config = PreprocessConfig(bin_factor=2, normalize="running", reference_total=1000.0, normalize_window=4)
    good = np.full((8, 8), 10.0, np.float32)
    running = RunningTotal(4)
    expected = preprocess(good, config, running)
    np.testing.assert_allclose(expected.sum(), 1000.0, rtol=1e-6)
    with np.errstate(over="ignore", invalid="ignore"):
        preprocess(np.full((8, 8), 3e38, np.float32), config, running)  # that frame itself is lost
    for _ in range(10):
        np.testing.assert_allclose(preprocess(good, config, running), expected, rtol=1e-6)


@pytest.mark.parametrize("at", [4, 1100])
def test_an_outlying_frame_spoils_only_itself(rng, at):
    """One saturated frame (every pixel at int16's top) early in a scan (the fifth frame) or with
    the window full: the running mean it was then scaled the next 1024 frames down by about half
    (a 64-frame scan's stitched phase: SSIM 0.865 -> 0.450). Left out of the mean (beyond twice
    the window's median), it leaves every other frame's input within 0.3 % of what it is without
    it. So does a dark stretch (300 frames with the beam off) for the frames after it, once the
    window is full."""
    config = PreprocessConfig(normalize="running", reference_total=1e6, normalize_window=1024, transform="sqrt")
    # (the median instead of such a mean would move the inputs by up to 0.3 % too, but it cost a held-out scan's
    # stitched phase 0.014 SSIM)
    frames = rng.poisson(60.0, (at + 64, 128, 128)).astype(np.int16)
    clean = preprocess(frames, config)
    hot = frames.copy()
    hot[at] = 32767
    spoilt = preprocess(hot, config)
    others = np.arange(len(frames)) != at
    np.testing.assert_allclose(spoilt[others], clean[others], rtol=3e-3)
    if at > 1024:
        dark = frames.copy()
        dark[at - 300:at] = rng.poisson(0.01, (300, 128, 128))
        np.testing.assert_allclose(preprocess(dark, config)[at:], clean[at:], rtol=3e-3)


def test_negative_counts_are_clipped_only_where_there_are_any_and_huge_totals_stay_finite():
    """The clip before the root runs only on batches holding a negative value; a frame total
    beyond float32's range is summed again in float64 (normalize 'total' then scales it)."""
    from edge_ptychonn.stream.preprocess import transform_batch

    config = PreprocessConfig(transform="sqrt")
    batch = np.array([[[4.0, 9.0]], [[16.0, -3.0]]], np.float32)
    transform_batch(batch, config)
    assert batch.tolist() == [[[2.0, 3.0]], [[4.0, 0.0]]]
    config = PreprocessConfig(transform="none", normalize="total", reference_total=2.0)
    huge = np.full((1, 4, 4), 3e38, np.float32)  # total 4.8e39: inf in float32
    transform_batch(huge, config)
    np.testing.assert_allclose(huge, 2.0 / 16, rtol=1e-6)


def test_a_nan_from_one_frames_binned_sums_does_not_spare_the_others_the_clip():
    """A block of huge float pixels of both signs sums to inf - inf = NaN: the batch minimum is
    then NaN, and the test for a negative value skipped the clip for the whole batch, so another
    frame's negative counts became NaN under the root (that frame's output lost too)."""
    config = PreprocessConfig(bin_factor=2, transform="sqrt")
    huge = np.ones((4, 4), np.float32)
    huge[:2, :2] = [[3e38, 3e38], [-3e38, -3e38]]
    offset = np.full((4, 4), 4.0, np.float32)
    offset[2:, 2:] = -3.0  # a detector offset below zero
    with np.errstate(over="ignore", invalid="ignore"):
        out = preprocess(np.stack([huge, offset]), config)
    assert np.isnan(out[0, 0, 0])
    assert out[1].tolist() == preprocess(offset, config).tolist() == [[4.0, 4.0], [4.0, 0.0]]
