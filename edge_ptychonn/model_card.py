"""The model card: the typed JSON sidecar beside ``model.onnx`` (``model.json``).

One schema, read and written only here (:func:`load_card`, :func:`find_card`,
:func:`save_card`; :func:`check_input_size` refuses a card written for another
input size). Everything that needs a model's settings reads them from
the :class:`ModelCard`: the live processor its preprocessing, ``evaluate``,
``train`` and the demo its stitch settings and training scans. It imports no
torch and no simulator (only ``stream.preprocess``, ``stream.postprocess``, ``files``, numpy), so the
live path can import it.

Blocks (JSON keys):

- ``version``: the schema version (:data:`CARD_VERSION`); a card without one is
  read as version 1. A card from a newer version is refused.
- ``name``, ``input_size``, ``outputs``: what the network is; with a ``model``
  block, ``outputs`` is ``["phase"]``, or ``["phase", "amplitude"]`` for a model
  with ``amplitude_head`` (anything else is refused: the card would say the
  network gives what it does not).
- ``preprocess``: :class:`~edge_ptychonn.stream.preprocess.PreprocessConfig`
  fields, the input the network was trained on (the processor's defaults).
- ``stitch``: :class:`StitchSettings`, which pixels of a predicted patch count.
- ``output_mask``: :class:`~edge_ptychonn.stream.postprocess.OutputMask`, a
  disc holding the probe's bright centre in output pixels; the processor sets
  the published phase outside it to a constant (``outputMask``); a disc that
  holds no pixel of the output is refused. Optional: a
  card without it leaves the outputs as the network gives them.
- ``model``: :class:`ModelConfig`, the architecture.
- ``training``: :class:`Training`, how it was trained, including the simulated
  scan settings (``scan_settings``, a ``ScanSettings`` as a dict) from which
  held-out scans are made.
- ``accuracy``: measured scores (``edge-ptychonn evaluate``'s JSON), kept as
  written: a record of numbers, not settings.
- ``limits``: sentences for the human-readable card.

The rule for unknown keys: refused, with a ``ValueError`` naming them and the
known ones, at the top level and inside every typed block (a misspelt setting
would otherwise be ignored without a word); only ``accuracy`` and
``training.scan_settings`` are kept as written (``ScanSettings.from_dict``
checks the latter where scans are simulated). Missing keys take the defaults
below (``null`` too), so a card with only a ``preprocess`` block is valid. Settings blocks
(``preprocess``, ``stitch``, ``model``, ``output_mask``) are saved complete; ``None`` entries of
the card and of its ``training`` record are left out.

``default_model_path()`` finds the shipped model however the project is
installed (source checkout, editable, wheel, conda).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from edge_ptychonn.files import write_bytes_whole
from edge_ptychonn.stream.postprocess import OutputMask
from edge_ptychonn.stream.preprocess import PreprocessConfig

CARD_VERSION = 1
DEFAULT_MODEL_NAME = "ptychonn.onnx"


@dataclass(frozen=True)
class StitchSettings:
    """Which pixels of a predicted patch count when patches are stitched and scored.

    ``probe_threshold``: a patch pixel counts with weight ``|probe|**2`` (peak 1)
    where that is at least this fraction of the peak (the probe's bright centre;
    training's loss uses the same region). ``min_cover_weight``: an object pixel
    is scored when the summed weight there is at least this.
    """

    probe_threshold: float = 0.1
    min_cover_weight: float = 0.5

    def __post_init__(self) -> None:
        for name in ("probe_threshold", "min_cover_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"stitch.{name} must be a finite number, got {value!r}")
        if not 0 <= self.probe_threshold < 1:
            raise ValueError(f"stitch.probe_threshold must be in [0, 1), got {self.probe_threshold}")
        if not self.min_cover_weight > 0:
            raise ValueError(f"stitch.min_cover_weight must be > 0, got {self.min_cover_weight}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one PtychoNN network (``science.model`` builds it)."""

    width: int = 16
    depth: int = 4
    input_size: int = 128
    batch_norm: bool = True
    amplitude_head: bool = False
    head_blocks: int = 0  # residual blocks at full resolution before the phase head (0: PtychoNN as published)

    def __post_init__(self) -> None:
        for name in ("width", "depth", "input_size", "head_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        for name in ("batch_norm", "amplitude_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not 1 <= self.width <= 256:
            raise ValueError(f"width must be 1..256, got {self.width}")
        if not 1 <= self.depth <= 7:
            raise ValueError(f"depth must be 1..7, got {self.depth}")
        if not 0 <= self.head_blocks <= 8:
            raise ValueError(f"head_blocks must be 0..8, got {self.head_blocks}")
        if self.input_size < 2**self.depth or self.input_size % (2**self.depth):
            raise ValueError(
                f"input_size must be a multiple of 2**depth = {2**self.depth} (and at least that), "
                f"got {self.input_size}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Training:
    """How a model was trained (``edge-ptychonn train`` fills it; all optional).

    ``scan_settings``: the simulated scans' ``ScanSettings`` as a dict (seed
    ``None``); ``eval_n_positions``: positions of a held-out scan;
    ``dose_range``: the photon-count factors of the training scans (dose
    augmentation, log-uniform), when not all at ``scan_settings.photons``;
    ``family_mix``: family -> fraction of the training scans simulated with
    that family instead of the base one (``--family-mix``), when any;
    ``ssim_weight``: the weight of the ``1 - SSIM`` term added to the L1 loss
    (``--ssim-weight``), when not 0;
    ``widened_from``: the width of the ``--init-from`` model, when this run
    widened it (``science.model.widen``) to ``model.width``;
    ``head_blocks_from``: the head blocks of the ``--init-from`` model, when
    this run added more (``science.model.add_head_blocks``);
    ``device``: the GPU it trained on (``cuda:N``), when not the CPU;
    ``continued_from``: the record of the run whose weights this one started
    from (``--init-from``), itself possibly continued from another.
    """

    scan_settings: Mapping[str, Any] | None = None
    eval_n_positions: int | None = None
    train_seeds: tuple[int, ...] | None = None
    val_seeds: tuple[int, ...] | None = None
    n_train_scans: int | None = None
    n_train_frames: int | None = None
    n_val_frames: int | None = None
    epochs: int | None = None
    epochs_run: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    bf16: bool | None = None
    seed: int | None = None
    threads: int | None = None
    train_minutes: float | None = None
    stopped_at_time_limit: bool | None = None
    train_loss: tuple[float, ...] | None = None
    val_loss: tuple[float, ...] | None = None
    n_parameters: int | None = None
    host: str | None = None
    torch: str | None = None
    edge_ptychonn: str | None = None
    command: str | None = None
    checkpoint: str | None = None
    init_from: str | None = None
    dose_range: tuple[float, float] | None = None
    family_mix: Mapping[str, float] | None = None
    ssim_weight: float | None = None
    widened_from: int | None = None
    head_blocks_from: int | None = None
    device: str | None = None
    continued_from: Training | None = None

    def __post_init__(self) -> None:
        # typed as the rest of the card: a hand-edited record (an --init-from card's) is otherwise
        # read without a word and breaks the run that writes it into its own card, at the end
        for name, kind in _TRAINING_TYPES.items():
            value = getattr(self, name)
            if value is not None and not _is_kind(value, kind):
                raise ValueError(f"{name} must be {_KIND_TEXT[kind]}, got {value!r}")
        if self.eval_n_positions is not None and self.eval_n_positions < 1:  # read as a setting: 0 meant the default
            raise ValueError(f"eval_n_positions must be at least 1, got {self.eval_n_positions}")
        if self.dose_range is not None and len(self.dose_range) != 2:
            raise ValueError(f"dose_range must be two numbers (low, high), got {self.dose_range!r}")


_TRAINING_TYPES = {
    "scan_settings": "mapping", "family_mix": "mix",
    **dict.fromkeys(("eval_n_positions", "n_train_scans", "n_train_frames", "n_val_frames", "epochs", "epochs_run",
                     "steps", "batch_size", "seed", "threads", "n_parameters", "widened_from", "head_blocks_from"),
                    "int"),
    **dict.fromkeys(("train_seeds", "val_seeds"), "ints"),
    **dict.fromkeys(("lr", "weight_decay", "train_minutes", "ssim_weight"), "number"),
    **dict.fromkeys(("train_loss", "val_loss", "dose_range"), "numbers"),
    **dict.fromkeys(("bf16", "stopped_at_time_limit"), "bool"),
    **dict.fromkeys(("host", "torch", "edge_ptychonn", "command", "checkpoint", "init_from", "device"), "str"),
}
_KIND_TEXT = {"mapping": "a JSON object", "mix": "a JSON object of family: fraction", "int": "a whole number",
              "ints": "a list of whole numbers", "number": "a number", "numbers": "a list of numbers",
              "bool": "true or false", "str": "a string"}


def _is_kind(value: Any, kind: str) -> bool:
    def integer(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def number(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    if kind in ("ints", "numbers"):
        return isinstance(value, (list, tuple)) and all(map(integer if kind == "ints" else number, value))
    if kind == "mix":
        return isinstance(value, Mapping) and all(isinstance(k, str) and number(v) for k, v in value.items())
    return {"mapping": lambda v: isinstance(v, Mapping), "int": integer, "number": number,
            "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str)}[kind](value)


@dataclass(frozen=True)
class ModelCard:
    """The typed sidecar of one ONNX model (see the module docstring)."""

    name: str = ""
    input_size: int | None = None
    outputs: tuple[str, ...] = ("phase",)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    stitch: StitchSettings = field(default_factory=StitchSettings)
    output_mask: OutputMask | None = None
    model: ModelConfig | None = None
    training: Training | None = None
    limits: tuple[str, ...] = ()
    accuracy: Mapping[str, Any] = field(default_factory=dict)
    version: int = CARD_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}")
        if self.input_size is not None and (isinstance(self.input_size, bool) or not isinstance(self.input_size, int)
                                            or self.input_size < 1):
            raise ValueError(f"input_size must be a positive integer, got {self.input_size!r}")
        if (not isinstance(self.outputs, (list, tuple)) or not self.outputs
                or not all(isinstance(o, str) for o in self.outputs)):  # "phase": a name, not a list of them
            raise ValueError(f"outputs must be a non-empty list of names, got {self.outputs!r}")
        if not isinstance(self.limits, (list, tuple)) or not all(isinstance(s, str) for s in self.limits):
            raise ValueError(f"limits must be a list of sentences, got {self.limits!r}")
        if self.model is not None:
            given = ("phase", "amplitude") if self.model.amplitude_head else ("phase",)
            if tuple(self.outputs) != given:
                raise ValueError(f"outputs {list(self.outputs)} and model.amplitude_head "
                                 f"{str(self.model.amplitude_head).lower()} disagree: that network's outputs are "
                                 f"{list(given)}")
        if self.input_size is not None and self.model is not None and self.model.input_size != self.input_size:
            raise ValueError(f"input_size {self.input_size} and model.input_size {self.model.input_size} disagree")
        size = self.input_size if self.input_size is not None else (self.model.input_size if self.model else None)
        if self.output_mask is not None and size is not None:
            # a disc that holds no pixel of the output (a centre in detector pixels, or past the edge)
            # would set every published pixel to fill_rad, without a word
            (cy, cx), r = self.output_mask.centre_yx, self.output_mask.radius_px
            near_y, near_x = min(max(cy, 0), size - 1), min(max(cx, 0), size - 1)
            if (near_y - cy) ** 2 + (near_x - cx) ** 2 > r ** 2:
                raise ValueError(
                    f"output_mask: the disc of radius {r:g} around [{cy:g}, {cx:g}] holds no pixel of the "
                    f"{size}x{size} output (pixel centres 0..{size - 1}): every phase pixel would be set to "
                    f"fill_rad {self.output_mask.fill_rad:g}"
                )

    def to_dict(self) -> dict:
        """The JSON form (``version`` first, ``None`` fields left out)."""
        d = _to_json(self)
        return {"version": d.pop("version"), **d}

    @classmethod
    def from_dict(cls, d: Any) -> ModelCard:
        """Parse the JSON form; ``ValueError`` says which key is wrong and why."""
        d = _mapping("model card", d)
        version = d.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"model card version must be a positive integer, got {version!r}")
        if version > CARD_VERSION:
            raise ValueError(f"model card version {version} is newer than this edge-ptychonn reads "
                             f"({CARD_VERSION}): upgrade edge-ptychonn")
        return _from_json(cls, {**d, "version": version}, "model card")


# the dataclasses written as JSON objects; the fields kept as written (JSON objects)
_BLOCKS = {PreprocessConfig, StitchSettings, OutputMask, ModelConfig, Training, ModelCard}
_VERBATIM = {"accuracy", "scan_settings", "family_mix"}


def _mapping(where: str, value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(value).__name__}")
    return dict(value)


def _from_json(cls: type, value: Any, where: str):
    d = _mapping(where, value)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, v in d.items():
        block = _block_type(cls, name)
        if v is None:  # absent and null alike: the default
            continue
        if name in _VERBATIM:
            kwargs[name] = _mapping(f"{where}.{name}" if cls is not ModelCard else name, v)
        elif block is not None:
            kwargs[name] = _from_json(block, v, f"{where}.{name}" if cls is not ModelCard else name)
        else:
            kwargs[name] = tuple(v) if isinstance(v, list) else v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _block_type(cls: type, name: str) -> type | None:
    """The typed block class of field ``name`` of ``cls``, if it is one."""
    if cls is ModelCard:
        return {"preprocess": PreprocessConfig, "stitch": StitchSettings, "output_mask": OutputMask,
                "model": ModelConfig, "training": Training}.get(name)
    if cls is Training and name == "continued_from":
        return Training
    return None


def _to_json(value: Any) -> Any:
    if type(value) in _BLOCKS:
        sparse = type(value) in (ModelCard, Training)  # settings blocks are written complete
        return {f.name: _to_json(getattr(value, f.name)) for f in fields(value)
                if not (sparse and getattr(value, f.name) is None)}
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def card_path(model_path: str | Path) -> Path:
    """Where the card of ``model.onnx`` lies: ``model.json`` beside it."""
    return Path(model_path).with_suffix(".json")


def load_card(model_path: str | Path) -> ModelCard:
    """The card beside ``model_path`` (or at it, for a ``.json``).

    Raises ``FileNotFoundError`` when there is none and ``ValueError`` when it
    is not a valid card (the message names the file and the key).
    """
    path = card_path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the model card (preprocessing, training) must lie beside the model")
    try:
        return ModelCard.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"cannot read model card {path}: {exc}") from None


def find_card(model_path: str | Path) -> ModelCard | None:
    """Like :func:`load_card`, but ``None`` when the model has no card."""
    return load_card(model_path) if card_path(model_path).is_file() else None


def card_input_size(card: ModelCard | None) -> int | None:
    """The input side the card was written for: its ``input_size``, else ``model.input_size``;
    ``None`` when it says neither (or there is no card)."""
    if card is None:
        return None
    return card.input_size if card.input_size is not None else (card.model.input_size if card.model else None)


def check_input_size(card: ModelCard | None, model_path: str | Path, input_shape) -> None:
    """``ValueError`` when ``card`` (the card beside ``model_path``) was written for another input
    size than the model takes (``input_shape``, (h, w)): it is another model's card, and its
    preprocessing and output mask would be applied to this model without a word. A card that
    gives no size, or no card, passes. The one check of the processor, ``evaluate``, ``train
    --init-from`` and ``finetune``."""
    size = card_input_size(card)
    h, w = (int(v) for v in input_shape)
    if size is not None and (h, w) != (size, size):
        raise ValueError(f"the model card {card_path(model_path)} says input_size {size}, but the model takes "
                         f"{h}x{w} input: it is another model's card (its preprocessing and output mask would be "
                         "applied to this one)")


def card_bytes(card: ModelCard) -> bytes:
    """The ``.json`` file's contents for ``card``."""
    return (json.dumps(card.to_dict(), indent=2) + "\n").encode()


def save_card(card: ModelCard, model_path: str | Path) -> Path:
    """Write ``card`` beside ``model_path`` (as ``.json``); returns the path. The file takes
    its name only when whole, so a reader never finds half a card."""
    path = card_path(model_path)
    write_bytes_whole(path, card_bytes(card))
    return path


def default_model_path() -> Path:
    """The shipped model (``data/ptychonn.onnx``), found however the project is installed.

    In a source checkout it is ``data/`` at the top of the repository; an
    installed project (wheel, ``pip install``, conda) carries that folder as the
    package data ``edge_ptychonn.data``. Returns the checkout's path when it
    has no file, so that messages name the expected place.
    """
    checkout = Path(__file__).resolve().parent.parent / "data" / DEFAULT_MODEL_NAME
    if checkout.is_file():
        return checkout
    try:
        installed = Path(str(resources.files("edge_ptychonn.data").joinpath(DEFAULT_MODEL_NAME)))
    except ModuleNotFoundError:
        return checkout
    return installed if installed.is_file() else checkout
