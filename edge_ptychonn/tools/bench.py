"""``edge-ptychonn bench``: engine speed against the machine's limit, live pipeline
throughput, loss and latency, warm start; a JSON report, PNG plots and tables.

Parts (each can be skipped with ``--skip``):

warm     consumer launch -> first published output, first and second launch per engine
         (run first, while the file cache is as cold as this run can have it)
engine   the model's FLOPs per frame (counted from the ONNX graph), the machine's peak
         (large matrix product, same process), frames/s of every engine, precision, batch
framepath  the frame path's CPU cost per frame, stage by stage (decode, load, transform,
         zero-cost engine, encode, publish), what each NDAttribute of the input adds, the
         whole pipeline, the passthrough's own work and the floor (PvaPy's calls alone to read
         a frame and publish a model's image), in one process (no transport)
pipeline pvapy-ad-sim-server (--source fast: a faster source) -> N PtychoNN consumers ->
         outputs (collected in this process, or by --collectors child processes); offered
         rate swept upwards (fractions of the engine-alone rate); loss (at the source, in transport, by the
         processor), delivered rate, latency
zero     the same processor with the zero-cost engine (no network: the frame path alone),
         its ceiling found from below
floor    a processor that makes only PvaPy's calls to read each frame and publish a float32
         image with its uniqueId (tools/floor_processor.py): the ceiling of any Python
         processor of model outputs, found from below
passthrough  PvaPy's UserDataProcessor republishing every frame: the transport ceiling,
         found from below the same way

Every process started is stopped by its process id on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import faulthandler
import math
import os
import platform
import shlex
import sys
from pathlib import Path

from edge_ptychonn.cli_options import DefaultsFormatter
from edge_ptychonn.io_threads import POLICIES as IO_POLICIES
from edge_ptychonn.model_card import default_model_path
from edge_ptychonn.progress import Progress
from edge_ptychonn.stream.config import BATCH_RUNNERS
from engines.base import PRECISIONS, usable_cores
from engines.registry import ENGINES

from . import processes as live
from .fast_source import MAX_ATTRIBUTES as MAX_SOURCE_ATTRIBUTES

DEFAULT_MODEL = default_model_path()
PARTS = ("warm", "engine", "framepath", "pipeline", "zero", "floor", "passthrough")


def _listed(values: list, text: str, low: float = 1, what: str = "") -> list:
    """``values`` parsed from ``text``, refused (argparse: one line, exit 2) when empty or below ``low``."""
    if not values:
        raise argparse.ArgumentTypeError(f"give at least one value, got {text!r}")
    if any(v < low for v in values):
        raise argparse.ArgumentTypeError(f"{what or 'values'} must be >= {low}, got {text!r}")
    return values


def _parsed(kind, word: str, text: str, what: str = ""):
    """``kind(word)``, or argparse's one-line error naming what was expected (before: "invalid
    _ints value", the name of this module's parser, not of what the option takes)."""
    try:
        return kind(word)
    except ValueError:
        what = what or {int: "whole numbers", float: "numbers"}[kind]
        raise argparse.ArgumentTypeError(f"give comma-separated {what}, got {text!r}") from None


def _floats(text: str) -> list[float]:
    """Comma-separated finite numbers > 0 (a rate fraction of 0 or NaN offers no rate to measure),
    each once, in the order given."""
    values = list(dict.fromkeys(_parsed(float, x, text) for x in text.split(",") if x.strip()))
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be finite and > 0, got {text!r}")
    return _listed(values, text, low=0)


def _ints(text: str) -> list[int]:
    """Comma-separated integers >= 1, each once, in the order given (a count measured twice
    would only repeat itself)."""
    return _listed(list(dict.fromkeys(_parsed(int, x, text) for x in text.split(",") if x.strip())), text)


def _threads(text: str) -> list[int]:
    cores = usable_cores()
    counts = {cores if x.strip() == "all" else _parsed(int, x, text, "whole numbers or 'all'")
              for x in text.split(",") if x.strip()}
    return _listed(sorted(counts), text, what="counts ('all' or 1 and up)")


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _known(kind: str, known):
    """argparse type: comma-separated words, each one of ``known``."""

    def parse(text: str) -> list[str]:
        words = _words(text)
        unknown = [w for w in words if w not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {kind}(s) {unknown}; known: {', '.join(known)}")
        return words

    return parse


def _device(text: str) -> str:
    """argparse type: a device string (``edge_ptychonn.devices``)."""
    from edge_ptychonn.devices import parse_device

    try:
        parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _number(kind, low: float, above: bool = False, high: float | None = None):
    """argparse type: an int or float >= ``low`` (> ``low`` with ``above``), at most ``high``."""

    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < low or (above and value == low) or (high is not None and value > high):
            limits = f"{'>' if above else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {'finite and ' if kind is float else ''}{limits}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value" names it
    return parse


def default_consumers(cores: int) -> list[int]:
    """1, 2, then powers of two up to half the cores (one core each for receive and infer)."""
    counts, n = [1, 2], 4
    while n <= cores // 2:
        counts.append(n)
        n *= 2
    return counts


def get_args_parser(prog: str = "edge-ptychonn bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="ONNX model; when the default is missing, a random-weight PtychoNN of the default architecture is exported and used")
    parser.add_argument("--out", type=_folder, default=None, help="results folder (default: results/bench-<date>-<time>)")
    parser.add_argument("--quick", action="store_true",
                        help="a fast smoke run: short timings, one consumer, few points, no warm and zero parts "
                             "(an option given a value other than its default keeps it)")
    parser.add_argument("--skip", type=_known("part", PARTS), default=[], help=f"comma-separated parts to skip: {', '.join(PARTS)}")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the OS page cache before the first warm-start launch (root; affects the whole machine)")
    g = parser.add_argument_group("engine alone")
    g.add_argument("--engines", type=_known("engine", ENGINES), default=None,
                   help="engines to time (default: every installed engine that runs the model; 'zero' may be named)")
    g.add_argument("--precisions", type=_known("precision", PRECISIONS), default=None,
                   help="precisions to time (default: all each engine declares for the device)")
    g.add_argument("--batches", type=_ints, default=[1, 8, 32], help="batch sizes to time")
    g.add_argument("--threads", type=_threads, default=None,
                   help="CPU threads per engine, e.g. '1,all' (default: 1 and all cores)")
    g.add_argument("--workers", type=_threads, default=None,
                   help="engine copies running batches at once on the CPU (cpuWorkers), e.g. '1,all'; timed where "
                        "workers x threads fits the cores (default: 1 and all cores)")
    g.add_argument("--engine-seconds", type=_number(float, 0, above=True), default=1.5, help="timing window per engine, precision and batch")
    g.add_argument("--engine-repeats", type=_number(int, 1), default=3,
                   help="timing windows per engine, precision and batch; the best counts (a passing load on a "
                        "shared machine only slows a window down)")
    g.add_argument("--peak-seconds", type=_number(float, 0, above=True), default=0.7, help="timing of each peak matrix product")
    g.add_argument("--peak-sizes", type=_ints, default=None,
                   help="matrix sizes of the peak measurement (default: 512, 1024, 2048 on the CPU; 2048, 4096, "
                        "8192 on a GPU)")
    g.add_argument("--cuda-graphs", default="on", choices=("on", "off", "both"),
                   help="torch on a GPU: time full batches replayed from CUDA graphs (on), run eagerly (off), or both")
    g.add_argument("--device", type=_device, default="cpu",
                   help="engine device: 'cpu', 'auto', 'cuda' or 'cuda:N' (consumers given 'auto' take GPU (processorId - 1) %% nGPUs)")
    g = parser.add_argument_group("pipeline")
    g.add_argument("--pipeline-engine", default="auto", choices=("auto", *ENGINES),
                   help="the consumers' engine (default: the consumer's own default, 'auto')")
    g.add_argument("--pipeline-precision", default=None, choices=("auto", *PRECISIONS),
                   help="the consumers' precision ('auto' with engine 'auto' only; default: 'auto' with engine "
                        "'auto', as the consumer's default, else fp32)")
    g.add_argument("--pipeline-batch", type=_number(int, 1, high=256), default=8, help="batchSize, and --distributor-updates for N > 1")
    g.add_argument("--consumer-threads", type=_number(int, 0), default=0,
                   help="cpuThreads of each consumer (default 0: the consumer's own layout, its share of the "
                        "cores as workers of one thread; see --consumer-workers)")
    g.add_argument("--consumer-workers", type=_number(int, 0), default=0,
                   help="cpuWorkers of each consumer: batches it runs at once on the CPU, each on its own copy "
                        "of the engine (default 0: cores / N, at most 4)")
    g.add_argument("--consumer-io-threads", default="batch", choices=tuple(IO_POLICIES),
                   help="ioThreads of each consumer: 'batch' (pvAccess's I/O threads under SCHED_BATCH, the "
                        "consumers' default) or 'unchanged' (as pvAccess made them), to compare the two")
    g.add_argument("--consumer-batch-runner", default="auto", choices=BATCH_RUNNERS,
                   help="batchRunner of each consumer: which thread runs the batches: 'auto' (the consumers' "
                        "default: the receive thread for the zero-cost and GPU engines, the inference thread for "
                        "CPU engines), 'thread' or 'receive', to compare them")
    g.add_argument("--no-realtime", action="store_true", help=live.NO_REALTIME_HELP)
    g.add_argument("--source", default="sim", choices=("sim", "fast"),
                   help="the frames' source at every point of the pipeline, zero, floor and passthrough sweeps: 'sim', "
                        "PvaPy's pvapy-ad-sim-server; 'fast', edge_ptychonn.tools.fast_source (the same records, "
                        "built before the stream, for rates the sim server cannot publish); the warm start always "
                        "uses the sim server")
    g.add_argument("--source-attributes", type=_number(int, 0, high=MAX_SOURCE_ATTRIBUTES), default=0,
                   help="with --source fast: further double NDAttributes on each frame besides ColorMode, changing "
                        "from frame to frame as motor positions do (what a detector's attributes cost the consumers; "
                        "see --consumer-forward-attributes)")
    g.add_argument("--consumer-forward-attributes", default="true", choices=("true", "false"),
                   help="forwardAttributes of each consumer: 'true' (the default: outputs carry the input's "
                        "attributes) or 'false' (left unread), to compare the two")
    g.add_argument("--collectors", type=_number(int, 1), default=1,
                   help="processes that collect the consumers' outputs at each point: 1, the bench's own process; "
                        "more, that many child processes (at most one per consumer), each monitoring its share of "
                        "the output channels (the warm start always collects in the bench's own process)")
    g.add_argument("--consumers", type=_ints, default=None, help="consumer counts N (default: 1, 2, and more with more cores)")
    g.add_argument("--rate-fractions", type=_floats, default=[0.6, 0.8, 0.9, 1.0, 1.1],
                   help="offered rates as fractions of the engine-alone rate of the pipeline's engine, precision and batch "
                        "(to 0.1 frames/s; a fraction whose rate rounds to 0 is left out)")
    g.add_argument("--pipeline-climb", action="store_true",
                   help="find the PtychoNN pipeline's highest lossless rate by climbing from --ceiling-start, as the "
                        "zero-cost, floor and passthrough sweeps do, instead of at fractions of its engine alone (for engines "
                        "faster than the transport: GPUs)")
    g.add_argument("--ceiling-start", type=_number(float, 1), default=500.0,
                   help="first offered rate (frames/s) of the zero-cost, floor and passthrough sweeps (and of the pipeline's "
                        "with --pipeline-climb), which climb from there")
    g.add_argument("--ceiling-per-consumer", action="store_true",
                   help="the climbs start at --ceiling-start x N for N consumers")
    g.add_argument("--ceiling-factor", type=_number(float, 1, above=True), default=1.5, help="rate step of those sweeps (x up, / down)")
    g.add_argument("--ceiling-points", type=_number(int, 1), default=8, help="points of a climb at most (before bisection)")
    g.add_argument("--duration", type=_number(float, 0, above=True, high=3600), default=3.0, help="stream length per point (s)")
    g.add_argument("--max-frames", type=_number(int, 2), default=4000, help="frames per point at most")
    g.add_argument("--server-queue-size", type=_number(int, 0), default=1000, help="the consumers' --server-queue-size")
    g.add_argument("--stop-after", type=_number(int, 1), default=1, help="stop a sweep after this many points that do not keep up")
    g.add_argument("--extend", type=_number(int, 0), default=4,
                   help="points added above the highest rate (x1.2 each) while the pipeline still keeps up")
    g.add_argument("--down", type=_number(int, 0), default=4,
                   help="points added below the lowest rate (/1.5 each) while none keeps up")
    g.add_argument("--refine", type=_number(int, 0), default=1, help="bisections between the best sustained rate and the next")
    g.add_argument("--no-plots", action="store_true", help="write no PNG plots (the tables and report.json only)")
    return parser


def apply_quick(args: argparse.Namespace) -> None:
    """--quick's short timings and few points, for every option left at its default (one
    given another value keeps it); parts warm and zero are skipped."""
    quick = {
        "batches": [1, 8],
        "engine_seconds": 0.2,
        "engine_repeats": 1,
        "peak_seconds": 0.2,
        "peak_sizes": [512, 1024],  # 256 is too small: it measured bf16 a third below its peak (a CPU's)
        "consumers": [1],
        "rate_fractions": [0.3],
        "ceiling_start": 200.0,
        "ceiling_points": 1,
        "duration": 1.0,
        "refine": 0,
        "extend": 0,
        "down": 3,  # a loaded machine may not sustain the first rate: step down until one is
        "threads": [usable_cores()],
        "workers": [1],
    }
    defaults = get_args_parser().parse_args([])
    for name, value in quick.items():
        if getattr(args, name) == getattr(defaults, name):
            setattr(args, name, value)
    args.skip = sorted(set(args.skip) | {"warm", "zero", "floor"})


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        gpu = "unknown (torch not installed)"
    versions = {}
    for module in ("numpy", "onnxruntime", "torch", "pvaccess"):
        try:
            versions[module] = getattr(__import__(module), "__version__", "?")
        except ImportError:
            pass
    return {
        "cpu": cpu, "cores": usable_cores(), "gpu": gpu, "python": platform.python_version(),
        "load_before": _load(), "versions": versions,
    }


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def drop_caches(progress) -> bool:
    """Write back and drop the page cache, so that the first launch reads its libraries from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        progress(f"cannot drop the page cache ({exc}); the first launch is only as cold as the cache is")
        return False
    progress("page cache dropped")
    return True


def _folder(text: str) -> Path:
    """An ``--out`` folder: not empty (that would write into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return Path(text)


def resolve_model(path: Path, out_dir: Path, progress) -> tuple[Path, str | None]:
    """The model to benchmark, and a note when it is a stand-in."""
    candidates = [path] if path.is_absolute() else [path, live.PROJECT_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate, None
        if candidate.is_dir():
            raise refused(f"--model {path} is a folder; give the ONNX file, e.g. {DEFAULT_MODEL}")
    if path != DEFAULT_MODEL:
        raise refused(f"model {path} not found")
    try:
        from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx
    except ImportError as exc:
        raise SystemExit(f"edge-ptychonn bench: {path} not found, and a stand-in needs torch ({exc}); pass --model") from exc
    stand_in = out_dir / "random_ptychonn.onnx"
    export_onnx(build_model(ModelConfig(), seed=0), stand_in)
    note = (f"{path} not found: benchmarking a random-weight PtychoNN of the default architecture "
            f"({ModelConfig()}) exported to {stand_in}; speed does not depend on the weights")
    progress(note)
    return stand_in, note


def refused(message: str) -> SystemExit:
    """A bad argument or input file: ``message`` on stderr, exit status 2 (a ``SystemExit``
    with the message as its code exits with 1, which is for a run that did not get what it wanted)."""
    print(f"edge-ptychonn bench: {message}", file=sys.stderr)
    return SystemExit(2)


def main(args: argparse.Namespace) -> int:
    from . import bench_engine as be
    from . import bench_pipeline as bp
    from . import bench_report as br

    # A crash in a native library (this process loads torch or ONNX Runtime and pvAccess) prints
    # every thread's Python stack to stderr: twice on a GPU host the bench died of a
    # segmentation fault at its first pipeline point (the same commands run again completed),
    # before this was on; a likely cause, channels destroyed while pvAccess still called them
    # back, is fixed (processes.stop_monitor). Not where stderr is no file (a caller capturing it).
    with contextlib.suppress(AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        faulthandler.enable()
    if args.no_realtime:  # this process's own collector too: first, as it executes this command again
        live.give_up_realtime()
    if args.quick:
        apply_quick(args)
    if args.pipeline_precision is None:  # the consumer's default where the engine is too
        args.pipeline_precision = "auto" if args.pipeline_engine == "auto" else "fp32"
    if args.source_attributes and args.source != "fast":
        raise refused("--source-attributes needs --source fast (the sim server sends ColorMode alone)")
    if args.pipeline_precision == "auto" and args.pipeline_engine != "auto":
        raise refused("--pipeline-precision auto needs --pipeline-engine auto "
                      f"(the {args.pipeline_engine} engine runs one named precision)")
    # absolute: the processes it starts run in the project's folder, and the scans they replay are here
    out_dir = (args.out or Path("results") / dt.datetime.now().strftime("bench-%Y%m%d-%H%M%S")).resolve()
    made = next((p for p in [*reversed(out_dir.parents), out_dir] if not p.exists()), None)  # the top folder it makes
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where the folder would be, or no permission: a bad argument, in one line
        raise refused(f"cannot make the results folder {out_dir}: {exc.strerror or exc}") from None
    progress = Progress()
    cores = usable_cores()
    consumers = args.consumers or default_consumers(cores)
    report: dict = {
        # quoted for a shell: the command repeats the run (before, a path with a space in it became two words)
        "command": shlex.join(["edge-ptychonn", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else sys.argv),
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(),
    }
    realtime = live.realtime_allowed() and not args.no_realtime
    report["machine"]["pvaccess_realtime"] = realtime
    procs = bp.Procs(realtime=realtime)
    signals = contextlib.ExitStack()
    refused_run = False
    signals.enter_context(live.stop_on_signals())  # SIGTERM and SIGHUP stop it like Ctrl-C
    try:
        model_path, note = resolve_model(args.model, out_dir, progress)
        from engines.onnx_model import read_signature

        try:  # a file that is not a single-input ONNX model: one line, not a traceback
            signature = read_signature(model_path)
            flops = be.count_flops(model_path)
        except ValueError as exc:
            raise refused(str(exc)) from None
        report["model"] = {"path": str(model_path), "note": note, "input_hw": signature.input_shape,
                           "fixed_batch": signature.fixed_batch, **flops.to_dict()}
        if signature.fixed_batch:
            progress(f"the model's batch is fixed at {signature.fixed_batch}: smaller batches are padded, larger ones split")
        settings = bp.PipelineSettings(
            model_path=model_path.resolve(), engine=args.pipeline_engine, device=args.device,
            precision=args.pipeline_precision,
            batch=args.pipeline_batch, duration_s=args.duration, max_frames=args.max_frames,
            server_queue_size=args.server_queue_size, cores=cores, consumer_threads=args.consumer_threads,
            consumer_workers=args.consumer_workers, consumer_io_threads=args.consumer_io_threads,
            consumer_batch_runner=args.consumer_batch_runner, source=args.source, collectors=args.collectors,
            consumer_forward_attributes=args.consumer_forward_attributes == "true",
            source_attributes=args.source_attributes,
        )
        needs_pva = {"warm", "pipeline", "zero", "floor", "passthrough"} - set(args.skip)
        env = None
        if needs_pva or "framepath" not in args.skip:  # the frame path runs a PVA server in this process
            env = live.use_loopback()
        if needs_pva:
            if realtime:  # said only where processes are started
                progress(live.REALTIME_NOTE)
            ok, reason = live.loopback_multicast()
            report["machine"]["loopback_multicast"] = reason
            if not ok:
                progress(f"warning: {reason}; with several PVA servers some consumers may never connect")
            base_frames = bp.make_frames(64, signature.input_shape)

        if "warm" not in args.skip:
            progress.stage("warm start (launch -> first output)")
            engines = list(be.engine_precisions(args.device, args.engines))
            if args.drop_caches:
                report["dropped_caches"] = drop_caches(progress)
            measured: list = []  # what a Ctrl-C leaves is reported too
            try:
                bp.warm_start(settings, engines, base_frames, out_dir, env, procs, progress=progress, into=measured)
            finally:
                report["warm_start"] = [w.to_dict() for w in measured]
            if measured and all(w.error for w in measured):
                _failed_part(report, "warm start", measured[0].error)

        engine_results = []
        if "engine" not in args.skip:
            progress.stage(f"engine alone: {flops.flops_per_frame / 1e9:.3f} GFLOP per frame")
            precisions = _precisions(args)
            # fp32 always: emulated precisions are compared with it; tf32 has no CPU matrix product
            peak_device = _peak_device(args.device)
            wanted = sorted(({p for ps in precisions.values() for p in ps} | {"fp32"})
                            - ({"tf32"} if peak_device == "cpu" else set()))
            sizes = args.peak_sizes or ([512, 1024, 2048] if peak_device == "cpu" else [2048, 4096, 8192])
            progress(f"peak on {peak_device}: square matrix products of {sizes}, {', '.join(wanted)}")
            try:
                report["peaks"] = be.measure_peaks(wanted, args.peak_seconds, sizes, device=peak_device)
            except RuntimeError as exc:  # the GPU refused (memory, driver): no percentages, the engines still run
                report["peaks"] = {}
                progress(f"peak on {peak_device} not measured ({type(exc).__name__}: {exc}): no '% of peak'")
            for precision, peak in report["peaks"].items():
                note = " (emulated on this CPU: not a limit of the machine)" if peak.get("emulated") else ""
                progress(f"peak {precision}: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s{note}")
            try:  # what a Ctrl-C leaves is reported too
                engine_results, skipped = be.bench_engines(
                    model_path, list(precisions), args.batches, precisions, args.engine_seconds,
                    flops.flops_per_frame, report["peaks"], threads=args.threads or _threads("1,all"),
                    device=args.device, progress=progress, repeats=args.engine_repeats,
                    workers=args.workers or _threads("1,all"), into=engine_results,
                    cuda_graphs={"on": (True,), "off": (False,), "both": (True, False)}[args.cuda_graphs],
                )
            finally:
                report["engine"] = [r.to_dict() for r in engine_results]
            not_offered = _not_offered(args, precisions)
            for skip in not_offered:
                progress(f"engine {skip['engine']}: skipped ({skip['reason']})")
            report["engine_skipped"] = not_offered + skipped
            if not engine_results:
                report.setdefault("not_measured", []).append(
                    f"engine: no engine and precision asked for could run here (see 'skipped' above)")

        if "framepath" not in args.skip:
            from . import bench_frame_path as bf

            progress.stage("frame path: CPU per frame of each stage (zero-cost engine, one process)")
            report["frame_path"] = bf.measure(model_path, signature.input_shape,
                                              n_frames=400 if args.quick else 2000, batch=args.pipeline_batch)
            path = report["frame_path"]
            progress(f"frame path: {path['pipeline_us']:.1f} us/frame in the whole pipeline with batches run by the "
                     f"receiving thread, {path['pipeline_us_by_runner']['thread']:.1f} by the inference thread; "
                     f"passthrough's own work {path['passthrough_us']:.1f} us/frame; PvaPy's calls alone to "
                     f"republish a model's output (the floor) {path['floor_us']:.1f} us/frame; each input NDAttribute "
                     f"{path['attribute_us']['unchanged']:.1f} us/frame unchanged, "
                     f"{path['attribute_us']['changing']:.1f} changing")

        if {"pipeline", "zero", "floor", "passthrough"} - set(args.skip):
            # the pipeline's rates are fractions of it; the ceilings alone do not need it
            engine_alone = (_engine_alone(engine_results, settings, args, flops, report, progress)
                            if "pipeline" not in args.skip else None)
            report["pipeline"] = {"settings": {k: str(v) for k, v in vars(settings).items()}, "points": []}
            ratios = report.setdefault("ratios", [])
            delay = bp.StartDelay(settings.start_delay_s)
            for n in consumers:
                row = {"n_consumers": n, "engine_alone_fps": engine_alone, "ptychonn_fps": None,
                       "pipeline_over_engine": None, "zero_fps": None, "floor_fps": None, "passthrough_fps": None,
                       "ptychonn_over_passthrough": None, "zero_over_passthrough": None, "floor_over_passthrough": None,
                       "ptychonn_server_limited": None, "passthrough_server_limited": None,
                       "zero_server_limited": None, "floor_server_limited": None, "ptychonn_lower_bound": None,
                       "passthrough_lower_bound": None, "zero_lower_bound": None, "floor_lower_bound": None}
                ratios.append(row)
                if "pipeline" not in args.skip:
                    progress.stage(f"pipeline: {n} PtychoNN consumer(s), {settings.engine} {settings.precision} batch {settings.batch}")
                    if args.pipeline_climb:
                        points = _swept(report, lambda into: _climb(args, settings, "ptychonn", n, base_frames,
                                                                    out_dir, env, procs, progress, delay, into))
                    else:
                        rates = _rates(args.rate_fractions, engine_alone, progress) if engine_alone else []
                        points = _swept(report, lambda into: bp.sweep(
                            settings, "ptychonn", n, rates, base_frames, out_dir, env, procs, args.stop_after,
                            args.refine, progress, delay, extend=args.extend, down=args.down, into=into))
                    if points and all(p.error for p in points):
                        _failed_part(report, f"pipeline N={n}", points[0].error)
                    if not points and engine_alone:  # every fraction rounded to 0 frames/s: nothing was offered
                        report.setdefault("not_measured", []).append(
                            f"pipeline N={n}: no rate to offer (every --rate-fractions of the engine's "
                            f"{engine_alone:.1f} frames/s rounds to 0)")
                    best = bp.best_sustained(points)
                    if best:
                        row["ptychonn_fps"] = best.kept_up_fps
                        row["pipeline_over_engine"] = best.kept_up_fps / engine_alone
                    # the server could not offer more: the highest lossless rate is at least that
                    row["ptychonn_server_limited"] = any(p.server_limited and p.sustained for p in points)
                    row["ptychonn_lower_bound"] = bp.is_lower_bound(points, best)
                for processor, title in (("zero", "zero-cost engine (the frame path alone)"),
                                         ("floor", "floor (PvaPy's calls alone to republish a model's image)"),
                                         ("passthrough", "passthrough (transport ceiling)")):
                    if processor in args.skip:
                        continue
                    progress.stage(f"{title}: {n} consumer(s), climbing from {_ceiling_start(args, n):.0f} fps")
                    points = _swept(report, lambda into: _climb(args, settings, processor, n, base_frames, out_dir,
                                                                env, procs, progress, delay, into))
                    if points and all(p.error for p in points):
                        _failed_part(report, f"{processor} N={n}", points[0].error)
                    best = bp.best_sustained(points)
                    row[f"{processor}_fps"] = best.kept_up_fps if best else None
                    # the server could not offer more: the ceiling is at least that rate
                    row[f"{processor}_server_limited"] = any(p.server_limited and p.sustained for p in points)
                    row[f"{processor}_lower_bound"] = bp.is_lower_bound(points, best)
                if row["passthrough_fps"]:
                    for key in ("ptychonn", "zero", "floor"):
                        if row[f"{key}_fps"]:
                            row[f"{key}_over_passthrough"] = row[f"{key}_fps"] / row["passthrough_fps"]
    except (KeyboardInterrupt, live.Terminated):
        report["interrupted"] = True
        progress("interrupted: stopping every process started")
    except SystemExit:  # a refused model (:func:`refused`): nothing was measured, and no report says otherwise
        refused_run = True
        raise
    finally:
        with live.signals_ignored():
            procs.stop_all()
        bp.remove_scans(out_dir)
        signals.close()
        if refused_run:  # before: a report.json of a run that never ran, in a folder made for it
            _remove_empty_folders(out_dir, made)
        else:
            _write_report(report, out_dir, args.no_plots, progress)
    print(br.summary_text(report))
    print(f"\nreport: {out_dir / 'report.json'}")
    if report.get("interrupted"):
        return 130
    return 1 if report.get("not_measured") else 0  # a part asked for measured nothing


def _write_report(report: dict, out_dir: Path, no_plots: bool, progress) -> None:
    """report.json, then the plots (and report.json again, naming them)."""
    from . import bench_report as br

    report["machine"]["load_after"] = _load()
    report["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    br.write_json(report, out_dir / "report.json")  # first: whatever the plots do, the report is kept
    if not no_plots and report.get("pipeline", report.get("engine")):
        plots, reason = br.write_plots(report, out_dir)
        report["plots"] = plots
        if reason:
            progress(reason)
        br.write_json(report, out_dir / "report.json")


def _remove_empty_folders(out_dir: Path, top: Path | None) -> None:
    """The folders from ``out_dir`` up to ``top`` (the first one this run made; None: it made none),
    each only while empty: what a run refused before it measured anything leaves nothing behind."""
    if top is None:
        return
    for folder in [out_dir, *out_dir.parents]:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else was put there), or gone
            return
        if folder == top:
            return


def _peak_device(device: str) -> str:
    """Where the engines of ``--device`` run, for the peak: the device consumer 1 would take
    ('cuda:N' where torch sees a GPU), else 'cpu'."""
    if device == "cpu":
        return "cpu"
    from edge_ptychonn.devices import DeviceUnavailable, resolve_device
    from engines.torch_engine import TorchEngine

    try:
        return resolve_device(device, 1, TorchEngine.count_gpus())
    except DeviceUnavailable:  # no such GPU: the engines say so themselves; the peak is the CPU's
        return "cpu"


def _ceiling_start(args, n_consumers: int) -> float:
    """The first rate of a climb: --ceiling-start, times N with --ceiling-per-consumer."""
    return args.ceiling_start * (n_consumers if args.ceiling_per_consumer else 1)


def _climb(args, settings, processor: str, n_consumers: int, base_frames, out_dir, env, procs, progress, delay,
           into: list) -> list:
    """bench_pipeline.ceiling_sweep with the command line's climb settings."""
    from . import bench_pipeline as bp

    return bp.ceiling_sweep(
        settings, processor, n_consumers, _ceiling_start(args, n_consumers), base_frames, out_dir, env, procs,
        factor=args.ceiling_factor, max_points=args.ceiling_points, refine=args.refine, progress=progress,
        delay=delay, down=args.down, into=into,
    )


def _swept(report: dict, run) -> list:
    """The points of ``run(into)``, a sweep that appends each point to ``into`` as it is
    measured, added to the report; a sweep cut short (Ctrl-C, SIGTERM) leaves those it measured."""
    measured: list = []
    points = None
    try:
        points = run(measured)
    finally:
        report["pipeline"]["points"] += [p.to_dict() for p in (measured if points is None else points)]
    return points


def _rates(fractions: list[float], engine_alone: float, progress) -> list[float]:
    """The pipeline's offered rates: ``fractions`` of ``engine_alone``, to 0.1 frames/s, each
    once. A fraction whose rate rounds to 0 is left out, and said: a target of 0 would
    stream as fast as the server can."""
    rates = []
    for fraction in fractions:
        rate = round(fraction * engine_alone, 1)
        if rate <= 0:
            progress(f"rate fraction {fraction:g} of {engine_alone:.1f} frames/s rounds to 0 frames/s: not measured")
        elif rate not in rates:
            rates.append(rate)
    return rates


def _precisions(args) -> dict[str, tuple[str, ...]]:
    """{engine: precisions to time}: what each engine declares for the device, limited by --precisions."""
    from .bench_engine import engine_precisions

    out = {e: tuple(p for p in ps if not args.precisions or p in args.precisions)
           for e, ps in engine_precisions(args.device, args.engines).items()}
    return {e: ps for e, ps in out.items() if ps}


def _not_offered(args, precisions: dict[str, tuple[str, ...]]) -> list[dict]:
    """The engines named in --engines that ``precisions`` (:func:`_precisions`) leaves nothing to time,
    each a skipped entry with the reason: on --device they offer none of --precisions, or they do not
    run there at all (before, they were left out without a word under 'see skipped above')."""
    from engines import registry

    from .bench_engine import engine_precisions

    skipped = []
    for name in args.engines or []:
        if name in precisions:
            continue
        offered = engine_precisions(args.device, [name]).get(name, ())
        reason = (f"offers {', '.join(offered)} on device {args.device}, not {', '.join(args.precisions or ())}"
                  if offered else f"runs on {', '.join(registry.spec(name).devices)} only, not device {args.device}")
        skipped.append({"engine": name, "precision": ",".join(args.precisions or ()) or "-", "reason": reason})
    return skipped


def _failed_part(report: dict, part: str, first_error: str) -> None:
    """Say in ``report`` that every point of ``part`` failed: the bench then exits with 1 (it
    exited with 0 over a table of errors)."""
    report.setdefault("not_measured", []).append(f"{part}: every point failed; the first: {first_error}")


def _engine_alone(results, settings, args, flops, report, progress) -> float | None:
    """Best engine-alone frames/s (over layouts: threads, workers) of the pipeline's engine, precision and
    batch (measured now if the engine part did not)."""
    from . import bench_engine as be

    same = [r.frames_per_s for r in results
            if (r.engine, r.precision, r.batch) == (settings.engine, settings.precision, settings.batch)]
    if same:
        return max(same)
    progress(f"engine alone for the pipeline: {settings.engine} {settings.precision} batch {settings.batch}")
    extra: list = []
    try:  # what a Ctrl-C leaves is reported too
        extra, skipped = be.bench_engines(
            settings.model_path, [settings.engine], [settings.batch], {settings.engine: (settings.precision,)},
            args.engine_seconds, flops.flops_per_frame, report.get("peaks", {}), threads=args.threads or _threads("1,all"),
            device=args.device, progress=progress, repeats=args.engine_repeats, workers=args.workers or _threads("1,all"),
            into=extra,
        )
    finally:
        report.setdefault("engine", []).extend(r.to_dict() for r in extra)
    report.setdefault("engine_skipped", []).extend(skipped)
    if not extra:
        progress(f"cannot run {settings.engine} {settings.precision}: no pipeline sweep")
        report.setdefault("not_measured", []).append(
            f"pipeline: {settings.engine} {settings.precision} cannot run here (see 'skipped' above)")
        return None
    return max(r.frames_per_s for r in extra)
