"""``edge-ptychonn launch``: the TOML file, the command lines, and a small real chain started and stopped.

The end-to-end test replays a simulated scan through 2 real inference consumers (the
shipped model), the stitcher inside a real ``pvapy-hpc-collector`` and 2 real HDF5
writers, while this process follows a growing HDF5 file as a SWMR reader; then it
checks the files against the engine and the stitched image against offline stitching.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_ptychonn.tools import launch
from edge_ptychonn.tools import processes as live
from edge_ptychonn.tools.launch import LaunchConfig, Snapshot, Status, chained_argv, collector_argv, last_errors
from edge_ptychonn.tools.processes import wait_until
from channel_names import PREFIX
from signal_util import pids_alive
from conftest import lines_until

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "ptychonn.onnx"
_ids = itertools.count(1)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"chain{next(_ids)}.toml"
    path.write_text(text)
    return path


MINIMAL = f"""
[source]
channel = "det:image"
[inference]
consumers = 3
[inference.args]
modelPath = "{MODEL}"
"""


class _SlowStream(io.StringIO):
    """A terminal or pipe that takes a moment per write: the threads that say lines meanwhile
    get their turn."""

    def write(self, text: str) -> int:
        time.sleep(0.002)
        return super().write(text)


def test_lines_said_by_threads_at_once_come_out_whole(tmp_path):
    """The clients are stopped at once, each thread saying its "stopped ..." line. Before:
    ``print`` wrote a line and its newline apart, so two lines could come out as one
    ("stopped stitch    pid 26892   exit -2stopped hdf5 ..."), which a reader of the output
    (and the session-close test) took for one stopped process."""
    out = _SlowStream()
    chain = launch.Chain(load(tmp_path, MINIMAL), out=out)
    lines = [f"stopped client{i} pid {1000 + i}" for i in range(8)]
    threads = [threading.Thread(target=chain.say, args=(line,)) for line in lines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(out.getvalue().splitlines()) == sorted(lines), out.getvalue()


def test_a_detector_chain_keeps_the_environments_epics_settings(tmp_path, monkeypatch):
    """A beamline's EPICS settings reach the detector on another host: a detector chain keeps
    them (before: replaced by loopback, so the chain never found the detector); a replay, or an
    environment without EPICS settings, stays on loopback."""
    # a site's settings (here on loopback too, with a port of the site's own; nothing is sent)
    monkeypatch.setenv("EPICS_PVA_ADDR_LIST", "127.0.0.1:5999")
    monkeypatch.setenv("EPICS_PVA_SERVER_PORT", "5998")
    out = io.StringIO()
    chain = launch.Chain(load(tmp_path, MINIMAL), out=out)
    assert chain.env["EPICS_PVA_ADDR_LIST"] == "127.0.0.1:5999" and chain.env["EPICS_PVA_SERVER_PORT"] == "5998"
    monkeypatch.setattr(live, "loopback_multicast", lambda: (True, ""))
    monkeypatch.setattr(launch.Chain, "_start", lambda self, name, argv: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        chain.start()
    assert "EPICS pvAccess settings: " in out.getvalue() and "EPICS_PVA_ADDR_LIST=127.0.0.1:5999" in out.getvalue()
    scan = tmp_path / "s.npy"
    np.save(scan, np.zeros((3, 4, 4), np.int16))
    replay = launch.Chain(load(tmp_path, MINIMAL.replace('channel = "det:image"', f'scan = "{scan}"')), out=io.StringIO())
    assert {k: replay.env[k] for k in live.LOOPBACK_ENV} == live.LOOPBACK_ENV
    for key in live.site_epics_settings():
        monkeypatch.delenv(key)
    bare = launch.Chain(load(tmp_path, MINIMAL), out=io.StringIO())
    assert {k: bare.env[k] for k in live.LOOPBACK_ENV} == live.LOOPBACK_ENV


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
    # ranges and types that the processes would choke on
    (MINIMAL.replace("consumers = 3", "distributor_updates = 0"), r"'distributor_updates' in \[inference\] must be >= 1, got 0"),
    (MINIMAL.replace("consumers = 3", "server_queue_size = -5"), r"'server_queue_size' in \[inference\] must be >= 0, got -5"),
    (MINIMAL + "\n[stitch]\ncollector_cache_size = -1\n", r"'collector_cache_size' in \[stitch\] must be >= 0, got -1"),
    (MINIMAL + "\n[viewer]\nchannels = [1, 2]\n", r"'channels' in \[viewer\] must be a list of channel names"),
    (MINIMAL + "\n[viewer]\nchannels = []\n", r"'channels' in \[viewer\] needs at least one channel"),
    (MINIMAL.replace('"det:image"', '""'), r"'channel' in \[source\] must not be empty"),
    ("timeout_s = -1\n" + MINIMAL, r"'timeout_s' in the top level must be >= 0"),
    # each processor's own argument parsing, as its consumers would at start-up
    (MINIMAL + 'batchSize = "eight"\n', r"\[inference.args\] batchSize must be an integer 1..256, got 'eight'"),
    (MINIMAL + 'engine = "warp"\n', r"\[inference.args\] unknown engine 'warp'"),
    (MINIMAL.replace(str(MODEL), "missing.onnx"), r"\[inference.args\] modelPath 'missing.onnx' is not a file"),
    (MINIMAL.replace("consumers = 3", 'processor = "nowhere.Nothing"'), r"processor 'nowhere.Nothing' cannot be imported"),
    (MINIMAL + "\n[stitch]\n[stitch.args]\npublishRate = 0\n", r"\[stitch.args\] publishRate must be a finite number 0.01..1000"),
    (MINIMAL + "\n[stitch]\n", r"\[stitch.args\] objectShape \[H, W\] is required"),
    (MINIMAL + '\n[stitch]\n[stitch.args]\npositionsFile = "nope.npz"\n', r"\[stitch.args\] positionsFile 'nope.npz' is not a file"),
    (MINIMAL + '\n[hdf5]\n[hdf5.args]\noutputDirectory = "h"\ncompression = "zip"\n', r"\[hdf5.args\] compression must be one of"),
    (MINIMAL + '\n[hdf5]\n[hdf5.args]\noutputDirectory = "h"\nchunkFrames = 0\n', r"\[hdf5.args\] chunkFrames must be an integer"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        LaunchConfig.load(toml(tmp_path, text))


@pytest.mark.parametrize("make, message", [
    (lambda f: f.write(b"not frames"), r"is not a NumPy .npy file"),
    (lambda f: np.savez(f, frames=np.zeros((3, 4, 4))), r"is an .npz archive"),
    (lambda f: np.save(f, np.zeros((1, 4, 4), np.int16)), r"must hold frames \(n >= 2, height, width\).*shape \(1, 4, 4\)"),
    (lambda f: np.save(f, np.zeros((4, 8), np.int16)), r"must hold frames \(n >= 2, height, width\).*shape \(4, 8\)"),
    (lambda f: np.save(f, np.array([None, 1, 2], dtype=object)), r"not an array of frames"),
])
def test_a_bad_scan_is_refused_before_anything_starts(tmp_path, make, message):
    scan = tmp_path / "scan.npy"
    with open(scan, "wb") as f:
        make(f)
    with pytest.raises(ValueError, match=message):
        LaunchConfig.load(toml(tmp_path, MINIMAL.replace('channel = "det:image"', f'scan = "{scan}"')))


def test_the_scans_positions_are_the_stitchers_default(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((3, 4, 4), np.int16))
    np.savez(tmp_path / "s.npz", positions_px=np.zeros((3, 2)))
    cfg = LaunchConfig.load(toml(tmp_path, f'[source]\nscan = "{tmp_path / "s.npy"}"\n[inference]\n[stitch]\n'))
    assert cfg.stitch["args"]["positionsFile"] == str(tmp_path / "s.npz")


def test_defaults_are_not_shared_between_files(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((3, 4, 4), np.int16))
    np.savez(tmp_path / "s.npz", positions_px=np.zeros((3, 2)))
    LaunchConfig.load(toml(tmp_path, f'[source]\nscan = "{tmp_path / "s.npy"}"\n[inference]\n[stitch]\n'))
    cfg = LaunchConfig.load(toml(tmp_path, MINIMAL + '\n[stitch]\nmetadata_channels = ["pva://y", "pva://x"]\n'
                                             '[stitch.args]\nobjectShape = [200, 200]\n'))
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


MUTE_SERVER = """
import sys, time
import pvaccess as pva
server = pva.PvaServer(sys.argv[1], pva.PvObject({"value": pva.INT}, {"value": 7}))
print("up", flush=True)
time.sleep(120)
"""


def test_a_status_read_gives_up_on_a_server_that_stops_answering(pva_env):
    """A channel's setTimeout bounds only its connection: a get to a connected server that
    stops answering (here stopped with SIGSTOP) waited for ever, and the launcher with it,
    deaf to SIGTERM and Ctrl-C (their handlers run only once the get returns)."""
    name = f"{PREFIX}:launch:mute{os.getpid()}"
    server = subprocess.Popen([sys.executable, "-c", MUTE_SERVER, name], env=pva_env, text=True,
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        up = lines_until(server.stdout, lambda lines: lines[-1].strip() == "up", 30)
        assert up and up[-1].strip() == "up", "the server did not start"
        status = Status(timeout_s=0.5)
        assert wait_until(lambda: status.get(name), 20) == {"value": 7}
        os.kill(server.pid, signal.SIGSTOP)
        reads = []  # on a thread of the test's own: without the bound the read never returns
        reader = threading.Thread(target=lambda: reads.append((status.get(name), live.read_status(name, 0.5))),
                                  daemon=True)
        started = time.monotonic()
        reader.start()
        reader.join(20)
        assert reads == [(None, None)], "a status read did not give up on a server that stopped answering"
        assert time.monotonic() - started < 2 * live.answer_s(0.5) + 2
        assert name not in status._channels  # the next read searches afresh
    finally:
        server.kill()
        server.wait(10)


def _relative_chain(folder: Path) -> Path:
    """A chain file whose every path is relative, beside its scan and model, in ``folder``."""
    folder.mkdir()
    np.save(folder / "scan.npy", np.zeros((3, 128, 128), np.int16))  # the model's input size
    np.savez(folder / "scan.npz", positions_px=np.zeros((3, 2)))
    (folder / "m.onnx").symlink_to(MODEL)
    (folder / "m.json").symlink_to(MODEL.with_suffix(".json"))
    path = folder / "chain.toml"
    path.write_text(textwrap.dedent("""
        log_dir = "logs"
        [source]
        scan = "scan.npy"
        [inference]
        [inference.args]
        modelPath = "m.onnx"
        [stitch]
        [stitch.args]
        outputDirectory = "stitched"
        [hdf5]
        [hdf5.args]
        outputDirectory = "h5"
        modelCard = "m.json"
    """))
    return path


def test_paths_are_taken_from_where_you_launch(tmp_path):
    """--check from the file's folder passes and defaults the stitcher's positions to the
    scan's .npz there; from elsewhere the same relative paths are not found."""
    cfg = _relative_chain(tmp_path / "run")
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", "launch", "chain.toml", "--check"],
                          capture_output=True, text=True, cwd=tmp_path / "run", timeout=120)
    assert done.returncode == 0, done.stderr
    checked = json.loads(done.stdout)
    assert checked["base"] == str(tmp_path / "run") and checked["stitch"]["args"]["positionsFile"] == "scan.npz"
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", "launch", str(cfg), "--check"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "scan 'scan.npy' is not a file" in done.stderr


def test_the_chains_processes_run_where_you_launch(tmp_path, monkeypatch):
    """Every process starts in the launch directory (relative paths in its arguments are
    the user's), with its log in the relative log_dir there."""
    _relative_chain(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")
    chain = launch.Chain(LaunchConfig.load(Path("chain.toml")), out=io.StringIO())
    proc = chain._start("where", [sys.executable, "-c", "import os; print(os.getcwd())"])
    assert proc.wait(30) == 0
    assert proc.log_path == tmp_path / "run" / "logs" / "where.log"
    assert proc.log().strip() == str(tmp_path / "run")


def test_check_prints_the_validated_file(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", "launch", str(toml(tmp_path, MINIMAL)), "--check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["inference"]["consumers"] == 3
    done = subprocess.run([sys.executable, "-m", "edge_ptychonn.cli", "launch", str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_only_this_runs_stitched_image_is_reported(tmp_path):
    """An image an earlier run left in the output folder is not scored as this run's."""
    np.save(tmp_path / "s.npy", np.zeros((3, 4, 4), np.int16))
    np.savez(tmp_path / "s.npz", positions_px=np.zeros((3, 2)))
    out = tmp_path / "stitched"
    out.mkdir()
    cfg = LaunchConfig.load(toml(tmp_path, f'[source]\nscan = "{tmp_path / "s.npy"}"\n[inference]\n'
                                           f'[stitch]\n[stitch.args]\noutputDirectory = "{out}"\n'))
    started = time.time()
    for name in ("stitch_scan0002.npy", "stitch_scan0002_weight.npy"):  # an earlier run's second scan
        np.save(out / name, np.zeros((4, 4), np.float32))
        os.utime(out / name, (started - 3600, started - 3600))
    assert launch.accuracy(cfg, since=started) == []
    np.save(out / "stitch_scan0001.npy", np.zeros((4, 4), np.float32))  # this run's only scan
    assert launch.accuracy(cfg, since=started) == [f"final stitched image  {out / 'stitch_scan0001.npy'}"]


def test_last_errors_finds_the_traceback():
    log = "INFO started\nTraceback (most recent call last):\n  File x\nValueError: batchSize must be 1..256\nINFO parent waits\n"
    assert last_errors(log).splitlines()[0] == "Traceback (most recent call last):"
    assert "ValueError: batchSize" in last_errors(log)
    # what the PvaPy parent logs after its consumer failed is not the reason (before: 15 lines of it)
    spam = "".join(f"2026-01-01 MpDataConsumerController ERROR: No stats received from consumer {i % 2 + 1}\n"
                   for i in range(40))
    assert last_errors(log + spam).splitlines()[-1] == "ValueError: batchSize must be 1..256"
    assert last_errors("a\nERROR: cannot connect\nb\n") == "ERROR: cannot connect"
    # not the statistics PvaPy logs, whose keys hold "error" (before: every such line)
    assert last_errors("{'errorRate': 0.0Hz, 'nErrors': 0}\n'nInferenceErrors': 0,\nERROR: cannot connect\n") \
        == "ERROR: cannot connect"
    assert last_errors("") == "(the log is empty)"


def test_a_silent_status_channel_is_reported_with_its_logs_errors(tmp_path):
    """A consumer whose processor failed while its PvaPy parent lives on answers nothing:
    the launcher says why, from the log, instead of only that nothing answered. (One consumer: with
    several, a parent with none left and a traceback is reported at once, see below.)"""
    cfg = LaunchConfig.load(toml(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n'
                                 + MINIMAL.replace("consumers = 3", "consumers = 1")))
    chain = launch.Chain(cfg, out=io.StringIO())
    code = ("import sys, time\nprint('Traceback (most recent call last):')\n"
            "print('ValueError: batchSize must be an integer 1..256, got 8.5', flush=True)\ntime.sleep(60)")
    proc = chain._start("inference", [sys.executable, "-c", code])
    try:
        assert wait_until(lambda: "ValueError" in proc.log(), 20)
        with pytest.raises(RuntimeError) as error:
            chain._wait_answering({f"{PREFIX}:silent{os.getpid()}:status": proc}, timeout_s=0.5)
    finally:
        chain.stop()
    assert "within 0 s" in str(error.value) and str(proc.log_path) in str(error.value)
    assert "ValueError: batchSize must be an integer 1..256, got 8.5" in str(error.value)


def test_a_chain_that_cannot_start_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    def start(self):
        raise OSError("No space left on device")

    monkeypatch.setattr(launch.Chain, "start", start)
    cfg = LaunchConfig.load(toml(tmp_path, MINIMAL))
    assert launch.run(cfg) == 2
    assert capsys.readouterr().err == "edge-ptychonn launch: No space left on device\n"


def test_a_process_that_exits_while_the_chain_runs_makes_exit_status_1(tmp_path, monkeypatch, capsys):
    import sys as _sys

    def start(self):
        self._start("inference", [_sys.executable, "-c", "import time; time.sleep(60)"])
        self._start("stitch", [_sys.executable, "-c", "raise SystemExit(3)"])  # dies at once

    monkeypatch.setattr(launch.Chain, "start", start)
    monkeypatch.setattr(launch.Chain, "snapshot", lambda self: launch.Snapshot([], None, []))
    cfg = LaunchConfig.load(toml(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL))
    assert launch.run(cfg) == 1  # no frames were counted lost (a detector chain), yet a part failed
    assert "stitch exited (code 3); stopping" in capsys.readouterr().err  # a failure: on stderr


def test_a_chain_that_failed_as_it_started_says_why_on_stderr(tmp_path, monkeypatch, capsys):
    """A process of the chain that exits while it starts (or a status channel that never answers):
    exit status 1 with the reason. Before: the reason went to stdout, with the status lines, and a
    user who kept those in a file (or a pipe) saw only the exit status."""
    def start(self):
        raise RuntimeError("inference exited (code 1):\nValueError: batchSize must be 1..256")

    monkeypatch.setattr(launch.Chain, "start", start)
    monkeypatch.setattr(launch.Chain, "snapshot", lambda self: Snapshot([], None, []))
    assert launch.run(LaunchConfig.load(toml(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL))) == 1
    out, err = capsys.readouterr()
    assert err.startswith("edge-ptychonn launch: inference exited (code 1):\nValueError: batchSize"), err
    assert "exited" not in out, out


def test_a_process_slow_to_stop_is_named_as_the_launcher_waits_on(tmp_path, monkeypatch):
    """Stopping is bounded (SIGINT, then SIGTERM, SIGKILL), and a second Ctrl-C is ignored while it
    runs. Before: a process that did not stop on SIGINT kept the user waiting without a word of
    what for; now each harder signal is said, on stderr."""
    monkeypatch.setitem(launch.STOP_GRACE_S, "", 0.2)
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL)
    out, err = io.StringIO(), io.StringIO()
    chain = launch.Chain(cfg, out=out, err=err)
    deaf = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)"
    proc = chain._start("inference", [sys.executable, "-c", deaf])
    try:
        assert wait_until(lambda: "up" in proc.log(), 30)
        chain.stop()
    finally:
        proc.stop(grace_s=0)
    assert re.search(rf"inference \(pid {proc.pid}\) did not stop within 0.2 s of SIGINT \(state [A-Z], [0-9.]+ s CPU "
                     r"since\): SIGTERM", err.getvalue()), err.getvalue()
    assert f"stopped inference pid {proc.pid:<7} exit -15" in out.getvalue(), out.getvalue()


def test_the_clients_are_stopped_at_once_after_inference(tmp_path):
    """The clients (stitcher, writers, viewer) each take seconds to stop (PvaPy's collector waits 5 s
    for its clients; a writer writes what is queued) and need nothing of each other: the launcher
    stops them all at once, after inference (before: one after the other). Each client here
    exits 0 only when the other has got its SIGINT too (else 3 after 10 s): stopped in turn,
    the first would wait out its 10 s and exit 3."""
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL.replace("consumers = 3", "consumers = 1"))
    out = io.StringIO()
    chain = launch.Chain(cfg, out=out, err=io.StringIO())
    client = ("import pathlib, signal, sys, time\n"
              "me, peer = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
              "def stop(*_):\n"
              "    me.touch()\n"
              "    deadline = time.monotonic() + 10\n"
              "    while not peer.exists():\n"
              "        if time.monotonic() > deadline:\n"
              "            sys.exit(3)\n"
              "        time.sleep(0.02)\n"
              "    sys.exit(0)\n"
              "signal.signal(signal.SIGINT, stop)\n"
              "print('up', flush=True)\n"
              "while True:\n"
              "    time.sleep(1)\n")
    a, b = tmp_path / "a.stopping", tmp_path / "b.stopping"
    started = [chain._start("inference", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]),
               chain._start("stitch", [sys.executable, "-c", client, str(a), str(b)]),
               chain._start("viewer", [sys.executable, "-c", client, str(b), str(a)])]
    try:
        assert wait_until(lambda: all("up" in p.log() for p in started), 30)
        chain.stop()
    finally:
        for proc in started:
            live.Proc.stop(proc, grace_s=0)
    stopped = [ln.split() for ln in out.getvalue().splitlines() if ln.startswith("stopped ")]
    assert [ln[1] for ln in stopped][:1] == ["inference"], out.getvalue()
    assert sorted((ln[1], ln[-1]) for ln in stopped[1:]) == [("stitch", "0"), ("viewer", "0")], out.getvalue()


def test_every_client_is_stopped_when_stopping_one_raises(tmp_path, monkeypatch):
    """A client whose stop raises (an OSError from /proc, say) does not leave the others running:
    they are stopped all the same, and the error is raised after."""
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL.replace("consumers = 3", "consumers = 1"))
    out = io.StringIO()
    chain = launch.Chain(cfg, out=out, err=io.StringIO())
    started = [chain._start(name, [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"])
               for name in ("inference", "stitch", "viewer")]
    try:
        assert wait_until(lambda: all("up" in p.log() for p in started), 30)
        monkeypatch.setattr(started[1], "stop", lambda grace_s, say: (_ for _ in ()).throw(OSError("no /proc")))
        with pytest.raises(OSError, match="no /proc"):
            chain.stop()
        assert not started[0].running() and not started[2].running()
        assert "stopped viewer" in out.getvalue() and "stopped stitch" not in out.getvalue()
    finally:
        for proc in started:
            live.Proc.stop(proc, grace_s=0)


def test_a_process_that_outlives_sigkill_is_named_not_waited_for(tmp_path, monkeypatch):
    """A process stuck in the kernel outlives SIGKILL (Proc.stop gives up on it, returning None).
    Before: the launcher waited for it for ever; now it says which one and goes on."""
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL)
    out, err = io.StringIO(), io.StringIO()
    chain = launch.Chain(cfg, out=out, err=err)
    proc = chain._start("inference", [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setattr(proc, "stop", lambda grace_s, say: None)
        chain.stop()
        assert f"could not stop inference pid {proc.pid}: still there {live.KILL_WAIT_S:g} s after SIGKILL" in err.getvalue()
        assert "stopped inference" not in out.getvalue()
    finally:
        live.Proc.stop(proc, grace_s=0)


def test_settling_after_ctrl_c_says_what_it_waits_for(tmp_path, monkeypatch):
    """Ctrl-C mid-replay: the launcher waits (up to SETTLE_S) for the frames already sent to go
    through before it stops the chain. Before: it waited without a word after "interrupted"."""
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL)
    out = io.StringIO()
    chain = launch.Chain(cfg, out=out, err=io.StringIO())
    chain.source = chain._start("sim", [sys.executable, "-c", "print('Published frames:     10 @ 5 fps')"])
    assert chain.source.wait(30) == 0
    monkeypatch.setattr(launch.Chain, "snapshot", lambda self: Snapshot([_record(2)] * 3, None, []))
    monkeypatch.setattr(launch.Chain, "quiet_s", lambda self: 0.2)
    snap = chain.settle(timeout_s=5)
    assert snap.processed() == 6
    said = out.getvalue()
    assert said.count("waiting up to 5 s for the 10 frames the sim server sent to go through the chain "
                      "(6 taken by every stage so far)") == 1, said


LAUNCHER_LIKE = """
import sys, time
from edge_ptychonn.tools import launch

class Chain(launch.Chain):  # the real run() and stop(); sleepers for the processes
    def start(self):
        for name in ("inference", "stitch", "hdf5"):
            self._start(name, [sys.executable, "-c", "import time; time.sleep(120)"])
        print("up", flush=True)

    def watch(self):
        while True:
            time.sleep(0.1)

    def snapshot(self):  # no status channels: every one silent
        return launch.Snapshot([None] * self.cfg.inference['consumers'], None, [])

launch.Chain = Chain
sys.exit(launch.run(launch.LaunchConfig.load(sys.argv[1])))
"""


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_launch_stops_its_processes_when_its_session_closes(tmp_path, sig):
    """SIGHUP (the ssh session closed) stops the chain as SIGTERM and Ctrl-C do."""
    cfg = toml(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL)
    parent = subprocess.Popen([sys.executable, "-c", LAUNCHER_LIKE, str(cfg)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    try:  # "up" once the three are started
        lines = lines_until(parent.stdout, lambda lines: lines[-1].strip() == "up", 60)
        assert lines and lines[-1].strip() == "up", "".join(lines)
        os.kill(parent.pid, sig)
        out, _ = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    text = "".join(lines) + out
    assert parent.returncode == 130, text
    assert "interrupted: stopping everything" in text
    stopped = [ln.split()[1] for ln in text.splitlines() if ln.startswith("stopped ")]
    assert stopped[0] == "inference" and sorted(stopped[1:]) == ["hdf5", "stitch"], text  # the clients at once
    assert pids_alive(text) == []


# ---------------------------------------------------------------- end to end


def _simulated_scan(path: Path, n: int):
    from edge_ptychonn.science.simulate import ScanSettings, save_scan, simulate_scan

    training = json.loads(MODEL.with_suffix(".json").read_text())["training"]["scan_settings"]
    settings = ScanSettings.from_dict({**ScanSettings().to_dict(), **training, "seed": 4242, "n_positions": n})
    frames, truth = simulate_scan(settings, progress=False)
    save_scan(path, frames, truth)
    return frames, truth


def _launch_to_end(cfg: Path, env: dict, timeout_s: float = 150) -> tuple[str, int]:
    """``edge-ptychonn launch cfg`` run to its end: its output and exit status (killed, with
    everything in its session, if it outlives ``timeout_s``: TimeoutExpired)."""
    launch = subprocess.Popen([sys.executable, "-m", "edge_ptychonn.cli", "launch", str(cfg)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = launch.communicate(timeout=timeout_s)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait(30)
    return out, launch.returncode


@pytest.mark.e2e
def test_launch_runs_a_small_chain_to_the_end(pva_env, tmp_path):
    h5py = pytest.importorskip("h5py")
    from edge_ptychonn.science.metrics import score_phase
    from edge_ptychonn.science.stitch import Stitcher, probe_weight
    from edge_ptychonn.stream.config import parse_processor_args
    from edge_ptychonn.stream.preprocess import preprocess
    from edge_ptychonn.stream.postprocess import apply_output_mask
    from engines import EngineOptions, create_engine

    n = 64  # twice the collector cache (2 consumers x 2 x 8): no frame waits its 5 s release at the end
    frames, truth = _simulated_scan(tmp_path / "scan", n)
    tag = f"{PREFIX}-lt"
    # launched from tmp_path with relative paths: the stitcher finds scan.npz there, the files land there
    cfg = toml(tmp_path, f"""
log_dir = "logs"
idle_s = 6.5
timeout_s = 100
[source]
scan = "scan.npy"
channel = "{tag}:image"
fps = 40
start_delay_s = 14  # five clients find their channels (seen up to 9 s after the sim server started)
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
outputDirectory = "stitched"
[hdf5]
prefix = "{tag}:hdf5"
[hdf5.args]
outputDirectory = "h5"
flushPeriod = 0.2
chunkFrames = 4
modelCard = "{MODEL.with_suffix('.json')}"
""")
    launch = subprocess.Popen([sys.executable, "-m", "edge_ptychonn.cli", "launch", cfg.name], cwd=tmp_path, env=pva_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []  # a SWMR reader follows consumer 1's file while it grows
    try:
        deadline = time.monotonic() + 60
        file = tmp_path / "h5" / f"{tag}_inference_1_output_scan0001.h5"
        while not file.exists() and time.monotonic() < deadline and launch.poll() is None:
            time.sleep(0.2)
        if not file.exists():
            os.killpg(launch.pid, signal.SIGTERM)
            pytest.fail(f"no HDF5 file appeared; the launcher's output:\n{launch.communicate(timeout=60)[0][-4000:]}")
        with h5py.File(file, "r", libver="latest", swmr=True) as f:
            while launch.poll() is None and time.monotonic() < deadline and (not seen or seen[-1] < 25):
                f["uniqueId"].refresh()
                seen.append(f["uniqueId"].shape[0])
                time.sleep(0.1)
        out, _ = launch.communicate(timeout=90)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGTERM)
            try:
                launch.wait(30)
            except subprocess.TimeoutExpired:  # a launcher that hangs in its stop: nothing may outlive the test
                os.killpg(launch.pid, signal.SIGKILL)
                launch.wait(30)
    print(out[-2500:])
    assert launch.returncode == 0, out[-4000:]
    assert len(set(seen)) > 1 and seen[-1] > seen[0], f"the SWMR reader did not see the file grow: {seen}"
    assert pids_alive(out) == [], "launch left processes running"

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
    assert "stitch_scan0001.npy: SSIM" in out, out[-2500:]  # this run's image, scored against the truth


@pytest.mark.e2e
def test_launch_stops_everything_on_sigterm(pva_env, tmp_path, small_model):
    tag = f"{PREFIX}-ls"
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
    try:  # two status lines: everything is up
        lines = lines_until(launch.stdout, lambda lines: sum(" | inference " in ln for ln in lines) >= 2, 60)
        assert sum(" | inference " in ln for ln in lines) >= 2, "".join(lines)
        os.kill(launch.pid, signal.SIGTERM)  # the launcher alone: it owns and stops the rest
        out, _ = launch.communicate(timeout=60)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    text = "".join(lines) + out
    assert "interrupted: stopping everything" in text, text[-3000:]
    stopped = [ln.split()[1] for ln in text.splitlines() if ln.startswith("stopped ")]
    logs = "".join(f"\n--- {log.name} (end)\n{log.read_text(errors='replace')[-2500:]}"
                   for log in sorted((tmp_path / "logs").glob("*.log")) if log.stem not in stopped)
    assert stopped[:1] == ["inference"] and sorted(stopped[1:]) == ["hdf5", "stitch"], text[-3000:] + logs
    assert pids_alive(text) == []


def load(tmp_path: Path, text: str) -> LaunchConfig:
    return LaunchConfig.load(toml(tmp_path, text))


# -- checks of the file that the chain could not run with, and the counts after an early stop --

@pytest.mark.parametrize("text, message", [
    # nan never compares (the replay would never be seen idle); inf never ends; the sim server
    # takes -fps nan as "as fast as it can"
    ("idle_s = nan\n" + MINIMAL, r"'idle_s' in the top level must be a finite number, got nan"),
    ("timeout_s = inf\n" + MINIMAL, r"'timeout_s' in the top level must be a finite number, got inf"),
    (MINIMAL.replace('channel = "det:image"', "fps = nan"), r"'fps' in \[source\] must be a finite number"),
    (MINIMAL.replace('channel = "det:image"', "start_delay_s = inf"), r"'start_delay_s' in \[source\] must be a finite"),
    (MINIMAL.replace('channel = "det:image"', "start_delay_s = 1e300"), r"start_delay_s 0..600 s"),
    # a period beyond Python's longest wait failed the sim server's timer thread, and the chain never ended
    (MINIMAL.replace('channel = "det:image"', "fps = 1e-11"), r"\[source\] fps must be >= 0.001"),
    # two stages on one prefix publish the same channel names (two servers, one name)
    (MINIMAL + '\n[hdf5]\nprefix = "inference"\n[hdf5.args]\noutputDirectory = "h"\n',
     r"\[inference\] and \[hdf5\] have the same prefix 'inference'"),
    (MINIMAL + '\n[stitch]\nprefix = "inference"\n[stitch.args]\nobjectShape = [9, 9]\n',
     r"\[inference\] and \[stitch\] have the same prefix 'inference'"),
    (MINIMAL.replace('"det:image"', '"inference:1:output"'), r"\[source\] channel 'inference:1:output' is among"),
    (MINIMAL.replace("consumers = 3", 'prefix = "a:*"'), r"\[inference\] prefix 'a:\*' must not hold '\*'"),
    # before: accepted by --check; PvaPy's consumers then failed to make or run the processor
    (MINIMAL.replace("consumers = 3", 'processor = "os.path"'), r"\[inference\] processor 'os.path' is not a class"),
    (MINIMAL.replace("consumers = 3", 'processor = "json.JSONDecoder"'),
     r"\[inference\] processor 'json.JSONDecoder' is a class without a process\(pv\) method"),
    # before: accepted; 1e11 frames in turn starves every consumer but the first, 1e300 s idle never ends
    (MINIMAL.replace("consumers = 3", "distributor_updates = 100000000000"),
     r"'distributor_updates' in \[inference\] must be <= 256, got 100000000000: each consumer takes"),
    ("idle_s = 1e300\n" + MINIMAL, r"'idle_s' in the top level must be <= 3600, got 1e\+300: a replayed chain"),
    # before: an OverflowError traceback (an integer no float holds); 1e12 is accepted, as good as 0
    (f"timeout_s = {10**400}\n" + MINIMAL, r"'timeout_s' in the top level must be a finite number, got an integer "
                                           r"beyond the largest float"),
    (MINIMAL.replace('channel = "det:image"', f"fps = {10**400}"), r"'fps' in \[source\] must be a finite number"),
])
def test_numbers_and_channel_names_the_chain_cannot_run_with_are_refused(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load(tmp_path, text)


@pytest.mark.parametrize("device", ["cuda", "cuda:0,1"])
def test_a_gpu_asked_for_on_a_host_without_an_nvidia_driver_is_refused(tmp_path, monkeypatch, device):
    """Before: --check passed, and every consumer then failed at start (exit status 1)."""
    from edge_ptychonn import devices

    monkeypatch.setattr(devices, "NVIDIA_DRIVER_PATHS", (str(tmp_path / "no-driver"),))
    text = MINIMAL + f'device = "{device}"\n'
    with pytest.raises(ValueError, match=rf"^\[inference.args\] device '{device}' asks for an NVIDIA GPU, but this "
                                         r"host has no NVIDIA driver: give 'auto' \(the CPU here\) or 'cpu'$"):
        load(tmp_path, text)
    assert load(tmp_path, text.replace(device, "auto")).inference["args"]["device"] == "auto"


def test_distinct_prefixes_and_a_source_named_like_a_stage_are_accepted(tmp_path):
    cfg = load(tmp_path, MINIMAL.replace('"det:image"', '"inference:raw"')
               + '\n[stitch]\n[stitch.args]\nobjectShape = [9, 9]\n[hdf5]\n[hdf5.args]\noutputDirectory = "h"\n')
    assert (cfg.source["channel"], cfg.stitch["prefix"], cfg.hdf5["prefix"]) == ("inference:raw", "stitch", "hdf5")


@pytest.mark.parametrize("table", ["stitch", "hdf5"])
def test_an_output_directory_that_is_a_file_is_refused_in_one_line(tmp_path, table):
    """Before: --check passed, and the writer's consumer died at start with a traceback; also
    for a folder to be made under a file."""
    (tmp_path / "taken").write_text("a file")
    extra = "objectShape = [9, 9]\n" if table == "stitch" else ""
    for folder in (tmp_path / "taken", tmp_path / "taken" / "run5"):
        with pytest.raises(ValueError, match=rf"\[{table}.args\] outputDirectory '.*taken.*' cannot be used: "
                                             rf".*taken is a file, not a folder"):
            load(tmp_path, MINIMAL + f'\n[{table}]\n[{table}.args]\n{extra}outputDirectory = "{folder}"\n')


def test_a_log_dir_that_cannot_be_made_is_refused_by_check(tmp_path):
    """Before: --check passed a log_dir that is a file (or lies under one); the launch then failed
    as it started its first process."""
    (tmp_path / "taken").write_text("a file")
    for folder in (tmp_path / "taken", tmp_path / "taken" / "logs"):
        with pytest.raises(ValueError, match=rf"log_dir '.*taken.*' cannot be used: .*taken is a file, not a folder"):
            load(tmp_path, f'log_dir = "{folder}"\n' + MINIMAL)
    assert load(tmp_path, f'log_dir = "{tmp_path / "new" / "logs"}"\n' + MINIMAL).log_dir == tmp_path / "new" / "logs"
    assert not (tmp_path / "new").exists()  # checked, not made


def test_a_home_folder_in_log_dir_and_scan_is_expanded(tmp_path, monkeypatch):
    """Before: a TOML file is no shell, and "~/..." made a folder named "~" in the launch directory
    (the processors' own paths in the same file take "~" as the home folder)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "scan.npy", np.zeros((2, 8, 8), np.int16))
    cfg = load(tmp_path, 'log_dir = "~/logs"\n' + MINIMAL.replace('channel = "det:image"', 'scan = "~/scan.npy"'))
    assert cfg.log_dir == tmp_path / "logs" and cfg.source["scan"] == str(tmp_path / "scan.npy")


def test_a_file_name_format_with_a_folder_is_refused(tmp_path):
    """Before: accepted, and every frame was lost (no file could be created in a folder that
    does not exist)."""
    with pytest.raises(ValueError, match=r"fileNameFormat .* must name a file in outputDirectory"):
        load(tmp_path, MINIMAL + '\n[hdf5]\n[hdf5.args]\noutputDirectory = "h"\n'
                                 'fileNameFormat = "{channel}/scan{scan:04d}.h5"\n')


STITCH = "[stitch]\n[stitch.args]\nobjectShape = [64, 64]\n"  # stages of a chain file
HDF5 = '[hdf5]\n[hdf5.args]\noutputDirectory = "h"\n'


def _replay_config(tmp_path, n_frames: int, consumers: int = 3, idle: bool = False, stages: str = ""):
    """MINIMAL's chain replaying a scan of ``n_frames`` 4x4 frames (``tmp_path/s.npy``) with
    ``consumers`` inference consumers, its logs in ``tmp_path/logs``, ``idle_s = 0`` if ``idle``,
    and the chain file's further ``stages`` (TOML)."""
    scan = tmp_path / "s.npy"
    np.save(scan, np.zeros((n_frames, 4, 4), np.int16))
    return load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + ("idle_s = 0\n" if idle else "")
                + MINIMAL.replace('channel = "det:image"', f'scan = "{scan}"').replace(
                    "consumers = 3", f"consumers = {consumers}") + stages)


def _record(processed: int) -> dict:
    return {"userStats": {"nFramesProcessed": processed}}


def test_the_summary_keeps_the_last_answer_of_a_consumer_that_went_silent(tmp_path, monkeypatch):
    """A consumer that died after publishing its frames: the summary counts what it reported
    (before: only the survivors' frames were "processed")."""
    cfg = _replay_config(tmp_path, 3, idle=True)
    answers = iter([[_record(1), _record(2)], [_record(1), _record(2)], [_record(1), None]])
    last = [[_record(1), None]]
    monkeypatch.setattr(launch.Chain, "snapshot",
                        lambda self: Snapshot(next(answers, last[0]), None, []))
    chain = launch.Chain(cfg, out=io.StringIO())
    chain.source = chain._start("sim", [sys.executable, "-c", "pass"])  # the replay is over
    chain.source.wait(30)
    snap = chain.watch()
    assert snap.processed() == 3 and chain.finished


def test_the_status_line_keeps_a_silent_stages_last_counts_and_marks_it(tmp_path, monkeypatch):
    """A collector killed, one of two consumers killed: the status line keeps their last counts
    and marks the stage silent, with how long. Before: "stitch 0 placed, ... scan 0" and
    "inference 100 frames" (the survivor's only), then "| 2 status channel(s) silent"."""
    cfg = _replay_config(tmp_path, 3, consumers=2, idle=True, stages=STITCH)
    inference = [{"userStats": {"nFramesProcessed": 100, "frameRate": 20.0}},
                 {"userStats": {"nFramesProcessed": 88, "frameRate": 20.0}}]
    stitch = {"userStats": {"nFramesPlaced": 188, "nFramesReceived": 188, "nScans": 1, "coverage": 0.4}}
    answers = iter([Snapshot(inference, stitch, []), Snapshot(inference, stitch, [])])
    monkeypatch.setattr(launch.Chain, "snapshot",
                        lambda self: next(answers, Snapshot([inference[0], None], None, [])))
    monkeypatch.setattr(launch, "REPORT_PERIOD_S", 0.5)  # the chain falls idle sooner
    monkeypatch.setattr(launch, "COLLECTOR_RELEASE_S", 0.5)
    out = io.StringIO()
    chain = launch.Chain(cfg, out=out)
    chain.source = chain._start("sim", [sys.executable, "-c", "pass"])  # the replay is over
    chain.source.wait(30)
    snap = chain.watch()
    lines = out.getvalue().splitlines()[1:]  # after "started sim ..."
    assert "silent" not in lines[0] and "stitch 188 placed, cover 40%" in lines[0], lines
    assert len(lines) >= 3, lines
    for line in lines[1:]:
        assert re.search(r"\| inference \(1 of 2 silent \d+ s\) 188 frames \(20/s, ", line), line
        assert re.search(r"\| stitch \(silent \d+ s\) 188 placed, cover 40%, no position 0, scan 1, ", line), line
    assert re.search(r"silent ([1-9]|\d\d) s", lines[-1]), lines  # counted from its last answer
    assert snap.processed() == 188 and snap.placed() == 188


def _finished_replay(monkeypatch, snap: Snapshot, n_sent: int):
    """``launch.run`` as if a replay of ``n_sent`` frames went through the chain and fell idle
    with ``snap`` as its last status, nothing started and nothing failed."""

    def watch(self):
        self.finished = True
        return snap

    monkeypatch.setattr(launch.Chain, "start", lambda self: None)
    monkeypatch.setattr(launch.Chain, "watch", watch)
    monkeypatch.setattr(launch.Chain, "frames_sent", lambda self, n_scan: n_sent)
    monkeypatch.setattr(launch.Chain, "stitcher_final", lambda self: {})


def test_frames_the_stitchers_collector_lost_make_exit_status_1_and_the_verdict_says_where(
        tmp_path, monkeypatch, capsys):
    """Every frame written, but 26 never reached the stitcher (a consumer lagged beyond the
    collector's cache): exit status 1, and the summary's verdict names the collector. Before:
    "collector lost 26" on a line of its own, "frames lost 0" and exit status 0."""
    cfg = _replay_config(tmp_path, 200, consumers=1, stages=STITCH + HDF5)
    stitch = {"userStats": {"nFramesPlaced": 174, "nFramesReceived": 174},
              "collectorStats": {"nMissed": 20, "nRejected": 6}}
    writers = [{"userStats": {"nFramesWritten": 200}}]
    _finished_replay(monkeypatch, Snapshot([_record(200)], stitch, writers), 200)
    assert launch.run(cfg) == 1
    out = capsys.readouterr().out
    assert "collector lost       26 (missed + rejected)\nframes lost          0\n" in out, out
    assert "verdict              frames lost: 26 never reached the stitcher (its collector missed or rejected " \
           "them)\n" in out, out
    # lost on the way to the files too: both places named; nothing lost anywhere: exit status 0
    writers[0]["userStats"]["nFramesWritten"] = 190
    assert launch.run(cfg) == 1
    assert "verdict              frames lost: 10 of the 200 sent did not reach the HDF5 files; 26 never reached " \
           "the stitcher" in capsys.readouterr().out
    writers[0]["userStats"]["nFramesWritten"] = 200
    stitch.update({"userStats": {"nFramesPlaced": 200, "nFramesReceived": 200}, "collectorStats": {}})
    assert launch.run(cfg) == 0
    assert "frames lost          0\nverdict              no frame lost\n" in capsys.readouterr().out


def test_frames_dropped_by_inference_are_not_counted_again_as_the_collectors(tmp_path, monkeypatch, capsys):
    """A demo on a loaded machine: inference dropped 131 of 1024 (overload), the stitcher received
    every frame it published (893 of 893), and PvaPy's collector counted 3 gaps that those drops
    left in the uniqueIds. Before: "verdict ... 3 never reached the stitcher (its collector missed
    or rejected them)", frames counted twice and blamed on the collector."""
    cfg = _replay_config(tmp_path, 1024, consumers=1, stages=STITCH + HDF5)
    inference = _record(893)
    inference["userStats"]["nFramesDropped"] = 131
    stitch = {"userStats": {"nFramesPlaced": 893, "nFramesReceived": 893}, "collectorStats": {"nMissed": 3, "nRejected": 0}}
    writers = [{"userStats": {"nFramesWritten": 893}}]
    _finished_replay(monkeypatch, Snapshot([inference], stitch, writers), 1024)
    assert launch.run(cfg) == 1  # a real loss: 131 frames
    out = capsys.readouterr().out
    assert "collector lost       3 (missed + rejected; 3 of them dropped or refused by inference, not lost by the " \
           "collector)\n" in out, out
    assert "verdict              frames lost: 131 of the 1024 sent did not reach the HDF5 files (131 dropped by " \
           "inference)\n" in out, out
    # the collector's own loss still shows beside upstream drops: 5 published frames never received
    stitch.update({"userStats": {"nFramesPlaced": 888, "nFramesReceived": 888}, "collectorStats": {"nMissed": 8}})
    assert launch.run(cfg) == 1
    assert "dropped by inference); 5 never reached the stitcher (its collector missed or rejected them)\n" \
        in capsys.readouterr().out


def test_frames_no_inference_output_carried_are_not_said_to_be_dropped_or_refused_by_inference(
        tmp_path, monkeypatch, capsys):
    """A SIGTERM (or SIGKILL) to one of two inference consumers mid-scan: 62 frames reached no
    output (not received by any consumer, or held by the one that exited), and inference
    dropped and refused none. Before: "collector lost 62 (missed + rejected; 62 of them dropped
    or refused by inference, not lost by the collector)", where inference said "dropped 0, bad 0"."""
    cfg = _replay_config(tmp_path, 400, consumers=2, stages=STITCH + HDF5)
    inference = [_record(248), _record(90)]
    stitch = {"userStats": {"nFramesPlaced": 338, "nFramesReceived": 338}, "collectorStats": {"nMissed": 62}}
    writers = [{"userStats": {"nFramesWritten": 248}}, {"userStats": {"nFramesWritten": 90}}]
    _finished_replay(monkeypatch, Snapshot(inference, stitch, writers), 400)
    assert launch.run(cfg) == 1
    out = capsys.readouterr().out
    assert "collector lost       62 (missed + rejected; 62 of them never published by inference (not received by " \
           "a consumer, or held by one that exited), not lost by the collector)\n" in out, out
    assert "dropped or refused" not in out, out
    assert "verdict              frames lost: 62 of the 400 sent did not reach the HDF5 files\n" in out, out
    # some dropped too: each count where it belongs
    inference[1]["userStats"]["nFramesDropped"] = 10
    assert launch.run(cfg) == 1
    assert "collector lost       62 (missed + rejected; 10 of them dropped or refused by inference and 52 never " \
           "published by inference (not received by a consumer, or held by one that exited), not lost by the " \
           "collector)\n" in capsys.readouterr().out


def test_statistics_reset_during_the_run_make_the_verdict_not_judged_and_exit_status_1(tmp_path, monkeypatch, capsys):
    """reset_stats on an inference consumer and a writer during a 600-frame replay (their last
    status in such a run): their totals restart, so frames cannot be counted lost or not.
    Before: "frames lost 206" and "206 of the 600 sent did not reach the HDF5 files", which held
    all 600."""
    cfg = _replay_config(tmp_path, 600, consumers=2, stages=HDF5)
    inference = [_record(392), _record(300)]
    inference[0]["userStats"]["nStatsResets"] = 1
    writers = [{"userStats": {"nFramesWritten": 94, "nStatsResets": 1}}, {"userStats": {"nFramesWritten": 300}}]
    _finished_replay(monkeypatch, Snapshot(inference, None, writers), 600)
    assert launch.run(cfg) == 1
    out = capsys.readouterr().out
    told = ("not judged: the statistics of inference 1, hdf5 1 were reset (reset_stats) during the run, so their "
            "totals do not count every frame\n")
    assert f"frames lost          {told}" in out and f"verdict              {told}" in out, out
    assert "did not reach" not in out, out
    for r in (inference[0], writers[0]):  # the same counts without the resets: judged, a loss
        r["userStats"]["nStatsResets"] = 0
    assert launch.run(cfg) == 1
    assert "verdict              frames lost: 206 of the 600 sent did not reach the HDF5 files\n" in capsys.readouterr().out


def test_the_summary_names_why_the_hdf5_writers_lost_frames_and_their_log(tmp_path, monkeypatch, capsys):
    """A full disk for the HDF5 folder (the two writers' last status in such a run): the summary
    gives the writers' losses by cause, their failed operations, and the log that says why.
    Before: "images written 1" and "frames lost 199", the causes only in the writers' log."""
    cfg = _replay_config(tmp_path, 200, consumers=2, stages=HDF5)
    writers = [{"userStats": {"nFramesWritten": 0, "nFramesLost": 96, "nLostWriteError": 96, "nLostNotQueued": 0,
                              "nLostStopping": 0, "nWriteErrors": 4}},
               {"userStats": {"nFramesWritten": 1, "nFramesLost": 103, "nLostWriteError": 103, "nLostNotQueued": 0,
                              "nLostStopping": 0, "nWriteErrors": 3}}]
    _finished_replay(monkeypatch, Snapshot([_record(96), _record(104)], None, writers), 200)
    assert launch.run(cfg) == 1
    out = capsys.readouterr().out
    assert (f"images written       1 (HDF5 files in h)\nwriters lost         199 (199 at write errors; 7 HDF5 "
            f"creates, writes, flushes or closes failed): their log {tmp_path / 'logs' / 'hdf5.log'} says why\n") \
        in out, out
    assert "frames lost          199\nverdict              frames lost: 199 of the 200 sent did not reach the HDF5 " \
           "files (199 lost by the writers: 'writers lost' above)\n" in out, out
    # every cause named; none: no such line
    writers[0]["userStats"].update(nLostWriteError=0, nLostNotQueued=90, nLostStopping=6, nWriteErrors=0)
    writers[1]["userStats"].update(nLostWriteError=0, nWriteErrors=0)
    assert "writers lost         96 (90 not queued (the writer's queue full or its thread gone); 6 not written at " \
           "stop; 0 HDF5" in "\n".join(launch.summary(cfg, Snapshot([_record(200)], None, writers), 200))
    writers[0]["userStats"].update(nLostNotQueued=0, nLostStopping=0)
    assert "writers lost" not in "\n".join(launch.summary(cfg, Snapshot([_record(200)], None, writers), 200))


def test_the_writer_loss_causes_are_the_hdf5_writers():
    """The summary names every cause the writer counts (nLost<Cause>), and only those."""
    from processors.hdf5_writer import LOSS_CAUSES, STATS

    assert set(launch.WRITER_LOSSES) == {f"nLost{c[0].upper()}{c[1:]}" for c in LOSS_CAUSES} < set(STATS)
    assert "nWriteErrors" in STATS


@pytest.mark.e2e
def test_a_replay_stopped_early_counts_what_the_sim_server_sent(pva_env, tmp_path, monkeypatch, capsys):
    """Ctrl-C while a real sim server replays: "frames sent" is what it published (not the
    scan's length) and the counts are taken once those frames went through, so nothing is
    called lost that was not. Before: "frames sent 40" and every unsent frame "lost"."""
    scan = tmp_path / "scan.npy"
    np.save(scan, np.arange(40 * 8 * 8, dtype=np.int16).reshape(40, 8, 8))
    channel = f"{PREFIX}:early{os.getpid()}:image"
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n'
               + MINIMAL.replace('channel = "det:image"', f'scan = "{scan}"\nchannel = "{channel}"'))
    seen = live.OutputCollector([channel], keep_images=False)  # stands in for the inference stage
    counted = []  # what each snapshot reported

    def start(self):
        self.source = self._start("sim", live.sim_server_argv(scan, channel, fps=10, start_delay_s=3))

    def watch(self):
        assert live.wait_until(lambda: seen.count() >= 5, 60), "the sim server published nothing"
        self.latest = self.snapshot()
        raise KeyboardInterrupt  # Ctrl-C mid-replay

    def snapshot(self):
        counted.append(seen.count())
        return Snapshot([_record(counted[-1])], None, [])

    monkeypatch.setattr(launch.Chain, "start", start)
    monkeypatch.setattr(launch.Chain, "watch", watch)
    monkeypatch.setattr(launch.Chain, "snapshot", snapshot)
    try:
        assert launch.run(cfg) == 130
    finally:
        seen.close()
    out = capsys.readouterr().out
    log = (tmp_path / "logs" / "sim.log").read_text()
    published = int(log.split("Published frames:")[1].split()[0])
    assert 5 <= published < 40, log
    assert f"frames sent          {published} (of 40 in the scan: the replay was stopped)" in out, out
    assert f"inference processed  {counted[-1]} " in out and counted[-1] == seen.count()
    assert f"frames lost          {published - seen.count()}\n" in out, out


@pytest.mark.e2e
def test_a_replay_whose_frames_are_all_refused_ends_and_reports_them_lost(pva_env, tmp_path, small_model):
    """Every frame of the replay refused by inference (bad frames: NaN pixels; frames of another
    size than the model's are refused before the chain starts): the launcher stops once the chain
    is idle after the replay, counts them lost, exit status 1. Before: it waited for a processed
    frame forever (no timeout_s: until Ctrl-C)."""
    scan = tmp_path / "scan.npy"
    np.save(scan, np.full((8, 64, 64), np.nan, np.float32))  # the model's size, every pixel NaN
    tag = f"{PREFIX}-lr"
    cfg = toml(tmp_path, f"""
log_dir = "{tmp_path / 'logs'}"
idle_s = 2
[source]
scan = "{scan}"
channel = "{tag}:image"
fps = 20
start_delay_s = 3
[inference]
consumers = 1
prefix = "{tag}:inference"
[inference.args]
modelPath = "{small_model}"
engine = "onnxruntime"
cpuThreads = 1
""")
    launch = subprocess.Popen([sys.executable, "-m", "edge_ptychonn.cli", "launch", str(cfg)], cwd=ROOT, env=pva_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = launch.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.kill(launch.pid, signal.SIGTERM)  # the launcher stops what it started
        out, _ = launch.communicate(timeout=60)
        pytest.fail("the launcher did not stop after the replay: " + out[-1500:])
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait(30)
    assert pids_alive(out) == [], "launch left processes running"
    assert launch.returncode == 1, out[-3000:]
    assert "frames sent          8\n" in out, out[-3000:]
    # bad frames are said to be bad, not dropped (the README keeps the two apart)
    assert "frames lost          8 (8 of them bad frames, refused by inference: its log says why)\n" in out, out[-3000:]
    assert "inference processed  0 (dropped 0, bad 8" in out and ", bad 8)" in out, out[-3000:]


def _small_stitch_chain(tmp_path, model, tag: str, n: int, fps: float, stitch: str = "", stitch_args: str = ""):
    """A launch file for a replay of ``n`` 64x64 frames (positions in a file) through one
    inference consumer and the stitcher; ``stitch``/``stitch_args``: more lines in those tables."""
    scan, positions = tmp_path / "scan.npy", tmp_path / "positions.npy"
    np.save(scan, np.random.default_rng(5).poisson(50, (n, 64, 64)).astype(np.int16))
    np.save(positions, np.stack(np.divmod(np.arange(n) * 6, 48), axis=1).astype(np.float64))
    return toml(tmp_path, f"""
log_dir = "{tmp_path / 'logs'}"
idle_s = 1
[source]
scan = "{scan}"
channel = "{tag}:image"
fps = {fps}
start_delay_s = 7  # the collector connects before frames flow (about 4 s after the sim server starts)
[inference]
consumers = 1
prefix = "{tag}:inference"
[inference.args]
modelPath = "{model}"
engine = "onnxruntime"
cpuThreads = 1
[stitch]
prefix = "{tag}:stitch"
{stitch}
[stitch.args]
positionsFile = "{positions}"
objectShape = [120, 120]
{stitch_args}
""")


def test_a_binary_file_is_refused_naming_it(tmp_path, capsys):
    """``edge-ptychonn launch scan.npy`` (the scan for the file). Before: only "'utf-8' codec
    can't decode byte 0x93 in position 0", naming no file."""
    np.save(tmp_path / "scan.npy", np.zeros((2, 4, 4), np.int16))
    assert launch.main(launch.get_args_parser().parse_args([str(tmp_path / "scan.npy")])) == 2
    err = capsys.readouterr().err
    assert err == f"edge-ptychonn launch: {tmp_path / 'scan.npy'} is not a TOML file (not UTF-8 text: byte 0)\n", err


def test_a_detector_chain_stopped_counts_a_silent_consumers_last_answer(tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM while a detector chain runs, one status channel silent at the last
    look (its consumer died, or its read gave up): the summary counts what it reported while
    the chain was watched. Before: only the consumers that answered last."""
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL)

    def watch(self):
        self.latest = Snapshot([_record(1), _record(2), _record(4)], None, [])
        raise KeyboardInterrupt

    monkeypatch.setattr(launch.Chain, "start", lambda self: None)
    monkeypatch.setattr(launch.Chain, "watch", watch)
    monkeypatch.setattr(launch.Chain, "snapshot", lambda self: Snapshot([_record(1), None, _record(4)], None, []))
    assert launch.run(cfg) == 130
    out = capsys.readouterr().out
    assert "inference processed  7 " in out, out


def test_a_chain_stopped_before_the_replay_started_sent_nothing(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the consumers start, before the sim server: nothing was sent, nothing lost.
    Before: the summary said "frames sent 40" and "frames lost 40"."""
    scan = tmp_path / "scan.npy"
    np.save(scan, np.zeros((40, 8, 8), np.int16))
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL.replace('channel = "det:image"', f'scan = "{scan}"'))

    def start(self):
        raise KeyboardInterrupt  # Ctrl-C while the inference consumers start

    monkeypatch.setattr(launch.Chain, "start", start)
    monkeypatch.setattr(launch.Chain, "snapshot", lambda self: Snapshot([_record(0)] * 3, None, []))
    assert launch.run(cfg) == 130
    out = capsys.readouterr().out
    assert "frames sent          0 (of 40 in the scan: the replay was stopped)" in out, out
    assert "frames lost          0\n" in out, out


@pytest.mark.e2e
def test_consumers_that_fail_at_start_are_reported_with_the_reason(pva_env, tmp_path):
    """Forked inference consumers whose engine cannot load the model (an ONNX model with the
    right input but an operator no engine has, which --check cannot see) exit; PvaPy's parent
    lives on. The launcher says so with the reason from the log. Before: it waited 90 s, then
    showed the parent's "No stats received" lines (or, had the status answered first, only
    "status channel(s) silent")."""
    import onnx
    from onnx import TensorProto, helper

    model = tmp_path / "model.onnx"
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 1, 64, 64]) for name in ("x", "phase"))
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["phase"])], "broken", [x], [y])
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), model)
    scan = tmp_path / "scan.npy"
    np.save(scan, np.ones((4, 64, 64), np.int16))
    tag = f"{PREFIX}-lf"
    cfg = toml(tmp_path, f"""
log_dir = "{tmp_path / 'logs'}"
idle_s = 1
[source]
scan = "{scan}"
channel = "{tag}:image"
fps = 20
start_delay_s = 2
[inference]
consumers = 2
prefix = "{tag}:inference"
[inference.args]
modelPath = "{model}"
engine = "onnxruntime"
cpuThreads = 1
""")
    t0 = time.monotonic()
    out, returncode = _launch_to_end(cfg, pva_env)
    assert pids_alive(out) == [], "launch left processes running"
    assert returncode == 1, out[-3000:]
    assert "No Op registered for NoSuchOp" in out, out[-3000:]
    assert time.monotonic() - t0 < 75, out[-3000:]  # not the 90 s wait for a status channel


def test_no_viewer_is_started_without_a_display_and_the_launcher_says_so(tmp_path, monkeypatch):
    """[viewer] on a host without a display. Before: the viewer was started, c2dv's Qt aborted
    at once, and the launcher said nothing (no window, no line)."""
    pytest.importorskip("c2dataviewer")
    from edge_ptychonn.tools.view import DISPLAY_VARIABLES

    for key in DISPLAY_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL + '\n[viewer]\nchannels = ["stitch:1:output"]\n')
    out, err = io.StringIO(), io.StringIO()
    chain = launch.Chain(cfg, out=out, err=err)
    try:
        chain._start_viewers()
    finally:
        chain.stop()
    assert chain.procs == [] and "warning: no display (DISPLAY is not set): no viewer started" in err.getvalue()
    assert "warning" not in out.getvalue()  # a warning goes to stderr


def test_viewers_are_started_where_qt_needs_no_display_variable(tmp_path, monkeypatch):
    """macOS and Windows draw without DISPLAY (only Linux's X11 / Wayland need one, as
    ``edge-ptychonn view`` knows). Before: the launcher there said "no display" and started no viewer."""
    pytest.importorskip("c2dataviewer")
    from edge_ptychonn.tools.view import DISPLAY_VARIABLES

    for key in DISPLAY_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL + '\n[viewer]\nchannels = ["stitch:1:output"]\n')
    err = io.StringIO()
    chain = launch.Chain(cfg, out=io.StringIO(), err=err)
    started = []
    monkeypatch.setattr(chain, "_start", lambda name, argv: started.append((name, argv[-1])))
    chain._start_viewers()
    assert started == [("viewer", "stitch:1:output")] and "no display" not in err.getvalue(), err.getvalue()


def test_viewers_take_their_levels_from_the_chains_model(tmp_path, monkeypatch):
    """Before: the viewer always had the shipped model's card levels (0..1.5 rad), whatever model
    the chain ran: another model's phase range saturated or washed out; a model without a card's
    range got them too (view itself refuses --levels card there)."""
    import shutil

    pytest.importorskip("c2dataviewer")
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # a display, as far as the launcher can tell
    shutil.copy(MODEL, tmp_path / "wide.onnx")
    card = json.loads(MODEL.with_suffix(".json").read_text())
    card["training"]["scan_settings"]["phase_range_rad"] = 3.0
    (tmp_path / "wide.json").write_text(json.dumps(card))
    shutil.copy(MODEL, tmp_path / "bare.onnx")  # no card
    for name, expected in (("wide", ["--model", str(tmp_path / "wide.onnx")]), ("bare", ["--levels", "auto"])):
        cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL.replace(str(MODEL), str(tmp_path / f"{name}.onnx"))
                   + '\n[viewer]\nchannels = ["stitch:1:output"]\n')
        chain = launch.Chain(cfg, out=io.StringIO())
        started = []
        monkeypatch.setattr(chain, "_start", lambda name, argv: started.append(argv))
        chain._start_viewers()
        assert started[0][-3:] == [*expected, "stitch:1:output"], started


def test_a_chain_without_clients_and_no_start_delay_has_no_client_to_warn_of(tmp_path):
    """start_delay_s = 0 with no stitcher or writers. Before: "warning: not every client had
    connected when frames started to flow" (the clients were never looked at)."""
    out, err = io.StringIO(), io.StringIO()
    chain = launch.Chain(load(tmp_path, MINIMAL), out=out, err=err)
    chain._wait_clients(time.monotonic())
    assert err.getvalue() == "" and "all clients connected 0.0 s before frames flow" in out.getvalue(), out.getvalue()


def test_forked_consumers_that_died_before_the_first_poll_are_reported_at_once(tmp_path):
    """Forked consumers that fail fast (a model that is not ONNX) can be gone before the launcher's
    first look at them; on a loaded CI machine the launcher then waited the whole 90 s for their
    status channels. A PvaPy parent with no consumer left and a traceback in its log is reported."""
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL)  # 3 consumers
    out = io.StringIO()
    chain = launch.Chain(cfg, out=out)
    code = ("import time; print('Process Process-1:\\nTraceback (most recent call last):\\n"
            "ValueError: model.onnx is not a readable ONNX model', flush=True); time.sleep(60)")
    try:
        parent = chain._start("inference", [sys.executable, "-c", code])
        assert wait_until(lambda: "Traceback" in parent.log(), 30)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="(?s)inference: its consumers exited at start; .*not a readable ONNX model"):
            chain._wait_answering({f"{PREFIX}-nochild:inference:1:status": parent}, timeout_s=60)
        assert time.monotonic() - t0 < 30  # not the whole wait
    finally:
        chain.stop()


def test_a_viewer_that_fails_is_reported_once_and_the_chain_goes_on(tmp_path):
    """A viewer that exits with an error (c2dv cannot open its window, a channel typo that
    c2dv refuses) was not reported: no window and no line. A window closed (exit 0) is no news."""
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\n' + MINIMAL)
    out = io.StringIO()
    chain = launch.Chain(cfg, out=io.StringIO(), err=out)  # a failure: on stderr
    try:
        failed = chain._start("viewer", [sys.executable, "-c", "import sys; sys.exit('qt.qpa.xcb: could not connect')"])
        closed = chain._start("viewer2", [sys.executable, "-c", "pass"])
        assert failed.wait(30) == 1 and closed.wait(30) == 0
        reported = set()
        chain._report_viewers(reported)
        chain._report_viewers(reported)  # once, not at every status line
    finally:
        chain.stop()
    said = out.getvalue()
    assert said.count("viewer exited (code 1); the chain goes on without it") == 1, said
    assert "qt.qpa.xcb: could not connect" in said and "viewer2 exited" not in said, said
    assert chain.failed is None  # not a reason to stop the chain


def test_frames_appended_but_not_yet_flushed_count_as_written(tmp_path):
    """A writer with a long flushPeriod confirms the scan's frames only at the close that the
    stop performs. Before: a chain stopped idle before that flush reported every frame lost
    (exit status 1) while the files held them all."""
    scan = tmp_path / "s.npy"
    np.save(scan, np.zeros((5, 4, 4), np.int16))
    cfg = load(tmp_path, MINIMAL.replace('channel = "det:image"', f'scan = "{scan}"')
               + '\n[hdf5]\n[hdf5.args]\noutputDirectory = "h"\nflushPeriod = 60\n')
    writers = [{"userStats": {"nFramesWritten": 0, "nFramesUnflushed": 3}},
               {"userStats": {"nFramesWritten": 1, "nFramesUnflushed": 1}}]
    snap = Snapshot([_record(3), _record(2)], None, writers)
    assert snap.written() == 5 and launch.frames_lost(cfg, snap, 5) == 0
    assert snap.taken(cfg) == 5


# pvapy-hpc-consumer -nc 2 as far as the launcher sees it: a parent with two forked consumers, one of
# which crashes (exit status 3, its traceback in the log); on Ctrl-C the parent stops the other and
# exits with 0 whatever became of them, as PvaPy's does
FORKING_PARENT = """
import os, signal, sys, time
kids = []
for crash in (False, True):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if crash:
            print("Process Process-2:\\nTraceback (most recent call last):\\nRuntimeError: the engine died", flush=True)
            os._exit(3)
        time.sleep(120)
        os._exit(0)
    kids.append(pid)
try:
    time.sleep(120)
except KeyboardInterrupt:
    os.kill(kids[0], signal.SIGKILL)
    for pid in kids:
        os.waitpid(pid, 0)
    sys.exit(0)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="forked consumers are watched through /proc")
@pytest.mark.parametrize("seen_while_watching", [True, False])
def test_a_forked_consumer_that_crashed_is_reported_not_a_clean_exit(tmp_path, monkeypatch, capsys,
                                                                     seen_while_watching):
    """One of two forked consumers crashes; PvaPy's parent exits with 0 when stopped. Before: the
    launcher said "stopped inference ... exit 0" and exited with 0 (a detector chain: no frame
    counted lost), and a crash after its last look was not reported at all."""
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\ntimeout_s = 1.5\n'
               + MINIMAL.replace("consumers = 3", "consumers = 2"))

    def start(self):
        parent = self._start("inference", [sys.executable, "-c", FORKING_PARENT])
        assert wait_until(lambda: list(live.exit_statuses(parent.pid).values()) == [3], 30), parent.log()

    monkeypatch.setattr(launch.Chain, "start", start)
    monkeypatch.setattr(launch.Chain, "snapshot", lambda self: Snapshot([None, None], None, []))
    if not seen_while_watching:  # the crash comes after the launcher's last look
        monkeypatch.setattr(launch.Chain, "watch", lambda self: self.snapshot())
    assert launch.run(cfg) == 1
    out, err = capsys.readouterr()
    assert "1 of the 2 inference consumers exited (the others go on, exit status 3)" in err, err
    assert "RuntimeError: the engine died" in err, err
    stopped = [ln for ln in out.splitlines() if ln.startswith("stopped inference")]
    assert len(stopped) == 1 and stopped[0].endswith("exit 0, but 1 of its 2 consumers had exited (see above)"), out


def test_a_sim_server_that_did_not_replay_the_scan_fails_the_chain(tmp_path, monkeypatch, capsys):
    """pvapy-ad-sim-server's frame thread fails (here as it did on a complex64 scan) and the server
    exits with 0 having published nothing. Before: "frames sent 0 (of 6 in the scan: the replay was
    stopped)", "frames lost 0" and exit status 0, with no word of the failure."""
    scan = tmp_path / "scan.npy"
    np.save(scan, np.zeros((6, 8, 8), np.int16))
    cfg = load(tmp_path, f'log_dir = "{tmp_path / "logs"}"\nidle_s = 0.5\n'
               + MINIMAL.replace('channel = "det:image"', f'scan = "{scan}"').replace("consumers = 3", "consumers = 1"))
    said = ("Exception in thread Thread-1 (frameProducer):\nTraceback (most recent call last):\n"
            "pvaccess.pvaccess.InvalidArgument: Dictionary representing union value must have string key.\n"
            "Published frames:      0 @ 0.0000 fps")

    def start(self):
        self._start("inference", [sys.executable, "-c", "import time; time.sleep(60)"])
        self.source = self._start("sim", [sys.executable, "-c", f"print({said!r})"])

    monkeypatch.setattr(launch.Chain, "start", start)
    monkeypatch.setattr(launch.Chain, "snapshot", lambda self: Snapshot([_record(0)], None, []))
    assert launch.run(cfg) == 1
    err = capsys.readouterr().err
    assert "sim exited (code 0) having published 0 of the scan's 6 frames" in err, err
    assert "InvalidArgument: Dictionary representing union value" in err, err


@pytest.mark.parametrize("dtype", ["complex64", "bool", "float16", ">i2"])
def test_a_scan_the_sim_server_cannot_publish_is_refused_by_check(tmp_path, dtype):
    """Before: --check passed a complex64 scan; the sim server's frame thread then failed at once."""
    scan = tmp_path / "scan.npy"
    np.save(scan, np.zeros((4, 8, 8), dtype))
    with pytest.raises(ValueError, match=r"holds .* frames, which an NTNDArray cannot carry; save them as one of uint8"):
        load(tmp_path, MINIMAL.replace('channel = "det:image"', f'scan = "{scan}"'))


def test_a_stitched_image_too_thin_to_score_names_the_scan_and_the_remedy(tmp_path):
    """A live chain whose few frames cover no region the SSIM window fits in. Before: the summary
    said only "not scored: mask is too thin for the 11-pixel SSIM window" (which mask, what to do?)."""
    scan = tmp_path / "s.npy"
    np.save(scan, np.zeros((2, 4, 4), np.int16))
    np.savez(tmp_path / "s.npz", object_phase=np.zeros((32, 32), np.float32), positions_px=np.zeros((2, 2)))
    out = tmp_path / "stitched"
    out.mkdir()
    cfg = LaunchConfig.load(toml(tmp_path, f'[source]\nscan = "{scan}"\n[inference]\n'
                                           f'[stitch]\n[stitch.args]\noutputDirectory = "{out}"\n'))
    weight = np.zeros((32, 32), np.float32)
    weight[8:16, 8:24] = 1.0  # 8 rows: thinner than the 11-pixel window
    np.save(out / "stitch_scan0001.npy", np.zeros((32, 32), np.float32))
    np.save(out / "stitch_scan0001_weight.npy", weight)
    lines = launch.accuracy(cfg)  # its frames: the scan's 2
    assert len(lines) == 1 and lines[0].startswith(f"final stitched image  {out / 'stitch_scan0001.npy'} (not scored: "
                                                   f"scan {scan}: its 2 frame(s) cover no region"), lines
    assert "--n-positions" in lines[0] and "mask is too thin" not in lines[0], lines


def test_check_refuses_a_model_that_is_not_onnx_or_does_not_fit_the_scan(tmp_path, capsys):
    """``launch --check`` reads the inference model as the consumers do: a file that is not an
    ONNX model, or a model whose input the scan's frames do not become, is one line and exit 2.
    Before: both passed; the launch then started everything and failed (exit 1) with the
    consumers' tracebacks, or lost every frame as a bad frame (shape)."""
    scan, not_a_model = tmp_path / "scan.npy", tmp_path / "model.npy"
    np.save(scan, np.zeros((3, 32, 32), np.int16))
    np.save(not_a_model, np.zeros(3))
    chain = f'[source]\nscan = "{scan}"\n[inference]\n[inference.args]\nmodelPath = "{{}}"\n'
    for model, message in [(not_a_model, f"[inference.args] {not_a_model} is not a readable ONNX model: "),
                           (MODEL, "[inference.args] the scan's 32x32 frames do not become the 128x128 input of "
                                   f"modelPath '{MODEL}' with no crop and bin 1: every frame would be refused")]:
        path = toml(tmp_path, chain.format(model))
        assert launch.main(launch.get_args_parser().parse_args([str(path), "--check"])) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"edge-ptychonn launch: {message}"), captured.err
        assert captured.err.count("\n") == 1, captured.err
    np.save(scan, np.zeros((3, 128, 128), np.int16))  # the model's size: accepted
    assert launch.main(launch.get_args_parser().parse_args([str(path), "--check"])) == 0, capsys.readouterr().err


STITCHER_LOG_END = """\
{ 'collectorId': 1,
  'userStats': { 'coverage': 0.0,
                 'nFramesByMetadata': 0,
                 'nFramesNoPosition': 0,
                 'nFramesPlaced': 400,
                 'nFramesReceived': 400,
                 'nFramesWaiting': 0,
                 'nMetadataReceived': 0,
                 'stitchTimeUs': 143.11849414062544}}
"""


def test_frames_waiting_for_positions_are_not_taken_and_every_frame_is_counted(tmp_path):
    """Frames the stitcher holds waiting for their positions from metadata channels have not been
    taken (the chain is not done), the summary says how many were still waiting, or takes the
    stitcher's final figures from its log, and says when no metadata update came. Before: taken
    as soon as received, summary "frames placed 384" of 400, with none waiting nor lost."""
    cfg = load(tmp_path, MINIMAL + '[stitch]\nmetadata_channels = ["pva://h2scan:y", "pva://h2scan:x"]\n'
                                   '[stitch.args]\nobjectShape = [64, 64]\npositionChannels = ["h2scan:y", "h2scan:x"]\n'
                                   'metadataWait = 5.0\n')
    stitch = {"userStats": {"nFramesReceived": 400, "nFramesPlaced": 384, "nFramesWaiting": 16, "coverage": 0.6}}
    snap = Snapshot([{"userStats": {"nFramesProcessed": 400}}], stitch, [])
    assert snap.taken(cfg) == 384
    assert launch.Chain(cfg, out=io.StringIO()).held_s(snap) == 5.0
    assert "waiting 16, by metadata 0 (0 updates)" in snap.line(1.0, cfg)
    lines = "\n".join(launch.summary(cfg, snap, 400))
    assert "frames placed        384 of 400 received (no position 0, outside 0, 16 still waiting for positions " \
           "when stopped, coverage 60.0%)" in lines, lines
    assert "metadata positions   0 of 384 frames placed: no update came from h2scan:y, h2scan:x" in lines, lines
    final = launch.last_user_stats("{'userStats': {'nFramesPlaced': 300, 'nFramesWaiting': 9}}\n" + STITCHER_LOG_END)
    assert final["nFramesPlaced"] == 400 and final["nFramesWaiting"] == 0 and final["stitchTimeUs"] > 143
    assert launch.last_user_stats(STITCHER_LOG_END[:200]) == {}  # cut short: not the last figures
    done = snap.with_stitch_final(final)
    assert (done.placed(), done.waiting(), done.taken(cfg)) == (400, 0, 400)
    assert done.stitch["userStats"]["coverage"] == 0.6  # the last poll's: the final one is of no scan
    assert "frames placed        400 of 400 received (no position 0, outside 0, coverage 60.0%)" \
           in launch.summary(cfg, done, 400)


# the end of an inference log: consumer 2 stopped (a SIGTERM to it) after its status channel's last
# answer (60 frames), and PvaPy's parent logged its final report, then consumer 1's
INFERENCE_LOG_END = """\
consumer 2 final statistics: received 104, published 104, dropped 0 (none), bad 0 (none), ...
{ 'consumerId': 2,
  'processorStats': {'endTime': 1796472336.8457s, 'nMissed': 0, 'nProcessed': 104},
  'userStats': { 'completeness': 1.0,
                 'nFramesDropped': 0,
                 'nFramesProcessed': 104,
                 'nFramesReceived': 104,
                 'nStatsResets': 0}}
{'consumerId': 2}
{ 'consumerId': 1,
  'processorStats': {'endTime': 0.0s, 'nMissed': 0, 'nProcessed': 296},
  'userStats': { 'nFramesProcessed': 296,
                 'nFramesReceived': 296}}
{ 'processorStats': {'endTime': 0.0s, 'nProcessed': 400}}
"""


def test_a_consumer_stopped_before_the_chain_counts_what_it_reported_as_it_ended(tmp_path):
    """A SIGTERM to one of two inference consumers mid-scan: it publishes what it holds and
    stops, its status channel falls silent, and its final statistics are in the log only. The
    summary counted its status channel's last answer: "inference processed 356" of the 400
    frames written, and without HDF5 writers "frames lost: 44 of the 400 sent did not reach the
    inference outputs", frames that it had published. Its final report now counts."""
    scan = tmp_path / "s.npy"
    np.save(scan, np.zeros((400, 4, 4), np.int16))
    cfg = load(tmp_path, MINIMAL.replace('channel = "det:image"', f'scan = "{scan}"').replace("consumers = 3", "consumers = 2"))
    last_answers = [{"userStats": {"nFramesReceived": 296, "nFramesProcessed": 296, "frameRate": 0.0}},
                    {"userStats": {"nFramesReceived": 60, "nFramesProcessed": 60, "frameRate": 40.0}}]
    finals = launch.consumer_user_stats("{ 'consumerId': 2,\n  'userStats': { 'nFramesProcessed': 20}}\n"
                                        + INFERENCE_LOG_END)
    assert finals == {1: {"nFramesProcessed": 296, "nFramesReceived": 296},
                      2: {"completeness": 1.0, "nFramesDropped": 0, "nFramesProcessed": 104, "nFramesReceived": 104,
                          "nStatsResets": 0}}
    done = Snapshot(last_answers, None, []).with_inference_final(finals)
    assert done.processed() == 400 and done.inference[1]["userStats"]["frameRate"] == 40.0
    lines = "\n".join(launch.summary(cfg, done, 400))
    assert "inference processed  400 (dropped 0, bad 0)" in lines and "verdict              no frame lost" in lines, lines
    # a report older than the last answer (a consumer killed between reports) changes nothing
    assert Snapshot(last_answers, None, []).with_inference_final({2: {"nFramesProcessed": 50}}).processed() == 356
    assert launch.consumer_user_stats(INFERENCE_LOG_END[:150]) == {}  # cut short: no figures


@pytest.mark.e2e
def test_frames_waiting_for_positions_from_metadata_are_placed_before_the_chain_stops(pva_env, tmp_path, small_model):
    """Positions asked from metadata channels that nobody publishes: each frame waits
    metadataWait, then takes the file's position. The chain stops once the stitcher has placed
    them all, the summary counts every frame, and says no metadata update came. Before: the
    launcher stopped as soon as the stitcher had received the frames, and the summary showed
    fewer placed than received, with the rest nowhere.

    The collector also holds the scan's last frames (fewer than its cache) for its release
    time (5 s) before the stitcher gets them: the chain is not done before they are placed,
    with an idle_s (1 s) much shorter than that. Before: with an idle_s shorter than the
    release (the demo's 5 s) the launcher stopped watching first and reported those frames as
    not placed (a sweep counted them lost)."""
    n, tag = 20, f"{PREFIX}-mw"  # the cache is 2 * 1 consumer * 8 = 16 frames: the last 4 wait for the release
    cfg = _small_stitch_chain(tmp_path, small_model, tag, n, fps=40,
                              stitch=f'metadata_channels = ["pva://{tag}:scan:y", "pva://{tag}:scan:x"]',
                              stitch_args=f'positionChannels = ["{tag}:scan:y", "{tag}:scan:x"]\nmetadataWait = 3.0')
    out, returncode = _launch_to_end(cfg, pva_env)
    assert pids_alive(out) == [], "launch left processes running"
    assert returncode == 0, out[-3000:]
    placed = re.search(r"frames placed +(\d+)", out)
    assert placed and int(placed[1]) == n, out[-3000:]
    assert f"frames placed        {n} of {n} received (no position 0, outside 0, coverage" in out, out[-3000:]
    assert "frames lost          0\n" in out, out[-3000:]
    assert f"metadata positions   0 of {n} frames placed: no update came from {tag}:scan:y" in out, out[-3000:]
    assert "warning: the stitcher's metadata channels" in out, out[-3000:]


def test_a_chain_whose_channel_names_are_served_already_is_refused_before_anything_starts(pva_env, tmp_path,
                                                                                        capsys):
    """A second launch of the same file while the first ran started all the same: each stage's
    clients connected to either chain's servers, one summary said "frames lost -51", the other
    exit 0 over a stitched image cut into two scans. Now a chain whose channels already answer
    is refused (exit 2), nothing started."""
    import pvaccess as pva

    prefix = f"{PREFIX}:twice"
    cfg = LaunchConfig.load(toml(tmp_path, f"""
log_dir = "{tmp_path / 'logs'}"
[source]
channel = "{prefix}:det"
[inference]
consumers = 2
prefix = "{prefix}:inference"
[inference.args]
modelPath = "{MODEL}"
"""))
    server = pva.PvaServer(f"{prefix}:inference:2:status", pva.PvObject({"value": pva.INT}, {"value": 1}))
    try:
        assert launch.run(cfg) == 2
    finally:
        server.stop()
    out, err = capsys.readouterr()
    assert f"{prefix}:inference:2:status already answers: another chain" in err and "nothing was started" in err, err
    assert "started" not in out and not (tmp_path / "logs").exists(), out


def test_position_channels_not_among_the_metadata_channels_are_refused(tmp_path):
    """positionChannels that the collector is not given as metadata channels passed --check (the
    stitcher finds them missing only at start): every frame then waited metadataWait for nothing."""
    stitch = '\n[stitch]\n{}[stitch.args]\nobjectShape = [200, 200]\npositionChannels = ["hc:y", "hc:x"]\n'
    with pytest.raises(ValueError, match=r"positionChannels hc:y, hc:x not among \[stitch\] metadata_channels"):
        LaunchConfig.load(toml(tmp_path, MINIMAL + stitch.format("")))
    with pytest.raises(ValueError, match=r"positionChannels hc:x not among"):
        LaunchConfig.load(toml(tmp_path, MINIMAL + stitch.format('metadata_channels = ["pva://hc:y"]\n')))
    cfg = LaunchConfig.load(toml(tmp_path, MINIMAL + stitch.format('metadata_channels = ["pva://hc:y", "ca://hc:x"]\n')))
    assert cfg.stitch["args"]["positionChannels"] == ["hc:y", "hc:x"]


def test_the_summary_picture_of_an_image_filled_with_nan_is_black_where_uncovered(tmp_path):
    """After `configure stitch:1:control fill=NaN` the saved image holds NaN where no patch landed:
    the picture cast them to garbage pixels (numpy's "invalid value encountered in cast")."""
    import warnings

    from PIL import Image

    truth = np.linspace(0, 1.5, 64, dtype=np.float32).reshape(8, 8)
    covered = np.zeros((8, 8), bool)
    covered[2:6, 2:6] = True
    covered[2, 2] = False  # inside the scanned region's box, which the picture crops to
    image = np.where(covered, truth, np.nan).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = launch._save_png(tmp_path / "p.png", image, truth, covered)
    picture = np.asarray(Image.open(path))
    assert picture.shape[0] > 24 and picture.min() == 0  # drawn, the uncovered border black
