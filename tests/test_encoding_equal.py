"""ctxprop's encoder writes the same bytes as the official one, span shape by span shape.

Equal bytes imply equal decoded messages (and are stricter: field order, presence of empty messages).
Hand-picked cases cover each item of the OTLP span model; hypothesis generates the rest. Shapes the
hand-written path writes itself are also checked to stay on it (not just to be equal through the
fallback), and shapes it leaves to the official encoder are checked to take the fallback.

Every comparison is made twice: the spans encoded as they are, and what the processor's queue holds for
them as the SDK ends them (``_encoding.record`` of ``support.ended(span)``: a snapshot, written by
``snapshot_field``, or by the official encoder from the span rebuilt from it), so both ways to the wire
are held to the official bytes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from support import ended

from ctxprop import _encoding, _otlp_wire
from ctxprop._encoding import encode_fast, encode_official

I64_MAX = (1 << 63) - 1
I64_MIN = -(1 << 63)
RESOURCE = Resource({"service.name": "svc", "host": "h\u00e9"})
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
SCOPE = InstrumentationScope("lib", "1.0")


def span(**kw: Any) -> ReadableSpan:
    """A finished span with sensible defaults, any field overridable."""
    kw.setdefault("name", "op")
    kw.setdefault(
        "context", SpanContext(0x0123456789ABCDEF0123456789ABCDEF, 0x1122334455667788, False, SAMPLED)
    )
    kw.setdefault("resource", RESOURCE)
    kw.setdefault("instrumentation_scope", SCOPE)
    kw.setdefault("start_time", 1_700_000_000_000_000_000)
    kw.setdefault("end_time", 1_700_000_000_000_500_000)
    return ReadableSpan(**kw)


def queued(spans: Sequence[ReadableSpan]) -> list[_encoding.Queued]:
    """What the processor's queue holds for these spans, ended as the SDK ends them: all snapshots."""
    _encoding.prepare()
    records = [_encoding.record(ended(s)) for s in spans]
    assert all(r.__class__ is tuple for r in records), "every span the SDK ends is snapshotted"
    return records


def assert_same(spans: Sequence[ReadableSpan]) -> None:
    """Our bytes equal the official encoder's (so do the decoded messages), every span counted: from the
    spans, and from what the queue holds for them."""
    ours = encode_fast(spans)
    official = encode_spans(spans).SerializeToString()
    assert ours.payload == official
    assert (ours.spans, ours.dropped) == (len(spans), 0)
    from_queue = encode_fast(queued(spans))
    assert from_queue.payload == encode_spans([ended(s) for s in spans]).SerializeToString()
    assert (from_queue.spans, from_queue.dropped) == (len(spans), 0)
    ours_msg, official_msg = ExportTraceServiceRequest(), ExportTraceServiceRequest()
    ours_msg.ParseFromString(ours.payload)
    official_msg.ParseFromString(official)
    if not _has_nan(spans):  # NaN != NaN, in messages as in floats
        assert ours_msg == official_msg


def _has_nan(spans: Sequence[ReadableSpan]) -> bool:
    def nan(v: Any) -> bool:
        if isinstance(v, float):
            return math.isnan(v)
        return isinstance(v, (tuple, list)) and any(nan(x) for x in v)

    return any(nan(v) for s in spans for v in (s.attributes or {}).values())


def assert_fast_path(s: ReadableSpan) -> None:
    """The hand-written path writes this span itself, byte for byte as the official encoder, and so it
    does the snapshot of the span as the SDK ends it."""
    assert _otlp_wire.calibrate()
    official = _otlp_wire.official_span_field(s)
    assert _otlp_wire.span_field(s) == official
    sdk = ended(s)
    snap = _otlp_wire.snapshot(sdk)
    assert snap is not None
    assert _otlp_wire.snapshot_field(snap) == _otlp_wire.official_span_field(sdk)


def assert_fallback(s: ReadableSpan) -> None:
    """The hand-written path leaves this span to the official encoder, and the batch is still equal."""
    assert _otlp_wire.calibrate()
    with pytest.raises(Exception):  # noqa: B017, PT011 - Unsupported or the str's UnicodeEncodeError
        _otlp_wire.span_field(s)
    assert_same([span(name="before"), s, span(name="after")])


ATTRIBUTE_VALUES: list[Any] = [
    "text",
    "",
    "\u00e9t\u00e9 \u4e2d\u6587 \U0001f600",
    "x" * 300,
    True,
    False,
    0,
    1,
    -1,
    127,
    128,
    I64_MAX,
    I64_MIN,
    0.0,
    -0.0,
    1.5,
    -2.25e-300,
    1e308,
    math.inf,
    -math.inf,
    math.nan,
    b"",
    b"\x00\xff bytes",
    ("a", "", "\u00e9"),
    (True, False),
    (0, -1, I64_MAX, I64_MIN),
    (1.5, -0.0, math.inf),
    (b"a", b""),
    (),
    ["list", "of", "str"],
    ("a", None),
    (None,),
    ("mixed", 1, 2.5, True),
    ((1, 2), ("nested",)),
]


# Each key length puts a float or int KeyValue's length just under, at or over 127, where its length
# prefix grows from one byte to two; each int is on one side of the small-int cache's bound, or of a varint
# byte boundary.
KEY_LENGTHS = [0, 1, 114, 115, 116, 117, 200]
NUMBERS: list[Any] = [0, 1023, 1024, 1025, 16383, 16384, -1, -1024, I64_MAX, I64_MIN, 0.5, -math.inf, 1e-310]


@pytest.mark.parametrize("length", KEY_LENGTHS)
def test_number_attributes_at_length_and_cache_bounds(length: int) -> None:
    """Ints and floats are written inline or from the per-key caches; every combination, twice (cold, then
    warm), matches the official encoder byte for byte."""
    key = "k" * length
    for _ in range(2):
        for value in NUMBERS:
            s = span(attributes={key: value, key + "\u00e9": value})
            assert_fast_path(s)
            assert_same([s])


@pytest.mark.parametrize("value", ATTRIBUTE_VALUES, ids=repr)
def test_attribute_types_equal_and_on_fast_path(value: Any) -> None:
    """Every attribute type (and sequences of each) encodes as the official encoder does, on the fast path."""
    s = span(attributes={"k": value, "\u00e9": value, "": value})
    if _varies_by_version(value):
        assert_fallback(s)  # the installed official encoder writes it otherwise (or drops it)
    else:
        assert_fast_path(s)
    assert_same([s, span(attributes={"again": value})])


def _varies_by_version(value: Any) -> bool:
    """Values the official encoder writes differently across versions (None in a sequence, bytes)."""
    assert _otlp_wire.calibrate()
    features = _otlp_wire._features  # what calibration found
    if isinstance(value, (tuple, list)):
        return any(_varies_by_version(v) for v in value) or (None in value and not features.none_in_sequences)
    return isinstance(value, bytes) and not features.bytes_values


class Color(enum.IntEnum):
    """An int subclass: left to the official encoder."""

    RED = 1


@pytest.mark.parametrize(
    "attributes",
    [
        {"big": I64_MAX + 1},
        {"small": I64_MIN - 1},
        {"huge": 1 << 100},
        {"enum": Color.RED},
        {"map": {"a": 1, "b": ("x",)}},
        {"none": None},
        {"obj": object()},
        {"bytearray": bytearray(b"ab")},
        {"surrogate value": "x\ud800"},
        {"surrogate\udfff key": "v"},
        {"in a sequence": ("ok", "\ud800")},
        {1: "non-str key"},
    ],
    ids=repr,
)
def test_exotic_attributes_take_the_fallback(attributes: dict[Any, Any]) -> None:
    """What the fast path cannot write exactly goes through the official encoder, equal bytes still."""
    assert_fallback(span(attributes={"before": 1, **attributes, "after": 2}))


@pytest.mark.parametrize("kind", list(SpanKind))
@pytest.mark.parametrize(
    "status",
    [
        Status(StatusCode.UNSET),
        Status(StatusCode.OK),
        Status(StatusCode.ERROR),
        Status(StatusCode.ERROR, "it broke: \u00e9"),
        Status(StatusCode.ERROR, ""),
    ],
    ids=lambda s: f"{s.status_code.name}:{s.description!r}",
)
def test_every_kind_and_status(kind: SpanKind, status: Status) -> None:
    """Each kind and status (with and without a description) encodes equally, on the fast path."""
    s = span(kind=kind, status=status)
    assert_fast_path(s)
    assert_same([s])


@pytest.mark.parametrize(
    "parent",
    [
        None,
        SpanContext(1, 2, False),
        SpanContext(1, 2, True),
        SpanContext(1, 2, True, trace_state=TraceState([("a", "b")])),
    ],
    ids=["root", "local parent", "remote parent", "remote parent with trace_state"],
)
def test_parents_and_flags(parent: SpanContext | None) -> None:
    """Root spans, local and remote parents: parent_span_id and the flags field's remote bits."""
    s = span(parent=parent)
    assert_fast_path(s)
    assert_same([s])


@pytest.mark.parametrize(
    "trace_state",
    [None, TraceState(), TraceState([("vendor", "v1")]), TraceState([("a", "1"), ("b@tenant", "x=y")])],
    ids=repr,
)
def test_trace_state(trace_state: TraceState | None) -> None:
    """The span's trace_state is written as the official encoder writes it ('k=v' joined by commas)."""
    s = span(context=SpanContext(5, 6, False, trace_state=trace_state))
    assert_fast_path(s)
    assert_same([s])


def test_events_and_links_with_attributes() -> None:
    """Events (names, times, attributes) and links (local, remote, trace_state, attributes)."""
    events = [
        Event("e1", {"a": 1, "s": "\u00e9", "seq": (1.5, 2.5)}, timestamp=1_700_000_000_000_000_123),
        Event("", None, timestamp=0),
        Event("\u4e2d", {}, timestamp=1),
    ]
    links = [
        Link(SpanContext(7, 8, False), {"l": "v", "n": -5}),
        Link(SpanContext(9, 10, True, trace_state=TraceState([("k", "v")]))),
        Link(SpanContext(11, 12, False), None),
    ]
    s = span(events=events, links=links)
    assert_fast_path(s)
    assert_same([s])


def test_times_absent_zero_and_extreme() -> None:
    """Unset and zero times are omitted as the official encoder omits them; 64-bit edges are written."""
    cases = [
        span(start_time=None, end_time=None),
        span(start_time=0, end_time=0),
        span(start_time=1, end_time=(1 << 64) - 1),
        span(start_time=5, end_time=None),
    ]
    for s in cases:
        assert_fast_path(s)
    assert_same(cases)


def test_names_empty_and_non_ascii() -> None:
    """Empty and non-ASCII span names."""
    cases = [span(name=""), span(name="caf\u00e9 \u4e2d\U0001f600")]
    for s in cases:
        assert_fast_path(s)
    assert_same(cases)


def test_dropped_counts_from_real_limits() -> None:
    """Real SDK spans past their limits: dropped attribute, event and link counts, event/link attributes."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=RESOURCE,
        span_limits=SpanLimits(
            max_span_attributes=2,
            max_events=1,
            max_links=1,
            max_event_attributes=1,
            max_link_attributes=1,
            max_attribute_length=4,
        ),
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("limits", "2.0", schema_url="https://example.com/s")
    links = [Link(SpanContext(1, 2, False), {"a": 1, "b": 2}), Link(SpanContext(3, 4, True))]
    with tracer.start_as_current_span("outer", links=links, attributes={"a": 1, "b": 2, "c": 3}) as sp:
        sp.add_event("e1", {"x": 1, "y": 2})
        sp.add_event("e2")
        sp.set_attribute("long", "truncated value")
        with tracer.start_as_current_span("inner", kind=SpanKind.CLIENT) as inner:
            inner.set_status(Status(StatusCode.ERROR, "nope"))
    spans = exporter.get_finished_spans()
    outer = next(s for s in spans if s.name == "outer")
    assert (outer.dropped_attributes, outer.dropped_events, outer.dropped_links) == (2, 1, 1)
    for s in spans:
        assert_fast_path(s)
    assert_same(spans)
    provider.shutdown()


def test_several_resources_and_scopes_in_one_batch() -> None:
    """Spans of several resources and scopes, interleaved: grouped and ordered as the official encoder."""
    r1 = Resource({"service.name": "a"}, schema_url="https://example.com/r1")
    r2 = Resource({"service.name": "b", "n": 1})
    r1_again = Resource({"service.name": "a"}, schema_url="https://example.com/r1")  # equal, not identical
    r_reordered = Resource({"n": 1, "service.name": "b"})  # equal to r2, written in another order
    s1 = InstrumentationScope("s1", "1", "https://example.com/s1", {"scope.attr": True})
    s2 = InstrumentationScope("s2")
    s1_again = InstrumentationScope("s1", "1", "https://example.com/s1", {"scope.attr": True})
    batch = [
        span(name="1", resource=r1, instrumentation_scope=s1),
        span(name="2", resource=r2, instrumentation_scope=s2),
        span(name="3", resource=r1_again, instrumentation_scope=s2),
        span(name="4", resource=r_reordered, instrumentation_scope=s1_again),
        span(name="5", resource=r1, instrumentation_scope=None),
        span(name="6", resource=r2, instrumentation_scope=s1),
        span(name="7", resource=Resource.get_empty(), instrumentation_scope=InstrumentationScope("")),
    ]
    assert_same(batch)
    assert_same(batch[::-1])
    request = ExportTraceServiceRequest()
    request.ParseFromString(encode_fast(batch).payload)
    assert len(request.resource_spans) == 3


def test_fallback_span_is_spliced_into_its_group() -> None:
    """A span left to the official encoder lands in its own resource/scope group, in order."""
    other = Resource({"service.name": "other"})
    batch = [
        span(name="a"),
        span(name="b", resource=other),
        span(name="c", attributes={"map": {"k": "v"}}),
        span(name="d", resource=other, attributes={"enum": Color.RED}),
        span(name="e"),
    ]
    assert_same(batch)


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "bad\ud800"},
        {"events": [Event("bad\udc00", timestamp=1)]},
        {"status": Status(StatusCode.ERROR, "bad\ud800")},
        {"start_time": -1},
        {"start_time": True},
        {"end_time": True},
        {"events": [Event("e", timestamp=True)]},
        {"context": SpanContext(1 << 130, 1, False)},
        {"instrumentation_scope": InstrumentationScope("bad\ud800")},
    ],
    ids=[
        "name",
        "event name",
        "status description",
        "negative time",
        "bool start time",
        "bool end time",
        "bool event time",
        "trace id too big",
        "scope name",
    ],
)
def test_unencodable_span_is_dropped_alone_by_both(bad: dict[str, Any]) -> None:
    """A span neither encoder can write is left out alone, the same by both; the rest equal."""
    batch = [span(name="a"), span(**bad), span(name="b")]
    ours, official = encode_fast(batch), encode_official(batch)
    assert ours == official
    assert (ours.spans, ours.dropped) == (2, 1)
    assert ours.payload == encode_spans([batch[0], batch[2]]).SerializeToString()


# -- property-based -----------------------------------------------------------------------------------------
SURROGATES = st.sampled_from(["\ud800", "a\udfffb"])
TEXT = st.one_of(st.text(max_size=12), st.text(st.characters(codec="utf-8"), max_size=4))
# Only what the installed official encoder writes the same way as the fast path (see calibrate()).
_otlp_wire.calibrate()
_FEATURES = _otlp_wire._features  # what calibration found
FAST_SCALARS = st.one_of(
    TEXT,
    st.booleans(),
    st.integers(I64_MIN, I64_MAX),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=8) if _FEATURES.bytes_values else st.booleans(),
)
FAST_VALUES = st.one_of(
    FAST_SCALARS,
    st.lists(st.integers(I64_MIN, I64_MAX), max_size=4).map(tuple),
    st.lists(TEXT, max_size=4).map(tuple),
    st.lists(st.floats(), max_size=3),
    st.lists(st.booleans(), max_size=3).map(tuple),
    st.lists(st.one_of(st.none(), TEXT) if _FEATURES.none_in_sequences else TEXT, max_size=3).map(tuple),
    st.lists(FAST_SCALARS, max_size=3).map(tuple),
)
# Besides: what only the official encoder writes (out-of-range ints, mappings, surrogates).
ANY_VALUES = st.one_of(
    FAST_VALUES, st.integers(), SURROGATES, st.builds(lambda v: {"nested": v}, FAST_SCALARS)
)
IDS = st.tuples(st.integers(0, (1 << 128) - 1), st.integers(0, (1 << 64) - 1))
TRACE_STATES = st.one_of(
    st.none(),
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9_\-*/]{0,8}", fullmatch=True),
            st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
        ),
        max_size=3,
        unique_by=lambda kv: kv[0],
    ).map(TraceState),
)
CONTEXTS = st.builds(
    lambda ids, remote, ts: SpanContext(ids[0], ids[1], remote, trace_state=ts),
    IDS,
    st.booleans(),
    TRACE_STATES,
)
RESOURCES = st.sampled_from(
    [
        RESOURCE,
        Resource({"service.name": "svc", "host": "h\u00e9"}),  # equal to RESOURCE, another object
        Resource({"service.name": "other", "pid": 42}, schema_url="https://example.com/1"),
        Resource.get_empty(),
    ]
)
SCOPES = st.sampled_from(
    [
        SCOPE,
        InstrumentationScope("lib", "1.0"),
        InstrumentationScope("other", None, "https://example.com/s", {"k": "v"}),
        None,
    ]
)
TIMES = st.one_of(st.none(), st.integers(0, (1 << 64) - 1))


def spans_of(values: st.SearchStrategy[Any], text: st.SearchStrategy[str]) -> st.SearchStrategy[ReadableSpan]:
    """Spans whose attribute values (span, events, links) and texts come from these strategies."""
    attributes = st.one_of(st.none(), st.dictionaries(text, values, max_size=3))
    events = st.builds(Event, text, attributes, st.one_of(st.none(), st.integers(0, (1 << 64) - 1)))
    return st.builds(
        ReadableSpan,
        name=text,
        context=CONTEXTS,
        parent=st.one_of(st.none(), CONTEXTS),
        resource=RESOURCES,
        attributes=attributes,
        events=st.lists(events, max_size=2),
        links=st.lists(st.builds(Link, CONTEXTS, attributes), max_size=2),
        kind=st.sampled_from(list(SpanKind)),
        status=st.builds(Status, st.sampled_from(list(StatusCode)), st.one_of(st.none(), text)),
        start_time=TIMES,
        end_time=TIMES,
        instrumentation_scope=SCOPES,
    )


@settings(max_examples=120, deadline=None)
@given(st.lists(spans_of(FAST_VALUES, TEXT), min_size=1, max_size=4))
def test_property_fast_path_writes_official_bytes(batch: list[ReadableSpan]) -> None:
    """Any batch of ordinary spans: written by the fast path itself, bytes equal to the official encoder's."""
    for s in batch:
        assert_fast_path(s)
    official = encode_spans(batch).SerializeToString()
    assert encode_fast(batch).payload == official
    assert encode_fast(queued(batch)).payload == encode_spans([ended(s) for s in batch]).SerializeToString()


@settings(max_examples=120, deadline=None)
@given(st.lists(spans_of(ANY_VALUES, st.one_of(TEXT, SURROGATES)), min_size=1, max_size=4))
def test_property_batches_equal_official_per_span_fallback(batch: list[ReadableSpan]) -> None:
    """Any batch, exotic values and unencodable text included: payload and counts as the official path's."""
    ours, official = encode_fast(batch), encode_official(batch)
    assert ours.payload == official.payload
    assert (ours.spans, ours.dropped) == (official.spans, official.dropped)
    from_queue, official_queue = encode_fast(queued(batch)), encode_official([ended(s) for s in batch])
    assert from_queue.payload == official_queue.payload
    assert (from_queue.spans, from_queue.dropped) == (official_queue.spans, official_queue.dropped)
    if not official.dropped:
        assert ours.payload == encode_spans(batch).SerializeToString()


class _OwnEvents(ReadableSpan):
    """A span that keeps its events and links elsewhere than ReadableSpan's private lists."""

    def __init__(self, **kw: Any) -> None:
        events, links = kw.pop("events"), kw.pop("links")
        super().__init__(**kw)
        del self._events, self._links
        self._mine = tuple(events), tuple(links)

    @property
    def events(self) -> Sequence[Event]:
        """The events, from this class's own storage."""
        return self._mine[0]

    @property
    def links(self) -> Sequence[Link]:
        """The links, from this class's own storage."""
        return self._mine[1]

    @property
    def dropped_events(self) -> int:
        """None dropped."""
        return 0

    @property
    def dropped_links(self) -> int:
        """None dropped."""
        return 0


def test_events_and_links_without_the_private_lists() -> None:
    """The emptiness shortcut on ReadableSpan's private lists falls back to the public properties."""
    s = _OwnEvents(
        name="own",
        context=SpanContext(1, 2, False),
        resource=RESOURCE,
        events=[Event("e", {"a": 1}, timestamp=3)],
        links=[Link(SpanContext(4, 5, True), {"b": "c"})],
    )
    assert not hasattr(s, "_events")
    assert_fast_path(s)
    assert_same([s])
    request = ExportTraceServiceRequest()
    request.ParseFromString(encode_fast([s]).payload)
    (got,) = request.resource_spans[0].scope_spans[0].spans
    assert [e.name for e in got.events] == ["e"]
    assert len(got.links) == 1


ORDINARY = {"route": "/items/{id}", "n": 7, "big": I64_MIN, "ratio": 0.25, "ok": True, "\u00e9": "\u4e2d"}


@pytest.mark.parametrize(
    ("why", "kw"),
    [
        ("an event", {"events": [Event("e", {"k": 1}, timestamp=5)]}),
        ("a link", {"links": [Link(SpanContext(1, 2, True), {"k": "v"})]}),
        ("a trace_state", {"context": SpanContext(1, 2, False, trace_state=TraceState([("v", "1")]))}),
        ("a sequence value", {"attributes": {"tags": ("a", "b")}}),
        ("a bytes value", {"attributes": {"blob": b"\x00"}}),
        ("a mapping value", {"attributes": {"m": {"k": "v"}}}),
        ("a None value", {"attributes": {"n": None}}),
        ("an int subclass", {"attributes": {"code": Color.RED}}),
        ("an int past int64", {"attributes": {"huge": I64_MAX + 1}}),
        ("a lone surrogate in a value", {"attributes": {"k": "x\ud800"}}),
        ("a lone surrogate in a key", {"attributes": {"x\ud800": "v"}}),
        ("a lone surrogate in the name", {"name": "x\ud800"}),
        ("a lone surrogate in the status", {"status": Status(StatusCode.ERROR, "x\ud800")}),
        ("a float start time", {"start_time": 1.5}),
        ("a bool end time", {"end_time": True}),
        ("a trace id past 128 bits", {"context": SpanContext(1 << 130, 1, False)}),
    ],
)
def test_whatever_an_ended_span_holds_it_is_snapshotted_and_written_as_the_official_path(
    why: str, kw: dict[str, Any]
) -> None:
    """Every span the SDK ends is snapshotted, whatever it holds (here: {why}): nothing is checked on
    the thread that ends it. What the fast path cannot write, the export thread finds, and the official
    encoder writes the span rebuilt from the snapshot, or drops it alone as the official path does."""
    plain, odd = ended(span(attributes=ORDINARY)), ended(span(**kw))
    _encoding.prepare()
    assert _encoding.record(odd).__class__ is tuple, why
    batch = [plain, odd, ended(span(name="after", attributes=ORDINARY))]
    ours, official = encode_fast([_encoding.record(s) for s in batch]), encode_official(batch)
    assert ours.payload == official.payload
    assert (ours.spans, ours.dropped) == (official.spans, official.dropped)
    # And the rebuilt span is the span, to the official encoder.
    rebuilt = _otlp_wire.snapshot_span(_encoding.record(odd))  # type: ignore[arg-type]
    assert encode_official([rebuilt]) == encode_official([odd])


def test_spans_not_kept_as_the_sdk_keeps_them_are_queued_as_themselves() -> None:
    """A ReadableSpan built by hand (a plain dict of attributes, lists of events), a subclass, or any other
    span class is queued as itself and written from its public properties; its batch is still equal."""
    _encoding.prepare()
    by_hand = span(attributes=dict(ORDINARY), events=[Event("e", timestamp=1)])
    sub = _OwnEvents(
        name="own", context=SpanContext(1, 2, False, SAMPLED), resource=RESOURCE, events=[], links=[]
    )
    for s in (by_hand, sub):
        assert _encoding.record(s) is s
    batch = [ended(span()), by_hand, sub, ended(span(name="z"))]
    queued_batch = [_encoding.record(s) for s in batch]
    assert [q.__class__ is tuple for q in queued_batch] == [True, False, False, True]
    assert encode_fast(queued_batch) == encode_official(batch)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"attributes": ORDINARY},
        {"kind": SpanKind.CONSUMER, "status": Status(StatusCode.ERROR, "d\u00e9")},
        {"status": Status(StatusCode.OK)},
        {"parent": SpanContext(1, 3, True)},
        {"parent": SpanContext(1, 3, False), "name": ""},
        {"start_time": 0, "end_time": 7},
        {"start_time": 7, "end_time": 0},
    ],
)
def test_ordinary_spans_are_snapshots_written_as_the_official_encoder_writes_them(kw: dict[str, Any]) -> None:
    """Roots and children, remote and local parents, statuses with and without a description, empty
    names and missing times: snapshotted, and written byte for byte as the official encoder."""
    s = ended(span(**kw))
    snap = _otlp_wire.snapshot(s)
    assert snap is not None
    assert _otlp_wire.snapshot_field(snap) == _otlp_wire.official_span_field(s)


# -- the guard on the SDK's private layout -------------------------------------------------------------------
class _ContextElsewhere(ReadableSpan):
    """A span of an SDK that would keep its context under another private name."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._moved = self._context
        del self._context

    @property
    def context(self) -> SpanContext:
        """The context, from where this SDK keeps it."""
        return self._moved  # type: ignore[return-value]


class _StaleName(ReadableSpan):
    """A span of an SDK whose name property would no longer read ``_name`` (which holds a stale value)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._display_name, self._name = self._name, "stale"

    @property
    def name(self) -> str:
        """The name, from where this SDK keeps it."""
        return self._display_name


@pytest.mark.parametrize("layout", [_ContextElsewhere, _StaleName], ids=["missing field", "stale field"])
def test_a_span_layout_the_snapshot_does_not_know_turns_snapshots_off(layout: type) -> None:
    """calibrate()'s guard compares each snapshot's bytes with the span's own, read through its public
    properties: a layout where a private field is missing or no longer what the property returns fails it
    (and then no span is snapshotted). The SDK's own ReadableSpan passes it."""
    attributes = {"s": "v", "i": 1, "f": 0.5, "b": True, "seq": ("a",)}
    assert _otlp_wire.snapshots_match(ReadableSpan, attributes)
    assert not _otlp_wire.snapshots_match(layout, attributes)
    assert _otlp_wire.calibrate()
    assert _otlp_wire.snapshot_class is ReadableSpan


def test_with_snapshots_off_spans_are_queued_as_themselves_and_written_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other side of the guard: with snapshots off (an SDK whose layout failed the check), what the
    SDK ends is queued as itself and written through its public properties, to the same bytes."""
    assert _otlp_wire.calibrate()
    monkeypatch.setattr(_otlp_wire, "snapshot_class", None)
    batch = [
        ended(span(attributes=ORDINARY)),
        ended(span(parent=SpanContext(1, 3, True), status=Status(StatusCode.ERROR, "x"))),
        ended(span(events=[Event("e", {"k": 1}, timestamp=5)], attributes={"m": {"k": "v"}})),
        ended(span(name="bad\ud800")),
    ]
    records = [_encoding.record(s) for s in batch]
    assert all(r is s for r, s in zip(records, batch, strict=True))
    assert encode_fast(records) == encode_official(batch)
    assert encode_fast(records).dropped == 1
