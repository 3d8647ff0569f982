"""Predicted patches + scan positions -> object phase image, incrementally.

Each patch is added with a weight map ``w`` (h, w): the object image is the
weighted average ``sum_k w * patch_k / sum_k w`` over the patches that cover a
pixel. Only the well-illuminated centre of a patch should count, since the
network cannot know the object where the probe is dark: ``probe_weight`` gives
``|probe|**2`` where it is at least ``threshold`` of its peak, and 0 elsewhere.
``centre_window`` is a probe-free alternative (a disc with a cosine edge).

Positions are the (y, x) top-left corners of the patches in object pixels, as
in the ``.npz`` that ``edge-ptychonn simulate`` writes; they are rounded to
whole pixels. A patch that falls partly outside the object is cut to fit.

Usage, as frames come back from the network::

    st = Stitcher(truth.object_phase.shape, truth.patch_shape, weight=probe_weight(truth.probe))
    for k, phase in results:            # any order, any subset
        st.add(phase, truth.positions_px[k])
    image, covered = st.image(), st.covered()
"""

from __future__ import annotations

import numpy as np


def probe_weight(probe: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """``|probe|**2`` normalised to a peak of 1, zero below ``threshold`` (float32)."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    intensity = np.abs(np.asarray(probe)) ** 2
    peak = float(intensity.max())
    if peak <= 0:
        raise ValueError("probe is zero everywhere")
    w = intensity / peak
    w[w < threshold] = 0.0
    return w.astype(np.float32)


def centre_window(patch_shape: tuple[int, int], diameter_px: float, edge_px: float | None = None) -> np.ndarray:
    """A centred disc of ``diameter_px`` with a cosine roll-off ``edge_px`` wide
    (default: a quarter of the diameter, at most 4 px), float32."""
    h, w = patch_shape
    if not 0 < diameter_px <= max(h, w) * 1.5:
        raise ValueError(f"diameter_px must be in (0, {max(h, w) * 1.5}], got {diameter_px}")
    y = np.arange(h)[:, None] + 0.5 - h / 2
    x = np.arange(w)[None, :] + 0.5 - w / 2
    r = np.hypot(y, x)
    if edge_px is None:
        edge_px = min(4.0, diameter_px / 4)
    inner = diameter_px / 2 - edge_px
    t = np.clip((r - inner) / max(edge_px, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)


class Stitcher:
    """Weighted overlap average of patches into an object image.

    ``object_shape`` (H, W) and ``patch_shape`` (h, w) in pixels; ``weight`` an
    (h, w) map (default: ``centre_window`` with a diameter of a third of the
    patch, at least 3 px; pass ``probe_weight(probe)`` when the probe is known).
    Positions are rounded to whole pixels. Accumulates in float64; ``add`` is O(h * w), so it can run as each
    frame arrives.
    """

    def __init__(
        self,
        object_shape: tuple[int, int],
        patch_shape: tuple[int, int],
        weight: np.ndarray | None = None,
    ):
        if len(object_shape) != 2 or min(object_shape) < 1:
            raise ValueError(f"object_shape must be (H, W) > 0, got {object_shape}")
        if len(patch_shape) != 2 or min(patch_shape) < 1:
            raise ValueError(f"patch_shape must be (h, w) > 0, got {patch_shape}")
        self.object_shape = tuple(int(v) for v in object_shape)
        self.patch_shape = tuple(int(v) for v in patch_shape)
        if weight is None:
            weight = centre_window(self.patch_shape, max(3.0, min(self.patch_shape) / 3))
        weight = np.asarray(weight, dtype=np.float64)
        if weight.shape != self.patch_shape:
            raise ValueError(f"weight must have the patch shape {self.patch_shape}, got {weight.shape}")
        if not np.all(np.isfinite(weight)) or weight.min() < 0 or weight.max() <= 0:
            raise ValueError("weight must be finite, >= 0 and not all zero")
        self.weight = weight
        self._sum = np.zeros(self.object_shape, dtype=np.float64)
        self._wsum = np.zeros(self.object_shape, dtype=np.float64)
        self.n_patches = 0
        self.n_outside = 0

    def add(self, patch_phase: np.ndarray, position_px) -> bool:
        """Add one (h, w) patch at top-left (y, x); False if it misses the object (or the
        position is not a finite number)."""
        patch = np.asarray(patch_phase, dtype=np.float64)
        if patch.shape != self.patch_shape:
            raise ValueError(f"patch must be {self.patch_shape}, got {patch.shape}")
        yx = [float(v) for v in position_px]
        if not all(map(np.isfinite, yx)):  # a position that is NaN or infinite (an encoder's bad reading)
            self.n_outside += 1
            return False
        y, x = (int(round(v)) for v in yx)
        h, w = self.patch_shape
        H, W = self.object_shape
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        if y0 >= y1 or x0 >= x1:
            self.n_outside += 1
            return False
        py, px = slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)
        wt = self.weight[py, px]
        self._sum[y0:y1, x0:x1] += wt * patch[py, px]
        self._wsum[y0:y1, x0:x1] += wt
        self.n_patches += 1
        return True

    def add_many(self, patches: np.ndarray, positions_px: np.ndarray) -> int:
        """Add (N, h, w) patches at (N, 2) positions; returns how many landed."""
        if len(patches) != len(positions_px):
            raise ValueError(f"{len(patches)} patches but {len(positions_px)} positions")
        return sum(self.add(p, pos) for p, pos in zip(patches, positions_px))

    def weight_sum(self) -> np.ndarray:
        """Sum of the weights at each object pixel (H, W) float64."""
        return self._wsum.copy()

    def covered(self, min_weight: float = 0.5) -> np.ndarray:
        """Boolean (H, W): pixels whose summed weight is at least ``min_weight``."""
        return self._wsum >= min_weight

    def image(self, fill: float = 0.0) -> np.ndarray:
        """The weighted average (H, W) float32; ``fill`` where no weight landed."""
        out = np.full(self.object_shape, fill, dtype=np.float64)
        has = self._wsum > 0
        out[has] = self._sum[has] / self._wsum[has]
        return out.astype(np.float32)


def stitch(
    patches: np.ndarray,
    positions_px: np.ndarray,
    object_shape: tuple[int, int],
    weight: np.ndarray | None = None,
) -> Stitcher:
    """Stitch all patches at once; returns the ``Stitcher`` (``image()``, ``covered()``)."""
    st = Stitcher(object_shape, patches.shape[1:], weight=weight)
    st.add_many(patches, positions_px)
    return st
