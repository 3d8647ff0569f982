"""Processor arguments -> validated, frozen settings, with errors that say what to do.

PvaPy hands a processor one ``configDict``: the user's ``--processor-args`` JSON
merged with the framework's own keys (``processorId``, ``inputChannel``, ...).
:func:`parse_processor_args` separates the two, maps our camelCase keys onto
:class:`ProcessorConfig` fields, and rejects any key that is neither ours nor the
framework's, naming it and listing the accepted ones.

:func:`apply_runtime_changes` validates a ``configure()`` request (control
channel) against the keys that may change while running; an unknown or invalid
key raises ``ValueError`` and nothing changes. A new ``modelPath`` brings the
new model's card's offset, scale, transform, normalisation and output mask
(keys given with it win; an ``outputMask`` given at start is kept), as at
start-up. :func:`model_identity` names a model file (card name and content hash).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_ptychonn.model_card import find_card

from ..devices import parse_device
from ..io_threads import POLICIES as IO_POLICIES
from .arguments import (
    boolean, check_runtime_request, choice, convert_fields, convert_value, int_pair, integer, number, optional,
    parse_arguments, path, text,
)
from .postprocess import OutputMask
from .preprocess import PreprocessConfig
from .quote import short_repr


# Which thread runs the batches (stream.pipeline): "auto" (receive for the zero engine and GPU
# engines, else thread), "thread" (the inference thread), "receive" (the receive thread).
BATCH_RUNNERS = ("auto", "thread", "receive")

# "auto": the engine picks (engine "auto": the fastest within tolerance of fp32; a named
# engine: its first). Which engine offers which precision is the engines' business.
PRECISIONS = ("auto", "fp32", "tf32", "fp16", "bf16")

# Seed (edgePtychoNN) argument names accepted by the drop-in class.
SEED_ALIASES = {"bsz": "batchSize", "onnx_mdl": "modelPath"}

MAX_BATCH_SIZE = 256  # the processor's batchSize range: 1..this


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
    cpu_workers: int = 0
    plan_cache_dir: Path | None = None
    io_threads: str = "batch"  # edge_ptychonn.io_threads.POLICIES
    batch_runner: str = "auto"  # BATCH_RUNNERS: which thread runs the batches (stream.pipeline)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    output_mask: OutputMask | None = None  # from the model card; None: outputs published as the network gives them
    output_mask_wanted: bool | None = None  # the user's outputMask (None: the card decides), kept across model swaps
    forward_attributes: bool = True  # outputs carry the input's NDAttributes (False: ColorMode and modelId only)

    def __post_init__(self) -> None:
        if not self.model_path.is_file():
            where = "" if self.model_path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
            raise ValueError(f"modelPath {short_repr(str(self.model_path))} is not a file{where}")
        if not self.engine:
            raise ValueError("engine must name an engine, e.g. 'auto'")
        parse_device(self.device)  # ValueError naming the accepted forms (DEVICES_HELP)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {short_repr(self.precision)}")
        convert_value("batchSize", integer(1, MAX_BATCH_SIZE), self.batch_size)
        if not 0.001 <= self.batch_timeout_s <= 60:
            raise ValueError(f"batchTimeout must be 0.001..60 s, got {self.batch_timeout_s}")
        convert_value("queueBatches", integer(1, 4096), self.queue_batches)
        convert_value("maxPendingFrames", integer(0, 1_000_000), self.max_pending_frames)
        convert_value("cpuThreads", integer(0, 1024), self.cpu_threads)
        convert_value("cpuWorkers", integer(0, 64), self.cpu_workers)
        convert_value("ioThreads", choice(*IO_POLICIES), self.io_threads)
        convert_value("batchRunner", choice(*BATCH_RUNNERS), self.batch_runner)




# camelCase processor argument -> (ProcessorConfig field, converter)
# (ranges are checked by the dataclasses, which also guard values set in code)
_TOP_LEVEL: dict[str, tuple[str, Any]] = {
    "modelPath": ("model_path", path()),
    "engine": ("engine", text()),
    "device": ("device", text()),
    "precision": ("precision", text()),
    "batchSize": ("batch_size", lambda v: v),
    "batchTimeout": ("batch_timeout_s", number()),
    "queueBatches": ("queue_batches", lambda v: v),
    "maxPendingFrames": ("max_pending_frames", lambda v: v),
    "cpuThreads": ("cpu_threads", lambda v: v),
    "cpuWorkers": ("cpu_workers", lambda v: v),
    "planCacheDir": ("plan_cache_dir", path()),
    "ioThreads": ("io_threads", choice(*IO_POLICIES)),
    "batchRunner": ("batch_runner", choice(*BATCH_RUNNERS)),
    "outputMask": ("output_mask", boolean()),
    "forwardAttributes": ("forward_attributes", boolean()),
}
# camelCase processor argument -> (PreprocessConfig field, converter)
_PREPROCESS: dict[str, tuple[str, Any]] = {
    "crop": ("crop_hw", optional(int_pair())),
    "cropOrigin": ("crop_origin_yx", optional(int_pair())),
    "bin": ("bin_factor", lambda v: v),
    "transform": ("transform", text()),
    "offset": ("offset", number()),
    "scale": ("scale", number()),
    "normalize": ("normalize", text()),
    "referenceTotal": ("reference_total", number()),
    "normalizeWindow": ("normalize_window", lambda v: v),
}
# Keys that configure() may change while running. A new modelPath is built beside the
# running engine and switched to at a batch boundary (pipeline.InferencePipeline.configure).
RUNTIME_KEYS = ("batchTimeout", "offset", "scale", "transform", "normalize", "modelPath")
# Preprocessing that a new model's card sets when modelPath changes (crop, cropOrigin and
# bin belong to the detector and stay; the new model must take the same input size).
CARD_RUNTIME_KEYS = ("offset", "scale", "transform", "normalize", "referenceTotal", "normalizeWindow")


def runtime_settings(config: ProcessorConfig) -> dict:
    """The current values of the keys that configure() may change (camelCase; JSON-ready)."""
    values = {
        key: getattr(config, _TOP_LEVEL[key][0]) if key in _TOP_LEVEL else getattr(config.preprocess, _PREPROCESS[key][0])
        for key in RUNTIME_KEYS
    }
    return {key: str(v) if isinstance(v, Path) else v for key, v in values.items()}


def model_identity(model_path: Path) -> str:
    """``"<card name> sha256:<first 12 hex digits of the file's SHA-256>"``: which model
    made an output (the card's name, else the file's stem). Raises ValueError when the
    file cannot be read or its card is malformed."""
    digest = hashlib.sha256()
    try:
        with open(model_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ValueError(f"cannot read modelPath {short_repr(str(model_path))}: {exc.strerror or exc}") from None
    card = find_card(model_path)
    name = card.name if card is not None and card.name else Path(model_path).stem
    return f"{name} sha256:{digest.hexdigest()[:12]}"


def _preprocess_defaults(model_path: Path) -> dict:
    """The model card's preprocessing as ``PreprocessConfig`` fields (``{}`` without a card);
    processor arguments override it key by key."""
    card = find_card(model_path)
    return asdict(card.preprocess) if card is not None else {}


def parse_processor_args(
    config_dict: dict, aliases: dict[str, str] | None = None, default_model: Path | None = None
) -> tuple[ProcessorConfig, dict]:
    """Validate a PvaPy ``configDict``; return (ProcessorConfig, framework keys).

    ``aliases`` maps extra accepted names onto ours (the seed's ``bsz`` and
    ``onnx_mdl``). ``default_model`` is used when ``modelPath`` is absent.
    Raises ``ValueError`` naming the offending key and the accepted ones (a key given by
    an alias is named as given, e.g. ``bsz (batchSize) must be ...``).
    """
    used = {new: old for old, new in (aliases or {}).items() if isinstance(config_dict, dict) and old in config_dict}
    try:
        return _parse_processor_args(config_dict, aliases, default_model)
    except ValueError as exc:
        message = str(exc)
        for new, old in used.items():
            if message.startswith(f"{new} "):
                raise ValueError(f"{old} ({new}){message[len(new):]}") from None
        raise


def _parse_processor_args(config_dict: dict, aliases: dict[str, str] | None, default_model: Path | None
                          ) -> tuple[ProcessorConfig, dict]:
    given, framework = parse_arguments(config_dict, {**_TOP_LEVEL, **_PREPROCESS}, aliases)
    if "model_path" not in given:
        if default_model is None:
            raise ValueError("modelPath is required: the ONNX model to run")
        given["model_path"] = Path(default_model)
    pre_fields = {f for f, _ in _PREPROCESS.values()}
    top = {k: v for k, v in given.items() if k not in pre_fields}
    pre = _preprocess_defaults(top["model_path"])
    pre.update({k: v for k, v in given.items() if k in pre_fields})
    top["output_mask_wanted"] = top.get("output_mask", None)
    top["output_mask"] = _output_mask(top["model_path"], top["output_mask_wanted"])
    return ProcessorConfig(**top, preprocess=PreprocessConfig(**pre)), framework


def _output_mask(model_path: Path, wanted: bool | None, running: bool = False) -> OutputMask | None:
    """The card's output mask unless ``outputMask`` is false; ``outputMask: true`` needs one.
    ``running``: a model swap, where outputMask (a start-up argument) cannot be changed."""
    card = find_card(model_path) if wanted is not False else None
    mask = card.output_mask if card is not None else None
    if wanted and mask is None:
        remedy = ("the consumer was started with outputMask true: give a model trained by this version, or restart "
                  "the consumer with outputMask false" if running else
                  "give outputMask false, or a model trained by this version")
        raise ValueError(f"outputMask is true but the model card of {short_repr(str(model_path))} has no output_mask "
                         f"(the illuminated region); {remedy}")
    return mask


def _geometry(crop_hw, bin_factor: int) -> str:
    crop = "no crop" if crop_hw is None else f"crop {crop_hw[0]}x{crop_hw[1]}"
    return f"{crop} and bin {bin_factor}"


def _detector_mismatch(card: dict, running: PreprocessConfig) -> tuple[str, str] | None:
    """``(the card's crop and bin, the consumer's)`` as words when a model card was made for
    frames binned otherwise than ``running`` bins them, else None. The bin decides: a model takes
    one input size, so the same bin means the same window of the detector, whether the card names
    it as a crop or as whole frames. A card with no crop and bin 1 states no detector (a model
    trained on frames of its input size) and fits any."""
    crop, bin_factor = card.get("crop_hw"), card.get("bin_factor", 1)
    if (crop is None and bin_factor == 1) or bin_factor == running.bin_factor:
        return None
    crop = tuple(crop) if crop is not None else None
    running_crop = tuple(running.crop_hw) if running.crop_hw is not None else None
    return _geometry(crop, bin_factor), _geometry(running_crop, running.bin_factor)


def _check_detector_geometry(model_path: Path, card: dict, running: PreprocessConfig) -> None:
    """``ValueError`` when the new model's card was made for frames binned otherwise than the
    running consumer bins them (:func:`_detector_mismatch`): a swap keeps the detector's crop and
    bin, and the model would see the diffraction at another magnification."""
    mismatch = _detector_mismatch(card, running)
    if mismatch is not None:
        raise ValueError(f"the model card of {short_repr(str(model_path))} was made for frames with {mismatch[0]}, "
                         f"but this consumer runs {mismatch[1]} (the detector's, set at start, which a swap keeps): "
                         "restart the consumer with this model to change them")


def start_geometry_warning(config: ProcessorConfig) -> str | None:
    """A warning for the log when the consumer starts with a crop and bin (its ``crop``/``bin``
    arguments) that bin otherwise than the model's card was made for (:func:`_detector_mismatch`):
    the model then sees the diffraction at another magnification than in training, which is right
    only where this detector's frames are already binned or its pixels differ by that factor.
    None when they agree or the card states no detector (or there is no card)."""
    mismatch = _detector_mismatch(_preprocess_defaults(config.model_path), config.preprocess)
    if mismatch is None:
        return None
    return (f"the model card of {short_repr(str(config.model_path))} was made for frames with {mismatch[0]}, but "
            f"this consumer was started with {mismatch[1]} (its crop and bin arguments): the model sees the "
            "diffraction at another magnification than it was trained on, unless this detector's frames are "
            "already binned, or its pixels differ, by that factor")


def apply_runtime_changes(config: ProcessorConfig, changes: dict) -> tuple[ProcessorConfig, dict]:
    """Validate a ``configure()`` request; return (new config, applied user keys).

    Framework keys (``objectIdOffset``, ...) are the framework's business and are left
    out (:func:`check_runtime_request`: a ``skipInitialUpdates`` other than 0 is refused). Raises
    ``ValueError`` for any other
    key outside :data:`RUNTIME_KEYS` or any invalid value; then nothing changes.

    With ``modelPath``, offset, scale, transform and the normalisation come from
    the new model's card as at start-up (a model without a card: 0, 1, none,
    none), and those given in the same request win; crop, cropOrigin and bin
    stay (a card made for another crop or bin is refused); the output mask is the new card's (none without one) unless
    ``outputMask`` was given at start: false keeps it off, true refuses a model
    whose card has none. Whether the
    model fits the running one is checked where its engine is built.
    """
    user = check_runtime_request(changes, RUNTIME_KEYS)
    top = convert_fields(user, _TOP_LEVEL)
    pre = convert_fields(user, _PREPROCESS)
    if "model_path" in top:
        card = _preprocess_defaults(top["model_path"]) if top["model_path"].is_file() else {}
        _check_detector_geometry(top["model_path"], card, config.preprocess)
        fields_ = [_PREPROCESS[k][0] for k in CARD_RUNTIME_KEYS]
        defaults = asdict(PreprocessConfig())
        pre = {**{f: card.get(f, defaults[f]) for f in fields_}, **pre}
        if top["model_path"].is_file():
            top["output_mask"] = _output_mask(top["model_path"], config.output_mask_wanted, running=True)
    new = replace(config, **top, preprocess=replace(config.preprocess, **pre))
    return new, user
