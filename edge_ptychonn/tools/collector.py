"""One process of the bench's output collector spread over several processes
(``edge_ptychonn.tools.processes.CollectorProcesses``, the bench's ``--collectors K``).

It monitors the output channels named, as the bench's own collector does (ids, arrival
times and time stamps; no images, no attributes), and answers its parent's requests over the
socket whose file descriptor it is given (``--fd``): how many frames arrived, whether its
channels are connected, and at the end everything it received. It exits when told to, or
when the parent is gone. Started by ``CollectorProcesses``, not by hand.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys


def main(argv: list[str] | None = None) -> int:
    from edge_ptychonn.cli_options import DefaultsFormatter

    parser = argparse.ArgumentParser(prog="python -m edge_ptychonn.tools.collector",
                                     description=__doc__.split("\n\n")[0].replace("``", ""),
                                     formatter_class=DefaultsFormatter)
    parser.add_argument("--fd", type=int, required=True,
                        help="file descriptor of this end of the socket pair to the parent")
    parser.add_argument("--queue-size", type=int, default=2000, help="server-side queue of each monitor")
    parser.add_argument("channels", nargs="+", help="output channels to monitor")
    args = parser.parse_args(argv)
    if args.queue_size < 1:
        parser.error(f"--queue-size must be >= 1, got {args.queue_size}")
    try:
        if not stat.S_ISSOCK(os.fstat(args.fd).st_mode):
            parser.error(f"--fd {args.fd} is not a socket: this process is started by the bench, not by hand")
    except (OSError, OverflowError) as exc:
        parser.error(f"--fd {args.fd} is not an open file descriptor ({getattr(exc, 'strerror', None) or exc}): "
                     "this process is started by the bench, not by hand")

    from multiprocessing.connection import Connection

    from .processes import collector_child

    collector_child(Connection(args.fd), args.channels, args.queue_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
