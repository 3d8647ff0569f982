"""scripts/gpu-bench.sh, the GPU measurements of docs/benchmarks.md in one place: CI has no GPU, so
its --dry-run is checked: every command it would run is one the bench (or build-engine) accepts,
with the parts, consumers and engines asked for, and nothing is run."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from edge_ptychonn.tools import bench, build_engine

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-bench.sh"


def dry_run(tmp_path: Path, *args: str, pythonpath: Path | None = None) -> list[tuple[str, list[str]]]:
    """The commands ``gpu-bench.sh --dry-run args`` prints: (part, the arguments after the subcommand)."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    commands = []
    for line in done.stdout.splitlines():
        if line.startswith("== "):
            part, command = line[3:].split(": ", 1)
            words = shlex.split(command)
            assert Path(words[0]).name == "edge-ptychonn", line
            commands.append((part, words[1:]))
    assert list(tmp_path.iterdir()) == [], "a dry run made files"
    return commands


def bench_args(words: list[str]):
    assert words[0] == "bench", words
    return bench.get_args_parser().parse_args(words[1:])


def test_the_dry_run_prints_bench_commands_the_bench_accepts(tmp_path):
    hide = tmp_path / "hide"  # a host without TensorRT, whatever this one has
    hide.mkdir()
    (hide / "tensorrt.py").write_text("raise ImportError('no TensorRT here')\n")
    run_in = tmp_path / "run"
    run_in.mkdir()
    commands = dry_run(run_in, pythonpath=hide)
    assert [part for part, _ in commands] == ["engine", "pipeline", "frame"]
    runs = {part: bench_args(words) for part, words in commands}
    for part, args in runs.items():
        assert args.device == "auto" and args.no_realtime and args.out == Path(f"results/gpu-bench/{part}")
    engine = runs["engine"]
    assert set(bench.PARTS) - set(engine.skip) == {"warm", "engine"}
    assert engine.engines == ["torch"] and engine.precisions == ["fp32", "tf32", "bf16", "fp16"]
    assert engine.batches == [1, 8, 32, 64] and engine.cuda_graphs == "both"
    pipeline = runs["pipeline"]
    assert set(bench.PARTS) - set(pipeline.skip) == {"pipeline"}
    assert pipeline.consumers == [1, 2, 4, 8] and pipeline.pipeline_climb and pipeline.source == "fast"
    assert (pipeline.pipeline_engine, pipeline.pipeline_precision) == ("torch", "fp16")
    frame = runs["frame"]
    assert set(bench.PARTS) - set(frame.skip) == {"zero", "floor", "passthrough"} and frame.source == "fast"


def test_with_tensorrt_its_plans_are_built_first_and_it_runs_the_pipeline(tmp_path):
    stubs = tmp_path / "stubs"  # what 'import tensorrt, pycuda' finds on a host that has them
    (stubs / "pycuda").mkdir(parents=True)
    (stubs / "pycuda" / "__init__.py").write_text("")
    (stubs / "tensorrt.py").write_text("")
    run_in = tmp_path / "run"
    run_in.mkdir()
    commands = dry_run(run_in, "--parts", "engine,pipeline", "--consumers", "2,4", "--out", "gpu",
                       pythonpath=stubs)
    assert [part for part, _ in commands] == ["engine", "engine", "engine-tensorrt", "pipeline"]
    build = commands[0][1]
    assert build[0] == "build-engine"
    built = build_engine.get_args_parser().parse_args(build[1:])
    trt = bench_args(commands[2][1])
    assert trt.engines == ["tensorrt"] and trt.batches == [built.batch]
    assert set(trt.precisions) == set(built.precision)
    pipeline = bench_args(commands[3][1])
    assert pipeline.pipeline_engine == "tensorrt" and pipeline.consumers == [2, 4]
    assert pipeline.out == Path("gpu/pipeline")


@pytest.mark.parametrize("args, message", [
    (["--parts", "engine,gpu"], "unknown part 'gpu' in --parts: engine, pipeline, frame"),
    (["--consumers", "1,0"], "--consumers must be counts such as 1,2,4,8, got '1,0'"),
    (["--fast"], "unknown argument '--fast'"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and message in done.stderr and done.stdout == "", (done.stdout, done.stderr)


def test_help_is_the_scripts_header_whole():
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Measure a GPU host") and lines[-1] == "as the bench does.", done.stdout
    assert any(line.startswith("Usage: bash scripts/gpu-bench.sh [--parts engine,pipeline,frame]") for line in lines)
