"""The HDF5 writer: one SWMR file per consumer and scan, exact frames, ids, time stamps, positions.

In-process tests feed real NTNDArrays to ``process()``. The end-to-end tests are elsewhere:
test_launch.py runs it in real ``pvapy-hpc-consumer`` processes behind a real
``pvapy-ad-sim-server`` with a concurrent SWMR reader; test_processes.py stops its forked writers.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pvaccess as pva
import pytest

h5py = pytest.importorskip("h5py")
ROOT = Path(__file__).resolve().parent.parent

from configure_util import configure_while_new_scan_held  # noqa: E402
from frames_util import good_frame  # noqa: E402
import processors.hdf5_writer as writer  # noqa: E402
from processors.base import RECENT_FILES, RESETS_KEY  # noqa: E402
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


def accounted(p) -> dict:
    """The statistics, checked: every frame received is written, unflushed, queued, lost or of the wrong shape."""
    st = p.getStats()
    lost = st["nLostWriteError"] + st["nLostNotQueued"] + st["nLostStopping"]
    assert st["nFramesLost"] == lost, st
    assert st["nFramesReceived"] == (st["nFramesWritten"] + st["nFramesUnflushed"] + st["nFramesQueued"] + lost
                                     + st["nFramesWrongShape"]), st
    assert st["nFramesUnaccounted"] == 0, st
    return st


def wait_for(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


PER_FRAME = ("data", "timeStamp", "dataTimeStamp", "positions", "modelId")  # a row per uniqueId


def ids_in(path):
    with h5py.File(path, "r") as f:
        assert all(len(f[name]) == len(f["uniqueId"]) for name in PER_FRAME)
        return f["uniqueId"][:].tolist()


def test_stats_table(tmp_path):
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path)})
    assert p.getStats().keys() == p.getStatsPvaTypes().keys() == {*STATS, RESETS_KEY}
    pva.PvObject(p.getStatsPvaTypes()).set(p.getStats())


def test_frames_ids_time_stamps_positions_and_attributes(tmp_path, rng):
    card = tmp_path / "model.json"
    card.write_text(json.dumps({"name": "small"}))
    images = rng.normal(size=(21, 8, 6)).astype(np.float32)
    args = {"outputDirectory": str(tmp_path / "h5"), "compression": "gzip", "chunkFrames": 4, "modelCard": str(card)}
    p = Hdf5WriterProcessor({**FRAMEWORK, **args})
    card.unlink()  # read at start: a card removed later (a model swapped, say) loses no frame
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
    stats = accounted(p)
    assert stats["nFramesWritten"] == 21 and stats["nEmptyFrames"] == 1 and stats["nFilesWritten"] == 1
    assert stats["nFramesLost"] == 0 and stats["writeTimeUs"] > 0 and stats["nFramesQueued"] == 0


def test_each_frame_keeps_the_id_of_the_model_that_made_it(tmp_path, rng):
    """A live model swap changes the outputs' modelId attribute mid-stream: the file's modelCard
    attribute is the card given at start, and nothing said which frames came from which model."""
    card = tmp_path / "model.json"
    card.write_text(json.dumps({"name": "ptychonn"}))
    images = rng.normal(size=(7, 4, 4)).astype(np.float32)
    long_id = "é" * 200 + " sha256:0123456789ab"  # 411 bytes of UTF-8
    ids = ["ptychonn sha256:1a2b3c4d5e6f"] * 3 + [None, "site1 sha256:abcdef012345", 7, long_id]
    frames = []
    for k, model_id in enumerate(ids):
        pv = frame(k + 1, images[k], pos=(k, k))
        if model_id is not None:  # a string attribute, as PtychoNNProcessor puts it; 7: not a string
            value = pva.PvString(model_id) if isinstance(model_id, str) else pva.PvInt(model_id)
            pv["attribute"] = [*pv["attribute"], pva.NtAttribute("modelId", value)]
        frames.append(pv)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path / "h5"), "modelCard": str(card),
                             "chunkFrames": 2})
    run(p, frames)
    assert ids_in(p.files[0]) == list(range(1, 8))
    with h5py.File(p.files[0], "r", libver="latest", swmr=True) as f:
        got = f["modelId"].asstr()[:].tolist()
        assert f["modelId"].dtype.itemsize == writer.MODEL_ID_BYTES  # fixed length: SWMR holds no vlen data
        assert json.loads(f.attrs["modelCard"]) == {"name": "ptychonn"}  # the card given at start
        assert f["positions"][6].tolist() == [6, 6]  # read in the same pass
    assert got[:6] == ["ptychonn sha256:1a2b3c4d5e6f"] * 3 + ["", "site1 sha256:abcdef012345", ""]
    # a longer id keeps its end (the model file's digest), cut between characters
    assert got[6].startswith("…é") and got[6].endswith("é sha256:0123456789ab")
    assert len(got[6].encode()) <= writer.MODEL_ID_BYTES
    assert "modelId" in writer.__doc__ and "read once at" in writer.__doc__


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
            assert np.isnan(h["positions"][:]).all()  # no frame had a position
    assert sizes == [6, 3, 1]
    assert accounted(p)["nFramesWritten"] == 10


@pytest.mark.parametrize("window, files", [
    (64, [[1, 2, 3, 4, 5, 6, 7, 8], [7, 8, 9, 10, 1, 2, 3, 4]]),  # the default: scans 2 and 3 in one file
    (0, [[1, 2, 3, 4, 5, 6, 7, 8], [7, 8, 9, 10], [1, 2, 3, 4]]),  # the README's advice for one consumer's share
])
def test_a_writer_on_one_consumers_share_needs_restart_window_0_for_short_scans(tmp_path, rng, window, files):
    """Three 10-frame scans (uniqueIds 1..10 each) shared by two consumers 8 frames in turn:
    consumer 1's writer sees 1..8, 7..10, 1..4. The next scan's first ids are new to it and
    close to its highest, so with the default window they joined the previous scan's file; its
    share comes in order, and restartWindow 0 starts a new file at any id below the highest."""
    images = rng.normal(size=(16, 4, 4)).astype(np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "restartWindow": window})
    run(p, [frame(uid, images[k]) for k, uid in enumerate([*range(1, 9), 7, 8, 9, 10, 1, 2, 3, 4])])
    assert [ids_in(f) for f in p.files] == files


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
    # JSON's "\u0000" was accepted, then no file could be made: every frame lost (nLostWriteError)
    with pytest.raises(ValueError, match="fileNameFormat .* must name a file in outputDirectory"):
        Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "fileNameFormat": "scan\x00{scan}.h5"})
    # a binary or UTF-16 card (NUL characters) was accepted, then no file could be made: every frame lost
    (tmp_path / "card.json").write_text('{"name": "utf16"}', encoding="utf-16")
    with pytest.raises(ValueError, match="modelCard .*card.json' is not a text file"):
        Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "modelCard": str(tmp_path / "card.json")})
    with pytest.raises(ValueError, match="compressionLevel applies"):
        Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "compressionLevel": 3})
    (tmp_path / "results.txt").write_text("a file where a folder would be made")
    with pytest.raises(ValueError, match="outputDirectory .*results.txt/h5' cannot be used: .*results.txt is a file, not a folder"):
        Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path / "results.txt" / "h5")})


# -- write errors: counted, never fatal, never blocking ------------------------------------------


def _fail_while(flag, method):
    def failing(self, *args, **kwargs):
        if flag.is_set():
            raise OSError(28, "No space left on device (simulated)")
        return method(self, *args, **kwargs)
    return failing


@pytest.mark.parametrize("failing", ["flush", "write"])
def test_a_write_error_loses_only_unconfirmed_frames_and_the_next_go_to_a_new_file(tmp_path, rng, monkeypatch, failing):
    """A failed flush (or dataset write): the frames not confirmed by a flush count as lost, the
    file is cut back to the confirmed ones, the writer lives on and later frames go to a new file."""
    armed = threading.Event()
    if failing == "flush":
        monkeypatch.setattr(h5py.File, "flush", _fail_while(armed, h5py.File.flush))
    else:
        monkeypatch.setattr(h5py.Dataset, "__setitem__", _fail_while(armed, h5py.Dataset.__setitem__))
    images = rng.normal(size=(12, 4, 4)).astype(np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "flushPeriod": 0.05})
    p.start()
    try:
        for k in range(5):
            p.process(frame(k + 1, images[k]))
        wait_for(lambda: p.getStats()["nFramesWritten"] == 5)  # flushed: on disk
        armed.set()  # the disk is full
        for k in range(5, 9):
            p.process(frame(k + 1, images[k]))
        wait_for(lambda: p.getStats()["nLostWriteError"] == 4)
        st = accounted(p)
        assert st["nWriteErrors"] >= 1 and st["nFramesWritten"] == 5 and st["nFramesUnflushed"] == 0
        assert p._thread.is_alive()
        armed.clear()  # space again; a new file no sooner than flushPeriod after the last error
        wait_for(lambda: time.monotonic() >= p._retry_at)
        for k in range(9, 12):
            p.process(frame(k + 1, images[k]))
        wait_for(lambda: p.getStats()["nFramesWritten"] == 8)
    finally:
        p.stop()
    st = accounted(p)
    assert st["nFramesReceived"] == 12 and st["nFramesWritten"] == 8 and st["nFramesLost"] == 4
    first, *others = p.files
    assert first.name == "inference_2_output_scan0001.h5" and ids_in(first) == [1, 2, 3, 4, 5]  # exactly the confirmed
    assert all(f.name.startswith("inference_2_output_scan0001-") for f in others)  # the same scan goes on
    assert sum((ids_in(f) for f in others), []) == [10, 11, 12]
    with h5py.File(others[-1], "r") as f:
        np.testing.assert_array_equal(f["data"][:], images[9:])


def test_a_failed_close_at_a_scan_change_and_at_stop_is_counted(tmp_path, rng, monkeypatch):
    """Nothing flushed before the close of scan 1 fails: its frames count as lost and scan 2 is
    still written; at stop the flush confirms scan 2 and only the close error is counted."""
    armed = threading.Event()
    armed.set()
    real_close = h5py.File.close

    def close_then_fail(self):
        real_close(self)
        if armed.is_set():
            raise OSError(5, "Input/output error (simulated)")

    monkeypatch.setattr(h5py.File, "close", close_then_fail)
    images = rng.normal(size=(5, 4, 4)).astype(np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "flushPeriod": 3600})
    p.start()
    for k in range(3):
        p.process(frame(k + 1, images[k]))
    for k in range(2):  # uniqueIds restart: scan 2
        p.process(frame(k + 1, images[3 + k]))
    # both: the writer may append frames 1 and 2 of scan 1 before frame 3 arrives (2 unflushed then too)
    wait_for(lambda: (p.getStats()["nFramesUnflushed"], p.getStats()["nLostWriteError"]) == (2, 3))
    st = p.getStats()
    assert (st["nFramesUnflushed"], st["nLostWriteError"]) == (2, 3) and p._thread.is_alive()
    p.stop()
    armed.clear()
    st = accounted(p)
    assert (st["nFramesWritten"], st["nLostWriteError"], st["nWriteErrors"]) == (2, 3, 2)
    assert [f.name for f in p.files] == ["inference_2_output_scan0001.h5", "inference_2_output_scan0002.h5"]
    assert ids_in(p.files[1]) == [1, 2]
    # libhdf5 did close them (the error came after): none is kept, and the process ends as usual
    # (kept, they ended the test run with status 1 after every test had passed)
    assert writer._UNCLOSED == []


def test_an_unforeseen_error_does_not_kill_the_writer(tmp_path, rng, monkeypatch):
    images = rng.normal(size=(6, 4, 4)).astype(np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "flushPeriod": 0.05})
    write = p._write
    failed = []

    def write_once_failing(frames):
        if frames and not failed:
            failed.append(len(frames))
            raise ZeroDivisionError("a bug")
        write(frames)

    monkeypatch.setattr(p, "_write", write_once_failing)
    p.start()
    try:
        p.process(frame(1, images[0]))
        wait_for(lambda: p.getStats()["nLostWriteError"] == 1)
        wait_for(lambda: time.monotonic() >= p._retry_at)  # a new file no sooner than flushPeriod after an error
        for k in range(1, 6):
            p.process(frame(k + 1, images[k]))
        wait_for(lambda: p.getStats()["nFramesWritten"] == 5)
        assert p._thread.is_alive()
    finally:
        p.stop()
    st = accounted(p)
    assert (st["nFramesReceived"], st["nFramesWritten"], st["nFramesLost"]) == (6, 5, 1)
    assert ids_in(p.files[-1]) == [2, 3, 4, 5, 6]


def test_a_full_queue_waits_at_most_queue_timeout(tmp_path, rng):
    """Before start (or with a slow writer) the queue fills: process() waits queueTimeout once,
    then counts frames lost without waiting until the queue takes frames again."""
    images = rng.normal(size=(6, 4, 4)).astype(np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "queueFrames": 2, "queueTimeout": 0.5})
    p.process(frame(1, images[0]))
    p.process(frame(2, images[1]))
    t0 = time.monotonic()
    p.process(frame(3, images[2]))  # waits 0.5 s
    waited = time.monotonic() - t0
    t0 = time.monotonic()
    p.process(frame(4, images[3]))  # does not wait
    assert 0.5 <= waited < 3 and time.monotonic() - t0 < 0.25
    st = accounted(p)
    assert (st["nFramesQueued"], st["nLostNotQueued"]) == (2, 2)
    p.start()
    try:
        wait_for(lambda: accounted(p)["nFramesQueued"] == 0, 10)  # the writer takes the two queued frames
        p.process(frame(5, images[4]))  # the queue takes frames again: neither is lost
        p.process(frame(6, images[5]))
    finally:
        p.stop()
    st = accounted(p)
    assert (st["nFramesWritten"], st["nLostNotQueued"], st["nFramesQueued"]) == (4, 2, 0)
    assert ids_in(p.files[0]) == [1, 2, 5, 6]


def test_a_dead_writer_blocks_nothing_and_every_frame_is_counted(tmp_path, rng):
    images = rng.normal(size=(6, 4, 4)).astype(np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "queueFrames": 3, "queueTimeout": 5})
    for k in range(3):  # queued before start, as PvaPy's monitor may do
        p.process(frame(k + 1, images[k]))
    p._thread = threading.Thread(target=lambda: None)  # a writer thread that is gone
    p._thread.start()
    p._thread.join(5)
    t0 = time.monotonic()
    p.process(frame(4, images[3]))
    p.process(frame(5, images[4]))
    with pytest.raises(RuntimeError, match="newScan not applied"):
        p.configure({"newScan": True})
    p.stop()
    p.process(frame(6, images[5]))  # after stop
    assert time.monotonic() - t0 < 2  # no 5 s wait anywhere
    st = accounted(p)
    assert (st["nFramesReceived"], st["nLostNotQueued"], st["nLostStopping"], st["nFramesQueued"]) == (6, 2, 4, 0)


def test_a_stuck_writer_lets_stop_return_and_counts_what_it_left(tmp_path, rng, monkeypatch):
    """The writer hangs in I/O (a dead NFS server): process() and stop() return in bounded time;
    the frame in the writer's hands stays counted as queued until the writer comes back."""
    monkeypatch.setattr(writer, "STOP_TIMEOUT_S", 0.3)
    release = threading.Event()
    append = writer._ScanFile.append

    def hanging_append(self, frames):
        assert release.wait(10)
        append(self, frames)

    monkeypatch.setattr(writer._ScanFile, "append", hanging_append)
    images = rng.normal(size=(5, 4, 4)).astype(np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "queueFrames": 2, "queueTimeout": 0.1})
    p.start()
    thread = p._thread
    try:
        p.process(frame(1, images[0]))
        wait_for(lambda: p.queue.qsize() == 0)  # the writer holds frame 1
        t0 = time.monotonic()
        for k in range(1, 5):  # 2 queued, 1 waits 0.1 s and is lost, 1 lost at once
            p.process(frame(k + 1, images[k]))
        p.stop()
        assert time.monotonic() - t0 < 3
        st = accounted(p)
        assert (st["nFramesQueued"], st["nLostNotQueued"], st["nLostStopping"]) == (1, 2, 2)
    finally:
        release.set()
    thread.join(5)
    assert not thread.is_alive()  # it came back, wrote frame 1 and ended
    st = accounted(p)
    assert (st["nFramesWritten"], st["nFramesLost"], st["nFramesQueued"]) == (1, 4, 0)
    assert ids_in(p.files[0]) == [1]


def test_a_long_scan_keeps_only_the_restart_windows_ids(tmp_path):
    """A writer follows a stream for hours: what it keeps to see a restart does not grow
    with the scan, and a repeated uniqueId within restartWindow still starts a new file."""
    image = np.zeros((2, 2), np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "restartWindow": 16, "chunkFrames": 256})
    p.start()
    for uid in range(1, 3001):
        p.process(frame(uid, image))
    wait_for(lambda: accounted(p)["nFramesQueued"] == 0)
    assert len(p._scan_ids) <= 17  # the ids within the window of 3000, not all 3000
    p.process(frame(2990, image))  # seen, within the window: a new scan
    p.process(frame(2991, image))
    p.process(frame(1000, image))  # far below: a new scan
    p.stop()
    assert [len(ids_in(f)) for f in p.files] == [3000, 2, 1]
    assert accounted(p)["nFramesWritten"] == 3003


def test_many_scans_keep_only_the_last_file_names(tmp_path):
    """Every file's name was kept for the whole run: the writer's memory grew by each scan, for
    as long as it ran (days of scans at a beamline). Now only the last RECENT_FILES; every
    scan still has its file."""
    image = np.zeros((2, 2), np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "fileNameFormat": "s{scan}.h5"})
    n = RECENT_FILES + 5
    run(p, [frame(1, image)] * n)  # uniqueId 1 again: each frame starts a new scan, a new file
    assert accounted(p)["nFilesWritten"] == n and len(list(tmp_path.glob("s*.h5"))) == n
    assert len(p.files) == RECENT_FILES
    assert p.files[0].name == "s6.h5" and p.files[-1].name == f"s{n}.h5" and ids_in(p.files[-1]) == [1]


@pytest.mark.parametrize("kind", ["bad", "empty"])
def test_a_reset_racing_a_frame_leaves_no_stale_count(tmp_path, kind):
    """decode_frame counted bad and empty records without the lock under which resetStats()
    clears the counts: a reset between the count's read and its write was undone."""
    from frames_util import colour_frame, no_image_record

    make_frame = {"bad": colour_frame, "empty": no_image_record}[kind]
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path)})
    for uid in range(1, 4):
        p.process(make_frame(uid))
    assert p.counts[kind] == 3

    class ResetWhileRead(dict):  # resetStats() on another thread right when the count is read
        armed = True

        def __getitem__(self, key):
            value = super().__getitem__(key)
            if key == kind and self.armed:
                self.armed = False
                resetter.start()
                resetter.join(0.5)  # a reset that needs the lock held while counting cannot finish here
            return value

    resetter = threading.Thread(target=p.resetStats)
    p.counts = ResetWhileRead(p.counts)
    p.process(make_frame(4))
    resetter.join(10)
    assert not resetter.is_alive()
    assert p.counts[kind] in (0, 1) and accounted(p)  # reset after the frame, or before it: never 4


def test_a_shorter_flush_period_applies_at_once(tmp_path):
    """configure {"flushPeriod": 0.05} while no frame came: the writer slept on for the old
    period (up to an hour), so a SWMR reader saw none of the frames appended before."""
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "flushPeriod": 3600})
    p.start()
    try:
        for k in range(3):
            p.process(frame(k + 1, np.zeros((4, 4), np.float32)))
        wait_for(lambda: p.getStats()["nFramesUnflushed"] == 3)
        p.configure({"flushPeriod": 0.05})
        wait_for(lambda: p.getStats()["nFramesWritten"] == 3, 2.0)
        with h5py.File(p.current.path, "r", libver="latest", swmr=True) as f:  # a reader sees them
            assert f["uniqueId"][:].tolist() == [1, 2, 3]
    finally:
        p.stop()
    assert accounted(p)["nFramesWritten"] == 3


def test_a_run_time_change_is_not_refused_for_a_file_read_at_start(tmp_path):
    """configure {"flushPeriod": ...} re-ran the start checks: with the model card (read at
    start) moved away since, every run-time change was refused ("modelCard ... is not a file")."""
    card = tmp_path / "card.json"
    card.write_text("{}")
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path / "h5"), "modelCard": str(card)})
    card.unlink()
    p.configure({"flushPeriod": 2})
    assert p.settings.flush_period_s == 2
    with pytest.raises(ValueError, match="modelCard .*card.json' is not a file"):  # still checked at start
        Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path / "h5"), "modelCard": str(card)})


def test_positions_are_kept_when_the_first_frame_has_none(tmp_path, rng):
    """The positions dataset was made only when a file's first frame had a position (none can
    be made later in SWMR mode): one frame without its attributes at the start of a scan lost
    the positions of every frame of the file."""
    images = rng.normal(size=(4, 4, 4)).astype(np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path)})
    run(p, [frame(1, images[0])] + [frame(k + 1, images[k], pos=(k, 2 * k)) for k in range(1, 4)])
    with h5py.File(p.files[0], "r") as f:
        pos = f["positions"][:]
    assert np.isnan(pos[0]).all() and pos[1:].tolist() == [[1, 2], [2, 4], [3, 6]]
    assert accounted(p)["nFramesWritten"] == 4


def test_a_long_file_name_is_written_or_refused_at_start(tmp_path, rng):
    """A fileNameFormat whose names fit (235 bytes) lost every frame: the hidden name each file
    is built under passed 255 bytes ("File name too long", counted as write errors). A format
    whose names cannot fit is refused at start, not frame after frame."""
    images = rng.normal(size=(2, 4, 4)).astype(np.float32)
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "fileNameFormat": "n" * 230 + "_{scan}.h5"})
    run(p, [frame(1, images[0]), frame(2, images[1])])
    assert [f.name for f in p.files] == ["n" * 230 + "_1.h5"] and ids_in(p.files[0]) == [1, 2]
    assert accounted(p)["nFramesWritten"] == 2
    with pytest.raises(ValueError, match=r"fileNameFormat .* gives names too long for a file \(259 bytes"):
        Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "fileNameFormat": "{channel}" + "n" * 241})


def test_a_new_scan_that_fails_takes_the_other_changes_back(tmp_path):
    """configure {"flushPeriod": 5, "newScan": true} with a writer not taking work answered
    "newScan not applied" (Configuration failed) but had changed flushPeriod all the same."""
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "queueFrames": 1, "queueTimeout": 0.05})
    p.queue.put(object())  # full, and no writer thread takes from it
    with pytest.raises(RuntimeError, match="newScan not applied"):
        p.configure({"flushPeriod": 5, "newScan": True})
    assert p.settings.flush_period_s == 1.0


def test_a_failed_new_scan_keeps_a_change_accepted_while_it_waited(tmp_path):
    """A newScan waits up to queueTimeout on PvaPy's timer thread; a flushPeriod sent meanwhile
    (on another timer thread) was answered "Configuration successful", then taken back when the
    newScan failed: its rollback put back every setting of before it, the other request's too."""
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "queueFrames": 1, "queueTimeout": 0.05})
    p.queue.put(object())  # full, and no writer thread takes from it: the newScan fails
    failed = configure_while_new_scan_held(p, {"newScan": True}, {"flushPeriod": 0.5}, p.new_scan)  # 2nd accepted
    assert failed
    assert p.settings.flush_period_s == 0.5
    assert json.loads(p.getStats()["settings"]) == {"flushPeriod": 0.5}


def test_a_writer_with_no_file_open_sleeps_until_work_comes(tmp_path, rng):
    """With no file open (before the first frame, after a scan ended) the writer thread woke
    every 10 ms to flush nothing: 100 wake-ups a second per idle writer."""
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path)})
    waits = []
    get = p.queue.get

    def recorded_get(block=True, timeout=None):
        if block:  # not get_nowait()
            waits.append(timeout)
        return get(block, timeout)

    p.queue.get = recorded_get
    p.start()
    try:
        wait_for(lambda: waits)
        assert waits[0] is None  # blocks until an item comes
        p.process(frame(1, rng.normal(size=(4, 4)).astype(np.float32)))
        wait_for(lambda: len(waits) >= 2)
        p.configure({"newScan": True})
        wait_for(lambda: accounted(p)["nFilesWritten"] == 1)
        wait_for(lambda: waits[-1] is None)  # the file closed: nothing is due again
    finally:
        p.stop()
    assert accounted(p)["nFramesWritten"] == 1


def test_undecodable_frames_are_counted_by_kind(tmp_path, caplog):
    """Each kind of undecodable frame was logged once and then only counted in nBadFrames:
    the status said nothing of the kinds of the others. Now nBad<Kind>, as the inference
    consumer's status has them, cleared by a reset. The one line logged of each kind names
    its frame (the colour and dtype lines did not)."""
    import logging

    from frames_util import bool_frame, colour_frame

    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path)})
    with caplog.at_level(logging.ERROR):
        for uid in range(1, 4):
            p.process(colour_frame(uid))
        p.process(bool_frame(4))
    logged = [r.getMessage().split(" only counted): ", 1)[1] for r in caplog.records]
    assert len(logged) == 2 and logged[0].startswith("frame 1 ") and logged[1].startswith("frame 4:"), logged
    st = p.getStats()
    assert (st["nBadFrames"], st["nBadColour"], st["nBadDtype"], st["nBadShape"]) == (4, 3, 1, 0), st
    assert p.getStats().keys() == p.getStatsPvaTypes().keys()
    p.resetStats()
    assert p.getStats()["nBadColour"] == p.getStats()["nBadDtype"] == 0


def test_float_frames_with_nan_or_infinite_pixels_are_written_as_they_are(tmp_path):
    """A detector's float frames that mark dead or masked pixels NaN (module gaps), and double
    frames beyond float32's range, were refused as bad frames (nBadNonfinite), the check
    meant for a model's input: the writer, which runs no model, recorded none of them and
    the file of a whole scan was missing. Now they are written, pixel for pixel."""
    masked = np.arange(48, dtype=np.float32).reshape(6, 8)
    masked[0, :] = np.nan
    masked[1, 2] = np.inf
    huge = np.full((6, 8), 1e300, np.float64)
    huge[2, 3] = -np.inf
    for image in (masked, huge):
        out = tmp_path / str(image.dtype)
        p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(out)})
        run(p, [good_frame(uid, image) for uid in (1, 2, 3)])
        st = accounted(p)
        assert (st["nFramesWritten"], st["nBadFrames"], st["nBadNonfinite"]) == (3, 0, 0), st
        [file] = p.files
        with h5py.File(file, "r") as f:
            assert f["data"].dtype == image.dtype and f["uniqueId"][:].tolist() == [1, 2, 3]
            np.testing.assert_array_equal(f["data"][:], np.stack([image] * 3))  # NaN where NaN


_UNCLOSABLE_SCRIPT = r"""
import logging, os, subprocess, sys, time
import numpy as np
from frames_util import good_frame
from processors.hdf5_writer import Hdf5WriterProcessor

logging.basicConfig()
out = sys.argv[1]
framework = {"processorId": 1, "inputChannel": "x:1:output", "outputChannel": "", "objectIdField": "uniqueId",
             "objectIdOffset": 1, "skipInitialUpdates": 0, "nSequentialUpdates": 1}
p = Hdf5WriterProcessor({**framework, "outputDirectory": out, "flushPeriod": 0.1})
p.start()

def wait_for(condition):
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)

image = np.zeros((64, 64), np.float32)
for uid in range(1, 81):
    p.process(good_frame(uid, image + uid))
    if uid == 20:  # confirmed by a flush, then the file is made immutable: flush and close fail
        wait_for(lambda: p.getStats()["nFramesWritten"] == 20)
        first = os.path.join(out, os.listdir(out)[0])
        subprocess.run(["chattr", "+i", first], check=True)
    if uid == 30:
        wait_for(lambda: p.getStats()["nWriteErrors"] >= 2)
        subprocess.run(["chattr", "-i", first], check=True)
    time.sleep(0.005)
p.stop()
print("STATS", p.getStats(), flush=True)
"""


def test_a_file_that_cannot_be_closed_crashes_nothing(tmp_path):
    """A file made read-only while written (its flush, then its close failed) stayed half closed
    inside libhdf5, and the writer process died of SIGSEGV at the next file (in a live chain:
    the launch stopped, 22 frames lost). Now the writer goes on in a new file, every frame is
    written or counted lost, and the process ends with status 1, not a crash."""
    import subprocess
    import sys

    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here (needs root and a file system with the immutable flag)")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.unlink()
    out = tmp_path / "h5"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    try:
        proc = subprocess.run([sys.executable, "-c", _UNCLOSABLE_SCRIPT, str(out)], capture_output=True, text=True,
                              timeout=120, env=env)
    finally:
        subprocess.run(["chattr", "-R", "-i", str(out)], capture_output=True)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    stats = eval(proc.stdout.split("STATS ", 1)[1])
    assert stats["nFramesReceived"] == 80 and stats["nFramesUnaccounted"] == 0, stats
    assert stats["nFramesWritten"] + stats["nLostWriteError"] == 80 and stats["nLostWriteError"] > 0, stats
    assert "it stays marked as open for writing" in proc.stderr
    ids = []
    for path in sorted(out.glob("*.h5")):
        with h5py.File(path, "r", libver="latest", swmr=True) as f:  # the unclosed one too
            ids += f["uniqueId"][:].tolist()
    assert len(ids) == len(set(ids)) == stats["nFramesWritten"] and sorted(ids)[:20] == list(range(1, 21)), ids


_SLOW_AT_EXIT_SCRIPT = r"""
import sys, threading, time
import h5py
import numpy as np
from frames_util import good_frame
import processors.hdf5_writer as writer

writer.STOP_TIMEOUT_S = 0.3
append = writer._ScanFile.append
writing = threading.Event()

def slow_append(self, frames):  # a slow disk: the writer holds h5py's lock as it writes, for 2 s
    if frames[-1].unique_id == 3:  # as it writes the last frame: none is left queued (stop() counts those lost)
        with h5py._objects.phil:
            writing.set()
            time.sleep(2)
    append(self, frames)

writer._ScanFile.append = slow_append
framework = {"processorId": 1, "inputChannel": "x:1:output", "outputChannel": "", "objectIdField": "uniqueId",
             "objectIdOffset": 1, "skipInitialUpdates": 0, "nSequentialUpdates": 1}
p = writer.Hdf5WriterProcessor({**framework, "outputDirectory": sys.argv[1]})
p.start()
for uid in range(1, 4):
    p.process(good_frame(uid, np.zeros((8, 8), np.float32) + uid))
# the writer holds the last of them (a loaded machine may take a while to get there); a wait for its
# first append raced it: it may take frame 1 alone, and stop() then counted frames 2 and 3 lost, still queued
assert writing.wait(60)
p.stop()  # returns after STOP_TIMEOUT_S, the writer still writing
print("STOPPED", p._thread.is_alive(), flush=True)
"""


def test_a_writer_slower_than_stop_does_not_hang_the_exit(tmp_path):
    """A writer still writing when stop() gave up (10 s: gzip-9 on 1024x1024 frames, a slow disk)
    held h5py's lock as Python's finalization froze its thread: the process never ended (only
    SIGKILL did, the file left marked as open for writing). Now the exit waits for the writer to
    close its file, and the process ends."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    try:
        proc = subprocess.run([sys.executable, "-c", _SLOW_AT_EXIT_SCRIPT, str(tmp_path)], capture_output=True,
                              text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not end after stop()")
    assert "STOPPED True" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    (path,) = tmp_path.glob("*.h5")
    assert ids_in(path) == [1, 2, 3]  # closed: readable without swmr


def test_status_says_the_settings_in_force(tmp_path):
    """The status had no word of flushPeriod after a configure, though `edge-ptychonn
    configure` sends the user to the status channel for what is in force."""
    p = Hdf5WriterProcessor({**FRAMEWORK, "outputDirectory": str(tmp_path), "flushPeriod": 1.0})
    assert json.loads(p.getStats()["settings"]) == {"flushPeriod": 1.0}
    p.configure({"flushPeriod": 0.25})
    assert json.loads(p.getStats()["settings"]) == {"flushPeriod": 0.25}
    with pytest.raises(ValueError):
        p.configure({"flushPeriod": -1})
    assert json.loads(p.getStats()["settings"]) == {"flushPeriod": 0.25}
