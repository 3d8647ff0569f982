"""argparse pieces shared by the commands: the ``--help`` formatter of those with many
defaults, the type of a seed option, and the detector's crop and bin as options."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default as it would be typed (a list space- or comma-separated, as
    the option takes it), except where the help already says it (mentions "default"), and
    for None, False and an empty list: those options say in their help what they do then."""

    list_separator = " "

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == [] \
                or default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(default, (list, tuple)):
            sep = "," if action.nargs is None else " "  # one comma-separated value, or several words
            return f"{text} (default: {sep.join(map(str, default))})"
        return f"{text} (default: %(default)s)"


MAX_SEED = 2**63 - 1  # torch's seeds are 64-bit integers, and it fails beyond this one


def seed(text: str) -> int:
    """A ``--seed`` value of a command that seeds torch: a whole number from 0 to 2**63-1 (argparse
    answers anything else with its one-line usage error; beyond it torch failed with a traceback;
    simulate's seeds, and so the scans', are never negative either)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED} (torch's seeds), got {text}")
    return value


# the processor arguments that cut a detector frame down to the model's input (stream.config),
# as the options of the commands that take them (finetune, demo): named as the user wrote them
DETECTOR_OPTIONS = {"crop": "--crop", "cropOrigin": "--crop-origin", "bin": "--bin"}


def add_detector_options(parser: argparse.ArgumentParser, default: str) -> None:
    """``--crop H W``, ``--crop-origin Y X`` and ``--bin N``: the processor's ``crop``,
    ``cropOrigin`` and ``bin`` (None where not given); ``default`` says what applies then."""
    parser.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="cut an H x W window out of each detector frame (centred, unless --crop-origin or the "
                             "card gives its origin) that --bin N makes the model's input: H = W = N x its input "
                             f"size (the processor's crop; default: {default})")
    parser.add_argument("--crop-origin", type=int, nargs=2, default=None, metavar=("Y", "X"),
                        help=f"top-left pixel of the --crop window (the processor's cropOrigin; default: {default})")
    parser.add_argument("--bin", type=int, default=None, metavar="N",
                        help="sum N x N pixel blocks of the cropped frame, e.g. 516x516 frames: --crop 512 512 "
                             f"--bin 4 for a 128x128 model (the processor's bin; default: {default})")


def detector_args(args: argparse.Namespace) -> dict:
    """The processor arguments (``crop``, ``cropOrigin``, ``bin``) of the detector options given."""
    given = {"crop": args.crop, "cropOrigin": args.crop_origin, "bin": args.bin}
    return {key: list(value) if isinstance(value, (list, tuple)) else value
            for key, value in given.items() if value is not None}


def in_option_names(message: str, options: dict[str, str]) -> str:
    """A processor argument's error (``"<key> must ..."``) with the key named as its option in
    ``options`` (``{"batchSize": "--batch-size"}``); other messages as they are."""
    key = next((k for k in options if message.startswith(k + " ")), None)
    return options[key] + message[len(key):] if key else message


def check_detector_fit(frame_hw: tuple[int, int], pp, input_hw: tuple[int, int], source: str) -> None:
    """``ValueError`` unless frames of ``frame_hw`` become the model's ``input_hw`` input through the crop
    and bin of ``pp`` (a ``PreprocessConfig``, its ``output_shape``: the processor's rule); ``source``
    says where that crop and bin came from. The message names the options that give them."""
    (fh, fw), (h, w) = frame_hw, input_hw
    crop = "no crop" if pp.crop_hw is None else f"crop {pp.crop_hw[0]}x{pp.crop_hw[1]}" + (
        f" at {pp.crop_origin_yx[0]},{pp.crop_origin_yx[1]}" if pp.crop_origin_yx is not None else "")
    try:
        shape = pp.output_shape((fh, fw))
        if shape == (h, w):
            return
        what = f"become {shape[0]}x{shape[1]} with {crop} and bin {pp.bin_factor} ({source})"
    except ValueError as exc:  # "crop 200x128 at (-33, 3) does not fit a 134x134 frame"
        what = f"cannot take {crop} and bin {pp.bin_factor} ({source}): {exc}"
    sizes = f"H = W = N x {h}" if h == w else f"H = N x {h}, W = N x {w}"
    raise ValueError(f"frames of {fh}x{fw} {what}; the model takes "
                     f"{h}x{w}: give the detector's crop and bin with --crop H W (centred, or at --crop-origin Y X) "
                     f"and --bin N, {sizes} (e.g. 516x516 frames: --crop 512 512 --bin 4 for 128x128)")
