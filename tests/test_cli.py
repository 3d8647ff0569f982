"""The edge-ptychonn command: every sub-command answers --help; export writes a runnable model;
and the commands as a user meets them: outputs that cannot be written, files that are not what
they claim, options out of range give one line and a non-zero exit status, never a traceback,
and nothing half-written is left where a later run would take it for a result."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_ptychonn import cli
from edge_ptychonn.science.simulate import ScanSettings, load_scan, save_scan, simulate_scan


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


@pytest.mark.parametrize("option", [["-nc", "0"], ["--n-consumers=-2"], ["-nc=0"], ["--n-consumers", "0"], ["--n-cons", "0"]])
def test_consumer_refuses_fewer_than_one_consumer_before_anything_starts(option, capsys):
    """Before: PvaPy ran no consumer at all until its runtime ended (by default never), and its
    final report was a KeyError traceback ('lastObjectTime')."""
    from edge_ptychonn.tools.consumer import check_n_consumers

    assert cli.main(["consumer", "-ic", "x:image", "-pc", "processors.ptychonn.PtychoNNProcessor", "-rt", "1",
                     *option]) == 2
    _one_line(capsys.readouterr().err, "edge-ptychonn consumer: --n-consumers must be >= 1, got ")
    assert check_n_consumers(["-ic", "x", "-nc", "2"]) is None and check_n_consumers(["-nc", "two"]) is None
    assert check_n_consumers(["-nc", "0", "-cid", "1,2"]) is None  # the id list sets the consumers


@pytest.mark.parametrize("option", [["-pc", "nomodule"], ["--processor-class=.Cls"], ["--processor-cl", "mod."],
                                    ["-pc", "a..B"]])
def test_consumer_refuses_a_processor_class_without_its_module_before_anything_starts(option, capsys):
    """Before: PvaPy's import failed with a bare "Empty module name" that named no option."""
    from edge_ptychonn.tools.consumer import check_processor_class

    assert cli.main(["consumer", "-ic", "x:image", "-rt", "1", *option]) == 2
    _one_line(capsys.readouterr().err, "edge-ptychonn consumer: --processor-class must be <module>.<Class>")
    assert check_processor_class(["-pc", "processors.ptychonn.PtychoNNProcessor"]) is None
    assert check_processor_class(["-pf", "my_processor.py", "-pc", "MyProcessor"]) is None  # a name in that file


NO_ENGINE_PROCESSOR = (
    "from engines.base import EngineUnavailable\n"
    "from processors.ptychonn import PtychoNNProcessor\n\n\n"
    "class NoEngine(PtychoNNProcessor):\n"
    "    def _create_engine(self):\n"
    "        raise EngineUnavailable(\"engine 'tensorrt' cannot run here: tensorrt not installed\")\n"
)


@pytest.mark.parametrize("n_consumers, failure, code, message", [
    ("1", "arguments", 2, "edge-ptychonn consumer: --processor-args: modelPath '/nonexistent.onnx' is not a file"),
    ("2", "arguments", 2, "edge-ptychonn consumer: --processor-args: modelPath '/nonexistent.onnx' is not a file"),
    ("2", "engine", 1, "edge-ptychonn consumer: every consumer exited (exit statuses 1, 1)"),
])
def test_consumer_exits_when_its_consumers_cannot_start(pva_env, tmp_path, n_consumers, failure, code, message):
    """Processor arguments the processor refuses are one line and exit status 2 before anything
    starts, also with -nc 2 (there each forked consumer printed two tracebacks and PvaPy's parent
    its report: about 100 lines). Consumers that fail once started (an engine that cannot run):
    with -nc 2 both fail and the parent exits with 1 (before: pvapy-hpc-consumer's parent
    reported "No stats received" until its runtime ended, here never)."""
    from channel_names import PREFIX

    (tmp_path / "noengine_processor.py").write_text(NO_ENGINE_PROCESSOR)
    channel = f"{PREFIX}:nocons{n_consumers}{failure}"
    processor, args = (("processors.ptychonn.PtychoNNProcessor", '{"modelPath": "/nonexistent.onnx"}')
                       if failure == "arguments" else ("noengine_processor.NoEngine", '{"engine": "onnxruntime"}'))
    env = {**pva_env, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(cli.__file__).parent.parent)])}
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", "consumer", "-ic", f"{channel}:image",
                           "-oc", f"{channel}:*:output", "-nc", n_consumers, "-pc", processor, "-pa", args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=Path(cli.__file__).parent.parent)
    assert done.returncode == code, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-3000:]
    if failure == "arguments":
        assert done.stderr.strip() == message and done.stdout == "", done.stderr[-3000:]


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_configure_takes_only_a_positive_timeout(value, capsys):
    """A timeout <= 0 would wait for ever (the answer's deadline) instead of not at all."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["configure", "inference:1:control", "batchTimeout=0.2", "--timeout", value])
    assert exit_.value.code == 2
    assert "argument --timeout: must be" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1e10", "86400.5"])
def test_configure_refuses_a_timeout_longer_than_a_day(value, capsys):
    """Before: accepted; beyond threading.TIMEOUT_MAX (9.2e9 s) the wait for the request to be
    taken was an OverflowError traceback once the channel answered."""
    from edge_ptychonn.tools.configure import get_args_parser

    with pytest.raises(SystemExit) as exit_:
        get_args_parser().parse_args(["inference:1:control", "batchTimeout=0.2", "--timeout", value])
    assert exit_.value.code == 2
    assert "argument --timeout: must be > 0 and at most 86400 seconds" in capsys.readouterr().err
    assert get_args_parser().parse_args(["c", "a=1", "--timeout", "86400"]).timeout == 86400


def test_configure_timeout_accepts_seconds():
    from edge_ptychonn.tools.configure import get_args_parser

    assert get_args_parser().parse_args(["c", "a=1", "--timeout", "2.5"]).timeout == 2.5


# -- errors as a user meets them ----------------------------------------------------------------

SMALL = ScanSettings(n_positions=16, frame_size=32, overlap=0.6, photons=1e4)


@pytest.fixture(scope="module")
def small_scan():
    return simulate_scan(SMALL, progress=False)


def _one_line(err: str, prefix: str, last: bool = False) -> str:
    """The one error line (``last``: the last line of stderr, after progress lines)."""
    lines = err.strip().splitlines()
    assert (last or len(lines) == 1) and lines[-1].startswith(prefix) and "Traceback" not in err, err
    return lines[-1]


def _main(argv: list[str]) -> int:
    """``cli.main``; a Ctrl-C that escapes it fails the test (instead of stopping the test run)."""
    try:
        return cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command as a traceback")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


# -- simulate ------------------------------------------------------------------------------------

def test_simulate_into_an_output_it_cannot_write_is_one_line_before_the_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["simulate", "--out", str(blocker / "scan"), "--n-positions", "4", "--quiet"]) == 2
    _one_line(capsys.readouterr().err, "edge-ptychonn simulate: cannot write")
    (tmp_path / "s.npz").mkdir()  # the truth's name taken by a folder: no frames file without its truth
    assert cli.main(["simulate", "--out", str(tmp_path / "s"), "--n-positions", "4", "--quiet"]) == 2
    assert "s.npz is a folder" in _one_line(capsys.readouterr().err, "edge-ptychonn simulate: cannot write")
    assert not (tmp_path / "s.npy").exists()


def test_a_scan_interrupted_while_saved_leaves_no_file_a_later_run_would_read(tmp_path, small_scan, monkeypatch):
    frames, truth = small_scan

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)  # Ctrl-C while the truth is written
    with pytest.raises(KeyboardInterrupt):
        save_scan(tmp_path / "scan", frames, truth)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no frames without truth, no hidden leftovers
    monkeypatch.undo()
    save_scan(tmp_path / "scan", frames, truth)
    assert load_scan(tmp_path / "scan")[0].shape == frames.shape
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.npy", "scan.npz"]


def test_a_scan_with_nan_frames_is_refused_naming_the_file(tmp_path, small_scan):
    frames, truth = small_scan
    bad = frames.astype(np.float32)
    bad[1, 2, 3] = np.nan
    save_scan(tmp_path / "scan", bad, truth)
    with pytest.raises(ValueError, match=r"scan\.npy: 1 frames hold NaN or infinite pixels"):
        load_scan(tmp_path / "scan")


def test_a_scan_with_double_pixels_beyond_float32_is_refused_naming_the_file(tmp_path, small_scan):
    """Double pixels beyond float32's range are infinite as the model's input (the processor counts such a
    frame ``nonfinite``). Before: evaluate ran the model on them, numpy's "overflow encountered in cast" and
    then "predicted and truth must be finite inside the mask", naming no file or frame."""
    frames, truth = small_scan
    bad = frames.astype(np.float64)
    bad[1, 2, 3] = 1e300
    save_scan(tmp_path / "scan", bad, truth)
    with pytest.raises(ValueError, match=r"scan\.npy: 1 frames hold NaN or infinite pixels \(or pixels beyond "
                                         r"float32's range, \|x\| > 3\.4e38, infinite as the model's input\)"):
        load_scan(tmp_path / "scan")
    bad[1, 2, 3] = 3e38  # within float32's range: a frame like any other
    save_scan(tmp_path / "ok", bad, truth)
    assert load_scan(tmp_path / "ok")[0].shape == frames.shape


# -- export --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["0", "-16"])
def test_export_refuses_an_input_size_below_the_depth(tmp_path, capsys, size):
    assert cli.main(["export", "--out", str(tmp_path / "r.onnx"), "--input-size", size]) == 2
    _one_line(capsys.readouterr().err, "edge-ptychonn export: input_size must be a multiple of 2**depth = 16")


def test_export_of_a_size_beyond_the_memory_is_one_line(tmp_path, capsys):
    """An --input-size whose example input torch cannot allocate (8 TB): before, a RuntimeError traceback."""
    assert cli.main(["export", "--out", str(tmp_path / "r.onnx"), "--input-size", str(2**20)]) == 1
    _one_line(capsys.readouterr().err, "edge-ptychonn export: not enough memory to export a 1048576x1048576 model")
    assert list(tmp_path.iterdir()) == []


def test_export_under_a_file_names_the_file(tmp_path, capsys):
    """Before: "[Errno 17] File exists" once the model was built; now the other commands' words, first."""
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "m.onnx"
    assert cli.main(["export", "--out", str(out), "--width", "2", "--depth", "1", "--input-size", "8"]) == 2
    _one_line(capsys.readouterr().err, f"edge-ptychonn export: cannot write {out}: {tmp_path / 'afile'} is a file, "
                                       "not a folder")


def test_export_to_a_folder_is_one_line(tmp_path, capsys):
    assert cli.main(["export", "--out", str(tmp_path), "--width", "2", "--depth", "1", "--input-size", "8"]) == 2
    _one_line(capsys.readouterr().err, "edge-ptychonn export: cannot write")
    assert _leftovers(tmp_path.parent) == []


# -- evaluate ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx

    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_onnx(build_model(ModelConfig(width=2, depth=1, input_size=32), seed=0), path)
    return path


def test_evaluate_checks_its_outputs_before_the_work(tmp_path, small_scan, tiny_model, capsys):
    save_scan(tmp_path / "scan", *small_scan)
    base = ["evaluate", "--model", str(tiny_model), "--scan", str(tmp_path / "scan"), "--quiet",
            "--engine", "onnxruntime", "--threads", "1"]
    for extra in (["--json", str(tmp_path)], ["--save-image", f"{tmp_path}/"],
                  ["--json", str(tmp_path / "scan.npy" / "scores.json")]):
        assert cli.main(base + extra) == 2, extra
        captured = capsys.readouterr()
        assert captured.out == ""  # refused before any scan was scored
        _one_line(captured.err, "edge-ptychonn evaluate: cannot write the output")
    assert cli.main(base + ["--json", str(tmp_path / "out" / "scores.json"), "--save-image",
                            str(tmp_path / "image")]) == 0
    assert "scan" in json.loads((tmp_path / "out" / "scores.json").read_text())
    assert np.load(tmp_path / "image.npy").shape == small_scan[1].object_phase.shape
    # the name written is said: it is not the one given (np.save's rule adds .npy; it was silent)
    out = capsys.readouterr().out
    assert f"wrote the stitched phase of scan to {tmp_path / 'image.npy'}" in out, out
    assert f"wrote the scores to {tmp_path / 'out' / 'scores.json'}" in out, out


@pytest.mark.parametrize("option", ["--n-positions", "--batch-size"])
def test_evaluate_refuses_zero_positions_or_batch_instead_of_taking_the_default(tiny_model, capsys, option):
    assert cli.main(["evaluate", "--model", str(tiny_model), "--simulate", "mixed:1", option, "0"]) == 2
    _one_line(capsys.readouterr().err, f"edge-ptychonn evaluate: {option} must be >= 1, got 0")


# -- train and finetune: outputs -----------------------------------------------------------------

def test_output_prefix_keeps_dots_in_the_name():
    from edge_ptychonn.science.train import output_file, output_prefix

    assert output_file(output_prefix("models/site-2024.06"), ".onnx") == Path("models/site-2024.06.onnx")
    assert output_file(output_prefix("models/site1.onnx"), ".json") == Path("models/site1.json")
    assert output_prefix("models/site1.pt").name == "site1"


TRAIN = ["train", "--train-scans", "2", "--positions-per-scan", "16", "--val-scans", "1", "--epochs", "1",
         "--batch-size", "16", "--width", "2", "--depth", "1", "--threads", "1", "--quiet"]


@pytest.mark.parametrize("name, content", [("junk.pt", b"junk"), ("junk.onnx", b"junk"), ("weights.npy", b"")])
def test_train_refuses_an_init_from_that_is_no_model_before_the_work(tmp_path, capsys, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    t0 = time.monotonic()
    assert cli.main(TRAIN + ["--out", str(tmp_path / "m"), "--init-from", str(path), "--eval"]) == 2
    _one_line(capsys.readouterr().err, "edge-ptychonn train: ")
    assert time.monotonic() - t0 < 30  # no scans were simulated first
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_pickle_that_is_not_plain_weights_is_refused_without_torchs_unsafe_advice(tmp_path, capsys):
    """torch's safe loader refuses it and advises weights_only=False, which would run the file's
    code: the one line keeps only the loader's complaint."""
    path = tmp_path / "odd.pt"
    path.write_bytes(b"\x80\x02garbage" * 10)
    assert cli.main(TRAIN + ["--out", str(tmp_path / "m"), "--init-from", str(path), "--eval"]) == 2
    line = _one_line(capsys.readouterr().err, f"edge-ptychonn train: {path}: not a checkpoint of edge-ptychonn train "
                                              "(not plain weights: Unsupported operand")
    assert "weights_only" not in line, line


def test_train_into_an_output_it_cannot_write_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(TRAIN + ["--out", str(blocker / "m"), "--eval"]) == 2
    _one_line(capsys.readouterr().err, "edge-ptychonn train: cannot write --out")


def test_train_stopped_while_scoring_leaves_the_earlier_model_and_card_a_pair(tmp_path, capsys, monkeypatch):
    from edge_ptychonn.science import accuracy

    out = tmp_path / "run.2"
    assert cli.main(TRAIN + ["--out", str(out), "--eval"]) == 0  # an earlier run, no scores
    names = ["run.2.json", "run.2.md", "run.2.onnx", "run.2.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    onnx, card = (tmp_path / "run.2.onnx").read_bytes(), (tmp_path / "run.2.json").read_text()
    assert json.loads(card)["name"] == "run.2"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(accuracy, "evaluate_scans", stopped)  # Ctrl-C while the new model is scored
    assert _main(TRAIN + ["--out", str(out), "--seed", "1", "--eval", "mixed:1001"]) == 130
    _one_line(capsys.readouterr().err, "edge-ptychonn train: interrupted", last=True)
    # nothing hidden left behind; the stopped run's last epoch beside the earlier model, whose .pt stays its own
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["run.2.epoch.pt"])
    assert (tmp_path / "run.2.onnx").read_bytes() == onnx and (tmp_path / "run.2.json").read_text() == card


def test_train_stopped_after_an_epoch_says_where_its_weights_are(tmp_path, capsys, monkeypatch):
    """Ctrl-C once an epoch has finished (here: while the model is scored): the weights of the last
    finished epoch stay in <out>.epoch.pt, and the command says so (before: only "interrupted")."""
    from edge_ptychonn.science import accuracy

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(accuracy, "evaluate_scans", stopped)
    out = tmp_path / "run"
    assert _main(TRAIN + ["--out", str(out), "--eval", "mixed:1001"]) == 130
    err = capsys.readouterr().err
    _one_line(err, "edge-ptychonn train: interrupted", last=True)
    assert f"the last finished epoch's weights are in {out}.epoch.pt (--init-from {out}.epoch.pt" in err, err
    assert (tmp_path / "run.epoch.pt").is_file()


# -- finetune ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A 32-pixel scan, its 'reconstruction' (the true object) and a tiny base model with a card."""
    from edge_ptychonn.model_card import ModelCard, save_card
    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx

    folder = tmp_path_factory.mktemp("recording")
    frames, truth = simulate_scan(ScanSettings(n_positions=36, frame_size=32, overlap=0.6, photons=1e4),
                                  progress=False)
    np.save(folder / "frames.npy", frames)
    np.save(folder / "positions.npy", truth.positions_px)
    np.save(folder / "object.npy", (truth.object_amplitude * np.exp(1j * truth.object_phase)).astype(np.complex64))
    config = ModelConfig(width=2, depth=1, input_size=32)
    base = export_onnx(build_model(config, seed=0), folder / "base.onnx")
    save_card(ModelCard(name="base", input_size=32, model=config), base)
    np.save(folder / "probe.npy", truth.probe)
    return folder


def _finetune(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--frames", str(folder / "frames.npy"), "--positions", str(folder / "positions.npy"),
            "--object", str(folder / "object.npy"), "--probe", str(folder / "probe.npy"), "--init-from",
            str(folder / "base.onnx"), "--out", str(out), "--epochs", "1", "--batch-size", "4", "--threads", "1",
            "--device", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--phase-shift", "nan"], "phase-shift must be a finite number, got nan"),
    (["--val-fraction", "nan"], "val-fraction must be a finite number, got nan"),
    (["--origin", "0", "inf"], "origin must be a finite number, got inf"),
])
def test_finetune_refuses_options_that_are_not_numbers(recording, tmp_path, capsys, extra, message):
    assert cli.main(_finetune(recording, tmp_path / "m", *extra)) == 2
    assert message in _one_line(capsys.readouterr().err, "edge-ptychonn finetune: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, content", [("junk.pt", b"junk"), ("junk.onnx", b"junk")])
def test_finetune_refuses_a_base_that_is_no_model(recording, tmp_path, capsys, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    args = _finetune(recording, tmp_path / "m")
    args[args.index("--init-from") + 1] = str(path)
    assert cli.main(args) == 2
    _one_line(capsys.readouterr().err, f"edge-ptychonn finetune: {path}")


def test_finetune_into_an_output_it_cannot_write_is_one_line(recording, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(_finetune(recording, blocker / "m")) == 2
    _one_line(capsys.readouterr().err, "edge-ptychonn finetune: cannot write --out")


def test_finetune_writes_every_file_under_a_dotted_name(recording, tmp_path, capsys):
    """Also: a held-out block whose stitched region is too thin for the SSIM window (this small
    model's bright centre) has no stitched scores, and the run still writes its model."""
    assert cli.main(_finetune(recording, tmp_path / "site-2024.06")) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["site-2024.06.json", "site-2024.06.md", "site-2024.06.onnx", "site-2024.06.pt"]
    card = json.loads((tmp_path / "site-2024.06.json").read_text())
    assert card["name"] == "site-2024.06"
    after = card["accuracy"]["finetune"]["held_out_after"]
    assert "stitched_ssim" not in after and np.isfinite(after["mean_abs_error_rad"])


# -- configure, build-engine ---------------------------------------------------------------------

def test_configure_refuses_pairs_and_json_together(capsys):
    assert cli.main(["configure", "inference:1:control", "batchTimeout=0.2", "--json", '{"scale": 2}']) == 2
    _one_line(capsys.readouterr().err, "edge-ptychonn configure: give key=value pairs or --json, not both")


def test_configure_finds_no_channel_in_seconds_even_for_a_model_swap(pva_env, monkeypatch, capsys):
    """The 600 s of a model swap are for the consumer's answer; a mistyped channel fails in the
    default 5 s."""
    for key, value in pva_env.items():
        monkeypatch.setenv(key, value)
    from channel_names import PREFIX

    channel = f"{PREFIX}:no-such:control"
    t0 = time.monotonic()
    assert cli.main(["configure", channel, "modelPath=/models/new.onnx"]) == 2
    elapsed = time.monotonic() - t0
    _one_line(capsys.readouterr().err, f"edge-ptychonn configure: no answer from {channel}")
    assert elapsed < 30


def test_build_engine_defaults_to_the_shipped_model_wherever_it_runs(tmp_path, monkeypatch):
    from edge_ptychonn.model_card import default_model_path
    from edge_ptychonn.tools import build_engine

    monkeypatch.chdir(tmp_path)
    model = build_engine.get_args_parser().parse_args([]).model
    assert model == default_model_path() and model.is_file()
    with pytest.raises(SystemExit) as exit_:
        build_engine.get_args_parser().parse_args(["--precision", ","])
    assert exit_.value.code == 2


# -- the command ---------------------------------------------------------------------------------

def test_ctrl_c_and_file_errors_are_one_line(monkeypatch, capsys):
    from edge_ptychonn.science import simulate

    def raising(exc):
        def main(args):
            raise exc
        return main

    monkeypatch.setattr(simulate, "main", raising(KeyboardInterrupt()))
    assert _main(["simulate", "--out", "x"]) == 130
    captured = capsys.readouterr()
    _one_line(captured.err, "edge-ptychonn simulate: interrupted")
    assert captured.out == ""  # the error line goes to stderr only
    monkeypatch.setattr(simulate, "main", raising(OSError(28, "No space left on device")))
    assert cli.main(["simulate", "--out", "x"]) == 1
    captured = capsys.readouterr()
    _one_line(captured.err, "edge-ptychonn simulate: [Errno 28] No space left on device")
    assert captured.out == ""
    monkeypatch.setattr(simulate, "main", raising(MemoryError("Unable to allocate 128. GiB for an array")))
    assert cli.main(["simulate", "--out", "x"]) == 1  # before: a MemoryError traceback
    _one_line(capsys.readouterr().err, "edge-ptychonn simulate: not enough memory: Unable to allocate 128. GiB")


def test_a_missing_model_or_a_folder_for_a_file_is_a_bad_argument(recording, tmp_path, capsys):
    """build-engine: exit 2 (a bad argument) whether or not TensorRT is installed (before: 1,
    or "needs tensorrt" first); finetune: a folder given as a file is named as such."""
    assert _main(["build-engine", "--model", str(tmp_path / "none.onnx")]) == 2
    assert "model" in _one_line(capsys.readouterr().err, "edge-ptychonn build-engine:")
    argv = _finetune(recording, tmp_path / "out")
    argv[argv.index("--frames") + 1] = str(tmp_path)
    assert _main(argv) == 2
    assert _one_line(capsys.readouterr().err, "edge-ptychonn finetune:").endswith(f"frames file {tmp_path} is a folder, not a file")



@pytest.mark.parametrize("device, message", [("xx", "device must be"), ("cpu", "not the CPU")])
def test_build_engine_answers_a_bad_device_as_a_bad_argument(capsys, device, message):
    """A --device that names no GPU is exit 2 whether or not TensorRT is installed (before, without
    it: "needs tensorrt", exit 1, and the device only refused once TensorRT was there)."""
    assert _main(["build-engine", "--device", device]) == 2
    assert message in _one_line(capsys.readouterr().err, "edge-ptychonn build-engine: --device:")


@pytest.mark.parametrize("command, argv", [
    ("train", ["--out", "/data/run 5/model", "--train-scans", "3", "--eval", "mixed:1", "smooth:2", "--no-bf16"]),
    ("finetune", ["--frames", "/data/run 5/frames.h5", "--object", "recon it's.npz", "--origin", "2.5", "3.5", "--quiet"]),
])
def test_the_recorded_command_repeats_its_arguments_also_with_spaces_in_paths(command, argv):
    """The model card's "Command:" had its words joined unquoted: a path with a space in it
    became two arguments when the command was run again."""
    import importlib
    import shlex

    module = importlib.import_module(f"edge_ptychonn.science.{command}")
    args = module.get_args_parser().parse_args(argv)
    words = shlex.split(module.command_line(args))
    assert words[:2] == ["edge-ptychonn", command]
    assert vars(module.get_args_parser().parse_args(words[2:])) == vars(args)
    assert sorted(words[2:]) == sorted(argv)  # the options given, none of the defaults


def test_consumer_with_a_processor_class_that_cannot_be_loaded_is_one_line(pva_env):
    """Before: a traceback ending in ModuleNotFoundError (or PvaPy's InvalidArgument for a class
    its module lacks), exit status 1."""
    from channel_names import PREFIX

    root = Path(__file__).resolve().parent.parent

    for cls, message in (("processors.nothere.Processor", "--processor-class: No module named 'processors.nothere'"),
                         ("processors.ptychonn.NoSuchProcessor", "Could not create object instance of class NoSuchProcessor")):
        done = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", "consumer", "-ic", f"{PREFIX}:badclass:image",
                               "-pc", cls], capture_output=True, text=True, timeout=120, env=pva_env, cwd=root)
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.strip().splitlines()[-1].startswith(f"edge-ptychonn consumer: {message}"), done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_configure_takes_its_options_between_the_channel_and_the_pairs():
    """``configure inference:1:control --timeout 10 modelPath=new.onnx``; before: "unrecognized
    arguments: modelPath=new.onnx" (exit 2)."""
    from edge_ptychonn.tools.configure import get_args_parser

    args = get_args_parser().parse_args(["inference:1:control", "--timeout", "10", "modelPath=new.onnx", "offset=0"])
    assert (args.channel, args.changes, args.timeout) == ("inference:1:control", ["modelPath=new.onnx", "offset=0"], 10.0)
    args = get_args_parser().parse_args(["c", "a=1", "--timeout", "2.5", "b=2"])
    assert (args.changes, args.timeout) == (["a=1", "b=2"], 2.5)


def test_configure_refuses_a_key_given_twice(capsys):
    """Before: ``batchTimeout=0.2 batchTimeout=2`` sent only the last value, without a word."""
    assert cli.main(["configure", "inference:1:control", "batchTimeout=0.2", "batchTimeout=2"]) == 2
    _one_line(capsys.readouterr().err, "edge-ptychonn configure: batchTimeout is given twice; give each key once")


@pytest.mark.e2e
def test_configure_on_a_channel_that_is_no_control_channel_is_one_line(pva_env, procs, tmp_path, capsys):
    """A detector (or status, or output) channel given for the control channel. Before: "no answer
    from ...:" and a page of PvaPy's structure dump ("no fields from the following request were
    found", "structure field", ...)."""
    from channel_names import PREFIX
    from edge_ptychonn.tools.processes import read_status, start, tool_path, wait_until

    np.save(tmp_path / "frames.npy", np.zeros((4, 8, 8), np.int16))
    channel = f"{PREFIX}:cfgdet:image"
    start("sim", [tool_path("pvapy-ad-sim-server"), "-dc", "-if", str(tmp_path / "frames.npy"), "-cn", channel,
                  "-fps", "1", "-rt", "120"], pva_env, tmp_path, into=procs)
    assert wait_until(lambda: read_status(channel, 1.0), 60), "the sim server's channel did not appear"
    assert cli.main(["configure", channel, "batchTimeout=0.2"]) == 2
    _one_line(capsys.readouterr().err, f"edge-ptychonn configure: {channel} is not a consumer's control channel")
    procs[-1].stop(grace_s=0.1)  # the sim server waits out a SIGINT's grace (5 s); SIGTERM ends it at once


# a processor whose consumer 2 dies as it starts (a crash in its engine); consumer 1 runs on
CRASHING_SECOND = """
import os
from pvapy.hpc.userDataProcessor import UserDataProcessor


class SecondCrashes(UserDataProcessor):
    def __init__(self, configDict={}):
        super().__init__(configDict)
        self.consumer_id = configDict.get("processorId")

    def start(self):
        if self.consumer_id == 2:
            os._exit(3)

    def process(self, pv):
        return pv
"""


@contextlib.contextmanager
def consumer_process(args: list[str], env: dict):
    """``edge-ptychonn consumer ARGS`` in a session of its own (stdout and stderr piped, as text);
    its process group is killed on the way out unless it has ended."""
    consumer = subprocess.Popen([sys.executable, "-m", "edge_ptychonn.cli", "consumer", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True, cwd=Path(cli.__file__).parent.parent)
    try:
        yield consumer
    finally:
        if consumer.poll() is None:
            os.killpg(consumer.pid, signal.SIGKILL)
            consumer.wait(30)


@pytest.mark.e2e
def test_consumer_reports_a_forked_consumer_that_crashed_when_stopped(pva_env, tmp_path):
    """One of two forked consumers crashes, the other runs on; then SIGTERM. Before: the watch for
    consumers that all exited fired in the middle of PvaPy's stop (by then both had exited), cut it
    short ("edge-ptychonn consumer: interrupted", no final statistics, exit status 130); had it not,
    the parent exited with 0 as if nothing had failed."""
    from channel_names import PREFIX
    from edge_ptychonn.tools.processes import child_pids, read_status, wait_until

    (tmp_path / "second_crashes.py").write_text(CRASHING_SECOND)
    channel = f"{PREFIX}:crash2"
    env = {**pva_env, "PYTHONPATH": os.pathsep.join([str(tmp_path), pva_env.get("PYTHONPATH", "")])}
    with consumer_process(["-ic", f"{channel}:image", "-nc", "2", "-sc", f"{channel}:*:status",
                           "-pc", "second_crashes.SecondCrashes", "-rp", "0"], env) as consumer:
        assert wait_until(lambda: read_status(f"{channel}:1:status", 1.0), 60), "consumer 1 never answered"
        assert wait_until(lambda: len(child_pids(consumer.pid, zombies=False)) == 1, 30), "consumer 2 did not die"
        os.kill(consumer.pid, signal.SIGTERM)
        out, err = consumer.communicate(timeout=60)
    assert consumer.returncode == 1, err[-3000:]
    assert "interrupted" not in err and "Combined System Stats" in out, out[-2000:] + err[-2000:]
    assert err.strip().splitlines()[-1] == ("edge-ptychonn consumer: 1 of the 2 consumers failed while the others "
                                            "ran on (exit statuses 3); their errors are above"), err[-3000:]


def test_version_is_printed_and_matches_the_package_metadata(capsys):
    from importlib.metadata import version

    for flag in ("--version", "-V"):
        assert cli.main([flag]) == 0
        assert capsys.readouterr().out == f"edge-ptychonn {version('edge-ptychonn')}\n"


def test_configure_gives_up_on_a_consumer_that_stops_answering(monkeypatch, capsys):
    """A get on a connected channel whose server stops answering (a consumer stuck, stopped or
    gone) waits for ever; the channel's timeout bounds only its connection. Before: configure
    hung there, deaf to Ctrl-C; now it says so and exits with 2."""
    import threading

    import pvaccess as pva

    class Mute:  # connected, then no answer to any read
        def __init__(self, name):
            pass

        def setTimeout(self, timeout_s):
            pass

        def get(self, request):
            threading.Event().wait()

    monkeypatch.setattr(pva, "Channel", Mute)
    codes = []
    runner = threading.Thread(target=lambda: codes.append(
        cli.main(["configure", "cfgmute:1:control", "batchTimeout=0.2", "--timeout", "0.2"])), daemon=True)
    started = time.monotonic()
    runner.start()
    runner.join(20)
    assert codes == [2], "configure did not give up on a channel that stopped answering"
    assert time.monotonic() - started < 10
    _one_line(capsys.readouterr().err, "edge-ptychonn configure: no answer from cfgmute:1:control: "
              "cfgmute:1:control: no answer to a read within 1.4 s")


def test_help_texts_name_what_the_options_take():
    """--help texts that named less than an option takes, or a default it does not have: the demo's
    --engine listed 3 of the 5 engines, soak's --fps left out that its default is per consumer,
    view's --report-period 0 said "none" (a last line comes as a window closes), build-engine showed
    its --precision default as a Python list (the option takes fp32,fp16)."""
    import re

    from engines.registry import ENGINE_NAMES
    from edge_ptychonn.tools import build_engine, demo, soak, view

    def option_help(parser, flag: str) -> str:
        return next(a.help for a in parser._actions if flag in a.option_strings)

    assert all(name in option_help(demo.get_args_parser(), "--engine") for name in ENGINE_NAMES)
    assert "times --consumers" in option_help(soak.get_args_parser(), "--fps")
    assert "0 for none" not in option_help(view.get_args_parser(), "--report-period")
    assert "as it closes" in option_help(view.get_args_parser(), "--report-period")
    parser = build_engine.get_args_parser()
    assert "(default: fp32,fp16)" in re.sub(r"\s+", " ", parser.format_help())
    assert parser.parse_args([]).precision == ["fp32", "fp16"]


def test_configure_does_not_take_another_requests_answer_for_its_own(monkeypatch, capsys):
    """PvaPy's control channel answers every caller in one statusMessage. A request that
    comes in while ours waits (an operator's change refused while our new model builds)
    stamps objectTime again; before, its answer was printed as ours (a swap that went ahead
    reported as refused, exit 1). Now the answer is named as possibly the other's, exit 2."""
    import pvaccess as pva

    class Busy:  # a control channel with a second caller
        record = {"objectTime": 1.0, "statusMessage": "Configuration successful"}  # before our put
        watchers: list = []

        def __init__(self, name):
            pass

        def setTimeout(self, timeout_s):
            pass

        def get(self, request):
            record = dict(Busy.record)

            class Answer:
                def toDict(self):
                    return record
            return Answer()

        def monitor(self, callback, request):
            Busy.watchers.append(callback)
            callback(dict(Busy.record))

        def stopMonitor(self):
            pass

        def asyncPut(self, request, done, failed, fields):
            done(None)
            for update in ({"objectTime": 2.0, "statusMessage": "Command successful"},  # ours, taken
                           {"objectTime": 3.0, "statusMessage": "Command successful"},  # another caller's, taken
                           {"objectTime": 3.0, "statusMessage": "Configuration failed: a new model's engine is being built"}):
                Busy.record = update
                for watcher in Busy.watchers:
                    watcher(dict(update))

    monkeypatch.setattr(pva, "Channel", Busy)
    assert cli.main(["configure", "cfgbusy:1:control", "modelPath=/models/m.onnx", "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    _one_line(err, "edge-ptychonn configure: another request reached cfgbusy:1:control while this one waited for "
              "its answer, so the answer read (\"Configuration failed: a new model's engine is being built\") may be "
              "the other's; the consumer's status channel shows what is in force")


class _ControlChannel:
    """A PvaPy control channel with another caller's request taken and not yet answered (at
    objectTime 1.0): that answer lands at read ``other_answered_at``; a put stamps objectTime
    2.0 and is answered ``own_answer``, both changes seen by a monitor."""

    def __init__(self, other_answered_at: int, own_answer: str):
        self.record = {"objectTime": 1.0, "statusMessage": "Command successful"}
        self.reads, self.puts, self.due = 0, 0, []
        self.due.append((other_answered_at, "Configuration successful"))
        self.own_answer = own_answer

    def __call__(self, name):
        return self

    def setTimeout(self, timeout_s):
        pass

    def get(self, request):
        self.reads += 1
        for read, message in [d for d in self.due if d[0] <= self.reads]:
            self.record = {**self.record, "statusMessage": message}
            self.due.remove((read, message))
        record = dict(self.record)

        class Answer:
            def toDict(self):
                return record
        return Answer()

    def monitor(self, callback, request):  # every change of the record from now on, in order
        self.watcher = callback
        callback(dict(self.record))

    def stopMonitor(self):
        pass

    def asyncPut(self, request, done, failed, fields):
        self.puts += 1
        done(None)
        for update in ({"objectTime": 2.0, "statusMessage": "Command successful"},
                       {"objectTime": 2.0, "statusMessage": self.own_answer}):
            self.record = update
            self.watcher(dict(update))


def test_configure_waits_for_an_answer_in_progress_before_it_sends(monkeypatch, capsys):
    """A request sent while another caller's was taken and not yet answered (a model building)
    read that answer as its own: an invalid batchTimeout printed "Configuration successful",
    exit 0, 4 times in 6 in a live trial. Now it waits for that answer, then sends, and reads
    its own (here a refusal: exit 1)."""
    import pvaccess as pva

    channel = _ControlChannel(other_answered_at=3, own_answer="Configuration failed: batchTimeout must be a number")
    monkeypatch.setattr(pva, "Channel", channel)
    assert cli.main(["configure", "cfgwait:1:control", "batchTimeout=abc", "--timeout", "5"]) == 1
    assert capsys.readouterr().out == "Configuration failed: batchTimeout must be a number\n"
    assert channel.puts == 1


def test_configure_sends_nothing_while_another_request_stays_unanswered(monkeypatch, capsys):
    """The other caller's request is not answered within --timeout: nothing is sent, exit 2."""
    import pvaccess as pva

    channel = _ControlChannel(other_answered_at=10**9, own_answer="Configuration successful")
    monkeypatch.setattr(pva, "Channel", channel)
    assert cli.main(["configure", "cfgstuck:1:control", "batchTimeout=0.2", "--timeout", "0.3"]) == 2
    err = capsys.readouterr().err
    assert channel.puts == 0
    assert "edge-ptychonn configure: cfgstuck:1:control is still working on another request" in err, err
    assert "nothing was sent" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_option_has_a_help_text_and_no_default_in_pythons_own_notation(name):
    """train's --lr, --epochs, --width and more had no help text at all; bench showed list
    defaults as '[1, 8, 32]', a form the option does not take."""
    import importlib

    parser = importlib.import_module(cli.COMMANDS[name][0]).get_args_parser()
    bare = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert bare == [], f"{name}: options without a help text: {bare}"
    text = parser.format_help()
    assert "(default: [" not in text and "(default: (" not in text, text


@pytest.mark.parametrize("name", ["export", "train", "finetune"])
@pytest.mark.parametrize("value", ["99999999999999999999", "-1"])
def test_a_seed_torch_cannot_take_is_refused_in_one_line(name, value, capsys):
    """export --seed 1e20 ended in torch's 'Overflow when unpacking long long' traceback; export
    and finetune took --seed -1, where train and simulate refuse a negative seed."""
    with pytest.raises(SystemExit) as stop:
        cli.main([name, "--seed", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --seed: must be a whole number from 0 to 9223372036854775807 (torch's seeds), got {value}" in err
    assert "Traceback" not in err, err


def test_configure_sees_a_request_taken_within_the_same_moment_as_its_own(monkeypatch, capsys):
    """Two callers at once: both requests were taken before the first answer, and reads of the
    record saw only the later stamp, so one caller printed the other's refusal as its own
    (exit 1 for a change that was applied; 3 trials in 20 live). A monitor sees both stamps."""
    import pvaccess as pva

    class Racing(_ControlChannel):
        def asyncPut(self, request, done, failed, fields):
            self.puts += 1
            done(None)
            for update in ({"objectTime": 5.0, "statusMessage": "Command successful"},  # the other caller's
                           {"objectTime": 6.0, "statusMessage": "Command successful"},  # ours
                           {"objectTime": 6.0, "statusMessage": "Configuration failed: batchTimeout must be 0.001..60 s"}):
                self.record = update  # a read now sees only this
                self.watcher(dict(update))

    channel = Racing(other_answered_at=0, own_answer="")
    channel.record = {"objectTime": 1.0, "statusMessage": "Configuration successful"}
    monkeypatch.setattr(pva, "Channel", channel)
    assert cli.main(["configure", "cfgrace:1:control", "batchTimeout=0.104", "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert "another request reached cfgrace:1:control while this one waited for its answer" in err, err


SLOW_START = """
import os
import time
from processors.ptychonn import PtychoNNProcessor


class SlowStart(PtychoNNProcessor):
    def __init__(self, configDict=None):
        super().__init__(configDict)
        open(os.path.join(os.environ["SLOW_START_DIR"], f"starting{self.processor_id}"), "w").close()
        time.sleep(1.0)  # an engine's import or build: a signal comes in the middle of it
"""


@pytest.mark.e2e
@pytest.mark.parametrize("n_consumers", ["1", "2"])
def test_consumer_stopped_while_it_starts_stops_cleanly_once_started(pva_env, tmp_path, n_consumers):
    """SIGTERM to the consumer's process group (a service manager's stop, `timeout`) while its
    processors start. Before: the KeyboardInterrupt it became was raised in the middle of the
    start-up (an engine's import, pvAccess's set-up): one consumer aborted (SIGABRT) or said
    "interrupted", two printed tracebacks (one "onnxruntime is not installed") and exited with 1.
    Now the stop is taken once started: every consumer's final statistics, exit status 0."""
    from channel_names import PREFIX
    from edge_ptychonn.tools.processes import wait_until

    (tmp_path / "slow_start.py").write_text(SLOW_START)
    channel = f"{PREFIX}:slowstart{n_consumers}"
    env = {**pva_env, "SLOW_START_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(cli.__file__).parent.parent)])}
    markers = [tmp_path / f"starting{k}" for k in range(1, int(n_consumers) + 1)]
    with consumer_process(["-ic", f"{channel}:image", "-oc", f"{channel}:*:output", "-nc", n_consumers,
                           "-pc", "slow_start.SlowStart", "-pa", '{"engine": "zero"}', "-rp", "0"], env) as consumer:
        assert wait_until(lambda: all(m.exists() for m in markers), 60), "the processors never started"
        os.killpg(consumer.pid, signal.SIGTERM)
        out, err = consumer.communicate(timeout=60)
    assert consumer.returncode == 0, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and "interrupted" not in err, err[-3000:]
    for k in range(1, int(n_consumers) + 1):
        assert f"consumer {k} final statistics: received 0" in out, out[-3000:] + err[-2000:]


SLOW_STOP = """
import os
import time
from processors.ptychonn import PtychoNNProcessor


class SlowStop(PtychoNNProcessor):
    def start(self):
        super().start()
        open(os.path.join(os.environ["SLOW_STOP_DIR"], "started"), "w").close()

    def stop(self):
        open(os.path.join(os.environ["SLOW_STOP_DIR"], "stopping"), "w").close()
        time.sleep(1.5)  # a long drain or file close: a Ctrl-C comes in the middle of it
        return super().stop()
"""


@pytest.mark.e2e
def test_consumer_ignores_a_ctrl_c_that_comes_while_its_processors_sigterm_stop_runs(pva_env, tmp_path):
    """One consumer: SIGTERM, then Ctrl-C while the processor stops. Its processor's SIGTERM handler
    (processors/shutdown.py) replaces the command's once started, so the command never saw the SIGTERM
    and took the Ctrl-C for a first signal: KeyboardInterrupt in the middle of the stop, "interrupted",
    exit 130 (once an abort). The help says a second SIGTERM or Ctrl-C while it stops is ignored."""
    from channel_names import PREFIX
    from edge_ptychonn.tools.processes import wait_until

    (tmp_path / "slow_stop.py").write_text(SLOW_STOP)
    channel = f"{PREFIX}:slowstop"
    env = {**pva_env, "SLOW_STOP_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(cli.__file__).parent.parent)])}
    with consumer_process(["-ic", f"{channel}:image", "-oc", f"{channel}:output", "-pc", "slow_stop.SlowStop",
                           "-pa", '{"engine": "zero"}', "-rp", "0"], env) as consumer:
        assert wait_until(lambda: (tmp_path / "started").exists(), 60), "the processor never started"
        os.kill(consumer.pid, signal.SIGTERM)
        assert wait_until(lambda: (tmp_path / "stopping").exists(), 30), "the SIGTERM did not stop the processor"
        os.kill(consumer.pid, signal.SIGINT)
        out, err = consumer.communicate(timeout=60)
    assert consumer.returncode == 0, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and "interrupted" not in err, err[-3000:]
    assert "final statistics: received 0" in out, out[-3000:] + err[-2000:]


def test_a_signal_while_the_consumer_starts_waits_for_the_start_and_a_second_one_does_not():
    """The first SIGTERM or Ctrl-C while the consumers start is noted and taken once they have
    started; a second one (Ctrl-C pressed again during a long engine build) stops at once."""
    from edge_ptychonn.tools.consumer import StopHandler

    handler = StopHandler()
    handler(signal.SIGINT, None)
    assert handler.asked.is_set() and not handler.stopping.is_set()
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, None)
    assert handler.stopping.is_set()
    handler(signal.SIGINT, None)  # a stop under way: ignored
    started = StopHandler()
    started.starting = False
    with pytest.raises(KeyboardInterrupt):
        started(signal.SIGTERM, None)


# a control channel that takes a request and never answers (a consumer building a model) until killed
SILENT_CONTROL = """
import sys, time
import pvaccess as pva
record = pva.PvObject({"objectTime": pva.DOUBLE, "statusMessage": pva.STRING, "command": pva.STRING,
                       "args": pva.STRING}, {"objectTime": 1.0, "statusMessage": "Configuration successful"})
server = pva.PvaServer()
server.addRecord(sys.argv[1], record, lambda written: open(sys.argv[2], "w").close())  # the request came
print("up", flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.e2e
def test_configure_gives_up_when_the_consumer_goes_away_before_it_answers(pva_env, procs, tmp_path, capsys,
                                                                           monkeypatch):
    """A consumer stopped (SIGTERM, a crash) while it builds a new model never answers: configure
    says so once its control channel goes away. Before: it waited out its 600 s and then said
    the consumer "did not answer within 600 s"."""
    from channel_names import PREFIX
    from edge_ptychonn.tools.processes import read_status, start, wait_until

    for key, value in pva_env.items():
        monkeypatch.setenv(key, value)
    channel = f"{PREFIX}:silent:control"
    (tmp_path / "silent.py").write_text(SILENT_CONTROL)
    taken = tmp_path / "taken"
    server = start("silent", [sys.executable, str(tmp_path / "silent.py"), channel, str(taken)], pva_env, tmp_path,
                   into=procs)
    assert wait_until(lambda: read_status(channel, 1.0), 60), "the fake control channel did not appear"

    def kill_once_the_request_came():  # the consumer goes away while its answer is awaited
        if wait_until(taken.exists, 60):
            os.killpg(server.pid, signal.SIGKILL)

    threading.Thread(target=kill_once_the_request_came, daemon=True).start()
    t0 = time.monotonic()
    assert cli.main(["configure", channel, "modelPath=/models/new.onnx", "--timeout", "120"]) == 2
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    _one_line(err, f"edge-ptychonn configure: no answer from {channel}")
    assert "went away" in err and elapsed < 30


@pytest.mark.parametrize("argv", [["modelPath=models/site1.onnx"], ["--json", '{"modelPath": "site1.onnx"}']])
def test_configure_refuses_a_relative_model_path(argv, capsys):
    """The consumer resolves modelPath in its own working directory: a relative path typed in
    another swapped to another file of that name (or to none), with "Configuration successful"."""
    assert cli.main(["configure", "inference:1:control", *argv]) == 2
    _one_line(capsys.readouterr().err, "edge-ptychonn configure: modelPath ")


def test_a_sigterm_that_a_library_turns_into_its_own_error_is_still_an_interruption(tmp_path, capsys, monkeypatch):
    """numpy's tofile, interrupted by the SIGTERM's KeyboardInterrupt while writing, raised a TypeError
    ("expected str, bytes or os.PathLike object, not BufferedWriter"): simulate ended with that traceback
    and exit 1 (seen once in the test of a SIGTERM while writing). Now: one line, exit 130."""
    from edge_ptychonn import cli as cli_module
    from edge_ptychonn.science import export

    monkeypatch.setattr(cli_module, "_SIGTERM_SEEN", threading.Event())

    def writing(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal comes here
        except KeyboardInterrupt:
            raise TypeError("expected str, bytes or os.PathLike object, not BufferedWriter") from None
        return 0

    monkeypatch.setattr(export, "_export", writing)
    assert cli.main(["export", "--out", str(tmp_path / "m.onnx")]) == 130
    _one_line(capsys.readouterr().err, "edge-ptychonn export: interrupted")


def test_an_earlier_commands_sigterm_is_no_interruption_of_the_next(monkeypatch, capsys):
    """cli.main run twice in one process (the tests do): a SIGTERM noted in the first command made
    every error of a later one read "interrupted", exit 130 (test_ctrl_c_and_file_errors_are_one_line
    failed after finetune's SIGTERM test)."""
    from edge_ptychonn import cli as cli_module
    from edge_ptychonn.science import simulate

    seen = threading.Event()
    seen.set()  # what the first command's SIGTERM left
    monkeypatch.setattr(cli_module, "_SIGTERM_SEEN", seen)

    def full_disk(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(simulate, "main", full_disk)
    assert cli.main(["simulate", "--out", "x"]) == 1
    _one_line(capsys.readouterr().err, "edge-ptychonn simulate: [Errno 28] No space left on device")
