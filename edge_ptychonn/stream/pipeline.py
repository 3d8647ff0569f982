"""One consumer's inference pipeline, independent of the PvaPy processor classes.

    receive thread:   submit(pv) -> decode -> preprocess into a batch buffer
                      -> full batch -> bounded queue
    inference thread: batch (full, or partial after batch_timeout_s, or at stop)
                      -> engine.infer -> encode each result with its input's
                      uniqueId / time stamps / attributes -> publish(pv), in order

Frames that arrive before the engine exists are copied and kept (at most
``max_pending_frames``; beyond that they are counted as dropped) and batched as
soon as it is ready. Nothing is dropped silently: every frame received is
published, counted as bad (by kind, logged once per kind), or counted as
dropped with the reason logged once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .batching import Batch, Batcher, NoFreeBuffer
from .config import ProcessorConfig, apply_runtime_changes
from .frames import BAD_FRAME_KINDS, BadFrame, FrameEncoder, decode

LATENCY_SAMPLES = 10_000
_WAKE = object()  # queued by configure(): the inference thread recomputes its wait


@dataclass
class PipelineStats:
    """Counters of one pipeline (the inference thread writes, others read)."""

    received: int = 0
    published: int = 0
    batches: int = 0
    partial_batches: int = 0
    dropped: int = 0
    inference_errors: int = 0
    publish_errors: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_FRAME_KINDS, 0))
    infer_time_s: float = 0.0
    inferred: int = 0
    first_received_s: float | None = None
    last_published_s: float | None = None
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def infer_rate_hz(self) -> float:
        """Frames per second of inference time (the engine's own speed)."""
        return self.inferred / self.infer_time_s if self.infer_time_s > 0 else 0.0

    @property
    def frame_rate_hz(self) -> float:
        """Frames published per second, first receive to last publish."""
        if self.first_received_s is None or self.last_published_s is None:
            return 0.0
        span = self.last_published_s - self.first_received_s
        return self.published / span if span > 0 else 0.0

    def latency_percentiles_ms(self) -> tuple[float, float]:
        """(p50, p99) of receive-to-publish latency over the recent frames."""
        samples = np.fromiter(list(self.latency_ms), dtype=np.float64)
        if samples.size == 0:
            return 0.0, 0.0
        p50, p99 = np.percentile(samples, [50, 99])
        return float(p50), float(p99)


class InferencePipeline:
    """decode -> batch -> infer -> publish for one consumer.

    ``publish`` is called from the inference thread with each output NTNDArray,
    in input order. ``engine_factory`` is called by :meth:`start` and returns an
    ``engines.base.Engine``.
    """

    def __init__(
        self,
        config: ProcessorConfig,
        publish: Callable[[object], None],
        logger: logging.Logger | None = None,
    ):
        self.config = config
        self._publish = publish
        self.log = logger or logging.getLogger(__name__)
        self.stats = PipelineStats()
        self.engine = None
        self._lock = threading.Lock()  # serialises submit(), timeout flush, configure(), stop()
        self._pending: deque = deque()
        self._batcher: Batcher | None = None
        n_buffers = config.queue_batches + 2
        self._queue: queue.Queue = queue.Queue(maxsize=n_buffers + 2)
        self._encoder = FrameEncoder()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._frames_in_queue = 0  # frames in full or flushed batches not yet inferred
        self._logged: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------
    def start(self, engine_factory: Callable[[], object]) -> None:
        """Create the engine (errors propagate) and start the inference thread."""
        engine = engine_factory()
        self.engine = engine
        with self._lock:
            self._batcher = Batcher(
                self.config.batch_size, engine.input_shape, self.config.preprocess,
                n_buffers=self.config.queue_batches + 2,
            )
            self._thread = threading.Thread(target=self._run, name="ptychonn-inference", daemon=True)
            self._thread.start()
            while self._pending:
                self._add(*self._pending.popleft())
        self.log.info(
            "engine %s on %s (%s), input %dx%d, batch %d",
            engine.name, engine.device, engine.precision, *engine.input_shape, self.config.batch_size,
        )

    def stop(self, timeout_s: float = 0.8) -> None:
        """Flush the partial batch, finish queued batches (up to ``timeout_s``), close the engine."""
        with self._lock:
            self._stopping = True
            if self._batcher is None:
                if self._pending:
                    self._drop(len(self._pending), "stopped before the engine was ready")
                    self._pending.clear()
            else:
                batch = self._batcher.flush()
                if batch is not None:
                    self.stats.partial_batches += 1
                    self._enqueue(batch)
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=timeout_s)
            except queue.Full:  # the thread is stuck; join below reports it
                pass
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self.log.warning("inference thread still busy %.1f s after stop; %d batch(es) left", timeout_s, self._queue.qsize())
        if self.engine is not None and (self._thread is None or not self._thread.is_alive()):
            self.engine.close()

    # -- receive side ----------------------------------------------------------------
    def submit(self, pv) -> None:
        """Take one received NTNDArray (copies what it needs before returning)."""
        received_s = time.perf_counter()
        try:
            meta, image = decode(pv, received_s)
        except BadFrame as bad:
            with self._lock:
                self.stats.received += 1
                self._bad(bad)
            return
        with self._lock:
            self.stats.received += 1
            if self.stats.first_received_s is None:
                self.stats.first_received_s = received_s
            if self._stopping:
                self._drop(1, "frame arrived after stop")
            elif self._batcher is None:
                if len(self._pending) >= self.config.max_pending_frames:
                    self._drop(1, f"engine not ready and {self.config.max_pending_frames} frames already waiting (maxPendingFrames)")
                else:
                    self._pending.append((meta, image.copy()))
            else:
                self._add(meta, image)

    def _add(self, meta, image) -> None:
        try:
            batch = self._batcher.add(meta, image)
        except BadFrame as bad:
            self._bad(bad)
            return
        except NoFreeBuffer as exc:
            self._drop(1, f"inference is not keeping up: {exc}")
            return
        if batch is not None:
            self._enqueue(batch)

    def _enqueue(self, batch: Batch) -> None:
        self._frames_in_queue += batch.n
        self._queue.put(batch)

    # -- inference side --------------------------------------------------------------
    def _next_batch(self) -> Batch | None:
        """The next batch to infer: queued, or the partial one once it is due."""
        while True:
            with self._lock:
                timeout = self.config.batch_timeout_s
                wait = max(timeout - self._batcher.age_s(), 0.0) if self._batcher.pending else timeout
            try:
                item = self._queue.get(timeout=max(wait, 0.0005))
                if item is not _WAKE:
                    return item
                continue
            except queue.Empty:
                pass
            with self._lock:
                if self._batcher.pending and self._batcher.age_s() >= self.config.batch_timeout_s:
                    self.stats.partial_batches += 1
                    batch = self._batcher.flush()
                    self._frames_in_queue += batch.n
                    return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._infer_and_publish(batch)
            finally:
                with self._lock:
                    self._frames_in_queue -= batch.n
                self._batcher.release(batch)

    def _infer_and_publish(self, batch: Batch) -> None:
        stats = self.stats
        t0 = time.perf_counter()
        try:
            outputs = self.engine.infer(batch.valid)
        except Exception as exc:  # any engine failure: count, log once, keep consuming
            stats.inference_errors += batch.n
            self._log_once("inference", "inference failed for %d frame(s) (ids %d..%d): %s",
                           batch.n, batch.metas[0].unique_id, batch.metas[-1].unique_id, exc)
            return
        stats.infer_time_s += time.perf_counter() - t0
        stats.inferred += batch.n
        stats.batches += 1
        for meta, output in zip(batch.metas, outputs):
            try:
                self._publish(self._encoder.encode(meta, output[0]))
            except Exception as exc:  # publishing must not stop the pipeline
                stats.publish_errors += 1
                self._log_once("publish", "cannot publish frame %d: %s", meta.unique_id, exc)
                continue
            now = time.perf_counter()
            stats.published += 1
            stats.last_published_s = now
            stats.latency_ms.append((now - meta.received_s) * 1e3)

    # -- control -----------------------------------------------------------------------
    def configure(self, changes: dict) -> dict:
        """Apply run-time changes (validated first; ValueError changes nothing)."""
        with self._lock:
            new, applied = apply_runtime_changes(self.config, changes)
            self.config = new
            if self._batcher is not None:
                self._batcher.preprocess = new.preprocess
            if "batchTimeout" in applied and self._thread is not None:
                try:
                    self._queue.put_nowait(_WAKE)
                except queue.Full:  # the thread is busy and will see the new timeout
                    pass
        if applied:
            self.log.info("configuration changed: %s", applied)
        return applied

    @property
    def queued_frames(self) -> int:
        """Frames received but not yet inferred (pending, in batches waiting, being filled)."""
        batcher = self._batcher
        return len(self._pending) + (batcher.pending if batcher else 0) + self._frames_in_queue

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = PipelineStats()

    # -- bookkeeping (lock held) ----------------------------------------------------------
    def _bad(self, bad: BadFrame) -> None:
        self.stats.bad[bad.kind] += 1
        self._log_once(f"bad:{bad.kind}", "bad frame (%s), not published: %s", bad.kind, bad)

    def _drop(self, n: int, reason: str) -> None:
        self.stats.dropped += n
        self._log_once(f"drop:{reason[:20]}", "dropped %d frame(s): %s", n, reason)

    def _log_once(self, key: str, message: str, *args) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        self.log.error(message + " (logged once; see the statistics for counts)", *args)
