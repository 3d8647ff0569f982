"""Real NTNDArrays for tests, good and bad, built with pvapy's own utilities."""

from __future__ import annotations

import numpy as np
import pvaccess as pva
from pvapy.utility.adImageUtility import AdImageUtility


def good_frame(unique_id: int, image: np.ndarray, energy_kev: float | None = None) -> pva.PvObject:
    pv = AdImageUtility.generateNtNdArray2D(unique_id, image)
    if energy_kev is not None:
        pv["attribute"] = [
            pva.NtAttribute("ColorMode", pva.PvInt(0)),
            pva.NtAttribute("EnergyKeV", pva.PvDouble(energy_kev)),
        ]
    return pv


def colour_frame(unique_id: int, hw=(64, 64)) -> pva.PvObject:
    return AdImageUtility.generateNtNdArray(unique_id, np.zeros((*hw, 3), np.uint8), colorMode=AdImageUtility.COLOR_MODE_RGB1)


def empty_frame(unique_id: int, hw=(64, 64)) -> pva.PvObject:
    """A frame that says it is ``hw`` but carries no pixels: a bad frame."""
    pv = pva.NtNdArray()
    pv["uniqueId"] = unique_id
    pv["dimension"] = [pva.PvDimension(hw[1], 0, hw[1], 1, False), pva.PvDimension(hw[0], 0, hw[0], 1, False)]
    return pv


def no_image_record(unique_id: int = 0) -> pva.PvObject:
    """What a monitor receives on (re)connect before any image: no frame at all."""
    pv = pva.NtNdArray()
    pv["uniqueId"] = unique_id
    return pv


def float_frame(unique_id: int, image: np.ndarray) -> pva.PvObject:
    return AdImageUtility.generateNtNdArray2D(unique_id, np.asarray(image, np.float32))


def bool_frame(unique_id: int, hw=(64, 64)) -> pva.PvObject:
    pv = AdImageUtility.generateNtNdArray2D(unique_id, np.zeros(hw, np.int16))
    pv["value"] = {"booleanValue": [True] * (hw[0] * hw[1])}
    return pv


def compressed_frame(unique_id: int, codec: str, image: np.ndarray) -> pva.PvObject:
    """``image`` compressed with ``codec`` if its package is importable, else a
    frame that only claims the codec (the decoder must refuse it either way)."""
    payload = image.tobytes()
    if codec == "lz4":
        try:
            import lz4.block

            payload = lz4.block.compress(payload, store_size=False)
        except ImportError:
            pass
    elif codec == "blosc":
        try:
            import blosc

            payload = blosc.compress(payload, typesize=image.itemsize)
        except ImportError:
            pass
    elif codec == "bslz4":
        try:
            import bitshuffle

            payload = bitshuffle.compress_lz4(image.ravel(), 0).tobytes()
        except ImportError:
            pass
    data = np.frombuffer(payload, dtype=np.uint8)
    ny, nx = image.shape
    return AdImageUtility.generateNtNdArray2D(unique_id, data, nx=nx, ny=ny, dtype=image.dtype, compressorName=codec)
