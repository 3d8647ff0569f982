"""The HDF5 writer: one SWMR file per consumer and scan, exact frames, ids, time stamps, positions.

In-process tests feed real NTNDArrays to ``process()``; the end-to-end test runs it in a
real ``pvapy-hpc-consumer`` behind a real ``pvapy-ad-sim-server`` with a concurrent reader.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pvaccess as pva
import pytest

h5py = pytest.importorskip("h5py")

from frames_util import good_frame  # noqa: E402
from processors.hdf5_writer import STATS, Hdf5WriterProcessor  # noqa: E402

FRAMEWORK = {"processorId": 2, "inputChannel": "inference:2:output", "outputChannel": "", "objectIdField": "uniqueId",
             "objectIdOffset": 1, "skipInitialUpdates": 0, "nSequentialUpdates": 1}


def frame(uid, image, pos=None, seconds=1_700_000_000):
    pv = good_frame(uid, image)
    pv["timeStamp"] = {"secondsPastEpoch": seconds + uid, "nanoseconds": 250_000_000, "userTag": 0}
    if pos is not None:
        pv["attribute"] = [pva.NtAttribute("PosY", pva.PvDouble(pos[0])), pva.NtAttribute("PosX", pva.PvDouble(pos[1]))]
    return pv


def run(processor, frames):
    processor.start()
    for pv in frames:
        processor.process(pv)
    processor.stop()


def test_stats_table(tmp_path):
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path)})
    assert p.getStats().keys() == p.getStatsPvaTypes().keys() == STATS.keys()
    pva.PvObject(p.getStatsPvaTypes()).set(p.getStats())


def test_frames_ids_time_stamps_positions_and_attributes(tmp_path, rng):
    card = tmp_path / "model.json"
    card.write_text(json.dumps({"name": "small"}))
    images = rng.normal(size=(21, 8, 6)).astype(np.float32)
    args = {"outputDirectory": str(tmp_path / "h5"), "compression": "gzip", "chunkFrames": 4, "modelCard": str(card)}
    p = Hdf5WriterProcessor({**FRAMEWORK, **args})
    frames = [pva.NtNdArray()] + [frame(2 * k + 1, images[k], pos=(k, -k) if k != 3 else None) for k in range(21)]
    run(p, frames)
    [file] = p.files
    assert file.name == "inference_2_output_scan0001.h5"
    with h5py.File(file, "r") as f:
        assert f["data"].shape == (21, 8, 6) and f["data"].dtype == np.float32  # no zero padding
        np.testing.assert_array_equal(f["data"][:], images)
        np.testing.assert_array_equal(f["uniqueId"][:], np.arange(1, 43, 2))
        np.testing.assert_allclose(f["timeStamp"][:], 1_700_000_000 + np.arange(1, 43, 2) + 0.25)
        pos = f["positions"][:]
        assert np.isnan(pos[3]).all() and pos[4].tolist() == [4, -4]
        assert f["data"].compression == "gzip" and f["data"].chunks == (4, 8, 6)
        assert json.loads(f.attrs["processorSettings"])["compression"] == "gzip"
        assert json.loads(f.attrs["modelCard"]) == {"name": "small"} and f.attrs["processorId"] == 2
    stats = p.getStats()
    assert stats["nFramesWritten"] == 21 and stats["nEmptyFrames"] == 1 and stats["nFilesWritten"] == 1
    assert stats["nFramesLost"] == 0 and stats["writeTimeUs"] > 0


def test_a_restart_or_a_command_starts_a_new_file(tmp_path, rng):
    images = rng.normal(size=(10, 4, 4)).astype(np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "fileNameFormat": "p{processorId}_{scan}.h5"})
    p.start()
    for k in range(6):
        p.process(frame(k + 1, images[k]))
    for k in range(3):  # uniqueIds restart
        p.process(frame(k + 1, images[6 + k]))
    p.configure({"newScan": True})
    p.process(frame(4, images[9]))
    with pytest.raises(ValueError, match="cannot change compression"):
        p.configure({"compression": "lzf"})
    p.stop()
    assert [f.name for f in p.files] == ["p2_1.h5", "p2_2.h5", "p2_3.h5"]
    sizes = []
    for f in p.files:
        with h5py.File(f, "r") as h:
            sizes.append(len(h["uniqueId"]))
            assert "positions" not in h
    assert sizes == [6, 3, 1]


def test_an_earlier_runs_file_is_never_replaced(tmp_path, rng):
    images = rng.normal(size=(4, 4, 4)).astype(np.float32)
    earlier = tmp_path / "inference_2_output_scan0001.h5"
    earlier.write_bytes(b"an earlier run's scan")
    (tmp_path / "inference_2_output_scan0001-2.h5").write_bytes(b"and another")
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path)})
    run(p, [frame(k + 1, images[k]) for k in range(4)])
    [file] = p.files
    assert file.name == "inference_2_output_scan0001-3.h5"
    assert earlier.read_bytes() == b"an earlier run's scan"
    with h5py.File(file, "r") as f:
        np.testing.assert_array_equal(f["data"][:], images)


def test_swmr_reader_follows_the_growing_file(tmp_path, rng):
    images = rng.normal(size=(40, 16, 16)).astype(np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "flushPeriod": 0.05, "chunkFrames": 4})
    p.start()
    try:
        for k in range(10):
            p.process(frame(k + 1, images[k]))
        deadline = time.monotonic() + 5
        while not p.files or p.getStats()["nFramesWritten"] < 10:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        seen = []
        with h5py.File(p.files[0], "r", libver="latest", swmr=True) as f:
            ids = f["uniqueId"]
            while ids.shape[0] < 10:  # until a flush shows the first ten
                assert time.monotonic() < deadline
                time.sleep(0.02)
                ids.refresh()
            seen.append(ids.shape[0])
            for k in range(10, 40):
                p.process(frame(k + 1, images[k]))
            deadline = time.monotonic() + 5
            while seen[-1] < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
                ids.refresh()
                seen.append(ids.shape[0])
            f["data"].refresh()
            n = ids.shape[0]
            np.testing.assert_array_equal(f["data"][:n], images[:n])
    finally:
        p.stop()
    assert seen[0] >= 10 and seen[-1] == 40 and len(set(seen)) > 1, seen


def test_a_file_is_readable_as_soon_as_its_name_appears(tmp_path, rng, monkeypatch):
    """The name appears only in SWMR mode: before it, the writer holds the file locked."""
    import processors.hdf5_writer as writer

    seen_while_building = []
    create = writer._ScanFile._create

    def create_and_look(self, first, settings, attrs):
        create(self, first, settings, attrs)
        seen_while_building.append(self.path.exists())

    monkeypatch.setattr(writer._ScanFile, "_create", create_and_look)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "flushPeriod": 0.05})
    p.start()
    try:
        for scan in range(3):
            p.process(frame(1, rng.normal(size=(8, 8)).astype(np.float32)))
            deadline = time.monotonic() + 5
            while len(p.files) <= scan:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with h5py.File(p.files[scan], "r", libver="latest", swmr=True) as f:  # opens at once
                assert set(f) >= {"data", "uniqueId"}
            p.configure({"newScan": True})
    finally:
        p.stop()
    assert seen_while_building == [False, False, False]
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(f.name for f in p.files)  # no .part left


def test_a_writer_removes_what_a_killed_writer_left_half_built(tmp_path, dead_pid):
    from edge_ptychonn.files import partial_name

    stale = partial_name(tmp_path / "inference_2_output_scan0001.h5", dead_pid)
    stale.write_bytes(b"half an HDF5 file")
    kept = tmp_path / "inference_2_output_scan0001.h5"
    kept.write_bytes(b"a finished file")
    Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path)})
    assert sorted(tmp_path.iterdir()) == [kept]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="outputDirectory is required"):
        Hdf5WriterProcessor({**FRAMEWORK})
    with pytest.raises(ValueError, match="compression must be one of"):
        Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "compression": "xz"})
    with pytest.raises(ValueError, match="fileNameFormat"):
        Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "fileNameFormat": "{detector}.h5"})
    with pytest.raises(ValueError, match="compressionLevel applies"):
        Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "compressionLevel": 3})
