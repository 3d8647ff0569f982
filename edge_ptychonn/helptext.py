"""The ``--help`` formatter of the commands whose options have many defaults."""

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
