"""Spans made in worker processes (and sub-interpreters): collected there, delivered here, never twice.

Worker side: a worker with no ctxprop pipeline of its own gets a ``TracerProvider`` that only collects
(with the parent's resource); a task's spans are drained when it ends and travel home with its outcome.
A worker that inherited the parent's pipeline through ``fork`` has it dropped without export (its queued
spans are the parent's); the provider object itself is kept and made to collect, since tracers the
application got before the fork are bound to it. A worker whose own pipeline was started there (``init()``
in a pool initializer, or :class:`ctxprop.CtxpropWorkerPlugin` on a Dask worker) keeps it: its spans go
out through it, and nothing is shipped.

Parent side: :func:`deliver` feeds shipped spans to the parent's processors, so they reach its exporter
with its configuration, spool and retries. A batch shipped inside a result (:class:`Returned`) is delivered
when that result is unpickled in the parent, and only the first time: executors that fetch one result more
than once (Dask's ``Future.result()`` called twice) deliver nothing twice.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections import OrderedDict, deque
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from ctxprop import _capture, _stats
from ctxprop._spanwire import WireSpan, from_wire, to_wire

__all__ = [
    "Returned",
    "deliver",
    "enter_worker_process",
    "flush_parent",
    "parent_provider",
    "resource_blob",
    "worker_collector",
]

# --- parent side -------------------------------------------------------------------------------------------


def parent_provider() -> TracerProvider | None:
    """The SDK provider whose processors receive worker spans: ctxprop's pipeline, else the global one."""
    from ctxprop import _pipeline

    provider = _pipeline.current_provider()
    if provider is None:
        global_provider = trace.get_tracer_provider()
        if isinstance(global_provider, TracerProvider):
            provider = global_provider
    return provider


_resource_cache: tuple[Resource | None, bytes | None] = (None, None)


def resource_blob(provider: TracerProvider | None) -> bytes | None:
    """The provider's resource pickled (once per resource object), for the worker's collecting provider."""
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


def deliver(spans: tuple[WireSpan, ...]) -> None:
    """Feed spans made in a worker to the parent's processors (never raises)."""
    provider = parent_provider()
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
    _delivered_any.set()


#: Set whenever worker spans were delivered; ``ContextAwareExecutor.shutdown()`` flushes when it is.
_delivered_any = threading.Event()

# Tokens of the batches delivered lately: a result fetched twice must not deliver its spans twice.
_seen: OrderedDict[bytes, None] = OrderedDict()
_seen_lock = threading.Lock()
_SEEN_MAX = 65536


def _first_arrival(token: bytes) -> bool:
    with _seen_lock:
        if token in _seen:
            return False
        _seen[token] = None
        if len(_seen) > _SEEN_MAX:
            _seen.popitem(last=False)
        return True


def _arrive(token: bytes, value: Any, spans: tuple[WireSpan, ...]) -> Any:
    """Unpickling a :class:`Returned`: deliver its spans (in the submitting process) and give the value."""
    try:
        if _first_arrival(token):
            deliver(spans)
    except Exception:  # noqa: BLE001 - the user's value must arrive whatever the spans do
        _stats.incr("process_spans_dropped", len(spans))
    return value


def _arrive_spans(token: bytes, spans: tuple[WireSpan, ...]) -> None:
    """Unpickling a :class:`_SpansHome` (spans riding on an exception): deliver them."""
    _arrive(token, None, spans)


class Returned:
    """A task's value with the spans its worker made: unpickles to the bare value, delivering the spans.

    Only made in a worker, for a task that made spans. Where the executor hands this object itself to
    another task in the same worker (a Dask dependency), :func:`unwrap` gives that task the value.
    """

    __slots__ = ("spans", "token", "value")

    def __init__(self, value: Any, spans: tuple[WireSpan, ...]) -> None:
        self.value, self.spans, self.token = value, spans, os.urandom(12)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_arrive, (self.token, self.value, self.spans))


class _SpansHome:
    """Spans riding home in a failed task's exception (in its ``__dict__``, which exceptions pickle)."""

    __slots__ = ("spans", "token")

    def __init__(self, spans: tuple[WireSpan, ...]) -> None:
        self.spans, self.token = spans, os.urandom(12)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_arrive_spans, (self.token, self.spans))


def attach_to_exception(exc: BaseException, spans: tuple[WireSpan, ...]) -> None:
    """Let ``spans`` travel home with ``exc`` (an exception type that pickles no ``__dict__`` loses them)."""
    try:
        exc._ctxprop_spans = _SpansHome(spans)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an exception that takes no attributes: count the loss
        _stats.incr("process_spans_dropped", len(spans))


def unwrap(value: Any) -> Any:
    """The value of a :class:`Returned` met inside a worker (a Dask dependency), else ``value``."""
    return value.value if type(value) is Returned else value


def flush_parent() -> None:
    """Flush the pipeline that received worker spans (never raises)."""
    from ctxprop import _pipeline

    try:
        if _pipeline.current_provider() is not None:
            _pipeline.flush()
            return
        provider = parent_provider()
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
_collector_provider: TracerProvider | None = None  # the worker-local provider that _collector is in
_inherited_collector = False  # _collector sits in the provider inherited from the parent through fork
_forked_provider: TracerProvider | None = None  # the ctxprop pipeline this process inherited by fork
_own_pipeline_closer = False  # a multiprocessing finalizer closes the worker's own pipeline at exit


def _after_fork_in_child() -> None:
    global _forked_provider  # noqa: PLW0603
    from ctxprop import _pipeline

    _forked_provider = _pipeline.current_provider()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _own_pipeline() -> bool:
    """Whether this worker runs a ctxprop pipeline started in it (not one inherited through fork)."""
    from ctxprop import _pipeline

    provider = _pipeline.current_provider()
    return provider is not None and provider is not _forked_provider


def enter_worker_process() -> None:
    """Once per worker process: drop a pipeline inherited through fork (keep one started here)."""
    global _worker_pid, _worker_blob, _collector, _inherited_collector  # noqa: PLW0603
    if _worker_pid == os.getpid():
        return
    _worker_pid = os.getpid()
    _worker_blob = None
    _collector = None
    _inherited_collector = False
    try:
        if not _own_pipeline():
            inherited = parent_provider()
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


def _close_own_pipeline_at_exit() -> None:
    # Pool workers leave through os._exit(), past atexit; multiprocessing's finalizers still run.
    global _own_pipeline_closer  # noqa: PLW0603
    if _own_pipeline_closer:
        return
    _own_pipeline_closer = True
    try:
        from multiprocessing import util

        from ctxprop import _pipeline

        util.Finalize(None, _pipeline.close, exitpriority=10)
    except Exception:  # noqa: BLE001 - the pipeline's own atexit stays the fallback
        _stats.incr("process_worker_setup_errors")


def _hand_inherited_to_own() -> None:
    # init() ran in this forked worker after the inherited pipeline was redirected: tracers bound to the
    # inherited provider now feed the worker's own pipeline instead of a collector nobody drains.
    global _collector, _inherited_collector
    from ctxprop import _pipeline

    own = _pipeline.current_provider()
    inherited = _forked_provider
    _collector, _inherited_collector = None, False
    try:
        if own is not None and inherited is not None:
            inherited._active_span_processor._span_processors = (own._active_span_processor,)
    except Exception:  # noqa: BLE001 - an odd provider only costs the pre-fork tracers' spans
        _stats.incr("process_worker_setup_errors")


def release_collecting_provider() -> None:
    """Before ``init()`` in a worker (the Dask plugin): give up the collecting provider this module made
    global, so the worker's own pipeline becomes the global provider."""
    global _collector, _collector_provider, _worker_blob
    provider = _collector_provider
    if provider is not None and trace.get_tracer_provider() is provider:
        from ctxprop import _pipeline

        _pipeline._reset_global_provider()
    _collector, _collector_provider, _worker_blob = None, None, None


def worker_collector(blob: bytes | None) -> _Collector | None:
    """The collector of the worker-local provider for the parent's resource ``blob``; None when spans go
    out through a pipeline of this worker's own (or there is nothing to collect for)."""
    global _worker_blob, _collector, _collector_provider
    if _own_pipeline():
        if _inherited_collector:
            _hand_inherited_to_own()
        _close_own_pipeline_at_exit()
        return None
    if _inherited_collector:
        return _collector  # the parent's own provider (and resource), inherited through fork
    if blob is None:
        return None
    if blob != _worker_blob or _collector is None or trace.get_tracer_provider() is not _collector_provider:
        # (a new parent resource, or the global provider replaced since: a worker pipeline closed)
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
        _worker_blob, _collector, _collector_provider = blob, collector, provider
    return _collector
