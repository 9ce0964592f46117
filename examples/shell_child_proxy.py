"""Spans from a shell script (or any program that cannot run ctxprop): ``run_proxied()``.

The child prints structured lines, ``::ctxprop:: {json}``, to its standard output; the parent turns them
into child spans and span events of its current span. Every other line is passed through untouched, and a
malformed structured line is passed through too. The format (also in ``ctxprop/_proxy.py``)::

    ::ctxprop:: {"span": NAME, "event": "start", "attributes": {...}}
    ::ctxprop:: {"span": NAME, "event": "end", "status": "ok"|"error", "message": TEXT}
    ::ctxprop:: {"event_name": NAME, "attributes": {...}}

Runs as is: a loopback OTLP receiver started in this process stands in for your collector.
"""

from __future__ import annotations

import tempfile

from opentelemetry import trace

import ctxprop
from ctxprop._proxy import run_proxied

SCRIPT = r"""
p="$CTXPROP_PROXY_PREFIX"
echo "${p}{\"span\": \"fetch\", \"event\": \"start\", \"attributes\": {\"url\": \"https://example.com/data.csv\"}}"
echo "downloading... done"
echo "${p}{\"span\": \"fetch\", \"event\": \"end\", \"status\": \"ok\"}"
echo "${p}{\"span\": \"load\", \"event\": \"start\"}"
echo "${p}{\"event_name\": \"rows-rejected\", \"attributes\": {\"count\": 3}}"
echo "${p}{\"span\": \"load\", \"event\": \"end\", \"status\": \"error\", \"message\": \"3 rows rejected\"}"
echo "${p}{this line is not JSON, so it is printed as is"
"""


def main() -> None:
    from ctxprop._devtools.receiver import OTLPReceiver

    with OTLPReceiver() as collector, tempfile.TemporaryDirectory() as spool:
        ctxprop.init(service_name="etl", endpoint=collector.endpoint, spool_dir=spool)
        with trace.get_tracer("etl").start_as_current_span("nightly-etl") as parent:
            status = run_proxied(["bash", "-c", SCRIPT])
        ctxprop.close()
        parent_id = format(parent.get_span_context().span_id, "016x")
        for span in sorted(collector.spans, key=lambda s: s.start_ns):
            if span.name == "nightly-etl":
                continue
            events = [name for name, _ in span.events]
            under = "child of nightly-etl" if span.parent_span_id == parent_id else "NOT under nightly-etl"
            state = {0: "unset", 1: "ok", 2: "error"}[span.status_code]
            print(f"span {span.name!r}: {under}, status {state}, events {events}")
        print(f"script exited with {status}")


if __name__ == "__main__":
    main()
