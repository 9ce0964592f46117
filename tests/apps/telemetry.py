"""Telemetry set-up shared by the test apps, the way their users write it.

``APP_TELEMETRY=ctxprop``: ``ctxprop.init()`` and ``ctxprop.instrument()``. ``APP_TELEMETRY=stock``: the
OpenTelemetry SDK's own ``BatchSpanProcessor`` to the same collector, the baseline without ctxprop.
``APP_TELEMETRY=zero-code``: nothing in the app; ``opentelemetry-instrument`` set it all up (the app still
sets its scope tags with ctxprop).
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace

MODE = os.environ.get("APP_TELEMETRY", "ctxprop")


def setup(service_name: str) -> None:
    """Set up the global provider for ``MODE``."""
    if MODE == "zero-code":
        return
    if MODE == "ctxprop":
        import ctxprop

        ctxprop.init(endpoint=os.environ["APP_ENDPOINT"], service_name=service_name)
        ctxprop.instrument()
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=os.environ["APP_ENDPOINT"])))
    trace.set_tracer_provider(provider)


def set_tag(key: str, value: str) -> None:
    """A scope tag with ctxprop (an attribute of every span started after it); nothing without it."""
    if MODE in ("ctxprop", "zero-code"):
        import ctxprop

        ctxprop.set_tag(key, value)


def isolation_scope() -> Any:
    """``ctxprop.isolation_scope()`` per request with ctxprop; nothing without it."""
    if MODE in ("ctxprop", "zero-code"):
        import ctxprop

        return ctxprop.isolation_scope()
    import contextlib

    return contextlib.nullcontext()


def ids(span: trace.Span | None = None) -> dict[str, str]:
    """The trace and span ids of ``span`` (default: the current one) in hex, for the answer's body."""
    ctx = (span or trace.get_current_span()).get_span_context()
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}
