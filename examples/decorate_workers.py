"""Way 3: decorate your worker functions.

``@ctxprop.worker`` gives each call its own child span and its own forked scopes, records exceptions on
the span, and warns once if the function is ever called on a pool thread that lost its submitter's
context, naming the fix.

Run: python examples/decorate_workers.py
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxprop


@ctxprop.worker
def resize(image_id: int) -> str:
    ctxprop.set_tag("image", image_id)  # this call's own scope: the caller never sees it
    if image_id == 3:
        raise ValueError("corrupt image")
    return f"resized {image_id}"


@ctxprop.worker(name="thumbnail", attributes={"size": 128})
def thumbnail(image_id: int) -> str:
    return f"thumbnail {image_id}"


def main() -> None:
    exporter = InMemorySpanExporter()
    ctxprop.init(exporter=exporter, service_name="decorate-workers")
    tracer = trace.get_tracer("example")

    with ctxprop.isolation_scope(), ctxprop.ContextAwareThreadPoolExecutor(max_workers=2) as pool:
        ctxprop.set_tag("batch", "b-1")
        with tracer.start_as_current_span("batch"):
            futures = [pool.submit(resize, i) for i in (1, 2, 3)] + [pool.submit(thumbnail, 1)]
            for f in futures:
                try:
                    print(f.result())
                except ValueError as exc:
                    print(f"failed: {exc}")

    # The mistake @worker catches: a plain pool drops the context. It warns once, naming the fix.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracer.start_as_current_span("batch-plain-pool"), ThreadPoolExecutor(max_workers=2) as plain:
            list(plain.map(thumbnail, [5, 6, 7]))
    for w in caught:
        print(f"warning ({w.category.__name__}): {str(w.message)[:96]}...")

    ctxprop.flush()
    spans = exporter.get_finished_spans()
    names = {s.context.span_id: s.name for s in spans}
    print("\nspans:")
    for s in spans:
        parent = names.get(s.parent.span_id) if s.parent else "-"
        attrs = dict(s.attributes or {})
        print(f"  {s.name:<16} parent={parent:<17} status={s.status.status_code.name:<5} attrs={attrs}")
    ctxprop.close()


if __name__ == "__main__":
    main()
