"""``edge-ptychonn demo``: replay a scan through live PvaPy consumers and print a summary.

Starts ``pvapy-ad-sim-server`` replaying the scan once and ``pvapy-hpc-consumer``
with N PtychoNN consumers (batches of 8 frames each, in turn), collects every
output frame from ``<prefix>:<id>:output``, reads each consumer's status, and
prints frames sent / received / published / missed, rate and latency. With a
simulated scan (its ``.npz`` truth beside the ``.npy``) it also stitches the
phase from the frames that came back and scores it against the truth.
Everything it started is stopped by process id, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_ptychonn.model_card import ModelCard, StitchSettings, default_model_path, find_card
from edge_ptychonn.progress import Progress
from edge_ptychonn.science import accuracy

from . import processes as live

DEFAULT_SCAN_SEED = 1001


def generated_dir() -> Path:
    """Where simulated scans are kept: ``data/generated/`` in a source checkout,
    else ``~/.cache/edge-ptychonn`` (an installed package's folder may be read-only)."""
    checkout = Path(__file__).resolve().parents[2] / "data"
    return checkout / "generated" if checkout.is_dir() else Path.home() / ".cache" / "edge-ptychonn"


def get_args_parser(prog: str = "edge-ptychonn demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scan", type=Path, default=None,
                   help="(N, ny, nx) .npy of frames to replay (default: a held-out scan simulated on first use "
                        f"with the model's training settings and seed {DEFAULT_SCAN_SEED}, kept in data/generated/, "
                        "or in ~/.cache/edge-ptychonn/ when installed)")
    p.add_argument("--model", type=Path, default=default_model_path(), help="ONNX model (default: %(default)s)")
    p.add_argument("--engine", default="auto", help="inference engine: auto, torch, onnxruntime (default: %(default)s)")
    p.add_argument("--consumers", type=int, default=2, help="number of consumers (default: %(default)s)")
    p.add_argument("--fps", type=float, default=60.0, help="replay frame rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per inference batch and per distributor turn (default: %(default)s)")
    p.add_argument("--cpu-threads", type=int, default=1, help="engine CPU threads per consumer, 0 = all (default: %(default)s)")
    p.add_argument("--prefix", default="inference", help="output channel prefix: <prefix>:<id>:output (default: %(default)s)")
    p.add_argument("--channel", default="ad:image", help="detector channel the sim server publishes (default: %(default)s)")
    p.add_argument("--start-delay", type=float, default=12.0, help="seconds the sim server waits before streaming, so that all consumers connect (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up waiting for outputs after this many seconds (default: %(default)s)")
    p.add_argument("--logs", type=Path, default=None, help="folder for the processes' logs (default: a temporary folder)")
    return p


def _wait_outputs(collector: live.OutputCollector, total: int, deadline: float, idle_s: float = 15.0) -> int:
    """Show frames received on the outputs until all came, nothing new came for ``idle_s``, or the deadline."""
    bar = Progress(total, "outputs received", unit="frames")
    last_change = time.monotonic()
    while True:
        n = collector.wait_count(total, 1.0)
        now = time.monotonic()
        if n > bar.done:
            bar.update(n - bar.done)
            last_change = now
        if n >= total or now >= deadline or (n > 0 and now - last_change > idle_s):
            break
    bar.close()
    return collector.count()


def summary_rows(collector: live.OutputCollector, statuses: list[dict | None], n_sent: int) -> list[list[str]]:
    """The summary table: one row per consumer and a total."""
    rows = []
    totals = dict(received=0, published=0, missed=0, bad=0, dropped=0, outputs=0)
    all_arrivals = []
    for i, (channel, status) in enumerate(zip(collector.channels, statuses), start=1):
        got = collector.received[channel]
        arrivals = [r.arrival_s for r in got]
        all_arrivals += arrivals
        user = (status or {}).get("userStats", {})
        proc = (status or {}).get("processorStats", {})
        span = (max(arrivals) - min(arrivals)) if len(arrivals) > 1 else 0.0
        row = dict(
            received=user.get("nFramesReceived", 0), published=user.get("nFramesProcessed", 0),
            missed=proc.get("nMissed", 0), bad=user.get("nBadFrames", 0), dropped=user.get("nFramesDropped", 0),
            outputs=len(got),
        )
        for k in totals:
            totals[k] += int(row[k])
        rows.append([
            f"consumer {i}", "", str(row["received"]), str(row["published"]), str(row["outputs"]),
            str(row["missed"]), "", str(row["bad"] + row["dropped"]),
            f"{(len(got) - 1) / span:.1f}" if span > 0 else "-",
            f"{user.get('latencyP50Ms', 0):.1f}", f"{user.get('latencyP99Ms', 0):.1f}",
            f"{user.get('engine', '?')}/{user.get('device', '?')}",
        ])
    unique = {r.unique_id for v in collector.received.values() for r in v}
    span = (max(all_arrivals) - min(all_arrivals)) if len(all_arrivals) > 1 else 0.0
    rows.append([
        "total", str(n_sent), str(totals["received"]), str(totals["published"]), str(len(unique)),
        str(totals["missed"]), str(n_sent - len(unique)), str(totals["bad"] + totals["dropped"]),
        f"{(len(all_arrivals) - 1) / span:.1f}" if span > 0 else "-", "", "", "",
    ])
    return rows


# missed: gaps PvaPy saw in the uniqueIds a consumer received; lost: sent but never on an output
HEADER = ["", "sent", "received", "published", "outputs", "missed", "lost", "bad+dropped", "rate (fps)", "p50 ms", "p99 ms", "engine/device"]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def ensure_scan(scan: Path | None, card: ModelCard | None) -> Path:
    """The scan to replay: ``scan``, or the model's held-out demo scan (its
    card's training scan settings with a seed no training used), simulated on
    first use into a file named after its settings (so a new model with other
    settings gets its own scan)."""
    if scan is not None:
        if not scan.is_file():
            raise FileNotFoundError(f"scan {scan} not found")
        return scan
    from edge_ptychonn.science.simulate import save_scan, simulate_scan

    settings = accuracy.held_out_settings(card, DEFAULT_SCAN_SEED)
    key = hashlib.sha256(json.dumps(settings.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    scan = generated_dir() / f"demo_scan-{key}.npy"
    if not scan.is_file() or not scan.with_suffix(".npz").is_file():
        print(f"simulating the held-out demo scan (seed {DEFAULT_SCAN_SEED}) into {scan} ...", file=sys.stderr)
        frames, truth = simulate_scan(settings)
        save_scan(scan, frames, truth)
    return scan


def accuracy_lines(scan: Path, collector: live.OutputCollector, out_dir: Path, card: ModelCard | None) -> list[str]:
    """Stitch the phase from the frames that came back over PvaPy and score it
    against the scan's truth (``.npz`` beside the ``.npy``), with trivial
    baselines and the model card's stitch settings (``science.accuracy``)."""
    if not scan.with_suffix(".npz").is_file():
        return [f"(no {scan.with_suffix('.npz').name} beside the scan: accuracy not scored)"]
    from edge_ptychonn.science.simulate import load_scan

    _, truth = load_scan(scan)
    n = len(truth.positions_px)
    results = {r.unique_id: r.image for v in collector.received.values() for r in v if 1 <= r.unique_id <= n}
    if not results:
        return ["no frames came back: nothing to stitch"]
    uids = sorted(results)
    try:  # frame k has uniqueId k + 1
        r = accuracy.score_scan("outputs", np.stack([results[u] for u in uids]), truth,
                                card.stitch if card else StitchSettings(), indices=np.array(uids) - 1)
    except ValueError as exc:
        return [f"accuracy not scored: {exc}"]
    np.save(out_dir / "stitched_phase.npy", r.image)
    rows = [["phase stitched from outputs", r.scores]] + [[f"baseline: {b}", bs] for b, bs in r.baselines.items()]
    table = [[label, f"{s['ssim']:.3f}", f"{s['psnr_db']:.2f}", f"{s['rmse_rad']:.4f}"] for label, s in rows]
    return [
        f"accuracy over the scanned region ({int(r.covered.sum())} pixels, {len(uids)}/{n} frames, "
        "constant phase offset removed):",
        format_table(["", "SSIM", "PSNR dB", "RMSE rad"], table),
        f"(stitched phase saved to {out_dir / 'stitched_phase.npy'})",
    ]


def main(args: argparse.Namespace) -> int:
    try:
        if not args.model.is_file():
            raise FileNotFoundError(f"model {args.model} not found")
        if args.consumers < 1 or args.batch_size < 1 or args.fps <= 0:
            raise ValueError("--consumers and --batch-size must be >= 1 and --fps > 0")
        card = find_card(args.model)
        scan = ensure_scan(args.scan, card)
    except (FileNotFoundError, ValueError) as exc:
        print(f"edge-ptychonn demo: {exc}", file=sys.stderr)
        return 2
    frames = np.load(scan, mmap_mode="r")
    n_sent = len(frames)
    env = live.use_loopback()
    ok, reason = live.loopback_multicast()
    if not ok and args.consumers > 1:
        print(f"warning: {reason}; with several PVA servers some consumers may not connect", file=sys.stderr)
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="edge-ptychonn-demo-"))
    processor_args = {"modelPath": str(args.model.resolve()), "engine": args.engine,
                      "batchSize": args.batch_size, "cpuThreads": args.cpu_threads}
    print(f"demo: {n_sent} frames {frames.shape[1]}x{frames.shape[2]} {frames.dtype} from {scan} at {args.fps:g} fps "
          f"-> {args.consumers} consumer(s), model {args.model.name}; logs in {log_dir}", file=sys.stderr)
    procs: list[live.Proc] = []
    collector = None
    try:
        procs.append(live.start("consumers", live.consumer_argv(
            args.channel, args.prefix, args.consumers, "processors.ptychonn.PtychoNNProcessor", processor_args,
            batch_updates=args.batch_size), env, log_dir))
        procs.append(live.start("sim-server", live.sim_server_argv(
            scan, args.channel, args.fps, start_delay_s=args.start_delay), env, log_dir))
        channels = [f"{args.prefix}:{i}:output" for i in range(1, args.consumers + 1)]
        collector = live.OutputCollector(channels)
        if not collector.wait_connected(args.start_delay):
            print("output channels did not all appear in time; see the consumers' log:\n" + procs[0].log()[-2000:], file=sys.stderr)
            return 1
        got = _wait_outputs(collector, n_sent, time.monotonic() + args.start_delay + args.timeout)
        statuses = live.wait_status(
            [f"{args.prefix}:{i}:status" for i in range(1, args.consumers + 1)],
            lambda records: sum(r["userStats"]["nFramesProcessed"] for r in records) >= got, timeout_s=8.0)
        print()
        print(format_table(HEADER, summary_rows(collector, statuses, n_sent)))
        print()
        for line in accuracy_lines(scan, collector, log_dir, card):
            print(line)
        print(f"\nView live images next time with: c2dv --app image --pv {args.prefix}:1:output")
        return 0 if got == n_sent else 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        if collector is not None:
            collector.close()
        for proc in reversed(procs):
            proc.stop()
