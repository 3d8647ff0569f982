"""``edge-ptychonn consumer``: ``pvapy-hpc-consumer`` that stops cleanly on SIGTERM.

It takes exactly ``pvapy-hpc-consumer``'s options and runs it in this process,
with three differences that matter when a service manager runs it:

- SIGTERM stops it like Ctrl-C: the consumers publish what they hold, the
  framework reports its final statistics, every process exits with 0 (a second
  SIGTERM or Ctrl-C while it stops is ignored: it would cut the stop short; one
  that comes while the consumers start is taken once they have started);
- without a terminal, ``-dc`` (no curses screen) is added, since curses cannot
  start there;
- it exits (status 1) when its consumers are gone: with ``--n-consumers > 1``
  once every forked consumer has exited and one of them failed (a bad processor
  argument, an engine that cannot start, a consumer killed), where
  ``pvapy-hpc-consumer`` would go on reporting "No stats received" until its
  runtime ends; when it stops after one of them failed while the others ran on, exit
  status 1 too (PvaPy's parent exits with 0 there); with one consumer a processor that refuses its arguments, or
  whose engine cannot start, or a ``--processor-class`` that cannot be loaded, is one
  line (exit status 2), not a traceback;
  a ``--processor-args`` (``--input-args``, ``--output-args``) that is not a
  JSON object, an ``--n-consumers`` below 1, a ``--processor-class`` that is
  not ``<module>.<Class>`` (without ``--processor-file``), or processor arguments
  that this project's processor would refuse (checked as ``launch --check`` does,
  also for ``--n-consumers > 1``), is one line (exit status 2) before anything starts.

With ``--n-consumers > 1`` each consumer also stops by itself if this parent is
killed (see ``processors/shutdown.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import threading

CHILD_POLL_S = 1.0


class _PassThrough(argparse.ArgumentParser):
    """Answers --help itself; hands every other argument to pvapy-hpc-consumer."""

    def parse_args(self, args=None, namespace=None):  # noqa: D102
        args = list(sys.argv[1:] if args is None else args)
        if args in (["-h"], ["--help"]):
            self.print_help()
            self.exit(0)
        return argparse.Namespace(consumer_args=args)


def get_args_parser(prog: str = "edge-ptychonn consumer") -> argparse.ArgumentParser:
    return _PassThrough(
        prog=prog,
        usage=f"{prog} [pvapy-hpc-consumer options]",
        description=__doc__.split("\n\n", 1)[1],
        epilog="The options: pvapy-hpc-consumer --help.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def watch_children(started: list, done: threading.Event, failed: list, stopping: threading.Event | None = None) -> None:
    """Until ``done``: when every forked consumer in ``started`` has exited and one of them
    failed (a non-zero exit status), put their exit statuses in ``failed`` and stop the
    framework as SIGTERM does (PvaPy's parent would run on without any consumer): through
    the handler, :class:`StopHandler`, which ignores it when a stop is already under way
    (the consumers exit as the framework stops them; that is no reason to cut it short), and
    which ``stopping`` (when given) marks: then the watch ends."""
    import _thread

    while not done.wait(CHILD_POLL_S):
        if stopping is not None and stopping.is_set():
            return
        codes = [p.exitcode for p in list(started)]
        if codes and None not in codes and any(codes):
            failed.extend(codes)
            _thread.interrupt_main(signal.SIGTERM)
            return


class StopHandler:
    """SIGTERM (and Ctrl-C) for the consumer: stops PvaPy's framework cleanly (it takes
    ``KeyboardInterrupt`` as its stop) once: a second signal while it stops is ignored, so that
    the final statistics are reported and the consumers' exit statuses read.

    While the consumer starts (from :func:`main`'s first line until a PvaPy controller's
    ``start()`` has returned: the arguments' checks, the processors' imports and engines,
    pvAccess's channels and servers; in a forked consumer, its own start), a signal is only
    noted (``asked``, with a line on stderr) and taken once the start is over (:meth:`starts`):
    raised in the middle of an import or of pvAccess's set-up, it made the consumer fail with
    tracebacks, a false "onnxruntime is not installed", or abort (SIGABRT). A second signal
    while starting (Ctrl-C pressed again during a long engine build) stops it at once, as
    before."""

    def __init__(self) -> None:
        self.stopping = threading.Event()  # a stop is under way
        self.asked = threading.Event()  # a signal came while starting, not taken yet
        self.starting = True

    def __call__(self, signum, frame) -> None:
        if self.stopping.is_set():
            return
        if self.starting and not self.asked.is_set():
            self.asked.set()
            # os.write: print() could find stderr's buffer in use by the interrupted code
            os.write(2, b"edge-ptychonn consumer: stopping once the consumers have started "
                        b"(again to stop at once)\n")
            return
        self.stopping.set()
        raise KeyboardInterrupt

    def follow_sigterm(self) -> None:
        """With one consumer its processor takes SIGTERM for its own stop once started
        (``processors/shutdown.py``): that stop is then marked here too, so that a Ctrl-C while it
        runs is ignored like any second signal (it raised ``KeyboardInterrupt`` in the middle of
        the stop: exit 130, or an abort)."""
        taken = signal.getsignal(signal.SIGTERM)
        if taken is self or not callable(taken):
            return

        def on_sigterm(signum, frame) -> None:
            self.stopping.set()
            taken(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)

    @contextlib.contextmanager
    def starts(self):
        """Inside the block, the ``start()`` of PvaPy's controllers (one consumer's, and the
        one that forks ``-nc N``; a forked consumer runs its own in the child) ends the start:
        a signal noted before is then taken by setting the controller's ``shouldBeStopped``,
        which its loop polls first (as the processors' own SIGTERM handler does)."""
        from pvapy.hpc.mpDataConsumerController import MpDataConsumerController
        from pvapy.hpc.systemController import SystemController

        originals = {cls: cls.__dict__["start"] for cls in (SystemController, MpDataConsumerController)}

        def wrap(original):
            def start(controller, *args, **kwargs):
                try:
                    return original(controller, *args, **kwargs)
                finally:
                    self.starting = False
                    self.follow_sigterm()
                    if self.asked.is_set() and not self.stopping.is_set():
                        self.stopping.set()
                        controller.shouldBeStopped = True

            return start

        for cls, original in originals.items():
            cls.start = wrap(original)
        try:
            yield self
        finally:
            for cls, original in originals.items():
                cls.start = original


@contextlib.contextmanager
def recording_children(started: list):
    """Inside the block every ``multiprocessing`` process started here is appended to ``started``
    (PvaPy starts the consumers of ``-nc N`` so and keeps no list a caller can read; one that
    fails at once is gone before any poll of the active children would see it)."""
    base = multiprocessing.process.BaseProcess
    original = base.start

    def start(self):
        original(self)
        started.append(self)

    base.start = start
    try:
        yield started
    finally:
        base.start = original


# pvapy-hpc-consumer's options whose value it reads with json.loads and then uses as a dict
JSON_OPTIONS = {"-pa": "--processor-args", "--processor-args": "--processor-args", "-ia": "--input-args",
                "--input-args": "--input-args", "-oa": "--output-args", "--output-args": "--output-args"}


def check_json_options(argv: list[str]) -> str | None:
    """Why a JSON option's value is not a JSON object (PvaPy would answer with a bare
    ``Expecting value: line 1 column 1`` or a traceback), or None when each one is."""
    for i, arg in enumerate(argv):
        name, sep, value = arg.partition("=")
        if name not in JSON_OPTIONS:
            continue
        if not sep:
            if i + 1 >= len(argv):
                continue  # argparse says that the value is missing
            value = argv[i + 1]
        if not value:
            continue  # an empty value: no arguments, as PvaPy takes it
        option = JSON_OPTIONS[name]
        example = '{"batchSize": 8}' if option == "--processor-args" else '{"key": "value"}'
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            return f"{option} is not JSON ({exc}): give an object such as '{example}'"
        if not isinstance(parsed, dict):
            return f"{option} must be a JSON object such as '{example}', got {type(parsed).__name__}"
    return None


def check_n_consumers(argv: list[str]) -> str | None:
    """Why ``--n-consumers`` is out of range, or None. PvaPy takes 0 or less without a word and
    then runs no consumer at all until its runtime ends (by default never), and its final
    report fails with a KeyError traceback. (``--consumer-id-list`` overrides it.)"""
    names = [arg.partition("=")[0] for arg in argv]
    if any(n == "-cid" or n.startswith("--consumer-id-") for n in names):
        return None
    for i, arg in enumerate(argv):
        name, sep, value = arg.partition("=")
        # (argparse takes an unambiguous abbreviation of a long option: --n-c is PvaPy's shortest)
        if name != "-nc" and not (name.startswith("--n-c") and "--n-consumers".startswith(name)):
            continue
        if not sep:
            if i + 1 >= len(argv):
                continue  # argparse says that the value is missing
            value = argv[i + 1]
        try:
            n = int(value)
        except ValueError:
            continue  # argparse says that it is not an integer
        if n < 1:
            return f"--n-consumers must be >= 1, got {n}"
    return None


def _option_values(argv: list[str], short: str, long: str, shortest: str):
    """The values given to option ``short``/``long`` (``-x V``, ``--long V``, ``--long=V``, or an
    abbreviation of ``--long`` at least as long as ``shortest``, as argparse takes them)."""
    for i, arg in enumerate(argv):
        name, sep, value = arg.partition("=")
        if name != short and not (name.startswith(shortest) and long.startswith(name)):
            continue
        if sep:
            yield value
        elif i + 1 < len(argv):
            yield argv[i + 1]


def check_processor_class(argv: list[str]) -> str | None:
    """Why ``--processor-class`` cannot name a class, or None. Without ``--processor-file`` PvaPy
    imports it as ``<module>.<Class>``: a name without a module part failed with a bare
    ``Empty module name``."""
    if any(True for _ in _option_values(argv, "-pf", "--processor-file", "--processor-f")):
        return None  # the class is a plain name in that file
    for value in _option_values(argv, "-pc", "--processor-class", "--processor-c"):
        module, _, name = value.rpartition(".")
        if not module or not name or "" in module.split("."):
            return (f"--processor-class must be <module>.<Class> (e.g. processors.ptychonn.PtychoNNProcessor), "
                    f"or a class name with --processor-file; got {value!r}")
    return None


def check_processor_args(argv: list[str]) -> str | None:
    """Why the processor would refuse its ``--processor-args`` at start-up, or None: checked here
    as ``edge-ptychonn launch --check`` checks them (:func:`edge_ptychonn.tools.launch.check_processor_args`),
    before anything starts. With ``--n-consumers > 1`` each forked consumer failed with two
    tracebacks and PvaPy's parent added its own report, about 100 lines for one bad value. A
    class that cannot be imported, or one from a ``--processor-file``, is left to PvaPy."""
    import importlib

    from edge_ptychonn.tools.launch import check_processor_args as check

    if any(True for _ in _option_values(argv, "-pf", "--processor-file", "--processor-f")):
        return None
    classes = list(_option_values(argv, "-pc", "--processor-class", "--processor-c"))
    if not classes:
        return None
    module, _, name = classes[-1].rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except Exception:  # said by PvaPy's own import, as before
        return None
    texts = list(_option_values(argv, "-pa", "--processor-args", "--processor-a"))
    args = json.loads(texts[-1]) if texts and texts[-1] else {}  # a JSON object: check_json_options saw to it
    try:
        check("--processor-args:", classes[-1], args)
    except ValueError as exc:
        return str(exc)
    return None


def main(args: argparse.Namespace) -> int:
    handler = StopHandler()  # first: a signal while starting is taken once started
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, handler)
    try:
        return _run(list(args.consumer_args), handler)
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _run(argv: list[str], handler: StopHandler) -> int:
    problem = (check_json_options(argv) or check_n_consumers(argv) or check_processor_class(argv)
               or check_processor_args(argv))
    if problem:
        print(f"edge-ptychonn consumer: {problem}", file=sys.stderr)
        return 2
    if not sys.stdout.isatty() and not {"-dc", "--disable-curses"} & set(argv):
        argv.insert(0, "-dc")
    import pvaccess as pva
    from pvapy.cli import hpcConsumer

    from engines.base import EngineUnavailable

    if handler.asked.is_set():  # stopped while its arguments were checked: nothing has started
        print("edge-ptychonn consumer: stopped before the consumers started", file=sys.stderr)
        return 0
    stopping = handler.stopping
    saved_argv, sys.argv = sys.argv, ["edge-ptychonn consumer", *argv]  # argparse names us in its messages
    started, done, failed = [], threading.Event(), []
    watcher = threading.Thread(target=watch_children, args=(started, done, failed, stopping), name="consumer-watch",
                               daemon=True)
    watcher.start()
    try:
        with recording_children(started), handler.starts():
            hpcConsumer.main()
    except (ValueError, EngineUnavailable) as exc:  # one consumer in this process: its processor refused its
        # arguments, or its engine cannot run here
        print(f"edge-ptychonn consumer: {exc}", file=sys.stderr)
        return 2
    except (ImportError, pva.InvalidArgument) as exc:  # one consumer: a --processor-class that cannot be
        # loaded (no such module, or no such class in it), or another option PvaPy refuses
        print(f"edge-ptychonn consumer: {'--processor-class: ' if isinstance(exc, ImportError) else ''}{exc}",
              file=sys.stderr)
        return 2
    finally:
        done.set()
        sys.argv = saved_argv
    if failed:
        print(f"edge-ptychonn consumer: every consumer exited (exit statuses {', '.join(map(str, failed))}); "
              "their errors are above", file=sys.stderr)
        return 1
    crashed = [code for code in (p.exitcode for p in started) if code not in (0, None)]
    if crashed:  # PvaPy's parent reports nothing of them and would exit with 0
        print(f"edge-ptychonn consumer: {len(crashed)} of the {len(started)} consumers failed while the others ran "
              f"on (exit statuses {', '.join(map(str, crashed))}); their errors are above", file=sys.stderr)
        return 1
    return 0
