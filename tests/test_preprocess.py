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
        ({"bin_factor": 0}, "bin must be 1..64"),
        ({"transform": "cube"}, "transform must be one of"),
        ({"scale": 0.0}, "scale must be > 0"),
            ({"scale": -1.0}, "scale must be > 0"),
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
