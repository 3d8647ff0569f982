"""The edge-ptychonn command: every sub-command answers --help; export writes a runnable model."""

import subprocess
import sys

import numpy as np
import pytest

from edge_ptychonn import cli


def test_top_level_help_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: edge-ptychonn COMMAND" in captured.err


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'; known: demo" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help(name):
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", name, "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"usage: edge-ptychonn {name}" in done.stdout


def test_export_writes_a_model_the_engines_run(tmp_path, capsys):
    from engines import EngineOptions, create_engine

    out = tmp_path / "r.onnx"
    assert cli.main(["export", "--out", str(out), "--width", "4", "--depth", "2", "--input-size", "32"]) == 0
    assert "random weights" in capsys.readouterr().out
    engine = create_engine("onnxruntime", EngineOptions(out, max_batch=2, cpu_threads=1))
    assert engine.infer(np.ones((2, 1, 32, 32), np.float32)).shape == (2, 1, 32, 32)
    assert cli.main(["export", "--out", str(out), "--input-size", "30"]) == 2
    assert cli.main(["export", "--out", str(out), "--width", "4", "--depth", "2", "--input-size", "32",
                     "--head-blocks", "2"]) == 0
    from edge_ptychonn.science.model import from_onnx

    assert from_onnx(out).config.head_blocks == 2
    assert cli.main(["export", "--out", str(out), "--head-blocks", "9"]) == 2


@pytest.mark.parametrize("name", sorted(set(cli.COMMANDS) - {"consumer"}))
def test_every_command_answers_bad_arguments_with_2_on_stderr(name, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit
        cli.main([name, "--no-such-option"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert f"usage: edge-ptychonn {name}" in captured.err and f"edge-ptychonn {name}: error:" in captured.err
    assert captured.out == ""


def test_command_errors_go_to_stderr(tmp_path, capsys):
    assert cli.main(["export", "--out", str(tmp_path / "r.onnx"), "--input-size", "30"]) == 2
    assert cli.main(["simulate", "--out", str(tmp_path / "s"), "--overlap", "2"]) == 2
    assert cli.main(["demo", "--model", str(tmp_path / "none.onnx")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert err[0].startswith("edge-ptychonn export: input_size must be a multiple")
    assert err[1].startswith("edge-ptychonn simulate: overlap must be in (0, 1)")
    assert err[2].startswith("edge-ptychonn demo: model") and "not found" in err[2]


def test_consumer_passes_arguments_to_pvapy_and_answers_bad_ones_with_2():
    """'consumer' runs PvaPy's own command line in its process (its logging needs real
    standard streams), so it is tried in a child process."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", "consumer", "--no-such-option"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "usage: edge-ptychonn consumer" in done.stderr and "edge-ptychonn consumer: error:" in done.stderr
    helped = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", "consumer", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "SIGTERM" in helped.stdout and "pvapy-hpc-consumer --help" in helped.stdout


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_configure_takes_only_a_positive_timeout(value, capsys):
    """A timeout <= 0 would wait for ever (the answer's deadline) instead of not at all."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["configure", "inference:1:control", "batchTimeout=0.2", "--timeout", value])
    assert exit_.value.code == 2
    assert "argument --timeout: must be" in capsys.readouterr().err


def test_configure_timeout_accepts_seconds():
    from edge_ptychonn.tools.configure import get_args_parser

    assert get_args_parser().parse_args(["c", "a=1", "--timeout", "2.5"]).timeout == 2.5
