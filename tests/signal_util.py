"""Signals for the tests: stopping a real command with SIGTERM at the moment it writes (a
``kill`` leaves one line, exit 130 and no hidden half-written file), and the processes a
launcher said it started that are still there."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def sigterm_while_writing(args: list[str], folder: Path, part_glob: str, timeout_s: float = 120.0,
                          poll_s: float = 0.005) -> tuple[int, str]:
    """Run ``edge-ptychonn ARGS``, send it SIGTERM once a hidden file matching ``part_glob``
    appears in ``folder`` (it is writing), and return (exit status, stderr). Fails the test
    when the command ended, or no such file appeared within ``timeout_s``, before the signal."""
    argv = [sys.executable, "-m", "edge_ptychonn.cli", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not list(folder.glob(part_glob)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(poll_s)
        assert proc.poll() is None, proc.communicate()
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


def pids_alive(log_text: str) -> list[int]:
    """The processes a launcher or the demo said it started (its ``started <name> pid N``
    lines) that still run; each is then killed, so that a failing check leaves nothing behind."""
    pids = [int(line.split("pid")[1].split()[0]) for line in log_text.splitlines() if line.startswith("started ")]
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive
