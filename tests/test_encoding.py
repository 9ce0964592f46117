"""Encoding batches: a span that cannot be encoded is dropped alone and counted, never its batch."""

from __future__ import annotations

from pathlib import Path

import support
from opentelemetry import trace
from support import OTLPReceiver

import ctxprop

receiver = support.receiver


def test_one_unencodable_span_is_dropped_alone(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """A batch of 100 spans with a lone surrogate in one name delivers the other 99 and counts 1."""
    ctxprop.init(endpoint=receiver.endpoint, handle_signals=False, spool_dir=str(tmp_path), schedule_delay=60)
    tracer = trace.get_tracer("encoding-test")
    for i in range(100):
        with tracer.start_as_current_span("bad\ud800" if i == 37 else f"s{i}"):
            pass
    assert ctxprop.flush(10) is True
    assert receiver.wait_for_spans(99, 5)
    ctxprop.close(5)
    assert sorted(s.name for s in receiver.spans) == sorted(f"s{i}" for i in range(100) if i != 37)
    stats = ctxprop.stats()
    assert stats["dropped_unencodable"] == 1
    assert stats["exported"] == 99


def test_unencodable_attribute_drops_only_that_attribute(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """As with the official encoder, an attribute that cannot be encoded is left out; its span is sent."""
    ctxprop.init(endpoint=receiver.endpoint, handle_signals=False, spool_dir=str(tmp_path), schedule_delay=60)
    tracer = trace.get_tracer("encoding-test")
    with tracer.start_as_current_span("a", attributes={"good": 1, "bad": "x\udfff", "k\ud800": "v"}):
        pass
    with tracer.start_as_current_span("b"):
        pass
    ctxprop.close(10)
    assert sorted(s.name for s in receiver.spans) == ["a", "b"]
    assert next(s for s in receiver.spans if s.name == "a").attributes == {"good": 1}
    assert "dropped_unencodable" not in ctxprop.stats()
