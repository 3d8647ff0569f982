"""The demo command, end to end on a small simulated scan (real PvaPy processes)."""

import numpy as np
import pytest

from edge_ptychonn.tools import demo
from edge_ptychonn.science.simulate import ScanSettings, save_scan, simulate_scan

pytestmark = pytest.mark.e2e


def test_demo_replays_a_scan_and_prints_summary_and_accuracy(pva_env, small_model, tmp_path, capsys):
    frames, truth = simulate_scan(ScanSettings(seed=1001, n_positions=21, frame_size=64), progress=False)
    save_scan(tmp_path / "scan", frames, truth)
    args = demo.get_args_parser().parse_args([
        "--scan", str(tmp_path / "scan.npy"), "--model", str(small_model), "--engine", "onnxruntime",
        "--fps", "50", "--start-delay", "10", "--prefix", "test:demo", "--channel", "test:demo:image",
        "--logs", str(tmp_path / "logs"), "--timeout", "60",
    ])
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    # sent, received, published, outputs, missed, lost, bad+dropped
    assert total[1:8] == ["21", "21", "21", "21", "0", "0", "0"]
    assert "phase stitched from outputs" in out and "baseline: zeros" in out
    stitched = np.load(tmp_path / "logs" / "stitched_phase.npy")
    assert stitched.shape == truth.object_phase.shape and np.isfinite(stitched).all()
