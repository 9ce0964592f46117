"""Encoding batches: a span that cannot be encoded is dropped alone and counted, never its batch; the
encoder is chosen at init(); spools written with either encoder replay with the other."""

from __future__ import annotations

import gc
import socket
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import support
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext
from support import OTLPReceiver, run_child

import ctxprop
from ctxprop import _encoding
from ctxprop._processor import CtxpropSpanProcessor
from ctxprop._transport import OTLPSender

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


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_bad_encoder_raises_at_init(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown encoder name is a ValueError at init() naming where it came from and what to use."""
    kwargs: dict[str, Any] = {}
    if how == "argument":
        kwargs["encoder"] = "fastest"
    else:
        monkeypatch.setenv("CTXPROP_ENCODER", "fastest")
    message = r"(init\(encoder='fastest'\)|CTXPROP_ENCODER='fastest').*'official'"
    with pytest.raises(ValueError, match=message):
        ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False, **kwargs)


@pytest.mark.parametrize("how", ["argument", "environment", "default"])
def test_encoder_choice_delivers(
    how: str, receiver: OTLPReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init(encoder="official") and CTXPROP_ENCODER=official select the official encoder, else ctxprop's."""
    kwargs: dict[str, Any] = {}
    if how == "argument":
        kwargs["encoder"] = "official"
    elif how == "environment":
        monkeypatch.setenv("CTXPROP_ENCODER", " Official ")
    ctxprop.init(endpoint=receiver.endpoint, handle_signals=False, spool_dir=str(tmp_path), **kwargs)
    assert _encoding.current_encoder() == ("ctxprop" if how == "default" else "official")
    tracer = trace.get_tracer("encoding-test")
    for i in range(20):
        with tracer.start_as_current_span(f"s{i}", attributes={"i": i, "m": "\u00e9"}):
            pass
    ctxprop.close(10)
    assert sorted(s.name for s in receiver.spans) == sorted(f"s{i}" for i in range(20))
    assert {s.attributes["m"] for s in receiver.spans} == {"\u00e9"}


SPOOL_THEN_REPLAY = """
import json, os, sys
import ctxprop
from opentelemetry import trace
ctxprop.init(endpoint=os.environ["EP"], encoder=os.environ["ENC"], close_timeout=2.0)
tracer = trace.get_tracer("cross-encoder", "1.0")
for i in range(int(os.environ["N"])):
    with tracer.start_as_current_span(f"{os.environ['TAG']}-{i}", attributes={"i": i, "s": "\u00e9"}) as s:
        s.add_event("e", {"k": (1, 2)})
ctxprop.close()
print(json.dumps({"stats": ctxprop.stats()}), flush=True)
"""


@pytest.mark.parametrize(("first", "second"), [("ctxprop", "official"), ("official", "ctxprop")])
def test_spool_written_by_one_encoder_replays_with_the_other(
    first: str, second: str, receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """A process with the collector down spools with one encoder; the next, with the other, replays all."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/traces"  # bound, never listening: refused
        env = {"CTXPROP_SPOOL_DIR": str(tmp_path / "spool"), "N": "300"}
        spooled = run_child(SPOOL_THEN_REPLAY, env={**env, "EP": down, "ENC": first, "TAG": "old"})
    assert spooled.returncode == 0, spooled.stderr
    assert spooled.stderr == ""
    assert spooled.last("stats").get("spool_written_spans") == 300
    replayed = run_child(SPOOL_THEN_REPLAY, env={**env, "EP": receiver.endpoint, "ENC": second, "TAG": "new"})
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stderr == ""
    names = Counter(s.name for s in receiver.spans)
    assert set(names) == {f"{tag}-{i}" for tag in ("old", "new") for i in range(300)}
    assert max(names.values()) == 1
    assert {s.attributes["s"] for s in receiver.spans} == {"\u00e9"}
    assert all(s.events == (("e", {"k": (1, 2)}),) for s in receiver.spans)


class _Watch(SpanProcessor):
    """Runs before ctxprop's processor: keeps a weak reference to every ReadableSpan handed to on_end."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[ReadableSpan]] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.refs.append(weakref.ref(span))


def _pipeline(
    receiver: OTLPReceiver, exporter: bool = False
) -> tuple[TracerProvider, CtxpropSpanProcessor, _Watch]:
    kw: dict[str, Any] = {"sender": OTLPSender(receiver.endpoint)}
    if exporter:
        kw = {"exporter": InMemorySpanExporter()}
    proc = CtxpropSpanProcessor(**kw, schedule_delay=60, max_export_batch_size=512)
    watch = _Watch()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(watch)
    provider.add_span_processor(proc)
    return provider, proc, watch


def test_queued_spans_are_records_and_the_spans_are_freed(receiver: OTLPReceiver) -> None:
    """On the OTLP path a queued span is already encoded: the ReadableSpan is freed as soon as the
    application lets go of it (no garbage collection needed), and what arrives is what the official
    encoder writes. With a custom exporter (the control) the queue keeps every span alive."""
    provider, proc, watch = _pipeline(receiver)
    control, control_proc, control_watch = _pipeline(receiver, exporter=True)
    gc.disable()  # freed by reference counting alone, not by a collection
    try:
        for p in (provider, control):
            tracer = p.get_tracer("records")
            for i in range(50):
                attributes: dict[str, Any] = {"i": i * 1000, "f": i / 3, "m": "\u00e9"}
                with tracer.start_as_current_span(f"s{i}", attributes=attributes):
                    pass
        assert proc.queue_length == 50
        assert control_proc.queue_length == 50
        assert sum(ref() is not None for ref in watch.refs) == 0
        assert sum(ref() is not None for ref in control_watch.refs) == 50
    finally:
        gc.enable()
    assert provider.force_flush(10_000)
    assert receiver.wait_for_spans(50, 5)
    got = {s.name: s.attributes for s in receiver.spans}
    assert got == {f"s{i}": {"i": i * 1000, "f": i / 3, "m": "\u00e9"} for i in range(50)}
    provider.shutdown()
    control.shutdown()


def test_a_queued_snapshot_gives_the_collector_one_object_to_follow() -> None:
    """What the queue holds for a span the SDK ended is one tuple, and the collector follows nothing
    inside it that is this span's own: what it follows (the default trace_state and status, the kind, the
    resource, the scope) every span of the tracer shares, and the ids, times, name and attribute keys and
    values are atoms. The ReadableSpan the SDK hands on_end keeps far more (the control)."""
    _encoding.prepare()
    s, o = _ended_all(("op", {"i": 1 << 40, "f": 0.5, "route": "/a", "ok": True}), ("other", {"i": 2}))
    other = _encoding.record(o)
    snap = _encoding.record(s)
    assert snap.__class__ is tuple
    gc.collect()
    assert gc.is_tracked(snap)
    inside = [x for x in snap if gc.is_tracked(x)]  # type: ignore[union-attr]
    shared = [x for x in inside if any(x is y for y in other)]  # type: ignore[union-attr]
    assert [x for x in inside if not any(x is y for y in shared)] == []
    assert len(shared) == 5
    followed = [x for x in vars(s).values() if gc.is_tracked(x)]
    assert len(followed) >= len(inside) + 3  # the control: its BoundedAttributes, BoundedLists...


def test_a_span_the_fast_path_cannot_write_is_written_by_the_official_encoder() -> None:
    """record() never raises and checks nothing: a span holding what only the official encoder writes
    is snapshotted too, and its batch, snapshots beside it, encodes to the official encoder's bytes."""
    assert _encoding.current_encoder() == "ctxprop"
    _encoding.prepare()
    good = [_ended(f"s{i}", {"i": i}) for i in range(3)]
    odd = _ended("odd", {"mapping": {"a": 1}})  # a type only the official path writes
    queued = [_encoding.record(s) for s in (good[0], odd, good[1], good[2])]
    assert all(q.__class__ is tuple for q in queued)
    official = encode_spans([good[0], odd, good[1], good[2]]).SerializeToString()
    assert _encoding.encode(queued) == (official, 4, 0)


def test_records_queued_before_a_switch_to_the_official_encoder_keep_their_bytes() -> None:
    """Records queued under ctxprop's encoder, then spans queued after init(encoder="official"): one
    batch of both encodes to the official encoder's bytes, none lost."""
    _encoding.prepare()
    spans = [_ended(f"s{i}", {"i": i, "route": "/r"}) for i in range(6)]
    try:
        early = [_encoding.record(s) for s in spans[:3]]
        _encoding.use_encoder("official")
        late = [_encoding.record(s) for s in spans[3:]]
        assert all(q.__class__ is tuple for q in early)
        assert late == spans[3:]
        assert _encoding.encode(early + late) == (encode_spans(spans).SerializeToString(), 6, 0)
    finally:
        _encoding.use_encoder("ctxprop")


class _Keep(SpanProcessor):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


_RESOURCE = Resource({"service.name": "records"})


def _ended_all(*spans: tuple[str, dict[str, Any]]) -> list[ReadableSpan]:
    """Spans (name, attributes) as the SDK's Span.end() hands them to on_end, from one real tracer."""
    keep = _Keep()
    provider = TracerProvider(resource=_RESOURCE, shutdown_on_exit=False)
    provider.add_span_processor(keep)
    tracer = provider.get_tracer("records")
    for name, attributes in spans:
        tracer.start_span(name, attributes=attributes).end()
    return keep.spans


def _ended(name: str, attributes: dict[str, Any]) -> ReadableSpan:
    """One span as the SDK's Span.end() hands it to on_end."""
    return _ended_all((name, attributes))[0]


def _span(name: str, attributes: dict[str, Any]) -> ReadableSpan:
    return ReadableSpan(
        name,
        SpanContext(0xABCDEF, 0x1234, False),
        resource=Resource({"service.name": "records"}),
        attributes=attributes,
        start_time=1,
        end_time=2,
    )
