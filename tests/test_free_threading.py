"""Shared state under truly parallel threads (the free-threaded 3.13t build runs these without a GIL):
counters, scope writes, capture-hook registration, ``@worker``'s once-per-function warning."""

from __future__ import annotations

import sys
import sysconfig
import threading
from collections.abc import Callable
from typing import Any

import pytest
from support import ended, run_child

from ctxprop import _capture, _stats
from ctxprop._scopes import Scope

THREADS = 8
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def _in_parallel(body: Callable[[int], None], threads: int = THREADS) -> None:
    """Run ``body(i)`` on ``threads`` threads released together; re-raise the first failure here."""
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait(timeout=30)
            body(i)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in workers)
    if errors:
        raise errors[0]


def test_counters_lose_no_increment_while_threads_count_and_read() -> None:
    """8 threads counting 20,000 times each while another folds and reads: the total is exact."""
    per_thread = 20_000
    stop = threading.Event()
    reads: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            reads.append(_stats.snapshot().get("ft", 0))

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        _in_parallel(lambda _i: [_stats.incr("ft") for _ in range(per_thread)] and None)
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert _stats.snapshot()["ft"] == THREADS * per_thread
    assert reads == sorted(reads)  # a reader never sees the total go back


def test_parallel_writes_to_one_scope_all_land() -> None:
    """8 threads setting 300 keys each on the same scope: no write is lost, readers see only whole dicts."""
    scope = Scope()
    per_thread = 300
    sizes: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            tags = scope.fork().tags
            sizes.append(len(tags))

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        _in_parallel(lambda i: [scope.set_tag(f"t{i}-{k}", k) for k in range(per_thread)] and None)
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert len(scope.tags) == THREADS * per_thread
    assert all(scope.tags[f"t{i}-{k}"] == k for i in range(THREADS) for k in range(per_thread))
    assert sizes == sorted(sizes)  # keys are only added: a reader never sees one vanish


class _Hook:
    def capture(self) -> None:
        return None

    def activate(self, state: None) -> None:
        pass


def test_parallel_hook_registrations_all_land_and_all_leave() -> None:
    """8 threads registering 100 hooks each: all are kept; unregistering them in parallel leaves none."""
    hooks = [[_Hook() for _ in range(100)] for _ in range(THREADS)]
    before = _capture._hooks
    try:
        _in_parallel(lambda i: [_capture.register_capture_hook(h) for h in hooks[i]] and None)
        mine = {id(h) for group in hooks for h in group}
        assert sum(1 for h in _capture._hooks if id(h) in mine) == THREADS * 100
        _in_parallel(lambda i: [_capture.unregister_capture_hook(h) for h in hooks[i]] and None)
        assert not any(id(h) in mine for h in _capture._hooks)
    finally:
        for group in hooks:
            for h in group:
                _capture.unregister_capture_hook(h)
    assert _capture._hooks == before


RACING_WORKER = """
import threading, warnings
from concurrent.futures import ThreadPoolExecutor
import ctxprop
warnings.simplefilter("always")  # every warning shown: only the claim keeps it to one

@ctxprop.worker
def job():
    return 1

for round in range(5):
    start = threading.Barrier(8)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for f in [pool.submit(lambda: (start.wait(30), job())) for _ in range(8)]:
            f.result(timeout=30)
print("done")
"""


def test_worker_warns_once_when_pool_threads_race_to_the_first_call() -> None:
    """8 plain-pool threads calling a @worker function at once, 5 rounds: exactly one warning."""
    res = run_child(RACING_WORKER)
    assert res.returncode == 0, res.stderr
    assert res.stdout_lines[-1] == "done"
    assert res.stderr.count("is running on a thread-pool thread without its submitter's context") == 1


GIL_AFTER_IMPORTS = """
import json, sys
import wrapt
import google.protobuf
from google.protobuf.internal import api_implementation
import opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.http.trace_exporter
import ctxprop
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False)
ctxprop.instrument()
with opentelemetry.trace.get_tracer("t").start_as_current_span("s"):
    pass
print(json.dumps({"gil": sys._is_gil_enabled(), "protobuf": api_implementation.Type()}))
ctxprop.close(0)
"""


@pytest.mark.skipif(not FREE_THREADED, reason="the free-threaded build only")
def test_free_threaded_build_keeps_the_gil_off_with_ctxprop_and_the_sdk() -> None:
    """On 3.13t, importing ctxprop, the SDK, the exporter, wrapt and protobuf (and running a span) does
    not turn the GIL back on: the stress tests here really run in parallel."""
    res = run_child(GIL_AFTER_IMPORTS)
    assert res.returncode == 0, res.stderr
    found: dict[str, Any] = res.json_lines[-1]
    assert found["gil"] is False, found
    assert "GIL" not in res.stderr  # no "enabling the GIL" RuntimeWarning from an extension either
    assert sys._is_gil_enabled() is False  # type: ignore[attr-defined]  # and not in this process


def test_parallel_threads_encode_their_spans_exactly() -> None:
    """8 threads each snapshot 600 spans as the queue holds them and write each snapshot (the encoder's
    caches shared between them, cleared when full): every one is byte-equal to the official encoder's span."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext

    from ctxprop import _encoding, _otlp_wire

    _encoding.prepare()
    resource = Resource({"service.name": "parallel"})
    made: dict[int, list[tuple[ReadableSpan, Any, bytes]]] = {}

    def body(i: int) -> None:
        out = made.setdefault(i, [])
        for n in range(600):
            # Distinct keys and values on each thread, enough of them to fill and clear the caches.
            attributes: dict[str, Any] = {f"k{i}-{n % 97}": f"v{n % 211}", f"n{i}": n * 7}
            attributes.update({"x": n % 5, "f": n / 3})
            span = ended(
                ReadableSpan(
                    f"t{i}-{n}",
                    SpanContext(i + 1, n + 1, False),
                    resource=resource,
                    attributes=attributes,
                    start_time=1,
                    end_time=2,
                )
            )
            queued = _encoding.record(span)
            # Snapshotted and written on this thread, beside the others doing the same with the caches.
            out.append((span, queued, _otlp_wire.snapshot_field(queued)))  # type: ignore[arg-type]

    _in_parallel(body)
    for triples in made.values():
        for span, queued, field in triples:
            assert queued.__class__ is tuple
            assert field == _otlp_wire.official_span_field(span)
    everything = [queued for triples in made.values() for _, queued, _ in triples]
    spans = [span for triples in made.values() for span, _, _ in triples]
    assert _encoding.encode(everything).payload == encode_spans(spans).SerializeToString()
