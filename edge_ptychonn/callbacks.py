"""PvaPy callbacks: keep the calling thread's Python state from one call to the next.

PvaPy calls Python (a processor's ``process()``, a channel monitor's callback) on
pvAccess threads that Python did not start, inside ``PyGILState_Ensure`` /
``PyGILState_Release``: each call creates a Python thread state (mapping a
fresh 16 KiB frame stack, one page fault) and the release deletes it (unmapping
it again): two system calls and a page fault per frame, and a thread-local
value set in one frame is gone in the next. :func:`keep_thread_state`, called
first in such a callback, keeps the state for the thread's life. In one process
with a PvaPy monitor, 20,000 updates cost 35 us of CPU each without it, 20 us
with it (``docs/benchmarks.md``).
"""

from __future__ import annotations

import ctypes
import threading

# Thread-local, so it lives exactly as long as the thread state it marks: on a
# pvAccess thread it is new on every call until the state is kept.
_state = threading.local()


def keep_thread_state() -> None:
    """Keep the calling thread's Python thread state for the thread's life: one more
    ``PyGILState_Ensure``, never released, the first time a thread calls it.

    After a thread's first call this is one attribute lookup. On threads that Python
    started it changes nothing that matters: their state lives until they end.
    """
    if not getattr(_state, "kept", False):
        _state.kept = True
        ctypes.pythonapi.PyGILState_Ensure()  # the GIL is held: this only counts one more user
