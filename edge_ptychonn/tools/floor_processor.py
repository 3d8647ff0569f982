"""The floor of a processor that republishes a model's images: PvaPy's calls alone (bench part ``floor``).

:class:`FloorProcessor` runs in ``pvapy-hpc-consumer`` as PtychoNN's processor does, and
for each frame makes only the calls that any processor publishing a float32 image per
input frame must make: read the frame's uniqueId, time stamp and pixels; set them, the
pixels as float32 zeros of the same size, in one reused output NTNDArray; publish it.
No batching, preprocessing, model, accounting or checks. Its highest lossless rate
against PvaPy's passthrough (which republishes the record it received, half the bytes of
a float32 image for int16 frames) says how close to the transport any Python processor
of model outputs can come on this machine; the zero-cost engine's rate against it says
what PtychoNN's own frame path costs above that floor. The bench's ``framepath`` part
times its ``process()`` in one process too. Not for use at a beamline: its images are zeros.
"""

from __future__ import annotations

import numpy as np
import pvaccess as pva
from pvapy.hpc.userDataProcessor import UserDataProcessor


class FloorProcessor(UserDataProcessor):
    """Publishes a float32 image of zeros with each frame's uniqueId and time stamp."""

    def __init__(self, configDict: dict | None = None):
        UserDataProcessor.__init__(self, configDict or {})
        self._out = pva.NtNdArray()
        self._image = np.zeros(0, np.float32)

    def process(self, pvObject):
        field = pvObject.getSelectedUnionFieldName()
        if not field:  # the record a monitor gets on (re)connect: no frame
            return pvObject
        pixels = pvObject.getUnion()[field]
        out = self._out
        if pixels.size != self._image.size:  # a new frame size: read its dimensions once
            self._image = np.zeros(pixels.size, np.float32)
            out["dimension"] = [pva.PvDimension(d["size"], 0, d["size"], 1, False)
                                for d in pvObject.getStructureArray("dimension")]
        out.setInt("uniqueId", pvObject.getInt("uniqueId"))
        out.setStructure("timeStamp", pvObject.getStructure("timeStamp"))
        out.setUnion("value", {"floatValue": self._image})
        self.updateOutputChannel(out)
        return pvObject

    def getOutputPvObjectType(self, pvObject):
        return pva.NtNdArray()
