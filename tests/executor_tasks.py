"""Task functions for executor tests that run in other interpreters or in child scripts: importable by name
(``tests`` on the path), unlike a child script's ``__main__``."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

import ctxprop


def tags_here() -> dict[str, Any]:
    """The tags of the active scopes."""
    return {**ctxprop.get_isolation_scope().tags, **ctxprop.get_current_scope().tags}


def traced(n: int, m: int = 0) -> dict[str, Any]:
    """Makes a span named after ``n``, reports the tags it saw."""
    with trace.get_tracer("worker").start_as_current_span(f"task-{n}"):
        return {"n": n + m, "tags": tags_here()}


def failing(n: int) -> None:
    """Makes a span and raises."""
    with trace.get_tracer("worker").start_as_current_span("doomed"):
        raise LookupError(f"no row {n}")


def traced_where(n: int) -> dict[str, Any]:
    """Like :func:`traced`, and says which Dask worker ran it."""
    from distributed import get_worker

    out = traced(n)
    out["worker"] = get_worker().address
    return out
