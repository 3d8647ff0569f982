import numpy as np
import pvaccess as pva
import pytest
from pvapy.utility import adImageUtility

from edge_ptychonn.stream.frames import CODEC_PACKAGES, BadFrame, FrameEncoder, decode
from frames_util import bool_frame, colour_frame, compressed_frame, empty_frame, good_frame


def test_decode_keeps_id_timestamps_and_attributes(rng):
    image = rng.integers(0, 1000, (32, 48), dtype=np.int16)
    meta, out = decode(good_frame(42, image, energy_kev=8.5))
    assert meta.unique_id == 42
    np.testing.assert_array_equal(out, image)
    assert [a["name"] for a in meta.attributes] == ["ColorMode", "EnergyKeV"]
    assert meta.time_stamp["secondsPastEpoch"] > 0


def test_decode_can_leave_the_attributes_unread(rng):
    """forwardAttributes false: the NDAttributes are not converted (the frame path's cost per
    attribute); the rest of the frame is as before, a 3-D colour frame is still refused, and a
    2-D frame is taken as mono whatever its ColorMode says (it is not read)."""
    image = rng.integers(0, 1000, (32, 48), dtype=np.int16)
    meta, out = decode(good_frame(42, image, energy_kev=8.5), read_attributes=False)
    assert (meta.unique_id, meta.attributes) == (42, []) and meta.time_stamp["secondsPastEpoch"] > 0
    np.testing.assert_array_equal(out, image)
    with pytest.raises(BadFrame) as info:
        decode(colour_frame(1), read_attributes=False)
    assert info.value.kind == "colour"
    bayer = good_frame(2, image)
    bayer["attribute"] = [pva.NtAttribute("ColorMode", pva.PvInt(1))]  # areaDetector's NDColorModeBayer
    with pytest.raises(BadFrame, match="colour"):
        decode(bayer)
    assert decode(bayer, read_attributes=False)[0].unique_id == 2


@pytest.mark.parametrize(
    "pv, kind",
    [
        (colour_frame(1), "colour"),
        (empty_frame(2), "empty"),
        (bool_frame(3), "dtype"),
    ],
    ids=["colour", "empty", "dtype"],
)
def test_bad_frames_raise_their_kind(pv, kind):
    with pytest.raises(BadFrame) as info:
        decode(pv)
    assert info.value.kind == kind


@pytest.mark.parametrize("codec", ["lz4", "blosc", "bslz4"])
def test_compressed_frames_decode_or_name_the_missing_package(codec, rng, monkeypatch):
    pytest.importorskip(CODEC_PACKAGES[codec])  # the codecs extra
    image = rng.integers(0, 1000, (16, 16), dtype=np.int16)
    pv = compressed_frame(5, codec, image)
    _, out = decode(pv)
    np.testing.assert_array_equal(out, image)
    # pvapy imports each codec's package when it loads and keeps it as a module global only where it
    # is installed: without the global, decoding is what it is on a host that lacks the package
    monkeypatch.delattr(adImageUtility, CODEC_PACKAGES[codec])
    with pytest.raises(BadFrame, match=f"^frame 5: .*install the '{CODEC_PACKAGES[codec]}' package") as info:
        decode(pv)
    assert info.value.kind == "codec"


@pytest.mark.parametrize("codec", ["lz4", "blosc"])
def test_corrupt_compressed_frames_are_bad_codec_frames_with_their_id(codec):
    pytest.importorskip(CODEC_PACKAGES[codec])
    pv = compressed_frame(7, codec, np.ones((8, 8), np.int16))
    field = pv.getSelectedUnionFieldName()
    payload = np.asarray(pv.getUnion()[field])
    pv["value"] = {field: np.full(payload.size, 7, payload.dtype)}  # each library raises its own error type
    with pytest.raises(BadFrame, match="cannot decode frame 7") as info:
        decode(pv)
    assert (info.value.kind, info.value.unique_id) == ("codec", 7)


BIGGER_THAN_IT_SAYS = """
import sys
import numpy as np, pvaccess as pva
from frames_util import compressed_frame
from edge_ptychonn.stream.frames import BadFrame, decode
pv = compressed_frame(5, sys.argv[1], np.arange(64 * 64, dtype=np.int16).reshape(64, 64))
pv["dimension"] = [pva.PvDimension(16, 0, 16, 1, False), pva.PvDimension(16, 0, 16, 1, False)]
if sys.argv[2] == "size":
    pv["uncompressedSize"] = 16 * 16 * 2  # agrees with the dimensions: only the payload is bigger
try:
    decode(pv)
except BadFrame as bad:
    print(bad.kind, bad.unique_id, bad)
"""


@pytest.mark.parametrize("codec", ["blosc", "lz4"])
@pytest.mark.parametrize("sizes", ["size", "dims"])
def test_a_compressed_frame_bigger_than_it_says_is_a_bad_frame_not_a_crash(codec, sizes):
    """A payload that holds more pixels than the frame's dimensions say: pvapy decompresses
    blosc into a buffer of the frame's size without a bound, which crashed the process
    (checked); it is a bad frame now, with its id. In a child process, so that a crash fails
    this test instead of ending the run."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip(CODEC_PACKAGES[codec])
    tests = Path(__file__).resolve().parent
    run = subprocess.run([sys.executable, "-c", BIGGER_THAN_IT_SAYS, codec, sizes], cwd=tests, capture_output=True,
                         text=True, timeout=60, env={**__import__("os").environ, "PYTHONPATH": str(tests.parent)})
    assert run.returncode == 0, run.stderr[-2000:]
    kind, uid = run.stdout.split()[:2]
    assert (kind, uid) == ("malformed" if sizes == "dims" else "codec", "5"), run.stdout


TRUNCATED_BSLZ4 = """
import numpy as np
from frames_util import compressed_frame
from edge_ptychonn.stream.frames import BadFrame, decode
image = np.random.default_rng(0).poisson(30, (128, 128)).astype(np.uint16)
pv = compressed_frame(9, "bslz4", image)
field = pv.getSelectedUnionFieldName()
payload = np.asarray(pv.getUnion()[field])
for cut in (payload.size // 2, payload.size - 1, 6, 2):
    pv["value"] = {field: payload[:cut]}
    try:
        decode(pv)
        print("decoded", cut)
    except BadFrame as bad:
        print(bad.kind, bad.unique_id, cut)
"""


def test_a_truncated_bslz4_frame_is_a_bad_frame_not_a_crash():
    """A bslz4 payload cut short (a frame truncated on its way, an IOC's buffer too small):
    bitshuffle reads each block where the previous block's header puts it, without a bound,
    and read past the payload's end, which crashed the consumer (a segmentation fault); it is
    a bad frame (codec) now, with its id. In a child process, so that a crash fails this test
    instead of ending the run."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip(CODEC_PACKAGES["bslz4"])
    tests = Path(__file__).resolve().parent
    run = subprocess.run([sys.executable, "-c", TRUNCATED_BSLZ4], cwd=tests, capture_output=True, text=True,
                         timeout=60, env={**__import__("os").environ, "PYTHONPATH": str(tests.parent)})
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert [line.split()[:2] for line in run.stdout.splitlines()] == [["codec", "9"]] * 4, run.stdout


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.float32, np.float64])
@pytest.mark.parametrize("hw", [(1, 1), (7, 9), (100, 101), (128, 128), (257, 263)])
def test_whole_bslz4_frames_of_any_size_decode(dtype, hw, rng):
    """The check of a bslz4 payload's blocks takes no whole frame for a truncated one: frames
    whose pixels fill no whole block, or leave elements after the last block, decode."""
    pytest.importorskip(CODEC_PACKAGES["bslz4"])
    image = rng.integers(0, 200, hw).astype(dtype)
    _, out = decode(compressed_frame(3, "bslz4", image))
    np.testing.assert_array_equal(out, image)


def test_negative_dimensions_are_a_malformed_frame():
    pv = good_frame(8, np.ones((8, 8), np.int16))
    pv["dimension"] = [pva.PvDimension(-8, 0, -8, 1, False), pva.PvDimension(-8, 0, -8, 1, False)]
    with pytest.raises(BadFrame, match="says it is -8x-8") as info:
        decode(pv)
    assert (info.value.kind, info.value.unique_id) == ("malformed", 8)


def _dimensions(pv: pva.PvObject, *sizes: int) -> pva.PvObject:
    pv["dimension"] = [pva.PvDimension(n, 0, n, 1, False) for n in sizes]
    return pv


@pytest.mark.parametrize("record, kind", [
    (lambda: colour_frame(13), "colour"),
    (lambda: empty_frame(13), "empty"),  # dimensions, no data
    (lambda: _dimensions(good_frame(13, np.ones((8, 8), np.int16))), "empty"),  # data, no dimensions
    (lambda: _dimensions(good_frame(13, np.ones((8, 8), np.int16)), 0, 8), "empty"),
    (lambda: _dimensions(good_frame(13, np.ones((8, 8), np.int16)), 64), "malformed"),
    (lambda: pva.PvObject({"uniqueId": pva.INT}, {"uniqueId": 13}), "malformed"),  # no dimension field
    (lambda: bool_frame(13), "dtype"),
    (lambda: compressed_frame(13, "zstd", np.ones((8, 8), np.int16)), "codec"),
], ids=["colour", "no-data", "no-dimensions", "0x8", "1-dimension", "no-dimension-field", "dtype", "codec"])
def test_every_bad_frame_message_names_the_frame(record, kind):
    """The consumer and the writers log only the first bad frame of each kind: its message
    must name the frame, so that it can be found in the raw file. The colour, dtype, codec
    and some empty and malformed messages did not."""
    with pytest.raises(BadFrame) as info:
        decode(record())
    assert (info.value.kind, info.value.unique_id) == (kind, 13)
    assert str(info.value).startswith("frame 13"), str(info.value)


def test_unknown_codec_is_refused(rng):
    pv = compressed_frame(6, "zstd", rng.integers(0, 10, (8, 8), dtype=np.int16))
    with pytest.raises(BadFrame, match="unsupported codec 'zstd'"):
        decode(pv)


def test_encode_round_trip(rng):
    meta, _ = decode(good_frame(9, rng.integers(0, 9, (8, 8), dtype=np.uint16), energy_kev=7.0))
    result = rng.standard_normal((8, 8)).astype(np.float32)
    pv = FrameEncoder().encode(meta, result)
    assert pv["uniqueId"] == 9
    assert pv.getSelectedUnionFieldName() == "floatValue"
    np.testing.assert_array_equal(np.asarray(pv["value"][0]["floatValue"]).reshape(8, 8), result)
    assert pv["timeStamp"] == meta.time_stamp and pv["dataTimeStamp"] == meta.data_time_stamp
    assert [a["name"] for a in pv["attribute"]] == ["ColorMode", "EnergyKeV"]
    meta2, _ = decode(pv)  # outputs are valid inputs for chained consumers
    assert meta2.unique_id == 9


def test_double_pixels_beyond_float32_are_nonfinite_frames():
    """A double frame's pixel beyond float32's range is finite in the frame but infinite in the
    model's float32 input: it was taken as a good frame (and its outputs blamed on the engine)."""
    image = np.full((8, 8), 10.0)
    image[2, 3] = -1e39
    with pytest.raises(BadFrame, match="1 pixel.* beyond float32's range") as info:
        decode(good_frame(11, image))
    assert (info.value.kind, info.value.unique_id) == ("nonfinite", 11)
    image[2, 3] = -3e38  # within float32's range: a good frame
    _, out = decode(good_frame(12, image))
    assert out.dtype == np.float64 and np.isfinite(out.astype(np.float32)).all()


def _record(unique_id_type, unique_id, image: np.ndarray) -> pva.PvObject:
    """An NTNDArray-like record: no attributes, time stamps or codec, ``uniqueId`` of the given type."""
    ny, nx = image.shape
    pv = pva.PvObject({"uniqueId": unique_id_type, "value": ({"shortValue": [pva.SHORT]},),
                       "dimension": [{"size": pva.INT, "offset": pva.INT, "fullSize": pva.INT,
                                      "binning": pva.INT, "reverse": pva.BOOLEAN}]})
    pv["uniqueId"] = unique_id
    pv["value"] = {"shortValue": image.ravel()}
    pv["dimension"] = [{"size": nx, "offset": 0, "fullSize": nx, "binning": 1, "reverse": False},
                       {"size": ny, "offset": 0, "fullSize": ny, "binning": 1, "reverse": False}]
    return pv


def test_fields_of_another_type_than_ntndarrays_are_read_or_refused(rng):
    """decode reads each field with PvaPy's typed getter; a field of another type is read the
    general way (a long uniqueId), or makes a malformed frame (a text uniqueId); missing
    optional fields take their defaults."""
    image = rng.integers(0, 1000, (6, 10), dtype=np.int16)
    meta, out = decode(_record(pva.LONG, 77, image))
    assert meta.unique_id == 77 and meta.attributes == [] and meta.time_stamp["secondsPastEpoch"] == 0
    np.testing.assert_array_equal(out, image)
    with pytest.raises(BadFrame) as info:
        decode(_record(pva.STRING, "seven", image))
    assert info.value.kind == "malformed" and "not an NTNDArray" in str(info.value)
    # an infinite double uniqueId: int() raised OverflowError, which left decode (and the
    # consumer's process()) as a traceback, the frame counted nowhere
    with pytest.raises(BadFrame) as info:
        decode(_record(pva.DOUBLE, float("inf"), image))
    assert info.value.kind == "malformed" and "not an NTNDArray" in str(info.value)


def _attributed(unique_id: int, energy_kev: float, units: bool) -> pva.PvObject:
    """A record whose attribute has a field that an NTNDArray's attributes lack (``units``) or not."""
    attribute = {"name": pva.STRING, "value": ({},), **({"units": pva.STRING} if units else {})}
    pv = pva.PvObject({"uniqueId": pva.INT, "value": ({"shortValue": [pva.SHORT]},),
                       "dimension": [{"size": pva.INT}], "attribute": [attribute]})
    pv["uniqueId"] = unique_id
    pv["value"] = {"shortValue": np.arange(16, dtype=np.int16)}
    pv["dimension"] = [{"size": 4}, {"size": 4}]
    pv["attribute"] = [{"name": "EnergyKeV", "value": pva.PvDouble(energy_kev), **({"units": "keV"} if units else {})}]
    return pv


def test_attributes_the_output_refuses_are_not_taken_as_set():
    """The encoder sets the attributes only when they change. When the output record refused
    a frame's attributes (a publish error), the encoder still took them as set, and the next
    frame with the same attributes was published with the frame before's (EnergyKeV 7, not 9)."""
    encoder = FrameEncoder()
    image = np.zeros((4, 4), np.float32)
    meta, _ = decode(_attributed(1, 7.0, units=False))
    assert encoder.encode(meta, image)["attribute"][1]["value"][0]["value"] == 7.0
    meta, _ = decode(_attributed(2, 9.0, units=True))
    for _ in range(2):  # every frame of these is refused, none goes out with stale attributes
        with pytest.raises(ValueError, match="cannot hold the input's attributes"):
            encoder.encode(meta, image)
    meta, _ = decode(_attributed(3, 11.0, units=False))
    assert encoder.encode(meta, image)["attribute"][1]["value"][0]["value"] == 11.0


def _stamped(unique_id_type, unique_id: int, time_stamp_type=None, time_stamp=None) -> pva.PvObject:
    """A 4x4 record with a ``uniqueId`` of the given type and, if given, a ``timeStamp`` of another structure."""
    fields = {"uniqueId": unique_id_type, "value": ({"shortValue": [pva.SHORT]},), "dimension": [{"size": pva.INT}]}
    if time_stamp_type is not None:
        fields["timeStamp"] = time_stamp_type
    pv = pva.PvObject(fields)
    pv["uniqueId"] = unique_id
    pv["value"] = {"shortValue": np.arange(16, dtype=np.int16)}
    pv["dimension"] = [{"size": 4}, {"size": 4}]
    if time_stamp is not None:
        pv["timeStamp"] = time_stamp
    return pv


@pytest.mark.parametrize("record, field", [
    (lambda: _stamped(pva.LONG, 2**31 + 5), "uniqueId"),
    (lambda: _stamped(pva.INT, 5, pva.DOUBLE, 1.5), "timeStamp"),
    (lambda: _stamped(pva.INT, 5, {"secondsPastEpoch": pva.LONG, "nanoseconds": pva.INT, "userTag": pva.INT,
                                   "extra": pva.STRING}, {"secondsPastEpoch": 5, "extra": "x"}), "timeStamp"),
])
def test_inputs_an_ntndarray_cannot_hold_are_refused_in_one_line_naming_the_field(record, field):
    """A long uniqueId beyond an int's range, a scalar timeStamp, a timeStamp with a field more: the
    output record cannot hold them. PvaPy's errors named no field, and a scalar timeStamp's spanned
    eleven lines (the consumer's log of the publish error with them)."""
    meta, _ = decode(record())
    with pytest.raises(ValueError, match=f"an NTNDArray cannot hold the input's {field} ") as info:
        FrameEncoder().encode(meta, np.zeros((4, 4), np.float32))
    assert "\n" not in str(info.value)


def test_time_stamp_fields_the_input_lacks_are_zero_not_the_frame_befores():
    """A time stamp structure without nanoseconds and userTag: the output kept the frame before's."""
    encoder = FrameEncoder()
    image = np.zeros((4, 4), np.float32)
    full = {"secondsPastEpoch": 100, "nanoseconds": 7, "userTag": 3}
    meta, _ = decode(_stamped(pva.INT, 1, {k: pva.LONG if k == "secondsPastEpoch" else pva.INT for k in full}, full))
    assert encoder.encode(meta, image)["timeStamp"] == full
    meta, _ = decode(_stamped(pva.INT, 2, {"secondsPastEpoch": pva.LONG}, {"secondsPastEpoch": 200}))
    assert encoder.encode(meta, image)["timeStamp"] == {"secondsPastEpoch": 200, "nanoseconds": 0, "userTag": 0}
