"""The loopback OTLP receiver and the child-process runner that the rest of the suite builds on."""

from __future__ import annotations

import gzip
import http.client
import signal
import threading
import time

import pytest
import support
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support import OTLPReceiver, run_child

receiver = support.receiver


def _spans(n: int = 2) -> list[ReadableSpan]:
    mem = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "svc-rx"}))
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("parent", kind=SpanKind.SERVER) as p:
        p.set_attribute("list", [1, 2])
        p.add_event("ev", {"k": "v"})
        for i in range(n - 1):
            with tracer.start_as_current_span(f"child{i}") as c:
                c.set_attribute("i", i)
                c.set_status(StatusCode.ERROR, "boom")
    provider.shutdown()
    return list(mem.get_finished_spans())


class _Answer:
    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self._headers = headers

    def getheader(self, name: str) -> str | None:
        return self._headers.get(name.lower())


def _post(
    rx: OTLPReceiver, body: bytes, headers: dict[str, str] | None = None, path: str = "/v1/traces"
) -> _Answer:
    conn = http.client.HTTPConnection("127.0.0.1", rx.port, timeout=10)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/x-protobuf", **(headers or {})})
        r = conn.getresponse()
        r.read()
        return _Answer(r.status, {k.lower(): v for k, v in r.getheaders()})
    finally:
        conn.close()


def test_decodes_spans_from_the_official_exporter(receiver: OTLPReceiver) -> None:
    """Spans sent by OTLPSpanExporter come back with ids, parents, attributes, status, resource and events."""
    spans = _spans(2)
    exp = OTLPSpanExporter(endpoint=receiver.endpoint)
    assert exp.export(spans) is SpanExportResult.SUCCESS
    exp.shutdown()
    assert receiver.wait_for_spans(2, 10)
    got = {s.name: s for s in receiver.spans}
    parent, child = got["parent"], got["child0"]
    assert len(parent.trace_id) == 32
    assert len(parent.span_id) == 16
    assert parent.parent_span_id is None
    assert child.parent_span_id == parent.span_id
    assert child.trace_id == parent.trace_id
    assert parent.attributes["list"] == (1, 2)
    assert child.attributes["i"] == 0
    assert child.status_code == 2
    assert child.status_message == "boom"
    assert parent.service_name == "svc-rx"
    assert parent.resource["service.name"] == "svc-rx"
    assert parent.events == (("ev", {"k": "v"}),)
    assert parent.kind == 2  # SPAN_KIND_SERVER
    assert parent.end_ns >= parent.start_ns > 0
    assert receiver.requests == 1


def test_gzip_and_deflate_bodies(receiver: OTLPReceiver) -> None:
    """Compressed bodies are decoded (gzip through the official exporter, deflate by hand)."""
    exp = OTLPSpanExporter(endpoint=receiver.endpoint, compression=Compression.Gzip)
    assert exp.export(_spans(1)) is SpanExportResult.SUCCESS
    exp.shutdown()
    import zlib

    body = encode_spans(_spans(1)).SerializeToString()
    assert _post(receiver, zlib.compress(body), {"Content-Encoding": "deflate"}).status == 200
    assert receiver.wait_for_spans(2, 10)
    assert _post(receiver, gzip.compress(body), {"Content-Encoding": "gzip"}).status == 200
    assert len(receiver.spans) == 3


def test_503_and_429_modes_answer_with_retry_after() -> None:
    """Refusal modes answer their status, with Retry-After when configured, and accept no spans."""
    body = encode_spans(_spans(1)).SerializeToString()
    with OTLPReceiver(mode="429", retry_after=2) as rx:
        r = _post(rx, body)
        assert r.status == 429
        assert r.getheader("Retry-After") == "2"
        rx.set_mode("503", retry_after=0.5)
        r = _post(rx, body)
        assert r.status == 503
        assert r.getheader("Retry-After") == "0.5"
        rx.set_mode("503")
        r = _post(rx, body)
        assert r.status == 503
        assert r.getheader("Retry-After") is None
        assert rx.spans == []
        assert rx.requests == 3
        rx.set_mode("ok")
        assert _post(rx, body).status == 200
        assert len(rx.spans) == 1


def test_slow_mode_delays_and_stop_cuts_the_delay_short() -> None:
    """A slow collector answers late; stop() ends the wait instead of holding a handler for `delay`."""
    body = encode_spans(_spans(1)).SerializeToString()
    rx = OTLPReceiver(mode="slow", delay=60).start()
    outcome: list[object] = []
    done = threading.Event()

    def client() -> None:
        try:
            outcome.append(_post(rx, body).status)
        except (OSError, http.client.HTTPException) as e:
            outcome.append(e)
        done.set()

    threading.Thread(target=client, daemon=True).start()
    deadline = time.monotonic() + 20
    while rx.requests == 0 and time.monotonic() < deadline:
        done.wait(0.01)
    assert rx.requests == 1
    assert not done.is_set()
    t0 = time.monotonic()
    rx.stop()
    assert done.wait(20)
    assert time.monotonic() - t0 < 20  # far below the 60 s delay
    assert not isinstance(outcome[0], int)  # hung up without an answer
    assert rx.spans == []


def test_die_mode_hangs_up_without_answering() -> None:
    """In `die` mode the request is read, counted, and the connection closed without a status line."""
    body = encode_spans(_spans(1)).SerializeToString()
    with OTLPReceiver(mode="die") as rx:
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            _post(rx, body)
        assert rx.requests == 1
        assert rx.spans == []


def test_stopped_receiver_refuses_and_restarts_on_same_port() -> None:
    """After stop() connections are refused; start() again listens on the same port."""
    rx = OTLPReceiver().start()
    port = rx.port
    rx.stop()
    with pytest.raises(ConnectionRefusedError):
        _post(rx, b"")
    rx.start()
    try:
        assert rx.port == port
        assert _post(rx, encode_spans(_spans(1)).SerializeToString()).status == 200
    finally:
        rx.stop()


def test_wait_for_spans_times_out_and_clear_resets(receiver: OTLPReceiver) -> None:
    """wait_for_spans returns False at its timeout; clear() forgets spans and requests; on_spans fires."""
    assert receiver.wait_for_spans(1, 0.05) is False
    seen: list[int] = []
    with OTLPReceiver(on_spans=lambda s: seen.append(len(s))) as rx:
        assert _post(rx, encode_spans(_spans(3)).SerializeToString()).status == 200
        assert rx.wait_for_spans(3, 10)
        assert seen == [3]
        rx.clear()
        assert rx.spans == []
        assert rx.requests == 0


def test_bad_mode_and_bad_body() -> None:
    """An unknown mode is a ValueError; an undecodable body gets 400; other paths get 404."""
    with pytest.raises(ValueError, match="unknown receiver mode"):
        OTLPReceiver(mode="nope")
    with OTLPReceiver() as rx:
        assert _post(rx, b"\xff\xff\xff").status == 400
        assert _post(rx, b"", path="/v1/logs").status == 404


def test_run_child_collects_json_and_sends_signal_after_line() -> None:
    """run_child decodes JSON lines, keeps stderr, and signals the child once the named line appeared."""
    res = run_child(
        """
        import json, sys, time, ctxprop
        sys.stderr.write("err\\n")
        sys.stderr.flush()
        print(json.dumps({"ready": True, "mod": ctxprop.__name__}))
        time.sleep(60)
        """,
        signal_after_line='"ready"',
        sig=signal.SIGTERM,
    )
    assert res.signalled
    assert res.returncode == -signal.SIGTERM
    assert res.json_lines == [{"ready": True, "mod": "ctxprop"}]
    assert res.last("ready") is True
    assert res.stderr == "err\n"


def test_client_hanging_up_before_the_answer_is_silent(capfd: pytest.CaptureFixture[str]) -> None:
    """A client that gave up (reset its connection) before a slow answer leaves no traceback on stderr."""
    import socket
    import struct

    body = encode_spans(_spans(1)).SerializeToString()
    with OTLPReceiver(mode="slow", delay=0.3) as rx:
        s = socket.create_connection(("127.0.0.1", rx.port), timeout=10)
        head = f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        s.sendall(head + body)
        deadline = time.monotonic() + 20
        while rx.requests == 0 and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        assert rx.requests == 1
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        s.close()
        assert rx.wait_for_spans(1, 10)  # the answer was attempted after the hang-up
        rx.set_mode("ok")
        assert _post(rx, body).status == 200  # and the receiver still serves
    assert "Traceback" not in capfd.readouterr().err


def test_a_failing_on_spans_callback_still_answers_200() -> None:
    """An exception in the on_spans callback is kept and counted; the request is answered 200 and its spans
    are recorded, so the sender does not retry (and deliver twice)."""
    def broken(spans: list[support.ReceivedSpan]) -> None:
        raise RuntimeError("callback bug")

    with OTLPReceiver(on_spans=broken) as rx:
        answer = _post(rx, encode_spans(_spans(2)).SerializeToString())
        assert answer.status == 200
        assert len(rx.spans) == 2
        assert isinstance(rx.callback_error, RuntimeError)
