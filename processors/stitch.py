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
    of object pixels with summed weight >= ``minCoverWeight``), ``LastUniqueId``.
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
    uniqueId ``firstUniqueId + k``) or 3 columns ``uniqueId y x``.
    ``positionAttributes`` (default ``["PosY", "PosX"]``): NTNDArray attributes
    holding y and x, times ``positionScale`` (e.g. 1 / pixel size in m).
    A frame with no position is counted (``nFramesNoPosition``), not placed.
Weights
    ``weightFile`` (.npy (h, w)), else ``probe_weight(probe, probeThreshold)`` from
    the ``.npz``, else the Stitcher's default centre window: the same
    :class:`edge_ptychonn.science.stitch.Stitcher` as offline stitching, so the
    live image equals the offline stitching of the same outputs.
Scans
    A frame whose uniqueId was already placed in this scan, or lies more than
    ``restartWindow`` below the highest uniqueId of the scan, starts a new scan
    (the sim server restarting at 1, a new detector acquisition); so does the
    control command ``configure {"newScan": true}``. Positions are matched by
    uniqueId, never by arrival order.
Processor arguments (``--processor-args`` JSON) -- see :data:`StitchProcessor.ARGS`
    positionsFile, firstUniqueId (1), positionAttributes, positionScale (1.0),
    objectShape [H, W] (required without a positionsFile), weightFile,
    probeThreshold (0.1), minCoverWeight (0.5), fill (0.0), publishRate (Hz, 2.0),
    restartWindow (64), outputDirectory, filePrefix ("stitch").
Run-time changes (control channel ``configure``)
    publishRate, fill; ``{"newScan": true}`` finishes the current image.
Statistics (status channel ``userStats``) -- see :data:`STATS`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pvaccess as pva

from edge_ptychonn.science.stitch import Stitcher, probe_weight
from edge_ptychonn.stream.arguments import (
    int_pair, integer, number, optional, path, text, text_list,
)
from processors.base import ProcessorBase, attribute_value


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
        if file.suffix == ".npz":
            with np.load(file) as z:
                if "positions_px" not in z.files:
                    raise ValueError(f"positionsFile {file} has no 'positions_px' array (has {', '.join(z.files)})")
                rows = np.asarray(z["positions_px"], dtype=np.float64)
                if "object_phase" in z.files:
                    object_shape = tuple(int(v) for v in z["object_phase"].shape)
                if "probe" in z.files:
                    probe = np.asarray(z["probe"])
        elif file.suffix == ".npy":
            rows = np.asarray(np.load(file), dtype=np.float64)
        else:
            text_ = file.read_text().replace(",", " ")
            lines = [ln for ln in text_.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            try:
                rows = np.array([[float(v) for v in ln.split()] for ln in lines], dtype=np.float64)
            except ValueError as exc:
                raise ValueError(f"positionsFile {file}: not a table of numbers ({exc})") from exc
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


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class StitchSettings:
    """Settings of the stitching processor (units in the names)."""

    positions_file: Path | None = None
    first_unique_id: int = 1
    position_attributes: tuple[str, str] = ("PosY", "PosX")
    position_scale: float = 1.0
    object_shape: tuple[int, int] | None = None
    weight_file: Path | None = None
    probe_threshold: float = 0.1
    min_cover_weight: float = 0.5
    fill: float = 0.0
    publish_rate_hz: float = 2.0
    restart_window: int = 64
    output_directory: Path | None = None
    file_prefix: str = "stitch"

    def __post_init__(self) -> None:
        if self.positions_file is None and self.object_shape is None:
            raise ValueError(
                "objectShape [H, W] is required when no positionsFile gives it "
                "(positions from attributes only)"
            )
        if self.weight_file is not None and not self.weight_file.is_file():
            raise ValueError(f"weightFile {str(self.weight_file)!r} is not a file")
        if not 0 <= self.probe_threshold < 1:
            raise ValueError(f"probeThreshold must be in [0, 1), got {self.probe_threshold}")


def _nonzero(value):
    v = number()(value)
    if v == 0:
        raise ValueError(f"must be a non-zero number, got {value!r}")
    return v


# ---------------------------------------------------------------- one scan


class _Scan:
    """The image of one scan: a Stitcher and the uniqueIds placed in it."""

    def __init__(self, index: int, stitcher: Stitcher):
        self.index = index
        self.stitcher = stitcher
        self.placed: set[int] = set()
        self.max_unique_id = 0
        self.last_unique_id = 0
        self.first_placed_s = 0.0
        self.last_placed_s = 0.0
        self.changed = False
        self.saved = False

    def place_rate_hz(self) -> float:
        n = len(self.placed)
        dt = self.last_placed_s - self.first_placed_s
        return (n - 1) / dt if n > 1 and dt > 0 else 0.0


def _stat(name):
    return lambda p: p.counts[name]


STATS = {
    "nFramesReceived": (pva.ULONG, _stat("received")),
    "nFramesPlaced": (pva.ULONG, _stat("placed")),
    "nFramesNoPosition": (pva.ULONG, _stat("no_position")),
    "nFramesOutside": (pva.ULONG, _stat("outside")),
    "nBadFrames": (pva.ULONG, _stat("bad")),
    "nEmptyFrames": (pva.ULONG, _stat("empty")),
    "nImagesPublished": (pva.ULONG, _stat("published")),
    "nScans": (pva.ULONG, lambda p: p.scan_index),
    "nScansSaved": (pva.ULONG, _stat("saved")),
    "scanFramesPlaced": (pva.ULONG, lambda p: len(p.scan.placed) if p.scan else 0),
    "coverage": (pva.DOUBLE, lambda p: p.coverage()),
    "placeRate": (pva.DOUBLE, lambda p: p.scan.place_rate_hz() if p.scan else 0.0),
    "stitchTimeUs": (pva.DOUBLE, lambda p: 1e6 * p.process_time_s / max(p.counts["received"], 1)),
    "lastUniqueId": (pva.ULONG, lambda p: p.scan.last_unique_id if p.scan else 0),
}


class StitchProcessor(ProcessorBase):
    """Places each phase frame at its scan position; publishes the object image at ``publishRate``."""

    ARGS = {
        "positionsFile": ("positions_file", optional(path())),
        "firstUniqueId": ("first_unique_id", integer(0)),
        "positionAttributes": ("position_attributes", text_list(2)),
        "positionScale": ("position_scale", _nonzero),
        "objectShape": ("object_shape", optional(int_pair(1))),
        "weightFile": ("weight_file", optional(path())),
        "probeThreshold": ("probe_threshold", number(0, 1)),
        "minCoverWeight": ("min_cover_weight", number(0)),
        "fill": ("fill", number()),
        "publishRate": ("publish_rate_hz", number(0.01, 1000)),
        "restartWindow": ("restart_window", integer(0)),
        "outputDirectory": ("output_directory", optional(path())),
        "filePrefix": ("file_prefix", text()),
    }
    SETTINGS = StitchSettings
    STATS = STATS
    RUNTIME_KEYS = ("publishRate", "fill", "newScan")

    def __init__(self, configDict: dict | None = None):
        super().__init__(configDict)
        s = self.settings
        self.table = PositionTable.load(s.positions_file, s.first_unique_id) if s.positions_file else None
        self.weight = np.load(s.weight_file) if s.weight_file else None
        if s.output_directory is not None:
            s.output_directory.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.scan: _Scan | None = None
        self.scan_index = 0
        self.counts = dict.fromkeys(
            ("received", "placed", "no_position", "outside", "bad", "empty", "published", "saved"), 0
        )
        self.process_time_s = 0.0
        self.saved_files: list[Path] = []
        self.final_channel = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._published_id = 0

    # -- the science: where a frame goes ----------------------------------------------------
    def position_of(self, unique_id: int, attributes: list) -> tuple[float, float] | None:
        """(y, x) in object pixels from the frame's attributes, else the table, else None."""
        ny, nx = self.settings.position_attributes
        y, x = attribute_value(attributes, ny), attribute_value(attributes, nx)
        if y is not None and x is not None:
            k = self.settings.position_scale
            return y * k, x * k
        if self.table is not None:
            return self.table.positions.get(unique_id)
        return None

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
            return self.weight
        probe = self.table.probe if self.table is not None else None
        if probe is not None and probe.shape == tuple(patch_shape):
            return probe_weight(probe, self.settings.probe_threshold)
        if probe is not None:
            self.count_problem("probeShape", "probe %s does not match the frames %s: using the centre window",
                               probe.shape, patch_shape)
        return None

    def _new_scan(self, patch_shape: tuple[int, int]) -> _Scan:
        self.scan_index += 1
        stitcher = Stitcher(self._object_shape(patch_shape), patch_shape, weight=self._weight(patch_shape))
        self.logger.info("scan %d: object %s, patches %s", self.scan_index, stitcher.object_shape, patch_shape)
        return _Scan(self.scan_index, stitcher)

    def _is_restart(self, scan: _Scan, unique_id: int) -> bool:
        return unique_id in scan.placed or unique_id < scan.max_unique_id - self.settings.restart_window

    def add_frame(self, unique_id: int, image: np.ndarray, attributes: list) -> bool:
        """Place one frame (called by ``process()``; usable without PvaPy). True if placed."""
        position = self.position_of(unique_id, attributes)
        with self.lock:
            scan = self.scan
            if scan is not None and self._is_restart(scan, unique_id):
                self._finish_locked(publish=True)
                scan = None
            elif scan is not None and image.shape != scan.stitcher.patch_shape:
                self.counts["bad"] += 1
                self.count_problem("shape", "frame %d is %s, the scan's frames are %s: not placed",
                                   unique_id, image.shape, scan.stitcher.patch_shape)
                return False
            if position is None:
                self.counts["no_position"] += 1
                self.count_problem("noPosition", "frame %d has no position (no attributes %s, not in the positions file)",
                                   unique_id, "/".join(self.settings.position_attributes))
                if scan is not None:
                    scan.max_unique_id = max(scan.max_unique_id, unique_id)
                return False
            if scan is None:
                scan = self.scan = self._new_scan(image.shape)
            now = time.monotonic()
            scan.max_unique_id = max(scan.max_unique_id, unique_id)
            scan.last_unique_id = unique_id
            if not scan.stitcher.add(image, position):
                self.counts["outside"] += 1
                self.count_problem("outside", "frame %d at %s misses the object %s", unique_id, position,
                                   scan.stitcher.object_shape)
                return False
            scan.placed.add(unique_id)
            if len(scan.placed) == 1:
                scan.first_placed_s = now
            scan.last_placed_s = now
            scan.changed = True
            self.counts["placed"] += 1
            return True

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
        scan = self.scan
        self.scan = None
        if scan is None or not scan.placed:
            return
        image = scan.stitcher.image(self.settings.fill)
        if publish:
            self._publish(image, scan)
            self._publish_final(image, scan)
        self._save(image, scan)

    def _save(self, image: np.ndarray, scan: _Scan) -> None:
        if scan.saved or self.settings.output_directory is None:
            return
        scan.saved = True
        stem = self.settings.output_directory / f"{self.settings.file_prefix}_scan{scan.index:04d}"
        try:
            np.save(f"{stem}.npy", image)
            np.save(f"{stem}_weight.npy", scan.stitcher.weight_sum().astype(np.float32))
        except OSError as exc:
            self.count_problem("save", "cannot save %s: %s", stem, exc)
            return
        self.saved_files.append(Path(f"{stem}.npy"))
        self.counts["saved"] += 1
        self.logger.info("scan %d: %d frames placed, saved %s.npy", scan.index, len(scan.placed), stem)

    def finish_scan(self, publish: bool = True) -> None:
        """Finish the current image (published, saved); the next frame starts a new one."""
        with self.lock:
            self._finish_locked(publish)

    # -- publishing ---------------------------------------------------------------------------
    def _encode(self, image: np.ndarray, scan: _Scan, unique_id: int) -> pva.PvObject:
        pv = self.generateNtNdArray2D(unique_id, np.ascontiguousarray(image, dtype=np.float32))
        t = time.time()
        pv["timeStamp"] = {"secondsPastEpoch": int(t), "nanoseconds": int((t % 1) * 1e9)}
        pv["dataTimeStamp"] = pv["timeStamp"]
        covered = float(scan.stitcher.covered(self.settings.min_cover_weight).mean())
        pv["attribute"] = [
            pva.NtAttribute("ColorMode", pva.PvInt(0)),
            pva.NtAttribute("ScanIndex", pva.PvInt(scan.index)),
            pva.NtAttribute("FramesPlaced", pva.PvInt(len(scan.placed))),
            pva.NtAttribute("Coverage", pva.PvDouble(covered)),
            pva.NtAttribute("LastUniqueId", pva.PvInt(scan.last_unique_id)),
        ]
        return pv

    def _publish(self, image: np.ndarray, scan: _Scan) -> None:
        self._published_id += 1
        self.updateOutputChannel(self._encode(image, scan, self._published_id))
        scan.changed = False
        self.counts["published"] += 1

    def _publish_final(self, image: np.ndarray, scan: _Scan) -> None:
        if not self.final_channel or self.pvaServer is None:
            return
        try:
            self.pvaServer.update(self.final_channel, self._encode(image, scan, scan.index))
        except pva.PvaException as exc:
            self.count_problem("publishFinal", "cannot update %s: %s", self.final_channel, exc)

    def _publish_loop(self) -> None:
        while not self._stop.wait(1.0 / self.settings.publish_rate_hz):
            with self.lock:
                scan = self.scan
                if scan is None or not scan.changed:
                    continue
                image = scan.stitcher.image(self.settings.fill)
                self._publish(image, scan)

    # -- PvaPy lifecycle ----------------------------------------------------------------------
    def start(self):
        if self.outputChannel and self.pvaServer is not None:
            self.final_channel = f"{self.outputChannel}:final"
            try:
                self.pvaServer.addRecord(self.final_channel, pva.NtNdArray(), None)
            except pva.PvaException as exc:
                self.count_problem("publishFinal", "cannot add %s: %s", self.final_channel, exc)
                self.final_channel = ""
        self._stop.clear()
        self._thread = threading.Thread(target=self._publish_loop, name="stitch-publisher", daemon=True)
        self._thread.start()

    def stop(self):
        # What is published inside stop() reaches no client (PvaPy stops its server
        # first): the finished image goes to disk.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self.finish_scan(publish=False)

    def process(self, pvObject):
        t0 = time.perf_counter()
        frame = self.decode_frame(pvObject)
        if frame is None:
            return None
        meta, image = frame
        self.counts["received"] += 1
        self.add_frame(meta.unique_id, image, meta.attributes)
        self.process_time_s += time.perf_counter() - t0
        return None

    def new_scan(self) -> None:
        self.finish_scan(publish=True)

    def resetStats(self):
        super().resetStats()
        with self.lock:
            for k in self.counts:
                self.counts[k] = 0
            self.process_time_s = 0.0
