"""A child Python process continues the parent's trace: ``subprocess_env()`` and ``run_subprocess()``.

``ctxprop.subprocess_env()`` returns a copy of the environment with ``TRACEPARENT``, ``TRACESTATE`` and
``BAGGAGE`` (the OpenTelemetry environment-carrier names) and ``CTXPROP_TAGS`` (the scopes' tags as JSON).
A child that calls ``ctxprop.init()`` continues the trace: its spans are children of the parent's current
span, and its scopes start with the parent's tags. ``run_subprocess(args, **kwargs)`` is ``subprocess.run``
with that environment.

Runs as is: a loopback OTLP receiver started in this process stands in for your collector.
"""

from __future__ import annotations

import os
import sys
import tempfile

from opentelemetry import trace

import ctxprop
from ctxprop._subprocess import run_subprocess

CHILD = """
import ctxprop
from opentelemetry import trace
ctxprop.init(service_name="exporter-job")   # continues the trace found in TRACEPARENT
with trace.get_tracer("exporter-job").start_as_current_span("export-rows"):
    pass
ctxprop.close()
"""


def main() -> None:
    from ctxprop._devtools.receiver import OTLPReceiver

    with OTLPReceiver() as collector, tempfile.TemporaryDirectory() as spool:
        ctxprop.init(service_name="scheduler", endpoint=collector.endpoint, spool_dir=spool)
        # The child finds its collector the standard way; CTXPROP_SPOOL_DIR keeps this demo self-contained.
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint,
            "CTXPROP_SPOOL_DIR": spool,
        }
        with trace.get_tracer("scheduler").start_as_current_span("nightly") as parent:
            ctxprop.set_tag("run", "2024-06-01")
            done = run_subprocess([sys.executable, "-c", CHILD], env=env, check=True)
        ctxprop.close()
        ctx = parent.get_span_context()
        child = next(s for s in collector.spans if s.name == "export-rows")
        same_trace = child.trace_id == format(ctx.trace_id, "032x")
        under_parent = child.parent_span_id == format(ctx.span_id, "016x")
        print(f"child exited with {done.returncode}; its span {child.name!r} (service {child.service_name}):")
        print(f"same trace as the parent: {same_trace}; child of the parent's 'nightly' span: {under_parent}")
        print(f"carries the parent's tag run={child.attributes.get('run')}")


if __name__ == "__main__":
    main()
