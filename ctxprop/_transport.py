"""The OTLP/HTTP transport: one POST of already-encoded ``ExportTraceServiceRequest`` bytes, within a
deadline for the whole request.

Spans are encoded once, by the processor (``_encoding``); the same bytes can then be sent, retried,
spooled and replayed without encoding again. The POST is written here, on keep-alive sockets, and its
answer is parsed by the standard library's ``http.client``; headers, compression, TLS settings, proxies
and ``Retry-After`` parsing are done here, with no private OpenTelemetry name. A socket timeout bounds
each read, not the request: a collector trickling its answer one byte a second would hold the caller for
ever. So every connect, send and read is given what is left of the request's deadline as its timeout,
and the request ends at the deadline however the collector answers.

Under the GIL the export thread's CPU is the application's: a request is one ``sendall`` and one
response read, with nothing per request that starts a thread, scans the environment or builds a
session.

>>> sender = OTLPSender("http://127.0.0.1:9/v1/traces")
>>> sender(b"", 0.5).ok
False
>>> sender.close()
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import gzip
import http.client
import io
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
import weakref
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.resources import Resource

from ctxprop._config import _check_header_value, redact_url
from ctxprop._resolver import Resolver, connect

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


class _Deadline:
    """The whole request's deadline; every connect, send and read of the request waits at most until it."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at  # a time.monotonic() value

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline has passed")
        return left


class _BoundedReader(io.RawIOBase):
    """The socket as the response parser reads it: each read waits at most until the request's deadline,
    so an answer trickled a byte at a time ends at the deadline, not a socket timeout per byte later."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(self._deadline.remaining())
        return self._sock.recv_into(buffer)


class _Connection:
    """One keep-alive connection to the collector (or through a proxy to it)."""

    __slots__ = ("deadline", "sock")

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self.sock = sock
        self.deadline = deadline

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        # What http.client.HTTPResponse reads the status line, headers and body from.
        return io.BufferedReader(_BoundedReader(self.sock, self.deadline))

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(self.deadline.remaining())  # sendall's timeout bounds the whole send
        self.sock.sendall(data)

    def answer(self, method: str = "POST") -> http.client.HTTPResponse:
        resp = http.client.HTTPResponse(self, method=method)  # type: ignore[arg-type]  # reads makefile()
        resp.begin()
        return resp

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass(frozen=True)
class _Route:
    """Where the POSTs go, decided once from the endpoint and the environment's proxy."""

    tls: bool  # https endpoint
    host: str  # the collector's host and port (TLS server name, Host header, CONNECT target)
    port: int
    connect: tuple[str, int]  # what the socket connects to: the collector, or the proxy
    target: str  # the request-target: path and query, or the absolute URL for a plain-HTTP proxy
    tunnel: bool  # https through a proxy: CONNECT first
    proxy_auth: str | None  # Proxy-Authorization value from the proxy URL's credentials


def _route(endpoint: str, proxies: Mapping[str, str]) -> _Route:
    from requests.utils import get_auth_from_url, select_proxy

    url = urllib.parse.urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"the OTLP endpoint must be an http(s):// URL with a host: {redact_url(endpoint)!r}")
    tls = url.scheme == "https"
    port = url.port or (443 if tls else 80)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    proxy = select_proxy(endpoint, dict(proxies))
    if not proxy:
        return _Route(tls, url.hostname, port, (url.hostname, port), path, False, None)
    purl = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if purl.scheme != "http" or not purl.hostname:
        raise ValueError(
            f"ctxprop sends through http:// proxies only; the environment names {redact_url(proxy)!r} for"
            f" {redact_url(endpoint)!r} (set NO_PROXY for the collector's host, or an http:// proxy)"
        )
    user, password = get_auth_from_url(purl.geturl())
    auth = _basic(user, password) if user or password else None
    via = (purl.hostname, purl.port or 80)
    if tls:
        return _Route(True, url.hostname, port, via, path, True, auth)
    netloc = _host_port(url.hostname, port, 80)
    absolute = urllib.parse.urlunsplit(("http", netloc, url.path or "/", url.query, ""))
    return _Route(False, url.hostname, port, via, absolute, False, auth)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("latin-1")).decode("ascii")


def _host_port(host: str, port: int, default: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == default else f"{shown}:{port}"


def _from_environment(endpoint: str, verify: Any) -> tuple[dict[str, str], Any, Any]:
    """What ``requests`` reads from the environment on every request, read once for this endpoint: its
    proxies (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), the CA bundle (``REQUESTS_CA_BUNDLE``,
    ``CURL_CA_BUNDLE``) when no OTLP certificate is set, and ``~/.netrc`` credentials for its host.
    """
    from requests.utils import get_environ_proxies, get_netrc_auth

    proxies = get_environ_proxies(endpoint)
    if verify is True:
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    return proxies, verify, get_netrc_auth(endpoint)


class OTLPSender:
    """Sends encoded payloads to one OTLP/HTTP traces endpoint over keep-alive connections.

    ``sender(payload, timeout)`` makes one attempt (plus one immediate retry of a stale pooled
    connection, within the same timeout), never takes longer than ``timeout`` (the name's lookup and
    every connect, send and read wait at most until the request's deadline: see ``_resolver``), and
    returns a :class:`SendOutcome`; it never raises. TLS settings come from
    ``OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`` / ``..._CLIENT_KEY`` / ``..._CLIENT_CERTIFICATE`` (or the
    ``OTEL_EXPORTER_OTLP_*`` ones), as with the official exporter; without a certificate, the CA bundle
    is ``REQUESTS_CA_BUNDLE``, else certifi's, as ``requests`` verifies. Proxies (``http://`` ones; any
    other scheme is refused here, with its reason) and ``~/.netrc`` come from the environment as
    ``requests`` reads them, once, when the sender is made.

    A request is one ``sendall`` of its head and body and one response read: nothing per request
    starts a thread or reads the environment. (Through ``requests`` a POST cost the export thread about
    20 times the CPU, and started a timer thread to bound it.)
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
        ca = _env_path("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE")
        self._verify: Any = ca if ca is not None else True
        cert = _env_path(
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"
        )
        key = _env_path("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY")
        self._cert: Any = (cert, key) if cert and key else cert
        self._proxies, self._verify, self._auth = _from_environment(endpoint, self._verify)
        self._route = _route(endpoint, self._proxies)
        self._resolver = Resolver(*self._route.connect)
        hdrs = {
            "host": _host_port(self._route.host, self._route.port, 443 if self._route.tls else 80),
            "user-agent": _user_agent(),
            "content-type": "application/x-protobuf",
        }
        from requests.utils import get_auth_from_url

        url_user, url_password = get_auth_from_url(endpoint)
        if url_user or url_password:
            hdrs["authorization"] = _basic(url_user, url_password)
        elif self._auth:
            hdrs["authorization"] = _basic(*self._auth)
        if self._route.proxy_auth and not self._route.tunnel:
            hdrs["proxy-authorization"] = self._route.proxy_auth
        # Headers the user configured (OTEL_EXPORTER_OTLP_HEADERS) win over what is derived above.
        hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
        if compression != "none" and "content-encoding" not in hdrs:
            hdrs["content-encoding"] = compression
        hdrs.pop("content-length", None)
        self._head = (
            f"POST {self._route.target} HTTP/1.1\r\n"
            # (headers from init() and the environment were checked there; this checks the rest too)
            + "".join(f"{_header_name(k)}: {_check_header_value(v, k)}\r\n" for k, v in hdrs.items())
        ).encode("latin-1")
        self._lock = threading.Lock()
        # Pooled keep-alive connections. The list object stays the same for the sender's life, so the
        # finalizer closes what it holds when a sender is dropped without close().
        self._idle: list[_Connection] = []
        weakref.finalize(self, _close_all, self._idle)
        self._tls: ssl.SSLContext | None = None
        self._pid = os.getpid()
        _import_send_path()

    def reset_after_fork(self) -> None:
        """In a forked child: no pooled connection (the parent's sockets are its own)."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._resolver.reset_after_fork()
        _close_all(self._idle)  # this process's copies of the descriptors; the parent's connections live on

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
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        reused = conn is not None
        try:
            if conn is None:
                box = _Deadline(deadline)
                conn = _Connection(self._open(box), box)
            else:
                conn.deadline.at = deadline
            conn.sendall(self._head + b"Content-Length: %d\r\n\r\n" % len(data) + data)
            resp = conn.answer()
            body = resp.read(_MAX_BODY)
            keep = resp.isclosed() and not resp.will_close  # the whole answer read, and no "close"
            status, headers = resp.status, resp.headers
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if conn is not None:
                conn.close()
            return _NO_ANSWER, reused and _is_stale_connection(exc)
        if keep:
            with self._lock:
                if self._pid == os.getpid() and len(self._idle) < 2:
                    self._idle.append(conn)
                    conn = None
        if conn is not None:
            conn.close()
        return _outcome(status, headers, body), False

    def _open(self, deadline: _Deadline) -> socket.socket:
        route = self._route
        sock = connect(self._resolver, deadline.at)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if route.tunnel:
                conn = _Connection(sock, deadline)
                target = _host_port(route.host, route.port, -1)
                auth = f"Proxy-Authorization: {route.proxy_auth}\r\n" if route.proxy_auth else ""
                conn.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode("latin-1"))
                answer = conn.answer("CONNECT")
                if answer.status != 200:
                    raise OSError(f"the proxy answered {answer.status} to CONNECT")
            if route.tls:
                tls = self._tls_context().wrap_socket(
                    sock, server_hostname=route.host, do_handshake_on_connect=False
                )
                sock = tls
                tls.settimeout(deadline.remaining())
                tls.do_handshake()  # the timeout bounds the whole handshake
        except BaseException:
            sock.close()
            raise
        return sock

    def _tls_context(self) -> ssl.SSLContext:
        # As requests verifies for the official exporter: against one CA bundle (the OTLP certificate,
        # REQUESTS_CA_BUNDLE, else certifi's), not the system's store besides it.
        if self._tls is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname checked, certificate required
            verify = self._verify
            if verify is True:
                try:
                    import certifi

                    verify = certifi.where()
                except ImportError:  # pragma: no cover - certifi comes with requests
                    ctx.load_default_certs()
            if isinstance(verify, str):
                if os.path.isdir(verify):
                    ctx.load_verify_locations(capath=verify)
                else:
                    ctx.load_verify_locations(cafile=verify)
            if self._cert:
                cert, key = self._cert if isinstance(self._cert, tuple) else (self._cert, None)
                ctx.load_cert_chain(cert, key)
            self._tls = ctx
        return self._tls

    def close(self) -> None:
        """Close the pooled connections (idempotent)."""
        with self._lock:
            _close_all(self._idle)


def _close_all(conns: list[_Connection]) -> None:
    while conns:
        conns.pop().close()


def _header_name(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))


def _outcome(status: int, headers: Mapping[str, str] | http.client.HTTPMessage, body: bytes) -> SendOutcome:
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
    # A pooled keep-alive connection the server already closed fails at once with a disconnect (no
    # status line, a reset, a broken pipe); a new connection usually works. Refused connections and
    # timeouts are not worth an immediate retry.
    return isinstance(error, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected))
