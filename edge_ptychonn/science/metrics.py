"""Accuracy of a reconstructed phase image against the ground truth.

Far-field intensities do not change when the object's phase is shifted by a
constant, so every score first removes the constant offset: the circular mean
of ``predicted - truth`` over the mask. Then, over the mask:

- ``rmse_rad``: root-mean-square error in radians;
- ``psnr_db``: ``20 log10(range / rmse)`` with ``range`` the truth's max - min;
- ``ssim``: structural similarity (Wang et al. 2004: Gaussian window sigma 1.5
  px, 11 x 11, K1 = 0.01, K2 = 0.03, data range as for the PSNR), averaged over
  the mask pixels whose whole window lies inside the mask.

Baselines (``baseline_scores``): ``zeros``, a constant image (after the offset
removal it equals the truth's mean, so a "mean" baseline scores the same), and
``mean_patch``, the average ground-truth patch stitched at every position: what
a network that learned only the average patch would give.
"""

from __future__ import annotations

import math

import numpy as np

from edge_ptychonn.science.stitch import Stitcher

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def phase_offset(predicted: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """The constant ``c`` (radians) that best aligns ``predicted - c`` to ``truth`` on ``mask``."""
    d = predicted[mask].astype(np.float64) - truth[mask].astype(np.float64)
    return float(np.angle(np.mean(np.exp(1j * d))))


def _check(predicted: np.ndarray, truth: np.ndarray, mask: np.ndarray | None):
    predicted = np.asarray(predicted, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 2:
        raise ValueError(f"predicted and truth must be the same 2-D shape, got {predicted.shape} and {truth.shape}")
    mask = np.ones(truth.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != truth.shape:
        raise ValueError(f"mask must have the image shape {truth.shape}, got {mask.shape}")
    if not mask.any():
        raise ValueError("mask selects no pixels")
    if not (np.all(np.isfinite(predicted[mask])) and np.all(np.isfinite(truth[mask]))):
        raise ValueError("predicted and truth must be finite inside the mask")
    return predicted, truth, mask


def _gaussian_filter(img: np.ndarray) -> np.ndarray:
    k = np.exp(-0.5 * (np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1) / SSIM_SIGMA) ** 2)
    k /= k.sum()
    r = SSIM_RADIUS
    out = img
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, kv in enumerate(k):
            acc += kv * (p[i : i + n] if axis == 0 else p[:, i : i + n])
        out = acc
    return out


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood lies wholly inside ``mask``."""
    h, w = mask.shape
    c = np.zeros((h + 1, w + 1), dtype=np.int64)
    c[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    out = np.zeros_like(mask)
    if h <= 2 * r or w <= 2 * r:
        return out
    s = c[2 * r + 1 :, 2 * r + 1 :] - c[: h - 2 * r, 2 * r + 1 :] - c[2 * r + 1 :, : w - 2 * r] + c[: h - 2 * r, : w - 2 * r]
    out[r : h - r, r : w - r] = s == (2 * r + 1) ** 2
    return out


def ssim_fits(mask: np.ndarray) -> bool:
    """Whether the SSIM window fits wholly inside ``mask`` somewhere (else :func:`score_phase`
    refuses it: no SSIM can be computed)."""
    return bool(_erode(np.asarray(mask, dtype=bool), SSIM_RADIUS).any())


def ssim_map(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """Local SSIM of two images (same shape) with a Gaussian window."""
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mx, my = _gaussian_filter(x), _gaussian_filter(y)
    vx = _gaussian_filter(x * x) - mx * mx
    vy = _gaussian_filter(y * y) - my * my
    cxy = _gaussian_filter(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def score_phase(predicted: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Scores of a phase image against the truth over ``mask`` (default: all).

    Returns ``{"ssim", "psnr_db", "rmse_rad", "offset_rad", "n_pixels"}``; the
    offset is removed from ``predicted`` before scoring. ``psnr_db`` is ``inf``
    for an exact match. Raises ``ValueError`` for mismatched shapes, an empty
    mask, non-finite values in the mask, or a mask too thin for the SSIM window.
    """
    predicted, truth, mask = _check(predicted, truth, mask)
    offset = phase_offset(predicted, truth, mask)
    aligned = predicted - offset
    err = aligned[mask] - truth[mask]
    rmse = float(np.sqrt(np.mean(err * err)))
    data_range = float(truth[mask].max() - truth[mask].min())
    if data_range <= 0:
        data_range = 1.0  # a flat truth: score against a 1-radian range
    psnr = math.inf if rmse == 0 else 20 * math.log10(data_range / rmse)
    inner = _erode(mask, SSIM_RADIUS)
    if not inner.any():
        raise ValueError(f"mask is too thin for the {2 * SSIM_RADIUS + 1}-pixel SSIM window")
    ssim = float(np.mean(ssim_map(aligned, truth, data_range)[inner]))
    return {
        "ssim": ssim,
        "psnr_db": psnr,
        "rmse_rad": rmse,
        "offset_rad": offset,
        "n_pixels": int(mask.sum()),
    }


def patch_errors(predicted: np.ndarray, truth: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per-patch RMSE (N,) in radians over the pixels where ``weight > 0``.

    ``predicted`` and ``truth`` are (N, h, w); each patch's own constant offset
    is removed first (circular mean of the difference).
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 3:
        raise ValueError(f"predicted and truth must be (N, h, w) alike, got {predicted.shape} and {truth.shape}")
    m = np.asarray(weight) > 0
    if m.shape != truth.shape[1:] or not m.any():
        raise ValueError(f"weight must be a non-zero {truth.shape[1:]} map, got {m.shape}")
    d = predicted[:, m] - truth[:, m]
    offsets = np.angle(np.mean(np.exp(1j * d), axis=1))
    d -= offsets[:, None]
    return np.sqrt(np.mean(d * d, axis=1))


def summarise_patch_errors(errors: np.ndarray) -> dict:
    """Mean, median and 90th percentile of per-patch errors (radians)."""
    e = np.asarray(errors, dtype=np.float64)
    return {
        "patch_rmse_mean_rad": float(e.mean()),
        "patch_rmse_median_rad": float(np.median(e)),
        "patch_rmse_p90_rad": float(np.percentile(e, 90)),
    }


def baseline_scores(
    truth: np.ndarray,
    mask: np.ndarray,
    *,
    patches_phase: np.ndarray | None = None,
    positions_px: np.ndarray | None = None,
    weight: np.ndarray | None = None,
) -> dict[str, dict]:
    """Scores of trivial reconstructions: ``zeros`` and, given the ground-truth
    patches, positions and stitching weight, ``mean_patch``."""
    out = {"zeros": score_phase(np.zeros_like(truth, dtype=np.float64), truth, mask)}
    if patches_phase is not None and positions_px is not None:
        mean_patch = np.mean(patches_phase, axis=0)
        st = Stitcher(truth.shape, mean_patch.shape, weight=weight)
        for pos in positions_px:
            st.add(mean_patch, pos)
        out["mean_patch"] = score_phase(st.image(), truth, mask)
    return out
