"""Thread pools and ``run_in_executor`` that carry the submitter's context into every task."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextvars import copy_context
from typing import Any, TypeVar

from ctxprop import _capture
from ctxprop._capture import _capture_extra, _enter
from ctxprop._scopes import CURRENT, ISOLATION

__all__ = ["ContextAwareThreadPoolExecutor", "run_in_executor_with_context"]

R = TypeVar("R")


def _run_captured(ctx: Any, iso: Any, cur: Any, extra: Any, fn: Any, args: Any, kwargs: Any) -> Any:
    return ctx.run(_enter, iso, cur, extra, fn, args, kwargs)


class ContextAwareThreadPoolExecutor(ThreadPoolExecutor):
    """A drop-in ``ThreadPoolExecutor`` whose tasks run in the context of their submitter.

    ``submit`` (and so ``map``) captures the caller's whole ``contextvars`` context and forks its
    isolation and current scopes at submit time. Each task runs in its own copy: a reused worker thread
    never shows a task the context of an earlier one, and what a task sets never reaches its submitter
    or a later task. The ``initializer`` runs in the worker thread's own clean context.

    >>> from ctxprop import ContextAwareThreadPoolExecutor, set_tag, get_isolation_scope
    >>> set_tag("round", 1)
    >>> with ContextAwareThreadPoolExecutor(max_workers=2) as pool:
    ...     pool.submit(lambda: get_isolation_scope().tags["round"]).result()
    1

    .. versionadded:: 0.1.0
    """

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` in the caller's context, with forked scopes."""
        # Inlined capture(): this is the per-task hot path, and every call level costs a few percent
        # of a no-op task's round trip.
        return super().submit(
            _run_captured,
            copy_context(),
            ISOLATION.get()._tags,
            CURRENT.get()._tags,
            _capture_extra() if _capture._hooks else (),
            fn,
            args,
            kwargs,
        )


def _propagates_itself(executor: Executor | None) -> bool:
    return isinstance(executor, ContextAwareThreadPoolExecutor) or getattr(
        executor, "_ctxprop_propagates", False
    )


async def run_in_executor_with_context(
    loop: asyncio.AbstractEventLoop | None,
    executor: Executor | None,
    func: Callable[..., R],
    /,
    *args: Any,
    **kwargs: Any,
) -> R:
    """``await loop.run_in_executor(executor, func, *args, **kwargs)`` with the caller's context.

    ``loop`` may be ``None`` (the running loop); ``executor`` may be ``None`` (the loop's default) or any
    ``concurrent.futures.Executor``. Keyword arguments are passed through, unlike ``run_in_executor``.

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
    snap = _capture.capture()
    return await loop.run_in_executor(executor, functools.partial(snap._run_once, func, *args, **kwargs))
