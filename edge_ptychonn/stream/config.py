"""Processor arguments -> validated, frozen settings, with errors that say what to do.

PvaPy hands a processor one ``configDict``: the user's ``--processor-args`` JSON
merged with the framework's own keys (``processorId``, ``inputChannel``, ...).
:func:`parse_processor_args` separates the two, maps our camelCase keys onto
:class:`ProcessorConfig` fields, and rejects any key that is neither ours nor the
framework's, naming it and listing the accepted ones.

:func:`apply_runtime_changes` validates a ``configure()`` request (control
channel) against the keys that may change while running; an unknown or invalid
key raises ``ValueError`` and nothing changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_ptychonn.model_card import find_card

from ..devices import DEVICES_HELP, parse_device  # noqa: F401  (DEVICES_HELP re-exported)
from .preprocess import PreprocessConfig
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

# "auto": the engine picks (engine "auto": the fastest within tolerance of fp32; a named
# engine: its first). Which engine offers which precision is the engines' business.
PRECISIONS = ("auto", "fp32", "tf32", "fp16", "bf16")

# Seed (edgePtychoNN) argument names accepted by the drop-in class.
SEED_ALIASES = {"bsz": "batchSize", "onnx_mdl": "modelPath"}


@dataclass(frozen=True)
class ProcessorConfig:
    """Settings of one PtychoNN consumer (units in the names)."""

    model_path: Path
    engine: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 8
    batch_timeout_s: float = 0.05
    queue_batches: int = 16
    max_pending_frames: int = 2000
    cpu_threads: int = 0
    plan_cache_dir: Path | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        if not self.model_path.is_file():
            raise ValueError(f"modelPath {str(self.model_path)!r} is not a file")
        if not self.engine:
            raise ValueError("engine must name an engine, e.g. 'auto'")
        parse_device(self.device)  # ValueError naming the accepted forms (DEVICES_HELP)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {short_repr(self.precision)}")
        _check_int("batchSize", self.batch_size, 1, 256)
        if not 0.001 <= self.batch_timeout_s <= 60:
            raise ValueError(f"batchTimeout must be 0.001..60 s, got {self.batch_timeout_s}")
        _check_int("queueBatches", self.queue_batches, 1, 4096)
        _check_int("maxPendingFrames", self.max_pending_frames, 0, 1_000_000)
        _check_int("cpuThreads", self.cpu_threads, 0, 1024)


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer {lo}..{hi}, got {short_repr(value)}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {short_repr(value)}")
    return float(value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {short_repr(value)}")
    return value


def _pair(name: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{name} must be a list of two integers, got {short_repr(value)}")
    return int(value[0]), int(value[1])


# camelCase processor argument -> (ProcessorConfig field, converter)
_TOP_LEVEL: dict[str, tuple[str, Any]] = {
    "modelPath": ("model_path", lambda v: Path(str(v)).expanduser()),
    "engine": ("engine", str),
    "device": ("device", str),
    "precision": ("precision", str),
    "batchSize": ("batch_size", lambda v: v),
    "batchTimeout": ("batch_timeout_s", lambda v: _number("batchTimeout", v)),
    "queueBatches": ("queue_batches", lambda v: v),
    "maxPendingFrames": ("max_pending_frames", lambda v: v),
    "cpuThreads": ("cpu_threads", lambda v: v),
    "planCacheDir": ("plan_cache_dir", lambda v: Path(str(v)).expanduser()),
}
# camelCase processor argument -> (PreprocessConfig field, converter)
_PREPROCESS: dict[str, tuple[str, Any]] = {
    "crop": ("crop_hw", lambda v: _pair("crop", v)),
    "cropOrigin": ("crop_origin_yx", lambda v: _pair("cropOrigin", v)),
    "bin": ("bin_factor", lambda v: v),
    "transform": ("transform", lambda v: _text("transform", v)),
    "offset": ("offset", lambda v: _number("offset", v)),
    "scale": ("scale", lambda v: _number("scale", v)),
}
USER_KEYS = tuple(_TOP_LEVEL) + tuple(_PREPROCESS)
# Keys that configure() may change while running.
RUNTIME_KEYS = ("batchTimeout", "offset", "scale", "transform")


def runtime_settings(config: ProcessorConfig) -> dict:
    """The current values of the keys that configure() may change (camelCase)."""
    fields = {**{k: (f, True) for k, (f, _) in _TOP_LEVEL.items()}, **{k: (f, False) for k, (f, _) in _PREPROCESS.items()}}
    out = {}
    for key in RUNTIME_KEYS:
        name, top = fields[key]
        out[key] = getattr(config if top else config.preprocess, name)
    return out


def model_metadata(model_path: Path) -> dict:
    """The model card beside a model (``model.onnx`` -> ``model.json``) as JSON, or ``{}``.

    Read through :func:`edge_ptychonn.model_card.find_card`, so a malformed card
    raises ``ValueError`` naming the file and the key.
    """
    card = find_card(model_path)
    return card.to_dict() if card is not None else {}


def _preprocess_defaults(model_path: Path) -> dict:
    """The model card's preprocessing as ``PreprocessConfig`` fields (``{}`` without a card);
    processor arguments override it key by key."""
    card = find_card(model_path)
    return asdict(card.preprocess) if card is not None else {}


def split_framework_keys(config_dict: dict) -> tuple[dict, dict]:
    """(user arguments, framework keys) of a PvaPy ``configDict``."""
    user = {k: v for k, v in config_dict.items() if k not in FRAMEWORK_KEYS}
    framework = {k: v for k, v in config_dict.items() if k in FRAMEWORK_KEYS}
    return user, framework


def parse_processor_args(
    config_dict: dict, aliases: dict[str, str] | None = None, default_model: Path | None = None
) -> tuple[ProcessorConfig, dict]:
    """Validate a PvaPy ``configDict``; return (ProcessorConfig, framework keys).

    ``aliases`` maps extra accepted names onto ours (the seed's ``bsz`` and
    ``onnx_mdl``). ``default_model`` is used when ``modelPath`` is absent.
    Raises ``ValueError`` naming the offending key and the accepted ones.
    """
    user, framework = split_framework_keys(config_dict or {})
    aliases = aliases or {}
    for old, new in aliases.items():
        if old in user:
            if new in user:
                raise ValueError(f"give either {old!r} or {new!r}, not both")
            user[new] = user.pop(old)
    unknown = sorted(short_repr(k, 40) if len(str(k)) > 40 else str(k) for k in user if k not in USER_KEYS)
    if unknown:
        accepted = ", ".join(USER_KEYS + tuple(aliases))
        raise ValueError(f"unknown processor argument(s) {', '.join(unknown)}; accepted: {accepted}")
    if "modelPath" not in user:
        if default_model is None:
            raise ValueError("modelPath is required: the ONNX model to run")
        user["modelPath"] = str(default_model)
    top = {field_: conv(user[k]) for k, (field_, conv) in _TOP_LEVEL.items() if k in user}
    pre = _preprocess_defaults(top["model_path"])
    pre.update({field_: conv(user[k]) for k, (field_, conv) in _PREPROCESS.items() if k in user})
    config = ProcessorConfig(**top, preprocess=PreprocessConfig(**pre))
    return config, framework


def apply_runtime_changes(config: ProcessorConfig, changes: dict) -> tuple[ProcessorConfig, dict]:
    """Validate a ``configure()`` request; return (new config, applied user keys).

    Framework keys (``skipInitialUpdates``, ``objectIdOffset``, ...) are the
    framework's business and are left out. Raises ``ValueError`` for any other
    key outside :data:`RUNTIME_KEYS` or any invalid value; then nothing changes.
    """
    if not isinstance(changes, dict):
        raise ValueError(
            f"configure expects a JSON object such as {{\"batchTimeout\": 0.1}}, got {type(changes).__name__} "
            f"{short_repr(changes)}"
        )
    user, _ = split_framework_keys(changes)
    bad = sorted(short_repr(k, 40) if len(str(k)) > 40 else str(k) for k in user if k not in RUNTIME_KEYS)
    if bad:
        raise ValueError(
            f"cannot change {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} at run time; "
            f"changeable: {', '.join(RUNTIME_KEYS)}"
        )
    top = {_TOP_LEVEL[k][0]: _TOP_LEVEL[k][1](v) for k, v in user.items() if k in _TOP_LEVEL}
    pre = {_PREPROCESS[k][0]: _PREPROCESS[k][1](v) for k, v in user.items() if k in _PREPROCESS}
    new = replace(config, **top, preprocess=replace(config.preprocess, **pre))
    return new, user
