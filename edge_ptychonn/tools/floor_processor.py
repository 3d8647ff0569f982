"""The floor of a processor that republishes a model's images: PvaPy's calls alone (bench part ``floor``).

:class:`FloorProcessor` runs in ``pvapy-hpc-consumer`` as PtychoNN's processor does, and
for each frame makes only the calls that any processor publishing a float32 image per
input frame must make: read the frame's uniqueId, time stamp and pixels; set them, the
pixels as float32 zeros of the same size, in one reused output NTNDArray; publish it.
No batching, preprocessing, model, accounting or checks. Its highest lossless rate
against PvaPy's passthrough (which republishes the record it received, half the bytes of
a float32 image for int16 frames) says how close to the transport any Python processor
of model outputs can come on this machine; the zero-cost engine's rate against it says
what PtychoNN's own frame path costs above that floor. Its work for a frame is
:class:`FloorImages`, which the bench's ``framepath`` part also times in one process. Not for
use at a beamline: its images are zeros.
"""

from __future__ import annotations

import numpy as np
import pvaccess as pva
from pvapy.hpc.userDataProcessor import UserDataProcessor


class FloorImages:
    """The floor's work for one frame: the output NTNDArray to publish for it."""

    def __init__(self) -> None:
        self._out = pva.NtNdArray()
        self._image = np.zeros(0, np.float32)

    def output(self, frame: pva.PvObject) -> pva.PvObject | None:
        """One reused NTNDArray with ``frame``'s uniqueId and time stamp and a float32 image of
        zeros of its size; None for a record without an image (a monitor's (re)connect update)."""
        field = frame.getSelectedUnionFieldName()
        if not field:
            return None
        pixels = frame.getUnion()[field]
        out = self._out
        if pixels.size != self._image.size:  # a new frame size: read its dimensions once
            self._image = np.zeros(pixels.size, np.float32)
            out["dimension"] = [pva.PvDimension(d["size"], 0, d["size"], 1, False)
                                for d in frame.getStructureArray("dimension")]
        out.setInt("uniqueId", frame.getInt("uniqueId"))
        out.setStructure("timeStamp", frame.getStructure("timeStamp"))
        out.setUnion("value", {"floatValue": self._image})
        return out


class FloorProcessor(UserDataProcessor):
    """Publishes a float32 image of zeros with each frame's uniqueId and time stamp."""

    def __init__(self, configDict: dict | None = None):
        UserDataProcessor.__init__(self, configDict or {})
        self._images = FloorImages()

    def process(self, pvObject):
        out = self._images.output(pvObject)
        if out is not None:
            self.updateOutputChannel(out)
        return pvObject

    def getOutputPvObjectType(self, pvObject):
        return pva.NtNdArray()
