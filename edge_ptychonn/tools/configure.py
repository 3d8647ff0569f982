"""``edge-ptychonn configure CHANNEL key=value ...``: change a running consumer's settings.

Sends PvaPy's ``configure`` command to a consumer's control channel (e.g.
``inference:1:control``) and prints the answer the consumer left in the
channel's ``statusMessage``. Each value is read as JSON where it parses
(``0.2``, ``"sqrt"``, ``[1, 2]``) and as a plain string otherwise.

Changeable keys (PtychoNNProcessor): batchTimeout, offset, scale, transform,
normalize, modelPath. modelPath swaps the model without a restart: the
consumer builds an engine of the running kind for it while it goes on
publishing with the old one, then switches at a batch boundary (no frame lost
or run twice). The new model's card (model.json beside model.onnx) gives
offset, scale, transform, the normalisation and the output mask, as at
start-up (keys given with modelPath win; an outputMask given at start is
kept). A missing file, a file that is not ONNX, a malformed card, a model
(or a card) of another input size, "outputMask": true with a card that has no mask, or
an engine that fails to build is refused with the reason, and nothing
changes. The answer comes once the engine is built, so the wait is
longer for modelPath (default 600 s: a TensorRT plan not in the cache takes
minutes). Example:

    edge-ptychonn configure inference:1:control modelPath=/models/new.onnx

modelPath must be absolute: the consumer would take a relative one from its
own working directory, not this command's.

PvaPy's control channel answers every caller in one field, so a request is
not sent while another is unanswered (a model building): configure waits for
that answer first, up to --timeout, and sends nothing if it does not come.

Exit status: 0 when the consumer applied the change, 1 when it refused it
(nothing changed), 2 for bad arguments, no answer in time (or the consumer
gone before it answered), another request
still unanswered, or an answer that cannot be told from another's (when
another request comes in before the answer; the consumer's status channel
says what is in force).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time

PENDING = "Command successful"  # PvaPy's reply before the configure timer has run
DEFAULT_TIMEOUT_S = 5.0
MODEL_TIMEOUT_S = 600.0  # modelPath: the consumer answers once the new engine is built
MAX_TIMEOUT_S = 86400.0  # --timeout: a day is more than any engine build
DISCONNECT_POLL_S = 0.25  # while an answer is awaited: how often the control channel is seen to be still there


def parse_pairs(pairs: list[str]) -> dict:
    """``["batchTimeout=0.2", "transform=sqrt"]`` -> ``{"batchTimeout": 0.2, "transform": "sqrt"}``."""
    changes = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        if key in changes:  # one value would be dropped without a word
            raise ValueError(f"{key} is given twice; give each key once")
        try:
            changes[key] = json.loads(text)
        except json.JSONDecodeError:
            changes[key] = text
    return changes


def _not_control(channel: str, error) -> None:
    """ValueError when ``error`` says that ``channel`` lacks a control channel's fields (a status,
    output or detector channel given for it); PvaPy's own message is a page of its structure."""
    if "no fields from the following request were found" in str(error):
        raise ValueError(f"{channel} is not a consumer's control channel (it lacks PvaPy's control fields); "
                         "give <prefix>:<id>:control, e.g. inference:1:control")


def _get(ch, channel: str, request: str, connect_timeout_s: float) -> dict:
    """``ch.get(request)`` as a dict, within :func:`processes.answer_s` of the channel's connect
    timeout, else TimeoutError: a get on a connected channel whose server stops answering (or
    exits) meanwhile waits for ever, deaf to Ctrl-C (:func:`processes.get_record`)."""
    from edge_ptychonn.tools.processes import answer_s, get_record

    limit_s = answer_s(connect_timeout_s)
    record = get_record(ch, limit_s, request, raise_errors=True)
    if record is None:
        raise TimeoutError(f"{channel}: no answer to a read within {limit_s:g} s")
    return record


class CrossedAnswer(Exception):
    """Another request reached the control channel while this one waited for its answer: the
    answer read (``message``) may be the other's."""

    def __init__(self, channel: str, message: str):
        super().__init__(f"another request reached {channel} while this one waited for its answer, so the answer "
                         f"read ({message!r}) may be the other's; the consumer's status channel shows what is in force")
        self.message = message


def send(channel: str, args_text: str, timeout_s: float = 5.0, connect_timeout_s: float | None = None) -> str:
    """Send ``configure`` with ``args_text`` (a JSON object, as text); return the reply, waiting
    up to ``timeout_s`` for it. ``connect_timeout_s`` (default ``timeout_s``) limits finding the
    channel and handing over the request: a wrong channel name fails that fast; each read of the
    channel takes at most :func:`processes.answer_s` of it (TimeoutError). :class:`CrossedAnswer`
    when another request reached the channel before the answer came."""
    import pvaccess as pva

    from edge_ptychonn.tools.processes import answer_s, stop_monitor

    connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
    ch = pva.Channel(channel)
    ch.setTimeout(connect_timeout_s)
    try:
        first = _get(ch, channel, "field(objectTime,statusMessage)", connect_timeout_s)
    except pva.PvaException as exc:
        _not_control(channel, exc)
        raise
    before = first["objectTime"]
    if first["statusMessage"] == PENDING:
        # Another request was taken and is not answered yet: its answer, when it comes, would
        # be read as this one's (its stamp is older than ours). Let it be answered first.
        before = _wait_answered(ch, channel, before, timeout_s, connect_timeout_s)
    # The consumer stamps objectTime when it takes a command and answers a moment later, in
    # the same statusMessage for every caller, with no mark of whose request it answers. A
    # monitor with a queue sees every change of the record in order, from before our put:
    # a second stamp before the answer is another request's (even one taken within the same
    # millisecond as ours, which reads of the record could miss), and the answer may be theirs.
    updates: queue.Queue = queue.Queue()
    watch = pva.Channel(channel)
    watch.setTimeout(connect_timeout_s)
    watch.monitor(lambda record: updates.put((record["objectTime"], record["statusMessage"])),
                  "record[queueSize=1000]field(objectTime,statusMessage)")
    try:
        try:  # the record as it is when the monitor starts: every change after it comes in order
            update = updates.get(timeout=answer_s(connect_timeout_s))
        except queue.Empty:
            raise TimeoutError(f"{channel}: no update from a monitor within {answer_s(connect_timeout_s):g} s") from None
        stamp, message = update
        stamps = {stamp} - {before}  # a request taken since the first read: another's
        _put(pva, ch, channel, args_text, connect_timeout_s)
        deadline = time.monotonic() + timeout_s
        message = PENDING
        while True:
            # A consumer that stops (SIGTERM, a crash) while it builds a new model never answers:
            # its channel's disconnection, seen between updates, ends the wait rather than the
            # whole --timeout. Polled: PvaPy's connection callback (setConnectionCallback) aborted
            # this process now and then ("PyThreadState_Get: ... the GIL is released"; 2 in ~200 runs).
            try:
                update = updates.get(timeout=max(0.0, min(deadline - time.monotonic(), DISCONNECT_POLL_S)))
            except queue.Empty:
                if not watch.isConnected():
                    raise ConnectionError(f"{channel} went away before it answered (the consumer stopped?); once "
                                          "it runs again, its status channel shows what is in force") from None
                if time.monotonic() >= deadline:  # no answer in time: the caller says so
                    return message
                continue
            stamp, message = update
            if stamp != before:
                stamps.add(stamp)
            if stamps and message != PENDING:
                if len(stamps) > 1:
                    raise CrossedAnswer(channel, message)
                return message
    finally:
        stop_monitor(watch)


def _put(pva, ch, channel: str, args_text: str, connect_timeout_s: float) -> None:
    """Hand the ``configure`` request over, within ``connect_timeout_s``. An asynchronous put
    with our own deadline: a synchronous one has been seen to wait for ever, past the
    channel's timeout, on a heavily loaded machine."""
    request = pva.PvObject({"command": pva.STRING, "args": pva.STRING}, {"command": "configure", "args": args_text})
    put_done, put_errors = threading.Event(), []
    ch.asyncPut(request, lambda _: put_done.set(), lambda error: (put_errors.append(error), put_done.set()),
                "field(command,args)")
    if not put_done.wait(connect_timeout_s):
        raise TimeoutError(f"{channel}: the request was not taken within {connect_timeout_s:g} s")
    if put_errors:
        _not_control(channel, put_errors[0])
        raise pva.PvaException(f"{channel}: the request failed: {put_errors[0]}")


class Busy(Exception):
    """Another request to the control channel was still unanswered after the wait."""


def _wait_answered(ch, channel: str, taken_s: float, timeout_s: float, connect_timeout_s: float) -> float:
    """Wait up to ``timeout_s`` until the request in progress on ``channel`` (taken at ``taken_s``,
    its objectTime) is answered (its statusMessage is no longer :data:`PENDING`); return the
    channel's objectTime then, else :class:`Busy`."""
    import pvaccess as pva

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            record = _get(ch, channel, "field(objectTime,statusMessage)", connect_timeout_s)
            if record["statusMessage"] != PENDING:
                return record["objectTime"]
        except pva.PvaException:  # a get that crossed the record's update: ask again
            pass
        if time.monotonic() > deadline:
            raise Busy(f"{channel} is still working on another request (taken {max(0.0, time.time() - taken_s):.0f} s "
                       f"ago, not answered within {timeout_s:g} s): nothing was sent; send it again once that one is "
                       "answered (a new model's engine may be building), or give a longer --timeout")
        time.sleep(0.05)


def _changes_model(args_text: str) -> bool:
    """Whether the request asks for a new modelPath (its answer waits for the engine build)."""
    try:
        request = json.loads(args_text)
    except json.JSONDecodeError:
        return False
    return isinstance(request, dict) and "modelPath" in request


def check_model_path(args_text: str) -> None:
    """ValueError for a relative ``modelPath``: the consumer would take it from its own working
    directory, not this command's, and could swap to another file of that name without a word."""
    try:
        request = json.loads(args_text)
    except json.JSONDecodeError:
        return  # the consumer refuses it, with its reason
    path = request.get("modelPath") if isinstance(request, dict) else None
    if isinstance(path, str) and path and not path.startswith("/"):
        raise ValueError(f"modelPath {path!r} is relative: the consumer would take it from its own working "
                         f"directory, not this one; give an absolute path, e.g. modelPath=$PWD/{path}")


def positive_seconds(text: str) -> float:
    """``--timeout``: seconds > 0, at most :data:`MAX_TIMEOUT_S` (argparse answers anything else
    with exit 2; beyond ``threading.TIMEOUT_MAX`` the wait itself failed with an OverflowError)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be > 0 and at most {MAX_TIMEOUT_S:g} seconds (a day), got {text!r}")
    return value


class _Intermixed(argparse.ArgumentParser):
    """Options anywhere: ``CHANNEL --timeout 10 key=value`` as well as ``CHANNEL key=value --timeout 10``
    (a plain parser takes the pairs only before or after every option)."""

    def parse_args(self, args=None, namespace=None):  # noqa: D102
        return self.parse_intermixed_args(args, namespace)


def get_args_parser(prog: str = "edge-ptychonn configure") -> argparse.ArgumentParser:
    p = _Intermixed(prog=prog, description=__doc__.split("\n\n", 1)[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("channel", help="the consumer's control channel, e.g. inference:1:control")
    p.add_argument("changes", nargs="*", metavar="key=value", help="settings to change, e.g. batchTimeout=0.2")
    p.add_argument("--json", dest="raw", help="send this text as the arguments instead of key=value pairs "
                   "(a JSON object)")
    p.add_argument("--timeout", type=positive_seconds, default=None,
                   help=f"seconds (> 0, at most {MAX_TIMEOUT_S:g}) to wait for the answer (default: {DEFAULT_TIMEOUT_S:g}, "
                        f"or {MODEL_TIMEOUT_S:g} when modelPath changes; finding the channel takes at most "
                        f"{DEFAULT_TIMEOUT_S:g} s unless this is given)")
    return p


def main(args: argparse.Namespace) -> int:
    if args.raw is None and not args.changes:
        print("edge-ptychonn configure: give key=value pairs or --json", file=sys.stderr)
        return 2
    if args.raw is not None and args.changes:
        print("edge-ptychonn configure: give key=value pairs or --json, not both", file=sys.stderr)
        return 2
    try:
        text = args.raw if args.raw is not None else json.dumps(parse_pairs(args.changes))
        check_model_path(text)
    except ValueError as exc:
        print(f"edge-ptychonn configure: {exc}", file=sys.stderr)
        return 2
    import pvaccess as pva

    timeout_s = args.timeout if args.timeout is not None else (
        MODEL_TIMEOUT_S if _changes_model(text) else DEFAULT_TIMEOUT_S)
    # the long wait for a new model is for the answer; a consumer that is there is found in seconds
    connect_s = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT_S
    try:
        reply = send(args.channel, text, timeout_s, connect_s)
    except (pva.PvaException, TimeoutError, ConnectionError) as exc:
        print(f"edge-ptychonn configure: no answer from {args.channel}: {exc}", file=sys.stderr)
        return 2
    except (ValueError, CrossedAnswer, Busy) as exc:
        print(f"edge-ptychonn configure: {exc}", file=sys.stderr)
        return 2
    print(reply)
    if reply == PENDING:
        print(f"edge-ptychonn configure: the consumer took the command but did not answer within {timeout_s:g} s; "
              "its status channel shows what is in force", file=sys.stderr)
        return 2
    return 0 if "successful" in reply and "failed" not in reply else 1
