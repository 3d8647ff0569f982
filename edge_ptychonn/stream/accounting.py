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
  whose stride fits the configured number of consumers (a sibling coming back),
  is provisional: if the ids break the new pattern within its first run, the
  jump was lost frames after all, counted as missed, and the pattern before it
  stays. A gap inside the first run after a change is not counted (it may have
  been a sibling's). With the configured set intact the counting is exact.
  The frames a dead consumer still held are visible only to a stage that sees
  every output channel (a collector), never to the survivors.
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

    def counts_reset(self) -> "IdTracker":
        """A copy with the counters at 0 that keeps what this one knows of the stream (its
        last id and the distributor's pattern): new totals (a statistics reset) that go on
        counting exactly, even when the reset falls inside a run of ``n_sequential`` ids."""
        fresh = copy.copy(self)
        fresh.missed = fresh.foreign = fresh.restarts = 0
        if fresh._undo is not None:  # frames lost before the reset are not the new totals'
            fresh._undo = (*fresh._undo[:2], 0)
        return fresh

    def _due_before(self, k: int) -> int:
        """Due ids in [base, base + k)."""
        return (k // self.stride) * self.n_sequential + min(k % self.stride, self.n_sequential)

    def _is_due(self, uid: int) -> bool:
        return (uid - self._base) % self.stride < self.n_sequential

    def _run_start(self, uid: int) -> int:
        """First id of the run of ``n_sequential`` that ``uid`` ends or lies in, in the unbroken block."""
        return self._block + (uid - self._block) // self.n_sequential * self.n_sequential

    def _learnt_stride(self, uid: int) -> int | None:
        """The stride that a jump from ``_last`` to ``uid`` shows, when ``_last`` ends a
        whole run and the jump fits the configured pattern; None otherwise."""
        if (self._last + 1 - self._block) % self.n_sequential:
            return None  # the jump starts inside a run: frames were lost, not a new pattern
        stride = uid - self._run_start(self._last)
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

    def _pattern_changed(self, uid: int) -> None:
        undo, self._undo = self._undo, None
        if undo is not None and uid - self._base < self.stride:  # the "comeback" broke at once
            self.stride, self._base, lost = undo
            self.missed += lost
            return
        self.foreign += 1
        self.stride = None
        self._block = uid
