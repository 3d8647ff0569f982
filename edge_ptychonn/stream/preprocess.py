"""Raw detector frame -> model input, vectorised, written in place.

The steps, in order, each optional:

1. ``crop``: a window of ``crop_hw`` pixels, centred unless ``crop_origin_yx`` is
   given (e.g. 516x516 -> 512x512);
2. ``bin``: sum of ``bin_factor`` x ``bin_factor`` pixel blocks (photon counts add
   up; e.g. 512 -> 128 with a factor of 4);
3. ``transform``: ``"none"``, ``"sqrt"`` or ``"log1p"`` of the counts (negative
   values, from detector offsets, are clipped to 0 first);
4. affine: ``(x - offset) * scale``, float32.

With the defaults a frame that already has the model's input size is only cast
to float32. Training applies the same function to simulated frames, so the
model and the live pipeline see identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quote import short_repr

TRANSFORMS = ("none", "sqrt", "log1p")
MAX_OFFSET = 1e9  # beyond any detector's counts
MAX_SCALE = 1e6


@dataclass(frozen=True)
class PreprocessConfig:
    crop_hw: tuple[int, int] | None = None
    crop_origin_yx: tuple[int, int] | None = None
    bin_factor: int = 1
    transform: str = "none"
    offset: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.crop_hw is not None and (len(self.crop_hw) != 2 or min(self.crop_hw) < 1):
            raise ValueError(f"crop must be [height, width] of positive ints, got {self.crop_hw}")
        if self.crop_origin_yx is not None:
            if self.crop_hw is None:
                raise ValueError("cropOrigin needs crop")
            if len(self.crop_origin_yx) != 2 or min(self.crop_origin_yx) < 0:
                raise ValueError(f"cropOrigin must be [y0, x0] >= 0, got {self.crop_origin_yx}")
        if not 1 <= self.bin_factor <= 64:
            raise ValueError(f"bin must be 1..64, got {self.bin_factor}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {short_repr(self.transform)}")
        if not (np.isfinite(self.offset) and abs(self.offset) <= MAX_OFFSET):
            raise ValueError(f"offset must be a number within +-{MAX_OFFSET:g}, got {self.offset}")
        if not (np.isfinite(self.scale) and 0 < self.scale <= MAX_SCALE):
            raise ValueError(f"scale must be > 0 and <= {MAX_SCALE:g} (model input = (x - offset) * scale), got {self.scale}")

    def output_shape(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """The model-input shape that a frame of ``frame_hw`` becomes.

        Raises ``ValueError`` when the crop does not fit or the bin factor does
        not divide the cropped size.
        """
        h, w = frame_hw
        if self.crop_hw is not None:
            ch, cw = self.crop_hw
            y0, x0 = self.crop_origin(frame_hw)
            if ch > h or cw > w or y0 + ch > h or x0 + cw > w:
                raise ValueError(f"crop {ch}x{cw} at ({y0}, {x0}) does not fit a {h}x{w} frame")
            h, w = ch, cw
        b = self.bin_factor
        if h % b or w % b:
            raise ValueError(f"bin {b} does not divide the {h}x{w} (cropped) frame")
        return h // b, w // b

    def crop_origin(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        if self.crop_hw is None:
            return 0, 0
        if self.crop_origin_yx is not None:
            return self.crop_origin_yx
        return (frame_hw[0] - self.crop_hw[0]) // 2, (frame_hw[1] - self.crop_hw[1]) // 2


def load_into(frame: np.ndarray, out: np.ndarray, config: PreprocessConfig) -> None:
    """Steps 1-2 (crop, bin) of one 2-D ``frame``, cast into the float32 array ``out``.

    ``out`` must have the shape ``config.output_shape(frame.shape)``; the caller
    checks the frame shape once per shape, not per frame. This is the per-frame
    part, done on receive; :func:`transform_batch` finishes a whole batch at once.
    """
    if config.crop_hw is not None:
        y0, x0 = config.crop_origin(frame.shape)
        frame = frame[y0 : y0 + config.crop_hw[0], x0 : x0 + config.crop_hw[1]]
    b = config.bin_factor
    if b > 1:
        h, w = frame.shape
        np.sum(frame.reshape(h // b, b, w // b, b), axis=(1, 3), dtype=np.float32, out=out)
    else:
        out[...] = frame


def transform_batch(x: np.ndarray, config: PreprocessConfig) -> None:
    """Steps 3-4 (transform, affine) in place on loaded frames ``x`` (any shape, float32):
    vectorised over a whole batch, a few array passes in all."""
    if config.transform != "none":
        np.maximum(x, 0, out=x)
        if config.transform == "sqrt":
            np.sqrt(x, out=x)
        else:
            np.log1p(x, out=x)
    if config.offset != 0.0:
        x -= np.float32(config.offset)
    if config.scale != 1.0:
        x *= np.float32(config.scale)


def preprocess_into(frame: np.ndarray, out: np.ndarray, config: PreprocessConfig) -> None:
    """Preprocess one 2-D ``frame`` into the float32 array ``out`` (model size)."""
    load_into(frame, out, config)
    transform_batch(out, config)


def preprocess(frames: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Preprocess a stack ``(N, H, W)`` (or one ``(H, W)`` frame) into float32."""
    single = frames.ndim == 2
    stack = frames[None] if single else frames
    out = np.empty((len(stack), *config.output_shape(stack.shape[1:])), dtype=np.float32)
    for frame, slot in zip(stack, out):
        load_into(frame, slot, config)
    transform_batch(out, config)
    return out[0] if single else out
