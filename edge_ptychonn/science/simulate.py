"""Far-field ptychography scan simulator: object, probe, scan, noisy frames.

The physics, per scan position ``k`` with the probe window's top-left corner at
``positions_px[k] = (y, x)`` in object pixels:

    exit_k   = probe * object[y : y + n, x : x + n]            (n = frame_size * bin_factor)
    I_k      = |fftshift(fft2(exit_k))|**2                      (zero frequency at n // 2)
    counts_k = Poisson(photons * I_k / (n**2 * sum |probe|**2)), then summed over
               bin_factor x bin_factor detector pixels, clipped to int16.

By Parseval's theorem the expected total of a frame is ``photons * sum|exit|**2
/ sum|probe|**2``: exactly ``photons`` for a pure phase object, less where the
object absorbs. ``photons`` is therefore the number of photons that the probe
brings per exposure.

Object: thickness maps ``t`` in [0, 1] from a family of synthetic structures
(``FAMILIES``), phase ``= phase_range_rad * t`` and amplitude ``= exp(-absorption
* phase)`` (absorption = beta / delta of the material). The training family
``mixed`` sums particles (projected spheres), a smooth random field and
piecewise-constant cells with sharp edges, in random proportions per object;
``siemens`` and ``fibres`` are unlike it, for out-of-family tests.

Probe: a focused beam, defocused: a circular pupil of radius ``pupil_radius_px``
(far-field pixels) with a quadratic (defocus) phase, propagated to the sample.
The defocus is set so that the geometric beam diameter is ``probe_diameter_px``;
the probe then has the phase curvature of a diverging beam and the far-field
intensity of the bare probe is the filled pupil disc.

Scan: a raster (row by row) or a Fermat spiral, with the step set by the linear
overlap of neighbouring probe discs, ``step = probe_diameter * (1 - overlap)``,
plus uniform random position errors of up to ``jitter_px``. Positions are whole
object pixels.

Everything is deterministic from ``seed``: the object, the positions and the
noise each draw from their own stream of ``numpy.random.SeedSequence(seed)``.

Files: ``save_scan(out, ...)`` writes ``<out>.npy`` (int16 frames (N, ny, nx),
frame k at scan position k, which ``pvapy-ad-sim-server -if`` replays with
uniqueId k + 1) and ``<out>.npz`` (``positions_px``, ``patches_phase``,
``object_phase``, ``object_amplitude``, ``probe``, ``settings`` as JSON, and the
counters in ``stats`` as JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import numbers
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from edge_ptychonn.files import check_writable, load_npy, load_npz, whole_file, write_npy
from edge_ptychonn.cli_options import DefaultsFormatter
from edge_ptychonn.progress import Progress

FAMILIES = ("mixed", "particles", "smooth", "cells", "siemens", "fibres")
SCAN_PATTERNS = ("raster", "spiral")
INT16_MAX = np.iinfo(np.int16).max
BASE_SIZE = 128  # feature sizes and default probe sizes are given for a 128-pixel window
MAX_PHOTONS = 1e18  # numpy's Poisson sampler takes means up to ~9.2e18; int16 frames saturate long before


@dataclass(frozen=True)
class ScanSettings:
    """Everything that defines one simulated scan. Lengths in object pixels.

    ``probe_diameter_px`` and ``pupil_radius_px`` default (``None``) to 40 and 12
    for a 128-pixel simulation window and scale with ``frame_size * bin_factor``.
    """

    seed: int = 0
    family: str = "mixed"
    n_positions: int = 1024
    pattern: str = "raster"
    overlap: float = 0.7
    jitter_px: float = 1.0
    frame_size: int = 128
    bin_factor: int = 1
    probe_diameter_px: float | None = None
    pupil_radius_px: float | None = None
    photons: float = 1e6
    phase_range_rad: float = 1.5
    density: float = 0.8
    absorption: float = 0.05

    def __post_init__(self) -> None:
        # the types first: settings also come from JSON (a model card's training.scan_settings)
        for name in ("n_positions", "frame_size", "bin_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        for name in ("overlap", "jitter_px", "probe_diameter_px", "pupil_radius_px", "photons", "phase_range_rad",
                     "density", "absorption"):
            value = getattr(self, name)
            if (value is not None or name not in ("probe_diameter_px", "pupil_radius_px")) and (
                    isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):  # None: a card's settings of many scans
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.pattern not in SCAN_PATTERNS:
            raise ValueError(f"pattern must be one of {SCAN_PATTERNS}, got {self.pattern!r}")
        if not 1 <= self.n_positions <= 1_000_000:
            raise ValueError(f"n_positions must be 1..1000000, got {self.n_positions}")
        if not 0 < self.overlap < 1:
            raise ValueError(f"overlap must be in (0, 1), got {self.overlap}")
        if not 0 <= self.jitter_px <= 64:
            raise ValueError(f"jitter_px must be 0..64, got {self.jitter_px}")
        if not 8 <= self.frame_size <= 4096 or self.frame_size % 2:
            raise ValueError(f"frame_size must be even and 8..4096, got {self.frame_size}")
        if not 1 <= self.bin_factor <= 16:
            raise ValueError(f"bin_factor must be 1..16, got {self.bin_factor}")
        n = self.window_size
        d = self.probe_diameter
        if not 2 <= d <= n / 1.5:
            raise ValueError(
                f"probe_diameter_px must be 2..{n / 1.5:.0f} (window {n} / oversampling 1.5), got {d}"
            )
        r = self.pupil_radius
        if not 1 <= r <= n / 4:
            raise ValueError(f"pupil_radius_px must be 1..{n / 4:.0f} (window {n} / 4), got {r}")
        if not (math.isfinite(self.photons) and 0 < self.photons <= MAX_PHOTONS):
            raise ValueError(f"photons must be > 0 and at most {MAX_PHOTONS:g}, got {self.photons}")
        if not 0 < self.phase_range_rad <= math.pi:
            raise ValueError(f"phase_range_rad must be in (0, pi], got {self.phase_range_rad}")
        if not 0 < self.density <= 2:
            raise ValueError(f"density must be in (0, 2], got {self.density}")
        if not 0 <= self.absorption <= 10:
            raise ValueError(f"absorption must be 0..10, got {self.absorption}")

    @property
    def window_size(self) -> int:
        """Side of the simulated probe window (detector pixels before binning)."""
        return self.frame_size * self.bin_factor

    @property
    def probe_diameter(self) -> float:
        if self.probe_diameter_px is not None:
            return float(self.probe_diameter_px)
        return 40.0 * self.window_size / BASE_SIZE

    @property
    def pupil_radius(self) -> float:
        if self.pupil_radius_px is not None:
            return float(self.pupil_radius_px)
        return 12.0 * self.window_size / BASE_SIZE

    @property
    def step_px(self) -> float:
        return self.probe_diameter * (1.0 - self.overlap)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ScanSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown scan settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class ScanTruth:
    """Ground truth of one scan.

    ``positions_px`` (N, 2) float64: (y, x) of each frame's patch top-left corner
    in object pixels (whole numbers); ``patches_phase`` (N, n, n) float32 radians;
    ``object_phase`` and ``object_amplitude`` (H, W) float32; ``probe`` (n, n)
    complex64 with its largest amplitude 1; ``settings`` the ``ScanSettings`` as a
    dict; ``stats`` counters of the simulation (``n_clipped_pixels``,
    ``mean_counts``, ``max_count``).
    """

    positions_px: np.ndarray
    patches_phase: np.ndarray
    object_phase: np.ndarray
    object_amplitude: np.ndarray
    probe: np.ndarray
    settings: dict
    stats: dict

    @property
    def patch_shape(self) -> tuple[int, int]:
        return tuple(self.patches_phase.shape[1:])

    def patches_amplitude(self) -> np.ndarray:
        """Ground-truth amplitude patches (N, n, n) float32, cut from the object."""
        return extract_patches(self.object_amplitude, self.positions_px, self.patch_shape)


# ---------------------------------------------------------------- objects


def _normalise(t: np.ndarray) -> np.ndarray:
    lo, hi = float(t.min()), float(t.max())
    return (t - lo) / (hi - lo) if hi > lo else np.zeros_like(t)


def _particles(rng: np.random.Generator, shape, density: float, s: float) -> np.ndarray:
    """Overlapping projected spheres (radius 3..12 px at scale 1), coverage ~ density."""
    h, w = shape
    r_lo, r_hi = 3.0 * s, 12.0 * s
    mean_r2 = (r_hi**2 - r_lo**2) / (2 * math.log(r_hi / r_lo))  # E[r^2], log-uniform r
    n = max(1, int(round(density * h * w / (math.pi * mean_r2))))
    t = np.zeros(shape, dtype=np.float64)
    radii = np.exp(rng.uniform(math.log(r_lo), math.log(r_hi), n))
    ys = rng.uniform(0, h, n)
    xs = rng.uniform(0, w, n)
    for r, cy, cx in zip(radii, ys, xs):
        y0, y1 = max(0, int(cy - r)), min(h, int(cy + r) + 2)
        x0, x1 = max(0, int(cx - r)), min(w, int(cx + r) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1)[:, None] + 0.5 - cy
        xx = np.arange(x0, x1)[None, :] + 0.5 - cx
        t[y0:y1, x0:x1] += np.sqrt(np.clip(r * r - yy * yy - xx * xx, 0, None))
    return _normalise(t)


def _smooth(rng: np.random.Generator, shape, s: float) -> np.ndarray:
    """Gaussian random field with a correlation length of 8..24 px at scale 1."""
    length = rng.uniform(8.0, 24.0) * s
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    filt = np.exp(-2 * (math.pi * length) ** 2 * (fy**2 + fx**2) / 4)
    field = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=shape)
    return _normalise(field)


def _cells(rng: np.random.Generator, shape, density: float, s: float) -> np.ndarray:
    """Voronoi cells (about 30 px across at scale 1) of random constant thickness."""
    h, w = shape
    n = max(2, int(round(density * h * w / (30.0 * s) ** 2)))
    seeds = np.stack([rng.uniform(0, h, n), rng.uniform(0, w, n)], axis=1)
    values = rng.uniform(0, 1, n)
    values[rng.uniform(0, 1, n) < 0.25] = 0.0  # some empty cells
    t = np.empty(shape, dtype=np.float64)
    xx = np.arange(w)[None, :, None] + 0.5
    for y0 in range(0, h, 32):
        yy = np.arange(y0, min(h, y0 + 32))[:, None, None] + 0.5
        d2 = (yy - seeds[None, None, :, 0]) ** 2 + (xx - seeds[None, None, :, 1]) ** 2
        t[y0 : y0 + 32] = values[np.argmin(d2, axis=2)]
    return t


def _siemens(rng: np.random.Generator, shape, s: float) -> np.ndarray:
    """A binary Siemens star centred on the object, 24..48 spokes."""
    h, w = shape
    spokes = int(rng.integers(24, 49))
    yy = np.arange(h)[:, None] + 0.5 - h / 2
    xx = np.arange(w)[None, :] + 0.5 - w / 2
    angle = np.arctan2(yy, xx) + rng.uniform(0, 2 * math.pi)
    radius = np.hypot(yy, xx)
    star = (np.sin(spokes * angle) > 0) & (radius < 0.48 * min(h, w))
    return star.astype(np.float64)


def _fibres(rng: np.random.Generator, shape, density: float, s: float) -> np.ndarray:
    """Straight cylindrical fibres (radius 1..4 px, 40..200 px long at scale 1)."""
    h, w = shape
    mean_len, mean_r = 120.0 * s, 2.5 * s
    n = max(1, int(round(density * h * w / (2 * mean_r * mean_len))))
    t = np.zeros(shape, dtype=np.float64)
    for _ in range(n):
        r = rng.uniform(1.0, 4.0) * s
        length = rng.uniform(40.0, 200.0) * s
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        theta = rng.uniform(0, math.pi)
        dy, dx = math.sin(theta), math.cos(theta)
        half = length / 2
        ay, ax = cy - half * dy, cx - half * dx
        y0 = max(0, int(min(ay, ay + length * dy) - r) - 1)
        y1 = min(h, int(max(ay, ay + length * dy) + r) + 2)
        x0 = max(0, int(min(ax, ax + length * dx) - r) - 1)
        x1 = min(w, int(max(ax, ax + length * dx) + r) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        py = np.arange(y0, y1)[:, None] + 0.5 - ay
        px = np.arange(x0, x1)[None, :] + 0.5 - ax
        along = np.clip(py * dy + px * dx, 0, length)
        d2 = (py - along * dy) ** 2 + (px - along * dx) ** 2
        t[y0:y1, x0:x1] += np.sqrt(np.clip(r * r - d2, 0, None))
    return _normalise(t)


def make_object(
    shape: tuple[int, int],
    family: str,
    rng: np.random.Generator,
    *,
    density: float = 0.8,
    scale: float = 1.0,
) -> np.ndarray:
    """A thickness map (H, W) float64 in [0, 1] of the given ``family``.

    ``scale`` multiplies all feature sizes (1.0 for a 128-pixel window).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "particles":
        return _particles(rng, shape, density, scale)
    if family == "smooth":
        return _smooth(rng, shape, scale)
    if family == "cells":
        return _cells(rng, shape, density, scale)
    if family == "siemens":
        return _siemens(rng, shape, scale)
    if family == "fibres":
        return _fibres(rng, shape, density, scale)
    weights = rng.dirichlet([4.0, 1.0, 1.0])
    parts = (
        _particles(rng, shape, density, scale),
        _smooth(rng, shape, scale),
        _cells(rng, shape, density, scale),
    )
    return _normalise(sum(wt * p for wt, p in zip(weights, parts)))


# ---------------------------------------------------------------- probe and scan


def make_probe(size: int, pupil_radius_px: float, diameter_px: float) -> np.ndarray:
    """A defocused focused beam (size, size) complex64, centred, max amplitude 1.

    A circular pupil of radius ``pupil_radius_px`` far-field pixels carries the
    defocus phase ``a * (q / R)**2``; a ray at the pupil edge lands
    ``size * a / (pi * R)`` pixels from the axis, so ``a = pi * R * diameter /
    (2 * size)`` gives a beam ``diameter_px`` across.
    """
    if not 1 <= pupil_radius_px <= size / 2:
        raise ValueError(f"pupil_radius_px must be 1..{size / 2}, got {pupil_radius_px}")
    q = np.arange(size) - size // 2
    qr = np.hypot(q[:, None], q[None, :])
    pupil = np.clip(pupil_radius_px + 0.5 - qr, 0.0, 1.0)  # anti-aliased disc edge
    a = math.pi * pupil_radius_px * diameter_px / (2 * size)
    field = pupil * np.exp(1j * a * (qr / pupil_radius_px) ** 2)
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(field)))
    probe /= np.abs(probe).max()
    return probe.astype(np.complex64)


def scan_positions(settings: ScanSettings, rng: np.random.Generator) -> np.ndarray:
    """(N, 2) float64 (y, x) whole-pixel top-left corners, the smallest at 0."""
    n, step = settings.n_positions, settings.step_px
    if settings.pattern == "raster":
        cols = math.ceil(math.sqrt(n))
        k = np.arange(n)
        pos = np.stack([(k // cols) * step, (k % cols) * step], axis=1).astype(np.float64)
    else:  # Fermat spiral with a mean point spacing of one step
        k = np.arange(n)
        r = step / math.sqrt(math.pi) * np.sqrt(k + 0.5)
        theta = k * math.pi * (3.0 - math.sqrt(5.0))
        pos = np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1)
    if settings.jitter_px > 0:
        pos += rng.uniform(-settings.jitter_px, settings.jitter_px, pos.shape)
    pos = np.round(pos)
    return pos - pos.min(axis=0)


def extract_patches(image: np.ndarray, positions_px: np.ndarray, patch_shape) -> np.ndarray:
    """Cut (N, h, w) patches from ``image`` at whole-pixel top-left ``positions_px``."""
    h, w = patch_shape
    pos = np.rint(np.asarray(positions_px)).astype(np.int64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"positions_px must be (N, 2), got {pos.shape}")
    if len(pos) and (
        pos.min() < 0
        or pos[:, 0].max() + h > image.shape[0]
        or pos[:, 1].max() + w > image.shape[1]
    ):
        raise ValueError(f"patches of {h}x{w} at these positions do not fit a {image.shape} image")
    out = np.empty((len(pos), h, w), dtype=image.dtype)
    for k, (y, x) in enumerate(pos):
        out[k] = image[y : y + h, x : x + w]
    return out


# ---------------------------------------------------------------- diffraction


def expected_counts(exit_waves: np.ndarray, probe: np.ndarray, photons: float) -> np.ndarray:
    """Noise-free far-field intensities (N, n, n) float64, zero frequency at n // 2.

    Scaled so that a frame's total is ``photons * sum|exit|**2 / sum|probe|**2``.
    """
    n2 = exit_waves.shape[-1] * exit_waves.shape[-2]
    far = np.fft.fftshift(np.fft.fft2(exit_waves.astype(np.complex128)), axes=(-2, -1))
    norm = photons / (n2 * float(np.sum(np.abs(probe.astype(np.complex128)) ** 2)))
    return (far.real**2 + far.imag**2) * norm


def bin_frames(frames: np.ndarray, factor: int) -> np.ndarray:
    """Sum ``factor`` x ``factor`` pixel blocks of (N, n, n) frames."""
    if factor == 1:
        return frames
    n, h, w = frames.shape
    if h % factor or w % factor:
        raise ValueError(f"bin factor {factor} does not divide the {h}x{w} frame")
    return frames.reshape(n, h // factor, factor, w // factor, factor).sum(axis=(2, 4))


def simulate_scan(
    settings: ScanSettings = ScanSettings(), *, progress: bool = True, chunk: int = 64
) -> tuple[np.ndarray, ScanTruth]:
    """Simulate one scan: int16 frames (N, frame_size, frame_size) and its truth.

    Counts above 32767 are clipped to int16; their number is in
    ``truth.stats["n_clipped_pixels"]`` and a warning is issued when it is not 0
    (``ValueError`` when every pixel is clipped, or when no frame holds a single count:
    such frames carry nothing).
    ``truth.stats["mean_counts"]`` is the mean total of the frames as returned (after clipping).
    """
    obj_rng, scan_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(settings.seed).spawn(3)
    )
    n = settings.window_size
    positions = scan_positions(settings, scan_rng)
    shape = (int(positions[:, 0].max()) + n, int(positions[:, 1].max()) + n)
    thickness = make_object(
        shape, settings.family, obj_rng, density=settings.density, scale=n / BASE_SIZE
    )
    phase = settings.phase_range_rad * thickness
    amplitude = np.exp(-settings.absorption * phase)
    obj = (amplitude * np.exp(1j * phase)).astype(np.complex64)
    probe = make_probe(n, settings.pupil_radius, settings.probe_diameter)

    total = len(positions)
    frames = np.empty((total, settings.frame_size, settings.frame_size), dtype=np.int16)
    clipped = 0
    count_sum = 0.0
    bar = Progress(total, f"simulate seed {settings.seed}", unit="frames", enabled=progress)
    for start in range(0, total, chunk):
        pos = positions[start : start + chunk]
        exit_waves = probe[None] * extract_patches(obj, pos, (n, n))
        counts = noise_rng.poisson(expected_counts(exit_waves, probe, settings.photons))
        counts = bin_frames(counts, settings.bin_factor)
        clipped += int(np.count_nonzero(counts > INT16_MAX))
        frames[start : start + len(pos)] = np.minimum(counts, INT16_MAX)
        count_sum += float(frames[start : start + len(pos)].sum(dtype=np.int64))  # what the frames hold
        bar.update(len(pos))
    bar.close()
    if count_sum == 0:
        raise ValueError(
            f"photons {settings.photons:g} give no count in any pixel of any frame: the frames hold nothing of the "
            "object; raise the photon count"
        )
    if clipped == frames.size:
        raise ValueError(
            f"photons {settings.photons:g} saturate every pixel of every frame ({INT16_MAX}): the frames hold "
            "nothing of the object; lower the photon count"
        )
    if clipped:
        warnings.warn(
            f"{clipped} pixels exceeded the int16 range and were clipped to {INT16_MAX}; "
            "lower the photon count or bin less",
            stacklevel=2,
        )
    truth = ScanTruth(
        positions_px=positions,
        patches_phase=extract_patches(phase.astype(np.float32), positions, (n, n)),
        object_phase=phase.astype(np.float32),
        object_amplitude=amplitude.astype(np.float32),
        probe=probe,
        settings=settings.to_dict(),
        stats={
            "n_clipped_pixels": clipped,
            "mean_counts": count_sum / total,
            "max_count": int(frames.max()),
        },
    )
    return frames, truth


# ---------------------------------------------------------------- files


def scan_paths(path: str | Path) -> tuple[Path, Path]:
    """``<prefix>.npy`` and ``<prefix>.npz`` for a prefix or either file's path; ``ValueError``
    when it names no file (``""``, ``.``, ``..``, a folder ``scans/``)."""
    given, path = str(path), Path(path)
    if path.name in ("", ".", "..") or given.endswith("/"):
        raise ValueError(f"{given!r} names no file: give a prefix, e.g. data/generated/scan1")
    if path.suffix in (".npy", ".npz"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".npy"), path.with_name(path.name + ".npz")


def save_scan(out: str | Path, frames: np.ndarray, truth: ScanTruth) -> tuple[Path, Path]:
    """Write ``<out>.npy`` (frames) and ``<out>.npz`` (truth); returns both paths.

    Each file takes its name only when both are whole (the ``.npz`` first), so an
    interrupted or failed write leaves no half scan that a later run would read;
    ``OSError`` when the folder cannot be made or written.
    """
    npy, npz = scan_paths(out)
    npy.parent.mkdir(parents=True, exist_ok=True)
    with whole_file(npy) as npy_part:  # the .npz's opened once the .npy is written: an error names its file
        with open(npy_part, "wb") as f:
            write_npy(f, frames)
        with whole_file(npz) as npz_part, open(npz_part, "wb") as f:
            np.savez(
                f,
                positions_px=truth.positions_px,
                patches_phase=truth.patches_phase,
                object_phase=truth.object_phase,
                object_amplitude=truth.object_amplitude,
                probe=truth.probe,
                settings=json.dumps(truth.settings),
                stats=json.dumps(truth.stats),
            )
    return npy, npz


def load_scan(path: str | Path) -> tuple[np.ndarray, ScanTruth]:
    """Read a scan written by ``save_scan``: ``(frames, truth)``.

    ``path`` is the prefix or the path of the ``.npy`` or the ``.npz``. ``ValueError``
    names the file and the field when the files are not such a scan (shapes, dtypes,
    positions that put a patch outside the object).
    """
    npy, npz = scan_paths(path)
    for p in (npy, npz):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found; make it with 'edge-ptychonn simulate --out {npy.with_suffix('')}'")
    frames = load_npy(npy)  # ValueError naming the file: empty, cut short, an .npz, ...
    _, arrays = load_npz(npz)
    try:
        needed = {"positions_px", "patches_phase", "object_phase", "object_amplitude", "probe", "settings"}
        missing = needed - set(arrays)
        truth = None if missing else ScanTruth(
            positions_px=arrays["positions_px"],
            patches_phase=arrays["patches_phase"],
            object_phase=arrays["object_phase"],
            object_amplitude=arrays["object_amplitude"],
            probe=arrays["probe"],
            settings=json.loads(str(arrays["settings"])),
            stats=json.loads(str(arrays["stats"])) if "stats" in arrays else {},
        )
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{npz}: not a scan written by edge-ptychonn simulate ({exc})") from None
    if missing:
        raise ValueError(f"{npz} lacks {sorted(missing)}: not a scan written by edge-ptychonn simulate")
    _check_scan(frames, truth, npy, npz)
    return frames, truth


FLOAT32_MAX = float(np.finfo(np.float32).max)
NONFINITE_FRAMES = ("hold NaN or infinite pixels (or pixels beyond float32's range, |x| > 3.4e38, infinite "
                    "as the model's input)")


def nonfinite_frames(frames: np.ndarray, chunk: int = 256) -> int:
    """How many of ``frames`` (N, H, W) hold a pixel that is NaN or infinite, or, for double pixels, beyond
    float32's range (the model's input: there it is infinite, as the processor counts a bad frame
    ``nonfinite``); 0 for integer frames. Checked ``chunk`` frames at a time (bounded memory)."""
    if frames.dtype.kind != "f":
        return 0
    bad = 0
    for start in range(0, len(frames), chunk):
        part = np.asarray(frames[start : start + chunk])
        ok = np.abs(part) <= FLOAT32_MAX if part.dtype.itemsize > 4 else np.isfinite(part)  # NaN: False
        bad += int(np.count_nonzero(~ok.all(axis=(1, 2))))
    return bad


def _check_scan(frames: np.ndarray, truth: ScanTruth, npy: Path, npz: Path) -> None:
    """``ValueError`` naming the file and field where ``load_scan``'s arrays do not form a scan."""
    if frames.ndim != 3 or frames.dtype.kind not in "iuf":
        raise ValueError(f"{npy}: frames must be a stack (N, H, W) of counts, got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError(f"{npy} holds no frames")
    bad = nonfinite_frames(frames)
    if bad:
        raise ValueError(f"{npy}: {bad} frames {NONFINITE_FRAMES}")
    pos = truth.positions_px
    if pos.dtype.kind not in "iuf" or pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"{npz}: positions_px must be (N, 2) rows of y x, got {pos.dtype} {pos.shape}")
    if not np.isfinite(pos).all():
        raise ValueError(f"{npz}: positions_px contains NaN or infinite values")
    if len(frames) != len(pos):
        raise ValueError(f"{npy} has {len(frames)} frames but {npz} has {len(pos)} positions")
    patches = truth.patches_phase
    if patches.dtype.kind not in "iuf" or patches.shape[:1] != (len(pos),) or patches.ndim != 3:
        raise ValueError(f"{npz}: patches_phase must be (N, h, w) real with N = {len(pos)} positions, got "
                         f"{patches.dtype} {patches.shape}")
    if truth.probe.shape != truth.patch_shape:
        raise ValueError(f"{npz}: probe is {truth.probe.shape}, the patches are {truth.patch_shape}")
    if truth.probe.dtype.kind not in "iufc":
        raise ValueError(f"{npz}: probe must be a complex (or real) array of numbers, got {truth.probe.dtype}")
    if not np.isfinite(truth.probe).all():  # it weights the stitching
        raise ValueError(f"{npz}: probe contains NaN or infinite values")
    if not np.any(truth.probe):
        raise ValueError(f"{npz}: probe is zero everywhere")
    obj = truth.object_phase
    if obj.dtype.kind not in "iuf" or obj.ndim != 2:
        raise ValueError(f"{npz}: object_phase must be a real (H, W) image, got {obj.dtype} {obj.shape}")
    if truth.object_amplitude.shape != obj.shape:
        raise ValueError(f"{npz}: object_amplitude is {truth.object_amplitude.shape}, object_phase {obj.shape}")
    for name, values in (("patches_phase", patches), ("object_phase", obj)):  # the truth the scores compare with
        if not np.isfinite(values).all():
            raise ValueError(f"{npz}: {name} contains NaN or infinite values")
    corners = np.rint(pos)
    h, w = truth.patch_shape
    outside = ((corners < 0).any(axis=1) | (corners[:, 0] + h > obj.shape[0]) | (corners[:, 1] + w > obj.shape[1]))
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise ValueError(f"{npz}: positions_px put {int(outside.sum())} of {len(pos)} {h}x{w} patches outside the "
                         f"{obj.shape[0]}x{obj.shape[1]} object (first: frame {k}, y x {pos[k].tolist()}); positions "
                         "are the patch's top-left corner in object pixels")


# ---------------------------------------------------------------- command


@contextlib.contextmanager
def warnings_as_lines(prog: str):
    """Inside the block a warning (e.g. :func:`simulate_scan`'s clipped pixels) is printed on
    stderr as one line, ``<prog>: warning: <message>``, instead of Python's ``UserWarning``
    with the source line that issued it."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():  # restores the filters and showwarning at the end
        warnings.showwarning = show
        yield


def get_args_parser(prog: str = "edge-ptychonn simulate") -> argparse.ArgumentParser:
    d = ScanSettings()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Simulate a far-field ptychography scan: <out>.npy (int16 frames, "
        "replayable with 'pvapy-ad-sim-server -if') and <out>.npz (positions, ground truth, probe).",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--out", required=True, help="output prefix, e.g. data/generated/demo_scan")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (object, positions, noise)")
    p.add_argument("--family", choices=FAMILIES, default=d.family, help="object structure")
    p.add_argument("--n-positions", type=int, default=d.n_positions, help="number of scan positions (frames)")
    p.add_argument("--pattern", choices=SCAN_PATTERNS, default=d.pattern, help="scan pattern")
    p.add_argument("--overlap", type=float, default=d.overlap, help="linear overlap of neighbouring probe discs, in (0, 1)")
    p.add_argument("--jitter", type=float, default=d.jitter_px, help="uniform random position error, +- pixels")
    p.add_argument("--frame-size", type=int, default=d.frame_size, help="detector frame side after binning")
    p.add_argument("--bin", type=int, default=d.bin_factor, help="detector binning factor (e.g. 4: 512 -> 128)")
    p.add_argument("--probe-diameter", type=float, default=None, help="beam diameter in object pixels (default 40 per 128-pixel window)")
    p.add_argument("--pupil-radius", type=float, default=None, help="pupil radius in far-field pixels (default 12 per 128-pixel window)")
    p.add_argument("--photons", type=float, default=d.photons, help="photons per exposure (expected counts per frame of a non-absorbing object)")
    p.add_argument("--phase-range", type=float, default=d.phase_range_rad, help="object phase spans [0, this] radians")
    p.add_argument("--density", type=float, default=d.density, help="feature density (area fraction covered by particles, cells per area, ...)")
    p.add_argument("--absorption", type=float, default=d.absorption, help="beta/delta: amplitude = exp(-absorption * phase)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def settings_from_args(args: argparse.Namespace) -> ScanSettings:
    return ScanSettings(
        seed=args.seed,
        family=args.family,
        n_positions=args.n_positions,
        pattern=args.pattern,
        overlap=args.overlap,
        jitter_px=args.jitter,
        frame_size=args.frame_size,
        bin_factor=args.bin,
        probe_diameter_px=args.probe_diameter,
        pupil_radius_px=args.pupil_radius,
        photons=args.photons,
        phase_range_rad=args.phase_range,
        density=args.density,
        absorption=args.absorption,
    )


def main(args: argparse.Namespace) -> int:
    """``edge-ptychonn simulate``; a SIGTERM (a batch system's stop, ``kill``) stops it like Ctrl-C: no
    half-written file is left behind, and the command ends with one line (exit 130)."""
    from edge_ptychonn.cli import sigterm_interrupts

    with sigterm_interrupts():
        return _simulate(args)


def _simulate(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"edge-ptychonn simulate: {exc}", file=sys.stderr)
        return 2
    try:  # before the work: an output that cannot be written is a bad argument
        check_writable(scan_paths(args.out))
    except ValueError as exc:
        print(f"edge-ptychonn simulate: --out {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge-ptychonn simulate: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    try:
        with warnings_as_lines("edge-ptychonn simulate"):
            frames, truth = simulate_scan(settings, progress=not args.quiet)
    except ValueError as exc:
        print(f"edge-ptychonn simulate: {exc}", file=sys.stderr)
        return 2
    try:
        npy, npz = save_scan(args.out, frames, truth)
    except OSError as exc:
        print(f"edge-ptychonn simulate: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    st = truth.stats
    print(f"frames   {npy}  int16 {frames.shape}  mean counts/frame {st['mean_counts']:.4g}  "
          f"max pixel {st['max_count']}  clipped pixels {st['n_clipped_pixels']}")
    print(f"truth    {npz}  object {truth.object_phase.shape}  "
          f"phase {truth.object_phase.min():.3f}..{truth.object_phase.max():.3f} rad  "
          f"step {settings.step_px:.1f} px  probe diameter {settings.probe_diameter:.0f} px")
    return 0
