"""Raw detector frame -> model input, vectorised, written in place.

The steps, in order, each optional:

1. ``crop``: a window of ``crop_hw`` pixels, centred unless ``crop_origin_yx`` is
   given (e.g. 516x516 -> 512x512);
2. ``bin``: sum of ``bin_factor`` x ``bin_factor`` pixel blocks (photon counts add
   up; e.g. 512 -> 128 with a factor of 4);
3. ``normalize``: makes the input independent of the dose (exposure time,
   beam current): a frame with a tenth of the photons enters the network at the
   level it was trained at, only noisier. ``reference_total`` is the mean total
   counts of the frames the model was trained at (the model card's
   ``preprocess`` block).

   - ``"running"``: each frame is scaled by ``reference_total`` over the mean
     total of the last ``normalize_window`` frames (default 1024; this one
     included; a :class:`RunningTotal` that the caller keeps: the live batcher
     one per consumer, started again when ``normalize`` or the window changes;
     ``preprocess`` one per call unless given). Differences between frames
     stay: the total of a frame tells how much the object under the probe
     absorbs, which the network uses for the patch's absolute phase. Totals
     more than twice or less than half the window's median are left out of the
     mean, so that an outlying frame (saturated, a readout glitch, the beam off
     for a while) spoils only itself. A new dose is followed once it holds half
     the window;
   - ``"total"``: each frame is scaled so that its own total is
     ``reference_total``. Stateless, but it removes that absorption cue: the
     stitched phase of a held-out scan lost 0.07 SSIM (0.713 -> 0.640) with the
     earlier shipped model, against 0.007 with ``"running"``;
   - ``"none"``: the counts as they come.

   Frames whose total is not positive are left as they are (and not counted in
   the running mean; nor is an infinite total). One sum and one multiply per
   frame (about 8 us per 128x128 frame on a 2-core machine);
4. ``transform``: ``"none"``, ``"sqrt"`` or ``"log1p"`` of the counts (negative
   values, from detector offsets, are clipped to 0 first);
5. affine: ``(x - offset) * scale``, float32.

With the defaults a frame that already has the model's input size is only cast
to float32. Training, ``evaluate`` and the live pipeline apply the same
function, so the model sees identical inputs everywhere. :func:`preprocess`
runs steps 3-5 on the whole stack at once.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from .quote import short_repr

TRANSFORMS = ("none", "sqrt", "log1p")
NORMALIZATIONS = ("none", "running", "total")
MAX_NORMALIZE_WINDOW = 100_000
MAX_REFERENCE_TOTAL = 1e15
MAX_OFFSET = 1e9  # beyond any detector's counts
MAX_SCALE = 1e6
MIN_SCALE = 1e-12  # far below any useful scale, far above float32's smallest: a smaller one is 0 in float32


@dataclass(frozen=True)
class PreprocessConfig:
    crop_hw: tuple[int, int] | None = None
    crop_origin_yx: tuple[int, int] | None = None
    bin_factor: int = 1
    transform: str = "none"
    offset: float = 0.0
    scale: float = 1.0
    normalize: str = "none"
    reference_total: float | None = None
    normalize_window: int = 1024

    def __post_init__(self) -> None:
        if self.crop_hw is not None and (len(self.crop_hw) != 2 or min(self.crop_hw) < 1):
            raise ValueError(f"crop must be [height, width] of positive ints, got {self.crop_hw}")
        if self.crop_origin_yx is not None:
            if self.crop_hw is None:
                raise ValueError("cropOrigin needs crop")
            if len(self.crop_origin_yx) != 2 or min(self.crop_origin_yx) < 0:
                raise ValueError(f"cropOrigin must be [y0, x0] >= 0, got {self.crop_origin_yx}")
        if isinstance(self.bin_factor, bool) or not isinstance(self.bin_factor, (int, np.integer)) \
                or not 1 <= self.bin_factor <= 64:
            raise ValueError(f"bin must be an integer 1..64, got {short_repr(self.bin_factor)}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {short_repr(self.transform)}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {short_repr(self.normalize)}")
        if self.reference_total is not None and (
            isinstance(self.reference_total, bool) or not isinstance(self.reference_total, (int, float))
            or not (np.isfinite(self.reference_total) and 0 < self.reference_total <= MAX_REFERENCE_TOTAL)
        ):
            raise ValueError(f"referenceTotal must be > 0 and <= {MAX_REFERENCE_TOTAL:g} counts, got {short_repr(self.reference_total)}")
        if self.normalize != "none" and self.reference_total is None:
            raise ValueError(f"normalize {short_repr(self.normalize)} needs referenceTotal (the counts per frame the "
                             "model was trained at: the model card's preprocess.reference_total, or the processor "
                             "argument, given at start-up; it does not change at run time)")
        if isinstance(self.normalize_window, bool) or not isinstance(self.normalize_window, int) \
                or not 1 <= self.normalize_window <= MAX_NORMALIZE_WINDOW:
            raise ValueError(f"normalizeWindow must be an integer 1..{MAX_NORMALIZE_WINDOW}, got "
                             f"{short_repr(self.normalize_window)}")
        if not (np.isfinite(self.offset) and abs(self.offset) <= MAX_OFFSET):
            raise ValueError(f"offset must be a number within +-{MAX_OFFSET:g}, got {self.offset}")
        if not (np.isfinite(self.scale) and MIN_SCALE <= self.scale <= MAX_SCALE):
            raise ValueError(f"scale must be > 0, within {MIN_SCALE:g}..{MAX_SCALE:g} (model input = (x - offset) * "
                             f"scale), got {self.scale}")

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


class RunningTotal:
    """The reference total of the last ``window`` frames (``normalize: "running"``): the mean
    of their totals, leaving out those more than :data:`OUTLIER_FACTOR` times above or below
    the window's median total.

    A plain mean of the window let one saturated frame (a total 500 times the others) scale
    the next 1024 frames down by about half (the stitched phase of a 64-frame scan with its
    fifth frame saturated: SSIM 0.865 -> 0.450), and 300 frames with the beam off put the
    frames after it 0.5 rad off. Such a frame now spoils only itself. Totals vary by a few
    per cent with the object's absorption, so over a scan this is the mean (a median instead
    cost a held-out scan 0.014 SSIM: it wanders more over the first frames). A new dose is
    followed once it holds half the window. About 2 us per frame (a sorted list of the
    window's totals)."""

    def __init__(self, window: int = 1024):
        self.window = int(window)
        self._ring = [0.0] * self.window  # the window's totals, in arrival order
        self._sorted: list[float] = []  # the same, sorted
        self._sum = 0.0  # of the window's totals
        self._next = 0

    def add(self, total: float) -> float:
        """Count a frame's ``total`` (if positive and finite: an infinite total comes from
        float pixels whose binned sum overflows float32); return the reference total of the
        window (0 while empty)."""
        if 0 < total < math.inf:
            total = float(total)
            if len(self._sorted) == self.window:
                old = self._ring[self._next]
                del self._sorted[bisect.bisect_left(self._sorted, old)]
                self._sum -= old
            self._ring[self._next] = total
            bisect.insort(self._sorted, total)
            self._sum += total
            self._next = (self._next + 1) % self.window
            if self._next == 0:  # once per window: no drift from the running sum
                self._sum = math.fsum(self._sorted)
        return self.reference()

    def reference(self) -> float:
        """The mean of the window's totals within :data:`OUTLIER_FACTOR` of their median (0 while empty)."""
        totals, n = self._sorted, len(self._sorted)
        if n == 0:
            return 0.0
        lo, hi = _kept(totals)
        if lo == 0 and hi == n:
            return self._sum / n
        # the outliers are few: their sums are cheap
        return (self._sum - math.fsum(totals[:lo]) - math.fsum(totals[hi:])) / (hi - lo)


OUTLIER_FACTOR = 2.0  # a frame total beyond this factor of the window's median is left out of its reference


def _kept(totals) -> tuple[int, int]:
    """``[lo, hi)``: the totals (sorted, not empty) within :data:`OUTLIER_FACTOR` of their median."""
    n = len(totals)
    median = totals[n // 2] if n % 2 else 0.5 * (totals[n // 2 - 1] + totals[n // 2])
    return bisect.bisect_left(totals, median / OUTLIER_FACTOR), bisect.bisect_right(totals, median * OUTLIER_FACTOR)


def reference_of(totals: np.ndarray) -> float:
    """What :class:`RunningTotal` settles to over ``totals`` (positive, finite: the frames it
    counts) once its window holds them all: their mean, outliers left out (0 for none). Training
    scales each scan's frames by it (``train.scan_factors``)."""
    ordered = np.sort(np.asarray(totals, np.float64))
    if ordered.size == 0:
        return 0.0
    lo, hi = _kept(ordered)
    return float(ordered[lo:hi].mean())


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


def _normalization_factors(x: np.ndarray, config: PreprocessConfig, running: RunningTotal | None):
    """Per-frame factors (shape (N, 1, ..., 1)) of step 3 for loaded frames ``x``, or None."""
    if config.normalize == "none":
        return None
    stack = x[None] if x.ndim == 2 else x
    flat = stack.reshape(len(stack), -1)
    # float32 pairwise summation (relative error ~1e-7 here) at half the cost of a float64
    # one; a total beyond float32's range (huge float pixels) is summed again in float64
    with np.errstate(over="ignore"):
        totals = flat.sum(axis=1).astype(np.float64)
    if not np.isfinite(totals).all():
        totals = flat.sum(axis=1, dtype=np.float64)
    if config.normalize == "running":
        if running is None:
            raise ValueError("normalize 'running' needs the caller's RunningTotal")
        means = np.array([running.add(float(t)) for t in totals])  # in frame order
        factors = np.where((totals > 0) & (means > 0), config.reference_total / np.where(means > 0, means, 1.0), 1.0)
    else:  # "total"
        factors = np.where(totals > 0, config.reference_total / np.where(totals > 0, totals, 1.0), 1.0)
    return factors.astype(np.float32).reshape((len(stack),) + (1,) * (stack.ndim - 1))


def transform_batch(x: np.ndarray, config: PreprocessConfig, running: RunningTotal | None = None) -> None:
    """Steps 3-5 (normalize, transform, affine) in place on loaded frames ``x`` (one
    (h, w) frame, or a stack with the frame axis first), vectorised over the stack.

    ``running``: the caller's :class:`RunningTotal`, needed with ``normalize:
    "running"`` (frames are counted in order). With ``sqrt`` the normalisation
    factor f is applied after the root as sqrt(f), folded into the scale: one
    array pass less."""
    factors = _normalization_factors(x, config, running)
    view = x[None] if x.ndim == 2 else x
    post = None  # per-frame factor applied after the transform
    if factors is not None:
        if config.transform == "sqrt":
            post = np.sqrt(factors)
        elif config.transform == "none":
            post = factors
        else:
            view *= factors
    if config.transform != "none":
        # a cheap test; counts are rarely negative, and the clip costs 8x more. "not >= 0": a
        # NaN (from a block of huge float pixels whose binned sum is inf - inf) makes the
        # minimum NaN, which must not spare the other frames' negative counts the clip
        if not view.min() >= 0:
            np.maximum(view, 0, out=view)
        if config.transform == "sqrt":
            np.sqrt(view, out=view)
        else:
            np.log1p(view, out=view)
    if config.offset == 0.0:
        scale = np.float32(config.scale) if post is None else post * np.float32(config.scale)
        if post is not None or config.scale != 1.0:
            view *= scale
        return
    if post is not None:
        view *= post
    view -= np.float32(config.offset)
    if config.scale != 1.0:
        view *= np.float32(config.scale)


def preprocess_into(frame: np.ndarray, out: np.ndarray, config: PreprocessConfig,
                    running: RunningTotal | None = None) -> None:
    """Preprocess one 2-D ``frame`` into the float32 array ``out`` (model size)."""
    load_into(frame, out, config)
    transform_batch(out, config, running)


def preprocess(frames: np.ndarray, config: PreprocessConfig, running: RunningTotal | None = None) -> np.ndarray:
    """Preprocess a stack ``(N, H, W)`` (or one ``(H, W)`` frame) into float32.

    With ``normalize: "running"`` the frames are taken in order, with ``running``
    (a new :class:`RunningTotal` of ``config.normalize_window`` when not given).
    """
    if config.normalize == "running" and running is None:
        running = RunningTotal(config.normalize_window)
    single = frames.ndim == 2
    stack = frames[None] if single else frames
    out = np.empty((len(stack), *config.output_shape(stack.shape[1:])), dtype=np.float32)
    if config.crop_hw is None and config.bin_factor == 1:
        out[...] = stack
    else:
        for frame, slot in zip(stack, out):
            load_into(frame, slot, config)
    transform_batch(out, config, running)
    return out[0] if single else out
