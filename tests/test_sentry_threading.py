"""instrument() beside Sentry's default ThreadingIntegration, in either order, against the real sentry-sdk.

Sentry patches ``Thread.start`` once per process and forever, so each case runs in a child process of its
own, with a transport that keeps events in memory and prints what the threads saw as a JSON line.
"""

from __future__ import annotations

from typing import Any

import pytest
from support import run_child

# Each child's Sentry: a transport that keeps the events in memory (nothing leaves the process), read at
# the end through ``transport.events``.
SENTRY_TRANSPORT = """
import sentry_sdk
from sentry_sdk.transport import Transport


class ListTransport(Transport):
    def __init__(self):
        super().__init__()
        self.events = []

    def capture_envelope(self, envelope):
        event = envelope.get_event()
        if event is not None:
            self.events.append(event)


transport = ListTransport()
"""

CHILD = SENTRY_TRANSPORT + """
import contextvars, json, threading
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxprop

ORDER = {order!r}
ADAPTER = {adapter!r}
REQUEST = contextvars.ContextVar("request", default="-")


def sentry_on():
    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        transport=transport,
        auto_enabling_integrations=False,  # the default integrations stay: ThreadingIntegration among them
        integrations=[ctxprop.CtxpropIntegration()] if ADAPTER else [],
    )


if ORDER == "instrument-first":
    ctxprop.instrument()
    sentry_on()
else:
    sentry_on()
    ctxprop.instrument()
exporter = InMemorySpanExporter()
ctxprop.init(exporter=exporter, handle_signals=False)
threading.excepthook = lambda args: None  # the failing thread below: its traceback is not the point


def seen(label):
    span = trace.get_current_span().get_span_context()
    sentry_sdk.set_tag("written_by", label)  # must stay in this thread's own Sentry scope
    ctxprop.set_tag("written_by", label)
    sentry_sdk.capture_message(label)
    return {{
        "ctxprop": dict(ctxprop.get_isolation_scope().tags),
        "request": REQUEST.get(),
        "span": format(span.span_id, "016x") if span.is_valid else None,
    }}


class Worker(threading.Thread):
    def run(self):
        out["subclass"] = seen("subclass")


def fail():
    sentry_sdk.set_tag("before_raise", "yes")
    raise ValueError("thread failed")


out = {{}}
with sentry_sdk.isolation_scope(), ctxprop.isolation_scope():
    sentry_sdk.set_tag("req", "r-1")
    ctxprop.set_tag("tenant", "acme")
    REQUEST.set("r-1")
    with trace.get_tracer("t").start_as_current_span("parent") as parent:
        out["parent"] = format(parent.get_span_context().span_id, "016x")
        threads = [
            threading.Thread(target=lambda: out.__setitem__("target", seen("target"))),
            Worker(),
            threading.Thread(target=fail),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        with ThreadPoolExecutor(max_workers=1) as pool:
            out["pool"] = pool.submit(seen, "pool").result(30)
    out["parent_sentry_tags"] = dict(sentry_sdk.get_isolation_scope()._tags)
    out["parent_ctxprop_tags"] = dict(ctxprop.get_isolation_scope().tags)
sentry_sdk.flush(10)
events = {{}}
for event in transport.events:
    if event.get("message"):
        events[event["message"]] = event.get("tags", {{}})
    else:
        for exc in event.get("exception", {{}}).get("values", []):
            events["exception:" + exc["value"]] = {{
                "tags": event.get("tags", {{}}),
                "mechanism": exc.get("mechanism", {{}}).get("type"),
            }}
out["events"] = events
out["alive"] = [t.is_alive() for t in threads]
print(json.dumps(out), flush=True)
"""


def _run(order: str, adapter: bool) -> dict[str, Any]:
    result = run_child(CHILD.format(order=order, adapter=adapter), timeout=90)
    assert result.returncode == 0, result.stderr
    assert "TypeError" not in result.stderr, result.stderr
    assert result.json_lines, result.stderr
    out: dict[str, Any] = result.json_lines[-1]
    return out


@pytest.mark.parametrize(
    "adapter", [True, False], ids=["with-CtxpropIntegration", "ThreadingIntegration-only"]
)
@pytest.mark.parametrize("order", ["instrument-first", "sentry-first"])
def test_threads_see_everything_beside_threading_integration(order: str, adapter: bool) -> None:
    """Plain threads, Thread subclasses and pool tasks see the ctxprop tags, the application ContextVar,
    the OTel span and Sentry's scope data whichever of instrument() and sentry_sdk.init() came first; what a
    thread sets stays in it, and ThreadingIntegration still captures a thread's exception with its scope."""
    out = _run(order, adapter)
    for label in ("target", "subclass", "pool"):
        assert out[label] == {"ctxprop": {"tenant": "acme", "written_by": label}, "request": "r-1",
                              "span": out["parent"]}, label
        assert out["events"][label] == {"req": "r-1", "written_by": label}, label
    assert out["parent_sentry_tags"] == {"req": "r-1"}
    assert out["parent_ctxprop_tags"] == {"tenant": "acme"}
    failed = out["events"]["exception:thread failed"]
    assert failed == {"tags": {"req": "r-1", "before_raise": "yes"}, "mechanism": "threading"}
    assert out["alive"] == [False, False, False]


UNINSTRUMENT_CHILD = SENTRY_TRANSPORT + """
import contextvars, json, threading
import ctxprop

ORDER = {order!r}
REQUEST = contextvars.ContextVar("request", default="-")

original = threading.Thread.start
if ORDER == "instrument-first":
    ctxprop.instrument()
sentry_sdk.init(dsn="http://public@127.0.0.1:9/1", transport=transport, auto_enabling_integrations=False)
if ORDER == "sentry-first":
    ctxprop.instrument()
ctxprop.uninstrument()
threading.excepthook = lambda args: None
REQUEST.set("r-1")
sentry_sdk.set_tag("req", "r-1")
got = []
t = threading.Thread(target=lambda: got.append(REQUEST.get()))
t.start(); t.join(30)
f = threading.Thread(target=lambda: 1 / 0)
f.start(); f.join(30)
sentry_sdk.flush(10)
print(json.dumps({{
    "sentry_patch_kept": threading.Thread.start is not original,
    "request_in_thread": got,
    "captured": [
        (e.get("tags", {{}}), e["exception"]["values"][0]["mechanism"]["type"])
        for e in transport.events if e.get("exception")
    ],
}}), flush=True)
"""


@pytest.mark.parametrize("order", ["instrument-first", "sentry-first"])
def test_uninstrument_leaves_sentrys_thread_patch_in_place(order: str) -> None:
    """After uninstrument(), Sentry's own Thread.start patch is still there and still captures a thread's
    exception with the starter's Sentry tags, while ctxprop no longer carries other ContextVars."""
    result = run_child(UNINSTRUMENT_CHILD.format(order=order), timeout=90)
    assert result.returncode == 0, result.stderr
    out = result.json_lines[-1]
    assert out["sentry_patch_kept"] is True
    assert out["request_in_thread"] == ["-"]
    assert out["captured"] == [[{"req": "r-1"}, "threading"]]
