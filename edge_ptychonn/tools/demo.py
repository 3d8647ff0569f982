"""``edge-ptychonn demo``: the live chain on a replayed scan, started through ``edge-ptychonn launch``.

The chain (the launcher's, see ``edge-ptychonn launch --help``)::

    pvapy-ad-sim-server (the scan, once) -> pvapy-hpc-consumer -nc N (PtychoNNProcessor, the model)
        -> <prefix>:<id>:output -> pvapy-hpc-collector (StitchProcessor: the live object phase)
                                -> pvapy-hpc-consumer -nc N (Hdf5WriterProcessor: one .h5 per consumer)

The scan is, by default, a held-out scan simulated on first use with the
model's training settings. The launcher starts the consumers with the sim
server beside them, then their clients; prints a one-line status each second; stops
everything by process id once the scan has gone through (also on Ctrl-C); and
prints frames sent, processed, written, placed and lost, the stitcher's cost
per frame, and the SSIM of the live stitched phase against the scan's truth,
with a PNG of the stitched phase beside the truth at the printed path (in
``--out``). HDF5 files are written when h5py is installed (``pip install
'edge-ptychonn[hdf5]'``). Each run first removes the previous run's stitched
image and HDF5 files from ``--out`` (the demo's own folder; the chain's writers
never replace a file). Exit status 0 when no frame was lost.

A ``--scan`` whose frames are not the model's input size (a detector's, e.g.
516x516 for a 128x128 model) is cut as the consumers cut a detector's frames:
``--crop``, ``--crop-origin`` and ``--bin`` are their ``crop``, ``cropOrigin``
and ``bin`` (default: the model card's).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from edge_ptychonn import cli_options
from edge_ptychonn.model_card import ModelCard, default_model_path, find_card
from edge_ptychonn.science import accuracy

from . import launch

DEFAULT_SCAN_SEED = 1001


def generated_dir() -> Path:
    """Where simulated scans are kept: ``data/generated/`` in a source checkout,
    else ``~/.cache/edge-ptychonn`` (an installed package's folder may be read-only)."""
    checkout = Path(__file__).resolve().parents[2] / "data"
    return checkout / "generated" if checkout.is_dir() else Path.home() / ".cache" / "edge-ptychonn"


def get_args_parser(prog: str = "edge-ptychonn demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scan", type=Path, default=None,
                   help="(N, ny, nx) .npy of frames to replay, its .npz truth beside it for the score and the "
                        "stitcher's positions (default: a held-out scan simulated on first use "
                        f"with the model's training settings and seed {DEFAULT_SCAN_SEED}, kept in data/generated/, "
                        "or in ~/.cache/edge-ptychonn/ when installed)")
    p.add_argument("--model", type=Path, default=default_model_path(), help="ONNX model (default: %(default)s)")
    from engines.registry import ENGINE_NAMES

    p.add_argument("--engine", default="auto",
                   help=f"inference engine: {', '.join(ENGINE_NAMES)} (default: %(default)s)")
    p.add_argument("--consumers", type=int, default=2, help="number of inference consumers (default: %(default)s)")
    p.add_argument("--fps", type=float, default=60.0, help="replay frame rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per inference batch and per distributor turn (default: %(default)s)")
    p.add_argument("--cpu-threads", type=int, default=1, help="cpuThreads of each consumer: engine threads per CPU worker, 0 = the consumer's own layout (default: %(default)s)")
    cli_options.add_detector_options(p, "the model card's")
    p.add_argument("--prefix", default="demo", help="channel prefix: <prefix>:inference:<id>:output, "
                   "<prefix>:stitch:1:output, ... (default: %(default)s)")
    p.add_argument("--channel", default="ad:image", help="detector channel the sim server publishes (default: %(default)s)")
    p.add_argument("--start-delay", type=float, default=12.0, help="seconds the sim server waits before streaming, so that all clients connect (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="stop after this many seconds of streaming whatever happened (default: %(default)s)")
    p.add_argument("--no-hdf5", action="store_true", help="no HDF5 writers")
    p.add_argument("--sweep", default=None, metavar="FPS,FPS,...",
                   help="the chain's figures by rate: run the chain once per replay rate (a fresh chain each, "
                        "channels suffixed by the point's number), then print one table row per rate (frames sent, "
                        "processed, delivered fps, written, placed, lost, collector lost, the stitcher's cost per "
                        "frame) and the figures at the highest rate that lost nothing (collector included) and that "
                        "inference kept up with (delivered >= 95 %% of the rate)")
    p.add_argument("--out", type=Path, default=Path("results/demo"),
                   help="folder for the stitched image, its PNG, the HDF5 files and the logs (default: %(default)s)")
    return p


def ensure_scan(scan: Path | None, card: ModelCard | None) -> Path:
    """The scan to replay: ``scan``, or the model's held-out demo scan (its
    card's training scan settings with a seed no training used), simulated on
    first use into a file named after its settings (so a new model with other
    settings gets its own scan)."""
    if scan is not None:
        if not scan.is_file():
            raise FileNotFoundError(f"scan {scan} not found")
        launch._check_scan(str(scan), "--scan")  # one the launcher refuses: in the demo's own option name
        if not scan.with_suffix(".npz").is_file():  # the stitcher's positions (and the truth for the score)
            raise FileNotFoundError(f"--scan {scan} has no {scan.with_suffix('.npz').name} beside it: the stitcher "
                                    "needs the scan's positions from there ('edge-ptychonn simulate' writes both)")
        return scan
    from edge_ptychonn.science.simulate import save_scan, simulate_scan

    settings = accuracy.held_out_settings(card, DEFAULT_SCAN_SEED)
    key = hashlib.sha256(json.dumps(settings.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    scan = generated_dir() / f"demo_scan-{key}.npy"
    if not scan.is_file() or not scan.with_suffix(".npz").is_file():
        print(f"simulating the held-out demo scan (seed {DEFAULT_SCAN_SEED}) into {scan} ...", file=sys.stderr)
        frames, truth = simulate_scan(settings)
        save_scan(scan, frames, truth)
    return scan


def chain_config(args: argparse.Namespace, scan: Path, card: ModelCard | None) -> launch.LaunchConfig:
    """The launcher's configuration for this demo."""
    out = args.out.resolve()
    config = {
        "log_dir": str(out / "logs"), "idle_s": 5.0, "timeout_s": args.timeout + args.start_delay,
        "source": {"scan": str(scan.resolve()), "channel": args.channel, "fps": args.fps, "start_delay_s": args.start_delay},
        "inference": {"consumers": args.consumers, "prefix": f"{args.prefix}:inference",
                      "distributor_updates": args.batch_size,
                      "args": {"modelPath": str(args.model.resolve()), "engine": args.engine,
                               "batchSize": args.batch_size, "cpuThreads": args.cpu_threads,
                               **cli_options.detector_args(args)}},
        "stitch": {"prefix": f"{args.prefix}:stitch", "args": {"outputDirectory": str(out / "stitched"), "publishRate": 2.0}},
    }
    if card is not None:
        config["stitch"]["args"].update(probeThreshold=card.stitch.probe_threshold, minCoverWeight=card.stitch.min_cover_weight)
    if not args.no_hdf5:
        try:
            import h5py  # noqa: F401
        except ImportError:
            print("demo: h5py not installed (pip install 'edge-ptychonn[hdf5]'): no HDF5 files", file=sys.stderr)
        else:
            config["hdf5"] = {"prefix": f"{args.prefix}:hdf5", "args": {"outputDirectory": str(out / "h5")}}
            if args.model.with_suffix(".json").is_file():
                config["hdf5"]["args"]["modelCard"] = str(args.model.with_suffix(".json").resolve())
    return launch.LaunchConfig.from_dict(config)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--sweep takes frame rates separated by commas, e.g. 60,80,100; got {text!r}") from None
    if not all(math.isfinite(r) and r > 0 for r in rates):  # before the scan is simulated for nothing
        raise ValueError(f"--sweep rates must be finite numbers > 0, got {text!r}")
    return sorted(rates)


SUSTAINED = 0.95  # delivered / offered rate at which a sweep point counts as keeping up

SWEEP_HEADER = ["fps", "sent", "processed", "delivered fps", "written", "placed", "lost", "collector lost",
                "stitch us/frame"]


def sweep_rows(rates: list[float], results: list, cfg_hdf5: bool) -> list[list[str]]:
    """One row per rate from ``(snapshot, frames sent, delivered fps)``; ``-`` where the chain
    gave nothing. "lost": sent but not at the end of the chain (HDF5, else inference) or
    not placed by the stitcher."""
    rows = []
    for fps, result in zip(rates, results):
        if result is None:
            rows.append([f"{fps:g}"] + ["-"] * (len(SWEEP_HEADER) - 1))
            continue
        snap, n_sent, delivered = result
        reached = min(snap.written() if cfg_hdf5 else snap.processed(), snap.placed())
        rows.append([f"{fps:g}", str(n_sent), str(snap.processed()), f"{delivered:.0f}" if delivered else "-",
                     str(snap.written()) if cfg_hdf5 else "-", str(snap.placed()), str(n_sent - reached),
                     str(snap.stitcher_lost()),  # not the gaps of frames dropped upstream
                     f"{(snap.stitch or {}).get('userStats', {}).get('stitchTimeUs', 0.0):.0f}"])
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def clear_results(out: Path) -> None:
    """Remove the previous demo run's stitched image and HDF5 files from ``out`` (the demo's
    own folder): the writers never replace a file, so each run would add its own beside them."""
    for folder, pattern in (("stitched", "*"), ("h5", "*.h5")):
        for old in (out / folder).glob(pattern):
            old.unlink()


def sweep(args: argparse.Namespace, scan: Path, card: ModelCard | None, rates: list[float]) -> int:
    """The chain once per rate; the table; the figures at the highest lossless rate."""
    results: list = []
    has_hdf5 = chain_config(args, scan, card).hdf5 is not None
    base_out, base_prefix, base_channel = args.out, args.prefix, args.channel
    for i, fps in enumerate(rates, 1):
        point = argparse.Namespace(**{**vars(args), "fps": fps, "out": base_out / f"fps{fps:g}",
                                      "prefix": f"{base_prefix}{i}", "channel": f"{base_channel}{i}"})
        print(f"\n== chain at {fps:g} frames/s ({i}/{len(rates)}) ==", flush=True)
        clear_results(point.out)
        got: list = []
        code = launch.run(chain_config(point, scan, card), prog="edge-ptychonn demo", results=got)
        results.append(got[0] if got else None)
        if code == 130:
            return 130
    rows = sweep_rows(rates, results, has_hdf5)
    print("\nThe chain by replay rate (scan " + str(scan) + "):")
    print(format_table(SWEEP_HEADER, rows))
    print("(delivered fps: the inference stage's highest published rate over 5 s; a point is sustained when it "
          f"reaches {SUSTAINED:.0%} of the rate, else the queues absorbed the excess of a short scan)")
    good = [r for r, fps in zip(rows, rates) if r[6] == "0" and r[7] == "0" and r[3] != "-"
            and float(r[3]) >= SUSTAINED * fps]
    if not good:
        print("\nno rate was lossless and sustained: try lower rates")
        return 1
    best = good[-1]
    print(f"\nhighest lossless sustained rate {best[0]} frames/s (delivered {best[3]}): frames in {best[1]}, "
          f"images written {best[4]}, frames placed {best[5]}, frames lost {best[6]}, "
          f"stitcher cost {best[8]} us CPU per frame")
    return 0


# the consumers' processor arguments the demo's options set: named as the user wrote them
OPTION_OF_ARG = {"batchSize": "--batch-size", "cpuThreads": "--cpu-threads", **cli_options.DETECTOR_OPTIONS}


def check_options(args: argparse.Namespace):
    """The options the launcher and the consumers would refuse, refused here first in the demo's
    own option names (not the launcher's file keys, ``batchSize`` or ``[inference] prefix``) and
    before a scan is simulated for nothing. Raises ValueError with the reason; returns the
    consumers' ``ProcessorConfig``."""
    if not 1 <= args.consumers <= launch.MAX_CONSUMERS or not (math.isfinite(args.fps) and args.fps >= launch.MIN_FPS):
        raise ValueError(f"--consumers must be 1..{launch.MAX_CONSUMERS} and --fps a finite number >= {launch.MIN_FPS:g}, "
                         f"got {args.consumers} and {args.fps:g}")
    from edge_ptychonn.stream.config import parse_processor_args
    from engines.registry import check_name

    try:
        check_name(args.engine)
    except ValueError as exc:
        raise ValueError(f"--engine: {exc}") from None
    try:  # the consumers' own parsing: their ranges, in one place
        config, _ = parse_processor_args({"modelPath": str(args.model), "batchSize": args.batch_size,
                                          "cpuThreads": args.cpu_threads, **cli_options.detector_args(args)})
    except ValueError as exc:
        raise ValueError(cli_options.in_option_names(str(exc), OPTION_OF_ARG)) from None
    for option, value in (("--prefix", args.prefix), ("--channel", args.channel)):
        if not value or "*" in value:
            raise ValueError(f"{option} must be a channel name without '*' (PvaPy puts the consumer id there), "
                             f"got {value!r}")
    if re.match(rf"{re.escape(args.prefix)}:(inference|stitch|hdf5):\d+:", args.channel):
        raise ValueError(f"--channel {args.channel!r} is among the demo's own channels (--prefix {args.prefix!r}); "
                         "give it another name")
    return config


def check_scan_fits(scan: Path, config, input_hw: tuple[int, int], args: argparse.Namespace,
                    card: ModelCard | None) -> None:
    """ValueError, in the demo's option names, when the scan's frames, cut by the consumers' crop and bin
    (``config.preprocess``: ``--crop``, ``--crop-origin``, ``--bin``, else the card's), are not the model's
    input: every frame would be refused as a bad frame (shape) and lost."""
    source = ("--crop, --crop-origin, --bin" if cli_options.detector_args(args)
              else "the model card's" if card is not None else "the model has no card")
    try:
        cli_options.check_detector_fit(np.load(scan, mmap_mode="r").shape[1:], config.preprocess, input_hw, source)
    except ValueError as exc:
        raise ValueError(f"--scan {scan}: {exc}") from None


def main(args: argparse.Namespace) -> int:
    try:
        if not args.model.is_file():
            raise FileNotFoundError(f"model {args.model} not found")
        from engines.onnx_model import read_signature

        signature = read_signature(args.model)  # not ONNX: one line here, not a chain whose consumers all fail
        config = check_options(args)
        if not (math.isfinite(args.timeout) and args.timeout > 0 and 0 <= args.start_delay <= launch.MAX_START_DELAY_S):
            raise ValueError(f"--timeout must be > 0 and --start-delay 0..{launch.MAX_START_DELAY_S:g} (seconds), got {args.timeout:g} "
                             f"and {args.start_delay:g}")
        rates = _rates(args.sweep) if args.sweep is not None else None
        card = find_card(args.model)
        scan = ensure_scan(args.scan, card)
        check_scan_fits(scan, config, signature.input_shape, args, card)  # frames the model cannot take
        cfg = chain_config(args, scan, card)
        launch.check_frames_fit(cfg)  # the launcher's checks of the inference stage, as `launch` runs them
        if rates is not None:
            return sweep(args, scan, card, rates)
        clear_results(args.out)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"edge-ptychonn demo: {exc}", file=sys.stderr)
        return 2
    frames = np.load(scan, mmap_mode="r")
    print(f"demo: {len(frames)} frames {frames.shape[1]}x{frames.shape[2]} {frames.dtype} from {scan} at {args.fps:g} fps "
          f"-> {args.consumers} consumer(s), model {args.model.name}, stitcher"
          f"{', HDF5 writers' if cfg.hdf5 else ''}; results in {args.out}", flush=True)
    code = launch.run(cfg, prog="edge-ptychonn demo")
    if code in (2, 130):  # the chain never started, or was stopped by Ctrl-C (SIGTERM, SIGHUP): nothing to view
        return code
    print(f"\nView the channels live next time with: bash scripts/view.sh {args.prefix}:stitch:1:output "
          f"{args.prefix}:inference:1:output", flush=True)
    if not viewer_installed():  # the demo's set-up leaves the viewer extra out: view.sh would only say so
        print("(view.sh needs the viewer extra, which the demo leaves out: bash scripts/setup-venv.sh viewer)", flush=True)
    return code


def viewer_installed() -> bool:
    """Whether c2dv (c2dataviewer, the viewer extra) can be imported, without importing it (Qt)."""
    try:
        return importlib.util.find_spec("c2dataviewer") is not None
    except (ImportError, ValueError):
        return False
