"""Progress: counted bars and timestamped step lines, readable in logs."""

import io
import os
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


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _screen(text: str) -> str:
    """What a terminal shows on the last line after ``text``: ``\\r`` goes back to the start,
    ``ESC[K`` clears to the end of the line."""
    line, col = "", 0
    for part in re.split(r"(\r|\033\[K|\n)", text):
        if part == "\r":
            col = 0
        elif part == "\033[K":
            line = line[:col]
        elif part == "\n":
            line, col = "", 0
        else:
            line = line[:col] + part + line[col + len(part):]
            col += len(part)
    return line


def test_a_terminal_line_that_gets_shorter_keeps_no_digits_of_the_longer_one():
    """Before: '\\r' alone, so loss=0.1235 then loss=1 showed as 'loss=1.1235'."""
    out = _Terminal()
    bar = Progress(10, "x", stream=out, min_interval_s=0)
    bar.update(1, loss=0.123456)
    bar.update(1, loss=1.0)
    assert _screen(out.getvalue()).endswith(" loss=1")


def test_a_terminal_line_is_cut_to_the_terminal_width(monkeypatch):
    """Before: a line wider than the terminal wrapped, and every redraw left a new row behind."""
    out = _Terminal()
    monkeypatch.setattr(out, "fileno", lambda: 2, raising=False)
    monkeypatch.setattr("edge_ptychonn.progress.os.get_terminal_size", lambda fd: os.terminal_size((60, 24)))
    bar = Progress(10, "epoch 1/5", unit="frames", stream=out, min_interval_s=0)
    for _ in range(10):
        bar.update(1, loss=0.0612)
    bar.close()
    assert len(bar.line()) > 60
    drawn = [part for part in re.split(r"\r|\033\[K|\n", out.getvalue()) if part]
    assert len(drawn) == 11 and all(0 < len(part) <= 59 for part in drawn)


def test_a_log_gets_the_last_count_when_work_stops_between_tenths():
    """Before: work stopped at 47/100 (a time limit, an error) left 40/100 as the log's last line."""
    out = io.StringIO()
    bar = Progress(100, "epoch 1/5", stream=out)
    bar.update(40)
    bar.update(7)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and " 40/100 " in lines[0] and " 47/100 " in lines[1]
    bar.close()  # nothing new: no second copy
    assert out.getvalue().splitlines() == lines
