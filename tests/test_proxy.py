"""run_proxied(): a bash child's structured lines become spans and events; other output passes through."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from support import run_child

import ctxprop
from ctxprop._proxy import run_proxied


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """A pipeline exporting to memory."""
    exp = InMemorySpanExporter()
    ctxprop.init(exporter=exp, service_name="proxy-test", handle_signals=False)
    return exp


def finished(exp: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    assert ctxprop.flush(30)
    return {s.name: s for s in exp.get_finished_spans()}


def _line(obj: dict[str, Any]) -> str:
    return f"echo '::ctxprop:: {json.dumps(obj)}'"


SCRIPT = "\n".join(
    [
        'echo "plain output"',
        _line({"span": "build", "event": "start", "attributes": {"target": "x86_64", "jobs": 4}}),
        _line({"event_name": "cache-miss", "attributes": {"key": "abc"}}),
        _line({"span": "compile", "event": "start", "time_unix_nano": 1700000000000000000}),
        _line(
            {
                "span": "compile",
                "event": "end",
                "status": "error",
                "message": "cc failed",
                "time_unix_nano": 1700000001000000000,
            }
        ),
        'echo "more plain output"',
        _line({"span": "build", "event": "end", "status": "ok", "attributes": {"artifacts": ["a", "b"]}}),
    ]
)


def test_bash_structured_lines_become_child_spans_of_the_current_span(exporter: InMemorySpanExporter) -> None:
    """Start/end lines make nested child spans with attributes, status, events and the child's timestamps."""
    sink = io.BytesIO()
    with trace.get_tracer("t").start_as_current_span("parent") as parent:
        assert run_proxied(["bash", "-c", SCRIPT], sink=sink) == 0
    assert sink.getvalue() == b"plain output\nmore plain output\n"
    spans = finished(exporter)
    build, compile_ = spans["build"], spans["compile"]
    assert build.parent is not None
    assert build.parent.span_id == parent.get_span_context().span_id
    assert build.context.trace_id == parent.get_span_context().trace_id
    assert compile_.parent is not None
    assert compile_.parent.span_id == build.context.span_id
    assert dict(build.attributes or {}) == {"target": "x86_64", "jobs": 4, "artifacts": ("a", "b")}
    assert build.status.status_code is StatusCode.OK
    assert [(e.name, dict(e.attributes or {})) for e in build.events] == [("cache-miss", {"key": "abc"})]
    assert compile_.status.status_code is StatusCode.ERROR
    assert compile_.status.description == "cc failed"
    assert (compile_.start_time, compile_.end_time) == (1700000000000000000, 1700000001000000000)


def test_other_lines_pass_through_byte_for_byte(exporter: InMemorySpanExporter) -> None:
    """Invalid UTF-8, CRLF, tabs and a last line without newline reach the sink unchanged."""
    sink = io.BytesIO()
    script = r"printf 'caf\xe9 \t tab\r\n'; printf '  ::ctxprop:: indented is plain\n'; printf 'no newline'"
    assert run_proxied(["bash", "-c", script], sink=sink) == 0
    assert sink.getvalue() == b"caf\xe9 \t tab\r\n  ::ctxprop:: indented is plain\nno newline"


def test_malformed_structured_lines_pass_through_and_are_counted(exporter: InMemorySpanExporter) -> None:
    """Bad JSON, a non-object, an unknown event and an end without a start are output as they are."""
    bad = [
        b"::ctxprop:: {broken",
        b"::ctxprop:: [1, 2]",
        b'::ctxprop:: {"span": "x", "event": "pause"}',
        b'::ctxprop:: {"span": "never-started", "event": "end"}',
        b"::ctxprop:: ",
    ]
    script = "".join(f"echo '{line.decode()}'\n" for line in bad)
    sink = io.BytesIO()
    assert run_proxied(["bash", "-c", script], sink=sink) == 0
    assert sink.getvalue() == b"\n".join(bad) + b"\n"
    assert ctxprop.stats()["proxy_malformed_lines"] == len(bad)
    assert finished(exporter) == {}


def test_spans_left_open_are_ended_with_an_error_and_the_exit_status_returned(
    exporter: InMemorySpanExporter,
) -> None:
    """A child that exits with a span open: the span ends, marked unterminated; its exit status returns."""
    script = """echo '::ctxprop:: {"span": "deploy", "event": "start"}'; exit 7"""
    assert run_proxied(["bash", "-c", script], sink=io.BytesIO()) == 7
    deploy = finished(exporter)["deploy"]
    assert deploy.status.status_code is StatusCode.ERROR
    assert (deploy.attributes or {})["ctxprop.proxy.unterminated"] is True


def test_span_name_wraps_the_run_and_the_child_sees_its_traceparent(exporter: InMemorySpanExporter) -> None:
    """span_name= makes one span for the whole run (exit status on it); the child's TRACEPARENT names it,
    and its structured spans are its children; an event with no open span goes to it."""
    sink = io.StringIO()
    script = (
        'echo "$TRACEPARENT"; echo "prefix=[$CTXPROP_PROXY_PREFIX]"; '
        'echo \'::ctxprop:: {"event_name": "hello"}\'; '
        'echo \'::ctxprop:: {"span": "step", "event": "start"}\'; '
        'echo \'::ctxprop:: {"span": "step", "event": "end"}\'; exit 2'
    )
    assert run_proxied(["bash", "-c", script], sink=sink, span_name="run-script") == 2
    spans = finished(exporter)
    run = spans["run-script"]
    traceparent, prefix = sink.getvalue().splitlines()
    assert traceparent.split("-")[1:3] == [f"{run.context.trace_id:032x}", f"{run.context.span_id:016x}"]
    assert prefix == "prefix=[::ctxprop:: ]"
    assert run.status.status_code is StatusCode.ERROR
    assert (run.attributes or {})["process.exit_code"] == 2
    assert [e.name for e in run.events] == ["hello"]
    assert spans["step"].parent is not None
    assert spans["step"].parent.span_id == run.context.span_id


def test_default_sink_is_stdout_in_order() -> None:
    """Without a sink, other lines go to this process's stdout, after what it printed before, in order."""
    result = run_child(
        """
        import json, ctxprop
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from ctxprop._proxy import run_proxied
        exporter = InMemorySpanExporter()
        ctxprop.init(exporter=exporter, handle_signals=False)
        print("before")
        start = json.dumps({"span": "s", "event": "start"})
        end = json.dumps({"span": "s", "event": "end"})
        script = f"echo one; echo '::ctxprop:: {start}'; echo two; echo '::ctxprop:: {end}'"
        rc = run_proxied(["bash", "-c", script])
        ctxprop.flush(10)
        print("after")
        print(json.dumps({"rc": rc, "spans": [s.name for s in exporter.get_finished_spans()]}))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout_lines[:4] == ["before", "one", "two", "after"]
    assert result.json_lines[-1] == {"rc": 0, "spans": ["s"]}


class _FailingSink(io.BytesIO):
    """A sink that breaks on the first plain line (a closed pipe, a full disk)."""

    def write(self, data: Any) -> int:
        raise BrokenPipeError("sink closed")


def test_spans_open_when_the_sink_fails_are_still_ended(exporter: InMemorySpanExporter) -> None:
    """If writing a passed-through line fails, the error reaches the caller and open spans still end."""
    script = """echo '::ctxprop:: {"span": "upload", "event": "start"}'; echo 'progress 10%'; echo done"""
    with pytest.raises(BrokenPipeError):
        run_proxied(["bash", "-c", script], sink=_FailingSink())
    upload = finished(exporter)["upload"]
    assert upload.status.status_code is StatusCode.ERROR
    assert (upload.attributes or {})["ctxprop.proxy.unterminated"] is True
