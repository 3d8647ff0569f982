"""cpuWorkers: several batches at once on the CPU, each on its own copy of the engine."""

import threading
import time

import numpy as np
import pytest

from edge_ptychonn.stream.config import parse_processor_args
from edge_ptychonn.stream.pipeline import InferencePipeline
from engines import EngineOptions, create_engine
from engines.base import cpu_layout
from engines.workers import WorkerPool
from edge_ptychonn.tools.processes import wait_until
from frames_util import good_frame
from test_pipeline import Published


class Meeting:
    """An engine whose batches return only once ``parties`` of them run at the same time
    (a pool that runs its batches one after another fails with BrokenBarrierError)."""

    def __init__(self, barrier: threading.Barrier, fail_on: float | None = None):
        self.name, self.device, self.precision = "meeting", "cpu", "fp32"
        self.input_shape, self.max_batch = (8, 8), 4
        self.barrier, self.fail_on, self.closed = barrier, fail_on, False
        self.threads: set[str] = set()

    def infer(self, batch):
        self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and batch[0, 0, 0, 0] == self.fail_on:
            raise RuntimeError("this batch fails")
        self.barrier.wait(timeout=10)
        return batch * 2.0

    def close(self):
        self.closed = True


def batches(n, size=4):
    return [np.full((size, 1, 8, 8), float(i), np.float32) for i in range(n)]


def test_a_closed_pool_is_freed_without_the_garbage_collector():
    """Its workers held the pool's callback, the pool its workers: a cycle that kept every
    closed engine until a full collection, and kept a swapped-out model's memory in the consumer."""
    import gc
    import weakref

    barrier = threading.Barrier(1)
    pool = WorkerPool([Meeting(barrier), Meeting(barrier)], threads_per_worker=1)
    pool.collect(pool.submit(batches(1)[0]))
    refs = [weakref.ref(pool), *(weakref.ref(w.engine) for w in pool._workers)]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        pool.close()
        del pool
        assert [r() for r in refs] == [None, None, None]
    finally:
        if was_enabled:
            gc.enable()


def test_workers_run_batches_at_the_same_time_and_return_them_in_order():
    barrier = threading.Barrier(2)
    engines = [Meeting(barrier), Meeting(barrier)]
    pool = WorkerPool(engines, threads_per_worker=1)
    assert (pool.name, pool.device, pool.max_in_flight) == ("meeting", "cpu (2 workers x 1 thread)", 2)
    inputs = batches(6)
    tickets = [pool.submit(inputs[0]), pool.submit(inputs[1][:3])]
    inputs[0][:] = -1.0  # the caller may reuse a batch as soon as submit() returns
    outputs = []
    for batch in inputs[2:]:
        outputs.append(pool.collect(tickets.pop(0)))
        tickets.append(pool.submit(batch))
    outputs += [pool.collect(t) for t in tickets]
    assert [o.shape[0] for o in outputs] == [4, 3, 4, 4, 4, 4]
    assert [float(o[0, 0, 0, 0]) for o in outputs] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert engines[0].threads != engines[1].threads  # each copy on a thread of its own
    with pytest.raises(RuntimeError, match="in the order they were submitted"):
        a, b = pool.submit(inputs[2]), pool.submit(inputs[3])
        pool.collect(b)
    pool.close()
    assert all(e.closed for e in engines)


def test_a_failing_batch_raises_on_collect_and_the_worker_goes_on():
    barrier = threading.Barrier(1)  # every batch runs alone
    pool = WorkerPool([Meeting(barrier, fail_on=1.0), Meeting(barrier, fail_on=1.0)], threads_per_worker=2)
    assert pool.device == "cpu (2 workers x 2 threads)"
    inputs = batches(4)
    t0, t1 = pool.submit(inputs[0]), pool.submit(inputs[1])
    assert float(pool.collect(t0)[0, 0, 0, 0]) == 0.0
    with pytest.raises(RuntimeError, match="this batch fails"):
        pool.collect(t1)
    t2, t3 = pool.submit(inputs[2]), pool.submit(inputs[3])  # the same two workers again
    assert [float(pool.collect(t)[0, 0, 0, 0]) for t in (t2, t3)] == [4.0, 6.0]
    pool.close()


class Interrupted(Meeting):
    def infer(self, batch):
        raise KeyboardInterrupt  # not an Exception: the worker must still say it is done


def test_a_pool_never_leaves_a_caller_waiting_for_ever():
    """A batch whose copy fails gives its worker back; a BaseException in an engine reaches
    collect(); a submit after close() is refused (before: the first two left a worker taken
    or a collect() waiting for ever, the third a collect() waiting for ever)."""
    pool = WorkerPool([Meeting(threading.Barrier(1)), Meeting(threading.Barrier(1))], threads_per_worker=1)
    with pytest.raises(ValueError):
        pool.submit(np.full((2, 1, 8, 8), "x", object))  # its copy into the float32 buffer fails
    t0, t1 = pool.submit(batches(1)[0]), pool.submit(batches(2)[1])  # both workers, in turn
    assert [float(pool.collect(t)[0, 0, 0, 0]) for t in (t0, t1)] == [0.0, 2.0]
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(batches(1)[0])
    interrupted = WorkerPool([Interrupted(threading.Barrier(1))], threads_per_worker=1)
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(_raised(lambda: interrupted.collect(
        interrupted.submit(batches(1)[0])))), daemon=True)
    waiter.start()
    waiter.join(10)
    assert outcome == ["KeyboardInterrupt"]
    interrupted.close()


def _raised(call) -> str:
    try:
        call()
    except BaseException as exc:  # noqa: B036 - the test wants to see any kind
        return type(exc).__name__
    return "nothing"


def test_cpu_workers_give_the_single_engines_results(small_model):
    x = np.random.default_rng(5).poisson(9, (4, 1, 64, 64)).astype(np.float32)
    single = create_engine("onnxruntime", EngineOptions(small_model, max_batch=4, cpu_threads=1))
    pool = create_engine("onnxruntime", EngineOptions(small_model, max_batch=4, cpu_threads=1, cpu_workers=3))
    assert isinstance(pool, WorkerPool) and pool.device == "cpu (3 workers x 1 thread)" and pool.name == "onnxruntime"
    tickets = [pool.submit(x), pool.submit(x[:1]), pool.submit(x[1:3])]
    got = [pool.collect(t) for t in tickets]
    np.testing.assert_allclose(got[0], single.infer(x), atol=1e-6)
    np.testing.assert_allclose(got[1], single.infer(x[:1]), atol=1e-6)
    np.testing.assert_allclose(got[2], single.infer(x[1:3]), atol=1e-6)
    pool.close()
    one = create_engine("onnxruntime", EngineOptions(small_model, cpu_threads=1, cpu_workers=1))
    assert not isinstance(one, WorkerPool)
    zero = create_engine("zero", EngineOptions(small_model, cpu_threads=1, cpu_workers=2))
    assert not isinstance(zero, WorkerPool) and zero.device == "cpu"  # stands for a GPU: no workers


def test_cpu_workers_is_validated(small_model):
    config, _ = parse_processor_args({"modelPath": str(small_model)})
    assert (config.cpu_workers, config.cpu_threads) == (0, 0)  # the layout is chosen at start
    for bad in (-1, 65, "two"):
        with pytest.raises(ValueError, match="cpuWorkers"):
            parse_processor_args({"modelPath": str(small_model), "cpuWorkers": bad})


@pytest.mark.parametrize("threads, workers, consumers, cores, layout", [
    (0, 0, 1, 2, (2, 1)),  # one consumer on 2 cores: two workers of one thread
    (0, 0, 2, 2, (1, 1)),  # two consumers share 2 cores
    (0, 0, 1, 16, (4, 4)),  # at most 4 workers by default; the rest as threads
    (0, 0, 8, 16, (2, 1)),
    (0, 0, 3, 2, (1, 1)),  # more consumers than cores: at least one of each
    (2, 0, 1, 16, (8, 2)),  # threads given: workers fill the share
    (0, 1, 1, 16, (1, 16)),  # one worker given: all the share's cores as its threads
    (3, 5, 1, 2, (5, 3)),  # both given: taken as they are
])
def test_cpu_layout_fills_the_consumers_share_of_the_cores(threads, workers, consumers, cores, layout):
    assert cpu_layout(threads, workers, consumers, cores) == layout


def test_the_layout_shares_the_cores_this_process_may_run_on(small_model, monkeypatch):
    """A consumer pinned to one core (taskset, numactl, a container's cpuset) of a bigger
    host runs one worker of one thread, not a layout for every core of the host."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert cpu_layout() == (1, 1) and cpu_layout(consumers=2) == (1, 1)
    engine = create_engine("onnxruntime", EngineOptions(small_model, max_batch=4, cpu_workers=0))
    assert not isinstance(engine, WorkerPool) and engine.device == "cpu (1 worker x 1 thread)"
    engine.close()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert cpu_layout() == (4, 2) and cpu_layout(consumers=4) == (2, 1)


def test_a_pipeline_with_workers_publishes_every_frame_once_in_order(small_model, rng):
    config, _ = parse_processor_args({"modelPath": str(small_model), "engine": "onnxruntime", "cpuThreads": 1,
                                      "cpuWorkers": 2, "batchSize": 4, "batchTimeout": 0.05})
    published = Published()
    pipeline = InferencePipeline(config, published)
    options = EngineOptions(small_model, max_batch=4, cpu_threads=1, cpu_workers=config.cpu_workers)
    pipeline.start(lambda: create_engine("onnxruntime", options))
    assert pipeline.engine.device == "cpu (2 workers x 1 thread)"
    images = rng.poisson(30, (50, 64, 64)).astype(np.int16)
    for i, image in enumerate(images):
        pipeline.submit(good_frame(1 + i, image))
    assert published.wait(50) == 50
    pipeline.stop()
    assert [p[0] for p in published] == list(range(1, 51))
    # every frame, whichever worker ran its batch, is the single engine's result on it
    reference = create_engine("onnxruntime", EngineOptions(small_model, max_batch=4, cpu_threads=1))
    inputs = _model_inputs(pipeline, images)
    expected = np.concatenate([reference.infer(inputs[i:i + 4]) for i in range(0, 50, 4)])
    assert len(published) == len(expected) == 50
    for (uid, image, _, _), want in zip(published, expected):
        np.testing.assert_allclose(image, want[0], atol=1e-5, err_msg=f"uniqueId {uid}")
    stats = pipeline.stats
    assert (stats.received, stats.published, stats.dropped_total) == (50, 50, 0)
    assert stats.unaccounted(pipeline.queued_frames) == 0


def _model_inputs(pipeline, images):
    from edge_ptychonn.stream.preprocess import preprocess

    return preprocess(images, pipeline.config.preprocess)[:, None]


@pytest.mark.parametrize("offset, n_sequential, layout", [
    (1, 1, "cpu (4 workers x 1 thread)"),  # a consumer alone has all 4 cores
    (9, 8, "cpu (2 workers x 1 thread)"),  # two consumers of 8 updates each share them
    (25, 8, "cpu (1 worker x 1 thread)"),  # four consumers: one core each (before: plain "cpu")
])
def test_the_processor_shares_the_cores_among_its_distributor_group(small_model, monkeypatch, offset, n_sequential,
                                                                    layout):
    import os

    from processors.ptychonn import PtychoNNProcessor

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    processor = PtychoNNProcessor({"processorId": 1, "objectIdOffset": offset, "nSequentialUpdates": n_sequential,
                                   "modelPath": str(small_model), "engine": "onnxruntime", "batchSize": 4})
    processor.start()
    try:
        assert processor.getStats()["device"] == layout
    finally:
        processor.stop()


def test_one_worker_states_its_threads_as_several_workers_do(small_model, monkeypatch):
    """The statistics' ``device`` gave the layout of several workers (``cpu (2 workers x 1
    thread)``) but read plain ``cpu`` for one worker, whatever its threads."""
    import os

    from processors.ptychonn import PtychoNNProcessor

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    processor = PtychoNNProcessor({"processorId": 1, "modelPath": str(small_model), "engine": "onnxruntime",
                                   "batchSize": 4, "cpuWorkers": 1, "cpuThreads": 2})
    processor.start()
    try:
        assert processor.getStats()["device"] == "cpu (1 worker x 2 threads)"
    finally:
        processor.stop()
    # the zero-cost engine computes nothing and runs no layout: plain "cpu"
    processor = PtychoNNProcessor({"processorId": 1, "modelPath": str(small_model), "engine": "zero"})
    processor.start()
    try:
        assert processor.getStats()["device"] == "cpu"
    finally:
        processor.stop()


@pytest.mark.parametrize("args, warned", [
    ({"cpuWorkers": 3, "cpuThreads": 1}, "cpuWorkers 3 x cpuThreads 1 run 3 workers x 1 thread = 3 inference threads"),
    ({"cpuWorkers": 0, "cpuThreads": 4}, "cpuWorkers 0 x cpuThreads 4 run 1 worker x 4 threads = 4 inference threads"),
    ({"cpuWorkers": 2, "cpuThreads": 1}, None),  # fits the 2 cores
    ({}, None),  # the default always fits
])
def test_a_layout_beyond_the_cores_is_run_with_one_warning_at_start(small_model, monkeypatch, caplog, args, warned):
    """cpuWorkers x cpuThreads above the cores this process may run on (its CPU affinity) was
    taken without a word: now one warning says what it costs and what the default would be."""
    import logging
    import os

    from processors.ptychonn import PtychoNNProcessor

    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # the host's cores: not what the process may use
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    processor = PtychoNNProcessor({"processorId": 1, "modelPath": str(small_model), "engine": "onnxruntime",
                                   "batchSize": 4, **args})
    with caplog.at_level(logging.WARNING, logger=processor.logger.name):
        processor.start()
    try:
        warnings = [r.getMessage() for r in caplog.records if "cpuWorkers" in r.getMessage()]
        if warned is None:
            assert warnings == []
            return
        assert len(warnings) == 1 and warnings[0].startswith(warned), warnings
        assert "on the 2 cores this process may run on: the workers fight for the cores" in warnings[0]
        assert "the default (cpuWorkers 0, cpuThreads 0) would be 2 workers x 1 thread here" in warnings[0]
        assert "Running as asked" in warnings[0]
        assert processor.getStats()["nFramesUnaccounted"] == 0  # not refused: it runs
    finally:
        processor.stop()


def test_overload_with_workers_drops_at_the_door_and_recovers(small_model, rng):
    """Both workers blocked and every buffer full: submit() returns at once and counts the
    drops (three times the frames the queue holds); once the workers go on, everything
    held is published in order and the pipeline is lossless again."""
    from test_pipeline import SlowEngine, make_pipeline

    pipeline, published, factory = make_pipeline(small_model, batchSize=4, queueBatches=2, batchTimeout=0.05)
    slow = [SlowEngine(factory()), SlowEngine(factory())]
    pipeline.start(lambda: WorkerPool(slow, threads_per_worker=1))
    images = rng.poisson(30, (56, 64, 64)).astype(np.int16)
    for i in range(48):  # 4 buffers of 4 frames: 16 held (2 of them batches at the workers), 32 dropped
        pipeline.submit(good_frame(i + 1, images[i]))
    stats = pipeline.stats
    assert stats.dropped["overload"] == 32 and pipeline.queued_frames == 16
    assert stats.unaccounted(pipeline.queued_frames) == 0 and published == []
    for engine in slow:
        engine.go.set()
    assert published.wait(16) == 16
    for i in range(48, 56):  # below capacity: lossless again
        pipeline.submit(good_frame(i + 1, images[i]))
    assert published.wait(24) == 24
    pipeline.stop()
    assert [p[0] for p in published] == list(range(1, 17)) + list(range(49, 57))
    assert stats.dropped["overload"] == 32 and stats.unaccounted(0) == 0


class Stuck(Meeting):
    """An engine whose batch runs until ``release`` is set."""

    def __init__(self, release: threading.Event, started: threading.Semaphore):
        super().__init__(threading.Barrier(1))
        self.release, self.started = release, started

    def infer(self, batch):
        self.started.release()
        self.release.wait(30)
        return batch


def test_close_waits_one_deadline_for_all_stuck_workers(caplog):
    """Three workers stuck in a batch: close(timeout_s) returns after about timeout_s in all,
    leaves their engines open with a log line each, and a free worker's engine is closed
    (before: each stuck worker was waited for in turn, its own timeout each: 3 x timeout_s)."""
    import logging
    import time

    release, started = threading.Event(), threading.Semaphore(0)
    stuck = [Stuck(release, started) for _ in range(3)]
    free = Meeting(threading.Barrier(1))
    pool = WorkerPool([*stuck, free], threads_per_worker=1)
    tickets = [pool.submit(b) for b in batches(3)]
    for _ in stuck:
        assert started.acquire(timeout=10)
    try:
        with caplog.at_level(logging.WARNING, logger="engines.workers"):
            t0 = time.monotonic()
            pool.close(timeout_s=1.0)
            elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed < 2.0, f"close took {elapsed:.2f} s for a 1 s deadline"
        assert caplog.text.count("still busy 1.0 s after close; its engine is left open") == 3
        assert not any(e.closed for e in stuck) and free.closed
    finally:
        release.set()
    assert [float(pool.collect(t)[0, 0, 0, 0]) for t in tickets] == [0.0, 1.0, 2.0]  # nobody waits for ever


def test_a_pool_that_cannot_start_a_worker_stops_the_others_and_closes_every_engine(monkeypatch):
    """The third worker's thread cannot start (the process is out of threads): the two workers
    already running end and all three engines are closed before the error is raised (before:
    the first two threads kept waiting for jobs and no engine was closed; create_engine had
    handed them over, so nobody closed them)."""
    real_start, started = threading.Thread.start, []

    def start(thread):
        if thread.name == "engine-worker-2":
            raise RuntimeError("can't start new thread")
        real_start(thread)
        started.append(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    engines = [Meeting(threading.Barrier(1)) for _ in range(3)]
    with pytest.raises(RuntimeError, match="can't start new thread"):
        WorkerPool(engines, threads_per_worker=1)
    assert all(e.closed for e in engines)
    assert len(started) == 2 and not any(t.is_alive() for t in started)


class FailsToClose(Meeting):
    def close(self):
        self.closed = True
        raise RuntimeError("the library refused")


def test_an_engine_that_fails_to_close_leaves_no_other_open_and_is_named():
    """The first worker's engine raises in close(): the others are closed all the same, and the
    error names the worker (before: the loop stopped at the first failure, leaving the other
    engines open, and raised the library's bare message)."""
    engines = [FailsToClose(threading.Barrier(1)), Meeting(threading.Barrier(1)), FailsToClose(threading.Barrier(1))]
    pool = WorkerPool(engines, threads_per_worker=1)
    with pytest.raises(RuntimeError, match=r"^closing engine-worker-0's engine failed: RuntimeError: the library "
                                           r"refused \(and 1 more, logged\)$"):
        pool.close()
    assert all(e.closed for e in engines)
    assert not any(w.thread.is_alive() for w in pool._workers)


class CountsCloses(Meeting):
    def __init__(self, barrier):
        super().__init__(barrier)
        self.closes = 0

    def close(self):
        self.closes += 1


def test_closing_a_pool_twice_closes_each_engine_once():
    """(before: a second close() closed every engine again)"""
    engines = [CountsCloses(threading.Barrier(1)) for _ in range(2)]
    pool = WorkerPool(engines, threads_per_worker=1)
    pool.close()
    pool.close()
    assert [e.closes for e in engines] == [1, 1]


def test_a_copy_that_cannot_start_closes_every_copy_made_and_keeps_its_error(tmp_path, caplog):
    """The third copy of an engine cannot start and the first one's close fails: the second is
    closed too, and the start's EngineUnavailable is raised, so that 'auto' tries the next engine
    (before: the close error replaced it, and the second copy was left open)."""
    import logging

    from engines import EngineUnavailable, registry
    from engines.base import EngineSpec

    made = []

    class Copy:
        SPEC = EngineSpec(name="copy", summary="a copy")
        name = "copy"

        def __init__(self, options):
            if len(made) == 2:
                raise EngineUnavailable("the third copy cannot start")
            self.device, self.closed = "cpu", False
            made.append(self)

        def close(self):
            self.closed = True
            if self is made[0]:
                raise RuntimeError("close failed")

    with caplog.at_level(logging.WARNING, logger="engines.registry"), \
            pytest.raises(EngineUnavailable, match="the third copy cannot start"):
        registry._build(Copy, EngineOptions(tmp_path / "model.onnx", cpu_workers=3, cpu_threads=1))
    assert [copy.closed for copy in made] == [True, True]
    assert "closing a copy engine after a failed start also failed: RuntimeError: close failed" in caplog.text


def test_a_batch_that_fills_while_the_oldest_runs_goes_to_a_free_worker_at_once(small_model):
    """Two workers whose batches return only once both run at the same time: the second
    batch fills while the first runs, and must start then. Before, the inference thread
    waited for the first batch's result before it looked for the next, so the two never
    met (the workers ran one batch at a time until a backlog built up)."""
    barrier = threading.Barrier(2)
    pool = WorkerPool([Meeting(barrier), Meeting(barrier)], threads_per_worker=1)
    config, _ = parse_processor_args({"modelPath": str(small_model), "batchSize": 4, "batchTimeout": 30})
    published = Published()
    pipeline = InferencePipeline(config, published)
    pipeline.start(lambda: pool)
    image = np.ones((8, 8), np.int16)
    for uid in range(1, 5):
        pipeline.submit(good_frame(uid, image))
    assert wait_until(lambda: pool._ring.in_flight == 1, 5), "the first batch did not start"
    time.sleep(0.1)  # the inference thread is waiting now, the first batch at the barrier
    for uid in range(5, 9):
        pipeline.submit(good_frame(uid, image))
    assert published.wait(8, timeout_s=5) == 8, "the second batch did not start while the first ran"
    pipeline.stop()
    assert pipeline.stats.inference_errors == 0 and [p[0] for p in published] == list(range(1, 9))
