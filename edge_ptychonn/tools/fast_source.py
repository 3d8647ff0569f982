"""A frame source faster than ``pvapy-ad-sim-server``: a ``.npy`` scan published once on
one NTNDArray channel.

The bench's ``--source fast`` uses it; ``pvapy-ad-sim-server`` stays the default
source. For our consumers its records are the sim server's: PvaPy's
``AdImageUtility.generateNtNdArray2D`` records (mono 2-D, a ``ColorMode``
attribute, codec none, the sizes and dimensions of the frame), uniqueId k+1 for
frame k, ``timeStamp`` and ``dataTimeStamp`` the time the frame is published, on
a ``pvaccess.PvaServer`` record made as an empty NTNDArray, so that consumers
that subscribe through PvaPy's server-side distributor (``pvapy-hpc-consumer -nc
N``, a ``_[pydistributor=...]`` request) get their share as from the sim server.

What makes it faster: every record is built once, before the stream (during the
start delay); per frame only the two time stamps are set, with typed setters,
and the record is handed to the server (about 8 us of this process's CPU per
frame without clients, where the sim server sets the id and time stamps through
dict-style setters and, when ahead of its schedule, starts a thread per frame).
Pacing needs no thread: it sleeps until a frame's time only when it is ahead of
the schedule by more than 1 ms, and otherwise publishes at once, in bursts where
it has fallen behind.

The server starts at once (consumers may connect during the start delay); the
first frame goes out ``--start-delay`` seconds after that. After the last frame
it serves on for ``--shutdown-delay`` seconds (what is still queued for a slow
client is lost when it exits), then prints, as the sim server does::

    Server runtime: <s> seconds
    Published frames: <N> @ <R> fps

R: (N - 1) / (last publish time - first). SIGINT or SIGTERM stops it at once
(no more frames, no shutdown delay), with the same report; exit status 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

SLEEP_AHEAD_S = 1e-3  # sleep until a frame's time only when it is this far ahead of the schedule
CHECK_EVERY = 1000  # records built between checks for a stop signal
MAX_ATTRIBUTES = 1000  # --attributes: at most this many per frame


def build_records(frames: np.ndarray, stop: threading.Event | None = None, attributes: int = 0) -> list:
    """One NTNDArray per frame of ``frames`` (n, ny, nx), uniqueId k+1 for frame k; the first
    made by PvaPy's ``AdImageUtility.generateNtNdArray2D`` (what the sim server publishes),
    the others copies of it with their own pixels. ``attributes``: that many further double
    NDAttributes (``Attribute1``...) after ``ColorMode``, whose values change from frame to
    frame as a motor position's do (frame k's ``Attribute<j>`` is k + j / 1000). Stops early
    (a shorter list) once ``stop`` is set."""
    from pvapy.utility.adImageUtility import AdImageUtility

    key = AdImageUtility.NTNDA_DATA_FIELD_KEY_MAP[frames.dtype]
    template = AdImageUtility.generateNtNdArray2D(1, np.ascontiguousarray(frames[0]))
    records = [template]
    for k in range(1, len(frames)):
        if k % CHECK_EVERY == 0 and stop is not None and stop.is_set():
            break
        record = template.copy()
        record["value"] = {key: np.ascontiguousarray(frames[k]).ravel()}
        record.setInt("uniqueId", k + 1)
        records.append(record)
    if attributes:
        for k, record in enumerate(records):
            record["attribute"] = frame_attributes(attributes, k)
    return records


def frame_attributes(n: int, k: int = 0) -> list:
    """``ColorMode`` (mono) and ``n`` double NDAttributes ``Attribute1``... with frame ``k``'s
    values, k + j / 1000 for ``Attribute<j>``."""
    import pvaccess as pva
    from pvapy.utility.adImageUtility import AdImageUtility

    return [pva.NtAttribute("ColorMode", pva.PvInt(AdImageUtility.COLOR_MODE_MONO))] + [
        pva.NtAttribute(f"Attribute{j}", pva.PvDouble(k + j / 1000)) for j in range(1, n + 1)]


def load_frames(path: Path) -> np.ndarray:
    """The frames of ``path``, a ``.npy`` of shape (n, ny, nx) in a dtype an NTNDArray holds
    (memory-mapped: the records copy the pixels); ValueError says what is wrong."""
    from pvapy.utility.adImageUtility import AdImageUtility

    try:
        frames = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if frames.ndim != 3 or frames.shape[0] < 1 or 0 in frames.shape:
        raise ValueError(f"{path}: needs frames of shape (n, ny, nx) with n >= 1, has {frames.shape}")
    if frames.dtype.newbyteorder("=") not in AdImageUtility.NTNDA_DATA_FIELD_KEY_MAP:
        known = ", ".join(sorted(str(d) for d in AdImageUtility.NTNDA_DATA_FIELD_KEY_MAP))
        raise ValueError(f"{path}: dtype {frames.dtype} has no NTNDArray field; one of {known}")
    if not frames.dtype.isnative:
        frames = frames.astype(frames.dtype.newbyteorder("="))
    return frames


def time_stamp(now: float) -> dict:
    """A ``time_t`` structure (``secondsPastEpoch``, ``nanoseconds``, ``userTag``) of ``now``
    (``time.time()``)."""
    seconds = int(now)
    return {"secondsPastEpoch": seconds, "nanoseconds": int((now - seconds) * 1e9), "userTag": 0}


def stream(server, channel: str, records: list, fps: float, stop: threading.Event) -> tuple[int, float, float]:
    """Publish ``records`` in order on ``channel`` of ``server``, at ``fps`` (0: as fast as it
    can), until done or ``stop`` is set; returns (frames published, first and last publish
    time, ``time.perf_counter()``)."""
    period = 1.0 / fps if fps > 0 else 0.0
    update = server.updateUnchecked
    clock = time.perf_counter
    wall = time.time
    first = last = 0.0
    n = 0
    start = clock()
    for k, record in enumerate(records):
        if period:
            ahead = start + k * period - clock()
            if ahead > SLEEP_AHEAD_S and stop.wait(ahead):
                break
        if stop.is_set():
            break
        stamp = time_stamp(wall())
        record.setStructure("timeStamp", stamp)
        record.setStructure("dataTimeStamp", stamp)
        update(channel, record)
        last = clock()
        if n == 0:
            first = last
        n += 1
    return n, first, last


def report(n: int, first: float, last: float) -> str:
    """The lines the sim server prints as it exits: its run time and ``Published frames: N @ R fps``."""
    runtime = last - first if n > 1 else 0.0
    rate = (n - 1) / runtime if runtime > 0 else 0.0
    return f"Server runtime: {runtime:.4f} seconds\nPublished frames: {n:6d} @ {rate:.4f} fps"


def get_args_parser(prog: str = "python -m edge_ptychonn.tools.fast_source") -> argparse.ArgumentParser:
    from edge_ptychonn.cli_options import DefaultsFormatter

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="It replays the file once, then exits after the shutdown delay, printing 'Published frames: N @ R "
               "fps' as pvapy-ad-sim-server does. The short options are the sim server's.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("-if", "--input-file", type=Path, required=True,
                        help=".npy file of frames (n, ny, nx), any integer or float dtype an NTNDArray holds")
    parser.add_argument("-cn", "--channel-name", default="pvapy:image", help="the NTNDArray channel published")
    parser.add_argument("-fps", "--frame-rate", type=float, default=0.0,
                        help="frames per second; 0: as fast as it can")
    parser.add_argument("-std", "--start-delay", type=float, default=5.0,
                        help="seconds from the server's start to the first frame (consumers connect meanwhile; "
                             "the records are built then too)")
    parser.add_argument("-shd", "--shutdown-delay", type=float, default=1.0,
                        help="seconds it keeps serving after the last frame")
    parser.add_argument("-na", "--attributes", type=int, default=0,
                        help="further double NDAttributes on each frame besides ColorMode (Attribute1...), whose "
                             f"values change from frame to frame as motor positions do (0..{MAX_ATTRIBUTES})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for name in ("frame_rate", "start_delay", "shutdown_delay"):
        value = getattr(args, name)
        if not np.isfinite(value) or value < 0:
            parser.error(f"--{name.replace('_', '-')} must be finite and >= 0, got {value}")
    if not 0 <= args.attributes <= MAX_ATTRIBUTES:
        parser.error(f"--attributes must be 0..{MAX_ATTRIBUTES}, got {args.attributes}")
    try:
        frames = load_frames(args.input_file)
    except ValueError as exc:
        parser.error(str(exc))

    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    import pvaccess as pva

    server = pva.PvaServer()
    server.addRecord(args.channel_name, pva.NtNdArray(), None)  # an empty record, as the sim server's
    started = time.perf_counter()
    print(f"Serving {args.channel_name}: {len(frames)} frames ({frames.shape[2]}x{frames.shape[1]}, {frames.dtype}) "
          f"from {args.input_file}, at {args.frame_rate:g} fps (0: as fast as it can)", flush=True)
    records = build_records(frames, stop, args.attributes)
    built = time.perf_counter() - started
    print(f"Built {len(records)} records in {built:.2f} s", flush=True)
    if built > args.start_delay:
        print(f"warning: building the records took {built:.2f} s, longer than the start delay "
              f"({args.start_delay:g} s): the first frame is late", flush=True)
    n, first, last = 0, 0.0, 0.0
    try:
        if not stop.wait(max(started + args.start_delay - time.perf_counter(), 0.0)):
            n, first, last = stream(server, args.channel_name, records, args.frame_rate, stop)
            stop.wait(args.shutdown_delay)
    finally:
        server.stop()
        print(report(n, first, last), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
