"""The benchmark's outputs: JSON report, text tables and PNG plots.

Plots need matplotlib (``pip install 'edge-ptychonn[bench]'``); without it the
JSON report and the tables are still written and the plots are skipped with a
message.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def write_json(report: dict, path: Path) -> Path:
    from edge_ptychonn.files import write_bytes_whole

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_whole(path, (json.dumps(report, indent=2, default=str) + "\n").encode())  # never half a report
    return path


def _cell(value, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)


def table(headers: list[str], rows: list[list], specs: list[str] | None = None) -> str:
    """A plain-text table, also valid Markdown (pipes and a header rule)."""
    specs = specs or [""] * len(headers)
    cells = [[_cell(v, s) for v, s in zip(row, specs)] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda items: "| " + " | ".join(x.rjust(w) for x, w in zip(items, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _percent(r: dict) -> str | None:
    """'% of peak' cell: against the precision's own peak, or, for a precision emulated on
    this CPU, against the fp32 peak and marked so."""
    pct = r.get("percent_of_peak")
    if pct is None:
        return None
    if r.get("emulated"):
        return f"{pct:.1f} (emulated; of fp32 peak)"
    return f"{pct:.1f}"


def engine_table(report: dict) -> str:
    """The engine-alone table; a column 'CUDA graphs' where the torch engine ran on a GPU."""
    results = report.get("engine", [])
    graphs = any(r.get("cuda_graphs") is not None for r in results)
    rows = [
        [r["engine"], r["precision"], r["threads"], r.get("workers", 1), r["batch"], r["frames_per_s"],
         r["batch_ms_p50"], _percent(r)]
        + ([{None: "", True: "yes", False: "no"}[r.get("cuda_graphs")]] if graphs else [])
        for r in results
    ]
    return table(["engine", "precision", "threads", "workers", "batch", "frames/s", "ms/batch p50", "% of peak"]
                 + (["CUDA graphs"] if graphs else []), rows, ["", "", "", "", "", ".1f", ".1f", ""] + ([""] if graphs else []))


def peak_table(report: dict) -> str:
    """The measured peaks; the last column says native or emulated on a CPU, the GPU's name on one."""
    rows = []
    peaks = report.get("peaks", {})
    on_gpu = any(peak.get("device", "cpu") != "cpu" for peak in peaks.values())
    for precision, peak in peaks.items():
        libs = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peak["by_library"].items())
        kind = "emulated: not a limit of this machine" if peak.get("emulated") else "native"
        rows.append([precision, peak["flops_per_s"] / 1e9, libs, peak.get("device", "cpu") if on_gpu else kind])
    return table(["precision", "peak GFLOP/s", "by library (GFLOP/s)", "on this GPU" if on_gpu else "on this CPU"],
                 rows, ["", ".1f", "", ""])


def pipeline_table(report: dict) -> str:
    rows = []
    for p in report.get("pipeline", {}).get("points", []):
        state = "sustained" if p["sustained"] else ("behind" if p["lossless"] else ("error" if p["error"] else "loss"))
        if p.get("server_limited"):
            state += ", server-limited"
        rows.append([
            p["processor"], p["n_consumers"], p.get("engine") or "", p["target_fps"] or "max", p["offered_fps"], p["delivered_fps"],
            f"{p['n_lost']}/{p['n_offered']}", p.get("n_lost_source"), p["n_missed"], p.get("n_lost_processor"),
            p.get("n_lost_collector"), p["latency_p50_ms"], p["latency_p99_ms"], p["e2e_p99_ms"],
            p.get("cpu_consumer_us"), p.get("cpu_server_us"), p.get("machine_busy_pct"), state,
        ])
    return table(
        ["processor", "N", "engine", "target fps", "offered fps", "delivered fps", "lost", "at source", "nMissed",
         "by processor", "by collector", "p50 ms", "p99 ms", "e2e p99 ms", "consumer us/frame", "server us/frame",
         "busy %", "state"],
        # the target to 0.1 frames/s, as the sweeps set it (before: 8.2 shown as 8, and bisected 250.4 and 250.5 alike)
        rows, ["", "", "", ".1f", ".1f", ".1f", "", "", "", "", "", ".0f", ".0f", ".0f", ".0f", ".0f", ".0f", ""],
    )


def pipeline_sources(report: dict) -> str:
    """Which source published the pipeline points' frames and what collected their outputs
    (points of reports written before the bench had --source and --collectors: the sim server
    and the bench's own process)."""
    from .bench_pipeline import SOURCES, collected_by

    points = report.get("pipeline", {}).get("points", [])
    sources = dict.fromkeys(SOURCES.get(p.get("source", "sim"), p.get("source")) for p in points)
    collectors = dict.fromkeys(collected_by(p.get("collectors", 1), p["n_consumers"]) for p in points)
    return f"source: {', '.join(sources)}; outputs collected by {', '.join(collectors)}"


def _rounded(value: float, spec: str, up: bool = False) -> str:
    """``value`` with the decimals of ``spec`` (``.2f``), rounded down (up with ``up``) at
    the last digit shown, never to the nearest: a lower bound or a ratio read against a
    target is never shown above what was measured (``>= 0.89`` for 0.897, not ``>= 0.90``),
    an upper bound never below it."""
    digits = int(spec.strip(".f") or 0)
    scaled = round(value * 10**digits, 6)  # 0.29 x 100 is 28.999999999999996, not below 29
    return f"{(math.ceil(scaled) if up else math.floor(scaled)) / 10**digits:.{digits}f}"


def _at_least(fps, server_limited: bool, lower_bound: bool = False):
    """A ceiling, shown as ``>= N (server-limited)`` when the server could not offer more,
    ``>= N (top of the sweep)`` when no higher rate was found that it fell short of (N
    rounded down)."""
    if fps is None or not (server_limited or lower_bound):
        return fps
    return f">= {_rounded(fps, '.0f')} ({'server-limited' if server_limited else 'top of the sweep'})"


def _bounds(row: dict, key: str) -> tuple[bool, bool]:
    """(server-limited, only a lower bound) of one sweep's rate in a ratio row (reports
    written before the second flag have the first alone)."""
    server_limited = bool(row.get(f"{key}_server_limited"))
    return server_limited, server_limited or bool(row.get(f"{key}_lower_bound"))


def bounded_ratio(ratio, numerator_limited: bool, denominator_limited: bool, spec: str):
    """A ratio of two ceilings, either of which may be only a lower bound (server-limited, or
    the top of its sweep): ``<= r`` when only the denominator is (the true ratio can only be
    lower), ``>= r`` when only the numerator is, ``? (both lower bounds)`` when both are.
    ``r`` is rounded up after ``<=``, down otherwise (see :func:`_rounded`): a ratio is read
    against a target (>= 0.9), which a figure shown must not meet unless the ratio does."""
    if ratio is None:
        return None
    if numerator_limited and denominator_limited:
        return f"? ({ratio:{spec}}, both lower bounds)"
    if denominator_limited:
        return f"<= {_rounded(ratio, spec, up=True)}"
    if numerator_limited:
        return f">= {_rounded(ratio, spec)}"
    return _rounded(ratio, spec)


def summary_table(report: dict) -> str:
    rows = []
    for s in report.get("ratios", []):
        (ptychonn_server, ptychonn_limited), (zero_server, zero_limited), (floor_server, floor_limited), \
            (pass_server, pass_limited) = (_bounds(s, key) for key in ("ptychonn", "zero", "floor", "passthrough"))
        rows.append([s["n_consumers"], s["engine_alone_fps"],
                     _at_least(s["ptychonn_fps"], ptychonn_server, ptychonn_limited),
                     bounded_ratio(s["pipeline_over_engine"], ptychonn_limited, False, ".2f"),
                     _at_least(s.get("zero_fps"), zero_server, zero_limited),
                     _at_least(s.get("floor_fps"), floor_server, floor_limited),
                     _at_least(s["passthrough_fps"], pass_server, pass_limited),
                     bounded_ratio(s["ptychonn_over_passthrough"], ptychonn_limited, pass_limited, ".3f"),
                     bounded_ratio(s.get("zero_over_passthrough"), zero_limited, pass_limited, ".2f"),
                     bounded_ratio(s.get("floor_over_passthrough"), floor_limited, pass_limited, ".2f")])
    return table(
        ["N", "engine alone fps", "best lossless fps", "pipeline/engine", "zero-cost engine fps", "floor fps",
         "passthrough fps", "ptychonn/passthrough", "zero-cost/passthrough", "floor/passthrough"],
        rows, ["", ".1f", ".1f", ".2f", ".0f", ".0f", ".0f", ".3f", ".2f", ".2f"],
    )


def warm_table(report: dict) -> str:
    by_engine: dict[str, dict] = {}
    for w in report.get("warm_start", []):
        d = by_engine.setdefault(w["engine"], {"error": ""})
        d[w["launch"]] = w["first_output_s"]
        if w.get("error") and not d["error"]:
            d["error"] = w["error"].split(";")[0]
    rows = [[e, d.get("first"), d.get("second"), d["error"]] for e, d in by_engine.items()]
    return table(["engine", "first launch s", "second launch s", "error"], rows, ["", ".2f", ".2f", ""])


def summary_text(report: dict) -> str:
    parts = []
    model = report.get("model", {})
    if model:
        parts.append(f"model {model.get('path')}: {model.get('flops_per_frame', 0) / 1e9:.3f} GFLOP/frame"
                     + (f" ({model['note']})" if model.get("note") else ""))
    machine = report.get("machine", {})
    if machine:
        parts.append(f"machine: {machine.get('cpu')} x{machine.get('cores')}, load {machine.get('load_before')} -> "
                     f"{machine.get('load_after')}, GPU: {machine.get('gpu')}")
    if report.get("peaks"):
        parts += ["", "Measured peak (matrix product)", peak_table(report)]
    if report.get("engine"):
        parts += ["", "Engine alone", engine_table(report)]
    for skip in report.get("engine_skipped", []):
        workers = f" x {skip['workers']} workers" if skip.get("workers", 1) > 1 else ""
        layout = f" ({skip['threads']} threads{workers})" if skip.get("threads") is not None else ""
        parts.append(f"  skipped {skip['engine']} {skip['precision']}{layout}: {skip['reason']}")
    if report.get("frame_path"):
        from .bench_frame_path import table as frame_path_table

        parts += ["", "Frame path, CPU per frame (one process, no transport)", frame_path_table(report["frame_path"])]
    if report.get("pipeline", {}).get("points"):
        parts += ["", f"Pipeline points ({pipeline_sources(report)})", pipeline_table(report)]
    if report.get("ratios"):
        parts += ["", "Ratios (measured in this run)", summary_table(report)]
    if report.get("warm_start"):
        cold = "page cache dropped before the first launch" if report.get("dropped_caches") else "page cache as found"
        parts += ["", f"Launch -> first published output ({cold})", warm_table(report)]
    if report.get("plots"):
        parts += ["", "Plots: " + ", ".join(report["plots"])]
    for what in report.get("not_measured", []):
        parts.append(f"not measured: {what}")
    if report.get("interrupted"):  # Ctrl-C, SIGTERM, SIGHUP: a partial run, not the bench's figures
        parts.append("interrupted: a partial run; the tables hold only what was measured before the stop (a sweep "
                     "cut short has no best rate or ratios)")
    return "\n".join(parts)


# -- plots ---------------------------------------------------------------------------------
def _series(points: list[dict], processor: str) -> dict[int, list[dict]]:
    series: dict[int, list[dict]] = {}
    for p in points:
        if p["processor"] == processor and not p["error"]:
            series.setdefault(p["n_consumers"], []).append(p)
    return {n: sorted(ps, key=lambda p: p["offered_fps"]) for n, ps in sorted(series.items())}


def write_plots(report: dict, out_dir: Path) -> tuple[list[str], str | None]:
    """PNG plots; returns (file names written, reason when some or all could not be): a
    plot that fails (matplotlib missing or broken, a full disk) costs only the plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'edge-ptychonn[bench]'): plots skipped"
    except Exception as exc:  # an installed one that cannot start (a bad backend, a broken build)
        return [], f"matplotlib cannot start ({type(exc).__name__}: {exc}): plots skipped"
    written: list[str] = []
    try:
        _draw_plots(report, out_dir, plt, written)
    except Exception as exc:  # any failure of the plotting library: said, not raised
        plt.close("all")
        return written, f"plots stopped after {len(written)} written: {type(exc).__name__}: {exc}"
    return written, None


def _draw_plots(report: dict, out_dir: Path, plt, written: list[str]) -> None:
    """Draws each plot into ``out_dir``, its file name appended to ``written`` once saved."""
    points = report.get("pipeline", {}).get("points", [])
    for processor in ("ptychonn", "zero", "floor", "passthrough"):
        series = _series(points, processor)
        if not series:
            continue
        fig, (ax_rate, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
        top = max(p["offered_fps"] for ps in series.values() for p in ps)
        ax_rate.plot([0, top], [0, top], color="0.7", linestyle=":", label="delivered = offered")
        for n, ps in series.items():
            x = [p["offered_fps"] for p in ps]
            ax_rate.plot(x, [p["delivered_fps"] for p in ps], marker="o", label=f"N={n}")
            ax_loss.plot(x, [100.0 * p["n_lost"] / max(p["n_offered"], 1) for p in ps], marker="o", label=f"N={n}")
        ax_rate.set(xlabel="offered rate (frames/s)", ylabel="delivered rate (frames/s)", title=f"{processor}: delivered rate")
        ax_loss.set(xlabel="offered rate (frames/s)", ylabel="frames lost (%)", title=f"{processor}: loss")
        ax_loss.set_ylim(bottom=0, top=max(1.0, *(100.0 * p["n_lost"] / max(p["n_offered"], 1) * 1.1 for ps in series.values() for p in ps)))
        for ax in (ax_rate, ax_loss):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        name = f"pipeline_{processor}_rate.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for n, ps in series.items():
            x = [p["offered_fps"] for p in ps]
            line = None
            if processor in ("ptychonn", "zero"):
                (line,) = ax.plot(x, [p["latency_p50_ms"] for p in ps], marker="o", label=f"N={n} receive->publish p50")
                ax.plot(x, [p["latency_p99_ms"] for p in ps], marker="^", color=line.get_color(), linestyle="--",
                        label=f"N={n} receive->publish p99")
            ax.plot(x, [p["e2e_p99_ms"] for p in ps], marker="s", linestyle=":",
                    color=line.get_color() if line else None, label=f"N={n} server->output p99")
        ax.set(xlabel="offered rate (frames/s)", ylabel="latency (ms)", title=f"{processor}: latency", yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"pipeline_{processor}_latency.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    engine = report.get("engine", [])
    if engine:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        key = lambda r: (r["engine"], r["precision"], r["threads"], r.get("workers", 1), r.get("cuda_graphs"))  # noqa: E731
        configs = list(dict.fromkeys(key(r) for r in engine))
        batches = sorted({r["batch"] for r in engine})
        width = 0.8 / max(len(configs), 1)
        for i, config in enumerate(configs):
            values = {r["batch"]: r["frames_per_s"] for r in engine
                      if key(r) == config}
            workers = f" x {config[3]} workers" if config[3] > 1 else ""
            workers += " without CUDA graphs" if config[4] is False else ""
            ax.bar([j + i * width for j in range(len(batches))], [values.get(b, 0) for b in batches], width,
                   label=f"{config[0]} {config[1]}, {config[2]} thread(s){workers}")
        ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set(ylabel="frames/s", title="engine alone")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "engine.png", dpi=110)
        plt.close(fig)
        written.append("engine.png")
