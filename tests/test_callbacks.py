"""PvaPy callbacks keep their thread's Python state (edge_ptychonn.callbacks), with a real PVA server.

The check runs in a fresh interpreter: in this one, other tests' output collectors
may already have kept the state of the pvAccess thread that calls back.
"""

import json
import subprocess
import sys

from channel_names import PREFIX

SCRIPT = r"""
import json, sys, threading
import pvaccess as pva
from edge_ptychonn.callbacks import keep_thread_state
from edge_ptychonn.tools.processes import wait_until

channel_name = sys.argv[1]
server = pva.PvaServer(channel_name, pva.NtNdArray())
local = threading.local()
calls = []  # thread-local value still there, per update
keep = threading.Event()

def on_update(pv):
    if pv["uniqueId"] == 0:
        return  # the record as it was before the updates
    if keep.is_set():
        keep_thread_state()
    calls.append(getattr(local, "seen", False))
    local.seen = True

channel = pva.Channel(channel_name)
channel.monitor(on_update, "record[queueSize=100]field()")
pv = pva.NtNdArray()
for unique_id in range(1, 21):
    if unique_id == 11:
        keep.set()
    pv["uniqueId"] = unique_id
    server.update(channel_name, pv)
    if not wait_until(lambda: len(calls) >= unique_id, 10.0):
        sys.exit(f"update {unique_id} did not arrive")
channel.stopMonitor()
print(json.dumps(calls))
"""


def test_pvapy_callbacks_keep_their_thread_state_once_kept():
    """A PvaPy monitor calls back on a pvAccess thread with a new Python thread state
    each time (a thread-local value does not survive to the next update) until
    keep_thread_state() is called there once; from then on the state survives."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, f"{PREFIX}:keepstate"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    calls = json.loads(done.stdout.strip().splitlines()[-1])
    assert calls[:10] == [False] * 10  # a new thread state for every callback
    assert calls[10:] == [False] + [True] * 9  # kept from the first call on
