"""The stitching processor: positions by uniqueId (file, table, attributes), scans, publishing, stats.

In-process tests feed real NTNDArrays to ``process()``; the end-to-end tests run it
inside a real ``pvapy-hpc-collector`` behind real inference consumers.
"""

from __future__ import annotations

import numpy as np
import pvaccess as pva
import pytest

from edge_ptychonn.science.stitch import Stitcher, probe_weight
from frames_util import good_frame
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
    assert p.getStats().keys() == p.getStatsPvaTypes().keys() == STATS.keys()
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
    patches, positions, probe = small_scan(rng, n=10)
    publisher = Publisher()
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, (40, 48))), "publishRate": 20}, publisher)
    p.pvaServer = None
    p.start()
    try:
        for k in range(10):
            p.process(good_frame(k + 1, patches[k]))
        import time
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (publisher.images and publisher.images[-1][2]["FramesPlaced"] == 10):
            time.sleep(0.02)
        n = len(publisher.images)
        time.sleep(0.2)
        assert len(publisher.images) == n, "nothing changed, nothing published"
    finally:
        p.stop()
    uid, image, attrs = publisher.images[-1]
    assert image.dtype == np.float32 and image.shape == (40, 48) and attrs["FramesPlaced"] == 10
    assert [u for u, _, _ in publisher.images] == list(range(1, len(publisher.images) + 1))
    np.testing.assert_allclose(image, offline(patches, positions, (40, 48), probe_weight(probe)).image(), atol=1e-6)


def test_bad_frames_are_counted(tmp_path, rng):
    patches, positions, probe = small_scan(rng, n=4)
    p = make({"positionsFile": str(write_npz(tmp_path / "s.npz", positions, probe, (40, 48)))})
    p.process(good_frame(1, patches[0]))
    p.process(good_frame(2, np.zeros((8, 8), np.float32)))  # another patch size within a scan
    assert p.getStats()["nBadFrames"] == 1 and p.getStats()["nFramesPlaced"] == 1


# ---------------------------------------------------------------- end to end




@pytest.mark.e2e
def test_collector_merges_two_producers_positions_from_attributes_and_a_restart(pva_env, procs, tmp_path, rng):
    """Two output channels (served by this process, as two inference consumers would) ->
    the stitcher inside a real pvapy-hpc-collector: frames placed by their PosY/PosX
    attributes, the live channel's last image equals offline stitching, uniqueIds
    restarting give a second image, and the first is kept on ``:final`` and on disk."""
    import os

    from edge_ptychonn.tools.launch import Status, collector_argv
    from edge_ptychonn.tools.processes import OutputCollector, start, wait_until

    tag = f"st{os.getpid()}"
    patches, positions, _ = small_scan(rng, n=40, shape=(64, 64))
    server = pva.PvaServer()
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
        first = live.wait_count(10**6, timeout_s=3, idle_s=1.5) and live.received[live.channels[0]][-1]
        for k in range(8):  # scan 2: uniqueIds restart at 1
            publish(k + 1, patches[32 + k], positions[32 + k])
        assert placed(40), procs[0].log()[-3000:]
        stats = wait_until(lambda: (status.get(stitch_status) or {}).get("userStats", {}).get("nScans", 0) == 2 and status.get(stitch_status), 10)
        final = pva.Channel(f"{tag}:stitch:1:output:final").get("field()")
    finally:
        live.close()
    user = stats["userStats"]
    assert user["nFramesPlaced"] == 40 and user["nFramesNoPosition"] == 0 and user["scanFramesPlaced"] == 8
    assert stats["collectorStats"]["nRejected"] == 0
    expected = offline(patches[:32], positions[:32], (64, 64), None).image()
    # the live channel's last image of scan 1 is the offline stitching of its 32 frames
    attrs = {a["name"]: a["value"][0]["value"] for a in first.attributes}
    assert attrs["FramesPlaced"] == 32 and attrs["ScanIndex"] == 1
    np.testing.assert_allclose(first.image, expected, atol=1e-5)
    # scan 1's finished image: on the :final channel and on disk
    dims = final["dimension"]
    np.testing.assert_allclose(np.array(final["value"][0]["floatValue"]).reshape(dims[1]["size"], dims[0]["size"]), expected, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "stitch_scan0001.npy"), expected, atol=1e-5)
    procs.pop().stop(grace_s=15.0)  # at stop, scan 2 goes to disk
    np.testing.assert_allclose(np.load(tmp_path / "out" / "stitch_scan0002.npy"),
                               offline(patches[32:], positions[32:], (64, 64), None).image(), atol=1e-5)
