"""The PvaPy processor class, and the PvaPy signatures it depends on (contract tests)."""

import inspect
import json
import logging
import time

import numpy as np
import pvaccess as pva
import pytest
from pvapy.hpc.adImageProcessor import AdImageProcessor
from pvapy.hpc.dataProcessingController import DataProcessingController
from pvapy.utility.adImageUtility import AdImageUtility

from engines.base import cpu_layout, cpu_layout_device
from frames_util import good_frame
from processors.ptychonn import STATS, InferPtychoNNImageProcessor, PtychoNNProcessor
from processors.base import RESETS_KEY

FRAMEWORK = {
    "processorId": 1, "inputChannel": "ad:image", "outputChannel": "inference:1:output",
    "objectIdField": "uniqueId", "objectIdOffset": 9, "skipInitialUpdates": 1, "nSequentialUpdates": 8,
}


def test_pvapy_contract():
    """What the processor relies on in PvaPy 5.6."""
    assert issubclass(PtychoNNProcessor, AdImageProcessor)
    for name in ("start", "stop", "process", "configure", "resetStats", "getStats", "getStatsPvaTypes",
                 "getOutputPvObjectType", "updateOutputChannel"):
        assert callable(getattr(AdImageProcessor, name)), name
    result = AdImageUtility.reshapeNtNdArray(good_frame(3, np.zeros((4, 6), np.int16)))
    assert len(result) == 7 and result[0] == 3 and result[1].shape == (4, 6)  # (id, image[ny,nx], nx, ny, nz, colorMode, fieldKey)
    # The framework creates the output record from getOutputPvObjectType(first input)
    # and passes our arguments merged with its own keys.
    assert "getOutputPvObjectType" in inspect.getsource(DataProcessingController.createDataPublisher)
    assert "processorId" in inspect.getsource(DataProcessingController.__init__)


def test_a_consumer_started_with_a_crop_and_bin_its_models_card_was_not_made_for_warns(tmp_path, small_model, capfd):
    """The start says what start_geometry_warning says (before, nothing), at PvaPy's default log
    level too (its loggers show only errors: a warning logged through them went nowhere)."""
    model = tmp_path / "m.onnx"
    model.write_bytes(small_model.read_bytes())
    (tmp_path / "m.json").write_text(json.dumps({"preprocess": {"crop_hw": [256, 256], "bin_factor": 4}}))
    processor = PtychoNNProcessor({**FRAMEWORK, "modelPath": str(model), "engine": "onnxruntime",
                                   "crop": [128, 128], "bin": 2})
    assert not processor.logger.isEnabledFor(logging.WARNING)  # PvaPy's default: errors only
    out = capfd.readouterr().out
    assert "PtychoNNProcessor WARNING: the model card of" in out and "crop 256x256 and bin 4" in out, out
    PtychoNNProcessor({**FRAMEWORK, "modelPath": str(model), "engine": "onnxruntime"})  # the card's own
    assert "WARNING" not in capfd.readouterr().out


def test_stats_keys_and_types_come_from_one_table(small_model):
    processor = PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "engine": "onnxruntime"})
    assert processor.getStats().keys() == processor.getStatsPvaTypes().keys() == {*STATS, RESETS_KEY}
    for key in ("nFramesProcessed", "nBatchesProcessed", "nFramesQueued", "nFramesDropped", "nBadShape",
                "nBadColour", "nBadEmpty", "nBadDtype", "nBadCodec", "inferRate", "frameRate",
                "latencyP50Ms", "latencyP99Ms", "engine", "device"):
        assert key in STATS, key
    # the status record PvaPy builds from these types accepts these values
    record = pva.PvObject(processor.getStatsPvaTypes())
    record.set(processor.getStats())


def test_processor_runs_frames_and_reports(small_model, rng):
    published = []
    processor = PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "engine": "onnxruntime",
                                   "cpuThreads": 1, "batchSize": 4, "batchTimeout": 60})

    class Publisher:  # what PvaPy's PvasDataPublisher offers: updateOutputChannel(pv)
        def updateOutputChannel(self, pv):
            published.append(pv["uniqueId"])

    processor.outputChannel = FRAMEWORK["outputChannel"]
    processor.dataPublisher = Publisher()
    assert isinstance(processor.getOutputPvObjectType(good_frame(1, np.zeros((64, 64), np.int16))), pva.PvObject)
    for i in range(6):
        processor.process(good_frame(i + 1, rng.poisson(20, (64, 64)).astype(np.int16)))
    processor.start()  # frames that came before start() are kept
    assert processor.pipeline.drain(10.0)  # what SIGTERM does while the output server still serves
    assert published == [1, 2, 3, 4, 5, 6]
    # PvaPy stops the output server before it calls stop(): a frame still held then reaches
    # no client, so it counts as dropped, not as published
    processor.process(good_frame(7, rng.poisson(20, (64, 64)).astype(np.int16)))
    processor.stop()
    assert published == [1, 2, 3, 4, 5, 6]
    stats = processor.getStats()
    assert (stats["nFramesReceived"], stats["nFramesProcessed"], stats["nDroppedStopping"]) == (7, 6, 1)
    assert stats["nFramesUnaccounted"] == 0
    # two consumers in the distributor group (FRAMEWORK): this one's share of the cores, its layout stated
    assert stats["engine"] == "onnxruntime" and stats["precision"] == "fp32"
    assert stats["device"] == cpu_layout_device("cpu", *cpu_layout(consumers=2))
    with pytest.raises(ValueError, match="cannot change batchSize"):
        processor.configure({"batchSize": 2})
    processor.configure({"batchTimeout": 1.5, "skipInitialUpdates": 0})
    assert processor.pipeline.config.batch_timeout_s == 1.5


def _four_frames_through(publisher, small_model, rng) -> PtychoNNProcessor:
    """A started processor (one batch of 4) that published 4 frames through ``publisher``
    (PvaPy's ``dataPublisher``: ``updateOutputChannel(pv)``, ``nErrors``), drained."""
    processor = PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "engine": "onnxruntime",
                                   "cpuThreads": 1, "batchSize": 4, "batchTimeout": 60})
    processor.outputChannel, processor.dataPublisher = FRAMEWORK["outputChannel"], publisher
    processor.start()
    for i in range(4):
        processor.process(good_frame(i + 1, rng.poisson(20, (64, 64)).astype(np.int16)))
    assert processor.pipeline.drain(10.0)
    return processor


def test_a_publish_that_pvapy_swallows_counts_as_a_publish_error(small_model, rng):
    from pvapy.hpc.pvasDataPublisher import PvasDataPublisher

    # PvaPy's publisher logs a failed update and counts it in nErrors instead of raising
    assert "self.nErrors += 1" in inspect.getsource(PvasDataPublisher.updateOutputChannel)

    class Publisher:
        nErrors = 0

        def updateOutputChannel(self, pv):
            if pv["uniqueId"] == 2:
                self.nErrors += 1

    processor = _four_frames_through(Publisher(), small_model, rng)
    stats = processor.getStats()
    processor.stop()
    assert (stats["nFramesProcessed"], stats["nPublishErrors"], stats["nFramesUnaccounted"]) == (3, 1, 0)


def test_stats_report_when_nothing_was_published_in_the_window(small_model, rng):
    """Batches ran but none of their frames was published (every update failed; likewise every
    output non-finite): the status report says so, with latencies 0. Before, getStats() raised
    IndexError (percentiles of no latencies), which ends PvaPy's consumer loop: the consumer
    died at its next status report."""

    class Publisher:
        nErrors = 0

        def updateOutputChannel(self, pv):
            self.nErrors += 1

    processor = _four_frames_through(Publisher(), small_model, rng)
    try:
        stats = processor.getStats()
    finally:
        processor.stop()
    assert (stats["nFramesProcessed"], stats["nPublishErrors"], stats["nBatchesProcessed"]) == (0, 4, 1)
    assert (stats["latencyP50Ms"], stats["latencyP99Ms"], stats["frameRate"]) == (0.0, 0.0, 0.0)
    assert stats["nFramesUnaccounted"] == 0


def test_bad_arguments_fail_at_construction(small_model):
    with pytest.raises(ValueError, match="unknown processor argument"):
        PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "bsz": 8})
    with pytest.raises(ValueError, match="unknown engine 'tensorrtx'"):
        PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "engine": "tensorrtx"})


def test_a_crop_that_cannot_give_the_models_input_fails_at_construction(small_model):
    """The small model takes 64x64: a crop and bin that give another size would have run and
    refused every frame as a bad frame (shape); a crop that gives 64x64 is accepted."""
    with pytest.raises(ValueError, match=r"crop \[200, 200\] with bin 1 does not give the model's 64x64 input "
                                         r"\(crop / bin must be 64x64, e.g. crop \[64, 64\]\)"):
        PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "crop": [200, 200]})
    with pytest.raises(ValueError, match=r"crop \[130, 130\] with bin 2 does not give"):
        PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "crop": [130, 130], "bin": 2})
    processor = PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "crop": [128, 128], "bin": 2})
    assert processor.config.preprocess.crop_hw == (128, 128)


def test_a_card_written_for_another_input_size_is_refused_at_start_and_at_a_swap(small_model, tmp_path):
    """A card beside the model that says another input size is another model's card: its
    preprocessing and output mask were applied to this model without a word."""
    import json
    import shutil

    from edge_ptychonn.model_card import ModelCard, card_path, save_card

    model = shutil.copy(small_model, tmp_path / "other.onnx")
    save_card(ModelCard(name="other", input_size=128), model)
    with pytest.raises(ValueError, match=r"says input_size 128, but the model takes 64x64 input: it is another "
                                         r"model's card"):
        PtychoNNProcessor({**FRAMEWORK, "modelPath": str(model)})
    processor = PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "engine": "onnxruntime"})
    processor.pipeline.engine = type("Running", (), {"input_shape": (64, 64)})()  # what start() would have made
    with pytest.raises(ValueError, match="says input_size 128"):
        processor._engine_for_model(model, processor.pipeline.id_pattern)
    card = json.loads(card_path(model).read_text())
    card["input_size"] = 64
    card_path(model).write_text(json.dumps(card))
    assert PtychoNNProcessor({**FRAMEWORK, "modelPath": str(model)}).config.model_path == model  # a card that fits
    # a card that gives its size only in its model block (as train writes it) is checked too
    from edge_ptychonn.model_card import ModelConfig

    save_card(ModelCard(name="other", model=ModelConfig(input_size=128)), model)
    with pytest.raises(ValueError, match="says input_size 128, but the model takes 64x64"):
        PtychoNNProcessor({**FRAMEWORK, "modelPath": str(model)})


def test_seed_drop_in_accepts_bsz_and_onnx_mdl(small_model):
    processor = InferPtychoNNImageProcessor({**FRAMEWORK, "bsz": 16, "onnx_mdl": str(small_model)})
    assert processor.config.batch_size == 16 and processor.config.model_path == small_model


def test_pvapy_contract_for_sigterm():
    """processors/shutdown.py finds PvaPy's controller on the main thread's stack and sets
    its shouldBeStopped flag, which both PvaPy loops poll."""
    from pvapy.hpc import mpDataConsumerController as mp
    from pvapy.hpc.dataConsumerController import DataConsumerController
    from pvapy.hpc.systemController import SystemController

    from processors.shutdown import find_controller

    assert "controller.shouldBeStopped" in inspect.getsource(mp.mpdcController)
    assert "self.shouldBeStopped" in inspect.getsource(SystemController.run)
    assert callable(DataConsumerController.processPvUpdate)

    class Controller:
        shouldBeStopped = False

        def processPvUpdate(self, wait):
            return find_controller(inspect.currentframe())

    assert find_controller(inspect.currentframe()) is None
    controller = Controller()

    def loop(controller):  # like mpdcController(): the controller is a local
        return controller.processPvUpdate(1.0)

    assert loop(controller) is controller


def test_pvapy_contract_for_draining_before_a_stop():
    """processors/shutdown.py wraps the stop() of the DataProcessingController that calls the
    processor's start(): PvaPy stops the PVA server there before it calls the processor's stop().
    The wrapped stop drains first, then stops as before."""
    from pvapy.hpc.dataProcessingController import DataProcessingController

    from processors.ptychonn import calling_controller
    from processors.shutdown import drain_before_stop

    def calling_processing_controller(frame, processor):  # as the processor's start() looks
        return calling_controller(frame, processor, "stop", "pvaServer")

    start, stop = inspect.getsource(DataProcessingController.start), inspect.getsource(DataProcessingController.stop)
    assert "self.userDataProcessor.start()" in start
    assert stop.index("self.pvaServer.stop()") < stop.index("self.userDataProcessor.stop()")
    calls = []

    class Processor:
        def start(self):
            return calling_processing_controller(inspect.currentframe().f_back, self)

    class Controller:  # like DataProcessingController
        def __init__(self):
            self.userDataProcessor, self.pvaServer = Processor(), None

        def start(self):
            return self.userDataProcessor.start()

        def stop(self):
            calls.append("stop")

    controller = Controller()
    assert controller.start() is controller
    assert calling_processing_controller(inspect.currentframe(), Processor()) is None
    assert drain_before_stop(controller, lambda timeout_s: calls.append(f"drain {timeout_s:g}") or True,
                             logging.getLogger("test"))
    controller.stop()
    assert calls == ["drain 2", "stop"]
    assert not drain_before_stop(None, None, logging.getLogger("test"))


def test_pvapy_contract_for_the_input_channels_reconnections():
    """processors/ptychonn.py finds the Channel that PvaPy's DataConsumer monitors on the stack
    of the processor's start() (the DataConsumer starts its receiver, then the processing
    controller, which starts the processor) and watches its connection: only a connection
    after one that was lost tells the pipeline."""
    from pvapy.hpc.dataConsumer import DataConsumer
    from pvapy.hpc.monitorDataReceiver import MonitorDataReceiver

    from processors.ptychonn import ReconnectWatch, input_channel

    start = inspect.getsource(DataConsumer.start)
    assert start.index("self.dataReceiver.start()") < start.index("self.processingController.start()")
    assert "self.channel = pva.Channel(" in inspect.getsource(MonitorDataReceiver.__init__)
    assert callable(pva.Channel.setConnectionCallback) and callable(pva.Channel.isConnected)

    class Channel:
        def __init__(self, connected):
            self.callback, self.connected = None, connected

        def setConnectionCallback(self, callback):
            self.callback = callback

        def isConnected(self):
            return self.connected

    class Receiver:
        def __init__(self, channel):
            self.channel = channel

    class Consumer:  # like DataConsumer.start() -> the controller's -> the processor's
        def __init__(self, channel):
            self.dataReceiver = Receiver(channel)

        def start(self):
            return controller_start()

    def controller_start():
        return processor_start()

    def processor_start():
        return input_channel(inspect.currentframe().f_back)

    channel = Channel(connected=False)
    assert Consumer(channel).start() is channel
    assert input_channel(inspect.currentframe()) is None

    class Pipeline:
        reconnections = 0

        def reconnected(self):
            self.reconnections += 1

    for connected_at_start, events, told in [(False, [False, True, False, True], 1), (True, [False, True], 1),
                                              (False, [True], 0), (True, [], 0)]:
        pipeline, channel = Pipeline(), Channel(connected_at_start)
        ReconnectWatch(pipeline).watch(channel)
        for event in events:
            channel.callback(event)
        assert pipeline.reconnections == told, (connected_at_start, events)


def test_pvapy_contract_for_making_the_output_channel_at_start():
    """processors/ptychonn.py calls the DataProcessingController's createDataPublisher() from the
    processor's start(), where PvaPy calls it at the first input record only; there it then
    does nothing, as the publisher is made."""
    from pvapy.hpc.dataProcessingController import DataProcessingController

    from processors.ptychonn import create_output_channel

    create, process = (inspect.getsource(f) for f in (DataProcessingController.createDataPublisher,
                                                      DataProcessingController.process))
    assert "if not self.outputChannel or self.dataPublisher:" in create and "getOutputPvObjectType(pvObject)" in create
    assert "self.createDataPublisher(pvObject)" in process
    made = []

    class Controller:
        outputChannel, dataPublisher = "x:1:output", None

        def createDataPublisher(self, pv):
            made.append(pv)
            self.dataPublisher = object()

    controller = Controller()
    assert create_output_channel(controller) and made == [None]
    assert not create_output_channel(controller) and made == [None]  # made once
    assert not create_output_channel(None)
    controller = Controller()
    controller.outputChannel = ""
    assert not create_output_channel(controller) and made == [None]  # no output channel asked for


def test_stats_describe_accounting(small_model):
    processor = PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "engine": "onnxruntime"})
    stats = processor.getStats()
    for key in ("nDroppedOverload", "nDroppedNotReady", "nDroppedStopping", "nBadNonfinite", "nFramesMissed",
                "nForeignFrames", "nStreamRestarts", "nEmptyRecords", "nFramesUnaccounted", "completeness",
                "nNonFiniteOutputs"):
        assert key in stats, key
    assert stats["nFramesUnaccounted"] == 0 and stats["completeness"] == 1.0
    assert processor.pipeline.stats.ids.stride == 16  # runs of 8, offset 9: two consumers


def _run_consumer(env, module_dir, processor_args: str, processor_class: str = "processors.ptychonn.PtychoNNProcessor"):
    """``edge-ptychonn consumer`` with one consumer, to its exit (bounded); ``module_dir`` holds
    test processor modules."""
    import subprocess
    import sys
    from pathlib import Path

    from channel_names import PREFIX

    root = Path(__file__).resolve().parent.parent
    env = {**env, "PYTHONPATH": f"{module_dir}:{root}"}
    return subprocess.run(
        [sys.executable, "-m", "edge_ptychonn.cli", "consumer", "-ic", f"{PREFIX}:noengine:image",
         "-oc", f"{PREFIX}:noengine:*:output", "-nc", "1", "-pc", processor_class, "-pa", processor_args],
        capture_output=True, text=True, timeout=120, env=env, cwd=root)


@pytest.mark.parametrize("processor_args, message", [
    ("notjson", "edge-ptychonn consumer: --processor-args is not JSON (Expecting value"),
    ("[1]", "edge-ptychonn consumer: --processor-args must be a JSON object such as"),
])
def test_consumer_answers_processor_args_that_are_no_json_object_in_one_line(tmp_path, processor_args, message):
    """Before: a bare "Expecting value: line 1 column 1 (char 0)" that named no option, and
    a traceback for a JSON list."""
    import os

    done = _run_consumer(dict(os.environ), tmp_path, processor_args)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_consumer_checks_only_pvapys_json_options():
    from edge_ptychonn.tools.consumer import check_json_options

    assert check_json_options(["-ic", "ad:image", "-pa", '{"batchSize": 8}', "--output-args={}"]) is None
    assert check_json_options(["-pa", ""]) is None  # PvaPy takes an empty value as no arguments
    assert check_json_options(["-ic", "[1]"]) is None  # not a JSON option
    assert check_json_options(["--input-args=[1]"]).startswith("--input-args must be a JSON object")
    assert check_json_options(["-oa", "{x"]).startswith("--output-args is not JSON")


def test_consumer_whose_engine_cannot_start_is_one_line_and_status_2(pva_env, tmp_path, small_model):
    """An engine that cannot run here (no GPU for device cuda:0, TensorRT missing) stops one
    consumer with one line and exit status 2, as the README says (before: a traceback, 1)."""
    (tmp_path / "noengine_processor.py").write_text(
        "from engines.base import EngineUnavailable\n"
        "from processors.ptychonn import PtychoNNProcessor\n\n\n"
        "class NoEngine(PtychoNNProcessor):\n"
        "    def _create_engine(self):\n"
        "        raise EngineUnavailable(\"engine 'tensorrt' cannot run here: tensorrt not installed\")\n"
    )
    args = f'{{"modelPath": "{small_model}", "engine": "onnxruntime"}}'
    done = _run_consumer(pva_env, tmp_path, args, "noengine_processor.NoEngine")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "edge-ptychonn consumer: engine 'tensorrt' cannot run here: tensorrt not installed"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


PIXEL_TYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")


def test_every_pixel_type_of_a_non_square_frame_gives_the_same_output_record(small_model):
    """Each pixel type of the NTNDArray value union (dimension[0] is x: a 132-row, 200-column
    frame), cropped [128, 128] and binned 2, gives what the engine gives on that window, in an
    output record that says 64x64 float32 with the input's id, time stamps and attributes; a
    colour frame and a jpeg frame are counted by kind."""
    from frames_util import colour_frame, compressed_frame
    from engines import EngineOptions, create_engine

    image = np.random.default_rng(3).integers(0, 100, (132, 200))
    published = []

    class Publisher:
        nErrors = 0

        def updateOutputChannel(self, pv):
            published.append(pva.PvObject(pv.getStructureDict(), pv.get()))  # PvaPy copies it too

    processor = PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "engine": "onnxruntime",
                                   "cpuThreads": 1, "batchSize": 4, "batchTimeout": 0.05, "crop": [128, 128], "bin": 2})
    processor.outputChannel, processor.dataPublisher = FRAMEWORK["outputChannel"], Publisher()
    processor.start()
    inputs = []
    for uid, dtype in enumerate(PIXEL_TYPES, start=1):
        pv = good_frame(uid, image.astype(dtype), energy_kev=8.0 + uid)
        assert [d["size"] for d in pv["dimension"]] == [200, 132]
        inputs.append(pv)
        processor.process(pv)
    processor.process(colour_frame(11, (132, 200)))
    processor.process(compressed_frame(12, "jpeg", image.astype(np.uint8)))
    try:
        assert processor.pipeline.drain(20.0)
        stats = processor.getStats()
    finally:
        processor.stop()
    assert (stats["nFramesProcessed"], stats["nBadColour"], stats["nBadCodec"]) == (10, 1, 1)
    window = image[2:130, 36:164].reshape(64, 2, 64, 2).sum(axis=(1, 3))[None, None].astype(np.float32)
    expected = create_engine("onnxruntime", EngineOptions(small_model, max_batch=4, cpu_threads=1)).infer(window)[0, 0]
    for pv, out in zip(inputs, published, strict=True):
        assert out["uniqueId"] == pv["uniqueId"]
        assert [d["size"] for d in out["dimension"]] == [64, 64]
        assert out.getSelectedUnionFieldName() == "floatValue" and not out["codec.name"]
        assert out["compressedSize"] == out["uncompressedSize"] == 64 * 64 * 4
        np.testing.assert_allclose(np.asarray(out["value"][0]["floatValue"]).reshape(64, 64), expected, atol=1e-5)
        assert out["timeStamp"] == pv["timeStamp"] and out["dataTimeStamp"] == pv["dataTimeStamp"]
        assert [a["name"] for a in out["attribute"]] == ["ColorMode", "EnergyKeV", "modelId"]
        assert out["attribute"][1]["value"][0]["value"] == 8.0 + pv["uniqueId"]


def test_forward_attributes_false_publishes_colour_mode_and_model_id_alone(small_model):
    """forwardAttributes false: the outputs carry ColorMode and modelId, not the input's
    attributes (left unread); id, time stamps and image as with them."""
    published = []

    class Publisher:
        nErrors = 0

        def updateOutputChannel(self, pv):
            published.append(pva.PvObject(pv.getStructureDict(), pv.get()))

    image = np.random.default_rng(5).integers(0, 100, (64, 64)).astype(np.int16)
    outputs = {}
    for forward in (True, False):
        published.clear()
        processor = PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "engine": "onnxruntime",
                                       "cpuThreads": 1, "batchSize": 2, "forwardAttributes": forward})
        processor.outputChannel, processor.dataPublisher = FRAMEWORK["outputChannel"], Publisher()
        processor.start()
        try:
            inputs = [good_frame(uid, image, energy_kev=8.0 + uid) for uid in (1, 2)]
            for pv in inputs:
                processor.process(pv)
            assert processor.pipeline.drain(20.0)
        finally:
            processor.stop()
        assert [out["uniqueId"] for out in published] == [1, 2]
        for pv, out in zip(inputs, published):
            assert out["timeStamp"] == pv["timeStamp"] and out["dataTimeStamp"] == pv["dataTimeStamp"]
        outputs[forward] = [(out["attribute"], np.asarray(out["value"][0]["floatValue"])) for out in published]
    assert [a["name"] for a in outputs[True][1][0]] == ["ColorMode", "EnergyKeV", "modelId"]
    assert [a["name"] for a in outputs[False][1][0]] == ["ColorMode", "modelId"]
    assert outputs[False][1][0][1]["value"][0]["value"] == outputs[True][1][0][2]["value"][0]["value"]  # the same model
    for (_, with_them), (_, without) in zip(outputs[True], outputs[False]):
        np.testing.assert_array_equal(with_them, without)


def test_the_distributor_group_follows_pvapys_configure_for_a_later_model_swap(small_model):
    """objectIdOffset 9 with runs of 8 is a group of 2; when two consumers join, PvaPy's configure
    says 25: a model swap after that lays its engine out for 4 consumers (it kept 2)."""
    from engines import EngineOptions

    processor = PtychoNNProcessor({**FRAMEWORK, "modelPath": str(small_model), "engine": "onnxruntime"})
    assert processor.group_size == 2
    processor.configure({"objectIdOffset": 25})
    assert processor.group_size == 4
    options = processor._engine_options(small_model, "fp32")
    assert isinstance(options, EngineOptions) and options.consumers == 4


def test_a_refused_configure_leaves_pvapys_distributor_pattern_as_it_was(small_model):
    """PvaPy's controller takes a configure request's objectIdOffset and nSequentialUpdates before
    it calls the processor. When the processor refused the request, PvaPy's count went on in the
    refused pattern and ours in the old one; an objectIdOffset of 0 made PvaPy's count divide by
    zero on every later frame, which then never reached the processor."""
    framework = {**FRAMEWORK, "outputChannel": "", "objectIdOffset": 2, "nSequentialUpdates": 1, "skipInitialUpdates": 0}
    processor = PtychoNNProcessor({**framework, "modelPath": str(small_model), "engine": "zero"})
    controller = DataProcessingController(framework, processor)
    try:
        with pytest.raises(ValueError, match="objectIdOffset must be an integer >= 1"):
            controller.configure({"objectIdOffset": 0})
        assert (controller.nSequentialUpdates, controller.objectIdOffset) == (1, 2)
        controller.process(good_frame(1, np.zeros((64, 64), np.int16)))  # raised ZeroDivisionError
        with pytest.raises(ValueError, match="scale must be > 0"):
            controller.configure({"objectIdOffset": 5, "nSequentialUpdates": 2, "scale": -1})
        assert (controller.nSequentialUpdates, controller.objectIdOffset) == (1, 2) == processor.pipeline.id_pattern
        controller.configure({"objectIdOffset": 5, "nSequentialUpdates": 2})  # accepted: both take it
        assert (controller.nSequentialUpdates, controller.objectIdOffset) == (2, 5) == processor.pipeline.id_pattern
        assert processor.getStats()["nFramesReceived"] == 1
    finally:
        processor.stop()


def test_pvapy_contract_for_configure_requests():
    """restore_on_refusal wraps the configure() of the DataProcessingController that starts the
    processor: PvaPy's consumer calls it through the attribute (so the wrapper is called), and it
    sets its own keys from the request before it calls the processor's configure()."""
    from pvapy.hpc.dataConsumer import DataConsumer

    assert "self.processingController.configure(" in inspect.getsource(DataConsumer)
    source = inspect.getsource(DataProcessingController.configure)
    assert source.index("self.skipInitialUpdates =") < source.index("self.userDataProcessor.configure(")
    for key in ("skipInitialUpdates", "objectIdOffset", "nSequentialUpdates"):
        assert f"self.{key} = int(" in source, key


def test_a_refused_configure_changes_none_of_the_keys_pvapy_took(small_model):
    """PvaPy's controller sets skipInitialUpdates, objectIdOffset and nSequentialUpdates from a
    request before anything can refuse it. skipInitialUpdates=300 sent with an invalid key was
    refused, yet the consumer then discarded 300 frames, counted as missed upstream (accepted, it
    discarded them counted nowhere); objectIdOffset with nSequentialUpdates=abc (PvaPy's own int()
    raised before the processor saw the request) left PvaPy's nMissed counting in the new pattern."""
    framework = {**FRAMEWORK, "outputChannel": "", "objectIdOffset": 2, "nSequentialUpdates": 1, "skipInitialUpdates": 0}
    processor = PtychoNNProcessor({**framework, "modelPath": str(small_model), "engine": "zero", "batchSize": 1})
    controller = DataProcessingController(framework, processor)
    controller.start()
    try:
        with pytest.raises(ValueError, match="invalid literal for int"):
            controller.configure({"objectIdOffset": 5, "nSequentialUpdates": "abc"})
        assert (controller.nSequentialUpdates, controller.objectIdOffset) == (1, 2)
        for request in ({"skipInitialUpdates": 300, "transform": "bogus"}, {"skipInitialUpdates": 300}):
            with pytest.raises(ValueError, match="skipInitialUpdates is not changeable at run time"):
                controller.configure(request)
            assert controller.skipInitialUpdates == 0
        for uid in range(1, 4):
            controller.process(good_frame(uid, np.zeros((64, 64), np.int16)))
        assert processor.pipeline.drain(5.0)
        stats = processor.getStats()
        # -siu 0 in a group of 2: the first record is the connection's, dropped (the test below)
        assert stats["nFramesReceived"] == 3 and stats["nFramesProcessed"] == 2, stats
        assert stats["nDroppedReconnect"] == 1, stats
        assert controller.nMissed == 0
    finally:
        controller.stop()


def test_a_refused_configure_does_not_undo_the_pattern_another_request_set_meanwhile(small_model, model_b,
                                                                                      monkeypatch):
    """PvaPy runs each configure request on a timer thread of its own. A model swap with a new
    objectIdOffset (consumers joined) was accepted while a refused request with an objectIdOffset
    waited for it; the refused one's wrapper then put back PvaPy's objectIdOffset of before both,
    so PvaPy's nMissed counted in the old pattern and ours in the new one."""
    import threading

    import processors.ptychonn as ptychonn

    building, built = threading.Event(), threading.Event()
    real_create = ptychonn.create_engine

    def held_create(name, options, *logger):  # the swap's engine is built once the test says so
        if options.model_path == model_b:
            building.set()
            assert built.wait(10)
        return real_create(name, options)

    monkeypatch.setattr(ptychonn, "create_engine", held_create)
    framework = {**FRAMEWORK, "outputChannel": "", "objectIdOffset": 1, "nSequentialUpdates": 1}
    processor = PtychoNNProcessor({**framework, "modelPath": str(small_model), "engine": "zero"})
    controller = DataProcessingController(framework, processor)
    controller.start()
    pipeline = processor.pipeline

    class SeenLock:  # the configure lock, telling the test when the second request waits for it
        def __init__(self, lock):
            self.lock, self.tries = lock, 0

        def acquire(self, *args, **kwargs):
            self.tries += 1
            return self.lock.acquire(*args, **kwargs)

        def release(self):
            self.lock.release()

    pipeline._configure_lock = lock = SeenLock(pipeline._configure_lock)
    answers = {}

    def send(name, request):
        try:
            answers[name] = controller.configure(request)
        except ValueError as exc:
            answers[name] = exc

    swap = threading.Thread(target=send, args=("swap", {"modelPath": str(model_b), "objectIdOffset": 3}), daemon=True)
    refused = threading.Thread(target=send, args=("refused", {"objectIdOffset": 5, "scale": -1}), daemon=True)
    try:
        swap.start()
        assert building.wait(10)
        refused.start()
        deadline = time.monotonic() + 10
        while lock.tries < 2:  # the refused request waits for the swap's lock
            assert time.monotonic() < deadline
            time.sleep(0.005)
        built.set()
        swap.join(10)
        refused.join(10)
        assert isinstance(answers["refused"], ValueError) and not isinstance(answers["swap"], ValueError), answers
        assert pipeline.id_pattern == (1, 3)
        assert (controller.nSequentialUpdates, controller.objectIdOffset) == (1, 3)
    finally:
        built.set()
        controller.stop()


def test_a_model_swap_sent_with_a_new_group_lays_its_engine_out_for_the_new_group(small_model, model_b,
                                                                                 monkeypatch):
    """One request with modelPath and objectIdOffset (two consumers joined: 9 -> 25 with runs of 8):
    the new engine's CPU layout is for the 4 consumers of the request; before, the pattern was
    taken only after the swap, so the engine was laid out for the 2 of before. A refused model
    leaves the pattern, and the next engine's layout, as they were."""
    import processors.ptychonn as ptychonn

    builds = []
    real_create = ptychonn.create_engine
    monkeypatch.setattr(ptychonn, "create_engine", lambda name, options, *logger: builds.append(options)
                        or real_create(name, options))
    processor = PtychoNNProcessor({**FRAMEWORK, "outputChannel": "", "modelPath": str(small_model), "engine": "zero"})
    processor.start()
    try:
        assert builds[-1].consumers == 2
        with pytest.raises(ValueError, match="is not a file"):
            processor.configure({"modelPath": str(small_model.with_name("none.onnx")), "objectIdOffset": 25})
        assert processor.group_size == 2
        processor.configure({"modelPath": str(model_b), "objectIdOffset": 25})
        assert builds[-1].model_path == model_b and builds[-1].consumers == 4
        assert processor.group_size == 4 and processor.pipeline.id_pattern == (8, 25)
    finally:
        processor.stop()


@pytest.mark.parametrize("skip, consumers", [(0, 2), (1, 2), (0, 1)])
def test_the_first_connections_record_is_dropped_with_siblings_when_pvapy_does_not_skip_it(small_model, skip, consumers):
    """With -siu 0 PvaPy hands every consumer of a group the channel's current value on the first
    connection, outside the distributor: two consumers started into a running stream both
    published it (one uniqueId on two outputs), and one of them counted 6 frames missed from it.
    It is dropped and counted as the record a reconnection hands over; with PvaPy's default
    (-siu 1, it skips that record itself) or one consumer, every frame is processed."""
    framework = {**FRAMEWORK, "outputChannel": "", "skipInitialUpdates": skip,
                 "objectIdOffset": 8 * (consumers - 1) + 1}
    processor = PtychoNNProcessor({**framework, "modelPath": str(small_model), "engine": "zero"})
    controller = DataProcessingController(framework, processor)
    controller.start()
    try:
        # the current frame when the consumers connect (any consumer's), then this one's next run
        for uid in [353, *range(361, 369)] if consumers == 2 else range(353, 362):
            controller.process(good_frame(uid, np.zeros((64, 64), np.int16)))
        assert processor.pipeline.drain(5.0)
        stats = processor.getStats()
    finally:
        controller.stop()
    dropped = 1 if (skip, consumers) == (0, 2) else 0
    processed = 9 - skip - dropped
    assert (stats["nFramesReceived"], stats["nFramesProcessed"]) == (9 - skip, processed), stats
    assert (stats["nDroppedReconnect"], stats["nFramesMissed"], stats["nFramesUnaccounted"]) == (dropped, 0, 0), stats


def _queued_consumer(small_model, n_frames: int):
    """A real PvaPy DataConsumer with a receiver queue (-rqs) holding ``n_frames`` frames, its
    processor started by it (the DataProcessingController's start(), as the consumer's), on a
    channel nobody serves: the frames are put in its queue as its monitor would."""
    from pvapy.hpc.dataConsumer import DataConsumer

    framework = {**FRAMEWORK, "outputChannel": "", "objectIdOffset": 1, "nSequentialUpdates": 1, "skipInitialUpdates": 0}
    processor = PtychoNNProcessor({**framework, "modelPath": str(small_model), "engine": "zero"})
    consumer = DataConsumer(1, "test:rqs:nobody", receiverQueueSize=1000,
                            processingController=DataProcessingController(framework, processor))
    consumer.start()
    for uid in range(1, n_frames + 1):
        consumer.pvObjectQueue.put(good_frame(uid, np.zeros((64, 64), np.int16)))
    return consumer, processor


def test_a_stop_publishes_the_frames_waiting_in_pvapys_receiver_queue(small_model):
    """With -rqs PvaPy stopped with frames still in its receiver queue: they reached the consumer
    and went nowhere, counted nowhere (405 frames at a SIGTERM under 300 frames/s, final statistics
    'published 1907, missed 0, completeness 1.0'). A stop now hands them to the processor first,
    while its outputs still reach clients: all published."""
    consumer, processor = _queued_consumer(small_model, 40)
    for _ in range(8):  # PvaPy's loop has taken some
        assert consumer.processFromQueue(0.1)
    consumer.stop()
    stats = processor.getStats()
    assert len(consumer.pvObjectQueue) == 0
    assert (stats["nFramesReceived"], stats["nFramesProcessed"], stats["nFramesDropped"]) == (40, 40, 0), stats
    assert stats["nFramesUnaccounted"] == 0


def test_frames_left_in_pvapys_receiver_queue_after_the_stop_are_counted_as_dropped(small_model):
    """What the drain before the stop could not take (its 2 s ran out) is counted as dropped
    (stopping) by the processor's stop(), with the frames' uniqueIds seen: no loss unaccounted."""
    consumer, processor = _queued_consumer(small_model, 20)
    for _ in range(4):
        assert consumer.processFromQueue(0.1)
    assert processor.pipeline.drain(5.0)  # those 4 published
    consumer.dataReceiver.stop()
    processor.stop()  # no drain before it
    stats = processor.getStats()
    assert len(consumer.pvObjectQueue) == 0
    assert (stats["nFramesReceived"], stats["nDroppedStopping"], stats["nFramesMissed"]) == (20, 16, 0), stats
    assert stats["nFramesProcessed"] + stats["nDroppedStopping"] == 20 and stats["nFramesUnaccounted"] == 0


def test_a_refused_configure_leaves_pvapys_receiver_queue_size(small_model):
    """PvaPy's DataConsumer takes receiverQueueSize (-rqs) from a configure request before the
    processor sees it: a request refused for another key ("nothing changed") still resized the
    receiver queue. Refused, it is left as it was; a reset_stats resets the processor once."""
    consumer, processor = _queued_consumer(small_model, 4)
    try:
        with pytest.raises(ValueError, match="scale must be > 0"):
            consumer.configure({"receiverQueueSize": 5, "scale": -1})
        assert (consumer.receiverQueueSize, consumer.pvObjectQueue.maxLength) == (1000, 1000)
        consumer.configure({"receiverQueueSize": 2000})  # PvaPy's key, accepted: PvaPy takes it
        assert (consumer.receiverQueueSize, consumer.pvObjectQueue.maxLength) == (2000, 2000)
        for _ in range(4):
            assert consumer.processFromQueue(0.1)
        assert processor.pipeline.drain(5.0)
        resets = []
        real_reset = processor.pipeline.reset_stats
        processor.pipeline.reset_stats = lambda: resets.append(1) or real_reset()
        consumer.resetStats()
        assert len(resets) == 1 and processor.getStats()["nFramesReceived"] == 0
        assert processor.getStats()["nStatsResets"] == 1  # the one count a reset keeps: launch judges no loss
    finally:
        consumer.stop()


def test_a_stopped_consumer_leaves_its_distributor_group_at_once(pva_env, small_model):
    """A consumer of a distributor group that stops while its siblings go on (a SIGTERM to one
    of N forked consumers; one process of a group stopped) kept its input channel open after
    PvaPy stopped its monitor, until the process exited (a forked consumer sleeps a second after
    its final statistics): the source's distributor waited for it to take its turn, and no
    consumer got a frame. A SIGTERM to one of three consumers at 300 frames/s lost about 300
    frames of every consumer's runs, counted by none of them. The stop now closes the channel:
    a real PvaPy DataConsumer (our processor under it) and a sibling on one in-process server
    with the distributor; once the consumer has stopped (its process still alive), the
    sibling gets every later frame."""
    from pvapy.hpc.dataConsumer import DataConsumer
    from pvapy.hpc.monitorDataReceiver import MonitorDataReceiver

    from channel_names import PREFIX
    from edge_ptychonn.tools.processes import wait_until

    # PvaPy 5.6: the receiver stops its monitor before the processing controller stops (the
    # processor's drain before the stop runs there); its statistics read the channel's counters
    stop = inspect.getsource(DataConsumer.stop)
    assert stop.index("self.dataReceiver.stop()") < stop.index("self.processingController.stop()")
    assert "self.channel.getMonitorCounters()" in inspect.getsource(MonitorDataReceiver.getStats)

    name = f"{PREFIX}:leave:image"
    frame = lambda uid: good_frame(uid, np.zeros((64, 64), np.int16))
    server = pva.PvaServer(name, frame(0))
    framework = {**FRAMEWORK, "outputChannel": "", "objectIdOffset": 3, "nSequentialUpdates": 2}
    processor = PtychoNNProcessor({**framework, "modelPath": str(small_model), "engine": "zero"})
    consumer = DataConsumer(1, name, serverQueueSize=100, distributorTriggerFieldName="uniqueId",
                            distributorUpdates=2, processingController=DataProcessingController(framework, processor))
    sibling, got = pva.Channel(name), []
    sibling.monitor(lambda pv: got.append(pv.getInt("uniqueId")), consumer.getPvMonitorRequest())
    consumer.start()
    stopped = False
    try:
        uid = 0

        def publish() -> None:
            nonlocal uid
            uid += 1
            server.update(name, frame(uid))

        # one frame at a time until the distributor has given both of them frames
        assert wait_until(lambda: publish() or (processor.getStats()["nFramesReceived"] and any(got)), 5.0, 0.01)
        consumer.stop()  # PvaPy's stop: the process lives on a while (its final statistics, then a second)
        stopped = True
        before = uid
        assert wait_until(lambda: publish() or any(u > before for u in got), 3.0, 0.01), f"no frame since: {got}"
        before = uid
        for _ in range(8):
            publish()
        assert wait_until(lambda: got[-1:] == [before + 8], 3.0), f"the sibling stopped getting frames: {got}"
        assert [u for u in got if u > before] == list(range(before + 1, before + 9))
        assert not isinstance(consumer.dataReceiver.channel, pva.Channel)  # closed: the receiver keeps none
        assert isinstance(consumer.getStats(), dict)  # the final statistics still read the receiver's
    finally:
        if not stopped:
            consumer.stop()
        sibling.stopMonitor()


def test_two_stats_resets_at_once_are_both_counted():
    """PvaPy runs each reset_stats request on a thread of its own: two at once could count one."""
    import threading

    from processors.base import StatsFromTable

    class SlowRead(StatsFromTable):  # widens the gap between reading the count and writing it back
        counting_resets = True
        _count = 0

        @property
        def stats_resets(self):
            count = self._count
            time.sleep(0.05)
            return count

        @stats_resets.setter
        def stats_resets(self, value):
            self._count = value

    counted = SlowRead()
    threads = [threading.Thread(target=counted.count_stats_reset) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert counted._count == 2
