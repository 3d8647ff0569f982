"""argparse pieces shared by the commands: the ``--help`` formatter of those with many
defaults, and the type of a seed option."""

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
    """A ``--seed`` value of a command that seeds torch: a whole number within +-(2**63-1) (argparse
    answers anything else with its one-line usage error; beyond it torch failed with a
    traceback). The commands say themselves whether they take negative ones (train does not)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not -MAX_SEED <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number within +-{MAX_SEED} (torch's seeds), got {text}")
    return value
