"""Progress: counted bars and timestamped step lines, readable in logs."""

import io
import re

import pytest

from edge_ptychonn.progress import Progress


def test_counted_work_writes_a_line_per_tenth_when_not_a_terminal():
    out = io.StringIO()
    bar = Progress(20, "simulate", unit="scans", stream=out)
    for _ in range(20):
        bar.update(1, loss=0.5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("simulate [") and "20/20" in lines[-1]
    assert "scans/s" in lines[-1] and "loss=0.5" in lines[-1]


def test_steps_are_timestamped_lines():
    out = io.StringIO()
    log = Progress(stream=out)
    log.stage("engine alone")
    log("batch 8: 120 frames/s")
    assert re.fullmatch(r"\[ +\d+\.\d s\] == engine alone\n\[ +\d+\.\d s\] batch 8: 120 frames/s\n", out.getvalue())
    with pytest.raises(ValueError, match="needs a total"):
        log.update(1)


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    bar = Progress(3, "x", stream=out, enabled=False)
    bar.update(3)
    bar("step")
    bar.close()
    assert out.getvalue() == "" and bar.done == 3
