"""Process pools whose tasks run in the submitter's trace context and scopes, and ship their spans home.

Per task, the submitter's side sends a small envelope: the W3C ``traceparent``/``tracestate`` and
``baggage`` (injected with OpenTelemetry's global propagator), the tags of the isolation and current
scopes, and the parent's resource (pickled once per resource, then reused as bytes). The worker process
runs the task in a copy of its own context with that trace context attached and the scopes forked from the
tags; spans it makes go to a worker-local ``TracerProvider`` that only collects them. They travel back with
the task's outcome, and the parent feeds them to its own provider's processors, so they reach the parent's
exporter (with its configuration, spool and retries) with no set-up in the worker. This works the same
under fork, spawn and forkserver, and needs nothing at worker exit, where pool workers skip ``atexit``.

Portable capture hooks (the Sentry adapter, when enabled) add their own state to the envelope, applied in
the worker inside the task's context; with none registered the envelope has an empty slot and nothing else.

A forked worker inherits the parent's pipeline with the parent's queued spans: it is dropped without
export (``_pipeline.forget()``), so nothing is sent twice.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from contextvars import copy_context
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from ctxprop import _capture, _stats
from ctxprop._capture import PortableState, _activate_portable, _capture_portable, _enter
from ctxprop._fork_context import worker_context
from ctxprop._scopes import CURRENT, ISOLATION, AttrValue
from ctxprop._spanwire import WireSpan, from_wire, to_wire

__all__ = ["ContextAwareProcessPoolExecutor", "bind_for_process", "submit_with_context", "unpack_result"]

R = TypeVar("R")

# (parent pid, W3C carrier, isolation tags, current tags, pickled parent resource or None, portable capture
# hooks' states: empty, so one byte on the wire, unless such a hook is registered, e.g. the Sentry adapter)
_Envelope = tuple[
    int, dict[str, str], dict[str, AttrValue], dict[str, AttrValue], bytes | None, PortableState
]
# (ok, value or exception, spans made in the worker during the task)
_Outcome = tuple[bool, Any, tuple[WireSpan, ...]]


# --- parent side -------------------------------------------------------------------------------------------


def _parent_provider() -> TracerProvider | None:
    """The SDK provider whose processors receive worker spans: ctxprop's pipeline, else the global one."""
    from ctxprop import _pipeline

    provider = _pipeline.current_provider()
    if provider is None:
        global_provider = trace.get_tracer_provider()
        if isinstance(global_provider, TracerProvider):
            provider = global_provider
    return provider


_resource_cache: tuple[Resource | None, bytes | None] = (None, None)


def _resource_blob(provider: TracerProvider | None) -> bytes | None:
    global _resource_cache  # noqa: PLW0603
    if provider is None:
        return None
    resource = provider.resource
    cached_resource, blob = _resource_cache
    if cached_resource is not resource:
        blob = pickle.dumps(
            (dict(resource.attributes), resource.schema_url), protocol=pickle.HIGHEST_PROTOCOL
        )
        _resource_cache = (resource, blob)
    return blob


def _envelope() -> _Envelope:
    carrier: dict[str, str] = {}
    try:
        propagate.inject(carrier)
    except Exception:  # noqa: BLE001 - a misbehaving custom propagator must not fail the submit
        _stats.incr("propagation_errors")
    return (
        os.getpid(),
        carrier,
        ISOLATION.get()._tags,
        CURRENT.get()._tags,
        _resource_blob(_parent_provider()),
        _capture_portable() if _capture._portable else (),
    )


def _deliver(spans: tuple[WireSpan, ...]) -> None:
    """Feed spans made in a worker to the parent's processors (never raises)."""
    provider = _parent_provider()
    if provider is None:
        _stats.incr("process_spans_dropped", len(spans))
        return
    processor = provider._active_span_processor
    resource = provider.resource
    delivered = 0
    for wire in spans:
        try:
            processor.on_end(from_wire(wire, resource=resource))
            delivered += 1
        except Exception:  # noqa: BLE001 - a bad span or processor must not fail the user's result
            _stats.incr("process_spans_dropped")
    _stats.incr("process_spans_received", delivered)


def unpack_result(outcome: _Outcome) -> Any:
    """The value of a task run through :func:`bind_for_process`; its worker spans go to the pipeline.

    Re-raises the task's exception (with the worker's traceback as ``__cause__``, as a plain
    ``ProcessPoolExecutor`` does).

    .. versionadded:: 0.1.0
    """
    ok, payload, spans = outcome
    if spans:
        _deliver(spans)
    if ok:
        return payload
    raise payload


def bind_for_process(
    func: Callable[..., Any], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
) -> Callable[[], _Outcome]:
    """A picklable no-argument callable that runs ``func(*args, **kwargs)`` in a worker process in the
    caller's trace context and scopes, for any ``ProcessPoolExecutor``; pass its result to
    :func:`unpack_result`.

    >>> bound = bind_for_process(max, (1, 5))
    >>> unpack_result(bound())  # in a pool: unpack_result(pool.submit(bound).result())
    5

    .. versionadded:: 0.1.0
    """
    import functools

    return functools.partial(_run_in_worker, _envelope(), func, args, kwargs or {})


class _OutcomeFuture(Future):  # type: ignore[type-arg]
    """The user's future: completes with the unpacked outcome of the pool's own future."""

    def __init__(self, inner: Future[_Outcome], on_spans: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._inner = inner
        self._on_spans = on_spans
        inner.add_done_callback(self._transfer)

    def cancel(self) -> bool:
        # The pool only knows its own future; cancelling it runs _transfer, which cancels this one.
        return self._inner.cancel() or super().cancelled()

    def running(self) -> bool:
        return self._inner.running() or super().running()

    def _transfer(self, inner: Future[_Outcome]) -> None:
        if inner.cancelled():
            super().cancel()
            self.set_running_or_notify_cancel()
            return
        exc = inner.exception()
        if exc is not None:
            self.set_exception(exc)
            return
        try:
            ok, payload, spans = inner.result()
            if spans:
                _deliver(spans)
                if self._on_spans is not None:
                    self._on_spans()
        except Exception as fault:  # noqa: BLE001 - never let a callback error escape to the pool's logger
            self.set_exception(fault)
            return
        if ok:
            self.set_result(payload)
        else:
            self.set_exception(payload)


def submit_with_context(
    executor: ProcessPoolExecutor,
    fn: Callable[..., R],
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    on_spans: Callable[[], None] | None = None,
) -> Future[R]:
    """Submit to any ``ProcessPoolExecutor`` the way ``ContextAwareProcessPoolExecutor`` does."""
    inner = ProcessPoolExecutor.submit(executor, _run_in_worker, _envelope(), fn, args, kwargs or {})
    return _OutcomeFuture(inner, on_spans)


class ContextAwareProcessPoolExecutor(ProcessPoolExecutor):
    """A drop-in ``ProcessPoolExecutor`` whose tasks run in the submitter's trace context and scopes.

    Each task carries the W3C trace context, baggage and the scopes' tags to the worker. Spans made in the
    worker are children of the submitting span, carry the tags, and are shipped back with the result to
    this process's pipeline: they reach its exporter with no set-up in the worker, under every start
    method (``mp_context=``), and ``shutdown()`` flushes them before it returns.

    >>> import ctxprop
    >>> with ctxprop.isolation_scope():
    ...     ctxprop.set_tag("job", "nightly")
    ...     with ContextAwareProcessPoolExecutor(max_workers=1) as pool:
    ...         pool.submit(abs, -3).result()
    3

    .. versionadded:: 0.1.0
    """

    _ctxprop_propagates = True

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        **kwargs: Any,
    ) -> None:
        if initializer is not None and not callable(initializer):
            # As the stdlib does, at construction: wrapped in ours, it would only fail in each worker.
            raise TypeError("initializer must be a callable")
        super().__init__(max_workers, mp_context, _worker_initializer, (initializer, initargs), **kwargs)
        self._ctxprop_fed = threading.Event()

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` in a worker, in the caller's trace context and scopes."""
        return submit_with_context(self, fn, args, kwargs, on_spans=self._ctxprop_fed.set)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut the pool down; with ``wait``, also flush the spans its workers shipped back."""
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait and self._ctxprop_fed.is_set():
            self._ctxprop_fed.clear()
            _flush_parent()


def _flush_parent() -> None:
    from ctxprop import _pipeline

    try:
        if _pipeline.current_provider() is not None:
            _pipeline.flush()
            return
        provider = _parent_provider()
        if provider is not None:
            provider.force_flush(3000)
    except Exception:  # noqa: BLE001 - flushing telemetry must never fail the pool's shutdown
        _stats.incr("process_flush_errors")


# --- worker side -------------------------------------------------------------------------------------------


class _Collector(SpanProcessor):
    """Keeps the worker's ended spans until the running task's outcome takes them."""

    def __init__(self) -> None:
        self.spans: deque[ReadableSpan] = deque()

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)

    def drain(self) -> tuple[WireSpan, ...]:
        out = []
        pop = self.spans.popleft
        while True:
            try:
                span = pop()
            except IndexError:
                break
            try:
                out.append(to_wire(span))
            except Exception:  # noqa: BLE001 - one odd span must not lose the task's result
                _stats.incr("process_spans_dropped")
        return tuple(out)


_worker_pid = 0
_worker_blob: bytes | None = None
_collector: _Collector | None = None
_inherited_collector = False  # _collector sits in the provider inherited from the parent through fork


def _enter_worker_process() -> None:
    """Once per worker process: drop a pipeline inherited through fork (or a re-imported main module)."""
    global _worker_pid, _worker_blob, _collector, _inherited_collector  # noqa: PLW0603
    if _worker_pid == os.getpid():
        return
    _worker_pid = os.getpid()
    _worker_blob = None
    _collector = None
    _inherited_collector = False
    try:
        inherited = _parent_provider()
        from ctxprop import _pipeline

        _pipeline.forget()  # also resets OTel's global provider, which this worker sets anew
        if inherited is not None:
            _redirect(inherited)
    except Exception:  # noqa: BLE001 - the task must still run when the inherited pipeline is odd
        _stats.incr("process_worker_setup_errors")
    if _capture._hooks:
        # In the worker's own main context, which tasks copy (before the user's initializer in our pool,
        # at the first task in a plain one): a forked worker drops hook state it inherited from whichever
        # thread started it, e.g. that thread's Sentry scopes at the time.
        _capture._enter_worker()


def _redirect(inherited: TracerProvider) -> None:
    """Make the provider inherited through fork collect for the parent instead of exporting.

    Tracers the application got before the fork (a module-level ``tracer = trace.get_tracer(...)``
    already used in the parent) are bound to this very provider object; replacing its processors, not
    the provider, is what sends their spans home too. It is this process's own copy: the parent's is
    untouched.
    """
    global _collector, _inherited_collector
    from ctxprop._tagging import ScopeTagSpanProcessor

    collector = _Collector()
    # Tracers hold the provider's multi-processor object itself, not the provider: swap its members.
    multi = inherited._active_span_processor
    if not hasattr(multi, "_span_processors"):
        raise TypeError(f"unexpected span processor {type(multi).__name__}")
    multi._span_processors = (ScopeTagSpanProcessor(), collector)
    trace.set_tracer_provider(inherited)
    _collector, _inherited_collector = collector, True


def _worker_collector(blob: bytes | None) -> _Collector | None:
    """The collector of the worker-local provider for the parent's resource ``blob``."""
    global _worker_blob, _collector
    if _inherited_collector:
        return _collector  # the parent's own provider (and resource), inherited through fork
    if blob is None:
        return None
    if blob != _worker_blob or _collector is None:
        from ctxprop._tagging import ScopeTagSpanProcessor

        attributes, schema_url = pickle.loads(blob)  # noqa: S301 - bytes made by our parent process
        collector = _Collector()
        provider = TracerProvider(resource=Resource(attributes, schema_url))
        provider.add_span_processor(ScopeTagSpanProcessor())
        provider.add_span_processor(collector)
        from ctxprop import _pipeline

        # OTel lets the global provider be set once per process; a worker replaces what it had.
        _pipeline._reset_global_provider()
        trace.set_tracer_provider(provider)
        _worker_blob, _collector = blob, collector
    return _collector


def _worker_initializer(initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> None:
    _enter_worker_process()
    if initializer is not None:
        initializer(*initargs)


def _in_context(envelope: _Envelope, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    carrier = envelope[1]
    if carrier:
        try:
            otel_context.attach(propagate.extract(carrier))
        except Exception:  # noqa: BLE001 - a bad carrier degrades to a new trace, never a failed task
            _stats.incr("propagation_errors")
    if envelope[5]:
        _activate_portable(envelope[5])
    # Scopes forked from the tags exactly as a thread-pool task gets them.
    return _enter(envelope[2], envelope[3], (), fn, args, kwargs)


def _run_in_worker(envelope: _Envelope, fn: Callable[..., Any], args: Any, kwargs: Any) -> _Outcome:
    if envelope[0] == os.getpid():
        # Run in the submitting process itself (e.g. the bound callable called directly): the spans are
        # already in this process's pipeline, only the context needs applying.
        try:
            return (True, copy_context().run(_in_context, envelope, fn, args, kwargs), ())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through unpack_result
            return (False, exc, ())
    _enter_worker_process()
    collector = _worker_collector(envelope[4])
    try:
        value = worker_context().run(_in_context, envelope, fn, args, kwargs)
        ok = True
    except BaseException as exc:  # noqa: BLE001 - re-raised in the parent by the outcome future
        ok = False
        value = _remote_exception(exc)
    return (ok, value, collector.drain() if collector is not None else ())


def _remote_exception(exc: BaseException) -> Any:
    try:
        from concurrent.futures.process import _ExceptionWithTraceback

        return _ExceptionWithTraceback(exc, exc.__traceback__)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - the private helper moved: ship the bare exception
        return exc
