"""edge-ptychonn evaluate: its batch size and the scans it can score, said in its own words."""

import numpy as np
import pytest

from edge_ptychonn import cli
from edge_ptychonn.science import accuracy, evaluate
from edge_ptychonn.science.simulate import ScanSettings, save_scan, simulate_scan
from edge_ptychonn.stream.config import MAX_BATCH_SIZE


@pytest.fixture(scope="module")
def scan9(tmp_path_factory):
    """A scan of 9 positions of 64x64 frames (the ``small_model``'s input), saved as ``<dir>/scan``."""
    prefix = tmp_path_factory.mktemp("scans") / "scan"
    save_scan(prefix, *simulate_scan(ScanSettings(seed=1, n_positions=9, frame_size=64), progress=False))
    return prefix


def _engine_batches(monkeypatch) -> list:
    """The batch size of every engine evaluate opens; one sized beyond the processor's batches fails the test
    before it is made (before: 10 GB and a minute at --batch-size 5000, a traceback at 100000)."""
    batches, opened = [], accuracy.open_engine

    def open_engine(*args, batch_size, **kwargs):
        batches.append(batch_size)
        if batch_size > 256:
            pytest.fail(f"an engine was made for batches of {batch_size}")
        return opened(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(accuracy, "open_engine", open_engine)
    return batches


def test_the_batch_size_is_the_processors_and_the_engine_is_sized_for_the_longest_scan(
        small_model, scan9, tmp_path, monkeypatch, capsys):
    import shutil

    from edge_ptychonn.model_card import ModelCard, Training, save_card
    from edge_ptychonn.stream.config import parse_processor_args

    batches = _engine_batches(monkeypatch)
    base = ["evaluate", "--model", str(small_model), "--engine", "onnxruntime", "--device", "cpu", "--threads", "1",
            "--quiet"]
    for size in ("100000", "257"):
        assert cli.main([*base, "--scan", str(scan9), "--batch-size", size]) == 2
        out = capsys.readouterr()
        assert out.err == f"edge-ptychonn evaluate: --batch-size must be an integer 1..256, got {size}\n", out.err
    assert batches == []
    # the processor's range, the same bound
    parse_processor_args({"modelPath": str(small_model), "batchSize": MAX_BATCH_SIZE})
    with pytest.raises(ValueError, match="batchSize must be an integer 1..256"):
        parse_processor_args({"modelPath": str(small_model), "batchSize": MAX_BATCH_SIZE + 1})

    assert cli.main([*base, "--scan", str(scan9), "--batch-size", "256"]) == 0, capsys.readouterr().err
    assert cli.main([*base, "--scan", str(scan9), "--batch-size", "4"]) == 0
    # a simulated scan has the card's eval_n_positions (or --n-positions)
    model = shutil.copy(small_model, tmp_path / "m.onnx")
    save_card(ModelCard(input_size=64, training=Training(scan_settings={
        **ScanSettings(frame_size=64, n_positions=12).to_dict(), "seed": None}, eval_n_positions=12)), model)
    base[2] = str(model)
    assert cli.main([*base, "--scan", str(scan9), "--simulate", "mixed:1"]) == 0, capsys.readouterr().err
    assert cli.main([*base, "--simulate", "mixed:1", "--n-positions", "6"]) == 0, capsys.readouterr().err
    assert batches == [9, 4, 12, 6]  # min(--batch-size, the longest scan's frames)
    assert "9 frames scored" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["hdf5", "npy_without_truth", "nothing"])
def test_a_recording_or_frames_without_truth_are_refused_saying_what_evaluate_scores(
        small_model, tmp_path, monkeypatch, capsys, case):
    """Before: "recording.h5.npy not found; make it with 'edge-ptychonn simulate --out recording.h5'": simulate
    over the name of the user's recording. Now one line that says what evaluate needs (a simulated scan's
    frames and truth), and for recorded frames where they can be scored (finetune's held-out positions);
    before any engine is made."""
    monkeypatch.setattr(accuracy, "open_engine", lambda *a, **k: pytest.fail("an engine was made"))
    needs = ("evaluate scores a simulated scan against its truth: frames <prefix>.npy and truth <prefix>.npz beside "
             "them, as 'edge-ptychonn simulate --out <prefix>' writes them")
    finetune = ("recorded frames have no truth to score against: 'edge-ptychonn finetune --frames {} --object "
                "<reconstruction>' scores the base and the fine-tuned model on held-out positions against your "
                "reconstruction")
    if case == "hdf5":
        scan = tmp_path / "recording.h5"
        scan.write_bytes(b"\x89HDF\r\n\x1a\n")
        expected = f"--scan {scan} names an HDF5 recording, not a scan: {needs}; {finetune.format(scan)}"
    elif case == "npy_without_truth":
        scan = tmp_path / "frames.npy"
        np.save(scan, np.zeros((4, 64, 64), np.uint16))
        expected = f"--scan {scan}: {tmp_path / 'frames.npz'} not found; {needs}; {finetune.format(scan)}"
    else:
        scan = tmp_path / "scan"
        expected = f"--scan {scan}: {scan}.npy and {scan}.npz not found; {needs}"
    assert cli.main(["evaluate", "--model", str(small_model), "--scan", str(scan), "--quiet"]) == 2
    out = capsys.readouterr()
    assert out.err == f"edge-ptychonn evaluate: {expected}\n" and out.out == "", out.err


def test_an_output_that_names_an_input_is_refused_and_the_inputs_are_kept(small_model, scan9, tmp_path, monkeypatch,
                                                                          capsys):
    """Before: ``--json models/site1.json`` beside ``models/site1.onnx`` replaced the model's card with the scores
    (exit 0; every command and the processor then refused the model), and ``--save-image`` of a scan's name
    replaced its frames with the stitched phase. Now one line, exit 2, before any engine is made, and every
    input as it was."""
    import shutil

    from edge_ptychonn.model_card import ModelCard, save_card

    model = shutil.copy(small_model, tmp_path / "site1.onnx")
    save_card(ModelCard(input_size=64), model)
    scan = tmp_path / "scan"
    for suffix in (".npy", ".npz"):
        shutil.copy(scan9.with_suffix(suffix), scan.with_suffix(suffix))
    inputs = {p: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(accuracy, "open_engine", lambda *a, **k: pytest.fail("an engine was made"))
    base = ["evaluate", "--model", str(model), "--scan", str(scan), "--quiet"]
    for options, expected in (
        (["--json", tmp_path / "site1.json"], f"--json {tmp_path / 'site1.json'} would overwrite the model card of "
                                              f"{model}, which evaluate reads; choose another file"),
        (["--json", model], f"--json {model} would overwrite the model, which evaluate reads; choose another file"),
        (["--json", f"{scan}.npz"], f"--json {scan}.npz would overwrite the truth of --scan {scan}, which evaluate "
                                    "reads; choose another file"),
        (["--save-image", scan], f"--save-image {scan}.npy would overwrite the frames of --scan {scan}, which "
                                 "evaluate reads; choose another file"),
        (["--json", tmp_path / "o.npy", "--save-image", tmp_path / "o"],
         f"--json and --save-image name the same file {tmp_path / 'o.npy'}; choose two files"),
    ):
        assert cli.main([*base, *map(str, options)]) == 2, options
        out = capsys.readouterr()
        assert out.err == f"edge-ptychonn evaluate: {expected}\n" and out.out == "", out.err
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == inputs


def test_a_model_with_the_detectors_crop_and_bin_is_scored_on_simulated_scans(small_model, scan9, tmp_path, capsys):
    """A fine-tuned model's card holds the detector's crop and bin (``finetune --crop 128 128 --bin 2`` for a
    64x64 model); the README scores it with ``evaluate --simulate``, whose frames the simulator makes at the
    model's input size. Before: ``scan ...: crop 128x128 at (-32, -32) does not fit a 64x64 frame``, exit 2.
    Now frames of the model's input size are taken as cut: the scores of the same model without the crop."""
    import json
    import shutil

    from edge_ptychonn.model_card import ModelCard, Training, save_card
    from edge_ptychonn.stream.preprocess import PreprocessConfig

    training = Training(scan_settings={**ScanSettings(frame_size=64, n_positions=9).to_dict(), "seed": None},
                        eval_n_positions=9)
    scores = []
    for name, pp in (("plain", PreprocessConfig(transform="sqrt", scale=0.05)),
                     ("cropped", PreprocessConfig(transform="sqrt", scale=0.05, crop_hw=(128, 128), bin_factor=2))):
        model = shutil.copy(small_model, tmp_path / f"{name}.onnx")
        save_card(ModelCard(input_size=64, preprocess=pp, training=training), model)
        argv = ["evaluate", "--model", str(model), "--scan", str(scan9), "--simulate", "mixed:1", "--engine",
                "onnxruntime", "--device", "cpu", "--threads", "1", "--quiet",
                "--json", str(tmp_path / f"{name}-scores.json")]
        assert cli.main(argv) == 0, capsys.readouterr().err
        scores.append(json.loads((tmp_path / f"{name}-scores.json").read_text()))
    assert scores[0] == scores[1]


def test_a_scan_whose_truth_is_not_of_the_models_patch_size_is_refused_before_predicting(small_model, tmp_path,
                                                                                         monkeypatch, capsys):
    """A scan simulated with ``--bin 2`` for the 64x64 model: 128x128 frames binned to 64x64, whose
    truth patches are 128x128 object pixels. Before: every frame was predicted, then "predicted
    patches (9, 64, 64) do not match the truth (9, 128, 128)", naming no scan."""
    prefix = tmp_path / "binned"
    save_scan(prefix, *simulate_scan(ScanSettings(seed=1, n_positions=9, frame_size=64, bin_factor=2),
                                     progress=False))
    assert np.load(prefix.with_suffix(".npy")).shape == (9, 64, 64)
    predicted = []
    monkeypatch.setattr(accuracy, "predict", lambda *args, **kwargs: predicted.append(1))
    argv = ["evaluate", "--model", str(small_model), "--scan", str(prefix), "--engine", "onnxruntime",
            "--device", "cpu", "--threads", "1", "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines(keepends=True)[-1]  # after: "no model card beside ..."
    assert err == ("edge-ptychonn evaluate: scan binned: its truth's patches are 128x128 object pixels, the model's "
                   "phase patches 64x64: they cannot be stitched together (a scan simulated with --bin has patches "
                   "of the detector's size before binning)\n"), err
    assert predicted == []
