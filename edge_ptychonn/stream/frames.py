"""NTNDArray <-> numpy, keeping each frame's uniqueId, time stamps and attributes.

:func:`decode` turns one received NTNDArray into a :class:`FrameMeta` and a 2-D
numpy image (a view into the PvObject's buffer for uncompressed frames: copy it
out before ``process()`` returns). A frame that cannot be used raises
:class:`BadFrame` with one of :data:`BAD_FRAME_KINDS`, so callers can count and
report each kind. A record with no image at all (what a monitor receives when it
connects or when the upstream server restarts) raises :class:`NotAFrame`: it is
no frame, so it is neither processed nor counted as bad. Float frames with NaN
or infinite pixels are bad frames of their own kind (``nonfinite``): one such
pixel spreads through the network's convolutions over most of the output. So are
double frames with pixels beyond float32's range (|x| > 3.4e38), which would be
infinite in the model's float32 input; the pipeline counts as the same kind a
frame whose pixels binning, normalisation or scaling take beyond that range
(seen only once a batch is preprocessed: ``Batch.prepare``). A caller that runs no
model on the pixels (a recorder) passes ``finite=False`` and gets such frames as they are.

:class:`FrameEncoder` turns a float32 result image and the input's metadata into
an NTNDArray ready for ``updateOutputChannel``. It reuses one PvObject: the PVA
server copies it into the output record on each update. With a ``model_id`` it
adds a string attribute ``modelId`` naming the model that made the output
(an input attribute of that name is replaced). Input fields that an NTNDArray
cannot hold (a uniqueId beyond an int's range, a time stamp or attributes of
another structure) raise ValueError with a one-line reason.

Decompression (lz4, blosc, bslz4) and reshaping use pvapy's ``AdImageUtility``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pvaccess as pva
from pvapy.utility.adImageUtility import AdImageUtility

from .quote import one_line

BAD_FRAME_KINDS = ("empty", "colour", "dtype", "codec", "shape", "malformed", "nonfinite")

CODEC_PACKAGES = {"lz4": "lz4", "blosc": "blosc", "bslz4": "bitshuffle"}
# Union fields we can turn into float32 model input.
SUPPORTED_FIELDS = frozenset(
    AdImageUtility.NTNDA_DATA_FIELD_KEY_MAP.values()
)
_ZERO_TS = {"secondsPastEpoch": 0, "nanoseconds": 0, "userTag": 0}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class BadFrame(Exception):
    """A frame that cannot be processed; ``kind`` is one of BAD_FRAME_KINDS."""

    def __init__(self, kind: str, message: str, unique_id: int | None = None):
        assert kind in BAD_FRAME_KINDS, kind
        super().__init__(message)
        self.kind = kind
        self.unique_id = unique_id  # None when the record has no readable uniqueId


class NotAFrame(Exception):
    """A record without an image: the empty update a monitor gets on (re)connect."""


@dataclass(slots=True)
class FrameMeta:
    """What an output frame keeps of its input frame."""

    unique_id: int
    time_stamp: dict
    data_time_stamp: dict
    attributes: list
    received_s: float  # time.perf_counter() when process() got the frame


def _color_mode(attributes: list) -> int | None:
    for attribute in attributes:
        if attribute.get("name") == "ColorMode":
            try:
                return int(attribute["value"][0]["value"])
            except (KeyError, IndexError, TypeError, ValueError):
                return None
    return None


def decode(pv: pva.PvObject, received_s: float | None = None, finite: bool = True,
           read_attributes: bool = True) -> tuple[FrameMeta, np.ndarray]:
    """One NTNDArray -> (metadata, 2-D image). Raises BadFrame (with the frame's
    uniqueId where it has one, which its message then names) or NotAFrame.
    ``finite``: float pixels must be finite and within float32's range (a model's input),
    else ``BadFrame("nonfinite")``; False takes them as they are (a recorder).
    ``read_attributes``: False leaves the frame's NDAttributes unread (``meta.attributes``
    is empty): PvaPy converts each one into Python on every read, 5-7 us apiece on a
    2-core machine. A colour frame is then known by its 3 dimensions alone (a 2-D frame
    whose ColorMode says Bayer is taken as mono)."""
    received_s = time.perf_counter() if received_s is None else received_s
    try:
        unique_id = int(_typed(pv, "uniqueId", pv.getInt))
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError, pva.FieldNotFound) as exc:
        raise BadFrame("malformed", f"not an NTNDArray: {exc}") from exc  # OverflowError: an infinite double id
    try:
        return _decode(pv, unique_id, received_s, finite, read_attributes)
    except BadFrame as bad:
        bad.unique_id = unique_id
        raise
    except NotAFrame:
        raise
    except Exception as exc:  # whatever else a broken record makes pvapy or numpy raise
        raise BadFrame("malformed", f"cannot decode frame {unique_id}: {type(exc).__name__}: {exc}", unique_id) from exc


def _decode(pv: pva.PvObject, unique_id: int, received_s: float, finite: bool = True,
            read_attributes: bool = True) -> tuple[FrameMeta, np.ndarray]:
    # Each field is read once, through the getter of its type where it has one (a third to
    # a quarter of pv[name]'s cost): every read converts PVA data to Python objects, and
    # this runs for every frame on the receive thread.
    try:
        dims = _typed(pv, "dimension", pv.getStructureArray)
        field = pv.getSelectedUnionFieldName()
    except (KeyError, TypeError, pva.FieldNotFound) as exc:
        raise BadFrame("malformed", f"frame {unique_id} is not an NTNDArray: {exc}") from exc
    attributes = _field(pv, "attribute", [], pv.getStructureArray) if read_attributes else []
    time_stamp = _field(pv, "timeStamp", _ZERO_TS, pv.getStructure)
    data_time_stamp = _field(pv, "dataTimeStamp", _ZERO_TS, pv.getStructure)
    if len(dims) == 0 and not field:
        raise NotAFrame(f"record {unique_id} holds no image (a (re)connect update)")
    meta = FrameMeta(unique_id, time_stamp, data_time_stamp, attributes, received_s)
    color_mode = _color_mode(attributes)
    if len(dims) == 3 or color_mode not in (None, AdImageUtility.COLOR_MODE_MONO):
        raise BadFrame("colour", f"frame {unique_id} is a colour frame (ColorMode {color_mode}, {len(dims)} dimensions); "
                       "only mono frames are processed")
    if len(dims) != 2:
        raise BadFrame("empty" if len(dims) == 0 else "malformed", f"frame {unique_id} has {len(dims)} dimensions; need 2")
    if not field:
        raise BadFrame("empty", f"frame {unique_id} has no data")
    if field not in SUPPORTED_FIELDS:
        raise BadFrame("dtype", f"frame {unique_id}: unsupported pixel type {field!r}; "
                       f"supported: {', '.join(sorted(SUPPORTED_FIELDS))}")
    codec = _field(pv, "codec.name", "", pv.getString)
    if codec and codec not in CODEC_PACKAGES:
        raise BadFrame("codec", f"frame {unique_id}: unsupported codec {codec!r}; supported: {', '.join(CODEC_PACKAGES)}")
    nx, ny = dims[0]["size"], dims[1]["size"]
    if nx < 0 or ny < 0:
        raise BadFrame("malformed", f"frame {unique_id} says it is {nx}x{ny}")
    if nx * ny == 0:
        raise BadFrame("empty", f"frame {unique_id} is {nx}x{ny}")
    if codec:
        _check_compressed(pv, codec, field, nx, ny, unique_id)
        image = _decompressed(pv, codec, unique_id)
    else:
        image = pv.getUnion()[field]
        if image is None or image.size != nx * ny:
            size = 0 if image is None else image.size
            raise BadFrame("empty" if size == 0 else "malformed",
                           f"frame {unique_id} says {nx}x{ny} but holds {size} pixel(s)")
        image = image.reshape(ny, nx)
    if image is None or image.size == 0:
        raise BadFrame("empty", f"frame {unique_id} has no data")
    if not finite:
        return meta, image
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        n_bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        raise BadFrame("nonfinite", f"frame {unique_id} has {n_bad} NaN or infinite pixel(s)")
    if image.dtype.itemsize > 4 and image.dtype.kind == "f" and not np.abs(image).max() <= _FLOAT32_MAX:
        n_bad = int(np.count_nonzero(np.abs(image) > _FLOAT32_MAX))
        raise BadFrame("nonfinite", f"frame {unique_id} has {n_bad} pixel(s) beyond float32's range (|x| > "
                       f"{_FLOAT32_MAX:.3g}): infinite in the model's float32 input")
    return meta, image


def _typed(pv: pva.PvObject, name: str, getter):
    """``getter(name)`` (a typed getter of ``pv``: the cheap read), or ``pv[name]`` where
    the field is of another type than the getter's (a malformed record: the caller says so)."""
    try:
        return getter(name)
    except pva.InvalidRequest:
        return pv[name]


def _field(pv: pva.PvObject, name: str, default, getter):
    """``pv[name]`` read with ``getter`` (:func:`_typed`), or a copy of ``default`` where the
    record has no such field."""
    try:
        return _typed(pv, name, getter)
    except (KeyError, pva.FieldNotFound):
        return type(default)(default)


def _check_compressed(pv: pva.PvObject, codec: str, field: str, nx: int, ny: int, unique_id: int) -> None:
    """``BadFrame`` unless a compressed frame's sizes agree: its dimensions and uncompressed
    pixel type with its ``uncompressedSize`` ("malformed"), and for blosc those with the sizes
    in the payload's own header, for bslz4 the payload's length with its blocks' headers ("codec",
    as other undecodable payloads). A blosc payload that holds more than the frame says would be
    decompressed by pvapy into a buffer of the frame's size (``blosc.decompress_ptr``, which
    cannot check): past its end, which crashes the process; a bslz4 payload shorter than its
    blocks say is read past its end (:func:`_bslz4_bytes`), which crashes it too."""
    try:
        dtype = AdImageUtility.NUMPY_DATA_TYPE_MAP.get(pv["codec.parameters"][0]["value"])
        size = int(pv["uncompressedSize"])
    except Exception as exc:  # no such field, or no pixel type in the codec's parameters
        raise BadFrame("malformed", f"frame {unique_id}: {codec} frame without its uncompressed type or size ({exc})",
                       unique_id) from exc
    if dtype is None:
        raise BadFrame("malformed", f"frame {unique_id}: {codec} frame of an unknown uncompressed pixel type", unique_id)
    want = nx * ny * dtype.itemsize
    if size != want:
        raise BadFrame("malformed", f"frame {unique_id} says {nx}x{ny} {dtype} ({want} bytes) but uncompressedSize "
                       f"{size}", unique_id)
    if codec not in ("blosc", "bslz4"):
        return
    payload = np.ascontiguousarray(AdImageUtility.getCompressedPayload(pv.getUnion()[field])).view(np.uint8)
    if codec == "blosc":  # header: version, versionlz, flags, typesize, then nbytes, blocksize, cbytes (uint32 LE)
        nbytes = int.from_bytes(payload[4:8].tobytes(), "little") if payload.size >= 16 else -1
        cbytes = int.from_bytes(payload[12:16].tobytes(), "little") if payload.size >= 16 else -1
        if nbytes != size or not 16 <= cbytes <= payload.size:
            raise BadFrame("codec", f"cannot decode frame {unique_id}: its blosc payload of {payload.size} bytes says "
                           f"{nbytes} bytes uncompressed and {cbytes} compressed, the frame {size} and {payload.size}",
                           unique_id)
    else:
        need = _bslz4_bytes(payload, nx * ny, dtype.itemsize)
        if need > payload.size:
            raise BadFrame("codec", f"cannot decode frame {unique_id}: its bslz4 payload of {payload.size} bytes is "
                           f"truncated: its blocks need {need} bytes for {nx}x{ny} {dtype}", unique_id)


_BSHUF_BLOCKED_MULT = 8  # bitshuffle's block sizes are multiples of this many elements
_BSHUF_TARGET_BLOCK_BYTES = 8192  # its default block: this many bytes, at least 128 elements


def _bslz4_bytes(payload: np.ndarray, n_elements: int, item_size: int) -> int:
    """The bytes a bitshuffle-LZ4 payload (pvapy's ``bslz4``: blocks of a 4-byte big-endian
    compressed size and that many bytes, then the last ``n % 8`` elements as they are) needs
    for ``n_elements`` of ``item_size`` bytes, read from its block headers; more than
    ``payload.size`` when a header lies beyond its end or says more than is left.
    ``bitshuffle.decompress_lz4`` reads each block where its predecessor's header puts it,
    unchecked: a truncated payload made it read past the buffer's end, which crashed the
    process (a segmentation fault, checked)."""
    block = AdImageUtility.BSLZ4_BLOCK_SIZE or max(
        _BSHUF_TARGET_BLOCK_BYTES // item_size // _BSHUF_BLOCKED_MULT * _BSHUF_BLOCKED_MULT, 128)
    last = n_elements % block - n_elements % block % _BSHUF_BLOCKED_MULT
    n_blocks = n_elements // block + (last > 0)
    offset, end = 0, payload.size
    for _ in range(n_blocks):
        if offset + 4 > end:
            return offset + 4
        offset += 4 + int.from_bytes(payload[offset:offset + 4].tobytes(), "big")
        if offset > end:
            return offset
    return offset + n_elements % _BSHUF_BLOCKED_MULT * item_size


def _decompressed(pv: pva.PvObject, codec: str, unique_id: int) -> np.ndarray:
    """A compressed frame's pixels, decompressed by pvapy's utility (2-D)."""
    try:
        _, image, *_ = AdImageUtility.reshapeNtNdArray(pv)
    except pva.ConfigurationError as exc:
        raise BadFrame(
            "codec", f"frame {unique_id}: cannot decompress {codec!r} frames: install the "
                     f"{CODEC_PACKAGES.get(codec, codec)!r} package ({exc})"
        ) from exc
    except Exception as exc:  # corrupt data: each codec library raises its own error type
        raise BadFrame("codec", f"cannot decode frame {unique_id}: {type(exc).__name__}: {exc}") from exc
    return image


MODEL_ID_ATTRIBUTE = "modelId"


class FrameEncoder:
    """Builds output NTNDArrays (float32 mono images) from result images."""

    def __init__(self, model_id: str | None = None) -> None:
        self._pv = pva.NtNdArray()
        self._shape: tuple[int, int] | None = None
        self._color_mode = pva.NtAttribute("ColorMode", pva.PvInt(AdImageUtility.COLOR_MODE_MONO))
        self._attributes: list | None = None  # input attributes behind what the PvObject holds now
        self.model_id = model_id

    @property
    def model_id(self) -> str | None:
        """The ``modelId`` attribute's value (None: no such attribute); set it between
        frames, from the thread that encodes."""
        return self._model_id

    @model_id.setter
    def model_id(self, value: str | None) -> None:
        self._model_id = value
        self._model_attribute = None if value is None else pva.NtAttribute(MODEL_ID_ATTRIBUTE, pva.PvString(value))
        self._attributes = None  # the next frame sets its attributes

    def encode(self, meta: FrameMeta, image: np.ndarray) -> pva.PvObject:
        """The output NTNDArray for ``image`` (2-D float32), with ``meta``'s id,
        time stamps and attributes (a ColorMode attribute is added if missing, and
        the ``modelId`` attribute when the encoder has a model id; time stamp fields the input
        lacks are 0). ValueError, in one line naming the field, when an NTNDArray cannot hold
        the input's (a uniqueId beyond an int's range, a time stamp or attributes of another
        structure): that frame is not published."""
        pv = self._pv
        ny, nx = image.shape
        if self._shape != (ny, nx):
            self._shape = (ny, nx)
            pv["dimension"] = [pva.PvDimension(nx, 0, nx, 1, False), pva.PvDimension(ny, 0, ny, 1, False)]
            size = nx * ny * 4
            pv["compressedSize"] = size
            pv["uncompressedSize"] = size
        # the typed setters: a third to two thirds of pv[name] = value's cost
        name = "uniqueId"
        try:
            pv.setInt("uniqueId", meta.unique_id)  # an NTNDArray's is an int: a long one above 2**31 is refused
            name = "image"
            pv.setUnion("value", {"floatValue": np.ascontiguousarray(image, dtype=np.float32).ravel()})
            name = "timeStamp"
            pv.setStructure("timeStamp", _whole_time_stamp(meta.time_stamp))
            name = "dataTimeStamp"
            pv.setStructure("dataTimeStamp", _whole_time_stamp(meta.data_time_stamp))
            name = "attributes"
            attributes = meta.attributes
            if attributes != self._attributes:  # a stream's attributes rarely change: set only then
                given = attributes
                if _color_mode(attributes) is None:
                    attributes = [self._color_mode, *attributes]
                if self._model_attribute is not None:
                    attributes = [a for a in attributes if not _named(a, MODEL_ID_ATTRIBUTE)] + [self._model_attribute]
                self._attributes = None  # until they are set: attributes the record refused are not held
                pv["attribute"] = attributes
                self._attributes = given
        except Exception as exc:  # PvaPy's errors: some span many lines, none names the field
            raise ValueError(f"an NTNDArray cannot hold the input's {name} ({type(exc).__name__}: "
                             f"{one_line(exc, 160)})") from None
        return pv


def _whole_time_stamp(time_stamp):
    """``time_stamp`` with every field of a time stamp: a structure that lacks some
    (a record of another type) would leave the output with the previous frame's."""
    if isinstance(time_stamp, dict) and len(time_stamp) < len(_ZERO_TS):
        return {**_ZERO_TS, **time_stamp}
    return time_stamp


def _named(attribute, name: str) -> bool:
    """Whether an attribute (a received dict, or one of our NtAttributes) is called ``name``."""
    if isinstance(attribute, dict):
        return attribute.get("name") == name
    return attribute["name"] == name


def output_pv_type() -> pva.PvObject:
    """The output record's structure: an NTNDArray (its union holds float32)."""
    return pva.NtNdArray()
