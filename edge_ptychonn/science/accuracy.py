"""Accuracy of a model on simulated scans: predict through an engine, stitch, score.

The one home of stitch-and-score, shared by ``edge-ptychonn evaluate``,
``train`` (the held-out scores on its model card) and the demo (the phase
stitched from the frames that came back over PvaPy):

- :func:`predict` runs frames through the model's preprocessing (its card's
  ``preprocess`` block, as in the live pipeline), any engine
  (``engines.create_engine``; any batch: fixed-batch models are padded) and,
  when given, the output mask (the card's ``output_mask``, as the processor
  publishes: a constant outside the illuminated region);
- :func:`score_scan` stitches predicted patches with the probe weight
  (``|probe|**2`` above the card's ``stitch.probe_threshold`` of its peak) and
  scores the stitched phase against the ground truth over the well-covered
  region (summed weight >= ``stitch.min_cover_weight``), after removing the
  constant phase offset: SSIM, PSNR, RMSE (``metrics.score_phase``), per-patch
  RMSE, the largest |phase| of any patch outside the bright centre (what a
  viewer of single patches sees there), and the same scores for the trivial
  baselines;
- :func:`held_out_settings` gives the settings of a held-out scan: the model's
  training scan settings with a new seed (and family, and photons) and
  ``training.eval_n_positions`` positions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_ptychonn.model_card import ModelCard, StitchSettings
from edge_ptychonn.progress import Progress
from edge_ptychonn.science.metrics import (SSIM_RADIUS, baseline_scores, patch_errors, score_phase, ssim_fits,
                                           summarise_patch_errors)
from edge_ptychonn.science.simulate import FAMILIES, ScanSettings, ScanTruth, simulate_scan
from edge_ptychonn.science.stitch import Stitcher, probe_weight
from edge_ptychonn.stream.postprocess import OutputMask, apply_output_mask
from edge_ptychonn.stream.preprocess import PreprocessConfig, RunningTotal, preprocess

DEFAULT_EVAL_N_POSITIONS = 1024


@dataclass
class ScanResult:
    """Scores of one scan: the model's, the baselines', per-patch errors, and the stitched image."""

    name: str
    scores: dict
    baselines: dict
    patch: dict
    n_frames: int
    image: np.ndarray
    covered: np.ndarray


def open_engine(model_path: str | Path, engine: str = "auto", *, device: str = "auto", batch_size: int = 64,
                threads: int = 2, precision: str = "fp32"):
    """An engine (``engines.create_engine``) for scoring: any engine, batches up to ``batch_size``;
    ``precision`` as the processor's (``auto`` with engine ``auto``: what a consumer would pick)."""
    from engines import EngineOptions, create_engine

    return create_engine(engine, EngineOptions(Path(model_path), device=device, max_batch=batch_size,
                                               cpu_threads=threads, precision=precision))


def predict(engine, frames: np.ndarray, pp: PreprocessConfig, progress: Progress | None = None,
            output_mask: OutputMask | None = None, running: RunningTotal | None = None) -> np.ndarray:
    """Raw frames (N, H, W) -> phase patches (N, h, w) float32 through ``engine``
    (and ``output_mask``, when given, as the processor applies it). With ``normalize: "running"``
    the frames are counted in order into ``running`` (default: a new one, as for frames that start
    a scan; give one that has counted the frames before them for frames from within a scan)."""
    out = []
    if running is None:  # normalize 'running': over this scan's frames, in order
        running = RunningTotal(pp.normalize_window)
    for start in range(0, len(frames), engine.max_batch):
        x = preprocess(frames[start : start + engine.max_batch], pp, running)[:, None]
        out.append(apply_output_mask(engine.infer(x), output_mask)[:, 0])
        if progress is not None:
            progress.update(len(x))
    return np.concatenate(out).astype(np.float32, copy=False)


def score_scan(name: str, predicted: np.ndarray, truth: ScanTruth, stitch: StitchSettings = StitchSettings(),
               indices: np.ndarray | None = None) -> ScanResult:
    """Stitch ``predicted`` (N, h, w) at the truth's positions and score it.

    ``indices``: which frames of the scan the patches are (default: all, in
    order), e.g. the frames that came back from a live stream.
    """
    indices = np.arange(len(truth.positions_px)) if indices is None else np.asarray(indices)
    expected = (len(indices), *truth.patch_shape)
    if predicted.shape != expected:
        raise ValueError(f"predicted patches {predicted.shape} do not match the truth {expected}; "
                         "the model's output size must equal the scan's patch size")
    weight = probe_weight(truth.probe, stitch.probe_threshold)
    st = Stitcher(truth.object_phase.shape, truth.patch_shape, weight=weight)
    st.add_many(predicted, truth.positions_px[indices])
    covered = st.covered(stitch.min_cover_weight)
    check_scorable(name, covered, len(indices), stitch)
    image = st.image()
    scores = score_phase(image, truth.object_phase, covered)
    baselines = baseline_scores(  # the baselines at the same frames as the model
        truth.object_phase, covered, patches_phase=truth.patches_phase[indices], positions_px=truth.positions_px[indices],
        weight=weight
    )
    patch = summarise_patch_errors(patch_errors(predicted, truth.patches_phase[indices], weight))
    # what a viewer of single patches sees beyond the bright centre (the stitcher ignores it)
    outside = np.abs(predicted[:, weight == 0]) if np.any(weight == 0) else np.zeros(1)
    patch["outside_max_abs_rad"] = float(outside.max())
    patch["outside_mean_abs_rad"] = float(outside.mean())
    return ScanResult(name, scores, baselines, patch, len(predicted), image, covered)


def coverage(truth: ScanTruth, stitch: StitchSettings = StitchSettings()) -> np.ndarray:
    """The pixels (H, W) that :func:`score_scan` scores for all of the scan's frames (the summed
    probe weight at least ``stitch.min_cover_weight``), known before any prediction."""
    weight = probe_weight(truth.probe, stitch.probe_threshold)
    st = Stitcher(truth.object_phase.shape, truth.patch_shape, weight=weight)
    blank = np.zeros(truth.patch_shape, dtype=np.float32)
    for pos in truth.positions_px:
        st.add(blank, pos)
    return st.covered(stitch.min_cover_weight)


def check_scorable(name: str, covered: np.ndarray, n_frames: int, stitch: StitchSettings) -> None:
    """``ValueError`` naming scan ``name`` and the remedy when its ``n_frames`` frames cover no
    region (``covered``) that the SSIM window fits in: one probe's bright centre is a ring too
    thin for it, so a scan needs a few overlapping positions to be scored."""
    if ssim_fits(covered):
        return
    raise ValueError(
        f"scan {name}: its {n_frames} frame(s) cover no region that can be scored (where the probe's bright "
        f"centre sums to the minimum cover weight {stitch.min_cover_weight:g}, the {2 * SSIM_RADIUS + 1}-pixel "
        "SSIM window fits nowhere): score a scan of more positions (evaluate: --n-positions; 2 or more at the "
        "shipped model's scan settings) or of more overlap")


def held_out_settings(card: ModelCard | None, seed: int, *, family: str | None = None,
                      n_positions: int | None = None, photons: float | None = None) -> ScanSettings:
    """A held-out scan: the card's training scan settings (else the simulator's
    defaults) with ``seed``, ``family`` and ``photons`` if given, and ``n_positions`` (default:
    the card's ``training.eval_n_positions``, else :data:`DEFAULT_EVAL_N_POSITIONS`)."""
    training = card.training if card is not None else None
    try:
        base = ScanSettings.from_dict(training.scan_settings) if training and training.scan_settings else ScanSettings()
    except ValueError as exc:
        raise ValueError(f"the model card's training.scan_settings: {exc}") from None
    n = n_positions or (training.eval_n_positions if training else None) or DEFAULT_EVAL_N_POSITIONS
    return replace(base, seed=seed, n_positions=n, family=family or base.family, photons=photons or base.photons)


def parse_scan_spec(spec: str) -> tuple[str, int]:
    """``FAMILY:SEED`` -> (family, seed); ``ValueError`` says the expected form."""
    try:
        family, seed = spec.split(":")
        seed = int(seed)
    except ValueError:
        raise ValueError(f"a simulated scan is FAMILY:SEED (e.g. mixed:1001), got {spec!r}") from None
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if seed < 0:
        raise ValueError(f"a simulated scan's seed must be >= 0, got {spec!r}")
    return family, seed


def simulate_held_out(specs: list[str], card: ModelCard | None, n_positions: int | None = None,
                      photons: float | None = None, *, progress: bool = False):
    """``[(spec, frames, truth)]`` for ``FAMILY:SEED`` specs, simulated with :func:`held_out_settings`
    (with a progress display per scan when ``progress``); the simulator's warnings (clipped pixels)
    are issued again naming the scan."""
    scans = []
    for spec in specs:
        family, seed = parse_scan_spec(spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frames, truth = simulate_scan(held_out_settings(card, seed, family=family, n_positions=n_positions,
                                                            photons=photons), progress=progress)
        for w in caught:
            warnings.warn(f"scan {spec}: {w.message}", w.category, stacklevel=2)
        scans.append((spec, frames, truth))
    return scans


def scan_preprocess(pp: PreprocessConfig, frame_hw, input_hw) -> PreprocessConfig:
    """``pp`` for frames of ``frame_hw``: frames already of the model's input size ``input_hw`` (a simulated
    scan's: the simulator makes them at the card's training frame size) are taken as the detector's crop and
    bin made them, so ``pp`` without its crop and bin (a fine-tuned model's card holds the detector's, e.g.
    ``crop 512x512``, ``bin 4``, which no such frame fits); other frames get ``pp`` as it is. Where the crop
    and bin fit such frames they leave them as they are: the same inputs either way."""
    if tuple(frame_hw) == tuple(input_hw) and (pp.crop_hw is not None or pp.bin_factor != 1):
        return replace(pp, crop_hw=None, crop_origin_yx=None, bin_factor=1)
    return pp


def evaluate_scans(engine, pp: PreprocessConfig, scans: list[tuple[str, np.ndarray, ScanTruth]],
                   stitch: StitchSettings = StitchSettings(), *, progress: bool = True,
                   output_mask: OutputMask | None = None) -> list[ScanResult]:
    """Predict every scan's frames with ``engine`` (and ``output_mask``) and score each (:func:`score_scan`).

    Frames already of the engine's input size skip the card's crop and bin (:func:`scan_preprocess`).
    ``ValueError`` naming the scan, before any prediction, when a scan's frames do not become the
    engine's input shape through ``pp``, when its truth's patches are not the size of the model's
    phase patches (a scan simulated with ``--bin``), or when it covers too little to be scored
    (:func:`check_scorable`)."""
    for name, frames, truth in scans:
        try:
            shape = scan_preprocess(pp, frames.shape[1:], engine.input_shape).output_shape(frames.shape[1:])
        except ValueError as exc:
            raise ValueError(f"scan {name}: {exc}") from None
        if shape != tuple(engine.input_shape):
            raise ValueError(f"scan {name}: its {frames.shape[1]}x{frames.shape[2]} frames become {shape[0]}x{shape[1]} "
                             f"model inputs after preprocessing, the model takes "
                             f"{engine.input_shape[0]}x{engine.input_shape[1]}")
        if tuple(truth.patch_shape) != tuple(engine.input_shape):  # PtychoNN's patches are its input's size
            (ph, pw), (h, w) = truth.patch_shape, engine.input_shape
            raise ValueError(f"scan {name}: its truth's patches are {ph}x{pw} object pixels, the model's phase "
                             f"patches {h}x{w}: they cannot be stitched together (a scan simulated with --bin has "
                             "patches of the detector's size before binning)")
        check_scorable(name, coverage(truth, stitch), len(frames), stitch)
    results = []
    for name, frames, truth in scans:
        bar = Progress(len(frames), f"predict {name}", unit="frames", enabled=progress)
        scan_pp = scan_preprocess(pp, frames.shape[1:], engine.input_shape)
        predicted = predict(engine, frames, scan_pp, bar, output_mask)
        bar.close()
        results.append(score_scan(name, predicted, truth, stitch))
    return results


def results_table(results: list[ScanResult]) -> str:
    rows = [f"{'scan':<16} {'method':<11} {'SSIM':>6} {'PSNR dB':>8} {'RMSE rad':>9} {'patch RMSE':>11} "
            f"{'max|phase| outside':>19}"]
    for r in results:
        s = r.scores
        rows.append(f"{r.name:<16} {'model':<11} {s['ssim']:6.3f} {s['psnr_db']:8.2f} {s['rmse_rad']:9.4f} "
                    f"{r.patch['patch_rmse_median_rad']:11.4f} {r.patch['outside_max_abs_rad']:19.3f}")
        for b, bs in r.baselines.items():
            rows.append(f"{'':<16} {b:<11} {bs['ssim']:6.3f} {bs['psnr_db']:8.2f} {bs['rmse_rad']:9.4f} {'':>11}")
    return "\n".join(rows)


def results_json(results: list[ScanResult]) -> dict:
    """Scores by scan name, as ``evaluate --json`` writes and the model card's ``accuracy.scans`` holds
    (a name that repeats, two scans of one file name in different folders, gets ``-2``, ``-3``, ...)."""
    out: dict = {}
    for r in results:
        name, k = r.name, 1
        while name in out:
            k += 1
            name = f"{r.name}-{k}"
        out[name] = {"model": r.scores, "baselines": r.baselines, "patches": r.patch, "n_frames": r.n_frames,
                     "covered_pixels": int(r.covered.sum())}
    return out
