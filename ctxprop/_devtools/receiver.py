"""A loopback OTLP/HTTP trace receiver for tests, benchmarks, demos and ``ctxprop collector``.

It decodes ``ExportTraceServiceRequest`` bodies (plain, gzip or deflate) into :class:`ReceivedSpan` values
and can misbehave on purpose (``mode``) so exporters can be tested against a collector that refuses,
throttles, hangs or dies mid-request.

>>> with OTLPReceiver() as rx:
...     rx.endpoint.startswith("http://127.0.0.1:")
True
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import ssl
import sys
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, NamedTuple

from ctxprop import _stats

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["MODES", "OTLPReceiver", "ReceivedSpan", "Tally", "count_spans", "decode_request"]

#: How the receiver answers: "ok"; an HTTP status (400 refuses for good; 408, 429, 502, 503 and 504 ask to
#: retry, with ``retry_after`` as ``Retry-After``); "slow" (answer after ``delay``); "die" (hang up).
MODES = ("ok", "400", "408", "429", "502", "503", "504", "slow", "die")
_RETRYABLE = ("408", "429", "502", "503", "504")


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the collector saw it.

    .. versionadded:: 0.1.0
    """

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int
    status_message: str
    service_name: str | None
    resource: dict[str, Any]
    events: tuple[tuple[str, dict[str, Any]], ...]
    kind: int


class Tally(NamedTuple):
    """What :meth:`OTLPReceiver.tally` counted among the spans of one name."""

    arrived: int
    children: int
    tagged: int


def _any_value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return tuple(_any_value(x) for x in v.array_value.values)
    if which == "kvlist_value":
        return _kv(v.kvlist_value.values)
    return getattr(v, which)


def _kv(pairs: Any) -> dict[str, Any]:
    return {p.key: _any_value(p.value) for p in pairs}


def decode_request(body: bytes) -> list[ReceivedSpan]:
    """Decode a serialized ``ExportTraceServiceRequest`` into spans.

    >>> decode_request(b"")
    []

    .. versionadded:: 0.1.0
    """
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out: list[ReceivedSpan] = []
    for rs in req.resource_spans:
        resource = _kv(rs.resource.attributes)
        service = resource.get("service.name")
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex() if s.parent_span_id else None,
                        name=s.name,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=_kv(s.attributes),
                        status_code=int(s.status.code),
                        status_message=s.status.message,
                        service_name=service if isinstance(service, str) else None,
                        resource=resource,
                        events=tuple((e.name, _kv(e.attributes)) for e in s.events),
                        kind=int(s.kind),
                    )
                )
    return out


def count_spans(body: bytes) -> int:
    """How many spans a serialized ``ExportTraceServiceRequest`` holds (no per-span Python objects)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Keep-alive handler threads may sit in a read; stop() closes their sockets instead of joining them.
    block_on_close = False
    receiver: OTLPReceiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or hung up mid-answer is normal for a collector (the slow and die modes
        # provoke it on purpose); the stdlib would print a traceback to stderr for each. Anything else is
        # a bug worth seeing.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    # An idle keep-alive connection must not pin a thread forever.
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        # Tests assert on empty stderr; the stdlib server logs every request there.
        return

    def setup(self) -> None:
        super().setup()
        self.server.receiver._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.receiver._track(self.connection, add=False)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            body = b"".join(parts)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
        enc = self.headers.get("Content-Encoding", "").lower()
        if enc == "gzip":
            body = gzip.decompress(body)
        elif enc == "deflate":
            body = zlib.decompress(body)
        return body

    def _answer(self, code: int, extra: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.send_response(code)
        extra = dict(extra or {})
        self.send_header("Content-Type", extra.pop("Content-Type", "application/x-protobuf"))
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/stats":
            # Lets another process (a benchmark, a test parent) watch progress without decoding anything.
            rx = self.server.receiver
            body = json.dumps({"spans": rx.span_count, "requests": rx.requests}).encode()
            self._answer(200, {"Content-Type": "application/json"}, body)
            return
        self._answer(404 if self.path != "/" else 200)

    def do_POST(self) -> None:
        rx = self.server.receiver
        try:
            body = self._read_body()
        except (OSError, ValueError, EOFError, zlib.error):
            self.close_connection = True
            return
        rx._count_request(dict(self.headers.items()))
        if self.path.split("?")[0] != "/v1/traces":
            self._answer(404)
            return
        mode, retry_after, delay = rx._current_mode()
        if mode == "die":
            # Read the whole request, then hang up without a status line: a collector crashing mid-request.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode.isdigit():
            extra = None
            if retry_after is not None and mode in _RETRYABLE:
                extra = {"Retry-After": _fmt_retry(retry_after)}
            self._answer(int(mode), extra)
            return
        if mode == "slow" and rx._stopping.wait(delay):
            self.close_connection = True
            return
        try:
            spans = decode_request(body) if rx._keep else count_spans(body)
        except Exception:  # noqa: BLE001  # a malformed body is the client's fault: answer 400
            self._answer(400)
            return
        # Record before answering: a client that saw the 200 must find its spans already here.
        rx._accept(spans)
        self._answer(200)


def _fmt_retry(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class OTLPReceiver:
    """A loopback OTLP/HTTP trace collector that records what it receives.

    >>> rx = OTLPReceiver(mode="503", retry_after=1).start()
    >>> rx.port > 0
    True
    >>> rx.stop()

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        mode: str = "ok",
        retry_after: float | None = None,
        delay: float = 0.0,
        on_spans: Callable[[list[ReceivedSpan]], None] | None = None,
        keep_spans: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._host = host
        # A server-side TLS context makes this an https:// collector (the handshake is done per connection).
        self._tls = tls
        self._connections = 0
        # keep_spans=False only counts spans (a C-level protobuf parse): for benchmarks, where building
        # ReceivedSpan objects would make the collector the bottleneck.
        self._keep = keep_spans
        self._span_count = 0
        self._requested_port = port
        self._cond = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._requests = 0
        self._on_spans = on_spans
        #: The last exception raised by ``on_spans`` (the request was still answered 200), or None.
        self.callback_error: BaseException | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._last_headers: dict[str, str] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = port
        self._mode = "ok"
        self._retry_after: float | None = None
        self._delay = 0.0
        self._mode_left: int | None = None  # requests left in this mode before "ok" again (None: for ever)
        self.set_mode(mode, retry_after=retry_after, delay=delay)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> OTLPReceiver:
        """Bind and serve in a daemon thread; returns ``self``."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self._host, self._requested_port), _Handler)
        if self._tls is not None:
            server.socket = self._tls.wrap_socket(server.socket, server_side=True)
        server.receiver = self
        self._server = server
        self._port = server.server_address[1]
        # Restarting after stop() must reuse the port so a client sees the same collector come back.
        self._requested_port = self._port
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="ctxprop-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and hang up every open connection (idempotent)."""
        server, self._server = self._server, None
        self._stopping.set()
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._cond:
            conns = list(self._conns)
            self._conns.clear()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_mode(
        self, mode: str, *, retry_after: float | None = None, delay: float = 0.0, times: int | None = None
    ) -> None:
        """Change how the following requests are answered (see ``MODES``); with ``times``, only that many
        of them, and "ok" after."""
        if mode not in MODES:
            raise ValueError(f"unknown receiver mode {mode!r}; use one of {', '.join(MODES)}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1, not {times!r}")
        with self._cond:
            self._mode, self._retry_after, self._delay, self._mode_left = mode, retry_after, delay, times

    # -- observations ----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound TCP port."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (``https://`` when serving TLS)."""
        return f"{'https' if self._tls is not None else 'http'}://{self._host}:{self._port}"

    @property
    def connections(self) -> int:
        """How many connections clients have opened so far (keep-alive reuses one)."""
        with self._cond:
            return self._connections

    @property
    def endpoint(self) -> str:
        """The traces endpoint, ``http://HOST:PORT/v1/traces``."""
        return f"{self.base_url}/v1/traces"

    @property
    def spans(self) -> list[ReceivedSpan]:
        """A copy of every span answered with 200."""
        with self._cond:
            return list(self._spans)

    @property
    def span_count(self) -> int:
        """How many spans were accepted (also with ``keep_spans=False``)."""
        with self._cond:
            return self._span_count

    @property
    def requests(self) -> int:
        """POST requests seen, whatever the answer."""
        with self._cond:
            return self._requests

    @property
    def last_headers(self) -> dict[str, str]:
        """The headers of the last POST (names lower-cased)."""
        with self._cond:
            return dict(self._last_headers)

    def tally(self, name: str, *, parent: Span, tag: tuple[str, Any]) -> Tally:
        """Of the spans called ``name`` that arrived: how many, how many are children of ``parent``, and
        how many carry the attribute ``tag`` (key, value). The examples' closing check.

        >>> from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        >>> from opentelemetry.sdk.trace import TracerProvider
        >>> from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        >>> with OTLPReceiver() as rx:
        ...     provider = TracerProvider()
        ...     provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=rx.endpoint)))
        ...     tracer = provider.get_tracer("doc")
        ...     with tracer.start_as_current_span("root") as root:
        ...         for tenant in ("acme", "acme", "other"):
        ...             with tracer.start_as_current_span("step", attributes={"tenant": tenant}):
        ...                 pass
        ...     tracer.start_span("step").end()  # a root of its own
        ...     rx.tally("step", parent=root, tag=("tenant", "acme"))
        Tally(arrived=4, children=3, tagged=2)
        """
        parent_id = format(parent.get_span_context().span_id, "016x")
        named = [s for s in self.spans if s.name == name]
        key, value = tag
        return Tally(
            arrived=len(named),
            children=sum(s.parent_span_id == parent_id for s in named),
            tagged=sum(s.attributes.get(key) == value for s in named),
        )

    def wait_for_spans(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` spans were accepted or ``timeout`` seconds passed."""
        with self._cond:
            return self._cond.wait_for(lambda: self._span_count >= n, timeout)

    def clear(self) -> None:
        """Forget the spans and the request count."""
        with self._cond:
            self._spans.clear()
            self._span_count = 0
            self._requests = 0

    # -- handler callbacks -----------------------------------------------------------------------------
    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._cond:
            if add:
                self._conns.add(conn)
                self._connections += 1
            else:
                self._conns.discard(conn)

    def _count_request(self, headers: dict[str, str]) -> None:
        with self._cond:
            self._requests += 1
            self._last_headers = {k.lower(): v for k, v in headers.items()}

    def _current_mode(self) -> tuple[str, float | None, float]:
        """How to answer this request (each call is one request: it counts down ``times``)."""
        with self._cond:
            current = self._mode, self._retry_after, self._delay
            if self._mode_left is not None:
                self._mode_left -= 1
                if self._mode_left == 0:
                    self._mode, self._retry_after, self._delay, self._mode_left = "ok", None, 0.0, None
            return current

    def _accept(self, spans: list[ReceivedSpan] | int) -> None:
        with self._cond:
            if isinstance(spans, int):
                self._span_count += spans
            else:
                self._span_count += len(spans)
                self._spans.extend(spans)
            self._cond.notify_all()
        if self._on_spans is not None and not isinstance(spans, int):
            try:
                self._on_spans(spans)
            except Exception as exc:  # noqa: BLE001 - the spans were received: answer 200, never a retry
                self.callback_error = exc
                _stats.incr("receiver_callback_errors")
