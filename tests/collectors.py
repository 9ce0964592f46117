"""Loopback collectors that misbehave in one precise way, for the pipeline's and the spool's tests.

Each is a real HTTP server on 127.0.0.1 (the receiver of ``ctxprop._devtools.receiver`` where it can
play the part), started by a context manager that stops it. ``MisbehavingCollector`` is a raw socket
server that reads each OTLP/HTTP request whole, records its spans, then answers as told:

- ``trickle``: the status line and headers, one byte every ``interval`` seconds (0.2 s: faster than any
  socket timeout fires, and about 100 s in all);
- ``partial``: 200 with an ``ExportTraceServiceResponse`` whose ``partial_success`` rejects some spans;
- ``slow``: the answer after ``delay`` seconds (the spans are recorded on arrival, as a real collector
  would, so a client that gave up early has still delivered them).
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from ctxprop._devtools.receiver import OTLPReceiver, ReceivedSpan

__all__ = ["MisbehavingCollector", "duplicates", "late_answering_receiver", "serving"]


@contextmanager
def late_answering_receiver(low: float, high: float, *, seed: int = 0) -> Iterator[OTLPReceiver]:
    """A collector that keeps each request at once, then answers 200 only ``low``..``high`` s later.

    The worst case for a client: a request it gives up on has already been kept, so resending it is a
    duplicate.
    """
    rng = random.Random(seed)  # noqa: S311 - delays for a test collector, not secrets
    lock = threading.Lock()
    stop = threading.Event()

    def answer_late(_spans: list[ReceivedSpan]) -> None:
        with lock:
            delay = rng.uniform(low, high)
        stop.wait(delay)

    rx = OTLPReceiver(on_spans=answer_late).start()
    try:
        yield rx
    finally:
        stop.set()
        rx.stop()


def duplicates(rx: OTLPReceiver) -> int:
    """How many spans ``rx`` received more than once (each extra copy counts), by span id."""
    counts = Counter((s.trace_id, s.span_id) for s in rx.spans)
    return sum(n - 1 for n in counts.values())


class MisbehavingCollector:
    """A loopback OTLP/HTTP server answering per ``mode`` (see the module docstring).

    >>> with MisbehavingCollector("slow", delay=0.1) as c:
    ...     c.endpoint.startswith("http://127.0.0.1:")
    True
    """

    def __init__(
        self, mode: str, *, delay: float = 0.0, interval: float = 0.2, rejected: int = 0, message: str = ""
    ) -> None:
        self.mode = mode
        self.interval = interval
        self.delay = delay
        self.rejected = rejected
        self.message = message
        self.names: list[str] = []
        self.requests = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._conns: set[socket.socket] = set()
        self._handlers: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, name="misbehaving-collector", daemon=True)

    @property
    def endpoint(self) -> str:
        """The traces URL to export to."""
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1/traces"

    def start(self) -> MisbehavingCollector:
        """Serve in a daemon thread; returns ``self``."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and hang up every connection."""
        self._stop.set()
        # close() alone does not wake a thread blocked in accept() on Linux (the join below then waited
        # its whole 5 s); shutdown() does, and accept() raises.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
        for c in list(self._conns):
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()
        self._thread.join(5)
        for t in list(self._handlers):
            t.join(5)  # woken by the stop event or the hang-up: stop() leaves no thread of its own behind

    def __enter__(self) -> MisbehavingCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_spans(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` spans arrived (in total); False at the timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.names) >= n, timeout)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.add(conn)
            handler = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._handlers.append(handler)
            handler.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                reader = conn.makefile("rb")
                while not self._stop.is_set():
                    body = _read_request(reader)
                    if body is None:
                        return
                    self._record(body)
                    self._answer(conn)
        except OSError:
            return
        finally:
            self._conns.discard(conn)

    def _record(self, body: bytes) -> None:
        req = ExportTraceServiceRequest.FromString(body)
        names = [s.name for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
        with self._cond:
            self.requests += 1
            self.names.extend(names)
            self._cond.notify_all()

    def _answer(self, conn: socket.socket) -> None:
        if self.mode == "trickle":
            head = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nX-Pad: "
                + b"p" * 400
                + b"\r\nContent-Length: 0\r\n\r\n"
            )
            for i in range(len(head)):
                if self._stop.wait(self.interval):
                    return
                conn.sendall(head[i : i + 1])
            return
        if self.mode == "slow" and self._stop.wait(self.delay):
            return
        body = b""
        if self.mode == "partial":
            body = ExportTraceServiceResponse(
                partial_success=ExportTracePartialSuccess(
                    rejected_spans=self.rejected, error_message=self.message
                )
            ).SerializeToString()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )


def _read_request(reader: Any) -> bytes | None:
    line = reader.readline()
    if not line:
        return None
    length = 0
    while True:
        h = reader.readline()
        if not h or h in (b"\r\n", b"\n"):
            break
        k, _, v = h.decode("latin-1").partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    data: bytes = reader.read(length)
    return data


@contextlib.contextmanager
def serving(mode: str, **kw: Any) -> Iterator[MisbehavingCollector]:
    """``with serving("trickle") as c:`` a started collector, stopped afterwards."""
    c = MisbehavingCollector(mode, **kw).start()
    try:
        yield c
    finally:
        c.stop()
