"""PvaPy processor: stitch every inference output into the growing object phase, published live.

Usage (all inference consumers' outputs merged by PvaPy's collector)::

    pvapy-hpc-collector -dc --collector-id 1 --producer-id-list 1,2 \\
        --input-channel 'inference:*:output' --output-channel 'stitch:*:output' \\
        --status-channel 'stitch:*:status' --control-channel 'stitch:*:control' \\
        --server-queue-size 1000 --collector-cache-size 32 --skip-initial-updates 0 \\
        --processor-class processors.stitch.StitchProcessor \\
        --processor-args '{"positionsFile": "data/generated/scan.npz", "publishRate": 2,
                          "outputDirectory": "results/stitched"}'

Why ``pvapy-hpc-collector``: it is PvaPy 5.6's own way to receive several
producers' channels in one process (``--input-channel 'inference:*:output'
--producer-id-list 1..N``, one monitor per producer, a server-side queue on
each), and it hands ``process()`` every frame of every consumer on one thread.
Being the one stage that sees all outputs, its ``collectorStats.nMissed``
counts the frames lost upstream, including those of a consumer that died (a
chained ``pvapy-hpc-consumer`` per output channel cannot see those). A
``pvapy-hpc-consumer`` has one input channel per process, so N consumers' outputs
would need N processes and no shared image. Stitching is a sum, so the
collector's sorting by uniqueId is not needed here; its cost is that it holds
frames until ``--collector-cache-size`` of them are cached (or 5 s pass without
a new one), and it rejects a frame older than those it already released (a
consumer lagging by more than the cache). Choose the cache size between
latency (cache / frame rate) and the lag it absorbs (``2 * nConsumers *
distributorUpdates`` is a good start); the collector's ``nRejected`` and
``nMissed`` show what was lost. The same rule applies when uniqueIds restart:
frames of a new scan that arrive while the previous scan's last frames are
still cached are rejected until the cache empties (at most 5 s after its last
frame), so leave a few seconds between scans. Pass ``--skip-initial-updates 0``: each
producer's first update on connect is an empty record, which this processor
ignores, so no frame is skipped. The processor also runs unchanged under
``pvapy-hpc-consumer`` on a single output channel.

Input
    NTNDArray frames: 2-D phase images (h, w), any numeric pixel type (float32
    from ``PtychoNNProcessor``), each with its ``uniqueId``. Frames with no image
    data (the empty record a monitor gets on connect) are ignored.
Output (``--output-channel``)
    At most ``publishRate`` times per second, when something changed: the
    object phase (H, W) float32 radians, the weighted average of the patches
    placed so far (``fill`` where none landed); ``uniqueId`` counts the images
    published; attributes ``ScanIndex``, ``FramesPlaced``, ``Coverage`` (fraction
    of object pixels with summed weight >= ``minCoverWeight``), ``LastUniqueId`` (of
    the last frame placed in the image; also the statistic ``lastUniqueId``).
    ``<outputChannel>:final`` holds the finished image of the last finished scan
    (``pvget`` it any time).
Files
    ``<outputDirectory>/<prefix>_scan<NNNN>.npy``: the (H, W) float32 image of each
    finished scan (at a new scan and at stop), with ``..._weight.npy`` (summed
    weights, float32) beside it.
Scan positions (top-left (y, x) of each patch in object pixels; a frame's
attributes win over the file)
    ``positionsFile``: the simulator's ``.npz`` (``positions_px``; its
    ``object_phase`` gives the object shape and its ``probe`` the weights), an
    ``.npy`` of shape (N, 2) or (N, 3), or a text table (``.csv``, ``.txt``:
    comma or white-space separated, ``#`` comments): 2 columns ``y x`` (row k is
    uniqueId ``firstUniqueId + k``) or 3 columns ``uniqueId y x``; a first row of
    names (``y,x``, ``uniqueId,x,y``, any order and case) says which column is which
    (:func:`edge_ptychonn.positions.read_text_table`).
    ``positionAttributes`` (default ``["PosY", "PosX"]``): NTNDArray attributes
    holding y and x, times ``positionScale`` (e.g. 1 / pixel size in m), plus
    ``positionOrigin`` ``[y0, x0]`` (default ``[0, 0]``: the object pixel of position
    (0, 0), as ``edge-ptychonn finetune --origin``): ``corner = value * positionScale
    + positionOrigin``.
    ``positionChannels`` ``[yChannel, xChannel]``: two of the collector's
    ``--metadata-channels`` (PvaPy delivers their updates, ``value`` and
    ``timeStamp``, to ``metadataQueueMap``), times ``positionScale``, plus
    ``positionOrigin``, as the attributes. A frame
    takes the update of each channel whose time stamp plus
    ``metadataTimeOffset`` lies within ``metadataTolerance`` seconds of the
    frame's ``timeStamp`` (the inference consumers keep the detector frame's),
    as PvaPy's metadata examples match; with ``metadataMatch: "uniqueId"`` the
    update whose ``uniqueId`` field equals the frame's. Never by arrival order:
    updates of frames that were lost are simply never used. A frame whose
    update has not arrived yet waits up to ``metadataWait`` seconds
    (``nFramesWaiting``), then falls back to the file. Order of precedence: the
    frame's attributes, the metadata channels, the file.
    A frame none of them gives a position (an attribute that is not a number gives none)
    or whose position is not finite (NaN, infinite) is counted (``nFramesNoPosition``),
    not placed.
Weights
    ``weightFile`` (.npy (h, w): finite, >= 0, not all zero), else ``probe_weight(probe,
    probeThreshold)`` from the ``.npz``, else the Stitcher's default centre window (also
    when the file's or the probe's shape is not the frames'; logged): the same
    :class:`edge_ptychonn.science.stitch.Stitcher` as offline stitching, so the
    live image equals the offline stitching of the same outputs.
Scans
    A frame whose uniqueId was already received in this scan (placed, waiting for
    its metadata, or not placed), or lies more than ``restartWindow`` below the
    highest uniqueId received in the scan, starts a new scan (the sim server
    restarting at 1, a new detector acquisition); so does the control command
    ``configure {"newScan": true}``. The finished scan's frames still waiting for their metadata are placed
    in it first (with the metadata that came, else the file's position, else counted
    as no position). Positions are matched by uniqueId, never by arrival order; with
    ``metadataMatch: "uniqueId"`` an update is used once and the newest for a
    uniqueId wins, so a new scan's frames never take an earlier scan's positions.
    The finished image is published and saved without holding the processor's
    lock, so the statistics, the publishing thread and other ``process()`` calls
    never wait for the disk; the ``process()`` call whose frame finishes a scan
    saves it itself (in ``stitchTimeUs``).
Processor arguments (``--processor-args`` JSON) -- see :data:`StitchProcessor.ARGS`
    positionsFile, firstUniqueId (1), positionAttributes, positionScale (1.0), positionOrigin ([0, 0]),
    positionChannels, metadataMatch ("timeStamp"), metadataTolerance (s, 0.001),
    metadataTimeOffset (s, 0), metadataWait (s, 2.0),
    objectShape [H, W] (required without a positionsFile), weightFile,
    probeThreshold (0.1), minCoverWeight (0.5), fill (0.0), publishRate (Hz, 2.0),
    restartWindow (64), outputDirectory, filePrefix ("stitch"): images saved as
    ``<outputDirectory>/<filePrefix>_scanNNNN.npy`` (and ``..._weight.npy``), never
    replacing an earlier run's (then ``_scanNNNN-2.npy``, ...).
Run-time changes (control channel ``configure``)
    publishRate (applies at once), fill (the image is published again with it within a
    period); ``{"newScan": true}`` finishes the current image with the frames handed to the
    stitcher so far: frames that PvaPy's collector still holds to sort them (up to its cache size,
    or 5 s) go into the next image, where an HDF5 writer on the same stream cuts at what it has
    received. Send it more than 5 s after a scan's last frame to finish that scan whole. A refused
    request changes nothing, PvaPy's own keys included; PvaPy's skipInitialUpdates (other than 0)
    is refused; so is PvaPy's collectorCacheSize, and the collector's cache stays as it was. The status's
    ``settings`` (JSON) gives the publishRate and fill in force.
Statistics (status channel ``userStats``) -- see :data:`STATS`. Totals since start or ``reset_stats``
    (PvaPy's collector resets only its own counts: the stitcher takes the reset from it at start).
    Each frame with an image (``nFramesReceived``) is placed (``nFramesPlaced``),
    waiting for its metadata (``nFramesWaiting``), or not placed: ``nFramesNoPosition`` (no
    position, or one that is not finite), ``nFramesOutside`` (its patch misses the object),
    ``nFramesWrongShape`` (not the shape of its scan's first frame),
    ``nFramesAfterStop`` (handed over after ``stop()`` saved the last image: PvaPy's collector
    waits 5 s for its processing thread, then stops the processor while that thread goes on).
    ``nBadFrames``: frames that cannot be decoded (by kind: ``nBadShape``, ``nBadColour``,
    ``nBadEmpty``, ``nBadDtype``, ``nBadCodec``, ``nBadMalformed``, ``nBadNonfinite``),
    plus ``nFramesWrongShape``. Each
    finished image is saved (``nScansSaved``) or not (``nSaveErrors``: the disk, a name).
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import sys
import threading
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pvaccess as pva

from edge_ptychonn.files import (
    NAME_MAX, check_folder, load_npy, load_npz, remove_stale_partials, save_npy_whole, unused_stem,
)
from edge_ptychonn.positions import read_text_table
from edge_ptychonn.science.stitch import Stitcher, probe_weight
from edge_ptychonn.stream.arguments import (
    choice, int_pair, integer, number, optional, path, text, text_list,
)
from edge_ptychonn.stream.quote import short_repr
from edge_ptychonn.thread_name import name_this_thread
from processors import shutdown
from processors.base import (
    BAD_KIND_COUNTS, RECENT_FILES, ProcessorBase, RecentIds, at_start, attribute_raw, attribute_value, bad_kind_stats,
    calling_controller, data_source, reset_with_source, restore_on_refusal, seconds,
)

NAME_ATTEMPTS = 5  # free names tried when other processes take them as this one saves
STOP_TIMEOUT_S = 10.0  # stop(): how long the images still queued may take to be saved


# ---------------------------------------------------------------- positions


@dataclass(frozen=True)
class PositionTable:
    """Scan positions by uniqueId, and what the file says about the object.

    ``positions``: uniqueId -> (y, x) float64 top-left corner in object pixels;
    ``object_shape`` (H, W) or None; ``probe`` (h, w) complex or None.
    """

    positions: dict[int, tuple[float, float]]
    object_shape: tuple[int, int] | None = None
    probe: np.ndarray | None = None

    @classmethod
    def load(cls, file: Path, first_unique_id: int = 1) -> "PositionTable":
        file = Path(file)
        if not file.is_file():
            raise ValueError(f"positionsFile {str(file)!r} is not a file")
        object_shape = probe = None
        try:  # a file of another kind (an .npy under an .npz name, ...), truncated or unreadable: one line naming it
            if file.suffix == ".npz":
                names, arrays = load_npz(file, ("positions_px", "object_phase", "probe"))
            elif file.suffix == ".npy":
                rows = np.asarray(load_npy(file), dtype=np.float64)
        except (OSError, EOFError, ValueError, TypeError, zipfile.BadZipFile) as exc:
            raise ValueError(f"positionsFile {file}: cannot read it ({str(exc).removeprefix(f'{file}: ')})") from None
        if file.suffix == ".npz":
            if "positions_px" not in arrays:
                raise ValueError(f"positionsFile {file} has no 'positions_px' array (has {', '.join(names)})")
            rows = arrays["positions_px"]
            if "object_phase" in arrays:
                object_shape = tuple(int(v) for v in arrays["object_phase"].shape)
                if len(object_shape) != 2 or min(object_shape) < 1:
                    raise ValueError(f"positionsFile {file}: object_phase must be an (H, W) image, got {object_shape}")
            probe = arrays.get("probe")
        elif file.suffix != ".npy":
            try:
                rows = read_text_table(file)
            except ValueError as exc:  # its message names the file
                raise ValueError(f"positionsFile {exc}") from None
        return cls.from_rows(rows, first_unique_id, object_shape, probe, str(file))

    @classmethod
    def from_rows(cls, rows: np.ndarray, first_unique_id: int = 1, object_shape=None, probe=None, name: str = "positions"):
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] not in (2, 3) or len(rows) == 0:
            raise ValueError(f"{name}: need rows of 'y x' or 'uniqueId y x', got shape {rows.shape}")
        if not np.all(np.isfinite(rows)):
            raise ValueError(f"{name}: positions must be finite numbers")
        if rows.shape[1] == 2:
            ids = np.arange(first_unique_id, first_unique_id + len(rows))
            yx = rows
        else:
            ids = rows[:, 0].astype(np.int64)
            if not np.array_equal(ids, rows[:, 0]) or len(set(ids.tolist())) != len(ids):
                raise ValueError(f"{name}: the uniqueId column must hold distinct integers")
            yx = rows[:, 1:]
        positions = {int(i): (float(y), float(x)) for i, (y, x) in zip(ids, yx)}
        return cls(positions, object_shape, probe)


def load_weight(file: Path) -> np.ndarray:
    """The (h, w) weights of ``weightFile`` (float64): finite, >= 0 and not all zero, else
    ``ValueError`` naming the file (checked at start, not at every frame)."""
    try:
        weight = np.asarray(load_npy(file), dtype=np.float64)
    except (OSError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"weightFile {file}: cannot read it ({str(exc).removeprefix(f'{file}: ')})") from None
    if weight.ndim != 2 or weight.size == 0 or not np.all(np.isfinite(weight)) or weight.min() < 0 or weight.max() <= 0:
        raise ValueError(f"weightFile {file}: need an (h, w) array of finite weights >= 0, not all zero "
                         f"(got shape {weight.shape})")
    return weight


def channel_name(name: str) -> str:
    """A metadata channel as PvaPy keys its queue: without a ``pva://`` or ``ca://`` prefix."""
    for prefix in ("pva://", "ca://"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


class MetadataPositions:
    """Scan positions from two metadata channels (y, x), matched to frames by time stamp
    or by uniqueId, never by arrival order.

    ``add(channel, key, value)`` records one update (key: its time stamp in seconds,
    or its uniqueId); ``lookup(key)`` gives (y, x) when both channels have an update
    matching ``key`` (time: the nearest within ``tolerance_s`` after adding
    ``offset_s`` to the update's time), else None. Each channel keeps the newest
    ``max_updates`` updates: once it holds a sixteenth more, the oldest go, down to
    ``max_updates`` in one go (dropping one with each update shifted the whole store each
    time: 29-34 us per update once full, against 0.4-0.6 while filling).

    By uniqueId, uniqueIds repeat from scan to scan, so: a channel keeps one update per
    uniqueId, the newest (a later scan's replaces an earlier one's); a matched update is
    used once (``lookup`` removes it); and :meth:`forget_used` (called when a scan
    finishes) drops the updates that came before the last one matched, those of frames
    of the finished scan that never came (lost) or were placed otherwise. Updates come
    in order on each channel, so what came after it (the next scan's first updates,
    already there when its first frame starts the new scan) is kept. By time stamp,
    times never repeat: nothing of that is needed, and an update may serve several
    frames.
    """

    def __init__(self, channels: tuple[str, str], by_time: bool = True, tolerance_s: float = 0.001,
                 offset_s: float = 0.0, max_updates: int = 100_000):
        self.channels = tuple(channel_name(c) for c in channels)
        self.by_time = by_time
        self.tolerance_s = tolerance_s
        self.offset_s = offset_s
        self.max_updates = max_updates
        # by time: sorted time stamps and their values
        self._keys: dict[str, list] = {c: [] for c in self.channels}
        self._values: dict[str, list[float]] = {c: [] for c in self.channels}
        # by uniqueId: uniqueId -> (arrival number on the channel, value), in arrival order
        self._by_id: dict[str, dict[int, tuple[int, float]]] = {c: {} for c in self.channels}
        self._arrived = dict.fromkeys(self.channels, 0)
        self._used_mark = dict.fromkeys(self.channels, 0)  # arrival number of the last update matched
        self.n_received = 0

    def add(self, channel: str, key: float, value: float) -> None:
        self.n_received += 1
        if not self.by_time:
            updates = self._by_id[channel]
            self._arrived[channel] += 1
            updates.pop(key, None)  # the newest wins, and goes to the end of the arrival order
            updates[key] = (self._arrived[channel], float(value))
            for old in list(itertools.islice(updates, self._excess(len(updates)))):
                del updates[old]
            return
        keys, values = self._keys[channel], self._values[channel]
        key = key + self.offset_s
        i = bisect.bisect_right(keys, key)  # updates normally come in order: an append
        keys.insert(i, key)
        values.insert(i, float(value))
        excess = self._excess(len(keys))
        if excess:
            del keys[:excess], values[:excess]

    def _excess(self, n: int) -> int:
        """How many of ``n`` updates kept to drop now (the oldest): none until a sixteenth more
        than ``max_updates`` are kept, then all above it."""
        return n - self.max_updates if n > self.max_updates + self.max_updates // 16 else 0

    def _find(self, channel: str, key) -> float | None:
        keys = self._keys[channel]
        i = bisect.bisect_left(keys, key)
        best = None
        for j in (i - 1, i):
            if 0 <= j < len(keys) and abs(keys[j] - key) <= self.tolerance_s:
                if best is None or abs(keys[j] - key) < abs(keys[best] - key):
                    best = j
        return self._values[channel][best] if best is not None else None

    def lookup(self, key) -> tuple[float, float] | None:
        if self.by_time:
            y, x = (self._find(c, key) for c in self.channels)
            return (y, x) if y is not None and x is not None else None
        found = [self._by_id[c].get(key) for c in self.channels]
        if None in found:
            return None
        for c, (arrived, _) in zip(self.channels, found):  # used once
            del self._by_id[c][key]
            self._used_mark[c] = max(self._used_mark[c], arrived)
        return found[0][1], found[1][1]

    def forget_used(self) -> int:
        """By uniqueId: drop each channel's updates that came before the last one matched
        (a scan is finished: theirs are frames that will not come). Returns how many."""
        n = 0
        for c, updates in self._by_id.items():
            while updates and next(iter(updates.values()))[0] < self._used_mark[c]:
                del updates[next(iter(updates))]
                n += 1
        return n


@dataclass
class _Waiting:
    """A frame waiting for its metadata."""

    unique_id: int
    image: np.ndarray
    key: float
    since_s: float
    attributes: list  # for the log, should no position come


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class StitchSettings:
    """Settings of the stitching processor (units in the names)."""

    positions_file: Path | None = None
    first_unique_id: int = 1
    position_attributes: tuple[str, str] = ("PosY", "PosX")
    position_scale: float = 1.0
    position_origin: tuple[float, float] = (0.0, 0.0)  # object pixel (y, x) of position (0, 0)
    object_shape: tuple[int, int] | None = None
    weight_file: Path | None = None
    probe_threshold: float = 0.1
    min_cover_weight: float = 0.5
    fill: float = 0.0
    publish_rate_hz: float = 2.0
    restart_window: int = 64
    output_directory: Path | None = None
    file_prefix: str = "stitch"
    position_channels: tuple[str, str] | None = None
    metadata_match: str = "timeStamp"
    metadata_tolerance_s: float = 0.001
    metadata_offset_s: float = 0.0
    metadata_wait_s: float = 2.0

    def __post_init__(self) -> None:
        if self.positions_file is None and self.object_shape is None:
            raise ValueError(
                "objectShape [H, W] is required when no positionsFile gives it "
                "(positions from attributes or metadata channels only)"
            )
        if not 0 <= self.probe_threshold < 1:
            raise ValueError(f"probeThreshold must be in [0, 1), got {self.probe_threshold}")
        if "/" in self.file_prefix:
            raise ValueError(f"filePrefix must be a file name without a folder, got {self.file_prefix!r} "
                             "(outputDirectory gives the folder)")
        if "\0" in self.file_prefix:  # no file can have that name: the image would be lost at its save
            raise ValueError(f"filePrefix must not hold a NUL character, got {self.file_prefix!r}")
        room = NAME_MAX - len("_scan0001-9_weight.npy")
        if self.output_directory is not None and len(os.fsencode(self.file_prefix)) > room:  # every image lost
            raise ValueError(f"filePrefix is too long ({len(os.fsencode(self.file_prefix))} bytes; at most {room}, "
                             f"so that '<filePrefix>_scanNNNN-N_weight.npy' fits the {NAME_MAX} of a file name)")
        if at_start():  # not again at a run-time change: the files were read at start
            self.check_files()

    def check_files(self) -> None:
        """The files and folders (``ValueError``), checked at start only (:func:`at_start`)."""
        if self.output_directory is not None:
            try:  # made at start if missing
                check_folder(self.output_directory)
            except OSError as exc:
                raise ValueError(f"outputDirectory {str(self.output_directory)!r} cannot be used: {exc}") from None
        if self.weight_file is not None and not self.weight_file.is_file():
            raise ValueError(f"weightFile {str(self.weight_file)!r} is not a file")


def _nonzero(value):
    v = number()(value)
    if v == 0:
        raise ValueError(f"must be a non-zero number, got {value!r}")
    return v


def _number_pair(value) -> tuple[float, float]:
    """A list of two finite numbers, as a tuple of floats."""
    try:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError
        return number()(value[0]), number()(value[1])
    except ValueError:
        raise ValueError(f"must be a list of two finite numbers, got {short_repr(value)}") from None


# ---------------------------------------------------------------- one scan


class _Scan:
    """The image of one scan: a Stitcher, and how many frames were placed in it and when."""

    def __init__(self, index: int, stitcher: Stitcher):
        self.index = index
        self.stitcher = stitcher
        self.n_placed = 0
        self.last_unique_id = 0
        self.first_placed_s = 0.0
        self.last_placed_s = 0.0
        self.changed = False
        self.saved = False

    def place_rate_hz(self) -> float:
        n = self.n_placed
        dt = self.last_placed_s - self.first_placed_s
        return (n - 1) / dt if n > 1 and dt > 0 else 0.0


@dataclass(frozen=True)
class _Output:
    """An image of a scan, taken under the processor's lock and sent after it is released:
    published live (``live``), on ``<outputChannel>:final`` (``final``), saved (``save``)."""

    image: np.ndarray
    scan: _Scan  # a finished scan is no longer changed: its weights are read when saving
    frames_placed: int
    coverage: float
    last_unique_id: int
    live: bool
    final: bool = False
    save: bool = False


def _stat(name):
    return lambda p: p.counts[name]


def _scan_stat(get, default):
    """A statistic of the current scan, read once: a new scan may replace it meanwhile."""
    return lambda p: (lambda scan: get(scan) if scan is not None else default)(p.scan)


STATS = {
    "nFramesReceived": (pva.ULONG, _stat("received")),
    "nFramesPlaced": (pva.ULONG, _stat("placed")),
    "nFramesNoPosition": (pva.ULONG, _stat("no_position")),
    "nFramesOutside": (pva.ULONG, _stat("outside")),
    "nFramesWrongShape": (pva.ULONG, _stat("wrong_shape")),
    "nFramesAfterStop": (pva.ULONG, _stat("after_stop")),
    "nBadFrames": (pva.ULONG, lambda p: p.counts["bad"] + p.counts["wrong_shape"]),
    **bad_kind_stats(),
    "nEmptyFrames": (pva.ULONG, _stat("empty")),
    "nImagesPublished": (pva.ULONG, _stat("published")),
    "nScans": (pva.ULONG, lambda p: p.scan_index),  # scans with a frame placed (an image), this one included
    "nScansSaved": (pva.ULONG, _stat("saved")),
    "nSaveErrors": (pva.ULONG, _stat("save_errors")),
    "scanFramesPlaced": (pva.ULONG, _scan_stat(lambda scan: scan.n_placed, 0)),
    "coverage": (pva.DOUBLE, lambda p: p.coverage()),
    "placeRate": (pva.DOUBLE, _scan_stat(_Scan.place_rate_hz, 0.0)),
    "stitchTimeUs": (pva.DOUBLE, lambda p: 1e6 * p.process_time_s / max(p.counts["received"], 1)),
    "lastUniqueId": (pva.ULONG, _scan_stat(lambda scan: scan.last_unique_id, 0)),
    "nFramesByMetadata": (pva.ULONG, _stat("by_metadata")),
    "nFramesWaiting": (pva.ULONG, lambda p: len(p.waiting)),
    "nMetadataReceived": (pva.ULONG, lambda p: p.metadata.n_received if p.metadata else 0),
    "settings": (pva.STRING, lambda p: p.settings_in_force()),  # publishRate, fill in force (JSON)
}


class StitchProcessor(ProcessorBase):
    """Places each phase frame at its scan position; publishes the object image at ``publishRate``."""

    ARGS = {
        "positionsFile": ("positions_file", optional(path())),
        "firstUniqueId": ("first_unique_id", integer(0)),
        "positionAttributes": ("position_attributes", text_list(2)),
        "positionScale": ("position_scale", _nonzero),
        "positionOrigin": ("position_origin", _number_pair),
        "objectShape": ("object_shape", optional(int_pair(1))),
        "weightFile": ("weight_file", optional(path())),
        "probeThreshold": ("probe_threshold", number(0, 1)),
        "minCoverWeight": ("min_cover_weight", number(0)),
        "fill": ("fill", number(finite=False)),  # NaN: "no data" where no frame covers
        "publishRate": ("publish_rate_hz", number(0.01, 1000)),
        "restartWindow": ("restart_window", integer(0)),
        "outputDirectory": ("output_directory", optional(path())),
        "filePrefix": ("file_prefix", text()),
        "positionChannels": ("position_channels", optional(text_list(2))),
        "metadataMatch": ("metadata_match", choice("timeStamp", "uniqueId")),
        "metadataTolerance": ("metadata_tolerance_s", number(0, 60)),
        "metadataTimeOffset": ("metadata_offset_s", number(-3600, 3600)),
        "metadataWait": ("metadata_wait_s", number(0, 600)),
    }
    SETTINGS = StitchSettings
    STATS = STATS
    RUNTIME_KEYS = ("publishRate", "fill", "newScan")

    def __init__(self, configDict: dict | None = None):
        super().__init__(configDict)
        s = self.settings
        self.table = PositionTable.load(s.positions_file, s.first_unique_id) if s.positions_file else None
        self.weight = load_weight(s.weight_file) if s.weight_file else None
        if s.output_directory is not None:
            s.output_directory.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(s.output_directory, self.logger)
        self.lock = threading.Lock()
        self.scan: _Scan | None = None
        self.scan_index = 0
        self.counts = dict.fromkeys(
            ("received", "placed", "no_position", "outside", "bad", "wrong_shape", "empty", "published", "saved",
             "save_errors", "by_metadata", "after_stop", *BAD_KIND_COUNTS), 0
        )
        self._stopped = False  # stop() saved the last image: a frame handed over later is counted, not placed
        self.metadata = None
        if s.position_channels is not None:
            self.metadata = MetadataPositions(s.position_channels, s.metadata_match == "timeStamp",
                                              s.metadata_tolerance_s, s.metadata_offset_s)
        self.waiting: deque[_Waiting] = deque()  # all of the current scan
        self._max_unique_id = 0  # the highest uniqueId received in the current scan
        # the current scan's uniqueIds within restartWindow of the highest (placed, waiting or not
        # placed; restart detection: an id further below starts a new scan anyway): bounded
        # however long a scan runs
        self._received_ids = RecentIds()
        self.process_time_s = 0.0
        self._resets = 0  # resetStats() calls: a frame counted before one adds no time after it
        self.saved_files: deque[Path] = deque(maxlen=RECENT_FILES)  # the images saved last, newest at the end
        self.final_channel = ""
        self._stop = threading.Event()
        self._wake = threading.Event()  # the publishing thread's sleep ends early: stop, a new publishRate
        self._thread: threading.Thread | None = None
        self._published_id = 0
        # images to publish or save, queued in order under self.lock, sent after it is released
        # by whichever thread holds self._output_lock (see _send_outputs)
        self._outputs: deque[_Output] = deque()
        self._output_lock = threading.Lock()
        self._saving: set[int] = set()  # the scan whose image is being saved now (under self.lock)

    # -- the science: where a frame goes ----------------------------------------------------
    def position_of(self, unique_id: int, attributes: list) -> tuple[float, float] | None:
        """(y, x) in object pixels from the frame's attributes, else the table, else None
        (the metadata channels are looked up by :meth:`add_frame`)."""
        return self._attribute_position(attributes) or self._table_position(unique_id)

    def _attribute_position(self, attributes: list) -> tuple[float, float] | None:
        ny, nx = self.settings.position_attributes
        y, x = attribute_value(attributes, ny), attribute_value(attributes, nx)
        if y is not None and x is not None:
            return self._to_object_pixels(y, x)
        return None

    def _to_object_pixels(self, y: float, x: float) -> tuple[float, float]:
        """A position of the attributes or the metadata channels in object pixels:
        ``value * positionScale + positionOrigin`` (finetune's ``position / pixel_size + origin``)."""
        k, (y0, x0) = self.settings.position_scale, self.settings.position_origin
        return y * k + y0, x * k + x0

    def _table_position(self, unique_id: int) -> tuple[float, float] | None:
        return self.table.positions.get(unique_id) if self.table is not None else None

    # -- positions from metadata channels (under self.lock) -----------------------------------
    def _drain_metadata_locked(self) -> int:
        """Move every update PvaPy queued for the position channels into ``self.metadata``."""
        n = 0
        for name in self.metadata.channels:
            queue = self.metadataQueueMap.get(name)
            while queue is not None:
                try:
                    update = queue.get(0)
                except pva.QueueEmpty:
                    break
                n += self._add_metadata_locked(name, update.toDict())
        return n

    def _add_metadata_locked(self, name: str, update: dict) -> int:
        try:
            value = float(update["value"])
            key = seconds(update["timeStamp"]) if self.metadata.by_time else int(update["uniqueId"])
        except (KeyError, TypeError, ValueError) as exc:
            self.count_problem("metadata", "update of %s unusable (%s: %s): need a numeric 'value' and %s",
                               name, type(exc).__name__, exc,
                               "'timeStamp'" if self.metadata.by_time else "'uniqueId'")
            return 0
        self.metadata.add(name, key, value)
        return 1

    def _metadata_position_locked(self, key) -> tuple[float, float] | None:
        found = self.metadata.lookup(key)
        if found is None:
            return None
        return self._to_object_pixels(found[0], found[1])

    def _retry_waiting_locked(self, final: bool = False) -> None:
        """Place the waiting frames whose metadata came; give up on those that waited
        ``metadataWait``, or all that are left if ``final`` (then the positions file, else
        counted as no position)."""
        new = self._drain_metadata_locked() if self.metadata is not None else 0
        if not self.waiting:
            return
        now = time.monotonic()
        expired = lambda w: final or now - w.since_s >= self.settings.metadata_wait_s
        if not new:  # nothing new came: only the oldest can have expired
            while self.waiting and expired(self.waiting[0]):
                w = self.waiting.popleft()
                self._place_locked(w.unique_id, w.image, self._table_position(w.unique_id), w.attributes)
            return
        keep = deque()
        for w in self.waiting:
            position = self._metadata_position_locked(w.key)
            if position is not None:
                self.counts["by_metadata"] += self._place_locked(w.unique_id, w.image, position, w.attributes)
            elif expired(w):
                self._place_locked(w.unique_id, w.image, self._table_position(w.unique_id), w.attributes)
            else:
                keep.append(w)
        self.waiting = keep

    def _object_shape(self, patch_shape: tuple[int, int]) -> tuple[int, int]:
        s = self.settings
        if s.object_shape is not None:
            return s.object_shape
        if self.table.object_shape is not None:
            return self.table.object_shape
        yx = np.array(list(self.table.positions.values()))
        return int(np.ceil(yx[:, 0].max())) + patch_shape[0], int(np.ceil(yx[:, 1].max())) + patch_shape[1]

    def _weight(self, patch_shape: tuple[int, int]) -> np.ndarray | None:
        if self.weight is not None:
            if self.weight.shape == tuple(patch_shape):
                return self.weight
            self.count_problem("weightShape", "weightFile %s is %s, the frames are %s: using the centre window",
                               self.settings.weight_file, self.weight.shape, patch_shape)
            return None
        probe = self.table.probe if self.table is not None else None
        if probe is not None and probe.shape == tuple(patch_shape):
            return probe_weight(probe, self.settings.probe_threshold)
        if probe is not None:
            self.count_problem("probeShape", "probe %s does not match the frames %s: using the centre window",
                               probe.shape, patch_shape)
        return None

    def _new_scan(self, patch_shape: tuple[int, int]) -> _Scan:
        """The next scan; it counts (``nScans``) and keeps its index once a frame is placed in
        it: a scan whose every frame missed the object leaves its index to the next one."""
        stitcher = Stitcher(self._object_shape(patch_shape), patch_shape, weight=self._weight(patch_shape))
        self.logger.info("scan %d: object %s, patches %s", self.scan_index + 1, stitcher.object_shape, patch_shape)
        return _Scan(self.scan_index + 1, stitcher)

    def _is_restart_locked(self, unique_id: int) -> bool:
        """A frame of a new scan: its uniqueId was already received in this scan (placed,
        waiting, or not placed: a new scan's first frame whose id the last scan did not place
        went into the last image), or lies more than ``restartWindow`` below the highest
        uniqueId received in it."""
        return unique_id in self._received_ids or unique_id < self._max_unique_id - self.settings.restart_window

    def add_frame(self, unique_id: int, image: np.ndarray, attributes: list, time_s: float = 0.0) -> bool:
        """Place one frame (called by ``process()``; usable without PvaPy). True if placed;
        False if not placed (counted), or waiting for its metadata (``time_s``: its time
        stamp in seconds, for the metadata channels). A frame of a new scan finishes the
        current one first (its waiting frames are placed in it, or counted)."""
        return self._add_frame(unique_id, image, attributes, time_s)[0]

    def _add_frame(self, unique_id: int, image: np.ndarray, attributes: list, time_s: float = 0.0,
                   received: bool = False) -> tuple[bool, int]:
        """:meth:`add_frame`; ``received``: also count the frame received, under the same lock
        as its placement (a resetStats() between the two left nFramesPlaced above
        nFramesReceived). Returns (placed, the number of resets before it was counted)."""
        position = self._attribute_position(attributes)
        with self.lock:
            self.counts["received"] += received
            resets = self._resets
            if self._stopped:  # it would start an image that no stop saves
                self.counts["after_stop"] += 1
                self.count_problem("afterStop", "frame %d came after the stitcher stopped (PvaPy's collector hands "
                                   "over what it holds after its own wait): not placed, counted in nFramesAfterStop",
                                   unique_id)
                return False, resets
            if self._is_restart_locked(unique_id):
                self._finish_locked(publish=True)
            self._max_unique_id = max(self._max_unique_id, unique_id)
            self._received_ids.add(unique_id, self._max_unique_id - self.settings.restart_window)
            placed = self._add_locked(unique_id, image, position, time_s, attributes)
        self._send_outputs()
        return placed, resets

    def _add_locked(self, unique_id: int, image: np.ndarray, position, time_s: float, attributes: list) -> bool:
        if self.metadata is not None:
            self._retry_waiting_locked()
            if position is None:
                key = time_s if self.metadata.by_time else unique_id
                position = self._metadata_position_locked(key)
                if position is not None:  # counted once placed (not if outside the object, say)
                    placed = self._place_locked(unique_id, image, position, attributes)
                    self.counts["by_metadata"] += placed
                    return placed
                if self.settings.metadata_wait_s > 0:
                    self.waiting.append(_Waiting(unique_id, np.array(image), key, time.monotonic(), attributes))
                    return False
        if position is None:
            position = self._table_position(unique_id)
        return self._place_locked(unique_id, image, position, attributes)

    def _place_locked(self, unique_id: int, image: np.ndarray, position, attributes: list) -> bool:
        """Place a frame of the current scan at ``position`` (None or not finite: counted as
        no position, logged with why, from the frame's ``attributes`` where they hold it)."""
        scan = self.scan
        if scan is not None and image.shape != scan.stitcher.patch_shape:
            self.counts["wrong_shape"] += 1
            self.count_problem("shape", "frame %d is %s, the scan's frames are %s: not placed",
                               unique_id, image.shape, scan.stitcher.patch_shape)
            return False
        if position is None or not (math.isfinite(position[0]) and math.isfinite(position[1])):
            self._count_no_position_locked(unique_id, position, attributes)
            return False
        if scan is None:
            scan = self.scan = self._new_scan(image.shape)
        now = time.monotonic()
        if not scan.stitcher.add(image, position):
            self.counts["outside"] += 1
            self.count_problem("outside", "frame %d at %s misses the object %s", unique_id, position,
                               scan.stitcher.object_shape)
            return False
        scan.last_unique_id = unique_id  # of the last frame placed: one outside the object is not in the image
        scan.n_placed += 1
        if scan.n_placed == 1:
            scan.first_placed_s = now
            self.scan_index = scan.index  # a scan with an image: it counts
        scan.last_placed_s = now
        scan.changed = True
        self.counts["placed"] += 1
        return True

    def _count_no_position_locked(self, unique_id: int, position, attributes: list) -> None:
        """Count a frame without a usable position in nFramesNoPosition and log why (once per
        reason): its ``position`` is not finite; or there is none (None), and a position
        attribute is there but not a number, or none of the position's sources has it."""
        self.counts["no_position"] += 1
        if position is not None:
            self.count_problem("positionNotFinite", "frame %d has no position: %s is not finite", unique_id, position)
            return
        metadata = ", no matching metadata" if self.metadata is not None else ""
        names = self.settings.position_attributes
        for name in names:
            value = attribute_raw(attributes, name)
            if value is not None and attribute_value(attributes, name) is None:
                self.count_problem("positionNotNumber", "frame %d has no position (its attribute %s is %s, not a "
                                   "number%s, not in the positions file)", unique_id, name, short_repr(value, 40),
                                   metadata)
                return
        self.count_problem("noPosition", "frame %d has no position (no attributes %s%s, not in the positions file)",
                           unique_id, "/".join(names), metadata)

    def coverage(self) -> float:
        with self.lock:
            if self.scan is None:
                return 0.0
            return float(self.scan.stitcher.covered(self.settings.min_cover_weight).mean())

    def image(self) -> tuple[np.ndarray, _Scan] | None:
        """The current scan's (H, W) float32 image and its scan, or None."""
        with self.lock:
            if self.scan is None:
                return None
            return self.scan.stitcher.image(self.settings.fill), self.scan

    # -- finishing and saving a scan ----------------------------------------------------------
    def _finish_locked(self, publish: bool) -> None:
        """Finish the current scan: its waiting frames are placed (or counted), then it is
        detached and its image queued (published if ``publish``, saved) for
        :meth:`_send_outputs`, which the caller runs after releasing the lock."""
        if self.metadata is not None:
            self._retry_waiting_locked(final=True)
            self.metadata.forget_used()
        scan = self.scan
        self.scan = None
        self._max_unique_id = 0
        self._received_ids = RecentIds()
        if scan is not None and not scan.n_placed:
            self.logger.info("scan %d: no frame placed, no image; the next scan takes its index", scan.index)
        if scan is None or not scan.n_placed:
            return
        save = not scan.saved and self.settings.output_directory is not None
        scan.saved = True  # once, whichever thread finishes it
        # on the live channel only when it changed since it was last published there (else a
        # viewer got the same image twice, at once, beyond publishRate), on the final channel always
        self._outputs.append(self._snapshot_locked(scan, live=publish and scan.changed, final=publish, save=save))

    def _snapshot_locked(self, scan: _Scan, live: bool, final: bool = False, save: bool = False) -> _Output:
        scan.changed = False
        return _Output(scan.stitcher.image(self.settings.fill), scan, scan.n_placed,
                       float(scan.stitcher.covered(self.settings.min_cover_weight).mean()),
                       scan.last_unique_id, live, final, save)

    def _save(self, out: _Output) -> None:
        scan = out.scan
        # an earlier run's files of the same name are kept: this one gets "-2", "-3", ...
        base = self.settings.output_directory / f"{self.settings.file_prefix}_scan{scan.index:04d}"
        stem = base
        for attempt in range(NAME_ATTEMPTS):
            try:  # the weights first: the image's name appearing says both are complete
                stem = unused_stem(base, (".npy", "_weight.npy"))
                weight = Path(f"{stem}_weight.npy")
                save_npy_whole(weight, scan.stitcher.weight_sum().astype(np.float32), replace=False)
                try:
                    save_npy_whole(Path(f"{stem}.npy"), out.image, replace=False)
                except OSError:  # ours, half of a pair: to the next free name, or none (a full disk)
                    weight.unlink(missing_ok=True)
                    raise
                break
            except FileExistsError as exc:  # another process took the name meanwhile
                if attempt == NAME_ATTEMPTS - 1:
                    self._save_failed(stem, exc)
                    return
            except OSError as exc:
                self._save_failed(stem, exc)
                return
        self.saved_files.append(Path(f"{stem}.npy"))
        with self.lock:
            self.counts["saved"] += 1
        self.logger.info("scan %d: %d frames placed, saved %s.npy", scan.index, out.frames_placed, stem)

    def _save_failed(self, stem: Path, exc: OSError) -> None:
        with self.lock:
            self.counts["save_errors"] += 1
        self.count_problem("save", "cannot save %s: %s (counted in nSaveErrors)", stem, exc)

    def finish_scan(self, publish: bool = True) -> None:
        """Finish the current image (published, saved); the next frame starts a new one.
        Returns when its image is sent and saved."""
        with self.lock:
            self._finish_locked(publish)
        self._send_outputs(wait=True)

    # -- publishing ---------------------------------------------------------------------------
    def _send_outputs(self, wait: bool = False) -> None:
        """Send the queued outputs, in order, without holding ``self.lock``. One thread at a
        time sends (``self._output_lock``); another that finds it busy leaves its outputs to
        that one, which looks at the queue again after releasing it. ``wait``: return only
        when the outputs queued so far are sent (waits for the one in flight)."""
        while wait or self._outputs:
            if not self._output_lock.acquire(blocking=wait):
                return
            try:
                while self._outputs:
                    self._send(self._outputs.popleft())
            finally:
                self._output_lock.release()
            wait = False

    def _send(self, out: _Output) -> None:
        try:
            if out.live:
                self._published_id += 1
                self.updateOutputChannel(self._encode(out, self._published_id))
                with self.lock:
                    self.counts["published"] += 1
            if out.final and self.final_channel and self.pvaServer is not None:
                try:
                    self.pvaServer.update(self.final_channel, self._encode(out, out.scan.index))
                except pva.PvaException as exc:
                    self.count_problem("publishFinal", "cannot update %s: %s", self.final_channel, exc)
        finally:  # the image is saved even if publishing failed
            if out.save:
                with self.lock:
                    self._saving.add(out.scan.index)
                try:
                    self._save(out)
                finally:
                    with self.lock:
                        self._saving.discard(out.scan.index)

    def _encode(self, out: _Output, unique_id: int) -> pva.PvObject:
        pv = self.generateNtNdArray2D(unique_id, np.ascontiguousarray(out.image, dtype=np.float32))
        t = time.time()
        pv["timeStamp"] = {"secondsPastEpoch": int(t), "nanoseconds": int((t % 1) * 1e9)}
        pv["dataTimeStamp"] = pv["timeStamp"]
        pv["attribute"] = [
            pva.NtAttribute("ColorMode", pva.PvInt(0)),
            pva.NtAttribute("ScanIndex", pva.PvInt(out.scan.index)),
            pva.NtAttribute("FramesPlaced", pva.PvInt(out.frames_placed)),
            pva.NtAttribute("Coverage", pva.PvDouble(out.coverage)),
            pva.NtAttribute("LastUniqueId", pva.PvInt(out.last_unique_id)),
        ]
        return pv

    def _publish_loop(self) -> None:
        name_this_thread()
        last_s = -float("inf")  # when the last live image was taken
        # with metadata channels, wake at least every 0.1 s to place frames whose metadata came
        tick_s = 0.1 if self.metadata is not None else None
        while True:
            # the period is read at every turn: a publishRate changed at run time wakes this
            # thread (configure) and applies from the last image on, not after the old period
            self._wake.wait(min(1.0 / self.settings.publish_rate_hz, tick_s or 1e9))
            self._wake.clear()
            if self._stop.is_set():
                return
            with self.lock:
                if self.metadata is not None:
                    self._retry_waiting_locked()
                now = time.monotonic()
                scan = self.scan
                if now >= last_s + 1.0 / self.settings.publish_rate_hz - 0.01 and scan is not None and scan.changed:
                    last_s = now
                    self._outputs.append(self._snapshot_locked(scan, live=True))
            self._send_outputs()

    # -- PvaPy lifecycle ----------------------------------------------------------------------
    def start(self):
        self.counting_resets = True  # a reset_stats from now on clears the run's totals: nStatsResets
        controller = calling_controller(sys._getframe(1), self, "configure")
        source = data_source(sys._getframe(1), controller)  # the collector or consumer above it
        restore_on_refusal(controller, source)  # a refused configure: no change
        reset_with_source(source, controller)  # reset_stats resets this processor's counts too
        if self.metadata is not None:
            missing = [c for c in self.metadata.channels if c not in (self.metadataQueueMap or {})]
            if missing:
                given = ", ".join(self.metadataQueueMap or {}) or "none"
                message = (f"positionChannels {', '.join(missing)} not among the metadata channels "
                           f"(--metadata-channels gives: {given}); their frames wait {self.settings.metadata_wait_s:g} s, "
                           "then count as no position")
                self.logger.error(message)
                self.count_problem("metadataChannel", "%s", message)
        if self.outputChannel and self.pvaServer is not None:
            self.final_channel = f"{self.outputChannel}:final"
            try:
                self.pvaServer.addRecord(self.final_channel, pva.NtNdArray(), None)
            except pva.PvaException as exc:
                self.count_problem("publishFinal", "cannot add %s: %s", self.final_channel, exc)
                self.final_channel = ""
        self._stop.clear()
        self._wake.clear()
        self._thread = threading.Thread(target=self._publish_loop, name="stitch-publish", daemon=True)
        self._thread.start()
        # SIGTERM (also the kernel's, when the launcher that started this collector dies)
        # stops the framework as Ctrl-C does, so stop() saves the image: not lost with the process
        shutdown.on_sigterm(self._send_queued, self.logger)

    def _send_queued(self, timeout_s: float) -> bool:
        """SIGTERM: send the images queued so far while the server still serves clients; True if
        they were sent within ``timeout_s``. They are sent (and saved) on a thread of their own:
        a save that a slow or hung disk holds goes on there, and does not hold the stop."""
        sent = threading.Event()

        def send() -> None:
            self._send_outputs(wait=True)
            sent.set()

        threading.Thread(target=send, name="stitch-drain", daemon=True).start()
        return sent.wait(timeout_s)

    def stop(self):
        # What is published inside stop() reaches no client (PvaPy stops its server
        # first): the finished image goes to disk. Frames still waiting for their
        # metadata are placed first, or counted.
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2.0)
        with self.lock:
            self._stopped = True
            self._finish_locked(publish=False)
            unsaved = sorted({out.scan.index for out in self._outputs if out.save} | self._saving)
        # on a thread of its own, as SIGTERM's drain: a slow or hung disk holds the save, not the stop
        if not self._send_queued(STOP_TIMEOUT_S):
            with self.lock:
                unsaved = sorted(set(unsaved) & ({out.scan.index for out in self._outputs if out.save} | self._saving))
            scans = ("scan " if len(unsaved) == 1 else "scans ") + ", ".join(map(str, unsaved))
            self.logger.error("stopping with the image of %s not saved after %g s (the disk is slow or hung): "
                              "the save goes on until the process exits", scans, STOP_TIMEOUT_S)

    def process(self, pvObject):
        t0 = time.thread_time()  # CPU time of this thread: the stitcher's own cost, not its waits
        frame = self.decode_frame(pvObject, self.lock)
        if frame is None:
            return None
        meta, image = frame
        _, resets = self._add_frame(meta.unique_id, image, meta.attributes, seconds(meta.time_stamp), received=True)
        cpu_s = time.thread_time() - t0
        with self.lock:  # resetStats() clears the counts under it
            if resets == self._resets:  # not a frame counted before a reset: stitchTimeUs is per frame received
                self.process_time_s += cpu_s
        return None

    def configure(self, configDict):
        fill = self.settings.fill
        super().configure(configDict)
        new = self.settings.fill
        if new != fill and not (np.isnan(new) and np.isnan(fill)):
            with self.lock:  # the image changed: published at the next period, not at the next frame
                if self.scan is not None and self.scan.n_placed:
                    self.scan.changed = True
        self._wake.set()  # a new publishRate applies now

    def new_scan(self) -> None:
        self.finish_scan(publish=True)

    def resetStats(self):
        super().resetStats()
        with self.lock:
            for k in self.counts:
                self.counts[k] = 0
            # the frames waiting for their metadata stay counted, so that each frame received
            # is still placed, waiting or not placed once they are settled
            self.counts["received"] = len(self.waiting)
            self.process_time_s = 0.0
            self._resets += 1
