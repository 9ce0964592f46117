"""Way 2: wrap ``run_in_executor``.

Keep your executors (the loop's default one, a plain ``ThreadPoolExecutor``, a process pool, any
``concurrent.futures.Executor``) and replace ``loop.run_in_executor(pool, fn, *args)`` with
``ctxprop.run_in_executor_with_context(loop, pool, fn, *args, **kwargs)``.

Run: python examples/wrap_run_in_executor.py
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxprop


def blocking_io(order_id: int, *, retries: int) -> str:
    with trace.get_tracer("example").start_as_current_span("blocking_io"):
        ctxprop.set_tag("touched_by_worker", True)  # stays in this call: never leaks to the request
        tags = ctxprop.get_isolation_scope().tags
        return f"order {order_id}: user={tags['user']} retries={retries}"


async def handle_request(pool: ThreadPoolExecutor, user: str, order_id: int) -> str:
    tracer = trace.get_tracer("example")
    with ctxprop.isolation_scope(), tracer.start_as_current_span(f"request {user}"):
        ctxprop.set_tag("user", user)
        # Instead of loop.run_in_executor(pool, functools.partial(blocking_io, ...)), which would run
        # blocking_io in the pool thread's own stale context:
        result = await ctxprop.run_in_executor_with_context(None, pool, blocking_io, order_id, retries=3)
        leaked = "touched_by_worker" in ctxprop.get_isolation_scope().tags
        return f"{result} (worker's tag leaked back: {leaked})"


async def main() -> None:
    exporter = InMemorySpanExporter()
    ctxprop.init(exporter=exporter, service_name="wrap-run-in-executor")
    with ThreadPoolExecutor(max_workers=2) as pool:
        users = ["ana", "bo", "cy"]
        results = await asyncio.gather(*(handle_request(pool, u, i) for i, u in enumerate(users)))
    for line in results:
        print(line)
    await ctxprop.aflush()

    spans = exporter.get_finished_spans()
    names = {s.context.span_id: s.name for s in spans}
    print("\nworker span -> parent:")
    for s in spans:
        if s.name == "blocking_io":
            parent = names.get(s.parent.span_id) if s.parent else "NONE (orphan)"
            print(f"  blocking_io (user={(s.attributes or {}).get('user')}) -> {parent}")
    await ctxprop.aclose()


if __name__ == "__main__":
    asyncio.run(main())
