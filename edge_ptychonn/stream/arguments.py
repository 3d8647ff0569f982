"""Generic PvaPy processor arguments: framework keys apart, camelCase -> field tables, clear errors.

PvaPy hands every processor one ``configDict``: the user's ``--processor-args``
JSON merged with about a dozen framework keys (``processorId``,
``inputChannel``, ...). A processor declares its own arguments once, as a table
``camelCaseKey -> (field_name, converter)``; :func:`parse_arguments` separates
the framework's keys, converts ours into field values, and rejects any key
that is neither, naming it and listing the accepted ones::

    ARGS = {
        "publishRate": ("publish_rate_hz", number(0.01, 100)),
        "outputDirectory": ("output_directory", path()),
    }
    fields, framework = parse_arguments(config_dict, ARGS)
    settings = StitchSettings(**fields)

A converter takes the JSON value and returns the field value, or raises
``ValueError``/``TypeError`` with a message that starts with "must ..."; the
error that reaches the user is ``"<key> must ..., got <value>"``.

:func:`runtime_changes` validates a ``configure()`` request (control channel)
against the keys that may change while running: anything else raises
``ValueError`` and nothing changes.
"""

from __future__ import annotations

import math

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

from .quote import short_repr

# Keys the PvaPy framework merges into configDict (5.6) or sends to configure().
FRAMEWORK_KEYS = frozenset(
    {
        "processorId", "inputChannel", "inputMode", "inputArgs", "outputChannel",
        "outputMode", "outputArgs", "objectIdField", "objectIdOffset", "fieldRequest",
        "skipInitialUpdates", "nSequentialUpdates", "receiverQueueSize",
        "statusChannel", "controlChannel", "consumerId", "nConsumers",
        "serverQueueSize", "metadataChannels",
    }
)

__all__ = [
    "FRAMEWORK_KEYS", "split_framework_keys", "ArgTable", "parse_arguments", "runtime_changes", "convert_value",
    "check_runtime_request", "convert_fields",
    "integer", "number", "boolean", "choice", "text", "path", "optional", "int_pair", "text_list",
]

Converter = Callable[[Any], Any]


def split_framework_keys(config_dict: dict) -> tuple[dict, dict]:
    """(user arguments, framework keys) of a PvaPy ``configDict``."""
    user = {k: v for k, v in config_dict.items() if k not in FRAMEWORK_KEYS}
    framework = {k: v for k, v in config_dict.items() if k in FRAMEWORK_KEYS}
    return user, framework


def _key_list(keys, most: int = 5) -> str:
    """Offending keys for a message: each quoted briefly, at most ``most`` of them."""
    names = sorted(short_repr(k, 40) if len(str(k)) > 40 else str(k) for k in keys)
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")
ArgTable = dict[str, tuple[str, Converter]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Converter:
    """An integer in [lo, hi] (either bound may be None)."""

    def convert(value: Any) -> int:
        if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"must be an integer{_range(lo, hi)}, got {short_repr(value)}")
        return int(value)

    return convert


def number(lo: float | None = None, hi: float | None = None, finite: bool = True) -> Converter:
    """A number (int or float) in [lo, hi], returned as float; finite unless ``finite`` is
    False (NaN passes every range check: a rate or a timeout of NaN never fires)."""

    def convert(value: Any) -> float:
        try:  # an integer beyond float's range (JSON allows any number of digits) is out of range
            as_float = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        except OverflowError:
            as_float = None
        if as_float is None or (lo is not None and as_float < lo) or (hi is not None and as_float > hi) or (
            finite and not math.isfinite(as_float)
        ):
            raise ValueError(f"must be a {'finite ' if finite else ''}number{_range(lo, hi)}, got {short_repr(value)}")
        return as_float

    return convert


def _range(lo, hi) -> str:
    """The bounds for a message, with a leading space ("" without bounds)."""
    if lo is not None and hi is not None:
        return f" {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def boolean() -> Converter:
    def convert(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {short_repr(value)}")
        return value

    return convert


def choice(*choices: str) -> Converter:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {short_repr(value)}")
        return value

    return convert


def text(allow_empty: bool = False) -> Converter:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or (not allow_empty and not value):
            raise ValueError(f"must be a {'' if allow_empty else 'non-empty '}string, got {short_repr(value)}")
        return value

    return convert


def path() -> Converter:
    """A file-system path (``~`` expanded); no NUL character (no file system takes one: the
    first use would fail with a bare "embedded null byte")."""

    def convert(value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be a path (string), got {short_repr(value)}")
        if "\0" in value:
            raise ValueError(f"must be a path without a NUL character, got {short_repr(value)}")
        return Path(value).expanduser()

    return convert


def optional(convert: Converter) -> Converter:
    """``None`` (JSON null) or what ``convert`` accepts."""
    return lambda value: None if value is None else convert(value)


def int_pair(lo: int | None = None) -> Converter:
    """A list of two integers (each >= lo), as a tuple."""

    def convert(value: Any) -> tuple[int, int]:
        if (
            not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(_is_int(v) and (lo is None or v >= lo) for v in value)
        ):
            bound = f" >= {lo}" if lo is not None else ""
            raise ValueError(f"must be a list of two integers{bound}, got {short_repr(value)}")
        return int(value[0]), int(value[1])

    return convert


def text_list(length: int | None = None) -> Converter:
    """A list of non-empty strings (of ``length`` items, if given), as a tuple."""

    def convert(value: Any) -> tuple[str, ...]:
        if (
            not isinstance(value, (list, tuple))
            or (length is not None and len(value) != length)
            or not all(isinstance(v, str) and v for v in value)
        ):
            n = f"{length} " if length is not None else ""
            raise ValueError(f"must be a list of {n}strings, got {short_repr(value)}")
        return tuple(value)

    return convert


def convert_value(key: str, converter: Converter, value: Any) -> Any:
    """``converter(value)``; its error becomes ``ValueError("<key> must ..., got ...")``."""
    try:
        return converter(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{key} {exc}") from exc


def parse_arguments(
    config_dict: dict | None, table: ArgTable, aliases: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A PvaPy ``configDict`` -> (``{field: value}`` for the keys given, framework keys).

    ``table`` maps each accepted camelCase key to ``(field, converter)``;
    ``aliases`` maps extra accepted names onto table keys. Keys absent from
    ``config_dict`` are absent from the result, so the settings dataclass's
    defaults apply. Raises ``ValueError`` naming an unknown key and listing the
    accepted ones, or naming a key whose value is invalid and saying why.
    """
    user, framework = split_framework_keys(config_dict or {})
    for old, new in (aliases or {}).items():
        if old in user:
            if new in user:
                raise ValueError(f"give either {old!r} or {new!r}, not both")
            user[new] = user.pop(old)
    unknown = [k for k in user if k not in table]
    if unknown:
        accepted = ", ".join(list(table) + list(aliases or {}))
        raise ValueError(f"unknown processor argument(s) {_key_list(unknown)}; accepted: {accepted}")
    return convert_fields(user, table), framework


def convert_fields(user: dict, table: ArgTable) -> dict[str, Any]:
    """``{field: converted value}`` for the keys of ``user`` that ``table`` knows."""
    return {table[k][0]: convert_value(k, table[k][1], v) for k, v in user.items() if k in table}


def runtime_changes(settings: Any, changes: Any, table: ArgTable, runtime_keys: Iterable[str]) -> tuple[Any, dict]:
    """Validate a ``configure()`` request; return (new frozen settings, applied user keys).

    Framework keys are the framework's business and are left out. Any other key
    outside ``runtime_keys``, or an invalid value, raises ``ValueError``, and then
    nothing changes. ``settings`` is a dataclass; its ``__post_init__`` checks run
    again on the new values.
    """
    user = check_runtime_request(changes, runtime_keys)
    return replace(settings, **convert_fields(user, table)), user


def check_runtime_request(changes: Any, runtime_keys: Iterable[str]) -> dict:
    """The user keys of a ``configure()`` request, once it is a JSON object whose keys
    are all changeable at run time (framework keys are left out, but a ``skipInitialUpdates``
    other than 0 is refused: PvaPy would discard frames uncounted); else ``ValueError``
    quoting at most a short prefix of what came (the control channel has no
    authentication)."""
    if not isinstance(changes, dict):
        raise ValueError(
            f"configure expects a JSON object such as {{\"key\": value}}, got {type(changes).__name__} "
            f"{short_repr(changes)}"
        )
    runtime_keys = tuple(runtime_keys)
    if changes.get("skipInitialUpdates", 0) not in (0, "0"):  # PvaPy's key: it would take it
        raise ValueError("skipInitialUpdates is not changeable at run time: PvaPy would discard that many frames, "
                         "counted nowhere (give it at start: pvapy-hpc-consumer -siu)")
    user, _ = split_framework_keys(changes)
    bad = [k for k in user if k not in runtime_keys]
    if bad:
        raise ValueError(f"cannot change {_key_list(bad)} at run time; changeable: {', '.join(runtime_keys)}")
    return user


def describe(table: ArgTable) -> str:
    """The accepted keys, comma-separated (for help texts and errors)."""
    return ", ".join(table)
