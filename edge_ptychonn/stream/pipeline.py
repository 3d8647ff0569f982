"""One consumer's inference pipeline, independent of the PvaPy processor classes.

    receive thread:   submit(pv) -> decode -> load (crop, bin, cast) into a free
                      batch buffer -> full batch -> queue (never waits)
    batch runner:     batch (full, or partial after batch_timeout_s, or at stop)
                      -> transform the whole batch (sqrt/log1p, offset, scale)
                      -> engine.infer -> encode each result with its input's
                      uniqueId / time stamps / attributes -> publish(pv), in order

Who runs the batches (``batchRunner``): the inference thread (``thread``), or the
receive thread itself, right after the frame that fills a batch (``receive``).
Either way one thread at a time runs them, holding the work lock, and takes them
from the queue in order only while it holds it. With ``receive`` the inference
thread still runs what the receive thread leaves: a partial batch whose timeout
has come, a model switch, the stop, and a full batch that the receive thread
queued while the work lock was taken and had no next frame to run it at (none
came for ``HANDOVER_S``); it runs one item at a time, so the receive thread takes
the work back at its next frame. On an engine that can say whether a batch is
done without waiting (``done(ticket)``: the GPU engines), the receive thread
leaves the batch it began in flight and goes back to receiving; it finishes it
(encode, publish) at a later frame once it is done, or when the next batch finds
the engine full, and the inference thread does once no frame has come for
``HANDOVER_S``: the GPU computes while the receive thread receives. On other
engines it finishes each batch it begins before it returns. ``auto`` (the default) picks
``receive`` for engines that cost the receive thread little per batch (the
zero-cost engine, GPU engines: the frame path's Python then runs in one thread,
not in two that take turns at the interpreter lock) and ``thread`` for engines
that compute on the CPU (inference then overlaps receiving).

Overload policy: batch buffers come from a fixed pool (``queue_batches + 2``).
When inference cannot keep up, every buffer holds a batch waiting for the
engine; a frame that finds no free buffer is dropped at the door and counted
(``dropped['overload']``), with its uniqueId read and nothing else: the receive
thread then takes little of the interpreter it shares with the inference
thread (9 us of CPU per dropped frame against 48 for a decode and a refused
load; the live publish rate under overload moved within the noise of a 2-core
machine). A frame dropped this way is not inspected (a bad frame among
them counts as dropped, not bad). ``submit`` never waits while holding the lock that
the inference thread needs to give buffers back, so the consumer goes on at
its full inference rate under any load and is lossless again as soon as the
load falls below it. With ``batchRunner`` receive, the receive thread runs the
batch it filled: an engine slower than the stream then holds up receiving, and
the frames wait in pvAccess's queues instead (the server's queue for this
client; what overflows it the consumer counts as missed, from the uniqueIds).
It waits for the inference thread only when a frame finds every buffer taken by
batches queued behind the inference thread's one (then it runs them itself
rather than drop the frame); otherwise it only tries the work lock. At most
``(queue_batches + 1) * batch_size`` frames wait,
which bounds memory and latency (plus, right after start, what is left of the
frames kept while the engine started, up to ``max_pending_frames``: they go
first, in order, as buffers come free).

Frame accounting: every frame received is published, counted bad (by kind,
logged once per kind), counted dropped (by reason), counted as an inference or
publish error, or still queued: :attr:`PipelineStats.unaccounted` is 0. Frames
that never arrived are counted by :class:`~.accounting.IdTracker` from the
uniqueIds that did (``missed``). Records without an image (what a monitor gets
on (re)connect) are no frames: counted apart, never as bad.

Model swap (``configure({"modelPath": ...})``): the new engine is built on the
caller's thread (PvaPy's configure timer thread) without the lock, beside the
running one, so frames keep arriving and the running engine keeps working.
Then, under the lock, the partial batch is flushed to the old engine, the
batcher's preprocessing is swapped, and a switch marker is queued: the
inference thread takes the batches before it with the old engine, closes that
engine, and runs every later batch (preprocessed with the new settings) with
the new one. No frame is lost or run twice; the pause is the switch itself.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from ..thread_name import name_this_thread
from ..warnings_shown import warn
from .accounting import IdTracker
from .batching import Batch, Batcher, NoFreeBuffer
from .config import ProcessorConfig, apply_runtime_changes, model_identity
from .frames import BAD_FRAME_KINDS, BadFrame, FrameEncoder, NotAFrame, decode
from .postprocess import apply_output_mask
from .quote import one_line, short_repr

STATS_WINDOW_S = 5.0  # rates and latency percentiles describe the last few seconds
CONFIGURE_WAIT_S = 1.0  # configure(): how long a change waits for one in progress before it is refused
_NOTHING = object()  # _take(), _head(): nothing there now
# batchRunner receive: a full batch queued and not run by the receive thread (it found the
# work lock taken) is run by the receive thread at its next frame, or by the inference thread
# once no frame has come for this long (the stream paused)
HANDOVER_S = 0.005


@dataclass(frozen=True)
class _Switch:
    """Queued by configure() at a batch boundary: batches after it run on ``engine``."""

    engine: object
    model_id: str
    build_s: float
    output_mask: object = None  # the new model's OutputMask (None: outputs as the network gives them)


def _head(items: deque):
    """The first of ``items``, or _NOTHING when it is empty (read without the lock: another
    thread may take it meanwhile)."""
    try:
        return items[0]
    except IndexError:
        return _NOTHING


def runs_in_receive(setting: str, engine) -> bool:
    """Whether the receive thread runs the batches (``batchRunner`` ``setting`` for ``engine``):
    ``auto`` for an engine that computes no model (zero) or whose device is not the CPU (a GPU)."""
    if setting != "auto":
        return setting == "receive"
    spec = getattr(engine, "SPEC", None)
    return getattr(spec, "computes_model", True) is False or not str(engine.device).startswith("cpu")


def group_size(id_pattern: tuple[int, int]) -> int:
    """Consumers in the distributor's group of the pattern (nSequentialUpdates, objectIdOffset):
    objectIdOffset = (N - 1) * nSequentialUpdates + 1."""
    n_sequential, id_offset = id_pattern
    return (max(int(id_offset or 1), 1) - 1) // max(int(n_sequential or 1), 1) + 1


# the problems logged once that a model makes (its engine failing, non-finite inputs from its
# preprocessing, non-finite outputs): logged once per model, again after a swap
MODEL_LOG_KEYS = frozenset({"inference", "nonfinite-input", "nonfinite-output"})


def _depth(engine) -> int:
    """Batches an engine can hold at once: ``max_in_flight`` with submit/collect, else 1."""
    if callable(getattr(engine, "submit", None)):
        return max(1, int(getattr(engine, "max_in_flight", 1)))
    return 1


def _can_notify(engine) -> bool:
    """Whether an engine with submit/collect can say when a batch is done: ``done(ticket)``,
    and an ``on_done`` callback that the pipeline may set."""
    return callable(getattr(engine, "done", None)) and hasattr(engine, "on_done")


def _notifies(engine) -> bool:
    """Whether it does: it can, and its ``on_done`` is set."""
    return _can_notify(engine) and engine.on_done is not None


def _can_poll(engine) -> bool:
    """Whether an engine with submit/collect can say, without waiting, whether a batch is done
    (``done(ticket)``): the GPU engines (their batch's event reached), CPU workers."""
    return callable(getattr(engine, "done", None))


DROP_REASONS = {
    "overload": "inference is not keeping up: every batch buffer holds a batch waiting for the engine",
    "notReady": "the engine is not ready and maxPendingFrames frames already wait",
    "stopping": "the frame arrived while the consumer was stopping, or was still held when its output server had stopped",
    "reconnect": "the input channel's current frame, handed to this consumer as it reconnected, outside the distributor: "
                 "with several consumers it may be another consumer's too (it would come out twice)",
}


class RecentWindow:
    """Per-batch records of the last ``window_s`` seconds: rates and latency percentiles.

    The inference thread adds; any thread reads (a small lock guards the deque).
    """

    def __init__(self, window_s: float = STATS_WINDOW_S):
        self.window_s = window_s
        self._lock = threading.Lock()
        # (time, frames published, engine seconds, frames inferred, latencies ms, when the batch entered the engine)
        self._items: deque = deque()
        self._started = time.perf_counter()

    def add(self, now: float, published: int, infer_s: float, inferred: int, latencies_ms: np.ndarray,
            started_s: float | None = None) -> None:
        """``started_s``: when the batch entered the engine (``time.perf_counter()``; default
        ``now - infer_s``): its engine time is ``[started_s, started_s + infer_s]``."""
        with self._lock:
            start = now - infer_s if started_s is None else started_s
            self._items.append((now, published, infer_s, inferred, latencies_ms, start))
            self._prune(now)

    def _prune(self, now: float) -> None:
        while self._items and self._items[0][0] < now - self.window_s:
            self._items.popleft()

    def _snapshot(self) -> tuple[float, list]:
        now = time.perf_counter()
        with self._lock:
            self._prune(now)
            return now, list(self._items)

    def frame_rate_hz(self) -> float:
        """Frames published per second over the window (shorter right after start)."""
        now, items = self._snapshot()
        span = min(self.window_s, now - self._started)
        return sum(i[1] for i in items) / span if span > 0 else 0.0

    def infer_rate_hz(self) -> float:
        """Frames per second of engine time over the window (the engine's own speed). Engine
        time is the time during which at least one batch was in the engine: batches that ran at
        once (CPU workers, two batches in flight on a GPU) count their shared time once, not
        once each (which reported half the speed of two workers)."""
        _, items = self._snapshot()
        busy, reached = 0.0, -math.inf
        for start, end in sorted((i[5], i[5] + i[2]) for i in items):
            if end > reached:
                busy += end - max(start, reached)
                reached = end
        return sum(i[3] for i in items) / busy if busy > 0 else 0.0

    def latency_percentiles_ms(self) -> tuple[float, float]:
        """(p50, p99) of receive-to-publish latency over the window."""
        _, items = self._snapshot()
        latencies = np.concatenate([i[4] for i in items]) if items else np.empty(0)
        if not latencies.size:  # nothing published in the window (batches whose frames all failed)
            return 0.0, 0.0
        p50, p99 = np.percentile(latencies, [50, 99])
        return float(p50), float(p99)


@dataclass
class PipelineStats:
    """Counters of one pipeline: totals since start (or reset), and a recent window."""

    received: int = 0
    published: int = 0
    batches: int = 0
    partial_batches: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    inference_errors: int = 0
    nonfinite_outputs: int = 0
    publish_errors: int = 0
    empty_records: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_FRAME_KINDS, 0))
    infer_time_s: float = 0.0
    ids: IdTracker = field(default_factory=IdTracker)
    recent: RecentWindow = field(default_factory=RecentWindow)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def lost_total(self) -> int:
        """Received frames that will never be published (bad, dropped, errors)."""
        return self.bad_total + self.dropped_total + self.inference_errors + self.nonfinite_outputs + self.publish_errors

    def unaccounted(self, queued: int) -> int:
        """Received frames neither published, lost (by cause) nor ``queued``: always 0."""
        return self.received - self.published - self.lost_total - queued

    def completeness(self) -> float:
        """Published / due (received + missed upstream): 1.0 when nothing was lost."""
        due = self.received + self.ids.missed
        return self.published / due if due else 1.0


class InferencePipeline:
    """decode -> batch -> infer -> publish for one consumer.

    ``publish`` is called from the inference thread with each output NTNDArray,
    in input order. ``engine_factory`` is called by :meth:`start` and returns an
    ``engines.base.Engine``; ``model_engine_factory(model_path, id_pattern)``, if given to
    :meth:`start`, builds an engine of the same kind for another model (what
    ``configure({"modelPath": ...})`` switches to), for the distributor pattern
    ``(n_sequential, id_offset)`` in force once the switch is accepted (the request's own,
    when it changes the pattern too). ``n_sequential`` and ``id_offset`` describe the
    distributor's pattern (PvaPy's ``nSequentialUpdates``/``objectIdOffset``) for
    counting the frames that never arrived.
    """

    def __init__(
        self,
        config: ProcessorConfig,
        publish: Callable[[object], None],
        logger: logging.Logger | None = None,
        n_sequential: int = 1,
        id_offset: int = 1,
    ):
        self.config = config
        self._publish = publish
        self.log = logger or logging.getLogger(__name__)
        self._id_pattern = (n_sequential, id_offset)
        self._reconnect_record = False  # the next record is the one a reconnection hands over (reconnected())
        self.stats = self._new_stats()
        self.engine = None  # the engine publishing now (the inference thread switches it)
        self.model_id = ""  # model_identity() of the engine publishing now
        self._output_mask = config.output_mask  # of the model publishing now (the switch changes it)
        self._model_engine_factory: Callable[[object, tuple[int, int]], object] | None = None
        # One configure() at a time (PvaPy runs each on a timer thread of its own);
        # held while a new engine builds, never together with the receive path's lock.
        self._configure_lock = threading.Lock()
        # Serialises submit(), the timeout flush, configure() and stop(). Nothing
        # waits while holding it: no queue, buffer pool, engine or I/O.
        self._lock = threading.Lock()
        self._pending: deque = deque()
        self._batcher: Batcher | None = None
        # Batches, switch markers and the stop marker (None), in order (under the lock).
        # Unbounded by construction: at most one item per batch buffer, plus the markers.
        self._items: deque = deque()
        # Wakes the inference thread (_call_inference_thread): work queued for it, an engine's
        # batch done, a new batchTimeout.
        self._ready = threading.Condition(self._lock)
        self._woken = False  # it has been called and has not looked yet (under the lock)
        # Held by the thread that runs batches: it alone takes items from the queue, begins,
        # finishes and publishes them, so outputs keep their order whichever thread runs.
        # Taken before the lock, never while holding it; the receive thread only tries it
        # unless every batch buffer is taken (_run_here).
        self._work_lock = threading.Lock()
        self._in_flight: deque = deque()  # (batch, engine, ticket or outputs, started at): the work lock's
        self._stop_taken = False  # the stop marker has been taken (work lock)
        self._receive_runs = False  # the receive thread runs full batches (batchRunner; set per engine)
        self._last_submit_s = 0.0  # when submit() was last called (batchRunner receive: see _await_work)
        self._encoder = FrameEncoder()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._outputs_closed = False  # stop(outputs_closed=True): nothing reaches a client any more
        self._frames_in_queue = 0  # frames in full or flushed batches not yet published
        self._frames_finished = 0  # frames that have left the queue since start (drain() waits on it)
        self._abandoned = False  # stop() timed out with outputs closed: it counted the frames left
        self._idle = threading.Condition(self._lock)  # notified when _frames_in_queue falls
        self._logged: set[str] = set()  # the kinds of problem logged (under _logged_lock)
        self._logged_lock = threading.Lock()

    def _new_stats(self) -> PipelineStats:
        return PipelineStats(ids=IdTracker(*self._id_pattern))

    # -- lifecycle -----------------------------------------------------------------
    def start(self, engine_factory: Callable[[], object],
              model_engine_factory: Callable[[object, tuple[int, int]], object] | None = None) -> None:
        """Create the engine (errors propagate) and start the inference thread.
        ``model_engine_factory(model_path, id_pattern)`` builds engines for configure's ``modelPath``
        (without it, a model change is refused)."""
        model_id = model_identity(self.config.model_path)
        engine = engine_factory()
        self._hear_from(engine)
        self.engine, self.model_id = engine, model_id
        self._encoder.model_id = model_id
        self._model_engine_factory = model_engine_factory
        self._receive_runs = runs_in_receive(self.config.batch_runner, engine)
        with self._lock:
            self._batcher = Batcher(
                self.config.batch_size, engine.input_shape, self.config.preprocess,
                n_buffers=self.config.queue_batches + 2,
            )
            self._thread = threading.Thread(target=self._run, name="ptychonn-infer", daemon=True)
            self._thread.start()
            self._feed_pending()  # as many as the buffers take; the rest as buffers come free
            # The inference thread needs no call: it looks at the queue (the batches made of frames
            # kept before the engine was ready, the partial one's timeout) as soon as this lock is
            # free. A call made it take the work lock for nothing when it first ran; a frame that
            # filled a batch then found the lock taken, and with batchRunner receive its batch
            # waited for the next frame (or HANDOVER_S).
        self.log.info(
            "engine %s on %s (%s), input %dx%d, batch %d, model %s; batches run in the %s thread (batchRunner %s)",
            engine.name, engine.device, engine.precision, *engine.input_shape, self.config.batch_size, model_id,
            self.batch_runner, self.config.batch_runner,
        )

    @property
    def batch_runner(self) -> str:
        """Which thread runs full batches now: ``receive`` or ``inference``."""
        return "receive" if self._receive_runs else "inference"

    def _hear_from(self, engine) -> None:
        """Have ``engine`` wake the inference thread whenever it finishes a batch, where it can
        (``on_done``: CPU workers): see :meth:`_await_work`."""
        if _can_notify(engine):
            engine.on_done = self._wake

    def drain(self, timeout_s: float) -> bool:
        """Send the partial batch to inference now and wait (up to ``timeout_s``) until
        every frame queued by then is published; True if they all were. Frames keep being
        accepted meanwhile and start a new batch (its timeout sends it). Used before a
        shutdown, while outputs still reach clients."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._flush_partial()
            # Batches leave the queue in order: the frames queued now are out once this many
            # have left (frames that keep arriving meanwhile are not waited for).
            target = self._frames_finished + self._frames_in_queue + len(self._pending)
            while self._frames_finished < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    break
                self._idle.wait(left)  # releases the lock while waiting
            return self._frames_finished >= target

    def stop(self, timeout_s: float = 0.8, outputs_closed: bool = False) -> None:
        """Flush the partial batch, finish queued batches (up to ``timeout_s``), close the engine.
        ``outputs_closed``: the output channel no longer reaches any client (PvaPy stops a
        consumer's server before it calls the processor's ``stop()``), so the frames still
        held are counted as dropped (``stopping``) instead of being run and published."""
        with self._lock:
            self._stopping = True
            self._outputs_closed = outputs_closed
            if self._pending:
                self._drop(len(self._pending), "stopping")
                self._pending.clear()
            self._flush_partial()
            self._items.append(None)
            self._call_inference_thread()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                with self._lock:
                    left = self._frames_in_queue
                    if outputs_closed and left:
                        # None of them can reach a client: dropped now, so that the final
                        # statistics say so (the busy thread counts nothing more).
                        self._abandoned = True
                        self._drop(left, "stopping")
                        self._frames_in_queue = 0
                warn(self.log, "inference thread still busy %.1f s after stop; %d frame(s) left%s", timeout_s,
                     left, " (counted as dropped)" if outputs_closed and left else "")
        # Only once the inference thread has ended: every batch handed to the engine (a worker
        # pool's workers included) has been collected, so closing waits for no batch. A busy
        # thread leaves the engine open (the process is ending): stop() never waits for it.
        if self.engine is not None and (self._thread is None or not self._thread.is_alive()):
            try:
                self.engine.close()
            except Exception as exc:  # raised, it would skip the consumer's final statistics line
                self.log.error("closing the engine at stop failed: %s", exc)

    # -- receive side ----------------------------------------------------------------
    def submit(self, pv) -> None:
        """Take one received NTNDArray (copies what it needs before returning). With the batches
        on the inference thread it never waits; with batchRunner receive it runs the batches it
        fills (and those left queued) before it returns (see the module's docstring)."""
        received_s = self._last_submit_s = time.perf_counter()
        if self._reconnect_record and self._take_reconnect_record(pv):
            return
        batcher = self._batcher
        if self._receive_runs and batcher is not None and not batcher.has_room:
            self._run_here(wait=True)  # the batches left queued hold every buffer: run them first
        if batcher is not None and not batcher.has_room and self._drop_unread(pv):
            return
        try:
            meta, image = decode(pv, received_s, read_attributes=self.config.forward_attributes)
        except NotAFrame as info:
            with self._lock:
                self.stats.empty_records += 1
            self._log_once("empty-record", logging.INFO, "%s; not a frame, not counted as bad", info)
            return
        except BadFrame as bad:
            with self._lock:
                self.stats.received += 1
                self._see_id(bad.unique_id)
                self._bad(bad)
            return
        with self._lock:
            self.stats.received += 1
            self._see_id(meta.unique_id)
            if self._stopping:
                self._drop(1, "stopping")
            elif self._batcher is None:
                if len(self._pending) >= self.config.max_pending_frames:
                    self._drop(1, "notReady")
                else:
                    self._pending.append((meta, image.copy()))
            else:
                self._feed_pending()
                if self._pending:  # frames kept before the engine was ready go first
                    self._drop(1, "overload")
                else:
                    self._add(meta, image)
        if self._receive_runs:
            self._run_here()

    def _run_here(self, wait: bool = False) -> None:
        """Receive thread (``batchRunner`` receive): run the batches queued, up to a marker (a
        switch, the stop: the inference thread's). When the inference thread holds the work lock,
        return at once (the next frame tries again), unless ``wait``: every batch buffer is taken,
        and running the queue is what frees one; it then waits for the inference thread's one
        item (it holds the lock for one at a time) rather than drop the frame."""
        while isinstance(_head(self._items), Batch) or _head(self._in_flight) is not _NOTHING:
            if not self._work_lock.acquire(blocking=wait):
                return
            try:
                self._work(by_receive=True)  # also finishes the batches in flight that are done
            finally:
                self._work_lock.release()
            if not isinstance(_head(self._items), Batch):
                return  # what is still in flight is not done: the next frame looks again

    def reconnected(self) -> None:
        """The input channel connected again after it was lost (any thread: PvaPy's receiver's
        connection callback, which pvAccess calls before the first record). That record is the
        channel's current value, handed over outside the distributor; with several consumers
        it may be another consumer's frame too, so it is dropped and counted
        (``dropped['reconnect']``), its uniqueId not taken as the first of this consumer's
        stream (no misses counted from it). PvaPy skips it on the first connection only
        (``skipInitialUpdates`` 1, its default); with ``skipInitialUpdates`` 0 the processor
        calls this before the first connection too. With one consumer it is a frame of this
        consumer's stream like any other: processed."""
        if group_size(self._id_pattern) > 1:
            self._reconnect_record = True

    def _take_reconnect_record(self, pv) -> bool:
        """The record after :meth:`reconnected`: dropped and counted, unless it holds no image
        (the empty record of a server that has not streamed yet: the caller counts it so)."""
        self._reconnect_record = False
        try:
            if not pv.getSelectedUnionFieldName():
                return False
        except Exception:  # not an NTNDArray: decode says why
            return False
        with self._lock:
            self.stats.received += 1
            self._drop(1, "reconnect")
        return True

    def _drop_unread(self, pv) -> bool:
        """Overload: count a frame with an image as dropped without decoding it.
        False (the caller decodes) for a record without an image or uniqueId, or
        when a buffer came free in the meantime."""
        try:
            if not pv.getSelectedUnionFieldName():
                return False  # no image: a (re)connect record, handled by decode
            unique_id = int(pv["uniqueId"])
        except Exception:  # not an NTNDArray: decode says why
            return False
        with self._lock:
            if self._stopping or self._batcher is None or self._batcher.has_room:
                return False
            self.stats.received += 1
            self._see_id(unique_id)
            self._drop(1, "overload")
        return True

    def discard(self, pv) -> None:
        """A record handed over after :meth:`stop` (the frames PvaPy still held in its receiver
        queue): counted as received and dropped (``stopping``), its uniqueId seen, without
        decoding it; a record without an image counts as an empty record."""
        try:
            has_image = bool(pv.getSelectedUnionFieldName())
            unique_id = int(pv["uniqueId"]) if has_image else None
        except Exception:  # not an NTNDArray: a frame all the same, of no readable id
            has_image, unique_id = True, None
        with self._lock:
            if not has_image:
                self.stats.empty_records += 1
                return
            self.stats.received += 1
            self._see_id(unique_id)
            self._drop(1, "stopping")

    def _see_id(self, unique_id: int | None) -> None:
        if unique_id is None:
            return
        restarts = self.stats.ids.restarts
        self.stats.ids.see(unique_id)
        if self.stats.ids.restarts != restarts:
            self.log.info("uniqueIds restarted at %d: a new stream (the upstream server restarted)", unique_id)

    def _feed_pending(self) -> None:
        """(lock held) Move the frames kept before the engine was ready into batches, in
        order, as far as the batch buffers take them (the rest when buffers come free)."""
        while self._pending and self._batcher.has_room:
            self._add(*self._pending.popleft())

    def _add(self, meta, image) -> None:
        try:
            batch = self._batcher.add(meta, image)
        except BadFrame as bad:
            self._bad(bad)
            return
        except NoFreeBuffer:
            self._drop(1, "overload")
            return
        if batch is not None:
            self._enqueue(batch)

    def _enqueue(self, batch: Batch) -> None:
        """(lock held) Queue a batch for the batch runner; wake the inference thread unless the
        receive thread runs it (right after, or at its next frame when the work lock is taken;
        the inference thread once no frame has come for HANDOVER_S)."""
        self._frames_in_queue += batch.n
        self._items.append(batch)
        if not self._receive_runs:
            self._call_inference_thread()

    def _call_inference_thread(self) -> None:
        """(lock held) Have the inference thread look at the queue and what is in flight."""
        self._woken = True
        self._ready.notify()

    def _wake(self) -> None:
        """An engine's ``on_done`` (a worker's thread): the inference thread looks again."""
        with self._lock:
            self._call_inference_thread()

    def _flush_partial(self) -> None:
        if self._batcher is not None:
            batch = self._batcher.flush()
            if batch is not None:
                self.stats.partial_batches += 1
                self._enqueue(batch)
                self._call_inference_thread()  # it runs it (a timeout, drain, stop or swap)

    # -- batch runner ------------------------------------------------------------------
    def _take(self, by_receive: bool):
        """The next queued item (a batch, a switch marker, None: the stop) that the calling thread
        runs (:meth:`_ours`), or _NOTHING."""
        with self._lock:
            head = _head(self._items)
            if head is _NOTHING or not self._ours(head, by_receive):
                return _NOTHING
            return self._items.popleft()

    def _ours(self, item, by_receive: bool) -> bool:
        """(lock held) Whether the receive thread (``by_receive``) or the inference thread runs
        ``item``: the receive thread runs batches only; with batchRunner receive, a full batch is
        the receive thread's as long as frames keep coming (it found the work lock taken and runs
        it at its next frame), the inference thread's once none has come for HANDOVER_S."""
        if not isinstance(item, Batch):
            return not by_receive
        if by_receive or not self._receive_runs or item.n < self._batcher.batch_size:
            return True
        return time.perf_counter() - self._last_submit_s >= HANDOVER_S

    def _run(self) -> None:
        """The inference thread: waits for work, then runs it holding the work lock, until the
        stop marker has been taken and nothing is in flight."""
        name_this_thread()
        while True:
            self._await_work()
            with self._work_lock:
                # With batchRunner receive, one item at a time: the receive thread takes the
                # work back at its next frame instead of queueing frames behind this thread.
                if self._work(by_receive=False, one_item=self._receive_runs):
                    return

    def _await_work(self) -> None:
        """Inference thread, without the work lock: return once there is something to do: a
        call (work queued for it, an engine that finished a batch, a new batchTimeout), a marker
        queued, a partial batch whose timeout has come (queued here), a batch in flight to finish
        that it need not wait for (an engine that does not say when it is done). With
        batchRunner receive, a full batch that the receive thread queued is the receive thread's
        to run: the inference thread does not race it for the work lock, and takes it only once
        no frame has come for HANDOVER_S (the stream paused just after it); so it does with the
        batches that the receive thread left in flight on a GPU."""
        with self._lock:
            while True:
                head = _head(self._items)
                if self._woken or (head is not _NOTHING and self._ours(head, by_receive=False)):
                    self._woken = False
                    return
                timeout = self.config.batch_timeout_s
                if head is not _NOTHING:  # the receive thread's until no frame has come for HANDOVER_S
                    timeout = min(timeout, HANDOVER_S - (time.perf_counter() - self._last_submit_s))
                if self._batcher.pending:
                    left = self.config.batch_timeout_s - self._batcher.age_s()
                    if left <= 0:
                        self._flush_partial()
                        return
                    timeout = min(timeout, left)
                oldest = _head(self._in_flight)
                if oldest is not _NOTHING and not _notifies(oldest[1]):
                    if not self._receive_runs:
                        return
                    # left in flight by the receive thread, which finishes it at its next frame;
                    # this thread does once none has come for HANDOVER_S (the stream paused)
                    quiet = time.perf_counter() - self._last_submit_s
                    if quiet >= HANDOVER_S:
                        return
                    timeout = min(timeout, HANDOVER_S - quiet)
                self._ready.wait(max(timeout, 0.0005))

    def _work(self, by_receive: bool, one_item: bool = False) -> bool:
        """(work lock held) Run batches in order: begin queued batches while the engine has room;
        at a switch marker, finish what is in flight and switch; finish the oldest batch in
        flight when the engine is full, at the stop, or when nothing else is to do, unless some
        thread comes back for it (:meth:`_may_leave`): then a batch is finished once it is done.
        An engine with ``submit``/``collect`` (a
        GPU, CPU workers, the zero engine) thus gets batch k+1 before batch k's results are
        encoded and published whenever k+1 is queued by then. The receive thread
        (``by_receive``) takes no marker. ``one_item``: take one item, finish what is in flight,
        return. True once the stop marker has been taken and nothing is in flight."""
        in_flight = self._in_flight
        taken = 0
        while True:
            engine = self.engine
            if len(in_flight) < _depth(engine) and not self._stop_taken and not (one_item and taken):
                item = self._take(by_receive)
                taken += item is not _NOTHING
                if item is None:
                    self._stop_taken = True
                    continue
                if isinstance(item, _Switch):
                    while in_flight:
                        self._finish(*in_flight.popleft())
                    self._switch_engine(item)  # every batch before it has been published
                    continue
                if item is not _NOTHING:
                    self._begin(engine, item, in_flight)
                    continue
            if not in_flight:
                return self._stop_taken
            _, oldest_engine, ticket, _ = in_flight[0]
            if self._may_leave(oldest_engine, len(in_flight), by_receive) and not oldest_engine.done(ticket):
                if by_receive and taken and not _notifies(oldest_engine):
                    with self._lock:  # the inference thread's wait now ends by HANDOVER_S (it is not called)
                        self._ready.notify()
                return False
            self._finish(*in_flight.popleft())

    def _may_leave(self, engine, n_in_flight: int, by_receive: bool) -> bool:
        """(work lock held) Whether the oldest batch in flight on ``engine`` may stay there when
        the calling thread returns: the engine has room for another batch, the stop has not been
        taken, and some thread will come back for it without waiting in the engine: the inference
        thread, called by the engine's ``on_done`` (CPU workers); or, on an engine that can be
        asked whether a batch is done (a GPU's), the receive thread (``by_receive``, batchRunner
        receive) at its next frame, or the inference thread once no frame has come for
        HANDOVER_S. So the receive thread never waits for a GPU's compute unless the engine is
        full: it receives the next frames meanwhile."""
        if engine is None or n_in_flight >= _depth(engine) or self._stop_taken:
            return False
        return _notifies(engine) or (by_receive and _can_poll(engine))

    def _begin(self, engine, batch: Batch, in_flight: deque) -> None:
        if self._outputs_closed:
            self._done(batch, stopping=batch.n)
            return
        t0 = time.perf_counter()
        try:
            if _depth(engine) > 1:
                in_flight.append((batch, engine, engine.submit(batch.prepare()), t0))
            else:
                in_flight.append((batch, None, engine.infer(batch.prepare()), t0))
        except Exception as exc:  # any engine failure: count, log once, keep consuming
            self._done(batch, inference_errors=self._inference_failed(batch, exc))

    def _finish(self, batch: Batch, engine, result, t0: float) -> None:
        counts = {"inference_errors": batch.n}  # unless it gets further
        try:
            if engine is not None:  # a ticket: wait for its results
                try:
                    result = engine.collect(result)
                except Exception as exc:
                    self._inference_failed(batch, exc)
                    return
            if self._outputs_closed:
                counts = {"stopping": batch.n}
                return
            try:
                counts = {**self._publish_batch(batch, result, time.perf_counter() - t0), "infer_started_s": t0}
            except Exception as exc:  # outputs it cannot use: these frames are lost, the thread goes on
                self._inference_failed(batch, exc)
        finally:
            self._done(batch, **counts)

    def _done(self, batch: Batch, published: int = 0, nonfinite_outputs: int = 0, publish_errors: int = 0,
              inference_errors: int = 0, stopping: int = 0, nonfinite_inputs: int = 0,
              infer_s: float | None = None, latencies_ms: np.ndarray | None = None,
              infer_started_s: float | None = None) -> None:
        """A batch has left the queue: its frames' outcomes are counted together with
        their leaving, under the lock, so a snapshot (:meth:`counts`) always adds up; with
        ``infer_s`` (it ran), the batch, its engine time and its latencies too, in the same
        totals (a reset may have come while it was published)."""
        self._batcher.release(batch)
        with self._lock:
            if self._abandoned:  # stop() counted them already
                return
            stats = self.stats
            if infer_s is not None:
                stats.infer_time_s += infer_s
                stats.batches += 1
                stats.recent.add(time.perf_counter(), published, infer_s, batch.n, latencies_ms, infer_started_s)
            stats.published += published
            stats.nonfinite_outputs += nonfinite_outputs
            stats.publish_errors += publish_errors
            stats.inference_errors += inference_errors
            stats.bad["nonfinite"] += nonfinite_inputs
            if stopping:
                self._drop(stopping, "stopping")
            self._frames_in_queue -= batch.n
            self._frames_finished += batch.n
            if self._pending:
                self._feed_pending()  # a buffer came free
            self._idle.notify_all()

    def _inference_failed(self, batch: Batch, exc: Exception) -> int:
        """Log once; the frames lost (counted by the caller through :meth:`_done`)."""
        self._log_once("inference", logging.ERROR, "inference failed for %d frame(s) (ids %d..%d): %s",
                       batch.n, batch.metas[0].unique_id, batch.metas[-1].unique_id, one_line(exc))
        return batch.n

    def _publish_batch(self, batch: Batch, outputs: np.ndarray, infer_s: float) -> dict:
        """Encode and publish each output; the counts for :meth:`_done`."""
        outputs = np.asarray(outputs)
        if outputs.ndim != 4 or len(outputs) != batch.n:  # (n, 1, h, w); checked before any frame is published
            raise ValueError(f"the engine returned outputs of shape {outputs.shape} for {batch.n} frame(s)")
        outputs = apply_output_mask(outputs, self._output_mask)
        finite = np.isfinite(outputs).reshape(batch.n, -1).all(axis=1)
        bad_inputs = batch.nonfinite if batch.nonfinite is not None else np.zeros(batch.n, bool)
        latencies = np.empty(batch.n)
        n_published = nonfinite = errors = 0
        for meta, output, ok, bad_input in zip(batch.metas, outputs, finite, bad_inputs):
            if bad_input:  # the frame's fault, not the engine's: a bad frame (nonfinite), not run
                self._log_once("nonfinite-input", logging.ERROR,
                               "bad frame (nonfinite), not published: frame %d's float pixels go beyond float32's "
                               "range once binned, normalised or scaled (the model's input would be infinite)",
                               meta.unique_id)
                continue
            if not ok:
                nonfinite += 1
                self._log_once("nonfinite-output", logging.ERROR,
                               "the engine returned NaN or infinite values for frame %d; not published", meta.unique_id)
                continue
            try:
                self._publish(self._encoder.encode(meta, output[0]))
            except Exception as exc:  # publishing must not stop the pipeline
                errors += 1
                self._log_once("publish", logging.ERROR, "cannot publish frame %d: %s", meta.unique_id, one_line(exc))
                continue
            now = time.perf_counter()
            latencies[n_published] = (now - meta.received_s) * 1e3
            n_published += 1
        return {"published": n_published, "nonfinite_outputs": nonfinite, "publish_errors": errors,
                "nonfinite_inputs": int(bad_inputs.sum()), "infer_s": infer_s, "latencies_ms": latencies[:n_published]}

    def _switch_engine(self, switch: _Switch) -> None:
        """Inference thread, at a switch marker: later batches run on the new engine."""
        old, old_id = self.engine, self.model_id
        self._hear_from(switch.engine)
        self.engine, self.model_id = switch.engine, switch.model_id
        self._receive_runs = runs_in_receive(self.config.batch_runner, switch.engine)
        self._output_mask = switch.output_mask
        self._encoder.model_id = switch.model_id
        with self._logged_lock:  # the new model's first failure of each kind is logged too
            self._logged -= MODEL_LOG_KEYS
        self.log.info("model switched from %s to %s (%s engine built in %.2f s); the old engine is closed",
                      old_id, switch.model_id, switch.engine.name, switch.build_s)
        try:
            old.close()
        except Exception as exc:  # the new engine runs; a failed close only leaks the old one
            self.log.error("closing the engine of %s failed: %s", old_id, exc)

    # -- control -----------------------------------------------------------------------
    def configure(self, changes: dict, framework_pattern: Callable[[int, int], None] | None = None) -> dict:
        """Apply run-time changes (validated first; ValueError changes nothing).

        A new ``modelPath`` is built here, on the caller's thread, beside the
        running engine and without the lock (frames keep flowing), then switched
        to at a batch boundary; a model that cannot run in its place (another
        input size, not ONNX, an engine that fails to build) raises ValueError
        with the reason, and nothing changes.

        ``framework_pattern(n_sequential, id_offset)`` is given the distributor pattern
        in force (:attr:`id_pattern`) first and once more at the end, accepted or refused:
        PvaPy's controller takes a request's nSequentialUpdates and objectIdOffset before
        the processor sees it, and so gets them back unless the request is accepted."""
        self._tell_pattern(framework_pattern)
        # One change at a time. A model's build holds this for its whole length (TensorRT:
        # minutes): a change sent meanwhile is refused at once, with the reason, rather than
        # answered only when the build is done (after its sender has given up waiting).
        if not self._configure_lock.acquire(timeout=CONFIGURE_WAIT_S):
            raise ValueError("a new model's engine is being built; send this change once it runs (the status "
                             "channel's modelId changes then)")
        try:
            # Validated without the lock: a new model's card is read from disk here (a slow file
            # system must stall neither receiving nor inference). Only configure() changes the
            # settings, and the configure lock is held.
            new, applied = apply_runtime_changes(self.config, changes)
            id_pattern = self._requested_id_pattern(changes)
            with self._lock:
                if "modelPath" in applied:
                    self._check_can_swap()
                    input_hw = self._batcher.input_hw
                else:
                    self._apply(new, applied)
            if "modelPath" in applied:  # laid out for the pattern of the request (consumers joined)
                self._swap(new, applied, input_hw, id_pattern)
            if id_pattern != self._id_pattern:  # PvaPy's own keys: its controller took them too
                with self._lock:
                    self._id_pattern = id_pattern
                    self.stats.ids.set_pattern(*id_pattern)
                self.log.info("distributor pattern now runs of %d every %d ids: missed frames are counted in it "
                              "from the next frame", id_pattern[0], sum(id_pattern) - 1)
        finally:
            self._tell_pattern(framework_pattern)
            self._configure_lock.release()
        if applied:
            self.log.info("configuration changed: %s", applied)
        return applied

    def _tell_pattern(self, framework_pattern: Callable[[int, int], None] | None) -> None:
        """``framework_pattern(*id_pattern)``, under the lock that guards changes of the pattern
        (so that the last one told is the one in force)."""
        if framework_pattern is not None:
            with self._lock:
                framework_pattern(*self._id_pattern)

    @property
    def id_pattern(self) -> tuple[int, int]:
        """The distributor's pattern now: (nSequentialUpdates, objectIdOffset)."""
        return self._id_pattern

    def _requested_id_pattern(self, changes: dict) -> tuple[int, int]:
        """(nSequentialUpdates, objectIdOffset) after ``changes``: PvaPy's controller takes these
        keys from a configure request (to follow consumers added or removed), and so does the
        count of missed frames. ValueError unless each given is an integer >= 1.

        ``changes`` is a dict here (:func:`apply_runtime_changes` checked it)."""
        pattern = list(self._id_pattern)
        for i, key in enumerate(("nSequentialUpdates", "objectIdOffset")):
            if key in changes:
                try:  # as PvaPy's controller reads it
                    pattern[i] = int(changes[key])
                except (TypeError, ValueError, OverflowError):
                    pattern[i] = 0
                if pattern[i] < 1:
                    raise ValueError(f"{key} must be an integer >= 1, got {short_repr(changes[key])}")
        return tuple(pattern)

    def _apply(self, new: ProcessorConfig, applied: dict) -> None:
        """(lock held) Take ``new`` settings; batches from now on use its preprocessing."""
        self.config = new
        if self._batcher is not None:
            self._batcher.preprocess = new.preprocess
        if "batchTimeout" in applied and self._thread is not None:
            self._call_inference_thread()

    def _check_can_swap(self) -> None:
        """(lock held) ValueError unless a model change can start now."""
        if self._stopping:
            raise ValueError("the consumer is stopping; modelPath not changed")
        if self._batcher is None or self.engine is None:
            raise ValueError("the engine is still starting; change modelPath once it runs")
        if self._model_engine_factory is None:
            raise ValueError("this pipeline cannot change models at run time")

    def _swap(self, new: ProcessorConfig, applied: dict, input_hw: tuple[int, int],
              id_pattern: tuple[int, int]) -> None:
        """Build ``new.model_path``'s engine for ``id_pattern`` (lock not held), then switch at a
        batch boundary."""
        where = short_repr(str(new.model_path), 80)
        model_id = model_identity(new.model_path)
        self.log.info("modelPath %s (%s): building its engine beside the running one", where, model_id)
        t0 = time.perf_counter()
        try:
            engine = self._model_engine_factory(new.model_path, id_pattern)
        except Exception as exc:  # whatever the engine library raises: refused, nothing changed
            reason = " ".join(str(exc).replace(str(new.model_path), "it").split()) or type(exc).__name__
            reason = reason if len(reason) <= 160 else reason[:160] + "..."
            raise ValueError(f"cannot run modelPath {where}: {reason}") from None
        build_s = time.perf_counter() - t0
        shape = tuple(engine.input_shape)
        if shape != tuple(input_hw):
            engine.close()
            raise ValueError(
                f"modelPath {where} takes {shape[0]}x{shape[1]} input, but frames are preprocessed for the "
                f"running model's {input_hw[0]}x{input_hw[1]}; restart the consumer to change the input size"
            )
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self._flush_partial()  # frames preprocessed the old way go to the old engine
                self._apply(new, applied)
                self._items.append(_Switch(engine, model_id, build_s, new.output_mask))
                self._call_inference_thread()
        if stopping:  # closed without the lock: receiving and inference never wait for an engine
            try:
                engine.close()
            except Exception as exc:
                self.log.error("closing the engine built for modelPath %s failed: %s", where, one_line(exc))
            raise ValueError("the consumer is stopping; modelPath not changed")
        self.log.info("modelPath %s: engine built in %.2f s; switching at the next batch", where, build_s)

    @property
    def queued_frames(self) -> int:
        """Frames received but not yet published (pending, in batches waiting, being filled)."""
        batcher = self._batcher
        return len(self._pending) + (batcher.pending if batcher else 0) + self._frames_in_queue

    def reset_stats(self) -> None:
        """New totals. The frames held now count as received in them, so that the
        published, lost and queued frames still add up to the received ones; the
        uniqueId tracker keeps what it knows of the stream (so that it goes on counting
        missed frames exactly)."""
        with self._lock:
            ids = self.stats.ids.counts_reset()
            self.stats = self._new_stats()
            self.stats.ids = ids
            self.stats.received = self.queued_frames

    def counts(self) -> tuple[PipelineStats, int]:
        """A copy of the totals and the number of frames held, taken together under the
        lock (for a status report: its figures add up, ``unaccounted`` is 0). The recent
        window is shared, not copied."""
        with self._lock:
            s = self.stats
            return replace(s, dropped=dict(s.dropped), bad=dict(s.bad), ids=copy.copy(s.ids)), self.queued_frames

    def summary(self) -> str:
        """One line of totals, for the log at stop."""
        s = self.stats
        dropped = ", ".join(f"{k} {v}" for k, v in s.dropped.items() if v) or "none"
        bad = ", ".join(f"{k} {v}" for k, v in s.bad.items() if v) or "none"
        return (
            f"received {s.received}, published {s.published}, dropped {s.dropped_total} ({dropped}), "
            f"bad {s.bad_total} ({bad}), inference errors {s.inference_errors}, "
            f"non-finite outputs {s.nonfinite_outputs}, "
            f"publish errors {s.publish_errors}, queued {self.queued_frames}, missed upstream {s.ids.missed}, "
            f"stream restarts {s.ids.restarts}, empty records {s.empty_records}, "
            f"unaccounted {s.unaccounted(self.queued_frames)}"
        )

    # -- bookkeeping (lock held) ----------------------------------------------------------
    def _bad(self, bad: BadFrame) -> None:
        self.stats.bad[bad.kind] += 1
        self._log_once(f"bad:{bad.kind}", logging.ERROR, "bad frame (%s), not published: %s", bad.kind, bad)

    def _drop(self, n: int, reason: str) -> None:
        self.stats.dropped[reason] += n
        self._log_once(f"drop:{reason}", logging.ERROR, "dropped %d frame(s): %s", n, DROP_REASONS[reason])

    def _log_once(self, key: str, level: int, message: str, *args) -> None:
        with self._logged_lock:  # the receive and inference threads both log: one look-and-note
            if key in self._logged:
                return
            self._logged.add(key)
        self.log.log(level, message + " (logged once; see the statistics for counts)", *args)
