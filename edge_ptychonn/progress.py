"""Progress on stderr for long work: one class for counted work and for steps.

- Counted work (simulation, training, inference over a scan, outputs arriving):
  ``bar = Progress(total, label, unit=...)``, ``bar.update(n, loss=0.12)``,
  ``bar.close()``. On a terminal it redraws one line (``\\r``, cleared to its end
  and cut to the terminal's width, so that it never wraps) at most every
  ``min_interval_s``; when stderr is a file or a pipe it writes a full line at
  every 10 % step instead, so logs stay readable, and ``close()`` writes the last
  count when work stopped between two steps. Statistics passed to ``update`` are
  shown after the rate and the estimated time left.
- Steps (benchmarks, long commands): ``log = Progress()``, then ``log("message")``
  or ``log.stage("title")`` writes one line per step with the time since the
  start, ``[  12.3 s] message`` (``== title`` for a stage).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts ``done`` out of ``total`` items and shows the rate and time left;
    logs timestamped steps. ``total=None``: steps only, no bar."""

    def __init__(
        self,
        total: int | None = None,
        label: str = "",
        *,
        unit: str = "it",
        stream: TextIO | None = None,
        enabled: bool = True,
        min_interval_s: float = 0.25,
    ):
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total = total
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.min_interval_s = min_interval_s
        self.done = 0
        self.stats: dict[str, float | str] = {}
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        self._written_done: int | None = None  # the count of the last full line written (not a terminal)
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def __call__(self, message: str) -> None:
        """Write one line ``[elapsed s] message`` (below a bar being drawn on a terminal)."""
        if not self.enabled:
            return
        redraw = self._tty and self.total is not None and self._last_draw > 0
        self.stream.write(("\r\033[K" if redraw else "") + f"[{self.elapsed_s:6.1f} s] {message}\n")
        if redraw:
            self._draw()
        self.stream.flush()

    def _draw(self) -> None:
        """Redraw the bar on a terminal: over the old line, cleared to its end (a shorter line
        leaves no digits of the longer one behind), and cut to the width (a line that wraps
        is drawn again below, not over itself)."""
        line = self.line()
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):  # no file descriptor, or not a terminal after all
            width = 0
        if width > 1:
            line = line[: width - 1]
        self.stream.write("\r\033[K" + line)

    def stage(self, title: str) -> None:
        """A step line that starts a stage: ``== title``."""
        self(f"== {title}")

    def line(self) -> str:
        """The current progress line (without a line ending)."""
        if self.total is None:
            return f"{self.label} elapsed {_clock(self.elapsed_s)}"
        frac = self.done / self.total if self.total else 1.0
        bar_len = 24
        filled = int(round(bar_len * frac))
        rate = self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        stats = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.stats.items()
        )
        return (
            f"{self.label} [{'#' * filled}{'.' * (bar_len - filled)}] {100 * frac:5.1f}% "
            f"{self.done}/{self.total} {rate:.1f} {self.unit}/s "
            f"elapsed {_clock(self.elapsed_s)} left {_clock(left)}"
            + (f" {stats}" if stats else "")
        )

    def update(self, n: int = 1, **stats: float | str) -> None:
        """Add ``n`` finished items and refresh the statistics shown."""
        if self.total is None:
            raise ValueError("update() needs a total: Progress(total, label)")
        self.done = min(self.total, self.done + n)
        self.stats.update(stats)
        if not self.enabled:
            return
        now = time.monotonic()
        if self._tty:
            if now - self._last_draw >= self.min_interval_s or self.done == self.total:
                self._draw()
                self.stream.flush()
                self._last_draw = now
        else:
            decile = int(10 * self.done / self.total) if self.total else 10
            if decile > self._last_decile:
                self.stream.write(self.line() + "\n")
                self.stream.flush()
                self._last_decile = decile
                self._written_done = self.done

    def close(self) -> None:
        """Finish the line (on a terminal) so later output starts on a new one; elsewhere write
        the last count if it has changed since the last line (work stopped between 10 % steps)."""
        if not self.enabled or self.total is None:
            return
        if self._tty:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        elif self._written_done is not None and self.done != self._written_done:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._written_done = self.done
