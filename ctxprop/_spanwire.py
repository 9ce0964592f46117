"""Finished spans to a picklable form and back, so a worker process can ship its spans to its parent.

A ``ReadableSpan`` holds SDK objects (``SpanContext``, ``Resource``, bounded attribute maps, ``Status``)
that do not all pickle, and pickling them would tie the two processes to one SDK version's private
layout. The wire form is plain tuples of ints, strings and attribute dicts: everything the exporters read
(ids, parent, name, kind, timestamps, attributes, events, links, status, resource, instrumentation scope).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

__all__ = ["WireSpan", "from_wire", "to_wire"]

#: The picklable form of one span (a tuple: cheap to pickle, no class to import on the other side).
WireSpan = tuple[Any, ...]

_VERSION = 1


def _ctx(sc: SpanContext | None) -> tuple[int, int, bool, int, tuple[tuple[str, str], ...]] | None:
    if sc is None:
        return None
    return (sc.trace_id, sc.span_id, sc.is_remote, int(sc.trace_flags), tuple(sc.trace_state.items()))


def _unctx(raw: Sequence[Any] | None) -> SpanContext | None:
    if raw is None:
        return None
    trace_id, span_id, is_remote, flags, state = raw
    return SpanContext(
        trace_id, span_id, is_remote=is_remote, trace_flags=TraceFlags(flags), trace_state=TraceState(state)
    )


def _attrs(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    # BoundedAttributes and MappingProxy do not pickle the same way everywhere; a dict always does.
    return dict(attrs) if attrs else {}


def to_wire(span: ReadableSpan) -> WireSpan:
    """The picklable form of a finished span.

    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    >>> exporter = InMemorySpanExporter()
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(SimpleSpanProcessor(exporter))
    >>> provider.get_tracer("doc").start_span("job", attributes={"n": 1}).end()
    >>> from_wire(to_wire(exporter.get_finished_spans()[0])).attributes["n"]
    1

    .. versionadded:: 0.1.0
    """
    scope = span.instrumentation_scope
    resource = span.resource
    return (
        _VERSION,
        span.name,
        _ctx(span.context),
        _ctx(span.parent),
        int(span.kind.value),
        span.start_time,
        span.end_time,
        _attrs(span.attributes),
        tuple((e.name, _attrs(e.attributes), e.timestamp) for e in span.events),
        tuple((_ctx(link.context), _attrs(link.attributes)) for link in span.links),
        (int(span.status.status_code.value), span.status.description),
        (_attrs(resource.attributes), resource.schema_url) if resource is not None else None,
        (
            (scope.name, scope.version, scope.schema_url, _attrs(scope.attributes))
            if scope is not None
            else None
        ),
    )


def from_wire(wire: WireSpan, *, resource: Resource | None = None) -> ReadableSpan:
    """Rebuild a ``ReadableSpan`` from :func:`to_wire`'s form.

    ``resource`` replaces the shipped one (the parent process passes its own, so worker spans carry
    exactly the resource of the parent's other spans).

    .. versionadded:: 0.1.0
    """
    (
        version,
        name,
        context,
        parent,
        kind,
        start,
        end,
        attributes,
        events,
        links,
        status,
        wire_resource,
        scope,
    ) = wire
    if version != _VERSION:
        raise ValueError(f"unknown span wire version {version!r}")
    if resource is None and wire_resource is not None:
        resource = Resource(wire_resource[0], wire_resource[1])
    code, description = status
    status_code = StatusCode(code)
    return ReadableSpan(
        name=name,
        context=_unctx(context),
        parent=_unctx(parent),
        resource=resource,
        attributes=attributes,
        events=tuple(Event(ev_name, ev_attrs, timestamp=ts) for ev_name, ev_attrs, ts in events),
        links=tuple(Link(_unctx(ctx), attrs) for ctx, attrs in links),  # type: ignore[arg-type]
        kind=SpanKind(kind),
        status=Status(status_code, description if status_code is StatusCode.ERROR else None),
        start_time=start,
        end_time=end,
        instrumentation_scope=InstrumentationScope(scope[0], scope[1], scope[2], scope[3])
        if scope is not None
        else None,
    )
