"""``edge-ptychonn view`` (c2dv image windows) on a real chain, under a real Xvfb.

A real sim server replays a small simulated scan through one real inference
consumer (the shipped model) and the stitcher inside a real pvapy-hpc-collector;
``edge-ptychonn view`` opens c2dv windows on the inference output and the
stitched channel on a private Xvfb display. The test reads the viewer's own
status lines (connected, frames received and missed at full rate, where each
image lies on the screen) and takes a screenshot of the X display (Pillow's
X11 grab), whose image regions must show a picture, not a flat field.
Skipped with the reason where c2dv, Xvfb or Qt's xcb platform is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_ptychonn.tools.launch import Status, collector_argv
from edge_ptychonn.tools.processes import consumer_argv, sim_server_argv, start, tool_path, wait_until
from edge_ptychonn.tools.view import card_levels, images_only, parse_levels
from channel_names import PREFIX

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "ptychonn.onnx"
LINE = re.compile(r"^view (\S+): (\w[\w ]*?), received (\d+), displayed (\d+), missed (\d+), "
                  r"levels (\S+)\.\.(\S+), rate (.+), image at (\d+),(\d+) (\d+)x(\d+)$")


def test_levels_come_from_the_model_card_or_the_command_line(tmp_path):
    assert card_levels(MODEL) == (0.0, 1.5)  # the shipped model's training phase range
    assert parse_levels("card", MODEL) == (0.0, 1.5)
    assert parse_levels("-0.5,2", MODEL) == (-0.5, 2.0)
    assert parse_levels("auto", MODEL) is None
    with pytest.raises(ValueError, match="LO < HI"):
        parse_levels("2,1", MODEL)
    with pytest.raises(ValueError, match="card, auto or LO,HI"):
        parse_levels("bright", MODEL)
    bare = tmp_path / "bare.onnx"  # a model without a card
    bare.write_bytes(b"")
    with pytest.raises(ValueError, match="gives no phase range"):
        parse_levels("card", bare)


def test_only_records_with_an_image_reach_c2dvs_display():
    """A consumer's output channel starts with an empty record (no value, no dimensions, no
    attributes), which a window opened before frames flow gets on connect. Before: c2dv's
    display took it and logged "Error displaying data: NDArray does not contain ColorMode
    Attribute." on every connect."""
    import pvaccess as pva
    from pvapy.utility.adImageUtility import AdImageUtility

    shown = []
    on_record = images_only(shown.append)
    on_record(pva.NtNdArray())  # what the consumer's output channel holds before its first frame
    no_dimensions = pva.NtNdArray()
    no_dimensions["value"] = {"floatValue": np.ones(16, np.float32)}
    on_record(no_dimensions)
    frame = AdImageUtility.generateNtNdArray2D(7, np.ones((4, 5), np.float32))
    on_record(frame)
    assert shown == [frame]


def test_bad_arguments_are_refused_before_any_window(capsys):
    from edge_ptychonn import cli

    assert cli.main(["view", "--rate", "7"]) == 2
    assert cli.main(["view", "--levels", "1,1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("edge-ptychonn view: --rate must be full or one of 1, 2, 5")
    assert err[1].startswith("edge-ptychonn view: --levels LO,HI needs LO < HI")


def test_report_periods_and_levels_beyond_what_qt_takes_are_refused_in_one_line(capsys):
    """``--report-period inf`` or ``1e7`` opened the windows, then died with an OverflowError
    traceback (Qt's timer takes an int32 of ms); ``nan`` ran without any status line; levels
    ``0,inf`` or ``0,1e30`` were silently clamped to the controls' range (0..16777216)."""
    from edge_ptychonn import cli

    for period in ("inf", "1e7", "nan"):
        assert cli.main(["view", "--report-period", period]) == 2
    for levels in ("0,inf", "0,1e30", "-inf,1"):
        assert cli.main(["view", f"--levels={levels}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6, err
    assert all(line.startswith("edge-ptychonn view: --report-period must be 0 (none) .. 86400 s") for line in err[:3])
    assert all(line.startswith("edge-ptychonn view: --levels LO,HI must be finite numbers") for line in err[3:])
    with pytest.raises(ValueError, match="finite"):
        parse_levels("nan,1", MODEL)


def test_view_sh_takes_a_relative_model_from_where_it_is_called(tmp_path):
    """``bash scripts/view.sh --model m.onnx`` run beside m.onnx and its card uses them. Before:
    the script ran the viewer in the repository's folder, so a relative path named no file there
    ("the model card of m.onnx gives no phase range")."""
    import os
    import subprocess

    shutil.copy(MODEL.with_suffix(".json"), tmp_path / "m.json")
    (tmp_path / "m.onnx").write_bytes(b"")  # only its card is read for the levels
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}  # no X server: the arguments fail first
    done = subprocess.run(["bash", str(ROOT / "scripts" / "view.sh"), "--model", "m.onnx", "--rate", "7"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("edge-ptychonn view: --rate must be full"), done.stderr


def _status(log: str) -> dict[str, tuple]:
    """The last status line of each channel in the viewer's log."""
    last = {}
    for line in log.splitlines():
        m = LINE.match(line.strip())
        if m:
            last[m.group(1)] = m.groups()[1:]
    return last


@pytest.mark.e2e
def test_c2dv_windows_show_the_live_chain_under_xvfb(pva_env, procs, tmp_path):
    pytest.importorskip("c2dataviewer", reason="c2dv missing: pip install 'edge-ptychonn[viewer]'")
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb missing: apt-get install xvfb (scripts/setup-venv.sh does it as root with the viewer extra)")
    from PIL import ImageGrab

    from model_util import training_like_scan

    n = 24  # whole collector caches (8): no frame waits the collector's 5 s release at the end
    training_like_scan(tmp_path / "scan", MODEL, seed=777, n_positions=n)

    tag = f"{PREFIX}-vw"
    output, stitched = f"{tag}:inference:1:output", f"{tag}:stitch:1:output"
    status = Status()
    procs.append(start("inference", consumer_argv(
        f"{tag}:image", f"{tag}:inference", 1, "processors.ptychonn.PtychoNNProcessor",
        {"modelPath": str(MODEL), "engine": "onnxruntime", "cpuThreads": 1}), pva_env, tmp_path))
    procs.append(start("stitch", collector_argv(
        f"{tag}:inference:*:output", [1], "processors.stitch.StitchProcessor",
        {"positionsFile": str(tmp_path / "scan.npz"), "publishRate": 4}, f"{tag}:stitch", cache_size=8),
        pva_env, tmp_path))
    assert wait_until(lambda: status.get(f"{tag}:inference:1:status") and status.get(f"{tag}:stitch:1:status"), 60), \
        procs[0].log()[-2000:] + procs[1].log()[-2000:]

    # the sim server's start delay lets every client connect before frames flow (the
    # output channels appear when the first, empty, record reaches the consumer)
    delay_s = 14.0  # Xvfb gives its display in 2-3 s, c2dv connects a few seconds later (checked below)
    procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", f"{tag}:image", fps=10, start_delay_s=delay_s),
                       pva_env, tmp_path))
    t_sim = time.monotonic()
    # a private X display: Xvfb picks a free number and writes it to its log
    xvfb = start("xvfb", ["Xvfb", "-displayfd", "1", "-screen", "0", "2400x1000x24", "-nolisten", "tcp"], pva_env, tmp_path)
    procs.append(xvfb)
    display = wait_until(lambda: re.search(r"^(\d+)$", xvfb.log(), re.M), 20)
    assert display, f"Xvfb gave no display number: {xvfb.log()[-1000:]}"
    display = f":{display.group(1)}"
    env = {**pva_env, "DISPLAY": display}
    viewer = start("viewer", [tool_path("edge-ptychonn"), "view", output, stitched, "--report-period", "0.5"], env, tmp_path)
    procs.append(viewer)

    def connected():
        if not viewer.running():
            return True
        s = _status(viewer.log())
        producer = ((status.get(f"{tag}:stitch:1:status") or {}).get("producerStats_1", {})
                    .get("receiverStats", {}).get("nReceived", 0))
        return producer >= 1 and all(s.get(c, ("",))[0] == "Connected" for c in (output, stitched))

    wait_until(connected, delay_s + 10, poll_s=0.25)
    if not viewer.running() and "Qt platform plugin" in viewer.log():
        pytest.skip(f"Qt cannot start on Xvfb here: {viewer.log()[-600:]}")
    assert viewer.running() and connected(), viewer.log()[-3000:]
    assert time.monotonic() - t_sim < delay_s - 0.5, "the clients connected after frames began to flow: raise delay_s"
    blank = ImageGrab.grab(xdisplay=display)

    def shown():
        s = _status(viewer.log())
        return (s.get(output) and int(s[output][1]) >= n and s.get(stitched)
                and int(s[stitched][2]) >= 1 and (status.get(f"{tag}:stitch:1:status") or {})
                .get("userStats", {}).get("nFramesPlaced") == n and s)

    s = wait_until(shown, delay_s + 30, poll_s=0.25)
    assert s, f"viewer: {viewer.log()[-2000:]}\nstitch: {procs[1].log()[-1500:]}"
    import pvaccess as pva

    stitched_channel = pva.Channel(stitched)

    def final_image_received():
        # the stitcher's last image (every frame placed; its uniqueIds count its images from 1)
        # reached the window: a status line counts that many received (c2dv displays what it
        # receives at once)
        try:
            pv = stitched_channel.get("field()")
        except pva.PvaException:
            return None
        placed = {a["name"]: a["value"][0]["value"] for a in pv["attribute"]}.get("FramesPlaced")
        s = _status(viewer.log())
        return placed == n and int(s[stitched][1]) >= pv["uniqueId"] and s

    s = wait_until(final_image_received, 10, poll_s=0.25)
    assert s, f"the last stitched image did not reach the window: {viewer.log()[-1000:]}"
    shot = ImageGrab.grab(xdisplay=display)
    shot.save(tmp_path / "screenshot.png")
    print(viewer.log()[-1200:], f"\nscreenshot: {tmp_path / 'screenshot.png'}")

    state, received, displayed, missed = s[output][:4]
    assert state == "Connected" and s[stitched][0] == "Connected"
    # full rate: every frame of the one consumer reached the window, none missed; the empty
    # record a monitor gets on connect is not handed to c2dv's display (nor counted)
    assert int(received) == n and int(missed) == 0, s[output]
    assert "Error displaying data" not in viewer.log(), viewer.log()[-2000:]
    assert s[output][4:6] == ("0", "1.5"), "levels: the model card's phase range"
    for channel in (output, stitched):
        x, y, w, h = (int(v) for v in s[channel][-4:])
        box = (x, y, x + min(w, h), y + min(w, h))  # the image is drawn square at the top of its widget
        after = np.asarray(shot.crop(box).convert("L"), dtype=float)
        before = np.asarray(blank.crop(box).convert("L"), dtype=float)
        print(f"{channel}: grey std {before.std():.1f} before frames, {after.std():.1f} after")
        assert after.std() > 20 and after.std() > before.std() + 15, f"{channel}: no picture in {box}"


def test_a_missing_model_is_named_as_such_not_as_a_card_without_levels(tmp_path, capsys):
    """Before: "the model card of /no/such.onnx gives no phase range", for a model path typed wrong."""
    from edge_ptychonn import cli

    assert cli.main(["view", "--model", str(tmp_path / "nothere.onnx")]) == 2
    err = capsys.readouterr().err
    assert err == (f"edge-ptychonn view: --model {tmp_path / 'nothere.onnx'} is not a file (its card gives the "
                   "levels); pass --levels LO,HI or auto\n"), err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Qt needs DISPLAY on Linux only")
def test_no_display_is_one_line_and_exit_2(tmp_path):
    """Before: c2dv's Qt aborted (core dumped, exit -6) with a page about its platform plugins."""
    pytest.importorskip("c2dataviewer")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", "view", "--report-period", "0"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("edge-ptychonn view: no display (DISPLAY is not set)"), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
