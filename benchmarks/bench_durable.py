"""Durable mode's cost per span against the same processor without it, in one run, same collector.

Durable mode writes each batch to the spool (one file, one fsync) before exporting it and removes it once
the collector acknowledged it. The contenders are ctxprop's processor with the OTLP sender and a spool,
with ``durable=False`` and ``durable=True``, interleaved round by round; per round:

- app-thread cost per span (start_span + 3 attributes + end);
- end-to-end cost per span: from the first span until the loopback collector acknowledged the last one
  (then the spool holds nothing: every write-ahead record was acknowledged and removed);
- the write-ahead cost itself: ``write_ahead`` + ``ack`` of one real batch, per batch and per span.

The collector is ctxprop's loopback receiver in a separate process, so it does not compete for this
process's GIL. The spool lives in a temporary directory on the same file system as ``$TMPDIR``.

    python benchmarks/bench_durable.py            # full run
    python benchmarks/bench_durable.py --quick    # < 20 s
    python benchmarks/bench_durable.py --smoke    # a few seconds: checks the script still works
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The same loopback collector process as the pipeline benchmark (this directory is on sys.path).
from bench_pipeline import Collector, make_spans  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from ctxprop._processor import CtxpropSpanProcessor  # noqa: E402
from ctxprop._spool import Spool  # noqa: E402
from ctxprop._transport import OTLPSender, quiet_official_loggers  # noqa: E402

TARGET = 1.3
BATCH = 512

MODES = {
    "durable=False": (False, True),
    "durable=True (fdatasync per batch)": (True, True),
    "durable=True, CTXPROP_SPOOL_FSYNC=0": (True, False),
}


def one_round(mode: str, collector: Collector, spool_dir: str, n: int) -> tuple[float, float, float]:
    """(app-thread s/span, end-to-end s/span, process CPU s/span) for one contender."""
    durable, sync = MODES[mode]
    spool = Spool.open(spool_dir, fsync=sync)
    proc = CtxpropSpanProcessor(
        sender=OTLPSender(collector.endpoint),
        spool=spool,
        durable=durable,
        max_queue_size=n + 1,
        max_export_batch_size=BATCH,
    )
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(proc)
    tracer = provider.get_tracer("bench")
    base = collector.spans()
    c0 = time.process_time()
    t0 = time.perf_counter()
    make_spans(tracer, n)
    t1 = time.perf_counter()
    provider.force_flush(120_000)
    t2 = collector.wait_for(base + n)
    c1 = time.process_time()
    provider.shutdown()
    left = [name for name in os.listdir(spool_dir) if name.startswith("seg-")]
    if left:
        raise SystemExit(f"{mode}: {len(left)} spool records left after a clean run")
    spool.close()
    return (t1 - t0) / n, (t2 - t0) / n, (c1 - c0) / n


def write_ahead_cost(spool_dir: str, repeats: int) -> float:
    """Seconds per batch of ``BATCH`` spans for write_ahead + ack (file, one fsync, unlink)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    make_spans(provider.get_tracer("bench"), BATCH)
    payload = encode_spans(exporter.get_finished_spans()).SerializeToString()
    spool = Spool.open(spool_dir)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        spool.ack(spool.write_ahead(payload, BATCH))
        times.append(time.perf_counter() - t0)
    spool.close()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer spans and rounds (< 20 s)")
    ap.add_argument("--smoke", action="store_true", help="one tiny round: checks the script works")
    ap.add_argument("--spans", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    n = args.spans or (1_000 if args.smoke else 10_000 if args.quick else 40_000)
    rounds = args.rounds or (1 if args.smoke else 3 if args.quick else 7)
    quiet_official_loggers()

    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="ctxprop-bench-durable-") as tmp:
        spool_dir = os.path.join(tmp, "spool")
        collector = Collector()
        try:
            if not args.smoke:
                one_round("durable=True (fdatasync per batch)", collector, spool_dir, 2000)  # warm up
            for r in range(rounds):
                order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
                for mode in order:  # interleaved, so drift in machine load hits every mode alike
                    results[mode].append(one_round(mode, collector, spool_dir, n))
        finally:
            collector.close()
        per_batch = write_ahead_cost(spool_dir, 3 if args.smoke else 30 if args.quick else 100)

    plain = "durable=False"
    durable = "durable=True (fdatasync per batch)"
    print(f"{n} spans x {rounds} rounds, interleaved; medians; batches of {BATCH}")
    print(f"{'':38} {'app thread':>12} {'end to end':>12} {'CPU':>12} {'e2e ratio':>10}")
    for mode, rows in results.items():
        app = statistics.median(r[0] for r in rows)
        e2e = statistics.median(r[1] for r in rows)
        cpu = statistics.median(r[2] for r in rows)
        # Paired per round: each durable round against the plain round next to it.
        paired = statistics.median(d[1] / p[1] for d, p in zip(rows, results[plain], strict=True))
        print(f"{mode:38} {app * 1e6:9.2f} us {e2e * 1e6:9.2f} us {cpu * 1e6:9.2f} us {paired:9.2f}x")
    headline = statistics.median(
        d[1] / p[1] for d, p in zip(results[durable], results[plain], strict=True)
    )
    cpu_ratio = statistics.median(
        d[2] / p[2] for d, p in zip(results[durable], results[plain], strict=True)
    )
    print(f"write_ahead + ack of one batch: {per_batch * 1e3:.2f} ms", end=" ")
    print(f"({per_batch / BATCH * 1e6:.2f} us per span)")
    print(
        f"durable (default) vs non-durable, end-to-end cost per span: {headline:.2f}x, CPU per span: "
        f"{cpu_ratio:.2f}x; target <= {TARGET}x: {'PASS' if headline <= TARGET else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
