"""libc's ``prctl`` (Linux), looked up in one place, and the operations this project asks of it.

``PR_SET_NAME``: a thread's OS name (:mod:`edge_ptychonn.thread_name`); ``PR_SET_PDEATHSIG``:
a signal when the parent dies (:mod:`processors.shutdown`); ``PR_CAPBSET_DROP``: a capability
an exec may no longer keep (:mod:`edge_ptychonn.tools.processes`, real-time scheduling).
"""

from __future__ import annotations

import ctypes

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15  # at most 15 bytes of name, as the kernel keeps
PR_CAPBSET_DROP = 24


def libc_prctl():
    """libc's ``prctl``, or None where there is none (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
