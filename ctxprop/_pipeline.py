"""``init()``, ``flush()``, ``close()``: one global TracerProvider whose spans reach the collector however
the process ends.

``init()`` resolves the configuration (``_config``), builds the OTLP sender (``_export``) and ctxprop's
batching processor (``_processor``) behind the scope-tag processor, opens the spool, and arms the endings
(``_lifecycle``). ``flush()`` and ``close()`` work in the calling thread against one deadline and never
raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from ctxprop import _lifecycle, _stats
from ctxprop._config import PipelineConfig, build_config
from ctxprop._processor import CtxpropSpanProcessor
from ctxprop._tagging import ScopeTagSpanProcessor

__all__ = [
    "aclose",
    "aflush",
    "close",
    "current_config",
    "current_processor",
    "current_provider",
    "flush",
    "forget",
    "init",
]

_lock = threading.Lock()
_provider: TracerProvider | None = None
_processor: CtxpropSpanProcessor | None = None
_config: PipelineConfig | None = None


def init(
    *,
    service_name: str | None = None,
    endpoint: str | None = None,
    exporter: SpanExporter | None = None,
    spool_dir: str | None = None,
    close_timeout: float = 3.0,
    durable: bool = False,
    handle_signals: bool = True,
    headers: Mapping[str, str] | None = None,
    compression: str | None = None,
    max_queue_size: int | None = None,
    max_export_batch_size: int | None = None,
    schedule_delay: float | None = None,
    resource_attributes: Mapping[str, Any] | None = None,
) -> TracerProvider:
    """Set up the global TracerProvider: scope tags on every span, ctxprop's batching processor, OTLP/HTTP
    export (or ``exporter``), the spool, and delivery at every ending (close, exit, exception, SIGTERM,
    Ctrl-C, fork).

    The endpoint is ``endpoint``, else ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (as is), else
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``, else ``http://localhost:4318/v1/traces``. Bad settings
    raise ``ValueError``; a second call warns (``RuntimeWarning``) and returns the first provider.

    >>> import ctxprop
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    >>> provider = ctxprop.init(service_name="doc", exporter=InMemorySpanExporter(), handle_signals=False)
    >>> ctxprop.close()

    .. versionadded:: 0.1.0
    """
    global _provider, _processor, _config
    with _lock:
        if _provider is not None:
            warnings.warn(
                "ctxprop.init() was already called in this process; keeping the first pipeline "
                "(call ctxprop.close() first to start a new one)",
                RuntimeWarning,
                stacklevel=2,
            )
            return _provider
        cfg = build_config(
            service_name=service_name,
            endpoint=endpoint,
            spool_dir=spool_dir,
            close_timeout=close_timeout,
            durable=durable,
            handle_signals=handle_signals,
            headers=headers,
            compression=compression,
            max_queue_size=max_queue_size,
            max_export_batch_size=max_export_batch_size,
            schedule_delay=schedule_delay,
            resource_attributes=resource_attributes,
        )
        if exporter is not None and not callable(getattr(exporter, "export", None)):
            raise ValueError(f"init(exporter={exporter!r}): expected an OpenTelemetry SpanExporter")
        from ctxprop._export import quiet_official_loggers

        quiet_official_loggers()
        attrs: dict[str, Any] = dict(cfg.resource_attributes)
        if service_name is not None:
            attrs[SERVICE_NAME] = service_name
        from ctxprop._export import stable_resource

        resource = stable_resource(Resource.create(attrs))
        if exporter is not None:
            processor = CtxpropSpanProcessor(
                exporter=exporter,
                max_queue_size=cfg.max_queue_size,
                max_export_batch_size=cfg.max_export_batch_size,
                schedule_delay=cfg.schedule_delay,
                export_timeout=cfg.export_timeout,
            )
        else:
            from ctxprop._export import OTLPSender

            processor = CtxpropSpanProcessor(
                sender=OTLPSender(cfg.endpoint, headers=cfg.headers, compression=cfg.compression),
                spool=_open_spool(cfg),
                max_queue_size=cfg.max_queue_size,
                max_export_batch_size=cfg.max_export_batch_size,
                schedule_delay=cfg.schedule_delay,
                export_timeout=cfg.export_timeout,
                durable=cfg.durable,
            )
        # ctxprop owns the ending (atexit with a deadline); the SDK's own atexit shutdown would be a second,
        # unbounded one.
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(ScopeTagSpanProcessor())
        provider.add_span_processor(processor)
        _set_global_provider(provider)
        _provider, _processor, _config = provider, processor, cfg
    _lifecycle.install(close, handle_signals=cfg.handle_signals, flush=flush)
    processor.request_replay()
    _adopt_environment()
    _enable_sentry_adapter()
    return provider


def _open_spool(cfg: PipelineConfig) -> Any:
    try:
        from ctxprop import _spool
    except ImportError:
        return None
    try:
        directory = cfg.spool_dir if cfg.spool_dir is not None else _spool.default_spool_dir(cfg.service_name)
        return _spool.Spool.open(directory)
    except Exception:  # noqa: BLE001 - without a spool, failed batches stay in memory within the bound
        _stats.incr("spool_errors")
        return None


def _adopt_environment() -> None:
    try:
        from ctxprop import _subprocess

        _subprocess.adopt_environment()
    except Exception:  # noqa: BLE001 - continuing a parent's trace is best effort, init() must succeed
        _stats.incr("adopt_environment_errors")


def _enable_sentry_adapter() -> None:
    # Sentry users get forked Sentry scopes with every capture; ctxprop never imports Sentry itself.
    if "sentry_sdk" not in sys.modules:
        return
    try:
        from ctxprop import _sentry

        _sentry.auto_enable()
    except Exception:  # noqa: BLE001 - the Sentry adapter must never break init()
        _stats.incr("sentry_adapter_errors")


def _set_global_provider(provider: TracerProvider) -> None:
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        # Someone set an SDK provider already; OTel refuses a second one (and logs to stderr).
        warnings.warn(
            "a global TracerProvider was already set before ctxprop.init(); ctxprop's provider is returned "
            "but trace.get_tracer() keeps using the other one",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    trace.set_tracer_provider(provider)


def _reset_global_provider() -> None:
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER = None
    trace._TRACER_PROVIDER_SET_ONCE = Once()


def current_provider() -> TracerProvider | None:
    """The provider ``init()`` built, or None before ``init()`` / after ``close()``.

    .. versionadded:: 0.1.0
    """
    return _provider


def current_processor() -> CtxpropSpanProcessor | None:
    """ctxprop's batching processor of the current pipeline, or None.

    .. versionadded:: 0.1.0
    """
    return _processor


def current_config() -> PipelineConfig | None:
    """The resolved configuration of the current pipeline, or None."""
    return _config


def _deadline(timeout: float | None) -> float:
    cfg = _config
    t = (cfg.close_timeout if cfg is not None else 3.0) if timeout is None else timeout
    try:
        t = max(0.0, float(t))
    except (TypeError, ValueError):
        t = 3.0
    return time.monotonic() + t


def flush(timeout: float | None = None) -> bool:
    """Export every span ended so far, in the calling thread, within ``timeout`` seconds (default
    ``close_timeout``). What is not sent by then goes to the spool. Returns True when all were delivered;
    never raises.

    >>> import ctxprop
    >>> ctxprop.flush(0.5)
    True

    .. versionadded:: 0.1.0
    """
    processor = _processor
    if processor is None:
        return True
    try:
        return processor.flush_until(_deadline(timeout))
    except Exception:  # noqa: BLE001 - the telemetry path never raises into the application
        return False


def close(timeout: float | None = None) -> None:
    """Flush, send what the spool holds within what remains of the same deadline, and shut down.

    Idempotent, silent, never raises; safe from atexit and signal handlers.

    >>> import ctxprop
    >>> ctxprop.close()

    .. versionadded:: 0.1.0
    """
    global _provider, _processor, _config
    processor, provider = _processor, _provider
    if processor is None:
        return
    deadline = _deadline(timeout)
    # Detach first so a second close() (atexit after an explicit one, or SIGTERM during close) is a no-op.
    _provider, _processor, _config = None, None, None
    with _lifecycle.closing():
        try:
            processor.shutdown_until(deadline)
        except Exception:  # noqa: BLE001 - never raise from close()
            _stats.incr("export_errors")
        _lifecycle.uninstall()
        if provider is not None and trace.get_tracer_provider() is provider:
            _reset_global_provider()


def forget() -> None:
    """Drop the pipeline without flushing or shutting it down, and reset OpenTelemetry's global provider.

    For a pool-worker process that inherited the parent's pipeline through fork and must not export it.

    .. versionadded:: 0.1.0
    """
    global _provider, _processor, _config
    processor = _processor
    _provider, _processor, _config = None, None, None
    if processor is not None:
        processor.forget()
    _lifecycle.uninstall()
    _reset_global_provider()


def _settle(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


async def _in_thread(fn: Any, timeout: float | None) -> Any:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def run() -> None:
        try:
            result = fn(timeout)
        except Exception:  # noqa: BLE001 - flush/close never raise; be sure the future settles
            result = None
        # The loop may close between the check and the call (the awaiting task was cancelled and the loop
        # shut down): then nobody waits for the result, and the error must not reach stderr.
        with contextlib.suppress(RuntimeError):
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, fut, result)

    # A daemon thread, not the loop's default executor: it may be saturated, and its threads are joined at
    # interpreter exit.
    threading.Thread(target=run, name="ctxprop-aflush", daemon=True).start()
    budget = (_deadline(timeout) - time.monotonic()) + 1.0
    try:
        return await asyncio.wait_for(asyncio.shield(fut), budget)
    except TimeoutError:
        return None


async def aflush(timeout: float | None = None) -> bool:
    """``flush()`` for asyncio code: runs in a thread, so the event loop keeps running meanwhile.

    .. versionadded:: 0.1.0
    """
    return bool(await _in_thread(flush, timeout))


async def aclose(timeout: float | None = None) -> None:
    """``close()`` for asyncio code, without blocking the event loop.

    .. versionadded:: 0.1.0
    """
    await _in_thread(close, timeout)


def _reset_for_tests() -> None:
    """Forget the pipeline and OpenTelemetry's global provider, so a test can call ``init()`` again."""
    with _lock:
        forget()
