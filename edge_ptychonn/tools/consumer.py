"""``edge-ptychonn consumer``: ``pvapy-hpc-consumer`` that stops cleanly on SIGTERM.

It takes exactly ``pvapy-hpc-consumer``'s options and runs it in this process,
with two differences that matter when a service manager runs it:

- SIGTERM stops it like Ctrl-C: the consumers publish what they hold, the
  framework reports its final statistics, every process exits with 0;
- without a terminal, ``-dc`` (no curses screen) is added, since curses cannot
  start there;
- it exits (status 1) when its consumers are gone: with ``--n-consumers > 1``
  once every forked consumer has exited and one of them failed (a bad processor
  argument, an engine that cannot start, a consumer killed), where
  ``pvapy-hpc-consumer`` would go on reporting "No stats received" until its
  runtime ends; with one consumer a processor that refuses its arguments is one
  line (exit status 2), not a traceback.

With ``--n-consumers > 1`` each consumer also stops by itself if this parent is
killed (see ``processors/shutdown.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
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


def watch_children(started: list, done: threading.Event, failed: list) -> None:
    """Until ``done``: when every forked consumer in ``started`` has exited and one of them
    failed (a non-zero exit status), put their exit statuses in ``failed`` and stop the
    framework as Ctrl-C does (PvaPy's parent would run on without any consumer)."""
    import _thread

    while not done.wait(CHILD_POLL_S):
        codes = [p.exitcode for p in list(started)]
        if codes and None not in codes and any(codes):
            failed.extend(codes)
            _thread.interrupt_main()
            return


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


def main(args: argparse.Namespace) -> int:
    argv = list(args.consumer_args)
    if not sys.stdout.isatty() and not {"-dc", "--disable-curses"} & set(argv):
        argv.insert(0, "-dc")
    from pvapy.cli import hpcConsumer

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # KeyboardInterrupt: PvaPy's clean stop
    saved_argv, sys.argv = sys.argv, ["edge-ptychonn consumer", *argv]  # argparse names us in its messages
    started, done, failed = [], threading.Event(), []
    watcher = threading.Thread(target=watch_children, args=(started, done, failed), name="consumer-watch", daemon=True)
    watcher.start()
    try:
        with recording_children(started):
            hpcConsumer.main()
    except ValueError as exc:  # one consumer in this process: its processor refused its arguments
        print(f"edge-ptychonn consumer: {exc}", file=sys.stderr)
        return 2
    finally:
        done.set()
        sys.argv = saved_argv
        signal.signal(signal.SIGTERM, previous)
    if failed:
        print(f"edge-ptychonn consumer: every consumer exited (exit statuses {', '.join(map(str, failed))}); "
              "their errors are above", file=sys.stderr)
        return 1
    return 0
