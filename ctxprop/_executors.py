"""Thread pools and ``run_in_executor`` that carry the submitter's context into every task."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextvars import Context, copy_context
from typing import Any, ParamSpec, TypeVar

from ctxprop import _capture
from ctxprop._capture import _capture_extra, _enter_flat, _into_context_run
from ctxprop._scopes import CURRENT, ISOLATION

__all__ = ["ContextAwareThreadPoolExecutor", "run_in_executor_with_context"]

P = ParamSpec("P")
R = TypeVar("R")

_context_run: Callable[..., Any] = Context.run
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
        # capture() inlined, and the unbound Context.run handed to the pool instead of a Python
        # trampoline or a bound method: this is the per-task hot path, where each call level and each
        # object a queued task keeps alive (the GC walks them all) costs a visible share of a no-op
        # task's round trip. The fresh copy_context() is private to this task, so no second copy.
        submit = ThreadPoolExecutor.submit if self._stdlib_submit_next else _cooperative_submit
        if type(fn) is _partial:
            call = _into_context_run(fn, args, kwargs)
            if call is not None:
                ctx, iso, cur, extra, func, fargs, fkwargs = call
                return submit(self, _context_run, ctx, _enter_flat, iso, cur, extra, func, *fargs, **fkwargs)
        return submit(
            self,
            _context_run,
            copy_context(),
            _enter_flat,
            ISOLATION.get()._tags,
            CURRENT.get()._tags,
            _capture_extra() if _capture._hooks else (),
            fn,
            *args,
            **kwargs,
        )


def _cooperative_submit(
    pool: ContextAwareThreadPoolExecutor, fn: Callable[..., R], /, *args: Any, **kwargs: Any
) -> Future[R]:
    # For a pool class that mixes another pool's submit in after ours: that one gets the call.
    return super(ContextAwareThreadPoolExecutor, pool).submit(fn, *args, **kwargs)


def _propagates_itself(executor: Executor | None) -> bool:
    return isinstance(executor, ContextAwareThreadPoolExecutor) or bool(
        getattr(executor, "_ctxprop_propagates", False)
    )


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
    ``concurrent.futures.Executor``. A plain ``ProcessPoolExecutor`` gets the trace context and scope tags
    serialised with the task, and the spans its worker makes come back to this process's pipeline.
    Keyword arguments are passed through, unlike ``run_in_executor``.

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
    if isinstance(executor, ProcessPoolExecutor):
        # A Context cannot be pickled: the cross-process envelope (W3C trace context + tags) travels
        # instead, and the worker's spans ride back with the result.
        from ctxprop._process_pool import bind_for_process, unpack_result

        outcome = await loop.run_in_executor(executor, bind_for_process(func, args, kwargs))
        result: R = unpack_result(outcome)
        return result
    snap = _capture.capture()
    return await loop.run_in_executor(executor, functools.partial(snap._run_once, func, *args, **kwargs))
