"""``edge-ptychonn launch``: the TOML file, the command lines, and a small real chain started and stopped.

The end-to-end test replays a simulated scan through 2 real inference consumers (the
shipped model), the stitcher inside a real ``pvapy-hpc-collector`` and 2 real HDF5
writers, while this process follows a growing HDF5 file as a SWMR reader; then it
checks the files against the engine and the stitched image against offline stitching.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_ptychonn.tools.launch import LaunchConfig, Status, chained_argv, collector_argv
from channel_names import PREFIX

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "ptychonn.onnx"
_ids = itertools.count(1)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"chain{next(_ids)}.toml"
    path.write_text(text)
    return path


MINIMAL = """
[source]
channel = "det:image"
[inference]
consumers = 3
[inference.args]
modelPath = "m.onnx"
"""


def test_minimal_file_and_defaults(tmp_path):
    cfg = LaunchConfig.load(toml(tmp_path, MINIMAL))
    assert cfg.inference["consumers"] == 3 and cfg.inference["distributor_updates"] == 8
    assert cfg.source["scan"] is None and cfg.stitch is None and cfg.hdf5 is None
    assert [cfg.output_channel(i) for i in cfg.inference_ids()] == [f"inference:{i}:output" for i in (1, 2, 3)]


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "\n[stich]\n", r"unknown key\(s\) stich in the top level; accepted: log_dir, idle_s"),
    (MINIMAL.replace("consumers = 3", "consumer = 3"), r"unknown key\(s\) consumer in \[inference\]; accepted: consumers"),
    (MINIMAL.replace("consumers = 3", 'consumers = "3"'), r"'consumers' in \[inference\] must be int"),
    ("[inference]\n", r"the top level needs 'source'"),
    (MINIMAL + "\n[hdf5]\nprefix = 'h'\n", r"\[hdf5\] needs 'args'"),
    (MINIMAL.replace('channel = "det:image"', 'scan = "nope.npy"'), r"scan 'nope.npy' is not a file"),
    ("x = [", "is not valid TOML"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        LaunchConfig.load(toml(tmp_path, text))


def test_the_scans_positions_are_the_stitchers_default(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((3, 4, 4), np.int16))
    np.savez(tmp_path / "s.npz", positions_px=np.zeros((3, 2)))
    cfg = LaunchConfig.load(toml(tmp_path, f'[source]\nscan = "{tmp_path / "s.npy"}"\n[inference]\n[stitch]\n'))
    assert cfg.stitch["args"]["positionsFile"] == str(tmp_path / "s.npz")


def test_defaults_are_not_shared_between_files(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((3, 4, 4), np.int16))
    np.savez(tmp_path / "s.npz", positions_px=np.zeros((3, 2)))
    LaunchConfig.load(toml(tmp_path, f'[source]\nscan = "{tmp_path / "s.npy"}"\n[inference]\n[stitch]\n'))
    cfg = LaunchConfig.load(toml(tmp_path, MINIMAL + '\n[stitch]\nmetadata_channels = ["pva://y", "pva://x"]\n'))
    assert "positionsFile" not in cfg.stitch["args"], "the first file's default leaked into the second"
    assert cfg.stitch["metadata_channels"] == ["pva://y", "pva://x"]


def test_old_python_is_refused_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # what Python < 3.11 gives
    with pytest.raises(ValueError, match=r"needs Python >= 3.11 \(tomllib\)"):
        LaunchConfig.load(toml(tmp_path, MINIMAL))


def test_command_lines():
    argv = collector_argv("inference:*:output", [1, 2], "processors.stitch.StitchProcessor", {"publishRate": 2}, "stitch", 32)
    assert argv[0].endswith("pvapy-hpc-collector")
    for a, b in (("-pid", "1,2"), ("-ic", "inference:*:output"), ("-oc", "stitch:*:output"), ("-ccs", "32"), ("-siu", "0")):
        assert argv[argv.index(a) + 1] == b
    assert json.loads(argv[argv.index("-pa") + 1]) == {"publishRate": 2}
    argv = chained_argv("inference:*:output", 2, "processors.hdf5_writer.Hdf5WriterProcessor", {"outputDirectory": "x"}, "hdf5")
    assert argv[argv.index("-nc") + 1] == "2" and argv[argv.index("-sc") + 1] == "hdf5:*:status" and "-oc" not in argv


def test_status_searches_afresh_until_a_channel_answers(pva_env):
    """A channel read before its server exists is not kept (its search would back off):
    the next read makes a new one, which finds the server once it is up."""
    import pvaccess as pva

    name = f"{PREFIX}:launch:status{os.getpid()}"
    status = Status(timeout_s=0.3)
    assert status.get(name) is None and name not in status._channels
    server = pva.PvaServer(name, pva.PvObject({"value": pva.INT}, {"value": 7}))
    try:
        deadline = time.monotonic() + 20
        record = None
        while record is None and time.monotonic() < deadline:
            record = status.get(name)
        assert record == {"value": 7} and name in status._channels
    finally:
        server.stop()


def test_check_prints_the_validated_file(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", "launch", str(toml(tmp_path, MINIMAL)), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["inference"]["consumers"] == 3
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", "launch", str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "cannot read" in done.stderr


# ---------------------------------------------------------------- end to end


def _simulated_scan(path: Path, n: int):
    from edge_ptychonn.science.simulate import ScanSettings, save_scan, simulate_scan

    training = json.loads(MODEL.with_suffix(".json").read_text())["training"]["scan_settings"]
    settings = ScanSettings.from_dict({**ScanSettings().to_dict(), **training, "seed": 4242, "n_positions": n})
    frames, truth = simulate_scan(settings, progress=False)
    save_scan(path, frames, truth)
    return frames, truth


def _pids_alive(log_text: str) -> list[int]:
    pids = [int(line.split("pid")[1].split()[0]) for line in log_text.splitlines() if line.startswith("started ")]
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


@pytest.mark.e2e
def test_launch_runs_a_small_chain_to_the_end(pva_env, tmp_path):
    h5py = pytest.importorskip("h5py")
    from edge_ptychonn.science.metrics import score_phase
    from edge_ptychonn.science.stitch import Stitcher, probe_weight
    from edge_ptychonn.stream.config import parse_processor_args
    from edge_ptychonn.stream.preprocess import preprocess
    from edge_ptychonn.stream.postprocess import apply_output_mask
    from engines import EngineOptions, create_engine

    n = 49
    frames, truth = _simulated_scan(tmp_path / "scan", n)
    tag = f"lt{os.getpid()}"
    cfg = toml(tmp_path, f"""
log_dir = "{tmp_path / 'logs'}"
idle_s = 6.5
timeout_s = 100
[source]
scan = "{tmp_path / 'scan.npy'}"
channel = "{tag}:image"
fps = 40
start_delay_s = 10
[inference]
consumers = 2
prefix = "{tag}:inference"
[inference.args]
modelPath = "{MODEL}"
engine = "onnxruntime"
cpuThreads = 1
[stitch]
prefix = "{tag}:stitch"
[stitch.args]
publishRate = 4
outputDirectory = "{tmp_path / 'stitched'}"
[hdf5]
prefix = "{tag}:hdf5"
[hdf5.args]
outputDirectory = "{tmp_path / 'h5'}"
flushPeriod = 0.2
chunkFrames = 4
modelCard = "{MODEL.with_suffix('.json')}"
""")
    launch = subprocess.Popen([sys.executable, "-m", "edge_ptychonn.cli", "launch", str(cfg)], cwd=ROOT, env=pva_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []  # a SWMR reader follows consumer 1's file while it grows
    try:
        deadline = time.monotonic() + 60
        file = tmp_path / "h5" / f"{tag}_inference_1_output_scan0001.h5"
        while not file.exists() and time.monotonic() < deadline and launch.poll() is None:
            time.sleep(0.2)
        assert file.exists(), "no HDF5 file appeared"
        with h5py.File(file, "r", libver="latest", swmr=True) as f:
            while launch.poll() is None and time.monotonic() < deadline and (not seen or seen[-1] < 25):
                f["uniqueId"].refresh()
                seen.append(f["uniqueId"].shape[0])
                time.sleep(0.1)
        out, _ = launch.communicate(timeout=90)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGTERM)
            launch.wait(30)
    print(out[-2500:])
    assert launch.returncode == 0, out[-4000:]
    assert len(set(seen)) > 1 and seen[-1] > seen[0], f"the SWMR reader did not see the file grow: {seen}"
    assert _pids_alive(out) == [], "launch left processes running"

    # HDF5: exactly one image per input uniqueId, with the inference output's values
    # (one file per consumer: its frames in the order it preprocessed them, which the
    # card's running normalisation follows; then the card's output mask)
    ids, images, expected = [], [], []
    config, _ = parse_processor_args({"modelPath": str(MODEL)})
    engine = create_engine("onnxruntime", EngineOptions(MODEL, max_batch=8, cpu_threads=1))
    for path in sorted((tmp_path / "h5").glob("*.h5")):
        with h5py.File(path, "r") as f:
            file_ids = f["uniqueId"][:].tolist()
            ids += file_ids
            images.append(f["data"][:])
            assert json.loads(f.attrs["modelCard"])["name"] == "ptychonn"
        x = preprocess(frames[np.array(file_ids) - 1], config.preprocess)[:, None]
        expected.append(apply_output_mask(
            np.concatenate([engine.infer(x[i : i + 8]) for i in range(0, len(x), 8)]), config.output_mask)[:, 0])
    images, expected = np.concatenate(images), np.concatenate(expected)
    assert sorted(ids) == list(range(1, n + 1))
    for image, want in zip(images, expected):
        np.testing.assert_allclose(image, want, atol=1e-4)

    # the stitched image equals the offline stitching of the same outputs
    live = np.load(tmp_path / "stitched" / "stitch_scan0001.npy")
    offline = Stitcher(truth.object_phase.shape, truth.patch_shape, weight=probe_weight(truth.probe, 0.1))
    for uid, image in zip(ids, images):
        offline.add(image, truth.positions_px[uid - 1])
    np.testing.assert_allclose(live, offline.image(), atol=1e-5)
    covered = offline.covered(0.5)
    ssim = score_phase(live, truth.object_phase, covered)["ssim"]
    print(f"live stitched phase vs truth: SSIM {ssim:.3f} over {int(covered.sum())} pixels")
    assert "frames lost          0" in out and f"frames placed        {n}" in out


@pytest.mark.e2e
def test_launch_stops_everything_on_sigterm(pva_env, tmp_path, small_model):
    tag = f"ls{os.getpid()}"
    cfg = toml(tmp_path, f"""
log_dir = "{tmp_path / 'logs'}"
[source]
channel = "{tag}:detector"
[inference]
consumers = 2
prefix = "{tag}:inference"
[inference.args]
modelPath = "{small_model}"
engine = "onnxruntime"
cpuThreads = 1
[stitch]
prefix = "{tag}:stitch"
[stitch.args]
objectShape = [200, 200]
[hdf5]
prefix = "{tag}:hdf5"
[hdf5.args]
outputDirectory = "{tmp_path / 'h5'}"
""")
    launch = subprocess.Popen([sys.executable, "-m", "edge_ptychonn.cli", "launch", str(cfg)], cwd=ROOT, env=pva_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for two status lines: everything is up
            line = launch.stdout.readline()
            if not line:
                break
            lines.append(line)
            if sum(" | inference " in ln for ln in lines) >= 2:
                break
        assert sum(" | inference " in ln for ln in lines) >= 2, "".join(lines)
        os.kill(launch.pid, signal.SIGTERM)  # the launcher alone: it owns and stops the rest
        out, _ = launch.communicate(timeout=60)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    text = "".join(lines) + out
    assert "interrupted: stopping everything" in text, text[-3000:]
    assert [ln.split()[1] for ln in text.splitlines() if ln.startswith("stopped ")] == ["inference", "stitch", "hdf5"]
    assert _pids_alive(text) == []
