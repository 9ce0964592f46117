"""``init()``, ``flush()``, ``close()``: one global TracerProvider with ctxprop's processors.

(First version: scope tags on spans and OTel's stock batching. The pipeline issue replaces the batching
with ctxprop's own processor, the lifecycle hooks and the spool.)
"""

from __future__ import annotations

import asyncio
import threading
from typing import Optional

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from ctxprop._tagging import ScopeTagSpanProcessor

__all__ = ["aclose", "aflush", "close", "flush", "init"]

_lock = threading.Lock()
_provider: Optional[TracerProvider] = None
_close_timeout = 3.0


def init(
    *,
    service_name: Optional[str] = None,
    endpoint: Optional[str] = None,
    exporter: Optional[SpanExporter] = None,
    spool_dir: Optional[str] = None,
    close_timeout: float = 3.0,
) -> TracerProvider:
    """Set up a global TracerProvider whose spans carry the active scopes' tags.

    .. versionadded:: 0.1.0
    """
    global _provider, _close_timeout  # noqa: PLW0603
    with _lock:
        if _provider is not None:
            return _provider
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint)
        resource = Resource.create({SERVICE_NAME: service_name} if service_name else {})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(ScopeTagSpanProcessor())
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _provider = provider
        _close_timeout = close_timeout
        return provider


def flush(timeout: Optional[float] = None) -> bool:
    """Export every span ended so far, within ``timeout`` seconds (default ``close_timeout``)."""
    provider = _provider
    if provider is None:
        return True
    t = _close_timeout if timeout is None else timeout
    return provider.force_flush(int(t * 1000))


def close(timeout: Optional[float] = None) -> None:
    """Flush, then shut the pipeline down."""
    global _provider  # noqa: PLW0603
    provider = _provider
    if provider is None:
        return
    flush(timeout)
    provider.shutdown()
    _provider = None


async def aflush(timeout: Optional[float] = None) -> bool:
    """``flush()`` for asyncio code, without blocking the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, flush, timeout)


async def aclose(timeout: Optional[float] = None) -> None:
    """``close()`` for asyncio code, without blocking the loop."""
    await asyncio.get_running_loop().run_in_executor(None, close, timeout)


def _reset_for_tests() -> None:
    """Forget the pipeline and OpenTelemetry's global provider, so a test can call ``init()`` again."""
    global _provider  # noqa: PLW0603
    from opentelemetry.util._once import Once

    with _lock:
        if _provider is not None:
            _provider.shutdown()
        _provider = None
        trace._TRACER_PROVIDER = None
        trace._TRACER_PROVIDER_SET_ONCE = Once()
