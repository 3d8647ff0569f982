"""The process helpers keep PVA traffic on loopback and stop what they start."""

import os
import signal
import sys
import time

from edge_ptychonn.tools.processes import LOOPBACK_ENV, start, use_loopback, wait_until


def test_child_processes_get_the_loopback_settings():
    # servers bind to loopback only, searches and beacons go to it only
    assert LOOPBACK_ENV["EPICS_PVAS_INTF_ADDR_LIST"] == LOOPBACK_ENV["EPICS_PVA_ADDR_LIST"] == "127.0.0.1"
    assert LOOPBACK_ENV["EPICS_PVA_AUTO_ADDR_LIST"] == LOOPBACK_ENV["EPICS_PVAS_AUTO_BEACON_ADDR_LIST"] == "NO"
    env = use_loopback()
    for key, value in LOOPBACK_ENV.items():
        assert env[key] == value and os.environ[key] == value


def test_stop_ends_the_whole_process_group(tmp_path):
    # a parent that forks a child which ignores SIGINT, as consumers' workers may
    code = "import os, signal, time\nif os.fork() == 0:\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    proc = start("sleeper", [sys.executable, "-c", code], dict(os.environ), tmp_path)
    assert proc.running()
    proc.stop(grace_s=1.0)
    assert not proc.running()
    deadline = time.monotonic() + 5  # a killed orphan is reaped by init shortly after
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("a child of the stopped process is still running")


def test_stop_interrupts_cleanly_when_the_caller_ignores_sigint(tmp_path):
    # a caller started under nohup or as `cmd &` in a script has SIGINT ignored; its
    # children must still take the SIGINT of stop() (and save what they hold), not
    # wait for the SIGTERM after it
    code = ("import signal, sys, time\n"
            "print('handler', signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)\n"
            "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('interrupted', flush=True)\n    sys.exit(3)")
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = start("interruptible", [sys.executable, "-c", code], dict(os.environ), tmp_path)
        assert wait_until(lambda: "handler" in proc.log(), 10), proc.log()
        assert proc.stop(grace_s=5.0) == 3, proc.log()
    finally:
        signal.signal(signal.SIGINT, before)
    assert "handler True" in proc.log() and "interrupted" in proc.log()
