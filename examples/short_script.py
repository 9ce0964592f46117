"""A short-lived script (CLI, cron job, batch step): make spans, call ``ctxprop.close()``, done.

A stock batching processor exports every few seconds, so a script that ends sooner loses spans unless it
remembers to flush. ``ctxprop.close()`` sends everything that ended, synchronously, within one deadline
(3 s by default) whatever state the collector is in; what cannot be sent by then waits in the spool for
the next run. (Normal exit, an unhandled exception and SIGTERM deliver too, see the README.)

Runs as is: a loopback OTLP receiver started in this process stands in for your collector. In your own
script, drop it and pass your collector's address, or set OTEL_EXPORTER_OTLP_ENDPOINT.
"""

from __future__ import annotations

import tempfile

from opentelemetry import trace

import ctxprop
from ctxprop._devtools.receiver import OTLPReceiver


def main() -> None:
    with OTLPReceiver() as collector, tempfile.TemporaryDirectory() as spool:
        ctxprop.init(service_name="nightly-report", endpoint=collector.endpoint, spool_dir=spool)
        tracer = trace.get_tracer("nightly-report")
        ctxprop.set_tag("report", "daily-sales")  # on every span started from here on
        with tracer.start_as_current_span("report"):
            for row in range(99):
                with tracer.start_as_current_span("row", attributes={"row": row}):
                    pass
        ctxprop.close()  # returns when the collector has the spans (or the deadline passed)
        received = collector.spans
        print(f"collector received {len(received)}/100 spans")
        tagged = sum(s.attributes.get("report") == "daily-sales" for s in received)
        print(f"{tagged}/{len(received)} carry the scope tag report=daily-sales")


if __name__ == "__main__":
    main()
