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
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from contextvars import Context, copy_context
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate

from ctxprop import _capture, _stats
from ctxprop._capture import PortableState, _activate_portable, _capture_portable, _enter, scope_tags
from ctxprop._fork_context import worker_context
from ctxprop._scopes import AttrValue
from ctxprop._spanwire import WireSpan
from ctxprop._worker_spans import (
    Returned,
    attach_to_exception,
    deliver,
    enter_worker_process,
    flush_parent,
    parent_provider,
    resource_blob,
    unwrap,
    worker_collector,
)

__all__ = [
    "ContextAwareProcessPoolExecutor",
    "RemoteCall",
    "bind_for_process",
    "call_remote",
    "envelope_of",
    "remote_call",
    "submit_with_context",
    "unpack_result",
]

R = TypeVar("R")

# (origin: the submitting pid and interpreter, W3C carrier, isolation tags, current tags, pickled parent
# resource or None, portable capture hooks' states: empty, so one byte on the wire, unless such a hook is
# registered, e.g. the Sentry adapter)
_Envelope = tuple[
    int, dict[str, str], dict[str, AttrValue], dict[str, AttrValue], bytes | None, PortableState
]
# (ok, value or exception, spans made in the worker during the task)
_Outcome = tuple[bool, Any, tuple[WireSpan, ...]]


# --- parent side -------------------------------------------------------------------------------------------


def _interpreter_id() -> int:
    # Sub-interpreters (InterpreterPoolExecutor) share the pid: the envelope's origin tells them apart.
    try:
        from concurrent import interpreters  # type: ignore[attr-defined,unused-ignore]

        return int(interpreters.get_current().id)
    except Exception:  # noqa: BLE001 - before 3.14 there is one interpreter as far as ctxprop knows
        return 0


_INTERPRETER = _interpreter_id()


def _origin() -> int:
    """This process (and interpreter): a task whose envelope names it runs where it was submitted."""
    return os.getpid() << 16 | _INTERPRETER


def _inject(carrier: dict[str, str]) -> None:
    try:
        propagate.inject(carrier)
    except Exception:  # noqa: BLE001 - a misbehaving custom propagator must not fail the submit
        _stats.incr("propagation_errors")


def _envelope() -> _Envelope:
    carrier: dict[str, str] = {}
    _inject(carrier)
    return (
        _origin(),
        carrier,
        *scope_tags(),
        resource_blob(parent_provider()),
        _capture_portable() if _capture._portable else (),
    )


def envelope_of(ctx: Context, iso: dict[str, AttrValue], cur: dict[str, AttrValue]) -> _Envelope:
    """The envelope of a captured context (a Snapshot being pickled, perhaps in another thread)."""
    carrier: dict[str, str] = {}
    run = ctx.copy().run  # ctx itself may be entered right now, in this thread or another one
    run(_inject, carrier)
    return (
        _origin(),
        carrier,
        iso,
        cur,
        resource_blob(parent_provider()),
        run(_capture_portable) if _capture._portable else (),
    )


def unpack_result(outcome: _Outcome) -> Any:
    """The value of a task run through :func:`bind_for_process`; its worker spans go to the pipeline.

    Re-raises the task's exception (with the worker's traceback as ``__cause__``, as a plain
    ``ProcessPoolExecutor`` does).

    .. versionadded:: 0.1.0
    """
    ok, payload, spans = outcome
    if spans:
        deliver(spans)
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
                deliver(spans)
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
            flush_parent()


# --- worker side -------------------------------------------------------------------------------------------


def _worker_initializer(initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> None:
    enter_worker_process()
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
    if envelope[0] == _origin():
        # Run in the submitting process itself (e.g. the bound callable called directly): the spans are
        # already in this process's pipeline, only the context needs applying.
        try:
            return (True, copy_context().run(_in_context, envelope, fn, args, kwargs), ())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through unpack_result
            return (False, exc, ())
    enter_worker_process()
    collector = worker_collector(envelope[4])
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


# --- any executor that pickles its tasks -------------------------------------------------------------------


def call_remote(
    envelope: _Envelope, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> R:
    """Run ``fn`` in the envelope's context, wherever the task was unpickled; where that is another process
    (or interpreter) with no pipeline of its own, its spans ride home in the value (or the exception)."""
    if envelope[0] == _origin():
        result: R = copy_context().run(_in_context, envelope, fn, args, kwargs)
        return result
    enter_worker_process()
    collector = worker_collector(envelope[4])
    if args:
        args = tuple(map(unwrap, args))
    if kwargs:
        kwargs = {k: unwrap(v) for k, v in kwargs.items()}
    try:
        value: R = worker_context().run(_in_context, envelope, fn, args, kwargs)
    except BaseException as exc:
        spans = collector.drain() if collector is not None else ()
        if spans:
            attach_to_exception(exc, spans)
        raise
    spans = collector.drain() if collector is not None else ()
    if spans:
        shipped: R = Returned(value, spans)  # type: ignore[assignment]
        return shipped
    return value


class RemoteCall:
    """A picklable task: ``fn`` run in the envelope's trace context and scopes by whichever worker gets it.

    Named after ``fn`` (``__name__``), so executors that label tasks by function name (Dask's keys) show
    the user's name; tokenised by Dask from ``fn`` and the envelope.
    """

    __slots__ = ("envelope", "fn")

    def __init__(self, envelope: _Envelope, fn: Callable[..., Any]) -> None:
        self.envelope, self.fn = envelope, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_remote(self.envelope, self.fn, args, kwargs)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (RemoteCall, (self.envelope, self.fn))

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return ("ctxprop.RemoteCall", self.fn, self.envelope)

    @property
    def __name__(self) -> str:
        return str(getattr(self.fn, "__name__", "task"))

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self.fn

    def __repr__(self) -> str:
        return f"<ctxprop task {self.fn!r}>"


def remote_call(fn: Callable[..., Any]) -> RemoteCall:
    """``fn`` bound to the caller's envelope, for an executor that pickles its tasks."""
    return RemoteCall(_envelope(), fn)
