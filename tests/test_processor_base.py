"""The shared processor base and the generic argument module: tables, errors, stats, once-per-kind logs."""

from dataclasses import dataclass
from pathlib import Path

import pvaccess as pva
import pytest

from edge_ptychonn.stream.arguments import (
    FRAMEWORK_KEYS, boolean, choice, int_pair, integer, number, optional, parse_arguments, path,
    runtime_changes, text, text_list,
)
from processors.base import ProcessorBase, attribute_value, seconds

FRAMEWORK = {"processorId": 3, "inputChannel": "in", "outputChannel": "out", "objectIdField": "uniqueId",
             "objectIdOffset": 1, "skipInitialUpdates": 1, "nSequentialUpdates": 1, "fieldRequest": ""}


@dataclass(frozen=True)
class Settings:
    rate_hz: float = 2.0
    size: int = 8
    mode: str = "a"

    def __post_init__(self):
        if self.mode == "b" and self.size > 4:
            raise ValueError("mode 'b' needs size <= 4")


ARGS = {"rate": ("rate_hz", number(0.1, 10)), "size": ("size", integer(1, 16)), "mode": ("mode", choice("a", "b"))}


class Counter(ProcessorBase):
    ARGS = ARGS
    SETTINGS = Settings
    STATS = {
        "nSeen": (pva.ULONG, lambda p: p.seen),
        "rateHz": (pva.DOUBLE, lambda p: p.settings.rate_hz),
        "name": (pva.STRING, lambda p: "counter"),
    }
    RUNTIME_KEYS = ("rate",)

    def __init__(self, configDict=None):
        super().__init__(configDict)
        self.seen = 0


def test_framework_keys_are_separated_and_unknown_keys_named():
    fields, framework = parse_arguments({**FRAMEWORK, "rate": 5, "size": 3}, ARGS)
    assert fields == {"rate_hz": 5.0, "size": 3}
    assert framework == FRAMEWORK and set(framework) <= FRAMEWORK_KEYS
    with pytest.raises(ValueError, match=r"unknown processor argument\(s\) bogus, rte; accepted: rate, size, mode"):
        parse_arguments({**FRAMEWORK, "rte": 1, "bogus": 2}, ARGS)


@pytest.mark.parametrize("key, value, message", [
    ("rate", 0, "rate must be a finite number 0.1..10, got 0"),
    ("rate", True, "rate must be a finite number"),
    ("size", 2.5, "size must be an integer 1..16, got 2.5"),
    ("mode", "c", "mode must be one of 'a', 'b', got 'c'"),
])
def test_invalid_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        parse_arguments({key: value}, ARGS)


def test_converters():
    assert int_pair(1)([3, 4]) == (3, 4)
    with pytest.raises(ValueError, match="two integers >= 1"):
        int_pair(1)([0, 4])
    assert text_list(2)(["PosY", "PosX"]) == ("PosY", "PosX")
    with pytest.raises(ValueError):
        text_list(2)(["PosY"])
    assert optional(path())(None) is None and optional(path())("~/x") == Path("~/x").expanduser()
    assert boolean()(False) is False
    with pytest.raises(ValueError):
        boolean()(1)
    with pytest.raises(ValueError):
        text()("")
    fields, _ = parse_arguments({"alias": 4}, ARGS, aliases={"alias": "size"})
    assert fields == {"size": 4}


def test_runtime_changes_only_the_allowed_keys():
    s = Settings()
    new, applied = runtime_changes(s, {"rate": 4, "skipInitialUpdates": 0}, ARGS, ("rate",))
    assert new.rate_hz == 4.0 and applied == {"rate": 4} and s.rate_hz == 2.0
    with pytest.raises(ValueError, match="cannot change size at run time; changeable: rate"):
        runtime_changes(s, {"size": 2}, ARGS, ("rate",))
    with pytest.raises(ValueError, match="configure expects a JSON object"):
        runtime_changes(s, "rate=3", ARGS, ("rate",))


def test_base_builds_settings_and_derives_stats_from_one_table():
    p = Counter({**FRAMEWORK, "rate": 3})
    assert p.settings == Settings(rate_hz=3.0) and p.processor_id == 3
    assert p.getStats() == {"nSeen": 0, "rateHz": 3.0, "name": "counter", "nStatsResets": 0}
    assert p.getStats().keys() == p.getStatsPvaTypes().keys()
    pva.PvObject(p.getStatsPvaTypes()).set(p.getStats())  # the status record PvaPy builds accepts them
    assert isinstance(p.getOutputPvObjectType(None), pva.PvObject)
    with pytest.raises(ValueError, match="mode 'b' needs size <= 4"):
        Counter({"mode": "b"})
    with pytest.raises(ValueError, match="unknown processor argument"):
        Counter({"rates": 1})
    p.apply_changes({"rate": 7})
    assert p.getStats()["rateHz"] == 7.0
    with pytest.raises(ValueError):
        p.apply_changes({"size": 1})
    assert p.settings.size == 8


def test_problems_are_counted_by_kind_and_logged_once():
    p = Counter({})
    messages = []

    class Log:  # record what is logged, as an error: PvaPy shows errors without --log-level, not warnings
        def error(self, msg, *args):
            messages.append(msg % args)

    p.logger = Log()
    for i in range(5):
        p.count_problem("noPosition", "frame %d has no position", i)
    p.count_problem("outside", "frame %d outside", 9)
    assert p.problems("noPosition") == 5 and p.problems("outside") == 1
    assert sum("noPosition" in m for m in messages) == 1 and "frame 0 has no position" in messages[0]
    assert p.getStats()["nStatsResets"] == 0
    p.resetStats()
    assert p.problems("noPosition") == 0
    assert p.getStats()["nStatsResets"] == 0  # before start: PvaPy's controller resets its processor as it is made
    p.counting_resets = True  # what a processor's start() sets
    p.resetStats()
    assert p.getStats()["nStatsResets"] == 1  # the one count a reset keeps: launch judges no loss from the rest


def test_attribute_helpers():
    attrs = [pva.NtAttribute("PosY", pva.PvDouble(1.5)), pva.NtAttribute("PosX", pva.PvInt(7)),
             pva.NtAttribute("Name", pva.PvString("x"))]
    pv = pva.NtNdArray()
    pv["attribute"] = attrs
    got = pv["attribute"]
    assert attribute_value(got, "PosY") == 1.5 and attribute_value(got, "PosX") == 7.0
    assert attribute_value(got, "Name") is None and attribute_value(got, "Missing") is None
    assert seconds({"secondsPastEpoch": 10, "nanoseconds": 500_000_000}) == 10.5


def test_a_forked_consumer_whose_parent_died_before_start_stops(monkeypatch):
    """on_sigterm() saw a parent that died before the death signal was asked for only when
    the orphan's new parent was pid 1: under a subreaper (a systemd user manager, a
    container's init) the consumer ran on as an orphan. Now any change of parent counts."""
    import logging
    import signal

    from processors import shutdown

    sent, handlers = [], []
    monkeypatch.setattr(shutdown, "libc_prctl", lambda: lambda *args: 0)  # the request "succeeds", changes nothing
    monkeypatch.setattr(shutdown.multiprocessing, "parent_process", lambda: type("Parent", (), {"pid": 4100})())
    monkeypatch.setattr(shutdown.signal, "signal", lambda sig, handler: handlers.append(sig))
    monkeypatch.setattr(shutdown.os, "kill", lambda pid, sig: sent.append(sig))
    monkeypatch.setattr(shutdown.os, "getppid", lambda: 4100)  # the parent lives
    assert shutdown.on_sigterm(lambda timeout_s: True, logging.getLogger("test")) and sent == []
    monkeypatch.setattr(shutdown.os, "getppid", lambda: 77)  # a subreaper took the orphan
    assert shutdown.on_sigterm(lambda timeout_s: True, logging.getLogger("test"))
    assert sent == [signal.SIGTERM] and handlers == [signal.SIGTERM, signal.SIGTERM]


def test_sigterm_stops_the_framework_even_when_the_drain_fails(monkeypatch):
    """A drain that raises (a publish refused, say) killed the stopping thread before it set
    the controller's flag: the consumer ran on, and every later SIGTERM was ignored."""
    import inspect
    import logging
    import threading

    from processors import shutdown

    handlers = []
    monkeypatch.setattr(shutdown.multiprocessing, "parent_process", lambda: None)
    monkeypatch.setattr(shutdown.signal, "signal", lambda sig, handler: handlers.append(handler))
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the failure without the fix: no noise

    def drain(timeout_s):
        raise RuntimeError("the output channel refused the frame")

    class Controller:
        shouldBeStopped = False

        def processPvUpdate(self, wait):
            pass

    controller = Controller()
    assert shutdown.on_sigterm(drain, logging.getLogger("test"))

    def loop(controller):  # PvaPy's loop: the controller is a local of a frame on the stack
        handlers[0](15, inspect.currentframe())

    loop(controller)
    for thread in [t for t in threading.enumerate() if t.name == "sigterm-stop"]:
        thread.join(5)
    assert controller.shouldBeStopped


@pytest.mark.parametrize("processor", ["stitch", "hdf5"])
def test_a_refused_configure_changes_none_of_pvapys_keys_in_the_stitcher_and_the_writer(tmp_path, processor):
    """As for the inference consumer: PvaPy's controller took skipInitialUpdates (and
    objectIdOffset, ...) from a request before the processor refused it, and then threw away that
    many frames, counted nowhere. A skipInitialUpdates other than 0 is refused, and a refused
    request leaves every PvaPy key as it was."""
    from pvapy.hpc.dataProcessingController import DataProcessingController

    from processors.hdf5_writer import Hdf5WriterProcessor
    from processors.stitch import StitchProcessor

    framework = {"processorId": 1, "inputChannel": "x:1:output", "outputChannel": "", "objectIdField": "uniqueId",
                 "objectIdOffset": 1, "skipInitialUpdates": 0, "nSequentialUpdates": 1}
    args = ({"objectShape": [40, 48], "outputDirectory": str(tmp_path)} if processor == "stitch"
            else {"outputDirectory": str(tmp_path)})
    cls = StitchProcessor if processor == "stitch" else Hdf5WriterProcessor
    instance = cls({**framework, **args})
    controller = DataProcessingController(framework, instance)
    controller.start()
    try:
        with pytest.raises(ValueError, match="skipInitialUpdates is not changeable at run time"):
            controller.configure({"skipInitialUpdates": 50})
        with pytest.raises(ValueError, match="invalid literal for int"):
            controller.configure({"objectIdOffset": 3, "nSequentialUpdates": "abc"})
        assert (controller.skipInitialUpdates, controller.objectIdOffset, controller.nSequentialUpdates) == (0, 1, 1)
        controller.configure({"skipInitialUpdates": 0})  # discards nothing: taken
    finally:
        controller.stop()
