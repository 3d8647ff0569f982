"""Two configure requests at once, as PvaPy's timer threads run them: one whose newScan is held
while the other is answered."""

from __future__ import annotations

import threading


def configure_while_new_scan_held(processor, request: dict, other: dict, then) -> list[RuntimeError]:
    """Send ``request`` (with ``newScan``) to ``processor`` on a thread of its own; hold its newScan
    once begun, send ``other`` from this thread, then let the newScan go on with ``then()`` (the
    processor's own ``new_scan``, or one that fails). Returns what ``request`` raised."""
    held, go_on = threading.Event(), threading.Event()

    def held_new_scan():
        held.set()
        assert go_on.wait(10)
        then()

    processor.new_scan = held_new_scan
    failed = []

    def control():
        try:
            processor.configure(request)
        except RuntimeError as exc:
            failed.append(exc)

    thread = threading.Thread(target=control, daemon=True)
    thread.start()
    try:
        assert held.wait(10), "the newScan never began"
        processor.configure(other)
    finally:
        go_on.set()
        thread.join(10)
    assert not thread.is_alive(), "the request with newScan never ended"
    return failed
