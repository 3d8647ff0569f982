"""``edge-ptychonn export``: write a PtychoNN with deterministic random weights to ONNX.

For trying the pipeline and benchmarking engines without a trained model (speed
does not depend on the weights); ``edge-ptychonn train`` exports trained models.
It writes no model card, and refuses an --out with a card beside it (another
model's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_ptychonn import cli_options
from edge_ptychonn.files import check_folder


def get_args_parser(prog: str = "edge-ptychonn export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="ONNX file to write, e.g. data/generated/random.onnx")
    p.add_argument("--width", type=int, default=16, help="channels of the first level (default: %(default)s)")
    p.add_argument("--depth", type=int, default=4, help="encoder/decoder levels (default: %(default)s)")
    p.add_argument("--input-size", type=int, default=128, help="frame side in pixels (default: %(default)s)")
    p.add_argument("--amplitude", action="store_true", help="add the amplitude head")
    p.add_argument("--head-blocks", type=int, default=0,
                   help="residual blocks at full resolution before the phase head, 0..8 (as train --head-blocks; "
                        "default: %(default)s)")
    p.add_argument("--seed", type=cli_options.seed, default=0, help="weights seed (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> int:
    """``edge-ptychonn export``; a SIGTERM (``kill``) stops it like Ctrl-C: no half-written file is
    left behind, and the command ends with one line (exit 130)."""
    from edge_ptychonn.cli import sigterm_interrupts

    with sigterm_interrupts():
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    from edge_ptychonn.model_card import card_path

    from .model import ModelConfig, build_model, export_onnx

    try:
        config = ModelConfig(width=args.width, depth=args.depth, input_size=args.input_size,
                             amplitude_head=args.amplitude, head_blocks=args.head_blocks)
    except ValueError as exc:
        print(f"edge-ptychonn export: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.name in ("", ".", "..") or str(args.out).endswith("/") or out.is_dir():  # "models/": a folder
        print(f"edge-ptychonn export: cannot write {args.out!r}: it names no file (a folder); give a file name, "
              "e.g. data/generated/random.onnx", file=sys.stderr)
        return 2
    try:  # before the model is built: "x.onnx/m.onnx" under a file, an unwritable folder
        check_folder(out.parent)
    except OSError as exc:
        print(f"edge-ptychonn export: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    card = card_path(out)
    if card.exists():  # the processor and evaluate would read it as this model's card
        print(f"edge-ptychonn export: {card} lies beside {args.out}: it is another model's card (preprocessing, "
              "training, accuracy), not of random weights; choose another --out or remove the card", file=sys.stderr)
        return 2
    model = build_model(config, seed=args.seed)
    try:
        path = export_onnx(model, out)
    except OSError as exc:
        print(f"edge-ptychonn export: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # torch's CPU allocator refused the sizes (a huge --input-size): not a traceback
        if "can't allocate memory" not in str(exc):
            raise
        print(f"edge-ptychonn export: not enough memory to export a {config.input_size}x{config.input_size} model "
              f"of width {config.width}; ask for less (--input-size, --width)", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): PtychoNN {config}, {n_params:,} parameters, random weights (seed {args.seed})")
    return 0
