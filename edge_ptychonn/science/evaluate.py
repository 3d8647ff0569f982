"""Score a model on simulated scans: predict each frame, stitch, compare with the truth.

For each scan: the frames go through the model's own preprocessing (the
``preprocess`` block of its ``.json`` sidecar, as in the live pipeline), the
predicted phase patches are stitched with the probe weight (``|probe|**2`` above
``probe_threshold`` of its peak), and the stitched phase is scored against the
ground-truth object over the well-covered region (summed weight >= 0.5), after
removing the constant phase offset: SSIM, PSNR, RMSE (``metrics.score_phase``),
per-patch RMSE, and the same scores for the trivial baselines.

Scans come from files (``--scan PREFIX``, written by ``edge-ptychonn
simulate``) or are simulated on the fly (``--simulate FAMILY:SEED``) with the
model's training scan settings (photons, overlap, phase range, density, probe),
changing only the object family and the seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_ptychonn.science.metrics import baseline_scores, patch_errors, score_phase, summarise_patch_errors
from edge_ptychonn.stream.preprocess import PreprocessConfig, preprocess
from edge_ptychonn.progress import Progress
from edge_ptychonn.science.simulate import FAMILIES, ScanSettings, ScanTruth, load_scan, simulate_scan
from edge_ptychonn.science.stitch import Stitcher, probe_weight

PROBE_THRESHOLD = 0.1
MIN_COVER_WEIGHT = 0.5


def sidecar_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def load_sidecar(model_path: str | Path) -> dict:
    """The JSON metadata beside ``<model>.onnx``."""
    p = sidecar_path(model_path)
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: the model's metadata (preprocess, training) must lie beside it")
    return json.loads(p.read_text())


def preprocess_config(meta: dict) -> PreprocessConfig:
    pp = dict(meta["preprocess"])
    for key in ("crop_hw", "crop_origin_yx"):
        if pp.get(key) is not None:
            pp[key] = tuple(pp[key])
    return PreprocessConfig(**pp)


class OnnxPredictor:
    """Frames (N, H, W) -> phase patches (N, h, w) float32 with ONNX Runtime on the CPU."""

    def __init__(self, model_path: str | Path, pp: PreprocessConfig, batch_size: int = 64, threads: int = 2):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.pp = pp
        self.batch_size = batch_size

    def __call__(self, frames: np.ndarray, progress: Progress | None = None) -> np.ndarray:
        out = []
        for start in range(0, len(frames), self.batch_size):
            x = preprocess(frames[start : start + self.batch_size], self.pp)[:, None]
            out.append(self.session.run(None, {self.input_name: x})[0][:, 0])
            if progress is not None:
                progress.update(len(x))
        return np.concatenate(out).astype(np.float32)


@dataclass
class ScanResult:
    name: str
    scores: dict
    baselines: dict
    patch: dict
    n_frames: int
    image: np.ndarray
    covered: np.ndarray


def score_scan(name: str, predicted: np.ndarray, truth: ScanTruth, probe_threshold: float = PROBE_THRESHOLD) -> ScanResult:
    """Stitch ``predicted`` (N, h, w) at the truth's positions and score it."""
    if predicted.shape != truth.patches_phase.shape:
        raise ValueError(
            f"predicted patches {predicted.shape} do not match the truth {truth.patches_phase.shape}; "
            "the model's output size must equal the scan's patch size"
        )
    weight = probe_weight(truth.probe, probe_threshold)
    st = Stitcher(truth.object_phase.shape, truth.patch_shape, weight=weight)
    st.add_many(predicted, truth.positions_px)
    covered = st.covered(MIN_COVER_WEIGHT)
    image = st.image()
    scores = score_phase(image, truth.object_phase, covered)
    baselines = baseline_scores(
        truth.object_phase, covered, patches_phase=truth.patches_phase, positions_px=truth.positions_px, weight=weight
    )
    patch = summarise_patch_errors(patch_errors(predicted, truth.patches_phase, weight))
    return ScanResult(name, scores, baselines, patch, len(predicted), image, covered)


def scan_from_spec(spec: str, base: ScanSettings) -> tuple[np.ndarray, ScanTruth]:
    """``FAMILY:SEED`` -> a scan simulated with ``base`` settings otherwise."""
    try:
        family, seed = spec.split(":")
        seed = int(seed)
    except ValueError:
        raise ValueError(f"--simulate takes FAMILY:SEED (e.g. mixed:1001), got {spec!r}") from None
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    d = base.to_dict()
    d.update(family=family, seed=seed)
    return simulate_scan(ScanSettings.from_dict(d), progress=False)


def evaluate_scans(
    predictor, scans: list[tuple[str, np.ndarray, ScanTruth]], *, progress: bool = True
) -> list[ScanResult]:
    results = []
    for name, frames, truth in scans:
        bar = Progress(len(frames), f"predict {name}", unit="frames", enabled=progress)
        predicted = predictor(frames, bar)
        bar.close()
        results.append(score_scan(name, predicted, truth))
    return results


def results_table(results: list[ScanResult]) -> str:
    rows = [f"{'scan':<16} {'method':<11} {'SSIM':>6} {'PSNR dB':>8} {'RMSE rad':>9} {'patch RMSE':>11}"]
    for r in results:
        s = r.scores
        rows.append(f"{r.name:<16} {'model':<11} {s['ssim']:6.3f} {s['psnr_db']:8.2f} {s['rmse_rad']:9.4f} "
                    f"{r.patch['patch_rmse_median_rad']:11.4f}")
        for b, bs in r.baselines.items():
            rows.append(f"{'':<16} {b:<11} {bs['ssim']:6.3f} {bs['psnr_db']:8.2f} {bs['rmse_rad']:9.4f} {'':>11}")
    return "\n".join(rows)


def results_json(results: list[ScanResult]) -> dict:
    return {
        r.name: {"model": r.scores, "baselines": r.baselines, "patches": r.patch, "n_frames": r.n_frames,
                 "covered_pixels": int(r.covered.sum())}
        for r in results
    }


def get_args_parser(prog: str = "edge-ptychonn evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Predict every frame of simulated scans with an ONNX PtychoNN, stitch the phase, "
        "and score it against the ground truth (SSIM, PSNR, RMSE; trivial baselines beside).",
    )
    p.add_argument("--model", default="data/ptychonn.onnx", help="ONNX model; its .json sidecar must lie beside it")
    p.add_argument("--scan", action="append", default=[], help="scan prefix written by 'edge-ptychonn simulate' (repeatable)")
    p.add_argument("--simulate", action="append", default=[], metavar="FAMILY:SEED",
                   help="simulate a scan with the model's training settings but this family and seed (repeatable)")
    p.add_argument("--n-positions", type=int, default=None, help="positions per simulated scan (default: as in training's held-out scans, 1024)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    p.add_argument("--json", default=None, help="write the scores to this JSON file")
    p.add_argument("--save-image", default=None, help="save the stitched phase of the first scan (.npy float32)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def main(args: argparse.Namespace) -> int:
    if not args.scan and not args.simulate:
        print("edge-ptychonn evaluate: give at least one --scan PREFIX or --simulate FAMILY:SEED", file=sys.stderr)
        return 2
    try:
        meta = load_sidecar(args.model)
        pp = preprocess_config(meta)
        base = ScanSettings.from_dict(meta["training"]["scan_settings"])
        if args.n_positions is not None:
            base = ScanSettings.from_dict({**base.to_dict(), "n_positions": args.n_positions})
        elif "eval_n_positions" in meta["training"]:
            base = ScanSettings.from_dict({**base.to_dict(), "n_positions": meta["training"]["eval_n_positions"]})
        scans = []
        for path in args.scan:
            frames, truth = load_scan(path)
            scans.append((Path(path).name, frames, truth))
        for spec in args.simulate:
            frames, truth = scan_from_spec(spec, base)
            scans.append((spec, frames, truth))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"edge-ptychonn evaluate: {exc}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    predictor = OnnxPredictor(args.model, pp, args.batch_size, args.threads)
    results = evaluate_scans(predictor, scans, progress=not args.quiet)
    print(results_table(results))
    print(f"({sum(r.n_frames for r in results)} frames in {time.monotonic() - t0:.1f} s; scores over the "
          f"region covered by the probe's bright centre, constant phase offset removed)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results_json(results), indent=2))
    if args.save_image:
        np.save(args.save_image, results[0].image)
    return 0
