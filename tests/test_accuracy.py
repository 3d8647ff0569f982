"""Stitch-and-score through the engines: any engine, any batch, the card's settings."""

import json

import numpy as np
import pytest

from edge_ptychonn import cli
from edge_ptychonn.model_card import ModelCard, ModelConfig, StitchSettings, Training
from edge_ptychonn.science.accuracy import (
    DEFAULT_EVAL_N_POSITIONS,
    held_out_settings,
    open_engine,
    parse_scan_spec,
    predict,
    score_scan,
    simulate_held_out,
)
from edge_ptychonn.science.simulate import ScanSettings, simulate_scan
from edge_ptychonn.stream.preprocess import PreprocessConfig


@pytest.fixture(scope="module")
def scan():
    return simulate_scan(ScanSettings(seed=1001, n_positions=20), progress=False)


def test_exact_patches_score_perfectly_and_a_subset_stitches_only_what_came(scan):
    _, truth = scan
    full = score_scan("all", truth.patches_phase, truth)
    assert full.scores["rmse_rad"] < 1e-5 and full.n_frames == 20
    idx = np.arange(0, 20, 2)
    half = score_scan("half", truth.patches_phase[idx], truth, StitchSettings(0.1, 0.5), indices=idx)
    assert half.n_frames == 10 and half.covered.sum() < full.covered.sum()
    assert half.baselines["zeros"] != full.baselines["zeros"]  # scored over the region the subset covers
    with pytest.raises(ValueError, match="do not match the truth"):
        score_scan("bad", truth.patches_phase[:5], truth)


def test_the_mean_patch_baseline_is_what_predicting_the_mean_patch_scores_also_for_a_subset(scan):
    """Before: with ``indices`` (the frames that came back live) the baseline stitched its patch at every
    position of the scan, the model only at the frames that came, so the two were not compared alike."""
    _, truth = scan
    for idx in (np.arange(20), np.arange(0, 20, 3)):
        mean = np.broadcast_to(truth.patches_phase[idx].mean(axis=0), (len(idx), *truth.patch_shape))
        r = score_scan("mean", np.ascontiguousarray(mean), truth, indices=idx)
        assert r.scores == pytest.approx(r.baselines["mean_patch"], rel=1e-9, abs=1e-12)


def test_stitch_settings_decide_the_scored_region(scan):
    _, truth = scan
    loose = score_scan("a", truth.patches_phase, truth, StitchSettings(probe_threshold=0.05))
    strict = score_scan("b", truth.patches_phase, truth, StitchSettings(probe_threshold=0.05, min_cover_weight=2.0))
    assert strict.covered.sum() < loose.covered.sum()


def test_held_out_settings_come_from_the_card():
    card = ModelCard(training=Training(scan_settings={**ScanSettings(n_positions=49, photons=1e5).to_dict(),
                                                      "seed": None}, eval_n_positions=100))
    s = held_out_settings(card, 7, family="siemens")
    assert (s.seed, s.family, s.n_positions, s.photons) == (7, "siemens", 100, 1e5)
    assert held_out_settings(card, 7, n_positions=9).n_positions == 9
    assert held_out_settings(card, 7, photons=1e7).photons == 1e7  # evaluate --photons
    assert held_out_settings(None, 3) == ScanSettings(seed=3, n_positions=DEFAULT_EVAL_N_POSITIONS)
    with pytest.raises(ValueError, match="FAMILY:SEED"):
        parse_scan_spec("mixed")
    with pytest.raises(ValueError, match="family must be one of"):
        simulate_held_out(["plaid:1"], card)


def test_a_fixed_batch_model_scores_through_the_engines_with_any_batch(external_model, scan):
    frames, truth = scan  # 20 frames: not a multiple of the model's batch of 8
    pp = PreprocessConfig(transform="sqrt", scale=0.02)
    big = open_engine(external_model, "onnxruntime", device="cpu", batch_size=64, threads=1)
    small = open_engine(external_model, "onnxruntime", device="cpu", batch_size=3, threads=1)
    a, b = predict(big, frames, pp), predict(small, frames, pp)
    assert a.shape == b.shape == truth.patches_phase.shape and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.isfinite(score_scan("ext", a, truth).scores["ssim"])


def test_evaluate_command_with_a_model_without_card(external_model, tmp_path, capsys):
    rc = cli.main(["evaluate", "--model", str(external_model), "--simulate", "mixed:1001", "--n-positions", "12",
                   "--engine", "onnxruntime", "--device", "cpu", "--threads", "1", "--quiet",
                   "--json", str(tmp_path / "s.json")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "no model card beside" in captured.err and "onnxruntime fp32 on cpu" in captured.out
    assert json.loads((tmp_path / "s.json").read_text())["mixed:1001"]["n_frames"] == 12


@pytest.mark.parametrize("argv, message", [
    (["--simulate", "mixed:1", "--engine", "tensorflow"], "unknown engine 'tensorflow'"),
    (["--simulate", "mixed"], "FAMILY:SEED"),
    (["--model", "nope.onnx", "--simulate", "mixed:1"], "model nope.onnx not found"),
    ([], "give at least one --scan"),
    (["--simulate", "mixed:1", "--photons", "0"], "--photons must be > 0"),
    (["--simulate", "mixed:-1"], "a simulated scan's seed must be >= 0, got 'mixed:-1'"),
])
def test_evaluate_refuses_bad_arguments_on_stderr(argv, message, capsys):
    assert cli.main(["evaluate", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_a_card_or_a_scan_that_does_not_fit_the_model_is_refused_in_one_line(small_model, tmp_path, capsys):
    """The 64x64 model with a card for 128x128 frames, and a 128x128 scan after a 64x64 one: one line naming
    the card or the scan, before any prediction (before: the card was used silently, and the scan failed
    after the scans before it were predicted, with the engine's "batch must be (n, 1, 64, 64)")."""
    import shutil

    from edge_ptychonn.model_card import save_card
    from edge_ptychonn.science.simulate import save_scan

    model = tmp_path / "m.onnx"
    shutil.copy(small_model, model)
    save_scan(tmp_path / "s64", *simulate_scan(ScanSettings(seed=1, n_positions=4, frame_size=64), progress=False))
    save_scan(tmp_path / "s128", *simulate_scan(ScanSettings(seed=1, n_positions=4), progress=False))
    base = ["evaluate", "--model", str(model), "--engine", "onnxruntime", "--device", "cpu", "--threads", "1",
            "--quiet"]
    for card in (ModelCard(input_size=128), ModelCard(model=ModelConfig(input_size=128))):
        save_card(card, model)
        assert cli.main([*base, "--scan", str(tmp_path / "s64")]) == 2
        out = capsys.readouterr()  # the message of model_card.check_input_size, which the processor shares
        assert out.err == (f"edge-ptychonn evaluate: the model card {tmp_path / 'm.json'} says input_size 128, but "
                           "the model takes 64x64 input: it is another model's card (its preprocessing and output "
                           "mask would be applied to this one)\n") and out.out == ""
    save_card(ModelCard(input_size=64), model)
    assert cli.main([*base, "--scan", str(tmp_path / "s64"), "--scan", str(tmp_path / "s128")]) == 2
    out = capsys.readouterr()
    assert out.err == ("edge-ptychonn evaluate: scan s128: its 128x128 frames become 128x128 model inputs after "
                       "preprocessing, the model takes 64x64\n") and out.out == ""
    assert cli.main([*base, "--scan", str(tmp_path / "s64")]) == 0  # the card and scan that fit


def test_evaluate_scores_the_published_patches_at_any_dose(tmp_path, capsys):
    """The shipped model at a tenth of its training dose, through its card's normalisation and
    output mask: the stitched scores equal those of the raw patches, and the patches are 0
    outside the illuminated region (the raw network output is not)."""
    base = ["evaluate", "--simulate", "mixed:1001", "--n-positions", "48", "--photons", "1e5",
            "--engine", "onnxruntime", "--threads", "1", "--quiet"]
    assert cli.main([*base, "--json", str(tmp_path / "masked.json")]) == 0
    assert cli.main([*base, "--json", str(tmp_path / "raw.json"), "--no-output-mask"]) == 0
    capsys.readouterr()
    masked = json.loads((tmp_path / "masked.json").read_text())["mixed:1001"]
    raw = json.loads((tmp_path / "raw.json").read_text())["mixed:1001"]
    assert masked["model"] == raw["model"]
    assert masked["model"]["ssim"] > masked["baselines"]["zeros"]["ssim"] + 0.1  # not a constant prediction
    # the mask zeroes all but a 1-px ring beyond the bright centre: the largest value there
    # may sit in that ring, the mean cannot
    assert raw["patches"]["outside_max_abs_rad"] >= masked["patches"]["outside_max_abs_rad"]
    assert raw["patches"]["outside_mean_abs_rad"] > 2 * masked["patches"]["outside_mean_abs_rad"]


def test_evaluate_shows_progress_while_it_simulates_and_not_with_quiet(capsys):
    """Before: the --simulate scans were made without a word (8000 positions: 11 s of silence)."""
    base = ["evaluate", "--simulate", "smooth:3", "--n-positions", "12", "--engine", "onnxruntime", "--threads", "1"]
    assert cli.main(base) == 0
    err = capsys.readouterr().err
    assert "simulate seed 3" in err and "predict smooth:3" in err
    assert cli.main([*base, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_results_json_keeps_every_scan_of_one_name():
    """Two scans of one file name (in different folders) both reach ``evaluate --json``
    (before: the second replaced the first)."""
    from edge_ptychonn.science.accuracy import ScanResult, results_json

    one = lambda ssim: ScanResult("scan", {"ssim": ssim}, {}, {}, 4, np.zeros((2, 2)), np.ones((2, 2), bool))
    scores = results_json([one(0.5), one(0.7), one(0.9)])
    assert {k: v["model"]["ssim"] for k, v in scores.items()} == {"scan": 0.5, "scan-2": 0.7, "scan-3": 0.9}


def test_a_cards_scan_settings_of_the_wrong_type_are_refused_naming_the_card_block(tmp_path, capsys):
    """A card's ``training.scan_settings`` with ``"frame_size": 128.0`` or ``"photons": "1e6"`` (JSON by hand or
    another tool): before, ``evaluate --simulate`` ended in a TypeError traceback."""
    import shutil

    from edge_ptychonn.model_card import default_model_path, save_card

    model = tmp_path / "m.onnx"
    shutil.copy(default_model_path(), model)
    for key, value, why in (("frame_size", 128.0, "frame_size must be a whole number, got 128.0"),
                            ("photons", "1e6", "photons must be a number, got '1e6'")):
        settings = {**ScanSettings().to_dict(), "seed": None, key: value}
        save_card(ModelCard(input_size=128, training=Training(scan_settings=settings)), model)
        with pytest.raises(ValueError, match=f"^the model card's training.scan_settings: {why}$"):
            held_out_settings(ModelCard(training=Training(scan_settings=settings)), 1)
        assert cli.main(["evaluate", "--model", str(model), "--simulate", "mixed:1", "--n-positions", "4",
                         "--engine", "onnxruntime", "--quiet"]) == 2
        assert capsys.readouterr().err == f"edge-ptychonn evaluate: the model card's training.scan_settings: {why}\n"


def test_a_scan_too_small_to_score_is_one_line_naming_the_scan_and_the_remedy(capsys):
    """One position: its probe's bright centre is a ring too thin for the SSIM window. Before: "mask is
    too thin for the 11-pixel SSIM window", naming neither the scan nor what to do; now one line with
    both, before any prediction. Two positions, the smallest that --help names, are scored."""
    base = ["evaluate", "--engine", "onnxruntime", "--threads", "1", "--quiet"]
    assert cli.main([*base, "--simulate", "smooth:3", "--simulate", "mixed:1001", "--n-positions", "1"]) == 2
    out = capsys.readouterr()
    assert out.err == ("edge-ptychonn evaluate: scan smooth:3: its 1 frame(s) cover no region that can be scored "
                       "(where the probe's bright centre sums to the minimum cover weight 0.5, the 11-pixel SSIM "
                       "window fits nowhere): score a scan of more positions (evaluate: --n-positions; 2 or more at "
                       "the shipped model's scan settings) or of more overlap\n") and out.out == ""
    assert cli.main([*base, "--simulate", "mixed:1001", "--n-positions", "2"]) == 0
    assert "(2 frames scored in " in capsys.readouterr().out
    _, truth = simulate_scan(ScanSettings(seed=1, n_positions=1), progress=False)
    with pytest.raises(ValueError, match="^scan one: its 1 frame"):  # also where train scores
        score_scan("one", truth.patches_phase, truth)


def test_sigterm_stops_evaluate_like_ctrl_c_in_one_line(tmp_path):
    """A SIGTERM (a batch system's stop, ``kill``) while it predicts: one line, exit 130, no output
    file (before: killed outright by the signal, as the other long commands were before theirs)."""
    import os
    import signal
    import subprocess
    import sys

    argv = [sys.executable, "-m", "edge_ptychonn.cli", "evaluate", "--simulate", "mixed:1001", "--n-positions", "512",
            "--engine", "onnxruntime", "--threads", "1", "--json", str(tmp_path / "scores.json")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # the first progress line of the prediction: the work is under way
            lines.append(line)
            if line.startswith("predict mixed:1001"):
                break
        assert proc.poll() is None, (proc.returncode, lines)
        os.kill(proc.pid, signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (lines, rest)
    assert rest.strip().splitlines()[-1] == "edge-ptychonn evaluate: interrupted" and "Traceback" not in rest, rest
    assert list(tmp_path.iterdir()) == []


def test_evaluate_names_its_own_options_when_refusing_threads_or_a_precision(capsys):
    """--threads -3 was refused as "cpu_threads must be ...", the engine option's name, and
    --precision bogus as "engine 'auto' found nothing to run": now the option is named."""
    from edge_ptychonn import cli

    assert cli.main(["evaluate", "--simulate", "mixed:1", "--threads", "-3", "--quiet"]) == 2
    assert capsys.readouterr().err == "edge-ptychonn evaluate: --threads must be >= 0 (0: all usable cores), got -3\n"
    with pytest.raises(SystemExit) as info:
        cli.main(["evaluate", "--simulate", "mixed:1", "--precision", "bogus", "--quiet"])
    assert info.value.code == 2 and "argument --precision: invalid choice: 'bogus'" in capsys.readouterr().err
