"""The demo command, end to end on a small simulated scan: the launcher's chain of real
PvaPy processes (sim server, 2 inference consumers with the shipped model, the stitcher in
pvapy-hpc-collector, 2 HDF5 writers), its status lines, its summary and its PNG."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from edge_ptychonn.tools import demo
from channel_names import PREFIX
from signal_util import pids_alive
from model_util import training_like_scan

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "ptychonn.onnx"


@pytest.mark.e2e
def test_demo_runs_the_chain_and_leaves_a_picture_of_the_stitched_phase(pva_env, tmp_path, capsys):
    pytest.importorskip("h5py")
    from PIL import Image

    n = 32  # the collector's cache (2 consumers x 2 x 8): no frame waits its 5 s release at the end
    training_like_scan(tmp_path / "scan", MODEL, seed=1001, n_positions=n)
    args = demo.get_args_parser().parse_args([
        "--scan", str(tmp_path / "scan.npy"), "--engine", "onnxruntime", "--fps", "40", "--start-delay", "10",
        "--prefix", f"{PREFIX}:demo{id(tmp_path) % 10**6}", "--channel", f"{PREFIX}:demo{id(tmp_path) % 10**6}:image",
        "--out", str(tmp_path / "out"), "--timeout", "60",
    ])
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    print(out[-3000:])
    status = [line for line in out.splitlines() if re.match(r"^\s*\d+\.\ds \| inference \d+ frames", line)]
    assert status, "no live status line"
    assert f"frames sent          {n}" in out and "frames lost          0" in out
    assert f"frames placed        {n}" in out and f"images written       {n}" in out
    assert len(list((tmp_path / "out" / "h5").glob("*.h5"))) == 2
    # every process the chain started (the sim server ends with its replay) is gone
    started = sorted(ln.split()[1] for ln in out.splitlines() if ln.startswith("started "))
    assert started == ["hdf5", "inference", "sim", "stitch"], out[-3000:]
    assert pids_alive(out) == [], "the demo left processes running"

    # the picture: the live stitched phase (left) beside the truth (right), at the printed path
    png = Path(re.search(r"^picture\s+(\S+\.png)", out, re.M).group(1))
    assert png.is_file() and png.parent == tmp_path / "out" / "stitched"
    picture = np.asarray(Image.open(png).convert("L"), dtype=float)
    w = (picture.shape[1] - 16) // 2  # both halves cropped to the scanned region
    assert picture.shape[1] == 2 * w + 16 and picture.shape[0] > 24 + 50
    live, true = picture[24:, :w], picture[24:, w + 16:]
    covered = live > 0
    assert covered.mean() > 0.5 and live[covered].std() > 20, "the stitched half is flat or empty"
    assert np.corrcoef(live[covered], true[covered])[0, 1] > 0.5, "the stitched phase does not look like the truth"
    ssim = float(re.search(r"SSIM (\d\.\d+)", out).group(1))
    assert ssim > 0.3


def test_demo_sh_takes_relative_paths_from_where_it_is_called(tmp_path):
    """``bash scripts/demo.sh --scan scan.npy --out out`` run beside scan.npy replays that scan
    into ./out. Before: the script ran the demo in the repository's folder ("scan scan.npy not
    found"; a relative --out landed in the repository). Stopped here by a scan of one frame,
    which is refused once the scan is found."""
    import hashlib
    import subprocess

    stamp = ROOT / ".venv" / ".edge-ptychonn-installed"  # demo.sh's set-up must have nothing to install
    pins, extras = (stamp.read_text().split() + ["", ""])[:2] if stamp.is_file() else ("", "")
    if pins != hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest() or \
            not {"torch", "codecs", "hdf5"} <= set(extras.split(",")):
        pytest.skip("demo.sh would first install its extras into .venv")
    np.save(tmp_path / "scan.npy", np.zeros((1, 8, 8), np.int16))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--scan", "scan.npy", "--out", "out"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "edge-ptychonn demo: --scan 'scan.npy' must hold frames (n >= 2" in done.stderr, done.stderr


@pytest.mark.parametrize("option", [["--timeout", "-20"], ["--start-delay", "-5"], ["--timeout", "nan"],
                                    ["--start-delay", "1e300"]])  # the last: a demo that never ended
def test_bad_times_are_refused_with_the_demos_own_option_names(tmp_path, capsys, option):
    """Before: "'timeout_s' in the top level must be >= 0, got -8.0" and "[source] fps must be > 0
    and start_delay_s >= 0", names of the launcher's file the demo's user never wrote."""
    np.save(tmp_path / "scan.npy", np.zeros((2, 8, 8), np.int16))
    args = demo.get_args_parser().parse_args(["--scan", str(tmp_path / "scan.npy"), "--out", str(tmp_path / "out"),
                                              *option])
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-ptychonn demo: --timeout must be > 0 and --start-delay 0..600 (seconds), got "), err


def test_sweep_table_counts_a_frame_the_stitcher_missed_as_lost():
    from edge_ptychonn.tools.launch import Snapshot

    def snap(processed, placed, written, rejected=0):
        user = lambda **k: {"userStats": k}
        stitch = {"userStats": {"nFramesPlaced": placed, "stitchTimeUs": 150.0},
                  "collectorStats": {"nMissed": 0, "nRejected": rejected}}
        return Snapshot([user(nFramesProcessed=processed)], stitch, [user(nFramesWritten=written)])

    rows = demo.sweep_rows([60, 120, 200], [(snap(100, 100, 100), 100, 59.6), (snap(100, 95, 100, 5), 100, 110.2), None],
                           cfg_hdf5=True)
    assert rows[0] == ["60", "100", "100", "60", "100", "100", "0", "0", "150"]
    assert rows[1][6:8] == ["5", "5"]  # every frame written, 5 rejected by the collector: lost
    assert rows[2] == ["200"] + ["-"] * 8
    assert demo.format_table(demo.SWEEP_HEADER, rows).splitlines()[0].split()[:3] == ["fps", "sent", "processed"]
    with pytest.raises(ValueError, match="separated by commas"):
        demo._rates("60;80")
    for text in ("60,nan", "inf", "0,60"):  # before: nan and inf passed, and failed only after the scan was made
        with pytest.raises(ValueError, match="must be finite numbers > 0"):
            demo._rates(text)


def test_sweep_table_does_not_count_frames_dropped_by_inference_again_as_the_collectors():
    """Inference dropped 10 of 100 under load; the stitcher received the 90 it published, and
    PvaPy's collector counted 2 gaps those drops left: the "collector lost" column says 0 (before: 2)."""
    from edge_ptychonn.tools.launch import Snapshot

    inference = {"userStats": {"nFramesProcessed": 90, "nFramesDropped": 10}}
    stitch = {"userStats": {"nFramesPlaced": 90, "nFramesReceived": 90, "stitchTimeUs": 150.0},
              "collectorStats": {"nMissed": 2, "nRejected": 0}}
    rows = demo.sweep_rows([60], [(Snapshot([inference], stitch, [{"userStats": {"nFramesWritten": 90}}]), 100, 50.0)],
                           cfg_hdf5=True)
    assert rows[0][6:8] == ["10", "0"]


def test_a_demo_run_removes_the_previous_runs_image_and_hdf5_files(tmp_path):
    for name in ("stitched/stitch_scan0001.npy", "stitched/stitch_scan0001.png", "h5/demo_1_scan0001.h5",
                 "h5/demo_1_scan0001-2.h5", "h5/notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("an earlier run's")
    demo.clear_results(tmp_path)
    assert not list((tmp_path / "stitched").iterdir())
    assert [p.name for p in (tmp_path / "h5").iterdir()] == ["notes.txt"]  # only the writers' files go
    demo.clear_results(tmp_path / "nothing yet")  # a first run: nothing to remove


@pytest.mark.parametrize("option, message", [
    (["--model", "SCAN"], "is not a readable ONNX model"),
    (["--fps", "nan"], "--fps a finite number >= 0.001"),
    (["--fps", "inf"], "--fps a finite number >= 0.001"),
    (["--fps", "1e-11"], "--fps a finite number >= 0.001"),
])
def test_a_model_that_is_not_onnx_or_a_rate_that_is_not_finite_is_one_line_before_the_chain(
        tmp_path, capsys, monkeypatch, option, message):
    """Before: a file that is not ONNX started the whole chain, whose consumers all failed with
    tracebacks (exit 1, "frames lost 36"); --fps nan was refused by the launcher in names of its
    file ("'fps' in [source]")."""
    np.save(tmp_path / "scan.npy", np.zeros((2, 8, 8), np.int16))
    monkeypatch.setattr(demo.launch, "run", lambda *a, **k: pytest.fail("the chain was started"))
    option = [str(tmp_path / "scan.npy") if o == "SCAN" else o for o in option]
    args = demo.get_args_parser().parse_args(["--scan", str(tmp_path / "scan.npy"), "--out", str(tmp_path / "out"),
                                              *option])
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-ptychonn demo: ") and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("option, message", [
    (["--model", "SCAN"], "is not a readable ONNX model"),
    (["--model", "MISSING"], "is not a readable ONNX model"),
    (["--engine", "warp"], "unknown engine 'warp'"),
    (["--cpu-threads", "-1"], "--cpu-threads >= 0"),
    (["--cpu-threads", "5000"], "--cpu-threads must be an integer 0..1024, got 5000"),  # before: a consumer that
    # could not start, and a soak that ran its whole time without it
    (["--minutes", "nan"], "--minutes, --every and --fps must be finite numbers > 0"),
    (["--minutes", "inf"], "--minutes, --every and --fps must be finite numbers > 0"),
    (["--fps", "-5"], "--minutes, --every and --fps must be finite numbers > 0"),
    (["--every", "0"], "--minutes, --every and --fps must be finite numbers > 0"),
])
def test_soak_refuses_bad_options_in_one_line_before_it_starts_anything(tmp_path, capsys, monkeypatch, option,
                                                                         message):
    """Before: a missing or non-ONNX --model, an unknown --engine and --cpu-threads -1 were
    tracebacks (exit 1); --minutes nan or inf, --fps -5 and --every 0 started the processes (the
    sim server got -fps -5 or -rt nan) and ran until stopped."""
    from edge_ptychonn.tools import processes, soak

    np.save(tmp_path / "scan.npy", np.zeros((2, 8, 8), np.int16))
    monkeypatch.setattr(processes, "start", lambda *a, **k: pytest.fail("a process was started"))
    paths = {"SCAN": str(tmp_path / "scan.npy"), "MISSING": str(tmp_path / "nothere.onnx")}
    args = soak.get_args_parser().parse_args(["--fps", "10", "--minutes", "0.01", "--prefix", f"{PREFIX}:soakopt",
                                              *[paths.get(o, o) for o in option]])
    assert soak.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-ptychonn soak: ") and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("option, message", [
    (["--batch-size", "1000"], "--batch-size must be an integer 1..256, got 1000"),
    (["--batch-size", "0"], "--batch-size must be an integer 1..256, got 0"),
    (["--cpu-threads", "-1"], "--cpu-threads must be an integer 0..1024, got -1"),
    (["--consumers", "65"], "--consumers must be 1..64"),
    (["--engine", "warp"], "--engine: unknown engine 'warp'"),
    (["--prefix", "a*b"], "--prefix must be a channel name without '*'"),
    (["--channel", ""], "--channel must be a channel name without '*'"),
    (["--channel", "demo:inference:1:image"], "--channel 'demo:inference:1:image' is among the demo's own channels"),
    (["--scan", "ONE"], "--scan 'ONE' must hold frames (n >= 2, height, width)"),
    (["--scan", "MODEL"], "--scan 'MODEL' is not a NumPy .npy file"),
    (["--scan", "SCAN"], "--scan SCAN has no scan.npz beside it: the stitcher needs the scan's positions"),
    (["--bin", "0"], "--bin must be an integer 1..64, got 0"),  # the consumers' bin, in the demo's option name
    (["--crop-origin", "1", "1"], "--crop-origin needs crop"),
])
def test_options_the_chain_refuses_are_refused_in_the_demos_own_names_before_anything(
        tmp_path, capsys, monkeypatch, option, message):
    """Before: "[inference.args] batchSize must be an integer 1..256", "[inference] prefix 'a*b:inference'",
    "[source] scan ...": the launcher's file keys, which the demo's user never wrote; --batch-size
    1000 and --engine warp were refused only after the held-out scan had been simulated."""
    np.save(tmp_path / "scan.npy", np.zeros((2, 8, 8), np.int16))
    np.save(tmp_path / "one.npy", np.zeros((1, 8, 8), np.int16))
    paths = {"ONE": str(tmp_path / "one.npy"), "MODEL": str(MODEL), "SCAN": str(tmp_path / "scan.npy")}
    monkeypatch.setattr(demo.launch, "run", lambda *a, **k: pytest.fail("the chain was started"))
    monkeypatch.setattr(demo, "ensure_scan", lambda scan, card: pytest.fail("a scan was simulated")) \
        if "--scan" not in option else None
    args = demo.get_args_parser().parse_args(["--out", str(tmp_path / "out"), *[paths.get(o, o) for o in option]])
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-ptychonn demo: ") and len(err.splitlines()) == 1, err
    assert message.replace("ONE", paths["ONE"]).replace("MODEL", paths["MODEL"]).replace("SCAN", paths["SCAN"], 1) in err, err
    assert "[" not in err, err  # no table of the launcher's file


def test_a_scan_the_model_cannot_take_is_one_line_before_the_chain(tmp_path, capsys, monkeypatch):
    """Frames of another size than the model's input (after crop and bin): before, the chain
    started and every frame was refused as a bad frame (shape), all of them lost. The line names
    the demo's options that cut the frames (before: "[inference.args] ... modelPath", a file the
    demo's user never wrote, and no option to give the crop and bin)."""
    np.save(tmp_path / "scan.npy", np.zeros((2, 8, 8), np.int16))
    np.savez(tmp_path / "scan.npz", positions_px=np.zeros((2, 2)))
    monkeypatch.setattr(demo.launch, "run", lambda *a, **k: pytest.fail("the chain was started"))
    for options, cut in (([], "become 8x8 with no crop and bin 1 (the model card's)"),
                         (["--crop", "8", "8", "--bin", "2"], "become 4x4 with crop 8x8 and bin 2 (--crop, "
                                                               "--crop-origin, --bin)")):
        args = demo.get_args_parser().parse_args(["--scan", str(tmp_path / "scan.npy"), "--out", str(tmp_path / "out"),
                                                  *options])
        assert demo.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"edge-ptychonn demo: --scan {tmp_path / 'scan.npy'}: frames of 8x8 {cut}; the model "
                              "takes 128x128: give the detector's crop and bin with --crop H W (centred, or at "
                              "--crop-origin Y X) and --bin N, H = W = N x 128") and len(err.splitlines()) == 1, err
        assert "[" not in err, err  # no table of the launcher's file


def test_a_detectors_frames_are_cut_by_the_demos_crop_and_bin_options(tmp_path, capsys, monkeypatch):
    """A recording of 260x260 detector frames: --crop 256 256 --crop-origin 1 3 --bin 2 make them the
    shipped model's 128x128 input, and the consumers get them as their crop, cropOrigin and bin."""
    np.save(tmp_path / "scan.npy", np.zeros((2, 260, 260), np.int16))
    np.savez(tmp_path / "scan.npz", positions_px=np.zeros((2, 2)))
    chains = []
    monkeypatch.setattr(demo.launch, "run", lambda cfg, **k: chains.append(cfg) or 0)
    args = demo.get_args_parser().parse_args(["--scan", str(tmp_path / "scan.npy"), "--out", str(tmp_path / "out"),
                                              "--crop", "256", "256", "--crop-origin", "1", "3", "--bin", "2"])
    assert demo.main(args) == 0, capsys.readouterr().err
    [cfg] = chains
    assert {k: cfg.inference["args"][k] for k in ("crop", "cropOrigin", "bin")} == {
        "crop": [256, 256], "cropOrigin": [1, 3], "bin": 2}
    assert "--bin N" in demo.get_args_parser().format_help()
    args.crop = [0, 8]  # refused as the consumers refuse crop, before the chain
    assert demo.main(args) == 2 and len(chains) == 1
    assert capsys.readouterr().err == "edge-ptychonn demo: --crop must be [height, width] of positive ints, got (0, 8)\n"


def test_no_hint_to_view_the_channels_after_ctrl_c(tmp_path, capsys, monkeypatch):
    """Ctrl-C (or SIGTERM, SIGHUP) stops the chain: there is nothing left to view. Before: the demo
    printed "View the channels live next time with: ..." after the interruption all the same."""
    np.save(tmp_path / "scan.npy", np.zeros((2, 128, 128), np.int16))  # the shipped model's input size
    np.savez(tmp_path / "scan.npz", positions_px=np.zeros((2, 2)))
    args = demo.get_args_parser().parse_args(["--scan", str(tmp_path / "scan.npy"), "--out", str(tmp_path / "out")])
    monkeypatch.setattr(demo.launch, "run", lambda *a, **k: 130)
    assert demo.main(args) == 130
    assert "View the channels" not in capsys.readouterr().out
    monkeypatch.setattr(demo.launch, "run", lambda *a, **k: 0)  # a run to its end: the hint
    assert demo.main(args) == 0
    assert "View the channels live next time with: bash scripts/view.sh" in capsys.readouterr().out


def test_the_hint_to_view_names_the_viewer_extra_when_c2dv_is_missing(tmp_path, capsys, monkeypatch):
    """The demo's set-up leaves the viewer extra out, so right after a first demo the hint's
    view.sh could only fail ("c2dv is not installed"). Before: the hint said nothing of it."""
    import importlib.machinery
    import sys
    import types

    np.save(tmp_path / "scan.npy", np.zeros((2, 128, 128), np.int16))
    np.savez(tmp_path / "scan.npz", positions_px=np.zeros((2, 2)))
    args = demo.get_args_parser().parse_args(["--scan", str(tmp_path / "scan.npy"), "--out", str(tmp_path / "out")])
    monkeypatch.setattr(demo.launch, "run", lambda *a, **k: 0)
    monkeypatch.setitem(sys.modules, "c2dataviewer", None)  # not importable
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "View the channels live next time with: bash scripts/view.sh" in out
    assert "viewer extra" in out and "bash scripts/setup-venv.sh viewer" in out
    installed = types.ModuleType("c2dataviewer")
    installed.__spec__ = importlib.machinery.ModuleSpec("c2dataviewer", None)
    monkeypatch.setitem(sys.modules, "c2dataviewer", installed)  # importable: the hint alone
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "View the channels live next time with: bash scripts/view.sh" in out and "viewer extra" not in out


def _soak_stopped_at_start(monkeypatch):
    """soak's processes.start: stops the soak (as Ctrl-C would) at its first process, recording argv."""
    from edge_ptychonn.tools import processes

    started = []

    def start(name, argv, *a, **k):
        started.append((name, argv))
        raise KeyboardInterrupt

    monkeypatch.setattr(processes, "start", start)
    monkeypatch.setattr(processes, "loopback_multicast", lambda: (True, "on"))
    return started


@pytest.mark.parametrize("where", ["file/x.json", "file/deeper/x.json", "folder"])
def test_soak_refuses_a_json_file_it_could_not_write_before_it_starts(tmp_path, capsys, monkeypatch, where):
    """Before: --json under a file (or naming a folder) failed only once the whole run was over,
    and its figures were lost with it."""
    from edge_ptychonn.tools import soak

    started = _soak_stopped_at_start(monkeypatch)
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    args = soak.get_args_parser().parse_args(["--fps", "10", "--minutes", "0.01", "--json", str(tmp_path / where)])
    assert soak.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edge-ptychonn soak: --json {tmp_path / where}") and len(err.splitlines()) == 1, err
    assert started == []


def test_soak_makes_the_folders_of_its_json_file_before_it_starts(tmp_path, monkeypatch):
    """Before: a --json in a folder that did not exist yet failed after the run ("No such file or
    directory"), its figures lost."""
    from edge_ptychonn.tools import soak

    started = _soak_stopped_at_start(monkeypatch)
    target = tmp_path / "new" / "deeper" / "soak.json"
    args = soak.get_args_parser().parse_args(["--fps", "10", "--minutes", "0.01", "--json", str(target)])
    assert soak.main(args) == 130 and started  # stopped as it started its first process
    assert target.parent.is_dir()  # the folder made, and the stopped run's figures so far written there
    assert json.loads(target.read_text())["interrupted"] is True


def test_a_refused_soak_leaves_no_folders_for_its_json_file(tmp_path, capsys, monkeypatch):
    """--json in folders not made yet, then a refusal (an engine that needs --fps): exit 2 and
    nothing left (before: the empty folders, made by the --json check before the refusal)."""
    from edge_ptychonn.tools import soak

    started = _soak_stopped_at_start(monkeypatch)
    target = tmp_path / "new" / "deeper" / "soak.json"
    args = soak.get_args_parser().parse_args(["--engine", "zero", "--minutes", "0.01", "--json", str(target)])
    assert soak.main(args) == 2 and started == []
    assert "--engine zero needs --fps" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_soak_json_of_a_consumer_that_died_is_strict_json(tmp_path):
    """A consumer that died reads NaN resident memory; --json wrote it as the bare word NaN, which
    strict JSON parsers (a browser's, a JSON schema check) refuse. It is null now."""
    from edge_ptychonn.tools import soak

    target = tmp_path / "soak.json"
    soak.write_figures(target, {"rss_mb": [(10.0, [150.5, 151.0]), (14.0, [float("nan"), 152.0])],
                                "rss_growth_after_warmup_mb": float("nan"), "frames_lost": 3})

    def refuse(word):
        raise AssertionError(f"{word} in the JSON")

    figures = json.loads(target.read_text(), parse_constant=refuse)
    assert figures == {"rss_mb": [[10.0, [150.5, 151.0]], [14.0, [None, 152.0]]],
                       "rss_growth_after_warmup_mb": None, "frames_lost": 3}


def test_soak_longer_than_an_hour_keeps_its_consumers_to_the_end(monkeypatch):
    """Before: the consumers were started with PvaPy's runtime of an hour (-rt 3600), so a soak of
    90 minutes lost every frame of its last half hour to consumers that had stopped by themselves."""
    from edge_ptychonn.tools import soak

    started = _soak_stopped_at_start(monkeypatch)
    args = soak.get_args_parser().parse_args(["--fps", "10", "--minutes", "90"])
    assert soak.main(args) == 130
    [(name, argv)] = started
    runtime = float(argv[argv.index("-rt") + 1])
    assert name == "consumers" and (runtime <= 0 or runtime >= 90 * 60 + 60), argv
