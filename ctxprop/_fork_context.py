"""The context a task runs in inside a forked worker process, without what the fork handed down.

A forked process starts with a copy of the forking thread's context. A process pool forks its workers
from whichever ``submit()`` came first, so every later task in those workers would see that first
submitter's ContextVars (a structlog ``request_id``, a loguru ``contextualize`` field): the stale-context
bug of thread pools, across a process. :func:`worker_context` drops every variable that still holds the
value it had at the fork, and keeps what the worker set itself since (its initializer's). A worker that
was spawned, not forked, inherited nothing: its context is copied as is.
"""

from __future__ import annotations

import os
from contextvars import Context, copy_context

__all__ = ["worker_context"]

_inherited: Context | None = None  # the context this process started with, if it was forked
_MISSING = object()


def _after_fork_in_child() -> None:
    global _inherited  # noqa: PLW0603
    _inherited = copy_context()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def worker_context() -> Context:
    """A fresh context for one task in a worker process: the worker's own values, none inherited by fork.

    >>> worker_context().run(lambda: 1)
    1
    """
    inherited = _inherited
    if inherited is None:
        return copy_context()
    ctx = Context()
    for var, value in copy_context().items():
        if inherited.get(var, _MISSING) is not value:
            ctx.run(var.set, value)
    return ctx
