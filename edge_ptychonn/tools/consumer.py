"""``edge-ptychonn consumer``: ``pvapy-hpc-consumer`` that stops cleanly on SIGTERM.

It takes exactly ``pvapy-hpc-consumer``'s options and runs it in this process,
with two differences that matter when a service manager runs it:

- SIGTERM stops it like Ctrl-C: the consumers publish what they hold, the
  framework reports its final statistics, every process exits with 0;
- without a terminal, ``-dc`` (no curses screen) is added, since curses cannot
  start there.

With ``--n-consumers > 1`` each consumer also stops by itself if this parent is
killed (see ``processors/shutdown.py``).
"""

from __future__ import annotations

import argparse
import signal
import sys


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


def main(args: argparse.Namespace) -> int:
    argv = list(args.consumer_args)
    if not sys.stdout.isatty() and not {"-dc", "--disable-curses"} & set(argv):
        argv.insert(0, "-dc")
    from pvapy.cli import hpcConsumer

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # KeyboardInterrupt: PvaPy's clean stop
    saved_argv, sys.argv = sys.argv, ["edge-ptychonn consumer", *argv]  # argparse names us in its messages
    try:
        hpcConsumer.main()
    finally:
        sys.argv = saved_argv
        signal.signal(signal.SIGTERM, previous)
    return 0
