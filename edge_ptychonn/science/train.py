"""Train PtychoNN on simulated scans; export ONNX, metadata and a model card.

Steps (``main``):

1. simulate ``--train-scans`` scans (seeds ``--seed-base`` onwards) and
   ``--val-scans`` validation scans (seeds from ``--val-seed-base``), with the
   same settings (``--family``, ``--photons``, ``--overlap``, ...); with
   ``--dose-range LOW HIGH`` each training scan's photons are ``--photons``
   times a factor drawn log-uniformly from [LOW, HIGH] (dose augmentation;
   validation stays at ``--photons``); with ``--family-mix cells:0.3`` a
   fraction of the training scans, chosen by seed, has another object family
   (``scan_family``; validation stays ``--family``);
2. choose the input: with ``--normalize running`` (the default) every frame's
   counts are scaled by the reference total (the mean total of the validation
   frames, at ``--photons``) over the mean total of its own scan, the value the
   live running mean (the last 1024 frames) settles to over a scan
   (``scan_factors``, with the totals after the crop and bin, as live; ``total``:
   over its own total), then ``sqrt`` of the
   counts times ``1 / p99.9`` of the training data; every batch goes through
   ``preprocess.preprocess``, the function ``evaluate`` and the live pipeline use;
3. train with AdamW, a cosine learning-rate decay that reaches its end at the
   last step or at the time limit, whichever comes first, bf16 autocast where the
   device runs bf16 natively (about 3.5x faster than float32 on a CPU with AMX or
   AVX-512 bf16; several times slower where it is emulated: ``resolve_bf16``),
   channels-last tensors, and a masked
   L1 loss on the probe's bright centre (``|probe|**2 >= stitch.probe_threshold``
   of its peak, the region stitching uses; ``--ssim-weight W`` adds ``W * (1 - SSIM)``
   over the same region, ``Trainer._masked_ssim``),
   against absolute-phase targets (with ``running``, which hides a scan's
   absolute phase: batches of groups of ``SCAN_GROUP`` frames of one scan, and
   one constant per scan removed from the error, as the scores remove it); after each epoch the BatchNorm running
   statistics are recomputed for the current weights (``recalibrate_batchnorm``);
4. report the training and validation loss (eval mode, float32) per epoch and save the weights
   and arguments after each to ``<out>.epoch.pt``, which takes the name ``<out>.pt`` last, once the
   model and its card are written (a run stopped before leaves an earlier model's four files as
   they were, and its last epoch in ``<out>.epoch.pt``: ``--init-from`` takes it);

``--init-from`` continues from an earlier run: its ``<out>.pt``, or an
exported ``.onnx`` of the same architecture (``science.model.from_onnx``: the
BatchNorm layers, folded into the convolutions by the export, are unfolded
again with the statistics of the training data, see ``load_onnx_weights``);
the preprocessing comes from the checkpoint or the card beside the ONNX file,
with the ``--normalize`` setting of this run; a narrower model (smaller width,
same depth) is widened to ``--width`` first, and head blocks up to
``--head-blocks`` are added (zero at the start), both computing the same function
(``science.model.widen``, ``science.model.add_head_blocks``).
5. export ``<out>.onnx`` (eval mode: BatchNorm folded into constants, opset 17,
   dynamic batch), score the model on held-out and out-of-family scans
   (``--eval``, ``science.accuracy``), and write ``<out>.json`` (the typed model
   card, ``edge_ptychonn.model_card``, that the processor reads) and ``<out>.md``
   (the card for people). The card's ``output_mask`` is a disc around the
   training probe's bright centre: the processor publishes a constant outside
   it (``stream.postprocess``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from edge_ptychonn import __version__, cli_options
from edge_ptychonn.files import check_writable, whole_file, write_bytes_whole
from edge_ptychonn.cli_options import DefaultsFormatter
from edge_ptychonn.model_card import (
    ModelCard, ModelConfig, StitchSettings, Training, check_input_size, find_card, save_card,
)
from edge_ptychonn.progress import Progress
from edge_ptychonn.science import accuracy
from edge_ptychonn.science.simulate import BASE_SIZE, FAMILIES, ScanSettings, simulate_scan, warnings_as_lines
from edge_ptychonn.science.stitch import probe_weight
from edge_ptychonn.stream.postprocess import OutputMask
from edge_ptychonn.stream.preprocess import NORMALIZATIONS, PreprocessConfig, preprocess, reference_of

LIMITS = (
    "Trained on simulated data only; real detectors add background, dead pixels, partial coherence and "
    "probe drift that the simulation leaves out.",
    "The probe, overlap and pixel sizes are fixed in training: a different probe needs retraining. "
    "The dose is normalised away by the preprocessing (preprocess.normalize); the card's accuracy "
    "section says which doses were checked.",
    "Phase is absolute only up to a constant; scores remove that constant.",
)


SCAN_GROUP = 8  # frames of one scan that come together in a training batch (normalize 'running')
RECALIBRATION_FRAMES = 2048  # training frames that recompute the BatchNorm statistics after each epoch


def scan_group(scan_length: int, batch_size: int) -> int:
    """The frames of one scan that come together in a batch (``Trainer.batches``)."""
    return max(1, min(SCAN_GROUP, scan_length, batch_size))


def batch_layout(n_frames: int, batch_size: int, scan_length: int | None = None) -> tuple[int, int]:
    """``(steps per epoch, frames per batch)`` of ``Trainer.batches``: ``n_frames // batch_size``
    batches of ``batch_size``; with ``scan_length`` (whole scans of that many frames), batches of
    ``batch_size // g`` groups of ``g = scan_group(...)`` frames of one scan, ``scan_length // g``
    groups per scan (the frames per batch then ``batch_size`` rounded down to a multiple of ``g``)."""
    if not scan_length:
        return n_frames // batch_size, batch_size
    g = scan_group(scan_length, batch_size)
    per = max(1, batch_size // g)
    return (n_frames // scan_length) * (scan_length // g) // per, per * g


OUTPUT_SUFFIXES = (".onnx", ".json", ".md", ".pt")
EPOCH_SUFFIX = ".epoch.pt"  # the weights after each epoch; <out>.pt once the run's model is written


def output_prefix(out: str | Path) -> Path:
    """The prefix of ``--out``: as given (dots in the name stay, ``site-2024.06`` writes
    ``site-2024.06.onnx``), less one of :data:`OUTPUT_SUFFIXES` when it ends with it; ``ValueError``
    when it names no file (``""``, ``.``, ``/``, a folder ``models/``)."""
    given, out = str(out), Path(out)
    if out.name in ("", ".", "..") or given.endswith("/"):  # "models/": a folder, not the files' prefix
        raise ValueError(f"--out {given!r} names no file: give a prefix, e.g. models/site1")
    return out.with_suffix("") if out.suffix in OUTPUT_SUFFIXES else out


def output_file(prefix: Path, suffix: str) -> Path:
    """``<prefix><suffix>`` (``Path.with_suffix`` would replace a dotted name's last part)."""
    return prefix.with_name(prefix.name + suffix)


def check_outputs(prefix: Path) -> None:
    """``OSError`` unless the files ``<prefix>.onnx``, ``.json``, ``.md``, ``.pt`` and the epochs'
    ``<prefix>.epoch.pt`` can be written (their folder is made): checked before the work, not after it."""
    check_writable(output_file(prefix, s) for s in (*OUTPUT_SUFFIXES, EPOCH_SUFFIX))


@contextlib.contextmanager
def naming_the_last_epoch(command: str, out: str | Path):
    """Around a run of ``train`` or ``finetune`` (``command``) that saves each finished epoch to
    ``<out>.epoch.pt`` (:func:`save_checkpoint`): a ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM under
    ``cli.sigterm_interrupts``) first says on stderr where that epoch's weights are, when this run
    wrote the file (not an earlier stopped run), then goes on to the command's one line "interrupted"
    (exit 130). A run stopped before its first epoch has written nothing and says nothing more."""
    started = time.time()
    try:
        yield
    except KeyboardInterrupt:  # the finished epochs are kept: say where, before the one line "interrupted"
        with contextlib.suppress(ValueError, OSError):
            epoch = output_file(output_prefix(out), EPOCH_SUFFIX)
            if epoch.stat().st_mtime >= started:  # this run's, not one an earlier stopped run left
                print(f"edge-ptychonn {command}: the last finished epoch's weights are in {epoch} "
                      f"(--init-from {shlex.quote(str(epoch))} continues from them)", file=sys.stderr)
        raise


def keep_last_epoch(prefix: Path) -> Path:
    """``<prefix>.epoch.pt`` (the last epoch's :func:`save_checkpoint`) takes the name
    ``<prefix>.pt``, which it returns: the last step of a run whose model and card are written,
    so that a run stopped before leaves an earlier model's ``.pt`` with its ``.onnx``."""
    pt = output_file(prefix, ".pt")
    os.replace(output_file(prefix, EPOCH_SUFFIX), pt)
    return pt


def load_checkpoint(path: str | Path) -> dict:
    """The ``<out>.pt`` of ``train`` or ``finetune`` (loaded on the CPU); ``ValueError`` when the
    file is not one."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu")
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, struct.error, ...: all mean "not one"
        raise ValueError(f"{path}: not a checkpoint of edge-ptychonn train ({_load_failure(exc)})") from None
    missing = [k for k in ("state_dict", "model", "preprocess") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of edge-ptychonn train (no {', '.join(missing)})")
    return ckpt


def _load_failure(exc: Exception) -> str:
    """The reason in ``torch.load``'s error, in a line. Its safe loader's refusal advises loading
    with ``weights_only=False``, which would run whatever code the file holds: only the
    unpickler's own complaint is kept of it."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        return f"not plain weights: {' '.join(detail.split()) or type(exc).__name__}"
    return (text.splitlines() or [type(exc).__name__])[0]


def check_init_from(path: str | Path, model_config: ModelConfig | None = None) -> None:
    """``ValueError`` unless ``--init-from`` is a readable ``.onnx`` PtychoNN or ``.pt`` checkpoint
    that can start a run of ``model_config`` (:func:`init_architecture`; not checked when None):
    read here, before any work, so that a wrong file fails at once."""
    from edge_ptychonn.science.model import from_onnx

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"init-from {path} is not a file")
    if path.suffix == ".onnx":  # and its card, whose preprocessing the run keeps
        layout = from_onnx(path).config
        card = find_card(path)
        check_input_size(card, path, (layout.input_size,) * 2)
        earlier = card.preprocess if card is not None else PreprocessConfig()
    elif path.suffix == ".pt":
        ckpt = load_checkpoint(path)
        try:
            layout, earlier = ModelConfig(**ckpt["model"]), PreprocessConfig(**ckpt["preprocess"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a checkpoint of edge-ptychonn train ({exc})") from None
        find_card(path)  # the card beside it, read at the end for the run's record: a malformed one fails now
    else:
        raise ValueError(f"init-from {path}: must be an exported ONNX PtychoNN (.onnx) or the <out>.pt of "
                         "edge-ptychonn train or finetune")
    if model_config is not None:
        try:
            init_architecture(layout, model_config, onnx=path.suffix == ".onnx")
            check_kept_preprocess(earlier, model_config.input_size)
        except ValueError as exc:
            raise ValueError(f"cannot start from {path}: {exc}") from None


def check_kept_preprocess(pp: PreprocessConfig, size: int) -> None:
    """``ValueError`` unless ``pp`` (the ``--init-from`` model's preprocessing, which the run keeps)
    makes model inputs of ``size`` x ``size`` of the simulated frames, which are that size: a crop or
    bin for another detector would give inputs of another size than the targets."""
    try:
        shape = pp.output_shape((size, size))
    except ValueError as exc:
        shape = str(exc)
    if shape != (size, size):
        shape = f"{shape[0]}x{shape[1]} inputs" if isinstance(shape, tuple) else shape
        raise ValueError(f"its preprocessing (crop {pp.crop_hw}, bin {pp.bin_factor}), which training keeps, "
                         f"does not take the {size}x{size} simulated frames to {size}x{size} inputs ({shape}); "
                         "fine-tune it on its own detector's frames with edge-ptychonn finetune instead")


def init_architecture(layout: ModelConfig, model_config: ModelConfig, *, onnx: bool) -> ModelConfig:
    """The architecture in which an ``--init-from`` model (``layout``: a checkpoint's, or an ONNX
    graph's, whose BatchNorm the export folded and whose convolutions take any input size) is
    loaded, before it is widened to ``model_config.width`` and given its head blocks; ``ValueError``
    when it cannot become ``model_config`` that way."""
    init_config = replace(layout, input_size=model_config.input_size, batch_norm=model_config.batch_norm) if onnx \
        else layout
    grown = replace(init_config, width=model_config.width, head_blocks=model_config.head_blocks)
    wider = init_config.width > model_config.width
    more_blocks = init_config.head_blocks > model_config.head_blocks
    if grown != model_config or wider or more_blocks:
        have, want = init_config.to_dict(), model_config.to_dict()
        grows = {"width": not wider, "head_blocks": not more_blocks}  # what loading may still change
        differ = [k for k in want if have.get(k) != want[k] and not grows.get(k)]
        raise ValueError("it is another architecture: " + ", ".join(f"{k} {have.get(k)} (this run: {want[k]})"
                                                                       for k in differ)
                         + (" (a wider one cannot be narrowed)" if wider else "")
                         + (" (head blocks cannot be removed)" if more_blocks else ""))
    return init_config


def check_training_options(args: argparse.Namespace) -> None:
    """``ValueError`` for options of ``train`` and ``finetune`` that cannot train: ``epochs``,
    ``batch_size``, ``lr``, ``weight_decay``, ``max_minutes``, ``threads``, ``seed``."""
    if args.epochs < 1 or args.batch_size < 2:
        raise ValueError(f"epochs must be >= 1 and batch-size >= 2, got {args.epochs}, {args.batch_size}")
    for name, value in (("lr", args.lr), ("weight-decay", args.weight_decay), ("max-minutes", args.max_minutes)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0{' (0: no limit)' if name == 'max-minutes' else ''}, "
                             f"got {value}")
    if args.threads < 1:
        raise ValueError(f"threads must be >= 1, got {args.threads}")
    if args.seed < 0:
        raise ValueError(f"seed must be >= 0, got {args.seed}")


def dose_factor(seed: int, dose_range: tuple[float, float]) -> float:
    """The photon-count factor of training scan ``seed``: log-uniform in ``dose_range``, fixed by the seed."""
    lo, hi = dose_range
    if lo == hi:
        return float(lo)
    u = np.random.default_rng((seed, 51966)).random()
    return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))


def scan_family(seed: int, base_family: str, family_mix: dict[str, float] | None) -> str:
    """The object family of training scan ``seed``: each family of ``family_mix`` with its
    fraction (a uniform draw fixed by the seed), else ``base_family``."""
    if not family_mix:
        return base_family
    u = np.random.default_rng((seed, 64017)).random()
    edge = 0.0
    for family, fraction in family_mix.items():
        edge += fraction
        if u < edge:
            return family
    return base_family


def parse_family_mix(specs: list[str]) -> dict[str, float] | None:
    """``["cells:0.3", ...]`` -> ``{"cells": 0.3, ...}`` (None when empty); ``ValueError`` says why not."""
    mix: dict[str, float] = {}
    for spec in specs:
        family, _, fraction = spec.partition(":")
        try:
            value = float(fraction)
        except ValueError:
            raise ValueError(f"family-mix entries are FAMILY:FRACTION (e.g. cells:0.3), got {spec!r}") from None
        if family not in FAMILIES:
            raise ValueError(f"family-mix: family must be one of {FAMILIES}, got {family!r}")
        if family in mix:
            raise ValueError(f"family-mix: {family} given twice")
        if not 0 < value <= 1:
            raise ValueError(f"family-mix: fraction must be in (0, 1], got {spec!r}")
        mix[family] = value
    if sum(mix.values()) > 1 + 1e-9:
        raise ValueError(f"family-mix: fractions add up to {sum(mix.values()):g}, more than 1")
    return mix or None


def make_dataset(seeds: list[int], base: ScanSettings, *, amplitude: bool, progress: bool, label: str,
                 dose_range: tuple[float, float] = (1.0, 1.0), family_mix: dict[str, float] | None = None):
    """Simulate one scan per seed: int16 frames (N, n, n), float16 phase (and
    amplitude) targets (N, n, n), and the probe (the same for all). With a
    ``dose_range`` other than (1, 1), scan ``seed`` has ``base.photons *
    dose_factor(seed, dose_range)`` photons; with a ``family_mix``, the family
    :func:`scan_family` gives it."""
    frames, phases, amps = [], [], []
    probe = None
    bar = Progress(len(seeds), f"simulate {label}", unit="scans", enabled=progress)
    for seed in seeds:
        settings = replace(base, seed=seed, photons=base.photons * dose_factor(seed, dose_range),
                           family=scan_family(seed, base.family, family_mix))
        with warnings.catch_warnings():  # a few clipped pixels at the highest doses are part of the data
            warnings.simplefilter("ignore", UserWarning)
            f, truth = simulate_scan(settings, progress=False)
        frames.append(f)
        phases.append(truth.patches_phase.astype(np.float16))
        if amplitude:
            amps.append(truth.patches_amplitude().astype(np.float16))
        probe = truth.probe
        bar.update(1, frames=sum(len(x) for x in frames))
    bar.close()
    return (
        np.concatenate(frames),
        np.concatenate(phases),
        np.concatenate(amps) if amplitude else None,
        probe,
    )


def reference_total(frames: np.ndarray) -> float:
    """The mean counts per frame (4 significant digits): ``normalize: total`` scales every frame to it."""
    return float(f"{float(frames.reshape(len(frames), -1).sum(axis=1, dtype=np.float64).mean()):.4g}")


def loaded_totals(frames: np.ndarray, pp: PreprocessConfig) -> np.ndarray:
    """Each frame's total counts (float64) after the crop and bin of ``pp``: the totals that the
    live normalisation takes (``preprocess.load_into``, then ``transform_batch``); ``ValueError``
    when the crop does not fit the frames or the bin does not divide them."""
    pp.output_shape(frames.shape[1:])
    if pp.crop_hw is not None:
        y0, x0 = pp.crop_origin(frames.shape[1:])
        frames = frames[:, y0 : y0 + pp.crop_hw[0], x0 : x0 + pp.crop_hw[1]]
    return frames.sum(axis=(1, 2), dtype=np.float64)  # binning adds counts up: the same totals


def scan_factors(frames: np.ndarray, scan_length: int, pp: PreprocessConfig) -> np.ndarray | None:
    """Each frame's normalisation factor for training with ``normalize: "running"``:
    the reference total over the mean total of the frame's own scan (consecutive
    runs of ``scan_length`` frames; totals beyond twice or below half their median
    left out: ``preprocess.reference_of``), the value that the live running mean
    settles to over a scan. Totals are taken after the crop and bin (:func:`loaded_totals`)
    and frames whose total is not positive are neither counted nor scaled, as live.
    Training batches mix shuffled frames of many scans, so one
    running mean across them would see all scans (and all doses) at once; these
    factors give every frame the normalisation of its own scan. ``None`` for the
    other normalisations (``preprocess`` computes ``total`` per frame itself)."""
    if pp.normalize != "running":
        return None
    if scan_length < 1 or len(frames) % scan_length:
        raise ValueError(f"{len(frames)} frames are not whole scans of {scan_length}")
    totals = loaded_totals(frames, pp).reshape(len(frames) // scan_length, scan_length)
    counted = (totals > 0) & np.isfinite(totals)
    means = np.array([reference_of(scan[ok]) for scan, ok in zip(totals, counted)])
    factors = np.where(means > 0, pp.reference_total / np.where(means > 0, means, 1.0), 1.0)
    return np.where(counted, factors[:, None], 1.0).reshape(-1).astype(np.float32)


def training_inputs(frames: np.ndarray, pp: PreprocessConfig, factors: np.ndarray | None = None) -> np.ndarray:
    """Model inputs (float32 (N, h, w)) of ``frames`` as training makes them: with ``normalize:
    "running"`` each frame is scaled by its ``factors`` entry (:func:`scan_factors`) before the
    rest of the preprocessing, so that its input does not depend on which frames share its batch."""
    if pp.normalize != "running":
        return preprocess(frames, pp)
    if factors is None:
        raise ValueError("normalize 'running' needs each frame's scan factor (scan_factors)")
    scaled = frames.astype(np.float32) * np.asarray(factors, dtype=np.float32)[:, None, None]
    return preprocess(scaled, replace(pp, normalize="none"))


def choose_preprocess(frames: np.ndarray, normalize: str = "none", reference: float | None = None) -> PreprocessConfig:
    """``sqrt`` counts (normalised to ``reference`` counts per frame with ``normalize``
    ``"total"``) scaled so that the 99.9th percentile is about 1."""
    sample = frames[:: max(1, len(frames) // 256)]
    norm = PreprocessConfig(transform="sqrt", normalize=normalize, reference_total=reference)
    p999 = float(np.percentile(preprocess(sample, norm), 99.9))
    scale = float(f"{1.0 / max(p999, 1.0):.4g}")
    return replace(norm, scale=scale)


def input_text(pp: PreprocessConfig) -> str:
    """The transform, offset and scale of ``pp`` in words, e.g. ``sqrt(counts) * 0.0184`` or
    ``(log1p(counts) - 1.5) * 0.2`` (model input = (transform(counts) - offset) * scale)."""
    counts = "counts" if pp.transform == "none" else f"{pp.transform}(counts)"
    if pp.offset:
        counts = f"({counts} - {pp.offset:g})"
    return f"{counts} * {pp.scale}"


def output_mask_from_probe(probe: np.ndarray, threshold: float, margin_px: float = 1.0) -> OutputMask:
    """A disc (centre at the patch centre) holding every pixel of the probe's bright
    centre (``probe_weight > 0``), plus ``margin_px``."""
    inside = probe_weight(probe, threshold) > 0
    h, w = inside.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = np.nonzero(inside)
    radius = float(np.hypot(yy - cy, xx - cx).max()) + margin_px
    return OutputMask(centre_yx=(cy, cx), radius_px=round(radius, 2), fill_rad=0.0)


def load_onnx_weights(model, onnx_path: str | Path, inputs) -> None:
    """Load an exported ONNX PtychoNN (BatchNorm folded) into ``model`` (with BatchNorm).

    Each folded convolution computes ``y0 + b`` (``y0``: the convolution without
    bias). The unfolded layer is a bias-free convolution and a BatchNorm whose
    statistics are those of ``y0`` on ``inputs`` (mean ``m``, variance ``v``),
    with weight ``sqrt(v + eps)`` and bias ``m + b``: in eval mode it computes
    exactly ``y0 + b``, and in training mode (batch statistics) nearly so, so
    training continues from the exported model's function.
    """
    import torch

    from edge_ptychonn.science.model import from_onnx

    folded = from_onnx(onnx_path)
    if replace(folded.config, input_size=model.config.input_size, batch_norm=model.config.batch_norm) != model.config:
        raise ValueError(f"{onnx_path} holds a {folded.config} model, not {model.config}")
    src = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    dst = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bn_after = {}
    mods = list(model.modules())
    for i, m in enumerate(mods):
        if isinstance(m, torch.nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1], torch.nn.BatchNorm2d):
            bn_after[id(m)] = mods[i + 1]
    stats = {}
    hooks = []
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.weight.copy_(s.weight)
            bn = bn_after.get(id(d))
            if bn is None:
                d.bias.copy_(s.bias)
                continue
            bn.reset_running_stats()  # mean 0, var 1: eval computes (y0 - 0) / sqrt(1 + eps) * w + b
            bn.weight.fill_(1.0).mul_(math.sqrt(1.0 + bn.eps))
            bn.bias.copy_(s.bias)

            def hook(module, args, key=id(bn)):
                y = args[0].float()
                stats[key] = (y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False))

            hooks.append(bn.register_forward_pre_hook(hook))
        model.eval()
        model(inputs)
        for h in hooks:
            h.remove()
        for bn in bn_after.values():
            mean, var = stats[id(bn)]
            bias = bn.bias.clone()
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mean + bias)


def lr_at(progress: float, base_lr: float, warmup: float = 0.03) -> float:
    """Linear warm-up, then cosine decay to 1 % of ``base_lr`` at ``progress = 1``."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return base_lr * (0.1 + 0.9 * progress / warmup)
    t = (progress - warmup) / (1 - warmup)
    return base_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def training_device(text: str) -> str:
    """``--device`` of ``train`` and ``finetune`` -> ``"cpu"`` or ``"cuda:N"`` (``edge_ptychonn.devices``:
    ``auto`` takes GPU 0 when torch sees one, else the CPU); ``ValueError`` when torch cannot run there."""
    import torch

    from edge_ptychonn.devices import DeviceUnavailable, parse_device, resolve_device

    try:
        request = parse_device(text)
    except ValueError:
        request = None
    if request is None or len(request.indices) > 1:  # a consumer-to-GPU map is for consumers only
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (one device), got {text!r}")
    try:
        return resolve_device(request, 1, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                              engine="torch " + torch.__version__)
    except DeviceUnavailable as exc:
        raise ValueError(str(exc)) from None


def add_bf16_options(p: argparse.ArgumentParser) -> None:
    """``--bf16`` / ``--no-bf16`` of ``train`` and ``finetune`` (default: :func:`resolve_bf16`)."""
    p.add_argument("--bf16", dest="bf16", action="store_const", const=True, default=None,
                   help="train with bf16 autocast (default: where the device runs bf16 natively: a GPU of compute "
                        "capability 8.0 or later, a CPU with AMX or AVX-512 bf16; emulated, it is several times "
                        "slower than float32)")
    p.add_argument("--no-bf16", dest="bf16", action="store_const", const=False, help="train in float32")


def resolve_bf16(asked: bool | None, device: str) -> tuple[bool, str | None]:
    """(bf16 autocast or not, a line saying why when it was chosen for the user). ``asked``
    None: bf16 where ``device`` runs it natively; elsewhere torch emulates it (measured on a
    2-core CPU without it: a short run took 282 s with bf16 against 47 s in float32)."""
    if asked is not None:
        return asked, None
    import torch

    if device.startswith("cuda"):
        native = torch.cuda.get_device_capability(device) >= (8, 0)
        where = torch.cuda.get_device_name(device)
    else:
        from engines.torch_engine import TorchEngine

        native, where = TorchEngine.SPEC.native_on_cpu("bf16"), "this CPU"
    if native:
        return True, None
    return False, f"training in float32: {where} has no native bf16 (--bf16 to use it all the same)"


class Trainer:
    """Holds the model, optimiser and the data; one method per phase of an epoch."""

    def __init__(self, args: argparse.Namespace, model_config, pp: PreprocessConfig, mask: np.ndarray,
                 model=None, device: str = "cpu"):
        """Trains ``model`` (default: a fresh one of ``model_config``) on ``device`` (``cpu``,
        ``cuda`` or ``cuda:N``): the model, the inputs, the targets and the loss run there."""
        import torch

        from edge_ptychonn.science.model import build_model

        self.torch = torch
        self.args = args
        self.pp = pp
        self.device = torch.device(device)
        self.bf16 = resolve_bf16(args.bf16, str(self.device))[0]
        model = model if model is not None else build_model(model_config, seed=args.seed)
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.mask = torch.from_numpy(mask.astype(np.float32))[None, None].to(self.device)
        self.mask_sum = float(mask.sum())
        self.step = 0
        self.widened_from: int | None = None  # the width of a narrower --init-from model (init_weights)
        self.head_blocks_from: int | None = None  # the head blocks of an --init-from model given more
        self.ssim_weight = float(getattr(args, "ssim_weight", 0.0) or 0.0)
        if self.ssim_weight:
            self._ssim_setup(args, mask)

    def _ssim_setup(self, args, mask: np.ndarray) -> None:
        """The window, data range and region of the SSIM loss term (``_masked_ssim``)."""
        from edge_ptychonn.science.metrics import SSIM_RADIUS, SSIM_SIGMA

        self.ssim_range = float(getattr(args, "phase_range", ScanSettings().phase_range_rad))
        g = np.exp(-0.5 * (np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1) / SSIM_SIGMA) ** 2)
        self.ssim_window = self.torch.from_numpy((g / g.sum()).astype(np.float32)).to(self.device)
        # the bright centre's bounding box grown by the window's radius (unpadded windows then
        # give SSIM exactly on the box), and the mask on the box
        rows, cols = np.nonzero(mask)
        r, (h, w) = SSIM_RADIUS, mask.shape
        if rows.min() < r or cols.min() < r or rows.max() + r >= h or cols.max() + r >= w:
            raise ValueError("the SSIM loss needs the bright centre at least the SSIM window's radius inside the patch")
        self.ssim_box = ((rows.min() - r, rows.max() + r + 1), (cols.min() - r, cols.max() + r + 1))
        self.ssim_mask = self.mask[..., rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]

    def _inputs(self, frames: np.ndarray, factors: np.ndarray | None = None):
        """Model inputs of ``frames`` (:func:`training_inputs`), on the training device."""
        x = self.torch.from_numpy(training_inputs(frames, self.pp, factors))[:, None].to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.torch.channels_last)

    def _loss(self, out, phase_t, amp_t, groups: np.ndarray | None = None):
        """Mean absolute error over the bright centre. With ``groups`` (a group id per frame:
        its scan) the phase error's mean over each group's bright centres is removed first:
        the loss ignores one constant phase per scan, as the scores do."""
        torch = self.torch
        if isinstance(out, tuple):
            phase, amp = out
        else:
            phase, amp = out, None
        phase_t = phase_t.to(self.device)
        amp_t = None if amp_t is None else amp_t.to(self.device)
        error = phase.float() - phase_t
        if groups is not None:
            _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
            inverse = torch.from_numpy(inverse.reshape(-1)).to(error.device)
            per_frame = (error * self.mask).sum(dim=(1, 2, 3))
            sums = torch.zeros(len(counts), dtype=error.dtype, device=error.device).index_add(0, inverse, per_frame)
            offsets = sums / (torch.from_numpy(counts).to(error.device, error.dtype) * self.mask_sum)
            error = error - offsets[inverse][:, None, None, None]
        loss = (torch.abs(error) * self.mask).sum() / (self.mask_sum * len(phase_t))
        if self.ssim_weight:
            aligned = phase_t + error  # the prediction less its scan's constant
            loss = loss + self.ssim_weight * (1 - self._masked_ssim(aligned, phase_t))
        if amp is not None:
            loss = loss + (torch.abs(amp.float() - amp_t) * self.mask).sum() / (self.mask_sum * len(amp_t))
        return loss

    def _masked_ssim(self, x, y):
        """Mean local SSIM of ``x`` against ``y`` over the bright centre, with the window and
        constants of ``metrics.ssim_map`` and the training phase range as the data range
        (computed on the bright centre's bounding box and the window's reach around it only,
        with a separable window: the rest of the patch does not enter)."""
        from edge_ptychonn.science.metrics import SSIM_K1, SSIM_K2

        torch = self.torch
        conv = torch.nn.functional.conv2d
        (y0, y1), (x0, x1) = self.ssim_box
        x, y = x[..., y0:y1, x0:x1], y[..., y0:y1, x0:x1]
        k = self.ssim_window

        def blur(img):
            return conv(conv(img, k[None, None, :, None]), k[None, None, None, :])

        c1, c2 = (SSIM_K1 * self.ssim_range) ** 2, (SSIM_K2 * self.ssim_range) ** 2
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        return (ssim * self.ssim_mask).sum() / (self.mask_sum * len(x))

    def _autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.bf16)

    def batches(self, n_frames: int, rng, scan_length: int | None = None) -> list[np.ndarray]:
        """One epoch's batches of frame indices (each sorted). Without ``scan_length``: shuffled
        frames. With it (consecutive scans of that many frames): each batch holds groups of
        ``SCAN_GROUP`` frames of one scan, so that the loss can remove one constant per scan."""
        bs = self.args.batch_size
        if not scan_length:
            order = rng.permutation(n_frames)
            return [np.sort(order[s : s + bs]) for s in range(0, n_frames - bs + 1, bs)]
        g = scan_group(scan_length, bs)
        chunks = []
        for first in range(0, n_frames - scan_length + 1, scan_length):
            frames = first + rng.permutation(scan_length)
            chunks += [frames[i : i + g] for i in range(0, scan_length - g + 1, g)]
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        per = max(1, bs // g)
        return [np.sort(np.concatenate(chunks[i : i + per])) for i in range(0, len(chunks) - per + 1, per)]

    def train_one_epoch(self, data, rng, total_steps: int, deadline: float, bar: Progress,
                        scan_length: int | None = None) -> tuple[float, bool]:
        """One pass over shuffled ``data`` (frames, their ``scan_factors`` or None, phase and
        amplitude targets); with ``scan_length`` in groups of one scan, and a loss that ignores
        one constant per scan (:meth:`batches`, :meth:`_loss`); returns (mean loss, stopped at deadline)."""
        torch = self.torch
        frames, factors, phases, amps = data
        self.model.train()
        losses = []
        for idx in self.batches(len(frames), rng, scan_length):
            progress = self.step / total_steps
            if self.args.max_minutes:
                progress = max(progress, 1 - (deadline - time.monotonic()) / (self.args.max_minutes * 60))
            for g in self.opt.param_groups:
                g["lr"] = lr_at(progress, self.args.lr)
            x = self._inputs(frames[idx], None if factors is None else factors[idx])
            pt = torch.from_numpy(phases[idx].astype(np.float32))[:, None]
            at = torch.from_numpy(amps[idx].astype(np.float32))[:, None] if amps is not None else None
            with self._autocast():
                out = self.model(x)
            loss = self._loss(out, pt, at, idx // scan_length if scan_length else None)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            losses.append(float(loss.detach()))
            bar.update(len(idx), loss=float(np.mean(losses[-50:])), lr=self.opt.param_groups[0]["lr"])
            if time.monotonic() >= deadline:
                return float(np.mean(losses)), True
        return float(np.mean(losses)) if losses else float("nan"), False

    def recalibrate_batchnorm(self, frames: np.ndarray, factors: np.ndarray | None = None,
                              n_frames: int = RECALIBRATION_FRAMES, batch_size: int = 64) -> None:
        """Recompute every BatchNorm's running statistics for the current weights.

        The running averages lag the weights while they change, and this data
        carries its signal as small modulations on a large common background
        (the direct beam), so eval mode can be far off the training mode. A
        cumulative average over ``n_frames`` training frames in float32 fixes
        the statistics that the exported (eval-mode) model uses.
        """
        torch = self.torch
        bns = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        idx = np.sort(np.random.default_rng(self.args.seed).choice(len(frames), min(n_frames, len(frames)), replace=False))
        self.model.train()
        with torch.no_grad():
            for start in range(0, len(idx), batch_size):
                sel = idx[start : start + batch_size]
                self.model(self._inputs(frames[sel], None if factors is None else factors[sel]))
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        self.model.eval()

    def validate(self, data, scan_length: int | None = None) -> float:
        """Mean loss over ``data`` (as for ``train_one_epoch``; with ``scan_length``, one
        constant per whole scan removed) in eval mode and float32, as the exported model runs."""
        torch = self.torch
        frames, factors, phases, amps = data
        self.model.eval()
        total, n = 0.0, 0
        step = scan_length or 128
        with torch.no_grad():
            for start in range(0, len(frames), step):
                sl = slice(start, start + step)
                pt = torch.from_numpy(phases[sl].astype(np.float32))[:, None]
                at = torch.from_numpy(amps[sl].astype(np.float32))[:, None] if amps is not None else None
                x = self._inputs(frames[sl], None if factors is None else factors[sl])
                groups = np.zeros(len(pt), dtype=np.int64) if scan_length else None
                total += float(self._loss(self.model(x), pt, at, groups)) * len(pt)
                n += len(pt)
        return total / n


def previous_training(init_from: str | None) -> Training | None:
    """The training record in the card beside an ``--init-from`` checkpoint, shortened, if any.
    For a ``.pt`` (call this before the run can write over it) the card counts only when it is
    that checkpoint's run (same steps, and the same settings the checkpoint records): a run
    stopped before its end leaves its ``<out>.pt`` beside an earlier run's card."""
    if not init_from:
        return None
    card = find_card(init_from)
    checkpoint = load_checkpoint(init_from) if Path(init_from).suffix == ".pt" else None
    if checkpoint is not None and card is not None and card.training is not None:
        t, saved = card.training, checkpoint.get("args") or {}
        if checkpoint.get("step") != t.steps or any(
                k in saved and saved[k] != getattr(t, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "seed")):
            return Training(checkpoint=str(init_from), steps=checkpoint.get("step"))
    if card is None or card.training is None:
        return Training(checkpoint=str(init_from))
    keep = ("command", "epochs_run", "steps", "train_minutes", "train_loss", "val_loss", "n_train_frames",
            "train_seeds", "stopped_at_time_limit", "lr", "dose_range", "family_mix", "ssim_weight",
            "widened_from", "head_blocks_from", "continued_from")
    return Training(**{k: getattr(card.training, k) for k in keep})


def init_weights(trainer: Trainer, init_from: str, model_config: ModelConfig, pp: PreprocessConfig,
                 frames: np.ndarray, factors: np.ndarray | None = None) -> PreprocessConfig:
    """Load ``init_from`` (a ``.pt`` of ``train`` or an exported ``.onnx``) into the trainer's model
    and set the trainer's preprocessing, which it returns: the earlier run's, with this run's
    normalisation (``pp.normalize``, ``pp.reference_total``; ``factors`` from :func:`scan_factors`).
    A narrower model of the same layout is widened to ``model_config.width``, and one with fewer
    head blocks gets ``model_config.head_blocks``, with its function kept (``science.model.widen``,
    ``add_head_blocks``; ``trainer.widened_from``, ``trainer.head_blocks_from`` then hold what it had).
    ``ValueError`` when the architecture differs otherwise."""
    from edge_ptychonn.science.model import add_head_blocks, build_model, from_onnx, widen

    torch = trainer.torch
    if Path(init_from).suffix == ".onnx":
        card = find_card(init_from)
        earlier = card.preprocess if card is not None else PreprocessConfig()
        layout = from_onnx(init_from).config
    else:
        ckpt = load_checkpoint(init_from)
        earlier = PreprocessConfig(**ckpt["preprocess"])
        layout = ModelConfig(**ckpt["model"])
    init_config = init_architecture(layout, model_config, onnx=Path(init_from).suffix == ".onnx")
    trainer.pp = replace(earlier, normalize=pp.normalize, reference_total=pp.reference_total)
    model = trainer.model if init_config == model_config else build_model(init_config).to(trainer.device)
    if Path(init_from).suffix == ".onnx":
        sample = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), 512)).astype(int))  # each frame once
        load_onnx_weights(model, init_from, trainer._inputs(frames[sample], None if factors is None else factors[sample]))
    else:
        model.load_state_dict(ckpt["state_dict"])
    if model is not trainer.model:
        model = model.cpu()
        if init_config.width != model_config.width:
            model = widen(model, model_config.width, seed=trainer.args.seed)
            trainer.widened_from = init_config.width
        if init_config.head_blocks != model_config.head_blocks:
            model = add_head_blocks(model, model_config.head_blocks)
            trainer.head_blocks_from = init_config.head_blocks
        trainer.model.load_state_dict(model.state_dict())
    return trainer.pp


def save_checkpoint(trainer: Trainer, args: argparse.Namespace, model_config: ModelConfig, path: Path,
                    base_card: dict | None = None) -> None:
    """Weights, arguments, architecture and preprocessing (``--init-from`` reads it), and ``base_card``
    (``finetune``'s base model's card, JSON form) when given: an ``<out>.epoch.pt`` has no card
    beside it, and a run continued from it keeps the base's stitch settings, training probe and scan
    settings. The file takes its name only when whole."""
    ckpt = {"state_dict": trainer.model.state_dict(), "args": vars(args), "model": model_config.to_dict(),
            "preprocess": asdict(trainer.pp), "step": trainer.step}
    if base_card is not None:
        ckpt["base_card"] = base_card
    with whole_file(path) as partial:
        trainer.torch.save(ckpt, partial)


def card_markdown(card: ModelCard) -> str:
    """The model card for people (Markdown) from the typed card."""
    t, m, pp, acc = card.training, card.model, card.preprocess, card.accuracy
    s = ScanSettings.from_dict(t.scan_settings)
    n = card.input_size
    lines = [
        f"# PtychoNN model card: `{card.name}`",
        "",
        f"Maps one far-field diffraction frame (int16 counts, {n}x{n}) to {mapped_to(card)} of the "
        f"patch under the probe. Only the probe's bright centre (|probe|^2 >= {card.stitch.probe_threshold} of "
        "its peak) is meaningful; stitch the patches with `edge_ptychonn.science.stitch`.",
        "",
        "## Inputs and outputs",
        "",
        f"- ONNX opset 17, input `diffraction` float32 (N, 1, {n}, {n}), "
        f"outputs {', '.join(f'`{o}`' for o in card.outputs)} float32 (N, 1, {n}, {n}); the batch axis is dynamic.",
    ] + preprocess_lines(card, f"in `{card.name}.json`, applied by the processor, `evaluate` and training alike",
                         "in training, over the mean total of the frame's own scan") + [
        "",
        "## Architecture",
        "",
        f"PtychoNN encoder-decoder, width {m.width}, depth {m.depth}, BatchNorm after each "
        f"convolution ({m.batch_norm}), amplitude head {m.amplitude_head}"
        + (f", {m.head_blocks} residual head block(s) at full resolution before the phase head" if m.head_blocks else "")
        + "; "
        f"{t.n_parameters:,} parameters; phase = pi * tanh(.)"
        + ("; amplitude = sigmoid(.), from a decoder of its own." if m.amplitude_head else "."),
        "",
        "## Training data (simulated; `edge-ptychonn simulate`)",
        "",
        f"- {t.n_train_frames} frames from {t.n_train_scans} scans (seeds {t.train_seeds[0]}.."
        f"{t.train_seeds[-1]}), validation {t.n_val_frames} frames (seeds {t.val_seeds[0]}..{t.val_seeds[-1]}).",
        f"- Object family `{s.family}`: {family_text(s.family, s.window_size / BASE_SIZE)}; "
        f"feature density {s.density}; phase 0..{s.phase_range_rad} rad; amplitude exp(-{s.absorption} * phase).",
        f"- Probe: defocused focused beam, {s.probe_diameter:.0f} px diameter in a {s.window_size} px window, "
        f"pupil radius {s.pupil_radius:.0f} far-field px.",
        f"- Scan: {s.pattern}, overlap {s.overlap}, position jitter +-{s.jitter_px} px; "
        f"{s.photons:.3g} photons per frame"
        + (f" (training scans: times a factor drawn log-uniformly from {t.dose_range[0]:g}..{t.dose_range[1]:g} per "
           "scan, dose augmentation; validation and held-out scans at the nominal dose)" if t.dose_range else "")
        + f", Poisson noise, int16, detector bin {s.bin_factor}.",
    ] + ([
        f"- Family mix: of the training scans, {_mix_text(t.family_mix)} (drawn per scan, fixed by its seed); "
        f"the rest, validation and held-out scans are `{s.family}`."] if t.family_mix else []) + [
        "",
        "## Training settings",
        "",
        f"- {t.epochs_run} epochs ({t.steps} steps, batch {t.batch_size}), AdamW lr {t.lr} "
        f"(warm-up, cosine decay), weight decay {t.weight_decay}, bf16 autocast {t.bf16}, "
        f"masked L1 loss on the probe's bright centre"
        + (f" plus {t.ssim_weight:g} x (1 - SSIM) of each patch's bright centre" if t.ssim_weight else "")
        + (f" (batches of {SCAN_GROUP}-frame groups of one scan, one constant per scan removed: the "
           "normalisation hides a scan's absolute phase)" if pp.normalize == "running" else "")
        + f", seed {t.seed}.",
    ] + ([
        f"- Started from the `--init-from` model (width {t.widened_from}) widened to width {m.width}: each new "
        "channel a copy of an old one, the next layer's weights split among the copies, so the same function "
        "at the start (`science.model.widen`)."] if t.widened_from else []) + ([
        f"- Added head blocks to the `--init-from` model (it had {t.head_blocks_from}, now {m.head_blocks}): "
        "each new block's second convolution starts at zero, so the same function at the start "
        "(`science.model.add_head_blocks`)."] if t.head_blocks_from is not None else []) + [
        f"- Wall time {t.train_minutes:.1f} min of training on "
        + (f"{t.device}" if t.device else f"{t.threads} CPU threads")
        + f" ({t.host}); stopped at the time limit: {t.stopped_at_time_limit}.",
        "- Loss per epoch (train / validation, mean |phase error| in rad over the bright centre"
        + (", one constant per scan removed" if pp.normalize == "running" else "")
        + (f", plus {t.ssim_weight:g} x (1 - mean SSIM)" if t.ssim_weight else "") + amplitude_loss_text(card) + "): "
        + ", ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(t.train_loss, t.val_loss)),
        f"- Command: `{t.command}`",
        "- After each epoch the BatchNorm running statistics are recomputed for the current weights "
        f"({min(RECALIBRATION_FRAMES, t.n_train_frames)} training frames, float32); validation runs in eval mode "
        "and float32, as the exported model.",
    ]
    earlier = []  # the runs this one continued, newest first
    prev = t.continued_from
    while prev:
        earlier.append(prev)
        prev = prev.continued_from
    n_runs = len(earlier) + 1  # numbered from the first: a run keeps its number as later ones are added
    if earlier:
        lines.append(f"- This is run {n_runs} of {n_runs}; the runs it continued, numbered from the first:")
    total_minutes, unknown = t.train_minutes, False
    for number, prev in zip(range(n_runs - 1, 0, -1), earlier):
        total_minutes += prev.train_minutes or 0.0
        unknown |= prev.train_minutes is None
        lines.append(
            f"- Run {number}: `{prev.command or prev.checkpoint}`, "
            f"{prev.epochs_run or '?'} epochs, {prev.steps or '?'} steps, "
            + (f"{prev.train_minutes:.1f}" if prev.train_minutes is not None else "?") + " min, stopped at the "
            f"time limit: {'?' if prev.stopped_at_time_limit is None else prev.stopped_at_time_limit}"
            + (f", photons x {prev.dose_range[0]:g}..{prev.dose_range[1]:g}" if prev.dose_range else "")
            + (f", family mix {_mix_text(prev.family_mix)}" if prev.family_mix else "")
            + (f", loss L1 + {prev.ssim_weight:g} x (1 - SSIM)" if prev.ssim_weight else "")
            + (f", widened from width {prev.widened_from}" if prev.widened_from else "")
            + (f", head blocks added to the {prev.head_blocks_from} it had" if prev.head_blocks_from is not None else "")
            + "; "
            "train / validation loss per epoch: "
            + (", ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(prev.train_loss, prev.val_loss or ()))
               if prev.train_loss else "?")
        )
    if earlier:
        lines.append(f"- Total training time: {'at least ' if unknown else ''}{total_minutes:.1f} min in {n_runs} runs.")
    lines += [
        "",
        "## Accuracy",
        "",
        "Stitched phase against the ground-truth object over the region the probe's bright centre "
        "covered, constant phase offset removed (`edge-ptychonn evaluate`). Held-out scans share the "
        "training family and difficulty but use seeds not used in training; out-of-family scans use "
        "objects unlike the training ones with the same probe, photons and overlap.",
        "",
    ]
    if not acc.get("scans"):  # train --eval with no scans: no empty table
        lines += ["Not scored when it was trained (`--eval` named no scan): score it with "
                  "`edge-ptychonn evaluate --model <model>.onnx --simulate FAMILY:SEED ...`."]
    else:
        lines += ["| scan | SSIM | PSNR dB | RMSE rad | median patch RMSE rad | zeros SSIM / RMSE | mean-patch SSIM / RMSE |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in acc.get("scans", {}).items():
        mo, z, mp = r["model"], r["baselines"]["zeros"], r["baselines"].get("mean_patch")
        lines.append(
            f"| {name} | {mo['ssim']:.3f} | {mo['psnr_db']:.2f} | {mo['rmse_rad']:.4f} | "
            f"{r['patches']['patch_rmse_median_rad']:.4f} | {z['ssim']:.3f} / {z['rmse_rad']:.4f} | "
            + (f"{mp['ssim']:.3f} / {mp['rmse_rad']:.4f} |" if mp else "- |")
        )
    if acc.get("command"):
        lines += ["", f"Reproduce: `{acc['command']}`"]
    lines += _precision_lines(acc) + _dose_lines(acc)
    lines += ["", "## Limits", ""] + [f"- {x}" for x in card.limits]
    return "\n".join(lines) + "\n"


def mapped_to(card: ModelCard) -> str:
    """What the network gives for each frame, in the card's words: the phase, and the amplitude
    when it has an amplitude output (``outputs``, as ``model.amplitude_head``)."""
    return "the object phase (radians)" + (" and amplitude (0..1)" if "amplitude" in card.outputs else "")


def amplitude_loss_text(card: ModelCard) -> str:
    """The loss term of the amplitude output, for the loss-per-epoch line of the cards (none without one)."""
    return ", plus mean |amplitude error| there" if "amplitude" in card.outputs else ""


def preprocess_lines(card: ModelCard, where: str, fitted: str) -> list[str]:
    """The model card's preprocessing and output-mask bullets (Markdown), shared by ``train`` and
    ``finetune``: ``where`` says where the settings live, ``fitted`` how training took the
    running normalisation's mean total."""
    pp = card.preprocess
    lines = [
        f"- Preprocessing ({where}): "
        + (f"each frame's counts scaled by {pp.reference_total:g} over the mean total of the last "
           f"{pp.normalize_window} frames (normalize `running`: the input does not depend on the dose; "
           f"{fitted}, the value the running mean settles to), then " if pp.normalize == "running" else "")
        + (f"each frame's counts scaled to {pp.reference_total:g} in total (normalize `total`: the input does not "
           "depend on the dose), then " if pp.normalize == "total" else "")
        + f"transform `{pp.transform}`, scale {pp.scale}, offset {pp.offset}, "
        + (f"crop {pp.crop_hw[0]}x{pp.crop_hw[1]}" if pp.crop_hw else "no crop") + f", bin {pp.bin_factor}"
        + (" (the totals are taken after the crop and bin)."
           if pp.normalize != "none" and (pp.crop_hw or pp.bin_factor > 1) else "."),
    ]
    if card.output_mask is not None:
        om = card.output_mask
        lines.append(
            f"- Output mask (`output_mask`): outside a disc of radius {om.radius_px:g} px around pixel "
            f"({om.centre_yx[0]:g}, {om.centre_yx[1]:g}), which holds the probe's bright centre, the processor "
            f"publishes {om.fill_rad:g} rad (processor argument `outputMask`, default true; the network's own "
            "values there are meaningless). Stitching weights only the bright centre, so it is unchanged.")
    return lines


def family_text(family: str, scale: float = 1.0) -> str:
    """What the objects of ``family`` (``simulate.make_object``) are made of, for the model card; feature
    sizes in object pixels, ``scale`` times those of a 128-pixel window."""
    def px(*sizes: float) -> str:
        return "-".join(f"{v * scale:.3g}" for v in sizes) + " px"

    return {
        "mixed": f"particles (projected spheres, radius {px(3, 12)}), a smooth random field and "
                 f"piecewise-constant cells with sharp edges, in random proportions per object",
        "particles": f"overlapping particles (projected spheres, radius {px(3, 12)})",
        "smooth": f"a smooth Gaussian random field (correlation length {px(8, 24)})",
        "cells": f"piecewise-constant Voronoi cells (about {px(30)} across) with sharp edges, about a quarter of them empty",
        "siemens": "a binary Siemens star of 24-48 spokes",
        "fibres": f"straight cylindrical fibres (radius {px(1, 4)}, {px(40, 200)} long)",
    }[family]


def _mix_text(mix) -> str:
    return ", ".join(f"{fraction:.0%} `{family}`" for family, fraction in mix.items())


def _precision_lines(acc: dict) -> list[str]:
    """The ``accuracy.precision`` block (scores with the engine and precision ``auto`` picks), as Markdown."""
    block = acc.get("precision")
    if not block:
        return []
    fp32 = acc.get("scans", {})
    name = f"{block.get('engine', '?')} {block.get('precision', '?')}"
    lines = ["", f"### The precision `engine: auto` picks ({name} on {block.get('host', 'the scoring CPU')})", "",
             f"| scan | {name} SSIM | PSNR dB | RMSE rad | fp32 SSIM | fp32 RMSE rad |", "| --- | --- | --- | --- | --- | --- |"]
    for scan, r in block.get("scans", {}).items():
        mo, ref = r["model"], fp32.get(scan, {}).get("model")
        lines.append(f"| {scan} | {mo['ssim']:.3f} | {mo['psnr_db']:.2f} | {mo['rmse_rad']:.4f} | "
                     + (f"{ref['ssim']:.3f} | {ref['rmse_rad']:.4f} |" if ref else "- | - |"))
    if block.get("command"):
        lines += ["", f"Reproduce: `{block['command']}`"]
    return lines


def _dose_lines(acc: dict) -> list[str]:
    """The ``accuracy.doses`` block (held-out scans at other photon counts), as Markdown."""
    doses = acc.get("doses")
    if not doses:
        return []
    lines = ["", "### Other doses (photons per exposure; the training dose is the card's `photons`)", "",
             "| photons | scan | SSIM | PSNR dB | RMSE rad | zeros SSIM / RMSE |", "| --- | --- | --- | --- | --- | --- |"]
    commands = []
    for photons, block in doses.items():
        for scan, r in block.get("scans", {}).items():
            mo, z = r["model"], r["baselines"]["zeros"]
            lines.append(f"| {photons} | {scan} | {mo['ssim']:.3f} | {mo['psnr_db']:.2f} | {mo['rmse_rad']:.4f} | "
                         f"{z['ssim']:.3f} / {z['rmse_rad']:.4f} |")
        if block.get("command"):
            commands.append(f"`{block['command']}`")
    if commands:
        lines += ["", "Reproduce: " + "; ".join(commands)]
    return lines


def command_line(args: argparse.Namespace) -> str:
    """The ``edge-ptychonn train`` command that repeats ``args`` (non-default options only)."""
    from edge_ptychonn.cli import repeat_command

    return repeat_command("edge-ptychonn train", get_args_parser(), args)


def get_args_parser(prog: str = "edge-ptychonn train") -> argparse.ArgumentParser:
    d = ScanSettings()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train PtychoNN on simulated scans (CPU), export <out>.onnx with <out>.json "
        "(preprocessing, training, accuracy) and <out>.md (model card). The defaults finish in "
        "under 30 minutes on 2 CPU cores.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--out", default="data/generated/ptychonn", help="output prefix: <out>.onnx, .json, .md, .pt")
    p.add_argument("--train-scans", type=int, default=400, help="training scans (one new object each)")
    p.add_argument("--positions-per-scan", type=int, default=49, help="frames per training and validation scan (few per object: many objects generalise better)")
    p.add_argument("--val-scans", type=int, default=16, help="validation scans")
    p.add_argument("--seed-base", type=int, default=0, help="first training seed")
    p.add_argument("--val-seed-base", type=int, default=900, help="first validation seed")
    p.add_argument("--family", choices=FAMILIES, default=d.family, help="training object family")
    p.add_argument("--photons", type=float, default=d.photons, help="photons per exposure of the training and validation scans")
    p.add_argument("--dose-range", type=float, nargs=2, default=[1.0, 1.0], metavar=("LOW", "HIGH"),
                   help="dose augmentation: each training scan has --photons times a factor drawn log-uniformly "
                        "from [LOW, HIGH] (default: 1 1, no augmentation), e.g. 0.1 10")
    p.add_argument("--family-mix", nargs="*", default=[], metavar="FAMILY:FRACTION",
                   help="simulate this fraction of the training scans (chosen by seed) with another family, e.g. "
                        "cells:0.3 for more sharp-edged objects; validation scans stay --family")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="running",
                   help="input normalisation to the reference total (the mean total of the validation frames, "
                        "stored in the card), so that the model does not depend on the dose: 'running' divides by "
                        "the mean total of the last 1024 frames (live; in training: of the frame's own scan, so it "
                        "also holds with --dose-range), 'total' by each frame's own total (loses the absorption "
                        "cue), 'none' leaves the counts (default: %(default)s)")
    p.add_argument("--overlap", type=float, default=d.overlap, help="linear overlap of neighbouring probe discs of the simulated scans, in (0, 1)")
    p.add_argument("--phase-range", type=float, default=d.phase_range_rad, help="object phase spans [0, this] radians")
    p.add_argument("--density", type=float, default=d.density, help="feature density of the simulated objects (as simulate --density)")
    p.add_argument("--ssim-weight", type=float, default=0.0, metavar="W",
                   help="add W * (1 - SSIM) of each predicted patch's bright centre to the L1 loss (the SSIM "
                        "window and constants of the scores, the --phase-range as data range; default 0: L1 only)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training scans (--max-minutes may stop it first)")
    p.add_argument("--max-minutes", type=float, default=24.0, help="stop training after this long (0: no limit)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="frames per training step; with --normalize running a whole number of the groups of "
                        f"{SCAN_GROUP} frames of one scan (fewer with shorter scans) that a batch is made of "
                        "(default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW (warm-up, then cosine decay)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--width", type=int, default=16, help="channels of the first encoder level (doubled at each level)")
    p.add_argument("--depth", type=int, default=4, help="encoder and decoder levels (a 2x2 max-pool each)")
    p.add_argument("--amplitude", action="store_true", help="also train an amplitude head")
    p.add_argument("--head-blocks", type=int, default=0, metavar="N",
                   help="residual blocks at full resolution before the phase head (0..8; default 0: PtychoNN as "
                        "published); with --init-from a model with fewer, the new blocks start at zero")
    add_bf16_options(p)
    p.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:N or auto (a CUDA GPU when torch "
                   "sees one, else the CPU; default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=cli_options.seed, default=0, help="weights and shuffling seed")
    p.add_argument("--init-from", default=None, metavar="PT_OR_ONNX",
                   help="start from the weights of an earlier run: its <out>.pt, or an exported .onnx of this "
                        "architecture (same --depth; e.g. the shipped data/ptychonn.onnx); its preprocessing "
                        "is kept, with this run's --normalize. A narrower model (a larger --width here) is widened "
                        "first with its function kept, e.g. --width 24 from the shipped width-16 model")
    p.add_argument("--eval", nargs="*", default=["mixed:1001", "mixed:1002", "siemens:1001", "fibres:1001"],
                   metavar="FAMILY:SEED", help=f"scans to score the exported model on ({accuracy.DEFAULT_EVAL_N_POSITIONS} positions each)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def check_batches(args: argparse.Namespace) -> None:
    """``ValueError`` unless an epoch of ``args`` makes at least one batch, each of ``--batch-size``
    frames (with ``--normalize running``: whole groups of one scan, ``batch_layout``)."""
    n, bs = args.train_scans * args.positions_per_scan, args.batch_size
    scan_length = args.positions_per_scan if args.normalize == "running" else None
    steps, used = batch_layout(n, bs, scan_length)
    g = scan_group(scan_length, bs) if scan_length else None
    if used != bs:
        raise ValueError(f"batch-size {bs} is not a whole number of the {g}-frame groups of one scan that "
                         f"--normalize running trains on: use {used} or {used + g}")
    if steps < 1:
        how = (f" ({args.train_scans} scan(s) of {args.positions_per_scan}: {args.positions_per_scan // g} group(s) of "
               f"{g} frames each, {bs // g} groups to a batch)" if g else "")
        raise ValueError(f"{n} training frames{how} make no batch of {bs}: an epoch would train nothing; give more "
                         "--train-scans or --positions-per-scan, or a smaller --batch-size")


def main(args: argparse.Namespace) -> int:
    """``edge-ptychonn train``; a SIGTERM (a batch system's stop, ``kill``) stops it like Ctrl-C: no
    half-written file is left behind, and the command ends with one line (exit 130), after one that
    names ``<out>.epoch.pt`` when this run finished an epoch (its weights, for ``--init-from``)."""
    from edge_ptychonn.cli import sigterm_interrupts

    with sigterm_interrupts(), naming_the_last_epoch("train", args.out):
        return _train(args)


def divergence(epoch: int, loss: float, val_loss: float, checkpoint: Path | None) -> str | None:
    """The one line to stop with when epoch ``epoch`` (0-based) ended with a loss that is not
    finite (training diverged: the weights are lost, no model is written); None otherwise.
    ``checkpoint``: the file that holds the previous epoch's weights, if one does."""
    if math.isfinite(loss) and math.isfinite(val_loss):
        return None
    return (f"the loss became {loss if not math.isfinite(loss) else val_loss} in epoch {epoch + 1}: training "
            "diverged; lower --lr" + (f" ({checkpoint} holds epoch {epoch})" if epoch and checkpoint else ""))


def _train(args: argparse.Namespace) -> int:
    import torch

    from edge_ptychonn.science.model import export_onnx

    try:
        if args.train_scans < 1 or args.val_scans < 1:
            raise ValueError(f"train-scans and val-scans must be >= 1, got {args.train_scans}, {args.val_scans}")
        device = training_device(args.device)
        args.bf16, why = resolve_bf16(args.bf16, device)
        if why:  # what the run does, with its other lines (stdout): not an error
            print(why, flush=True)
        if not (math.isfinite(args.ssim_weight) and args.ssim_weight >= 0):
            raise ValueError(f"ssim-weight must be >= 0, got {args.ssim_weight}")
        check_training_options(args)
        for name, first in (("seed-base", args.seed_base), ("val-seed-base", args.val_seed_base)):
            if first < 0:
                raise ValueError(f"{name} must be >= 0 (scan seeds), got {first}")
        lo, hi = args.dose_range
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"dose-range must be 0 < LOW <= HIGH, got {lo} {hi}")
        family_mix = parse_family_mix(args.family_mix)
        base = ScanSettings(n_positions=args.positions_per_scan, family=args.family, photons=args.photons,
                            overlap=args.overlap, phase_range_rad=args.phase_range, density=args.density)
        try:  # the most photons a training scan has: checked like --photons
            replace(base, photons=base.photons * hi)
        except ValueError as exc:
            raise ValueError(f"dose-range {lo:g} {hi:g}: the training scans' {exc}") from None
        model_config = ModelConfig(width=args.width, depth=args.depth, input_size=base.frame_size,
                                   batch_norm=True, amplitude_head=args.amplitude, head_blocks=args.head_blocks)
        if args.init_from:  # a file that cannot start this run fails before the data are simulated
            check_init_from(args.init_from, model_config)
        check_batches(args)
        train_seeds = list(range(args.seed_base, args.seed_base + args.train_scans))
        val_seeds = list(range(args.val_seed_base, args.val_seed_base + args.val_scans))
        if set(train_seeds) & set(val_seeds):
            raise ValueError("training and validation seeds overlap; move --val-seed-base")
        for spec in args.eval:
            accuracy.parse_scan_spec(spec)
        prefix = output_prefix(args.out)
        check_outputs(prefix)
    except OSError as exc:
        print(f"edge-ptychonn train: cannot write --out {args.out}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"edge-ptychonn train: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    show = not args.quiet
    t_start = time.monotonic()

    try:  # photons that saturate every pixel, or give no counts to normalise to, show only in the data
        train_f, train_p, train_a, probe = make_dataset(train_seeds, base, amplitude=args.amplitude, progress=show,
                                                        label="training scans", dose_range=tuple(args.dose_range),
                                                        family_mix=family_mix)
        val_f, val_p, val_a, _ = make_dataset(val_seeds, base, amplitude=args.amplitude, progress=show,
                                              label="validation scans")
        reference = reference_total(val_f) if args.normalize != "none" else None
        if reference is not None and not reference > 0:
            raise ValueError(f"the validation frames hold no counts at --photons {args.photons:g}: nothing to "
                             f"normalise to (--normalize {args.normalize}); raise --photons")
        pp = choose_preprocess(train_f, args.normalize, reference)
    except ValueError as exc:
        print(f"edge-ptychonn train: {exc}", file=sys.stderr)
        return 2
    stitch = StitchSettings()
    mask = probe_weight(probe, stitch.probe_threshold) > 0
    output_mask = output_mask_from_probe(probe, stitch.probe_threshold)

    train_k = scan_factors(train_f, args.positions_per_scan, pp)  # the normalisation of each frame's own scan
    val_k = scan_factors(val_f, args.positions_per_scan, pp)
    trainer = Trainer(args, model_config, pp, mask, device=device)
    if args.init_from:
        try:
            pp = init_weights(trainer, args.init_from, model_config, pp, train_f, train_k)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            print(f"edge-ptychonn train: cannot start from {args.init_from}: {exc}", file=sys.stderr)
            return 2
        if trainer.widened_from:
            print(f"widened the width-{trainer.widened_from} model of {args.init_from} to width {args.width} "
                  "(the same function at the start)", file=sys.stderr)
        if trainer.head_blocks_from is not None:
            print(f"added head blocks to the model of {args.init_from} (it had {trainer.head_blocks_from}, now "
                  f"{args.head_blocks}); the new ones start at zero (the same function at the start)", file=sys.stderr)
    # read before this run's checkpoints can replace the --init-from one (--out of the same name)
    continued_from = previous_training(args.init_from)
    print(f"data: {len(train_f)} training and {len(val_f)} validation frames; input: normalize {pp.normalize}"
          + (f" to {pp.reference_total:g} counts" if pp.normalize != "none" else "")
          + f", {input_text(pp)}; loss over {int(mask.sum())} bright-centre pixels"
          + (f"; photons x {args.dose_range[0]:g}..{args.dose_range[1]:g} per training scan"
             if args.dose_range[0] != args.dose_range[1] else "")
          + (f"; family mix {_mix_text(family_mix)} of the training scans" if family_mix else ""), file=sys.stderr)
    # with the running normalisation a scan's absolute phase is hidden: batches of whole-scan groups, and a
    # loss that ignores one constant per scan
    scan_length = args.positions_per_scan if pp.normalize == "running" else None
    steps_per_epoch = len(trainer.batches(len(train_f), np.random.default_rng(0), scan_length))
    total_steps = steps_per_epoch * args.epochs
    t_train = time.monotonic()
    deadline = t_train + args.max_minutes * 60 if args.max_minutes else math.inf
    rng = np.random.default_rng(args.seed)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    train_loss, val_loss = [], []
    stopped = False
    for epoch in range(args.epochs):
        bar = Progress(steps_per_epoch * args.batch_size, f"epoch {epoch + 1}/{args.epochs}", unit="frames", enabled=show)
        loss, stopped = trainer.train_one_epoch((train_f, train_k, train_p, train_a), rng, total_steps, deadline, bar,
                                               scan_length)
        bar.close()
        train_loss.append(loss)
        trainer.recalibrate_batchnorm(train_f, train_k)
        val_loss.append(trainer.validate((val_f, val_k, val_p, val_a), scan_length))
        diverged = divergence(epoch, loss, val_loss[-1], output_file(prefix, EPOCH_SUFFIX))
        if diverged:  # the weights are lost: write no model
            print(f"edge-ptychonn train: {diverged}", file=sys.stderr)
            return 1
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss:.4f}  validation loss {val_loss[-1]:.4f}  "
              f"({(time.monotonic() - t_train) / 60:.1f} min)", file=sys.stderr)
        save_checkpoint(trainer, args, model_config, output_file(prefix, EPOCH_SUFFIX))
        if stopped:
            print(f"stopped at the time limit of {args.max_minutes} min", file=sys.stderr)
            break
    train_minutes = (time.monotonic() - t_train) / 60

    # the model is written under a hidden name and scored there; it takes its name after its card, so that an
    # earlier run's model and card stay a pair until then (and stay so when this run is stopped before)
    onnx_path = output_file(prefix, ".onnx")
    md_path = output_file(prefix, ".md")
    training = Training(
        scan_settings={**base.to_dict(), "seed": None}, eval_n_positions=accuracy.DEFAULT_EVAL_N_POSITIONS,
        train_seeds=tuple(train_seeds), val_seeds=tuple(val_seeds), n_train_scans=len(train_seeds),
        n_train_frames=int(len(train_f)), n_val_frames=int(len(val_f)), epochs=args.epochs,
        epochs_run=len(train_loss), steps=trainer.step, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, bf16=args.bf16, seed=args.seed, threads=args.threads,
        train_minutes=train_minutes, stopped_at_time_limit=stopped, train_loss=tuple(train_loss),
        val_loss=tuple(val_loss), n_parameters=int(sum(p.numel() for p in trainer.model.parameters())),
        host=f"{platform.machine()} {platform.processor() or ''}".strip(), torch=torch.__version__,
        edge_ptychonn=__version__, command=command_line(args), init_from=args.init_from,
        dose_range=tuple(args.dose_range) if args.dose_range[0] != args.dose_range[1] else None,
        family_mix=family_mix, ssim_weight=args.ssim_weight or None, widened_from=trainer.widened_from,
        head_blocks_from=trainer.head_blocks_from,
        device=device if device != "cpu" else None,
        continued_from=continued_from,
    )
    card = ModelCard(name=prefix.name, input_size=model_config.input_size,
                     outputs=("phase", "amplitude") if args.amplitude else ("phase",), preprocess=pp, stitch=stitch,
                     output_mask=output_mask,
                     model=model_config, training=training, limits=LIMITS)
    with whole_file(onnx_path) as onnx_partial:
        export_onnx(trainer.model, onnx_partial)
        if args.eval:
            with warnings_as_lines("edge-ptychonn train"):  # pixels clipped at a high --photons: one line
                scans = accuracy.simulate_held_out(args.eval, card)
            engine = accuracy.open_engine(onnx_partial, "onnxruntime", device="cpu", threads=args.threads)
            try:
                # scored as the command recorded below scores it: with the card's output mask
                results = accuracy.evaluate_scans(engine, pp, scans, stitch, progress=show, output_mask=output_mask)
            finally:
                engine.close()
            print(accuracy.results_table(results), flush=True)  # a result: stdout, as evaluate
            card = replace(card, accuracy={
                "scans": accuracy.results_json(results),
                "command": shlex.join(["edge-ptychonn", "evaluate", "--model", str(onnx_path),
                                       *(w for s in args.eval for w in ("--simulate", s))]),
            })
        # the card for people first: what the processor reads, the .json, then the model, so that a stop or
        # a full disk in between leaves an earlier model with its own .json
        write_bytes_whole(md_path, card_markdown(card).encode())
        card_json = save_card(card, onnx_path)
    pt_path = keep_last_epoch(prefix)  # last: the weights of this model
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB), {card_json}, "
          f"{md_path}, {pt_path} in {(time.monotonic() - t_start) / 60:.1f} min")
    return 0
