"""Stopping a real command with SIGTERM at the moment it writes, for the tests that a
``kill`` leaves one line, exit 130 and no hidden half-written file."""

from __future__ import annotations

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
