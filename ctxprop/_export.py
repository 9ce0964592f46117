"""The OTLP/HTTP sender: POSTs already-encoded ``ExportTraceServiceRequest`` bytes.

Spans are encoded once, by the processor (``ctxprop._encoding``); the same bytes can then be sent,
retried, spooled and replayed without encoding again. The HTTP request goes through the official exporter
package's transport (``opentelemetry.exporter.http.transport``), which returns a status and headers and
never raises; this module only turns that into an outcome: ok, retryable (with Retry-After) or permanent.

>>> sender = OTLPSender("http://127.0.0.1:9/v1/traces")
>>> sender(b"", 0.5).ok
False
>>> sender.close()
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.resources import Resource

__all__ = ["PERMANENT", "OTLPSender", "SendOutcome", "quiet_official_loggers", "stable_resource"]

# 429/502/503/504 as in the official client, plus 408 (the request timed out at a proxy).
_RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})


@dataclass(frozen=True)
class SendOutcome:
    """The collector's answer to one POST."""

    ok: bool
    retryable: bool = False
    retry_after: float | None = None
    status: int | None = None

    @property
    def permanent(self) -> bool:
        """The collector rejected the payload for good (retrying would not help)."""
        return not self.ok and not self.retryable


OK = SendOutcome(True, status=200)
PERMANENT = SendOutcome(False, retryable=False)


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
    ):
        logging.getLogger(name).addHandler(logging.NullHandler())


class OTLPSender:
    """Sends encoded payloads to one OTLP/HTTP traces endpoint over a keep-alive session.

    ``sender(payload, timeout)`` makes one attempt (plus one immediate retry of a stale pooled
    connection, within the same timeout) and returns a :class:`SendOutcome`; it never raises.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        headers: Mapping[str, str] | None = None,
        compression: str = "none",
    ) -> None:
        from opentelemetry.exporter.otlp.proto.http import _OTLP_HTTP_HEADERS

        self.endpoint = endpoint
        self._compression = compression
        hdrs = {k.lower(): v for k, v in _OTLP_HTTP_HEADERS.items()}
        hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
        if compression != "none" and "content-encoding" not in hdrs:
            hdrs["content-encoding"] = compression
        self._headers = hdrs
        self._transport = self._new_transport()
        _import_send_path()

    @staticmethod
    def _new_transport() -> Any:
        from opentelemetry.exporter.otlp.proto.http._common import _build_transport

        # The official exporter's transport: keep-alive requests session, TLS settings from OTEL_* env.
        return _build_transport(
            None,
            None,
            None,
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            session=None,
        )

    def reset_after_fork(self) -> None:
        """In a forked child: a new session; the parent's pooled sockets are its own."""
        self._transport = self._new_transport()

    def _compress(self, payload: bytes) -> bytes:
        if self._compression == "gzip":
            # Level 6: nearly the ratio of 9 at a fraction of the CPU on the export thread.
            return gzip.compress(payload, compresslevel=6)
        if self._compression == "deflate":
            return zlib.compress(payload)
        return payload

    def __call__(self, payload: bytes, timeout: float) -> SendOutcome:
        import time

        from opentelemetry.exporter.otlp.common.http import _extract_retry_after

        try:
            if timeout <= 0:
                return SendOutcome(False, retryable=True)
            deadline = time.monotonic() + timeout
            data = self._compress(payload)
            result = self._transport.request(
                "POST", self.endpoint, headers=self._headers, data=data, timeout=timeout
            )
            if (
                result.status_code is None
                and self._transport.is_connection_error(result.error)
                and (remaining := deadline - time.monotonic()) > 0.05
                and _is_stale_connection(result.error)
            ):
                result = self._transport.request(
                    "POST", self.endpoint, headers=self._headers, data=data, timeout=remaining
                )
            status = result.status_code
            if status is None:
                # Refused, reset, timed out or hung up mid-request: the collector may come back.
                return SendOutcome(False, retryable=True)
            if 200 <= status < 300:
                return OK
            if status in _RETRYABLE_STATUS:
                return SendOutcome(
                    False, retryable=True, retry_after=_extract_retry_after(result), status=status
                )
            return SendOutcome(False, retryable=False, status=status)
        except Exception:  # noqa: BLE001 - the telemetry path must never raise into the exporting thread
            return SendOutcome(False, retryable=True)

    def close(self) -> None:
        """Close the keep-alive session (idempotent)."""
        try:
            self._transport.close()
        except Exception:  # noqa: BLE001 - closing a session must not fail shutdown
            return


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
    import netrc  # noqa: F401  - requests reads ~/.netrc on each request, importing this on the first
    import shlex  # noqa: F401

    from opentelemetry.exporter.otlp.common import http  # noqa: F401
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    encode_spans([])


def _is_stale_connection(error: BaseException | None) -> bool:
    # A pooled keep-alive connection the server already closed fails at once with a disconnect; a new
    # connection usually works. Refused connections and timeouts are not worth an immediate retry.
    text = repr(error)
    return "RemoteDisconnected" in text or "ConnectionResetError" in text or "BrokenPipe" in text
