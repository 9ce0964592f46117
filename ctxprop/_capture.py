"""Capture the caller's context and run work in a copy of it, with forked scopes.

``capture()`` is on the submit path of every task, so it does the least it can: one ``copy_context()``
(which already holds OpenTelemetry's context and every application ContextVar), and a reference to the
tag dicts of the two scopes (never changed in place, see ``_scopes``). The forked ``Scope`` objects are
built on the worker side, in ``run``, off the submitter's clock.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import types
from collections.abc import Callable, Iterator
from contextvars import Context, ContextVar, copy_context
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

from ctxprop import _stats
from ctxprop._scopes import CURRENT, ISOLATION, AttrValue, Scope

__all__ = [
    "CaptureHook",
    "PortableCaptureHook",
    "Snapshot",
    "capture",
    "propagated",
    "register_capture_hook",
    "wrap",
]

P = ParamSpec("P")
_new_object = object.__new__
_partial = functools.partial
R = TypeVar("R")
T = TypeVar("T")

#: Set inside every task that runs through a Snapshot; ``@worker`` reads it to tell a propagated call
#: from one that arrived on a pool thread with the thread's stale context.
PROPAGATED: ContextVar[bool] = ContextVar("ctxprop.propagated", default=False)


class CaptureHook(Protocol, Generic[T]):
    """An extra piece of state to carry with every capture (e.g. a third-party SDK's own scopes)."""

    def capture(self) -> T:
        """Called on the submitting side, in the caller's context; must be cheap and never raise."""
        ...

    def activate(self, state: T) -> None:
        """Called on the running side, inside the task's own context copy, before the task."""
        ...


# A hook may also have ``scoped()``: a context manager that enters a fork of its state in the current
# context for a block and restores it after (``@worker`` runs each call in one, beside ctxprop's own
# forked scopes; the call runs in its caller's context, not a copy, so activate()'s plain set() would
# outlive it). A hook without it is left alone there.


class PortableCaptureHook(CaptureHook[T], Protocol):
    """A capture hook whose state can also cross a process boundary (process pools).

    ``capture_portable`` runs on the submitting side of every process-pool task (never on the thread
    path) and returns the state as ``bytes`` it pickled itself (so it alone decides what to drop when a
    value does not pickle), or None for nothing to carry. ``portable_activator`` names a module-level
    function: the worker process imports it by name and calls it with those bytes inside the task's own
    context copy, before the task. ``enter_worker``, if the hook has it, runs once in each pool worker,
    in its main context (a ``ContextAwareProcessPoolExecutor`` worker: before the user's initializer; a
    plain pool's: at its first task), e.g. to drop state a forked worker inherited. None of them may
    raise; faults are counted, never passed on.
    """

    def capture_portable(self) -> bytes | None:
        """Called on the submitting side of a process-pool task; must be cheap and never raise."""
        ...

    def portable_activator(self) -> Callable[[bytes], None]:
        """The module-level function that applies ``capture_portable``'s bytes in the worker."""
        ...


# A tuple swapped whole, so the submit path reads it without a lock; registrations serialise on
# _hooks_lock so two at once cannot drop one another.
_hooks: tuple[CaptureHook[Any], ...] = ()
# The portable hooks among them, with their activator's (module, qualified name): resolved by name in the
# worker, so an activator that cannot be imported there costs that task its hook state, never the task.
_portable: tuple[tuple[Any, str, str], ...] = ()
_hooks_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at fork(); nothing in the child would release it.
    global _hooks_lock  # noqa: PLW0603
    _hooks_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def register_capture_hook(hook: CaptureHook[Any]) -> None:
    """Carry ``hook``'s state with every capture from now on (idempotent per hook object)."""
    global _hooks, _portable  # noqa: PLW0603
    with _hooks_lock:
        if not any(h is hook for h in _hooks):
            _hooks = (*_hooks, hook)
            named = _activator_name(hook)
            if named is not None:
                _portable = (*_portable, (hook, *named))


def unregister_capture_hook(hook: CaptureHook[Any]) -> None:
    """Stop carrying ``hook``'s state."""
    global _hooks, _portable  # noqa: PLW0603
    with _hooks_lock:
        _hooks = tuple(h for h in _hooks if h is not hook)
        _portable = tuple(p for p in _portable if p[0] is not hook)


@contextlib.contextmanager
def _hooks_scoped(hooks: tuple[CaptureHook[Any], ...]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            scoped = getattr(hook, "scoped", None)
            if scoped is None:
                continue
            try:
                stack.enter_context(scoped())
            except Exception:  # noqa: BLE001 - a hook's fault must not fail the user's call
                _stats.incr("capture_hook_errors")
        yield


def hooks_scoped() -> contextlib.AbstractContextManager[None]:
    """Each registered hook's ``scoped()`` fork of its state, entered for a block (``@worker``'s calls);
    nothing at all when no hook is registered."""
    hooks = _hooks
    return _hooks_scoped(hooks) if hooks else contextlib.nullcontext()


def _activator_name(hook: Any) -> tuple[str, str] | None:
    """(module, qualified name) of a portable hook's activator, or None when it has none that a worker
    could import by name (a lambda, a nested function): such a hook only travels within the process."""
    if not callable(getattr(hook, "capture_portable", None)):
        return None
    try:
        fn = hook.portable_activator()
        name = (fn.__module__, fn.__qualname__)
        if _resolve(*name) is not fn:
            raise LookupError(name)
    except Exception:  # noqa: BLE001 - a hook's fault must not reach the caller registering it
        _stats.incr("capture_hook_errors")
        return None
    return name


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


#: What a process-pool envelope carries per portable hook: (activator module, qualified name, state).
PortableState = tuple[tuple[str, str, bytes], ...]


def _capture_portable() -> PortableState:
    """The portable hooks' states, for one process-pool task (call only when ``_portable`` is set)."""
    out = []
    for hook, module, qualname in _portable:
        try:
            state = hook.capture_portable()
            if state is None:
                continue
            if type(state) is not bytes:
                raise TypeError(f"capture_portable() returned {type(state).__name__}, not bytes")
            out.append((module, qualname, state))
        except Exception:  # noqa: BLE001 - a hook's fault must not fail the submit
            _stats.incr("capture_hook_errors")
    return tuple(out)


_activators: dict[tuple[str, str], Callable[[bytes], None]] = {}


def _activate_portable(portable: PortableState) -> None:
    """In the worker, inside the task's own context copy: apply each carried state (never raises)."""
    for module, qualname, state in portable:
        try:
            fn = _activators.get((module, qualname))
            if fn is None:
                fn = _activators[module, qualname] = _resolve(module, qualname)
            fn(state)
        except Exception:  # noqa: BLE001 - a hook's fault must not fail the user's task
            _stats.incr("capture_hook_errors")


def _enter_worker() -> None:
    """Once per pool worker, in its main context: let hooks drop state a forked worker inherited."""
    for hook in _hooks:
        enter = getattr(hook, "enter_worker", None)
        if enter is None:
            continue
        try:
            enter()
        except Exception:  # noqa: BLE001 - a hook's fault must not break the worker
            _stats.incr("capture_hook_errors")


def _capture_extra() -> tuple[tuple[CaptureHook[Any], Any], ...]:
    extra = []
    for hook in _hooks:
        try:
            extra.append((hook, hook.capture()))
        except Exception:  # noqa: BLE001 - a hook's fault must not reach the submitter
            _stats.incr("capture_hook_errors")
    return tuple(extra)


def _activate_hooks(extra: tuple[tuple[CaptureHook[Any], Any], ...]) -> None:
    for hook, state in extra:
        try:
            hook.activate(state)
        except Exception:  # noqa: BLE001 - a hook's fault must not fail the user's task
            _stats.incr("capture_hook_errors")


def _enter(
    iso_tags: dict[str, AttrValue],
    cur_tags: dict[str, AttrValue],
    extra: tuple[tuple[CaptureHook[Any], Any], ...],
    fn: Callable[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> R:
    # Runs inside the task's own context copy: plain set() without reset is right, the copy is discarded.
    # The forked scopes are built here, on the worker's clock; Scope.fork() inlined (this runs per task).
    scope = _new_object(Scope)
    scope._tags = iso_tags
    ISOLATION.set(scope)
    scope = _new_object(Scope)
    scope._tags = cur_tags
    CURRENT.set(scope)
    PROPAGATED.set(True)
    if extra:
        _activate_hooks(extra)
    return fn(*args, **kwargs)


def _enter_flat(
    iso_tags: dict[str, AttrValue],
    cur_tags: dict[str, AttrValue],
    extra: tuple[tuple[CaptureHook[Any], Any], ...],
    fn: Callable[..., R],
    /,
    *args: Any,
    **kwargs: Any,
) -> R:
    # _enter with the task's arguments spread out, for executors' submit(): a queued task then holds
    # no args tuple and kwargs dict of its own besides the pool's. Those are objects the cyclic GC
    # tracks, and with thousands of queued tasks every surviving object shows in collection time. The
    # body is _enter's, repeated rather than called: one Python frame less per task.
    scope = _new_object(Scope)
    scope._tags = iso_tags
    ISOLATION.set(scope)
    scope = _new_object(Scope)
    scope._tags = cur_tags
    CURRENT.set(scope)
    PROPAGATED.set(True)
    if extra:
        _activate_hooks(extra)
    return fn(*args, **kwargs)


_context_run: Callable[..., Any] = Context.run


def submit_captured(
    submit: Callable[..., T], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> T:
    """``submit(fn, *args, **kwargs)``, the task bound to the caller's context: the per-task capture of
    thread pools (``ContextAwareThreadPoolExecutor``, ``instrument()``'s ``submit``), the same state
    :func:`capture` takes, spread into the pool's own argument tuple.

    Nothing of ours is queued with the task but the captured values themselves: no Snapshot, no bound
    method, no args tuple (each object a queued task keeps alive costs GC time with thousands queued).
    The unbound ``Context.run`` is the trampoline (no Python frame of ours per task), and the fresh
    context is private to this task, so it is run as is, without a second copy.
    """
    if type(fn) is _partial:
        call = _into_context_run(fn, args, kwargs)
        if call is not None:
            (ctx, iso, cur, extra), func, fargs, fkwargs = call
            return submit(_context_run, ctx, _enter_flat, iso, cur, extra, func, *fargs, **fkwargs)
    return submit(
        _context_run,
        copy_context(),
        _enter_flat,
        ISOLATION.get()._tags,
        CURRENT.get()._tags,
        _capture_extra() if _hooks else (),
        fn,
        *args,
        **kwargs,
    )


def scope_tags() -> tuple[dict[str, AttrValue], dict[str, AttrValue]]:
    """The tag dicts of the active isolation and current scopes (never changed in place: no copy), for the
    portable envelope and the subprocess environment; in-process captures take them in :func:`capture`."""
    return ISOLATION.get()._tags, CURRENT.get()._tags


def _into_context_run(
    fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Snapshot, Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None:
    """For ``fn`` = ``functools.partial(ctx.run, func, *a, **kw)`` (what ``asyncio.to_thread`` hands to
    ``run_in_executor``): (a capture taken inside ``ctx``, func, args, kwargs), so the call runs in a copy of
    ``ctx`` with scopes forked from ``ctx``'s; else None.

    Captured as usual, such a task would run ``ctx.run`` inside the fresh copy, and ``ctx`` holds the
    awaiting task's own scope objects, unforked: the thread's tag writes would reach the awaiting task.
    """
    bound = fn.func
    ctx = getattr(bound, "__self__", None)
    if type(ctx) is not Context or getattr(bound, "__name__", None) != "run" or not fn.args:
        return None
    try:
        # Scopes and hooks capture inside ctx: that is the context the caller meant the call to run in.
        snap: Snapshot = ctx.run(capture)
    except RuntimeError:  # ctx is entered (here or in another thread): leave the call as it was made
        return None
    return (snap, fn.args[0], (*fn.args[1:], *args), {**fn.keywords, **kwargs})


class Snapshot(tuple):  # type: ignore[type-arg]
    """The caller's whole ``contextvars`` context plus forked isolation and current scopes.

    Made by :func:`capture`. ``run`` may be called any number of times, from any thread, even at once:
    each call runs in its own copy, so nothing one run sets is seen by another run or by the caller.
    Treat it as opaque (it is a tuple only because that is the cheapest object to build on the submit
    path).

    >>> snap = capture()
    >>> snap.run(lambda: 42)
    42

    .. versionadded:: 0.1.0
    """

    __slots__ = ()

    # Identity semantics: a snapshot is a handle, not a value (and a Context is not hashable).
    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    @property
    def context(self) -> Context:
        """The captured ``contextvars.Context`` (do not run it directly; use :meth:`run`)."""
        ctx: Context = self[0]
        return ctx

    @property
    def isolation_tags(self) -> dict[str, AttrValue]:
        """The isolation scope's tags at capture time."""
        return dict(self[1])

    @property
    def current_tags(self) -> dict[str, AttrValue]:
        """The current scope's tags at capture time."""
        return dict(self[2])

    def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn`` in a fresh copy of the captured context with the forked scopes active.

        The calling thread's own context is untouched afterwards, whatever ``fn`` sets.
        """
        ctx, iso, cur, extra = self
        result: R = ctx.copy().run(_enter, iso, cur, extra, fn, args, kwargs)
        return result

    def _run_once(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        # For a snapshot taken for exactly one task: its context is private, so skip the copy.
        ctx, iso, cur, extra = self
        result: R = ctx.run(_enter, iso, cur, extra, fn, args, kwargs)
        return result

    def __repr__(self) -> str:
        return f"<ctxprop.Snapshot isolation={dict(self[1])!r} current={dict(self[2])!r}>"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A Context does not pickle: what crosses is the portable envelope (W3C trace context, baggage,
        # scope tags, portable hooks' states), and the other side runs with it (see _PortableSnapshot).
        return (_PortableSnapshot, (self._envelope(),))

    def _envelope(self) -> Any:
        from ctxprop._process_pool import envelope_of

        return envelope_of(self[0], self[1], self[2])


class _PortableSnapshot:
    """What a pickled :class:`Snapshot` becomes: ``run`` in the carried trace context and scopes, with the
    spans made in another process sent home with the value (or the exception)."""

    __slots__ = ("envelope",)

    def __init__(self, envelope: Any) -> None:
        self.envelope = envelope

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_PortableSnapshot, (self.envelope,))

    def run(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        from ctxprop._process_pool import call_remote

        return call_remote(self.envelope, fn, args, kwargs)

    _run_once = run


class _Bound:
    """What :func:`wrap` returns: ``fn`` bound to a :class:`Snapshot`. Called in this process, it runs in
    a copy of the captured context; pickled (a process pool, loky, Dask, a sub-interpreter), it becomes a
    task carrying the portable envelope instead of failing on the ``Context``."""

    def __init__(self, snap: Snapshot, fn: Callable[..., Any]) -> None:
        self._ctxprop_snapshot = snap
        self._ctxprop_fn = fn
        self._ctxprop_portable: Any = None
        # update_wrapper skips what ``fn`` lacks (a partial has no __name__) and sets __wrapped__.
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ctxprop_snapshot.run(self._ctxprop_fn, *args, **kwargs)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        # As a class attribute it binds like the function it wraps.
        return self if obj is None else types.MethodType(self, obj)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        from ctxprop._process_pool import RemoteCall

        # Made once per bound callable: joblib and multiprocessing pickle the same one for every chunk.
        envelope = self._ctxprop_portable
        if envelope is None:
            envelope = self._ctxprop_portable = self._ctxprop_snapshot._envelope()
        return (RemoteCall, (envelope, self._ctxprop_fn))

    def __repr__(self) -> str:
        return f"<ctxprop.wrap {self._ctxprop_fn!r}>"


def _make_capture() -> Callable[[], Snapshot]:
    # The submit path of every task: the names it needs are bound once in this closure (a cell load is
    # cheaper than a global lookup plus a method lookup), one tuple build, no Python-level __init__, no
    # Scope objects (the tag dicts are never changed in place, so referencing them is the fork).
    # ``_hooks`` stays a global read: hooks come and go.
    snapshot, copy, iso_get, cur_get = Snapshot, copy_context, ISOLATION.get, CURRENT.get

    def capture() -> Snapshot:
        """Capture the caller's context and scopes, to run work elsewhere as if it ran here.

        >>> import contextvars
        >>> request_id = contextvars.ContextVar("request_id")
        >>> _ = request_id.set("r-7")
        >>> snap = capture()
        >>> snap.run(request_id.get)
        'r-7'

        .. versionadded:: 0.1.0
        """
        return snapshot((copy(), iso_get()._tags, cur_get()._tags, _capture_extra() if _hooks else ()))

    capture.__qualname__ = "capture"
    return capture


capture = _make_capture()


def wrap(fn: Callable[P, R]) -> Callable[P, R]:
    """Bind ``fn`` to the context captured now: every later call runs in (a copy of) it, so a callback
    handed to a thread, a timer or a third-party scheduler runs as if called here.

    >>> job = wrap(print)
    >>> job("runs with the caller's context")
    runs with the caller's context

    Pickled (handed to a process pool, loky, Dask), it carries the portable envelope instead: the W3C
    trace context, baggage, scope tags and portable capture hooks' states.

    .. versionadded:: 0.1.0
    """
    bound: Callable[P, R] = _Bound(capture(), fn)
    return bound


def propagated() -> bool:
    """Whether the running code arrived through ctxprop propagation (a Snapshot run)."""
    return PROPAGATED.get()
