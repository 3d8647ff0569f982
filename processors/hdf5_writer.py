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
frames written (datasets grow; no zero padding).

Input
    NTNDArray frames: 2-D images (h, w) of any numeric pixel type (float32
    phase from ``PtychoNNProcessor``), with ``uniqueId``, ``timeStamp``,
    ``dataTimeStamp`` and attributes (the position attributes, and the string
    ``modelId`` that ``PtychoNNProcessor`` puts on each output). Frames with no
    image data (the empty record a monitor gets on connect) are ignored. Float
    pixels are written as they are, NaN and infinite ones too (a detector's masked
    pixels): the inference consumers refuse such frames, a recorder does not.
Output
    No channel. Files ``<outputDirectory>/<fileNameFormat>``, one per consumer
    (``processorId``) and scan (an existing file is never replaced: the new one
    gets ``-2``, ``-3``, ... before the extension), with (n = frames appended so
    far: ``nFramesWritten`` + ``nFramesUnflushed``):

    ``data``           (n, h, w) the images, pixel type of the input; chunks
                       (``chunkFrames``, h, w), optionally compressed
    ``uniqueId``       (n,) int64
    ``timeStamp``      (n,) float64, seconds past the epoch (``timeStamp``)
    ``dataTimeStamp``  (n,) float64, seconds past the epoch (``dataTimeStamp``)
    ``positions``      (n, 2) float64 (y, x) from the ``positionAttributes``,
                       NaN where a frame has none (all NaN when no frame has)
    ``modelId``        (n,) UTF-8 strings of at most 256 bytes (fixed length: SWMR
                       cannot hold variable-length data; ``f["modelId"].asstr()[:]``
                       reads them as str): the frame's ``modelId`` attribute, which
                       model made it (``ptychonn sha256:1a2b3c4d5e6f``; it changes at
                       a live model swap); ``""`` where a frame has none (raw
                       detector frames). A longer id keeps its end (the digest),
                       after ``…``
    attributes         ``processorSettings`` (JSON of the processor arguments),
                       ``inputChannel``, ``processorId``, ``scan``, ``created``,
                       ``modelCard`` (text of the ``modelCard`` file, read once at
                       start: the card given then, which a live model swap does not
                       change; ``modelId`` says which model made each frame) and
                       ``modelCardPath``

    The file is in SWMR mode: ``h5py.File(path, "r", libver="latest",
    swmr=True)`` follows it while it grows (``refresh()`` each dataset). It is
    built as ``.<name>.<host>.<pid>.part`` and appears under its name once a reader can
    open it; at start the writer removes such files that killed writers of this host left.
    ``uniqueId`` is written last in each block, so its length is the number of
    complete frames. Flushed every ``flushPeriod`` seconds, closed at stop and
    at a new scan.
Write errors (a full disk, a lost file server)
    The writer thread never stops on an error. A failed write or flush gives the
    file up: it is cut back to the frames confirmed by its last successful flush
    and closed (best effort), the frames appended since then count as lost, and
    the next frames go to a new file of the same scan (``<name>-2.h5``, ...),
    created no sooner than ``flushPeriod`` after the error (frames arriving
    before that count as lost too). A frame for which no file can be created is
    lost the same way. A failed close (at a new scan or at stop) counts the
    frames appended since the last flush as lost, though the file may hold them.
    A file whose close failed stays marked as open for writing (read it with
    ``swmr=True``, or ``h5clear -s`` it) and half closed inside libhdf5, which would
    crash the process releasing it: it is kept, and the process ends with status 1
    past libhdf5's clean-up (:func:`_keep_unclosed`).
    Every failed create, write, flush or close counts once in ``nWriteErrors``;
    each kind is logged the first time it occurs.
Backpressure and stop
    ``process()`` waits at most ``queueTimeout`` for room in the queue; a frame
    that finds none, or finds the writer thread gone, is lost (``nLostNotQueued``)
    and later frames do not wait until the queue takes one again: PvaPy's monitor
    thread is never held longer. ``newScan`` waits the same and then fails.
    ``stop()`` gives the writer 10 s to write what is queued and close the file;
    frames it did not take from the queue, and frames received after ``stop()``,
    are lost (``nLostStopping``); a frame a hung writer holds stays queued. At the
    process's exit a writer still running gets 10 s more to write the frames in its
    hands and close the file; then the process ends with status 1, its file left as
    a killed writer's (``EXIT_WAIT_S``).
Scans
    A frame whose uniqueId was already received in this scan, or lies more than
    ``restartWindow`` below the scan's highest uniqueId, starts a new file;
    so does ``configure {"newScan": true}`` on the control channel.
Processor arguments (``--processor-args`` JSON) -- see ``Hdf5WriterProcessor.ARGS``
    outputDirectory (required); fileNameFormat (default
    ``"{channel}_scan{scan:04d}.h5"``; fields ``channel`` (input channel, ``:``
    -> ``_``), ``processorId``, ``scan``, ``time`` (YYYYmmdd-HHMMSS); a file name,
    no ``/``, at most 253 bytes once formatted, else refused at start);
    compression ('none', 'gzip', 'lzf'; with hdf5plugin installed also 'blosc',
    'lz4', 'zstd', 'bitshuffle'); compressionLevel (gzip 0..9); chunkFrames
    (16); flushPeriod (s, 1.0); queueFrames (frames waiting for the writer
    thread, 10000; then ``process()`` waits); queueTimeout (s, 5.0: the longest
    such wait, 0..60); modelCard (path of a text file, read once at start: the
    card of the model given then; the ``modelId`` dataset names each frame's);
    positionAttributes (["PosY", "PosX"]); restartWindow (64).
Run-time changes (control channel ``configure``)
    flushPeriod (applies at once); ``{"newScan": true}`` closes the current file. A refused
    request changes nothing, PvaPy's own keys included; PvaPy's skipInitialUpdates (other
    than 0) is refused.
Statistics (status channel ``userStats``) -- see :data:`STATS`
    ``nFramesReceived`` counts the frames with an image; each is in exactly one of
    ``nFramesWritten`` (in its file, confirmed by a successful flush or close after
    it was appended: handed to the operating system, not fsync'ed),
    ``nFramesUnflushed`` (appended, confirmed at the next flush, within
    ``flushPeriod``), ``nFramesQueued`` (waiting for the writer thread or in its
    hands), ``nFramesLost`` = ``nLostWriteError`` + ``nLostNotQueued`` +
    ``nLostStopping`` (see above), or ``nFramesWrongShape`` (shape or pixel type
    differs from the current file's; also in ``nBadFrames``). All are read under
    one lock, so ``nFramesUnaccounted`` (received minus the five) is always 0.
    Also: ``nBadFrames`` (undecodable or wrong shape; the undecodable by kind: ``nBadShape``,
    ``nBadColour``, ``nBadEmpty``, ``nBadDtype``, ``nBadCodec``, ``nBadMalformed``; the
    inference consumer's ``nBadNonfinite`` is always 0 here: such frames are written), ``nEmptyFrames``,
    ``nFilesWritten`` (files closed without error, one cut back after a write
    error included), ``nWriteErrors``, ``writeRate`` (frames appended per second),
    ``writeTimeUs`` (per frame appended), ``currentFile``, ``settings`` (JSON of the settings
    in force that ``configure`` can change: ``flushPeriod``).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pvaccess as pva

from edge_ptychonn.files import NAME_MAX, check_folder, remove_stale_partials, unused_stem, whole_file
from edge_ptychonn.stream.arguments import (
    choice, integer, number, optional, path, text, text_list,
)
from edge_ptychonn.stream.frames import MODEL_ID_ATTRIBUTE
from edge_ptychonn.stream.quote import short_repr
from edge_ptychonn.thread_name import name_this_thread
from processors import shutdown
from processors.base import (
    BAD_KIND_COUNTS, RECENT_FILES, ProcessorBase, RecentIds, at_start, attribute_raw, attribute_value, bad_kind_stats,
    calling_controller, data_source, reset_with_source, restore_on_refusal, seconds,
)

NAME_ATTEMPTS = 5  # free names tried when other processes take them as this one opens a file
COMPRESSIONS = ("none", "gzip", "lzf", "blosc", "lz4", "zstd", "bitshuffle")
_PLUGIN = {"blosc": "Blosc", "lz4": "LZ4", "zstd": "Zstd", "bitshuffle": "Bitshuffle"}
MODEL_ID_BYTES = 256  # the modelId dataset's fixed length (UTF-8)
_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 bytes that continue a character


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
        raise ValueError(f"compression {name!r} needs hdf5plugin: pip install 'edge-ptychonn[hdf5]'") from exc
    return dict(getattr(hdf5plugin, _PLUGIN[name])())


def frame_attributes(attributes: list, y_name: str, x_name: str) -> tuple[tuple[float, float] | None, str]:
    """A frame's (y, x) position (None unless both attributes are numbers) and its ``modelId``
    (``""`` when it has none or it is not a string), from its attribute list (as
    :func:`edge_ptychonn.stream.frames.decode` gives it; the first attribute of a name counts)."""
    y, x = attribute_value(attributes, y_name), attribute_value(attributes, x_name)
    model_id = attribute_raw(attributes, MODEL_ID_ATTRIBUTE)
    return (y, x) if y is not None and x is not None else None, model_id if isinstance(model_id, str) else ""


def model_id_bytes(model_id: str) -> bytes:
    """``model_id`` as the ``modelId`` dataset holds it: UTF-8, at most :data:`MODEL_ID_BYTES`
    bytes; a longer one keeps its end (the model file's digest) after ``…``, cut between characters."""
    raw = model_id.encode("utf-8", "replace")
    if len(raw) <= MODEL_ID_BYTES:
        return raw
    ellipsis = "…".encode()
    return ellipsis + raw[len(raw) - MODEL_ID_BYTES + len(ellipsis):].lstrip(_CONTINUATION)


def read_model_card(card: Path) -> str:
    """The text of the ``modelCard`` file, else ``ValueError``. One that cannot be stored as an
    HDF5 string attribute (NUL characters: a binary or UTF-16 file) failed every file's
    creation, and so lost every frame of the run."""
    if not card.is_file():
        raise ValueError(f"modelCard {str(card)!r} is not a file")
    try:
        text_ = card.read_text(errors="replace")
    except OSError as exc:
        raise ValueError(f"modelCard {str(card)!r} cannot be read: {exc}") from None
    if "\0" in text_:
        raise ValueError(f"modelCard {str(card)!r} is not a text file (it holds NUL characters: binary, or "
                         "UTF-16); give the model's .json card")
    return text_


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
    queue_timeout_s: float = 5.0
    model_card: Path | None = None
    position_attributes: tuple[str, str] = ("PosY", "PosX")
    restart_window: int = 64

    def __post_init__(self) -> None:
        if self.output_directory is None:
            raise ValueError("outputDirectory is required: the folder for the HDF5 files")
        if self.compression_level is not None and self.compression != "gzip":
            raise ValueError("compressionLevel applies to compression 'gzip' only")
        try:
            name = self.file_name_format.format(channel="c", processorId=1, scan=1, time="t")
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(
                f"fileNameFormat {self.file_name_format!r} is invalid ({exc}); fields: channel, processorId, scan, time"
            ) from exc
        if "/" in name or "\0" in name or name in ("", ".", ".."):  # NUL: no file can have that name
            raise ValueError(f"fileNameFormat {self.file_name_format!r} must name a file in outputDirectory "
                             "(no '/' or NUL; give the folder as outputDirectory)")
        if at_start():  # not again at a run-time change: the files were read at start
            self.check_files()

    def check_files(self) -> None:
        """The folder and the model card (``ValueError``), checked at start only (:func:`at_start`)."""
        try:  # made at start if missing
            check_folder(self.output_directory)
        except OSError as exc:
            raise ValueError(f"outputDirectory {str(self.output_directory)!r} cannot be used: {exc}") from None
        if self.model_card is not None:
            read_model_card(self.model_card)


@dataclass
class _Frame:
    unique_id: int
    image: np.ndarray
    time_stamp_s: float
    data_time_stamp_s: float
    position: tuple[float, float] | None
    model_id: str = ""  # the frame's modelId attribute ("": none)


_NEW_SCAN = object()
_STOP = object()
_WAKE = object()  # a new flushPeriod: the writer recomputes its wait (it may be asleep for the old one)
STOP_TIMEOUT_S = 10.0  # stop(): how long the writer may take to write what is queued
EXIT_WAIT_S = 10.0  # at exit: how much longer a writer that stop() left running may take to close its file
LOSS_CAUSES = ("writeError", "notQueued", "stopping")  # nLost<Cause>; their sum is nFramesLost


class _ScanFile:
    """One open SWMR file and its growing datasets."""

    def __init__(self, h5py, file: Path, first: _Frame, settings: Hdf5Settings, attrs: dict):
        self.path = file
        self.f = None
        self.model_id_dtype = h5py.string_dtype("utf-8", MODEL_ID_BYTES)
        # Built under a hidden name and renamed once in SWMR mode: a reader that sees the
        # file's name can open it (before SWMR mode the writer holds an exclusive lock).
        try:
            with whole_file(file, replace=False) as partial:
                self.f = h5py.File(partial, "w", libver="latest")
                self._create(first, settings, attrs)
        except BaseException:
            if self.f is not None:
                try:
                    self.f.close()
                except Exception:  # a second symptom: the error that stopped the creation is raised and counted
                    pass
            raise
        self.shape = first.image.shape
        self.dtype = first.image.dtype
        self.n = 0  # frames appended
        self.confirmed = 0  # frames appended before the last successful flush

    def _create(self, first: _Frame, settings: Hdf5Settings, attrs: dict) -> None:
        h, w = first.image.shape
        chunk = max(1, settings.chunk_frames)
        opts = _compression_options(settings.compression, settings.compression_level)
        self.data = self.f.create_dataset("data", (0, h, w), dtype=first.image.dtype, maxshape=(None, h, w),
                                          chunks=(chunk, h, w), **opts)
        self.ts = self.f.create_dataset("timeStamp", (0,), dtype="f8", maxshape=(None,), chunks=(max(chunk, 256),))
        self.dts = self.f.create_dataset("dataTimeStamp", (0,), dtype="f8", maxshape=(None,), chunks=(max(chunk, 256),))
        # always: no dataset can be made once in SWMR mode, and any frame may carry a position
        self.pos = self.f.create_dataset("positions", (0, 2), dtype="f8", maxshape=(None, 2), chunks=(max(chunk, 256), 2))
        # fixed length: SWMR cannot hold variable-length data (the global heap)
        self.models = self.f.create_dataset("modelId", (0,), dtype=self.model_id_dtype,
                                            maxshape=(None,), chunks=(max(chunk, 256),))
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
        self.pos.resize((n1, 2))
        self.pos[n0:n1] = [f.position if f.position is not None else (np.nan, np.nan) for f in frames]
        self.models.resize((n1,))
        self.models[n0:n1] = np.array([model_id_bytes(f.model_id) for f in frames], dtype=self.model_id_dtype)
        self.ids.resize((n1,))  # last: its length counts the complete frames
        self.ids[n0:n1] = [f.unique_id for f in frames]
        self.n = n1

    def flush(self) -> None:
        self.f.flush()
        self.confirmed = self.n

    def datasets(self) -> tuple:
        """Every dataset, ``uniqueId`` first (its length counts the complete frames)."""
        return self.ids, self.data, self.ts, self.dts, self.pos, self.models

    def truncate_to_confirmed(self) -> None:
        """Shrink every dataset to the confirmed frames (``uniqueId`` first)."""
        for ds in self.datasets():
            ds.resize(self.confirmed, axis=0)
        self.n = self.confirmed

    def close(self) -> None:
        try:
            self.f.close()
        except Exception:
            _keep_unclosed(self)
            raise
        self.confirmed = self.n


_UNCLOSED: list[_ScanFile] = []  # files whose close failed: libhdf5 still holds them, half closed


def _keep_unclosed(scan_file: _ScanFile) -> None:
    """A file whose close failed (after a write error that left data it can never write: the
    file made read-only, its disk gone) stays half closed inside libhdf5, and any later release of
    its objects crashes the process (SIGSEGV): the next file's creation, Python's garbage
    collection, libhdf5's own clean-up at exit. So its objects are kept and marked for h5py never
    to release (``locked``), and the process ends without that clean-up (:func:`_exit_keeping_unclosed`);
    the frames written and closed in other files are whole. A file that libhdf5 did close (the
    error came after it) is not kept."""
    if not scan_file.f.id.valid:
        return
    for obj in (scan_file.f, *scan_file.datasets()):
        obj.id.locked = True
    if not _UNCLOSED:
        atexit.register(_exit_keeping_unclosed)
    _UNCLOSED.append(scan_file)


def _exit_keeping_unclosed() -> None:
    """At exit with files that could not be closed: flush what Python holds, then end the process
    at once with status 1 (a write error happened), past libhdf5's clean-up, which would crash on
    them."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(1)


@dataclass(frozen=True)
class _StatsView:
    """A consistent copy of the counters (taken under the processor's lock)."""

    counts: dict
    write_time_s: float
    first_write_s: float
    last_write_s: float
    current_file: str
    settings: str = "{}"

    def write_rate_hz(self) -> float:
        dt = self.last_write_s - self.first_write_s
        n = self.counts["appended"]
        return (n - 1) / dt if n > 1 and dt > 0 else 0.0


# Every frame received (a valid image) is in exactly one of: written, unflushed, queued,
# lost (by cause) or wrong shape; nFramesUnaccounted checks the sum (always 0).
STATS = {
    "nFramesReceived": (pva.ULONG, lambda s: s.counts["received"]),
    "nFramesWritten": (pva.ULONG, lambda s: s.counts["written"]),
    "nFramesUnflushed": (pva.ULONG, lambda s: s.counts["unflushed"]),
    "nFramesQueued": (pva.ULONG, lambda s: s.counts["queued"]),
    "nFramesLost": (pva.ULONG, lambda s: sum(s.counts[c] for c in LOSS_CAUSES)),
    **{f"nLost{c[0].upper()}{c[1:]}": (pva.ULONG, lambda s, c=c: s.counts[c]) for c in LOSS_CAUSES},
    "nFramesWrongShape": (pva.ULONG, lambda s: s.counts["wrong_shape"]),
    "nFramesUnaccounted": (pva.LONG, lambda s: s.counts["received"] - sum(
        s.counts[k] for k in ("written", "unflushed", "queued", "wrong_shape", *LOSS_CAUSES))),
    "nBadFrames": (pva.ULONG, lambda s: s.counts["bad"] + s.counts["wrong_shape"]),
    **bad_kind_stats(),
    "nEmptyFrames": (pva.ULONG, lambda s: s.counts["empty"]),
    "nFilesWritten": (pva.ULONG, lambda s: s.counts["files"]),
    "nWriteErrors": (pva.ULONG, lambda s: s.counts["write_errors"]),
    "writeRate": (pva.DOUBLE, lambda s: s.write_rate_hz()),
    "writeTimeUs": (pva.DOUBLE, lambda s: 1e6 * s.write_time_s / max(s.counts["appended"], 1)),
    "currentFile": (pva.STRING, lambda s: s.current_file),
    "settings": (pva.STRING, lambda s: s.settings),  # flushPeriod in force (JSON)
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
        "queueTimeout": ("queue_timeout_s", number(0, 60)),
        "modelCard": ("model_card", optional(path())),
        "positionAttributes": ("position_attributes", text_list(2)),
        "restartWindow": ("restart_window", integer(0)),
    }
    SETTINGS = Hdf5Settings
    STATS = STATS
    RUNTIME_KEYS = ("flushPeriod", "newScan")
    FINITE_FRAMES = False  # a recorder: NaN and infinite float pixels are written as they are

    def __init__(self, configDict: dict | None = None):
        super().__init__(configDict)
        self.h5py = _h5py()
        _compression_options(self.settings.compression, self.settings.compression_level)  # fail early
        self._check_name_length()
        self.settings.output_directory.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.settings.output_directory, self.logger)
        self.user_args = {k: v for k, v in (configDict or {}).items() if k in self.ARGS}
        card = self.settings.model_card  # read once: every file gets the same text
        self.model_card = (read_model_card(card), str(card.resolve())) if card is not None else None
        self.queue: queue.Queue = queue.Queue(maxsize=self.settings.queue_frames)
        # every count changes under self._lock (held for counting only, never while waiting)
        self.counts = dict.fromkeys(("received", "written", "unflushed", "queued", "wrong_shape", *LOSS_CAUSES,
                                     "appended", "bad", "empty", "files", "write_errors", *BAD_KIND_COUNTS), 0)
        self._lock = threading.Lock()
        self.write_time_s = 0.0
        self.first_write_s = self.last_write_s = 0.0
        self.current: _ScanFile | None = None
        self.scan = 0
        self._scan_pending = True  # the next file opened starts a new scan number
        # uniqueIds of the current scan within restartWindow of its highest (restart detection;
        # an id further below starts a new scan anyway): bounded however long a scan runs
        self._scan_ids = RecentIds()
        self._scan_max_id = 0
        self._retry_at = 0.0  # after a write error: no new file before this (monotonic s)
        self._in_hand = 0  # frames the writer thread took from the queue and has not yet settled
        self._overloaded = False  # the last put timed out: the next ones do not wait
        self._stopping = False
        self.files: deque[Path] = deque(maxlen=RECENT_FILES)  # the files made last, newest at the end
        self._thread: threading.Thread | None = None

    # -- counting ---------------------------------------------------------------------------
    def _move(self, n: int, src: str, dst: str) -> None:
        if n:
            with self._lock:
                self.counts[src] -= n
                self.counts[dst] += n

    def _settle(self, n: int, dst: str) -> None:
        """n frames the writer thread took from the queue end in ``dst``."""
        self._move(n, "queued", dst)
        self._in_hand -= n

    def stats_source(self) -> _StatsView:
        cur = self.current
        with self._lock:
            return _StatsView(dict(self.counts), self.write_time_s, self.first_write_s, self.last_write_s,
                              str(cur.path) if cur else "", self.settings_in_force())

    # -- files ----------------------------------------------------------------------------
    def _channel(self) -> str:
        channel = self.inputChannel or self.framework.get("inputChannel", "") or "input"
        return channel.replace(":", "_").replace("*", str(self.processor_id)).replace("/", "_")

    def _file_name(self, scan: int) -> str:
        return self.settings.file_name_format.format(channel=self._channel(), processorId=self.processor_id,
                                                     scan=scan, time=time.strftime("%Y%m%d-%H%M%S"))

    def _check_name_length(self) -> None:
        """``ValueError`` when the files' names cannot fit a file system's 255 bytes: no file
        could be made, and every frame of the run would be lost."""
        name = self._file_name(1)
        room = NAME_MAX - len("-9")  # room for the "-2", ... of a name an earlier run took
        if len(os.fsencode(name)) > room:
            raise ValueError(f"fileNameFormat {short_repr(self.settings.file_name_format, 60)} gives names too long "
                             f"for a file ({len(os.fsencode(name))} bytes for scan 1 of this channel; at most {room})")

    def _open(self, first: _Frame) -> None:
        scan = self.scan + 1 if self._scan_pending else self.scan  # after a write error: the same scan, "-2"
        s = self.settings
        name = self._file_name(scan)
        attrs = {
            "processorSettings": json.dumps(self.user_args, default=str),
            "inputChannel": self.inputChannel or self.framework.get("inputChannel", "") or "",
            "processorId": self.processor_id,
            "scan": scan,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.model_card is not None:
            attrs["modelCard"], attrs["modelCardPath"] = self.model_card
        # an earlier run's file of the same name is kept: this one gets "-2", "-3", ...
        path = s.output_directory / name
        for attempt in range(NAME_ATTEMPTS):
            stem = unused_stem(path.with_name(path.stem), (path.suffix,))
            try:
                self.current = _ScanFile(self.h5py, stem.with_name(stem.name + path.suffix), first, s, attrs)
                break
            except FileExistsError:  # another process took the name meanwhile: the next one
                if attempt == NAME_ATTEMPTS - 1:
                    raise
        self.scan, self._scan_pending = scan, False
        self.files.append(self.current.path)
        self.logger.info("writing %s", self.current.path)

    def _close(self) -> None:
        """Close the current file: its unflushed frames count as written, or lost if the close fails."""
        cur, self.current = self.current, None
        if cur is None:
            return
        unconfirmed = cur.n - cur.confirmed
        try:
            cur.close()
        except Exception as exc:  # h5py raises OSError, RuntimeError, ...: counted, logged
            with self._lock:
                self.counts["write_errors"] += 1
            self._move(unconfirmed, "unflushed", "writeError")
            self.count_problem("close", "cannot close %s: %s; its %d frames appended after the last flush "
                               "are counted lost", cur.path, exc, unconfirmed)
            return
        self._move(unconfirmed, "unflushed", "written")
        with self._lock:
            self.counts["files"] += 1
        self.logger.info("closed %s with %d frames", cur.path, cur.n)

    def _abandon(self, kind: str, exc: BaseException) -> None:
        """After a failed write or flush: the frames not confirmed by a flush count as lost, the
        file is cut back to its confirmed frames and closed (best effort), and the next frames
        go to a new file of the same scan, no sooner than one flushPeriod from now."""
        cur, self.current = self.current, None
        self._retry_at = time.monotonic() + self.settings.flush_period_s
        with self._lock:
            self.counts["write_errors"] += 1
        if cur is None:
            self.count_problem(kind, "%s failed: %r (no file open)", kind, exc)
            return
        unconfirmed = cur.n - cur.confirmed
        self._move(unconfirmed, "unflushed", "writeError")
        self.count_problem(kind, "%s failed on %s: %r; the file keeps the %d frames confirmed by a flush, the %d "
                           "after them are counted lost; later frames go to a new file",
                           kind, cur.path, exc, cur.confirmed, unconfirmed)
        try:
            cur.truncate_to_confirmed()
        except Exception as cut_exc:  # logged; the close below still runs
            self.count_problem("truncate", "cannot cut %s back to its %d confirmed frames: %s; frames after "
                               "them in the file are unconfirmed (maybe zero-filled)", cur.path, cur.confirmed, cut_exc)
        try:
            cur.close()
        except Exception as close_exc:  # counted and logged
            with self._lock:
                self.counts["write_errors"] += 1
            self.count_problem("close", "cannot close %s after a write error: %s; frames after its first %d "
                               "may be missing or zero-filled; it stays marked as open for writing: read it with "
                               "swmr=True, or h5clear -s it", cur.path, close_exc, cur.confirmed)
        else:
            with self._lock:
                self.counts["files"] += 1

    def _end_scan(self) -> None:
        self._close()
        self._scan_pending = True
        self._scan_ids = RecentIds()
        self._scan_max_id = 0

    def _is_restart(self, frame: _Frame) -> bool:
        return bool(self._scan_ids) and (
            frame.unique_id in self._scan_ids or frame.unique_id < self._scan_max_id - self.settings.restart_window
        )

    def _remember(self, unique_id: int) -> None:
        """Note a uniqueId of the current scan (the ids more than restartWindow below the
        highest are forgotten: they start a new scan anyway)."""
        self._scan_max_id = max(self._scan_max_id, unique_id)
        self._scan_ids.add(unique_id, self._scan_max_id - self.settings.restart_window)

    def _write(self, frames: list[_Frame]) -> None:
        """Append frames to the current file (new files at restarts); settles every frame."""
        block: list[_Frame] = []
        for frame in frames:
            if self._is_restart(frame):
                self._append(block)
                block = []
                self._end_scan()
            cur = self.current
            if cur is not None and (frame.image.shape != cur.shape or frame.image.dtype != cur.dtype):
                self._settle(1, "wrong_shape")
                self.count_problem("shape", "frame %d is %s %s, the file holds %s %s: not written", frame.unique_id,
                                   frame.image.shape, frame.image.dtype, cur.shape, cur.dtype)
                continue
            self._remember(frame.unique_id)
            if cur is None:
                if time.monotonic() < self._retry_at:  # a write error just now: no file for a while
                    self._settle(1, "writeError")
                    continue
                try:
                    self._open(frame)
                except Exception as exc:  # OSError, ValueError, ...: counted, logged
                    with self._lock:
                        self.counts["write_errors"] += 1
                    self._settle(1, "writeError")
                    self._retry_at = time.monotonic() + self.settings.flush_period_s
                    self.count_problem("open", "cannot create the HDF5 file: %s", exc)
                    continue
            block.append(frame)
        self._append(block)

    def _append(self, block: list[_Frame]) -> None:
        if not block:
            return
        t0 = time.perf_counter()
        try:
            self.current.append(block)
        except Exception as exc:  # counted, logged; the file is given up
            self._settle(len(block), "writeError")
            self._abandon("write", exc)
            return
        now = time.monotonic()
        with self._lock:
            if not self.counts["appended"]:
                self.first_write_s = now
            self.last_write_s = now
            self.counts["appended"] += len(block)
            self.write_time_s += time.perf_counter() - t0
        self._settle(len(block), "unflushed")

    def _flush(self) -> None:
        cur = self.current
        before = cur.confirmed
        try:
            cur.flush()
        except Exception as exc:  # counted, logged; the file is given up
            self._abandon("flush", exc)
            return
        self._move(cur.confirmed - before, "unflushed", "written")

    # -- the writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        name_this_thread()
        last_flush = time.monotonic()
        done = False
        while not done:
            # with no file open nothing is due: sleep until work comes, not 100 times a second
            timeout = (max(0.01, self.settings.flush_period_s - (time.monotonic() - last_flush))
                       if self.current is not None else None)
            items = []
            try:
                items.append(self.queue.get(timeout=timeout))
                while len(items) < self.settings.chunk_frames:
                    items.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            self._in_hand = sum(isinstance(item, _Frame) for item in items)
            try:
                frames: list[_Frame] = []
                for item in items:
                    if isinstance(item, _Frame):
                        frames.append(item)
                        continue
                    self._write(frames)
                    frames = []
                    if item is _NEW_SCAN:
                        self._end_scan()
                    elif item is _STOP:
                        done = True
                self._write(frames)
                if self.current is not None and (done or time.monotonic() - last_flush >= self.settings.flush_period_s):
                    self._flush()
                    last_flush = time.monotonic()
            except Exception as exc:  # the thread must live on: counted, logged
                # an unforeseen error: this round's unsettled frames and the file's unflushed ones are lost
                self._settle(self._in_hand, "writeError")
                self._abandon("unexpected error", exc)
        self._close()

    # -- PvaPy lifecycle ----------------------------------------------------------------------
    def _writer_dead(self) -> bool:
        thread = self._thread
        return thread is not None and not thread.is_alive()

    def _put(self, item, timeout_s: float) -> bool:
        """Queue ``item``, waiting at most ``timeout_s``; False if the queue stayed full or
        the writer thread is gone (never waits on a dead writer)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._writer_dead():
                return False
            try:
                self.queue.put(item, timeout=max(0.0, min(0.1, deadline - time.monotonic())))
                return True
            except queue.Full:
                if time.monotonic() >= deadline:
                    return False

    def _drain(self) -> int:
        """Take everything out of the queue; the number of frames taken."""
        n = 0
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return n
            n += isinstance(item, _Frame)

    def start(self):
        self.counting_resets = True  # a reset_stats from now on clears the run's totals: nStatsResets
        controller = calling_controller(sys._getframe(1), self, "configure")
        source = data_source(sys._getframe(1), controller)  # the collector or consumer above it
        restore_on_refusal(controller, source)  # a refused configure: no change
        reset_with_source(source, controller)  # reset_stats resets this processor's counts too
        self._thread = threading.Thread(target=self._run, name="hdf5-writer", daemon=True)
        self._thread.start()
        # SIGTERM (also the kernel's, when a forked consumer's parent dies) writes what is
        # queued and stops the framework cleanly, so the file is closed, not cut off
        shutdown.on_sigterm(self._wait_written, self.logger)
        atexit.register(self._finish_at_exit)

    def _finish_at_exit(self) -> None:
        """At the process's exit, before Python's finalization: a writer thread that ``stop()``
        left running (a slow or hung disk) holds h5py's lock, and the finalization (which
        freezes that thread, then releases h5py's objects) waited for it forever: the process
        never ended. It gets EXIT_WAIT_S more to write what it holds and close its file; one
        still running then is left, and the process ends at once with status 1 (its file keeps
        the frames of its last flush and stays marked as open for writing: read it with
        ``swmr=True``)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        try:
            self.queue.put_nowait(_STOP)  # stop() was not called, or its _STOP was drained
        except queue.Full:
            pass
        thread.join(EXIT_WAIT_S)
        if thread.is_alive():
            self.logger.error("the HDF5 writer did not finish within %g s more at exit: the process ends without "
                              "closing %s (read it with swmr=True)", EXIT_WAIT_S, self.current and self.current.path)
            _exit_keeping_unclosed()

    def _wait_written(self, timeout_s: float) -> bool:
        """Wait (up to ``timeout_s``) until the writer has taken every queued frame; True if it has."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self.counts["queued"] == 0:
                    return True
            time.sleep(0.02)
        return False

    def stop(self):
        """Write what is queued (within STOP_TIMEOUT_S), close the file; count what is left as lost."""
        thread = self._thread
        with self._lock:
            self._stopping = True  # process() from now on counts frames as lost (stopping)
        if thread is not None:
            deadline = time.monotonic() + STOP_TIMEOUT_S
            if self._put(_STOP, STOP_TIMEOUT_S):
                thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self.logger.error("the HDF5 writer did not finish within %g s; %s may lack its last frames",
                                  STOP_TIMEOUT_S, self.current and self.current.path)
        left = self._drain()  # what the writer did not take will not be written
        if thread is not None and thread.is_alive():
            try:
                self.queue.put_nowait(_STOP)  # the queue is empty now: a writer that comes back ends
            except queue.Full:  # refilled by a process() that raced stop(): those frames stay counted as queued
                self.logger.error("the stuck HDF5 writer thread could not be told to end")
        self._move(left, "queued", "stopping")
        if left:
            self.logger.error("%d queued frames were not written at stop (counted in nLostStopping)", left)
        # self._thread stays: a process() that raced this stop sees a dead writer and counts its frame

    def process(self, pvObject):
        frame = self.decode_frame(pvObject, self._lock)
        if frame is None:
            return None
        meta, image = frame
        position, model_id = frame_attributes(meta.attributes, *self.settings.position_attributes)
        frame = _Frame(
            meta.unique_id, np.array(image, copy=True), seconds(meta.time_stamp), seconds(meta.data_time_stamp),
            position, model_id,
        )
        with self._lock:
            self.counts["received"] += 1
            stopping = self._stopping
            self.counts["stopping" if stopping else "queued"] += 1
        if stopping:
            return None
        # waits (backpressure into the PVA server queue) at most queueTimeout, and not at all
        # while the previous frame found the queue full
        if self._put(frame, 0.0 if self._overloaded else self.settings.queue_timeout_s):
            self._overloaded = False
            if self._stopping and self._writer_dead():  # queued just after stop() emptied the queue
                self._move(self._drain(), "queued", "stopping")
            return None
        self._overloaded = True
        self._move(1, "queued", "notQueued")
        self.count_problem("notQueued", "frame %d not queued: the HDF5 writer %s (%d frames queued); "
                           "counted in nLostNotQueued", frame.unique_id,
                           "thread is gone" if self._writer_dead() else "did not take frames within queueTimeout",
                           self.queue.qsize())
        return None

    def configure(self, configDict):
        period = self.settings.flush_period_s
        super().configure(configDict)
        if self.settings.flush_period_s != period:
            try:  # a full queue: the writer is busy and looks at the period after each block anyway
                self.queue.put_nowait(_WAKE)
            except queue.Full:
                pass

    def new_scan(self) -> None:
        if not self._put(_NEW_SCAN, self.settings.queue_timeout_s):
            raise RuntimeError("newScan not applied: the HDF5 writer is not taking work "
                               "(its queue stayed full for queueTimeout, or its thread is gone)")

    def resetStats(self):
        super().resetStats()
        with self._lock:
            # frames still on their way stay counted (received = queued + unflushed), so the sum holds
            keep = {k: self.counts[k] for k in ("queued", "unflushed")}
            for k in self.counts:
                self.counts[k] = 0
            self.counts.update(keep, received=keep["queued"] + keep["unflushed"])
            self.write_time_s = 0.0
