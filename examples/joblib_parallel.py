"""joblib.Parallel (loky, threading and multiprocessing backends) under ``ctxprop.instrument()``.

``instrument()`` patches ``joblib.Parallel`` when joblib is imported: each ``delayed`` task runs in the
caller's trace context and scopes whichever backend runs it. The threading backend runs it in a copy of
the caller's whole context; loky and multiprocessing pickle it, so the W3C trace context, baggage and
scope tags travel instead, and the spans the workers make ride home with the results to this process's
pipeline (no set-up in the workers).

Runs as is: a loopback OTLP receiver started in this process stands in for your collector.
"""

from __future__ import annotations

import tempfile

import joblib
from opentelemetry import trace

import ctxprop


def score(fold: int) -> tuple[int, str]:
    """Runs in a worker: a span of its own, and the tag the caller set."""
    with trace.get_tracer("training").start_as_current_span("score fold") as span:
        span.set_attribute("fold", fold)
        return fold, str(ctxprop.get_isolation_scope().tags.get("experiment"))


def main() -> None:
    from ctxprop._devtools.receiver import OTLPReceiver

    with OTLPReceiver() as collector, tempfile.TemporaryDirectory() as spool:
        ctxprop.init(service_name="training", endpoint=collector.endpoint, spool_dir=spool)
        ctxprop.instrument()
        with (
            ctxprop.isolation_scope(),
            trace.get_tracer("training").start_as_current_span("cross-validate") as root,
        ):
            ctxprop.set_tag("experiment", "lr-0.1")
            for backend in ("loky", "threading", "multiprocessing"):
                parallel = joblib.Parallel(n_jobs=2, backend=backend)
                results = parallel(joblib.delayed(score)(f) for f in range(4))
                print(f"{backend:>15}: tasks saw experiment={sorted({tag for _, tag in results})}")
        ctxprop.uninstrument()
        ctxprop.flush()
        folds = collector.tally("score fold", parent=root, tag=("experiment", "lr-0.1"))
        print(
            f"{folds.arrived}/12 task spans reached the collector, "
            f"{folds.children} children of 'cross-validate',"
        )
        print(f"{folds.tagged} tagged experiment=lr-0.1")
        ctxprop.close()


if __name__ == "__main__":
    main()
