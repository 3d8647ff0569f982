"""``edge-ptychonn view``: c2dv image windows on the live chain's channels, at full rate, with phase levels.

One c2dv (c2dataviewer) image window per channel, in one process, set up the way
phase images need, which ``c2dv --app image`` cannot be told on its command line
or in its configuration file (c2dataviewer 1.15.4 reads only the channel, the
scale and an auto-gain switch there, and that switch fails in 1.15.4):

- rate: the window's "Full IOC Rate" (a monitor that sees every frame, with a
  server-side queue of ``--server-queue-size`` frames) instead of c2dv's default
  5 Hz request, which only gets the newest frame five times a second and
  reports the rest as missed;
- levels: fixed black/white levels in radians, by default ``0 .. phase range``
  of the model card's training scans (``training.scan_settings.phase_range_rad``,
  1.5 rad for the shipped model), so what sets the grey scale is the physics and
  not the extreme pixels of a frame (c2dv's "Auto" follows those: the unlit
  border of a patch would decide what the window shows). ``--levels LO,HI`` sets
  them, ``--levels auto`` uses c2dv's own auto levels on the first frame.

Everything else is c2dv's own window: the controls stay usable (the levels can
be typed, the rate picked, "Auto" pressed). Every ``--report-period`` seconds each
window prints one line: its channel, connection state, frames received,
displayed and missed (c2dv's counters: gaps in the uniqueIds it saw; an
inference output of one of N consumers has gaps by design, the other
consumers' frames) and where its image lies on the screen.

Needs c2dv: ``pip install 'edge-ptychonn[viewer]'``; a display (``DISPLAY``, or
``xvfb-run``, or ``QT_QPA_PLATFORM=offscreen`` to draw nowhere). Without EPICS
settings of its own it looks for the channels on this host only (loopback),
where ``edge-ptychonn launch`` and the demo run the chain. Ctrl-C or SIGTERM
closes every window; exit status 0.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_ptychonn.model_card import default_model_path, find_card

DEFAULT_CHANNELS = ["stitch:1:output", "inference:1:output"]
FULL_RATE = "Full IOC Rate"  # the last entry of c2dv's rate menu: a monitor, every frame
LEVEL_LIMIT = 2.0**24  # the widest black/white levels the window's controls are set to take
MAX_REPORT_PERIOD_S = 86400.0
DISPLAY_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")  # where Qt finds a display (or is told to draw nowhere)


def no_display() -> bool:
    """Whether Qt would find no display here (and abort, core dumped): on Linux (X11, Wayland)
    none of :data:`DISPLAY_VARIABLES` is set; macOS and Windows draw without one. The one
    check, for ``view`` and for the launcher that starts it."""
    return sys.platform.startswith("linux") and not any(os.environ.get(k) for k in DISPLAY_VARIABLES)


def card_levels(model: Path) -> tuple[float, float] | None:
    """(0, phase range in rad) from the model card's training scans, or None."""
    card = find_card(model)
    settings = (card.training.scan_settings or {}) if card is not None and card.training else {}
    span = settings.get("phase_range_rad")
    if isinstance(span, (int, float)) and not isinstance(span, bool) and span > 0:
        return 0.0, float(span)
    return None


def parse_levels(text: str, model: Path) -> tuple[float, float] | None:
    """``card`` -> the model card's phase range; ``auto`` -> None (c2dv's auto levels on
    the first frame); ``LO,HI`` -> (LO, HI). Raises ValueError with the reason."""
    if text == "auto":
        return None
    if text == "card":
        if not model.is_file():
            raise ValueError(f"--model {model} is not a file (its card gives the levels); pass --levels LO,HI or auto")
        levels = card_levels(model)
        if levels is None:
            raise ValueError(f"the model card of {model} gives no phase range "
                             "(training.scan_settings.phase_range_rad); pass --levels LO,HI or auto")
        return levels
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--levels must be card, auto or LO,HI (two numbers), got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or max(abs(lo), abs(hi)) > LEVEL_LIMIT:
        raise ValueError(f"--levels LO,HI must be finite numbers within +-{LEVEL_LIMIT:.0f}, got {text!r}")
    if not lo < hi:
        raise ValueError(f"--levels LO,HI needs LO < HI, got {text!r}")
    return lo, hi


def get_args_parser(prog: str = "edge-ptychonn view") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("channels", nargs="*", default=DEFAULT_CHANNELS,
                   help=f"NTNDArray channels, one window each (default: {' '.join(DEFAULT_CHANNELS)})")
    p.add_argument("--levels", default="card",
                   help="black,white levels: 'card' (0 .. the model card's phase range), 'auto' (c2dv's auto "
                        "levels on the first frame) or LO,HI in radians (default: %(default)s)")
    p.add_argument("--model", type=Path, default=default_model_path(),
                   help="the model whose card gives the phase range (default: the shipped model)")
    p.add_argument("--rate", default="full",
                   help="'full' (every frame, a monitor with a server-side queue) or one of c2dv's request "
                        "rates 1, 2, 5, 10, 20, 30 Hz (default: %(default)s)")
    p.add_argument("--server-queue-size", type=int, default=100,
                   help="frames the server may queue for a window at full rate (default: %(default)s)")
    p.add_argument("--report-period", type=float, default=10.0,
                   help=f"seconds between each window's status lines, at most {MAX_REPORT_PERIOD_S:g}; each window "
                        "also prints one as it closes, and with 0 only that one (default: %(default)s)")
    return p


def images_only(callback):
    """``callback`` (c2dv's ``ImageWidget.data_callback``) for the NTNDArray records that carry an
    image (a value selected in the ``value`` union, and dimensions); any other record is left out.

    A consumer's output channel exists from its start with an empty record (no value, no
    dimensions, no attributes), which a window opened before frames flow (the README's order)
    receives on connect. c2dv 1.15.4 fails on any record without an image: it counted each as
    received and logged "Error displaying data: NDArray does not contain ColorMode Attribute.";
    left out here, it does neither."""

    def on_record(record):
        if record.getSelectedUnionFieldName() and record["dimension"]:
            callback(record)

    return on_record


@dataclass
class Window:
    """One c2dv image window and what it was told."""

    channel: str
    window: object
    controller: object
    timers: list


def _open_window(channel: str, index: int, levels, rate: str, queue_size: int) -> Window:
    from c2dataviewer.control import ImageController
    from c2dataviewer.imagev import ImageSettingsDialog, ImageWindow, WarningDialog
    from c2dataviewer.model import DataSource
    from pyqtgraph import QtCore

    window = ImageWindow(None)
    window.setWindowTitle(f"{channel} (edge-ptychonn view)")
    window.move(40 + index * (window.frameGeometry().width() + 20), 40)
    source = DataSource(QtCore.QTimer, default=None)
    window.imageWidget.set_datasource(source)
    # before the controller, which starts the channel (c2dv reads data_callback at each start)
    window.imageWidget.data_callback = images_only(window.imageWidget.data_callback)
    stats_timer = QtCore.QTimer()
    controller = ImageController(window, IMAGE_SETTINGS_DIALOG=ImageSettingsDialog(None),
                                 WARNING=WarningDialog(None), PV=[channel], timer=stats_timer, data=source)
    window.imageWidget.set_scaling()
    if levels is None:
        window.imageWidget.enable_auto_white()  # c2dv's auto levels, on the next frame
    else:
        lo, hi = levels
        # widen the level controls first (c2dv starts them at 0..1e9 and sets them per pixel type)
        controller.changeimageBlackLimits(-LEVEL_LIMIT, LEVEL_LIMIT)
        controller.changeimageWhiteLimits(-LEVEL_LIMIT, LEVEL_LIMIT)
        window.imageBlackSpinBox.setValue(lo)
        window.imageWhiteSpinBox.setValue(hi)
    window.imageWidget.set_preferences({"EnableServerQueue": queue_size > 0, "ServerQueueSize": queue_size})
    window.iocRate.setCurrentText(FULL_RATE if rate == "full" else f"{rate} Hz")  # restarts the channel
    window.show()
    return Window(channel, window, controller, [stats_timer])


def status_line(w: Window) -> str:
    widget = w.window.imageWidget
    origin = widget.mapToGlobal(widget.rect().topLeft())
    return (f"view {w.channel}: {w.window.lblConnectionStatus.text() or 'connecting'}, "
            f"received {widget.frames_received}, displayed {widget.frames_displayed}, "
            f"missed {widget.frames_missed}, levels {widget.get_black():g}..{widget.get_white():g}, "
            f"rate {w.window.iocRate.currentText()}, "
            f"image at {origin.x()},{origin.y()} {widget.width()}x{widget.height()}")


def main(args: argparse.Namespace) -> int:
    try:
        levels = parse_levels(args.levels, args.model)
        if args.rate != "full" and args.rate not in ("1", "2", "5", "10", "20", "30"):
            raise ValueError(f"--rate must be full or one of 1, 2, 5, 10, 20, 30, got {args.rate!r}")
        if not 0 <= args.server_queue_size <= 10000:
            raise ValueError(f"--server-queue-size must be 0..10000, got {args.server_queue_size}")
        if not 0 <= args.report_period <= MAX_REPORT_PERIOD_S:  # NaN included
            raise ValueError(f"--report-period must be 0 (none) .. {MAX_REPORT_PERIOD_S:g} s, got {args.report_period:g}")
        if not args.channels:
            raise ValueError("name at least one channel")
    except ValueError as exc:
        print(f"edge-ptychonn view: {exc}", file=sys.stderr)
        return 2
    try:
        import c2dataviewer  # noqa: F401
    except ImportError:
        print("edge-ptychonn view: c2dv is not installed: pip install 'edge-ptychonn[viewer]'", file=sys.stderr)
        return 2
    if no_display():  # Qt would abort (core dumped) with a page about its platform plugins
        print("edge-ptychonn view: no display (DISPLAY is not set): run it where there is one, under xvfb-run, "
              "or as 'bash scripts/view.sh' (which does that), or with QT_QPA_PLATFORM=offscreen (nothing visible)",
              file=sys.stderr)
        return 2
    if "EPICS_PVA_ADDR_LIST" not in os.environ:
        os.environ.update(EPICS_PVA_AUTO_ADDR_LIST="NO", EPICS_PVA_ADDR_LIST="127.0.0.1")
    from pyqtgraph import QtCore
    from pyqtgraph.Qt import QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([sys.argv[0]])
    windows = [_open_window(c, i, levels, args.rate, args.server_queue_size) for i, c in enumerate(args.channels)]
    for w in windows:
        print(f"view {w.channel}: opened (levels {'auto' if levels is None else '%g..%g rad' % levels}, "
              f"rate {w.window.iocRate.currentText()})", flush=True)

    def report():
        for w in windows:
            print(status_line(w), flush=True)

    def quit_(signum, frame):
        report()
        app.quit()

    signal.signal(signal.SIGINT, quit_)
    signal.signal(signal.SIGTERM, quit_)
    ticker = QtCore.QTimer()  # lets Python run its signal handlers while Qt waits
    ticker.timeout.connect(lambda: None)
    ticker.start(200)
    reporter = QtCore.QTimer()
    if args.report_period > 0:
        reporter.timeout.connect(report)
        reporter.start(max(1, round(args.report_period * 1000)))
    app.exec_()
    for w in windows:
        w.window.imageWidget.stop()
    return 0
