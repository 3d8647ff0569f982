"""PvaPy processor: write every frame of a channel into HDF5 files that a reader can follow (SWMR).

Usage (one writer per inference consumer: ``*`` is the consumer id)::

    pvapy-hpc-consumer -dc --input-channel 'inference:*:output' --n-consumers 2 \\
        --status-channel 'hdf5:*:status' --control-channel 'hdf5:*:control' \\
        --server-queue-size 1000 --skip-initial-updates 0 \\
        --processor-class processors.hdf5_writer.Hdf5WriterProcessor \\
        --processor-args '{"outputDirectory": "results/h5", "compression": "gzip",
                          "modelCard": "data/ptychonn.json"}'

It also runs inside ``pvapy-hpc-collector`` (one file for all consumers, in
uniqueId order). Unlike PvaPy's ``Hdf5AdImageWriter`` it keeps each frame's
uniqueId, time stamps and positions, and a partial file holds exactly the
frames received (datasets grow; no zero padding).

Input
    NTNDArray frames: 2-D images (h, w) of any numeric pixel type (float32
    phase from ``PtychoNNProcessor``), with ``uniqueId``, ``timeStamp``,
    ``dataTimeStamp`` and attributes. Frames with no image data (the empty
    record a monitor gets on connect) are ignored.
Output
    No channel. Files ``<outputDirectory>/<fileNameFormat>``, one per consumer
    (``processorId``) and scan (an existing file is never replaced: the new one
    gets ``-2``, ``-3``, ... before the extension), with (n = frames written so far):

    ``data``           (n, h, w) the images, pixel type of the input; chunks
                       (``chunkFrames``, h, w), optionally compressed
    ``uniqueId``       (n,) int64
    ``timeStamp``      (n,) float64, seconds past the epoch (``timeStamp``)
    ``dataTimeStamp``  (n,) float64, seconds past the epoch (``dataTimeStamp``)
    ``positions``      (n, 2) float64 (y, x) from the ``positionAttributes``,
                       NaN where a frame has none; present only when the scan's
                       first frame has them
    attributes         ``processorSettings`` (JSON of the processor arguments),
                       ``inputChannel``, ``processorId``, ``scan``, ``created``,
                       ``modelCard`` (text of ``modelCard``) and ``modelCardPath``

    The file is in SWMR mode: ``h5py.File(path, "r", libver="latest",
    swmr=True)`` follows it while it grows (``refresh()`` each dataset). It is
    built as ``.<name>.<host>.<pid>.part`` and appears under its name once a reader can
    open it; at start the writer removes such files that killed writers of this host left.
    ``uniqueId`` is written last in each block, so its length is the number of
    complete frames. Flushed every ``flushPeriod`` seconds, closed at stop and
    at a new scan.
Scans
    A frame whose uniqueId was already written to the current file, or lies
    more than ``restartWindow`` below its highest uniqueId, starts a new file;
    so does ``configure {"newScan": true}`` on the control channel.
Processor arguments (``--processor-args`` JSON) -- see ``Hdf5WriterProcessor.ARGS``
    outputDirectory (required); fileNameFormat (default
    ``"{channel}_scan{scan:04d}.h5"``; fields ``channel`` (input channel, ``:``
    -> ``_``), ``processorId``, ``scan``, ``time`` (YYYYmmdd-HHMMSS));
    compression ('none', 'gzip', 'lzf'; with hdf5plugin installed also 'blosc',
    'lz4', 'zstd', 'bitshuffle'); compressionLevel (gzip 0..9); chunkFrames
    (16); flushPeriod (s, 1.0); queueFrames (frames waiting for the writer
    thread, 10000; then ``process()`` waits); modelCard (path); positionAttributes
    (["PosY", "PosX"]); restartWindow (64).
Run-time changes (control channel ``configure``)
    flushPeriod; ``{"newScan": true}`` closes the current file.
Statistics (status channel ``userStats``) -- see :data:`STATS`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pvaccess as pva

from edge_ptychonn.files import remove_stale_partials, unused_stem, whole_file
from edge_ptychonn.stream.arguments import (
    choice, integer, number, optional, path, text, text_list,
)
from processors.base import ProcessorBase, attribute_value, seconds

COMPRESSIONS = ("none", "gzip", "lzf", "blosc", "lz4", "zstd", "bitshuffle")
_PLUGIN = {"blosc": "Blosc", "lz4": "LZ4", "zstd": "Zstd", "bitshuffle": "Bitshuffle"}


def _h5py():
    try:
        import h5py
    except ImportError as exc:
        raise ValueError("the HDF5 writer needs h5py: pip install 'edge-ptychonn[hdf5]'") from exc
    return h5py


def _compression_options(name: str, level: int | None) -> dict:
    if name == "none":
        return {}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4 if level is None else level}
    if name == "lzf":
        return {"compression": "lzf"}
    try:
        import hdf5plugin
    except ImportError as exc:
        raise ValueError(f"compression {name!r} needs hdf5plugin: pip install 'edge-ptychonn[hdf5]' hdf5plugin") from exc
    return dict(getattr(hdf5plugin, _PLUGIN[name])())


@dataclass(frozen=True)
class Hdf5Settings:
    """Settings of the HDF5 writer (units in the names)."""

    output_directory: Path | None = None
    file_name_format: str = "{channel}_scan{scan:04d}.h5"
    compression: str = "none"
    compression_level: int | None = None
    chunk_frames: int = 16
    flush_period_s: float = 1.0
    queue_frames: int = 10000
    model_card: Path | None = None
    position_attributes: tuple[str, str] = ("PosY", "PosX")
    restart_window: int = 64

    def __post_init__(self) -> None:
        if self.output_directory is None:
            raise ValueError("outputDirectory is required: the folder for the HDF5 files")
        if self.model_card is not None and not self.model_card.is_file():
            raise ValueError(f"modelCard {str(self.model_card)!r} is not a file")
        if self.compression_level is not None and self.compression != "gzip":
            raise ValueError("compressionLevel applies to compression 'gzip' only")
        try:
            self.file_name_format.format(channel="c", processorId=1, scan=1, time="t")
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(
                f"fileNameFormat {self.file_name_format!r} is invalid ({exc}); fields: channel, processorId, scan, time"
            ) from exc


@dataclass
class _Frame:
    unique_id: int
    image: np.ndarray
    time_stamp_s: float
    data_time_stamp_s: float
    position: tuple[float, float] | None


_NEW_SCAN = object()
_STOP = object()


class _ScanFile:
    """One open SWMR file and its growing datasets."""

    def __init__(self, h5py, file: Path, first: _Frame, settings: Hdf5Settings, attrs: dict):
        self.path = file
        # Built under a hidden name and renamed once in SWMR mode: a reader that sees the
        # file's name can open it (before SWMR mode the writer holds an exclusive lock).
        with whole_file(file, replace=False) as partial:
            self.f = h5py.File(partial, "w", libver="latest")
            try:
                self._create(first, settings, attrs)
            except BaseException:
                self.f.close()
                raise
        self.shape = first.image.shape
        self.dtype = first.image.dtype
        self.n = 0
        self.unique_ids: set[int] = set()
        self.max_unique_id = 0

    def _create(self, first: _Frame, settings: Hdf5Settings, attrs: dict) -> None:
        h, w = first.image.shape
        chunk = max(1, settings.chunk_frames)
        opts = _compression_options(settings.compression, settings.compression_level)
        self.data = self.f.create_dataset("data", (0, h, w), dtype=first.image.dtype, maxshape=(None, h, w),
                                          chunks=(chunk, h, w), **opts)
        self.ts = self.f.create_dataset("timeStamp", (0,), dtype="f8", maxshape=(None,), chunks=(max(chunk, 256),))
        self.dts = self.f.create_dataset("dataTimeStamp", (0,), dtype="f8", maxshape=(None,), chunks=(max(chunk, 256),))
        self.pos = None
        if first.position is not None:
            self.pos = self.f.create_dataset("positions", (0, 2), dtype="f8", maxshape=(None, 2), chunks=(max(chunk, 256), 2))
        self.ids = self.f.create_dataset("uniqueId", (0,), dtype="i8", maxshape=(None,), chunks=(max(chunk, 256),))
        for key, value in attrs.items():
            self.f.attrs[key] = value
        self.f.swmr_mode = True  # every dataset exists: readers may open the file now

    def append(self, frames: list[_Frame]) -> None:
        n0, n1 = self.n, self.n + len(frames)
        self.data.resize(n1, axis=0)
        self.data[n0:n1] = np.stack([f.image for f in frames])
        for ds, values in ((self.ts, [f.time_stamp_s for f in frames]), (self.dts, [f.data_time_stamp_s for f in frames])):
            ds.resize((n1,))
            ds[n0:n1] = values
        if self.pos is not None:
            self.pos.resize((n1, 2))
            self.pos[n0:n1] = [f.position if f.position is not None else (np.nan, np.nan) for f in frames]
        self.ids.resize((n1,))  # last: its length counts the complete frames
        self.ids[n0:n1] = [f.unique_id for f in frames]
        self.n = n1

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


STATS = {
    "nFramesReceived": (pva.ULONG, lambda p: p.counts["received"]),
    "nFramesWritten": (pva.ULONG, lambda p: p.counts["written"]),
    "nFramesQueued": (pva.ULONG, lambda p: p.queue.qsize()),
    "nFramesLost": (pva.ULONG, lambda p: p.counts["lost"]),
    "nBadFrames": (pva.ULONG, lambda p: p.counts["bad"]),
    "nEmptyFrames": (pva.ULONG, lambda p: p.counts["empty"]),
    "nFilesWritten": (pva.ULONG, lambda p: p.counts["files"]),
    "nWriteErrors": (pva.ULONG, lambda p: p.counts["write_errors"]),
    "writeRate": (pva.DOUBLE, lambda p: p.write_rate_hz()),
    "writeTimeUs": (pva.DOUBLE, lambda p: 1e6 * p.write_time_s / max(p.counts["written"], 1)),
    "currentFile": (pva.STRING, lambda p: str(p.current.path) if p.current else ""),
}


class Hdf5WriterProcessor(ProcessorBase):
    """Queues each frame; a writer thread appends blocks to the scan's SWMR file."""

    ARGS = {
        "outputDirectory": ("output_directory", path()),
        "fileNameFormat": ("file_name_format", text()),
        "compression": ("compression", choice(*COMPRESSIONS)),
        "compressionLevel": ("compression_level", optional(integer(0, 9))),
        "chunkFrames": ("chunk_frames", integer(1, 4096)),
        "flushPeriod": ("flush_period_s", number(0.01, 3600)),
        "queueFrames": ("queue_frames", integer(1, 10_000_000)),
        "modelCard": ("model_card", optional(path())),
        "positionAttributes": ("position_attributes", text_list(2)),
        "restartWindow": ("restart_window", integer(0)),
    }
    SETTINGS = Hdf5Settings
    STATS = STATS
    RUNTIME_KEYS = ("flushPeriod", "newScan")

    def __init__(self, configDict: dict | None = None):
        super().__init__(configDict)
        self.h5py = _h5py()
        _compression_options(self.settings.compression, self.settings.compression_level)  # fail early
        self.settings.output_directory.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.settings.output_directory, self.logger)
        self.user_args = {k: v for k, v in (configDict or {}).items() if k in self.ARGS}
        self.queue: queue.Queue = queue.Queue(maxsize=self.settings.queue_frames)
        self.counts = dict.fromkeys(("received", "written", "lost", "bad", "empty", "files", "write_errors"), 0)
        self.write_time_s = 0.0
        self.first_write_s = self.last_write_s = 0.0
        self.current: _ScanFile | None = None
        self.scan = 0
        self.files: list[Path] = []
        self._thread: threading.Thread | None = None

    # -- files ----------------------------------------------------------------------------
    def _channel(self) -> str:
        channel = self.inputChannel or self.framework.get("inputChannel", "") or "input"
        return channel.replace(":", "_").replace("*", str(self.processor_id)).replace("/", "_")

    def _open(self, first: _Frame) -> None:
        self.scan += 1
        s = self.settings
        name = s.file_name_format.format(channel=self._channel(), processorId=self.processor_id, scan=self.scan,
                                         time=time.strftime("%Y%m%d-%H%M%S"))
        attrs = {
            "processorSettings": json.dumps(self.user_args, default=str),
            "inputChannel": self.inputChannel or self.framework.get("inputChannel", "") or "",
            "processorId": self.processor_id,
            "scan": self.scan,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if s.model_card is not None:
            attrs["modelCard"] = s.model_card.read_text(errors="replace")
            attrs["modelCardPath"] = str(s.model_card.resolve())
        # an earlier run's file of the same name is kept: this one gets "-2", "-3", ...
        path = s.output_directory / name
        stem = unused_stem(path.with_name(path.stem), (path.suffix,))
        path = stem.with_name(stem.name + path.suffix)
        self.current = _ScanFile(self.h5py, path, first, s, attrs)
        self.files.append(self.current.path)
        self.logger.info("writing %s", self.current.path)

    def _close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.counts["files"] += 1
            self.logger.info("closed %s with %d frames", self.current.path, self.current.n)
            self.current = None

    def _is_restart(self, frame: _Frame) -> bool:
        cur = self.current
        return cur is not None and (
            frame.unique_id in cur.unique_ids or frame.unique_id < cur.max_unique_id - self.settings.restart_window
        )

    def _write(self, frames: list[_Frame]) -> None:
        """Append frames to the current file (new files at restarts)."""
        block: list[_Frame] = []
        for frame in frames:
            cur = self.current
            if cur is not None and self._is_restart(frame):
                self._append(block)
                block = []
                self._close()
                cur = None
            if cur is not None and (frame.image.shape != cur.shape or frame.image.dtype != cur.dtype):
                self.counts["bad"] += 1
                self.count_problem("shape", "frame %d is %s %s, the file holds %s %s: not written", frame.unique_id,
                                   frame.image.shape, frame.image.dtype, cur.shape, cur.dtype)
                continue
            if cur is None:
                try:
                    self._open(frame)
                except (OSError, ValueError) as exc:
                    self.counts["write_errors"] += 1
                    self.counts["lost"] += 1
                    self.count_problem("open", "cannot create the HDF5 file: %s", exc)
                    continue
                cur = self.current
            cur.unique_ids.add(frame.unique_id)
            cur.max_unique_id = max(cur.max_unique_id, frame.unique_id)
            block.append(frame)
        self._append(block)

    def _append(self, block: list[_Frame]) -> None:
        if not block or self.current is None:
            return
        t0 = time.perf_counter()
        try:
            self.current.append(block)
        except (OSError, ValueError, RuntimeError) as exc:
            self.counts["write_errors"] += 1
            self.counts["lost"] += len(block)
            self.count_problem("write", "cannot write to %s: %s", self.current.path, exc)
            return
        now = time.monotonic()
        if not self.counts["written"]:
            self.first_write_s = now
        self.last_write_s = now
        self.counts["written"] += len(block)
        self.write_time_s += time.perf_counter() - t0

    def write_rate_hz(self) -> float:
        dt = self.last_write_s - self.first_write_s
        return (self.counts["written"] - 1) / dt if self.counts["written"] > 1 and dt > 0 else 0.0

    # -- the writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        last_flush = time.monotonic()
        done = False
        while not done:
            timeout = max(0.01, self.settings.flush_period_s - (time.monotonic() - last_flush))
            items = []
            try:
                items.append(self.queue.get(timeout=timeout))
                while len(items) < self.settings.chunk_frames:
                    items.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            frames: list[_Frame] = []
            for item in items:
                if isinstance(item, _Frame):
                    frames.append(item)
                    continue
                self._write(frames)
                frames = []
                if item is _NEW_SCAN:
                    self._close()
                elif item is _STOP:
                    done = True
            self._write(frames)
            if self.current is not None and (done or time.monotonic() - last_flush >= self.settings.flush_period_s):
                try:
                    self.current.flush()
                except (OSError, RuntimeError) as exc:
                    self.count_problem("flush", "cannot flush %s: %s", self.current.path, exc)
                last_flush = time.monotonic()
        self._close()

    # -- PvaPy lifecycle ----------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(target=self._run, name="hdf5-writer", daemon=True)
        self._thread.start()

    def stop(self):
        if self._thread is None:
            return
        self.queue.put(_STOP)
        self._thread.join(10.0)
        if self._thread.is_alive():
            self.logger.error("the HDF5 writer did not finish within 10 s; %s may lack its last frames", self.current and self.current.path)
        self._thread = None

    def process(self, pvObject):
        frame = self.decode_frame(pvObject)
        if frame is None:
            return None
        meta, image = frame
        ny, nx = self.settings.position_attributes
        y, x = attribute_value(meta.attributes, ny), attribute_value(meta.attributes, nx)
        frame = _Frame(
            meta.unique_id, np.array(image, copy=True), seconds(meta.time_stamp), seconds(meta.data_time_stamp),
            (y, x) if y is not None and x is not None else None,
        )
        self.counts["received"] += 1
        self.queue.put(frame)  # blocks when full: backpressure into the PVA server queue
        return None

    def new_scan(self) -> None:
        self.queue.put(_NEW_SCAN)

    def resetStats(self):
        super().resetStats()
        for k in self.counts:
            self.counts[k] = 0
        self.write_time_s = 0.0
