"""``edge-ptychonn finetune``: fine-tune PtychoNN on a beamline's own reconstructions.

A sample is never the training family. As in the Argonne edge workflow, the
first scans of an experiment are reconstructed with an iterative code; this
command cuts the matching phase patches out of that reconstruction and
fine-tunes the network on the recorded frames, so that the live stream of the
following scans is reconstructed by a model that has seen this sample.

Inputs
    ``--frames``     the recorded raw frames: a ``.npy`` stack (N, H, W) of
                     counts (frame k is the k-th scan position; uniqueIds 1..N,
                     as ``pvapy-ad-sim-server -if`` replays it), or an HDF5 file
                     as ``processors/hdf5_writer.py`` writes it when attached to
                     the detector channel (datasets ``data`` (n, H, W),
                     ``uniqueId`` (n,) and, when the frames carried position
                     attributes, ``positions`` (n, 2) y x), taken in uniqueId
                     order whatever order the writer received them in. The
                     writer's file of an inference output channel is refused:
                     its frames are a model's phase images (a ``modelId`` per
                     frame, or, in a file from before that dataset, a
                     ``modelCard`` attribute), not diffraction.
    ``--positions``  the scan positions, unless the HDF5 file has them: the
                     ``.npz`` of ``edge-ptychonn simulate`` (``positions_px``),
                     an ``.npy`` (N, 2), or a text table with rows ``y x`` (by
                     frame index) or ``uniqueId y x`` (matched by uniqueId).
    ``--object``     the reconstructed complex object: a complex ``.npy`` (H, W),
                     or an ``.npz`` with a complex ``object`` array (and,
                     optionally, the reconstructed ``probe``).
    ``--crop``, ``--crop-origin``, ``--bin``
                     the detector's crop and bin (the processor's ``crop``,
                     ``cropOrigin``, ``bin``), where the recorded frames are not
                     the model's input size (e.g. 516x516: ``--crop 512 512 --bin
                     4`` for 128x128); each replaces the base model's (key by key,
                     as the processor's arguments override its card) and goes into
                     the new card, so that the consumers running the new model cut
                     the detector's frames the same way.

Position convention
    The network's patch for a frame is the object window of the model's input
    size n whose top-left corner is the frame's position in object pixels,
    exactly as ``edge-ptychonn simulate`` places its probe window
    (``object[y : y + n, x : x + n]``). Positions in other units or frames are
    mapped with ``--pixel-size`` (position units per object pixel),
    ``--origin Y X`` (the object pixel of position (0, 0)) and ``--position-ref
    centre`` (positions of the probe centre rather than the window's corner):
    ``corner = position / pixel_size + origin [- n / 2]``, rounded to whole
    pixels. The target phase is ``angle(object * exp(-1j * phase_shift))``.
    The crop and bin act on the diffraction frames only (reciprocal space) and
    leave the positions (real space) as they are: the network's patch is n x n
    object pixels whatever the detector's frame size, and the reconstruction's
    pixel must be that patch's pixel (the wavelength times the distance over the
    cropped detector's width; binning does not change it).

Training
    The base model (default: the shipped ``data/ptychonn.onnx``; ``--init-from``
    another ONNX model, or a ``<out>.pt`` or ``<out>.epoch.pt`` checkpoint of
    ``edge-ptychonn train`` or ``finetune``)
    is loaded into the project's PyTorch PtychoNN: an ONNX model through
    ``model.from_onnx`` (its convolutions in graph order, BatchNorm folded into
    them), then ``unfold_batchnorm`` puts BatchNorm layers back with the
    statistics of the recorded frames (same outputs; ``--batchnorm folded``
    skips it); a checkpoint keeps its BatchNorm layers. Frames go through the
    base model's preprocessing (its card, or a checkpoint's own), with the crop and bin of ``--crop``,
    ``--crop-origin`` and ``--bin`` where given, which the output keeps.
    ``train.Trainer`` runs the epochs (AdamW, warm-up and cosine decay to the
    last step or the time limit, bf16 autocast where the device has it natively,
    masked L1 loss on the probe's
    bright centre) on the CPU or a GPU (``--device``). After each epoch (its
    BatchNorm statistics recomputed, the held-out loss reported) the weights,
    architecture and preprocessing (crop and bin included) are saved to
    ``<out>.epoch.pt``, as ``train`` saves them (``train.save_checkpoint``), with the base
    model's card, which a run continued from that file (no card beside it) takes as its base's.

Held-out positions
    A contiguous block: the last ``--val-fraction`` of the frames in scan order
    (for a raster scan, the last rows: a region of the object the training
    never sees). Training frames whose bright centre overlaps a held-out
    frame's bright centre are left out (a guard band), so that the held-out
    scores measure new object regions, not memorised pixels.

Outputs
    ``<out>.onnx``, ``<out>.json`` (the model card the processor reads:
    preprocessing (with the crop and bin given) and stitch settings of the base model, its output mask unless
    the loss probe's bright centre reaches beyond it (then a disc around that
    bright centre, as ``train`` makes it), the architecture, the
    fine-tuning record, held-out scores before and after), ``<out>.md`` (the
    card for people) and ``<out>.pt`` (weights). Held-out scores run both
    models through the ONNX Runtime engine: the median per-patch phase RMSE and
    the SSIM/RMSE of the held-out patches stitched against the reconstruction (its phase measured
    from its floor, so that its arbitrary constant does not change the SSIM).
    Put the result live with ``edge-ptychonn configure`` (``modelPath``) or by
    restarting the consumers with ``"modelPath": "<out>.onnx"``. An existing model
    of that name (its four files) is replaced, as ``train --out`` replaces one:
    the four files are written under hidden names and take their names together
    at the end of the run, the ``.pt`` last (the last epoch's ``<out>.epoch.pt``
    takes that name), so a run stopped or failed before then leaves the earlier
    model as it was. A run stopped (Ctrl-C, SIGTERM) after an epoch, or that
    diverged after one, leaves the weights of its last finished epoch in
    ``<out>.epoch.pt`` and names it:
    ``finetune --init-from <out>.epoch.pt`` continues from them (with their
    crop and bin; ``train --init-from`` takes the file as it takes a ``.pt``);
    one stopped before its first epoch leaves no file. ``--out`` may not
    name the base model's files.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_ptychonn import __version__, cli_options
from edge_ptychonn.files import load_npy, load_npz, whole_file
from edge_ptychonn.model_card import (
    ModelCard, ModelConfig, StitchSettings, Training, card_bytes, card_path, check_input_size, default_model_path,
    find_card,
)
from edge_ptychonn.positions import read_text_table
from edge_ptychonn.progress import Progress
from edge_ptychonn.science.simulate import (NONFINITE_FRAMES, ScanSettings, extract_patches, make_probe,
                                            nonfinite_frames)
from edge_ptychonn.science.stitch import Stitcher, probe_weight
from edge_ptychonn.stream.postprocess import OutputMask
from edge_ptychonn.stream.preprocess import PreprocessConfig
from edge_ptychonn.stream.quote import short_repr

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")
TEXT_SUFFIXES = (".txt", ".dat", ".csv", ".tsv")
POSITION_REFS = ("corner", "centre")

LIMITS = (
    "Fine-tuned on one sample's iterative reconstruction: it learns that reconstruction's errors and phase "
    "convention along with the sample, and may do worse on samples unlike it.",
    "The probe, photon count and detector geometry of the recorded frames are built in: a new probe or "
    "beam energy needs another fine-tune.",
    "Phase is absolute only up to a constant: the training loss and every score remove it (one constant for the "
    "training batch or the held-out frames, per patch, per stitched image).",
)


class InputError(ValueError):
    """Bad input files or options: the message says which file and what is wrong."""


# ---------------------------------------------------------------- inputs


@dataclass
class Recorded:
    """Recorded frames (N, H, W), their uniqueIds (N,), and positions (N, 2) y x from the file, if any."""

    frames: np.ndarray
    unique_ids: np.ndarray
    positions: np.ndarray | None
    source: str
    positions_problem: str | None = None  # why the file's positions cannot be used, when it has unusable ones


def _check_frames(frames: np.ndarray, where: str) -> np.ndarray:
    if frames.ndim != 3:
        raise InputError(f"{where}: frames must be a stack (N, H, W), got shape {frames.shape}")
    if frames.dtype.kind not in "iuf":
        raise InputError(f"{where}: frames must be integer or float counts, got {frames.dtype}")
    if len(frames) < 2:
        raise InputError(f"{where}: needs at least 2 frames, got {len(frames)}")
    bad = nonfinite_frames(frames)
    if bad:
        raise InputError(f"{where}: {bad} frames {NONFINITE_FRAMES}")
    if not np.any(frames):  # a detector that was off, or a file of placeholders: nothing to learn from
        raise InputError(f"{where}: every frame is zero everywhere: no diffraction recorded")
    return frames


def _need_file(path: Path, what: str) -> None:
    """``InputError`` unless ``path`` is a file: not found, or a folder."""
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise InputError(f"{what} {path} not found")


def _npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """``files.load_npy``, its ``ValueError`` (empty or cut-short file, an ``.npz``, ...) as an ``InputError``."""
    try:
        return load_npy(path, mmap_mode=mmap_mode)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _npz(path: Path, keys: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """``files.load_npz``, its ``ValueError`` (empty or cut-short file, a ``.npy``, ...) as an ``InputError``."""
    try:
        return load_npz(path, keys)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def load_frames(path: str | Path) -> Recorded:
    """Frames from a ``.npy`` stack or an HDF5 file of ``processors/hdf5_writer.py``."""
    path = Path(path)
    _need_file(path, "frames file")
    if path.suffix == ".npy":
        frames = _check_frames(_npy(path, mmap_mode="r"), str(path))
        return Recorded(frames, np.arange(1, len(frames) + 1, dtype=np.int64), None, str(path))
    if path.suffix in HDF5_SUFFIXES:
        try:
            import h5py
        except ImportError:
            raise InputError("reading HDF5 frames needs h5py: pip install 'edge-ptychonn[hdf5]'") from None
        try:  # the filters of the writer's blosc, lz4, zstd and bitshuffle compression, where installed
            import hdf5plugin  # noqa: F401
        except ImportError:
            pass
        try:
            f = h5py.File(path, "r", libver="latest", swmr=True)
        except OSError as exc:
            raise InputError(f"{path}: cannot open as HDF5 ({exc})") from None
        with f:
            missing = [k for k in ("data", "uniqueId") if not isinstance(f.get(k), h5py.Dataset)]
            if missing:
                raise InputError(f"{path}: no {' or '.join(missing)} dataset; expected the layout of "
                                 "processors/hdf5_writer.py (data, uniqueId, positions)")
            model = _model_outputs(f, h5py)
            if model is not None:
                raise InputError(f"{path} holds a model's outputs ({model}), not diffraction frames; the raw frames "
                                 "are recorded by processors/hdf5_writer.py on the detector channel: give that file")
            uid = f["uniqueId"]
            if uid.ndim != 1 or uid.dtype.kind not in "iu":
                raise InputError(f"{path}: uniqueId must be a 1-D dataset of whole numbers, got {uid.dtype} "
                                 f"{uid.shape}")
            n = len(uid)  # written last: the number of complete frames
            if f["data"].ndim < 1 or len(f["data"]) < n:  # a file cut or made otherwise: no frame for some ids
                raise InputError(f"{path}: {n} uniqueIds but data holds {len(f['data']) if f['data'].ndim else 0} "
                                 "frames; expected a frame for each uniqueId (the layout of processors/hdf5_writer.py)")
            try:
                data = np.asarray(f["data"][:n])
            except OSError as exc:  # most often a compression filter that this h5py does not have
                raise InputError(f"{path}: cannot read the frames ({exc}); a file written with compression "
                                 "blosc, lz4, zstd or bitshuffle needs hdf5plugin: pip install 'edge-ptychonn[hdf5]'") from None
            frames = _check_frames(data, f"{path}:data")
            ids = np.asarray(f["uniqueId"][:n], dtype=np.int64)
            positions, problem = None, None
            if "positions" in f:  # the writer's (n, 2) y x, a row per frame
                pos = f["positions"]
                if not isinstance(pos, h5py.Dataset) or pos.ndim != 2 or pos.shape[1] != 2 or len(pos) < n:
                    what = f"shape {pos.shape}" if isinstance(pos, h5py.Dataset) else "a group"
                    problem = (f"{path}: positions must be a dataset (n, 2) of y x, a row for each of the {n} frames; "
                               f"got {what}: give --positions")
                else:
                    positions = np.asarray(pos[:n], dtype=np.float64)
        if len(np.unique(ids)) != len(ids):
            raise InputError(f"{path}: uniqueIds repeat within the file; one scan per file")
        # in uniqueId (scan) order, not the order the writer received them (several consumers'
        # batches interleave): positions by frame index and the held-out block follow the scan
        order = np.argsort(ids, kind="stable")
        if np.any(order != np.arange(len(ids))):
            frames, ids = frames[order], ids[order]
            positions = positions[order] if positions is not None else None
        return Recorded(frames, ids, positions, str(path), problem)
    raise InputError(f"{path}: frames must be a .npy stack or an HDF5 file ({', '.join(HDF5_SUFFIXES)})")


def _model_outputs(f, h5py) -> str | None:
    """What says that the HDF5 file ``f`` of ``processors/hdf5_writer.py`` holds a model's outputs
    (the writer on an inference output channel), in words; None for raw frames. The writer keeps
    each frame's ``modelId`` (empty for a detector's frames); a file from before that dataset
    has a ``modelCard`` attribute where the writer was given the model's card. The pixel type
    says nothing: some detectors give float frames."""
    channel = f.attrs.get("inputChannel", "")
    channel = f" of {short_repr(channel)}" if isinstance(channel, str) and channel else ""
    ids = f.get("modelId")
    if isinstance(ids, h5py.Dataset):
        if ids.ndim != 1 or h5py.check_string_dtype(ids.dtype) is None:
            return None
        made_by = next((m for m in ids.asstr(errors="replace")[:] if m), None)
        return f"frames{channel} made by {short_repr(made_by)}" if made_by else None
    if "modelCard" in f.attrs:
        return f"frames{channel}, written with a modelCard"
    return None


def load_positions(path: str | Path, unique_ids: np.ndarray) -> np.ndarray:
    """Positions (N, 2) y x for frames with ``unique_ids``, in the file's units.

    Two columns (``.npz`` ``positions_px``/``positions``, ``.npy`` (N, 2), text
    ``y x``) are matched to the frames by index and must be as many; three text
    columns ``uniqueId y x`` are matched by uniqueId and must cover every frame. A
    text table may name its columns in a first row (:func:`edge_ptychonn.positions.read_text_table`).
    """
    path = Path(path)
    _need_file(path, "positions file")
    by_id = False
    try:
        if path.suffix == ".npz":
            names, arrays = _npz(path, ("positions_px", "positions"))
            key = next((k for k in ("positions_px", "positions") if k in arrays), None)
            if key is None:
                raise InputError(f"{path}: no positions_px or positions array (has {', '.join(names) or 'none'})")
            table = arrays[key]
        elif path.suffix == ".npy":
            table = _npy(path)
        elif path.suffix in TEXT_SUFFIXES:
            try:
                table = read_text_table(path)
            except ValueError as exc:  # its message names the file
                raise InputError(str(exc)) from None
            by_id = table.shape[1] == 3
        else:
            raise InputError(f"{path}: positions must be .npz (edge-ptychonn simulate), .npy (N, 2) or a text table "
                             f"({', '.join(TEXT_SUFFIXES)})")
    except (ValueError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot read positions ({exc})") from None
    if table.dtype.kind not in "iuf":
        raise InputError(f"{path}: positions must be real numbers, got {table.dtype}")
    if table.ndim != 2 or table.shape[1] != (3 if by_id else 2):
        raise InputError(f"{path}: positions must be (N, 2) rows of y x, or a text table of uniqueId y x; "
                         f"got shape {table.shape}")
    table = table.astype(np.float64)
    if not np.isfinite(table).all():
        raise InputError(f"{path}: positions contain NaN or infinite values")
    if not by_id:
        if len(table) != len(unique_ids):
            raise InputError(f"{len(unique_ids)} frames but {len(table)} positions in {path}: "
                             "give one position per frame (or a uniqueId y x table)")
        return table
    ids = table[:, 0]
    if np.any(ids != np.round(ids)) or len(np.unique(ids)) != len(ids):
        raise InputError(f"{path}: the uniqueId column must hold distinct whole numbers")
    lookup = {int(u): k for k, u in enumerate(ids)}
    rows = np.array([lookup.get(int(u), -1) for u in unique_ids])
    if (rows < 0).any():
        missing = unique_ids[rows < 0]
        raise InputError(f"{path}: no position for {len(missing)} of {len(unique_ids)} frames "
                         f"(uniqueIds {', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''})")
    return table[rows, 1:]


def _complex_2d(a: np.ndarray, where: str, what: str) -> np.ndarray:
    if a.dtype.kind != "c":
        raise InputError(f"{where}: the {what} must be a complex array (amplitude * exp(1j * phase)), got {a.dtype}"
                         + ("; for a phase map save np.exp(1j * phase)" if a.dtype.kind == "f" else ""))
    if a.ndim != 2:
        raise InputError(f"{where}: the {what} must be 2-D (H, W), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InputError(f"{where}: the {what} contains NaN or infinite values")
    return a


def load_object(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The reconstructed object (H, W) complex, and the probe if the ``.npz`` has one."""
    path = Path(path)
    _need_file(path, "object file")
    try:
        if path.suffix == ".npy":
            return _complex_2d(_npy(path), str(path), "object"), None
        if path.suffix == ".npz":
            names, z = _npz(path, ("object", "probe"))
            if "object" not in z:
                raise InputError(f"{path}: no 'object' array (has {', '.join(names) or 'none'}); save the "
                                 "complex object as np.savez(path, object=obj[, probe=probe])")
            obj = _complex_2d(z["object"], f"{path}:object", "object")
            probe = _complex_2d(z["probe"], f"{path}:probe", "probe") if "probe" in z else None
            return obj, probe
    except (ValueError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot read the object ({exc})") from None
    raise InputError(f"{path}: the object must be a complex .npy or an .npz with an 'object' array")


def load_probe(path: str | Path) -> np.ndarray:
    path = Path(path)
    _need_file(path, "probe file")
    try:
        if path.suffix == ".npz":
            names, z = _npz(path, ("probe",))
            if "probe" not in z:
                raise InputError(f"{path}: no 'probe' array (has {', '.join(names) or 'none'})")
            return _complex_2d(z["probe"], f"{path}:probe", "probe")
        return _complex_2d(_npy(path), str(path), "probe")
    except (ValueError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot read the probe ({exc})") from None


def to_object_pixels(positions: np.ndarray, *, size: int, object_shape: tuple[int, int], pixel_size: float = 1.0,
                     origin: tuple[float, float] = (0.0, 0.0), reference: str = "corner",
                     unique_ids: np.ndarray | None = None) -> np.ndarray:
    """Top-left corners (N, 2) int64 of the ``size`` x ``size`` patches in object pixels.

    ``corner = positions / pixel_size + origin``, minus ``size / 2`` for
    ``reference='centre'``, rounded; every patch must lie inside the object (the error
    names the first frame outside by its uniqueId when ``unique_ids`` are given).
    """
    if not (math.isfinite(pixel_size) and pixel_size > 0):
        raise InputError(f"pixel-size must be > 0, got {pixel_size}")
    if reference not in POSITION_REFS:
        raise InputError(f"position-ref must be one of {POSITION_REFS}, got {reference!r}")
    px = np.asarray(positions, dtype=np.float64) / pixel_size + np.asarray(origin, dtype=np.float64)
    if reference == "centre":
        px -= size / 2
    corners = np.rint(px).astype(np.int64)
    h, w = object_shape
    outside = (corners[:, 0] < 0) | (corners[:, 1] < 0) | (corners[:, 0] + size > h) | (corners[:, 1] + size > w)
    if outside.any():
        k = np.flatnonzero(outside)
        raise InputError(
            f"{len(k)} of {len(corners)} positions put the {size}x{size} patch outside the {h}x{w} object "
            f"(first: {'frame index' if unique_ids is None else f'uniqueId {int(unique_ids[k[0]])}, frame'} {k[0]}, "
            f"corner y x {corners[k[0]].tolist()}); positions are the patch's top-left corner "
            "in object pixels (see --pixel-size, --origin, --position-ref)")
    return corners


def held_out_split(corners: np.ndarray, bright: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``(train, held_out, n_guard)`` frame indices: the last ``val_fraction`` of the
    frames are held out; training frames whose bright-centre box (``bright``
    (n, n) bool) overlaps a held-out one's are left out (``n_guard`` of them)."""
    n = len(corners)
    n_val = int(round(n * val_fraction))
    if not 0 < val_fraction < 1 or n_val < 1 or n_val >= n:
        raise InputError(f"val-fraction {val_fraction} of {n} frames leaves no held-out or no training frames")
    ys, xs = np.nonzero(bright)
    box = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
    lo = corners + box[:2]
    hi = corners + box[2:]
    val = np.arange(n - n_val, n)
    rest = np.arange(n - n_val)
    overlap = np.zeros(len(rest), dtype=bool)
    for start in range(0, len(val), 256):  # (train, val) box intersections in blocks
        v = val[start : start + 256]
        hit = ((lo[rest, None, 0] < hi[None, v, 0]) & (lo[None, v, 0] < hi[rest, None, 0])
               & (lo[rest, None, 1] < hi[None, v, 1]) & (lo[None, v, 1] < hi[rest, None, 1]))
        overlap |= hit.any(axis=1)
    return rest[~overlap], val, int(overlap.sum())


# ---------------------------------------------------------------- model


def load_base(path: str | Path):
    """``(model, ModelConfig, card or None, PreprocessConfig)`` from an ONNX model or an
    ``edge-ptychonn train`` ``.pt`` (the card beside it, if any; else, for finetune's
    ``<out>.epoch.pt``, the card of that run's base model, which the checkpoint holds)."""
    import torch

    from edge_ptychonn.science.model import build_model, from_onnx

    path = Path(path)
    _need_file(path, "base model")
    card = find_card(path)
    if path.suffix == ".onnx":
        model = from_onnx(path)
        check_input_size(card, path, (model.config.input_size,) * 2)  # another model's card: its preprocessing
        pp = card.preprocess if card is not None else PreprocessConfig()
        return model, model.config, card, pp
    if path.suffix == ".pt":
        from edge_ptychonn.science.train import load_checkpoint

        ckpt = load_checkpoint(path)  # ValueError when it is not one
        try:
            config = ModelConfig(**ckpt["model"])
            pp = PreprocessConfig(**ckpt["preprocess"])
            if card is None and ckpt.get("base_card") is not None:  # a stopped finetune's <out>.epoch.pt
                card = ModelCard.from_dict(ckpt["base_card"])
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: not a checkpoint of edge-ptychonn train ({exc})") from None
        check_input_size(card, path, (config.input_size,) * 2)
        model = build_model(config)
        model.load_state_dict(ckpt["state_dict"])
        return model.eval(), config, card, pp
    raise InputError(f"{path}: the base model must be an ONNX PtychoNN (.onnx) or an edge-ptychonn train "
                     "checkpoint (.pt)")


def detector_preprocess(pp: PreprocessConfig, crop: tuple[int, int] | None = None,
                        crop_origin: tuple[int, int] | None = None, bin_factor: int | None = None) -> PreprocessConfig:
    """``pp`` with the detector's crop and bin of ``--crop``, ``--crop-origin`` and ``--bin`` where given, key
    by key, as the processor's arguments override its card; ``InputError``, in the options' names, for values
    that the processor refuses as ``crop``, ``cropOrigin`` and ``bin``."""
    fields = {}
    if crop is not None:
        fields["crop_hw"] = tuple(crop)
    if crop_origin is not None:
        fields["crop_origin_yx"] = tuple(crop_origin)
    if bin_factor is not None:
        fields["bin_factor"] = bin_factor
    try:
        return replace(pp, **fields)
    except ValueError as exc:  # PreprocessConfig's checks, the processor's
        raise InputError(cli_options.in_option_names(str(exc), cli_options.DETECTOR_OPTIONS)) from None


def unfold_batchnorm(folded, frames: np.ndarray, pp: PreprocessConfig, factors: np.ndarray | None = None,
                     batch_size: int = 32, progress: bool = False):
    """A PtychoNN with BatchNorm that computes what ``folded`` (BatchNorm folded away, as in
    an exported ONNX) computes, so that fine-tuning trains it the way it was first trained.

    Each convolution keeps its folded weights ``W`` and bias ``b``; its BatchNorm gets the
    running mean ``mu`` and variance ``var`` of ``W x`` over ``frames`` (one pass with the
    folded model), ``weight = sqrt(var + eps)`` and ``bias = mu + b``: in eval mode the
    output is ``W x + b`` exactly, and in train mode (batch statistics near ``mu``,
    ``var``) nearly so. Without BatchNorm, AdamW's first steps move every folded weight by
    about the learning rate whatever its scale, and the model first gets much worse.

    The inputs are made as training makes them (``train.training_inputs``): with ``normalize:
    "running"`` each frame scaled by its ``factors`` entry (default: ``frames`` taken as one
    scan, ``train.scan_factors``), not by a running mean that starts again at each batch.
    """
    import torch
    from torch import nn

    from edge_ptychonn.science.model import PtychoNN
    from edge_ptychonn.science.train import scan_factors, training_inputs

    if factors is None:
        factors = scan_factors(frames, len(frames), pp)

    config = replace(folded.config, batch_norm=True)
    model = PtychoNN(config).eval()
    src = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    pairs, modules = [], list(model.modules())
    for k, m in enumerate(modules):
        if isinstance(m, nn.Conv2d):
            bn = modules[k + 1] if k + 1 < len(modules) and isinstance(modules[k + 1], nn.BatchNorm2d) else None
            pairs.append((m, bn))
    if len(pairs) != len(src):
        raise ValueError(f"cannot unfold: {len(src)} convolutions, a PtychoNN of {config} has {len(pairs)}")
    sums: dict[int, list] = {}

    def hook(index):
        def record(module, inputs, output):
            z = output.double() - module.bias.double()[None, :, None, None]  # W x
            acc = sums.setdefault(index, [0, 0.0, 0.0])
            acc[0] += z.shape[0] * z.shape[2] * z.shape[3]
            acc[1] = acc[1] + z.sum(dim=(0, 2, 3))
            acc[2] = acc[2] + (z * z).sum(dim=(0, 2, 3))
        return record

    handles = [conv.register_forward_hook(hook(i)) for i, conv in enumerate(src) if pairs[i][1] is not None]
    folded.eval()
    bar = Progress(len(frames), "BatchNorm statistics", unit="frames", enabled=progress)
    try:
        with torch.no_grad():
            for start in range(0, len(frames), batch_size):
                chunk = slice(start, start + batch_size)
                x = training_inputs(np.asarray(frames[chunk]), pp, None if factors is None else factors[chunk])
                folded(torch.from_numpy(x)[:, None])
                bar.update(len(x))
    finally:
        bar.close()
        for h in handles:
            h.remove()
    with torch.no_grad():
        for i, (conv, bn) in enumerate(pairs):
            if tuple(conv.weight.shape) != tuple(src[i].weight.shape):
                raise ValueError(f"cannot unfold: convolution {i} is {tuple(src[i].weight.shape)}, "
                                 f"expected {tuple(conv.weight.shape)}")
            conv.weight.copy_(src[i].weight)
            if bn is None:
                conv.bias.copy_(src[i].bias)
                continue
            n, s1, s2 = sums[i]
            mu = s1 / n
            var = torch.clamp(s2 / n - mu * mu, min=0.0)
            bn.running_mean.copy_(mu.float())
            bn.running_var.copy_(var.float())
            bn.weight.copy_(torch.sqrt(var + bn.eps).float())
            bn.bias.copy_((mu + src[i].bias.double()).float())
    return model


def output_mask_for(card: ModelCard | None, probe: np.ndarray, threshold: float) -> OutputMask:
    """The fine-tuned model's output mask: the base card's when it holds the whole bright centre of
    ``probe`` (the loss region), else a disc around that bright centre, as ``train`` makes it
    (``train.output_mask_from_probe``)."""
    from edge_ptychonn.science.train import output_mask_from_probe

    base = card.output_mask if card is not None else None
    bright = probe_weight(probe, threshold) > 0
    if base is not None and not (bright & base.outside(bright.shape)).any():
        return base
    return output_mask_from_probe(probe, threshold)


# ---------------------------------------------------------------- scores


def phase_wraps(phase: np.ndarray, corners: np.ndarray, bright: np.ndarray) -> tuple[int, float]:
    """``(pairs, shift)``: how many neighbouring pixel pairs of the scanned region (the union of the
    patches' bright centres ``bright`` at ``corners``) differ by more than pi in ``phase`` (the
    reconstruction's phase wraps at +-pi there: the targets jump by 2 pi where the object does not), and
    the circular mean phase of that region (a ``--phase-shift`` that centres the phase on 0)."""
    region = np.zeros(phase.shape, dtype=bool)
    n_y, n_x = bright.shape
    for y, x in np.asarray(corners, dtype=np.int64):
        region[y : y + n_y, x : x + n_x] |= bright
    pairs = 0
    for axis in (0, 1):
        jump = np.abs(np.diff(phase, axis=axis)) > np.pi
        both = region[1:, :] & region[:-1, :] if axis == 0 else region[:, 1:] & region[:, :-1]
        pairs += int(np.count_nonzero(jump & both))
    shift = float(np.angle(np.mean(np.exp(1j * phase[region].astype(np.float64))))) if region.any() else 0.0
    return pairs, shift


def sign_flipped(before: dict) -> bool:
    """Whether the base model's held-out patches match the reconstruction's phase far better with its sign
    flipped (``held_out_scores(..., conjugate=True)``): a reconstruction in the other convention,
    ``exp(-i phi)`` (its conjugate is what the network was trained on)."""
    flipped = before.get("conjugate_patch_rmse_median_rad")
    return flipped is not None and flipped < 0.5 * before["patch_rmse_median_rad"]


FLOOR_PERCENTILE = 1.0


def phase_floor(object_phase: np.ndarray, mask: np.ndarray) -> float:
    """The reconstruction's phase that the stitched scores take as zero: its :data:`FLOOR_PERCENTILE`
    percentile over ``mask`` (0 where the mask is empty). SSIM's brightness term reads absolute
    levels, and a reconstruction's absolute phase is its code's arbitrary choice: measured from its
    lowest phase, as the simulated truth that ``evaluate`` scores against (an empty object reads
    0 rad), the same reconstruction shifted by any constant scores the same."""
    values = object_phase[mask]
    return float(np.percentile(values, FLOOR_PERCENTILE)) if values.size else 0.0


def held_out_scores(model_path: Path, frames: np.ndarray, pp: PreprocessConfig, targets: np.ndarray,
                    corners: np.ndarray, object_phase: np.ndarray, weight: np.ndarray, stitch: StitchSettings,
                    threads: int, lead_in: np.ndarray | None = None, conjugate: bool = False) -> dict:
    """Scores of ``model_path`` (ONNX Runtime) on the held-out frames against the reconstruction's patches:
    ``mean_abs_error_rad`` (over the bright centre, one constant for the held-out frames removed: the
    training loss; a reconstruction's absolute phase is its code's arbitrary choice), per-patch RMSE
    (each patch's own offset removed), and SSIM/RMSE of the held-out patches stitched (one offset removed;
    the reconstruction's phase measured from its floor, :func:`phase_floor`).
    ``lead_in``: the frames of the scan just before the held-out ones; with ``normalize: "running"`` the
    running mean has counted them first, as a consumer that received the scan in order had."""
    from edge_ptychonn.science import accuracy
    from edge_ptychonn.science.metrics import patch_errors, score_phase, summarise_patch_errors
    from edge_ptychonn.science.train import loaded_totals
    from edge_ptychonn.stream.preprocess import RunningTotal

    running = RunningTotal(pp.normalize_window)
    if pp.normalize == "running" and lead_in is not None and len(lead_in):
        for total in loaded_totals(np.asarray(lead_in[-pp.normalize_window:]), pp):
            running.add(float(total))
    engine = accuracy.open_engine(model_path, "onnxruntime", device="cpu", threads=threads)
    try:
        predicted = accuracy.predict(engine, frames, pp, running=running)
    finally:
        engine.close()
    st = Stitcher(object_phase.shape, targets.shape[1:], weight=weight)
    st.add_many(predicted, corners)
    covered = st.covered(stitch.min_cover_weight)
    try:  # a held-out block too small to score stitched (no pixel, or none the SSIM window fits) has no such scores
        stitched = score_phase(st.image(), object_phase - phase_floor(object_phase, covered), covered)
    except ValueError:
        stitched = {}
    bright = weight > 0
    error = (predicted - targets)[:, bright]
    mean_abs = float(np.mean(np.abs(error - error.mean())))  # one constant removed, as trained
    out = {"mean_abs_error_rad": mean_abs, **summarise_patch_errors(patch_errors(predicted, targets, weight)),
           **{f"stitched_{k}": v for k, v in stitched.items()}}
    if conjugate:  # the same patches against the phase with its sign flipped (sign_flipped)
        out["conjugate_patch_rmse_median_rad"] = float(np.median(patch_errors(predicted, -targets, weight)))
    return out


def card_markdown(card: ModelCard, base_name: str, data: dict, before: dict, after: dict) -> str:
    """The fine-tuned model's card for people (Markdown)."""
    from edge_ptychonn.science.train import amplitude_loss_text, mapped_to, preprocess_lines

    t, m = card.training, card.model
    n = card.input_size
    lines = [
        f"# PtychoNN model card: `{card.name}` (fine-tuned)",
        "",
        f"`{base_name}` fine-tuned on recorded frames and an iterative reconstruction of the same sample "
        "(`edge-ptychonn finetune`). Maps one far-field diffraction frame "
        f"({n}x{n}) to {mapped_to(card)} of the patch under the probe; only the probe's bright centre "
        f"(|probe|^2 >= {card.stitch.probe_threshold} of its peak) is meaningful.",
        "",
        "## Inputs and outputs",
        "",
        f"- ONNX opset 17, input `diffraction` float32 (N, 1, {n}, {n}), outputs "
        f"{', '.join(f'`{o}`' for o in card.outputs)} float32 (N, 1, {n}, {n}); the batch axis is dynamic.",
    ] + preprocess_lines(card, "kept from the base model" + (
                             "" if data["crop_bin_from"] == "the base model"
                             else f" but the detector's crop and bin, given to finetune ({data['crop_bin_from']})")
                         + f", in `{card.name}.json`",
                         "in fine-tuning, over the mean total of the recorded frames") + [
        f"- Architecture: PtychoNN width {m.width}, depth {m.depth}, BatchNorm: {data['batchnorm']}; "
        f"amplitude head {m.amplitude_head}; "
        + (f"{m.head_blocks} residual head block(s) at full resolution before the phase head; " if m.head_blocks else "")
        + f"{t.n_parameters:,} parameters.",
        "",
        "## Fine-tuning data",
        "",
        f"- Frames: `{data['frames']}` ({data['n_frames']} frames); positions: `{data['positions']}`"
        f"{_position_mapping(data, n)}; "
        f"reconstruction: `{data['object']}` ({data['object_shape'][0]}x{data['object_shape'][1]}, "
        f"phase shift {data['phase_shift_rad']} rad); probe for the loss mask: {data['probe']}.",
        f"- {t.n_train_frames} training frames, {t.n_val_frames} held-out frames (the last "
        f"{data['val_fraction']:.0%} in scan order, a contiguous block), {data['n_guard']} frames left out as a guard "
        "band (their bright centre overlaps a held-out one's).",
        "",
        "## Settings",
        "",
        f"- {t.epochs_run} epochs ({t.steps} steps, batch {t.batch_size}), AdamW lr {t.lr} (warm-up, cosine "
        f"decay), weight decay {t.weight_decay}, bf16 autocast {t.bf16}, masked L1 loss on the probe's bright "
        f"centre (one constant per batch removed), seed {t.seed}; {t.train_minutes:.1f} min on {data['device']} ({t.host}); stopped at the time "
        f"limit: {t.stopped_at_time_limit}.",
        "- Loss per epoch (train / held-out, mean |phase error| in rad over the bright centre, one constant removed"
        + amplitude_loss_text(card) + "): "
        + ", ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(t.train_loss, t.val_loss)),
        f"- Command: `{t.command}`",
        "",
        "## Held-out accuracy (against the reconstruction, ONNX Runtime)",
        "",
        "| model | mean abs phase error rad | median patch RMSE rad | stitched SSIM | stitched RMSE rad |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in ((f"base `{base_name}`", before), (f"fine-tuned `{card.name}`", after)):
        lines.append(f"| {name} | {s['mean_abs_error_rad']:.4f} | {s['patch_rmse_median_rad']:.4f} | "
                     f"{s.get('stitched_ssim', float('nan')):.3f} | {s.get('stitched_rmse_rad', float('nan')):.4f} |")
    prev = t.continued_from
    if prev is not None and prev.command:
        lines += ["", "## Base model", "", f"- Trained with `{prev.command}` ({prev.train_minutes or 0.0:.1f} min, "
                  f"{prev.n_train_frames or '?'} frames); its own card lies beside it."]
    lines += ["", "## Limits", ""] + [f"- {x}" for x in card.limits]
    return "\n".join(lines) + "\n"


def _position_mapping(data: dict, size: int) -> str:
    """How the positions became window corners in object pixels (the card's words), when not as given."""
    pixel_size, (y0, x0), reference = data["pixel_size"], data["origin"], data["position_ref"]
    if (pixel_size, y0, x0, reference) == (1.0, 0.0, 0.0, "corner"):
        return ""
    return (f" (window corner in object pixels = position / {pixel_size:g} + ({y0:g}, {x0:g})"
            + (f" - {size / 2:g}: positions of the probe centre" if reference == "centre" else "") + ", rounded)")


# ---------------------------------------------------------------- command


def get_args_parser(prog: str = "edge-ptychonn finetune") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune PtychoNN on recorded frames and an iterative reconstruction of the same sample: "
        "cut the reconstruction's phase patches at the scan positions, train the base model on them (CPU or "
        "GPU), score held-out positions before and after, and write <out>.onnx, <out>.json (model card), "
        "<out>.md and <out>.pt; the weights after each epoch are kept in <out>.epoch.pt until then, and a run "
        "stopped after an epoch leaves them there (--init-from <out>.epoch.pt continues). Positions are the top-left corner of the model's input window in object "
        "pixels, as 'edge-ptychonn simulate' writes them (see --pixel-size, --origin, --position-ref); the "
        "detector's crop and bin (--crop, --bin) act on the frames only and leave the positions as they are.",
    )
    p.add_argument("--frames", required=True, help="recorded raw frames: .npy (N, H, W), or an HDF5 file of "
                   "processors/hdf5_writer.py on the detector channel (data, uniqueId, positions); its file of an "
                   "inference output channel (a model's phase images) is refused")
    p.add_argument("--positions", default=None, help="scan positions, unless the HDF5 file has them: .npz of "
                   "'edge-ptychonn simulate', .npy (N, 2) y x, or a text table of 'y x' (by frame index) or "
                   "'uniqueId y x' rows")
    p.add_argument("--object", required=True, help="reconstructed object: complex .npy (H, W), or .npz with a "
                   "complex 'object' (and optionally 'probe')")
    p.add_argument("--probe", default=None, help="probe (complex (n, n) .npy or .npz 'probe') for the loss mask "
                   "(default: the object .npz's probe, else the base model's training probe)")
    cli_options.add_detector_options(p, "the base model's card; written into the new card")
    p.add_argument("--pixel-size", type=float, default=1.0, help="position units per object pixel (default: 1, "
                   "positions in object pixels)")
    p.add_argument("--origin", type=float, nargs=2, default=(0.0, 0.0), metavar=("Y", "X"),
                   help="object pixel of position (0, 0) (default: 0 0)")
    p.add_argument("--position-ref", choices=POSITION_REFS, default="corner",
                   help="positions are the window's top-left corner (as simulate) or the probe centre "
                        "(default: %(default)s)")
    p.add_argument("--phase-shift", type=float, default=0.0,
                   help="subtract this constant (rad) from the reconstruction's phase before cutting patches")
    p.add_argument("--init-from", type=Path, default=default_model_path(),
                   help="base model: ONNX PtychoNN (its .json card beside it) or the <out>.pt or <out>.epoch.pt of "
                        "'edge-ptychonn train' or 'finetune' (default: the shipped model)")
    p.add_argument("--out", default="data/generated/finetuned", help="output prefix: <out>.onnx, .json, .md, .pt; "
                   "an existing model of that name (those four files) is replaced, all four together at the end "
                   "of the run; until then each finished epoch's weights are in <out>.epoch.pt, which a stopped "
                   "run leaves (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="held-out share: the last frames in scan order, a contiguous block (default: %(default)s)")
    p.add_argument("--batchnorm", choices=("unfold", "folded"), default="unfold",
                   help="an ONNX base has its BatchNorm folded into the convolutions: 'unfold' puts BatchNorm layers "
                        "back (same outputs) so that training behaves as it first did; 'folded' trains the plain "
                        "convolutions (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training frames; the learning rate "
                   "decays to the last step or to --max-minutes, whichever comes first (default: %(default)s)")
    p.add_argument("--max-minutes", type=float, default=10.0, help="stop training after this long (0: no limit; "
                   "default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="frames per training step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: %(default)s)")
    from edge_ptychonn.science.train import add_bf16_options

    add_bf16_options(p)
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda, "
                   "cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--seed", type=cli_options.seed, default=0, help="shuffling seed (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats ``args`` (non-default options only)."""
    from edge_ptychonn.cli import repeat_command

    return repeat_command("edge-ptychonn finetune", get_args_parser(), args)


def _fail(message: str, code: int = 2) -> int:
    print(f"edge-ptychonn finetune: {message}", file=sys.stderr)
    return code


def main(args: argparse.Namespace) -> int:
    """``edge-ptychonn finetune``; a SIGTERM (a batch system's stop, ``kill``) stops it like Ctrl-C: no
    half-written file is left behind, and the command ends with one line (exit 130), after one that
    names ``<out>.epoch.pt`` when this run finished an epoch (its weights, for ``--init-from``), as
    ``train`` does (``train.naming_the_last_epoch``)."""
    from edge_ptychonn.cli import sigterm_interrupts
    from edge_ptychonn.science.train import naming_the_last_epoch

    with sigterm_interrupts(), naming_the_last_epoch("finetune", args.out):
        return _finetune(args)


def _finetune(args: argparse.Namespace) -> int:
    from edge_ptychonn.science.train import check_outputs, check_training_options, output_prefix

    try:
        check_training_options(args)
        for name, value in (("phase-shift", args.phase_shift), ("val-fraction", args.val_fraction),
                            ("origin", args.origin[0]), ("origin", args.origin[1])):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        prefix = output_prefix(args.out)
        check_outputs(prefix)
    except OSError as exc:
        return _fail(f"cannot write --out {args.out}: {exc}")
    except ValueError as exc:
        return _fail(str(exc))
    try:
        import torch
    except ImportError:
        return _fail("fine-tuning needs torch: pip install 'edge-ptychonn[torch]'")
    t_start = time.monotonic()
    show = not args.quiet
    from edge_ptychonn.science.train import (
        EPOCH_SUFFIX, Trainer, divergence, keep_last_epoch, output_file, previous_training, resolve_bf16,
        save_checkpoint, scan_factors, training_device,
    )

    try:
        device = training_device(args.device)
        args.bf16, why = resolve_bf16(args.bf16, device)
        if why:  # what the run does, with its other lines (stdout): not an error
            print(why, flush=True)
        recorded = load_frames(args.frames)
        if args.positions:
            positions = load_positions(args.positions, recorded.unique_ids)
            positions_from = str(args.positions)
        elif recorded.positions is not None:
            positions = recorded.positions
            if not np.isfinite(positions).all():
                raise InputError(f"{args.frames}: {int((~np.isfinite(positions).all(axis=1)).sum())} frames have no "
                                 "position (NaN); give --positions")
            positions_from = f"{args.frames}:positions"
        else:
            raise InputError(recorded.positions_problem or f"{args.frames} holds no positions: give --positions")
        obj, probe = load_object(args.object)
        probe_from = f"{args.object}:probe" if probe is not None else None
        if args.probe:
            probe, probe_from = load_probe(args.probe), str(args.probe)
        model, config, card, pp = load_base(args.init_from)
        n = config.input_size
        given = (args.crop, args.crop_origin, args.bin) != (None,) * 3
        crop_bin_from = "--crop, --crop-origin, --bin" if given else "the base model"
        pp = detector_preprocess(pp, args.crop, args.crop_origin, args.bin)
        cli_options.check_detector_fit(recorded.frames.shape[1:], pp, (n, n),
                                       crop_bin_from if given else "the base model's")  # ValueError: one line, exit 2
        corners = to_object_pixels(positions, size=n, object_shape=obj.shape, pixel_size=args.pixel_size,
                                   unique_ids=recorded.unique_ids,
                                   origin=tuple(args.origin), reference=args.position_ref)
        stitch = card.stitch if card is not None else StitchSettings()
        try:
            base_settings = (ScanSettings.from_dict(card.training.scan_settings)
                             if card is not None and card.training is not None and card.training.scan_settings else None)
        except ValueError as exc:
            raise InputError(f"the model card of {args.init_from}: training.scan_settings: {exc}") from None
        if probe is None:
            s = base_settings or replace(ScanSettings(), frame_size=n)
            probe = make_probe(s.window_size, s.pupil_radius, s.probe_diameter)
            probe_from = "the base model's training probe" if base_settings else "the simulator's default probe"
        if probe.shape != (n, n):
            raise InputError(f"probe is {probe.shape}, the model's patches are {n}x{n}")
        weight = probe_weight(probe, stitch.probe_threshold)
        mask = weight > 0
        train_idx, val_idx, n_guard = held_out_split(corners, mask, args.val_fraction)
        if len(train_idx) < args.batch_size:
            raise InputError(f"{len(train_idx)} training frames after holding out {len(val_idx)} (and a guard band "
                             f"of {n_guard}): fewer than a batch of {args.batch_size}; record more positions or "
                             "lower --val-fraction")
    except (InputError, FileNotFoundError) as exc:
        return _fail(str(exc))
    except ValueError as exc:  # e.g. a base model that is not a PtychoNN, a malformed card
        return _fail(str(exc))
    base = Path(args.init_from).resolve()
    if base in (output_file(prefix, s).resolve() for s in (".onnx", ".pt", ".json")):
        return _fail(f"--out {args.out} would overwrite the base model {args.init_from}; choose another prefix")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folded = not config.batch_norm
    frames = np.asarray(recorded.frames)
    factors = scan_factors(frames, len(frames), pp)  # the recording is one scan
    if folded and args.batchnorm == "unfold":
        sel = np.sort(train_idx[:2048])
        model = unfold_batchnorm(model, frames[sel], pp, None if factors is None else factors[sel], progress=show)
        config = model.config
    phase = np.angle(obj * np.exp(-1j * args.phase_shift)).astype(np.float32)
    wraps, centre = phase_wraps(phase, corners, mask)
    if wraps:
        print(f"warning: the reconstruction's phase wraps at +-pi inside the scanned region ({wraps} neighbouring "
              f"pixel pairs differ by more than pi): the network would learn 2 pi jumps that the object does not "
              f"have; centre its phase on 0 with --phase-shift {args.phase_shift + centre:.3f}, or unwrap it",
              file=sys.stderr)
    targets = extract_patches(phase, corners, (n, n))
    amps = None
    if config.amplitude_head:  # the reconstruction's amplitude trains the amplitude head
        amps = extract_patches(np.abs(obj).astype(np.float32), corners, (n, n)).astype(np.float16)
    from edge_ptychonn.science.model import export_onnx

    train_data, val_data = ((frames[idx], None if factors is None else factors[idx], targets[idx].astype(np.float16),
                             None if amps is None else amps[idx]) for idx in (train_idx, val_idx))
    print(f"data: {len(train_idx)} training and {len(val_idx)} held-out frames ({n_guard} left out as a guard "
          f"band); positions from {positions_from}; loss over {int(mask.sum())} bright-centre pixels (probe: "
          f"{probe_from}); {device}", file=sys.stderr)

    prefix.parent.mkdir(parents=True, exist_ok=True)
    # the held-out block ends the scan: a live consumer's running mean has counted the frames before it
    val_set = (frames[val_idx], pp, targets[val_idx], corners[val_idx], phase, weight, stitch, args.threads,
               frames[:val_idx[0]])
    if Path(args.init_from).suffix == ".onnx":
        before = held_out_scores(Path(args.init_from), *val_set, conjugate=True)
    else:  # a checkpoint: score it as the engines would run it, exported
        with tempfile.TemporaryDirectory() as tmp:
            before = held_out_scores(export_onnx(model, Path(tmp) / "base.onnx"), *val_set, conjugate=True)
    if sign_flipped(before):
        print(f"warning: the base model's held-out patches match the reconstruction's phase with its sign flipped "
              f"(median patch RMSE {before['conjugate_patch_rmse_median_rad']:.4f} rad against "
              f"{before['patch_rmse_median_rad']:.4f} rad as given): the reconstruction may use the other sign "
              "convention, exp(-i phi); fine-tuning on it teaches the network the opposite sign. Save "
              "np.conj(object) if so", file=sys.stderr)
    before.pop("conjugate_patch_rmse_median_rad", None)

    # a .pt base: its card counts only when it is that checkpoint's run (train.previous_training); read before
    # this run's epochs can replace an --init-from <out>.epoch.pt
    continued_from = previous_training(str(args.init_from))
    targs = argparse.Namespace(seed=args.seed, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                               max_minutes=args.max_minutes, bf16=args.bf16)
    trainer = Trainer(targs, config, pp, mask, model=model, device=device)
    # one scan: its absolute phase is the reconstruction's arbitrary choice, which the base model never
    # learnt (train removes one constant per scan): the loss removes the batch's constant too
    scan_length = len(train_idx)
    steps_per_epoch = len(trainer.batches(len(train_idx), np.random.default_rng(0), scan_length))
    total_steps = steps_per_epoch * args.epochs
    t_train = time.monotonic()
    deadline = t_train + args.max_minutes * 60 if args.max_minutes else math.inf
    rng = np.random.default_rng(args.seed)
    epoch_path = output_file(prefix, EPOCH_SUFFIX)  # the weights after each epoch, as train keeps them
    train_loss, val_loss = [], [trainer.validate(val_data, len(val_idx))]
    print(f"start: held-out loss {val_loss[0]:.4f}", file=sys.stderr)
    stopped = False
    for epoch in range(args.epochs):
        bar = Progress(steps_per_epoch * args.batch_size, f"epoch {epoch + 1}/{args.epochs}", unit="frames",
                       enabled=show)
        loss, stopped = trainer.train_one_epoch(train_data, rng, total_steps, deadline, bar, scan_length)
        bar.close()
        train_loss.append(loss)
        trainer.recalibrate_batchnorm(train_data[0], train_data[1])
        val_loss.append(trainer.validate(val_data, len(val_idx)))
        diverged = divergence(epoch, loss, val_loss[-1], epoch_path)
        if diverged:  # the weights are lost: write no model (the previous epoch's stay in <out>.epoch.pt)
            return _fail(diverged, code=1)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss:.4f}  held-out loss {val_loss[-1]:.4f}  "
              f"({(time.monotonic() - t_train) / 60:.1f} min)", file=sys.stderr)
        save_checkpoint(trainer, targs, config, epoch_path, base_card=None if card is None else card.to_dict())
        if stopped:
            print(f"stopped at the time limit of {args.max_minutes} min", file=sys.stderr)
            break
    train_minutes = (time.monotonic() - t_train) / 60
    trainer.model.to("cpu")
    onnx_path, md_path = (output_file(prefix, s) for s in (".onnx", ".md"))
    training = Training(
        scan_settings=dict(card.training.scan_settings) if base_settings else None,
        eval_n_positions=card.training.eval_n_positions if base_settings else None,
        n_train_frames=len(train_idx), n_val_frames=len(val_idx), epochs=args.epochs, epochs_run=len(train_loss),
        steps=trainer.step, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, bf16=args.bf16,
        seed=args.seed, threads=args.threads, device=device if device != "cpu" else None,
        train_minutes=train_minutes, stopped_at_time_limit=stopped,
        train_loss=tuple(train_loss), val_loss=tuple(val_loss[1:]),
        n_parameters=int(sum(p.numel() for p in trainer.model.parameters())),
        host=f"{platform.machine()} {platform.processor() or ''}".strip(), torch=torch.__version__,
        edge_ptychonn=__version__, command=command_line(args), init_from=str(args.init_from),
        continued_from=continued_from,
    )
    data = {"frames": str(args.frames), "n_frames": int(len(frames)), "positions": positions_from,
            "object": str(args.object), "object_shape": list(obj.shape), "phase_shift_rad": args.phase_shift,
            "probe": probe_from, "val_fraction": args.val_fraction, "n_guard": n_guard, "device": device,
            "batchnorm": ("unfolded from the ONNX weights for training, folded again in the ONNX export"
                          if args.batchnorm == "unfold" else "none (trained folded into the convolutions)")
            if folded else "from the checkpoint, folded in the ONNX export", "pixel_size": args.pixel_size,
            "origin": list(args.origin), "position_ref": args.position_ref,
            "crop_bin_from": crop_bin_from}
    # the four files are made under hidden names and take their names together at the end, in the reverse
    # order of these (the .md, the .json, the .onnx), then the last epoch's <out>.epoch.pt becomes the .pt (as
    # train's does): a stop, a full disk or an error before then leaves an earlier model of this name as it was
    # (a .pt that matches its .onnx), no file half-written, and this run's last epoch in <out>.epoch.pt
    with contextlib.ExitStack() as files:
        onnx_partial, json_partial, md_partial = (
            files.enter_context(whole_file(path)) for path in (onnx_path, card_path(onnx_path), md_path))
        export_onnx(trainer.model, onnx_partial)
        after = held_out_scores(onnx_partial, *val_set)
        new_card = ModelCard(
            name=prefix.name, input_size=n, outputs=("phase", "amplitude") if config.amplitude_head else ("phase",),
            preprocess=pp, stitch=stitch, output_mask=output_mask_for(card, probe, stitch.probe_threshold),
            model=config, training=training, limits=LIMITS,
            accuracy={"finetune": {"held_out_before": before, "held_out_after": after, "data": data,
                                   "start_val_loss": val_loss[0]}},
        )
        md_partial.write_bytes(card_markdown(new_card, Path(args.init_from).name, data, before, after).encode())
        json_partial.write_bytes(card_bytes(new_card))
    pt_path = keep_last_epoch(prefix)  # last: the weights of this model
    print(f"held-out mean |phase error| {before['mean_abs_error_rad']:.4f} -> {after['mean_abs_error_rad']:.4f} "
          "rad; "
          f"median patch RMSE {before['patch_rmse_median_rad']:.4f} -> {after['patch_rmse_median_rad']:.4f} rad; "
          f"stitched SSIM {before.get('stitched_ssim', math.nan):.3f} -> {after.get('stitched_ssim', math.nan):.3f}")
    print(f"wrote {onnx_path}, {card_path(onnx_path)}, {md_path}, {pt_path} in "
          f"{(time.monotonic() - t_start) / 60:.1f} min; put it live with "
          f"edge-ptychonn configure <control channel> modelPath={onnx_path.resolve()}")
    return 0
