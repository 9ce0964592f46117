"""``python -m ctxprop collector``: a local OTLP/HTTP receiver that prints each trace as a tree.

A development tool (use an OpenTelemetry Collector, Jaeger or Tempo in production). A trace usually
arrives in several requests (each process, and each batch of one process, sends its own), so spans are
grouped by trace and a trace is printed once no span of it arrived for ``--settle`` seconds (default 1).
Spans of a trace that arrive after it was printed are printed again with the trace, marked as an update.
On Ctrl-C (SIGINT) or SIGTERM, traces still waiting are printed, then the command exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ctxprop._devtools.receiver import OTLPReceiver

__all__ = ["add_arguments", "run"]


def _say(text: str = "") -> None:
    # The command's output: traces go to stdout, flushed per trace so a pipe sees them as they come.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m ctxprop collector``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=4318, help="port (default 4318; 0 picks a free one)")
    parser.add_argument("--jsonl", metavar="FILE", help="append every span received to FILE as JSON lines")
    parser.add_argument("--attributes", action="store_true", help="show span attributes in the trees")
    parser.add_argument(
        "--settle",
        type=_non_negative,
        default=1.0,
        metavar="SECONDS",
        help="print a trace once none of its spans arrived for this long (default 1.0)",
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


# Traces kept after printing, so that late spans reprint their whole trace: the most recent ones only,
# so a collector left running all day does not grow without bound.
_KEEP_PRINTED = 1000


class _Traces:
    """Spans grouped by trace; hands out the traces that have been quiet long enough."""

    def __init__(self, quiet: float, jsonl: IO[str] | None, keep_printed: int = _KEEP_PRINTED) -> None:
        self._quiet = quiet
        self._jsonl = jsonl
        self._keep_printed = keep_printed
        self._cond = threading.Condition()
        self._spans: dict[str, list[Any]] = {}
        self._last: dict[str, float] = {}  # trace id -> monotonic time its latest span arrived
        self._printed: dict[str, int] = {}  # trace id -> spans it had when last printed, oldest first

    def add(self, spans: list[Any]) -> None:
        """The receiver's callback, on request threads: a failing ``--jsonl`` file never fails the request."""
        now = time.monotonic()
        with self._cond:
            for s in spans:
                self._spans.setdefault(s.trace_id, []).append(s)
                self._last[s.trace_id] = now
            if self._jsonl is not None:
                self._write_jsonl(self._jsonl, spans)
            self._cond.notify_all()

    def _write_jsonl(self, jsonl: IO[str], spans: list[Any]) -> None:
        try:
            for s in spans:
                jsonl.write(json.dumps(dataclasses.asdict(s), default=_json_default) + "\n")
            jsonl.flush()
        except (OSError, ValueError) as exc:
            # A full disk must not turn every request into a traceback and an unanswered POST (which the
            # sender would retry, and the trees would show twice): say it once, keep printing trees.
            name = getattr(jsonl, "name", "the JSON-lines file")
            sys.stderr.write(
                f"ctxprop collector: writing {name} failed ({getattr(exc, 'strerror', None) or exc}); "
                "no longer writing it\n"
            )
            with contextlib.suppress(OSError, ValueError):
                jsonl.close()
            self._jsonl = None

    def wait_ready(self, stop: threading.Event) -> list[tuple[str, list[Any], int]]:
        """Block until a trace is due or ``stop`` is set; return the due traces (all pending on stop)."""
        with self._cond:
            while True:
                now = time.monotonic()
                if stop.is_set():
                    due = list(self._last)
                else:
                    due = [t for t, at in self._last.items() if now - at >= self._quiet]
                if due or stop.is_set():
                    out = []
                    for t in sorted(due, key=lambda t: self._last[t]):
                        del self._last[t]
                        spans = list(self._spans[t])
                        out.append((t, spans, self._printed.pop(t, 0)))
                        self._printed[t] = len(spans)  # re-inserted: the most recently printed is last
                    self._forget_old()
                    return out
                soonest = min(self._last.values(), default=None)
                # Short waits when idle so a signal's flag is seen promptly even where a signal does not
                # interrupt the wait.
                timeout = 0.25 if soonest is None else max(0.0, min(0.25, soonest + self._quiet - now))
                self._cond.wait(timeout)

    def _forget_old(self) -> None:
        excess = len(self._printed) - self._keep_printed
        for t in list(self._printed)[: max(0, excess)]:
            del self._printed[t]
            if t not in self._last:  # not waiting to be printed again
                del self._spans[t]

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def _print_trace(trace_id: str, spans: list[Any], before: int, attributes: bool) -> None:
    from ctxprop._devtools import tree as _tree

    services = sorted({s.service_name for s in spans if s.service_name})
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    head = f"trace {trace_id}  {len(spans)} span{'s' if len(spans) != 1 else ''}"
    head += f"  {_tree.format_duration(end - start)}"
    if services:
        head += f"  services: {', '.join(services)}"
    if before:
        head += f"  (update: +{len(spans) - before} spans)"
    _say(head)
    for line in _tree.render_forest(spans, attributes=attributes):
        _say("  " + line)
    _say()


def _make_receiver(host: str, port: int, traces: _Traces) -> OTLPReceiver:
    from ctxprop._devtools.receiver import OTLPReceiver

    def on_spans(spans: list[Any]) -> None:
        traces.add(spans)
        # The receiver also keeps every span it accepted (tests read them); here ``traces`` holds what is
        # needed, so the receiver's own copy is dropped as each request is handled.
        receiver.clear()

    receiver = OTLPReceiver(host, port, on_spans=on_spans)
    return receiver


def run(args: argparse.Namespace) -> int:
    """Run the collector until SIGINT or SIGTERM; returns the exit status."""
    try:
        jsonl = open(args.jsonl, "a", encoding="utf-8") if args.jsonl else None  # noqa: SIM115 - closed below
    except OSError as exc:
        sys.stderr.write(f"ctxprop collector: cannot write {args.jsonl}: {exc.strerror or exc}\n")
        return 2
    traces = _Traces(args.settle, jsonl)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        traces.wake()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    receiver = _make_receiver(args.host, args.port, traces)
    try:
        try:
            receiver.start()
        except OSError as exc:
            sys.stderr.write(f"ctxprop collector: cannot listen on {args.host}:{args.port}: {exc}\n")
            return 2
        _say(f"ctxprop collector listening on {receiver.endpoint} (Ctrl-C to stop)")
        while True:
            for trace_id, spans, before in traces.wait_ready(stop):
                _print_trace(trace_id, spans, before, args.attributes)
            if stop.is_set():
                break
    finally:
        receiver.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if jsonl is not None:
            jsonl.close()
    _say("ctxprop collector stopped")
    return 0
