"""subprocess_env(), adopt_environment() and the run helpers: a child process continues the trace."""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import OTLPReceiver, child_env, receiver  # noqa: F401

import ctxprop
from ctxprop._subprocess import TAGS_ENV, adopt_environment, popen_with_context, run_subprocess

CHILD = """
import json, os, ctxprop
from opentelemetry import baggage, trace
ctxprop.init(endpoint=os.environ["RX"], service_name="child", handle_signals=False,
             spool_dir=os.environ["SPOOL"])
tags = {**ctxprop.get_isolation_scope().tags, **ctxprop.get_current_scope().tags}
with trace.get_tracer("child").start_as_current_span("child-work") as span:
    with trace.get_tracer("child").start_as_current_span("child-inner"):
        pass
print(json.dumps({"tags": tags, "baggage": dict(baggage.get_all()),
                  "trace_id": format(span.get_span_context().trace_id, "032x")}))
ctxprop.close(10)
"""


def _in_fresh_context(fn: Any) -> Any:
    return contextvars.Context().run(fn)


def test_subprocess_env_carries_traceparent_tracestate_baggage_and_tags() -> None:
    """The env copy holds the current span's W3C traceparent, baggage and both scopes' tags as JSON."""
    ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False)

    def go() -> tuple[dict[str, str], trace.SpanContext]:
        ctxprop.set_tag("job", "nightly")
        ctxprop.get_current_scope().set_tag("step", 3)
        otel_context.attach(baggage.set_baggage("tenant", "acme"))
        with trace.get_tracer("t").start_as_current_span("parent") as span:
            return ctxprop.subprocess_env({"KEEP": "1", "TRACESTATE": "stale=1"}), span.get_span_context()

    env, ctx = _in_fresh_context(go)
    assert env["KEEP"] == "1"
    assert env["TRACEPARENT"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    assert "TRACESTATE" not in env  # the stale one went with the old trace
    assert env["BAGGAGE"] == "tenant=acme"
    assert json.loads(env[TAGS_ENV]) == {"isolation": {"job": "nightly"}, "current": {"step": 3}}
    assert "TRACEPARENT" not in os.environ


def test_subprocess_env_defaults_to_os_environ_and_passes_inherited_context_on() -> None:
    """With no span here, an inherited TRACEPARENT passes through; no tags means no CTXPROP_TAGS."""
    given = {"TRACEPARENT": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", TAGS_ENV: '{"isolation": {"a": 1}}'}
    env = _in_fresh_context(lambda: ctxprop.subprocess_env(given))
    assert env["TRACEPARENT"] == given["TRACEPARENT"]
    assert TAGS_ENV not in env
    assert _in_fresh_context(ctxprop.subprocess_env)["PATH"] == os.environ["PATH"]


def test_adopt_environment_continues_the_trace_and_restores_tags() -> None:
    """adopt_environment() attaches the parent's span context and sets the tags on the scopes."""
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    environ = {
        "TRACEPARENT": tp,
        "BAGGAGE": "tenant=acme",
        TAGS_ENV: json.dumps({"isolation": {"job": "j", "ids": [1, 2]}, "current": {"step": "s"}}),
    }

    def go() -> tuple[trace.SpanContext, dict[str, Any], dict[str, Any], dict[str, object]]:
        adopt_environment(environ)
        return (
            trace.get_current_span().get_span_context(),
            dict(ctxprop.get_isolation_scope().tags),
            dict(ctxprop.get_current_scope().tags),
            dict(baggage.get_all()),
        )

    ctx, iso, cur, bag = _in_fresh_context(go)
    assert (ctx.trace_id, ctx.span_id, ctx.is_remote) == (int("a" * 32, 16), int("b" * 16, 16), True)
    assert iso == {"job": "j", "ids": (1, 2)}
    assert cur == {"step": "s"}
    assert bag == {"tenant": "acme"}


def test_adopt_environment_ignores_malformed_variables() -> None:
    """Garbage in TRACEPARENT or CTXPROP_TAGS never raises: no parent, no tags, an error counted."""

    def go() -> tuple[bool, dict[str, Any]]:
        adopt_environment({"TRACEPARENT": "garbage", TAGS_ENV: "{not json"})
        adopt_environment({TAGS_ENV: json.dumps({"isolation": {"bad": {"nested": 1}, "ok": 1}})})
        return trace.get_current_span().get_span_context().is_valid, dict(ctxprop.get_isolation_scope().tags)

    valid, tags = _in_fresh_context(go)
    assert not valid
    assert tags == {"ok": 1}
    assert ctxprop.stats()["adopt_errors"] == 1
    assert ctxprop.stats()["invalid_tags"] == 1


def test_python_child_started_with_subprocess_env_continues_the_trace(
    receiver: OTLPReceiver,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A real Python child started by run_subprocess() calls init(): its spans reach the collector as
    children of the parent's span, in the same trace, with the parent's tags and baggage."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ctxprop.init(
        endpoint=receiver.endpoint, service_name="parent", spool_dir=str(tmp_path / "p"), handle_signals=False
    )

    def go() -> tuple[subprocess.CompletedProcess[str], trace.SpanContext]:
        ctxprop.set_tag("job", "nightly")
        otel_context.attach(baggage.set_baggage("tenant", "acme"))
        with trace.get_tracer("parent").start_as_current_span("spawn-child") as span:
            env = child_env({"RX": receiver.endpoint, "SPOOL": str(tmp_path / "c")})
            done = run_subprocess(
                [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60
            )
            return done, span.get_span_context()

    done, parent = _in_fresh_context(go)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {
        "tags": {"job": "nightly"},
        "baggage": {"tenant": "acme"},
        "trace_id": f"{parent.trace_id:032x}",
    }
    assert receiver.wait_for_spans(2, 30)
    spans = {s.name: s for s in receiver.spans}
    work = spans["child-work"]
    assert work.trace_id == f"{parent.trace_id:032x}"
    assert work.parent_span_id == f"{parent.span_id:016x}"
    assert work.service_name == "child"
    assert work.attributes["job"] == "nightly"
    assert spans["child-inner"].parent_span_id == work.span_id


def test_popen_with_context_passes_every_keyword_through(tmp_path: Path) -> None:
    """popen_with_context() is Popen with the context env; cwd, stdout and text pass through unchanged."""
    ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False)

    def go() -> tuple[str, str]:
        with trace.get_tracer("t").start_as_current_span("p") as span:
            code = "import os; print(os.getcwd(), os.environ['TRACEPARENT'])"
            with popen_with_context(
                [sys.executable, "-c", code], cwd=str(tmp_path), stdout=subprocess.PIPE, text=True
            ) as proc:
                out, _ = proc.communicate(timeout=60)
            return out, f"{span.get_span_context().span_id:016x}"

    out, span_id = _in_fresh_context(go)
    cwd, traceparent = out.split()
    assert Path(cwd) == tmp_path.resolve()
    assert traceparent.split("-")[2] == span_id
