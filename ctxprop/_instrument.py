"""``instrument()``: make the standard library's executors propagate context with no code change.

Patched with wrapt (each patch undone by :func:`uninstrument`, which only ever restores a wrapt proxy of
ours):

- ``concurrent.futures.ThreadPoolExecutor.submit``: captures like ``ContextAwareThreadPoolExecutor``
  (so ``map`` and ``loop.run_in_executor`` with a thread pool or the loop's default executor follow);
  executors that propagate themselves are left alone, so nothing is captured twice.
- ``concurrent.futures.ProcessPoolExecutor.submit`` (and so ``map``): the cross-process envelope of
  ``ContextAwareProcessPoolExecutor`` (trace context, baggage and tags travel; worker spans come back to
  this process's pipeline).
- ``threading.Thread.start`` (so ``Timer`` and subclasses that override ``run`` follow): the thread's
  ``run`` runs in the context of the code that called ``start()``. Threads that executors and
  ``multiprocessing`` start for their own machinery are excluded: a pool's worker thread is started by
  whichever ``submit`` comes first, and must not keep that caller's context for the rest of its life.
- ``asyncio.BaseEventLoop.run_in_executor`` for executors that are not thread pools: a
  ``ProcessPoolExecutor`` gets the envelope above; any other executor is bound the way
  ``ContextAwareExecutor`` binds its tasks.
- ``concurrent.futures.InterpreterPoolExecutor`` (3.14+, a ``ThreadPoolExecutor`` whose tasks are pickled
  into another interpreter): the envelope, through the same ``submit`` patch.
- ``multiprocessing.pool.Pool`` and ``ThreadPool``: ``apply_async`` (so ``apply``), ``map``, ``map_async``,
  ``starmap``, ``starmap_async``, ``imap``, ``imap_unordered``: the envelope for process pools, a
  snapshot (copied per item) for thread pools.
- Where installed, patched when imported (instrument() imports none of them): loky's
  ``ProcessPoolExecutor.submit``, ``joblib.Parallel.__call__`` (every backend), Dask distributed's
  ``Client.submit`` and ``Client.map`` (so ``client.get_executor()`` too).

``opentelemetry-instrument python app.py`` turns this on through the ``opentelemetry_instrumentor``
entry point (:class:`CtxpropInstrumentor`).
"""

from __future__ import annotations

import asyncio.base_events
import concurrent.futures.process
import concurrent.futures.thread
import functools
import multiprocessing.pool
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextvars import Context, ContextVar, copy_context
from typing import Any

import wrapt

from ctxprop import _capture, _stats
from ctxprop._capture import submit_captured

__all__ = ["instrument", "is_instrumented", "uninstrument"]

_lock = threading.Lock()
_active = False  # read by every wrapper: uninstrument() turns them into pass-throughs at once
# (owner, attribute, wrapper function) of each patch of ours still in place
_patches: list[tuple[Any, str, Callable[..., Any]]] = []


def _after_fork_in_child() -> None:
    # A thread of the parent may have been inside instrument() at fork(); nothing in the child would
    # release the lock it held.
    global _lock  # noqa: PLW0603
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

# Modules whose threads are executor or multiprocessing machinery, started on behalf of whichever caller
# happens to come first: they must run in their own clean context.
_INFRA_MODULES = frozenset(
    {
        "concurrent.futures.thread",
        "concurrent.futures.process",
        "multiprocessing.pool",
        "multiprocessing.queues",
        "multiprocessing.managers",
        "multiprocessing.resource_sharer",
    }
)


# executor type -> whether it captures context itself; filled on first sight of each type (submit is the
# per-task hot path, and an isinstance check plus an attribute lookup per task would cost more than this)
_self_propagating: dict[type, bool] = {}


def _propagates_itself(executor: object) -> bool:
    cls = type(executor)
    known = _self_propagating.get(cls)
    if known is None:
        from ctxprop._executors import ContextAwareThreadPoolExecutor

        known = issubclass(cls, ContextAwareThreadPoolExecutor) or bool(
            getattr(cls, "_ctxprop_propagates", False)
        )
        _self_propagating[cls] = known
    return known


# thread-pool type -> _PLAIN, _PROPAGATES (captures by itself) or _PICKLES (InterpreterPoolExecutor: a
# ThreadPoolExecutor whose tasks cross to another interpreter); filled on first sight of each type
_PLAIN, _PROPAGATES, _PICKLES = 0, 1, 2
_pool_kinds: dict[type, int] = {}


def _pool_kind(executor: object) -> int:
    from ctxprop._executors import pickles_tasks

    kind = _PLAIN
    if _propagates_itself(executor):
        kind = _PROPAGATES
    elif pickles_tasks(executor):
        kind = _PICKLES
    _pool_kinds[type(executor)] = kind
    return kind


def _submit_wrapper(
    wrapped: Callable[..., Future[Any]], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Future[Any]:
    # One dict look-up per task tells a plain pool from one that propagates itself or pickles its tasks.
    kind = _pool_kinds.get(type(instance))
    if kind is None:
        kind = _pool_kind(instance)
    if not _active or not args or kind == _PROPAGATES:
        return wrapped(*args, **kwargs)
    if kind == _PICKLES:
        if _carries_envelope(args[0]):
            return wrapped(*args, **kwargs)
        from ctxprop._process_pool import remote_call

        return wrapped(remote_call(args[0]), *args[1:], **kwargs)
    return submit_captured(wrapped, args[0], args[1:], kwargs)


def _process_submit_wrapper(
    wrapped: Callable[..., Future[Any]], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Future[Any]:
    if not _active or not args or _propagates_itself(instance) or _carries_envelope(args[0]):
        return wrapped(*args, **kwargs)
    from ctxprop._process_pool import submit_with_context

    return submit_with_context(instance, args[0], args[1:], kwargs)


def _carries_envelope(fn: object) -> bool:
    """Whether ``fn`` already carries ctxprop's context (submit_with_context, bind_for_process, a task of
    ``ContextAwareExecutor``, ``wrap()``): it must not be bound a second time."""
    from ctxprop._capture import _Bound
    from ctxprop._process_pool import RemoteCall, _run_in_worker

    cls = type(fn)
    return (
        cls is RemoteCall
        or cls is _Bound
        or fn is _run_in_worker
        or (isinstance(fn, functools.partial) and fn.func is _run_in_worker)
    )


def _is_infrastructure(thread: threading.Thread) -> bool:
    target = getattr(thread, "_target", None)
    module = getattr(target, "__module__", None) if target is not None else type(thread).__module__
    return module in _INFRA_MODULES


def _start_wrapper(
    wrapped: Callable[..., None], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    if not _active:
        return wrapped(*args, **kwargs)
    previous = _bind_run(instance)
    if previous is _UNBOUND:
        return wrapped(*args, **kwargs)
    try:
        return wrapped(*args, **kwargs)
    except BaseException:
        _unbind_run(instance, previous)
        raise


# _bind_run's answers: the thread is left alone, or it was bound and had no instance-level run before.
_UNBOUND = object()
_NO_INSTANCE_RUN = object()

# 3.14+: a thread runs in a context of its own (its ``context=`` argument, else a copy of the starter's
# when ``sys.flags.thread_inherit_context`` is on, else an empty one).
_THREAD_CONTEXT = sys.version_info >= (3, 14)


def _inherits_context() -> bool:
    return bool(getattr(sys.flags, "thread_inherit_context", 0))


def _has_explicit_context(thread: threading.Thread) -> bool:
    """Whether the caller gave ``Thread(context=...)`` (3.14+): then that is the context it runs in.

    The standard library has no public reader for it; before ``start()``, its private ``_context`` is
    None unless a context was given (it is filled in by ``start()`` itself).
    """
    return _THREAD_CONTEXT and getattr(thread, "_context", None) is not None


def _unbind_run(thread: Any, previous: object) -> None:
    if previous is _NO_INSTANCE_RUN:
        thread.__dict__.pop("run", None)
    else:
        thread.__dict__["run"] = previous


def _bind_run(thread: Any) -> object:
    """Make ``thread`` run in the caller's context. Returns ``_UNBOUND`` when its start is left alone,
    else what the instance's own ``run`` attribute was (``_NO_INSTANCE_RUN`` for none), to put back if
    ``start()`` fails. Never raises: whatever ``start()`` raises (a thread started twice, or whose
    ``__init__`` never ran) must come from the standard library, unchanged.

    Another library may have wrapped the instance's ``run`` before us (Sentry's ThreadingIntegration
    patched ``start`` first, so its ``start`` runs ours inside), or may wrap ours after us (it patched
    ``start`` after ``instrument()``). Either way the thread's body runs in the captured context:

    - an instance-level ``run`` already there is what gets wrapped, so the other library's wrapper runs
      inside our context;
    - a wrapper that calls ours as a plain function with the thread first (Sentry calls
      ``run(thread)``) gets that argument dropped, and the context variables it set in the thread's
      own context before calling us (Sentry's forked scopes) are set again inside ours, so its state and
      its exception capture see what the thread does.
    """
    try:
        if (
            not isinstance(thread, threading.Thread)
            or not getattr(thread, "_initialized", False)  # start() raises its own RuntimeError
            or thread.ident is not None
            or getattr(thread, "_ctxprop_propagates", False)
            or _has_explicit_context(thread)
        ):
            return _UNBOUND
        previous = thread.__dict__.get("run", _NO_INSTANCE_RUN)
        run = thread.run  # the subclass's own run(), or an instance-level wrapper of it
        if _is_infrastructure(thread):
            if not _inherits_context():
                return _UNBOUND  # it starts in an empty context already
            # A pool's thread would keep the first submitter's context (initializer included) for life.
            thread.run = functools.partial(_run_clean, thread, run)  # type: ignore[method-assign]
            return previous
        snap = _capture.capture()
    except Exception:  # noqa: BLE001 - an odd Thread subclass starts as it would without instrument()
        _stats.incr("instrument_errors")
        return _UNBOUND

    def run_in_snapshot(*args: Any, **kwargs: Any) -> None:
        if args and args[0] is thread:
            args = args[1:]
        try:
            outer = _set_outside(snap.context)
            if outer:
                snap._run_once(_run_with, outer, run, args, kwargs)
            else:
                snap._run_once(run, *args, **kwargs)
        finally:
            thread.__dict__.pop("run", None)  # drop the cycle thread -> closure -> thread

    thread.run = run_in_snapshot  # type: ignore[method-assign]
    return previous


def _run_clean(thread: Any, run: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    if args and args[0] is thread:
        args = args[1:]
    try:
        Context().run(run, *args, **kwargs)
    finally:
        thread.__dict__.pop("run", None)


def _set_outside(captured: Context) -> list[tuple[ContextVar[Any], Any]]:
    """The variables that the thread's own context holds with other values than the captured one: those
    a wrapper outside ours set in this thread before calling us."""
    return [(var, value) for var, value in copy_context().items() if captured.get(var, _UNBOUND) is not value]


def _run_with(
    outer: list[tuple[ContextVar[Any], Any]],
    run: Callable[..., None],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    # Inside the task's own context copy, after the scopes and capture hooks: plain set() is right.
    for var, value in outer:
        var.set(value)
    run(*args, **kwargs)


class _ProcessSubmit:
    """What ``run_in_executor`` sees instead of a process pool: a ``submit`` that sends the envelope."""

    __slots__ = ("_executor",)

    def __init__(self, executor: ProcessPoolExecutor) -> None:
        self._executor = executor

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        from ctxprop._process_pool import submit_with_context

        return submit_with_context(self._executor, fn, args)


def _run_in_executor_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if not _active or kwargs or len(args) < 2:
        return wrapped(*args, **kwargs)
    executor = args[0]
    if executor is None or isinstance(executor, ThreadPoolExecutor) or _propagates_itself(executor):
        return wrapped(*args)  # thread pools capture in their (patched or own) submit
    if not isinstance(executor, Executor) or _carries_envelope(args[1]):
        return wrapped(*args)
    if isinstance(executor, ProcessPoolExecutor):
        return wrapped(_ProcessSubmit(executor), *args[1:])
    from ctxprop._executors import task_for

    return wrapped(executor, task_for(executor, args[1]), *args[2:])


# --- libraries beyond concurrent.futures: multiprocessing pools, loky, joblib, Dask ------------------------


def _bind_for(pickled: bool, fn: Any) -> Any:
    """``fn`` bound to the caller's context for a pool that pickles its tasks (``pickled``) or not."""
    if _carries_envelope(fn) or not callable(fn):
        return fn
    if pickled:
        from ctxprop._process_pool import remote_call

        return remote_call(fn)
    # One snapshot, a fresh copy of it per call: the items of a map never see one another's context.
    return _capture._Bound(_capture.capture(), fn)


def _with_bound_func(
    pickled: bool, wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    # The task function is the first argument, positional or by keyword (``func=``).
    if args:
        return wrapped(_bind_for(pickled, args[0]), *args[1:], **kwargs)
    if "func" in kwargs:
        return wrapped(**{**kwargs, "func": _bind_for(pickled, kwargs["func"])})
    return wrapped(*args, **kwargs)


def _mp_pool_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``multiprocessing.pool.Pool``/``ThreadPool`` methods that take a task function."""
    if not _active:
        return wrapped(*args, **kwargs)
    return _with_bound_func(not isinstance(instance, multiprocessing.pool.ThreadPool), wrapped, args, kwargs)


def _pickling_submit_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``submit`` of executors that pickle their tasks (loky's, Dask's ``Client``)."""
    if not _active or kwargs.get("actor") or kwargs.get("actors") or (args and isinstance(args[0], type)):
        return wrapped(*args, **kwargs)  # a Dask actor is a class, instantiated on the worker
    return _with_bound_func(True, wrapped, args, kwargs)


def _joblib_call_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``joblib.Parallel.__call__``: every ``delayed`` task, whatever the backend, in the caller's context.

    Each function gets one snapshot-bound callable: a threading (or sequential) backend runs it in a copy
    of the caller's context; loky and multiprocessing pickle it, and it becomes the portable envelope.
    """
    if not _active or not args:
        return wrapped(*args, **kwargs)
    snap = _capture.capture()
    bound: dict[int, tuple[Any, Any]] = {}

    def tasks(iterable: Any) -> Any:
        for item in iterable:
            try:
                fn, fargs, fkwargs = item
                if _carries_envelope(fn) or not callable(fn):
                    raise TypeError
            except (TypeError, ValueError):
                yield item  # not a ``delayed`` triple: joblib reports it as it would
                continue
            known = bound.get(id(fn))
            if known is None or known[0] is not fn:
                known = bound[id(fn)] = (fn, _capture._Bound(snap, fn))
            yield (known[1], fargs, fkwargs)

    return wrapped(tasks(args[0]), *args[1:], **kwargs)


_MP_POOL_METHODS = (
    "apply_async",  # apply() calls it
    "map",
    "map_async",
    "starmap",
    "starmap_async",
    "imap",
    "imap_unordered",
)

#: (module, class, method, wrapper) patched when that module is imported (now, or later: wrapt's post-import
#: hook), so instrument() imports none of these libraries itself.
_LIBRARY_TARGETS: tuple[tuple[str, str, str, Callable[..., Any]], ...] = (
    ("loky.process_executor", "ProcessPoolExecutor", "submit", _pickling_submit_wrapper),
    ("joblib.parallel", "Parallel", "__call__", _joblib_call_wrapper),
    ("distributed.client", "Client", "submit", _pickling_submit_wrapper),
    ("distributed.client", "Client", "map", _pickling_submit_wrapper),
)
_hooked: set[str] = set()  # modules whose post-import hook is registered (wrapt has no way to remove one)


def _patch_library(module: Any) -> None:
    """Patch the targets of an imported library module (a post-import hook; takes the lock itself)."""
    with _lock:
        if not _active:
            return
        for module_name, cls_name, name, wrapper in _LIBRARY_TARGETS:
            if module_name != module.__name__:
                continue
            owner = getattr(module, cls_name, None)
            if owner is None or any(o is owner and n == name for o, n, _ in _patches):
                continue
            try:
                wrapt.wrap_function_wrapper(owner, name, wrapper)
            except Exception:  # noqa: BLE001 - a library release that moved the method stays unpatched
                _stats.incr("instrument_errors")
                continue
            _patches.append((owner, name, wrapper))


def _hook_libraries() -> None:
    # Outside _lock: for a module already imported, wrapt calls the hook at once, and it takes the lock.
    for module_name in dict.fromkeys(t[0] for t in _LIBRARY_TARGETS):
        module = sys.modules.get(module_name)
        if module is not None:
            _patch_library(module)
        elif module_name not in _hooked:
            _hooked.add(module_name)
            wrapt.register_post_import_hook(_patch_library, module_name)


_TARGETS: tuple[tuple[Any, str, Callable[..., Any]], ...] = (
    (concurrent.futures.thread.ThreadPoolExecutor, "submit", _submit_wrapper),
    (concurrent.futures.process.ProcessPoolExecutor, "submit", _process_submit_wrapper),
    (threading.Thread, "start", _start_wrapper),
    (asyncio.base_events.BaseEventLoop, "run_in_executor", _run_in_executor_wrapper),
    *((multiprocessing.pool.Pool, name, _mp_pool_wrapper) for name in _MP_POOL_METHODS),
)


def _ours(value: object, wrapper: Callable[..., Any]) -> bool:
    return isinstance(value, wrapt.FunctionWrapper) and getattr(value, "_self_wrapper", None) is wrapper


def _in_chain(value: object, wrapper: Callable[..., Any]) -> bool:
    for _ in range(32):  # wrappers of wrappers, bounded against a cycle
        if _ours(value, wrapper):
            return True
        if not isinstance(value, wrapt.ObjectProxy):
            return False
        value = value.__wrapped__
    return False


def instrument() -> None:
    """Make plain ``ThreadPoolExecutor``, ``Thread``/``Timer`` and ``loop.run_in_executor`` propagate.

    Idempotent and thread-safe; undone by :func:`uninstrument`.

    >>> from concurrent.futures import ThreadPoolExecutor
    >>> import ctxprop
    >>> ctxprop.instrument()
    >>> ctxprop.set_tag("job", "nightly")
    >>> with ThreadPoolExecutor(max_workers=1) as pool:
    ...     pool.submit(lambda: ctxprop.get_isolation_scope().tags["job"]).result()
    'nightly'
    >>> ctxprop.uninstrument()

    .. versionadded:: 0.1.0
    """
    global _active  # noqa: PLW0603
    with _lock:
        # A patch kept by uninstrument() (another wrapper on top of it) is re-enabled, not stacked again,
        # unless someone has since removed it from the chain.
        _patches[:] = [(o, n, w) for o, n, w in _patches if _in_chain(o.__dict__.get(n), w)]
        for owner, name, wrapper in _TARGETS:
            if any(o is owner and n == name for o, n, _ in _patches):
                continue
            wrapt.wrap_function_wrapper(owner, name, wrapper)
            _patches.append((owner, name, wrapper))
        _active = True
    _hook_libraries()


def uninstrument() -> None:
    """Undo :func:`instrument`: the patched attributes are the original functions again (``is``).

    A patch that another library wrapped on top of since is left in place, switched off.

    .. versionadded:: 0.1.0
    """
    global _active  # noqa: PLW0603
    with _lock:
        _active = False
        kept = []
        for owner, name, wrapper in _patches:
            current = owner.__dict__.get(name)
            if _ours(current, wrapper):
                setattr(owner, name, current.__wrapped__)
            else:
                kept.append((owner, name, wrapper))
        _patches[:] = kept


def is_instrumented() -> bool:
    """Whether :func:`instrument` is in effect.

    .. versionadded:: 0.1.0
    """
    return _active
