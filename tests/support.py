"""Test helpers shared by every test module: a loopback OTLP receiver fixture and a child-process runner.

Use ``from support import receiver  # noqa: F401`` for the fixture, and ``run_child(code)`` to run a
script in a real interpreter that prints JSON lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ctxprop._devtools.receiver import OTLPReceiver, ReceivedSpan

__all__ = [
    "REPO",
    "ChildResult",
    "OTLPReceiver",
    "ReceivedSpan",
    "assert_books_balance",
    "ended",
    "receiver",
    "run_child",
]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    """A started loopback OTLP receiver, stopped after the test."""
    rx = OTLPReceiver().start()
    try:
        yield rx
    finally:
        rx.stop()


@dataclass
class ChildResult:
    """What a child process did: exit status, stdout lines, the JSON ones decoded, stderr."""

    returncode: int
    stdout_lines: list[str]
    json_lines: list[dict[str, Any]]
    stderr: str
    elapsed: float = 0.0
    signalled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def last(self, key: str) -> Any:
        """The value of ``key`` in the last JSON line that has it (KeyError if none does)."""
        for obj in reversed(self.json_lines):
            if key in obj:
                return obj[key]
        raise KeyError(key)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` + ``env``, with the repo first on PYTHONPATH and unbuffered output."""
    merged = dict(os.environ)
    merged.update(env or {})
    pp = merged.get("PYTHONPATH", "")
    merged["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    merged["PYTHONUNBUFFERED"] = "1"
    return merged


def _close_pipes(proc: subprocess.Popen[str]) -> None:
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _json_lines(lines: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ln in lines:
        s = ln.strip()
        if not s.startswith("{"):
            continue
        try:
            obj = json.loads(s)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def run_child(
    code: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    signal_after_line: str | None = None,
    sig: int | None = None,
    prefix: Sequence[str] = (),
) -> ChildResult:
    """Run ``code`` (dedented) as ``[*prefix, sys.executable, script]`` and collect its output.

    With ``signal_after_line``, ``sig`` (default SIGTERM) is sent once a stdout line containing that text
    was printed. On ``timeout`` the child is killed and the test fails with its output.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".py", prefix="ctxprop_child_", delete=False) as f:
        f.write(textwrap.dedent(code))
        path = f.name
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [*prefix, sys.executable, path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(env),
            text=True,
            cwd=str(REPO),
        )
        out_lines: list[str] = []
        err_chunks: list[str] = []
        seen = threading.Event()

        def read_out() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                out_lines.append(line.rstrip("\n"))
                if signal_after_line is not None and signal_after_line in line:
                    seen.set()
            seen.set()  # EOF: stop waiting for a line that will never come

        def read_err() -> None:
            assert proc.stderr is not None
            err_chunks.append(proc.stderr.read())

        readers = [
            threading.Thread(target=read_out, daemon=True),
            threading.Thread(target=read_err, daemon=True),
        ]
        for t in readers:
            t.start()
        signalled = False
        if signal_after_line is not None:
            seen.wait(timeout)
            if proc.poll() is None and any(signal_after_line in ln for ln in out_lines):
                proc.send_signal(signal.SIGTERM if sig is None else sig)
                signalled = True
        try:
            remaining = max(0.1, timeout - (time.monotonic() - start))
            proc.wait(remaining)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            for t in readers:
                t.join(5)
            _close_pipes(proc)
            pytest.fail(
                f"child timed out after {timeout}s\n--- stdout ---\n"
                + "\n".join(out_lines)
                + "\n--- stderr ---\n"
                + "".join(err_chunks)
            )
        for t in readers:
            t.join(10)
        _close_pipes(proc)
        elapsed = time.monotonic() - start
        return ChildResult(
            proc.returncode, out_lines, _json_lines(out_lines), "".join(err_chunks), elapsed, signalled
        )
    finally:
        os.unlink(path)


def assert_books_balance(stats: dict[str, int], *, ended: int | None = None) -> None:
    """The books balance: ``spans_ended`` = exported + rejected + dropped + pending, ``spans_dropped`` is the
    sum of the per-reason ``dropped_*`` keys (and a memory-only spool's losses), and (given ``ended``) that
    many spans ended."""

    def get(key: str) -> int:
        return int(stats.get(key, 0))

    reasons = sum(int(v) for k, v in stats.items() if k.startswith("dropped_"))
    reasons += get("spool_dropped_memory_spans")  # a memory-only spool's spans, lost when it closes
    assert get("spans_dropped") == reasons, stats
    assert get("spans_ended") == (
        get("spans_exported") + get("spans_rejected") + get("spans_dropped") + get("spans_pending")
    ), stats
    if ended is not None:
        assert get("spans_ended") == ended, stats


def ended(span: Any, sampled: bool = True) -> Any:
    """``span`` as the SDK's ``Span.end()`` hands it to ``on_end``: a ``ReadableSpan`` whose attributes are
    a ``BoundedAttributes`` and whose events and links are ``BoundedList`` s, with the span's dropped
    counts, and its context sampled (or not). Built through their public constructors, so the attributes
    are cleaned as the SDK cleans them (an empty key is dropped, a list becomes a tuple): what ctxprop's
    processor is really given."""
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util import BoundedList
    from opentelemetry.trace import SpanContext, TraceFlags

    ctx = span.context
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)

    attributes = BoundedAttributes(None, span.attributes)
    attributes.dropped = span.dropped_attributes
    events: Any = BoundedList.from_seq(None, span.events)
    events.dropped = span.dropped_events
    links: Any = BoundedList.from_seq(None, span.links)
    links.dropped = span.dropped_links
    return ReadableSpan(
        name=span.name,
        context=SpanContext(ctx.trace_id, ctx.span_id, ctx.is_remote, flags, ctx.trace_state),
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )
