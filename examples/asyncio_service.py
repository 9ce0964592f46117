"""A FastAPI-style asyncio service: one isolation scope per request, blocking work in a thread pool.

Frameworks run each request as a task on one event loop and push blocking calls (a database driver, file
I/O) to a thread pool with ``loop.run_in_executor``, which does not carry the request's context: the
worker's spans lose their parent and the request's tags. ``ctxprop.run_in_executor_with_context`` does,
with the app's own pool or with the loop's default one (``None``).

No web framework needed to run it: ``handle()`` is what a route handler would be.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxprop

tracer = trace.get_tracer("orders-api")
db_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="db")


def query_orders(customer: int) -> int:
    """Blocking work, as a synchronous database driver would do it."""
    with tracer.start_as_current_span("SELECT orders", attributes={"db.system": "postgresql"}):
        time.sleep(0.001)
        return customer * 10


def render(orders: int) -> str:
    with tracer.start_as_current_span("render"):
        return f"{orders} orders"


async def handle(request_id: str, customer: int) -> str:
    """A route handler: its own isolation scope, so its tags never mix with another request's."""
    with ctxprop.isolation_scope():
        ctxprop.set_tag("request_id", request_id)
        ctxprop.set_tag("customer", customer)
        with tracer.start_as_current_span(f"GET /customers/{customer}/orders"):
            orders = await ctxprop.run_in_executor_with_context(None, db_pool, query_orders, customer)
            return await ctxprop.run_in_executor_with_context(None, None, render, orders)  # default pool


async def serve() -> None:
    requests = [(f"req-{i}", 100 + i) for i in range(8)]
    await asyncio.gather(*(handle(rid, customer) for rid, customer in requests))


def main() -> None:
    memory = InMemorySpanExporter()  # stands in for your collector
    ctxprop.init(service_name="orders-api", exporter=memory)
    asyncio.run(serve())
    db_pool.shutdown()
    ctxprop.close()
    spans = memory.get_finished_spans()
    roots = {s.attributes["request_id"]: s for s in spans if s.name.startswith("GET ")}
    good = 0
    for rid, root in sorted(roots.items()):
        workers = [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
        ok = sorted(w.name for w in workers) == ["SELECT orders", "render"] and all(
            w.attributes.get("request_id") == rid for w in workers
        )
        good += ok
        names = ", ".join(sorted(w.name for w in workers))
        print(f"{rid}: {root.name} -> {names} ({'ok' if ok else 'BROKEN'})")
    print(f"{good}/{len(roots)} requests: worker spans under their request span, request tags on them")


if __name__ == "__main__":
    main()
