"""The seed scenario: an asyncio loop, a 2-thread pool reused over 120 rounds, each round a parent span
and 3 executor calls that make child spans and set scope tags.

With ctxprop every worker span is parented to its round's span, every worker sees its round's tags and no
worker's tag writes leak back to the round or forward to a later task. The same scenario through the
stdlib's ``loop.run_in_executor`` fails all three checks: that is what proves the checks can fail.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxprop

ROUNDS = 120
CALLS = 3

Submit = Callable[[asyncio.AbstractEventLoop, Executor, Callable[..., Any], int, int], Awaitable[Any]]


@dataclass
class Outcome:
    worker_spans: int
    orphaned: int  # worker spans whose parent is not their round's span
    wrong_tags: int  # workers that did not see their round's tags (in the scope or on their span)
    leaked_forward: int  # workers that saw a tag written by an earlier worker
    leaked_back: int  # rounds whose own scopes received a worker's writes


def work(round_no: int, call: int) -> tuple[Any, Any, bool]:
    """One executor call: a child span, scope tags read and written."""
    tracer = trace.get_tracer("seed")
    iso = ctxprop.get_isolation_scope()
    cur = ctxprop.get_current_scope()
    seen_round = iso.tags.get("round")
    seen_phase = cur.tags.get("phase")
    saw_leftover = "worker" in iso.tags or "worker" in cur.tags
    with tracer.start_as_current_span(
        f"work-{call}", attributes={"expected_round": round_no, "call": call}
    ):
        ctxprop.set_tag("worker", f"{round_no}/{call}")
        cur.set_tag("worker", f"{round_no}/{call}")
    return seen_round, seen_phase, saw_leftover


def run_scenario(executor: Executor, submit: Submit) -> Outcome:
    """Run ROUNDS rounds on one loop and one pool, and check every worker span and result."""
    exporter = InMemorySpanExporter()
    ctxprop.init(exporter=exporter, service_name="seed")
    tracer = trace.get_tracer("seed")
    wrong_tags = leaked_forward = leaked_back = 0
    round_span_ids: dict[int, int] = {}

    async def one_round(loop: asyncio.AbstractEventLoop, i: int) -> None:
        nonlocal wrong_tags, leaked_forward, leaked_back
        with ctxprop.isolation_scope() as iso:
            ctxprop.set_tag("round", i)
            ctxprop.get_current_scope().set_tag("phase", f"p{i}")
            with tracer.start_as_current_span(f"round-{i}") as span:
                round_span_ids[i] = span.get_span_context().span_id
                results = await asyncio.gather(*(submit(loop, executor, work, i, k) for k in range(CALLS)))
            for seen_round, seen_phase, saw_leftover in results:
                wrong_tags += (seen_round, seen_phase) != (i, f"p{i}")
                leaked_forward += saw_leftover
            leaked_back += "worker" in iso.tags or "worker" in ctxprop.get_current_scope().tags

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for i in range(ROUNDS):
            await one_round(loop, i)

    with executor:
        asyncio.run(main())
    assert ctxprop.flush(timeout=30)
    workers = [s for s in exporter.get_finished_spans() if s.name.startswith("work-")]
    orphaned = 0
    for s in workers:
        attrs = dict(s.attributes or {})
        expected = round_span_ids[int(attrs["expected_round"])]  # type: ignore[call-overload]
        orphaned += s.parent is None or s.parent.span_id != expected
        wrong_tags += attrs.get("round") != attrs["expected_round"]
    return Outcome(len(workers), orphaned, wrong_tags, leaked_forward, leaked_back)


async def _with_context(loop: asyncio.AbstractEventLoop, pool: Executor, fn: Any, *args: Any) -> Any:
    return await ctxprop.run_in_executor_with_context(loop, pool, fn, *args)


async def _stdlib(loop: asyncio.AbstractEventLoop, pool: Executor, fn: Any, *args: Any) -> Any:
    return await loop.run_in_executor(pool, fn, *args)


def test_run_in_executor_with_context_on_plain_pool() -> None:
    """Wrap run_in_executor: every worker span parented to its round, right tags, no leaks (120 rounds)."""
    out = run_scenario(ThreadPoolExecutor(max_workers=2), _with_context)
    assert out == Outcome(ROUNDS * CALLS, 0, 0, 0, 0)


def test_context_aware_pool_with_stdlib_run_in_executor() -> None:
    """Replace the import: the stdlib's run_in_executor on a ContextAwareThreadPoolExecutor passes too."""
    out = run_scenario(ctxprop.ContextAwareThreadPoolExecutor(max_workers=2), _stdlib)
    assert out == Outcome(ROUNDS * CALLS, 0, 0, 0, 0)


def test_plain_pool_fails_the_same_checks() -> None:
    """Without ctxprop the same scenario orphans worker spans, loses tags and leaks between tasks."""
    out = run_scenario(ThreadPoolExecutor(max_workers=2), _stdlib)
    assert out.worker_spans == ROUNDS * CALLS
    assert out.orphaned == ROUNDS * CALLS
    assert out.wrong_tags >= ROUNDS * CALLS
    assert out.leaked_forward > 0
    assert out.leaked_back == 0  # the pool thread's context is its own: it leaks forward, not back


async def _copy_context_only(loop: asyncio.AbstractEventLoop, pool: Executor, fn: Any, *args: Any) -> Any:
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(pool, ctx.run, fn, *args)


def test_copy_context_alone_leaks_tags_back() -> None:
    """A bare copy_context().run wrapper parents spans but shares the round's scopes: writes leak back."""
    out = run_scenario(ThreadPoolExecutor(max_workers=2), _copy_context_only)
    assert out.orphaned == 0
    assert out.leaked_back == ROUNDS
