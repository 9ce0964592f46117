"""Spans for children that cannot run ctxprop (shell scripts, other languages), from lines they print.

:func:`run_proxied` runs a command and reads its standard output line by line. A line in the format below
becomes a child span or a span event in this process; every other line is written through unchanged, byte
for byte, to this process's standard output (or the ``sink`` given). A line that starts with the prefix but
is not valid is written through too: a child's output is never lost and never raises here.

The line format (one line, UTF-8, language-neutral)::

    ::ctxprop:: {JSON object}

with one of these objects:

``{"span": NAME, "event": "start", "attributes": {...}}``
    start a span NAME, child of the innermost span the child started and has not ended, else of the
    span current where ``run_proxied`` was called.
``{"span": NAME, "event": "end", "status": "ok"|"error", "message": TEXT, "attributes": {...}}``
    end the innermost open span named NAME (``status``, ``message`` and ``attributes`` optional).
``{"event_name": NAME, "attributes": {...}}``
    add an event to the innermost open span of the child, else to the current span.

Every object may carry ``"time_unix_nano": INT`` (e.g. from ``date +%s%N``); without it, the time the line
arrived is used. Attribute values are strings, numbers, booleans or lists of one of those; others are
skipped. Spans still open when the child exits are ended then, with status error.

The child's environment is :func:`ctxprop.subprocess_env` plus ``CTXPROP_PROXY_PREFIX="::ctxprop:: "``, so
a child can also pass ``TRACEPARENT`` on to programs that speak OpenTelemetry. From bash::

    echo '::ctxprop:: {"span": "compile", "event": "start", "attributes": {"target": "x86_64"}}'
    make
    echo '::ctxprop:: {"span": "compile", "event": "end", "status": "ok"}'
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from typing import IO, Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from ctxprop import _stats
from ctxprop._scopes import _valid_value
from ctxprop._subprocess import subprocess_env

__all__ = ["PREFIX", "run_proxied"]

#: The prefix of a structured line (followed by one JSON object).
PREFIX = b"::ctxprop:: "
_TRACER_NAME = "ctxprop.proxy"


def _attributes(raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if _valid_value(v)}


def _time(message: dict[str, Any]) -> int:
    ts = message.get("time_unix_nano")
    return ts if isinstance(ts, int) and not isinstance(ts, bool) and ts > 0 else time.time_ns()


class _ChildSpans:
    """The spans one child opened, innermost last."""

    def __init__(self) -> None:
        self._tracer = trace.get_tracer(_TRACER_NAME)
        self._open: list[tuple[str, Span]] = []

    def handle(self, message: object) -> bool:
        """Apply one structured message; False when it is not one this format knows."""
        if not isinstance(message, dict):
            return False
        name = message.get("span")
        event = message.get("event")
        if isinstance(name, str) and event == "start":
            parent = trace.set_span_in_context(self._open[-1][1]) if self._open else None
            span = self._tracer.start_span(
                name,
                context=parent,
                attributes=_attributes(message.get("attributes")),
                start_time=_time(message),
            )
            self._open.append((name, span))
            return True
        if isinstance(name, str) and event == "end":
            for i in range(len(self._open) - 1, -1, -1):
                if self._open[i][0] == name:
                    span = self._open.pop(i)[1]
                    span.set_attributes(_attributes(message.get("attributes")))
                    status = message.get("status")
                    if status == "error":
                        text = message.get("message")
                        span.set_status(Status(StatusCode.ERROR, text if isinstance(text, str) else None))
                    elif status == "ok":
                        span.set_status(Status(StatusCode.OK))
                    span.end(end_time=_time(message))
                    return True
            return False
        event_name = message.get("event_name")
        if isinstance(event_name, str) and name is None:
            target = self._open[-1][1] if self._open else trace.get_current_span()
            target.add_event(event_name, _attributes(message.get("attributes")), timestamp=_time(message))
            return True
        return False

    def close(self, returncode: int | None) -> None:
        reason = (
            f"child exited ({returncode}) with the span open"
            if returncode is not None
            else "stopped reading the child's output with the span open"
        )
        while self._open:
            _, span = self._open.pop()
            span.set_attribute("ctxprop.proxy.unterminated", True)
            span.set_status(Status(StatusCode.ERROR, reason))
            span.end()


def _writer(sink: IO[Any] | None) -> tuple[IO[Any], bool]:
    """The stream to write passed-through lines to, and whether it takes bytes."""
    if sink is None:
        sys.stdout.flush()  # what this process printed before must come out before the child's lines
        buffer = getattr(sys.stdout, "buffer", None)
        return (buffer, True) if buffer is not None else (sys.stdout, False)
    return sink, not isinstance(sink, io.TextIOBase)


def run_proxied(
    args: Any, *, sink: IO[Any] | None = None, span_name: str | None = None, **popen_kwargs: Any
) -> int:
    """Run ``args``; turn its structured output lines into spans and events; pass every other line through.

    ``sink`` (a binary or text stream; default this process's stdout) receives the other lines unchanged.
    ``span_name`` wraps the whole run in a span of that name (status error on a non-zero exit). Other
    keywords go to ``subprocess.Popen`` (``stdout`` is taken). Returns the child's exit status.

    >>> script = "echo hello; echo '::ctxprop:: {\\"event_name\\": \\"hi\\"}'"
    >>> run_proxied(["bash", "-c", script])  # doctest: +SKIP
    hello
    0

    .. versionadded:: 0.1.0
    """
    env = subprocess_env(popen_kwargs.pop("env", None))
    env["CTXPROP_PROXY_PREFIX"] = PREFIX.decode()
    if span_name is None:
        return _run(args, sink, env, popen_kwargs)
    with trace.get_tracer(_TRACER_NAME).start_as_current_span(span_name) as span:
        env = subprocess_env(env)  # the wrapping span is now the one to continue
        returncode = _run(args, sink, env, popen_kwargs)
        span.set_attribute("process.exit_code", returncode)
        if returncode != 0:
            span.set_status(Status(StatusCode.ERROR, f"exit status {returncode}"))
        return returncode


def _apply(spans: _ChildSpans, line: bytes) -> bool:
    try:
        return spans.handle(json.loads(line[len(PREFIX) :]))
    except Exception:  # noqa: BLE001 - a malformed line is output like any other, never an error
        return False


def _run(args: Any, sink: IO[Any] | None, env: dict[str, str], popen_kwargs: dict[str, Any]) -> int:
    out, binary = _writer(sink)
    spans = _ChildSpans()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, **popen_kwargs)  # noqa: S603
    try:
        with proc:
            assert proc.stdout is not None  # noqa: S101 - stdout=PIPE above
            for line in proc.stdout:
                if line.startswith(PREFIX):
                    if _apply(spans, line):
                        continue
                    _stats.incr("proxy_malformed_lines")
                out.write(line if binary else line.decode("utf-8", errors="replace"))
                out.flush()
            return proc.wait()
    finally:
        # Also when the sink or a KeyboardInterrupt stops the reading: a span left open is never exported.
        spans.close(proc.returncode)
