"""Spans to OTLP ``ExportTraceServiceRequest`` bytes, one span's failure never costing its batch.

The worker encodes each batch once; the same bytes are then sent, retried, spooled and replayed.
:func:`encode` returns the payload with how many spans it holds and how many were dropped because they
could not be encoded at all (a lone surrogate in a span's name, say): those are dropped alone, and the
caller counts them (``dropped_unencodable``), the rest of the batch goes out.

>>> encode([]).spans
0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

__all__ = ["Encoded", "encode", "encode_official"]


class Encoded(NamedTuple):
    """One batch's request bytes, the number of spans in them, and the number left out as unencodable."""

    payload: bytes
    spans: int
    dropped: int


def encode(spans: Sequence[ReadableSpan]) -> Encoded:
    """Encode a batch; spans that cannot be encoded are left out and reported in ``dropped``."""
    return encode_official(spans)


def _official_bytes(spans: Sequence[ReadableSpan]) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return encode_spans(spans).SerializeToString()


def encode_official(spans: Sequence[ReadableSpan]) -> Encoded:
    """The official encoder (``encode_spans(...).SerializeToString()``) with a per-span fallback.

    The whole batch is tried first. Only if that fails is each span tried on its own, so the ones that
    fail are found; the others are encoded together again, grouped exactly as they would have been.
    """
    try:
        return Encoded(_official_bytes(spans), len(spans), 0)
    except Exception:  # noqa: BLE001, S110 - find the span(s) at fault below
        pass
    good = [span for span in spans if _encodes(span)]
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
