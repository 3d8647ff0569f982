"""Clean stops for processors inside ``pvapy-hpc-consumer``: on SIGTERM, and with what
they hold published on any stop.

PvaPy 5.6 stops cleanly on Ctrl-C only: SIGTERM (what systemd, procServ, docker
and ``kill PID`` send) ends a process at once, with no final statistics and the
batch being filled lost, and with ``--n-consumers > 1`` a SIGTERM to the parent
alone leaves the consumers publishing as orphans. :func:`on_sigterm`, called
from a processor's ``start()`` (PvaPy calls it on the process's main thread),
makes SIGTERM stop the consumer the way Ctrl-C stops the framework:

1. publish what the processor holds (``drain``) while its PVA server still
   serves clients (PvaPy stops the server before it calls ``stop()``);
2. set the controller's ``shouldBeStopped`` flag, which both PvaPy's
   single-process loop and each forked consumer's loop poll: the framework
   then stops, reports its final statistics and the process exits with 0.

In a forked consumer it also asks the kernel for SIGTERM when the parent dies
(``prctl(PR_SET_PDEATHSIG)``), so a parent killed by any signal takes no
consumer's life silently and leaves no orphan. A parent that should itself
exit cleanly on SIGTERM is started through ``edge-ptychonn consumer``.

The controller is found on the main thread's stack when the signal arrives
(the frame that runs PvaPy's loop holds it): an adapter to PvaPy's internals,
pinned by a contract test.

PvaPy's own stops (Ctrl-C, the end of ``--runtime``, a forked consumer's stop
sent by its parent) stop the consumer's PVA server before the processor's
``stop()``: :func:`drain_before_stop` makes the DataProcessingController that
starts the processor publish what it holds first (the processor finds it on the
stack in its ``start()``; the same kind of adapter, pinned likewise).

A consumer of a distributor group (``-nc N -du 8``, or several processes in one group)
that stops while its siblings go on leaves the group only when its input channel
closes: PvaPy 5.6 stops its monitor first, but keeps the channel until the process
exits (a forked consumer sleeps a second after its final statistics), and until then
the source's distributor keeps waiting for it to take its turn, so no consumer got
any frame: a SIGTERM to one of three consumers at 300 frames/s lost about 300 frames
of every consumer's runs, counted by none of them. :func:`release_input` closes the
channel as soon as the monitor has stopped.
"""

from __future__ import annotations

import _thread
import logging
import multiprocessing
import os
import signal
import threading

from edge_ptychonn.prctl import PR_SET_PDEATHSIG, libc_prctl

DRAIN_TIMEOUT_S = 2.0


def find_controller(frame):
    """The PvaPy controller whose loop runs in ``frame`` or a caller, or None."""
    while frame is not None:
        for name in ("controller", "self"):
            candidate = frame.f_locals.get(name)
            if hasattr(candidate, "shouldBeStopped") and hasattr(candidate, "processPvUpdate"):
                return candidate
        frame = frame.f_back
    return None


def set_parent_death_signal(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux).
    ``parent_pid``: the parent's pid, to see a parent that died before the request (an
    orphan's new parent is 1, or a subreaper: a systemd user manager, a container's init);
    without it only a new parent 1 is seen."""
    prctl = libc_prctl()
    if prctl is None or prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    ppid = os.getppid()
    if ppid == 1 or (parent_pid is not None and ppid != parent_pid):  # the parent died before the request: act now
        os.kill(os.getpid(), sig)
    return True


def parent_death_preexec(sig: int = signal.SIGTERM):
    """A ``subprocess`` ``preexec_fn`` that asks for ``sig`` at this process's death, or None
    (not Linux). libc is looked up here, in the parent: between fork and exec the child
    only makes the call (no library loading, whose locks another thread may have held)."""
    prctl = libc_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request: act now
            os.kill(os.getpid(), sig)

    return preexec


class ReleasedChannel:
    """What PvaPy's receiver holds in place of the input channel :func:`release_input` closed:
    the monitor counters it ended with, for the final statistics (PvaPy reads them there)."""

    def __init__(self, counters: dict):
        self._counters = dict(counters)

    def getMonitorCounters(self) -> dict:
        return dict(self._counters)

    def resetMonitorCounters(self) -> None:
        self._counters = dict.fromkeys(self._counters, 0)

    def isMonitorActive(self) -> bool:
        return False

    def stopMonitor(self) -> None:
        pass


def release_input(consumer) -> bool:
    """Close the input channel of PvaPy's DataConsumer ``consumer`` once its monitor has
    stopped (its ``stop()`` stops it first), so that the source's distributor gives this
    consumer's turns to its siblings at once rather than when the process exits (see the module
    docstring). The channel's last reference is the receiver's: it is replaced by a
    :class:`ReleasedChannel`. An adapter to PvaPy's internals, pinned by a contract test;
    False (nothing changed) when there is no such channel or its monitor still runs."""
    receiver = getattr(consumer, "dataReceiver", None)
    channel = getattr(receiver, "channel", None)
    if not all(callable(getattr(channel, name, None)) for name in ("isMonitorActive", "getMonitorCounters")) \
            or isinstance(channel, ReleasedChannel) or channel.isMonitorActive():
        return False
    receiver.channel = ReleasedChannel(channel.getMonitorCounters())
    return True


def drain_before_stop(controller, drain, logger: logging.Logger, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
    """Make PvaPy's DataProcessingController ``controller`` publish what ``drain(timeout_s)``
    can before it stops: its ``stop()`` stops the consumer's PVA server and only then calls the
    processor's ``stop()``, so what the processor held then reached no client (counted as
    dropped). Every stop goes through it: Ctrl-C, the end of ``--runtime``, a forked consumer
    stopped by its parent, SIGTERM (whose handler drains first: nothing is left by then).
    The frames already received have stopped coming by then (PvaPy stops receiving first).
    A drain that fails is logged and the stop goes on. Returns False (nothing changed) for
    None."""
    if controller is None:
        return False
    original = controller.stop

    def stop(*args, **kwargs):
        try:
            if not drain(drain_timeout_s):
                logger.warning("stopping: frames still queued after %.1f s; they are counted as dropped", drain_timeout_s)
        except Exception as exc:
            logger.error("stopping: publishing the frames held failed (%s: %s)", type(exc).__name__, exc)
        return original(*args, **kwargs)

    controller.stop = stop
    return True


def on_sigterm(drain, logger: logging.Logger, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
    """Make SIGTERM publish what ``drain(timeout_s)`` can, then stop the framework.

    A ``drain`` that fails is logged and the framework stops all the same. A SIGTERM
    that comes while it stops is ignored: a stop brings several at once (a service
    manager's to every process, the kernel's when the parent exits), and a second one
    must not cut a file's closing short; SIGKILL ends the process at once.

    Returns False (and changes nothing) off the main thread, where Python cannot
    install signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        logger.warning("not on the main thread: SIGTERM keeps its default action")
        return False
    parent = multiprocessing.parent_process()
    if parent is not None and not set_parent_death_signal(parent_pid=parent.pid):
        logger.warning("cannot ask for a signal at the parent's death: a killed parent may leave this consumer running")
    stopping = threading.Event()

    def stop(controller) -> None:
        logger.warning("SIGTERM: publishing the frames held, then stopping")
        try:  # a drain that fails must not keep the consumer running: it stops all the same
            drained = drain(drain_timeout_s)
        except Exception as exc:
            logger.error("SIGTERM: publishing the frames held failed (%s: %s); stopping anyway", type(exc).__name__, exc)
        else:
            if not drained:
                logger.warning("SIGTERM: frames still queued after %.1f s; stopping anyway", drain_timeout_s)
        if controller is not None:
            controller.shouldBeStopped = True
        else:
            _thread.interrupt_main()  # the framework's Ctrl-C path

    def handler(signum, frame) -> None:
        if stopping.is_set():
            return
        stopping.set()
        # Never block in a signal handler: the main thread may hold the pipeline's lock.
        threading.Thread(target=stop, args=(find_controller(frame),), name="sigterm-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    return True
