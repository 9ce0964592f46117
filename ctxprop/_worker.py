"""``@worker``: each call of a worker function in its own forked scopes and its own child span.

It also catches the most common propagation mistake: a worker handed to a plain ``ThreadPoolExecutor``
(or ``loop.run_in_executor``) runs in the pool thread's own stale context, so its span is an orphan and
the submitter's tags are gone. The first such call of each function warns, naming the fix.
"""

from __future__ import annotations

import concurrent.futures.thread
import functools
import inspect
import threading
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar, cast, overload

from opentelemetry import trace

from ctxprop._capture import PROPAGATED, hooks_scoped
from ctxprop._scopes import AttrValue, isolation_scope

__all__ = ["worker"]

P = ParamSpec("P")
R = TypeVar("R")

_POOL_THREAD_TARGET = concurrent.futures.thread._worker
_TRACER_NAME = "ctxprop.worker"

# One tracer per provider, not one per call (get_tracer builds an object each time) and not one for
# ever (a cached ProxyTracer keeps the first real provider it saw, which breaks re-initialisation).
_tracer_cache: tuple[object, trace.Tracer] = (object(), trace.NoOpTracer())


def _tracer() -> trace.Tracer:
    global _tracer_cache  # noqa: PLW0603
    provider = trace.get_tracer_provider()
    cached_provider, tracer = _tracer_cache
    if cached_provider is not provider:
        from ctxprop import __version__

        tracer = provider.get_tracer(_TRACER_NAME, __version__)
        _tracer_cache = (provider, tracer)
    return tracer


def _on_pool_thread_without_context() -> bool:
    # ThreadPoolExecutor starts its threads with target=_worker; Thread keeps _target until run()
    # returns. loop.run_in_executor(None, ...) uses such a pool too.
    return (
        not PROPAGATED.get()
        and getattr(threading.current_thread(), "_target", None) is _POOL_THREAD_TARGET
    )


class _WarnOnce:
    __slots__ = ("_claim", "_warned", "qualname")

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname
        # Acquired by the first warning and never released: two pool threads passing the unlocked check
        # at once cannot both warn, and no caller ever waits on it (a forked child inheriting it taken
        # has nothing to wait for either).
        self._claim = threading.Lock()
        self._warned = False

    def check(self) -> None:
        if self._warned or not _on_pool_thread_without_context() or not self._claim.acquire(blocking=False):
            return
        self._warned = True
        warnings.warn(
            f"{self.qualname}() is running on a thread-pool thread without its submitter's context: "
            "its span is not a child of the submitting span and the scope tags are missing. Submit it "
            "through ctxprop.ContextAwareThreadPoolExecutor or ctxprop.run_in_executor_with_context, "
            "or call ctxprop.instrument() at start-up to make plain pools propagate.",
            RuntimeWarning,
            stacklevel=3,
        )


def _decorate(
    fn: Callable[P, R], name: str | None, attributes: Mapping[str, AttrValue] | None
) -> Callable[P, R]:
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        # The call only builds the generator: the span would end before any of its work ran.
        raise TypeError(f"@worker cannot decorate the generator function {fn!r}; decorate its consumer")
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    span_name = name or qualname
    attrs = dict(attributes) if attributes else None
    once = _WarnOnce(qualname)

    if inspect.iscoroutinefunction(fn):
        afn = cast("Callable[..., Awaitable[Any]]", fn)

        @functools.wraps(fn)
        async def async_call(*args: Any, **kwargs: Any) -> Any:
            once.check()
            # The span covers the whole await; the context managers act on this task's context.
            with (
                isolation_scope(),
                hooks_scoped(),
                _tracer().start_as_current_span(span_name, attributes=attrs),
            ):
                return await afn(*args, **kwargs)

        return cast("Callable[P, R]", async_call)  # a string: 3.9 cannot subscript Callable with a ParamSpec

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        once.check()
        # start_as_current_span records the exception and sets status ERROR, then re-raises the same
        # object (a bare ``raise``), so the caller's traceback keeps the function's own frames.
        with (
            isolation_scope(),
            hooks_scoped(),  # a registered hook's own fork (Sentry's scopes), as ctxprop's are forked
            _tracer().start_as_current_span(span_name, attributes=attrs),
        ):
            return fn(*args, **kwargs)

    return call


@overload
def worker(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def worker(
    *, name: str | None = None, attributes: Mapping[str, AttrValue] | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def worker(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    attributes: Mapping[str, AttrValue] | None = None,
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """Run each call of the decorated function in its own forked scopes and its own span.

    The span is a child of the span current at the call, named ``name`` (default: the function's
    qualified name), with ``attributes`` plus the active scope tags. An exception is recorded on the
    span (status ERROR) and re-raised unchanged. Tags the function sets stay inside the call. Works on
    ``async def`` functions too (the span covers the await).

    When a call arrives on a thread-pool thread with no propagated context (a plain
    ``ThreadPoolExecutor`` or ``run_in_executor``), the first such call of each function warns with a
    ``RuntimeWarning`` that names the fix.

    >>> import ctxprop
    >>> @ctxprop.worker
    ... def resize(image_id: int) -> str:
    ...     ctxprop.set_tag("image", image_id)
    ...     return f"resized {image_id}"
    >>> @ctxprop.worker(name="thumbnail", attributes={"size": 128})
    ... def thumbnail(image_id: int) -> str:
    ...     return f"thumb {image_id}"
    >>> resize(7), thumbnail(7)
    ('resized 7', 'thumb 7')

    .. versionadded:: 0.1.0
    """
    if fn is not None:
        if not callable(fn):
            raise TypeError(f"@worker decorates a callable, got {fn!r}; use @worker(name=...) for options")
        return _decorate(fn, name, attributes)

    def decorator(f: Callable[P, R]) -> Callable[P, R]:
        return _decorate(f, name, attributes)

    return decorator
