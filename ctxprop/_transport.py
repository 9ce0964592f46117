"""The OTLP/HTTP transport: one POST of already-encoded ``ExportTraceServiceRequest`` bytes, within a
deadline for the whole request.

Spans are encoded once, by the processor (``_encoding``); the same bytes can then be sent, retried,
spooled and replayed without encoding again. The POST goes over ``requests`` (which the official
exporter depends on too); headers, compression, TLS settings and ``Retry-After`` parsing are done here,
with no private OpenTelemetry name. A socket timeout bounds each read, not the request: a collector
trickling its answer one byte a second would hold the caller for ever. So each request also arms a
timer that, at the deadline, shuts the request's socket down, which ends any blocked connect, send or
read at once.

>>> sender = OTLPSender("http://127.0.0.1:9/v1/traces")
>>> sender(b"", 0.5).ok
False
>>> sender.close()
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.resources import Resource

__all__ = [
    "OK",
    "PERMANENT",
    "OTLPSender",
    "SendOutcome",
    "parse_retry_after",
    "quiet_official_loggers",
    "stable_resource",
]

# 429/502/503/504 as the OTLP specification says, plus 408 (the request timed out at a proxy).
_RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})
# The longest answer body read (a partial_success message); a collector cannot make us buffer more.
_MAX_BODY = 64 * 1024
# The longest error_message kept from a partial_success answer.
_MAX_MESSAGE = 512

_log = logging.getLogger("ctxprop.transport")


@dataclass(frozen=True)
class SendOutcome:
    """The collector's answer to one POST.

    ``rejected`` spans were refused inside a 200 answer (``partial_success``), ``message`` its
    ``error_message``. ``status`` is None when no HTTP answer came (refused, reset, timed out).
    """

    ok: bool
    retryable: bool = False
    retry_after: float | None = None
    status: int | None = None
    rejected: int = 0
    message: str = ""

    @property
    def permanent(self) -> bool:
        """The collector rejected the payload for good (retrying would not help)."""
        return not self.ok and not self.retryable


OK = SendOutcome(True, status=200)
PERMANENT = SendOutcome(False, retryable=False)
_NO_ANSWER = SendOutcome(False, retryable=True)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date; None if absent/bad.

    >>> parse_retry_after("3")
    3.0
    >>> parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", now=4.0)
    6.0
    >>> parse_retry_after("soon") is None
    True
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


_quieted = False


def quiet_official_loggers() -> None:
    """Keep the OTel SDK/exporter's own log records off stderr when the application set up no logging.

    A collector that is down is a normal path for ctxprop, but the official packages log it as an error,
    and Python's last-resort handler prints such records to stderr. A ``NullHandler`` on their loggers
    stops only that fallback: records still propagate to any handler the application configured.
    """
    global _quieted  # noqa: PLW0603
    if _quieted:
        return
    _quieted = True
    for name in (
        "opentelemetry.exporter",
        "opentelemetry.sdk.trace.export",
        "opentelemetry.sdk._shared_internal",
        "ctxprop",
    ):
        logging.getLogger(name).addHandler(logging.NullHandler())


def _user_agent() -> str:
    from ctxprop import __version__

    return f"ctxprop/{__version__} (OTLP/HTTP protobuf)"


def _env_path(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


class _Attempt:
    """One request's connection, so a timer on another thread can cut it at the deadline."""

    __slots__ = ("abandoned", "conn", "lock")

    def __init__(self) -> None:
        self.conn: Any = None
        self.abandoned = False
        self.lock = threading.Lock()

    def attach(self, conn: Any) -> None:
        with self.lock:
            self.conn = conn
            abandoned = self.abandoned
        if abandoned:
            _shut(conn)

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True
            conn = self.conn
        if conn is not None:
            _shut(conn)


def _shut(conn: Any) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


_current = threading.local()


def _build_session(auth: Any) -> Any:
    """A ``requests`` session whose connections register with the running attempt, reading nothing from
    the environment per request (see :func:`_from_environment`)."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def _register(conn: Any) -> None:
        attempt = getattr(_current, "attempt", None)
        if attempt is not None:
            attempt.attach(conn)

    class _Conn(HTTPConnection):
        def request(self, *args: Any, **kwargs: Any) -> Any:
            _register(self)
            return super().request(*args, **kwargs)

    class _TLSConn(HTTPSConnection):
        def request(self, *args: Any, **kwargs: Any) -> Any:
            _register(self)
            return super().request(*args, **kwargs)

    class _Pool(HTTPConnectionPool):
        ConnectionCls = _Conn

    class _TLSPool(HTTPSConnectionPool):
        ConnectionCls = _TLSConn

    class _Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}

    session = requests.Session()
    session.trust_env = False
    session.auth = auth
    adapter = _Adapter(pool_connections=1, pool_maxsize=4, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _from_environment(endpoint: str, verify: Any) -> tuple[dict[str, str], Any, Any]:
    """What ``requests`` reads from the environment on every request, read once for this endpoint: its
    proxies (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), the CA bundle (``REQUESTS_CA_BUNDLE``,
    ``CURL_CA_BUNDLE``) when no OTLP certificate is set, and ``~/.netrc`` credentials for its host.

    Per request, scanning the environment took about a third of the export thread's time for each POST
    (every ``os.environ`` entry is decoded, twice) and ``~/.netrc`` was looked up again.
    """
    from requests.utils import get_environ_proxies, get_netrc_auth

    proxies = get_environ_proxies(endpoint)
    if verify is True:
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    return proxies, verify, get_netrc_auth(endpoint)


class OTLPSender:
    """Sends encoded payloads to one OTLP/HTTP traces endpoint over a keep-alive session.

    ``sender(payload, timeout)`` makes one attempt (plus one immediate retry of a stale pooled
    connection, within the same timeout), never takes longer than ``timeout`` (plus the time to shut a
    socket down), and returns a :class:`SendOutcome`; it never raises. TLS settings come from
    ``OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`` / ``..._CLIENT_KEY`` / ``..._CLIENT_CERTIFICATE`` (or the
    ``OTEL_EXPORTER_OTLP_*`` ones), as with the official exporter. Proxies, the requests CA bundle and
    ``~/.netrc`` come from the environment as ``requests`` reads them, once, when the sender is made.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        headers: Mapping[str, str] | None = None,
        compression: str = "none",
    ) -> None:
        self.endpoint = endpoint
        self._compression = compression
        hdrs = {"content-type": "application/x-protobuf", "user-agent": _user_agent()}
        hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
        if compression != "none" and "content-encoding" not in hdrs:
            hdrs["content-encoding"] = compression
        self._headers = hdrs
        ca = _env_path("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE")
        self._verify: Any = ca if ca is not None else True
        cert = _env_path(
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"
        )
        key = _env_path("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY")
        self._cert: Any = (cert, key) if cert and key else cert
        self._proxies, self._verify, self._auth = _from_environment(endpoint, self._verify)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._session = _build_session(self._auth)
        _import_send_path()

    def reset_after_fork(self) -> None:
        """In a forked child: a new session; the parent's pooled sockets are its own."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._session = _build_session(self._auth)

    def _compress(self, payload: bytes) -> bytes:
        if self._compression == "gzip":
            # Level 6: nearly the ratio of 9 at a fraction of the CPU on the export thread.
            return gzip.compress(payload, compresslevel=6)
        if self._compression == "deflate":
            return zlib.compress(payload)
        return payload

    def __call__(self, payload: bytes, timeout: float) -> SendOutcome:
        try:
            if timeout <= 0:
                return _NO_ANSWER
            if self._pid != os.getpid():
                self.reset_after_fork()
            deadline = time.monotonic() + timeout
            data = self._compress(payload)
            out, stale = self._post(data, deadline)
            if stale and deadline - time.monotonic() > 0.05:
                out, _ = self._post(data, deadline)
            return out
        except Exception:  # noqa: BLE001 - the telemetry path must never raise into the exporting thread
            return _NO_ANSWER

    def _post(self, data: bytes, deadline: float) -> tuple[SendOutcome, bool]:
        """One POST by ``deadline``: (outcome, whether it failed on a stale pooled connection)."""
        import requests

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _NO_ANSWER, False
        attempt = _Attempt()
        timer: threading.Timer | None = threading.Timer(remaining, attempt.abandon)
        assert timer is not None  # noqa: S101 - for mypy: set just above
        timer.daemon = True
        try:
            timer.start()
        except RuntimeError:
            # No thread at interpreter shutdown (3.12+): the socket timeouts alone bound each read.
            timer = None
        _current.attempt = attempt
        try:
            resp = self._session.post(
                self.endpoint,
                data=data,
                headers=self._headers,
                timeout=(remaining, remaining),
                proxies=self._proxies,
                verify=self._verify,
                cert=self._cert,
                stream=True,
                allow_redirects=False,
            )
            try:
                body = _read_body(resp, deadline)
            finally:
                resp.close()
        except requests.RequestException as exc:
            stale = not attempt.abandoned and _is_stale_connection(exc)
            return _NO_ANSWER, stale
        finally:
            _current.attempt = None
            if timer is not None:
                timer.cancel()
                # Joined so no timer thread outlives the request (a fork right after stays clean).
                timer.join()
        if attempt.abandoned:
            return _NO_ANSWER, False
        return _outcome(resp.status_code, resp.headers, body), False

    def close(self) -> None:
        """Close the keep-alive session (idempotent)."""
        with contextlib.suppress(Exception):
            self._session.close()


def _read_body(resp: Any, deadline: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_content(8192):
        chunks.append(chunk)
        size += len(chunk)
        if size >= _MAX_BODY or time.monotonic() >= deadline:
            break
    return b"".join(chunks)


def _outcome(status: int, headers: Mapping[str, str], body: bytes) -> SendOutcome:
    if 200 <= status < 300:
        rejected, message = _partial_success(body)
        if rejected or message:
            return SendOutcome(True, status=status, rejected=rejected, message=message)
        return OK
    if status in _RETRYABLE_STATUS:
        return SendOutcome(
            False, retryable=True, retry_after=parse_retry_after(headers.get("retry-after")), status=status
        )
    return SendOutcome(False, retryable=False, status=status)


def _partial_success(body: bytes) -> tuple[int, str]:
    if not body:
        return 0, ""
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        answer = ExportTraceServiceResponse.FromString(body)
    except Exception:  # noqa: BLE001 - a body we cannot parse is no partial success
        return 0, ""
    if not answer.HasField("partial_success"):
        return 0, ""
    part = answer.partial_success
    return max(0, int(part.rejected_spans)), str(part.error_message)[:_MAX_MESSAGE]


def stable_resource(resource: Resource) -> Resource:
    """The same resource, with its hash computed once.

    The official encoder groups every span of a batch by its resource, and ``Resource.__hash__`` serializes
    all attributes to JSON each time: about a fifth of the encoding cost. A resource's attributes never
    change, so ctxprop's provider uses one whose hash is cached.
    """
    return _StableResource(resource.attributes, resource.schema_url)


class _StableResource(Resource):
    def __init__(self, attributes: Any, schema_url: str | None = None) -> None:
        super().__init__(attributes, schema_url)
        self._ctxprop_hash = super().__hash__()

    def __hash__(self) -> int:
        return self._ctxprop_hash

    def __eq__(self, other: object) -> bool:
        return self is other or super().__eq__(other)


def _import_send_path() -> None:
    """Import now what the first export would import lazily.

    The first export often happens at exit (atexit, SIGTERM). Importing a C extension then (protobuf's upb,
    ``decimal``...) makes CPython forget that the program is ending by an unhandled KeyboardInterrupt, and
    the exit status turns from -SIGINT (130) into 1. Importing at ``init()`` keeps Ctrl-C's status intact.
    """
    import shlex  # noqa: F401

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    encode_spans([])
    ExportTraceServiceResponse.FromString(b"")


def _is_stale_connection(error: BaseException) -> bool:
    # A pooled keep-alive connection the server already closed fails at once with a disconnect; a new
    # connection usually works. Refused connections and timeouts are not worth an immediate retry.
    text = repr(error)
    return "RemoteDisconnected" in text or "ConnectionResetError" in text or "BrokenPipe" in text
