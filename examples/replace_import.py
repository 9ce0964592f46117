"""Way 1: replace the import.

``ContextAwareThreadPoolExecutor`` is a drop-in ``ThreadPoolExecutor``: change one import and every task
runs in its submitter's context (OpenTelemetry span, scope tags, your own ContextVars).

Run: python examples/replace_import.py
"""

from __future__ import annotations

import contextvars

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxprop

# Before: from concurrent.futures import ThreadPoolExecutor
from ctxprop import ContextAwareThreadPoolExecutor as ThreadPoolExecutor

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="?")


def handle(item: int) -> str:
    with trace.get_tracer("example").start_as_current_span(f"handle-{item}"):
        tenant = ctxprop.get_isolation_scope().tags["tenant"]
        return f"item {item} of request {request_id.get()} (tenant {tenant})"


def main() -> None:
    exporter = InMemorySpanExporter()  # no network: keep the spans in memory and print them below
    ctxprop.init(exporter=exporter, service_name="replace-import")
    tracer = trace.get_tracer("example")
    with ThreadPoolExecutor(max_workers=2) as pool:
        for request in ("r-1", "r-2"):
            with ctxprop.isolation_scope(), tracer.start_as_current_span(f"request {request}"):
                request_id.set(request)
                ctxprop.set_tag("tenant", "acme" if request == "r-1" else "globex")
                for line in pool.map(handle, range(3)):
                    print(line)
    ctxprop.flush()

    spans = exporter.get_finished_spans()
    names = {s.context.span_id: s.name for s in spans}
    print("\nspan tree (child <- parent, tenant tag):")
    for s in spans:
        if s.name.startswith("handle"):
            parent = names.get(s.parent.span_id) if s.parent else None
            print(f"  {s.name} <- {parent}  tenant={(s.attributes or {}).get('tenant')}")
    orphans = sum(1 for s in spans if s.name.startswith("handle") and s.parent is None)
    print(f"orphaned worker spans: {orphans}/6")
    ctxprop.close()


if __name__ == "__main__":
    main()
