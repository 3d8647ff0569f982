"""``edge-ptychonn evaluate``: score a model on simulated scans (predict, stitch, compare with the truth).

The frames go through the model's own preprocessing (its card's ``preprocess``
block, as in the live pipeline) and an inference engine; the predicted phase
patches are stitched with the card's ``stitch`` settings and scored against the
ground truth (``science.accuracy``): SSIM, PSNR, RMSE, per-patch RMSE, and the
same scores for the trivial baselines.

Scans come from files (``--scan PREFIX``, written by ``edge-ptychonn
simulate``) or are simulated on the fly (``--simulate FAMILY:SEED``) with the
model's training scan settings (photons, overlap, phase range, density, probe),
changing only the object family and the seed (and the photons, with
``--photons``). A model without a card (e.g. edgePtychoNN's) is scored with no
preprocessing, the default stitch settings and the simulator's default scans.
Recorded frames (an HDF5 recording, or a ``.npy`` without its ``.npz`` truth)
cannot be scored here: ``edge-ptychonn finetune`` scores models on held-out
positions against a reconstruction of them.

The engine takes batches of ``--batch-size`` frames (1..256, as the processor's
``batchSize``), or of the longest scan's frames when that is fewer: an engine
is made and warmed up for its largest batch.

The patches are scored as the processor publishes them: with the card's
output mask (a constant outside the illuminated region) unless
``--no-output-mask``; the stitched scores are the same either way, since
stitching weights only the probe's bright centre.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from engines import EngineUnavailable
from engines.registry import ENGINES

from edge_ptychonn.files import check_writable, load_npy, save_npy_whole, write_bytes_whole
from edge_ptychonn.model_card import ModelCard, card_path, check_input_size, default_model_path, find_card
from edge_ptychonn.science import accuracy
from edge_ptychonn.science.finetune import HDF5_SUFFIXES
from edge_ptychonn.science.simulate import load_scan, scan_paths, warnings_as_lines
from edge_ptychonn.stream.arguments import convert_value, integer
from edge_ptychonn.stream.config import MAX_BATCH_SIZE


def get_args_parser(prog: str = "edge-ptychonn evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Predict every frame of simulated scans with an ONNX PtychoNN, stitch the phase, "
        "and score it against the ground truth (SSIM, PSNR, RMSE; trivial baselines beside).",
    )
    p.add_argument("--model", type=Path, default=default_model_path(),
                   help="ONNX model; its card (.json) beside it gives preprocessing, stitch and scan settings "
                        "(default: the shipped model)")
    p.add_argument("--scan", action="append", default=[],
                   help="scan prefix written by 'edge-ptychonn simulate': frames <prefix>.npy and their truth "
                        "<prefix>.npz (repeatable); recorded frames have no truth to score against (see "
                        "'edge-ptychonn finetune', which scores held-out positions against a reconstruction)")
    p.add_argument("--simulate", action="append", default=[], metavar="FAMILY:SEED",
                   help="simulate a scan with the model's training settings but this family and seed (repeatable)")
    p.add_argument("--photons", type=float, default=None,
                   help="photons per exposure of the --simulate scans (default: the card's training photons), "
                        "e.g. 1e5 for a tenth of the default dose")
    p.add_argument("--no-output-mask", dest="output_mask", action="store_false",
                   help="score the network's raw patches, without the card's output mask")
    p.add_argument("--n-positions", type=int, default=None,
                   help=f"positions per simulated scan (default: the card's training.eval_n_positions, "
                        f"else {accuracy.DEFAULT_EVAL_N_POSITIONS}); a scan is scored where overlapping probes "
                        "cover a region wide enough for the SSIM window, so it needs a few: 2 or more at the "
                        "shipped model's scan settings")
    p.add_argument("--engine", default="auto",
                   help=f"inference engine: {', '.join(('auto', *ENGINES))} (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "tf32", "fp16", "bf16"),
                   help="fp32, bf16, fp16, tf32 (what the engine offers), or auto: with --engine auto the precision "
                        "a consumer on this machine picks (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64,
                   help=f"frames per inference batch, 1..{MAX_BATCH_SIZE} as the processor's batchSize; the engine is "
                        "made for at most the longest scan's frames (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2,
                   help="engine CPU threads; 0: all usable cores, laid out as a consumer would (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the scores to this JSON file")
    p.add_argument("--save-image", default=None, help="save the stitched phase of the first scan (.npy float32; "
                   "a name without .npy gets it, as numpy's np.save does: the path written is printed)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def scan_frames(path: str) -> int | None:
    """The number of frames of the ``--scan`` ``path`` (from its ``.npy``; None when that is unreadable,
    which ``load_scan`` then says in its words). ``FileNotFoundError`` that says what evaluate needs
    when the scan's files are not there: an HDF5 recording, or frames without their truth, cannot
    be scored here."""
    npy, npz = scan_paths(path)  # ValueError for a name of no file
    missing = [p for p in (npy, npz) if not p.is_file()]
    if missing:
        needs = ("evaluate scores a simulated scan against its truth: frames <prefix>.npy and truth <prefix>.npz "
                 "beside them, as 'edge-ptychonn simulate --out <prefix>' writes them")

        def recorded(frames) -> str:
            return ("recorded frames have no truth to score against: 'edge-ptychonn finetune --frames "
                    f"{frames} --object <reconstruction>' scores the base and the fine-tuned model on held-out "
                    "positions against your reconstruction")

        if Path(path).suffix.lower() in HDF5_SUFFIXES:
            raise FileNotFoundError(f"--scan {path} names an HDF5 recording, not a scan: {needs}; {recorded(path)}")
        raise FileNotFoundError(f"--scan {path}: {' and '.join(map(str, missing))} not found; {needs}"
                                + (f"; {recorded(npy)}" if npy.is_file() else ""))
    try:
        return len(load_npy(npy, mmap_mode="r"))
    except (ValueError, TypeError):
        return None


def output_clash(args: argparse.Namespace, image_path: Path | None) -> str | None:
    """What is wrong when ``--json`` or ``--save-image`` (``image_path``, with its ``.npy``) names a file
    that evaluate reads (the model, its card, a ``--scan``'s frames or truth) or the other output: the
    scores would replace it (``--json models/site1.json`` beside ``models/site1.onnx`` replaced the
    model's card, which every command and the processor then refused); None when nothing clashes."""
    inputs = {card_path(args.model).resolve(): f"the model card of {args.model}",
              Path(args.model).resolve(): "the model"}
    for scan in args.scan:
        try:
            npy, npz = scan_paths(scan)
        except ValueError:  # a name of no file: said in its own words later
            continue
        inputs[npy.resolve()] = f"the frames of --scan {scan}"
        inputs[npz.resolve()] = f"the truth of --scan {scan}"
    outputs = [(option, Path(path)) for option, path in (("--json", args.json), ("--save-image", image_path))
               if path is not None]
    for option, path in outputs:
        read = inputs.get(path.resolve())
        if read:
            return f"{option} {path} would overwrite {read}, which evaluate reads; choose another file"
    if len(outputs) == 2 and outputs[0][1].resolve() == outputs[1][1].resolve():
        return f"--json and --save-image name the same file {outputs[0][1]}; choose two files"
    return None


def main(args: argparse.Namespace) -> int:
    """``edge-ptychonn evaluate``; a SIGTERM (a batch system's stop, ``kill``) stops it like Ctrl-C: the
    engine is closed, no half-written output is left behind, and the command ends with one line (exit 130).
    Warnings (a simulated scan's clipped pixels) are one line each on stderr."""
    from edge_ptychonn.cli import sigterm_interrupts

    with sigterm_interrupts(), warnings_as_lines("edge-ptychonn evaluate"):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    if not args.scan and not args.simulate:
        print("edge-ptychonn evaluate: give at least one --scan PREFIX or --simulate FAMILY:SEED", file=sys.stderr)
        return 2
    if args.photons is not None and not (np.isfinite(args.photons) and args.photons > 0):
        print(f"edge-ptychonn evaluate: --photons must be > 0, got {args.photons}", file=sys.stderr)
        return 2
    for name, value in (("n-positions", args.n_positions), ("batch-size", args.batch_size)):
        if value is not None and value < 1:
            print(f"edge-ptychonn evaluate: --{name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:  # the processor's check of its batchSize: a larger batch sized the engine for it (10 GB at 5000)
        convert_value("--batch-size", integer(1, MAX_BATCH_SIZE), args.batch_size)
    except ValueError as exc:
        print(f"edge-ptychonn evaluate: {exc}", file=sys.stderr)
        return 2
    if args.threads < 0:
        print(f"edge-ptychonn evaluate: --threads must be >= 0 (0: all usable cores), got {args.threads}", file=sys.stderr)
        return 2
    # np.save's rule: a name without .npy gets it
    image_path = None if args.save_image is None else Path(
        args.save_image if str(args.save_image).endswith(".npy") else f"{args.save_image}.npy")
    try:  # before the work: an output that cannot be written is a bad argument
        for given in (args.json, args.save_image):
            if given is not None and (str(given).endswith("/") or Path(given).is_dir()):
                raise IsADirectoryError(f"{given} is a folder: give a file name")
        check_writable([p for p in (args.json, image_path) if p is not None])
    except OSError as exc:
        print(f"edge-ptychonn evaluate: cannot write the output: {exc}", file=sys.stderr)
        return 2
    clash = output_clash(args, image_path)
    if clash:
        print(f"edge-ptychonn evaluate: {clash}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        if not Path(args.model).is_file():
            raise FileNotFoundError(f"model {args.model} not found")
        card = find_card(args.model)
        # the engine is made (and warmed up) for its largest batch: no larger than the longest scan
        counts = [scan_frames(path) for path in args.scan]
        if args.simulate:  # the positions of every simulated scan (whatever its family and seed)
            counts.append(accuracy.held_out_settings(card, 0, n_positions=args.n_positions).n_positions)
        batch_size = args.batch_size if None in counts else max(1, min(args.batch_size, max(counts)))
        engine = accuracy.open_engine(args.model, args.engine, device=args.device, batch_size=batch_size,
                                      threads=args.threads, precision=args.precision)
        try:
            check_input_size(card, args.model, engine.input_shape)
        except ValueError:
            engine.close()
            raise
    except (ValueError, FileNotFoundError, EngineUnavailable) as exc:
        print(f"edge-ptychonn evaluate: {exc}", file=sys.stderr)
        return 2
    if card is None:
        print(f"edge-ptychonn evaluate: no model card beside {args.model}: no preprocessing, default stitch "
              "settings, the simulator's default scans", file=sys.stderr)
    try:
        scans = [(Path(path).name, *load_scan(path)) for path in args.scan]
        scans += accuracy.simulate_held_out(args.simulate, card, args.n_positions, args.photons,
                                            progress=not args.quiet)
        card = card or ModelCard()
        results = accuracy.evaluate_scans(engine, card.preprocess, scans, card.stitch, progress=not args.quiet,
                                          output_mask=card.output_mask if args.output_mask else None)
    except (ValueError, FileNotFoundError) as exc:
        print(f"edge-ptychonn evaluate: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.close()
    print(accuracy.results_table(results))
    print(f"({sum(r.n_frames for r in results)} frames scored in {time.monotonic() - t0:.1f} s, the engine's start, "
          f"the scans' simulation and the scoring included, with {engine.name} {engine.precision} on "
          f"{engine.device}; scores over the region covered by the probe's bright centre, constant phase offset removed)")
    try:
        for path in (args.json, image_path):
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        if args.json:
            write_bytes_whole(Path(args.json), json.dumps(accuracy.results_json(results), indent=2).encode())
        if image_path is not None:
            save_npy_whole(image_path, results[0].image)
    except OSError as exc:
        print(f"edge-ptychonn evaluate: cannot write the output: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(f"wrote the scores to {args.json}")
    if image_path is not None:  # its name may differ from the one given: np.save's rule adds .npy
        print(f"wrote the stitched phase of {results[0].name} to {image_path} (float32 radians)")
    return 0
