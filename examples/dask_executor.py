"""Dask distributed: ``ctxprop.ContextAwareExecutor(client.get_executor())``, and ``Client.submit``/``map``
under ``ctxprop.instrument()``.

Dask pickles every task to send it to a worker process (on this host or another): the W3C trace context,
baggage and scope tags travel with it, and the spans a worker makes ride home with the result to this
process's pipeline, once however often the result is fetched. Register ``ctxprop.CtxpropWorkerPlugin(...)``
instead to have each worker export through a pipeline of its own.

Runs as is: a two-worker LocalCluster and a loopback OTLP receiver started here stand in for yours.
"""

from __future__ import annotations

import logging
import tempfile

from distributed import Client, LocalCluster
from opentelemetry import trace

import ctxprop


def load(partition: int) -> int:
    """Runs in a Dask worker process."""
    with trace.get_tracer("etl").start_as_current_span("load partition") as span:
        span.set_attribute("partition", partition)
        span.set_attribute("seen_tenant", str(ctxprop.get_isolation_scope().tags.get("tenant")))
        return partition * 10


def main() -> None:
    from ctxprop._devtools.receiver import OTLPReceiver

    with (
        OTLPReceiver() as collector,
        tempfile.TemporaryDirectory() as spool,
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        ctxprop.init(service_name="etl", endpoint=collector.endpoint, spool_dir=spool)
        with (
            ctxprop.isolation_scope(),
            trace.get_tracer("etl").start_as_current_span("nightly load") as root,
        ):
            ctxprop.set_tag("tenant", "acme")
            with ctxprop.ContextAwareExecutor(client.get_executor()) as executor:
                total = sum(executor.map(load, range(4)))
            ctxprop.instrument()
            future = client.submit(load, 4)
            total += future.result() + future.result()  # fetched twice, its span delivered once
            ctxprop.uninstrument()
        ctxprop.flush()
        loads = collector.tally("load partition", parent=root, tag=("tenant", "acme"))
        print(f"total {total}; {loads.arrived}/5 worker spans reached the collector")
        print(f"{loads.children}/5 are children of 'nightly load'; {loads.tagged}/5 carry tenant=acme")
        ctxprop.close()


if __name__ == "__main__":
    main()
