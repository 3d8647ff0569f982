"""The batcher's checks, unit-level (its batching runs in tests/test_pipeline.py)."""

import numpy as np
import pytest

from edge_ptychonn.stream.batching import Batcher
from edge_ptychonn.stream.frames import BadFrame, FrameMeta
from edge_ptychonn.stream.preprocess import PreprocessConfig


def test_a_frame_of_another_shape_is_named_in_its_message():
    """The consumer logs only the first bad frame of each kind: the shape message said what
    size the frame was, not which frame it was."""
    batcher = Batcher(2, (64, 64), PreprocessConfig(), n_buffers=2)
    for unique_id in (13, 15):  # 15: the shape's problem comes from the batcher's cache
        with pytest.raises(BadFrame) as info:
            batcher.add(FrameMeta(unique_id, {}, {}, [], 0.0), np.zeros((100, 128), np.float32))
        assert (info.value.kind, info.value.unique_id) == ("shape", unique_id)
        assert str(info.value).startswith(f"frame {unique_id}: a 100x128 frame does not become the model's 64x64 "
                                          "input with no crop and bin 1"), str(info.value)
    assert batcher.pending == 0
