"""Stitching patches back into an object image."""

import numpy as np
import pytest

from edge_ptychonn.science.simulate import ScanSettings, extract_patches, make_probe, scan_positions
from edge_ptychonn.science.stitch import Stitcher, centre_window, probe_weight, stitch


def scan(n_positions=36, size=64):
    s = ScanSettings(n_positions=n_positions, frame_size=size, overlap=0.6)
    pos = scan_positions(s, np.random.default_rng(0))
    shape = (int(pos[:, 0].max()) + size, int(pos[:, 1].max()) + size)
    obj = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    return obj, pos, extract_patches(obj, pos, (size, size)), make_probe(size, 6, s.probe_diameter)


def test_exact_patches_reproduce_the_object_where_covered():
    obj, pos, patches, probe = scan()
    st = stitch(patches, pos, obj.shape, weight=probe_weight(probe))
    covered = st.covered(0.5)
    assert covered.sum() > 40 * 40
    np.testing.assert_allclose(st.image()[covered], obj[covered], atol=1e-6)
    assert st.n_patches == len(pos)


def test_incremental_in_any_order_gives_the_same_image():
    obj, pos, patches, probe = scan()
    w = probe_weight(probe)
    a = stitch(patches, pos, obj.shape, weight=w)
    b = Stitcher(obj.shape, patches.shape[1:], weight=w)
    for k in np.random.default_rng(3).permutation(len(pos)):
        b.add(patches[k], pos[k])
    np.testing.assert_allclose(a.image(), b.image(), atol=1e-6)
    np.testing.assert_allclose(a.weight_sum(), b.weight_sum(), atol=1e-9)


def test_weighted_average_of_two_overlapping_patches():
    st = Stitcher((4, 6), (4, 4), weight=np.ones((4, 4)))
    st.add(np.full((4, 4), 1.0), (0, 0))
    st.add(np.full((4, 4), 3.0), (0, 2))
    img = st.image()
    np.testing.assert_allclose(img[:, :2], 1.0)
    np.testing.assert_allclose(img[:, 2:4], 2.0)
    np.testing.assert_allclose(img[:, 4:], 3.0)


def test_only_the_weighted_centre_counts():
    w = np.zeros((4, 4))
    w[1:3, 1:3] = 1.0
    st = Stitcher((6, 6), (4, 4), weight=w)
    st.add(np.full((4, 4), 5.0), (1, 1))
    assert st.covered().sum() == 4
    assert st.image(fill=np.nan)[2, 2] == 5.0 and np.isnan(st.image(fill=np.nan)[1, 1])


def test_patches_partly_or_wholly_outside():
    st = Stitcher((8, 8), (4, 4), weight=np.ones((4, 4)))
    assert st.add(np.ones((4, 4)), (-2, 6))
    assert st.covered().sum() == 4
    assert not st.add(np.ones((4, 4)), (20, 20))
    assert st.n_outside == 1


def test_a_position_that_is_not_a_number_misses_the_object():
    """A NaN or infinite position (e.g. a PosY attribute of a bad encoder reading) is a frame that
    lands nowhere, counted like one outside the object; it raised ValueError ("cannot convert
    float NaN to integer") inside the live stitcher's process()."""
    st = Stitcher((8, 8), (4, 4), weight=np.ones((4, 4)))
    for position in ((np.nan, 2), (1, np.inf), (-np.inf, np.nan)):
        assert st.add(np.ones((4, 4)), position) is False
    assert st.n_outside == 3 and st.n_patches == 0 and st.weight_sum().sum() == 0
    assert st.add_many(np.ones((2, 4, 4)), np.array([[np.nan, 0.0], [1.0, 1.0]])) == 1
    assert st.n_outside == 4 and st.covered().sum() == 16 and np.isfinite(st.image()).all()


def test_bad_inputs_are_refused():
    st = Stitcher((8, 8), (4, 4))
    with pytest.raises(ValueError, match="patch must be"):
        st.add(np.ones((3, 4)), (0, 0))
    with pytest.raises(ValueError, match="weight must have the patch shape"):
        Stitcher((8, 8), (4, 4), weight=np.ones((3, 3)))
    with pytest.raises(ValueError, match="threshold"):
        probe_weight(np.ones((4, 4)), threshold=1.5)


def test_windows():
    w = probe_weight(make_probe(64, 6, 20), threshold=0.1)
    assert w.max() == pytest.approx(1.0) and w.min() == 0.0
    c = centre_window((64, 64), 20)
    assert c[32, 32] == pytest.approx(1.0) and c[0, 0] == 0.0
