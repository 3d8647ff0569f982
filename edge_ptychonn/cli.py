"""The ``edge-ptychonn`` command: one sub-command per module.

Each sub-command lives in its own module, which provides
``get_args_parser(prog) -> argparse.ArgumentParser`` and ``main(args) -> int``.
Modules are imported only when their sub-command runs, so ``edge-ptychonn
--help`` stays fast and works without torch.

Exit status: 0 on success, 1 when a command ran but did not get what it
wanted (e.g. the demo lost frames, or a file could not be written), 2 for bad
arguments, 130 when stopped by Ctrl-C; every error goes to stderr (one line,
not a traceback), results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import signal
import sys
import threading

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("edge_ptychonn.tools.demo", "replay a scan through live PvaPy consumers and print a summary"),
    "simulate": ("edge_ptychonn.science.simulate", "simulate a ptychography scan (.npy frames + .npz truth)"),
    "train": ("edge_ptychonn.science.train", "train PtychoNN on simulated scans and export ONNX + model card"),
    "finetune": ("edge_ptychonn.science.finetune", "fine-tune a model on recorded frames and an iterative reconstruction"),
    "evaluate": ("edge_ptychonn.science.evaluate", "score a model on simulated scans (stitched phase vs truth)"),
    "export": ("edge_ptychonn.science.export", "export a PtychoNN with random weights to ONNX (to try engines)"),
    "bench": ("edge_ptychonn.tools.bench", "benchmark engines and the live pipeline"),
    "consumer": ("edge_ptychonn.tools.consumer", "run pvapy-hpc-consumer so that SIGTERM stops it cleanly"),
    "soak": ("edge_ptychonn.tools.soak", "stream at a steady rate for minutes: nothing lost, memory flat"),
    "configure": ("edge_ptychonn.tools.configure", "change a running consumer's settings over its control channel"),
    "build-engine": ("edge_ptychonn.tools.build_engine", "prebuild TensorRT plans so that GPU consumers start in seconds"),
    "launch": ("edge_ptychonn.tools.launch", "start the live chain (sim server, inference, stitcher, HDF5) from a TOML file"),
    "view": ("edge_ptychonn.tools.view", "c2dv windows on the chain's channels at full rate with phase levels"),
}


@contextlib.contextmanager
def sigterm_interrupts():
    """Inside the block SIGTERM (``kill``, a batch system's stop) raises ``KeyboardInterrupt``
    as Ctrl-C does, so that a command's own clean-up runs (no half-written file) and it ends
    with one line, exit 130. Only where SIGTERM has its default action and on the main
    thread; the default comes back at the end."""
    take = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if take:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        if take:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


_SIGTERM_SEEN = threading.Event()  # a SIGTERM came inside sigterm_interrupts


def _interrupt(signum, frame):
    """SIGTERM as Ctrl-C; noted, because a library may turn the ``KeyboardInterrupt`` it raises in
    the middle of its work into an error of its own (numpy's ``tofile`` a ``TypeError``)."""
    _SIGTERM_SEEN.set()
    raise KeyboardInterrupt


def repeat_command(prog: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command line that repeats ``args`` of ``parser``: the required options and those
    that differ from their defaults, each word quoted for a POSIX shell (a path with a space
    in it stays one argument)."""
    words = prog.split()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if isinstance(action, argparse._StoreConstAction):  # a flag (store_true, --bf16 / --no-bf16 on one dest)
            if value == action.const and value != action.default:
                words.append(action.option_strings[0])
            continue
        default = action.default
        if isinstance(default, str) and action.type is not None:
            default = action.type(default)  # as argparse gives it
        if value == default and not action.required:
            continue
        flag = action.option_strings[0]
        if isinstance(value, (list, tuple)):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def usage() -> str:
    lines = [
        "usage: edge-ptychonn COMMAND [options]",
        "",
        "Live PtychoNN phase reconstruction for PvaPy HPC streaming.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run 'edge-ptychonn COMMAND --help' for a command's options, 'edge-ptychonn --version' for the version."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a usage error: the usage goes to stderr
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from edge_ptychonn import __version__

        print(f"edge-ptychonn {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"edge-ptychonn: unknown command {name!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # argparse answers --help (exit 0) and bad arguments (usage and error on stderr, exit 2) itself
    args = module.get_args_parser(prog=f"edge-ptychonn {name}").parse_args(rest)
    _SIGTERM_SEEN.clear()  # this command's own: an earlier one's in the same process is no interruption of it
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print(f"edge-ptychonn {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _SIGTERM_SEEN.is_set():  # the SIGTERM's KeyboardInterrupt, turned into another error on its way
            print(f"edge-ptychonn {name}: interrupted", file=sys.stderr)
            return 130
        if isinstance(exc, OSError):  # a file or folder that cannot be read or written: one line, not a traceback
            print(f"edge-ptychonn {name}: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, MemoryError):  # sizes beyond this machine (numpy names the array it could not make)
            print(f"edge-ptychonn {name}: not enough memory{': ' + str(exc) if str(exc) else ''}; "
                  "ask for less (fewer or smaller frames, a smaller batch)", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
