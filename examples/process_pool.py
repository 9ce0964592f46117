"""A process pool whose tasks run in the submitter's trace and scopes, and whose spans come home.

``ContextAwareProcessPoolExecutor`` is a drop-in ``ProcessPoolExecutor``. With each task it sends the W3C
trace context, the baggage and the scopes' tags to the worker process; spans the task makes there are
children of the submitting span, carry the tags, and travel back with the result to this process's
pipeline, so they reach your collector with no set-up in the workers (fork, spawn or forkserver), and
``shutdown()`` returns only once they were sent. Note the pool is created before any scope or span exists.

Runs as is: a loopback OTLP receiver started in this process stands in for your collector.
"""

from __future__ import annotations

import os
import tempfile

from opentelemetry import trace

import ctxprop


def resize(image: int) -> int:
    """Runs in a worker process."""
    with trace.get_tracer("thumbnails").start_as_current_span("resize") as span:
        span.set_attribute("image", image)
        return os.getpid()


def main() -> None:
    from ctxprop._devtools.receiver import OTLPReceiver

    pool = ctxprop.ContextAwareProcessPoolExecutor(max_workers=2)
    with OTLPReceiver() as collector, tempfile.TemporaryDirectory() as spool:
        ctxprop.init(service_name="thumbnails", endpoint=collector.endpoint, spool_dir=spool)
        with (
            ctxprop.isolation_scope(),
            trace.get_tracer("thumbnails").start_as_current_span("batch") as batch,
        ):
            ctxprop.set_tag("batch", "2024-06-01")
            pids = set(pool.map(resize, range(6)))
        pool.shutdown()  # the worker spans were sent before this returns
        workers = collector.tally("resize", parent=batch, tag=("batch", "2024-06-01"))
        print(f"6 tasks ran in worker processes, none in the parent: {os.getpid() not in pids}")
        print(f"{workers.arrived}/6 worker spans reached the collector before shutdown() returned")
        print(
            f"{workers.children}/6 are children of the 'batch' span; "
            f"{workers.tagged}/6 carry the tag batch=2024-06-01"
        )
        ctxprop.close()


if __name__ == "__main__":
    main()
