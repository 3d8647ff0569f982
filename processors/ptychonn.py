"""PvaPy processor: live PtychoNN inference on areaDetector frames.

Usage::

    edge-ptychonn consumer --input-channel ad:image \\
        --output-channel 'inference:*:output' --status-channel 'inference:*:status' \\
        --control-channel 'inference:*:control' \\
        --processor-class processors.ptychonn.PtychoNNProcessor \\
        --processor-args '{"engine": "auto", "batchSize": 8}' \\
        --n-consumers 4 --distributor-updates 8 --server-queue-size 1000 --report-period 2

(``pvapy-hpc-consumer`` takes the same options; see the README on signals.)

Input
    NTNDArray, mono, any integer or float pixel type (uncompressed, or lz4 /
    blosc / bslz4 compressed: the codecs extra), of a size that
    the preprocessing turns into the model's input (e.g. 128x128, or 516x516
    with ``"crop": [512, 512], "bin": 4``). Float frames with NaN or infinite
    pixels (or double pixels beyond float32's range, or pixels that binning or
    scaling takes beyond it) are bad frames (``nonfinite``), never published;
    records without an image (on connect) are no frames.
Output (``--output-channel``)
    One NTNDArray per input frame, in input order: float32 phase image
    (model output size, radians), the input's ``uniqueId``, ``timeStamp``,
    ``dataTimeStamp`` and attributes (``forwardAttributes`` false: ColorMode alone, the
    input's left unread), plus a string attribute ``modelId`` naming
    the model that made it: its card's name (else the file's stem) and the
    first 12 hex digits of the ONNX file's SHA-256, e.g. ``ptychonn sha256:1a2b3c4d5e6f``;
    0 rad outside the illuminated region (the model card's ``output_mask``;
    ``outputMask`` false: the raw output).
Processor arguments (``--processor-args`` JSON; camelCase)
    modelPath (str; default: the shipped model, found however the project is installed)
    engine ('auto' | 'tensorrt' | 'torch' | 'onnxruntime' | 'zero'; default 'auto')
    device ('auto' | 'cpu' | 'cuda' | 'cuda:N' | a consumer-to-GPU map 'cuda:0,0,1,1';
    default 'auto': GPU (processorId-1) % nGPUs)
    precision ('auto' | 'fp32' | 'tf32' | 'bf16' | 'fp16'; default 'auto'); planCacheDir (TensorRT plans)
    batchSize (1..256, default 8); batchTimeout (0.001..60 s, default 0.05: a partial batch is run after it)
    queueBatches (default 16: beyond, frames are dropped at the door and counted);
    maxPendingFrames (frames kept before the engine is ready, default 2000)
    cpuWorkers, cpuThreads (the engine's CPU layout: batches at once, each on its own copy of
    the engine, and threads per copy; 0: this consumer's share of the cores, cores / the
    distributor group's size, as workers of one thread, at most 4; see engines.base.cpu_layout;
    more workers x threads than the cores this process may run on is run as asked, with a warning at start);
    ioThreads ('batch' | 'unchanged'; default 'batch': pvAccess's receive and send threads run under Linux's
    SCHED_BATCH, so that waking up for each frame they do not preempt the inference thread; see
    edge_ptychonn/io_threads.py);
    batchRunner ('auto' | 'thread' | 'receive'; default 'auto': which thread runs the batches (transform,
    engine, encode, publish): 'thread' the inference thread, 'receive' PvaPy's receive thread right
    after the frame that fills a batch (the frame path's Python in one thread, not two taking turns at
    the interpreter lock; on a GPU it leaves the batch computing and publishes it at a later frame,
    once it is done); 'auto' picks 'receive' for the zero-cost engine and GPU engines, 'thread'
    for CPU engines; see edge_ptychonn/stream/pipeline.py);
    crop [h, w]; cropOrigin [y0, x0]; bin (int);
    normalize ('none' | 'running': each frame scaled by referenceTotal over the mean total of the
    last normalizeWindow frames, totals beyond twice or below half their median left out |
    'total': each frame scaled to referenceTotal counts);
    referenceTotal (> 0); normalizeWindow (frames, default 1024);
    transform ('none' | 'sqrt' | 'log1p'); offset; scale (> 0);
    outputMask (bool; default true when the card has an output_mask);
    forwardAttributes (bool; default true: outputs carry the input's NDAttributes; false: they are not
    read, which saves PvaPy's conversion of each, 6-16 us per attribute and frame on a 2-core machine
    whose whole frame path costs about 90 us, and a 2-D frame is then taken as mono whatever its
    ColorMode says).
    Preprocessing defaults come from the model card (model.json) when present.
Run-time changes (control channel ``configure``, e.g. ``edge-ptychonn configure``)
    batchTimeout, offset, scale, transform, normalize, modelPath. Anything else is refused and nothing changes,
    except PvaPy's own keys: its objectIdOffset and nSequentialUpdates (consumers added to or removed from the
    distributor group) also set the pattern in which nFramesMissed counts, from the next frame (PvaPy's count
    and ours alike; a refused request leaves both as they were). skipInitialUpdates is refused: at run time
    PvaPy would discard that many frames, counted nowhere (give it at start, -siu).
    ``modelPath`` swaps the model without a restart: an engine of the running kind
    (same engine, device and precision as now) is built for it on PvaPy's configure
    thread, beside the running one, while frames keep arriving and being published;
    then the consumer switches at a batch boundary: frames preprocessed before the
    switch run on the old model, later ones on the new, none lost or run twice. The
    new model's card gives offset, scale, transform, the normalisation and the
    output mask as at start-up (keys given with modelPath win; no card: 0, 1, none,
    none, no mask); crop, cropOrigin and bin stay. A
    model that does not fit is refused with the reason ("Configuration failed:
    ...") and nothing changes: another input size than the running model's, a
    card made for another crop or bin than the running ones, a file that is
    missing or not ONNX, a malformed card, an engine that fails to build. The
    reply comes once the engine is built (seconds; a TensorRT plan not in the
    cache takes minutes). The switch is logged; ``model`` and ``settings``
    in the statistics show the new model.
Statistics (status channel, ``userStats``)
    ``nStatsResets``: the ``reset_stats`` calls since start (every processor's; a reset keeps it).
    See :data:`STATS`: totals of frames received, published, dropped by reason,
    bad by kind, errors, queued, missed upstream, restarts, unaccounted (always 0),
    completeness; engine and frame rates and latency p50/p99 over the last 5 s;
    the run-time settings (JSON), engine, device (on the CPU with its layout, e.g. ``cpu (1 worker x
    2 threads)``), ``model`` (the modelId now publishing) and
    ``batchRunner`` (the thread that runs the batches now: ``receive`` or ``inference``).
Signals
    SIGTERM publishes what the consumer holds, then stops it like Ctrl-C
    (``processors/shutdown.py``); each consumer prints its final statistics. Any stop closes
    the input channel once PvaPy has stopped receiving, so that the siblings of a distributor
    group get this consumer's turns at once (``shutdown.release_input``).

``InferPtychoNNImageProcessor`` is the drop-in for edgePtychoNN's processor: it
also accepts that processor's ``bsz`` and ``onnx_mdl`` arguments.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from functools import partial

import pvaccess as pva
from pvapy.hpc.adImageProcessor import AdImageProcessor

from edge_ptychonn.callbacks import keep_thread_state
from edge_ptychonn.io_threads import IoThreads
from edge_ptychonn.model_card import card_input_size, check_input_size, default_model_path, find_card
from edge_ptychonn.stream.config import (
    SEED_ALIASES, ProcessorConfig, parse_processor_args, runtime_settings, start_geometry_warning,
)
from edge_ptychonn.stream.frames import BAD_FRAME_KINDS, output_pv_type
from edge_ptychonn.stream.pipeline import DROP_REASONS, InferencePipeline, PipelineStats, group_size
from edge_ptychonn.warnings_shown import warn
from processors import shutdown
from processors.base import (
    StatsFromTable, caller_self, calling_controller, data_source, reset_with_source, restore_on_refusal,
)
from engines import EngineOptions, create_engine
from engines.base import cpu_layout, usable_cores
from engines.onnx_model import read_signature
from engines.registry import check_name

DEFAULT_MODEL = default_model_path()


def _latency(p: int):
    def get(view: "_StatsView") -> float:
        p50, p99 = view.stats.recent.latency_percentiles_ms()
        return p50 if p == 50 else p99

    return get


@dataclass
class _StatsView:
    """What one getStats() reads: the pipeline, and its counters and queued frames
    copied together (so that nFramesUnaccounted reads 0 while frames flow)."""

    pipeline: InferencePipeline
    stats: PipelineStats
    queued: int


def _stats(view: _StatsView) -> PipelineStats:
    return view.stats


# One table for getStats() and getStatsPvaTypes(): key -> (PVA type, getter).
# Counters are totals since start (or resetStats); rates and latencies describe
# the last STATS_WINDOW_S seconds.
STATS = {
    "nFramesReceived": (pva.ULONG, lambda p: _stats(p).received),
    "nFramesProcessed": (pva.ULONG, lambda p: _stats(p).published),
    "nBatchesProcessed": (pva.ULONG, lambda p: _stats(p).batches),
    "nPartialBatches": (pva.ULONG, lambda p: _stats(p).partial_batches),
    "nFramesQueued": (pva.ULONG, lambda p: p.queued),
    "nFramesDropped": (pva.ULONG, lambda p: _stats(p).dropped_total),
    **{
        f"nDropped{reason[0].upper()}{reason[1:]}": (pva.ULONG, lambda p, r=reason: _stats(p).dropped[r])
        for reason in DROP_REASONS
    },
    "nInferenceErrors": (pva.ULONG, lambda p: _stats(p).inference_errors),
    "nNonFiniteOutputs": (pva.ULONG, lambda p: _stats(p).nonfinite_outputs),
    "nPublishErrors": (pva.ULONG, lambda p: _stats(p).publish_errors),
    "nBadFrames": (pva.ULONG, lambda p: _stats(p).bad_total),
    **{
        f"nBad{kind.capitalize()}": (pva.ULONG, lambda p, kind=kind: _stats(p).bad[kind])
        for kind in BAD_FRAME_KINDS
    },
    "nFramesMissed": (pva.ULONG, lambda p: _stats(p).ids.missed),
    "nForeignFrames": (pva.ULONG, lambda p: _stats(p).ids.foreign),
    "nStreamRestarts": (pva.ULONG, lambda p: _stats(p).ids.restarts),
    "nEmptyRecords": (pva.ULONG, lambda p: _stats(p).empty_records),
    "nFramesUnaccounted": (pva.LONG, lambda p: _stats(p).unaccounted(p.queued)),
    "completeness": (pva.DOUBLE, lambda p: _stats(p).completeness()),
    "inferTime": (pva.DOUBLE, lambda p: _stats(p).infer_time_s),
    "inferRate": (pva.DOUBLE, lambda p: _stats(p).recent.infer_rate_hz()),
    "frameRate": (pva.DOUBLE, lambda p: _stats(p).recent.frame_rate_hz()),
    "latencyP50Ms": (pva.DOUBLE, _latency(50)),
    "latencyP99Ms": (pva.DOUBLE, _latency(99)),
    "settings": (pva.STRING, lambda p: json.dumps(runtime_settings(p.pipeline.config))),
    "engine": (pva.STRING, lambda p: p.pipeline.engine.name if p.pipeline.engine else ""),
    "device": (pva.STRING, lambda p: p.pipeline.engine.device if p.pipeline.engine else ""),
    "precision": (pva.STRING, lambda p: p.pipeline.engine.precision if p.pipeline.engine else ""),
    "model": (pva.STRING, lambda p: p.pipeline.model_id),
    "batchRunner": (pva.STRING, lambda p: p.pipeline.batch_runner),
}


def check_crop(config: ProcessorConfig) -> None:
    """ValueError when ``crop`` (and ``bin``) cannot give the model's input size: every frame
    would be refused as a bad frame (shape). Without ``crop`` the frame size decides."""
    pre = config.preprocess
    if pre.crop_hw is None:
        return
    h, w = read_signature(config.model_path).input_shape
    (ch, cw), b = pre.crop_hw, pre.bin_factor
    if ch % b or cw % b or (ch // b, cw // b) != (h, w):
        raise ValueError(
            f"crop [{ch}, {cw}] with bin {b} does not give the model's {h}x{w} input (crop / bin must be "
            f"{h}x{w}, e.g. crop [{h * b}, {w * b}]): every frame would be refused as a bad frame (shape)"
        )


def check_card(model_path, shape=None) -> None:
    """ValueError when the model's card was written for another input size than the model
    takes (``shape``; read from the ONNX file only when the card gives a size):
    :func:`edge_ptychonn.model_card.check_input_size`, the one check."""
    card = find_card(model_path)
    if card_input_size(card) is None:
        return
    check_input_size(card, model_path, read_signature(model_path).input_shape if shape is None else shape)


def cpu_oversubscription(config: ProcessorConfig, consumers: int, cores: int | None = None) -> str | None:
    """What a ``cpuWorkers`` x ``cpuThreads`` layout costs when it needs more threads than the
    ``cores`` this process may run on (default: its CPU affinity), as one warning; None when
    they fit (the default layout always does). Not refused: it is the user's choice."""
    cores = cores or usable_cores()
    workers, threads = cpu_layout(config.cpu_threads, config.cpu_workers, consumers, cores)
    if workers * threads <= cores:
        return None
    plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"
    default = cpu_layout(0, 0, consumers, cores)
    return (
        f"cpuWorkers {config.cpu_workers} x cpuThreads {config.cpu_threads} run {plural(workers, 'worker')} x "
        f"{plural(threads, 'thread')} = {workers * threads} inference threads on the {plural(cores, 'core')} this "
        f"process may run on: the workers fight for the cores (each waits for a core while holding its batch, "
        f"so frames/s does not rise and latency does, and PvaPy's receive and send threads wait too); the "
        f"default (cpuWorkers 0, cpuThreads 0) would be {plural(default[0], 'worker')} x "
        f"{plural(default[1], 'thread')} here. Running as asked"
    )


def data_consumer(frame):
    """PvaPy's DataConsumer on the stack above ``frame`` (the processor's ``start()`` runs inside
    its ``start()``): the first ``self`` there with a ``dataReceiver``; None when there is none.
    An adapter to PvaPy's internals, pinned by contract tests."""
    return caller_self(frame, lambda owner: hasattr(owner, "dataReceiver"))


def input_channel(frame):
    """The pvaccess Channel that PvaPy's DataConsumer (:func:`data_consumer`) receives the frames
    on, or None."""
    channel = getattr(getattr(data_consumer(frame), "dataReceiver", None), "channel", None)
    if callable(getattr(channel, "setConnectionCallback", None)) and callable(getattr(channel, "isConnected", None)):
        return channel
    return None


def receiver_queue_owner(frame):
    """PvaPy's DataConsumer (:func:`data_consumer`) when it receives into a queue (``-rqs``), else
    None: its ``pvObjectQueue`` holds records its loop has not handed to ``process()`` yet, and its
    ``process(pv)`` hands one over as the loop does."""
    consumer = data_consumer(frame)
    if getattr(consumer, "pvObjectQueue", None) is not None and callable(getattr(consumer, "process", None)):
        return consumer
    return None


def create_output_channel(controller) -> bool:
    """Have PvaPy's DataProcessingController ``controller`` make the output channel now. It makes
    it at the first input record (an output's type may depend on the input's; ours does not), so
    while the source was not up a client started after the consumer, as the README's order has
    it, searched for a channel that did not exist, found it seconds late (pvAccess backs off its
    searches) and missed the first frames. Its own call at the first record then does nothing.
    An adapter to PvaPy's internals, pinned by a contract test; False when it cannot."""
    create = getattr(controller, "createDataPublisher", None)
    if not callable(create) or not getattr(controller, "outputChannel", None) \
            or getattr(controller, "dataPublisher", None) is not None:
        return False
    create(None)  # our getOutputPvObjectType() does not look at the input record
    return getattr(controller, "dataPublisher", None) is not None


class ReconnectWatch:
    """Tells the pipeline when the input channel connects again after it was lost
    (:meth:`InferencePipeline.reconnected`); the first connection is PvaPy's to handle."""

    def __init__(self, pipeline: InferencePipeline):
        self._pipeline = pipeline
        self._connected_before = False

    def watch(self, channel) -> None:
        channel.setConnectionCallback(self.on_connection)
        if channel.isConnected():  # connected before the callback was set
            self._connected_before = True

    def on_connection(self, connected: bool) -> None:
        if not connected:
            return
        if self._connected_before:
            self._pipeline.reconnected()
        self._connected_before = True


def _first_record_processed(framework: dict) -> bool:
    """Whether PvaPy hands the processor the first connection's record (``-siu 0``)."""
    try:
        return int(framework.get("skipInitialUpdates", 1)) == 0
    except (TypeError, ValueError):  # PvaPy's own int() refuses it first
        return False


def _set_pattern(controller, n_sequential: int, id_offset: int) -> None:
    """The distributor pattern PvaPy's controller counts its missed frames in."""
    controller.nSequentialUpdates, controller.objectIdOffset = n_sequential, id_offset


class PtychoNNProcessor(StatsFromTable, AdImageProcessor):
    """Batches frames, runs PtychoNN (on its inference thread, or on the receive thread:
    ``batchRunner``), publishes every result."""

    ARG_ALIASES: dict[str, str] = {}
    STATS = STATS

    def __init__(self, configDict: dict | None = None):
        super().__init__(configDict or {})
        config, framework = parse_processor_args(
            configDict or {}, aliases=self.ARG_ALIASES, default_model=DEFAULT_MODEL
        )
        check_name(config.engine)  # at start-up, not only when start() creates it
        check_crop(config)
        check_card(config.model_path)
        geometry = start_geometry_warning(config)
        if geometry:
            warn(self.logger, "%s", geometry)
        self.processor_id = int(framework.get("processorId", 1) or 1)
        n_sequential = max(int(framework.get("nSequentialUpdates") or 1), 1)
        id_offset = int(framework.get("objectIdOffset") or 1)
        self.pipeline = InferencePipeline(
            config, self._publish, self.logger, n_sequential=n_sequential, id_offset=id_offset,
        )
        self.io_threads = IoThreads(config.io_threads, self.logger)
        self._consumer = None  # PvaPy's DataConsumer above start() (closes its input as it stops)
        self._receiver = None  # PvaPy's DataConsumer, when it receives into a queue (start() finds it)
        if _first_record_processed(framework):
            # PvaPy processes the first connection's record too (-siu 0): the channel's current
            # value, handed to every consumer outside the distributor, as on a reconnection
            self.pipeline.reconnected()

    @property
    def group_size(self) -> int:
        """Consumers in the distributor's group now (PvaPy's configure changes it as consumers
        join or leave; a model swap lays its engine out for the group of then, or of its own
        request)."""
        return group_size(self.pipeline.id_pattern)

    @property
    def config(self) -> ProcessorConfig:
        """The settings in force (configure() changes the pipeline's)."""
        return self.pipeline.config

    def _create_engine(self):
        c = self.pipeline.config
        engine = create_engine(c.engine, self._engine_options(c.model_path, c.precision), self.logger)
        # the CPU layout matters only where the engine computes the model on the CPU
        on_cpu = str(engine.device).startswith("cpu") and getattr(getattr(engine, "SPEC", None), "computes_model", True)
        warning = cpu_oversubscription(c, self.group_size) if on_cpu else None
        if warning:
            warn(self.logger, "%s", warning)
        return engine

    def _engine_options(self, model_path, precision: str, consumers: int | None = None) -> EngineOptions:
        """``consumers``: the distributor group's size to lay the CPU out for (default: now)."""
        c = self.pipeline.config
        return EngineOptions(
            model_path=model_path, device=c.device, precision=precision,
            max_batch=c.batch_size, cpu_threads=c.cpu_threads, cpu_workers=c.cpu_workers,
            consumers=self.group_size if consumers is None else consumers,
            processor_id=self.processor_id, plan_cache_dir=c.plan_cache_dir,
        )

    def _engine_for_model(self, model_path, id_pattern: tuple[int, int]):
        """An engine of the running kind (engine, device, precision) for another model, laid
        out for the distributor pattern ``id_pattern`` (the configure request's, when it
        changes it too); called by configure's modelPath on PvaPy's configure thread. The input
        size is checked before building (a TensorRT build takes minutes)."""
        running = self.pipeline.engine
        shape = read_signature(model_path).input_shape  # ValueError: not a readable ONNX model
        if tuple(shape) != tuple(running.input_shape):
            raise ValueError(
                f"it takes {shape[0]}x{shape[1]} input, but frames are preprocessed for the running model's "
                f"{running.input_shape[0]}x{running.input_shape[1]}; restart the consumer to change the input size"
            )
        check_card(model_path, tuple(shape))
        return create_engine(running.name, self._engine_options(model_path, running.precision,
                                                                group_size(id_pattern)))

    # -- PvaPy lifecycle -------------------------------------------------------------------
    def start(self):
        self.counting_resets = True  # a reset_stats from now on clears the run's totals: nStatsResets
        self.pipeline.start(self._create_engine, self._engine_for_model)
        self.io_threads.apply()  # those of the connections made by now; process() looks for new ones
        # Any stop (Ctrl-C, --runtime, the parent's stop of a forked consumer) first publishes
        # what this consumer holds, while its PVA server still serves clients; SIGTERM
        # (systemd, procServ, docker, kill PID) stops it so too, where PvaPy would end it at once.
        controller = calling_controller(sys._getframe(1), self, "stop", "pvaServer")
        self._consumer = data_consumer(sys._getframe(1))
        self._receiver = receiver_queue_owner(sys._getframe(1))
        shutdown.drain_before_stop(controller, self._drain_before_stop, self.logger)
        create_output_channel(controller)
        source = data_source(sys._getframe(1), controller)  # PvaPy's DataConsumer above it
        restore_on_refusal(controller, source)  # a refused configure changes nothing of PvaPy's either
        reset_with_source(source, controller)
        shutdown.on_sigterm(self.pipeline.drain, self.logger)
        channel = input_channel(sys._getframe(1))
        if channel is not None:  # the first record after a reconnection is not the stream's
            ReconnectWatch(self.pipeline).watch(channel)

    def _receiver_records(self, deadline: float = math.inf):
        """The records waiting in PvaPy's receiver queue (``-rqs``), taken one by one until
        ``deadline`` (``time.monotonic()``) or the queue is empty. PvaPy stops with them still
        queued: they reached this consumer and went nowhere, counted nowhere (405 frames at a
        stop under 300 frames/s). Taken once PvaPy stopped receiving, on its loop's thread."""
        for _ in range(self._queued_in_receiver()):
            if time.monotonic() >= deadline:
                return
            try:
                yield self._receiver.pvObjectQueue.get(0)
            except pva.QueueEmpty:
                return

    def _drain_before_stop(self, timeout_s: float) -> bool:
        """Publish what this consumer holds, PvaPy's receiver queue's frames included, before
        PvaPy stops its output server (see ``shutdown.drain_before_stop``). PvaPy has stopped
        receiving by then: the input channel is closed first, so that a distributor group's
        siblings get this consumer's turns at once (``shutdown.release_input``)."""
        shutdown.release_input(self._consumer)
        deadline = time.monotonic() + timeout_s
        for pv in self._receiver_records(deadline):
            self._receiver.process(pv)  # through PvaPy's own path, as its loop would
        return self.pipeline.drain(max(deadline - time.monotonic(), 0.0)) and not self._queued_in_receiver()

    def _queued_in_receiver(self) -> int:
        return 0 if self._receiver is None else len(self._receiver.pvObjectQueue)

    def _publish(self, pv) -> None:
        """PvaPy's ``updateOutputChannel``, except that a failed update raises (so the
        pipeline counts it in ``nPublishErrors``): PvaPy's publishers log the error,
        count it in their ``nErrors`` and return as if it had been published."""
        publisher = self.dataPublisher
        if not self.outputChannel or publisher is None:
            return  # no output channel: nothing to publish to (as updateOutputChannel)
        errors = getattr(publisher, "nErrors", 0)
        publisher.updateOutputChannel(pv)
        if getattr(publisher, "nErrors", 0) != errors:
            raise RuntimeError(f"PvaPy's publisher could not update {self.outputChannel} (its log says why)")

    def stats_source(self) -> _StatsView:
        return _StatsView(self.pipeline, *self.pipeline.counts())

    def stop(self):
        # PvaPy has stopped this consumer's PVA server by now: what is still held reaches
        # no client, so it is counted as dropped (stopping), not published.
        self.pipeline.stop(outputs_closed=True)
        for pv in self._receiver_records():  # what PvaPy still holds for this consumer: dropped, and counted
            self.pipeline.discard(pv)
        # Printed like the framework's own statistics reports: visible at any log level.
        print(f"consumer {self.processor_id} final statistics: {self.pipeline.summary()}", flush=True)

    def process(self, pvObject):
        keep_thread_state()  # PvaPy's receive thread keeps its Python state between frames
        self.io_threads.poll()  # at most once a second: connections made since (a new client of the output)
        self.pipeline.submit(pvObject)
        return None

    def configure(self, configDict):
        # A ValueError reaches the control channel as "Configuration failed: ...". PvaPy's
        # controller, our caller, has already taken the request's objectIdOffset and
        # nSequentialUpdates: the pipeline gives them back unless it accepts the request
        # (an objectIdOffset of 0 it refuses made PvaPy's count divide every frame by zero).
        controller = calling_controller(sys._getframe(1), self, "objectIdOffset", "nSequentialUpdates")
        try:
            self.pipeline.configure(configDict, None if controller is None else partial(_set_pattern, controller))
        except ValueError as exc:  # messages quote at most a short prefix of any value
            self.logger.error("configuration refused, nothing changed: %s", exc)
            raise

    def resetStats(self):
        self.count_stats_reset()
        self.pipeline.reset_stats()

    def getOutputPvObjectType(self, pvObject):
        return output_pv_type()


class InferPtychoNNImageProcessor(PtychoNNProcessor):
    """Drop-in for edgePtychoNN's processor class: accepts ``bsz`` and ``onnx_mdl``."""

    ARG_ALIASES = SEED_ALIASES
