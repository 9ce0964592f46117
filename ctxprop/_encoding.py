"""Spans to OTLP ``ExportTraceServiceRequest`` bytes, one span's failure never costing its batch.

The worker encodes each batch once; the same bytes are then sent, retried, spooled and replayed.
:func:`encode` returns the payload with how many spans it holds and how many were dropped because they
could not be encoded at all (a lone surrogate in a span's name, say): those are dropped alone, and the
caller counts them (``dropped_unencodable``), the rest of the batch goes out.

Two encoders, chosen process-wide by :func:`use_encoder` (``init(encoder=...)``, ``CTXPROP_ENCODER``):
``"ctxprop"`` (the default) writes the wire format by hand (``_otlp_wire``), several times cheaper per
span, and hands any span it cannot write exactly to the official encoder, splicing that span's bytes
into its group; ``"official"`` is ``encode_spans(...).SerializeToString()`` for the whole batch. Both give
the same bytes; the records in the spool are the same either way.

On ctxprop's own OTLP path the queue does not hold the ended spans themselves but :func:`record` of each:
a snapshot (``_otlp_wire.snapshot``) taken by the thread that ended the span, so the span is freed when the
application lets go of it. A queued ``ReadableSpan`` keeps about ten objects alive that the garbage
collector traverses over and over while it waits (its attributes, events and links, context, status...);
held for a batch's worth of time, nearly every one is promoted to the oldest generation, and those
promotions trigger the full collections that cost the stock ``BatchSpanProcessor`` more per span than
encoding does. A snapshot is one flat tuple of the span's parts (ids, times and attribute values as ints,
strings and floats, and the objects every span shares), so the collector follows nothing in it that is
the span's own. Taking it checks and encodes nothing: it copies fields (about a fifth of the cost of
encoding the span there), and the export thread writes a whole batch of snapshots at once, where the
encoder's code and caches stay warm. Whatever the fast path cannot write, the export thread finds there,
and hands the official encoder the span rebuilt from its snapshot. A span not kept as the SDK keeps the
spans it ends (a ``ReadableSpan`` built by hand, a subclass) is queued as itself.

>>> encode([]).spans
0
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeAlias, Union

from ctxprop import _otlp_wire

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = [
    "ENCODERS",
    "Encoded",
    "Queued",
    "current_encoder",
    "encode",
    "encode_fast",
    "encode_official",
    "prepare",
    "record",
    "use_encoder",
]

# What a batch holds: snapshots (see record()) and spans.
Queued: TypeAlias = Union["ReadableSpan", "_otlp_wire.Snapshot"]  # a string alias: names only mypy sees

ENCODERS = ("ctxprop", "official")
_official = False


class Encoded(NamedTuple):
    """One batch's request bytes, the number of spans in them, and the number left out as unencodable."""

    payload: bytes
    spans: int
    dropped: int


def use_encoder(name: str) -> None:
    """Choose the encoder for this process: ``"ctxprop"`` or ``"official"`` (ValueError otherwise)."""
    global _official  # noqa: PLW0603
    if name not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(map(repr, ENCODERS))}, not {name!r}")
    _official = name == "official"
    if not _official:
        _otlp_wire.calibrate()


def prepare() -> None:
    """Calibrate the fast path now (a processor's constructor), so the first spans are recorded too."""
    if not _official:
        _otlp_wire.calibrate()


def record(span: ReadableSpan) -> Queued | None:
    """What the queue holds for ``span``: its snapshot, or, when the official encoder is chosen or the
    span is not kept as the SDK keeps the spans it ends, the span itself; None when the span is not
    sampled (nothing is exported for it). Never raises."""
    if span.__class__ is _otlp_wire.snapshot_class and not _official:
        try:
            snap = _otlp_wire.snapshot(span)
        except Exception:  # noqa: BLE001 - not what calibrate() checked: the public properties decide
            snap = None
        if snap:
            return snap
        if snap is not None:  # (): not sampled
            return None
    try:
        return span if span.context.trace_flags.sampled else None
    except Exception:  # noqa: BLE001 - a span without a usable context has nothing to export
        return None


def current_encoder() -> str:
    """The encoder this process uses now."""
    return "official" if _official else "ctxprop"


def encode(spans: Sequence[Queued]) -> Encoded:
    """Encode a batch; spans that cannot be encoded are left out and reported in ``dropped``."""
    if _official:
        return encode_official(spans)
    return encode_fast(spans)


def _official_bytes(spans: Sequence[ReadableSpan]) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return encode_spans(spans).SerializeToString()


def encode_official(spans: Sequence[Queued]) -> Encoded:
    """The official encoder (``encode_spans(...).SerializeToString()``) with a per-span fallback.

    The whole batch is tried first. Only if that fails is each span tried on its own, so the ones that
    fail are found; the others are encoded together again, grouped exactly as they would have been.
    Snapshots queued before the official encoder was chosen are rebuilt into spans
    (``_otlp_wire.snapshot_span``) and written by it too.
    """
    plain: list[ReadableSpan] = []
    for s in spans:
        # One that cannot be rebuilt is counted with the unencodable below.
        with contextlib.suppress(Exception):
            plain.append(_otlp_wire.snapshot_span(s) if s.__class__ is tuple else s)  # type: ignore[arg-type]
    lost = len(spans) - len(plain)
    try:
        return Encoded(_official_bytes(plain), len(plain), lost)
    except Exception:  # noqa: BLE001, S110 - find the span(s) at fault below
        pass
    good = [span for span in plain if _encodes(span)]
    try:
        return Encoded(_official_bytes(good), len(good), len(spans) - len(good))
    except Exception:  # noqa: BLE001 - spans that encode alone but not together: give up on the batch
        return Encoded(_official_bytes([]), 0, len(spans))


def _encodes(span: ReadableSpan) -> bool:
    try:
        _official_bytes([span])
    except Exception:  # noqa: BLE001 - this span is the one that cannot be encoded
        return False
    return True


def encode_fast(spans: Sequence[Queued]) -> Encoded:
    """ctxprop's encoder: the same bytes as the official one, grouped by resource then scope as it does.

    Groups keep their first span's resource and scope objects and the order they first appear in (the
    official encoder's dicts do the same). A span the hand-written path cannot write goes through the
    official encoder alone; one neither can encode is left out and counted in ``dropped``.
    """
    if not _otlp_wire.calibrate():
        return encode_official(spans)
    return _assemble(spans, _otlp_wire.span_field)


def _assemble(spans: Sequence[Queued], write: Callable[[ReadableSpan], bytes]) -> Encoded:
    """Group the spans' fields (snapshots written by ``_otlp_wire.snapshot_field``, the others by ``write``,
    falling back on the official encoder) into one request."""
    groups: dict[Resource, dict[InstrumentationScope | None, list[bytes]]] = {}
    last_resource: object = _NOTHING
    last_scope: object = _NOTHING
    last: list[bytes] = []
    dropped = 0
    for span in spans:
        if span.__class__ is tuple:
            snap: _otlp_wire.Snapshot = span
            try:
                field: bytes | None = _otlp_wire.snapshot_field(snap)
            except Exception:  # noqa: BLE001 - what the fast path cannot write: the official encoder decides
                field = _official_field(snap)
            resource, scope = snap[15], snap[16] or None
        else:
            readable: ReadableSpan = span  # type: ignore[assignment]
            try:
                field = write(readable)
            except Exception:  # noqa: BLE001 - exotic or unencodable: the official encoder decides
                field = _official_field(readable)
            resource, scope = readable.resource, readable.instrumentation_scope or None
        if field is None:  # neither can encode it: this span alone is dropped
            dropped += 1
            continue
        if resource is not last_resource or scope is not last_scope:
            last = groups.setdefault(resource, {}).setdefault(scope, [])
            last_resource, last_scope = resource, scope
        last.append(field)
    out: list[bytes] = []
    count = 0
    for resource, scopes in groups.items():
        try:
            head, tail = _otlp_wire.resource_parts(resource)
        except Exception:  # noqa: BLE001 - the official encoder cannot encode this resource either
            dropped += sum(map(len, scopes.values()))
            continue
        parts = [head]
        for scope, fields in scopes.items():
            try:
                scope_head, scope_tail = _otlp_wire.scope_parts(scope)
            except Exception:  # noqa: BLE001 - nor this scope: its spans are dropped, not the batch
                dropped += len(fields)
                continue
            fields.insert(0, scope_head)
            fields.append(scope_tail)
            parts.append(_field(b"\x12", b"".join(fields)))
            count += len(fields) - 2
        if len(parts) > 1:
            parts.append(tail)
            out.append(_field(b"\x0a", b"".join(parts)))
    return Encoded(b"".join(out), count, dropped)


def _official_field(span: Queued) -> bytes | None:
    """The span's field written by the official encoder (a snapshot rebuilt into its span first), or None
    if it cannot write it either."""
    try:
        readable = _otlp_wire.snapshot_span(span) if isinstance(span, tuple) else span
        return _otlp_wire.official_span_field(readable)
    except Exception:  # noqa: BLE001 - nothing to write: the caller counts it
        return None


_NOTHING = object()
_field = _otlp_wire.length_delimited
