"""A hand-written protobuf encoder for SDK spans: the OTLP wire format, written field by field.

Each span becomes the bytes of one ``Span`` message, fields in field-number order as protobuf writes them
(so the bytes equal the official encoder's, not only the decoded message). What repeats is cached: the
encoded resource and scope of each group (taken from the official encoder itself, once per object), the
key fields of attribute names, whole key/value pairs for short strings, small ints and bools, the heads of
int and float pairs per key, and span names.

A span the SDK ended is queued as a :func:`snapshot` (a flat tuple of its parts, taken without a check
or a Python-level property call by the thread that ended it) and written by :func:`snapshot_field`, the
one writer; :func:`span_field` writes any other span by reading it into the same layout.

A span this encoder cannot write exactly raises (:class:`Unsupported` for a type it leaves to the
official encoder: a mapping, ``None``, an int subclass, an out-of-range number...; ``UnicodeEncodeError``
for a lone surrogate), and the caller encodes that span with the official encoder instead.

What differs between versions of the official encoder (the ``flags`` field, a link's ``trace_state``,
``bytes`` values, ``None`` inside a sequence) is measured once against the installed one
(:func:`calibrate`): a feature whose bytes do not match is left to the official encoder, and if the
common shapes do not match, this encoder is not used at all.

>>> from opentelemetry.sdk.trace import ReadableSpan
>>> from opentelemetry.trace import SpanContext
>>> len(span_field(ReadableSpan("op", SpanContext(1, 2, False)))) > 30
True
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import DEFAULT_TRACE_STATE as _DEFAULT_TRACE_STATE
from opentelemetry.trace import SpanKind, StatusCode

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = [
    "Unsupported",
    "calibrate",
    "length_delimited",
    "official_span_field",
    "resource_parts",
    "scope_parts",
    "snapshot",
    "snapshot_class",
    "snapshot_field",
    "snapshot_span",
    "snapshots_match",
    "span_field",
]


class Unsupported(Exception):
    """This span holds something only the official encoder writes exactly."""


_U64 = 0xFFFFFFFFFFFFFFFF
_U32 = 0xFFFFFFFF
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_BYTE = [bytes((i,)) for i in range(256)]
_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack
_times = struct.Struct("<BQBQ").pack  # start (field 7) and end (field 8), both fixed64

# Keyed by the members' ids: a dict lookup keyed by an enum member calls Enum.__hash__, a Python-level
# function on 3.11; id() is a builtin and the members are singletons.
_KIND = {
    id(SpanKind.INTERNAL): b"\x30\x01",
    id(SpanKind.SERVER): b"\x30\x02",
    id(SpanKind.CLIENT): b"\x30\x03",
    id(SpanKind.PRODUCER): b"\x30\x04",
    id(SpanKind.CONSUMER): b"\x30\x05",
}
_ids = struct.Struct(">BBQQBBQ").pack  # trace_id (field 1, 16 bytes) and span_id (field 2, 8 bytes)
_parent_id = struct.Struct(">BBQ").pack  # parent_span_id (field 4, 8 bytes)


_HIGH = [bytes((i | 0x80,)) for i in range(128)]  # a varint's byte with more to follow


def _varint(n: int) -> bytes:
    """A non-negative int as a base-128 varint. Up to four bytes (below 2**28) it is written without a
    loop: one table lookup per byte, which on 3.11 is several times cheaper than building the bytes."""
    if n < 0x80:
        return _BYTE[n]
    if n < 0x4000:
        return _HIGH[n & 0x7F] + _BYTE[n >> 7]
    if n < 0x200000:
        return _HIGH[n & 0x7F] + _HIGH[n >> 7 & 0x7F] + _BYTE[n >> 14]
    if n < 0x10000000:
        return _HIGH[n & 0x7F] + _HIGH[n >> 7 & 0x7F] + _HIGH[n >> 14 & 0x7F] + _BYTE[n >> 21]
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# The varints of lengths below this, precomputed: a span's length prefix, its name's.
_NLENGTHS = 2048
_LENGTHS = tuple(_varint(n) for n in range(_NLENGTHS))


def length_delimited(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: its tag, the body's length as a varint, the body."""
    return tag + _varint(len(body)) + body


_field = length_delimited


# -- what the installed official encoder does (see calibrate()) ----------------------------------------------
class _Features:
    usable = False  # the common shapes encode byte for byte as the official encoder does
    flags_local = b""  # the whole flags field (tag + fixed32) of a span/link whose parent/context is local
    flags_remote = b""
    link_flags_local = b""
    link_flags_remote = b""
    link_trace_state = False  # the official encoder writes a link's trace_state
    bytes_values = False  # it writes bytes as bytes_value
    none_in_sequences = False  # it writes None inside a sequence as an empty AnyValue


_features = _Features()
_calibrated = False
_calibrate_lock = threading.Lock()


# -- attributes ----------------------------------------------------------------------------------------------
_CACHE_MAX = 4096  # entries per cache; all cleared at once past this (a bounded, cheap policy)
_SHORT = 128  # strings longer than this are encoded each time rather than cached
_keys: dict[str, bytes] = {}
_str_pairs: dict[tuple[str, str], bytes] = {}
_int_pairs: dict[tuple[str, int], bytes] = {}
_bool_pairs: dict[tuple[str, bool], bytes] = {}
_float_heads: dict[str, bytes] = {}
_int_heads: dict[str, tuple[bytes, ...]] = {}
_names: dict[str, bytes] = {}
_SMALL_INT = 1024  # non-negative ints below this are cached as whole key/value pairs


def _key_field(key: str) -> bytes:
    kf = _keys.get(key)
    if kf is None:
        if key.__class__ is not str:
            raise Unsupported
        kf = _field(b"\x0a", key.encode()) if key else b""
        if len(_keys) >= _CACHE_MAX:
            _keys.clear()
        _keys[key] = kf
    return kf


def _any(value: Any) -> bytes:
    """The AnyValue message body for one value."""
    t = value.__class__
    if t is str:
        return _field(b"\x0a", value.encode())
    if t is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if t is int:
        if not _I64_MIN <= value <= _I64_MAX:
            raise Unsupported
        return b"\x18" + _varint(value & _U64)
    if t is float:
        return b"\x21" + _double(value)
    if t is tuple or t is list:
        return _field(b"\x2a", b"".join([_field(b"\x0a", _element(v)) for v in value]))
    if t is bytes and _features.bytes_values:
        return _field(b"\x3a", value)
    raise Unsupported


def _element(value: Any) -> bytes:
    if value is None:
        if _features.none_in_sequences:
            return b""
        raise Unsupported
    return _any(value)


def _pair(key: str, value: Any) -> bytes:
    """A KeyValue message with its length prefix (the caller writes the field tag)."""
    return _field(b"", _key_field(key) + _field(b"\x12", _any(value)))


def _cached_pair(cache: dict[Any, bytes], key: str, value: Any) -> bytes:
    kv = _pair(key, value)
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key, value] = kv
    return kv


def _float_head(key: str) -> bytes:
    """What a float KeyValue holds before its eight value bytes (the length prefix included)."""
    head = _float_heads.get(key)
    if head is None:
        kf = _key_field(key)
        head = _varint(len(kf) + 11) + kf + b"\x12\x09\x21"
        if len(_float_heads) >= _CACHE_MAX:
            _float_heads.clear()
        _float_heads[key] = head
    return head


def _int_heads_for(key: str) -> tuple[bytes, ...]:
    """What an int KeyValue holds before its value's varint (the length prefix included), by the
    varint's length: 1 to 10 bytes."""
    heads = _int_heads.get(key)
    if heads is None:
        kf = _key_field(key)
        heads = (
            b"",
            *(_varint(len(kf) + 3 + n) + kf + b"\x12" + _BYTE[n + 1] + b"\x18" for n in range(1, 11)),
        )
        if len(_int_heads) >= _CACHE_MAX:
            _int_heads.clear()
        _int_heads[key] = heads
    return heads


def _int_pair(key: str, value: int) -> bytes:
    # Small ints repeat (status codes, counts, ports) and are cached whole; larger ones are mostly ids,
    # sizes and durations, which rarely do: caching those would only churn the cache.
    if 0 <= value < _SMALL_INT:
        return _cached_pair(_int_pairs, key, value)
    if value >= 0:
        if value > _I64_MAX:
            raise Unsupported
        vb = _varint(value)
    else:
        if value < _I64_MIN:
            raise Unsupported
        vb = _varint(value & _U64)  # two's complement: ten bytes
    return (_int_heads.get(key) or _int_heads_for(key))[len(vb)] + vb


def _attributes(attributes: Mapping[str, Any] | None, tag: bytes, out: list[bytes]) -> None:
    if attributes:
        d = _plain(attributes)
        _attribute_items((*d, *d.values()), 0, len(d), tag, out)


def _attribute_items(flat: Sequence[Any], start: int, n: int, tag: bytes, out: list[bytes]) -> None:
    """Write ``n`` attributes whose keys are ``flat[start:start + n]`` and whose values follow them (the
    layout of a snapshot), each as a ``tag`` field. Read by index: a zip of two slices costs more."""
    append = out.append
    for i in range(start, start + n):
        key = flat[i]
        value = flat[i + n]
        t = value.__class__
        if t is str:
            kv = _str_pairs.get((key, value))
            if kv is None:
                kv = _cached_pair(_str_pairs, key, value) if len(value) <= _SHORT else _pair(key, value)
        elif t is int:
            # Keyed by type too: 1 == 1.0 == True, but their encodings differ.
            kv = (_int_pairs.get((key, value)) if 0 <= value < _SMALL_INT else None) or _int_pair(key, value)
        elif t is float:
            kv = (_float_heads.get(key) or _float_head(key)) + _double(value)
        elif t is bool:
            kv = _bool_pairs.get((key, value))
            if kv is None:
                kv = _cached_pair(_bool_pairs, key, value)
        else:
            kv = _pair(key, value)
        append(tag)
        append(kv)


def _name_field(name: str) -> bytes:
    """The span's name field; cached when short (span names repeat: they name operations, not values)."""
    nb = name.encode()
    field = _field(b"\x2a", nb)
    if len(nb) <= _SHORT:
        if len(_names) >= _CACHE_MAX:
            _names.clear()
        _names[name] = field
    return field


def _count_field(tag: bytes, n: int, out: list[bytes]) -> None:
    if n:
        if not 0 < n <= _U32:
            raise Unsupported
        out.append(tag)
        out.append(_varint(n))


# -- spans ---------------------------------------------------------------------------------------------------
_CODE = {id(code): code.value for code in StatusCode}
_STATUS = {
    id(code): _field(b"\x7a", b"\x18" + _varint(code.value) if code.value else b"") for code in StatusCode
}


def span_field(span: ReadableSpan) -> bytes:
    """One span as a ``ScopeSpans.spans`` field (tag, length, ``Span`` message), read through the span's
    public properties into the layout of a snapshot, which :func:`snapshot_field` writes. Its contexts
    are read as the tuples they are (a ``SpanContext``'s properties are Python-level calls): calibrate()
    compares this function's bytes with the official encoder's, remote and local parents and trace_states
    included, and leaves every span to the official encoder if they differ."""
    attributes = span.attributes
    d = _plain(attributes) if attributes else {}
    ctx: Any = span.context
    parent: Any = span.parent
    # The events and links properties copy the span's bounded lists under their locks (about a
    # microsecond each); most spans have neither, which their lengths tell without a copy.
    return snapshot_field(
        (
            ctx[0],
            ctx[1],
            ctx[4],
            parent[1] if parent else None,
            bool(parent and parent[2]),
            span.name,
            span.kind,
            span.start_time,
            span.end_time,
            span.status,
            span.dropped_attributes,
            span.events if _has_items(span, "_events") else None,
            span.dropped_events,
            span.links if _has_items(span, "_links") else None,
            span.dropped_links,
            None,  # the resource and scope: written by the caller, with the span's group
            None,
            *d,
            *d.values(),
        )
    )


def _plain(attributes: Mapping[str, Any]) -> Mapping[str, Any]:
    # A plain dict: iterating the span's read-only view of its BoundedAttributes goes through Mapping's
    # Python-level __iter__/__getitem__, several times slower than its copy() (a dict).
    try:
        return attributes.copy()  # type: ignore[attr-defined, no-any-return]
    except AttributeError:
        return dict(attributes)


def _time_fields(start: Any, end: Any) -> bytes:
    """Start and end time (fields 7 and 8, fixed64), each left out when 0 or None; :class:`Unsupported`
    for a bool, ``struct.error`` for a time that is not an int in range."""
    return _time(b"\x39", start) + _time(b"\x41", end)


def _time(tag: bytes, value: Any) -> bytes:
    """One fixed64 time field, left out when 0 or None. The official encoder refuses a bool where an int
    belongs (``struct`` would take it as 0 or 1), so this does too."""
    if value.__class__ is bool:
        raise Unsupported
    return tag + _fixed64(value) if value else b""


# The last status written and its field: most spans share one Status object (the SDK's default UNSET),
# and Status is immutable, so one comparison saves its two Python-level properties. Replaced as one tuple
# (threads may write spans at once); holding the object keeps its id from being reused.
_last_status: tuple[Any, bytes] = (None, b"")


def _status_field(status: Any) -> bytes:
    """The status field (nothing without a status), remembered as the last one written (the caller looks
    there first); ``KeyError`` for an unknown code, :class:`Unsupported` for a description that is not
    text, ``UnicodeEncodeError`` for a lone surrogate in it."""
    global _last_status  # noqa: PLW0603
    if status is None:
        return b""
    code, description = status.status_code, status.description
    field = _status(_CODE[id(code)], description) if description else _STATUS[id(code)]
    _last_status = (status, field)
    return field


def _has_items(span: ReadableSpan, private: str) -> bool:
    # ReadableSpan keeps events and links in ``_events``/``_links`` (a BoundedList, or the sequence given
    # to its constructor) in every SDK version ctxprop supports. Only their emptiness is read here; if
    # that attribute is missing or unsized, the public property decides.
    held = getattr(span, private, None)
    try:
        return len(held) > 0  # type: ignore[arg-type]
    except TypeError:
        return True


# -- snapshots: what the queue holds for a span the SDK ended ------------------------------------------------
# A flat tuple of the span's own immutable parts, taken by the thread that ends the span:
#   0 trace id, 1 span id, 2 trace_state, 3 parent span id (None for a root), 4 parent is remote, 5 name,
#   6 kind, 7 start, 8 end, 9 status, 10 dropped attributes, 11 events (a tuple, or None), 12 dropped
#   events, 13 links, 14 dropped links, 15 resource, 16 scope, then the attribute keys, then their values.
# Ints and strings, and objects every span shares (the kind, the SDK's default status and trace_state, the
# resource and scope): the garbage collector follows nothing in it that is this span's own.
# The export thread writes it (snapshot_field) with the same writer as a span, a batch at once.
Snapshot = tuple[Any, ...]
_FIXED = 17

#: The class of span that :func:`snapshot` reads: the SDK's ``ReadableSpan`` (what ``Span.end()`` hands
#: ``on_end``) once :func:`calibrate` has checked its layout; None before that, or if the check failed.
snapshot_class: type | None = None
_SAMPLED = 0x01  # TraceFlags.SAMPLED
_BoundedAttributes: Any = None
_BoundedList: Any = None


def snapshot(span: ReadableSpan) -> Snapshot | None:
    """The span's parts as a :data:`Snapshot`; ``()`` when the span is not sampled (nothing to export);
    None when it does not keep its parts as an ended SDK span does (its attributes in a
    ``BoundedAttributes``, its events and links in ``BoundedList`` s).

    Only for a span of :data:`snapshot_class` (the caller checks). It reads the span's private fields, not
    its public properties: on 3.11 each property is a Python-level call, and the ten of them cost the
    thread that ends the span more than the rest of the snapshot. :func:`calibrate` checks, on spans of
    every shape, that a snapshot is written to the same bytes as the span itself read through its public
    properties; if the installed SDK keeps its spans any other way, no span is snapshotted.

    Nothing is checked or encoded here: whatever cannot be written (a lone surrogate, an int past int64, a
    mapping value...) is found by the export thread, which then hands the official encoder the span
    rebuilt from its parts (:func:`snapshot_span`). What is held is immutable: an ended span refuses
    changes, and the SDK stores copies of what it was given (tuples for sequences, new dicts for mappings).
    """
    a: Any = span._attributes
    events: Any = span._events
    links: Any = span._links
    if (
        a.__class__ is not _BoundedAttributes
        or events.__class__ is not _BoundedList
        or links.__class__ is not _BoundedList
    ):
        return None
    ev = events._dq
    lk = links._dq
    d = a._dict
    ctx: Any = span._context  # a SpanContext, read as the tuple it is
    if not ctx[3] & _SAMPLED:  # its trace_flags
        return ()
    parent: Any = span._parent
    return (
        ctx[0],
        ctx[1],
        ctx[4],
        parent[1] if parent else None,
        bool(parent and parent[2]),
        span._name,
        span._kind,
        span._start_time,
        span._end_time,
        span._status,
        a.dropped,
        tuple(ev) if ev else None,
        events.dropped,
        tuple(lk) if lk else None,
        links.dropped,
        span._resource,
        span._instrumentation_scope,
        *d,
        *d.values(),
    )


def snapshot_field(snap: Snapshot) -> bytes:
    """One snapshot as a ``ScopeSpans.spans`` field: the one writer of a span, for :func:`span_field` too.

    Raises :class:`Unsupported` for what only the official encoder writes exactly, and ``struct.error``,
    ``KeyError`` or ``UnicodeEncodeError`` for what cannot be written (the caller then falls back on the
    official encoder, with :func:`snapshot_span`). :func:`calibrate` compares the result with the
    official encoder's bytes on spans of every shape, remote and local parents and trace_states included,
    and leaves every span to the official encoder if they differ. The common cases are written inline: on
    3.11 each function call costs as much as a field.
    """
    trace_id = snap[0]
    out = [_ids(0x0A, 0x10, trace_id >> 64, trace_id & _U64, 0x12, 0x08, snap[1])]
    trace_state = snap[2]
    if trace_state is not _DEFAULT_TRACE_STATE and trace_state:  # TraceState's len() is Python-level
        out.append(_trace_state(b"\x1a", trace_state))
    if snap[3] is not None:
        out.append(_parent_id(0x22, 0x08, snap[3]))
    name = snap[5]
    if name:
        if name.__class__ is not str:
            raise Unsupported
        out.append(_names.get(name) or _name_field(name))
    out.append(_KIND[id(snap[6])])
    start, end = snap[7], snap[8]
    if start and end and start.__class__ is int and end.__class__ is int:
        out.append(_times(0x39, start, 0x41, end))
    else:
        out.append(_time_fields(start, end))
    n = len(snap) - _FIXED
    if n:
        _attribute_items(snap, _FIXED, n >> 1, b"\x4a", out)
    if snap[10]:
        _count_field(b"\x50", snap[10], out)
    if snap[11]:
        _events(snap[11], out)
    if snap[12]:
        _count_field(b"\x60", snap[12], out)
    if snap[13]:
        _links(snap[13], out)
    if snap[14]:
        _count_field(b"\x70", snap[14], out)
    status = snap[9]
    last = _last_status
    out.append(last[1] if status is last[0] else _status_field(status))
    out.append(_features.flags_remote if snap[4] else _features.flags_local)
    body = b"".join(out)
    n = len(body)
    return b"\x12" + (_LENGTHS[n] if n < _NLENGTHS else _varint(n)) + body


def snapshot_span(snap: Snapshot) -> ReadableSpan:
    """The span a snapshot was taken from, rebuilt through the SDK's public constructors: what the
    official encoder reads from it is what it would have read from the original."""
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util import BoundedList
    from opentelemetry.trace import SpanContext

    n = (len(snap) - _FIXED) >> 1
    attributes = BoundedAttributes(
        None, dict(zip(snap[_FIXED : _FIXED + n], snap[_FIXED + n :], strict=True))
    )
    attributes.dropped = snap[10]
    events: Any = BoundedList.from_seq(None, snap[11] or ())
    events.dropped = snap[12]
    links: Any = BoundedList.from_seq(None, snap[13] or ())
    links.dropped = snap[14]
    # Of the contexts, the official encoder reads the ids, the trace_state and whether the parent is remote.
    parent = None if snap[3] is None else SpanContext(snap[0], snap[3], snap[4])
    return ReadableSpan(
        name=snap[5],
        context=SpanContext(snap[0], snap[1], False, trace_state=snap[2]),
        parent=parent,
        resource=snap[15],
        attributes=attributes,
        events=events,
        links=links,
        kind=snap[6],
        status=snap[9],
        start_time=snap[7],
        end_time=snap[8],
        instrumentation_scope=snap[16],
    )


def _string(tag: bytes, text: str) -> bytes:
    if text.__class__ is not str:
        raise Unsupported
    return _field(tag, text.encode())


def _trace_state(tag: bytes, trace_state: Any) -> bytes:
    # As the official encoder writes it: "key=value" pairs joined by commas.
    return _field(tag, ",".join([f"{k}={v}" for k, v in trace_state.items()]).encode())


def _status(code: int, description: str) -> bytes:
    body = _string(b"\x12", description)
    if code:
        body += b"\x18" + _varint(code)
    return _field(b"\x7a", body)


def _events(events: Iterable[Any], out: list[bytes]) -> None:
    for event in events:
        ev: list[bytes] = []
        ev.append(_time(b"\x09", event.timestamp))
        if event.name:
            ev.append(_string(b"\x12", event.name))
        _attributes(event.attributes, b"\x1a", ev)
        _count_field(b"\x20", event.dropped_attributes, ev)
        out.append(_field(b"\x5a", b"".join(ev)))


def _links(links: Iterable[Any], out: list[bytes]) -> None:
    f = _features
    for link in links:
        lc = link.context
        lk = [b"\x0a\x10", lc.trace_id.to_bytes(16, "big"), b"\x12\x08", lc.span_id.to_bytes(8, "big")]
        if f.link_trace_state and lc.trace_state:
            lk.append(_trace_state(b"\x1a", lc.trace_state))
        _attributes(link.attributes, b"\x22", lk)
        _count_field(b"\x28", link.dropped_attributes, lk)
        lk.append(f.link_flags_remote if lc.is_remote else f.link_flags_local)
        out.append(_field(b"\x6a", b"".join(lk)))


def official_span_field(span: ReadableSpan) -> bytes:
    """The same field, written by the official encoder (raises what it raises)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    message = encode_spans([span]).resource_spans[0].scope_spans[0].spans[0]
    return _field(b"\x12", message.SerializeToString())


# -- resource and scope headers (from the official encoder, cached per object) -------------------------------
_HEADERS_MAX = 256
_resource_cache: dict[int, tuple[Resource, bytes, bytes]] = {}
_scope_cache: dict[int, tuple[InstrumentationScope | None, bytes, bytes]] = {}


def _probe_request(resource: Resource, scope: InstrumentationScope | None) -> Any:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext

    probe = ReadableSpan("probe", SpanContext(1, 1, False), resource=resource, instrumentation_scope=scope)
    return encode_spans([probe])


def resource_parts(resource: Resource) -> tuple[bytes, bytes]:
    """What a ``ResourceSpans`` message holds before its scope_spans, and after them."""
    hit = _resource_cache.get(id(resource))
    if hit is not None and hit[0] is resource:
        return hit[1], hit[2]
    rs = _probe_request(resource, None).resource_spans[0]
    head = _field(b"\x0a", rs.resource.SerializeToString())
    tail = _field(b"\x1a", rs.schema_url.encode()) if rs.schema_url else b""
    if len(_resource_cache) >= _HEADERS_MAX:
        _resource_cache.clear()
    _resource_cache[id(resource)] = (resource, head, tail)  # holds the object: its id stays its own
    return head, tail


def scope_parts(scope: InstrumentationScope | None) -> tuple[bytes, bytes]:
    """What a ``ScopeSpans`` message holds before its spans, and after them."""
    hit = _scope_cache.get(id(scope))
    if hit is not None and hit[0] is scope:
        return hit[1], hit[2]
    from opentelemetry.sdk.resources import Resource

    ss = _probe_request(Resource.get_empty(), scope).resource_spans[0].scope_spans[0]
    head = _field(b"\x0a", ss.scope.SerializeToString())
    tail = _field(b"\x1a", ss.schema_url.encode()) if ss.schema_url else b""
    if len(_scope_cache) >= _HEADERS_MAX:
        _scope_cache.clear()
    _scope_cache[id(scope)] = (scope, head, tail)
    return head, tail


# -- calibration against the installed official encoder ------------------------------------------------------
def _probe_spans(
    attributes: Mapping[str, Any], span_class: type | None = None, bounded: bool = False
) -> Iterable[ReadableSpan]:
    """Spans of every kind and parent, with events, links, a trace_state and statuses. ``bounded``: kept
    as ``Span.end()`` hands them to ``on_end`` (``BoundedAttributes``, ``BoundedList`` s), with dropped
    counts, sampled, and two plain spans besides, one of them not sampled."""
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util import BoundedList
    from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags, TraceState

    cls = span_class or ReadableSpan
    unsampled = TraceFlags(TraceFlags.DEFAULT)
    flags = TraceFlags(TraceFlags.SAMPLED) if bounded else unsampled
    ts = TraceState([("k", "v"), ("x", "y")])
    local = SpanContext(0x1234, 0x56, False, trace_state=ts)
    remote = SpanContext(0x99, 0x77, True)
    events: Any = [Event("e", {"a": 1}, timestamp=5), Event("", None, timestamp=0)]
    links: Any = [Link(local, {"l": "v"}), Link(remote)]
    attrs: Any = attributes
    if bounded:
        # The SDK would refuse an empty key (and log it): leave it out here. The dropped counts are set,
        # not caused: going past a limit would log, and ctxprop counts those records as the app's.
        attrs = BoundedAttributes(None, {k: v for k, v in attributes.items() if k})
        events = BoundedList.from_seq(None, events)
        links = BoundedList.from_seq(None, links)
        attrs.dropped, events.dropped, links.dropped = 1, 2, 3
        for plain_flags in (flags, unsampled):
            yield cls(
                "plain",
                SpanContext(0xABC, 0xDEF, False, trace_flags=plain_flags),
                resource=Resource.get_empty(),
                attributes=BoundedAttributes(None, {"k": "v"}),
                events=BoundedList(None),
                links=BoundedList(None),
                start_time=2,
                end_time=3,
            )
    for kind in SpanKind:
        for parent in (None, local, remote):
            yield cls(
                "probe \u00e9",
                SpanContext(0xABC, 0xDEF, False, trace_flags=flags, trace_state=ts),
                parent=parent,
                resource=Resource.get_empty(),
                attributes=attrs,
                events=events,
                links=links,
                kind=kind,
                status=Status(StatusCode.ERROR, "bad") if parent else Status(StatusCode.OK),
                start_time=1,
                end_time=(1 << 64) - 1,
            )


def _matches(attributes: Mapping[str, Any]) -> bool:
    try:
        return all(span_field(s) == official_span_field(s) for s in _probe_spans(attributes))
    except Exception:  # noqa: BLE001 - any failure means "do not use this feature"
        return False


def snapshots_match(span_class: type, attributes: Mapping[str, Any]) -> bool:
    """Whether :func:`snapshot` reads spans of ``span_class``, kept as ``Span.end()`` keeps them, exactly:
    each snapshot is written to the bytes its span is (read through its public properties), and so is the
    span rebuilt from it; it tells the unsampled one apart. The guard on the SDK's private layout (see
    :func:`snapshot`)."""
    global _BoundedAttributes, _BoundedList
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.util import BoundedList

    _BoundedAttributes, _BoundedList = BoundedAttributes, BoundedList
    try:
        for span in _probe_spans(attributes, span_class, bounded=True):
            snap = snapshot(span)
            if snap == ():  # not sampled, it says: it must not be
                if span.context.trace_flags.sampled:
                    return False
                continue
            want = span_field(span)
            if snap is None or snapshot_field(snap) != want or span_field(snapshot_span(snap)) != want:
                return False
            if not span.context.trace_flags.sampled:
                return False
    except Exception:  # noqa: BLE001 - a layout this module does not know: spans are queued as themselves
        return False
    return True


def _flags_field(tag: bytes, value: int) -> bytes:
    return tag + struct.pack("<I", value) if value else b""


def calibrate() -> bool:
    """Measure the installed official encoder once; True if this encoder may be used."""
    global _calibrated  # noqa: PLW0603
    if _calibrated:
        return _features.usable
    # Never wait for the lock: a signal handler's close() may interrupt the very frame calibrating on its
    # thread. Whoever cannot take it uses the official encoder this time.
    if not _calibrate_lock.acquire(blocking=False):
        return False
    # The probes make an older official encoder log each attribute it cannot write ("Failed to encode
    # key ..."): measuring it must not put those records in the application's logs.
    official_log = logging.getLogger("opentelemetry.exporter.otlp.proto.common._internal")
    quiet = _Quiet()
    official_log.addFilter(quiet)
    try:
        if not _calibrated:
            _calibrate_now()
            _calibrated = True
    finally:
        official_log.removeFilter(quiet)
        _calibrate_lock.release()
    return _features.usable


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _calibrate_now() -> None:
    global snapshot_class  # noqa: PLW0603
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Link, SpanContext

    f = _features
    try:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        remote = SpanContext(3, 4, True)
        local = SpanContext(3, 4, False)
        empty = Resource.get_empty()
        spans = [
            ReadableSpan("a", SpanContext(1, 2, False), parent=p, resource=empty, links=[Link(p)])
            for p in (local, remote)
        ]
        got = encode_spans(spans).resource_spans[0].scope_spans[0].spans
        # Span.flags is field 16, Link.flags field 6, both fixed32.
        f.flags_local = _flags_field(b"\x85\x01", got[0].flags)
        f.flags_remote = _flags_field(b"\x85\x01", got[1].flags)
        f.link_flags_local = _flags_field(b"\x35", got[0].links[0].flags)
        f.link_flags_remote = _flags_field(b"\x35", got[1].links[0].flags)
        # An unparented span: the official encoder decides its flags as for a local parent.
        bare = ReadableSpan("a", SpanContext(1, 2, False), resource=Resource.get_empty())
        bare_flags = encode_spans([bare]).resource_spans[0].scope_spans[0].spans[0].flags
        if _flags_field(b"\x85\x01", bare_flags) != f.flags_local:
            return
        common = {
            "s": "text \u00e9\u4e2d",
            "e": "",
            "": "empty key",
            "b": True,
            "f": False,
            "i": -1,
            "big": _I64_MAX,
            "small": _I64_MIN,
            "z": 0,
            "d": 1.5,
            "nan": float("nan"),
            "inf": float("-inf"),
            "seq": ("a", "b"),
            "ints": [1, -2],
            "empty": (),
        }
        f.link_trace_state = False
        if not _matches(common):
            f.link_trace_state = True
            if not _matches(common):
                return
        f.usable = True
        f.bytes_values = True
        f.bytes_values = _matches({"x": b"\x00\xff", "xs": (b"a", b"")})
        f.none_in_sequences = True
        f.none_in_sequences = _matches({"n": ("a", None), "m": (None,)})
        snapshot_class = ReadableSpan if snapshots_match(ReadableSpan, common) else None
    except Exception:  # noqa: BLE001 - a failed calibration leaves everything to the official encoder
        f.usable = False
