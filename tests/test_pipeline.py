"""The consumer pipeline with a real engine and real NTNDArrays, publishing into a list."""

import logging
import threading
import time

import numpy as np
import pytest

from edge_ptychonn.stream.config import model_identity, parse_processor_args
from edge_ptychonn.stream.frames import CODEC_PACKAGES
from edge_ptychonn.stream.pipeline import InferencePipeline, runs_in_receive
from edge_ptychonn.stream.preprocess import preprocess
from engines import EngineOptions, create_engine
from frames_util import bool_frame, colour_frame, compressed_frame, empty_frame, good_frame
from model_util import export_small_model


class Published(list):
    """Copies what the pipeline publishes (it reuses one output PvObject); ``model_ids``
    holds each output's modelId attribute."""

    def __init__(self):
        super().__init__()
        self.model_ids = []
        self.threads = []  # the name of the thread that published each output

    def __call__(self, pv):
        self.threads.append(threading.current_thread().name)
        image = np.array(pv["value"][0]["floatValue"]).reshape(pv["dimension"][1]["size"], pv["dimension"][0]["size"])
        self.append((pv["uniqueId"], image, pv["timeStamp"], [a["name"] for a in pv["attribute"]]))
        self.model_ids.append(next((a["value"][0]["value"] for a in pv["attribute"] if a["name"] == "modelId"), None))

    def wait(self, n, timeout_s=20.0):
        deadline = time.monotonic() + timeout_s
        while len(self) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self)


def make_pipeline(model, **args):
    config, _ = parse_processor_args({"modelPath": str(model), "engine": "onnxruntime", "cpuThreads": 1, **args})
    published = Published()
    pipeline = InferencePipeline(config, published)
    factory = lambda: create_engine("onnxruntime", EngineOptions(model, max_batch=config.batch_size, cpu_threads=1))
    return pipeline, published, factory


def frames(rng, n, hw=(64, 64)):
    return rng.poisson(30, (n, *hw)).astype(np.int16)


RUNNERS = pytest.mark.parametrize("runner", ["thread", "receive"])


@RUNNERS
def test_every_frame_once_in_order_with_the_engines_result(small_model, rng, runner):
    pipeline, published, factory = make_pipeline(small_model, batchTimeout=0.05, batchRunner=runner)
    pipeline.start(factory)
    assert pipeline.batch_runner == {"thread": "inference", "receive": "receive"}[runner]
    images = frames(rng, 21)
    inputs = [good_frame(100 + i, img, energy_kev=8.0) for i, img in enumerate(images)]
    for pv in inputs:
        pipeline.submit(pv)
    assert published.wait(21) == 21  # the last 5 come after batchTimeout
    pipeline.stop()
    assert [p[0] for p in published] == list(range(100, 121))
    # The two full batches run where the batch runner says; the partial one on the inference
    # thread, after its timeout (no frame came to fill it).
    full = "ptychonn-infer" if runner == "thread" else threading.current_thread().name
    assert published.threads == [full] * 16 + ["ptychonn-infer"] * 5
    reference = create_engine("onnxruntime", EngineOptions(small_model, max_batch=1, cpu_threads=1))
    model_inputs = preprocess(images, pipeline.config.preprocess)[:, None]
    for (_, image, _, _), x in zip(published, model_inputs):
        np.testing.assert_allclose(image, reference.infer(x[None])[0, 0], atol=1e-5)
    for (uid, _, ts, names), pv in zip(published, inputs):
        assert ts == pv["timeStamp"]
        assert names == ["ColorMode", "EnergyKeV", "modelId"]
    assert set(published.model_ids) == {model_identity(small_model)} and pipeline.model_id == model_identity(small_model)
    stats = pipeline.stats
    assert (stats.received, stats.published, stats.batches, stats.partial_batches) == (21, 21, 3, 1)
    assert stats.dropped_total == 0 and stats.bad_total == 0 and stats.unaccounted(pipeline.queued_frames) == 0
    p50, p99 = stats.recent.latency_percentiles_ms()
    assert 0 < p50 <= p99
    assert stats.recent.frame_rate_hz() > 0 and stats.recent.infer_rate_hz() > 0


def test_bad_frames_are_counted_by_kind_and_good_ones_still_flow(small_model, rng):
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, batchTimeout=0.05)
    pipeline.start(factory)
    good = frames(rng, 6)
    pipeline.submit(good_frame(1, good[0]))
    pipeline.submit(good_frame(2, frames(rng, 1, (32, 32))[0]))  # wrong size
    pipeline.submit(colour_frame(3))
    pipeline.submit(empty_frame(4))
    pipeline.submit(bool_frame(5))
    pipeline.submit(compressed_frame(6, "zstd", good[1]))  # unsupported codec
    for i in range(1, 6):
        pipeline.submit(good_frame(6 + i, good[i]))
    assert published.wait(6) == 6
    pipeline.stop()
    assert [p[0] for p in published] == [1, 7, 8, 9, 10, 11]
    assert pipeline.stats.bad == {"empty": 1, "colour": 1, "dtype": 1, "codec": 1, "shape": 1, "malformed": 0,
                                  "nonfinite": 0}
    assert pipeline.stats.received == 11 and pipeline.stats.dropped_total == 0
    assert pipeline.stats.unaccounted(pipeline.queued_frames) == 0


def test_a_frame_of_another_size_is_logged_with_the_crop_and_bin_that_failed(small_model, rng, caplog):
    """The log names the frame and model sizes, the crop and bin, and what went wrong; before,
    it ended in the whole preprocessing settings' repr (normalize, referenceTotal, ...), and
    did not say what the frame became."""
    import logging

    pipeline, published, factory = make_pipeline(small_model, batchSize=2, crop=[128, 128], bin=2)
    pipeline.start(factory)
    with caplog.at_level(logging.ERROR):
        pipeline.submit(good_frame(1, frames(rng, 1, (128, 130))[0]))  # crop 128x128, bin 2: 64x64
        pipeline.submit(good_frame(2, frames(rng, 1, (100, 100))[0]))  # the crop does not fit
        pipeline.submit(good_frame(3, frames(rng, 1, (130, 130))[0]))
    assert published.wait(2) == 2
    pipeline.stop()
    assert pipeline.stats.bad["shape"] == 1 and [p[0] for p in published] == [1, 3]
    message = next(r.getMessage() for r in caplog.records if "bad frame (shape)" in r.getMessage())
    assert ("a 100x100 frame does not become the model's 64x64 input with crop [128, 128] and bin 2 "
            "(crop 128x128 at (-14, -14) does not fit a 100x100 frame)") in message, message
    assert "PreprocessConfig" not in message


@pytest.mark.parametrize("codec", ["blosc", "bslz4"])
def test_missing_codec_package_is_counted(small_model, rng, monkeypatch, codec):
    package = CODEC_PACKAGES[codec]
    pytest.importorskip("lz4")
    pytest.importorskip(package)  # to compress the frame; the codecs extra has it
    from pvapy.utility import adImageUtility

    pipeline, published, factory = make_pipeline(small_model, batchSize=2)
    pipeline.start(factory)
    image = frames(rng, 2)
    missing = compressed_frame(2, codec, image[1])
    # pvapy keeps each codec's package as a module global only where it is installed: without the
    # global, decoding is what it is on a host that lacks the package
    monkeypatch.delattr(adImageUtility, package)
    pipeline.submit(compressed_frame(1, "lz4", image[0]))  # installed: decoded
    pipeline.submit(missing)  # package missing: counted
    pipeline.submit(good_frame(3, image[1]))
    assert published.wait(2) == 2
    pipeline.stop()
    assert [p[0] for p in published] == [1, 3]
    assert pipeline.stats.bad["codec"] == 1


@RUNNERS
def test_frames_before_start_are_kept_up_to_the_bound(small_model, rng, runner):
    """Kept, then published once the engine runs, though no frame comes after: with batchRunner
    receive too, whose full batch the inference thread takes once no frame came for HANDOVER_S."""
    pipeline, published, factory = make_pipeline(small_model, maxPendingFrames=5, batchSize=4, batchRunner=runner)
    for i, img in enumerate(frames(rng, 7)):
        pipeline.submit(good_frame(i + 1, img))
    assert pipeline.stats.dropped["notReady"] == 2 and pipeline.queued_frames == 5
    pipeline.start(factory)
    assert pipeline.batch_runner == {"thread": "inference", "receive": "receive"}[runner]
    assert published.wait(5) == 5
    pipeline.stop()
    assert [p[0] for p in published] == [1, 2, 3, 4, 5]


def test_frames_kept_before_start_beyond_the_batch_buffers_are_all_published(small_model, rng):
    """maxPendingFrames may exceed what the batch buffers hold ((queueBatches + 2) x
    batchSize, here 12): the kept frames go to inference as buffers come free, in order,
    and frames that arrive meanwhile follow them."""
    pipeline, published, factory = make_pipeline(small_model, maxPendingFrames=40, batchSize=4, queueBatches=1)
    images = frames(rng, 50)
    for uid in range(1, 46):
        pipeline.submit(good_frame(uid, images[uid - 1]))
    assert pipeline.stats.dropped["notReady"] == 5 and pipeline.queued_frames == 40
    pipeline.start(factory)
    deadline = time.monotonic() + 20
    while pipeline.queued_frames > 4 and time.monotonic() < deadline:  # room again
        time.sleep(0.01)
    for uid in range(46, 51):
        pipeline.submit(good_frame(uid, images[uid - 1]))
    assert published.wait(45) == 45
    pipeline.stop()
    assert [p[0] for p in published] == [*range(1, 41), *range(46, 51)]
    stats = pipeline.stats
    assert stats.dropped == {"overload": 0, "notReady": 5, "stopping": 0, "reconnect": 0}
    assert stats.unaccounted(pipeline.queued_frames) == 0


@RUNNERS
def test_stop_flushes_the_partial_batch(small_model, rng, runner):
    pipeline, published, factory = make_pipeline(small_model, batchTimeout=60, batchRunner=runner)
    pipeline.start(factory)
    for i, img in enumerate(frames(rng, 3)):
        pipeline.submit(good_frame(i + 1, img))
    time.sleep(0.2)
    assert len(published) == 0  # waiting for the 60 s timeout
    pipeline.stop()
    assert [p[0] for p in published] == [1, 2, 3]
    pipeline.submit(good_frame(4, frames(rng, 1)[0]))
    assert pipeline.stats.dropped["stopping"] == 1  # after stop: counted, not lost silently


def test_configure_validates_before_changing(small_model, rng):
    pipeline, published, factory = make_pipeline(small_model, batchTimeout=60)
    pipeline.start(factory)
    with pytest.raises(ValueError, match="cannot change engine"):
        pipeline.configure({"engine": "torch", "batchTimeout": 0.01})
    assert pipeline.config.batch_timeout_s == 60
    pipeline.submit(good_frame(1, frames(rng, 1)[0]))
    pipeline.configure({"batchTimeout": 0.01})
    assert published.wait(1, timeout_s=5) == 1  # the new timeout applies to the waiting batch
    pipeline.stop()


def test_a_change_that_leaves_the_normalisation_keeps_its_running_mean(small_model, rng):
    """The running mean describes the detector's frames, not the settings: a batchTimeout
    (or offset, scale, transform, model) change must not restart it."""
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, normalize="running",
                                                  referenceTotal=1e5, normalizeWindow=64)
    pipeline.start(factory)
    images = frames(rng, 16) * np.repeat([1, 3], 8)[:, None, None].astype(np.int16)  # the dose triples
    for i in range(8):
        pipeline.submit(good_frame(i + 1, images[i]))
    assert published.wait(8) == 8
    pipeline.configure({"batchTimeout": 0.2})
    for i in range(8, 16):
        pipeline.submit(good_frame(i + 1, images[i]))
    assert published.wait(16) == 16
    pipeline.stop()
    reference = create_engine("onnxruntime", EngineOptions(small_model, max_batch=16, cpu_threads=1))
    expected = reference.infer(preprocess(images, pipeline.config.preprocess)[:, None])[:, 0]  # one window
    for (uid, image, _, _), want in zip(published, expected):
        np.testing.assert_allclose(image, want, atol=1e-5, err_msg=f"frame {uid}")


class SlowEngine:
    """Wraps an engine; each batch waits until the test lets it go."""

    def __init__(self, engine):
        self._engine, self.go = engine, threading.Event()
        self.name, self.device, self.precision = "slow", "cpu", "fp32"
        self.input_shape, self.max_batch = engine.input_shape, engine.max_batch

    def infer(self, batch):
        self.go.wait(30)
        return self._engine.infer(batch)

    def close(self):
        self._engine.close()


def test_overload_drops_at_the_door_without_waiting_and_recovers(small_model, rng):
    """With every buffer full, submit() returns at once and counts the drop; once the
    engine catches up, every frame is published again (the first-round lock-up)."""
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, queueBatches=2, batchTimeout=0.05)
    slow = SlowEngine(factory())
    pipeline.start(lambda: slow)
    images = frames(rng, 40)
    t0 = time.perf_counter()
    for i in range(40):  # 4 buffers of 4 frames: 16 fit, 24 are dropped
        pipeline.submit(good_frame(i + 1, images[i]))
    assert time.perf_counter() - t0 < 2.0  # nothing waited for the blocked engine
    stats = pipeline.stats
    assert stats.dropped["overload"] == 24 and pipeline.queued_frames == 16
    assert stats.unaccounted(pipeline.queued_frames) == 0
    slow.go.set()
    assert published.wait(16) == 16
    for i in range(40, 48):  # load below capacity: lossless again
        pipeline.submit(good_frame(i + 1, frames(rng, 1)[0]))
    assert published.wait(24) == 24
    pipeline.stop()
    assert [p[0] for p in published] == list(range(1, 17)) + list(range(41, 49))
    assert stats.dropped["overload"] == 24 and stats.unaccounted(0) == 0


def test_overload_drops_read_only_the_unique_id(small_model, rng):
    """With no buffer free a frame is dropped before it is decoded (cheap for the
    interpreter the inference thread shares): a wrong-size frame then counts as
    dropped, not bad; a (re)connect record is still no frame; ids are still tracked."""
    from frames_util import no_image_record

    pipeline, published, factory = make_pipeline(small_model, batchSize=4, queueBatches=2, batchTimeout=0.05)
    slow = SlowEngine(factory())
    pipeline.start(lambda: slow)
    images = frames(rng, 16)
    for i in range(16):  # every buffer full
        pipeline.submit(good_frame(i + 1, images[i]))
    pipeline.submit(good_frame(17, frames(rng, 1, (32, 32))[0]))  # wrong size: not looked at
    pipeline.submit(no_image_record(0))  # not a frame, not a restart
    pipeline.submit(good_frame(20, images[0]))  # 18 and 19 never arrived
    stats = pipeline.stats
    assert stats.dropped["overload"] == 2 and stats.bad_total == 0 and stats.empty_records == 1
    assert (stats.received, stats.ids.missed, stats.ids.restarts) == (18, 2, 0)
    slow.go.set()
    assert published.wait(16) == 16
    pipeline.submit(good_frame(21, frames(rng, 1, (32, 32))[0]))  # room again: inspected, bad
    pipeline.stop()
    assert stats.bad["shape"] == 1 and stats.unaccounted(0) == 0


def test_nonfinite_pixels_are_bad_frames_and_never_published(small_model, rng):
    from frames_util import float_frame

    pipeline, published, factory = make_pipeline(small_model, batchSize=2, batchTimeout=0.05)
    pipeline.start(factory)
    good = frames(rng, 3).astype(np.float32)
    nan, inf = good[0].copy(), good[0].copy()
    nan[5, 5], inf[0, 0] = np.nan, -np.inf
    for uid, image in enumerate([nan, good[0], inf, good[1], good[2]], start=1):
        pipeline.submit(float_frame(uid, image))
    assert published.wait(3) == 3
    pipeline.stop()
    assert [p[0] for p in published] == [2, 4, 5]
    assert all(np.isfinite(p[1]).all() for p in published)
    assert pipeline.stats.bad["nonfinite"] == 2 and pipeline.stats.unaccounted(0) == 0


def test_nonfinite_engine_outputs_are_counted_not_published(small_model, rng):
    pipeline, published, factory = make_pipeline(small_model, batchSize=2, batchTimeout=0.05)
    engine = factory()
    real_infer = engine.infer

    def half_nan(batch):
        out = real_infer(batch)
        out[0, 0, 0, 0] = np.nan
        return out

    engine.infer = half_nan
    pipeline.start(lambda: engine)
    for uid, image in enumerate(frames(rng, 4), start=1):
        pipeline.submit(good_frame(uid, image))
    assert published.wait(2) == 2
    pipeline.stop()
    assert [p[0] for p in published] == [2, 4]
    assert pipeline.stats.nonfinite_outputs == 2 and pipeline.stats.unaccounted(0) == 0
    # the stop's summary line says which: not inference errors (the engine ran)
    assert "inference errors 0, non-finite outputs 2," in pipeline.summary()


def test_engine_outputs_of_the_wrong_shape_are_inference_errors_and_later_batches_flow(small_model, rng):
    """A batch whose outputs the pipeline cannot use (here one row too many, then no channel
    axis) counts as inference errors with the reason; before, the exception ended the inference
    thread, and every later frame stayed queued for ever (then was dropped as overload)."""
    pipeline, published, factory = make_pipeline(small_model, batchSize=3, batchTimeout=0.05)
    engine = factory()
    real_infer, calls = engine.infer, []

    def odd_outputs(batch):
        calls.append(len(batch))
        out = real_infer(batch)
        if len(calls) == 1:
            return np.concatenate([out, out[:1]])
        return out[:, 0] if len(calls) == 2 else out

    engine.infer = odd_outputs
    pipeline.start(lambda: engine)
    for uid, image in enumerate(frames(rng, 9), start=1):
        pipeline.submit(good_frame(uid, image))
    assert published.wait(3, timeout_s=10) == 3
    alive = pipeline._thread.is_alive()
    pipeline.stop()
    assert alive
    assert [p[0] for p in published] == [7, 8, 9]
    stats = pipeline.stats
    assert stats.inference_errors == 6 and stats.publish_errors == 0 and pipeline.queued_frames == 0
    assert stats.unaccounted(0) == 0


def test_reconnect_records_are_not_frames_and_restarts_are_counted(small_model, rng):
    from frames_util import no_image_record

    pipeline, published, factory = make_pipeline(small_model, batchSize=2, batchTimeout=0.05)
    pipeline.start(factory)
    images = frames(rng, 4)
    pipeline.submit(good_frame(1, images[0]))
    pipeline.submit(good_frame(2, images[1]))
    pipeline.submit(good_frame(5, images[1]))  # 3 and 4 never arrived
    pipeline.submit(no_image_record(0))  # the upstream server restarted
    pipeline.submit(good_frame(1, images[2]))
    pipeline.submit(good_frame(2, images[3]))
    assert published.wait(5) == 5
    pipeline.stop()
    s = pipeline.stats
    assert (s.bad_total, s.empty_records, s.ids.missed, s.ids.restarts) == (0, 1, 2, 1)
    assert s.completeness() == pytest.approx(5 / 7)


@RUNNERS
def test_drain_publishes_the_partial_batch_now(small_model, rng, runner):
    pipeline, published, factory = make_pipeline(small_model, batchTimeout=60, batchRunner=runner)
    pipeline.start(factory)
    for uid, image in enumerate(frames(rng, 3), start=1):
        pipeline.submit(good_frame(uid, image))
    assert pipeline.drain(5.0)
    assert [p[0] for p in published] == [1, 2, 3]
    pipeline.stop()


class GatedEngine(SlowEngine):
    """Wraps an engine; each batch waits for a permit (``gate.release(n)`` lets n through)."""

    def __init__(self, engine):
        super().__init__(engine)
        self.gate = threading.Semaphore(0)

    def infer(self, batch):
        self.gate.acquire(timeout=30)
        return self._engine.infer(batch)


def test_drain_waits_only_for_the_frames_held_when_it_is_called(small_model, rng):
    """Under a load that keeps the queue full (SIGTERM during a fast scan), drain() returns
    once the frames it found are published, not at its timeout."""
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, batchTimeout=60)
    engine = GatedEngine(factory())
    pipeline.start(lambda: engine)
    images = frames(rng, 18)
    for uid in range(1, 11):  # two full batches and a partial one
        pipeline.submit(good_frame(uid, images[uid - 1]))
    result = []
    drainer = threading.Thread(target=lambda: result.append(pipeline.drain(20.0)))
    t0 = time.monotonic()
    drainer.start()
    deadline = time.monotonic() + 10
    while pipeline.stats.partial_batches == 0 and time.monotonic() < deadline:  # drain flushed the partial batch
        time.sleep(0.01)
    for uid in range(11, 19):  # frames go on arriving: two more batches, held by the engine
        pipeline.submit(good_frame(uid, images[uid - 1]))
    engine.gate.release(3)  # the three batches that drain() found
    drainer.join(30)
    try:
        assert result == [True] and time.monotonic() - t0 < 10
        assert [p[0] for p in published] == list(range(1, 11))
    finally:
        engine.gate.release(100)
        pipeline.stop()


def test_a_stop_that_finds_inference_busy_counts_what_is_left_as_dropped(small_model, rng):
    """The output server has stopped and a batch is still in the engine after stop()'s
    wait: the final statistics count those frames as dropped (stopping), once."""
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, batchTimeout=60)
    engine = GatedEngine(factory())
    pipeline.start(lambda: engine)
    for uid, image in enumerate(frames(rng, 6), start=1):  # a full batch in the engine, 2 frames waiting
        pipeline.submit(good_frame(uid, image))
    t0 = time.monotonic()
    pipeline.stop(timeout_s=0.3, outputs_closed=True)
    assert time.monotonic() - t0 < 5
    stats = pipeline.stats
    assert stats.dropped["stopping"] == 6 and pipeline.queued_frames == 0 and stats.unaccounted(0) == 0
    engine.gate.release(100)  # the engine finishes after all: nothing counted twice, nothing published
    pipeline._thread.join(10)
    assert stats.dropped["stopping"] == 6 and stats.published == 0 and len(published) == 0
    assert stats.unaccounted(pipeline.queued_frames) == 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"bogus": 1}, "cannot change bogus at run time"),
        ({"scale": "big"}, "scale must be a finite number"),
        ({"scale": -1}, "scale must be > 0"),
        ({"batchTimeout": 1e9}, "batchTimeout must be 0.001..60"),
        ("{not json", "configure expects a JSON object"),
        ({"transform": "x" * 1_000_000}, "transform must be one of"),
        ({"k" * 1_000_000: 1}, "cannot change"),
    ],
    ids=["unknown", "type", "range", "timeout", "invalid-json", "1MB-value", "1MB-key"],
)
def test_configure_refuses_with_a_short_message_and_changes_nothing(small_model, rng, changes, message):
    pipeline, published, factory = make_pipeline(small_model, batchTimeout=0.05)
    pipeline.start(factory)
    before = pipeline.config
    with pytest.raises(ValueError, match=message) as refused:
        pipeline.configure(changes)
    assert len(str(refused.value)) < 300
    assert pipeline.config == before
    pipeline.submit(good_frame(1, frames(rng, 1)[0]))
    assert published.wait(1) == 1  # frames keep flowing
    pipeline.stop()


def assert_the_engines_results(published, images, pipeline, model):
    """Each published image is the model's result for its input (``images[uid - 1]``)."""
    reference = create_engine("onnxruntime", EngineOptions(model, max_batch=1, cpu_threads=1))
    model_inputs = preprocess(images, pipeline.config.preprocess)[:, None]
    for uid, image, _, _ in published:
        np.testing.assert_allclose(image, reference.infer(model_inputs[uid - 1][None])[0, 0], atol=1e-5)


def receive_pipeline(model, monkeypatch, engine_class):
    """A batchRunner receive pipeline (batches of 4, no timeout) started on ``engine_class``
    around the model's engine; thread crashes are collected in the returned list."""
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    pipeline, published, factory = make_pipeline(model, batchSize=4, batchTimeout=60, batchRunner="receive")
    engine = engine_class(factory())
    pipeline.start(lambda: engine)
    return pipeline, published, engine, crashes


class AsyncEngine:
    """Wraps an engine behind submit/collect (as the GPU engines do) and records the
    order of calls; results are computed at collect, with at most two in flight."""

    max_in_flight = 2

    def __init__(self, engine, fail_batch: int | None = None, gate=None):
        self._engine, self.calls, self._pending, self.gate = engine, [], [], gate
        self.name, self.device, self.precision = "async", "cpu", "fp32"
        self.input_shape, self.max_batch = engine.input_shape, engine.max_batch
        self._fail_batch, self._seq = fail_batch, 0
        self.closed = False

    def infer(self, batch):  # not used by the pipeline when submit/collect exist
        raise AssertionError("infer() called on an engine with submit/collect")

    def submit(self, batch):
        assert len(self._pending) < self.max_in_flight
        self._seq += 1
        self.calls.append(("submit", self._seq))
        self._pending.append((self._seq, batch.copy()))
        return self._seq

    def collect(self, ticket):
        if self.gate is not None:
            assert self.gate.wait(30)  # the test decides when results come back
        seq, batch = self._pending.pop(0)
        assert seq == ticket, "collected out of order"
        self.calls.append(("collect", seq))
        if seq == self._fail_batch:
            raise RuntimeError("device lost")
        return self._engine.infer(batch)

    def close(self):
        self.closed = True
        self._engine.close()


def test_async_engines_overlap_the_next_batch_with_publishing(small_model, rng, monkeypatch):
    """Engines with submit/collect get batch k+1 submitted before batch k is published;
    every frame still comes out once, in order, with the engine's result, a failed
    batch is counted, not lost, and the inference thread ends cleanly at stop."""
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, queueBatches=8, batchTimeout=0.05)
    engine = AsyncEngine(factory(), fail_batch=3)
    images = frames(rng, 30)
    for i in range(30):  # kept until start(), then batched at once: several batches wait
        pipeline.submit(good_frame(i + 1, images[i]))
    pipeline.start(lambda: engine)
    assert pipeline.drain(20)
    pipeline.stop()
    assert not pipeline._thread.is_alive() and engine.closed
    assert not crashes, crashes[0].exc_value if crashes else None
    ids = [p[0] for p in published]
    assert ids == [i for i in range(1, 31) if not 9 <= i <= 12]  # batch 3 (ids 9..12) failed
    stats = pipeline.stats
    assert stats.inference_errors == 4 and stats.published == 26 and stats.unaccounted(0) == 0
    submits = [seq for call, seq in engine.calls if call == "submit"]
    assert submits == list(range(1, 9))  # 7 full batches and the flushed partial one
    # Overlap: some batch was submitted before its predecessor was collected.
    order = {call: i for i, call in enumerate(engine.calls)}
    assert any(order[("submit", k + 1)] < order[("collect", k)] for k in range(1, 8))
    assert_the_engines_results(published, images, pipeline, small_model)


def test_the_receive_runner_runs_each_full_batch_in_the_thread_that_filled_it(small_model, rng, monkeypatch):
    """batchRunner receive: the thread that submits the frame that fills a batch runs it, to the
    publish, before submit() returns (an asynchronous engine's too); the partial batch is the
    inference thread's, at its timeout or drain()."""
    pipeline, published, engine, crashes = receive_pipeline(small_model, monkeypatch, AsyncEngine)
    images = frames(rng, 30)
    for i in range(30):
        pipeline.submit(good_frame(i + 1, images[i]))
        assert len(published) == (i + 1) // 4 * 4  # each full batch published before submit() returned
    assert engine.calls == [(call, k) for k in range(1, 8) for call in ("submit", "collect")]
    assert pipeline.drain(20)
    pipeline.stop()
    assert not crashes, crashes[0].exc_value if crashes else None
    assert [p[0] for p in published] == list(range(1, 31))
    me = threading.current_thread().name
    assert published.threads == [me] * 28 + ["ptychonn-infer"] * 2
    assert_the_engines_results(published, images, pipeline, small_model)
    assert pipeline.stats.published == 30 and pipeline.stats.unaccounted(0) == 0


class PollingEngine(AsyncEngine):
    """An asynchronous engine that can be asked whether a batch is done (as the GPU engines:
    their event's query); the test says which batches the "GPU" has finished."""

    def __init__(self, engine):
        super().__init__(engine)
        self.finished: set[int] = set()
        self.collected_by: list[str] = []

    def done(self, ticket):
        return ticket in self.finished

    def collect(self, ticket):
        self.collected_by.append(threading.current_thread().name)
        return super().collect(ticket)


def test_the_receive_runner_leaves_a_gpu_batch_in_flight_and_receives_meanwhile(small_model, rng, monkeypatch):
    """batchRunner receive on an engine with done(): the receive thread submits the batch it filled
    and goes back to receiving; it publishes it at a later frame once it is done, or when the next
    batch finds the engine full; once no frame comes for HANDOVER_S the inference thread does.
    HANDOVER_S is made 0.5 s here: on a loaded machine the test's own steps took longer than its 5 ms."""
    import edge_ptychonn.stream.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "HANDOVER_S", 0.5)
    pipeline, published, engine, crashes = receive_pipeline(small_model, monkeypatch, PollingEngine)
    images = frames(rng, 16)
    me = threading.current_thread().name
    send = lambda uids: [pipeline.submit(good_frame(uid, images[uid - 1])) for uid in uids]  # noqa: E731
    send(range(1, 5))  # batch 1 submitted, not done: left in flight
    assert engine.calls == [("submit", 1)] and len(published) == 0
    engine.finished.add(1)  # the GPU finishes it
    send([5])  # the next frame publishes it
    assert [p[0] for p in published] == [1, 2, 3, 4] and engine.collected_by == [me]
    send(range(6, 13))  # batch 2 (not done) and batch 3: the engine is full, so batch 2 is collected
    assert engine.calls[2:] == [("submit", 2), ("submit", 3), ("collect", 2)]
    assert len(published) == 8 and engine.collected_by == [me, me]
    # no more frames: after HANDOVER_S the inference thread collects batch 3
    assert published.wait(12) == 12
    assert engine.collected_by == [me, me, "ptychonn-infer"]
    assert published.threads == [me] * 8 + ["ptychonn-infer"] * 4
    send(range(13, 17))
    assert pipeline.drain(20)
    pipeline.stop()
    assert not crashes, crashes[0].exc_value if crashes else None
    assert [p[0] for p in published] == list(range(1, 17))
    assert_the_engines_results(published, images, pipeline, small_model)
    assert pipeline.stats.published == 16 and pipeline.stats.unaccounted(0) == 0


class TimedGpu(PollingEngine):
    """A polling engine whose batches are done a set time after they were submitted (a GPU's
    latency); collect() waits for that, as a CUDA event's synchronize does."""

    def __init__(self, engine, latency_s):
        super().__init__(engine)
        self.latency_s, self._ready_at = latency_s, {}

    def submit(self, batch):
        ticket = super().submit(batch)
        self._ready_at[ticket] = time.monotonic() + self.latency_s
        return ticket

    def done(self, ticket):
        return time.monotonic() >= self._ready_at[ticket]

    def collect(self, ticket):
        time.sleep(max(self._ready_at.pop(ticket) - time.monotonic(), 0.0))
        return super().collect(ticket)


def test_gpu_batches_left_in_flight_come_out_once_in_order_whatever_the_frame_gaps(small_model, rng, monkeypatch):
    """The receive thread and the inference thread hand batches left in flight back and forth
    (frames in bursts, gaps shorter and longer than HANDOVER_S, a GPU latency of 2 ms, partial
    batches at the timeout): every frame is published once, in order, with its own result."""
    pipeline, published, engine, crashes = receive_pipeline(small_model, monkeypatch,
                                                            lambda e: TimedGpu(e, latency_s=0.002))
    pipeline.configure({"batchTimeout": 0.02})
    n = 240
    images = frames(rng, n)
    gaps = rng.choice([0.0, 0.0, 0.0, 0.001, 0.004, 0.012, 0.03], size=n)
    for uid in range(1, n + 1):
        pipeline.submit(good_frame(uid, images[uid - 1]))
        time.sleep(gaps[uid - 1])
    assert pipeline.drain(20)
    pipeline.stop()
    assert not crashes, crashes[0].exc_value if crashes else None
    assert [p[0] for p in published] == list(range(1, n + 1))
    assert {"ptychonn-infer", threading.current_thread().name} <= set(engine.collected_by)  # both threads did
    assert_the_engines_results(published, images, pipeline, small_model)
    assert pipeline.stats.published == n and pipeline.stats.unaccounted(0) == 0


def test_the_receive_runner_does_not_wait_for_the_inference_thread_while_a_buffer_is_free(small_model, rng):
    """While the inference thread runs a batch (a partial one, after its timeout) on a slow
    engine, the receive thread does not wait for it: the frames it receives are batched and
    queued, and run, in order, once the engine is free."""
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, queueBatches=8, batchTimeout=0.05,
                                                 batchRunner="receive")
    engine = GatedEngine(factory())
    pipeline.start(lambda: engine)
    images = frames(rng, 14)
    for uid in (1, 2):  # a partial batch: the inference thread takes it after 0.05 s and waits in the engine
        pipeline.submit(good_frame(uid, images[uid - 1]))
    assert wait_for(lambda: pipeline.stats.partial_batches == 1 and pipeline._work_lock.locked())
    t0 = time.perf_counter()
    for uid in range(3, 15):  # three full batches
        pipeline.submit(good_frame(uid, images[uid - 1]))
    assert time.perf_counter() - t0 < 2.0  # none waited for the gated engine
    assert pipeline.queued_frames == 14 and len(published) == 0
    engine.gate.release(100)
    assert published.wait(14) == 14
    pipeline.stop()
    assert [p[0] for p in published] == list(range(1, 15))
    assert pipeline.stats.dropped_total == 0 and pipeline.stats.unaccounted(0) == 0


def test_with_every_buffer_taken_the_receive_runner_waits_for_the_inference_threads_batch(small_model, rng):
    """batchRunner receive: the inference thread holds the work lock for one batch at a time. A
    frame that finds every buffer taken by batches queued behind it waits for that batch, then
    the receive thread runs the queue itself: frames wait (upstream, in a consumer), none is
    dropped."""
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, queueBatches=1, batchTimeout=0.05,
                                                 batchRunner="receive")  # 3 buffers
    engine = GatedEngine(factory())
    pipeline.start(lambda: engine)
    images = frames(rng, 14)
    for uid in (1, 2):  # the inference thread's partial batch, held in the engine
        pipeline.submit(good_frame(uid, images[uid - 1]))
    assert wait_for(lambda: pipeline.stats.partial_batches == 1 and pipeline._work_lock.locked())
    sender = threading.Thread(target=lambda: [pipeline.submit(good_frame(uid, images[uid - 1]))
                                              for uid in range(3, 15)])
    sender.start()
    assert wait_for(lambda: pipeline.queued_frames == 10)  # two full batches queued; frame 11 waits
    sender.join(0.3)
    assert sender.is_alive() and pipeline.stats.dropped_total == 0 and len(published) == 0
    engine.gate.release(100)
    sender.join(20)
    assert not sender.is_alive()
    assert published.wait(14) == 14
    pipeline.stop()
    assert [p[0] for p in published] == list(range(1, 15))
    assert pipeline.stats.dropped_total == 0 and pipeline.stats.unaccounted(0) == 0


class _Device:
    def __init__(self, device, computes_model=True):
        from engines.base import EngineSpec

        self.device = device
        self.SPEC = EngineSpec(name="x", summary="", devices=("cpu", "cuda"), precisions=("fp32",),
                               computes_model=computes_model)


@pytest.mark.parametrize("setting, engine, receive", [
    ("auto", _Device("cpu (2 workers x 1 thread)"), False),
    ("auto", _Device("cuda:0"), True),
    ("auto", _Device("cpu", computes_model=False), True),  # the zero-cost engine
    ("thread", _Device("cuda:0"), False),
    ("receive", _Device("cpu"), True),
])
def test_which_thread_runs_the_batches(setting, engine, receive):
    assert runs_in_receive(setting, engine) is receive


def test_auto_runs_the_zero_engines_batches_in_the_receive_thread_and_says_so(small_model, caplog):
    pipeline, _, _ = make_pipeline(small_model, engine="zero")
    with caplog.at_level("INFO"):
        pipeline.start(lambda: create_engine("zero", EngineOptions(small_model, max_batch=8)))
    pipeline.stop()
    assert pipeline.batch_runner == "receive"
    assert any("batches run in the receive thread (batchRunner auto)" in r.message for r in caplog.records)
    onnx, _, factory = make_pipeline(small_model)
    onnx.start(factory)
    onnx.stop()
    assert onnx.batch_runner == "inference"


# -- model swap (configure modelPath) ------------------------------------------------------


class Recorded:
    """Builds onnxruntime engines for any model and remembers them (and which were closed)."""

    def __init__(self, gate=None):
        self.built, self.gate = [], gate

    def __call__(self, model_path, id_pattern):
        if self.gate is not None:
            assert self.gate.wait(30)  # the test decides when the build ends
        engine = create_engine("onnxruntime", EngineOptions(model_path, max_batch=8, cpu_threads=1))
        engine.closed = False
        real_close = engine.close

        def close():
            engine.closed = True
            real_close()

        engine.close = close
        self.built.append(engine)
        return engine


def expected_outputs(model, images, pre):
    reference = create_engine("onnxruntime", EngineOptions(model, max_batch=1, cpu_threads=1))
    return [reference.infer(x[None, None])[0, 0] for x in preprocess(images, pre)]


@RUNNERS
def test_model_swap_switches_at_a_batch_boundary(small_model, model_b, rng, runner):
    """Frames preprocessed before configure run on model A, later ones on model B with B's
    card preprocessing; nothing lost or repeated; the old engine is closed; statistics agree."""
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, batchTimeout=60, batchRunner=runner)
    first = factory()
    pipeline.start(lambda: first, Recorded())
    pre_a = pipeline.config.preprocess
    images = frames(rng, 13)
    for uid in range(1, 7):  # one full batch and a partial one of 2 that only the switch sends
        pipeline.submit(good_frame(uid, images[uid - 1]))
    applied = pipeline.configure({"modelPath": str(model_b)})
    assert applied == {"modelPath": str(model_b)}
    for uid in range(7, 14):
        pipeline.submit(good_frame(uid, images[uid - 1]))
    assert pipeline.drain(10.0)
    pipeline.stop()
    assert [p[0] for p in published] == list(range(1, 14))
    id_a, id_b = model_identity(small_model), model_identity(model_b)
    assert id_b.startswith("model-b sha256:") and id_a != id_b
    assert published.model_ids == [id_a] * 6 + [id_b] * 7
    pre_b = pipeline.config.preprocess
    assert (pre_b.transform, pre_b.scale, pre_b.offset) == ("sqrt", 0.5, 0.0)  # from B's card
    want = expected_outputs(small_model, images[:6], pre_a) + expected_outputs(model_b, images[6:], pre_b)
    for (uid, image, _, _), expected in zip(published, want):
        np.testing.assert_allclose(image, expected, atol=1e-5, err_msg=f"frame {uid}")
    assert pipeline.config.model_path == model_b and pipeline.model_id == id_b
    assert pipeline.engine is not first and first._session is None  # the old engine was closed
    stats = pipeline.stats
    assert stats.published == 13 and stats.partial_batches == 2  # the switch's flush and drain's
    assert stats.unaccounted(pipeline.queued_frames) == 0


def test_request_keys_override_the_new_cards_preprocessing(small_model, model_b, rng):
    pipeline, published, factory = make_pipeline(small_model, batchSize=2, batchTimeout=0.05)
    pipeline.start(factory, Recorded())
    pipeline.configure({"modelPath": str(model_b), "scale": 0.25})
    pre = pipeline.config.preprocess
    assert (pre.transform, pre.scale) == ("sqrt", 0.25)
    pipeline.configure({"modelPath": str(small_model)})  # no card: the defaults, as at start-up
    pre = pipeline.config.preprocess
    assert (pre.transform, pre.scale, pre.offset) == ("none", 1.0, 0.0)
    pipeline.submit(good_frame(1, frames(rng, 1)[0]))
    assert published.wait(1) == 1 and published.model_ids == [model_identity(small_model)]
    pipeline.stop()


def test_a_slow_build_stalls_neither_receiving_nor_inference(small_model, model_b, rng):
    """While the new engine builds (held by the test), frames are taken and published by the
    old model at once, and another change is refused at once (before: it waited for the
    build, past its sender's timeout); the switch follows the build."""
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, batchTimeout=0.05)
    gate = threading.Event()
    pipeline.start(factory, Recorded(gate))
    images = frames(rng, 16)
    result = {}
    configure = threading.Thread(target=lambda: result.setdefault("applied", pipeline.configure({"modelPath": str(model_b)})))
    configure.start()
    t0 = time.perf_counter()
    for uid in range(1, 9):
        pipeline.submit(good_frame(uid, images[uid - 1]))
    assert time.perf_counter() - t0 < 1.0  # submit() never waited for the build
    assert published.wait(8) == 8  # published meanwhile, by model A
    assert configure.is_alive() and pipeline.config.model_path == small_model
    t0 = time.perf_counter()  # another change meanwhile: refused at once, with the reason
    with pytest.raises(ValueError, match="a new model's engine is being built"):
        pipeline.configure({"batchTimeout": 0.2})
    assert time.perf_counter() - t0 < 5 and pipeline.config.batch_timeout_s == 0.05
    gate.set()
    configure.join(30)
    assert result["applied"] == {"modelPath": str(model_b)}
    for uid in range(9, 17):
        pipeline.submit(good_frame(uid, images[uid - 1]))
    assert published.wait(16) == 16
    pipeline.stop()
    assert [p[0] for p in published] == list(range(1, 17))
    assert published.model_ids == [model_identity(small_model)] * 8 + [model_identity(model_b)] * 8


def test_reading_a_new_models_card_holds_no_lock_that_frames_need(small_model, model_b, rng, monkeypatch):
    """The new model's card is read while frames keep being taken (a card on a slow file
    system, held here by the test); before, it was read under the lock that submit() and the
    inference thread need, and receiving stalled until the read was done."""
    from edge_ptychonn.stream import config as config_module

    pipeline, published, factory = make_pipeline(small_model, batchSize=4, batchTimeout=0.05)
    pipeline.start(factory, Recorded())
    reading, gate, real_find_card = threading.Event(), threading.Event(), config_module.find_card

    def slow_find_card(path):
        if str(path) == str(model_b):
            reading.set()
            gate.wait(30)
        return real_find_card(path)

    monkeypatch.setattr(config_module, "find_card", slow_find_card)
    configure = threading.Thread(target=pipeline.configure, args=({"modelPath": str(model_b)},), daemon=True)
    configure.start()
    try:
        assert reading.wait(10)
        images = frames(rng, 4)
        feed = threading.Thread(target=lambda: [pipeline.submit(good_frame(uid, images[uid - 1])) for uid in range(1, 5)],
                                daemon=True)
        feed.start()
        feed.join(5)
        fed = not feed.is_alive()
        assert fed, "submit() waited while the card was read"
        assert published.wait(4, timeout_s=10) == 4  # published meanwhile, by the running model
    finally:
        gate.set()
        configure.join(30)
    pipeline.stop()
    assert pipeline.model_id == model_identity(model_b) and pipeline.stats.unaccounted(0) == 0


@pytest.mark.parametrize("what", ["other-input-size", "other-detector-geometry", "not-onnx", "missing", "bad-card",
                                  "build-fails"])
def test_a_model_that_does_not_fit_is_refused_and_nothing_changes(small_model, model_32, rng, tmp_path, what):
    pipeline, published, factory = make_pipeline(small_model, batchSize=2, batchTimeout=0.05)
    recorded = Recorded()

    def build(path, id_pattern):
        if what == "build-fails":
            raise RuntimeError("the engine library says no\n" + "x" * 5000)
        return recorded(path, id_pattern)

    pipeline.start(factory, build)
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    bad_card = tmp_path / "carded.onnx"
    bad_card.write_bytes(small_model.read_bytes())
    bad_card.with_suffix(".json").write_text('{"preprocess": {"scael": 2}}')
    # fine-tuned for a detector cut to 128x128 and binned by 2: 64x64 like the running model, but the
    # running consumer takes its 64x64 frames as they come (before: run at another magnification)
    binned = export_small_model(tmp_path / "binned.onnx", seed=2, name="binned", crop_hw=(128, 128), bin_factor=2)
    model, message = {
        "other-input-size": (model_32, "takes 32x32 input, but frames are preprocessed for the running model's 64x64"),
        "other-detector-geometry": (binned, "was made for frames with crop 128x128 and bin 2, but this consumer runs "
                                            "no crop and bin 1 .*restart the consumer with this model"),
        "not-onnx": (text, "is not a readable ONNX model"),
        "missing": (tmp_path / "nowhere.onnx", "is not a file"),
        "bad-card": (bad_card, "unknown key.*scael"),
        "build-fails": (small_model, "cannot run modelPath .*the engine library says no"),
    }[what]
    before, before_id, engine = pipeline.config, pipeline.model_id, pipeline.engine
    with pytest.raises(ValueError, match=message) as refused:
        pipeline.configure({"modelPath": str(model), "scale": 3.0})
    assert len(str(refused.value)) < 400
    assert pipeline.config == before and pipeline.model_id == before_id and pipeline.engine is engine
    assert all(e.closed for e in recorded.built)  # an engine built for nothing is closed again
    for uid, image in enumerate(frames(rng, 3), start=1):
        pipeline.submit(good_frame(uid, image))
    assert published.wait(3) == 3  # the stream goes on with model A
    pipeline.stop()
    assert set(published.model_ids) == {before_id}
    assert pipeline.stats.unaccounted(0) == 0 and pipeline.stats.partial_batches == 1


def test_model_change_needs_a_running_engine(small_model, model_b):
    pipeline, _, factory = make_pipeline(small_model)
    with pytest.raises(ValueError, match="still starting"):
        pipeline.configure({"modelPath": str(model_b)})
    pipeline.start(factory)  # without a factory for other models
    with pytest.raises(ValueError, match="cannot change models"):
        pipeline.configure({"modelPath": str(model_b)})
    assert pipeline.config.model_path == small_model
    pipeline.stop()


def wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_model_swap_with_batches_in_flight_on_an_async_engine(small_model, model_b, rng, monkeypatch):
    """The batches submitted to the old asynchronous engine are collected and published
    before the switch; the old engine is closed only after its last collect."""
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, queueBatches=8, batchTimeout=60)
    gate = threading.Event()
    old = AsyncEngine(factory(), gate=gate)
    new = AsyncEngine(create_engine("onnxruntime", EngineOptions(model_b, max_batch=4, cpu_threads=1)))
    images = frames(rng, 24)
    for uid in range(1, 13):  # three full batches wait when the thread starts
        pipeline.submit(good_frame(uid, images[uid - 1]))
    pipeline.start(lambda: old, lambda path, pattern: new)
    assert wait_for(lambda: old.calls == [("submit", 1), ("submit", 2)])  # two in flight, held
    pipeline.configure({"modelPath": str(model_b)})
    gate.set()
    for uid in range(13, 25):
        pipeline.submit(good_frame(uid, images[uid - 1]))
    assert pipeline.drain(20)
    pipeline.stop()
    assert not crashes, crashes[0].exc_value if crashes else None
    assert [p[0] for p in published] == list(range(1, 25))
    id_a, id_b = model_identity(small_model), model_identity(model_b)
    assert published.model_ids == [id_a] * 12 + [id_b] * 12
    assert [c for c in old.calls if c[0] == "collect"] == [("collect", k) for k in (1, 2, 3)]
    assert old.closed and new.closed
    pre_b = pipeline.config.preprocess
    for (uid, image, _, _), expected in zip(published[12:], expected_outputs(model_b, images[12:], pre_b)):
        np.testing.assert_allclose(image, expected, atol=1e-5, err_msg=f"frame {uid}")


def test_a_reset_while_frames_are_held_keeps_the_totals_adding_up(small_model, rng):
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, batchTimeout=60)
    pipeline.start(factory)
    for i, image in enumerate(frames(rng, 10)):
        pipeline.submit(good_frame(i + 1, image))
    pipeline.reset_stats()  # some of the 10 are still held: they count as received in the new totals
    held = pipeline.queued_frames
    assert pipeline.stats.received == held and pipeline.stats.unaccounted(held) == 0
    assert pipeline.drain(20.0) and published.wait(10) == 10
    stats = pipeline.stats
    assert stats.published == held and stats.unaccounted(pipeline.queued_frames) == 0
    assert stats.completeness() == 1.0
    pipeline.stop()


def test_a_reset_inside_a_distributor_run_goes_on_counting_missed_frames(small_model, rng):
    """Consumer 1 of 4 with -du 8 (ids 1-8, 33-40, 65-72, ...): a statistics reset between
    two frames of a run counts no foreign frames, and a run lost later is counted."""
    config, _ = parse_processor_args({"modelPath": str(small_model), "engine": "zero", "batchSize": 4})
    pipeline = InferencePipeline(config, Published(), n_sequential=8, id_offset=25)
    pipeline.start(lambda: create_engine("zero", EngineOptions(small_model, max_batch=4)))
    image = frames(rng, 1)[0]
    run = lambda first, n=8: range(first, first + n)
    for uid in [*run(1), *run(33, 4)]:
        pipeline.submit(good_frame(uid, image))
    pipeline.reset_stats()
    for uid in [*run(37, 4), *run(97), *run(129)]:  # 65-72 lost upstream
        pipeline.submit(good_frame(uid, image))
    pipeline.stop()
    ids = pipeline.stats.ids
    assert (ids.missed, ids.foreign, ids.restarts) == (8, 0, 0)


def test_a_status_snapshot_adds_up_while_frames_flow(small_model, rng):
    config, _ = parse_processor_args({"modelPath": str(small_model), "engine": "zero", "batchTimeout": 0.01})
    pipeline = InferencePipeline(config, lambda pv: None)
    pipeline.start(lambda: create_engine("zero", EngineOptions(small_model, max_batch=config.batch_size)))
    pv = good_frame(1, frames(rng, 1)[0])
    done = threading.Event()

    def feed():
        for uid in range(1, 6001):
            pv["uniqueId"] = uid
            pipeline.submit(pv)
        done.set()

    threading.Thread(target=feed, daemon=True).start()
    readings = wrong = 0
    deadline = time.monotonic() + 60
    while (not done.is_set() or pipeline.queued_frames) and time.monotonic() < deadline:
        stats, queued = pipeline.counts()  # what getStats() reads
        readings += 1
        wrong += stats.unaccounted(queued) != 0 or stats.published > stats.received
    left = (done.is_set(), pipeline.queued_frames)
    pipeline.stop()
    assert left == (True, 0), f"after 60 s: all fed {left[0]}, {left[1]} frames still queued"
    assert pipeline.stats.received == 6000 and readings > 100
    assert wrong == 0


def test_pvapys_pattern_keys_at_run_time_set_the_pattern_missed_frames_are_counted_in(small_model, rng):
    """PvaPy's controller takes objectIdOffset / nSequentialUpdates from a configure request
    (consumers added to the group): the missed frames are counted in the new pattern; a
    value it cannot be is refused, and nothing changes."""
    config, _ = parse_processor_args({"modelPath": str(small_model), "engine": "zero", "batchSize": 4})
    pipeline = InferencePipeline(config, Published(), n_sequential=8, id_offset=9)
    pipeline.start(lambda: create_engine("zero", EngineOptions(small_model, max_batch=4)))
    image = frames(rng, 1)[0]
    for uid in [*range(1, 9), *range(17, 25)]:
        pipeline.submit(good_frame(uid, image))
    for bad in ({"objectIdOffset": 0}, {"nSequentialUpdates": "x"}, {"objectIdOffset": 25, "scale": -1}):
        with pytest.raises(ValueError):
            pipeline.configure(bad)
    assert pipeline.config.preprocess.scale == config.preprocess.scale and pipeline.stats.ids.full_stride == 16
    assert pipeline.configure({"objectIdOffset": 25, "nSequentialUpdates": 8}) == {}  # two consumers joined
    for uid in [u for u in range(33, 33 + 32 * 6) if (u - 33) // 8 % 4 == 0]:
        pipeline.submit(good_frame(uid, image))
    pipeline.stop()
    ids = pipeline.stats.ids
    assert (ids.missed, ids.foreign, ids.restarts) == (0, 0, 0)


def test_an_engine_that_fails_to_close_does_not_make_stop_raise(small_model, rng, caplog):
    """A GPU engine's close re-raises a CUDA error from its synchronisation: stop() raised it,
    so the processor's stop() printed no final statistics and PvaPy skipped stopping its
    publisher. Now logged, and stop() returns."""
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, batchTimeout=60)
    engine = SlowEngine(factory())
    engine.go.set()

    def failing_close():
        raise RuntimeError("cudaErrorIllegalAddress in synchronize")

    engine.close = failing_close
    pipeline.start(lambda: engine)
    for uid, image in enumerate(frames(rng, 6), start=1):
        pipeline.submit(good_frame(uid, image))
    with caplog.at_level("ERROR"):
        pipeline.stop()
    assert published.wait(6) == 6 and "closing the engine at stop failed: cudaErrorIllegalAddress" in caplog.text


def test_a_stuck_worker_never_holds_stop_beyond_its_timeout(small_model, rng):
    """A worker pool's close waits up to 10 s for busy workers; PvaPy's parent waits about 1 s
    for each consumer's stop. stop() closes the engine only once the inference thread has
    ended (every batch given to a worker collected), so a stuck worker costs stop() its own
    timeout, not the pool's."""
    from engines.workers import WorkerPool

    pipeline, published, factory = make_pipeline(small_model, batchSize=4, batchTimeout=60)
    stuck = GatedEngine(factory())
    pool = WorkerPool([factory(), stuck], 1)
    pipeline.start(lambda: pool)
    try:
        for uid, image in enumerate(frames(rng, 10), start=1):  # batches 1 and 2 on the workers, 2 frames held
            pipeline.submit(good_frame(uid, image))
        assert published.wait(4) == 4
        t0 = time.monotonic()
        pipeline.stop(timeout_s=0.3, outputs_closed=True)
        assert time.monotonic() - t0 < 0.9
        assert pipeline.stats.dropped["stopping"] == 6 and pipeline.stats.unaccounted(pipeline.queued_frames) == 0
    finally:
        stuck.gate.release(100)
        pipeline._thread.join(10)
    pool.close(10)


def test_frames_the_output_cannot_hold_are_publish_errors_with_a_one_line_reason(small_model, rng, caplog):
    """A frame whose timeStamp is a number (not an NTNDArray's structure) cannot be published: it
    counts as a publish error, logged in one line naming the field (PvaPy's reason spanned eleven
    lines and named none), and the frames after it are published."""
    import logging

    import pvaccess as pva

    images = frames(rng, 3)
    odd = pva.PvObject({"uniqueId": pva.INT, "value": ({"shortValue": [pva.SHORT]},),
                        "dimension": [{"size": pva.INT}], "timeStamp": pva.DOUBLE})
    odd["uniqueId"], odd["timeStamp"] = 2, 1.5
    odd["value"] = {"shortValue": images[1].ravel()}
    odd["dimension"] = [{"size": 64}, {"size": 64}]
    pipeline, published, factory = make_pipeline(small_model, batchSize=3, batchTimeout=0.05)
    pipeline.start(factory)
    with caplog.at_level(logging.ERROR):
        for pv in (good_frame(1, images[0]), odd, good_frame(3, images[2])):
            pipeline.submit(pv)
        assert published.wait(2) == 2
        pipeline.stop()
    assert [p[0] for p in published] == [1, 3]
    stats = pipeline.stats
    assert (stats.received, stats.published, stats.publish_errors, stats.unaccounted(0)) == (3, 2, 1, 0)
    [line] = [r.getMessage() for r in caplog.records if "cannot publish frame 2" in r.getMessage()]
    assert "\n" not in line and "cannot hold the input's timeStamp" in line


def test_an_engine_error_of_many_lines_is_logged_in_one(small_model, rng, caplog):
    """Some engines' errors span lines (torch's CUDA errors add advice on lines of their own): the
    log's one line per kind of failure took them whole."""
    import logging

    pipeline, published, factory = make_pipeline(small_model, batchSize=2, batchTimeout=0.05)
    engine = factory()
    real_infer, calls = engine.infer, []

    def fails_once(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\n"
                               "CUDA kernel errors might be asynchronously reported at some other API call")
        return real_infer(batch)

    engine.infer = fails_once
    pipeline.start(lambda: engine)
    with caplog.at_level(logging.ERROR):
        for uid, image in enumerate(frames(rng, 4), start=1):
            pipeline.submit(good_frame(uid, image))
        assert published.wait(2) == 2
        pipeline.stop()
    assert [p[0] for p in published] == [3, 4] and pipeline.stats.inference_errors == 2
    [line] = [r.getMessage() for r in caplog.records if "inference failed" in r.getMessage()]
    assert "\n" not in line and "illegal memory access was encountered CUDA kernel errors" in line


def test_a_new_engine_refused_at_stop_is_closed_without_the_lock_that_frames_need(small_model, model_b, rng):
    """A stop during a new model's build: the new engine is closed, and the change refused. The
    close (held here by the test) ran under the lock that submit() and the inference thread need,
    so receiving waited for it."""
    building, built, closing, may_close = (threading.Event() for _ in range(4))

    def factory_for(model_path, id_pattern):
        building.set()
        assert built.wait(30)
        engine = create_engine("onnxruntime", EngineOptions(model_path, max_batch=8, cpu_threads=1))
        engine.close = lambda: (closing.set(), may_close.wait(30))
        return engine

    pipeline, published, factory = make_pipeline(small_model, batchSize=2, batchTimeout=0.05)
    pipeline.start(factory, factory_for)
    result = {}

    def swap():
        try:
            pipeline.configure({"modelPath": str(model_b)})
        except ValueError as exc:
            result["refused"] = str(exc)

    configure = threading.Thread(target=swap, daemon=True)
    configure.start()
    try:
        assert building.wait(10)
        pipeline.stop()
        built.set()
        assert closing.wait(10)
        feed = threading.Thread(target=pipeline.submit, args=(good_frame(1, frames(rng, 1)[0]),), daemon=True)
        feed.start()
        feed.join(5)
        fed = not feed.is_alive()
    finally:
        may_close.set()
        configure.join(30)
    assert fed, "submit() waited for the new engine's close"
    assert "stopping" in result["refused"] and pipeline.stats.dropped["stopping"] == 1


@pytest.mark.parametrize("args, hw", [({"crop": [128, 128], "bin": 2}, (128, 128)), ({"scale": 4.0}, (64, 64))])
def test_pixels_that_binning_or_scaling_take_beyond_float32_are_bad_frames(small_model, rng, caplog, args, hw):
    """Float pixels near float32's maximum, binned or scaled, are infinite in the model's input:
    a bad frame (nonfinite), never run, and the other frames of its batch are published. Before,
    the engine ran them and they were counted as nNonFiniteOutputs, blaming the engine."""
    import logging

    from frames_util import float_frame

    pipeline, published, factory = make_pipeline(small_model, batchSize=4, batchTimeout=0.05, **args)
    engine, seen_finite = factory(), []
    real_infer = engine.infer
    engine.infer = lambda batch: seen_finite.append(bool(np.isfinite(batch).all())) or real_infer(batch)
    pipeline.start(lambda: engine)
    good = frames(rng, 3, hw).astype(np.float32)
    huge = np.full(hw, 3e38, np.float32)
    with caplog.at_level(logging.ERROR):
        for uid, image in enumerate([good[0], huge, good[1], good[2]], start=1):
            pipeline.submit(float_frame(uid, image))
        assert published.wait(3) == 3
    pipeline.stop()
    stats = pipeline.stats
    assert [p[0] for p in published] == [1, 3, 4]
    assert (stats.bad["nonfinite"], stats.nonfinite_outputs, stats.inference_errors) == (1, 0, 0)
    assert stats.unaccounted(pipeline.queued_frames) == 0
    assert seen_finite == [True]  # the bad frame was never run
    assert any("frame 2's float pixels go beyond float32's range" in r.getMessage() for r in caplog.records)


def test_a_reset_while_a_batch_is_being_published_counts_that_batch_in_the_new_totals(small_model, rng):
    """A statistics reset that comes while a batch is being published: its frames count as published
    in the new totals, and so do its batch, engine time and rates. Before, the batch, its engine time
    and its latencies went to the totals the reset had replaced: 4 frames published in 0 batches,
    and a frame rate of 0."""
    pipeline, published, factory = make_pipeline(small_model, batchSize=4, batchTimeout=60)

    def publish_and_reset(pv):
        if not published:
            pipeline.reset_stats()  # as the status channel's reset would, from another thread
        published(pv)

    pipeline._publish = publish_and_reset
    pipeline.start(factory)
    for i, image in enumerate(frames(rng, 4)):
        pipeline.submit(good_frame(i + 1, image))
    assert published.wait(4) == 4 and pipeline.drain(10.0)
    pipeline.stop()
    stats = pipeline.stats
    assert (stats.received, stats.published, stats.batches) == (4, 4, 1)
    assert stats.infer_time_s > 0 and stats.recent.frame_rate_hz() > 0
    assert stats.unaccounted(pipeline.queued_frames) == 0


@pytest.mark.parametrize("consumers", [1, 2])
def test_the_record_a_reconnection_hands_over_is_dropped_and_counted_when_a_sibling_may_have_it(
        small_model, rng, consumers):
    """The first record after the input channel connects again is its current value, handed over
    outside the distributor. With two consumers it may be the other's frame too (it came out
    twice): dropped and counted, its id not taken as the first of the stream (no misses
    counted from it). With one it is this consumer's frame: processed. An empty record there
    (a server that has not streamed yet) is counted as such and ends the wait."""
    from frames_util import no_image_record

    config, _ = parse_processor_args({"modelPath": str(small_model), "engine": "onnxruntime", "cpuThreads": 1,
                                      "batchSize": 4, "batchTimeout": 0.05})
    published = Published()
    pipeline = InferencePipeline(config, published, n_sequential=4, id_offset=4 * (consumers - 1) + 1)
    pipeline.start(lambda: create_engine("onnxruntime", EngineOptions(small_model, max_batch=4, cpu_threads=1)))
    images = frames(rng, 9)
    try:
        for i in range(4):
            pipeline.submit(good_frame(1 + i, images[i]))
        pipeline.reconnected()
        pipeline.submit(good_frame(7, images[4]))  # a sibling's frame, or this consumer's (one consumer)
        for i in range(4):
            pipeline.submit(good_frame(9 + i, images[5 + i]))  # the stream again: this consumer's next run
        pipeline.reconnected()
        pipeline.submit(no_image_record())
        expected = [1, 2, 3, 4, 9, 10, 11, 12] if consumers == 2 else [1, 2, 3, 4, 7, 9, 10, 11, 12]
        assert published.wait(len(expected)) == len(expected)
        assert pipeline.drain(10.0)
    finally:
        pipeline.stop()
    s = pipeline.stats
    assert [p[0] for p in published] == expected
    assert s.dropped["reconnect"] == (1 if consumers == 2 else 0)
    assert (s.received, s.empty_records, s.unaccounted(0)) == (9, 1, 0)
    assert s.ids.missed == (0 if consumers == 2 else 3)  # one consumer: 5, 6 and 8 lost (the stream's own)


class SleepingEngine:
    """A CPU engine whose every batch takes ``seconds`` of sleep (so that workers run at once)."""

    def __init__(self, input_shape, seconds):
        self.name, self.device, self.precision = "sleeping", "cpu", "fp32"
        self.input_shape, self.max_batch, self.seconds = tuple(input_shape), 8, seconds

    def infer(self, batch):
        time.sleep(self.seconds)
        return np.zeros((len(batch), 1, *self.input_shape), np.float32)

    def close(self):
        pass


def test_infer_rate_counts_the_time_workers_share_once(small_model, rng):
    """inferRate is the engine's own speed: two CPU workers, each taking 0.2 s per batch of 8 and
    running at once, do 80 frames/s; summing each batch's engine time said 40 (half of what the
    consumer published, with the default two workers of one consumer on 2 cores)."""
    from engines.workers import WorkerPool

    pipeline, published, _ = make_pipeline(small_model, batchSize=8, batchTimeout=0.05)
    pool = WorkerPool([SleepingEngine((64, 64), 0.2) for _ in range(2)], 1)
    pipeline.start(lambda: pool)
    for i, image in enumerate(frames(rng, 32)):  # 4 full batches at once: two run side by side
        pipeline.submit(good_frame(i + 1, image))
    assert published.wait(32) == 32
    rate = pipeline.stats.recent.infer_rate_hz()
    pipeline.stop()
    assert 60 < rate <= 81, rate


class BrokenEngine(SleepingEngine):
    """An engine whose every batch fails (a model that does not run on these batches)."""

    def infer(self, batch):
        raise RuntimeError(f"{self.name} cannot run this batch")


def test_a_swapped_in_model_that_fails_is_logged_though_the_last_one_failed_too(small_model, model_b, rng, caplog):
    """Problems are logged once per kind; a model's own (its engine failing, non-finite inputs or
    outputs) once per model: before, after one inference error nothing said that the next model
    failed too (only the counters)."""
    pipeline, published, _ = make_pipeline(small_model, batchSize=2, batchTimeout=0.05)
    first = BrokenEngine((64, 64), 0)
    first.name = "model A"
    second = BrokenEngine((64, 64), 0)
    second.name = "model B"
    pipeline.start(lambda: first, lambda model_path, id_pattern: second)
    images = frames(rng, 8)
    with caplog.at_level("ERROR"):
        for uid in range(1, 5):
            pipeline.submit(good_frame(uid, images[uid - 1]))
        assert pipeline.drain(10.0)
        pipeline.configure({"modelPath": str(model_b)})
        for uid in range(5, 9):
            pipeline.submit(good_frame(uid, images[uid - 1]))
        assert pipeline.drain(10.0)
    pipeline.stop()
    failed = [r.getMessage() for r in caplog.records if "inference failed" in r.getMessage()]
    assert len(failed) == 2 and "model A cannot" in failed[0] and "model B cannot" in failed[1], failed
    assert pipeline.stats.inference_errors == 8 and pipeline.stats.unaccounted(pipeline.queued_frames) == 0


def test_a_problem_met_by_two_threads_at_once_is_logged_once(small_model, caplog):
    """The receive thread and the inference thread both log problems once per kind; both could
    find a kind not yet logged and log it twice. The look and the note are one step now."""
    pipeline, _, _ = make_pipeline(small_model)

    class SlowLook(set):  # widens the gap between looking for a kind and noting it
        def __contains__(self, key):
            found = super().__contains__(key)
            time.sleep(0.05)
            return found

    pipeline._logged = SlowLook()
    both = threading.Barrier(2)

    def meet():
        both.wait(5)
        pipeline._log_once("publish", logging.ERROR, "cannot publish frame %d: %s", 1, "gone")

    with caplog.at_level(logging.ERROR):
        threads = [threading.Thread(target=meet) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    logged = [r for r in caplog.records if "cannot publish frame 1" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]

