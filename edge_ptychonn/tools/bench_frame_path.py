"""The frame path's CPU cost per frame, stage by stage, in one process (bench part ``framepath``).

Real NTNDArrays (int16, the model's input size) go through each stage of a
consumer's pipeline in turn, timed with the process's CPU clock:

decode     NTNDArray -> metadata and a numpy view (``stream.frames.decode``)
load       crop/bin/cast into a batch buffer (``stream.preprocess.load_into``)
transform  sqrt/log1p and affine, once per batch (per frame: the batch's cost / n)
engine     the zero-cost engine (a copy of the batch)
encode     result -> output NTNDArray (``stream.frames.FrameEncoder``)
publish    ``PvaServer.update`` of a record (what PvaPy's publisher calls)

then what each further NDAttribute of the input costs (decode and encode of frames
that carry :data:`ATTRIBUTES` of them, the same in every frame or changing in every
frame as a motor position does, against frames with ColorMode alone: PvaPy converts
each attribute into Python on every read and back on every write, and an output
carries the input's attributes; and what is left with ``forwardAttributes`` false,
which does not read them), then the whole
:class:`~edge_ptychonn.stream.pipeline.InferencePipeline`
(publishing into a real PVA record) once with each ``batchRunner``: batches run
by the inference thread (``thread``: two threads take turns at the interpreter
lock) and by the thread that submits the frames (``receive``: what ``auto``
picks for this engine), and what PvaPy's passthrough does
with a frame in the same process (``PvaServer.update`` with the received
NTNDArray), and the floor of any processor that republishes a model's images: PvaPy's
calls alone that read a frame's uniqueId, time stamp and pixels and write them, the
pixels as a float32 image, into an output record that is published (the bench's floor
processor, :func:`pvapy_floor_us`; no Python of a pipeline around them). No network traffic: the record has no client. The live figures
(``zero`` and ``passthrough`` parts) add PvaPy's receive path and the transport,
which both processors pay alike.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import numpy as np


def _cpu_us_per_frame(run, n_frames: int, repeats: int = 3) -> float:
    """Best of ``repeats`` process-CPU times of ``run()``, per frame, in microseconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        run()
        best = min(best, time.process_time() - t0)
    return best / n_frames * 1e6


ATTRIBUTES = 10  # further NDAttributes (doubles, as motor positions or a ring current) on the attribute frames


def _with_attributes(images: np.ndarray, n_frames: int, changing: bool) -> list:
    """NTNDArrays of ``images`` with ColorMode and :data:`ATTRIBUTES` double attributes (the fast
    source's), whose values change from frame to frame when ``changing``."""
    from pvapy.utility.adImageUtility import AdImageUtility

    from .fast_source import frame_attributes

    frames = []
    for i in range(n_frames):
        pv = AdImageUtility.generateNtNdArray2D(i + 1, images[i % len(images)])
        pv["attribute"] = frame_attributes(ATTRIBUTES, i if changing else 0)
        frames.append(pv)
    return frames


def attribute_costs(images: np.ndarray, plain_frames: list, output: np.ndarray) -> dict:
    """CPU us per frame and per attribute of decoding and encoding :data:`ATTRIBUTES` further
    attributes: ``unchanged`` (the same in every frame), ``changing`` (a new value in each), and
    ``not_forwarded`` (changing, with ``forwardAttributes`` false: left unread)."""
    from edge_ptychonn.stream.frames import FrameEncoder, decode

    n = min(len(plain_frames), 1000)

    def decode_encode(frames, read_attributes=True):
        encoder = FrameEncoder(model_id="framepath")  # its own: it sets attributes only when they change
        return lambda: [encoder.encode(meta, output)
                        for meta, _ in (decode(pv, read_attributes=read_attributes) for pv in frames)]

    base = _cpu_us_per_frame(decode_encode(plain_frames[:n]), n)
    changing = _with_attributes(images, n, changing=True)
    costs = {"unchanged": decode_encode(_with_attributes(images, n, changing=False)),
             "changing": decode_encode(changing), "not_forwarded": decode_encode(changing, read_attributes=False)}
    return {kind: max(_cpu_us_per_frame(run, n) - base, 0.0) / ATTRIBUTES for kind, run in costs.items()}


def measure(model_path, input_hw: tuple[int, int], n_frames: int = 2000, batch: int = 8) -> dict:
    """CPU microseconds per frame of each stage, the whole pipeline and the passthrough."""
    import pvaccess as pva
    from pvapy.utility.adImageUtility import AdImageUtility

    from edge_ptychonn.stream.config import parse_processor_args
    from edge_ptychonn.stream.frames import FrameEncoder, decode
    from edge_ptychonn.stream.pipeline import InferencePipeline
    from edge_ptychonn.stream.preprocess import RunningTotal, load_into, transform_batch
    from engines import EngineOptions, create_engine

    n_frames -= n_frames % batch
    rng = np.random.default_rng(0)
    images = rng.poisson(200, (64, *input_hw)).astype(np.int16)
    frames = [AdImageUtility.generateNtNdArray2D(i + 1, images[i % len(images)]) for i in range(n_frames)]
    config, _ = parse_processor_args({"modelPath": str(model_path), "engine": "zero", "batchSize": batch})
    pre = config.preprocess
    server = pva.PvaServer()
    server.addRecord("framepath:out", pva.NtNdArray())
    server.addRecord("framepath:passthrough", pva.NtNdArray())
    engine = create_engine("zero", EngineOptions(model_path, max_batch=batch))
    try:
        decoded = [decode(pv) for pv in frames]
        buffer = np.zeros((batch, 1, *engine.input_shape), np.float32)
        encoder = FrameEncoder(model_id="framepath")
        outputs = engine.infer(buffer)

        def load():
            for k, (_, image) in enumerate(decoded):
                load_into(image, buffer[k % batch, 0], pre)

        running = RunningTotal(pre.normalize_window)  # the consumer's (normalize 'running')

        def transform():
            for _ in range(n_frames // batch):
                transform_batch(buffer, pre, running)

        def infer():
            for _ in range(n_frames // batch):
                engine.infer(buffer)

        encoded = encoder.encode(decoded[0][0], outputs[0, 0])
        stages = {
            "decode": _cpu_us_per_frame(lambda: [decode(pv) for pv in frames], n_frames),
            "load": _cpu_us_per_frame(load, n_frames),
            "transform": _cpu_us_per_frame(transform, n_frames),
            "engine": _cpu_us_per_frame(infer, n_frames),
            "encode": _cpu_us_per_frame(lambda: [encoder.encode(m, outputs[0, 0]) for m, _ in decoded], n_frames),
            "publish": _cpu_us_per_frame(lambda: [server.update("framepath:out", encoded) for _ in decoded], n_frames),
        }

        def whole(runner):
            settings, _ = parse_processor_args({"modelPath": str(model_path), "engine": "zero", "batchSize": batch,
                                                "batchRunner": runner})
            pipeline = InferencePipeline(settings, lambda pv: server.update("framepath:out", pv), logging.getLogger(__name__))
            pipeline.start(lambda: create_engine("zero", EngineOptions(model_path, max_batch=batch)))
            for start in range(0, n_frames, 8 * batch):  # bursts within the buffer pool: nothing dropped
                for pv in frames[start:start + 8 * batch]:
                    pipeline.submit(pv)
                pipeline.drain(30.0)
            pipeline.stop()
            if pipeline.stats.published != n_frames:
                raise RuntimeError(f"frame path: {pipeline.stats.published} of {n_frames} published ({pipeline.summary()})")

        attributes_us = attribute_costs(images, frames, outputs[0, 0])
        by_runner = {runner: _cpu_us_per_frame(partial(whole, runner), n_frames, repeats=2)
                     for runner in ("thread", "receive")}
        passthrough_us = _cpu_us_per_frame(lambda: [server.update("framepath:passthrough", pv) for pv in frames], n_frames)
        floor_us = pvapy_floor_us(frames, partial(server.update, "framepath:out"))
    finally:
        engine.close()
    return {
        "n_frames": n_frames, "batch": batch, "input_hw": list(input_hw),
        "stages_us": stages, "stages_sum_us": sum(stages.values()),
        "pipeline_us": by_runner["receive"], "pipeline_us_by_runner": by_runner, "passthrough_us": passthrough_us,
        "floor_us": floor_us, "attribute_us": attributes_us,
    }


def pvapy_floor_us(frames: list, publish) -> float:
    """CPU us per frame of the floor processor's work (:class:`~edge_ptychonn.tools.
    floor_processor.FloorImages`), each output given to ``publish``: the PvaPy calls that any
    processor republishing a model's float32 image with the frame's uniqueId and time stamp
    makes, and nothing else. What a consumer spends above this is its own Python."""
    from .floor_processor import FloorImages

    images = FloorImages()  # not the processor itself: PvaPy's base class sets up logging to stdout
    return _cpu_us_per_frame(lambda: [publish(images.output(pv)) for pv in frames], len(frames))


def table(result: dict) -> str:
    from .bench_report import table as make_table

    rows = [[stage, us] for stage, us in result["stages_us"].items()]
    rows += [["sum of stages", result["stages_sum_us"]],
             ["whole pipeline, batches run by the receiving thread (batchRunner receive: auto's choice "
              "for this engine)", result["pipeline_us"]]]
    if "pipeline_us_by_runner" in result:
        rows += [["whole pipeline, batches run by the inference thread (batchRunner thread)",
                  result["pipeline_us_by_runner"]["thread"]]]
    rows += [["passthrough: PvaServer.update of the received frame", result["passthrough_us"]]]
    if "floor_us" in result:
        rows += [["floor: PvaPy's calls alone to read a frame's uniqueId, time stamp and pixels, write them "
                  "(the pixels as a float32 image) and publish them", result["floor_us"]]]
    if "attribute_us" in result:
        rows += [["each further NDAttribute of the input, the same in every frame (decode + encode)",
                  result["attribute_us"]["unchanged"]],
                 ["each further NDAttribute of the input, changing in every frame (decode + encode)",
                  result["attribute_us"]["changing"]],
                 ["the same with forwardAttributes false (left unread)", result["attribute_us"]["not_forwarded"]]]
    return make_table(["stage", "CPU us/frame"], rows, ["", ".1f"])
