"""init() after someone else set the global TracerProvider: one warning, that provider tagged once, and
flushed by ctxprop's close()."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxprop
from ctxprop import _pipeline
from ctxprop._tagging import ScopeTagSpanProcessor


def test_repeated_init_after_a_foreign_provider_tags_its_spans_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """init(), close(), init() after a foreign SDK provider: one warning per init(), the provider's spans
    carry the scope tags, and ctxprop's scope-tag processor runs once per span, not once per init()."""
    calls: list[str] = []
    original = ScopeTagSpanProcessor.on_start

    def counting(self: ScopeTagSpanProcessor, span: Any, parent_context: Any = None) -> None:
        calls.append(span.name)
        original(self, span, parent_context)

    monkeypatch.setattr(ScopeTagSpanProcessor, "on_start", counting)
    theirs = TracerProvider()
    exporter = InMemorySpanExporter()
    theirs.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(theirs)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="OTEL_PYTHON_CONFIGURATOR=ctxprop") as caught:
            ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False)
        assert len(caught) == 1
        ctxprop.close()
    _pipeline.adopt(theirs)  # the instrumentor's path: already tagged
    with ctxprop.isolation_scope():
        ctxprop.set_tag("tenant", "acme")
        with trace.get_tracer("app").start_as_current_span("s"):
            pass
    assert calls == ["s"]
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["tenant"] == "acme"
