"""Physics and files of the scan simulator."""

import json

import numpy as np
import pytest

from edge_ptychonn.science.simulate import (
    ScanSettings,
    bin_frames,
    expected_counts,
    load_scan,
    make_object,
    make_probe,
    save_scan,
    scan_positions,
    simulate_scan,
)

SMALL = dict(n_positions=16, frame_size=64, overlap=0.6)


def friedel_mirror(img):
    """img[(n - i) % n, (n - j) % n]: the pattern at -q when zero frequency is at n // 2."""
    return np.roll(img[::-1, ::-1], 1, axis=(0, 1))


def test_parseval_pure_phase_object_total_equals_photons():
    probe = make_probe(64, 6, 20)
    rng = np.random.default_rng(0)
    obj = np.exp(1j * 1.5 * rng.uniform(size=(3, 64, 64)))
    lam = expected_counts(probe[None] * obj, probe, 1e6)
    np.testing.assert_allclose(lam.sum(axis=(1, 2)), 1e6, rtol=1e-9)


def test_absorbing_object_loses_the_absorbed_photons():
    probe = make_probe(64, 6, 20)
    exit_wave = probe * 0.5  # transmits a quarter of the intensity
    lam = expected_counts(exit_wave[None], probe, 4e5)
    np.testing.assert_allclose(lam.sum(), 1e5, rtol=1e-9)


def test_simulated_frames_total_counts_match_photon_setting():
    s = ScanSettings(seed=3, absorption=0.0, photons=2e5, **SMALL)
    frames, truth = simulate_scan(s, progress=False)
    totals = frames.reshape(len(frames), -1).sum(axis=1)
    # Poisson: each total has a standard deviation of sqrt(2e5) ~ 450
    assert np.all(np.abs(totals - 2e5) < 5 * np.sqrt(2e5))
    assert abs(totals.mean() - 2e5) < 5 * np.sqrt(2e5 / len(frames))
    assert truth.stats["n_clipped_pixels"] == 0


def test_real_exit_wave_gives_centro_symmetric_pattern():
    n = 64
    rng = np.random.default_rng(1)
    flat_probe = np.zeros((n, n), np.complex128)
    flat_probe[20:44, 20:44] = 1.0  # no phase curvature
    amplitude_object = rng.uniform(0.2, 1.0, size=(n, n))  # real transmission
    lam = expected_counts((flat_probe * amplitude_object)[None], flat_probe, 1e6)[0]
    np.testing.assert_allclose(lam, friedel_mirror(lam), rtol=1e-9, atol=1e-9)
    assert lam.argmax() == np.ravel_multi_index((n // 2, n // 2), (n, n))


def test_curved_probe_breaks_friedel_symmetry_of_a_phase_object():
    n = 64
    probe = make_probe(n, 6, 20)
    rng = np.random.default_rng(2)
    obj = np.exp(1j * rng.uniform(0, 1.5, size=(n, n)))
    lam = expected_counts((probe * obj)[None], probe, 1e6)[0]
    asym = np.abs(lam - friedel_mirror(lam)).sum() / lam.sum()
    assert asym > 0.05


def test_bare_probe_far_field_is_the_filled_pupil_disc():
    n, radius = 128, 12
    probe = make_probe(n, radius, 40)
    lam = expected_counts(probe[None], probe, 1.0)[0]
    q = np.arange(n) - n // 2
    qr = np.hypot(q[:, None], q[None, :])
    assert lam[qr <= radius + 1].sum() > 0.999
    inside = lam[qr <= radius - 2]
    assert inside.std() / inside.mean() < 0.05  # evenly filled
    # the probe carries phase curvature: its phase varies across the beam
    bright = np.abs(probe) ** 2 > 0.1
    assert np.ptp(np.unwrap(np.angle(probe[n // 2, bright[n // 2]]))) > 3.0


def test_probe_diameter_matches_setting():
    probe = make_probe(128, 12, 40)
    area = np.count_nonzero(np.abs(probe) ** 2 > 0.1)
    assert 34 < 2 * np.sqrt(area / np.pi) < 46


def test_same_seed_same_scan_other_seed_other_scan():
    a_frames, a = simulate_scan(ScanSettings(seed=7, **SMALL), progress=False)
    b_frames, b = simulate_scan(ScanSettings(seed=7, **SMALL), progress=False)
    c_frames, c = simulate_scan(ScanSettings(seed=8, **SMALL), progress=False)
    np.testing.assert_array_equal(a_frames, b_frames)
    np.testing.assert_array_equal(a.object_phase, b.object_phase)
    np.testing.assert_array_equal(a.positions_px, b.positions_px)
    assert not np.array_equal(a_frames, c_frames)
    assert not np.array_equal(a.object_phase, c.object_phase)


def test_truth_patches_match_object_and_phase_range():
    s = ScanSettings(seed=4, phase_range_rad=1.2, **SMALL)
    frames, truth = simulate_scan(s, progress=False)
    assert frames.dtype == np.int16 and frames.shape == (16, 64, 64)
    assert truth.patches_phase.shape == (16, 64, 64) and truth.patches_phase.dtype == np.float32
    y, x = truth.positions_px[5].astype(int)
    np.testing.assert_array_equal(truth.patches_phase[5], truth.object_phase[y : y + 64, x : x + 64])
    assert truth.object_phase.min() == 0.0
    assert truth.object_phase.max() == pytest.approx(1.2, rel=1e-6)
    np.testing.assert_allclose(truth.object_amplitude, np.exp(-0.05 * truth.object_phase), rtol=1e-6)


def test_raster_step_follows_overlap_and_spiral_is_spread():
    s = ScanSettings(n_positions=25, overlap=0.75, jitter_px=0, probe_diameter_px=40)
    pos = scan_positions(s, np.random.default_rng(0))
    assert pos.shape == (25, 2) and pos.min() == 0
    np.testing.assert_array_equal(np.diff(pos[:5, 1]), 10.0)
    np.testing.assert_array_equal(pos[5] - pos[0], [10.0, 0.0])
    sp = scan_positions(ScanSettings(n_positions=200, pattern="spiral", jitter_px=0), np.random.default_rng(0))
    assert len(np.unique(sp, axis=0)) == 200


def test_binning_sums_blocks_and_keeps_photons():
    x = np.arange(2 * 4 * 4).reshape(2, 4, 4)
    b = bin_frames(x, 2)
    assert b.shape == (2, 2, 2)
    assert b[0, 0, 0] == 0 + 1 + 4 + 5
    s = ScanSettings(seed=1, n_positions=4, frame_size=32, bin_factor=2, absorption=0.0, photons=1e5)
    frames, truth = simulate_scan(s, progress=False)
    assert frames.shape == (4, 32, 32) and truth.patches_phase.shape == (4, 64, 64)
    assert abs(frames.sum() / 4 - 1e5) < 5 * np.sqrt(1e5)


def test_int16_overflow_is_clipped_counted_and_warned():
    s = ScanSettings(seed=0, photons=1e9, **SMALL)
    with pytest.warns(UserWarning, match="clipped"):
        frames, truth = simulate_scan(s, progress=False)
    assert truth.stats["n_clipped_pixels"] > 0
    assert frames.max() == 32767 and frames.min() >= 0
    # the stats describe the frames as written: an int16 frame cannot hold the 1e9 photons
    assert truth.stats["mean_counts"] == frames.sum(dtype=np.int64) / len(frames) < 32767 * 64 * 64


def test_photons_that_saturate_every_pixel_are_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    """Before: 1e19 photons wrote a scan of frames that were 32767 everywhere (exit 0, a warning and a
    garbage mean count from an int64 overflow), and 1e30 ended in numpy's traceback."""
    from edge_ptychonn import cli

    with pytest.raises(ValueError, match="saturate every pixel of every frame"):
        simulate_scan(ScanSettings(seed=0, photons=1e18, n_positions=2, frame_size=32), progress=False)
    for photons, message in (("1e18", "photons 1e+18 saturate every pixel of every frame (32767)"),
                             ("1e30", "photons must be > 0 and at most 1e+18, got 1e+30")):
        assert cli.main(["simulate", "--out", str(tmp_path / "s"), "--photons", photons, "--n-positions", "2",
                         "--frame-size", "32", "--quiet"]) == 2
        out = capsys.readouterr()
        assert out.err.startswith(f"edge-ptychonn simulate: {message}") and out.err.count("\n") == 1, out.err
        assert not (tmp_path / "s.npy").exists() and not (tmp_path / "s.npz").exists()


def test_photons_that_give_no_count_are_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    """Before: ``--photons 1e-9`` wrote a scan of frames that were 0 everywhere, with exit 0; and
    ``evaluate --photons 1e-9`` scored a model on such frames as if they were a scan."""
    from edge_ptychonn import cli

    with pytest.raises(ValueError, match="give no count in any pixel of any frame"):
        simulate_scan(ScanSettings(seed=0, photons=1e-9, n_positions=2, frame_size=32), progress=False)
    assert cli.main(["simulate", "--out", str(tmp_path / "s"), "--photons", "1e-9", "--n-positions", "2",
                     "--frame-size", "32", "--quiet"]) == 2
    out = capsys.readouterr()
    assert out.err == ("edge-ptychonn simulate: photons 1e-09 give no count in any pixel of any frame: the frames "
                       "hold nothing of the object; raise the photon count\n"), out.err
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["evaluate", "--simulate", "mixed:1", "--photons", "1e-9", "--n-positions", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-ptychonn evaluate: photons 1e-09 give no count") and err.count("\n") == 1, err
    # a low dose that leaves some counts is a scan (of a noisy kind), not refused
    frames, truth = simulate_scan(ScanSettings(seed=0, photons=20.0, n_positions=2, frame_size=32), progress=False)
    assert 0 < frames.sum() and truth.stats["mean_counts"] > 0


def test_clipped_pixels_are_one_warning_line_not_a_python_warning(tmp_path, capsys):
    """Before: the simulator's clipping warning reached the user as Python's two-line ``UserWarning``
    with a line of the tool's source (``simulate``, and ``evaluate --simulate`` at a high ``--photons``)."""
    import re

    from edge_ptychonn import cli

    assert cli.main(["simulate", "--out", str(tmp_path / "s"), "--photons", "1e9", "--n-positions", "2",
                     "--frame-size", "32", "--quiet"]) == 0
    out = capsys.readouterr()
    assert re.fullmatch(r"edge-ptychonn simulate: warning: \d+ pixels exceeded the int16 range and were clipped to "
                        r"32767; lower the photon count or bin less\n", out.err), out.err
    clipped = load_scan(tmp_path / "s")[1].stats["n_clipped_pixels"]
    assert f"clipped pixels {clipped}" in out.out and f"warning: {clipped} pixels" in out.err
    assert cli.main(["evaluate", "--simulate", "mixed:1", "--simulate", "mixed:2", "--photons", "1e8",
                     "--n-positions", "4", "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[:3] for line in err] == [["edge-ptychonn evaluate", " warning", " scan mixed"]] * 2, err
    assert all(re.search(r"scan mixed:[12]: \d+ pixels exceeded the int16 range", line) for line in err), err


@pytest.mark.parametrize("family", ["mixed", "particles", "smooth", "cells", "siemens", "fibres"])
def test_object_families_are_thickness_maps(family):
    t = make_object((96, 80), family, np.random.default_rng(0))
    assert t.shape == (96, 80)
    assert t.min() >= 0 and t.max() <= 1 and t.std() > 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(overlap=1.5), "overlap must be in (0, 1), got 1.5"),
        (dict(family="cats"), "family must be one of"),
        (dict(photons=0), "photons must be > 0"),
        (dict(phase_range_rad=4.0), "phase_range_rad must be in (0, pi]"),
        (dict(frame_size=64, probe_diameter_px=60), "probe_diameter_px must be"),
        (dict(seed=-1), "seed must be a whole number >= 0, got -1"),
        (dict(seed=1.5), "seed must be a whole number >= 0, got 1.5"),
        # settings from JSON (a model card's training.scan_settings): before, TypeError tracebacks
        (dict(frame_size=128.0), "frame_size must be a whole number, got 128.0"),
        (dict(n_positions="1024"), "n_positions must be a whole number, got '1024'"),
        (dict(bin_factor=True), "bin_factor must be a whole number, got True"),
        (dict(photons="1e6"), "photons must be a number, got '1e6'"),
        (dict(probe_diameter_px="40"), "probe_diameter_px must be a number, got '40'"),
        (dict(overlap=None), "overlap must be a number, got None"),
    ],
)
def test_bad_settings_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError) as err:
        ScanSettings(**kwargs)
    assert message in str(err.value)


def test_save_and_load_round_trip(tmp_path):
    frames, truth = simulate_scan(ScanSettings(seed=5, **SMALL), progress=False)
    npy, npz = save_scan(tmp_path / "scan", frames, truth)
    assert npy.name == "scan.npy" and npz.name == "scan.npz"
    raw = np.load(npy)
    assert raw.dtype == np.int16 and raw.shape == (16, 64, 64)
    with np.load(npz) as z:
        for key in ("positions_px", "patches_phase", "object_phase", "object_amplitude", "probe", "settings"):
            assert key in z.files
        assert json.loads(str(z["settings"]))["seed"] == 5
        assert np.iscomplexobj(z["probe"])
    f2, t2 = load_scan(tmp_path / "scan.npz")
    np.testing.assert_array_equal(f2, frames)
    np.testing.assert_array_equal(t2.patches_phase, truth.patches_phase)
    assert ScanSettings.from_dict(t2.settings) == ScanSettings(seed=5, **SMALL)
    with pytest.raises(FileNotFoundError, match="edge-ptychonn simulate"):
        load_scan(tmp_path / "nothing")


def test_simulate_command_writes_files(tmp_path, capsys):
    from edge_ptychonn import cli

    rc = cli.main(["simulate", "--out", str(tmp_path / "s"), "--seed", "2", "--n-positions", "9",
                   "--frame-size", "64", "--quiet"])
    assert rc == 0
    assert (tmp_path / "s.npy").exists() and (tmp_path / "s.npz").exists()
    assert "clipped pixels 0" in capsys.readouterr().out
    assert cli.main(["simulate", "--out", str(tmp_path / "t"), "--overlap", "1.5"]) == 2
    capsys.readouterr()
    assert cli.main(["simulate", "--out", str(tmp_path / "t"), "--seed", "-1"]) == 2
    assert capsys.readouterr().err == "edge-ptychonn simulate: seed must be a whole number >= 0, got -1\n"
    assert not (tmp_path / "t.npy").exists()


@pytest.mark.parametrize("case, message", [
    ("pickled_frames", r"scan.npy: not a numpy array file \(Object arrays cannot be loaded"),
    ("empty_npy", r"scan.npy: not a numpy array file \(the file is empty\)"),  # a copy still running
    ("npz_as_npy", r"scan.npy: an .npz archive, not a .npy array"),  # before: TypeError traceback
    ("npy_as_npz", r"scan.npz: a .npy array, not an .npz archive"),
    ("empty_npz", r"scan.npz: not an .npz archive of numpy arrays"),
    ("no_frames", r"scan.npy holds no frames"),  # before: numpy's "need at least one array to concatenate"
    ("flat_frames", r"scan.npy: frames must be a stack \(N, H, W\) of counts, got int16 \(64, 64\)"),
    ("4d_frames", r"scan.npy: frames must be a stack \(N, H, W\) of counts, got int16 \(16, 64, 64, 1\)"),
    ("garbage_npz", r"scan.npz: not an .npz archive of numpy arrays \(neither a .npy array nor an .npz archive\)"),
    ("positions_1d", r"scan.npz: positions_px must be \(N, 2\) rows of y x, got float64 \(16,\)"),
    ("positions_nan", r"scan.npz: positions_px contains NaN"),
    ("positions_outside", r"scan.npz: positions_px put 16 of 16 64x64 patches outside the \d+x\d+ object "
                          r"\(first: frame 0, y x \[1000.0, 1000.0\]\)"),
    ("probe_shape", r"scan.npz: probe is \(32, 32\), the patches are \(64, 64\)"),
    ("patches_count", r"scan.npz: patches_phase must be \(N, h, w\) real with N = 16 positions, got float32 "
                      r"\(15, 64, 64\)"),
    # before: "predicted and truth must be finite inside the mask" (blaming the model), "probe is zero
    # everywhere" and "weight must be finite, ..." naming no file, and numpy's traceback for text
    ("object_nan", r"scan.npz: object_phase contains NaN or infinite values"),
    ("patches_nan", r"scan.npz: patches_phase contains NaN or infinite values"),
    ("probe_nan", r"scan.npz: probe contains NaN or infinite values"),
    ("probe_zero", r"scan.npz: probe is zero everywhere"),
    ("probe_text", r"scan.npz: probe must be a complex \(or real\) array of numbers, got <U1"),
])
def test_a_file_that_is_no_scan_is_refused_naming_the_file_and_field(tmp_path, capsys, case, message):
    """``load_scan`` (``evaluate --scan``) says which file and field are wrong, not numpy's or the stitcher's words."""
    import re

    from edge_ptychonn import cli

    frames, truth = simulate_scan(ScanSettings(seed=5, **SMALL), progress=False)
    fields = dict(positions_px=truth.positions_px, patches_phase=truth.patches_phase, object_phase=truth.object_phase,
                  object_amplitude=truth.object_amplitude, probe=truth.probe, settings=json.dumps(truth.settings))
    if case == "pickled_frames":
        np.save(tmp_path / "scan.npy", np.array([{"frames": 1}], dtype=object), allow_pickle=True)
    elif case == "flat_frames":
        np.save(tmp_path / "scan.npy", frames[0])
    elif case == "4d_frames":
        np.save(tmp_path / "scan.npy", frames[..., None])
    elif case == "empty_npy":
        (tmp_path / "scan.npy").write_bytes(b"")
    elif case == "npz_as_npy":
        np.savez(tmp_path / "scan.npy.npz", frames=frames)
        (tmp_path / "scan.npy.npz").rename(tmp_path / "scan.npy")
    elif case == "no_frames":
        np.save(tmp_path / "scan.npy", frames[:0])
        fields.update(positions_px=truth.positions_px[:0], patches_phase=truth.patches_phase[:0])
    else:
        np.save(tmp_path / "scan.npy", frames)
    if case == "positions_1d":
        fields["positions_px"] = truth.positions_px[:, 0]
    elif case == "positions_nan":
        fields["positions_px"] = np.where(np.arange(16)[:, None] == 3, np.nan, truth.positions_px)
    elif case == "positions_outside":
        fields["positions_px"] = truth.positions_px + 1000
    elif case == "probe_shape":
        fields["probe"] = truth.probe[:32, :32]
    elif case == "patches_count":
        fields["patches_phase"] = truth.patches_phase[:15]
    elif case == "object_nan":
        fields["object_phase"] = np.where(np.arange(truth.object_phase.shape[1]) == 40, np.nan, truth.object_phase)
    elif case == "patches_nan":
        fields["patches_phase"] = np.where(np.arange(64) == 30, np.inf, truth.patches_phase).astype(np.float32)
    elif case == "probe_nan":
        fields["probe"] = np.where(np.arange(64) == 3, np.nan, truth.probe).astype(np.complex64)
    elif case == "probe_zero":
        fields["probe"] = np.zeros_like(truth.probe)
    elif case == "probe_text":
        fields["probe"] = np.full(truth.probe.shape, "a")
    if case == "garbage_npz":
        (tmp_path / "scan.npz").write_bytes(b"not a zip file")
    elif case == "empty_npz":
        (tmp_path / "scan.npz").write_bytes(b"")
    elif case == "npy_as_npz":
        (tmp_path / "scan.npz").write_bytes((tmp_path / "scan.npy").read_bytes())
    else:
        np.savez(tmp_path / "scan.npz", **fields)
    with pytest.raises(ValueError) as err:
        load_scan(tmp_path / "scan")
    assert re.search(message, str(err.value)), err.value
    assert cli.main(["evaluate", "--scan", str(tmp_path / "scan"), "--engine", "onnxruntime", "--device", "cpu",
                     "--quiet"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("edge-ptychonn evaluate: ") and re.search(message, out.err) and out.out == ""


def test_an_out_that_names_no_file_is_refused_in_words(tmp_path, capsys, monkeypatch):
    """``--out .`` and ``--out ""`` gave a pathlib traceback; ``--out ..`` wrote ``...npy`` and ``...npz``
    (hidden files) into the working folder, and ``--out scans/`` wrote ``scans.npy`` beside the folder."""
    from edge_ptychonn import cli

    monkeypatch.chdir(tmp_path)
    for out in ("", ".", "..", "scans/", f"{tmp_path}/scans/"):
        assert cli.main(["simulate", "--out", out, "--n-positions", "4", "--quiet"]) == 2
        assert capsys.readouterr().err == (f"edge-ptychonn simulate: --out {out!r} names no file: give a prefix, "
                                           "e.g. data/generated/scan1\n")
    assert list(tmp_path.iterdir()) == [] and not list(tmp_path.parent.glob("*.np?"))
    with pytest.raises(ValueError, match="names no file"):
        load_scan(f"{tmp_path}/scans/")


def test_sigterm_while_writing_stops_like_ctrl_c_and_leaves_no_hidden_file(tmp_path):
    """A SIGTERM (a batch system's stop, ``kill``) while the frames are written: one line, exit 130,
    and no hidden half-written ``.part`` file left (before: killed outright, the ``.part`` stayed)."""
    from signal_util import sigterm_while_writing

    # 65 MB of frames and 135 MB of truth: a write that takes a while; the files are written
    # under hidden names, renamed when both are whole
    code, err = sigterm_while_writing(["simulate", "--out", str(tmp_path / "s"), "--n-positions", "2000", "--quiet"],
                                      tmp_path, ".s.np?.*.part")
    assert code == 130, err
    assert err == "edge-ptychonn simulate: interrupted\n"
    assert list(tmp_path.iterdir()) == []
