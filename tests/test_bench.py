"""The benchmark's parts: FLOP counting, peak, sweep logic, report writer, --quick smoke runs.

Speed itself is not asserted here (timings belong to `edge-ptychonn bench`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_ptychonn.tools import bench, bench_engine, bench_pipeline, bench_report

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_MODEL = ROOT.parent / "shared" / "models" / "edgeptychonn_ptychoNN_8.onnx"


def tiny_model(path: Path, batch: int | str = "N") -> Path:
    """Input (batch, 1, 8, 8) -> Conv 1->4 3x3 pad 1 -> Relu -> Conv 4->4 3x3 pad 1 groups 2
    -> MaxPool 2 -> Conv 4->2 1x1 -> Flatten -> MatMul (32 x 3)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def init(name, shape):
        return numpy_helper.from_array(np.ones(shape, np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=2),
        helper.make_node("MaxPool", ["c2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "w3"], ["c3"]),
        helper.make_node("Flatten", ["c3"], ["f3"]),
        helper.make_node("MatMul", ["f3", "m4"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [init("w1", (4, 1, 3, 3)), init("w2", (4, 2, 3, 3)), init("w3", (2, 4, 1, 1)), init("m4", (32, 3))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# Hand count, per frame (2 FLOPs per multiply-add):
CONV1 = 2 * (4 * 8 * 8) * (1 * 3 * 3)  # 4608: 256 outputs, 9 MACs each
CONV2 = 2 * (4 * 8 * 8) * (2 * 3 * 3)  # 9216: groups 2 -> 2 input channels per output
CONV3 = 2 * (2 * 4 * 4) * (4 * 1 * 1)  # 256
MATMUL = 2 * 3 * 32  # 192
OTHER = 4 * 8 * 8 + 4 * 4 * 4  # Relu 256 + MaxPool 64 outputs (Flatten is free)


@pytest.mark.parametrize("batch", ["N", 1, 4])
def test_count_flops_by_hand(tmp_path, batch):
    count = bench_engine.count_flops(tiny_model(tmp_path / "tiny.onnx", batch))
    assert count.by_op == {"Conv": CONV1 + CONV2 + CONV3, "MatMul": MATMUL}
    assert count.flops_per_frame == CONV1 + CONV2 + CONV3 + MATMUL
    assert count.other_ops_per_frame == OTHER


def ptychonn_flops(size=128, width=16, depth=4) -> int:
    """PtychoNN's convolutions counted from its architecture (edge_ptychonn/model.py)."""
    flops, hw, c_in = 0, size, 1
    for level in range(depth):  # two 3x3 convolutions, then a 2x2 max-pool
        c_out = width * 2**level
        flops += 2 * hw * hw * 9 * (c_in * c_out + c_out * c_out)
        c_in, hw = c_out, hw // 2
    for level in reversed(range(depth)):  # two 3x3 convolutions, then 2x upsampling
        c_out = width * 2**level
        flops += 2 * hw * hw * 9 * (c_in * c_out + c_out * c_out)
        c_in, hw = c_out, hw * 2
    return flops + 2 * hw * hw * 9 * c_in  # phase head: c_in -> 1


def test_count_flops_reference_model_matches_architecture():
    if not REFERENCE_MODEL.is_file():
        pytest.skip(f"reference model not found at {REFERENCE_MODEL}")
    count = bench_engine.count_flops(REFERENCE_MODEL)  # fixed batch 8: counted per frame
    assert count.flops_per_frame == ptychonn_flops() == 632_291_328


def test_measure_peak_is_positive():
    assert bench_engine.measure_peak("fp32", "numpy", size=128, seconds=0.05) > 0
    pytest.importorskip("torch")
    peaks = bench_engine.measure_peaks(["fp32", "bf16"], seconds=0.02, sizes=(64, 128))
    by_library = peaks["fp32"]["by_library"]
    assert set(by_library) == {"numpy", "onnxruntime", "torch"}  # the peak is the best library's
    assert peaks["fp32"]["flops_per_s"] == max(by_library.values()) and min(by_library.values()) > 0
    assert peaks["bf16"]["flops_per_s"] > 0 and set(peaks["bf16"]["by_library"]) == {"torch"}


def test_engine_rate_is_the_best_timing_window():
    """A load that slows the first window down does not lower the rate."""

    class SlowThenFast:
        input_shape = (4, 4)

        def __init__(self):
            self.calls = 0

        def infer(self, x):
            self.calls += 1
            time.sleep(0.02 if self.calls <= 12 else 0.005)  # warm-up + two windows slow
            return x

    fps, _, n = bench_engine.time_engine(SlowThenFast(), 8, 0.1, np.random.default_rng(0), repeats=3)
    # the fast windows' rate, not the average: above the slow rate (8 / 0.02, a quarter of the fast one)
    # with room for a loaded machine that stretches the 5 ms sleeps
    assert n >= 6 and 8 / 0.005 * 0.25 < fps <= 8 / 0.005, fps
    single, _, _ = bench_engine.time_engine(SlowThenFast(), 8, 0.1, np.random.default_rng(0), repeats=1)
    assert single < 8 / 0.02 * 1.01  # one window: the slow rate


def test_unknown_peak_library_is_refused():
    with pytest.raises(ValueError, match="known: numpy, onnxruntime, torch"):
        bench_engine.measure_peak("fp32", "cupy", size=8, seconds=0.01)
    with pytest.raises(ValueError, match="fp32 only"):
        bench_engine.measure_peak("bf16", "onnxruntime", size=8, seconds=0.01)


def test_gpu_peaks_are_torch_and_tf32_is_a_gpu_precision():
    """On a GPU the peak is torch's matrix product (the others run on the CPU); tf32 has no CPU
    peak, and measure_peaks leaves it out there. Each peak says where it was measured."""
    with pytest.raises(ValueError, match="with torch, not 'numpy'"):
        bench_engine.measure_peak("fp32", "numpy", size=8, seconds=0.01, device="cuda:0")
    with pytest.raises(ValueError, match="tf32 is a GPU precision"):
        bench_engine.measure_peak("tf32", "torch", size=8, seconds=0.01)
    pytest.importorskip("torch")
    peaks = bench_engine.measure_peaks(["fp32", "tf32"], seconds=0.01, sizes=(32,))
    assert set(peaks) == {"fp32"} and peaks["fp32"]["device"] == "cpu"


def test_tf32_is_allowed_only_while_its_gpu_peak_is_timed():
    torch = pytest.importorskip("torch")
    before = torch.backends.cuda.matmul.allow_tf32
    for allow in (True, False):
        with bench_engine._tf32(torch, allow):
            assert torch.backends.cuda.matmul.allow_tf32 is allow
        assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("engine, precision, on_cpu, emulated, peak_device, basis", [
    ("torch", "fp16", False, False, "cuda:0", "fp16"),  # a GPU engine against the GPU's own peak
    ("torch", "fp16", False, False, "cpu", None),  # ... never against a CPU's
    ("torch", "fp16", True, True, "cpu", "fp32"),  # emulated on a CPU: against its fp32 peak
    ("onnxruntime", "fp32", True, False, "cpu", "fp32"),
    ("onnxruntime", "fp32", True, False, "cuda:0", None),  # peaks of a GPU say nothing of a CPU engine
    ("zero", "fp32", True, False, "cpu", None),  # does none of the model's arithmetic
])
def test_a_share_of_the_peak_is_of_the_device_the_engine_ran_on(engine, precision, on_cpu, emulated, peak_device,
                                                                basis):
    peaks = {p: {"flops_per_s": 1e12, "device": peak_device} for p in ("fp32", "fp16")}
    assert bench_engine._peak_basis(engine, precision, on_cpu, emulated, peaks) == basis


def test_the_peak_table_names_the_gpu_it_was_measured_on():
    peak = {"flops_per_s": 7.9e14, "by_library": {"torch": 7.9e14}, "emulated": False, "device": "cuda:0"}
    lines = bench_report.peak_table({"peaks": {"bf16": peak}}).splitlines()
    assert lines[0].split("|")[-2].strip() == "on this GPU" and lines[2].split("|")[-2].strip() == "cuda:0"
    cpu = {**peak, "device": "cpu", "by_library": {"numpy": 1e11}}
    assert bench_report.peak_table({"peaks": {"fp32": cpu}}).splitlines()[2].split("|")[-2].strip() == "native"


def test_onnxruntime_peak_times_a_real_matrix_product():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 64, 64), dtype=np.float32)
    (c,) = bench_engine._matmul_session(64).run(None, {"a": a, "b": b})
    np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-4)
    assert bench_engine.measure_peak("fp32", "onnxruntime", size=64, seconds=0.02) > 0


# -- sweep logic with fake points ---------------------------------------------------------------
def fake_point(rate: float, capacity: float, server_max: float = float("inf")) -> bench_pipeline.PointResult:
    offered = min(rate, server_max)
    delivered = min(offered, capacity)
    return bench_pipeline.PointResult(
        processor="ptychonn", n_consumers=1, target_fps=rate, offered_fps=offered, n_offered=100, n_received=100,
        n_unique=100, n_lost=0 if rate <= 1.3 * capacity else 10, n_missed=0, n_dropped=0, delivered_fps=delivered,
        latency_p50_ms=1.0, latency_p99_ms=2.0, e2e_p50_ms=1.0, e2e_p99_ms=2.0, cpu_layout='cpu (2 workers x 1 thread)', ready_s=1.0,
        start_delay_s=2.0, wall_s=0.0,
    )


def fake_machine(monkeypatch, capacity: float):
    """Points come from :func:`fake_point` with ``capacity``; returns (rates asked, settings)."""
    asked = []

    def run_point(settings, processor, n, rate, *args):
        asked.append(rate)
        return fake_point(rate, capacity=capacity)

    monkeypatch.setattr(bench_pipeline, "run_point", run_point)
    return asked, bench_pipeline.PipelineSettings(model_path=Path("m.onnx"))


def test_sweep_stops_after_the_first_unsustained_point_and_bisects(monkeypatch):
    asked, settings = fake_machine(monkeypatch, capacity=85.0)
    points = bench_pipeline.sweep(settings, "ptychonn", 1, [60, 80, 90, 100, 110], None, Path("."), {}, None,
                                  stop_after=1, refine=1)
    # 90 is lossless but falls behind (85 < 0.97 * 90): the sweep stops there, then tries 85
    assert asked == [60, 80, 90, 85.0]
    assert [p.target_fps for p in points] == [60, 80, 85.0, 90]
    best = bench_pipeline.best_sustained(points)
    assert best.target_fps == 85.0 and not points[-1].sustained and points[-1].lossless


def test_a_point_with_loss_or_error_is_not_sustained():
    lossy = fake_point(200.0, capacity=100.0)
    assert not lossy.lossless and not lossy.sustained
    missed = fake_point(50.0, capacity=100.0)
    missed.n_missed = 3
    assert not missed.lossless
    failed = fake_point(50.0, capacity=100.0)
    failed.error = "consumers not ready"
    assert not failed.sustained
    assert fake_point(50.0, capacity=100.0).to_dict()["sustained"] is True


def test_start_delay_follows_the_slowest_start_up():
    delay = bench_pipeline.StartDelay(6.0, margin=1.5, extra_s=1.0)
    assert delay.next() == 6.0
    delay.update(fake_point(10, 100))  # ready after 1.0 s
    assert delay.next() == 2.5
    slow = fake_point(10, 100)
    slow.ready_s = 4.0
    delay.update(slow)
    delay.update(fake_point(10, 100))
    assert delay.next() == 7.0


# -- report --------------------------------------------------------------------------------------
def sample_report() -> dict:
    point = fake_point(80.0, 85.0).to_dict()
    passthrough = {**fake_point(900.0, 1000.0).to_dict(), "processor": "passthrough",
                   "latency_p50_ms": None, "latency_p99_ms": None}
    return {
        "model": {"path": "m.onnx", "flops_per_frame": 632e6, "note": None},
        "machine": {"cpu": "cpu", "cores": 2, "gpu": "none", "load_before": "1.00", "load_after": "1.10"},
        "peaks": {"fp32": {"flops_per_s": 100e9, "by_library": {"numpy": 90e9, "torch": 100e9}},
                  "fp16": {"flops_per_s": 400e9, "by_library": {"torch": 400e9}, "emulated": True}},
        "engine": [bench_engine.EngineResult("onnxruntime", "cpu", "fp32", 2, 8, 64.5, 124.0, 10, 40.8,
                                             False, "fp32").to_dict(),
                   bench_engine.EngineResult("torch", "cpu", "fp16", 1, 8, 20.0, 400.0, 3, 12.6, True, "fp32").to_dict()],
        "engine_skipped": [{"engine": "torch", "precision": "fp16", "threads": 1, "reason": "why"}],
        "pipeline": {"points": [point, passthrough]},
        "ratios": [{"n_consumers": 1, "engine_alone_fps": 64.5, "ptychonn_fps": 60.0, "pipeline_over_engine": 0.93,
                    "zero_fps": 850.0, "passthrough_fps": 900.0, "ptychonn_over_passthrough": 0.0667,
                    "zero_over_passthrough": 0.944, "passthrough_server_limited": True}],
        "warm_start": [{"engine": "onnxruntime", "launch": "first", "first_output_s": 3.25},
                       {"engine": "onnxruntime", "launch": "second", "first_output_s": 2.5}],
    }


def test_table_is_aligned_markdown():
    text = bench_report.table(["a", "bb"], [[1.234, None], ["long", 2]], [".1f", ""])
    lines = text.splitlines()
    assert lines[0] == "|    a | bb |"
    assert lines[1] == "|-----:|---:|"
    assert lines[2] == "|  1.2 |  - |"
    assert lines[3] == "| long |  2 |"


def test_summary_has_every_section():
    text = bench_report.summary_text(sample_report())
    for expected in ("Measured peak", "Engine alone", "Pipeline points", "Ratios", "Launch -> first published output",
                     "| onnxruntime |      fp32 |       2 |       1 |     8 |     64.5 |", "skipped torch fp16 (1 threads): why", "0.93", "3.25",
                     "12.6 (emulated; of fp32 peak)", "emulated: not a limit of this machine", "zero-cost/passthrough",
                     "<= 0.95", "<= 0.067", ">= 900 (server-limited)"):
        assert expected in text, expected


def test_ratios_against_a_server_limited_ceiling_are_bounds():
    # the denominator only a lower bound: the true ratio can only be lower
    assert bench_report.bounded_ratio(0.944, False, True, ".2f") == "<= 0.95"  # rounded up: still a bound
    assert bench_report.bounded_ratio(0.944, True, False, ".2f") == ">= 0.94"
    assert bench_report.bounded_ratio(0.944, True, True, ".2f") == "? (0.94, both lower bounds)"
    assert bench_report.bounded_ratio(0.944, False, False, ".2f") == "0.94"
    report = sample_report()
    report["ratios"][0].update(passthrough_server_limited=False, zero_server_limited=True)
    text = bench_report.summary_text(report)
    assert ">= 850 (server-limited)" in text and ">= 0.94" in text and "<= 0.9" not in text


def test_json_and_plots_are_written(tmp_path):
    report = sample_report()
    path = bench_report.write_json(report, tmp_path / "r" / "report.json")
    assert json.loads(path.read_text())["ratios"][0]["pipeline_over_engine"] == 0.93
    plots, reason = bench_report.write_plots(report, tmp_path)
    if reason:
        pytest.skip(reason)
    assert set(plots) == {"pipeline_ptychonn_rate.png", "pipeline_ptychonn_latency.png", "pipeline_passthrough_rate.png",
                          "pipeline_passthrough_latency.png", "engine.png"}
    for name in plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- command line -------------------------------------------------------------------------------
def test_help_lists_the_options(capsys):
    from edge_ptychonn import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--quick", "--consumers", "--server-queue-size", "--skip", "--out"):
        assert option in out
    # options whose default is None say what they default to; no "(default: None)" contradicts that
    assert "(default: None)" not in out and "(default: results/bench-<date>-<time>)" in out


def test_missing_model_is_an_error(tmp_path, capsys):
    """A bad input is exit status 2 (before: 1, a SystemExit with its message as the code)."""
    args = bench.get_args_parser().parse_args(["--model", str(tmp_path / "none.onnx"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        bench.main(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"edge-ptychonn bench: model {tmp_path / 'none.onnx'} not found\n"


def test_a_model_that_is_not_onnx_is_a_one_line_error(tmp_path, capsys):
    """Before: a traceback ending in protobuf's DecodeError."""
    (tmp_path / "model.onnx").write_text("not a model")
    args = bench.get_args_parser().parse_args(["--model", str(tmp_path / "model.onnx"), "--out", str(tmp_path),
                                               "--skip", "warm,pipeline,zero,floor,passthrough", "--no-plots"])
    with pytest.raises(SystemExit) as exit_:
        bench.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "model.onnx is not a readable ONNX model" in err and len(err.splitlines()) == 1


def test_a_refused_model_leaves_no_report_and_no_folder(tmp_path, capsys):
    """A mistyped --model is refused before anything is measured: the folder made for the run is
    removed again, and an earlier run's report.json in an --out given again is kept (before: a
    report.json of the run that never ran, with no word of the refusal, written over it)."""
    fresh = tmp_path / "new" / "run"
    with pytest.raises(SystemExit) as exit_:
        bench.main(bench.get_args_parser().parse_args(["--model", str(tmp_path / "none.onnx"), "--out", str(fresh)]))
    assert exit_.value.code == 2 and not (tmp_path / "new").exists()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.json").write_text('{"engine": []}\n')
    (tmp_path / "model.onnx").write_text("not a model")
    with pytest.raises(SystemExit) as exit_:
        bench.main(bench.get_args_parser().parse_args(["--model", str(tmp_path / "model.onnx"), "--out", str(earlier)]))
    assert exit_.value.code == 2
    assert (earlier / "report.json").read_text() == '{"engine": []}\n'
    assert sorted(p.name for p in earlier.iterdir()) == ["report.json"]
    capsys.readouterr()


@pytest.mark.parametrize("option, value, expected", [
    ("--batches", "1,x", "give comma-separated whole numbers, got '1,x'"),
    ("--consumers", "1.5", "give comma-separated whole numbers, got '1.5'"),
    ("--threads", "two", "give comma-separated whole numbers or 'all', got 'two'"),
    ("--workers", "1,all,x", "give comma-separated whole numbers or 'all', got '1,all,x'"),
    ("--rate-fractions", "half", "give comma-separated numbers, got 'half'"),
])
def test_a_word_where_numbers_belong_is_named_plainly(capsys, option, value, expected):
    """Before: "invalid _ints value: '1,x'", naming the bench's own parser function."""
    with pytest.raises(SystemExit) as exit_:
        bench.get_args_parser().parse_args([option, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.splitlines()[-1].endswith(f"error: argument {option}: {expected}"), err
    assert "_ints" not in err and "_floats" not in err and "_threads" not in err


def test_the_reports_command_repeats_the_run_with_a_space_in_a_path(tmp_path, monkeypatch, capsys):
    """Before: "--out /x/my results" in report.json, two words where one was given."""
    import shlex

    out = tmp_path / "my results"
    argv = ["bench", "--skip", ",".join(bench.PARTS), "--out", str(out), "--no-plots"]
    monkeypatch.setattr("sys.argv", ["edge-ptychonn", *argv])
    assert bench.main(bench.get_args_parser().parse_args(argv[1:])) == 0
    command = json.loads((out / "report.json").read_text())["command"]
    assert shlex.split(command) == ["edge-ptychonn", *argv], command
    capsys.readouterr()


def test_a_part_that_measured_nothing_is_exit_status_1(tmp_path, capsys):
    """Only an engine and precision that cannot run (ONNX Runtime has no bf16; TensorRT without
    its libraries did the same): before, a table of skipped lines and exit 0, as if the bench
    had measured what was asked."""
    args = bench.get_args_parser().parse_args(["--out", str(tmp_path), "--skip", "warm,framepath,pipeline,zero,floor,passthrough",
                                               "--engines", "onnxruntime", "--precisions", "bf16", "--batches", "8",
                                               "--threads", "1", "--workers", "1", "--engine-seconds", "0.2",
                                               "--no-plots", "--quick"])
    assert bench.main(args) == 1
    out = capsys.readouterr().out
    assert "not measured: engine: no engine and precision asked for could run here" in out, out


@pytest.mark.parametrize("engines, precisions, reason", [
    ("onnxruntime", "bf16", "skipped onnxruntime bf16: offers fp32 on device cpu, not bf16"),
    ("tensorrt", None, "skipped tensorrt -: runs on cuda only, not device cpu"),
])
def test_an_engine_named_that_times_nothing_is_said_why(tmp_path, capsys, engines, precisions, reason):
    """An engine named in --engines that offers none of --precisions on the device, or does not run
    there: the report's 'not measured' line points at the skipped lines, so there is one for it."""
    argv = ["--out", str(tmp_path), "--skip", "warm,framepath,pipeline,zero,floor,passthrough", "--engines", engines,
            "--batches", "8", "--threads", "1", "--workers", "1", "--no-plots", "--quick"]
    args = bench.get_args_parser().parse_args(argv + (["--precisions", precisions] if precisions else []))
    assert bench.main(args) == 1
    assert reason in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["engine_skipped"][0]["engine"] == engines


def test_an_interrupted_run_says_its_tables_are_partial(tmp_path, capsys, monkeypatch):
    """Ctrl-C (SIGTERM, SIGHUP) in the middle: exit 130 and the printed summary says the run is
    partial (before, only the report.json's "interrupted" and a progress line on stderr did)."""
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_engine, "bench_engines", stopped)
    args = bench.get_args_parser().parse_args(["--out", str(tmp_path), "--skip", "warm,framepath,pipeline,zero,floor,passthrough",
                                               "--engines", "onnxruntime", "--batches", "8", "--threads", "1",
                                               "--workers", "1", "--no-plots", "--quick"])
    assert bench.main(args) == 130
    assert "interrupted: a partial run" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["interrupted"] is True


def test_a_pipeline_with_no_rate_to_offer_is_exit_status_1(tmp_path, capsys, monkeypatch):
    """--rate-fractions that all round to 0 frames/s of the engine's rate: no point is measured,
    and the bench says so and exits with 1 (before: an empty table and exit 0)."""
    monkeypatch.setattr(bench, "_engine_alone", lambda *args: 300.0)
    args = bench.get_args_parser().parse_args(["--out", str(tmp_path), "--skip", "warm,engine,framepath,zero,floor,passthrough",
                                               "--pipeline-engine", "onnxruntime", "--rate-fractions", "0.0001",
                                               "--consumers", "1", "--down", "0", "--no-plots", "--quick"])
    assert bench.main(args) == 1
    assert "not measured: pipeline N=1: no rate to offer" in capsys.readouterr().out


def test_unknown_part_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.get_args_parser().parse_args(["--skip", "engines"])
    assert exit_.value.code == 2
    assert "known: warm, engine, framepath, pipeline, zero, floor, passthrough" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--pipeline-batch", "0", "must be >= 1 and <= 256, got 0"),  # before: ZeroDivisionError in the frame path
    ("--batches", ",", "give at least one value"),  # before: every engine skipped, exit 0
    ("--batches", "0", "must be >= 1"),
    ("--peak-sizes", "0", "must be >= 1"),  # before: a peak of 0.0 GFLOP/s, no percentages
    ("--threads", "0", "must be >= 1"),  # before: rows labelled '0 thread(s)' (the engine's own default)
    ("--workers", "0", "must be >= 1"),  # before: rows labelled 'workers 0'
    ("--consumers", "0", "must be >= 1"),
    ("--rate-fractions", "-0.5", "must be finite and > 0"),
    ("--rate-fractions", "0.5,0", "must be finite and > 0"),  # before: a target of 0, the server's top speed
    ("--rate-fractions", "nan", "must be finite and > 0"),
    ("--engine-seconds", "-1", "must be finite and > 0"),  # before: one batch per window, rates of nothing
    ("--peak-seconds", "0", "must be finite and > 0"),
    ("--engine-repeats", "0", "must be >= 1"),
    ("--duration", "nan", "must be finite and > 0"),  # before: accepted (a NaN stream length)
    ("--ceiling-start", "inf", "must be finite and >= 1"),
    ("--ceiling-points", "0", "must be >= 1"),
    ("--max-frames", "0", "must be >= 2"),
    ("--server-queue-size", "-1", "must be >= 0"),
    ("--consumer-workers", "-1", "must be >= 0"),
    ("--refine", "-1", "must be >= 0"),
    ("--pipeline-engine", "foo", "invalid choice: 'foo'"),  # before: every point skipped, exit 0
    ("--pipeline-precision", "fp64", "invalid choice: 'fp64'"),
    ("--device", "gpu", "device must be 'auto', 'cpu', 'cuda'"),
    ("--precisions", "fp64", "unknown precision(s) ['fp64']; known: fp32, tf32, fp16, bf16"),  # before: nothing timed
    ("--ceiling-factor", "0", "must be finite and > 1"),  # before: ZeroDivisionError stepping down
    ("--ceiling-factor", "1", "must be finite and > 1"),  # before: a climb that never climbs
    ("--ceiling-start", "0.01", "must be finite and >= 1"),  # before: rounded to a target of 0, the server's top speed
    ("--stop-after", "0", "must be >= 1"),  # before: every sweep stopped after its first point
    ("--out", "", "must name a folder"),  # before: the results went into the current folder
])
def test_bad_options_are_one_line_errors(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error, before anything runs
        bench.get_args_parser().parse_args([option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: " in err and message in err and "Traceback" not in err, err


def test_options_that_only_main_can_judge_are_one_line_errors(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv, message, code in [
        (["--out", str(blocker / "results")], f"cannot make the results folder {blocker / 'results'}", 2),  # 1 before
        (["--model", str(tmp_path)], f"--model {tmp_path} is a folder", 2),  # before: "not found"
        (["--pipeline-engine", "torch", "--pipeline-precision", "auto"],
         "--pipeline-precision auto needs --pipeline-engine auto", 2),  # a bad argument: 2 (before: 1)
        (["--source-attributes", "10"], "--source-attributes needs --source fast", 2),  # the sim server's are fixed
    ]:
        with pytest.raises(SystemExit) as exit_:  # before: a FileExistsError traceback; every point skipped
            bench.main(bench.get_args_parser().parse_args(argv + ["--skip", ",".join(bench.PARTS)]
                                                          + ([] if "--out" in argv else ["--out", str(tmp_path / "r")])))
        err = capsys.readouterr().err
        assert message in (err if code == 2 else str(exit_.value)), (exit_.value, err)
        assert (exit_.value.code if code == 2 else 1) == code


def test_the_source_attributes_and_the_consumers_forward_attributes_reach_the_processes(tmp_path):
    """--source-attributes N goes to the fast source's command line, --consumer-forward-attributes
    to every consumer's forwardAttributes (true unless told)."""
    settings = bench_pipeline.PipelineSettings(model_path=tmp_path / "m.onnx", source="fast", source_attributes=10,
                                               consumer_forward_attributes=False)
    argv = bench_pipeline.source_argv(settings, tmp_path / "scan.npy", "det:image", 100.0, 2.0)
    assert argv[argv.index("-na") + 1] == "10"
    assert bench_pipeline._processor_args(settings, 1)["forwardAttributes"] is False
    default = bench_pipeline.PipelineSettings(model_path=tmp_path / "m.onnx", source="fast")
    assert "-na" not in bench_pipeline.source_argv(default, tmp_path / "scan.npy", "det:image", 100.0, 2.0)
    assert bench_pipeline._processor_args(default, 1)["forwardAttributes"] is True
    args = bench.get_args_parser().parse_args(["--consumer-forward-attributes", "false", "--source", "fast",
                                               "--source-attributes", "3"])
    assert (args.consumer_forward_attributes, args.source_attributes) == ("false", 3)


@pytest.mark.parametrize("argv, engine, precision", [
    ([], "auto", "auto"),  # the consumer's own defaults: the pipeline as it runs unless told otherwise
    (["--pipeline-engine", "torch"], "torch", "fp32"),  # a named engine runs one named precision
    (["--pipeline-engine", "onnxruntime", "--pipeline-precision", "fp32"], "onnxruntime", "fp32"),
])
def test_the_pipelines_engine_is_the_consumers_default_unless_named(tmp_path, argv, engine, precision):
    args = bench.get_args_parser().parse_args(argv + ["--skip", ",".join(bench.PARTS), "--out", str(tmp_path)])
    assert bench.main(args) == 0
    assert (args.pipeline_engine, args.pipeline_precision) == (engine, precision)


def test_the_real_time_warning_comes_only_where_processes_are_started(tmp_path, capsys, monkeypatch):
    """Before: every run where real time was allowed said so, an engine-only run too."""
    monkeypatch.setattr(bench.live, "realtime_allowed", lambda: True)
    args = bench.get_args_parser().parse_args(["--skip", ",".join(bench.PARTS), "--out", str(tmp_path), "--no-plots"])
    assert bench.main(args) == 0
    assert "real time" not in capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["machine"]["pvaccess_realtime"] is True  # the report says it all the same


@pytest.fixture(scope="module")
def bench_small_model(tmp_path_factory) -> Path:
    """A random PtychoNN for 64x64 frames (dynamic batch)."""
    pytest.importorskip("torch")
    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx

    path = tmp_path_factory.mktemp("bench_model") / "small.onnx"
    return export_onnx(build_model(ModelConfig(width=8, depth=3, input_size=64), seed=0), path)


def test_quick_engine_run(tmp_path, bench_small_model, capsys):
    args = bench.get_args_parser().parse_args([
        "--quick", "--skip", "pipeline,passthrough", "--engines", "onnxruntime",
        "--model", str(bench_small_model), "--out", str(tmp_path),
    ])
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"]["flops_per_frame"] == ptychonn_flops(64, 8, 3)
    rows = report["engine"]
    assert [(r["engine"], r["batch"]) for r in rows] == [("onnxruntime", 1), ("onnxruntime", 8)]
    assert all(r["frames_per_s"] > 0 and 0 < r["percent_of_peak"] for r in rows)
    assert "Engine alone" in capsys.readouterr().out


def test_quick_engine_run_marks_emulated_precisions(tmp_path, bench_small_model, monkeypatch):
    pytest.importorskip("torch")
    from edge_ptychonn import devices

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # bf16 native, fp16 emulated
    args = bench.get_args_parser().parse_args([
        "--quick", "--skip", "pipeline,passthrough", "--engines", "torch", "--precisions", "fp32,fp16,bf16",
        "--model", str(bench_small_model), "--out", str(tmp_path), "--no-plots", "--batches", "1",
        "--peak-sizes", "256", "--peak-seconds", "0.1", "--engine-seconds", "0.1", "--engine-repeats", "1",
    ])  # short timings: emulated precisions are slow to time, and only the marks are checked
    args.batches = [1]
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["peaks"]["fp16"]["emulated"] and not report["peaks"]["bf16"]["emulated"]
    rows = {r["precision"]: r for r in report["engine"] if r["batch"] == 1}
    assert rows["fp16"]["emulated"] and rows["fp16"]["peak_basis"] == "fp32"
    assert not rows["bf16"]["emulated"] and rows["bf16"]["peak_basis"] == "bf16"
    assert not rows["fp32"]["emulated"] and rows["fp32"]["peak_basis"] == "fp32"
    # the emulated row is compared with the fp32 peak: fp32-peak percentage, not hundreds
    pct = rows["fp16"]["frames_per_s"] * report["model"]["flops_per_frame"] / report["peaks"]["fp32"]["flops_per_s"]
    assert rows["fp16"]["percent_of_peak"] == pytest.approx(100 * pct)


def test_engines_and_precisions_come_from_the_specs():
    got = bench_engine.engine_precisions("cpu")
    assert got["onnxruntime"] == ("fp32",)
    assert "zero" not in got and "tensorrt" not in got  # stand-in left out; tensorrt not installed, GPU-only
    if "torch" in got:
        assert got["torch"] == ("fp32", "bf16", "fp16")  # tf32 is GPU-only
    assert bench_engine.engine_precisions("cpu", ["zero"])["zero"]


def test_the_zero_cost_engine_gets_no_share_of_the_peak(bench_small_model):
    """'zero' computes none of the model's FLOPs: a '% of peak' from its rate is meaningless (it
    was reported, e.g. 91350 % of the fp32 peak and millions of % of the emulated fp16 one)."""
    peaks = {p: {"flops_per_s": 1e9} for p in ("fp32", "fp16", "bf16")}
    flops = bench_engine.count_flops(bench_small_model).flops_per_frame
    results, skipped = bench_engine.bench_engines(
        bench_small_model, ["zero", "onnxruntime"], [1], {"zero": ("fp32", "fp16"), "onnxruntime": ("fp32",)},
        0.01, flops, peaks, threads=[1])
    assert not skipped and [(r.engine, r.precision) for r in results] == [
        ("zero", "fp32"), ("zero", "fp16"), ("onnxruntime", "fp32")]
    zero = [r for r in results if r.engine == "zero"]
    assert all(r.percent_of_peak is None and r.peak_basis is None for r in zero)
    assert all(bench_report._percent(r.to_dict()) is None for r in zero)
    assert results[-1].percent_of_peak == pytest.approx(100 * results[-1].frames_per_s * flops / 1e9)


def test_ceiling_sweep_climbs_from_below_and_bisects(monkeypatch):
    asked, settings = fake_machine(monkeypatch, capacity=1000.0)
    points = bench_pipeline.ceiling_sweep(settings, "zero", 1, 500.0, None, Path("."), {}, None,
                                          factor=1.5, max_points=8, refine=2)
    assert asked == [500.0, 750.0, 1125.0, 937.5, 1031.2]
    assert bench_pipeline.best_sustained(points).target_fps == 937.5


def test_ceiling_sweep_steps_down_then_stops_below_a_failed_rate(monkeypatch):
    asked = []
    monkeypatch.setattr(bench_pipeline, "run_point",
                        lambda s, p, n, rate, *a: asked.append(rate) or fake_point(rate, capacity=200.0))
    settings = bench_pipeline.PipelineSettings(model_path=Path("m.onnx"))
    points = bench_pipeline.ceiling_sweep(settings, "passthrough", 1, 500.0, None, Path("."), {}, None,
                                          factor=1.5, refine=1)
    assert asked[:4] == [500.0, 333.3, 222.2, 148.1]  # down until one is sustained, no climb back to 222.2
    assert asked[4] == pytest.approx((148.1 + 222.2) / 2, abs=0.1)
    assert bench_pipeline.best_sustained(points).target_fps == 185.1  # the bisection kept up


def test_ceiling_sweep_stops_where_the_server_is_the_limit(monkeypatch):
    asked = []
    monkeypatch.setattr(bench_pipeline, "run_point",
                        lambda s, p, n, rate, *a: asked.append(rate) or fake_point(rate, 1e9, server_max=800.0))
    settings = bench_pipeline.PipelineSettings(model_path=Path("m.onnx"))
    points = bench_pipeline.ceiling_sweep(settings, "passthrough", 1, 500.0, None, Path("."), {}, None, refine=2)
    assert asked == [500.0, 750.0, 1125.0]  # 1125 asked, 800 published: server-limited, stop
    assert points[-1].server_limited and points[-1].sustained


def test_quick_sweep_steps_down_when_its_single_rate_is_too_high(monkeypatch):
    """--quick has one rate and no extension; on a loaded machine that rate may be too high."""
    asked = []
    monkeypatch.setattr(bench_pipeline, "run_point",
                        lambda s, p, n, rate, *a: asked.append(rate) or fake_point(rate, capacity=25.0))
    args = bench.get_args_parser().parse_args(["--quick"])
    bench.apply_quick(args)
    settings = bench_pipeline.PipelineSettings(model_path=Path("m.onnx"))
    points = bench_pipeline.sweep(settings, "ptychonn", 1, [60.0], None, Path("."), {}, None, args.stop_after,
                                  args.refine, extend=args.extend, down=args.down)
    assert asked == [60.0, 40.0, 26.7, 17.8]
    assert bench_pipeline.best_sustained(points).target_fps == 17.8


def test_cpu_per_frame_is_taken_between_two_samples():
    before = bench_pipeline.CpuSample(1.0, 2.0, 3.0, 10.0, 40.0, n_out=100)
    later = bench_pipeline.CpuSample(1.5, 2.2, 3.1, 13.0, 44.0, n_out=1100)
    assert before.per_frame_us(later) == {"cpu_consumer_us": 500.0, "cpu_server_us": 200.0,
                                          "cpu_collector_us": 100.0, "machine_busy_pct": 75.0,
                                          "consumer_threads": None}
    gone = bench_pipeline.CpuSample(1.5, float("nan"), 3.1, 13.0, 44.0, n_out=1100)  # the server had exited
    assert before.per_frame_us(gone)["cpu_server_us"] is None
    too_few = bench_pipeline.CpuSample(1.5, 2.2, 3.1, 13.0, 44.0, n_out=110)
    assert set(before.per_frame_us(too_few).values()) == {None}
    point = fake_point(100.0, 1000.0)
    point.cpu_consumer_us, point.cpu_server_us, point.cpu_collector_us, point.machine_busy_pct = 500.0, 200.0, None, 75.0
    assert "CPU per frame: consumer 500 us, server 200 us, collector ?; machine 75 % busy" in bench_pipeline.describe(point)


def test_process_and_machine_cpu_are_read_from_proc():
    from edge_ptychonn.tools import processes

    if not Path("/proc/stat").exists():
        pytest.skip("no /proc on this system")
    used, t0 = processes.cpu_seconds(os.getpid()), time.process_time()
    busy, total = processes.machine_cpu_seconds()
    while time.process_time() - t0 < 0.3:  # burn 0.3 s of CPU in this process
        pass
    assert processes.cpu_seconds(os.getpid()) - used >= 0.25
    busy2, total2 = processes.machine_cpu_seconds()
    # a fully busy machine: equal tick counts, which the seconds since boot may round apart
    assert busy2 - busy >= 0.25 and total2 - total >= busy2 - busy - 1e-6
    assert np.isnan(processes.cpu_seconds(2**22 + 12345))  # no such process


def test_losses_at_the_source_are_told_apart_from_the_processor():
    # 1000 published; consumers received 940 and saw 10 gaps; 935 came out
    assert bench_pipeline.split_losses(1000, 940, 10, 935) == (50, 5, None)
    # each consumer's nReceived counts its connect update: a frame the server dropped at
    # exit is the source's loss, not the processor's (stored runs: 4001 received of 4000)
    received = bench_pipeline.consumer_frames([1000, 999])  # 2 consumers; the server dropped 3 of 2000 at exit
    assert received == 1997 and bench_pipeline.split_losses(2000, received, 0, 1997) == (3, 0, None)
    point = fake_point(100.0, 1000.0)
    point.n_lost, point.n_lost_source, point.n_lost_processor = 50, 50, 0
    assert point.lossless  # the server dropped its backlog at exit; the processor lost nothing
    assert "(at source 50, by processor 0)" in bench_pipeline.describe(point)
    point.n_lost_processor = 1
    assert not point.lossless



def test_frames_the_collector_missed_are_not_blamed_on_the_processor():
    """The consumers received and published 100 frames (their own statistics); the bench's
    output collector got 95 (before: all 5 in the 'by processor' column). The point is still
    not lossless: a frame published that no client receives is lost to the chain."""
    ptychonn = [{"userStats": {"nFramesProcessed": 60}, "publisherStats": {"nPublished": 58}},
                {"userStats": {"nFramesProcessed": 40}, "publisherStats": {"nPublished": 40}}]
    assert bench_pipeline.consumer_published(ptychonn, is_ptychonn=True) == 100  # its own count, always current
    passthrough = [{"userStats": {}, "publisherStats": {"nPublished": 100}}]
    assert bench_pipeline.consumer_published(passthrough, is_ptychonn=False) == 100
    assert bench_pipeline.consumer_published([{"userStats": {}}], is_ptychonn=True) is None
    assert bench_pipeline.split_losses(100, 100, 0, 95, n_published=100) == (0, 0, 5)
    # 3 the processor did not publish, 2 published that the collector missed
    assert bench_pipeline.split_losses(100, 100, 0, 95, n_published=97) == (0, 3, 2)
    # a count read before the last publish: what came out was published
    assert bench_pipeline.split_losses(100, 100, 0, 99, n_published=98) == (0, 1, 0)
    point = fake_point(100.0, 1000.0)
    point.n_lost, point.n_lost_source, point.n_lost_processor, point.n_lost_collector = 5, 0, 0, 5
    assert not point.lossless and "(at source 0, by processor 0, by collector 5)" in bench_pipeline.describe(point)
    report = {"pipeline": {"points": [point.to_dict()]}}
    lines = bench_report.pipeline_table(report).splitlines()
    cells = dict(zip([c.strip() for c in lines[0].split("|")], [c.strip() for c in lines[2].split("|")]))
    assert cells["by processor"] == "0" and cells["by collector"] == "5", cells


def test_the_pipeline_tables_target_is_the_reports_to_a_tenth():
    """Rates are set to 0.1 frames/s; the table showed targets to the frame (8.2 as 8, the
    bisected 250.4 and 250.5 both as 250) where report.json and the progress line say 8.2."""
    points = [fake_point(rate, 1000.0).to_dict() for rate in (8.2, 250.4, 250.5)]
    lines = bench_report.pipeline_table({"pipeline": {"points": points}}).splitlines()
    column = [c.strip() for c in lines[0].split("|")].index("target fps")
    assert [line.split("|")[column].strip() for line in lines[2:]] == ["8.2", "250.4", "250.5"]


@pytest.mark.e2e
def test_quick_pipeline_run(tmp_path, bench_small_model, capsys):
    """One PtychoNN point and one passthrough point with real PvaPy processes (~30 s)."""
    from edge_ptychonn.tools.processes import loopback_multicast, realtime_allowed

    ok, reason = loopback_multicast()
    if not ok:
        pytest.skip(reason)
    args = bench.get_args_parser().parse_args([
        "--quick", "--skip", "engine,framepath", "--model", str(bench_small_model), "--out", str(tmp_path),
        "--no-plots",
    ])  # the frame path's profile has a test of its own, below
    assert bench.main(args) == 0
    # where the processes it starts may schedule in real time (root), it says so: they are not as a user's
    assert ("SCHED_FIFO" in capsys.readouterr().err) == realtime_allowed()
    report = json.loads((tmp_path / "report.json").read_text())
    assert {p["processor"] for p in report["pipeline"]["points"]} == {"ptychonn", "passthrough"}
    # the best sustained point of each (quick mode steps down until one is sustained)
    points = {}
    for p in report["pipeline"]["points"]:
        if p["sustained"] and p["delivered_fps"] > points.get(p["processor"], {}).get("delivered_fps", -1):
            points[p["processor"]] = p
    assert set(points) == {"ptychonn", "passthrough"}
    for p in points.values():
        assert p["error"] is None, p["error"]
        assert p["n_lost"] == 0 and p["n_missed"] == 0 and p["n_unique"] == p["n_offered"] >= 64
        # what the consumers received is the frames, without their connect updates
        assert p["n_consumer_received"] == p["n_offered"] and p["n_lost_processor"] == 0, p
        # and published all of them, by their own statistics: the collector missed none
        assert p["n_published"] == p["n_offered"] and p["n_lost_collector"] == 0, p
    assert points["ptychonn"]["latency_p99_ms"] > 0
    # the engine and precision the consumers ran, 'auto' resolved (as their status reports them)
    assert len(points["ptychonn"]["engine"].split()) == 2 and "auto" not in points["ptychonn"]["engine"], points
    assert points["passthrough"]["engine"] is None
    for p in points.values():  # CPU over the stream (clock ticks of 10 ms: a short window may see 0 of one)
        cpu = [p["cpu_consumer_us"], p["cpu_server_us"], p["cpu_collector_us"]]
        assert None not in cpu and min(cpu) >= 0 and sum(cpu) > 0, p
        assert 0 < p["machine_busy_pct"] <= 100.0, p
    ratio = report["ratios"][0]
    assert ratio["engine_alone_fps"] > 0 and ratio["ptychonn_fps"] > 0
    assert "frame_path" not in report or report["frame_path"] is None  # skipped as asked
    # the logs stay; the scans it streamed (written for the sim server) are gone
    assert any((tmp_path / "logs").rglob("*.log")) and not (tmp_path / "scans").exists()


def test_frame_path_profile_times_every_stage_and_the_whole_pipeline():
    """With the shipped model's card (its normalisation included), 128x128 frames."""
    from edge_ptychonn.model_card import default_model_path
    from edge_ptychonn.tools import bench_frame_path

    result = bench_frame_path.measure(default_model_path(), (128, 128), n_frames=160, batch=8)
    assert result["n_frames"] == 160
    assert all(us > 0 for us in result["stages_us"].values()), result["stages_us"]
    # The whole pipeline does every stage for every frame (it checks all 160 were published).
    assert result["pipeline_us"] > result["stages_us"]["decode"] + result["stages_us"]["encode"]
    assert result["pipeline_us_by_runner"]["receive"] == result["pipeline_us"]
    assert result["pipeline_us_by_runner"]["thread"] > result["stages_us"]["decode"] + result["stages_us"]["encode"]
    # what each NDAttribute costs: read and written, or left unread (forwardAttributes false)
    assert set(result["attribute_us"]) == {"unchanged", "changing", "not_forwarded"}
    assert all(us >= 0 for us in result["attribute_us"].values()), result["attribute_us"]
    text = bench_frame_path.table(result)
    assert "whole pipeline" in text and "passthrough" in text and "batchRunner thread" in text
    assert "NDAttribute" in text and "forwardAttributes false" in text
    # the floor: PvaPy's calls alone cost more than nothing, and less than decoding and encoding a frame
    assert 0 < result["floor_us"] < result["stages_us"]["decode"] + result["stages_us"]["encode"], result
    assert "floor: PvaPy's calls alone" in text


@pytest.mark.e2e
def test_the_floor_part_republishes_every_frame_with_real_processes(tmp_path, bench_small_model, capsys):
    """The floor alone, one point: PvaPy's calls alone publish every frame once, in a real
    pvapy-hpc-consumer; its ratio to the passthrough is left out when the passthrough is not run."""
    from edge_ptychonn.tools.processes import loopback_multicast

    ok, reason = loopback_multicast()
    if not ok:
        pytest.skip(reason)
    args = bench.get_args_parser().parse_args([
        "--skip", "warm,engine,framepath,pipeline,zero,passthrough", "--consumers", "1", "--ceiling-start", "100",
        "--ceiling-points", "1", "--refine", "0", "--duration", "1", "--down", "2",
        "--model", str(bench_small_model), "--out", str(tmp_path), "--no-plots",
    ])
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    points = report["pipeline"]["points"]
    assert {p["processor"] for p in points} == {"floor"}
    best = max((p for p in points if p["sustained"]), key=lambda p: p["delivered_fps"])
    assert best["error"] is None and best["n_lost"] == 0 and best["n_unique"] == best["n_offered"] >= 64, best
    assert best["n_published"] == best["n_offered"] and best["engine"] is None, best
    row = report["ratios"][0]
    assert row["floor_fps"] == min(best["delivered_fps"], best["offered_fps"]) > 0, row
    assert row["floor_over_passthrough"] is None, row
    assert "floor (PvaPy's calls alone" in capsys.readouterr().err


def test_the_floor_processor_publishes_a_float32_image_with_the_frames_id_and_time():
    """What the floor processor publishes for a frame, and nothing for a record without an image."""
    import pvaccess as pva
    from pvapy.utility.adImageUtility import AdImageUtility

    from edge_ptychonn.tools.floor_processor import FloorImages

    images, published = FloorImages(), []
    assert images.output(pva.NtNdArray()) is None  # a (re)connect update: no frame
    for unique_id, shape in ((7, (48, 64)), (8, (48, 64)), (9, (32, 32))):
        frame = AdImageUtility.generateNtNdArray2D(unique_id, np.ones(shape, np.int16))
        frame["timeStamp"] = {"secondsPastEpoch": 100 + unique_id, "nanoseconds": 5, "userTag": 0}
        pv = images.output(frame)
        published.append((pv["uniqueId"], pv["timeStamp"], [d["size"] for d in pv["dimension"]], pv.getUnion()))
    assert [p[0] for p in published] == [7, 8, 9]
    assert [p[1]["secondsPastEpoch"] for p in published] == [107, 108, 109]
    assert [p[2] for p in published] == [[64, 48], [64, 48], [32, 32]]  # x first, as an NTNDArray has them
    for _, _, (nx, ny), union in published:
        image = union["floatValue"]
        assert image.dtype == np.float32 and image.size == nx * ny and not image.any()


def test_sweep_goes_on_upwards_while_the_pipeline_keeps_up(monkeypatch):
    asked, settings = fake_machine(monkeypatch, capacity=130.0)
    points = bench_pipeline.sweep(settings, "ptychonn", 1, [50, 100], None, Path("."), {}, None,
                                  stop_after=1, refine=0, extend=3)
    assert asked == [50, 100, 120.0, 144.0]  # 144 falls behind: no further point
    assert bench_pipeline.best_sustained(points).target_fps == 120.0


def test_sweep_goes_down_when_nothing_keeps_up(monkeypatch):
    asked, settings = fake_machine(monkeypatch, capacity=40.0)
    points = bench_pipeline.sweep(settings, "ptychonn", 1, [90, 100], None, Path("."), {}, None,
                                  stop_after=1, refine=1, extend=3)
    assert asked == [90, 60.0, 40.0, 50.0]  # down /1.5 until 40 keeps up, then bisect 40..60
    assert bench_pipeline.best_sustained(points).target_fps == 40.0


def test_the_highest_lossless_rate_is_never_above_the_offered_rate():
    """The outputs of a short stream come in batches: their arrivals can span less time than
    the publication did, and the delivered rate come out above what was offered."""
    batched = fake_point(30.0, 1000.0)
    batched.delivered_fps = 33.75  # 64 frames in 8 batches of 8: 63 / 56 x 30 fps
    steady = fake_point(32.0, 1000.0)
    assert batched.sustained and batched.kept_up_fps == 30.0
    best = bench_pipeline.best_sustained([batched, steady])
    assert best is steady and best.kept_up_fps == 32.0


def test_quick_keeps_the_options_given():
    args = bench.get_args_parser().parse_args(["--quick", "--batches", "1", "--duration", "2", "--consumers", "2"])
    bench.apply_quick(args)
    assert args.batches == [1] and args.duration == 2.0 and args.consumers == [2]
    assert args.engine_seconds == 0.2 and args.rate_fractions == [0.3]  # the rest: quick's
    assert {"warm", "zero"} <= set(args.skip)


def test_sweep_stops_at_a_server_limited_point(monkeypatch):
    asked = []
    monkeypatch.setattr(bench_pipeline, "run_point",
                        lambda s, p, n, rate, *a: asked.append(rate) or fake_point(rate, 1e9, server_max=80.0))
    settings = bench_pipeline.PipelineSettings(model_path=Path("m.onnx"))
    points = bench_pipeline.sweep(settings, "ptychonn", 1, [50, 100, 110], None, Path("."), {}, None,
                                  stop_after=1, refine=1, extend=4)
    assert asked == [50, 100]  # 100 asked, 80 published: higher targets measure the server again
    assert points[-1].server_limited and points[-1].sustained


def test_points_of_each_processor_have_their_own_channels_and_logs(monkeypatch):
    tags = []
    monkeypatch.setattr(bench_pipeline, "run_point",
                        lambda s, p, n, rate, base, work, env, procs, tag, delay: tags.append(tag) or fake_point(rate, 1e9))
    settings = bench_pipeline.PipelineSettings(model_path=Path("m.onnx"))
    for processor, rate in (("ptychonn", 500.0), ("passthrough", 500.0), ("ptychonn", 9.0), ("ptychonn", 9.5)):
        bench_pipeline._measure(settings, processor, 1, rate, None, Path("."), {}, None,
                                bench_pipeline.StartDelay(6.0), [], None)
    assert len(set(tags)) == 4, tags



def test_no_step_offers_a_rate_that_rounds_to_0_or_to_one_already_measured(monkeypatch):
    """Rates are to 0.1 frames/s and target 0 streams as fast as the server can (before: a
    ceiling sweep from 1 fps, /10 per step, asked 1, 0.1 and 0, shown as 'max'; a sweep at
    0.1 fps asked 0.1 again, on the same channels and log folder)."""
    asked, tags = [], []

    def run_point(s, p, n, rate, base, work, env, procs, tag, delay):
        asked.append(rate)
        tags.append(tag)
        return fake_point(rate, capacity=0.01)

    monkeypatch.setattr(bench_pipeline, "run_point", run_point)
    settings = bench_pipeline.PipelineSettings(model_path=Path("m.onnx"))
    bench_pipeline.ceiling_sweep(settings, "zero", 1, 1.0, None, Path("."), {}, None, factor=10, down=4, refine=0)
    assert asked == [1.0, 0.1]
    asked.clear()
    bench_pipeline.sweep(settings, "ptychonn", 1, [0.2], None, Path("."), {}, None, down=4, refine=0)
    assert asked == [0.2, 0.1]
    asked.clear()
    monkeypatch.setattr(bench_pipeline, "run_point",
                        lambda s, p, n, rate, *a: asked.append(rate) or fake_point(rate, capacity=1e9))
    bench_pipeline.sweep(settings, "ptychonn", 1, [0.2], None, Path("."), {}, None, extend=3, refine=0)
    assert asked == [0.2]  # x1.2 rounds back to 0.2
    asked.clear()
    monkeypatch.setattr(bench_pipeline, "run_point",
                        lambda s, p, n, rate, *a: asked.append(rate) or fake_point(rate, capacity=1.0))
    bench_pipeline.sweep(settings, "ptychonn", 1, [1.0, 1.1], None, Path("."), {}, None, stop_after=1, refine=2)
    assert asked == [1.0, 1.1]  # the middle of 1.0 and 1.1 rounds to one of them
    assert "max" not in "".join(tags)


def test_a_rate_measured_once_per_sweep_whatever_repeats_it(tmp_path, monkeypatch, capsys):
    """--rate-fractions 0.6,0.6 or two fractions of one rate, and --consumers 1,1, measure each
    point once (before: twice, on the same channel names, the second one's logs over the first's);
    a fraction whose rate rounds to 0 is left out and said (before: target 0, as fast as the
    server can, shown as 'max')."""
    tags = []

    def run_point(settings, processor, n, rate, base, work, env, procs, tag, delay):
        tags.append(tag)
        return fake_point(rate, capacity=1e9)

    fake_streaming(monkeypatch, run_point)
    args = bench.get_args_parser().parse_args([
        "--skip", "warm,engine,framepath,zero,floor,passthrough", "--consumers", "1,1", "--no-plots",
        "--rate-fractions", "0.6,0.6,0.6001,0.0001", "--extend", "0", "--refine", "0",
        "--model", str(tiny_model(tmp_path / "tiny.onnx")), "--out", str(tmp_path / "out"),
    ])
    assert args.consumers == [1] and args.rate_fractions == [0.6, 0.6001, 0.0001]
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["target_fps"] for p in report["pipeline"]["points"]] == [60.0] and tags == ["ptychonn1r60"]
    out = capsys.readouterr()
    assert "rate fraction 0.0001 of 100.0 frames/s rounds to 0 frames/s: not measured" in out.out + out.err


def test_unknown_engine_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.get_args_parser().parse_args(["--engines", "onnxruntime,nope"])
    assert exit_.value.code == 2
    assert "unknown engine(s) ['nope']; known: tensorrt, torch, onnxruntime, zero" in capsys.readouterr().err


def test_ratios_come_from_the_rates_each_sweep_kept_up_with(tmp_path, monkeypatch, capsys):
    """The run's ratio rows and summary from fake points: the sim server publishes at most 85
    fps; the outputs of every point arrive over a shorter span than the server published them."""

    def run_point(settings, processor, n, rate, *args):
        point = fake_point(rate, capacity=1e9, server_max=85.0)
        point.processor, point.delivered_fps = processor, point.offered_fps * 1.05
        return point

    fake_streaming(monkeypatch, run_point)
    args = bench.get_args_parser().parse_args([
        "--skip", "warm,engine,framepath,zero", "--consumers", "1", "--ceiling-start", "60", "--no-plots",
        "--model", str(tiny_model(tmp_path / "tiny.onnx")), "--out", str(tmp_path / "out"),
    ])
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    row = report["ratios"][0]
    # ptychonn: 60, 80 and 90 (85 offered) kept up, 85 published for a target of 100: the sweep stops there
    assert [p["target_fps"] for p in report["pipeline"]["points"] if p["processor"] == "ptychonn"] == [60, 80, 90, 100]
    assert row["ptychonn_fps"] == 85.0 and row["pipeline_over_engine"] == 0.85 and row["ptychonn_server_limited"]
    assert row["passthrough_fps"] == 85.0 and row["passthrough_server_limited"]
    assert row["floor_fps"] == 85.0 and row["floor_server_limited"] and row["floor_over_passthrough"] == 1.0
    out = capsys.readouterr().out
    table = out[out.index("Ratios (measured in this run)"):].splitlines()
    cells = dict(zip([c.strip() for c in table[1].split("|")], [c.strip() for c in table[3].split("|")]))
    assert cells["best lossless fps"] == ">= 85 (server-limited)" and cells["pipeline/engine"] == ">= 0.85", cells
    assert cells["ptychonn/passthrough"] == "? (1.000, both lower bounds)", cells
    assert cells["floor fps"] == ">= 85 (server-limited)" and cells["floor/passthrough"] == "? (1.00, both lower bounds)", cells


def test_the_ceilings_alone_time_no_engine(tmp_path, monkeypatch):
    """--skip engine,pipeline: the engine-alone rate only sets the pipeline's rates; it is not timed."""
    monkeypatch.setattr(bench_pipeline, "run_point", lambda s, p, n, rate, *a: fake_point(rate, capacity=1000.0))
    monkeypatch.setattr(bench.live, "use_loopback", lambda: {})
    monkeypatch.setattr(bench.live, "loopback_multicast", lambda: (True, "on"))
    timed = []
    monkeypatch.setattr(bench, "_engine_alone", lambda *args: timed.append(args) or 100.0)
    args = bench.get_args_parser().parse_args([
        "--skip", "warm,engine,framepath,pipeline,zero,floor", "--consumers", "1", "--ceiling-points", "1", "--refine", "0",
        "--no-plots", "--model", str(tiny_model(tmp_path / "tiny.onnx")), "--out", str(tmp_path / "out"),
    ])
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert timed == [] and "engine" not in report
    assert report["ratios"][0]["passthrough_fps"] == 500.0 and report["ratios"][0]["engine_alone_fps"] is None


def test_a_point_that_fails_with_an_error_ends_the_step_down(monkeypatch):
    """Consumers that never get ready are no matter of rate: the sweeps stop there instead of
    stepping down (before: up to --down more points, each waiting for the ready timeout)."""
    from dataclasses import replace

    asked = []
    monkeypatch.setattr(bench_pipeline, "run_point", lambda s, p, n, rate, *a: asked.append(rate) or replace(
        fake_point(rate, 1e9), n_received=0, n_unique=0, delivered_fps=0.0, error="consumers not ready in 90 s"))
    settings = bench_pipeline.PipelineSettings(model_path=Path("m.onnx"))
    bench_pipeline.sweep(settings, "ptychonn", 1, [50], None, Path("."), {}, None, stop_after=1, down=4)
    assert asked == [50]
    asked.clear()
    bench_pipeline.ceiling_sweep(settings, "zero", 1, 400.0, None, Path("."), {}, None, down=3)
    assert asked == [400.0]



def test_ceiling_sweep_steps_down_from_a_server_limited_point_that_fell_behind(monkeypatch):
    """The server publishes at most 400 fps and the consumer keeps up with 300: the start rate
    is server-limited and not kept up with, so the climb steps down as from any point that was
    not sustained (before: it stopped at its first point, and the ceiling was never found)."""
    asked = []
    monkeypatch.setattr(bench_pipeline, "run_point",
                        lambda s, p, n, rate, *a: asked.append(rate) or fake_point(rate, 300.0, server_max=400.0))
    settings = bench_pipeline.PipelineSettings(model_path=Path("m.onnx"))
    points = bench_pipeline.ceiling_sweep(settings, "passthrough", 1, 500.0, None, Path("."), {}, None,
                                          factor=1.5, refine=1)
    assert points[-1].server_limited and not points[-1].sustained
    assert asked == [500.0, 333.3, 222.2, 277.8]  # down until one keeps up, then the bisection
    assert bench_pipeline.best_sustained(points).target_fps == 277.8


def test_engine_auto_is_timed_as_the_engine_and_precision_it_chose():
    """--pipeline-engine auto: the engine-alone rate of the pipeline's engine is timed with
    engine 'auto' (before: a ValueError traceback, "'auto' ... has no class", from its SPEC)."""
    from edge_ptychonn.model_card import default_model_path
    from engines.base import PRECISIONS

    peaks = {p: {"flops_per_s": 1e12} for p in ("fp32", "fp16", "bf16")}
    results, skipped = bench_engine.bench_engines(default_model_path(), ["auto"], [1], {"auto": ("auto",)},
                                                  0.01, 1e6, peaks, threads=[1])
    assert not skipped and len(results) == 1, skipped
    (r,) = results
    assert r.engine.startswith("auto (") and r.engine != "auto (auto)" and r.precision in PRECISIONS, r
    assert r.frames_per_s > 0 and r.peak_basis in ("fp32", "bf16", "fp16") and r.percent_of_peak > 0


def test_the_frame_path_alone_keeps_pva_on_loopback(tmp_path, monkeypatch):
    """The frame path publishes into a PVA server in the bench's own process: run without the
    streaming parts (the engines-and-frame-path command of docs/benchmarks.md), it had no
    loopback settings, and its server's beacons went out on every interface."""
    from edge_ptychonn.tools import bench_frame_path
    from edge_ptychonn.tools.processes import LOOPBACK_ENV

    for name in LOOPBACK_ENV:
        monkeypatch.setenv(name, "")  # a shell without them (restored after the test)
    seen = {}

    def measure(*args, **kwargs):
        seen.update({name: os.environ.get(name) for name in LOOPBACK_ENV})
        return {"stages_us": {}, "stages_sum_us": 0.0, "pipeline_us": 1.0, "passthrough_us": 1.0, "floor_us": 1.0,
                "pipeline_us_by_runner": {"thread": 1.0, "receive": 1.0},
                "attribute_us": {"unchanged": 1.0, "changing": 1.0, "not_forwarded": 0.0}}

    monkeypatch.setattr(bench_frame_path, "measure", measure)
    args = bench.get_args_parser().parse_args([
        "--skip", "warm,engine,pipeline,zero,floor,passthrough", "--no-plots",
        "--model", str(tiny_model(tmp_path / "tiny.onnx")), "--out", str(tmp_path / "out"),
    ])
    assert bench.main(args) == 0
    assert seen == LOOPBACK_ENV


def fake_streaming(monkeypatch, run_point, engine_alone: float = 100.0):
    """main() with the points of ``run_point`` and an engine-alone rate of ``engine_alone`` frames/s."""
    monkeypatch.setattr(bench_pipeline, "run_point", run_point)
    monkeypatch.setattr(bench.live, "use_loopback", lambda: {})
    monkeypatch.setattr(bench.live, "loopback_multicast", lambda: (True, "on"))
    monkeypatch.setattr(bench, "_engine_alone", lambda *args: engine_alone)


def test_an_interrupted_sweep_leaves_its_points_in_the_report(tmp_path, monkeypatch):
    """Ctrl-C during the third point of a sweep: the two measured before are in report.json
    (before: every point of the sweep cut short was left out, though its lines were printed)."""
    asked = []

    def run_point(settings, processor, n, rate, *args):
        asked.append(rate)
        if len(asked) == 3:
            raise KeyboardInterrupt
        return fake_point(rate, capacity=1e9)

    fake_streaming(monkeypatch, run_point)
    args = bench.get_args_parser().parse_args([
        "--skip", "warm,engine,framepath,zero,floor", "--consumers", "1", "--no-plots",
        "--model", str(tiny_model(tmp_path / "tiny.onnx")), "--out", str(tmp_path / "out"),
    ])
    assert bench.main(args) == 130
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["interrupted"] and [p["target_fps"] for p in report["pipeline"]["points"]] == [60.0, 80.0]


def test_a_rate_no_higher_one_fell_short_of_is_a_lower_bound(tmp_path, monkeypatch, capsys):
    """--quick times one pipeline rate (0.3 x the engine alone) and one passthrough rate: both
    kept up, so neither is the pipeline's limit (before: 'pipeline/engine 0.30', the fraction
    offered, and the passthrough's first rate, printed as measured ceilings)."""
    fake_streaming(monkeypatch, lambda s, processor, n, rate, *a: replace(fake_point(rate, 1e9), processor=processor))
    args = bench.get_args_parser().parse_args([
        "--quick", "--skip", "engine,framepath", "--no-plots",
        "--model", str(tiny_model(tmp_path / "tiny.onnx")), "--out", str(tmp_path / "out"),
    ])
    assert bench.main(args) == 0
    row = json.loads((tmp_path / "out" / "report.json").read_text())["ratios"][0]
    assert row["ptychonn_fps"] == 30.0 and row["passthrough_fps"] == 200.0
    assert row["ptychonn_lower_bound"] and row["passthrough_lower_bound"] and not row["passthrough_server_limited"]
    out = capsys.readouterr().out
    table = out[out.index("Ratios (measured in this run)"):].splitlines()
    cells = dict(zip([c.strip() for c in table[1].split("|")], [c.strip() for c in table[3].split("|")]))
    assert cells["best lossless fps"] == ">= 30 (top of the sweep)" and cells["pipeline/engine"] == ">= 0.30", cells
    assert cells["passthrough fps"] == ">= 200 (top of the sweep)", cells
    assert cells["ptychonn/passthrough"] == "? (0.150, both lower bounds)", cells


def test_a_rate_a_higher_one_fell_short_of_is_the_limit():
    kept, behind = fake_point(80.0, 85.0), fake_point(100.0, 85.0)  # 100 offered, 85 delivered
    assert bench_pipeline.is_lower_bound([kept, behind], kept) is False
    failed = replace(fake_point(100.0, 1e9), error="read the status of 0 of 1 consumers")
    assert bench_pipeline.is_lower_bound([kept, failed], kept) is True  # an error says nothing of the rate
    assert bench_pipeline.is_lower_bound([behind], None) is False
    assert "[error, 0 s]" in bench_pipeline.describe(failed) and "LOSS" not in bench_pipeline.describe(failed)


@pytest.mark.e2e
def test_forked_consumers_that_fail_at_start_are_told_at_once(tmp_path):
    """-nc 2 with a processor that fails at start: PvaPy's parent lives on, logging that no
    statistics come (before: each such point waited the whole ready timeout, 90 s, and said
    only that the consumers were not ready)."""
    from channel_names import PREFIX

    from edge_ptychonn.tools import processes as live

    env = live.use_loopback()
    procs = bench_pipeline.Procs()
    argv = live.consumer_argv(f"{PREFIX}bwr:image", f"{PREFIX}bwr:out", 2, bench_pipeline.PTYCHONN,
                              {"modelPath": str(tmp_path / "none.onnx")}, batch_updates=8)
    try:
        consumer = procs.start("consumer", argv, env, tmp_path)
        t0 = time.monotonic()
        error = bench_pipeline._wait_ready([f"{PREFIX}bwr:out:{i}:status" for i in (1, 2)], True, 60.0, [consumer])
        took = time.monotonic() - t0
        assert consumer.running()  # the parent, with no consumer left
    finally:
        procs.stop_all()
    # told as they go: once one has exited, or when none is left
    told = {f"consumer: {what} exited at start; log: {tmp_path / 'consumer.log'}"
            for what in ("its consumers", "1 of 2 consumers", "2 of 2 consumers")}
    assert error in told and took < 45, (error, took)


@pytest.mark.e2e
@pytest.mark.parametrize("n_consumers", [1, 2])
def test_a_consumer_that_dies_during_a_point_is_named_in_its_error(tmp_path, monkeypatch, n_consumers):
    """The consumer killed once its output is connected, before the stream; or, of two, one of
    PvaPy's forked ones once the first outputs are in (before: the point's error said only
    'read the status of 0 of 1 consumers' or '1 of 2', nothing of why, nor where the log is;
    and the bench waited for a first output from a consumer that was gone, about 25 s here)."""
    import signal

    from channel_names import PREFIX

    from edge_ptychonn.tools import processes as live

    killed = []
    procs = bench_pipeline.Procs()
    take = bench_pipeline.CpuSample.take.__func__
    wait_connected = live.OutputCollector.wait_connected

    def connect_and_kill(collector, timeout_s):  # once ready, before the first frame
        connected = wait_connected(collector, timeout_s)
        (consumer,) = [p for p in procs.procs if p.name == "consumer"]
        consumer.popen.kill()
        consumer.popen.wait(10)
        killed.append(consumer.pid)
        return connected

    def take_and_kill(cls, consumer, server, n_out, *collector_pids):  # called at the first output
        if not killed:
            forked = live.child_pids(consumer.pid, zombies=False)
            os.kill(forked[0], signal.SIGKILL)
            assert live.wait_until(lambda: len(live.child_pids(consumer.pid, zombies=False)) == len(forked) - 1, 10)
            killed.append(forked[0])
        return take(cls, consumer, server, n_out, *collector_pids)

    if n_consumers == 1:
        monkeypatch.setattr(live.OutputCollector, "wait_connected", connect_and_kill)
    else:
        monkeypatch.setattr(bench_pipeline.CpuSample, "take", classmethod(take_and_kill))
    unanswered = []  # status reads after the kill that waited their whole timeout for nothing
    read_status = live.read_status

    def read_and_count(channel, timeout_s=3.0):  # (a readiness poll before a status is up is no such read)
        status = read_status(channel, timeout_s)
        if status is None and killed:
            unanswered.append(channel)
        return status

    monkeypatch.setattr(live, "read_status", read_and_count)
    env = live.use_loopback()
    # a short stream (64 frames at 100 fps) and a start delay that a passthrough consumer meets
    settings = bench_pipeline.PipelineSettings(model_path=tmp_path / "unused.onnx", duration_s=0.5)
    try:
        r = bench_pipeline.run_point(settings, "passthrough", n_consumers, 100.0, bench_pipeline.make_frames(8, (32, 32)),
                                     tmp_path, env, procs, f"{PREFIX}die{n_consumers}", 5.0)
    finally:
        procs.stop_all()
    assert killed, r.error
    log = tmp_path / "logs" / f"{PREFIX}die{n_consumers}" / "consumer.log"
    told = "consumer exited during the point (code -9)" if n_consumers == 1 else "1 of 2 consumers exited during the point"
    assert r.error == f"{told}; log: {log}", r.error
    assert not r.sustained and "[error," in bench_pipeline.describe(r)
    # a consumer known to be gone is not asked again (before: the dead one twice, 3 s each); of
    # two, the dead one's one unanswered read is what told; a live one's read may time out once
    # on a loaded machine too (seen), but no channel goes unanswered twice
    if n_consumers == 1:
        assert unanswered == [], unanswered
    else:
        assert unanswered and max(unanswered.count(c) for c in unanswered) == 1, unanswered
    if n_consumers == 1:  # no wait for outputs from a consumer that is gone
        assert r.n_received == 0 and r.wall_s - r.ready_s < 10, (r.wall_s, r.ready_s)


def test_an_interrupted_warm_start_leaves_its_launches_in_the_report(tmp_path, monkeypatch):
    """Ctrl-C during the second launch: the first one's time is in report.json (before: the
    warm-start part was reported only once every launch was done, so none was kept)."""

    def warm_start(settings, engines, base_frames, work_dir, env, procs, progress=None, into=None, **kwargs):
        first = bench_pipeline.WarmStart("onnxruntime", "first", 3.25)
        if into is not None:
            into.append(first)
        raise KeyboardInterrupt

    fake_streaming(monkeypatch, lambda *a: pytest.fail("no pipeline point in this run"))
    monkeypatch.setattr(bench_pipeline, "warm_start", warm_start)
    args = bench.get_args_parser().parse_args([
        "--skip", "engine,framepath,pipeline,zero,floor,passthrough", "--engines", "onnxruntime", "--no-plots",
        "--model", str(tiny_model(tmp_path / "tiny.onnx")), "--out", str(tmp_path / "out"),
    ])
    assert bench.main(args) == 130
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["interrupted"] and report["warm_start"] == [
        {"engine": "onnxruntime", "launch": "first", "first_output_s": 3.25, "error": None}]



def test_a_warm_start_launch_that_cannot_start_closes_its_collector(tmp_path, monkeypatch):
    """The consumer's start raises (no such program, a Ctrl-C in it): the output collector
    opened for that launch is closed too (before: left monitoring), and the server stopped."""
    from edge_ptychonn.tools import processes as live

    opened = []

    class Collector:
        def __init__(self, channels, keep_images=True, keep_attributes=True):
            self.closed = False
            opened.append(self)

        def close(self):
            self.closed = True

    stopped = []

    class Procs:
        def start(self, name, argv, env, log_dir):
            if name != "server":
                raise KeyboardInterrupt
            return name

        def stop(self, proc):
            stopped.append(proc)

    monkeypatch.setattr(live, "OutputCollector", Collector)
    settings = bench_pipeline.PipelineSettings(model_path=tmp_path / "m.onnx")
    with pytest.raises(KeyboardInterrupt):
        bench_pipeline.warm_start(settings, ["onnxruntime"], bench_pipeline.make_frames(2, (8, 8)), tmp_path, {},
                                  Procs())
    assert len(opened) == 1 and opened[0].closed and stopped == ["server"]


def test_the_worker_counts_given_are_the_ones_timed(tmp_path):
    """--workers 2 times 2 workers (before: 1 worker too, as if '1,2' had been given); a
    layout that does not fit the cores is told in the skipped list, not an empty table."""
    model = tiny_model(tmp_path / "tiny.onnx")
    results, skipped = bench_engine.bench_engines(model, ["zero"], [1], {"zero": ("fp32",)}, 0.01, 1e3, {},
                                                  threads=[1], workers=[2])
    assert not skipped and [(r.threads, r.workers) for r in results] == [(1, 2)]
    cores = bench_engine.usable_cores()
    results, skipped = bench_engine.bench_engines(model, ["zero"], [1], {"zero": ("fp32",)}, 0.01, 1e3, {},
                                                  threads=[cores], workers=[2])
    assert results == [] and [(s["threads"], s["workers"]) for s in skipped] == [(cores, 2)]
    assert skipped[0]["reason"] == f"2 workers x {cores} threads do not fit the {cores} cores"
    report = {"engine_skipped": skipped}
    assert f"skipped zero fp32 ({cores} threads x 2 workers): 2 workers" in bench_report.summary_text(report)


def test_one_forked_consumer_that_fails_at_start_is_told_at_once(tmp_path, monkeypatch):
    """A parent that forks two children, one of which exits at once and is left unreaped (as
    PvaPy's does with a consumer whose processor fails at start): the others' statuses may come,
    this one's never does (before: the bench waited the whole ready timeout)."""
    import sys

    from edge_ptychonn.tools import processes as live

    monkeypatch.setattr(live, "read_status", lambda channel, timeout_s=3.0: None)  # no channel here
    parent = ("import os, time\n"
              "for k in range(2):\n"
              "    if os.fork() == 0:\n"
              "        os._exit(3) if k == 0 else time.sleep(60)\n"
              "time.sleep(60)\n")
    procs = bench_pipeline.Procs()
    try:
        consumer = procs.start("consumer", [sys.executable, "-c", parent], {**os.environ}, tmp_path)
        t0 = time.monotonic()
        error = bench_pipeline._wait_ready(["a:1:status", "a:2:status"], True, 20.0, [consumer])
        took = time.monotonic() - t0
    finally:
        procs.stop_all()
    assert error == f"consumer: 1 of 2 consumers exited at start; log: {tmp_path / 'consumer.log'}", error
    assert took < 10, took


def test_an_interrupted_engine_part_leaves_its_timings_in_the_report(tmp_path, monkeypatch):
    """Ctrl-C while the second batch size is timed: the first one's rate is in report.json
    (before: the engine part was reported only once every engine, layout and batch was done)."""
    timed = []
    time_engine = bench_engine.time_engine

    def time_then_interrupt(*args, **kwargs):
        if timed:
            raise KeyboardInterrupt
        timed.append(args[1])
        return time_engine(*args, **kwargs)

    monkeypatch.setattr(bench_engine, "time_engine", time_then_interrupt)
    args = bench.get_args_parser().parse_args([
        "--skip", "warm,framepath,pipeline,zero,floor,passthrough", "--engines", "zero", "--precisions", "fp32",
        "--batches", "1,8", "--threads", "1", "--workers", "1", "--engine-seconds", "0.01", "--engine-repeats", "1",
        "--peak-sizes", "64", "--peak-seconds", "0.01", "--no-plots",
        "--model", str(tiny_model(tmp_path / "tiny.onnx")), "--out", str(tmp_path / "out"),
    ])
    assert bench.main(args) == 130
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["interrupted"] and [(r["engine"], r["batch"]) for r in report["engine"]] == [("zero", 1)]
    assert report["engine"][0]["frames_per_s"] > 0


def test_a_point_with_an_error_is_not_server_limited_and_ends_the_sweep(monkeypatch):
    """Consumers not ready: the server is stopped before its stream, nothing published (before:
    0 offered for a target of 100 read as 'error, server-limited' in the table and report);
    a point with an error ends a sweep also with --stop-after 2 (before: the next rate was
    tried, with its own wait for consumers that fail the same way)."""
    early = replace(fake_point(100.0, 1e9), offered_fps=0.0, n_offered=0, n_received=0, n_unique=0,
                    delivered_fps=0.0, error="consumers not ready after 90 s")
    assert not early.server_limited and early.to_dict()["server_limited"] is False
    assert "server-limited" not in bench_pipeline.describe(early)
    assert "server-limited" not in bench_report.pipeline_table({"pipeline": {"points": [early.to_dict()]}})
    asked = []
    monkeypatch.setattr(bench_pipeline, "run_point", lambda s, p, n, rate, *a: asked.append(rate) or replace(
        fake_point(rate, 1e9), error="1 of 2 consumers exited during the point"))
    settings = bench_pipeline.PipelineSettings(model_path=Path("m.onnx"))
    bench_pipeline.sweep(settings, "ptychonn", 2, [50, 100], None, Path("."), {}, None, stop_after=2)
    assert asked == [50]


def test_bounds_and_ratios_are_never_rounded_past_what_was_measured():
    """A lower bound or a ratio read against its 0.9 target is rounded down, an upper bound
    up (before: '>= 0.90' for a ratio known only to be >= 0.897, '<= 0.94' for one known
    only to be <= 0.9441, '>= 85' for a ceiling of at least 84.6 frames/s, '0.90' for 0.897)."""
    assert bench_report.bounded_ratio(0.897, True, False, ".2f") == ">= 0.89"
    assert bench_report.bounded_ratio(0.9441, False, True, ".2f") == "<= 0.95"
    assert bench_report.bounded_ratio(0.897, False, False, ".2f") == "0.89"
    assert bench_report.bounded_ratio(0.29, False, False, ".2f") == "0.29"  # 0.29 x 100 < 29 in binary
    assert bench_report._at_least(84.6, True) == ">= 84 (server-limited)"
    report = sample_report()
    report["ratios"][0].update(zero_over_passthrough=0.8971, passthrough_server_limited=False,
                               zero_server_limited=True, pipeline_over_engine=0.8999)
    text = bench_report.summary_text(report)
    assert ">= 0.89" in text and "0.90" not in text, text


def fake_matplotlib(monkeypatch, fail):
    """A matplotlib whose figures fail with ``fail`` (e.g. a full disk, a Ctrl-C)."""
    import sys
    import types

    matplotlib, pyplot = types.ModuleType("matplotlib"), types.ModuleType("matplotlib.pyplot")
    matplotlib.use = lambda backend: None
    matplotlib.pyplot = pyplot

    def subplots(*args, **kwargs):
        raise fail

    pyplot.subplots, pyplot.close = subplots, lambda *args: None
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)


@pytest.mark.parametrize("fail", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_plots_that_fail_lose_neither_the_report_nor_the_tables(tmp_path, monkeypatch, capsys, fail):
    """Plotting fails (a full disk) or is cut short (Ctrl-C while matplotlib works): report.json
    is written all the same (before: the plots came first, and their failure lost the report
    and the tables, with a traceback)."""
    fake_streaming(monkeypatch, lambda s, processor, n, rate, *a: replace(fake_point(rate, 1e9), processor=processor))
    fake_matplotlib(monkeypatch, fail)
    args = bench.get_args_parser().parse_args([
        "--skip", "warm,engine,framepath,zero,floor,passthrough", "--consumers", "1", "--rate-fractions", "0.5",
        "--extend", "0", "--refine", "0", "--model", str(tiny_model(tmp_path / "tiny.onnx")), "--out", str(tmp_path / "out"),
    ])
    if isinstance(fail, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            bench.main(args)
    else:
        assert bench.main(args) == 0
        out = capsys.readouterr()
        assert "plots stopped after 0 written: OSError" in out.err + out.out and "Ratios (measured" in out.out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["target_fps"] for p in report["pipeline"]["points"]] == [50.0]


def test_several_consumers_of_batch_1_share_the_frames(tmp_path, monkeypatch):
    """--pipeline-batch 1 with N > 1: the consumers get '-du 1' (before: no -du, so no
    distributor, and every consumer received every frame: 2 consumers, 128 received of 64
    offered, delivered 201 frames/s for 100 offered)."""
    started = {}

    class Procs:
        procs: list = []

        def start(self, name, argv, env, log_dir):
            started[name] = argv
            if name == "consumer":
                raise RuntimeError("enough")

        def stop(self, proc):
            pass

    for batch, n, du in [(1, 2, "1"), (8, 2, "8"), (1, 1, None)]:
        settings = bench_pipeline.PipelineSettings(model_path=tmp_path / "m.onnx", batch=batch, duration_s=0.1)
        with pytest.raises(RuntimeError, match="enough"):
            bench_pipeline.run_point(settings, "passthrough", n, 100.0, bench_pipeline.make_frames(2, (8, 8)),
                                     tmp_path, {}, Procs(), "t", 5.0)
        argv = started["consumer"]
        assert (argv[argv.index("-du") + 1] if "-du" in argv else None) == du, argv
        assert argv.count("-du") <= 1


def test_the_consumers_threads_are_split_by_name_into_running_waiting_and_off_cpu():
    # two samples 2 s apart of live.thread_times: (pid, tid) -> (name, s on a CPU, s waiting for one)
    before = {(10, 11): ("ptychonn-infer", 5.0, 1.0), (10, 12): ("TCP-rx", 1.0, 0.5), (20, 22): ("TCP-rx", 2.0, 0.0),
              (10, 13): ("gone", 1.0, 0.0), (10, 14): ("idle", 3.0, 0.0)}
    after = {(10, 11): ("ptychonn-infer", 6.0, 1.5), (10, 12): ("TCP-rx", 1.4, 0.9), (20, 22): ("TCP-rx", 2.2, 0.2),
             (10, 15): ("new", 0.5, 0.0), (10, 14): ("idle", 3.01, 0.0)}
    split = bench_pipeline.thread_split(before, after, wall_s=2.0)
    assert split == [{"thread": "ptychonn-infer", "n": 1, "cpu": 50.0, "wait_cpu": 25.0, "off_cpu": 25.0},
                     {"thread": "TCP-rx", "n": 2, "cpu": 15.0, "wait_cpu": 15.0, "off_cpu": 70.0}]
    assert bench_pipeline.thread_split(before, {}, wall_s=2.0) is None
    sample = bench_pipeline.CpuSample(1.0, 2.0, 3.0, 10.0, 40.0, n_out=100, wall_s=0.0, consumer_threads=before)
    cpu = sample.per_frame_us(replace(sample, n_out=1100, wall_s=2.0, consumer_threads=after))
    assert cpu["consumer_threads"] == split
    point = replace(fake_point(100.0, 1000.0), cpu_consumer_us=500.0, consumer_threads=split)
    assert ("consumer threads, % of wall running / waiting for a core / off a core: ptychonn-infer 50/25/25, "
            "TCP-rx x2 15/15/70") in bench_pipeline.describe(point)


def test_thread_times_reads_this_process_s_named_threads():
    from edge_ptychonn.thread_name import name_this_thread

    named, done = threading.Event(), threading.Event()

    def run():
        assert name_this_thread("a-very-long-thread-name")  # the kernel keeps 15 bytes
        named.set()
        while not done.is_set():  # some CPU to see
            sum(range(1000))

    thread = threading.Thread(target=run)
    thread.start()
    mine = lambda times: [v for (_, tid), v in times.items() if tid == thread.native_id]  # noqa: E731
    try:
        assert named.wait(5)
        deadline = time.monotonic() + 10
        while True:  # until the thread has run
            times = bench_pipeline.live.thread_times(os.getpid())
            if any(cpu_s > 0 for _, cpu_s, _ in mine(times)):
                break
            assert time.monotonic() < deadline, times
    finally:
        done.set()
        thread.join()
    [(name, cpu_s, wait_s)] = mine(times)
    assert name == "a-very-long-thr" and cpu_s > 0 and wait_s >= 0
    assert all(pid == os.getpid() for pid, _ in times)


def test_a_point_without_the_machine_busy_share_is_described(monkeypatch):
    """CPU per frame known, the machine's busy share not (a window within one clock tick:
    /proc/stat's total did not move): the progress line says '?' (before: a TypeError that
    ended the bench)."""
    before = bench_pipeline.CpuSample(1.0, 1.0, 1.0, 50.0, 100.0, 0)
    cpu = before.per_frame_us(replace(before, n_out=40))
    assert cpu["cpu_consumer_us"] == 0.0 and cpu["machine_busy_pct"] is None
    text = bench_pipeline.describe(replace(fake_point(100.0, 1e9), **cpu))
    assert "CPU per frame: consumer 0 us" in text and "machine ? busy" in text


def test_help_shows_list_defaults_as_they_are_typed():
    """The help showed list defaults as Python lists ('[1, 8, 32]'), which the options do
    not take, and '--no-plots' had no text."""
    text = bench.get_args_parser().format_help()
    assert "(default: 1,8,32)" in text and "(default: 0.6,0.8,0.9,1.0,1.1)" in text, text
    assert "[1, 8, 32]" not in text and "(default: [])" not in text
    assert "write no PNG plots" in text


def test_final_statuses_are_read_once_taken_after_the_stream(monkeypatch):
    """The point's final statistics come from status records taken after its last output
    (their objectTime), polled for (before: a fixed 1.3 s sleep and one read, whatever the
    records' age); a record that never refreshes is returned after the timeout."""
    reads = []
    answers = iter([[{"objectTime": 99.0}, {"objectTime": 101.0}], [{"objectTime": 99.5}, None],
                    [{"objectTime": 100.2}, {"objectTime": 101.0}]])

    def read(channels, consumer, earlier=None):
        reads.append(earlier)
        return next(answers)

    monkeypatch.setattr(bench_pipeline, "_read_statuses", read)
    got = bench_pipeline._statuses_after(100.0, ["a", "b"], None, ["flowing"], timeout_s=10.0)
    assert got == [{"objectTime": 100.2}, {"objectTime": 101.0}] and reads == [["flowing"]] * 3
    monkeypatch.setattr(bench_pipeline, "_read_statuses", lambda channels, consumer, earlier=None: [{"objectTime": 1.0}])
    t0 = time.monotonic()
    assert bench_pipeline._statuses_after(100.0, ["a"], None, None, timeout_s=0.3) == [{"objectTime": 1.0}]
    assert time.monotonic() - t0 < 5


def test_the_delivered_rate_leaves_out_each_consumers_last_partial_batch():
    """A stream of 2250 frames at 1500/s whose last 2 frames (a partial batch) wait for the
    50 ms batch timeout and a first run of that size: the pipeline kept up (before: 1403
    delivered, 'falling behind', measured on a GPU). A real backlog still shows."""
    kept = [k / 1500.0 for k in range(2248)] + [2249 / 1500.0 + 0.083] * 2
    assert bench_pipeline.delivered_rate(kept, 8) == pytest.approx(1500.0, rel=1e-3)
    assert bench_pipeline.delivered_rate(kept, 0) < 0.97 * 1500.0  # what the old measure said
    behind = [k / 1000.0 for k in range(2250)]  # the consumer delivers 1000/s of the 1500 offered
    assert bench_pipeline.delivered_rate(behind, 8) == pytest.approx(1000.0, rel=1e-3)
    few = [0.0, 0.1, 0.2, 0.3]  # the tail would leave less than half: all arrivals count
    assert bench_pipeline.delivered_rate(few, 8) == pytest.approx(10.0)
    assert bench_pipeline.delivered_rate([1.0], 8) == 0.0 == bench_pipeline.delivered_rate([], 0)


def test_pipeline_climb_finds_the_ptychonn_ceiling_from_below_at_n_times_the_start(tmp_path, monkeypatch):
    """--pipeline-climb --ceiling-per-consumer: the PtychoNN sweep climbs like the ceilings do, from
    --ceiling-start x N (an engine faster than the transport has no useful fractions)."""
    asked = []

    def run_point(settings, processor, n, rate, *args):
        asked.append((processor, n, rate))
        point = fake_point(rate, capacity=400.0 * n)
        point.processor, point.n_consumers = processor, n
        return point

    fake_streaming(monkeypatch, run_point, engine_alone=26000.0)
    args = bench.get_args_parser().parse_args([
        "--skip", "warm,engine,framepath,zero,floor,passthrough", "--consumers", "1,2", "--no-plots",
        "--pipeline-climb", "--ceiling-start", "200", "--ceiling-per-consumer", "--ceiling-factor", "1.5",
        "--refine", "0", "--model", str(tiny_model(tmp_path / "tiny.onnx")), "--out", str(tmp_path / "out"),
    ])
    assert bench.main(args) == 0
    assert asked == [("ptychonn", 1, 200.0), ("ptychonn", 1, 300.0), ("ptychonn", 1, 450.0),
                     ("ptychonn", 2, 400.0), ("ptychonn", 2, 600.0), ("ptychonn", 2, 900.0)]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["ptychonn_fps"] for r in report["ratios"]] == [300.0, 600.0]


class _FakeGpuEngine:
    """Stands in for the torch engine on a GPU: records how it was made."""

    made: list = []
    name, precision, input_shape, max_in_flight = "torch", "fp16", (8, 8), 1

    def __init__(self, options):
        self.max_batch, self.device = options.max_batch, "cuda:0 (fake GPU)"
        _FakeGpuEngine.made.append((options.max_batch, options.cuda_graphs))

    def infer(self, batch):
        return batch

    def close(self):
        pass


def test_the_torch_gpu_engine_is_timed_at_full_batches_with_and_without_cuda_graphs(tmp_path, monkeypatch):
    """Its CUDA graph is captured for the engine's full batch: one engine per batch size, so that
    batch 8 is not timed on an engine made for 64 (eagerly); --cuda-graphs both times each twice."""
    import engines

    _FakeGpuEngine.made = []
    monkeypatch.setattr(engines, "create_engine", lambda name, options: _FakeGpuEngine(options))
    results, skipped = bench_engine.bench_engines(tmp_path / "m.onnx", ["torch"], [8, 64], {"torch": ("fp16",)},
                                                  0.01, 1e3, {}, threads=[1], device="cuda",
                                                  cuda_graphs=(True, False))
    assert not skipped and _FakeGpuEngine.made == [(8, True), (64, True), (8, False), (64, False)]
    assert [(r.batch, r.cuda_graphs, r.percent_of_peak) for r in results] == [
        (8, True, None), (64, True, None), (8, False, None), (64, False, None)]
    table = bench_report.engine_table({"engine": [r.to_dict() for r in results]}).splitlines()
    assert table[0].split("|")[-2].strip() == "CUDA graphs"
    assert [row.split("|")[-2].strip() for row in table[2:]] == ["yes", "yes", "no", "no"]
    # on the CPU one engine times every batch, and the table has no such column
    assert "CUDA graphs" not in bench_report.engine_table({"engine": [{**r.to_dict(), "cuda_graphs": None}
                                                                     for r in results]})


def test_a_relative_out_folder_reaches_the_processes_and_a_part_whose_points_all_failed_is_exit_1(
        tmp_path, monkeypatch, capsys):
    """The default --out (results/bench-...) is relative; the processes the bench starts run in the
    project's folder, so the sim server found no scan and every point failed, and the bench exited
    0 over a table of errors. Now the folder is made absolute, and a part whose every point failed
    is 'not measured': exit status 1."""
    works = []

    def run_point(settings, processor, n, rate, base, work, *args):
        works.append(work)
        point = fake_point(rate, capacity=1e9)
        point.error = "the output channels did not connect in 10 s"
        return point

    fake_streaming(monkeypatch, run_point)
    monkeypatch.chdir(tmp_path)
    args = bench.get_args_parser().parse_args([
        "--skip", "warm,engine,framepath,zero,floor,passthrough", "--consumers", "1", "--no-plots",
        "--rate-fractions", "0.5,0.6", "--extend", "0", "--refine", "0", "--stop-after", "2",
        "--model", str(tiny_model(tmp_path / "tiny.onnx")), "--out", "rel",
    ])
    assert bench.main(args) == 1
    assert works and all(Path(w).is_absolute() and Path(w) == tmp_path / "rel" for w in works), works
    out = capsys.readouterr().out
    assert "not measured: pipeline N=1: every point failed; the first: the output channels did not connect" in out, out
