"""Which frames a consumer was due, and how many of them never reached it.

PvaPy's distributor hands each of ``N`` consumers runs of ``n_sequential``
consecutive uniqueIds in turn, so consumer ``k`` is due the ids ``base + j``
with ``j mod (N * n_sequential) < n_sequential``. The framework passes that
pattern to a processor as ``nSequentialUpdates`` and ``objectIdOffset``
(``(N - 1) * n_sequential + 1``). :class:`IdTracker` counts, from the ids that
arrive:

- ``missed``: due ids that never arrived (an upstream server queue overflowed, a
  client fell behind, frames were dropped by an upstream stage);
- ``restarts``: the ids went back (the upstream server restarted); counting
  starts again from the new first id;
- ``foreign``: ids outside the pattern: the set of consumers changed. The
  distributor gives a stopped or dead consumer's share to the survivors, and a
  consumer that starts while the stream runs (or a sibling that joins late)
  changes every consumer's share. A change that brings ids outside the pattern
  counts once (a sibling coming back only takes ids away), and the tracker then
  learns the new pattern from the ids that follow: the first jump after a whole
  number of runs gives the new stride (the whole stream, when the ids go on past
  one run). Such a jump, and after the set changed once any jump of whole runs
  whose stride fits the configured number of consumers (a sibling coming back;
  while every id is this consumer's, wherever the jump falls: the distributor's
  runs start where the set changed, not on the old runs' boundaries), is provisional: if the ids break the new pattern within its first run, the
  jump was lost frames after all, counted as missed, and the pattern before it
  stays. A gap inside the first run after a change is not counted (it may have
  been a sibling's). With the configured set intact the counting is exact.
  The frames a dead consumer still held are visible only to a stage that sees
  every output channel (a collector), never to the survivors.

Where in its run the first id falls is not known: frames lost before it, or a
consumer that connects in the middle of its run, make it arrive after the
run's start. Until the ids show it (at the latest, the first id after a
run's end and the jump that follows), every position that fits the ids seen
so far is kept, and ``missed`` counts the fewest frames any of them would have
lost; ids that fit none of them are a change of the set (``foreign``). Frames
before the first id are never counted: nothing shows they were this
consumer's.
"""

from __future__ import annotations

import copy


class IdTracker:
    """Counts missed, foreign and restarted uniqueIds of one consumer's stream."""

    def __init__(self, n_sequential: int = 1, id_offset: int = 1):
        self.n_sequential = max(int(n_sequential or 1), 1)
        # The configured pattern: the longest stride the distributor can give this consumer.
        self.full_stride = self.n_sequential + max(int(id_offset or 1), 1) - 1
        self.stride: int | None = self.full_stride  # None while learning a new pattern
        self.missed = 0
        self.foreign = 0
        self.restarts = 0
        self._base: int | None = None  # an id that starts a run of the current pattern
        self._block: int | None = None  # first id of the current unbroken run of ids
        self._last: int | None = None
        # after a jump taken as a sibling coming back: (stride, base, missed) of the pattern
        # before it, restored if the ids break the new pattern within its first run
        self._undo: tuple[int, int, int] | None = None
        # While the position of the first id in its run is unknown: the positions that fit
        # the ids seen since it (None once known), that first id, how many ids came since,
        # and ``missed`` before them (``missed`` = that + the fewest any position lost).
        self._phases: list[int] | None = None
        self._first = 0
        self._n_seen = 0
        self._missed_before = 0

    def counts_reset(self) -> "IdTracker":
        """A copy with the counters at 0 that keeps what this one knows of the stream (its
        last id and the distributor's pattern): new totals (a statistics reset) that go on
        counting exactly, even when the reset falls inside a run of ``n_sequential`` ids."""
        fresh = copy.copy(self)
        fresh.missed = fresh.foreign = fresh.restarts = 0
        if fresh._undo is not None:  # frames lost before the reset are not the new totals'
            fresh._undo = (*fresh._undo[:2], 0)
        if fresh._phases is not None:  # the new totals count from the losses known now
            fresh._missed_before = -(self.missed - self._missed_before)
        return fresh

    def set_pattern(self, n_sequential: int, id_offset: int) -> None:
        """The distributor's pattern changed (``configure`` with PvaPy's ``nSequentialUpdates``
        or ``objectIdOffset``: consumers were added or removed): the next id is counted as a
        first one (where it falls in its run is learnt from the ids after it), in the new
        pattern; the counts so far stay."""
        self.n_sequential = max(int(n_sequential), 1)
        self.full_stride = self.n_sequential + max(int(id_offset), 1) - 1
        self.stride = self.full_stride
        self._last = None  # the next id starts the counting again (no restart counted)
        self._undo = self._phases = None

    def _due_before(self, k: int) -> int:
        """Due ids in [base, base + k)."""
        return (k // self.stride) * self.n_sequential + min(k % self.stride, self.n_sequential)

    def _is_due(self, uid: int) -> bool:
        return (uid - self._base) % self.stride < self.n_sequential

    def _learnt_stride(self, uid: int) -> int | None:
        """The stride that a jump from ``_last`` to ``uid`` shows, when ``_last`` ends a
        whole run and the jump fits the configured pattern; None otherwise. While every id
        is this consumer's (its siblings gone), its runs show no boundaries in the ids: the
        distributor starts a run where the set changes, wherever that falls (a dead
        sibling's run split with a survivor moves them), so any jump may end one."""
        alone = self.stride == self.n_sequential < self.full_stride
        if not alone and (self._last + 1 - self._block) % self.n_sequential:
            return None  # the jump starts inside a run: frames were lost, not a new pattern
        stride = uid - self._last - 1 + self.n_sequential  # from the start of the run _last ends
        if stride % self.n_sequential or not self.n_sequential < stride <= self.full_stride:
            return None
        return stride

    def see(self, uid: int) -> None:
        """Account for one arriving uniqueId."""
        if self._last is None or uid <= self._last:
            if self._last is not None:
                self.restarts += 1
            self._base = self._block = self._last = uid
            self._undo = None
            if self.stride is not None and self.stride > self.n_sequential:
                # where the first id falls in its run shows only in the ids that follow
                self._phases = list(range(self.n_sequential))
                self._first, self._n_seen, self._missed_before = uid, 1, self.missed
            else:
                self._phases = None
            return
        if self._phases is not None and self._place(uid):
            return
        if uid == self._last + 1:
            if self.stride is None and uid - self._block >= self.n_sequential:
                # More than one run without a gap: this consumer now gets every id.
                self.stride, self._base = self.n_sequential, self._block
            elif self.stride is not None and not self._is_due(uid):
                self._pattern_changed(uid)
            self._last = uid
            return
        # A jump.
        learnt = self._learnt_stride(uid)
        if self.stride is None:
            if learnt is not None:
                # provisional as below: the jump may have been lost frames of a consumer
                # that now gets every id (then the ids break the learnt pattern at once)
                self._undo = (self.n_sequential, self._block, uid - self._last - 1)
                self.stride, self._base = learnt, uid
        elif not self._is_due(uid):
            self._pattern_changed(uid)
            if self.stride is not None:  # the jump was lost frames after all: counted as such
                self.missed += self._due_before(uid - self._base) - self._due_before(self._last + 1 - self._base)
        elif self.stride < self.full_stride and learnt is not None and learnt != self.stride:
            # After the set changed once, whole runs skipped in a stride that the
            # configured set allows: a sibling came back, not lost frames. Provisional:
            # if the ids break the new pattern within its first run, the jump was lost
            # frames of the old pattern after all (:meth:`_pattern_changed`).
            lost = self._due_before(uid - self._base) - self._due_before(self._last + 1 - self._base)
            self._undo = (self.stride, self._base, lost)
            self.stride, self._base = learnt, uid
        else:
            self.missed += self._due_before(uid - self._base) - self._due_before(self._last + 1 - self._base)
        self._block = uid
        self._last = uid

    def _place(self, uid: int) -> bool:
        """While the first id's position in its run is unknown: True when ``uid`` fits one
        of the positions still possible (counted here); False when it fits none (the set
        of consumers changed: the caller counts it, from the position that lost fewest)."""
        stride, n_seq, first = self.stride, self.n_sequential, self._first
        fits = [p for p in self._phases if (uid - first + p) % stride < n_seq]

        def lost(p: int, last: int) -> int:  # due ids in [first, last] not seen, first at position p
            return self._due_before(last + 1 - (first - p)) - p - self._n_seen

        if not fits:
            best = min(self._phases, key=lambda p: lost(p, self._last))
            self._base, self._phases = first - best, None
            return False
        self._n_seen += 1
        self._phases = fits
        if uid != self._last + 1:
            self._block = uid
        self._last = uid
        best = min(fits, key=lambda p: lost(p, uid))
        self.missed = self._missed_before + lost(best, uid)
        if len(fits) == 1:
            self._base, self._phases = first - best, None
        return True

    def _pattern_changed(self, uid: int) -> None:
        undo, self._undo = self._undo, None
        if undo is not None and uid - self._base < self.stride:  # the "comeback" broke at once
            self.stride, self._base, lost = undo
            self.missed += lost
            return
        self.foreign += 1
        self.stride = None
        self._block = uid
