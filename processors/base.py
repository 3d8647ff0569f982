"""A small shared base for the project's PvaPy processors, so that a new processor is one file.

A processor declares, once, as class attributes:

``ARGS``
    ``camelCaseKey -> (field, converter)`` (see :mod:`edge_ptychonn.stream.arguments`);
``SETTINGS``
    a frozen dataclass whose fields are the table's fields (its defaults apply
    to keys not given; its ``__post_init__`` checks the combination, and its
    files and folders only if :func:`at_start`);
``STATS``
    ``statsKey -> (pva type, getter(processor))``: ``getStats()`` and
    ``getStatsPvaTypes()`` are both derived from it, so their keys cannot drift;
``RUNTIME_KEYS``
    the keys ``configure()`` may change while running (default none).

and gets: ``self.settings`` (validated at construction: an unknown key or an
invalid value raises ``ValueError`` naming the key and the accepted ones, which
stops the consumer at start), ``self.framework`` (PvaPy's own keys),
``self.processor_id``, :meth:`count_problem` (count a problem by kind, log it
once per kind with the reason), and the PvaPy overrides ``getStats``,
``getStatsPvaTypes``, ``resetStats`` and ``getOutputPvObjectType`` (an NTNDArray,
whose union takes any pixel type: our outputs are float32 images).

PvaPy 5.6 threading: ``process()`` runs on the pvAccess monitor thread (the
collector's processing thread under ``pvapy-hpc-collector``), ``start()``,
``stop()`` and ``getStats()`` on the main thread, ``configure()`` on a timer
thread. Subclasses guard shared state with their own lock. Each ``process()``
calls :func:`edge_ptychonn.callbacks.keep_thread_state` first (through :meth:`ProcessorBase.decode_frame`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import heapq
import json
import math
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, ClassVar

import pvaccess as pva
from pvapy.hpc.adImageProcessor import AdImageProcessor

from edge_ptychonn.callbacks import keep_thread_state
from edge_ptychonn.stream.arguments import ArgTable, boolean, convert_value, parse_arguments, runtime_changes
from edge_ptychonn.stream.frames import BAD_FRAME_KINDS, BadFrame, NotAFrame, decode

StatsTable = dict[str, tuple[Any, Callable[[Any], Any]]]

BAD_KIND_COUNTS = tuple(f"bad_{kind}" for kind in BAD_FRAME_KINDS)  # the counts that decode_frame keeps by kind


def bad_kind_stats() -> StatsTable:
    """``nBad<Kind>`` for each of :data:`BAD_FRAME_KINDS` (the inference consumer's keys): the
    undecodable frames by kind, read from the ``counts`` of what the getters are given."""
    return {f"nBad{kind.capitalize()}": (pva.ULONG, lambda s, key=key: s.counts[key])
            for kind, key in zip(BAD_FRAME_KINDS, BAD_KIND_COUNTS)}

_RUNTIME_CHANGE = contextvars.ContextVar("runtime_change", default=False)


def at_start() -> bool:
    """False while :meth:`ProcessorBase.apply_changes` builds the new settings of a run-time
    change. A ``SETTINGS`` class checks its files and folders only at start (and when a
    launcher validates the arguments): a change of ``fill`` is not refused because a file
    read at start has moved since."""
    return not _RUNTIME_CHANGE.get()


def attribute_raw(attributes: list, name: str):
    """The value of the first NTNDArray attribute called ``name`` (as a PvObject's ``attribute``
    list of dicts gives it), as PvaPy converted it, or None if absent or malformed."""
    for attribute in attributes:
        if attribute.get("name") == name:
            try:
                return attribute["value"][0]["value"]
            except (KeyError, IndexError, TypeError):
                return None
    return None


def attribute_value(attributes: list, name: str) -> float | None:
    """The numeric value of the NTNDArray attribute ``name``, or None if absent or not a number."""
    value = attribute_raw(attributes, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def seconds(time_stamp: dict) -> float:
    """An EPICS time stamp dict -> seconds past the epoch (float)."""
    return time_stamp.get("secondsPastEpoch", 0) + time_stamp.get("nanoseconds", 0) * 1e-9


def calling_controller(frame, processor, *needs: str):
    """PvaPy's DataProcessingController whose method runs in ``frame`` and calls ``processor``'s
    (its ``configure``, after taking its own keys from the request; its ``start``), if it has the
    attributes ``needs``; else None: an adapter to PvaPy's internals, pinned by contract tests."""
    owner = frame.f_locals.get("self") if frame is not None else None
    if getattr(owner, "userDataProcessor", None) is processor and all(hasattr(owner, n) for n in needs):
        return owner
    return None


PVAPY_CONFIGURE_KEYS = ("skipInitialUpdates", "objectIdOffset", "nSequentialUpdates")
# the keys that PvaPy's DataCollector (collectorCacheSize; its producer channels' receiverQueueSize)
# and DataConsumer (receiverQueueSize) take from a configure request before its controller sees it
PVAPY_SOURCE_CONFIGURE_KEYS = ("collectorCacheSize", "receiverQueueSize")


def caller_self(frame, accept):
    """The first ``self`` of the methods running at ``frame`` and above for which ``accept(self)``
    holds (PvaPy's objects whose methods called the processor's: its ``start()`` runs inside
    theirs), or None."""
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and accept(owner):
            return owner
        frame = frame.f_back
    return None


def data_source(frame, controller):
    """PvaPy's DataConsumer or DataCollector that hands its configure requests and its resets to
    ``controller`` (its ``processingController``), found on the stack at ``frame`` and above
    (:func:`caller_self`); None when there is none (or ``controller`` is None). An adapter to
    PvaPy's internals, pinned by contract tests."""
    if controller is None:
        return None
    return caller_self(frame, lambda owner: getattr(owner, "processingController", None) is controller
                       and callable(getattr(owner, "configure", None)))


def _source_sizes(source) -> list[tuple[Any, str, Any]]:
    """(object, attribute, value) of the sizes that ``source``'s configure may change: its own
    and its producer channels' ``collectorCacheSize``, ``receiverQueueSize`` and receiver queue
    length."""
    kept = []
    for holder in (source, *(getattr(source, "producerChannelMap", None) or {}).values()):
        kept += [(holder, key, getattr(holder, key)) for key in PVAPY_SOURCE_CONFIGURE_KEYS if hasattr(holder, key)]
        receiver_queue = getattr(holder, "pvObjectQueue", None)
        if receiver_queue is not None and hasattr(receiver_queue, "maxLength"):
            kept.append((receiver_queue, "maxLength", receiver_queue.maxLength))
    return kept


def _as_pvapy_sets(value):
    """The value PvaPy's controller sets a key of a configure request to (its ``int()``), or None
    when that raises (then it set nothing: its configure stopped there)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _same(a, b) -> bool:
    """Whether two setting values are the same (the same object too: a NaN fill is itself)."""
    return a is b or a == b


def restore_on_refusal(controller, source=None) -> bool:
    """Make a refused configure request leave PvaPy's DataProcessingController ``controller`` as
    it was. Its ``configure`` sets its own keys (:data:`PVAPY_CONFIGURE_KEYS`) from the request
    before anything can refuse it: when its own ``int()`` of a later key raised, or the processor
    refused the request, the keys set before stayed (an objectIdOffset that put PvaPy's nMissed
    wrong; a skipInitialUpdates that made it discard that many frames uncounted). Each key the
    request names is put back when the request raises. So are the sizes that ``source`` (the
    DataCollector or DataConsumer above it, :func:`data_source`) took before: a collectorCacheSize
    refused by the stitcher ("cannot change collectorCacheSize at run time") still set the
    collector's cache, and 100000 held every frame from the stitcher until the stream ended. An
    adapter to PvaPy's internals, pinned by a contract test; returns False (nothing changed) for
    None.

    A key goes back only while it still holds the value this request gave it: PvaPy runs each
    request on a timer thread of its own, and one accepted meanwhile (a model swap with the
    objectIdOffset of a group that grew, while the refused request waited for it), or the
    processor telling PvaPy the pattern in force, set it since; putting back the value from before
    this request undid that (PvaPy's nMissed counted in the old pattern, the consumer's in the
    new one)."""
    if source is not None and callable(getattr(source, "configure", None)):
        source_configure = source.configure

        def configure_source(config_dict, *args, **kwargs):
            named = isinstance(config_dict, dict) and any(k in config_dict for k in PVAPY_SOURCE_CONFIGURE_KEYS)
            kept = _source_sizes(source) if named else []
            try:
                return source_configure(config_dict, *args, **kwargs)
            except Exception:
                for holder, key, value in kept:
                    setattr(holder, key, value)
                raise

        source.configure = configure_source
    if controller is None:
        return False
    original = controller.configure

    def configure(config_dict, *args, **kwargs):
        named = [k for k in PVAPY_CONFIGURE_KEYS if isinstance(config_dict, dict) and k in config_dict]
        kept = {k: getattr(controller, k) for k in named if hasattr(controller, k)}
        try:
            return original(config_dict, *args, **kwargs)
        except Exception:
            for key, value in kept.items():
                if getattr(controller, key, None) == _as_pvapy_sets(config_dict[key]):
                    setattr(controller, key, value)
            raise

    controller.configure = configure
    return True


def reset_with_source(source, controller) -> bool:
    """Make a ``reset_stats`` of ``source`` (PvaPy's DataCollector or DataConsumer above
    ``controller``, :func:`data_source`) reset ``controller``'s statistics and the processor's too.
    PvaPy 5.6's DataCollector resets only its own and its producers' counts: under
    ``pvapy-hpc-collector`` the control channel answered "Stats reset successful" and the stitcher's
    userStats (and PvaPy's processorStats) went on counting from start. A source that already
    resets them (the DataConsumer) is left to do it. An adapter to PvaPy's internals, pinned by a
    contract test; returns False (nothing changed) when either is None."""
    if source is None or controller is None or not callable(getattr(source, "resetStats", None)) \
            or not callable(getattr(controller, "resetStats", None)):
        return False
    source_reset, controller_reset = source.resetStats, controller.resetStats
    resets = [0]

    def reset_controller(*args, **kwargs):
        resets[0] += 1
        return controller_reset(*args, **kwargs)

    def reset_source(*args, **kwargs):
        before = resets[0]
        result = source_reset(*args, **kwargs)
        if resets[0] == before:  # the source did not reset its controller: do it here
            reset_controller()
        return result

    controller.resetStats = reset_controller
    source.resetStats = reset_source
    return True


class RecentIds:
    """The uniqueIds of a scan that are still recent: those not below a floor that rises with
    the stream (the highest uniqueId less the processor's ``restartWindow``). An id further
    below starts a new scan whether remembered or not, so forgetting it changes nothing, and
    the set stays bounded however long a scan runs. ``uid in ids``, ``len(ids)``."""

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._heap: list[int] = []  # the same ids, the lowest first (to forget them)

    def __contains__(self, unique_id: int) -> bool:
        return unique_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, unique_id: int, forget_below: int) -> None:
        """Remember ``unique_id``; forget the ids below ``forget_below``."""
        if unique_id not in self._ids:
            self._ids.add(unique_id)
            heapq.heappush(self._heap, unique_id)
        while self._heap and self._heap[0] < forget_below:
            self._ids.discard(heapq.heappop(self._heap))


# a processor keeps the names of the last RECENT_FILES files it made (``files``, ``saved_files``),
# not all: a run makes a file or two per scan for days, and a list of them all grew with every scan
RECENT_FILES = 100

RESETS_KEY = "nStatsResets"  # every processor's: the reset_stats it took since start (never reset)
_RESETS_LOCK = threading.Lock()  # a count of resets, rare: one lock for every processor of the process


def _json_value(value):
    """``value`` as strict JSON holds it: a path as text, a NaN or infinite float as the text
    that ``edge-ptychonn configure`` takes for it (``"NaN"``, ``"Infinity"``, ``"-Infinity"``;
    Python writes them as bare words, which JSON readers other than Python's refuse)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


class StatsFromTable:
    """``getStats`` and ``getStatsPvaTypes`` derived from one class attribute ``STATS``
    (``key -> (pva type, getter(processor))``), so their keys cannot drift; plus
    :data:`RESETS_KEY`, the ``reset_stats`` calls since start (:meth:`count_stats_reset`): the
    one count a reset does not clear, so that a reader of totals (``edge-ptychonn launch``'s
    summary) knows they no longer count from the start."""

    STATS: ClassVar[StatsTable] = {}
    stats_resets: int = 0
    # set by the processor's start(): PvaPy's DataProcessingController resets its processor once
    # as it is made, before any count; that is no reset of the run's totals
    counting_resets: bool = False

    def stats_source(self):
        """What the getters read (the processor; a subclass may give a consistent copy)."""
        return self

    def count_stats_reset(self) -> None:
        """Called by the processor's ``resetStats``: counted once the processor has started. Two
        ``reset_stats`` requests may run at once (PvaPy runs each on a thread of its own)."""
        if self.counting_resets:
            with _RESETS_LOCK:
                self.stats_resets += 1

    def getStats(self) -> dict:
        source = self.stats_source()
        return {**{key: getter(source) for key, (_, getter) in self.STATS.items()}, RESETS_KEY: self.stats_resets}

    def getStatsPvaTypes(self) -> dict:
        return {**{key: pva_type for key, (pva_type, _) in self.STATS.items()}, RESETS_KEY: pva.ULONG}


class ProcessorBase(StatsFromTable, AdImageProcessor):
    """Arguments, statistics table and once-per-kind problem logging for PvaPy processors."""

    ARGS: ClassVar[ArgTable] = {}
    SETTINGS: ClassVar[type | None] = None
    RUNTIME_KEYS: ClassVar[tuple[str, ...]] = ()
    # float frames with NaN or infinite pixels are bad frames (``nonfinite``), as for a
    # model's input; a processor that only records pixels sets False and takes them as they are
    FINITE_FRAMES: ClassVar[bool] = True

    def __init__(self, configDict: dict | None = None):
        super().__init__(configDict or {})
        fields, self.framework = parse_arguments(configDict or {}, self.ARGS)
        self.settings = self.SETTINGS(**fields) if self.SETTINGS is not None else fields
        self.processor_id = int(self.framework.get("processorId", 1) or 1)
        self._problems: Counter[str] = Counter()
        self._problems_lock = threading.Lock()
        # One run-time change of the settings at a time, from the settings in force to the new
        # ones (see apply_changes); held for that only, never while a change waits (newScan).
        self._settings_lock = threading.Lock()

    # -- problems: counted by kind, logged once per kind ---------------------------------
    def count_problem(self, kind: str, message: str, *args: Any) -> int:
        """Count one problem of ``kind``; log ``message % args`` the first time
        this kind occurs (later ones are only counted), as an error: PvaPy shows
        warnings only with ``-ll warning``, and a writer that wrote nothing (every
        frame of an uninstalled codec) said nothing. Returns the new count."""
        with self._problems_lock:
            self._problems[kind] += 1
            n = self._problems[kind]
        if n == 1:
            self.logger.error("%s (logged once; further '%s' problems are only counted): " + message, kind, kind, *args)
        return n

    def problems(self, kind: str) -> int:
        with self._problems_lock:
            return self._problems[kind]

    def reset_problems(self) -> None:
        with self._problems_lock:
            self._problems.clear()

    # -- frames -----------------------------------------------------------------------------
    def decode_frame(self, pvObject, lock=None):
        """(meta, image) of a received NTNDArray, or None. A record without an image (what
        a monitor gets on connect) counts in ``self.counts["empty"]``; a bad frame in
        ``self.counts["bad"]``, in ``self.counts["bad_<kind>"]`` and as a problem of its kind
        (logged once). Subclasses that call it keep a ``counts`` dict with "empty", "bad" and
        :data:`BAD_KIND_COUNTS` (:func:`bad_kind_stats` shows those), and pass the ``lock`` under
        which their ``resetStats`` clears it (the count is added under it; the frame is
        decoded without it). Called first in ``process()``: it also keeps PvaPy's receive
        thread's state (:func:`edge_ptychonn.callbacks.keep_thread_state`)."""
        keep_thread_state()
        try:
            return decode(pvObject, finite=self.FINITE_FRAMES)
        except NotAFrame:
            keys = ("empty",)
        except BadFrame as exc:
            keys = ("bad", f"bad_{exc.kind}")
            self.count_problem(exc.kind, "%s", exc)
        with lock if lock is not None else contextlib.nullcontext():
            for key in keys:
                self.counts[key] += 1
        return None

    # -- run-time changes ----------------------------------------------------------------
    def apply_changes(self, changes: Any) -> dict:
        """Validate ``changes`` against ``RUNTIME_KEYS``, swap in the new settings,
        and return the user keys applied (raises ``ValueError``: nothing changes)."""
        return self._change_settings(changes)[2]

    def _change_settings(self, changes: Any) -> tuple[Any, Any, dict]:
        """:meth:`apply_changes`; (the settings before, the new ones, the user keys applied).
        The new settings are made from those in force and put in force under one lock: PvaPy
        runs each configure request on a timer thread of its own, and a request put in force
        between the two was undone by the other (answered "Configuration successful")."""
        with self._settings_lock:
            token = _RUNTIME_CHANGE.set(True)
            try:
                old = self.settings
                new, applied = runtime_changes(old, changes, self.ARGS, self.RUNTIME_KEYS)
            finally:
                _RUNTIME_CHANGE.reset(token)
            self.settings = new
        return old, new, applied

    def _take_back(self, old: Any, mine: Any) -> None:
        """Undo one request's change of the settings from ``old`` to ``mine``: each setting it
        changed goes back, unless a request accepted since (while a newScan waited) changed it
        again. Putting all of ``old`` back undid that request's change too, after it had been
        answered "Configuration successful"."""
        with self._settings_lock:
            now = self.settings
            if now is mine:  # nothing changed since: all of it goes back
                self.settings = old
                return
            if not dataclasses.is_dataclass(now):
                return
            back = {f.name: getattr(old, f.name) for f in dataclasses.fields(mine)
                    if not _same(getattr(mine, f.name), getattr(old, f.name))
                    and _same(getattr(now, f.name), getattr(mine, f.name))}
            if back:
                token = _RUNTIME_CHANGE.set(True)
                try:
                    self.settings = dataclasses.replace(now, **back)
                finally:
                    _RUNTIME_CHANGE.reset(token)

    def configure(self, configDict):
        """Apply run-time changes (all-or-nothing); ``{"newScan": true}`` then calls
        :meth:`new_scan`. An error (a ValueError, or :meth:`new_scan` failing: the other
        changes are taken back) reaches the control channel as "Configuration failed: ..."
        and changes nothing."""
        try:
            new_scan = False
            if isinstance(configDict, dict) and "newScan" in configDict:
                new_scan = convert_value("newScan", boolean(), configDict["newScan"])
            old, mine, _ = self._change_settings(configDict)
        except ValueError as exc:
            self.logger.error("configuration refused, nothing changed: %s", exc)
            raise
        if new_scan:
            try:
                self.new_scan()
            except Exception as exc:
                self._take_back(old, mine)
                self.logger.error("configuration failed, nothing changed: %s", exc)
                raise

    def settings_in_force(self) -> str:
        """JSON of the run-time changeable settings now in force (camelCase; ``newScan`` is a
        command, not a setting): the status channel's ``settings``."""
        values = {key: getattr(self.settings, self.ARGS[key][0]) for key in self.RUNTIME_KEYS if key in self.ARGS}
        return json.dumps({k: _json_value(v) for k, v in values.items()}, allow_nan=False)

    def new_scan(self) -> None:
        """Finish the current scan and start a new one (processors with scans override it)."""

    # -- PvaPy overrides -----------------------------------------------------------------
    def resetStats(self) -> None:
        self.count_stats_reset()
        self.reset_problems()

    def getOutputPvObjectType(self, pvObject):
        return pva.NtNdArray()
