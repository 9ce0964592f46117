"""ctxprop's batching processor vs OpenTelemetry's stock BatchSpanProcessor, in one run, same collector.

Measures, interleaving the contenders round by round:
- app-thread cost per span (start_span + 3 attributes + end) while the exporter works in the background;
- end-to-end spans/s: from the first span to the loopback collector acknowledging the last one (each
  contender flushes at the end so the stock processor's 5 s schedule delay does not count against it);
- how long ``close()`` / ``provider.shutdown()`` takes at the end of a short script, collector up and down;
- encode cost per span, official ``encode_spans(spans).SerializeToString()`` against ctxprop's encoder, on
  512 spans of the benchmark's shape (the three attributes above and a float: four), interleaved.

The collector is ctxprop's loopback receiver in a separate process (``keep_spans=False``: it parses each
request with protobuf's C parser and counts), so it does not compete for this process's GIL.

    python benchmarks/bench_pipeline.py            # full run
    python benchmarks/bench_pipeline.py --quick    # < 30 s
"""

# ruff: noqa: S603, S101  (the benchmark runs its own child processes with sys.executable; asserts on its pipes)
from __future__ import annotations

import argparse
import gc
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402
from opentelemetry.trace import Tracer  # noqa: E402

from ctxprop._processor import CtxpropSpanProcessor  # noqa: E402
from ctxprop._spool import Spool  # noqa: E402
from ctxprop._transport import OTLPSender, quiet_official_loggers, stable_resource  # noqa: E402

RECEIVER = """
import sys
from ctxprop._devtools.receiver import OTLPReceiver
rx = OTLPReceiver(keep_spans=False).start()
print(rx.port, flush=True)
sys.stdin.read()
rx.stop()
"""


class Collector:
    """The loopback receiver in its own process, watched through GET /stats."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RECEIVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
            env=_env(),
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.endpoint = f"http://127.0.0.1:{self.port}/v1/traces"
        self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def spans(self) -> int:
        self._conn.request("GET", "/stats")
        return int(json.loads(self._conn.getresponse().read())["spans"])

    def wait_for(self, n: int, timeout: float = 120) -> float:
        deadline = time.perf_counter() + timeout
        while True:
            now = time.perf_counter()
            if self.spans() >= n or now > deadline:
                return now
            time.sleep(0.002)

    def close(self) -> None:
        self._conn.close()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


Contender = Callable[[str, int], tuple[list[SpanProcessor], Resource]]


def stock_bsp(endpoint: str, queue: int) -> tuple[list[SpanProcessor], Resource]:
    bsp = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), max_queue_size=queue)
    return [bsp], Resource.create({})


_SPOOL_DIR = tempfile.TemporaryDirectory(prefix="bench-pipeline-spool-")


def ctxprop_pipeline(endpoint: str, queue: int) -> tuple[list[SpanProcessor], Resource]:
    # What init() builds: ctxprop's processor, tagging spans with the scopes' tags as they start (its cost
    # counts against ctxprop), with its OTLP sender and a spool (looked at after each delivered batch),
    # and its resource (hash computed once).
    proc = CtxpropSpanProcessor(
        sender=OTLPSender(endpoint), spool=Spool.open(_SPOOL_DIR.name), max_queue_size=queue, tag_scopes=True
    )
    return [proc], stable_resource(Resource.create({}))


def ctxprop_same_exporter(endpoint: str, queue: int) -> tuple[list[SpanProcessor], Resource]:
    # The processor alone: the stock exporter and the stock resource, as the BSP row has.
    proc = CtxpropSpanProcessor(exporter=OTLPSpanExporter(endpoint=endpoint), max_queue_size=queue)
    return [proc], Resource.create({})


BASE = "stock BatchSpanProcessor + OTLPSpanExporter"
CONTENDERS: dict[str, Contender] = {
    BASE: stock_bsp,
    "ctxprop pipeline (as init() builds it)": ctxprop_pipeline,
    "ctxprop processor + stock OTLPSpanExporter": ctxprop_same_exporter,
}


def pipeline(procs: list[SpanProcessor], resource: Resource) -> tuple[TracerProvider, Tracer]:
    """A provider with these processors, in order, and the benchmark's tracer from it."""
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for proc in procs:
        provider.add_span_processor(proc)
    return provider, provider.get_tracer("bench")


def make_spans(tracer: Tracer, n: int) -> None:
    """``n`` spans as an application makes them: start, 3 attributes, end."""
    for i in range(n):
        span = tracer.start_span("op")
        span.set_attribute("i", i)
        span.set_attribute("route", "/items/{id}")
        span.set_attribute("ok", True)
        span.end()


class GCTimer:
    """Wall time spent in the garbage collector (every thread's collections), from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t0


def one_round(name: str, collector: Collector, n: int) -> tuple[float, float, float, float]:
    procs, resource = CONTENDERS[name](collector.endpoint, n + 1)
    provider, tracer = pipeline(procs, resource)
    base = collector.spans()
    gc_timer = GCTimer()
    gc.callbacks.append(gc_timer)
    try:
        c0 = time.process_time()  # every thread of this process: the app's, the exporter's, the GC's
        t0 = time.perf_counter()
        make_spans(tracer, n)
        t1 = time.perf_counter()
        provider.force_flush(120_000)
        t2 = collector.wait_for(base + n)
        c2 = time.process_time()
    finally:
        gc.callbacks.remove(gc_timer)
    provider.shutdown()
    return (t1 - t0) / n, n / (t2 - t0), (c2 - c0) / n, gc_timer.total / n


def queue_memory(endpoint: str, n: int = 10_000) -> dict[str, float]:
    """Bytes of memory per span waiting in the queue (``tracemalloc``), for the stock processor and for
    ctxprop's pipeline, neither exporting while it is measured."""
    import tracemalloc

    size, never = n + 1, 1e9  # room for every span, and no scheduled export
    builders: dict[str, Callable[[], tuple[list[SpanProcessor], Resource]]] = {
        "stock": lambda: (
            [BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), size, never, size)],
            Resource.create({}),
        ),
        "ctxprop": lambda: (
            [CtxpropSpanProcessor(None, size, never, size, sender=OTLPSender(endpoint), tag_scopes=True)],
            stable_resource(Resource.create({})),
        ),
    }
    out: dict[str, float] = {}
    for name, build in builders.items():
        procs, resource = build()
        provider, tracer = pipeline(procs, resource)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        make_spans(tracer, n)
        gc.collect()
        out[name] = (tracemalloc.get_traced_memory()[0] - before) / n
        tracemalloc.stop()
        provider.shutdown()
    return out


def bench_spans(n: int, first: int = 0) -> list[Any]:
    """``n`` finished spans of the benchmark's shape, four attributes each (for the encoders alone), their
    ``i`` and ``size`` values counting from ``first``."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=stable_resource(Resource.create({})), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    for i in range(first, first + n):
        span = tracer.start_span("op")
        span.set_attribute("i", i)
        span.set_attribute("route", "/items/{id}")
        span.set_attribute("ok", True)
        span.set_attribute("size", i * 0.5)
        span.end()
    return list(exporter.get_finished_spans())


def encode_costs(rounds: int) -> dict[str, float]:
    """Best-of-rounds microseconds per span for each encoder, interleaved in every round:

    - ``official``: ``encode_spans(spans).SerializeToString()``;
    - ``ctxprop``: ctxprop's encoder given the same spans (the path of a span ctxprop does not snapshot);
    - ``queued``: what ctxprop's pipeline does for each span: the snapshot taken as it ends
      (``_encoding.record``) and the batch of snapshots written, both counted.

    Every encode gets spans it has not seen: their ``i`` and ``size`` values are new, as in a running
    application, so no cache of ctxprop's encoder is warmer than it would be there.
    """
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from ctxprop._encoding import encode_fast, prepare, record

    prepare()
    spans = bench_spans(512)
    official_bytes = encode_spans(spans).SerializeToString()
    if (
        encode_fast(spans).payload != official_bytes
        or encode_fast([record(s) for s in spans]).payload != official_bytes
    ):
        raise SystemExit("ctxprop's encoder and the official one disagree on the benchmark's spans")
    encoders: dict[str, Callable[[list[Any]], object]] = {
        "official": lambda batch: encode_spans(batch).SerializeToString(),
        "ctxprop": encode_fast,
        "queued": lambda batch: encode_fast([record(s) for s in batch]),
    }
    best = dict.fromkeys(encoders, float("inf"))
    first = 512
    for _ in range(rounds):
        for name, fn in encoders.items():
            batches = [bench_spans(512, first + k * 512) for k in range(5)]
            first += 5 * 512
            t0 = time.process_time()
            for batch in batches:
                fn(batch)
            best[name] = min(best[name], (time.process_time() - t0) / 5 / 512 * 1e6)
    return best


CLOSE_SCRIPT = """
import sys, time
kind, endpoint = sys.argv[1], sys.argv[2]
from opentelemetry import trace
if kind == "ctxprop":
    import ctxprop
    ctxprop.init(endpoint=endpoint, spool_dir=sys.argv[3])
    end = ctxprop.close
else:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    end = provider.shutdown
tracer = trace.get_tracer("short")
for i in range(200):
    with tracer.start_as_current_span("step"):
        pass
t0 = time.perf_counter()
end()
print(time.perf_counter() - t0, flush=True)
"""


def close_time(kind: str, endpoint: str, spool: str) -> tuple[float, str]:
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CLOSE_SCRIPT), kind, endpoint, spool],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    try:
        return float(res.stdout.strip().splitlines()[-1]), res.stderr
    except (ValueError, IndexError):
        return float("nan"), res.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer spans and rounds (< 30 s)")
    ap.add_argument("--spans", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    n = args.spans or (8_000 if args.quick else 40_000)
    rounds = args.rounds or (3 if args.quick else 5)
    quiet_official_loggers()

    costs = encode_costs(10 if args.quick else 40)
    print("encode, us per span (512 spans, four attributes; best of interleaved rounds):")
    print(
        f"  official {costs['official']:6.2f}   ctxprop from spans {costs['ctxprop']:6.2f}"
        f" ({costs['official'] / costs['ctxprop']:4.2f}x)   ctxprop as queued (snapshot + write)"
        f" {costs['queued']:6.2f} ({costs['official'] / costs['queued']:4.2f}x)\n"
    )

    collector = Collector()
    results: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in CONTENDERS}
    try:
        one_round(next(iter(CONTENDERS)), collector, 2000)  # warm imports, connections, caches
        for r in range(rounds):
            order = list(CONTENDERS)
            if r % 2:
                order.reverse()  # interleave so drift in machine load hits every contender alike
            for name in order:
                results[name].append(one_round(name, collector, n))
        memory = queue_memory(collector.endpoint)
    finally:
        collector.close()

    base = BASE
    med: dict[str, tuple[float, float, float, float]] = {}
    for k, v in results.items():
        med[k] = (
            statistics.median(r[0] for r in v),
            statistics.median(r[1] for r in v),
            statistics.median(r[2] for r in v),
            statistics.median(r[3] for r in v),
        )
    print(f"{n} spans x {rounds} rounds, interleaved; medians")
    print(
        f"{'contender':52} {'app us/span':>11} {'x BSP':>7} {'e2e spans/s':>12} {'x BSP':>7}"
        f" {'CPU us/span':>11} {'x BSP':>7} {'GC us/span':>10}"
    )
    b_cost, b_tput, b_cpu, _ = med[base]
    for k, (cost, tput, cpu, gc_cost) in med.items():
        print(
            f"{k:52} {cost * 1e6:11.2f} {cost / b_cost:7.2f} {tput:12.0f} {tput / b_tput:7.2f}"
            f" {cpu * 1e6:11.2f} {cpu / b_cpu:7.2f} {gc_cost * 1e6:10.2f}"
        )
    print("(budgets for ctxprop's pipeline: app-thread cost <= 0.6x BSP, end-to-end >= 2x BSP;")
    print(" CPU: the whole process's CPU time from the first span to the last one delivered, per span;")
    print(" GC: time in the garbage collector over the same span, per span)")
    print(
        f"\nmemory per queued span (tracemalloc, 10000 spans waiting): stock {memory['stock']:.0f} bytes,"
        f" ctxprop {memory['ctxprop']:.0f} bytes ({memory['stock'] / memory['ctxprop']:.1f}x less)"
    )

    print("\nclose() at the end of a short script (200 spans), seconds:")
    with tempfile.TemporaryDirectory() as spool:
        up = Collector()
        try:
            rows: list[tuple[str, Any, Any]] = []
            for kind in ("ctxprop", "bsp"):
                t_up, _ = close_time(kind, up.endpoint, spool)
                t_down, err = close_time(kind, "http://127.0.0.1:9/v1/traces", spool)
                rows.append((kind, t_up, t_down))
                if kind == "ctxprop" and err:
                    print(f"  (ctxprop wrote to stderr: {err[:200]!r})")
        finally:
            up.close()
    for kind, t_up, t_down in rows:
        label = "ctxprop.close()" if kind == "ctxprop" else "stock provider.shutdown()"
        print(f"  {label:28} collector up {t_up:6.3f}   collector down {t_down:6.3f}")


if __name__ == "__main__":
    main()
