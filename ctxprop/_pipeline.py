"""``init()``, ``flush()``, ``close()``: one global TracerProvider whose spans reach the collector however
the process ends.

``init()`` resolves the configuration (``_config``), builds the OTLP sender (``_transport``) and ctxprop's
batching processor (``_processor``) behind the scope-tag processor, opens the spool, and arms the endings
(``_lifecycle``). ``flush()`` and ``close()`` work in the calling thread against one deadline and never
raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
import warnings
import weakref
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
_configured = False  # the pipeline was set up by the ctxprop configurator (attach), not by init()
_owner_pid = 0  # the process that set the pipeline up (a forked child inherits it, and may start its own)
# A provider someone else set as the global one before init(): flushed at ctxprop's endings too.
_foreign: TracerProvider | None = None


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
    encoder: str | None = None,
) -> TracerProvider:
    """Set up the global TracerProvider: scope tags on every span, ctxprop's batching processor, OTLP/HTTP
    export (or ``exporter``), the spool, and delivery at every ending (close, exit, exception, SIGTERM,
    Ctrl-C, fork).

    The endpoint is ``endpoint``, else ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (as is), else
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``, else ``http://localhost:4318/v1/traces``. Bad settings
    raise ``ValueError``; a second call warns (``RuntimeWarning``) and returns the first provider. In a
    forked child (a pool worker's initializer), the first call there replaces the pipeline it inherited.
    ``encoder`` (else ``CTXPROP_ENCODER``) is ``"ctxprop"`` (the default: ctxprop's own OTLP encoder, the
    same bytes at a fraction of the CPU) or ``"official"`` (OpenTelemetry's ``encode_spans``).

    >>> import ctxprop
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    >>> provider = ctxprop.init(service_name="doc", exporter=InMemorySpanExporter(), handle_signals=False)
    >>> ctxprop.close()

    .. versionadded:: 0.1.0
    """
    global _provider, _processor, _config, _owner_pid
    # The arguments but exporter are _config.Settings' fields, by name: passed on as they are.
    settings = {name: value for name, value in locals().items() if name != "exporter"}
    with _lock:
        if _provider is not None and _configured:
            # OTEL_PYTHON_CONFIGURATOR=ctxprop set the pipeline up before the application ran: the OTEL_*
            # variables decide, and the application's own init() is the no-op it would be without it.
            return _provider
        if _provider is not None and _owner_pid != os.getpid():
            # Inherited through fork (a pool worker's initializer, before any task dropped it): this
            # process's own init() starts its own pipeline, and the parent's copy is never exported here.
            forget()
        if _provider is not None:
            warnings.warn(
                "ctxprop.init() was already called in this process; keeping the first pipeline "
                "(call ctxprop.close() first to start a new one)",
                RuntimeWarning,
                stacklevel=2,
            )
            return _provider
        cfg = build_config(**settings)
        if exporter is not None and not callable(getattr(exporter, "export", None)):
            raise ValueError(f"init(exporter={exporter!r}): expected an OpenTelemetry SpanExporter")
        from ctxprop._transport import quiet_official_loggers

        quiet_official_loggers()
        from ctxprop._noise import install_attribute_filter

        install_attribute_filter()
        attrs: dict[str, Any] = dict(cfg.resource_attributes)
        if service_name is not None:
            attrs[SERVICE_NAME] = service_name
        from ctxprop._transport import stable_resource

        resource = stable_resource(Resource.create(attrs))
        processor = _build_processor(cfg, exporter)
        # ctxprop owns the ending (atexit with a deadline); the SDK's own atexit shutdown would be a second,
        # unbounded one.
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(processor)  # it tags spans with the scopes' tags too (tag_scopes)
        _set_global_provider(provider)
        _provider, _processor, _config, _owner_pid = provider, processor, cfg, os.getpid()
    _arm(cfg, processor)
    return provider


def _build_processor(cfg: PipelineConfig, exporter: SpanExporter | None) -> CtxpropSpanProcessor:
    from ctxprop import _encoding

    # Chosen (and the ctxprop encoder calibrated) now, not at the first export, which may run at exit.
    _encoding.use_encoder(cfg.encoder)
    if exporter is not None:
        return CtxpropSpanProcessor(
            exporter=exporter,
            tag_scopes=True,
            max_queue_size=cfg.max_queue_size,
            max_export_batch_size=cfg.max_export_batch_size,
            schedule_delay=cfg.schedule_delay,
            export_timeout=cfg.export_timeout,
        )
    from ctxprop._transport import OTLPSender

    return CtxpropSpanProcessor(
        sender=OTLPSender(cfg.endpoint, headers=cfg.headers, compression=cfg.compression),
        spool=_open_spool(cfg),
        tag_scopes=True,
        max_queue_size=cfg.max_queue_size,
        max_export_batch_size=cfg.max_export_batch_size,
        schedule_delay=cfg.schedule_delay,
        export_timeout=cfg.export_timeout,
        durable=cfg.durable,
    )


def _arm(cfg: PipelineConfig, processor: CtxpropSpanProcessor) -> None:
    _lifecycle.install(close, handle_signals=cfg.handle_signals, flush=flush, close_timeout=cfg.close_timeout)
    processor.request_replay()
    _adopt_environment()
    _enable_sentry_adapter()


def attach(provider: TracerProvider, *, exporter: SpanExporter | None = None) -> bool:
    """ctxprop's pipeline on a provider built elsewhere (the ``ctxprop`` OpenTelemetry configurator: the
    SDK built the provider with its sampler, id generator and resource from the ``OTEL_*`` variables), as
    ``init()`` sets it up from those variables: scope tags, ctxprop's processor, the spool, the endings.

    Returns False (and changes nothing) when a pipeline is already set up in this process.
    """
    global _provider, _processor, _config, _configured, _owner_pid  # noqa: PLW0603
    with _lock:
        if _provider is not None:
            return False
        cfg = build_config()
        from ctxprop._transport import quiet_official_loggers

        quiet_official_loggers()
        processor = _build_processor(cfg, exporter)
        provider.add_span_processor(processor)
        _provider, _processor, _config, _configured = provider, processor, cfg, True
        _owner_pid = os.getpid()
    _arm(cfg, processor)
    return True


def _open_spool(cfg: PipelineConfig) -> Any:
    try:
        from ctxprop import _spool
    except ImportError:
        return None
    try:
        directory = cfg.spool_dir if cfg.spool_dir is not None else _spool.default_spool_dir(cfg.service_name)
        return _spool.Spool.open(directory, max_bytes=cfg.spool_max_bytes, max_age=cfg.spool_max_age)
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
    global _foreign  # noqa: PLW0603
    current = trace.get_tracer_provider()
    if isinstance(current, trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
        return
    # Someone set a provider already (opentelemetry-instrument's stock configurator, a framework, the
    # application): OTel refuses a second one. The spans of trace.get_tracer() keep going through that
    # provider's own processors; ctxprop gives them the scope tags and flushes that provider at its
    # endings (SIGTERM, exit, close()), so they are not lost when the process stops. One warning says
    # how to have ctxprop's pipeline deliver them instead.
    if isinstance(current, TracerProvider):
        try:
            _tag_once(current)
            _foreign = current
        except Exception:  # noqa: BLE001 - a foreign provider's fault must not fail init()
            _stats.incr("foreign_provider_errors")
    warnings.warn(
        f"a global TracerProvider ({type(current).__name__}) was set before ctxprop.init(), so spans "
        "from trace.get_tracer() go through its processors, not ctxprop's pipeline (ctxprop adds its scope "
        "tags to them and flushes that provider at exit and SIGTERM). For ctxprop's pipeline, run "
        "opentelemetry-instrument with OTEL_PYTHON_CONFIGURATOR=ctxprop, or add "
        "ctxprop.CtxpropSpanProcessor (and ctxprop.ScopeTagSpanProcessor) to your own provider instead "
        "of calling init()",
        RuntimeWarning,
        stacklevel=3,
    )


def adopt(provider: object) -> bool:
    """For ``opentelemetry-instrument`` without the ctxprop configurator (the instrumentor): a provider the
    SDK's stock configurator set gets ctxprop's scope tags, and is flushed at ctxprop's endings (SIGTERM,
    exit) so its ``BatchSpanProcessor`` does not lose what it queued. No-op for ctxprop's own pipeline, a
    provider already adopted, or one that is not the SDK's; returns whether it adopted ``provider``.
    """
    global _foreign  # noqa: PLW0603
    with _lock:
        if not isinstance(provider, TracerProvider) or provider is _provider or provider is _foreign:
            return False
        try:
            _tag_once(provider)
        except Exception:  # noqa: BLE001 - a foreign provider's fault must not reach the application
            _stats.incr("foreign_provider_errors")
            return False
        _foreign = provider
    _lifecycle.install(close, handle_signals=True, flush=flush)
    return True


# Foreign providers already given a ScopeTagSpanProcessor (by adopt() or an init() after them): an init()
# after close(), or after the instrumentor adopted the provider, must not stack a second one.
_tagged: weakref.WeakSet[TracerProvider] = weakref.WeakSet()


def _tag_once(provider: TracerProvider) -> None:
    if provider not in _tagged:
        provider.add_span_processor(ScopeTagSpanProcessor())
        _tagged.add(provider)


def _flush_foreign(deadline: float) -> None:
    """Flush the provider someone else set (see ``_set_global_provider``) within ``deadline``: its
    processors may ignore their timeout, so the flush runs in a thread of its own that is waited for only
    until then."""
    foreign = _foreign
    remaining = deadline - time.monotonic()
    if foreign is None or remaining <= 0:
        return

    def run() -> None:
        try:
            foreign.force_flush(int(remaining * 1000))
        except Exception:  # noqa: BLE001 - never raise from close()
            _stats.incr("foreign_provider_errors")

    t = threading.Thread(target=run, name="ctxprop-foreign-flush", daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))


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
        if _foreign is not None:
            _flush_foreign(_deadline(timeout))
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
    global _provider, _processor, _config, _configured, _foreign  # noqa: PLW0603
    processor, provider = _processor, _provider
    if processor is None:
        if _foreign is not None:  # adopt(): only someone else's provider to deliver
            _flush_foreign(_deadline(timeout))
        return
    deadline = _deadline(timeout)
    # Detach first so a second close() (atexit after an explicit one, or SIGTERM during close) is a no-op.
    _provider, _processor, _config = None, None, None
    _configured = False
    with _lifecycle.closing():
        try:
            processor.shutdown_until(deadline)
        except Exception:  # noqa: BLE001 - never raise from close()
            _stats.incr("export_errors")
        _flush_foreign(deadline)
        _foreign = None
        _lifecycle.uninstall()
        if provider is not None and trace.get_tracer_provider() is provider:
            _reset_global_provider()


def forget() -> None:
    """Drop the pipeline without flushing or shutting it down, and reset OpenTelemetry's global provider.

    For a pool-worker process that inherited the parent's pipeline through fork and must not export it.

    .. versionadded:: 0.1.0
    """
    global _provider, _processor, _config, _configured, _foreign
    processor = _processor
    _provider, _processor, _config = None, None, None
    _configured, _foreign = False, None
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
    from ctxprop import _encoding

    with _lock:
        forget()
        _encoding.use_encoder("ctxprop")
