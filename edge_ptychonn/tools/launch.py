"""``edge-ptychonn launch CONFIG.toml``: start the whole live chain from one small file, watch it, stop it.

The chain::

    pvapy-ad-sim-server (or a detector) --<source.channel>--> pvapy-hpc-consumer -nc N (PtychoNNProcessor)
        --> <inference>:<id>:output --+--> pvapy-hpc-collector (StitchProcessor) --> <stitch>:1:output (+ :final)
                                      +--> pvapy-hpc-consumer -nc N (Hdf5WriterProcessor) --> one .h5 per consumer and scan
                                      +--> c2dv viewers (optional)

Order: the inference consumers and, beside them, the sim server (a consumer finds a
server that is up on its first searches; one that appears later only once its
searches have backed off); then, once the consumers' status channels answer, their
clients (stitcher, HDF5 writers), waited for in the same way. The sim server's start
delay, counted from its start, lets every client connect before frames flow. The
launcher reports when every client has received its first record, and warns if
frames started before. It then prints a one-line status every second (from the status
channels; a stage whose channel went silent keeps its last counts there, marked
"(silent 5 s)") and, with a sim server replaying once, stops once every stage has taken
every frame it sent (the stitcher: placed or counted as not placed, none still waiting
for its position from metadata channels), else when the chain has been idle for
``idle_s`` after the scan (at least two status periods, plus the collector's 5 s release
time with a stitcher, plus its ``metadataWait`` while it holds frames waiting for their
positions, so that frames still on their way are counted); a detector chain runs until
Ctrl-C. Ctrl-C, SIGTERM or SIGHUP (the terminal or ssh session closed) stops everything it
started, by process id, source first, then inference, so the downstream stages see every frame,
then the clients all at once (each takes seconds);
their logs are in ``log_dir`` (the summary names the HDF5 writers' when they lost frames,
with the causes their status gives: write errors, not queued, not written at stop); with a
replay stopped early, the summary counts the frames the sim server sent, once they
went through the chain (at most 15 s more, said as it waits). The summary's stitcher counts are its own as it ended (its log's last
statistics: as it stops it places the frames still waiting for their positions; without
them, those still waiting are named), an inference consumer's those of its last report in the
inference log where they go further than its status channel's last answer (one stopped before
the chain logs its final statistics there), and with ``positionChannels`` it says how many frames
took their positions from the metadata channels, or that no update came. Each process gets
SIGINT and up to 5 s (15 s for the stitcher and the HDF5 writers, which save what they
hold) to end, then SIGTERM, then SIGKILL; the launcher says when one needs a harder signal, names one that outlives SIGKILL (stuck in the kernel)
instead of waiting for it, and ignores a second Ctrl-C while it stops.
Should the launcher itself be killed outright (SIGKILL), the kernel sends each
process it started SIGTERM (Linux). A forked consumer (inference, HDF5 writer) that
exits while the chain starts or runs is reported with its exit status and the reason from
its log (Linux), also in the line that says the stage stopped (PvaPy's parent exits with 0
all the same); the others go on, and when none of a stage's is left the chain stops. Either
way the exit status is 1. Failures and warnings go to stderr; the status lines, what was
started and stopped, and the summary to stdout.

EPICS networking: a replayed scan's chain keeps all pvAccess traffic on this host's
loopback. A detector chain (no ``scan``) runs with the environment's ``EPICS_PVA*``
settings when it has any (a beamline's: a detector IOC on another host is found, and
clients elsewhere see the outputs), else on loopback too; it prints the settings first.

The file (TOML; every key is optional unless marked; unknown keys are refused
with the accepted ones listed; numbers must be finite; each stage needs a prefix
of its own, without ``*``). Relative paths, here and in the processors'
arguments, are taken from the directory you launch from: the processes run
there. ``--check`` validates the file, the scan and each processor's arguments
(with the processor's own parsing, as its consumers will), and the inference model
(read as its consumers read it: an ONNX model that the scan's frames, cropped and binned,
fit; a ``device`` that asks for a GPU on a host without an NVIDIA driver is refused), starting
nothing; the launch makes the same checks before it starts anything::

    log_dir = "results/launch"         # processes' logs (a folder, made if missing)
    idle_s = 8.0                       # with a replayed scan: stop after this long without progress (see above; 0..3600)
    timeout_s = 0                      # stop after this many seconds (0: no limit)

    [source]                           # required (may be empty: a detector on ad:image)
    scan = "data/generated/scan.npy"   # frames (n >= 2, height, width) replayed by pvapy-ad-sim-server; omit for a detector
    channel = "ad:image"               # the detector channel (sim server: the channel it publishes)
    fps = 100.0                        # sim server frame rate
    start_delay_s = 12.0               # sim server: wait before streaming, so every client connects (0..600)

    [inference]                        # required (may be empty: the defaults below)
    consumers = 2                      # 1..64
    prefix = "inference"               # <prefix>:<id>:output, :status, :control
    processor = "processors.ptychonn.PtychoNNProcessor"  # module.Class, a class with process(pv)
    distributor_updates = 8            # frames each consumer takes in turn (1..256)
    server_queue_size = 1000
    [inference.args]                   # --processor-args (camelCase, see the processor)
    modelPath = "data/ptychonn.onnx"

    [stitch]                           # omit the table for no stitcher
    prefix = "stitch"                  # <prefix>:1:output (+ :final), :status, :control
    collector_cache_size = 0           # 0: 2 * consumers * distributor_updates
    server_queue_size = 1000
    metadata_channels = []             # the collector's --metadata-channels, e.g. ["pva://scan:y", "pva://scan:x"]
    [stitch.args]                      # positionsFile defaults to the scan's .npz when there is one
    publishRate = 2.0                  # positionChannels = ["scan:y", "scan:x"]: positions from those of metadata_channels

    [hdf5]                             # omit the table for no files
    prefix = "hdf5"                    # <prefix>:<id>:status, :control
    server_queue_size = 1000
    [hdf5.args]                        # required
    outputDirectory = "results/h5"     # required

    [viewer]                           # omit for no viewer; needs c2dv (pip install 'edge-ptychonn[viewer]') and a display
    channels = ["stitch:1:output"]     # one window each (edge-ptychonn view: full rate, levels from the chain model's card)

Exit status: 0; 1 when frames were lost (before the end of the chain, or in the
stitcher's collector: the summary's verdict says where), a stage's statistics were reset
(reset_stats) during the run (its totals no longer count every frame: the verdict says "not
judged") or a process failed; 2 for a bad file
(or a scan or argument that fails as the chain starts); 130 on Ctrl-C, SIGTERM
or SIGHUP.

Python >= 3.11 (``tomllib``) is needed to read the file.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ptychonn.files import check_folder

from . import processes as live

REPORT_PERIOD_S = 2.0  # how often every process of the chain refreshes its status channel
SETTLE_S = 15.0  # stopped early: at most this long for the frames already sent to reach the end
COLLECTOR_RELEASE_S = 5.0  # pvapy-hpc-collector releases a cache that does not fill after this long
# process name -> seconds it may take to stop on SIGINT before SIGTERM ("": every other): the collector
# joins its processing thread (up to 5 s) before our stop() runs; an HDF5 writer's stop() may take up
# to its STOP_TIMEOUT_S (10 s) to write what is queued
STOP_GRACE_S = {"stitch": 15.0, "hdf5": 15.0, "": 5.0}
UPSTREAM = ("sim", "inference")  # stopped one after the other, in this order, before the clients
STITCH_PROCESSOR = "processors.stitch.StitchProcessor"
HDF5_PROCESSOR = "processors.hdf5_writer.Hdf5WriterProcessor"

# table -> key -> (type(s), default); None default with REQUIRED marks a required key
_REQUIRED = object()
SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "": {"log_dir": (str, "results/launch"), "idle_s": ((int, float), 8.0), "timeout_s": ((int, float), 0.0),
         "source": (dict, _REQUIRED), "inference": (dict, _REQUIRED), "stitch": (dict, None),
         "hdf5": (dict, None), "viewer": (dict, None)},
    "source": {"scan": (str, None), "channel": (str, "ad:image"), "fps": ((int, float), 100.0),
               "start_delay_s": ((int, float), 12.0)},
    "inference": {"consumers": (int, 2), "prefix": (str, "inference"),
                  "processor": (str, "processors.ptychonn.PtychoNNProcessor"), "distributor_updates": (int, 8),
                  "server_queue_size": (int, 1000), "args": (dict, {})},
    "stitch": {"prefix": (str, "stitch"), "collector_cache_size": (int, 0), "server_queue_size": (int, 1000),
               "metadata_channels": (list, []), "args": (dict, {})},
    "hdf5": {"prefix": (str, "hdf5"), "server_queue_size": (int, 1000), "args": (dict, _REQUIRED)},
    "viewer": {"channels": (list, _REQUIRED)},
}
# table -> key -> the smallest value accepted
# the slowest replay: below about 1e-10 frames/s the sim server's timer thread fails (its wait is
# beyond Python's limit) and a chain without timeout_s never ends
MIN_FPS = 0.001
MINIMUM: dict[str, dict[str, float]] = {
    "": {"idle_s": 0, "timeout_s": 0},
    "inference": {"distributor_updates": 1, "server_queue_size": 0},
    "stitch": {"collector_cache_size": 0, "server_queue_size": 0},
    "hdf5": {"server_queue_size": 0},
}
# table -> key -> (the largest value accepted, why)
MAXIMUM: dict[str, dict[str, tuple[float, str]]] = {
    "": {"idle_s": (3600.0, "a replayed chain that lost frames waits this long after the scan before it stops")},
    "inference": {"distributor_updates": (256, "each consumer takes this many frames in turn; beyond the largest "
                                               "batch (batchSize 256) that batches nothing more and only keeps the "
                                               "other consumers waiting (the stitcher's collector also caches "
                                               "2 x consumers x this many frames)")},
}


def _fits_a_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _check_table(name: str, table: dict) -> dict:
    schema = SCHEMA[name]
    where = f"[{name}]" if name else "the top level"
    unknown = sorted(set(table) - set(schema))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where}; accepted: {', '.join(schema)}")
    out = {}
    for key, (types, default) in schema.items():
        if key not in table:
            if default is _REQUIRED:
                raise ValueError(f"{where} needs '{key}'")
            out[key] = copy.deepcopy(default)  # a table's default dict is filled in later: never share it
            continue
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise ValueError(f"'{key}' in {where} must be {names}, got {value!r}")
        if isinstance(value, str) and not value:
            raise ValueError(f"'{key}' in {where} must not be empty")
        if isinstance(value, float) and not math.isfinite(value):  # nan would never compare, inf never end
            raise ValueError(f"'{key}' in {where} must be a finite number, got {value!r}")
        if isinstance(value, int) and float in (types if isinstance(types, tuple) else (types,)) \
                and not _fits_a_float(value):  # seconds, fps, ...: taken as a float (before: OverflowError)
            raise ValueError(f"'{key}' in {where} must be a finite number, got an integer beyond the "
                             f"largest float ({sys.float_info.max:.1e})")
        if key in MINIMUM.get(name, {}) and value < MINIMUM[name][key]:
            raise ValueError(f"'{key}' in {where} must be >= {MINIMUM[name][key]}, got {value!r}")
        if key in MAXIMUM.get(name, {}) and value > MAXIMUM[name][key][0]:
            most, why = MAXIMUM[name][key]
            raise ValueError(f"'{key}' in {where} must be <= {most:g}, got {value!r}: {why}")
        if isinstance(value, list) and not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"'{key}' in {where} must be a list of channel names (strings), got {value!r}")
        out[key] = value
    return out


def _check_scan(scan: str, name: str = "[source] scan") -> int:
    """The number of frames in the scan file, which must be a NumPy ``.npy`` array
    (n >= 2, height, width) as ``pvapy-ad-sim-server -if`` replays it. ``name``: what the
    messages call it (the demo's ``--scan``)."""
    import numpy as np

    if not Path(scan).is_file():
        raise ValueError(f"{name} {scan!r} is not a file (make one with 'edge-ptychonn simulate')")
    try:
        with open(scan, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise ValueError(f"{name} {scan!r} cannot be read: {exc.strerror or exc}") from None
    if magic[:4] == b"PK\x03\x04":
        raise ValueError(f"{name} {scan!r} is an .npz archive; give the frames' .npy file")
    if magic != b"\x93NUMPY":
        raise ValueError(f"{name} {scan!r} is not a NumPy .npy file (as np.save writes)")
    try:
        frames = np.load(scan, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{name} {scan!r}: not an array of frames ({exc})") from None
    if frames.ndim != 3 or len(frames) < 2:
        raise ValueError(f"{name} {scan!r} must hold frames (n >= 2, height, width) to replay once; "
                         f"its array has shape {frames.shape}")
    if frames.dtype not in [np.dtype(t) for t in NTNDARRAY_DTYPES]:  # the sim server's frame thread would fail
        raise ValueError(f"{name} {scan!r} holds {frames.dtype.str} frames, which an NTNDArray cannot carry; save "
                         f"them as one of {', '.join(NTNDARRAY_DTYPES)} (native byte order)")
    return len(frames)


def _check_channel_names(source: str, prefixes: dict[str, str]) -> None:
    """Every stage's channels must be its own: a prefix shared by two stages (or the source
    channel among them) makes two servers publish one name, and ``*`` is the consumer id
    in PvaPy's channel patterns."""
    for name, value in [("[source] channel", source), *((f"[{t}] prefix", p) for t, p in prefixes.items())]:
        if "*" in value:
            raise ValueError(f"{name} {value!r} must not hold '*' (PvaPy puts the consumer id there)")
    seen: dict[str, str] = {}
    for table, prefix in prefixes.items():
        if prefix in seen:
            raise ValueError(f"[{seen[prefix]}] and [{table}] have the same prefix {prefix!r}: their channels "
                             "would have the same names; give each its own")
        seen[prefix] = table
    if any(re.match(rf"{re.escape(prefix)}:\d+:", source) for prefix in prefixes.values()):
        raise ValueError(f"[source] channel {source!r} is among the chain's own channels (prefixes "
                         f"{', '.join(repr(p) for p in prefixes.values())}); give it another name")


def check_processor_args(where: str, processor: str, args: dict):
    """Check ``args`` with ``processor``'s own argument parsing, as its consumers will
    at start-up; return its settings (None where the class has no parsing known here).
    Relative paths are taken from the current directory, where the chain runs."""
    import importlib

    module, _, name = processor.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"{where.removesuffix('.args]')}] processor {processor!r} cannot be imported: {exc}") from None
    if not isinstance(cls, type) or not callable(getattr(cls, "process", None)):
        # PvaPy makes each consumer's processor as cls(config) and calls its process(pv) per frame
        what = "not a class" if not isinstance(cls, type) else "a class without a process(pv) method"
        raise ValueError(f"{where.removesuffix('.args]')}] processor {processor!r} is {what}: give "
                         "module.Class of a PvaPy processor (a class with process(pv), e.g. a UserDataProcessor)")
    from processors.ptychonn import DEFAULT_MODEL, PtychoNNProcessor

    try:
        if issubclass(cls, PtychoNNProcessor):
            from edge_ptychonn.stream.config import parse_processor_args
            from engines.registry import check_name

            config, _ = parse_processor_args(args, aliases=cls.ARG_ALIASES, default_model=DEFAULT_MODEL)
            check_name(config.engine)
            _check_model(config)
            _check_device(config)
            return config
        if isinstance(getattr(cls, "ARGS", None), dict) and getattr(cls, "SETTINGS", None) is not None:
            from edge_ptychonn.stream.arguments import parse_arguments

            fields, _ = parse_arguments(args, cls.ARGS)
            return cls.SETTINGS(**fields)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where} {exc}") from None
    return None


def _check_model(config) -> None:
    """ValueError (one line) unless ``config.model_path`` is a single-input ONNX model that the
    consumers can run: read as the consumers and ``configure modelPath=`` read it
    (:func:`engines.onnx_model.read_signature`), then their own start-up checks of the crop and the
    model card against its input size. Before, a ``.npy`` (say) passed, and every consumer failed
    at start with a traceback."""
    from engines.onnx_model import read_signature
    from processors.ptychonn import check_card, check_crop

    read_signature(config.model_path)
    check_crop(config)
    check_card(config.model_path)


def _check_device(config) -> None:
    """ValueError (one line) when the consumers' ``device`` asks for an NVIDIA GPU on a host that
    shows no sign of an NVIDIA driver (:func:`edge_ptychonn.devices.nvidia_driver_present`):
    every consumer would fail at start. Before, ``--check`` passed it."""
    from edge_ptychonn.devices import nvidia_driver_present, parse_device

    if parse_device(config.device).kind == "cuda" and not nvidia_driver_present():
        raise ValueError(f"device {config.device!r} asks for an NVIDIA GPU, but this host has no NVIDIA driver: "
                         "give 'auto' (the CPU here) or 'cpu'")


def check_frames_fit(cfg: LaunchConfig) -> None:
    """ValueError when the replayed scan's frames, cropped and binned as the inference
    processor's arguments say, are not the input size of its model: the consumers would refuse
    every frame as a bad frame (shape), and every frame would be lost. Nothing to check for a
    detector chain, or a processor without a ``modelPath``."""
    import numpy as np

    from engines.onnx_model import read_signature

    inf = cfg.inference
    config = check_processor_args("[inference.args]", inf["processor"], inf["args"])
    if cfg.source["scan"] is None or getattr(config, "preprocess", None) is None:
        return
    fh, fw = np.load(cfg.base / cfg.source["scan"], mmap_mode="r", allow_pickle=False).shape[1:]
    h, w = read_signature(config.model_path).input_shape
    pre = config.preprocess
    try:
        shape = pre.output_shape((fh, fw))
        if shape == (h, w):
            return
        why = "" if shape == (fh, fw) else f" (they become {shape[0]}x{shape[1]})"
    except ValueError as exc:
        why = f" ({exc})"
    crop = "no crop" if pre.crop_hw is None else f"crop {list(pre.crop_hw)}"
    raise ValueError(f"[inference.args] the scan's {fh}x{fw} frames do not become the {h}x{w} input of modelPath "
                     f"{str(config.model_path)!r} with {crop} and bin {pre.bin_factor}{why}: every frame would be "
                     "refused as a bad frame (shape)")


@dataclass
class LaunchConfig:
    """A validated launch file. Relative paths are taken from ``base`` (the current
    directory when it was read), where the chain's processes run."""

    log_dir: Path
    idle_s: float
    timeout_s: float
    source: dict
    inference: dict
    stitch: dict | None = None
    hdf5: dict | None = None
    viewer: dict | None = None
    base: Path = field(default_factory=Path.cwd)

    @classmethod
    def from_dict(cls, data: dict) -> "LaunchConfig":
        top = _check_table("", data)
        tables = {name: _check_table(name, top[name]) if top[name] is not None else None
                  for name in ("source", "inference", "stitch", "hdf5", "viewer")}
        inf = tables["inference"]
        if not 1 <= inf["consumers"] <= MAX_CONSUMERS:
            raise ValueError(f"[inference] consumers must be 1..{MAX_CONSUMERS}, got {inf['consumers']}")
        src = tables["source"]
        # "~" as the processors' paths take it (a TOML file is no shell): not a folder named "~" in the launch directory
        top["log_dir"] = os.path.expanduser(top["log_dir"])
        if src["scan"] is not None:
            src["scan"] = os.path.expanduser(src["scan"])
        if src["fps"] < MIN_FPS or not 0 <= src["start_delay_s"] <= MAX_START_DELAY_S:
            raise ValueError(f"[source] fps must be >= {MIN_FPS:g} and start_delay_s 0..{MAX_START_DELAY_S:g} s")
        if src["scan"] is not None:
            _check_scan(src["scan"])
        _check_channel_names(src["channel"], {name: tables[name]["prefix"] for name in ("inference", "stitch", "hdf5")
                                              if tables[name] is not None})
        if tables["viewer"] is not None and not tables["viewer"]["channels"]:
            raise ValueError("'channels' in [viewer] needs at least one channel (or omit [viewer])")
        if tables["hdf5"] is not None and "outputDirectory" not in tables["hdf5"]["args"]:
            raise ValueError("[hdf5.args] needs 'outputDirectory'")
        if tables["stitch"] is not None and src["scan"] is not None:
            npz = Path(src["scan"]).with_suffix(".npz")
            args = tables["stitch"]["args"]
            if npz.is_file() and "positionsFile" not in args and "objectShape" not in args:
                args["positionsFile"] = str(npz)
        check_processor_args("[inference.args]", inf["processor"], inf["args"])
        if tables["hdf5"] is not None:
            check_processor_args("[hdf5.args]", HDF5_PROCESSOR, tables["hdf5"]["args"])
        if tables["stitch"] is not None:
            settings = check_processor_args("[stitch.args]", STITCH_PROCESSOR, tables["stitch"]["args"])
            if settings.positions_file is not None:
                from processors.stitch import PositionTable

                try:
                    PositionTable.load(settings.positions_file, settings.first_unique_id)
                except (ValueError, OSError) as exc:
                    raise ValueError(f"[stitch.args] {exc}") from None
            if settings.position_channels is not None:  # the stitcher finds them only at start(): not in --check
                from processors.stitch import channel_name

                given = [channel_name(c) for c in tables["stitch"]["metadata_channels"]]
                missing = [c for c in settings.position_channels if channel_name(c) not in given]
                if missing:
                    raise ValueError(f"[stitch.args] positionChannels {', '.join(missing)} not among [stitch] "
                                     f"metadata_channels ({', '.join(given) or 'none'}): the collector would not "
                                     "receive them, and every frame would wait metadataWait for nothing")
        try:  # the processes' logs: made at start, in the directory the chain runs in
            check_folder(top["log_dir"])
        except OSError as exc:
            raise ValueError(f"log_dir {top['log_dir']!r} cannot be used: {exc}") from None
        return cls(Path(top["log_dir"]), float(top["idle_s"]), float(top["timeout_s"]), **tables)

    @classmethod
    def load(cls, path: Path) -> "LaunchConfig":
        try:
            import tomllib
        except ImportError as exc:  # Python < 3.11
            raise ValueError(f"reading {path} needs Python >= 3.11 (tomllib); this is Python {sys.version.split()[0]}") from exc
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        except UnicodeDecodeError as exc:  # a scan, a model, ... given instead of the file
            raise ValueError(f"{path} is not a TOML file (not UTF-8 text: byte {exc.start})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data)

    # -- channel names --------------------------------------------------------------------
    def inference_ids(self) -> list[int]:
        return list(range(1, self.inference["consumers"] + 1))

    def output_channel(self, i: int) -> str:
        return f"{self.inference['prefix']}:{i}:output"

    def stitch_channel(self) -> str:
        return f"{self.stitch['prefix']}:1:output"


# ---------------------------------------------------------------- command lines


def collector_argv(
    input_pattern: str, producer_ids: list[int], processor_class: str, processor_args: dict | None,
    prefix: str, cache_size: int, server_queue_size: int = 1000, report_period_s: float = 2.0,
    runtime_s: float = 0.0,
) -> list[str]:
    """``pvapy-hpc-collector`` merging ``input_pattern`` (``*`` = producer id) from
    ``producer_ids``; output ``<prefix>:1:output``, status ``:status``, control
    ``:control``. Initial updates are not skipped (the processors ignore the empty
    record a monitor gets on connect)."""
    argv = [
        live.tool_path("pvapy-hpc-collector"), "-dc", "-id", "1", "-pid", ",".join(map(str, producer_ids)),
        "-ic", input_pattern, "-oc", f"{prefix}:*:output", "-sc", f"{prefix}:*:status", "-cc", f"{prefix}:*:control",
        "-sqs", str(server_queue_size), "-ccs", str(cache_size), "-siu", "0", "-pc", processor_class,
        "-rp", str(report_period_s), "-rt", str(runtime_s),
    ]
    if processor_args:
        argv += ["-pa", json.dumps(processor_args)]
    return argv


def chained_argv(
    input_pattern: str, n_consumers: int, processor_class: str, processor_args: dict | None, prefix: str,
    server_queue_size: int = 1000, report_period_s: float = 2.0, runtime_s: float = 0.0,
) -> list[str]:
    """``pvapy-hpc-consumer -nc N`` where consumer ``k`` reads ``input_pattern``
    with ``*`` = k (one per upstream consumer), no output channel, status
    ``<prefix>:<k>:status``; initial updates not skipped."""
    argv = [
        live.tool_path("pvapy-hpc-consumer"), "-dc", "-ic", input_pattern, "-nc", str(n_consumers),
        "-sc", f"{prefix}:*:status", "-cc", f"{prefix}:*:control", "-sqs", str(server_queue_size),
        "-siu", "0", "-pc", processor_class, "-rp", str(report_period_s), "-rt", str(runtime_s),
    ]
    if processor_args:
        argv += ["-pa", json.dumps(processor_args)]
    return argv


# ---------------------------------------------------------------- status


class Status:
    """Reads status records, keeping one pvAccess channel per name once it has answered.

    A channel that does not answer is dropped, so the next read searches afresh: a
    channel made before its server exists backs off its search, and under load it
    found a writer's status only after the chain's own deadline had passed. A read
    takes at most ``timeout_s`` to connect and :func:`processes.answer_s` in all: a
    server that stops answering (or exits) during a get would otherwise hold it, and
    the launcher with it, for ever (:func:`processes.get_record`)."""

    def __init__(self, timeout_s: float = 1.0):
        import pvaccess as pva

        self._pva = pva
        self._channels: dict[str, Any] = {}
        self.timeout_s = timeout_s

    def get(self, name: str) -> dict | None:
        ch = self._channels.get(name)
        if ch is None:
            ch = self._pva.Channel(name)
            ch.setTimeout(self.timeout_s)
            self._channels[name] = ch  # kept only with its timeout set (a signal may come between)
        record = live.get_record(ch, live.answer_s(self.timeout_s))
        if record is None:
            self._channels.pop(name, None)
        return record


def _user(record: dict | None, key: str, default=0):
    return (record or {}).get("userStats", {}).get(key, default)


# the HDF5 writer's lost frames by cause (its nLost<Cause>, processors.hdf5_writer.LOSS_CAUSES) -> what the
# summary calls the cause
WRITER_LOSSES = {"nLostWriteError": "at write errors", "nLostNotQueued": "not queued (the writer's queue full or "
                 "its thread gone)", "nLostStopping": "not written at stop"}

# the stitcher's frame counts that its final statistics (as it ends) give: its stop() places the
# frames still waiting for their positions (the file's, else counted as no position)
FINAL_COUNTS = ("nFramesReceived", "nFramesPlaced", "nFramesNoPosition", "nFramesOutside", "nFramesWrongShape",
                "nFramesWaiting", "nFramesByMetadata", "nMetadataReceived", "nBadFrames", "nStatsResets")


def position_channels(cfg: LaunchConfig) -> list[str]:
    """The metadata channels the stitcher takes positions from (its ``positionChannels``), or []."""
    return list(cfg.stitch["args"].get("positionChannels") or []) if cfg.stitch is not None else []


def last_user_stats(log: str) -> dict[str, int | float]:
    """The numbers in the ``userStats`` of the last statistics report in a PvaPy process's ``log``
    (its pretty-printed dict); {} when it holds none, or only one cut short."""
    start = log.rfind("'userStats': {")
    end = log.find("}", start)
    if start < 0 or end < 0:
        return {}
    numbers = re.findall(r"'(\w+)': (-?(?:[\d.]+(?:e[-+]?\d+)?|inf)|nan)[,}\s]", log[start:end + 1])
    return {key: int(value) if value.lstrip("-").isdigit() else float(value) for key, value in numbers}


def consumer_user_stats(log: str) -> dict[int, dict[str, int | float]]:
    """Each consumer's numbers in the ``userStats`` of its last statistics report in the ``log`` of
    a ``pvapy-hpc-consumer`` (one pretty-printed dict per consumer and report, ``{ 'consumerId': k,
    ...``): consumer id -> numbers (:func:`last_user_stats`); a consumer with none is left out."""
    reports: dict[int, dict[str, int | float]] = {}
    starts = [m.start() for m in re.finditer(r"^\{", log, re.M)] + [len(log)]
    for start, end in zip(starts, starts[1:]):
        found = re.match(r"\{ 'consumerId': (\d+),", log[start:end])
        stats = last_user_stats(log[start:end]) if found else {}
        if stats:
            reports[int(found.group(1))] = stats
    return reports


def _progress(user: dict) -> tuple:
    """How far a consumer's counts have got: later reports compare greater."""
    return user.get("nStatsResets", 0), user.get("nFramesReceived", 0), user.get("nFramesProcessed", 0)


@dataclass
class Snapshot:
    """What the status channels say, summed over consumers."""

    inference: list[dict | None]
    stitch: dict | None
    hdf5: list[dict | None]

    def merged(self, older: "Snapshot | None") -> "Snapshot":
        """This snapshot, each silent channel with its last answer in ``older`` (a process
        that died or was stopped still counts what it reported)."""
        if older is None:
            return self
        pick = lambda new, old: new if new is not None else old
        return Snapshot([pick(n, o) for n, o in zip(self.inference, older.inference)], pick(self.stitch, older.stitch),
                        [pick(n, o) for n, o in zip(self.hdf5, older.hdf5)])

    def processed(self) -> int:
        return sum(_user(r, "nFramesProcessed") for r in self.inference)

    def dropped(self) -> int:
        """Frames the inference consumers dropped (overload, stopping, ...): not bad ones."""
        return sum(_user(r, "nFramesDropped") for r in self.inference)

    def bad(self) -> int:
        """Frames the inference consumers refused as bad (colour, NaN pixels, another size, ...)."""
        return sum(_user(r, "nBadFrames") for r in self.inference)

    def written(self) -> int:
        """Frames in the HDF5 files: confirmed by a flush, or appended since the last one
        (``nFramesUnflushed``: the close at stop confirms them; with a long ``flushPeriod``
        the flush may come long after the scan)."""
        return sum(_user(r, "nFramesWritten") + _user(r, "nFramesUnflushed") for r in self.hdf5)

    def writer_losses(self) -> dict[str, int]:
        """The frames the HDF5 writers lost, by cause (:data:`WRITER_LOSSES`), and their failed
        creates, writes, flushes and closes (``nWriteErrors``), summed over the writers."""
        return {key: sum(_user(r, key) for r in self.hdf5) for key in [*WRITER_LOSSES, "nWriteErrors"]}

    def writer_lost(self) -> int:
        """The frames the HDF5 writers lost, all causes."""
        return sum(sum(_user(r, key) for r in self.hdf5) for key in WRITER_LOSSES)

    def placed(self) -> int:
        return _user(self.stitch, "nFramesPlaced")

    def waiting(self) -> int:
        """Frames the stitcher holds waiting for their positions from its metadata channels (up to
        its ``metadataWait`` each, then the positions file's)."""
        return _user(self.stitch, "nFramesWaiting")

    def with_inference_final(self, finals: dict[int, dict]) -> "Snapshot":
        """This snapshot with each inference consumer's counts taken from ``finals`` (consumer id ->
        its last report in its process's log, :func:`consumer_user_stats`) where those went further
        than its last status answer: a consumer stopped before the chain (a SIGTERM to one of
        them) kept publishing after its status channel's last answer and reported its final
        counts only in the log; its last answer undercounted it (inference processed 356 of the
        400 frames written)."""
        records = []
        for consumer_id, record in enumerate(self.inference, 1):
            final, user = finals.get(consumer_id), (record or {}).get("userStats", {})
            if final and _progress(final) > _progress(user):
                record = {**(record or {}), "userStats": {**user, **{k: v for k, v in final.items() if k[:1] == "n"}}}
            records.append(record)
        return Snapshot(records, self.stitch, self.hdf5)

    def with_stitch_final(self, final: dict) -> "Snapshot":
        """This snapshot with the stitcher's frame counts taken from ``final``, its own last
        statistics as it ended (:meth:`Chain.stitcher_final`; nothing changes when it is empty)."""
        if not final:
            return self
        stitch = dict(self.stitch or {})
        stitch["userStats"] = {**stitch.get("userStats", {}), **{k: final[k] for k in FINAL_COUNTS if k in final}}
        return Snapshot(self.inference, stitch, self.hdf5)

    def collector_lost(self) -> int:
        """PvaPy's collector counts (``nMissed`` + ``nRejected``): gaps in the uniqueIds it saw,
        frames that the inference consumers dropped, refused or never published among them."""
        c = (self.stitch or {}).get("collectorStats", {})
        return c.get("nMissed", 0) + c.get("nRejected", 0)

    def stitcher_lost(self) -> int:
        """Frames that the inference consumers published but the stitcher never received (its
        collector missed or rejected them): the collector's count, less the gaps that frames
        never published upstream left in the uniqueIds, which it counts too (at most the
        frames published that the stitcher did not receive)."""
        s = self.stitch or {}
        undecoded = _user(s, "nBadFrames") - _user(s, "nFramesWrongShape")
        return min(self.collector_lost(), max(0, self.processed() - _user(s, "nFramesReceived") - undecoded))

    def stats_resets(self) -> list[str]:
        """The stages whose statistics a ``reset_stats`` cleared during the run (their
        ``nStatsResets``, the one count a reset keeps), e.g. ``["inference 1", "hdf5 2"]``:
        their totals no longer count every frame from the start, so no loss can be judged from
        them. Before: 206 of 600 frames "did not reach the HDF5 files" that held all 600."""
        named = lambda stage, records: [f"{stage} {i}" for i, r in enumerate(records, 1) if _user(r, "nStatsResets")]
        return named("inference", self.inference) + named("stitch", [self.stitch]) + named("hdf5", self.hdf5)

    def taken(self, cfg: LaunchConfig) -> int:
        """The frames every stage has taken: the fewest of inference (processed, dropped or
        bad), the HDF5 writers (written) and the stitcher (received, less those still waiting
        for their positions: it has not placed or counted them yet)."""
        return min([self.processed() + self.dropped() + self.bad()] + ([self.written()] if cfg.hdf5 is not None else [])
                   + ([_user(self.stitch, "nFramesReceived") - self.waiting()] if cfg.stitch is not None else []))

    def progress(self) -> tuple:
        return (self.processed(), self.dropped(), self.bad(), self.written(), self.placed(),
                _user(self.stitch, "nFramesReceived"), self.waiting())

    def frame_rate(self, skip=()) -> float:
        """Published frames/s of all inference consumers (each over its last 5 s), but those whose
        index is in ``skip`` (silent: their last rate is stale)."""
        return sum(_user(r, "frameRate", 0.0) for i, r in enumerate(self.inference) if i not in skip)

    def line(self, elapsed_s: float, cfg: LaunchConfig, silent: dict[str, dict[int, float]] | None = None) -> str:
        """The status line. A stage whose status channels (``silent``: stage -> channel index ->
        seconds since it last answered, :meth:`Chain.silences`; default: none) did not answer is
        marked so, with how long; its counts are what this snapshot holds (the watch's: each
        channel's last answer, :meth:`merged`), not 0."""
        silent = silent or {}
        rate = self.frame_rate(skip=silent.get("inference", {}))
        bad = f", bad {self.bad()}" if self.bad() else ""
        mark = lambda stage, n: _silent_mark(silent.get(stage, {}), n)
        parts = [f"{elapsed_s:6.1f}s", f"inference{mark('inference', len(self.inference))} {self.processed()} frames "
                                       f"({rate:.0f}/s, dropped {self.dropped()}{bad})"]
        if cfg.stitch is not None:
            s = self.stitch
            waiting = f"waiting {self.waiting()}, " if self.waiting() else ""
            metadata = (f"by metadata {_user(s, 'nFramesByMetadata')} ({_user(s, 'nMetadataReceived')} updates), "
                        if position_channels(cfg) else "")
            parts.append(f"stitch{mark('stitch', 1)} {self.placed()} placed, cover {_user(s, 'coverage', 0.0):.0%}, "
                         f"no position {_user(s, 'nFramesNoPosition')}, {waiting}{metadata}scan {_user(s, 'nScans')}, "
                         f"lost {self.collector_lost()}")
        if cfg.hdf5 is not None:
            parts.append(f"hdf5{mark('hdf5', len(self.hdf5))} {self.written()} written")
        return " | ".join(parts)


def _silent_mark(silent: dict[int, float], n: int) -> str:
    """How a stage of ``n`` status channels is marked on the status line when those in ``silent``
    (index -> seconds since it last answered) did not answer: " (silent 5 s)", " (1 of 2 silent
    5 s)" (the longest silence); "" when every one answered."""
    if not silent:
        return ""
    some = f"{len(silent)} of {n} " if len(silent) < n else ""
    return f" ({some}silent {max(silent.values()):.0f} s)"


# ---------------------------------------------------------------- the chain


class Chain:
    """Starts, watches and stops the processes of a :class:`LaunchConfig`."""

    def __init__(self, cfg: LaunchConfig, out=None, err=None):
        self.cfg = cfg
        self.out = out or sys.stdout  # the status lines, what was started and stopped, the summary
        self.err = err or sys.stderr  # failures and warnings
        self.procs: list[live.Proc] = []
        self.source: live.Proc | None = None
        # a replay stays on this host's loopback; a detector chain keeps the environment's EPICS
        # settings when it has any (a detector IOC on another host), else loopback too
        self.env = live.use_loopback(keep_site=cfg.source["scan"] is None)
        self.status = Status()
        self.started_s = time.monotonic()
        self.started_at = time.time()  # files older than this are not this chain's
        self.failed: str | None = None  # the process that exited while the chain ran
        self.consumers_gone: dict[int, int] = {}  # pvapy-hpc-consumer -nc N pid -> its consumers reported exited
        self.peak_fps = 0.0  # the highest published rate the inference consumers reported
        self.latest: Snapshot | None = None  # the last status, each channel's last answer kept
        self.answered_s: dict[tuple[str, int], float] = {}  # (stage, channel index) -> when it last answered
        self.finished = False  # the replayed scan went through and the chain fell idle
        self.n_scan: int | None = None  # the frames of the replayed scan (run() reads them)
        # how long the stitcher holds a frame waiting for its position from metadata channels
        self.metadata_wait_s = check_processor_args("[stitch.args]", STITCH_PROCESSOR, cfg.stitch["args"]) \
            .metadata_wait_s if position_channels(cfg) else 0.0
        self.stitch_log_from: int | None = None  # the stitcher's log size when it was told to stop
        # say(): one line at a time; reentrant, as a signal handler in the main thread may say a
        # line while that thread is saying one
        self._saying = threading.RLock()

    def delivered_fps(self, snap: Snapshot) -> float | None:
        """The inference stage's delivered rate: the highest sum of the consumers' ``frameRate``
        (published frames/s over their last 5 s) seen while watching; None if none was seen.
        Below the offered rate, the stage did not keep up (its queues absorbed the excess)."""
        return self.peak_fps or None

    def say(self, message: str, stream=None) -> None:
        """``message`` as one line of ``stream`` (``out``): written whole, with its newline, by one
        thread at a time (the clients are stopped at once, each thread saying its line; print
        writes the newline apart, and two lines could come out as one)."""
        stream = stream or self.out
        try:
            with self._saying:
                stream.write(message + "\n")
                stream.flush()
        except (OSError, ValueError):  # the terminal is gone (SIGHUP): stop quietly
            pass

    def warn(self, message: str) -> None:
        """A failure or a warning: on ``err`` (stderr), where a user who keeps the status lines
        (stdout) in a file still sees it."""
        self.say(message, self.err)

    # -- names ------------------------------------------------------------------------------
    def inference_status(self) -> list[str]:
        return [f"{self.cfg.inference['prefix']}:{i}:status" for i in self.cfg.inference_ids()]

    def hdf5_status(self) -> list[str]:
        if self.cfg.hdf5 is None:
            return []
        return [f"{self.cfg.hdf5['prefix']}:{i}:status" for i in self.cfg.inference_ids()]

    def stitch_status(self) -> str | None:
        return f"{self.cfg.stitch['prefix']}:1:status" if self.cfg.stitch is not None else None

    def snapshot(self) -> Snapshot:
        stitch = self.stitch_status()
        return Snapshot([self.status.get(c) for c in self.inference_status()],
                        self.status.get(stitch) if stitch else None,
                        [self.status.get(c) for c in self.hdf5_status()])

    def silences(self, snap: Snapshot, now: float) -> dict[str, dict[int, float]]:
        """Stage -> index -> seconds since each of its status channels that did not answer in
        ``snap`` (this read, at ``now``, a :func:`time.monotonic` reading) last answered (one
        that never did: since the first read); notes when those that did answered."""
        silent: dict[str, dict[int, float]] = {}
        for stage, records in (("inference", snap.inference), ("stitch", [snap.stitch] if self.cfg.stitch else []),
                               ("hdf5", snap.hdf5)):
            silent[stage] = {}
            for i, record in enumerate(records):
                if record is not None or (stage, i) not in self.answered_s:
                    self.answered_s[stage, i] = now
                if record is None:
                    silent[stage][i] = now - self.answered_s[stage, i]
        return silent

    # -- start ------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str]) -> live.Proc:
        # in the configuration's directory: its relative paths are the processes' too
        proc = live.start(name, argv, self.env, self.cfg.base / self.cfg.log_dir, cwd=self.cfg.base, into=self.procs)
        self.say(f"started {name:<9} pid {proc.pid:<7} log {proc.log_path}")
        return proc

    def _wait_answering(self, channels: dict[str, live.Proc], timeout_s: float = 90.0) -> None:
        """Wait until every status channel answers; ``channels``: name -> the process that serves it."""
        deadline = time.monotonic() + timeout_s
        waiting = list(channels)
        forked = set()  # the pvapy-hpc-consumer -nc N (N > 1) seen with its forked consumers
        while waiting:
            waiting = [c for c in waiting if self.status.get(c) is None]
            dead = [p for p in self.procs if not p.running()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited (code {dead[0].popen.returncode}):\n{dead[0].log()[-3000:]}")
            # every forked consumer gone (a processor that failed at start): the PvaPy parent lives on
            # and would only log "No stats received"; say so now, with the reason from the log
            for p in {id(channels[c]): channels[c] for c in waiting}.values():
                if p.name in ("inference", "hdf5") and live.forked_consumers_gone(p, self.cfg.inference["consumers"],
                                                                                  forked):
                    self.consumers_gone[p.pid] = self.cfg.inference["consumers"]  # said here, not again at stop
                    raise RuntimeError(f"{p.name}: its consumers exited at start; log {p.log_path}, "
                                       f"its last errors:\n{last_errors(p.log())}")
            if waiting and time.monotonic() > deadline:
                silent = [p for p in self.procs if any(channels[c] is p for c in waiting)]
                raise RuntimeError(f"no answer from {', '.join(waiting)} within {timeout_s:.0f} s" + "".join(
                    f"\n{p.name} log {p.log_path}, its last errors:\n{last_errors(p.log())}" for p in silent))
            if waiting:
                time.sleep(0.3)

    def start(self) -> None:
        cfg = self.cfg
        if cfg.source["scan"] is None:  # which network the chain looks for the detector on
            self.say("EPICS pvAccess settings: " + ", ".join(f"{k}={v}" for k, v in sorted(live.site_epics_settings().items())))
        self._check_names_free()
        ok, reason = live.loopback_multicast()
        if not ok:
            self.warn(f"warning: {reason}; with several PVA servers on this host some clients may never connect")
        inf = cfg.inference
        inference = self._start("inference", live.consumer_argv(
            cfg.source["channel"], inf["prefix"], inf["consumers"], inf["processor"], inf["args"],
            batch_updates=inf["distributor_updates"], server_queue_size=inf["server_queue_size"], runtime_s=0,
            report_period_s=REPORT_PERIOD_S,
        ))
        src, streams_from = cfg.source, None
        if src["scan"] is not None:  # up while the consumers first look for their input (see _wait_clients)
            self.source = self._start("sim", live.sim_server_argv(
                cfg.base / src["scan"], src["channel"], fps=src["fps"], start_delay_s=src["start_delay_s"]))
            streams_from = time.monotonic() + src["start_delay_s"]
        self._wait_answering(dict.fromkeys(self.inference_status(), inference))
        outputs = f"{inf['prefix']}:*:output"
        clients = {}
        if cfg.stitch is not None:
            cache = cfg.stitch["collector_cache_size"] or 2 * inf["consumers"] * inf["distributor_updates"]
            metadata = cfg.stitch["metadata_channels"]
            clients[self.stitch_status()] = self._start("stitch", collector_argv(
                outputs, cfg.inference_ids(), STITCH_PROCESSOR, cfg.stitch["args"],
                cfg.stitch["prefix"], cache, cfg.stitch["server_queue_size"],
            ) + (["-mc", ",".join(metadata)] if metadata else []))
        if cfg.hdf5 is not None:
            clients.update(dict.fromkeys(self.hdf5_status(), self._start("hdf5", chained_argv(
                outputs, inf["consumers"], HDF5_PROCESSOR, cfg.hdf5["args"],
                cfg.hdf5["prefix"], cfg.hdf5["server_queue_size"],
            ))))
        self._wait_answering(clients)
        if cfg.viewer is not None:
            self._start_viewers()
        if streams_from is not None:
            self._wait_clients(streams_from)
        self.started_s = time.monotonic()

    def _check_names_free(self) -> None:
        """``ValueError`` (exit 2, nothing started) when a server already answers for a channel
        this chain would serve: another chain of the same names running. Both would start; each
        stage's clients would connect to either's servers, and each summary count the other's
        frames too (a negative number lost, a stitched image cut into scans, exit status 0)."""
        cfg = self.cfg
        ours = self.inference_status() + self.hdf5_status() + ([self.stitch_status()] if cfg.stitch else [])
        if cfg.source["scan"] is not None:  # its replay is served by this chain's sim server
            ours.append(cfg.source["channel"])
        taken = live.served(ours)
        if taken:
            raise ValueError(f"{', '.join(taken[:3])}{' ...' if len(taken) > 3 else ''} already answer"
                             f"{'s' if len(taken) == 1 else ''}: another chain (or process) with these channel names "
                             "is running on this network; stop it, or give this chain other prefixes (and source "
                             "channel); nothing was started")

    def _start_viewers(self) -> None:
        import importlib.util

        if importlib.util.find_spec("c2dataviewer") is None:
            self.warn("warning: c2dv not found (pip install 'edge-ptychonn[viewer]'); no viewer started")
            return
        from .view import no_display

        if no_display():
            # c2dv's Qt would abort at once, unseen: say so instead
            self.warn("warning: no display (DISPLAY is not set): no viewer started; run the launcher where "
                     "there is one, or open the windows with 'bash scripts/view.sh' (Xvfb without a display)")
            return
        # edge-ptychonn view: c2dv windows at full rate with the model card's phase levels
        self._start("viewer", [sys.executable, "-m", "edge_ptychonn.cli", "view", *self._viewer_levels(),
                               *self.cfg.viewer["channels"]])

    def _viewer_levels(self) -> list[str]:
        """The viewer's options for the chain's own model: its card's phase range as the levels
        (not the shipped model's, view's default), or c2dv's auto levels when its card gives
        none (view would refuse to start); none for a processor without a modelPath."""
        from .view import card_levels

        inf = self.cfg.inference
        settings = check_processor_args("[inference.args]", inf["processor"], inf["args"])
        model = getattr(settings, "model_path", None)
        if model is None:
            return []
        model = self.cfg.base / model
        return ["--model", str(model)] if card_levels(model) is not None else ["--levels", "auto"]

    def _clients_ready(self) -> bool:
        stitch = self.status.get(self.stitch_status()) if self.cfg.stitch else {}
        if stitch is None:
            return False
        producers = [v for k, v in (stitch or {}).items() if k.startswith("producerStats_")]
        if self.cfg.stitch and not all(p.get("receiverStats", {}).get("nReceived", 0) >= 1 for p in producers):
            return False
        for channel in self.hdf5_status():
            rec = self.status.get(channel)
            if rec is None or rec.get("receiverStats", {}).get("nReceived", 0) < 1:
                return False
        return True

    def _wait_clients(self, streams_from: float) -> None:
        """Wait until every client has connected, or until frames flow (``streams_from``, a
        :func:`time.monotonic` reading).

        The sim server is started right after the inference consumers, before they and the
        clients are waited for: a consumer finds a server that is up on its first searches,
        while one that appears seconds later is found only once its searches have backed off.
        Measured with two consumers and two HDF5 writers: every client ready 4.3-4.7 s after
        the sim server started beside the consumers, against 5.1-6.5 s after one started
        once they and the clients answered (and their start-up before that)."""
        while True:  # looked at once at least: a chain without clients (or all there) and no delay is no news
            if self._clients_ready():
                self.say(f"all clients connected {max(0.0, streams_from - time.monotonic()):.1f} s before frames flow")
                return
            if time.monotonic() >= streams_from:
                break
            time.sleep(0.5)
        self.warn("warning: not every client had connected when frames started to flow; "
                 "raise [source] start_delay_s if frames are missing")

    # -- watch --------------------------------------------------------------------------------
    def watch(self) -> Snapshot:
        """Print the status line until done (replayed scan idle), timeout or a signal."""
        tty = self.out.isatty() if hasattr(self.out, "isatty") else False
        last_progress, last_change = None, time.monotonic()
        replay_end, sent = None, None  # when the sim server was first seen to have ended; what it sent
        viewers_gone: set[int] = set()  # pids of viewers whose exit was reported
        self.peak_fps = 0.0
        snap = self.latest = self.snapshot()
        self.silences(snap, time.monotonic())
        while True:
            time.sleep(1.0)
            snap = self.snapshot()
            self.latest = snap.merged(self.latest)
            now = time.monotonic()
            # a silent channel's last counts, marked silent (before: 0, as if the stage had lost them)
            line = self.latest.line(now - self.started_s, self.cfg, self.silences(snap, now))
            print(("\r" + line + "\x1b[K") if tty else line, end="" if tty else "\n", file=self.out, flush=True)
            dead = [p for p in self.procs if p is not self.source and not p.name.startswith("viewer") and not p.running()]
            if dead:
                self.warn(f"\n{dead[0].name} exited (code {dead[0].popen.returncode}); stopping")
                self.failed = dead[0].name
                break
            self._report_viewers(viewers_gone)
            gone = self._report_lost_consumers(self.consumers_gone)
            if gone:
                self.failed = gone
                break
            if snap.progress() != last_progress:
                last_progress, last_change = snap.progress(), now
            self.peak_fps = max(self.peak_fps, snap.frame_rate())
            if replay_end is None and self.source is not None and not self.source.running():
                replay_end, sent = now, self.frames_sent(None)
                self._check_replay(sent)
            # done: every stage took every frame sent (and the counts held still for a poll); else
            # idle since the replay ended and since the last change, whatever became of the frames
            # (all of them dropped or bad is an end too, not a reason to wait forever), for idle_s
            # and at least as long as a stage may take to report frames still on their way (the
            # collector holds the stitcher's last frames for its release time; the stitcher holds
            # frames waiting for their positions from metadata channels up to its metadataWait)
            if replay_end is not None and (
                    (sent is not None and self.latest.taken(self.cfg) >= sent and last_change < now)
                    or now - max(last_change, replay_end)
                    > max(self.cfg.idle_s, self.quiet_s() + self.held_s(self.latest))):
                self.finished = True
                break
            if self.cfg.timeout_s and now - self.started_s > self.cfg.timeout_s:
                self.say(f"\ntimeout after {self.cfg.timeout_s:.0f} s")
                break
        if tty:
            print(file=self.out)
        return self.latest

    def _check_replay(self, sent: int | None) -> None:
        """The sim server ended by itself: say so when it did not replay the whole scan (its frame
        thread failed, it was killed, or it failed): the chain has then failed. Otherwise the
        summary would show a replay "stopped" with nothing lost and exit status 0."""
        code = self.source.popen.returncode
        if code == 0 and sent is not None and (self.n_scan is None or sent >= self.n_scan):
            return
        self.failed = self.failed or "sim"
        log = self.source.log()
        why = f", it said:\n{last_errors(log)}" if log.strip() else ""
        of = f" of the scan's {self.n_scan}" if self.n_scan is not None else ""
        self.warn(f"\nsim exited (code {code}) having published {'an unknown number' if sent is None else sent}{of} "
                 f"frames; log {self.source.log_path}{why}")

    def _report_viewers(self, reported: set[int]) -> None:
        """Say once when a viewer failed (exited with an error code): the chain goes on without
        it, and the reason is in its log. A window the user closed exits with 0 and is not news."""
        for p in self.procs:
            if p.name.startswith("viewer") and p.pid not in reported and not p.running() and p.popen.returncode:
                reported.add(p.pid)
                log = p.log()
                why = f", it said:\n{last_errors(log)}" if log.strip() else ""
                self.warn(f"\n{p.name} exited (code {p.popen.returncode}); the chain goes on without it; "
                         f"log {p.log_path}{why}")

    def _report_lost_consumers(self, reported: dict[int, int]) -> str | None:
        """Say so when forked consumers of a running ``pvapy-hpc-consumer -nc N`` have exited
        (killed, or their processor failed; each answered its status channel at start): the
        others go on, their status channels fall silent, the reason is in the log (Linux: /proc).
        The chain has then failed (exit status 1): PvaPy's parent exits with 0 all the same.
        Returns the stage's name when none of its consumers is left (the chain cannot go on)."""
        n = self.cfg.inference["consumers"]
        if n < 2 or not Path("/proc").is_dir():
            return None
        for p in self.procs:
            if p.name not in ("inference", "hdf5") or not p.running():
                continue
            missing = n - len(live.child_pids(p.pid, zombies=False))
            if missing > reported.get(p.pid, 0):
                reported[p.pid] = missing
                self.failed = self.failed or p.name
                fate = "none is left; stopping" if missing >= n else "the others go on"
                codes = sorted(live.exit_statuses(p.pid).values())
                status = f", exit status {', '.join(map(str, codes))}" if codes else ""
                log = p.log()  # a consumer killed outright leaves no reason there
                why = f", its last errors:\n{last_errors(log)}" if "Traceback" in log else ""
                self.warn(f"\n{missing} of the {n} {p.name} consumers exited ({fate}{status}); log {p.log_path}{why}")
                if missing >= n:
                    return p.name
        return None

    # -- stop ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop everything by pid: source first, then inference (what it still holds reaches
        clients that still listen), then its clients, all at once: each takes seconds (PvaPy's
        collector waits 5 s for its clients to read the last updates, an HDF5 writer writes what is
        queued), and none needs another. Every one is stopped even when stopping another raised."""
        ordered = self.procs_in_stop_order()
        upstream = [p for p in ordered if p.name in UPSTREAM]
        for proc in upstream:
            self._stop(proc)
        errors = live.at_once(self._stop, [p for p in ordered if p not in upstream])
        if errors:
            raise errors[0][1]

    def _stop(self, proc: live.Proc) -> None:
        if not proc.running():
            return
        if proc.name in ("inference", "hdf5"):  # consumers that exited since the last look
            self._report_lost_consumers(self.consumers_gone)
        if proc.name == "stitch":  # its final statistics are logged after this
            try:
                self.stitch_log_from = proc.log_path.stat().st_size
            except OSError:
                pass
        code = proc.stop(grace_s=STOP_GRACE_S.get(proc.name, STOP_GRACE_S[""]), say=self.warn)
        if code is None:
            self.warn(f"could not stop {proc.name} pid {proc.pid}: still there {live.KILL_WAIT_S:g} s after SIGKILL (stuck in the "
                      "kernel, in uninterruptible sleep); it ends once the kernel lets it go")
            return
        gone = self.consumers_gone.get(proc.pid, 0)  # PvaPy's parent exits with 0 all the same
        but = f", but {gone} of its {self.cfg.inference['consumers']} consumers had exited (see above)" if gone else ""
        self.say(f"stopped {proc.name:<9} pid {proc.pid:<7} exit {code}{but}")

    def settle(self, timeout_s: float = SETTLE_S) -> Snapshot | None:
        """Stopped before the chain fell idle (Ctrl-C, the timeout, a process that exited):
        stop the sim server, then wait until every stage has taken the frames it sent, or
        (some were lost) until the counts have not changed for two status periods and the
        collector's release time (and the stitcher's metadataWait while it holds frames waiting
        for their positions), at most ``timeout_s``. Returns the status then (each silent
        channel's last answer kept)."""
        if self.source is not None:
            self._stop(self.source)
        sent = self.frames_sent(None)
        deadline = time.monotonic() + timeout_s
        last, changed, told = self.latest, time.monotonic(), False
        while True:
            snap = self.snapshot().merged(last)
            now = time.monotonic()
            if last is None or snap.progress() != last.progress():
                changed = now
            self.latest = last = snap
            if (sent is not None and snap.taken(self.cfg) >= sent) or now - changed > self.quiet_s() + self.held_s(snap) \
                    or now > deadline:
                return last
            if not told:  # what the wait is for, once
                told = True
                of = f"the {sent} frames the sim server sent" if sent is not None else "the frames already sent"
                self.say(f"waiting up to {timeout_s:.0f} s for {of} to go through the chain "
                         f"({snap.taken(self.cfg)} taken by every stage so far)")
            time.sleep(0.5)

    def quiet_s(self) -> float:
        """How long the counts may hold still while frames are still on their way: two status
        periods, and the collector's release time when there is a stitcher."""
        return 2 * REPORT_PERIOD_S + 0.5 + (COLLECTOR_RELEASE_S if self.cfg.stitch is not None else 0.0)

    def held_s(self, snap: Snapshot) -> float:
        """How much longer the counts may hold still while the stitcher holds frames waiting for
        their positions from metadata channels (in ``snap``): its ``metadataWait``, else 0."""
        return self.metadata_wait_s if snap.waiting() else 0.0

    def inference_final(self) -> dict[int, dict]:
        """Each inference consumer's last statistics in the inference log (:func:`consumer_user_stats`):
        as it ended, for one that stopped before the chain; {} without the process or its log."""
        proc = next((p for p in self.procs if p.name == "inference"), None)
        return {} if proc is None else consumer_user_stats(proc.log())

    def stitcher_final(self) -> dict:
        """The stitcher's own last statistics (``userStats``), from the report that PvaPy's
        collector logs as it ends, after the stitcher's stop() has placed the frames still waiting
        for their positions; {} when there is none since it was told to stop (killed, or not
        stopped here)."""
        proc = next((p for p in self.procs if p.name == "stitch"), None)
        if proc is None or self.stitch_log_from is None:
            return {}
        try:
            with open(proc.log_path, "rb") as f:
                f.seek(self.stitch_log_from)
                return last_user_stats(f.read().decode(errors="replace"))
        except OSError:
            return {}

    def frames_sent(self, n_scan: int | None) -> int | None:
        """The frames the sim server published (its report as it exits: fewer than the scan's
        ``n_scan`` when it was stopped early); ``n_scan`` where it gave none; 0 where it was never
        started (stopped before it); None for a detector."""
        if self.source is None:
            return None if n_scan is None else 0
        published = live.sim_server_published(self.source.log())
        return published if published is not None else n_scan

    def procs_in_stop_order(self) -> list[live.Proc]:
        rank = {name: k for k, name in enumerate(UPSTREAM)}
        return sorted(self.procs, key=lambda p: rank.get(p.name, len(UPSTREAM)))


MAX_START_DELAY_S = 600.0  # clients connect in seconds; a longer wait is a typo that never ends
MAX_CONSUMERS = 64  # [inference] consumers
# what pvapy-ad-sim-server can publish (PvaPy's AdImageUtility: an NTNDArray's value union)
NTNDARRAY_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")


def last_errors(log: str, n_lines: int = 15) -> str:
    """The end of a log's last traceback, else its last lines that name an error, else
    its last lines: why a process that is still running does not answer."""
    lines = log.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    if starts:  # up to its exception's line, the first one not indented: not what was logged after it
        end = next((i for i in range(starts[-1] + 1, len(lines)) if lines[i][:1] not in ("", " ", "\t")), len(lines))
        picked = lines[starts[-1] : end + 1]
    else:
        # whole words: not the statistics' keys (errorRate, nErrors, ...) that PvaPy logs
        picked = [line for line in lines if re.search(r"\b(error|exception|fail(ed|ure)?)\b", line, re.I)] or lines
    return "\n".join(picked[-n_lines:]) or "(the log is empty)"


def summary(cfg: LaunchConfig, snap: Snapshot, n_sent: int | None, delivered_fps: float | None = None,
            n_scan: int | None = None) -> list[str]:
    lines = []
    if n_sent is not None:
        of = f" (of {n_scan} in the scan: the replay was stopped)" if n_scan is not None and n_sent < n_scan else ""
        lines.append(f"frames sent          {n_sent}{of}")
    rate = f", at most {delivered_fps:.0f} frames/s over 5 s" if delivered_fps else ""
    lines.append(f"inference processed  {snap.processed()} (dropped {snap.dropped()}, bad {snap.bad()}{rate})")
    if cfg.hdf5 is not None:
        lines.append(f"images written       {snap.written()} (HDF5 files in {cfg.hdf5['args']['outputDirectory']})")
        lines += _writer_losses(cfg, snap)
    if cfg.stitch is not None:
        s = snap.stitch
        # every frame the stitcher received: placed, not placed (why), or still waiting for its position
        more = [f"wrong shape {_user(s, 'nFramesWrongShape')}"] if _user(s, "nFramesWrongShape") else []
        if snap.waiting():
            more.append(f"{snap.waiting()} still waiting for positions when stopped")
        if _user(s, "nFramesAfterStop"):
            more.append(f"{_user(s, 'nFramesAfterStop')} handed over after it stopped")
        bad = _user(s, "nBadFrames") - _user(s, "nFramesWrongShape")  # not received: no image
        lines.append(f"frames placed        {snap.placed()} of {_user(s, 'nFramesReceived')} received "
                     f"(no position {_user(s, 'nFramesNoPosition')}, outside {_user(s, 'nFramesOutside')}, "
                     + "".join(f"{m}, " for m in more) + f"coverage {_user(s, 'coverage', 0.0):.1%})"
                     + (f"; {bad} more could not be decoded" if bad else ""))
        channels = ", ".join(position_channels(cfg))
        if channels:
            came = (f"no update came from {channels}" if not _user(s, "nMetadataReceived")
                    else f"{_user(s, 'nMetadataReceived')} updates from {channels}")
            lines.append(f"metadata positions   {_user(s, 'nFramesByMetadata')} of {snap.placed()} frames placed: "
                         f"{came} (the others: the frames' attributes or the positions file)")
        lines.append(f"stitcher cost        {_user(s, 'stitchTimeUs', 0.0):.0f} us CPU per frame")
        # the collector's gaps that no output carried: frames inference dropped or refused, and
        # frames it never published otherwise (never received: a consumer that left the group
        # or an upstream queue that overflowed; or held by a consumer that was killed)
        upstream = snap.collector_lost() - snap.stitcher_lost()
        refused = min(upstream, snap.dropped() + snap.bad())
        parts = [f"{refused} of them dropped or refused by inference"] if refused else []
        if upstream > refused:
            parts.append(f"{upstream - refused}{'' if refused else ' of them'} never published by inference "
                         "(not received by a consumer, or held by one that exited)")
        lines.append(f"collector lost       {snap.collector_lost()} (missed + rejected"
                     + (f"; {' and '.join(parts)}, not lost by the collector)" if parts else ")"))
    reset = snap.stats_resets()
    if reset:  # counts that no longer start at the run's start: neither a loss nor "no frame lost" can be told
        unjudged = (f"not judged: the statistics of {', '.join(reset)} were reset (reset_stats) during the run, "
                    "so their totals do not count every frame")
        if n_sent is not None:
            lines.append(f"frames lost          {unjudged}")
        lines.append(f"verdict              {unjudged}")
        return lines
    if n_sent is not None:
        reached = snap.written() if cfg.hdf5 is not None else snap.processed()
        bad = (f" ({snap.bad()} of them bad frames, refused by inference: its log says why)"
               if snap.bad() and n_sent - reached > 0 else "")
        lines.append(f"frames lost          {n_sent - reached}{bad}")
    where = losses(cfg, snap, n_sent)
    if where or n_sent is not None:
        lines.append(f"verdict              {'frames lost: ' + '; '.join(where) if where else 'no frame lost'}")
    return lines


# ---------------------------------------------------------------- command


def get_args_parser(prog: str = "edge-ptychonn launch") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="the chain's TOML file (example: scripts/chain.toml)")
    p.add_argument("--check", action="store_true",
                   help="validate the file (the scan, each processor's arguments and the inference model "
                        "too), print the validated settings as JSON, start nothing")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        cfg = LaunchConfig.load(args.config)
        check_frames_fit(cfg)
    except ValueError as exc:
        print(f"edge-ptychonn launch: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}, indent=2))
        return 0
    return run(cfg)


def frames_lost(cfg: LaunchConfig, snap: Snapshot, n_sent: int | None) -> int | None:
    """Frames of a replayed scan that did not reach the end of the chain (the HDF5 files
    when there are writers, else the inference outputs); None for a detector chain."""
    if n_sent is None:
        return None
    return n_sent - (snap.written() if cfg.hdf5 is not None else snap.processed())


def _writer_losses(cfg: LaunchConfig, snap: Snapshot) -> list[str]:
    """The summary's line on the frames the HDF5 writers lost, by cause (from their status), and
    their failed HDF5 operations, naming their log (where each kind of error is logged); none
    when they lost nothing and nothing failed. Before, a full disk showed only "images written 1"
    and "frames lost 199"."""
    counts, lost = snap.writer_losses(), snap.writer_lost()
    if not lost and not counts["nWriteErrors"]:
        return []
    causes = [f"{counts[key]} {cause}" for key, cause in WRITER_LOSSES.items() if counts[key]]
    failed = f"{counts['nWriteErrors']} HDF5 creates, writes, flushes or closes failed"
    return [f"writers lost         {lost} ({'; '.join(causes + [failed])}): their log "
            f"{cfg.base / cfg.log_dir / 'hdf5.log'} says why"]


def losses(cfg: LaunchConfig, snap: Snapshot, n_sent: int | None) -> list[str]:
    """Where the chain lost frames, one phrase per place ([]: nowhere): the frames of a replayed
    scan that did not reach the end of the chain (:func:`frames_lost`; how many of them the HDF5
    writers lost, by cause in the summary's "writers lost"), and those the stitcher's
    collector missed or rejected (they never reached the stitcher, whatever reached the files).
    Any of them makes the exit status 1."""
    where = []
    lost = frames_lost(cfg, snap, n_sent)
    by_writers = snap.writer_lost()
    if lost:
        why = ([f"{snap.dropped()} dropped by inference"] if snap.dropped() else []) \
            + ([f"{snap.bad()} refused by inference as bad"] if snap.bad() else []) \
            + ([f"{by_writers} lost by the writers: 'writers lost' above"] if by_writers else [])
        where.append(f"{lost} of the {n_sent} sent did not reach the {'HDF5 files' if cfg.hdf5 is not None else 'inference outputs'}"
                     + (f" ({'; '.join(why)})" if why else ""))
    if cfg.stitch is not None and snap.stitcher_lost():
        where.append(f"{snap.stitcher_lost()} never reached the stitcher (its collector missed or rejected them)")
    return where


def run(cfg: LaunchConfig, prog: str = "edge-ptychonn launch", results: list | None = None) -> int:
    """Start the chain, print the status line until it is done, stop it, print the
    summary (and the scored, pictured stitched image). Exit status: 0, 1 when frames
    were lost anywhere (:func:`losses`, the summary's verdict), a stage's statistics were reset
    during the run (no loss can be judged: :meth:`Snapshot.stats_resets`) or a process failed, 2 when the chain could not start (a bad scan or
    argument, on stderr), 130 on Ctrl-C, SIGTERM or SIGHUP. ``results``: a list to
    which ``(snapshot, frames sent, delivered fps)`` is appended: the status once the
    chain fell idle (stopped early: once what the sim server sent went through, see
    :meth:`Chain.settle`), each channel's last answer kept and the stitcher's counts its own
    as it ended (:meth:`Chain.stitcher_final`); the frames the sim server published."""
    chain = Chain(cfg)
    n_scan = None
    snap = None
    code = 0
    with live.stop_on_signals():
        try:
            if cfg.source["scan"] is not None:
                import numpy as np

                n_scan = chain.n_scan = len(np.load(cfg.base / cfg.source["scan"], mmap_mode="r", allow_pickle=False))
            chain.start()
            snap = chain.watch()
        except (KeyboardInterrupt, live.Terminated):
            chain.say("\ninterrupted: stopping everything (a second Ctrl-C, SIGTERM or SIGHUP is ignored until that is done)")
            code = 130
        except RuntimeError as exc:
            chain.warn(f"{prog}: {exc}")
            code = 1
        except (ValueError, OSError, TypeError) as exc:
            print(f"{prog}: {exc}", file=sys.stderr, flush=True)
            code = 2
        finally:
            with live.signals_ignored():  # a second Ctrl-C, SIGTERM or SIGHUP must not cut the stopping short
                try:
                    if chain.source is not None and not chain.finished and code in (0, 130):
                        snap = chain.settle()  # the replay stopped early: what it sent is counted
                    elif snap is None and code in (0, 130):  # each silent channel's last answer kept
                        snap = chain.snapshot().merged(chain.latest)
                finally:
                    chain.stop()
    n_sent = chain.frames_sent(n_scan)
    if snap is not None:  # a consumer stopped before the chain: its final counts, from its log
        snap = snap.with_inference_final(chain.inference_final())
    if snap is not None and cfg.stitch is not None:  # its frames placed as it stopped: its own final figures
        snap = snap.with_stitch_final(chain.stitcher_final())
        user = snap.stitch["userStats"] if snap.stitch else {}
        if position_channels(cfg) and user.get("nFramesReceived") and not user.get("nMetadataReceived"):
            chain.warn(f"warning: the stitcher's metadata channels {', '.join(position_channels(cfg))} sent no "
                       "update: no frame took its position from them (check [stitch] metadata_channels, and that "
                       "they are published)")
    if snap is not None:
        print("\n".join(summary(cfg, snap, n_sent, chain.delivered_fps(snap), n_scan)
                        + accuracy(cfg, since=chain.started_at, n_frames=n_sent)), flush=True)
        if results is not None:
            results.append((snap, n_sent, chain.delivered_fps(snap)))
        if code == 0 and (chain.failed or losses(cfg, snap, n_sent) or snap.stats_resets()):
            code = 1
    return code


def accuracy(cfg: LaunchConfig, since: float | None = None, n_frames: int | None = None) -> list[str]:
    """The last stitched image the stitcher saved (at ``since``, a ``time.time()``, or
    later: an earlier run's files in the folder are not this run's), scored against the
    scan's truth (when the replayed scan has its ``.npz``), and a PNG of both beside it.
    ``n_frames``: the frames the sim server sent (default: the scan's), named when they cover too
    little to be scored (with the remedy: ``accuracy.check_scorable``)."""
    if cfg.stitch is None or "outputDirectory" not in cfg.stitch["args"] or cfg.source["scan"] is None:
        return []
    folder = cfg.base / Path(cfg.stitch["args"]["outputDirectory"]).expanduser()
    saved = [f for f in sorted(folder.glob(f"{cfg.stitch['args'].get('filePrefix', 'stitch')}_scan*[0-9].npy"))
             if since is None or f.stat().st_mtime >= since]
    npz = (cfg.base / cfg.source["scan"]).with_suffix(".npz")
    if not saved or not npz.is_file():
        return []
    import numpy as np

    from edge_ptychonn.model_card import StitchSettings
    from edge_ptychonn.science.accuracy import check_scorable
    from edge_ptychonn.science.metrics import score_phase

    image = np.load(saved[-1])
    with np.load(npz) as z:
        truth = z["object_phase"] if "object_phase" in z.files else None
    weight_file = saved[-1].with_name(saved[-1].stem + "_weight.npy")
    if truth is None or truth.shape != image.shape or not weight_file.is_file():
        return [f"final stitched image  {saved[-1]}"]
    min_cover = cfg.stitch["args"].get("minCoverWeight", 0.5)
    covered = np.load(weight_file) >= min_cover
    try:
        if min_cover > 0:  # (0: every pixel counts, no scan is too thin)
            if n_frames is None:
                n_frames = len(np.load(cfg.base / cfg.source["scan"], mmap_mode="r", allow_pickle=False))
            check_scorable(cfg.source["scan"], covered, n_frames, StitchSettings(min_cover_weight=min_cover))
        scores = score_phase(image, truth, covered)
    except ValueError as exc:
        return [f"final stitched image  {saved[-1]} (not scored: {exc})"]
    lines = [f"final stitched image  {saved[-1]}: SSIM {scores['ssim']:.3f}, RMSE {scores['rmse_rad']:.3f} rad "
             f"vs the truth over {int(covered.sum())} covered pixels"]
    png = _save_png(saved[-1].with_suffix(".png"), image - scores["offset_rad"], truth, covered)
    lines.append(f"picture              {png} (live stitched phase beside the truth, "
                 f"black..white = {float(truth[covered].min()):.2f}..{float(truth[covered].max()):.2f} rad)")
    return lines


def _save_png(path: Path, image, truth, covered) -> Path:
    """The live stitched phase (left) beside the truth (right), cropped to the scanned region,
    one grey scale (the truth's range over the covered pixels), uncovered pixels black,
    titles above: an 8-bit PNG (Pillow)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rows, cols = np.flatnonzero(covered.any(1)), np.flatnonzero(covered.any(0))
    crop = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    image, truth, covered = image[crop], truth[crop], covered[crop]
    lo, hi = float(truth[covered].min()), float(truth[covered].max())
    grey = lambda a: (np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
    zoom = max(1, -(-256 // truth.shape[1]))  # small scans: enlarged (nearest) to at least 256 px wide
    # uncovered pixels hold the stitcher's fill, NaN too (configure fill=NaN): black, never cast
    left = np.kron(np.where(covered, grey(np.where(covered, image, lo)), 0), np.ones((zoom, zoom), np.uint8))
    right = np.kron(grey(truth), np.ones((zoom, zoom), np.uint8))
    h, w = right.shape
    gap, top = 16, 24
    canvas = Image.new("L", (2 * w + gap, h + top), 255)
    canvas.paste(Image.fromarray(left), (0, top))
    canvas.paste(Image.fromarray(right), (w + gap, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 6), "live stitched phase", fill=0)
    draw.text((w + gap + 4, 6), "ground truth", fill=0)
    canvas.save(path)
    return path
