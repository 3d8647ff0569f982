"""The stitching processor: positions by uniqueId (file, table, attributes), scans, publishing, stats.

In-process tests feed real NTNDArrays to ``process()``; the end-to-end tests run it
inside a real ``pvapy-hpc-collector`` behind real inference consumers.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pvaccess as pva
import pytest

from edge_ptychonn.science.stitch import Stitcher, probe_weight
from edge_ptychonn.tools.processes import stop_monitor, wait_until
from channel_names import PREFIX
from configure_util import configure_while_new_scan_held
from frames_util import good_frame
from processors.base import RECENT_FILES, RESETS_KEY
from processors.stitch import STATS, PositionTable, StitchProcessor

FRAMEWORK = {"processorId": 1, "inputChannel": "inference:*:output", "outputChannel": "stitch:1:output",
             "objectIdField": "uniqueId", "objectIdOffset": 1, "skipInitialUpdates": 0, "nSequentialUpdates": 1}
PATCH = 16


def small_scan(rng, n=20, shape=(40, 48)):
    """(patches (n, 16, 16) float32, positions (n, 2), probe (16, 16) complex64)."""
    positions = np.stack([rng.integers(0, shape[0] - PATCH + 1, n), rng.integers(0, shape[1] - PATCH + 1, n)], 1).astype(float)
    patches = rng.normal(size=(n, PATCH, PATCH)).astype(np.float32)
    y, x = np.mgrid[:PATCH, :PATCH] - (PATCH - 1) / 2
    probe = np.exp(-(y**2 + x**2) / 20).astype(np.complex64)
    return patches, positions, probe


def write_npz(path, positions, probe, shape):
    np.savez(path, positions_px=positions, probe=probe, object_phase=np.zeros(shape, np.float32))
    return path


class Publisher:  # what PvaPy's PvasDataPublisher offers: updateOutputChannel(pv)
    def __init__(self):
        self.images = []

    def updateOutputChannel(self, pv):
        dims = pv["dimension"]
        image = np.array(pv["value"][0]["floatValue"]).reshape(dims[1]["size"], dims[0]["size"])
        attrs = {a["name"]: a["value"][0]["value"] for a in pv["attribute"]}
        self.images.append((pv["uniqueId"], image, attrs))


def make(args, publisher=None):
    p = StitchProcessor({**FRAMEWORK, **args})
    p.outputChannel = FRAMEWORK["outputChannel"]
    p.dataPublisher = publisher
    return p


def offline(patches, positions, shape, weight):
    st = Stitcher(shape, patches.shape[1:], weight=weight)
    st.add_many(patches, positions)
    return st


def test_stats_table_and_contract(tmp_path, rng):
    patches, positions, probe = small_scan(rng)
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, (40, 48)))})
    assert p.getStats().keys() == p.getStatsPvaTypes().keys() == {*STATS, RESETS_KEY}
    pva.PvObject(p.getStatsPvaTypes()).set(p.getStats())
    for key in ("nFramesPlaced", "coverage", "placeRate", "nFramesNoPosition", "stitchTimeUs", "nScans"):
        assert key in STATS


def test_any_order_equals_offline_stitching_from_npz(tmp_path, rng):
    patches, positions, probe = small_scan(rng)
    shape = (40, 48)
    publisher = Publisher()
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, shape)),
              "outputDirectory": str(tmp_path / "out")}, publisher)
    p.process(pva.NtNdArray())  # the empty record a monitor gets on connect: ignored
    order = rng.permutation(len(patches))  # arrival order never matters, uniqueIds do
    for k in order:
        p.process(good_frame(int(k) + 1, patches[k]))
    expected = offline(patches, positions, shape, probe_weight(probe, 0.1))
    image, scan = p.image()
    np.testing.assert_allclose(image, expected.image(), atol=1e-6)
    stats = p.getStats()
    assert stats["nFramesPlaced"] == 20 and stats["nEmptyFrames"] == 1 and stats["nFramesNoPosition"] == 0
    assert stats["coverage"] == pytest.approx(expected.covered(0.5).mean())
    assert stats["lastUniqueId"] == order[-1] + 1 and stats["stitchTimeUs"] > 0
    p.stop()  # the finished image goes to disk
    np.testing.assert_allclose(np.load(tmp_path / "out" / "stitch_scan0001.npy"), expected.image(), atol=1e-6)
    assert np.load(tmp_path / "out" / "stitch_scan0001_weight.npy").shape == shape


def stitch_one_scan_into(out, tmp_path, rng):
    """A small scan stitched by a processor saving into ``out``, stopped; its image."""
    patches, positions, probe = small_scan(rng)
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, (40, 48))),
              "outputDirectory": str(out)}, Publisher())
    for k in range(len(patches)):
        p.process(good_frame(k + 1, patches[k]))
    image, _ = p.image()
    p.stop()
    return image


def test_an_earlier_runs_image_is_never_replaced(tmp_path, rng):
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "stitch_scan0001_weight.npy", np.zeros(3))  # an earlier run's, half of a pair
    image = stitch_one_scan_into(out, tmp_path, rng)
    np.testing.assert_array_equal(np.load(out / "stitch_scan0001_weight.npy"), np.zeros(3))
    assert not (out / "stitch_scan0001.npy").exists()
    np.testing.assert_allclose(np.load(out / "stitch_scan0001-2.npy"), image)
    assert np.load(out / "stitch_scan0001-2_weight.npy").shape == (40, 48)


def test_a_name_taken_while_saving_moves_the_pair_to_the_next_free_name(tmp_path, rng, monkeypatch):
    import processors.stitch as stitch_module

    out = tmp_path / "out"
    out.mkdir()
    free_name = stitch_module.unused_stem

    def taken_meanwhile(stem, endings):  # another process saves its image under the name just chosen
        chosen = free_name(stem, endings)
        if not (out / "stitch_scan0001.npy").exists():
            np.save(out / "stitch_scan0001.npy", np.ones(2))
        return chosen

    monkeypatch.setattr(stitch_module, "unused_stem", taken_meanwhile)
    image = stitch_one_scan_into(out, tmp_path, rng)
    np.testing.assert_array_equal(np.load(out / "stitch_scan0001.npy"), np.ones(2))  # the other's, untouched
    assert not (out / "stitch_scan0001_weight.npy").exists()  # no half pair left behind
    np.testing.assert_allclose(np.load(out / "stitch_scan0001-2.npy"), image)
    assert np.load(out / "stitch_scan0001-2_weight.npy").shape == (40, 48)


def test_an_image_that_cannot_be_saved_leaves_no_half_pair(tmp_path, rng, monkeypatch):
    """A full disk at the image, after its weights were saved: the weights stayed, alone
    (and moved the next run's image of the scan to "-2"). Now the pair goes, counted."""
    import errno

    import processors.stitch as stitch_module

    out = tmp_path / "out"
    save = stitch_module.save_npy_whole

    def disk_full_at_the_image(path, array, replace=True):
        if not path.name.endswith("_weight.npy"):
            raise OSError(errno.ENOSPC, "No space left on device (simulated)", str(path))
        save(path, array, replace)

    monkeypatch.setattr(stitch_module, "save_npy_whole", disk_full_at_the_image)
    patches, positions, _ = small_scan(rng, n=2)
    p = make({"objectShape": [40, 48], "outputDirectory": str(out)})
    p.process(attributed_frame(1, patches[0], positions[0]))
    p.stop()
    assert list(out.iterdir()) == [] and p.problems("save") == 1 and p.getStats()["nScansSaved"] == 0


def test_plain_tables_two_and_three_columns(tmp_path, rng):
    patches, positions, _ = small_scan(rng, n=6)
    (tmp_path / "yx.csv").write_text("# y, x\n" + "\n".join(f"{y},{x}" for y, x in positions))
    (tmp_path / "iyx.txt").write_text("\n".join(f"{i + 10} {y} {x}" for i, (y, x) in enumerate(positions)))
    t2 = PositionTable.load(tmp_path / "yx.csv")
    t3 = PositionTable.load(tmp_path / "iyx.txt")
    assert t2.positions[1] == tuple(positions[0]) and t3.positions[10] == tuple(positions[0]) and len(t3.positions) == 6
    np.save(tmp_path / "yx.npy", positions)
    assert PositionTable.load(tmp_path / "yx.npy", first_unique_id=0).positions[0] == tuple(positions[0])
    with pytest.raises(ValueError, match="distinct integers"):
        PositionTable.from_rows(np.array([[1, 0, 0], [1, 2, 2]]))
    # without an object shape, the table's extent plus a patch gives it
    p = make({"positionsFile": str(tmp_path / "iyx.txt")})
    for i in range(6):
        p.process(good_frame(i + 10, patches[i]))
    image, _ = p.image()
    assert image.shape == (int(positions[:, 0].max()) + PATCH, int(positions[:, 1].max()) + PATCH)
    np.testing.assert_allclose(image, offline(patches[:6], positions, image.shape, None).image(), atol=1e-6)


def test_positions_from_attributes_win_over_the_file(tmp_path, rng):
    patches, positions, _ = small_scan(rng, n=8)
    p = make({"objectShape": [40, 48], "positionAttributes": ["SampleY", "SampleX"], "positionScale": 2.0})
    for k in range(8):
        pv = good_frame(k + 1, patches[k])
        pv["attribute"] = [pva.NtAttribute("SampleY", pva.PvDouble(positions[k, 0] / 2)),
                           pva.NtAttribute("SampleX", pva.PvDouble(positions[k, 1] / 2))]
        p.process(pv)
    p.process(good_frame(99, patches[0]))  # no attributes, no file: counted, not placed
    image, _ = p.image()
    np.testing.assert_allclose(image, offline(patches, positions, (40, 48), None).image(), atol=1e-6)
    assert p.getStats()["nFramesNoPosition"] == 1 and p.getStats()["nFramesPlaced"] == 8
    with pytest.raises(ValueError, match="objectShape"):
        StitchProcessor({**FRAMEWORK})


def test_positions_from_attributes_take_an_origin_as_finetune_does(tmp_path, rng):
    """Motor positions in physical units about a centre: ``value * positionScale +
    positionOrigin`` gives the patch's corner in object pixels, as ``edge-ptychonn finetune``'s
    ``position / pixel_size + origin`` (before: a scale only, so positions about a centre,
    negative ones among them, could not be placed)."""
    from edge_ptychonn.science.finetune import to_object_pixels

    patches, corners, _ = small_scan(rng, n=8)
    pixel_m, origin = 1e-8, (12.0, 16.0)
    motors = (corners - np.array(origin)) * pixel_m  # metres about the object pixel (12, 16)
    assert (motors < 0).any()
    np.testing.assert_array_equal(  # finetune maps the same positions to the same corners
        to_object_pixels(motors, size=PATCH, object_shape=(40, 48), pixel_size=pixel_m, origin=origin), corners)
    p = make({"objectShape": [40, 48], "positionScale": 1 / pixel_m, "positionOrigin": list(origin)})
    for k in range(8):
        p.process(attributed_frame(k + 1, patches[k], motors[k]))
    assert p.getStats()["nFramesPlaced"] == 8 and p.getStats()["nFramesOutside"] == 0
    image, _ = p.image()
    np.testing.assert_allclose(image, offline(patches, corners, (40, 48), None).image(), atol=1e-6)
    assert p.position_of(1, attributed_frame(1, patches[0], (0.0, -1e-8))["attribute"]) == pytest.approx((12.0, 15.0))
    # the metadata channels' values too, as their scale
    p = make({"objectShape": [40, 48], "positionChannels": ["scan:y", "scan:x"], "metadataMatch": "uniqueId",
              "positionScale": 1 / pixel_m, "positionOrigin": list(origin)})
    p.metadata.add("scan:y", 7, -2e-8)
    p.metadata.add("scan:x", 7, 3e-8)
    assert p._metadata_position_locked(7) == pytest.approx((10.0, 19.0))
    assert make({"objectShape": [40, 48]}).settings.position_origin == (0.0, 0.0)  # the default: none
    for bad in ([1.0], [0, float("nan")], "0 0", [True, 0]):
        with pytest.raises(ValueError, match="positionOrigin must be a list of two finite numbers"):
            make({"objectShape": [40, 48], "positionOrigin": bad})


def test_a_restart_or_a_command_starts_a_new_image(tmp_path, rng):
    patches, positions, probe = small_scan(rng, n=10)
    publisher = Publisher()
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, (40, 48))),
              "outputDirectory": str(tmp_path / "out")}, publisher)
    for k in range(10):
        p.process(good_frame(k + 1, patches[k]))
    first, _ = p.image()
    for k in range(4):  # uniqueIds restart at 1: a new scan
        p.process(good_frame(k + 1, -patches[k]))
    assert p.getStats()["nScans"] == 2 and p.getStats()["scanFramesPlaced"] == 4
    # the finished scan was published (live and saved) before the new one began
    assert publisher.images[-1][2]["FramesPlaced"] == 10 and publisher.images[-1][2]["ScanIndex"] == 1
    np.testing.assert_allclose(publisher.images[-1][1], first)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "stitch_scan0001.npy"), first)
    p.configure({"newScan": True})  # the control command
    p.process(good_frame(5, patches[5]))
    assert p.getStats()["nScans"] == 3 and p.getStats()["nScansSaved"] == 2
    with pytest.raises(ValueError, match="cannot change positionsFile"):
        p.configure({"positionsFile": "x.npz"})
    with pytest.raises(ValueError, match="newScan must be true or false"):
        p.configure({"newScan": 1})
    p.configure({"publishRate": 5})
    assert p.settings.publish_rate_hz == 5


def test_publisher_thread_publishes_changes_at_the_rate(tmp_path, rng):
    """Frames that change the image every 20 ms for a second give at most one image per
    publishing period (1/publishRate - 10 ms, however slow the machine), not one per frame."""
    n, rate_hz = 50, 4.0
    patches, positions, probe = small_scan(rng, n=n)
    publisher = Publisher()
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, (40, 48))), "publishRate": rate_hz},
             publisher)
    p.pvaServer = None
    t0 = time.monotonic()
    p.start()
    try:
        for k in range(n):
            p.process(good_frame(k + 1, patches[k]))
            time.sleep(0.02)  # paces the feed: the image keeps changing for about 1 s
        assert wait_until(lambda: publisher.images and publisher.images[-1][2]["FramesPlaced"] == n, 10), \
            [attrs["FramesPlaced"] for _, _, attrs in publisher.images]
        elapsed_s = time.monotonic() - t0
        published = len(publisher.images)
        time.sleep(2.5 / rate_hz)  # a window of over two periods with nothing new
        assert len(publisher.images) == published, "nothing changed, nothing published"
    finally:
        p.stop()
    assert 1 <= published <= elapsed_s / (1 / rate_hz - 0.01) + 1, f"{published} images in {elapsed_s:.2f} s"
    uid, image, attrs = publisher.images[-1]
    assert image.dtype == np.float32 and image.shape == (40, 48) and attrs["FramesPlaced"] == n
    assert [u for u, _, _ in publisher.images] == list(range(1, len(publisher.images) + 1))
    np.testing.assert_allclose(image, offline(patches, positions, (40, 48), probe_weight(probe)).image(), atol=1e-6)


def test_a_finished_image_already_published_live_is_not_published_live_again(tmp_path, rng):
    """At a new scan the finished image goes to the final channel; on the live channel only
    when it changed since the publishing thread last sent it. Before: the same image went out
    live once more, at once, beyond publishRate."""
    class Server:  # what the stitcher uses of PvaPy's PvaServer
        def __init__(self):
            self.records = {}

        def addRecord(self, name, pv, handler):
            self.records[name] = []

        def update(self, name, pv):
            self.records[name].append(pv["uniqueId"])

    patches, positions, probe = small_scan(rng, n=6)
    publisher = Publisher()
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, (40, 48))), "publishRate": 50},
             publisher)
    p.pvaServer = server = Server()
    p.start()
    try:
        for k in range(3):
            p.process(good_frame(k + 1, patches[k]))
        assert wait_until(lambda: publisher.images and publisher.images[-1][2]["FramesPlaced"] == 3, 10)
        live = len(publisher.images)
        p.configure({"newScan": True})
        assert len(publisher.images) == live and server.records["stitch:1:output:final"] == [1]
        p.configure({"publishRate": 0.01})  # the thread sends nothing more: the finish publishes what changed
        for k in range(3, 6):
            p.process(good_frame(k + 1, patches[k]))
        p.configure({"newScan": True})
        assert [attrs["FramesPlaced"] for _, _, attrs in publisher.images[live:]] == [3]
        assert server.records["stitch:1:output:final"] == [1, 2]
    finally:
        p.stop()


def test_bad_frames_are_counted(tmp_path, rng):
    patches, positions, probe = small_scan(rng, n=4)
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, (40, 48)))})
    p.process(good_frame(1, patches[0]))
    p.process(good_frame(2, np.zeros((8, 8), np.float32)))  # another patch size within a scan
    assert p.getStats()["nBadFrames"] == 1 and p.getStats()["nFramesPlaced"] == 1


# ---------------------------------------------------------------- end to end




def attributes(received) -> dict:
    """A received NTNDArray's attributes, by name."""
    return {a["name"]: a["value"][0]["value"] for a in received.attributes}


@pytest.mark.e2e
def test_collector_merges_two_producers_positions_from_attributes_and_a_restart(pva_env, procs, tmp_path, rng):
    """Two output channels (served by this process, as two inference consumers would) ->
    the stitcher inside a real pvapy-hpc-collector: frames placed by their PosY/PosX
    attributes, the live channel's last image equals offline stitching, uniqueIds
    restarting give a second image, and the first is kept on ``:final`` and on disk; SIGTERM
    saves the second."""
    import os
    import signal

    from edge_ptychonn.tools.launch import Status, collector_argv
    from edge_ptychonn.tools.processes import OutputCollector, start, wait_until

    tag = f"{PREFIX}-st"
    patches, positions, _ = small_scan(rng, n=48, shape=(64, 64))  # scans of 32 and 16: whole collector caches
    server = pva.PvaServer()
    try:
        outputs = [f"{tag}:inference:{i}:output" for i in (1, 2)]
        for name in outputs:
            server.addRecord(name, pva.NtNdArray())  # an empty record first, as a consumer's output is

        def publish(uid, patch, pos):
            pv = good_frame(uid, patch)
            pv["attribute"] = [pva.NtAttribute("PosY", pva.PvDouble(pos[0])), pva.NtAttribute("PosX", pva.PvDouble(pos[1]))]
            server.update(outputs[((uid - 1) // 8) % 2], pv)  # runs of 8 in turn, as -du 8 gives

        args = {"objectShape": [64, 64], "publishRate": 5, "outputDirectory": str(tmp_path / "out")}
        procs.append(start("stitch", collector_argv(f"{tag}:inference:*:output", [1, 2], "processors.stitch.StitchProcessor",
                                                    args, f"{tag}:stitch", cache_size=16), pva_env, tmp_path))
        status = Status()
        stitch_status = f"{tag}:stitch:1:status"

        def connected():
            rec = status.get(stitch_status)
            return rec and all(rec[f"producerStats_{i}"]["receiverStats"]["nReceived"] >= 1 for i in (1, 2))

        assert wait_until(connected, 40), procs[0].log()[-3000:]
        live = OutputCollector([f"{tag}:stitch:1:output"])
        try:
            assert live.wait_connected(10)
            for k in range(32):  # scan 1: uniqueIds 1..32
                publish(k + 1, patches[k], positions[k])
            placed = lambda n: wait_until(lambda: (status.get(stitch_status) or {}).get("userStats", {}).get("nFramesPlaced", 0) >= n, 20)
            assert placed(32), procs[0].log()[-3000:]
            # the last image of scan 1 (published within 1/publishRate of the last frame placed)
            first = wait_until(lambda: (lambda got: got and attributes(got[-1])["FramesPlaced"] == 32 and got[-1])(
                list(live.received[live.channels[0]])), 10)
            assert first, [attributes(r)["FramesPlaced"] for r in live.received[live.channels[0]]]
            for k in range(16):  # scan 2: uniqueIds restart at 1
                publish(k + 1, patches[32 + k], positions[32 + k])
            assert placed(48), procs[0].log()[-3000:]
            stats = wait_until(lambda: (status.get(stitch_status) or {}).get("userStats", {}).get("nScans", 0) == 2 and status.get(stitch_status), 10)
            final = pva.Channel(f"{tag}:stitch:1:output:final").get("field()")
        finally:
            live.close()
        user = stats["userStats"]
        assert user["nFramesPlaced"] == 48 and user["nFramesNoPosition"] == 0 and user["scanFramesPlaced"] == 16
        assert stats["collectorStats"]["nRejected"] == 0
        expected = offline(patches[:32], positions[:32], (64, 64), None).image()
        # the live channel's last image of scan 1 is the offline stitching of its 32 frames
        attrs = attributes(first)
        assert attrs["FramesPlaced"] == 32 and attrs["ScanIndex"] == 1
        np.testing.assert_allclose(first.image, expected, atol=1e-5)
        # scan 1's finished image: on the :final channel and on disk
        dims = final["dimension"]
        np.testing.assert_allclose(np.array(final["value"][0]["floatValue"]).reshape(dims[1]["size"], dims[0]["size"]), expected, atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / "out" / "stitch_scan0001.npy"), expected, atol=1e-5)
        # SIGTERM (what the kernel sends when the launcher dies): a clean stop, scan 2 goes to
        # disk (before: the collector died at once and scan 2 was lost; checked)
        collector = procs.pop()
        os.kill(collector.pid, signal.SIGTERM)
        code = collector.wait(30)
        collector.stop()
        assert code == 0, collector.log()[-3000:]
        np.testing.assert_allclose(np.load(tmp_path / "out" / "stitch_scan0002.npy"),
                                   offline(patches[32:], positions[32:], (64, 64), None).image(), atol=1e-5)
    finally:
        server.stop()


# ---------------------------------------------------------------- positions from metadata channels


def metadata_update(value, t=None, unique_id=None):
    """A metadata channel's update as PvaPy queues it: value and timeStamp (+ uniqueId)."""
    fields = {"value": pva.DOUBLE, "timeStamp": pva.PvTimeStamp()}
    values = {"value": float(value), "timeStamp": pva.PvTimeStamp(t or 0.0)}
    if unique_id is not None:
        fields["uniqueId"], values["uniqueId"] = pva.INT, unique_id
    return pva.PvObject(fields, values)


def stamped_frame(uid, patch, t):
    pv = good_frame(uid, patch)
    pv["timeStamp"] = pva.PvTimeStamp(t)
    return pv


def test_metadata_positions_match_by_time_within_the_tolerance():
    from processors.stitch import MetadataPositions, channel_name

    assert channel_name("pva://scan:y") == channel_name("ca://scan:y") == channel_name("scan:y") == "scan:y"
    m = MetadataPositions(("pva://y", "x"), tolerance_s=0.001, offset_s=0.0)
    for t, y, x in ((10.000, 1, 2), (10.010, 3, 4), (10.020, 5, 6)):
        m.add("y", t, y)
        m.add("x", t, x)
    assert m.lookup(10.0104) == (3, 4) and m.lookup(10.0196) == (5, 6)
    assert m.lookup(10.005) is None and m.lookup(9.0) is None  # nothing within 1 ms
    m.add("y", 10.030, 7)  # y came, x not yet: no position
    assert m.lookup(10.030) is None
    shifted = MetadataPositions(("y", "x"), offset_s=-0.5)  # metadata stamped 0.5 s late
    shifted.add("y", 10.5, 1)
    shifted.add("x", 10.5, 2)
    assert shifted.lookup(10.0) == (1, 2)
    by_id = MetadataPositions(("y", "x"), by_time=False)
    by_id.add("x", 7, 1.5)  # arrival order does not matter, nor which channel came first
    by_id.add("y", 7, 0.5)
    assert by_id.lookup(7) == (0.5, 1.5) and by_id.lookup(8) is None


@pytest.mark.parametrize("by_time", [True, False], ids=["by-time", "by-id"])
def test_metadata_positions_keep_the_newest_and_drop_the_oldest_in_slices(by_time):
    """Each channel keeps the newest max_updates; once it holds a sixteenth more, the oldest go
    down to max_updates in one go. Dropping one with each update shifted the whole store every
    time once it was full: 29 us per update by time (6 by uniqueId) at 100,000 kept, 0.5 now."""
    from processors.stitch import MetadataPositions

    m = MetadataPositions(("y", "x"), by_time=by_time, tolerance_s=0.001, max_updates=160)
    key = (lambda i: 100.0 + 0.01 * i) if by_time else (lambda i: i)
    kept = []
    for i in range(1000):
        for channel in ("y", "x"):
            m.add(channel, key(i), float(i))
        kept.append(len(m._keys["y"]) if by_time else len(m._by_id["y"]))
    assert max(kept) == 170 and min(kept[200:]) == 160  # 160 + 160 // 16, then down to 160
    oldest = 1000 - kept[-1]
    assert m.lookup(key(999)) == (999.0, 999.0) and m.lookup(key(oldest)) == (oldest, oldest)
    assert m.lookup(key(oldest - 1)) is None  # dropped


def test_positions_from_metadata_channels_by_time_never_by_arrival_order(tmp_path, rng):
    """Updates for every frame of a scan, some of whose frames never arrive (lost
    upstream): each frame takes the update with its own time stamp. A frame whose
    update comes after it waits for it; one whose update never comes waits
    ``metadataWait``, then counts as no position."""
    patches, positions, _ = small_scan(rng, n=12)
    p = make({"objectShape": [40, 48], "positionChannels": ["pva://scan:y", "pva://scan:x"],
              "positionScale": 2.0, "metadataWait": 0.3, "outputDirectory": str(tmp_path / "out")})
    p.metadataQueueMap = {"scan:y": pva.PvObjectQueue(100), "scan:x": pva.PvObjectQueue(100)}
    t0 = 1.7e9
    times = [t0 + 0.01 * k for k in range(12)]
    for k in range(10):  # the updates of frames 1..10 come first; 11's come after it, 12's never
        p.metadataQueueMap["scan:y"].put(metadata_update(positions[k, 0] / 2, times[k] + 0.0002))
        p.metadataQueueMap["scan:x"].put(metadata_update(positions[k, 1] / 2, times[k] - 0.0003))
    lost = {2, 5}  # frames 3 and 6 never reach the stitcher: arrival order would misplace the rest
    for k in range(12):
        if k not in lost:
            p.process(stamped_frame(k + 1, patches[k], times[k]))
    assert p.getStats()["nFramesWaiting"] == 2 and p.getStats()["nFramesPlaced"] == 8
    p.metadataQueueMap["scan:y"].put(metadata_update(positions[10, 0] / 2, times[10]))
    p.metadataQueueMap["scan:x"].put(metadata_update(positions[10, 1] / 2, times[10]))
    p.pvaServer = None
    p.start()  # its publisher thread looks at the waiting frames every 0.1 s
    # before stop (which gives up on every frame still waiting): frame 11 placed by its late
    # update, frame 12 counted as no position once it has waited metadataWait
    assert wait_until(lambda: (lambda st: st["nFramesWaiting"] == 0 and st["nFramesNoPosition"] == 1)(p.getStats()),
                      10), p.getStats()
    p.stop()
    stats = p.getStats()
    placed = [k for k in range(11) if k not in lost]
    assert stats["nFramesPlaced"] == 9 and stats["nFramesByMetadata"] == 9 and stats["nFramesNoPosition"] == 1
    assert stats["nFramesWaiting"] == 0 and stats["nMetadataReceived"] == 22
    np.testing.assert_allclose(np.load(tmp_path / "out" / "stitch_scan0001.npy"),
                               offline(patches[placed], positions[placed], (40, 48), None).image(), atol=1e-6)


def test_position_channels_the_collector_does_not_have_are_reported(rng, caplog):
    patches, positions, _ = small_scan(rng, n=2)
    p = make({"objectShape": [40, 48], "positionChannels": ["scan:y", "scan:x"], "metadataWait": 0.05,
              "positionsFile": None})
    p.metadataQueueMap = {"other:y": pva.PvObjectQueue(10)}  # --metadata-channels named something else
    p.pvaServer = None
    p.start()
    try:
        assert any("positionChannels scan:y, scan:x not among the metadata channels (--metadata-channels gives: other:y)"
                   in r.getMessage() for r in caplog.records)
        p.process(stamped_frame(1, patches[0], 5.0))
        assert p.getStats()["nFramesWaiting"] == 1
    finally:
        p.stop()  # the waiting frame is counted, not lost
    stats = p.getStats()
    assert stats["nFramesWaiting"] == 0 and stats["nFramesNoPosition"] == 1 and stats["nFramesReceived"] == 1


def test_metadata_by_unique_id_and_attributes_first(tmp_path, rng):
    patches, positions, _ = small_scan(rng, n=4)
    p = make({"objectShape": [40, 48], "positionChannels": ["y", "x"], "metadataMatch": "uniqueId", "metadataWait": 0})
    p.metadataQueueMap = {"y": pva.PvObjectQueue(10), "x": pva.PvObjectQueue(10)}
    for k in (3, 1, 0):  # any order; frame 3 (k=2) has none
        p.metadataQueueMap["y"].put(metadata_update(positions[k, 0], unique_id=k + 1))
        p.metadataQueueMap["x"].put(metadata_update(positions[k, 1], unique_id=k + 1))
    for k in range(3):
        p.process(good_frame(k + 1, patches[k]))
    pv = good_frame(4, patches[3])  # attributes win over the metadata (which says: elsewhere)
    pv["attribute"] = [pva.NtAttribute("PosY", pva.PvDouble(positions[3, 0])), pva.NtAttribute("PosX", pva.PvDouble(positions[3, 1]))]
    p.metadataQueueMap["y"].put(metadata_update(0.0, unique_id=99))
    p.process(pv)
    stats = p.getStats()
    assert stats["nFramesPlaced"] == 3 and stats["nFramesByMetadata"] == 2 and stats["nFramesNoPosition"] == 1
    image, _ = p.image()
    np.testing.assert_allclose(image, offline(patches[[0, 1, 3]], positions[[0, 1, 3]], (40, 48), None).image(), atol=1e-6)
    with pytest.raises(ValueError, match="metadataMatch"):
        make({"objectShape": [40, 48], "positionChannels": ["y", "x"], "metadataMatch": "arrival"})


@pytest.mark.e2e
def test_positions_from_the_sim_servers_metadata_channels_through_inference(pva_env, procs, tmp_path, rng):
    """pvapy-ad-sim-server publishes each frame with two PVA metadata channels (its
    ``-mpv``: a value per frame, stamped with the frame's time) -> a real inference
    consumer (zero engine: the output is the preprocessed frame, with the frame's time
    stamp) -> the stitcher in a real pvapy-hpc-collector with ``--metadata-channels``:
    every frame is placed where its own metadata says, as this test saw on the channels."""
    from edge_ptychonn.tools.launch import Status, collector_argv
    from edge_ptychonn.tools.processes import OutputCollector, consumer_argv, sim_server_argv, start, wait_until
    from processors.base import seconds as seconds_of

    tag = f"{PREFIX}-sm"
    n, scale, size = 40, 100.0, 128
    np.save(tmp_path / "frames.npy", rng.integers(0, 3000, (n, size, size)).astype(np.int16))
    y_channel, x_channel = f"{tag}:posY", f"{tag}:posX"
    status = Status()
    procs.append(start("inference", consumer_argv(f"{tag}:image", f"{tag}:inference", 1, "processors.ptychonn.PtychoNNProcessor",
                                                  {"engine": "zero"}), pva_env, tmp_path))
    args = {"objectShape": [size + 100, size + 100], "positionChannels": [y_channel, x_channel],
            "positionScale": scale, "outputDirectory": str(tmp_path / "out")}
    procs.append(start("stitch", collector_argv(f"{tag}:inference:*:output", [1], "processors.stitch.StitchProcessor",
                                                args, f"{tag}:stitch", cache_size=8)
                       + ["-mc", f"pva://{y_channel},pva://{x_channel}"], pva_env, tmp_path))
    assert wait_until(lambda: status.get(f"{tag}:inference:1:status") and status.get(f"{tag}:stitch:1:status"), 60)
    delay_s = 9.0  # every client connects (2-6 s after the sim server starts) before frames flow
    procs.append(start("sim", sim_server_argv(tmp_path / "frames.npy", f"{tag}:image", fps=20, start_delay_s=delay_s)
                       + ["-mpv", f"pva://{y_channel},pva://{x_channel}"], pva_env, tmp_path))
    # this test watches the metadata channels and the inference output too
    seen = {y_channel: {}, x_channel: {}}
    import pvaccess as pva_

    monitors = []
    for name in seen:
        ch = pva_.Channel(name)
        ch.monitor(lambda pv, name=name: seen[name].__setitem__(seconds_of(pv["timeStamp"]), pv["value"]),
                   "record[queueSize=1000]field()")
        monitors.append(ch)
    outputs = OutputCollector([f"{tag}:inference:1:output"])

    def connected():
        rec = status.get(f"{tag}:stitch:1:status") or {}
        got = lambda key: rec.get(key, {}).get("receiverStats", {}).get("nReceived", 0) >= 1
        return got("producerStats_1") and got("metadataStats_1") and got("metadataStats_2") and outputs.connected()

    try:
        assert wait_until(connected, delay_s + 10, poll_s=0.25), procs[1].log()[-3000:]
        assert outputs.wait_count(n, 40, idle_s=10) == n, procs[0].log()[-2000:]
        stats = wait_until(lambda: (lambda r: r if (r or {}).get("userStats", {}).get("nFramesPlaced", 0) >= n else None)(
            status.get(f"{tag}:stitch:1:status")), 20)
        assert stats, procs[1].log()[-3000:]
    finally:
        outputs.close()
        for ch in monitors:
            stop_monitor(ch)
    user = stats["userStats"]
    assert user["nFramesByMetadata"] == n and user["nFramesNoPosition"] == 0 and user["nFramesWaiting"] == 0
    assert user["nMetadataReceived"] >= 2 * n
    procs.pop(-1).stop()  # the sim server has finished
    procs.pop(1).stop(grace_s=15.0)  # the stitcher saves its image at stop
    frames = outputs.received[outputs.channels[0]]
    ys = [seen[y_channel][seconds_of(f.time_stamp)] * scale for f in frames]
    xs = [seen[x_channel][seconds_of(f.time_stamp)] * scale for f in frames]
    expected = Stitcher((size + 100, size + 100), (size, size))
    for f, y, x in zip(frames, ys, xs):
        expected.add(f.image, (y, x))
    assert len(set(ys)) == n, "the sim server's metadata gives every frame its own value"
    np.testing.assert_allclose(np.load(tmp_path / "out" / "stitch_scan0001.npy"), expected.image(), atol=1e-4)


# ---------------------------------------------------------------- scans restarting, slow disks


def test_metadata_by_unique_id_newest_wins_used_once_forgotten_at_scan_end():
    from processors.stitch import MetadataPositions

    m = MetadataPositions(("y", "x"), by_time=False)
    for uid, v in ((1, 1.0), (2, 2.0), (3, 3.0)):
        m.add("y", uid, v)
        m.add("x", uid, -v)
    m.add("y", 3, 30.0)  # a later scan's update for uniqueId 3: the newest wins
    m.add("x", 3, -30.0)
    assert m.lookup(3) == (30.0, -30.0)
    assert m.lookup(3) is None  # used once
    m.add("y", 4, 4.0)  # comes after the last update used
    assert m.forget_used() == 4  # 1 and 2 of both channels came before the last one used (3)
    assert m.lookup(1) is None and m.lookup(2) is None
    m.add("x", 4, -4.0)
    assert m.lookup(4) == (4.0, -4.0)


def test_metadata_by_unique_id_a_restarted_scan_takes_its_own_positions(tmp_path, rng):
    """uniqueIds restart at 1 for scan 2: each frame takes the update of its own scan,
    never the one an earlier scan's frame of the same uniqueId used, nor one that scan 1's
    lost frames left behind."""
    n, shape = 6, (64, 64)
    patches1, patches2 = rng.normal(size=(2, n, PATCH, PATCH)).astype(np.float32)
    pos1 = np.array([[2 * k, 3 * k] for k in range(n)], float)
    pos2 = np.array([[40 - 2 * k, 5 * k] for k in range(n)], float)
    p = make({"objectShape": list(shape), "positionChannels": ["y", "x"], "metadataMatch": "uniqueId",
              "metadataWait": 60, "outputDirectory": str(tmp_path / "out")})
    q = p.metadataQueueMap = {"y": pva.PvObjectQueue(100), "x": pva.PvObjectQueue(100)}

    def update(k, pos):
        q["y"].put(metadata_update(pos[k, 0], unique_id=k + 1))
        q["x"].put(metadata_update(pos[k, 1], unique_id=k + 1))

    for k in range(n):
        update(k, pos1)
    lost = [2, 5]  # uniqueIds 3 and 6 of scan 1 never arrive: their updates stay unused
    kept = [k for k in range(n) if k not in lost]
    for k in kept:
        p.process(good_frame(k + 1, patches1[k]))
    assert p.getStats()["nFramesPlaced"] == len(kept)
    for k in (0, 1):  # scan 2's first updates come before its first frame
        update(k, pos2)
    for k in (0, 1, 2):  # scan 2's frame 3 comes before its update: it waits, never takes scan 1's
        p.process(good_frame(k + 1, patches2[k]))
    stats = p.getStats()
    assert stats["nScans"] == 2 and stats["scanFramesPlaced"] == 2 and stats["nFramesWaiting"] == 1
    for k in range(2, n):  # (scan 2's update of uniqueId 6 replaces scan 1's unused one)
        update(k, pos2)
    for k in range(3, n):
        p.process(good_frame(k + 1, patches2[k]))
    stats = p.getStats()
    assert stats["nFramesWaiting"] == 0 and stats["scanFramesPlaced"] == n
    image, scan = p.image()
    assert scan.index == 2
    np.testing.assert_allclose(image, offline(patches2, pos2, shape, None).image(), atol=1e-6)
    p.stop()
    out = tmp_path / "out"
    np.testing.assert_allclose(np.load(out / "stitch_scan0001.npy"),
                               offline(patches1[kept], pos1[kept], shape, None).image(), atol=1e-6)
    np.testing.assert_allclose(np.load(out / "stitch_scan0002.npy"), image, atol=1e-6)
    stats = p.getStats()
    assert stats["nFramesReceived"] == len(kept) + n == stats["nFramesPlaced"] == stats["nFramesByMetadata"]


@pytest.mark.parametrize("metadata_in_time", [False, True], ids=["late", "in-time"])
def test_a_frame_waiting_for_metadata_at_a_restart_stays_in_its_scan(tmp_path, rng, metadata_in_time):
    """Scan 1's last frame waits for its metadata when scan 2's first frame comes: it is
    placed in scan 1 if its update came with scan 2's (in-time), else counted as no
    position (late: its update comes after scan 2 began, and is never used); it never
    joins scan 2, and scan 2's own frame of that uniqueId starts no third scan."""
    n, shape = 6, (64, 64)
    patches1, patches2 = rng.normal(size=(2, n, PATCH, PATCH)).astype(np.float32)
    pos1 = np.array([[2 * k, 3 * k] for k in range(n)], float)
    pos2 = np.array([[40 - 2 * k, 5 * k] for k in range(n)], float)
    p = make({"objectShape": list(shape), "positionChannels": ["y", "x"], "metadataWait": 60,
              "outputDirectory": str(tmp_path / "out")})
    q = p.metadataQueueMap = {"y": pva.PvObjectQueue(100), "x": pva.PvObjectQueue(100)}
    t1, t2 = 1.7e9, 1.7e9 + 10.0

    def update(pos, t):
        q["y"].put(metadata_update(pos[0], t))
        q["x"].put(metadata_update(pos[1], t))

    for k in range(n - 1):
        update(pos1[k], t1 + 0.01 * k)
    for k in range(n):  # the update of scan 1's last frame has not come yet
        p.process(stamped_frame(k + 1, patches1[k], t1 + 0.01 * k))
    assert p.getStats()["nFramesWaiting"] == 1
    if metadata_in_time:
        update(pos1[n - 1], t1 + 0.01 * (n - 1))
    update(pos2[0], t2)
    p.process(stamped_frame(1, patches2[0], t2))  # scan 2 begins: scan 1 is finished
    stats = p.getStats()
    assert stats["nScans"] == 2 and stats["nScansSaved"] == 1 and stats["nFramesWaiting"] == 0
    assert stats["scanFramesPlaced"] == 1
    if not metadata_in_time:
        update(pos1[n - 1], t1 + 0.01 * (n - 1))  # too late: scan 1 is finished
    for k in range(1, n):
        update(pos2[k], t2 + 0.01 * k)
        p.process(stamped_frame(k + 1, patches2[k], t2 + 0.01 * k))
    p.stop()
    stats = p.getStats()
    in_scan1 = n if metadata_in_time else n - 1
    assert stats["nScans"] == 2 and stats["nScansSaved"] == 2 and stats["nFramesReceived"] == 2 * n
    assert stats["nFramesPlaced"] == in_scan1 + n and stats["nFramesNoPosition"] == n - in_scan1
    out = tmp_path / "out"
    assert sorted(f.name for f in out.glob("*.npy")) == [
        "stitch_scan0001.npy", "stitch_scan0001_weight.npy", "stitch_scan0002.npy", "stitch_scan0002_weight.npy"]
    np.testing.assert_allclose(np.load(out / "stitch_scan0001.npy"),
                               offline(patches1[:in_scan1], pos1[:in_scan1], shape, None).image(), atol=1e-6)
    np.testing.assert_allclose(np.load(out / "stitch_scan0002.npy"), offline(patches2, pos2, shape, None).image(), atol=1e-6)


def test_a_frame_waiting_for_metadata_counts_as_in_its_scan(rng):
    """No frame placed yet, all waiting: a repeated uniqueId still starts a new scan, and
    the waiting frames are counted in the scan they belong to."""
    patches, _, _ = small_scan(rng, n=3)
    p = make({"objectShape": [40, 48], "positionChannels": ["y", "x"], "metadataWait": 60})
    p.metadataQueueMap = {"y": pva.PvObjectQueue(10), "x": pva.PvObjectQueue(10)}
    for k in range(3):
        p.process(stamped_frame(k + 1, patches[k], 100.0 + k))
    assert p.getStats()["nFramesWaiting"] == 3
    p.process(stamped_frame(2, patches[0], 200.0))  # uniqueId 2 again: a new scan
    stats = p.getStats()
    assert stats["nFramesWaiting"] == 1 and stats["nFramesNoPosition"] == 3 and stats["nFramesReceived"] == 4


class Recorder(Publisher):
    """Both output channels, in the order they are sent: the live one and ``:final``."""

    def __init__(self):
        super().__init__()
        self.order = []

    def updateOutputChannel(self, pv):
        super().updateOutputChannel(pv)
        self.order.append(("live", self.images[-1][2]["ScanIndex"], self.images[-1][2]["FramesPlaced"]))

    def update(self, channel, pv):  # PvaServer.update of <outputChannel>:final
        attrs = {a["name"]: a["value"][0]["value"] for a in pv["attribute"]}
        self.order.append(("final", attrs["ScanIndex"], attrs["FramesPlaced"]))


def _held_saves(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """The stitcher's saves wait (as on a slow or hung disk) until the test sets the second
    event; the first is set when a save starts."""
    import processors.stitch as stitch_module

    entered, release = threading.Event(), threading.Event()
    real_save = stitch_module.save_npy_whole

    def held_save(path, array, replace=True):
        entered.set()
        assert release.wait(20), "the test never released the save"
        real_save(path, array, replace)

    monkeypatch.setattr(stitch_module, "save_npy_whole", held_save)
    return entered, release


def test_process_and_stats_never_wait_for_a_slow_save(tmp_path, rng, monkeypatch):
    """The control command finishes scan 1 on PvaPy's timer thread and its save hangs on
    the disk: meanwhile process() places frames, getStats() answers, and a restart that
    finishes scan 2 returns at once; its outputs follow scan 1's, in order."""
    import threading

    import processors.stitch as stitch_module

    patches, positions, probe = small_scan(rng, n=10)
    recorder = Recorder()
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, (40, 48))),
              "outputDirectory": str(tmp_path / "out")}, recorder)
    p.pvaServer, p.final_channel = recorder, "stitch:1:output:final"
    entered, release = _held_saves(monkeypatch)
    for k in range(5):
        p.process(good_frame(k + 1, patches[k]))
    control = threading.Thread(target=p.configure, args=({"newScan": True},), daemon=True)
    control.start()
    try:
        assert entered.wait(10), "the save never began"
        worker_done = []

        def work():  # scan 2: frames 6..8, then uniqueId 6 again (scan 3)
            for k in range(5, 8):
                p.process(good_frame(k + 1, patches[k]))
            worker_done.append(p.getStats())
            p.process(good_frame(6, patches[5]))
            worker_done.append(p.getStats())

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        worker.join(5)
        assert len(worker_done) == 2, "process() or getStats() waited for the save"
        assert not release.is_set() and control.is_alive()
        assert worker_done[0]["nScans"] == 2 and worker_done[0]["scanFramesPlaced"] == 3
        assert worker_done[1]["nScans"] == 3 and worker_done[1]["nScansSaved"] == 0
    finally:
        release.set()
        control.join(10)
    assert not control.is_alive()
    # the timer thread sent scan 2's outputs too, after scan 1's
    assert recorder.order == [("live", 1, 5), ("final", 1, 5), ("live", 2, 3), ("final", 2, 3)]
    assert [u for u, _, _ in recorder.images] == [1, 2]
    out = tmp_path / "out"
    weight = probe_weight(probe, 0.1)
    np.testing.assert_allclose(np.load(out / "stitch_scan0001.npy"), offline(patches[:5], positions[:5], (40, 48), weight).image(), atol=1e-6)
    np.testing.assert_allclose(np.load(out / "stitch_scan0002.npy"), offline(patches[5:8], positions[5:8], (40, 48), weight).image(), atol=1e-6)
    assert p.getStats()["nScansSaved"] == 2 and list(p.saved_files) == [out / "stitch_scan0001.npy", out / "stitch_scan0002.npy"]


def attributed_frame(uid, patch, yx):
    pv = good_frame(uid, patch)
    pv["attribute"] = [pva.NtAttribute("PosY", pva.PvDouble(float(yx[0]))),
                       pva.NtAttribute("PosX", pva.PvDouble(float(yx[1])))]
    return pv


def test_many_scans_keep_only_the_last_saved_names(tmp_path, rng):
    """Every saved image's name was kept for the whole run: the stitcher's memory grew by each
    scan, for as long as it ran (days of scans at a beamline). Now only the last RECENT_FILES;
    every image is still saved."""
    patches, positions, _ = small_scan(rng, n=2)
    out = tmp_path / "out"
    p = make({"objectShape": [40, 48], "outputDirectory": str(out)})
    n = RECENT_FILES + 5
    for _ in range(n):  # uniqueId 1 again: each frame starts a new scan, the last one is saved
        p.process(attributed_frame(1, patches[1], positions[1]))
    p.stop()
    assert p.getStats()["nScansSaved"] == n and len(list(out.glob("stitch_scan*_weight.npy"))) == n
    assert len(p.saved_files) == RECENT_FILES
    assert p.saved_files[0] == out / "stitch_scan0006.npy" and p.saved_files[-1] == out / f"stitch_scan{n:04d}.npy"


def test_a_weight_file_is_checked_at_start_and_one_of_another_shape_places_the_frames(tmp_path, rng):
    """A weightFile of NaNs (or not an array at all) was accepted at start, then every frame
    raised in process() (a traceback each), was counted nowhere and started one more scan;
    one of another shape than the frames did the same. Now: refused at start in one line
    naming the file; another shape: the centre window, logged once."""
    patches, positions, _ = small_scan(rng, n=6)
    for name, content in (("nan.npy", np.full((PATCH, PATCH), np.nan)), ("neg.npy", -np.ones((PATCH, PATCH))),
                          ("line.npy", np.ones(PATCH))):
        np.save(tmp_path / name, content)
        with pytest.raises(ValueError, match=f"weightFile {tmp_path / name}: need an"):
            make({"objectShape": [40, 48], "weightFile": str(tmp_path / name)})
    (tmp_path / "text.npy").write_text("1 2 3")
    with pytest.raises(ValueError, match="weightFile .*text.npy: cannot read it"):
        make({"objectShape": [40, 48], "weightFile": str(tmp_path / "text.npy")})
    np.save(tmp_path / "small.npy", np.ones((8, 8)))
    p = make({"objectShape": [40, 48], "weightFile": str(tmp_path / "small.npy")})
    for k in range(6):
        p.process(attributed_frame(k + 1, patches[k], positions[k]))
    stats = p.getStats()
    assert stats["nFramesPlaced"] == 6 and stats["nScans"] == 1 and p.problems("weightShape") == 1
    np.testing.assert_allclose(p.image()[0], offline(patches, positions, (40, 48), None).image(), atol=1e-6)


def test_non_finite_numbers_and_a_prefix_with_a_folder_are_refused(tmp_path, rng):
    """NaN passes every range check: "publishRate": NaN published nothing, "metadataWait": NaN
    kept frames waiting for ever, "positionScale": Infinity put every frame outside. A
    filePrefix with a folder in it was accepted, and the image was not saved at stop."""
    for key, value in (("publishRate", float("nan")), ("metadataWait", float("nan")),
                       ("metadataTolerance", float("nan")), ("positionScale", float("inf")),
                       ("minCoverWeight", float("nan")), ("metadataTimeOffset", float("nan"))):
        with pytest.raises(ValueError, match=f"{key} must be a finite number"):
            make({"objectShape": [40, 48], key: value})
    p = make({"objectShape": [40, 48]})
    with pytest.raises(ValueError, match="publishRate must be a finite number"):
        p.configure({"publishRate": float("nan")})
    assert p.settings.publish_rate_hz == 2.0
    with pytest.raises(ValueError, match="filePrefix must be a file name without a folder"):
        make({"objectShape": [40, 48], "filePrefix": "run5/scan", "outputDirectory": str(tmp_path)})
    # JSON's "\u0000": accepted, then the save at stop raised (stop() with it) and the image was lost
    with pytest.raises(ValueError, match="filePrefix must not hold a NUL character"):
        make({"objectShape": [40, 48], "filePrefix": "scan\x00", "outputDirectory": str(tmp_path)})


def test_last_unique_id_names_the_last_frame_placed(rng):
    """lastUniqueId (and the image's LastUniqueId) named a frame that missed the object, which
    is not in the image."""
    patches, positions, _ = small_scan(rng, n=3)
    p = make({"objectShape": [40, 48]})
    p.process(attributed_frame(1, patches[0], positions[0]))
    p.process(attributed_frame(2, patches[1], (500.0, 1.0)))
    stats = p.getStats()
    assert stats["nFramesOutside"] == 1 and stats["lastUniqueId"] == 1
    p.process(attributed_frame(3, patches[2], positions[2]))
    assert p.getStats()["lastUniqueId"] == 3
    p.stop()


def _logged(caplog, kind: str) -> str:
    """The one line the stitcher logged of a problem ``kind`` (count_problem's)."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{kind} (logged once")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


def test_a_position_attribute_that_is_not_a_number_is_reported_as_such(rng, caplog):
    """PosX published as the string "12" (an IOC string record) was reported as "no attributes
    PosY/PosX", which sent the user looking for attributes that were there."""
    import logging

    patches, positions, _ = small_scan(rng, n=2)
    p = make({"objectShape": [40, 48]})
    pv = good_frame(5, patches[0])
    pv["attribute"] = [pva.NtAttribute("PosY", pva.PvDouble(positions[0, 0])), pva.NtAttribute("PosX", pva.PvString("12"))]
    with caplog.at_level(logging.ERROR):
        p.process(pv)
        p.process(good_frame(6, patches[1]))  # no attributes at all: the message of its own
    stats = p.getStats()
    assert stats["nFramesNoPosition"] == 2 and stats["nFramesPlaced"] == 0, stats
    assert _logged(caplog, "positionNotNumber").endswith(
        "frame 5 has no position (its attribute PosX is '12', not a number, not in the positions file)")
    assert _logged(caplog, "noPosition").endswith(
        "frame 6 has no position (no attributes PosY/PosX, not in the positions file)")


@pytest.mark.parametrize("source", ["attribute NaN", "attribute inf", "metadata NaN"])
def test_a_position_that_is_not_finite_is_no_position_not_outside(rng, caplog, source):
    """A NaN (or infinite) position was counted in nFramesOutside and logged as "frame 21 at
    (nan, 10.0) misses the object": it is no position, and the log says it is not finite."""
    import logging

    patches, positions, _ = small_scan(rng, n=2)
    bad = float("inf") if source == "attribute inf" else float("nan")
    if source == "metadata NaN":
        p = make({"objectShape": [40, 48], "positionChannels": ["y", "x"], "metadataMatch": "uniqueId"})
        p.metadataQueueMap = {"y": pva.PvObjectQueue(10), "x": pva.PvObjectQueue(10)}
        p.metadataQueueMap["y"].put(metadata_update(bad, unique_id=21))
        p.metadataQueueMap["x"].put(metadata_update(10.0, unique_id=21))
        frame = good_frame(21, patches[0])
    else:
        p = make({"objectShape": [40, 48]})
        frame = attributed_frame(21, patches[0], (bad, 10.0))
    with caplog.at_level(logging.ERROR):
        p.process(frame)
    p.process(attributed_frame(22, patches[1], positions[1]))  # a good frame still goes in
    stats = p.getStats()
    assert (stats["nFramesNoPosition"], stats["nFramesOutside"], stats["nFramesPlaced"]) == (1, 0, 1), stats
    assert _logged(caplog, "positionNotFinite").endswith(f"frame 21 has no position: ({bad}, 10.0) is not finite")


def test_frames_by_metadata_count_only_those_placed(rng):
    """nFramesByMetadata counts the frames placed by the metadata channels' positions; a frame
    whose metadata put it outside the object (or one of another patch size) was counted there
    too, as well as in nFramesOutside (nBadFrames)."""
    patches, positions, _ = small_scan(rng, n=4)
    p = make({"objectShape": [40, 48], "positionChannels": ["y", "x"], "metadataMatch": "uniqueId",
              "metadataWait": 60})
    q = p.metadataQueueMap = {"y": pva.PvObjectQueue(10), "x": pva.PvObjectQueue(10)}
    where = {1: positions[0], 2: (500.0, 1.0), 3: positions[2], 4: (-400.0, 0.0)}
    for uid in (1, 2):  # these come before their frames
        q["y"].put(metadata_update(where[uid][0], unique_id=uid))
        q["x"].put(metadata_update(where[uid][1], unique_id=uid))
    for uid in range(1, 5):  # 3 and 4 wait for theirs
        p.process(good_frame(uid, patches[uid - 1]))
    p.process(good_frame(5, np.zeros((8, 8), np.float32)))  # another patch size
    for uid in (3, 4, 5):
        q["y"].put(metadata_update(where.get(uid, (0.0, 0.0))[0], unique_id=uid))
        q["x"].put(metadata_update(where.get(uid, (0.0, 0.0))[1], unique_id=uid))
    p.stop()
    stats = p.getStats()
    assert stats["nFramesPlaced"] == 2 and stats["nFramesOutside"] == 2 and stats["nBadFrames"] == 1
    assert stats["nFramesByMetadata"] == 2 and stats["nFramesWaiting"] == 0


def test_a_text_table_may_name_its_columns_in_a_first_row(tmp_path, rng):
    """A table saved from a spreadsheet starts with its column names: it was refused as 'not a
    table of numbers'. The names now say which column is which, in any order and case."""
    _, positions, _ = small_scan(rng, n=4)
    (tmp_path / "xy.csv").write_text("x,y\n" + "\n".join(f"{x},{y}" for y, x in positions))
    (tmp_path / "ixy.csv").write_text("# exported\nX, UniqueId, Y\n"
                                      + "\n".join(f"{x}, {i + 5}, {y}" for i, (y, x) in enumerate(positions)))
    assert PositionTable.load(tmp_path / "xy.csv").positions[1] == tuple(positions[0])
    assert PositionTable.load(tmp_path / "ixy.csv").positions[5] == tuple(positions[0])
    (tmp_path / "bad.csv").write_text("row,col\n1,2\n")
    with pytest.raises(ValueError, match="a first row of column names must name the columns y and x"):
        PositionTable.load(tmp_path / "bad.csv")


def test_a_positions_file_that_cannot_be_read_is_refused_in_one_line(tmp_path):
    """A truncated or mistaken positionsFile raised zipfile.BadZipFile or UnicodeDecodeError
    (a traceback from launch --check, which reports ValueError and OSError in one line) or
    numpy's message without the file's name; an .npz whose object_phase is not an image was
    accepted, then every frame raised in process()."""
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "text.npy").write_text("1 2\n3 4\n")
    np.savez(tmp_path / "cube.npz", positions_px=np.zeros((3, 2)), object_phase=np.zeros((3, 40, 48)))
    for name in ("cut.npz", "binary.txt", "text.npy", "cube.npz"):
        with pytest.raises(ValueError, match=f"positionsFile {tmp_path / name}: ") as caught:
            PositionTable.load(tmp_path / name)
        assert type(caught.value) is ValueError
    with pytest.raises(ValueError, match="object_phase must be an"):
        make({"positionsFile": str(tmp_path / "cube.npz")})


def test_a_long_scan_keeps_only_the_ids_within_the_restart_window(rng):
    """A continuous stream (positions from attributes, uniqueIds never restarting) kept every
    placed uniqueId of the scan: memory grew without bound. Now only those within
    restartWindow of the highest are kept; scanFramesPlaced, placeRate and the published
    FramesPlaced still count every frame, and a repeated uniqueId within the window still
    starts a new scan (one further below does anyway)."""
    patches, positions, _ = small_scan(rng, n=10)
    window, n = 8, 600
    publisher = Publisher()
    p = make({"objectShape": [40, 48], "restartWindow": window}, publisher)
    for uid in range(1, n + 1):
        p.process(attributed_frame(uid, patches[uid % 10], positions[uid % 10]))
    assert len(p._received_ids) <= window + 1 and len(p._received_ids._heap) <= window + 1
    stats = p.getStats()
    assert stats["scanFramesPlaced"] == n and stats["nFramesPlaced"] == n and stats["nScans"] == 1
    scan = p.scan
    assert stats["placeRate"] == pytest.approx((n - 1) / (scan.last_placed_s - scan.first_placed_s))
    p.process(attributed_frame(n - 3, patches[0], positions[0]))  # placed, within the window: a new scan
    assert p.getStats()["nScans"] == 2 and p.getStats()["scanFramesPlaced"] == 1
    assert publisher.images[-1][2]["FramesPlaced"] == n and publisher.images[-1][2]["ScanIndex"] == 1
    for uid in range(n - 2, n + 20):
        p.process(attributed_frame(uid, patches[uid % 10], positions[uid % 10]))
    assert n + 1 not in p._received_ids
    p.process(attributed_frame(n + 1, patches[0], positions[0]))  # forgotten, but far below: a new scan too
    assert p.getStats()["nScans"] == 3 and publisher.images[-1][2]["FramesPlaced"] == 23


def test_a_reset_racing_a_frame_leaves_no_stale_count(rng):
    """process() added to counts["received"] without the lock under which resetStats() clears
    the counts: a reset between its read and its write was undone (the old total plus one)."""
    patches, positions, _ = small_scan(rng, n=6)
    p = make({"objectShape": [40, 48]})
    for uid in range(1, 6):
        p.process(attributed_frame(uid, patches[uid], positions[uid]))
    assert p.getStats()["nFramesReceived"] == 5

    class ResetWhileRead(dict):  # resetStats() on another thread right when process() reads the count
        armed = True

        def __getitem__(self, key):
            value = super().__getitem__(key)
            if key == "received" and self.armed:
                self.armed = False
                resetter.start()
                resetter.join(0.5)  # a reset that needs the lock process() holds cannot finish here
            return value

    resetter = threading.Thread(target=p.resetStats)
    p.counts = ResetWhileRead(p.counts)
    p.process(attributed_frame(6, patches[0], positions[0]))
    resetter.join(10)
    assert not resetter.is_alive()
    assert p.getStats()["nFramesReceived"] in (0, 1)  # reset after the frame, or before it: never 6


def test_a_new_publish_rate_applies_at_once(tmp_path, rng):
    """publishRate changed at run time took effect only after the old period had run out
    (the publishing thread slept for it): from 0.02 Hz to 20 Hz, the next image came up to
    50 s later. Now the thread wakes at the change."""
    patches, positions, probe = small_scan(rng, n=6)
    publisher = Publisher()
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, (40, 48))), "publishRate": 0.02},
             publisher)
    p.pvaServer = None
    p.start()
    try:
        for k in range(6):
            p.process(good_frame(k + 1, patches[k]))
        p.configure({"publishRate": 20})
        assert wait_until(lambda: publisher.images, 10), "no image 10 s after publishRate 20"
        assert publisher.images[-1][2]["FramesPlaced"] == 6
        p.process(good_frame(7, patches[0]))  # not in the file: changes nothing
        p.configure({"publishRate": 0.02})
        p.process(attributed_frame(8, patches[1], positions[1]))
        time.sleep(0.5)  # ten periods of the old rate: the slower one holds the next image back
        assert len(publisher.images) == 1
    finally:
        p.stop()


def test_two_configure_requests_at_once_keep_both_changes(rng, monkeypatch):
    """PvaPy runs each configure request on a timer thread of its own. Each made its new
    settings from those in force and then put them in force, without a lock: a request that
    put its own in force between the two was undone by the other (publishRate answered
    "Configuration successful" and stayed as it was)."""
    import processors.base as base

    p = make({"objectShape": [40, 48]})
    made, other_done = threading.Event(), threading.Event()
    runtime_changes = base.runtime_changes

    def held(settings, changes, *args):  # the publishRate request: its settings made, not yet in force
        new = runtime_changes(settings, changes, *args)
        if "publishRate" in changes:
            made.set()
            other_done.wait(0.5)
        return new

    monkeypatch.setattr(base, "runtime_changes", held)
    first = threading.Thread(target=p.configure, args=({"publishRate": 5},), daemon=True)
    first.start()
    assert made.wait(10)
    second = threading.Thread(target=p.configure, args=({"fill": 1.5},), daemon=True)
    second.start()
    second.join(5)
    other_done.set()
    first.join(5)
    assert not first.is_alive() and not second.is_alive()
    assert (p.settings.publish_rate_hz, p.settings.fill) == (5, 1.5)


def test_a_failed_new_scan_takes_back_its_own_changes_only(rng):
    """A newScan that fails takes back the other changes of its request; those of a request
    accepted while it ran (PvaPy's timer threads) stay: putting back all the settings of before
    it undid a publishRate answered "Configuration successful"."""
    p = make({"objectShape": [40, 48]})

    def failing_new_scan():
        raise RuntimeError("the disk is gone")

    failed = configure_while_new_scan_held(p, {"fill": 2.0, "newScan": True}, {"publishRate": 5}, failing_new_scan)
    assert failed
    assert (p.settings.fill, p.settings.publish_rate_hz) == (0.0, 5)


@pytest.mark.parametrize("reset_at", ["before placing", "after placing"])
def test_a_reset_between_a_frames_counts_keeps_them_consistent(rng, reset_at):
    """process() counted a frame received, then placed it, then added its time, each under
    the lock separately: a resetStats() in between left nFramesPlaced 1 with nFramesReceived
    0, or the frame's time in stitchTimeUs with no frame received to share it."""
    patches, positions, _ = small_scan(rng, n=3)
    p = make({"objectShape": [40, 48]})
    p.process(attributed_frame(1, patches[1], positions[1]))
    step = "_attribute_position" if reset_at == "before placing" else "_send_outputs"
    real = getattr(p, step)

    def reset_then(*args, **kwargs):  # resetStats() on the timer thread, right at this step
        p.resetStats()
        return real(*args, **kwargs)

    setattr(p, step, reset_then)
    p.process(attributed_frame(2, patches[2], positions[2]))
    st = p.getStats()
    if reset_at == "before placing":
        assert (st["nFramesReceived"], st["nFramesPlaced"]) == (1, 1) and st["stitchTimeUs"] > 0, st
    else:
        assert (st["nFramesReceived"], st["nFramesPlaced"], st["stitchTimeUs"]) == (0, 0, 0.0), st


def test_a_new_fill_is_published_without_waiting_for_a_frame(rng):
    """configure {"fill": NaN} changed the image but published nothing until the next frame
    came: at the end of a scan (or a stalled one) the live image kept the old fill."""
    patches, positions, _ = small_scan(rng, n=4)
    publisher = Publisher()
    p = make({"objectShape": [40, 48], "publishRate": 50}, publisher)
    p.pvaServer = None
    p.start()
    try:
        for uid in range(1, 4):
            p.process(attributed_frame(uid, patches[uid], positions[uid]))
        assert wait_until(lambda: publisher.images and publisher.images[-1][2]["FramesPlaced"] == 3, 10)
        assert not np.isnan(publisher.images[-1][1]).any()
        p.configure({"fill": float("nan")})
        assert wait_until(lambda: np.isnan(publisher.images[-1][1]).any(), 2), "the new fill was not published"
        uncovered = p.scan.stitcher.weight_sum() == 0
        image = publisher.images[-1][1]
        assert uncovered.any() and np.isnan(image[uncovered]).all() and not np.isnan(image[~uncovered]).any()
        n = len(publisher.images)
        p.configure({"fill": float("nan")})  # the same fill again: nothing new to show
        time.sleep(0.1)  # five periods
        assert len(publisher.images) == n
    finally:
        p.stop()


def test_a_restart_is_seen_at_an_id_the_last_scan_did_not_place(rng):
    """Restarts were detected by the uniqueIds placed: when the last scan's first frame had no
    position (metadata late, say), the restarted stream's frame 1 went into the last image."""
    patches, positions, _ = small_scan(rng, n=6)
    publisher = Publisher()
    p = make({"objectShape": [40, 48]}, publisher)
    p.process(good_frame(1, patches[0]))  # no position: counted, not placed
    for uid in range(2, 6):
        p.process(attributed_frame(uid, patches[uid], positions[uid]))
    for uid in range(1, 6):  # uniqueIds restart at 1
        p.process(attributed_frame(uid, -patches[uid], positions[uid]))
    p.finish_scan()
    assert [(a["ScanIndex"], a["FramesPlaced"], a["LastUniqueId"]) for _, _, a in publisher.images] == \
        [(1, 4, 5), (2, 5, 5)]
    st = p.getStats()
    assert (st["nFramesReceived"], st["nFramesPlaced"], st["nFramesNoPosition"]) == (10, 9, 1)


def test_a_run_time_change_is_not_refused_for_a_file_read_at_start(tmp_path):
    """configure {"fill": ...} re-ran the start checks: with the weight file (read at start)
    moved away since, every run-time change was refused ("weightFile ... is not a file")."""
    weight = tmp_path / "w.npy"
    np.save(weight, np.ones((PATCH, PATCH)))
    p = make({"objectShape": [40, 48], "weightFile": str(weight)})
    weight.unlink()
    p.configure({"fill": 1.0, "publishRate": 5})
    assert (p.settings.fill, p.settings.publish_rate_hz) == (1.0, 5.0)
    with pytest.raises(ValueError, match="weightFile .*w.npy' is not a file"):  # still checked at start
        make({"objectShape": [40, 48], "weightFile": str(weight)})


def test_a_scan_in_which_no_frame_was_placed_takes_no_index(tmp_path, rng):
    """A scan whose every frame missed the object (a wrong positionScale, say): no image. Before,
    it still took a scan index: nScans counted it and the next scan's file skipped a number
    (stitch_scan0002.npy with no stitch_scan0001.npy)."""
    patches, positions, _ = small_scan(rng, n=4)
    p = make({"objectShape": [40, 48], "outputDirectory": str(tmp_path / "out")})
    p.process(attributed_frame(1, patches[0], (500, 500)))  # outside the object: a scan of nothing
    p.configure({"newScan": True})
    assert p.getStats()["nScans"] == 0 and p.getStats()["nFramesOutside"] == 1
    for k in range(2):
        p.process(attributed_frame(k + 1, patches[k], positions[k]))
    p.configure({"newScan": True})
    st = p.getStats()
    assert (st["nScans"], st["nScansSaved"]) == (1, 1), st
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["stitch_scan0001.npy", "stitch_scan0001_weight.npy"]


def test_the_statistics_say_what_became_of_each_frame(rng):
    """nBadFrames mixed frames that could not be decoded (not received) with frames of another
    shape than their scan's (received, not placed): the frames received did not add up, and
    nothing told the two apart."""
    from frames_util import empty_frame

    patches, positions, _ = small_scan(rng, n=4)
    p = make({"objectShape": [40, 48]})
    p.process(attributed_frame(1, patches[1], positions[1]))  # placed
    p.process(attributed_frame(2, np.zeros((8, 8), np.float32), positions[2]))  # another shape mid-scan
    p.process(good_frame(3, patches[3]))  # no position
    p.process(attributed_frame(4, patches[0], (500, 500)))  # outside the object
    p.process(empty_frame(5, (16, 16)))  # cannot be decoded
    st = p.getStats()
    assert (st["nFramesReceived"], st["nFramesPlaced"], st["nFramesWrongShape"], st["nBadFrames"]) == (4, 1, 1, 2), st
    assert st["nFramesReceived"] == (st["nFramesPlaced"] + st["nFramesWaiting"] + st["nFramesNoPosition"]
                                     + st["nFramesOutside"] + st["nFramesWrongShape"]), st
    p.resetStats()
    assert p.getStats()["nFramesWrongShape"] == p.getStats()["nBadFrames"] == 0


def test_an_image_that_cannot_be_saved_is_counted_and_crashes_nothing(tmp_path, rng, monkeypatch):
    """A failed save was only logged (no statistic told it from a scan with nothing to save), and
    one that failed while choosing the name (the folder unreadable: a stat refused) escaped
    process() and stop() as a traceback."""
    import processors.stitch as stitch_module

    def unreadable(stem, endings):
        raise PermissionError(13, "Permission denied (simulated)", str(stem))

    patches, positions, _ = small_scan(rng, n=3)
    p = make({"objectShape": [40, 48], "outputDirectory": str(tmp_path / "out")}, Publisher())
    monkeypatch.setattr(stitch_module, "unused_stem", unreadable)
    p.process(attributed_frame(1, patches[1], positions[1]))
    p.process(attributed_frame(1, patches[2], positions[2]))  # a restart: process() saves scan 1
    p.stop()  # saves scan 2
    st = p.getStats()
    assert (st["nScans"], st["nScansSaved"], st["nSaveErrors"], p.problems("save")) == (2, 0, 2, 2), st


def test_a_long_file_prefix_is_saved_or_refused_at_start(tmp_path, rng):
    """A filePrefix whose names fit (245 bytes) lost every image (the hidden name it is written
    under passed 255 bytes); a longer one, whose names cannot fit, raised at every save."""
    patches, positions, _ = small_scan(rng, n=2)
    out = tmp_path / "out"
    p = make({"objectShape": [40, 48], "outputDirectory": str(out), "filePrefix": "p" * 225})
    p.process(attributed_frame(1, patches[1], positions[1]))
    p.stop()
    assert p.getStats()["nScansSaved"] == 1 and list(p.saved_files) == [out / ("p" * 225 + "_scan0001.npy")]
    assert sorted(f.name for f in out.iterdir()) == ["p" * 225 + "_scan0001.npy", "p" * 225 + "_scan0001_weight.npy"]
    with pytest.raises(ValueError, match=r"filePrefix is too long \(240 bytes; at most 233"):
        make({"objectShape": [40, 48], "outputDirectory": str(out), "filePrefix": "p" * 240})
    make({"objectShape": [40, 48], "filePrefix": "p" * 240})  # no files: no names to fit


def test_a_reset_keeps_the_frames_waiting_for_metadata_counted(rng):
    """resetStats() zeroed nFramesReceived while frames waited for their metadata: once placed,
    nFramesPlaced exceeded nFramesReceived."""
    patches, positions, _ = small_scan(rng, n=3)
    p = make({"objectShape": [40, 48], "positionChannels": ["y", "x"], "metadataMatch": "uniqueId",
              "metadataWait": 60})
    q = p.metadataQueueMap = {"y": pva.PvObjectQueue(10), "x": pva.PvObjectQueue(10)}
    for uid in (1, 2):
        p.process(good_frame(uid, patches[uid]))
    assert p.getStats()["nFramesWaiting"] == 2
    p.resetStats()
    for uid in (1, 2):
        q["y"].put(metadata_update(positions[uid][0], unique_id=uid))
        q["x"].put(metadata_update(positions[uid][1], unique_id=uid))
    p.stop()
    st = p.getStats()
    assert (st["nFramesReceived"], st["nFramesPlaced"], st["nFramesWaiting"]) == (2, 2, 0), st


def _three_frames_with_saves_held(tmp_path, rng, monkeypatch):
    """A stitcher that placed the first 3 of a small scan's 6 frames, its saves held
    (:func:`_held_saves`): ``(processor, the scan's patches, entered, release)``."""
    patches, positions, probe = small_scan(rng, n=6)
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, (40, 48))),
              "outputDirectory": str(tmp_path / "out")}, Publisher())
    entered, release = _held_saves(monkeypatch)
    for k in range(3):
        p.process(good_frame(k + 1, patches[k]))
    return p, patches, entered, release


def test_sigterm_drain_returns_within_its_timeout_while_a_save_hangs(tmp_path, rng, monkeypatch):
    """SIGTERM's drain (``on_sigterm``'s ``drain(timeout_s)``) returns False within its timeout
    while the disk holds a save, so that the framework is told to stop; the image is still
    saved once the disk answers, and stop() saves the rest after it."""
    p, patches, entered, release = _three_frames_with_saves_held(tmp_path, rng, monkeypatch)
    with p.lock:  # scan 1 finished: its image queued, to be sent and saved by the drain
        p._finish_locked(publish=True)
    answer = []
    drain = threading.Thread(target=lambda: answer.append(p._send_queued(0.2)), daemon=True)
    try:
        drain.start()
        drain.join(5)
        assert answer == [False], "the drain waited for the hung save"
        assert entered.is_set()
    finally:
        release.set()
    p.process(good_frame(1, patches[3]))  # scan 2
    p.stop()
    assert list(p.saved_files) == [tmp_path / "out" / "stitch_scan0001.npy", tmp_path / "out" / "stitch_scan0002.npy"]
    assert p.getStats()["nScansSaved"] == 2


def test_stop_returns_within_its_timeout_while_a_save_hangs(tmp_path, rng, monkeypatch, caplog):
    """stop() saves the finished image, but a disk that holds the save (or one of the drain's
    before it) does not hold the consumer's stop for ever: it returns after STOP_TIMEOUT_S with an
    error naming what is still unsaved, and the save goes on on its own thread once the disk
    answers. stop() waited for the save without a limit."""
    import processors.stitch as stitch_module

    monkeypatch.setattr(stitch_module, "STOP_TIMEOUT_S", 0.3)
    p, _, entered, release = _three_frames_with_saves_held(tmp_path, rng, monkeypatch)
    stopped = []
    stopper = threading.Thread(target=lambda: (p.stop(), stopped.append(True)), daemon=True)
    try:
        with caplog.at_level(logging.ERROR):
            stopper.start()
            stopper.join(5)
        assert stopped == [True], "stop() waited for the hung save"
        assert entered.is_set()
        assert any("not saved" in r.getMessage() and "scan 1" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        release.set()
    assert wait_until(lambda: p.saved_files, 10), "the save never ended after the disk answered"
    assert list(p.saved_files) == [tmp_path / "out" / "stitch_scan0001.npy"]


def test_undecodable_frames_are_counted_by_kind(rng):
    """Each kind of undecodable frame was logged once and then only counted in nBadFrames:
    the status said nothing of the kinds of the others. Now nBad<Kind>, as the inference
    consumer's status has them (a frame of another shape is nFramesWrongShape, not nBadShape)."""
    from frames_util import bool_frame, colour_frame

    p = make({"objectShape": [40, 48]})
    p.process(attributed_frame(1, np.ones((PATCH, PATCH), np.float32), (0, 0)))
    p.process(attributed_frame(2, np.ones((8, 8), np.float32), (0, 0)))  # another shape within the scan
    for uid in range(3, 5):
        p.process(colour_frame(uid))
    p.process(bool_frame(5))
    st = p.getStats()
    assert (st["nBadFrames"], st["nFramesWrongShape"], st["nBadColour"], st["nBadDtype"], st["nBadShape"]) == (4, 1, 2, 1, 0), st
    p.resetStats()
    assert p.getStats()["nBadColour"] == 0


def test_a_frame_handed_over_after_stop_is_counted_not_placed_in_an_image_never_saved(tmp_path, rng):
    """PvaPy's collector waits 5 s for its processing thread, then calls stop() while that thread
    may still hand over frames: they started a second image that no stop saved (a tester's SIGINT,
    1 of 14: nScans 2, nScansSaved 1, 8 frames counted placed in no file). Now they are counted in
    nFramesAfterStop, and the saved image is the one stop() finished."""
    patches, positions, _ = small_scan(rng, n=4)
    p = make({"objectShape": [40, 48], "outputDirectory": str(tmp_path)})
    for uid in (1, 2):
        p.process(attributed_frame(uid, patches[uid - 1], positions[uid - 1]))
    p.stop()
    for uid in (3, 4):
        p.process(attributed_frame(uid, patches[uid - 1], positions[uid - 1]))
    st = p.getStats()
    assert (st["nFramesReceived"], st["nFramesPlaced"], st["nFramesAfterStop"], st["nScans"], st["nScansSaved"]) \
        == (4, 2, 2, 1, 1), st
    assert sorted(f.name for f in tmp_path.glob("*.npy")) == ["stitch_scan0001.npy", "stitch_scan0001_weight.npy"]
    assert p.problems("afterStop") == 2


def test_status_says_the_settings_in_force(tmp_path):
    """The status had no word of publishRate or fill after a configure, though `edge-ptychonn
    configure` sends the user to the status channel for what is in force."""
    import json
    p = make({"objectShape": [64, 64], "publishRate": 2})
    assert json.loads(p.getStats()["settings"]) == {"publishRate": 2.0, "fill": 0.0}
    p.configure({"publishRate": 5, "fill": 1.5})
    assert json.loads(p.getStats()["settings"]) == {"publishRate": 5.0, "fill": 1.5}
    with pytest.raises(ValueError):
        p.configure({"publishRate": 0})
    assert json.loads(p.getStats()["settings"])["publishRate"] == 5.0
    assert "settings" in p.getStatsPvaTypes()
    # fill NaN ("no data" where no frame covers) is strict JSON (Python wrote a bare NaN, which
    # JavaScript's and jq's readers refuse), the text that configure takes for it
    p.configure({"fill": float("nan")})
    settings = json.loads(p.getStats()["settings"], parse_constant=lambda word: pytest.fail(f"not strict JSON: {word}"))
    assert settings == {"publishRate": 5.0, "fill": "NaN"}


def _collected_stitcher(rng, cache_size=32):
    """A StitchProcessor started by a real PvaPy DataCollector (two producers on channels nobody
    serves), as pvapy-hpc-collector starts it, with 3 frames placed."""
    from pvapy.hpc.dataCollector import DataCollector
    from pvapy.hpc.dataProcessingController import DataProcessingController

    patches, positions, _ = small_scan(rng, n=3)
    framework = {**FRAMEWORK, "outputChannel": ""}
    p = StitchProcessor({**framework, "objectShape": [40, 48]})
    collector = DataCollector(1, f"{PREFIX}:nobody:*:output", producerIdList=[1, 2], collectorCacheSize=cache_size,
                              processingController=DataProcessingController(framework, p))
    # no processing thread: the frames are handed over below (its stop would wait 5 s for it)
    collector.processingThread.start = collector.processingThread.join = lambda *args: None
    collector.start()
    for uid in (1, 2, 3):
        collector.processingController.process(attributed_frame(uid, patches[uid - 1], positions[uid - 1]))
    return collector, p


def test_a_refused_configure_leaves_the_collectors_cache_size(rng):
    """PvaPy's DataCollector takes collectorCacheSize from a configure request before the
    stitcher sees it: `edge-ptychonn configure stitch:1:control collectorCacheSize=100000` was
    refused ("cannot change collectorCacheSize at run time", exit 1, "nothing changed"), yet the
    collector's cache became 100000 and held every frame from the stitcher until the stream ended
    (the live image stopped). A refused request now leaves the cache as it was."""
    collector, p = _collected_stitcher(rng)
    try:
        for request in ({"collectorCacheSize": 100000}, {"collectorCacheSize": 100000, "publishRate": 5},
                        {"collectorCacheSize": 100000, "receiverQueueSize": 7, "fill": "x"}):
            with pytest.raises(ValueError):
                collector.configure(request)
            assert collector.collectorCacheSize == 32, request
            assert p.settings.publish_rate_hz == 2.0
        collector.configure({"publishRate": 5})  # an accepted request still goes through
        assert p.settings.publish_rate_hz == 5.0
    finally:
        collector.stop()


def test_reset_stats_through_the_collector_resets_the_stitchers_counts(rng):
    """PvaPy's DataCollector.resetStats() resets only its own counts: `reset_stats` on the
    stitcher's control channel answered "Stats reset successful" while its userStats (and PvaPy's
    processorStats) went on counting from the start."""
    collector, p = _collected_stitcher(rng)
    try:
        assert p.getStats()["nFramesPlaced"] == 3 and collector.processingController.nProcessed == 3
        collector.resetStats()
        st = p.getStats()
        assert (st["nFramesReceived"], st["nFramesPlaced"]) == (0, 0), st
        assert collector.processingController.nProcessed == 0
    finally:
        collector.stop()


def test_a_positions_file_of_the_other_numpy_kind_is_refused_naming_it(tmp_path):
    """Before: an .npy array under an .npz name stopped the stitcher with a TypeError traceback
    ("'numpy.ndarray' object does not support the context manager protocol"), naming no file."""
    with open(tmp_path / "pos.npz", "wb") as f:
        np.save(f, np.zeros((4, 2)))
    with open(tmp_path / "pos.npy", "wb") as f:
        np.savez(f, positions_px=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"pos\.npz: cannot read it \(a \.npy array, not an \.npz archive\)"):
        PositionTable.load(tmp_path / "pos.npz")
    with pytest.raises(ValueError, match=r"pos\.npy: cannot read it \(an \.npz archive, not a \.npy array\)"):
        PositionTable.load(tmp_path / "pos.npy")
