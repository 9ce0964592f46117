"""Thread pools and ``run_in_executor`` that carry the submitter's context into every task."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextvars import Context
from typing import Any, ParamSpec, TypeVar

from ctxprop import _capture
from ctxprop._capture import submit_captured

__all__ = ["ContextAwareExecutor", "ContextAwareThreadPoolExecutor", "run_in_executor_with_context"]

P = ParamSpec("P")
R = TypeVar("R")

_partial = functools.partial


def _run_clean(initializer: Callable[..., object], *initargs: Any) -> None:
    # An empty Context, not the thread's: on Pythons where threads inherit their starter's context
    # (3.14 free-threaded builds) or under instrument(), the worker thread would otherwise start in the
    # context of whichever task happened to spawn it.
    Context().run(initializer, *initargs)


class ContextAwareThreadPoolExecutor(ThreadPoolExecutor):
    """A drop-in ``ThreadPoolExecutor`` whose tasks run in the context of their submitter.

    ``submit`` (and so ``map``) captures the caller's whole ``contextvars`` context and forks its
    isolation and current scopes at submit time. Each task runs in its own copy: a reused worker thread
    never shows a task the context of an earlier one, and what a task sets never reaches its submitter
    or a later task. The ``initializer`` runs in a clean, empty context.

    >>> from ctxprop import ContextAwareThreadPoolExecutor, set_tag, get_isolation_scope
    >>> set_tag("round", 1)
    >>> with ContextAwareThreadPoolExecutor(max_workers=2) as pool:
    ...     pool.submit(lambda: get_isolation_scope().tags["round"]).result()
    1

    .. versionadded:: 0.1.0
    """

    #: Read by ``run_in_executor_with_context`` and ``instrument()``: this pool captures by itself, so
    #: they must not capture a second time.
    _ctxprop_propagates = True

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        if initializer is not None:
            if not callable(initializer):
                raise TypeError("initializer must be a callable")
            initargs = (initializer, *initargs)
            initializer = _run_clean
        super().__init__(max_workers, thread_name_prefix, initializer, initargs)

    #: Whether the next ``submit`` after ours in the MRO is the stdlib's: then submit() calls it by
    #: name (looked up at each call, so monkeypatches still apply) instead of through super(), which
    #: costs a super object and a second argument repacking on every task. A subclass that mixes in
    #: another pool with its own submit gets the cooperative super() path.
    _stdlib_submit_next = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        after = cls.__mro__[cls.__mro__.index(ContextAwareThreadPoolExecutor) + 1 :]
        cls._stdlib_submit_next = next(k for k in after if "submit" in vars(k)) is ThreadPoolExecutor

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` in the caller's context, with forked scopes."""
        # ThreadPoolExecutor.submit looked up at each call (so monkeypatches apply), bound to this pool.
        submit = ThreadPoolExecutor.submit if self._stdlib_submit_next else _cooperative_submit
        return submit_captured(submit.__get__(self), fn, args, kwargs)


def _cooperative_submit(
    pool: ContextAwareThreadPoolExecutor, fn: Callable[..., R], /, *args: Any, **kwargs: Any
) -> Future[R]:
    # For a pool class that mixes another pool's submit in after ours: that one gets the call.
    return super(ContextAwareThreadPoolExecutor, pool).submit(fn, *args, **kwargs)


def _propagates_itself(executor: Executor | None) -> bool:
    return isinstance(executor, ContextAwareThreadPoolExecutor) or bool(
        getattr(executor, "_ctxprop_propagates", False)
    )


# Module prefixes of executors known to pickle their tasks (checked by name: importing them costs).
_PICKLING_MODULES = ("loky.", "joblib.externals.loky.", "distributed.", "dask.")
# executor type -> True (pickles its tasks), False (runs them in this interpreter), None (unknown)
_kinds: dict[type, bool | None] = {}


def pickles_tasks(executor: object) -> bool | None:
    """Whether ``executor`` pickles its tasks (True), runs them in this interpreter (False), or neither is
    known (None: its tasks get a snapshot-bound callable, which turns into the envelope if pickled)."""
    cls = type(executor)
    try:
        return _kinds[cls]
    except KeyError:
        pass
    kind: bool | None = None
    interpreter_pool = getattr(concurrent.futures, "InterpreterPoolExecutor", None)
    if interpreter_pool is not None and issubclass(cls, interpreter_pool):
        kind = True  # a ThreadPoolExecutor subclass, but interpreters share no objects: tasks are pickled
    elif issubclass(cls, ThreadPoolExecutor):
        kind = False
    elif issubclass(cls, ProcessPoolExecutor) or any(
        k.__module__.startswith(_PICKLING_MODULES) for k in cls.__mro__
    ):
        kind = True
    _kinds[cls] = kind
    return kind


def task_for(executor: object, fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` bound to the caller's context the way ``executor`` can carry it (one path for every way in)."""
    kind = pickles_tasks(executor)
    if kind:
        from ctxprop._process_pool import remote_call

        remote: Callable[..., R] = remote_call(fn)
        return remote
    if kind is None:
        return _capture._Bound(_capture.capture(), fn)
    return _partial(_capture.capture()._run_once, fn)


class ContextAwareExecutor(Executor):
    """Any ``concurrent.futures.Executor``, with every task run in the context of its submitter.

    Thread pools (in-process executors) run each task in a copy of the caller's whole ``contextvars``
    context with forked scopes, as :class:`ContextAwareThreadPoolExecutor` does. Executors that pickle
    their tasks (process pools, loky, Dask distributed's ``client.get_executor()``,
    ``InterpreterPoolExecutor``) get the portable envelope instead: W3C trace context, baggage, scope tags
    and portable capture hooks' states (Sentry's). Spans made in their workers ride home with the result
    to this process's pipeline, or go out through the worker's own pipeline where ``init()`` ran there;
    never twice. Results, exceptions, cancellation and ``map``'s order, laziness and ``timeout`` are the
    wrapped executor's own: its futures are returned unchanged. The wrapped executor is ``.executor``.

    >>> from concurrent.futures import ThreadPoolExecutor
    >>> import ctxprop
    >>> ctxprop.set_tag("tenant", "acme")
    >>> with ContextAwareExecutor(ThreadPoolExecutor(max_workers=1)) as pool:
    ...     pool.submit(lambda: ctxprop.get_isolation_scope().tags["tenant"]).result()
    'acme'

    .. versionadded:: 0.1.0
    """

    _ctxprop_propagates = True

    def __init__(self, executor: Executor) -> None:
        if not callable(getattr(executor, "submit", None)):
            raise TypeError(f"ContextAwareExecutor needs an executor, got {type(executor).__name__}")
        self.executor = executor
        self._passthrough = _propagates_itself(executor)

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` on the wrapped executor, in the caller's context."""
        executor = self.executor
        if self._passthrough:
            return executor.submit(fn, *args, **kwargs)
        return executor.submit(task_for(executor, fn), *args, **kwargs)

    def map(
        self, fn: Callable[..., R], *iterables: Any, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[R]:
        """The wrapped executor's ``map`` (its order, chunking and ``timeout``), in the caller's context."""
        executor = self.executor
        if timeout is not None:
            kwargs["timeout"] = timeout
        if self._passthrough:
            return executor.map(fn, *iterables, **kwargs)
        if pickles_tasks(executor) is False:
            # One snapshot, a fresh copy of it per item: no task sees another's context.
            return executor.map(_partial(_capture.capture().run, fn), *iterables, **kwargs)
        return executor.map(task_for(executor, fn), *iterables, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut the wrapped executor down; with ``wait``, also flush the spans its workers sent home."""
        if cancel_futures:
            self.executor.shutdown(wait=wait, cancel_futures=True)
        else:
            self.executor.shutdown(wait=wait)
        if wait:
            from ctxprop import _worker_spans

            if _worker_spans._delivered_any.is_set():
                _worker_spans._delivered_any.clear()
                _worker_spans.flush_parent()

    def __repr__(self) -> str:
        return f"<ctxprop.ContextAwareExecutor {self.executor!r}>"


async def run_in_executor_with_context(
    loop: asyncio.AbstractEventLoop | None,
    executor: Executor | None,
    func: Callable[P, R],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> R:
    """``await loop.run_in_executor(executor, func, *args, **kwargs)`` with the caller's context.

    ``loop`` may be ``None`` (the running loop); ``executor`` may be ``None`` (the loop's default) or any
    ``concurrent.futures.Executor``, bound the way :class:`ContextAwareExecutor` binds its tasks: executors
    that pickle their tasks (process pools, loky, Dask) get the trace context and scope tags serialised
    with the task, and the spans their workers make come back to this process's pipeline. Keyword
    arguments are passed through, unlike ``run_in_executor``.

    >>> import asyncio
    >>> async def main() -> int:
    ...     return await run_in_executor_with_context(None, None, sum, [1, 2, 3])
    >>> asyncio.run(main())
    6

    .. versionadded:: 0.1.0
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    if _propagates_itself(executor):
        # The executor captures in submit(), which the loop calls from this task's context.
        call = functools.partial(func, *args, **kwargs) if kwargs else func
        return await loop.run_in_executor(executor, call, *(() if kwargs else args))
    if executor is None:
        snap = _capture.capture()
        return await loop.run_in_executor(None, functools.partial(snap._run_once, func, *args, **kwargs))
    task = task_for(executor, func)
    if kwargs:
        return await loop.run_in_executor(executor, functools.partial(task, *args, **kwargs))
    return await loop.run_in_executor(executor, task, *args)
