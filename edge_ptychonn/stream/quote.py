"""Quoting user-given values in error messages without echoing them whole.

The control channel has no authentication and takes any string: a refusal quotes
at most a short prefix of the offending value, so a 1 MB value costs 1 MB neither
in the log nor in the control channel's ``statusMessage``.
"""

from __future__ import annotations

MAX_QUOTE = 60


def short_repr(value: object, limit: int = MAX_QUOTE) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length noted."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one line (some libraries' span many: a log line or a
    status message must not), cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
