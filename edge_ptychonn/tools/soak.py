"""``edge-ptychonn soak``: a long run at a steady rate; nothing may be lost, memory must stay flat.

Starts one ``pvapy-ad-sim-server`` (random frames of the model's size, looped
from a small cache, new uniqueIds all the way) and ``--consumers`` PtychoNN
consumers on loopback, collects every output, and every ``--every`` seconds
prints one line: frames published and each consumer's resident memory. At the
end it prints a summary: frames sent (what the sim server reports it published),
published, lost (sent but never out), the consumers' dropped/missed counts and
the memory growth; it exits with 0 when nothing was lost, every consumer lived
to the end and the memory of each grew by less than ``--max-growth-mb`` after
the warm-up (the first minute of the stream, and at least until each consumer
has published as many frames as the output queue the soak asks for holds,
2000: each slot used keeps a frame's memory; a run too short to sample memory
twice after it is not judged on memory, and says how long would be). Consumers that exit before they publish
a frame (they could not start) end the run early, with exit status 1; one
that dies later leaves the run going, its frames counted lost. Ctrl-C, SIGTERM or
SIGHUP stops the processes it started and exits with 130, with a line that says the run is
partial and what it published so far (``--json`` gets the figures so far, marked ``interrupted``). The processes' logs
stay in the folder named on the first line (under the temporary folder,
``TMPDIR``); the frames it generated are removed at the end. Not part of the
test suite: it runs for minutes (default 10).

Pick ``--fps`` at about 80 % of the highest lossless rate that
``edge-ptychonn bench`` measured for the same settings; without it, 80 % of
the engine's own rate (one engine of ``--cpu-threads`` threads, measured here for a
second) times ``--consumers``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_ptychonn.model_card import default_model_path
from edge_ptychonn.tools.launch import MAX_CONSUMERS, MAX_START_DELAY_S, MIN_FPS

# The output monitor's server-side queue. Each slot the server has filled keeps a
# frame's worth of memory in the consumer, so the consumer's resident memory grows
# until all slots are used: queue size x frame size (2000 x 64 kB = 128 MB here).
QUEUE_SIZE = 2000
from edge_ptychonn.tools import processes


def consumer_pids(parent: int, n_consumers: int) -> list[int]:
    """The processes that run the consumers: the parent itself, or its forked children."""
    return [parent] if n_consumers == 1 else processes.child_pids(parent)


def engine_rate(model: Path, engine: str, threads: int) -> float:
    from engines import EngineOptions, create_engine

    e = create_engine(engine, EngineOptions(model, max_batch=8, cpu_threads=threads))
    x = np.random.default_rng(0).poisson(20, (8, 1, *e.input_shape)).astype(np.float32)
    e.infer(x)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        e.infer(x)
        n += 8
    return n / (time.perf_counter() - t0)


WARMUP_S = 70.0  # the first minute and the sim server's (default) start delay: queues and caches fill


def warmup_seconds(start_delay_s: float, fps: float, consumers: int) -> float:
    """Seconds from the start before memory is judged: the sim server's start delay, then the
    first minute of the stream, and at least until each consumer has published :data:`QUEUE_SIZE`
    frames (every slot of the collector's server queue used once: each keeps a frame's memory),
    plus 10 s for the consumers' start. Before, a fixed 70 s: a consumer publishing fewer than
    about 33 frames/s was still filling its queue (64 kB a frame) and was reported as leaking."""
    return start_delay_s + max(60.0, QUEUE_SIZE * consumers / fps) + 10.0


def memory_growth(samples: list[tuple[float, list[float]]], warmup_s: float = WARMUP_S) -> float | None:
    """The most any consumer's resident memory (MB) grew between samples taken after the
    warm-up, or None when fewer than two were taken then (a short run: the warm-up's growth,
    the server queue filling, is no leak)."""
    warm = [rss for t, rss in samples if t >= warmup_s]
    if len(warm) < 2:
        return None
    return max((max(col) - col[0] for col in zip(*warm)), default=0.0)


def check_output_file(path: Path) -> None:
    """``--json``: a file that can be written once the run is over, checked before it starts (a
    run of minutes must not end in "no such folder" with its figures lost). The check leaves
    nothing: missing parent folders are made when the figures are written (before, here, and a
    run refused afterwards, an unknown engine, left them behind). Raises ValueError with the reason."""
    from edge_ptychonn.files import check_folder

    if path.is_dir():
        raise ValueError(f"--json {path} is a folder; give a file name")
    existing = next(p for p in [path.parent, *path.parent.parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ValueError(f"--json {path}: {existing} is not a folder")
    try:
        check_folder(path.parent)  # writable here (as root, os.access says yes even where it is not)
    except OSError as exc:
        raise ValueError(f"--json {path}: cannot be written: {exc}") from None


def _json_safe(value):
    """``value`` with every float that is not finite as None: the resident memory of a consumer that
    died reads NaN, which ``json.dumps`` writes as ``NaN``, a word strict JSON parsers refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_figures(path: Path, figures: dict) -> None:
    """``--json``: the figures, in the folders missing made now, written whole (a file cut short
    by a stop or a full disk is never left under ``path``); a memory sample of a consumer that
    was gone is null (the bench's report writer, :func:`~edge_ptychonn.tools.bench_report.write_json`)."""
    from .bench_report import write_json

    write_json(_json_safe(figures), path)


def get_args_parser(prog: str = "edge-ptychonn soak") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model_path(), help="ONNX model (default: the shipped one)")
    p.add_argument("--engine", default="onnxruntime", help="engine of the consumers (default: %(default)s)")
    p.add_argument("--consumers", type=int, default=1,
                   help=f"consumers, 1..{MAX_CONSUMERS} (default: %(default)s)")
    p.add_argument("--cpu-threads", type=int, default=1, help="cpuThreads of each consumer: engine threads per CPU worker (default: %(default)s)")
    p.add_argument("--fps", type=float, help="offered frames/s (default: 80%% of the engine's rate measured here, "
                   "times --consumers; needed with --engine zero)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long to stream (default: %(default)s)")
    p.add_argument("--every", type=float, default=30.0, help="seconds between progress lines (default: %(default)s)")
    p.add_argument("--start-delay", type=float, default=10.0,
                   help="seconds the sim server waits before streaming, so that every consumer has loaded its "
                        f"engine and connected (0..{MAX_START_DELAY_S:g}; default: %(default)s)")
    p.add_argument("--max-growth-mb", type=float, default=50.0,
                   help="resident memory a consumer may gain after the warm-up (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--no-realtime", action="store_true", help=processes.NO_REALTIME_HELP)
    p.add_argument("--prefix", default="soak", help="channel prefix: <prefix>:image, <prefix>:inference:<id>:output, "
                   "... (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> int:
    if args.no_realtime:  # this process's own collector too: first, as it executes this command again
        processes.give_up_realtime()
    finite = lambda v: v is not None and math.isfinite(v) and v > 0
    if not finite(args.minutes) or not 1 <= args.consumers <= MAX_CONSUMERS or args.cpu_threads < 0 \
            or not finite(args.every) or not (args.fps is None or finite(args.fps)) or not args.max_growth_mb >= 0 \
            or not 0 <= args.start_delay <= MAX_START_DELAY_S:
        # (a --max-growth-mb of nan or below 0 failed every run, with no word of why; a --consumers without
        # bound had pvapy-hpc-consumer fork that many consumers, each loading its own engine)
        print(f"edge-ptychonn soak: --minutes, --every and --fps must be finite numbers > 0, --consumers 1..{MAX_CONSUMERS}, "
              f"--cpu-threads >= 0, --max-growth-mb >= 0 and --start-delay 0..{MAX_START_DELAY_S:g}", file=sys.stderr)
        return 2
    if args.fps is not None and args.fps < MIN_FPS:  # the sim server's timer fails on a longer period
        print(f"edge-ptychonn soak: --fps must be >= {MIN_FPS:g}, got {args.fps:g}", file=sys.stderr)
        return 2
    if not args.prefix or any(c in args.prefix for c in "*\0") or args.prefix != args.prefix.strip():
        # '*' is PvaPy's stand-in for the consumer id in the channel names: the outputs would not be found
        print(f"edge-ptychonn soak: --prefix must be a channel name part without '*', spaces at its ends or NUL, "
              f"got {args.prefix!r}", file=sys.stderr)
        return 2
    from engines import EngineUnavailable
    from engines.onnx_model import read_signature
    from edge_ptychonn.stream.config import parse_processor_args
    from engines.registry import check_name

    try:  # before any process starts: one line, not a traceback
        check_name(args.engine)
        hw = read_signature(args.model).input_shape
        try:  # the consumers' own parsing (its range of cpuThreads), in the soak's option names
            parse_processor_args({"modelPath": str(args.model), "cpuThreads": args.cpu_threads})
        except ValueError as exc:
            raise ValueError(str(exc).replace("cpuThreads", "--cpu-threads", 1)) from None
        if args.json is not None:
            check_output_file(args.json)
        if args.fps is None and args.engine == "zero":  # it computes nothing: its "rate" is a memory copy's
            raise ValueError("--engine zero needs --fps: it computes no model, so its own rate says nothing about "
                             "what the consumers, the sim server and the transport sustain (see 'edge-ptychonn bench' "
                             "for the zero-cost ceiling)")
        rate = engine_rate(args.model, args.engine, args.cpu_threads)  # the engine starts here, or says why not
        fps = args.fps or 0.8 * rate * args.consumers
    except (ValueError, EngineUnavailable) as exc:
        print(f"edge-ptychonn soak: {exc}", file=sys.stderr)
        return 2
    env = processes.use_loopback()
    ok, reason = processes.loopback_multicast()
    if not ok and args.consumers > 1:
        print(f"warning: {reason}", file=sys.stderr)
    runtime_s = args.minutes * 60
    realtime = processes.realtime_allowed() and not args.no_realtime
    if realtime:
        print(f"soak: {processes.REALTIME_NOTE}", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="edge-ptychonn-soak-"))
    frames = work / "frames.npy"
    np.save(frames, np.random.default_rng(1).poisson(20, (200, *hw)).astype(np.int16))
    prefix, image = f"{args.prefix}:inference", f"{args.prefix}:image"
    # the consumers run in the project root: a relative --model is taken from here, where soak was called
    p_args = {"modelPath": str(args.model.absolute()), "engine": args.engine, "cpuThreads": args.cpu_threads}
    procs = []
    print(f"soak: {args.consumers} consumer(s), {args.engine}, {fps:.0f} frames/s for {args.minutes:g} min; "
          f"logs in {work}", flush=True)
    collector, samples = None, []  # samples: (seconds, [rss per consumer])
    # SIGTERM and SIGHUP stop it like Ctrl-C: the finally below stops what it started
    with processes.stop_on_signals():
        try:
            consumers = processes.start("consumers", processes.consumer_argv(
                image, prefix, args.consumers, "processors.ptychonn.PtychoNNProcessor", p_args,
                runtime_s=0), env, work, into=procs, realtime=realtime)  # no runtime of their own (PvaPy's 0): stopped below
            # the 200 frames over and over; 5 s after the last for the frames still queued for a slow consumer
            sim = processes.sim_server_argv(frames, image, fps, start_delay_s=args.start_delay, runtime_s=runtime_s,
                                            replay_once=False, shutdown_delay_s=5.0)
            server = processes.start("sim", sim, env, work, into=procs, realtime=realtime)
            outputs = [f"{prefix}:{i}:output" for i in range(1, args.consumers + 1)]
            collector = processes.OutputCollector(outputs, keep_images=False, keep_attributes=False,
                                                  queue_size=QUEUE_SIZE)
            t0 = time.monotonic()
            delay = args.start_delay
            end = t0 + delay + runtime_s + 15
            next_report = t0 + delay + args.every
            forked, failed_at_start = set(), False
            while time.monotonic() < end and server.running() or time.monotonic() < t0 + delay + 2:
                time.sleep(0.5)
                # they could not start: nothing to learn. With -nc N PvaPy's parent lives on when every
                # forked consumer has failed (before: the soak streamed its whole --minutes into nothing)
                if collector.count() == 0 and not consumers.running():
                    failed_at_start = True
                    print(f"soak: the consumers exited before publishing a frame (code {consumers.popen.returncode}); "
                          f"log {consumers.log_path}", file=sys.stderr, flush=True)
                    break
                if collector.count() == 0 and processes.forked_consumers_gone(consumers, args.consumers, forked):
                    failed_at_start = True
                    print(f"soak: the consumers exited before publishing a frame (every forked consumer of pid "
                          f"{consumers.pid}); log {consumers.log_path}", file=sys.stderr, flush=True)
                    break
                if time.monotonic() >= next_report:
                    next_report += args.every
                    rss = [processes.rss_mb(p) for p in consumer_pids(consumers.pid, args.consumers)]
                    samples.append((time.monotonic() - t0, rss))
                    got = collector.count()
                    print(f"[{time.monotonic() - t0:6.0f} s] published {got}, RSS MB {', '.join(f'{r:.0f}' for r in rss)}",
                          flush=True)
            exited = failed_at_start or not consumers.running()
            statuses = [None] * args.consumers
            if not exited:  # the frames on their way, and the consumers' final counts
                collector.wait_count(10**12, timeout_s=15, idle_s=5)
                statuses = processes.wait_status([f"{prefix}:{i}:status" for i in range(1, args.consumers + 1)],
                                                 timeout_s=5)
        except (KeyboardInterrupt, processes.Terminated):
            # what it measured so far stays: the count and the last memory sample here, all in --json
            got = collector.count() if collector is not None else 0
            print("\nsoak: interrupted: stopping what it started; a partial run, not judged: published "
                  f"{got}" + (f", RSS MB {', '.join(f'{r:.0f}' for r in samples[-1][1])} at {samples[-1][0]:.0f} s"
                              if samples else ""), flush=True)
            if args.json:
                write_figures(args.json, {"interrupted": True, "fps_offered": fps, "minutes": args.minutes,
                                          "consumers": args.consumers, "engine": args.engine,
                                          "frames_published": got, "rss_mb": samples})
            return 130
        finally:
            with processes.signals_ignored():  # a second signal must not cut the stopping short
                if collector is not None:
                    collector.close()
                for proc in reversed(procs):  # the sim server has nothing to save (and takes no SIGINT while it waits)
                    proc.stop(grace_s=1.0 if proc.name == "sim" else 5.0)
                # the logs stay for reading; the generated frames (megabytes, made afresh each run) go
                frames.unlink(missing_ok=True)
    ids = sorted(r.unique_id for name in outputs for r in collector.received[name])
    # the sim server's own count (uniqueIds 1..sent): the highest id out misses a lost tail
    published = processes.sim_server_published(server.log())
    sent = max(published or 0, ids[-1] if ids else 0)
    lost = sent - len(set(ids))
    # a consumer that died: its memory reads NaN (one process) or its process is missing (-nc N)
    gone = exited or any(len(rss) < args.consumers or any(np.isnan(rss)) for _, rss in samples)
    user = [s["userStats"] for s in statuses if s]
    dropped = sum(u["nFramesDropped"] for u in user)
    missed = sum(u["nFramesMissed"] for u in user)
    warmup_s = warmup_seconds(args.start_delay, fps, args.consumers)
    growth = memory_growth(samples, warmup_s)
    figures = {"fps_offered": fps, "minutes": args.minutes, "consumers": args.consumers, "engine": args.engine,
               "frames_sent": sent, "frames_published": len(ids), "frames_lost": lost, "dropped": dropped,
               "missed": missed, "consumer_gone": gone, "rss_mb": samples, "rss_growth_after_warmup_mb": growth}
    print(f"soak: sent {sent}, published {len(ids)}, lost {lost} (dropped {dropped}, missed {missed}); "
          + (f"resident memory grew {growth:.1f} MB after the {warmup_s:.0f} s warm-up"
             + ("" if growth < args.max_growth_mb else f", not less than --max-growth-mb {args.max_growth_mb:g}")
             if growth is not None else
             f"memory not judged (no two samples after the {warmup_s:.0f} s warm-up: run for at least "
             f"{math.ceil((warmup_s + 2 * args.every - args.start_delay) / 60 * 10) / 10:g} min)")
          + ("; a consumer exited during the run" if gone else ""))
    figures["warmup_s"] = warmup_s
    if args.json:
        write_figures(args.json, figures)
    memory_ok = growth is None or growth < args.max_growth_mb
    return 0 if lost == 0 and dropped == 0 and sent > 0 and memory_ok and not gone else 1
