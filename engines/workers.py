"""Several batches at once on the CPU: copies of one engine, each on a thread of its own.

One CPU engine with two intra-op threads stalls whenever either thread loses its
core (to PvaPy's receive thread, the server, a monitor): every operator waits for
its slowest thread. Two copies of the engine with one thread each, each running
its own batch, do not wait for each other; a copy that loses its core delays only
its own batch. Measured on 2 cores (the shipped model, batch 8, one process):
torch bf16 222 frames/s with one copy, 405 with two; ONNX Runtime fp32 144 and
272 (docs/benchmarks.md).

:class:`WorkerPool` offers the asynchronous pair of ``engines.base``: ``submit``
copies the batch into the next worker's own buffer and returns; ``collect`` waits
for that worker's result. Batches are handed to the workers round-robin and
collected in submission order, at most one per worker in flight, so the
pipeline's inference thread keeps every worker busy and publishes in order.
The native libraries (torch, ONNX Runtime) release the GIL while they compute.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

import numpy as np

from edge_ptychonn.thread_name import name_this_thread

from .base import SlotRing, Ticket, check_batch, cpu_layout_device

log = logging.getLogger(__name__)


def _nothing() -> None:
    pass


class _Worker:
    """One engine and the thread that runs it; one job at a time."""

    def __init__(self, engine, index: int, finished=lambda: None):
        self.engine = engine
        self._finished = finished  # called after each job, once its result is ready
        self.buffer = np.empty((engine.max_batch, 1, *engine.input_shape), np.float32)
        self._job = threading.Condition()
        self._n = 0  # frames of the job waiting (0: none)
        self._closing = False
        self.engine_closed = False
        self.done = threading.Event()
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"engine-worker-{index}", daemon=True)
        self.thread.start()

    def start(self, n: int) -> None:
        """Run the first ``n`` rows of :attr:`buffer` (the caller filled them)."""
        self.done.clear()
        self.result, self.error = None, None
        with self._job:
            self._n = n
            self._job.notify()

    def _run(self) -> None:
        name_this_thread()
        while True:
            with self._job:
                while not self._n and not self._closing:
                    self._job.wait()
                if not self._n:  # closing, nothing to run
                    return
                n, self._n = self._n, 0
            try:
                self.result = self.engine.infer(self.buffer[:n])
            except BaseException as exc:  # handed to collect(): the pipeline counts and logs it
                self.error = exc  # (any kind: a collect() waiting for this job must not wait for ever)
            self.done.set()
            try:
                self._finished()
            except Exception:  # a caller's wake-up must not end the worker
                log.exception("%s: the finished-batch callback failed", self.thread.name)

    def ask_to_close(self) -> None:
        """Tell the thread to end after the job it runs (if any); returns at once."""
        with self._job:
            self._closing = True
            self._job.notify()

    def finish_close(self, deadline: float, timeout_s: float) -> None:
        """Wait for the thread until ``deadline`` (``time.monotonic()``), then close the engine
        (once: a later call does nothing; an engine whose close raised counts as closed)."""
        if self.engine_closed:
            return
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            log.warning("%s still busy %.1f s after close; its engine is left open", self.thread.name, timeout_s)
            return
        self.engine_closed = True
        self._finished = _nothing  # drops the pool's callback: no cycle, so a closed pool is freed at once
        self.engine.close()


class WorkerPool:
    """Engine protocol over ``engines`` (same model, engine, precision, batch size),
    each run by a thread of its own; batches go to them in turn.

    ``device`` says how the CPU is used, e.g. ``"cpu (2 workers x 1 thread)"``.
    The pool owns ``engines``: if it cannot be made (a worker's buffer or thread), the
    workers already started are stopped and every engine is closed before the error is raised.
    """

    def __init__(self, engines: Sequence, threads_per_worker: int):
        if not engines:
            raise ValueError("a worker pool needs at least one engine")
        self._workers: list[_Worker] = []
        try:
            first = engines[0]
            self.name = first.name
            self.precision = first.precision
            self.input_shape = tuple(first.input_shape)
            self.max_batch = first.max_batch
            self.max_in_flight = len(engines)
            self.device = cpu_layout_device(first.device, len(engines), threads_per_worker)
            for i, engine in enumerate(engines):
                self._workers.append(_Worker(engine, i, self._finished))
        except BaseException:
            self._close_after_failure(engines)
            raise
        self._ring = SlotRing(len(engines))
        self._closed = False

    #: Called (with no argument, on the worker's thread) each time a batch is finished, or None.
    #: The pipeline sets it, so that waiting for the next batch it also hears of a finished
    #: one: a worker that is free never waits for an older batch to be collected first.
    on_done = None

    def _finished(self) -> None:
        callback = self.on_done
        if callback is not None:
            callback()

    def done(self, ticket: Ticket) -> bool:
        """Whether ``ticket``'s batch is finished (:meth:`collect` then returns at once)."""
        return self._workers[ticket.slot].done.is_set()

    def _close_after_failure(self, engines: Sequence, timeout_s: float = 10.0) -> None:
        """Stop the workers made so far (each closes its engine) and close the engines without
        one; a failure to close is logged, so that the error that stopped the pool is the one raised."""
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.ask_to_close()
        for worker in self._workers:
            try:
                worker.finish_close(deadline, timeout_s)
            except Exception:
                log.exception("closing %s's engine after a failed start", worker.thread.name)
        for engine in engines[len(self._workers):]:
            try:
                engine.close()
            except Exception:
                log.exception("closing an engine after a failed start")

    def submit(self, batch: np.ndarray) -> Ticket:
        """Copy ``batch`` to the next worker and start it; the caller may reuse ``batch`` at once.
        ``RuntimeError`` after :meth:`close` (its workers are gone: nothing would ever run it)."""
        if self._closed:
            raise RuntimeError("this worker pool is closed")
        check_batch(self, batch)
        ticket = self._ring.acquire(batch.shape[0])
        worker = self._workers[ticket.slot]  # free: its last ticket has been collected
        try:
            worker.buffer[: ticket.n] = batch
        except BaseException:
            self._ring.cancel(ticket)  # not started: the next submit takes this worker
            raise
        worker.start(ticket.n)
        return ticket

    def collect(self, ticket: Ticket) -> np.ndarray:
        """Wait for ``ticket``'s result (tickets in submission order); re-raises the engine's error."""
        self._ring.release(ticket)
        worker = self._workers[ticket.slot]
        worker.done.wait()
        if worker.error is not None:
            raise worker.error
        return worker.result

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.collect(self.submit(batch))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every worker after its current batch and close its engine; waits at most
        ``timeout_s`` in all (one deadline for every worker, not one each). A worker still
        busy then is left running, its engine open, with a log line; a later call closes the
        engines of the workers that have finished since (each engine is closed once). An engine
        whose close fails does not keep the others open: every one is closed first, then
        ``RuntimeError`` names the first that failed (the others are logged)."""
        self._closed = True
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.ask_to_close()
        failed: list[tuple[str, Exception]] = []
        for worker in self._workers:
            try:
                worker.finish_close(deadline, timeout_s)
            except Exception as exc:
                failed.append((worker.thread.name, exc))
        for name, exc in failed[1:]:
            log.error("closing %s's engine failed: %s: %s", name, type(exc).__name__, exc)
        if failed:
            name, exc = failed[0]
            more = f" (and {len(failed) - 1} more, logged)" if len(failed) > 1 else ""
            raise RuntimeError(f"closing {name}'s engine failed: {type(exc).__name__}: {exc}{more}") from exc
