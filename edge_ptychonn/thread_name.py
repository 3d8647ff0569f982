"""Our threads named for the operating system, as ``top -H``, ``ps -L`` and ``/proc`` show them.

Python (before 3.14) names its threads only for itself: the OS sees every thread of a
consumer as its program's name, pvAccess's own threads apart (``TCP-rx``, ``TCP-tx``, ...).
:func:`name_this_thread`, called first in a thread, gives it the name it has in Python, so
that a thread's CPU (``edge-ptychonn bench``'s split per thread, ``top -H``) says whose it is.
"""

from __future__ import annotations

import ctypes
import threading

from .prctl import PR_SET_NAME, libc_prctl

_MAX_BYTES = 15  # what the kernel keeps of a thread's name
_PRCTL = libc_prctl()


def name_this_thread(name: str | None = None) -> bool:
    """Give the calling thread the OS name ``name`` (default: its Python name), cut to 15
    bytes. Whether it was set: False where the system has no ``prctl`` (not Linux)."""
    raw = (name or threading.current_thread().name).encode("ascii", "replace")[:_MAX_BYTES]
    return _PRCTL is not None and _PRCTL(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0
