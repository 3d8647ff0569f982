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
- ``foreign``: ids that were another consumer's share. The distributor gives a
  stopped or dead consumer's share to the survivors; from then on every id is
  taken as due to this one (exact for two consumers). The frames the dead
  consumer still held are visible only to a stage that sees every output
  channel (a collector), never to the survivors.
"""

from __future__ import annotations


class IdTracker:
    """Counts missed, foreign and restarted uniqueIds of one consumer's stream."""

    def __init__(self, n_sequential: int = 1, id_offset: int = 1):
        self.n_sequential = max(int(n_sequential or 1), 1)
        self.stride = self.n_sequential + max(int(id_offset or 1), 1) - 1
        self.missed = 0
        self.foreign = 0
        self.restarts = 0
        self._base: int | None = None
        self._last: int | None = None

    def _due_before(self, k: int) -> int:
        """Due ids in [base, base + k)."""
        return (k // self.stride) * self.n_sequential + min(k % self.stride, self.n_sequential)

    def _is_due(self, uid: int) -> bool:
        return (uid - self._base) % self.stride < self.n_sequential

    def see(self, uid: int) -> None:
        """Account for one arriving uniqueId."""
        if self._last is None or uid <= self._last:
            if self._last is not None:
                self.restarts += 1
            self._base = self._last = uid
            return
        if not self._is_due(uid):
            self.foreign += 1
            # A sibling stopped: its share comes here from now on.
            self.stride = self.n_sequential
            self._base = uid
        else:
            self.missed += self._due_before(uid - self._base) - self._due_before(self._last + 1 - self._base)
        self._last = uid
