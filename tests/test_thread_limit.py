"""Where no thread can start, under a real limit (the child's own pids cgroup, ``threadlimit``): spans
still end without an exception, are kept, and ``close()`` exports them in the calling thread, within its
deadline; the books balance."""

from __future__ import annotations

from pathlib import Path

import pytest
import threadlimit
from support import REPO, OTLPReceiver, assert_books_balance, run_child

pytestmark = pytest.mark.skipif(threadlimit.unavailable() is not None, reason=str(threadlimit.unavailable()))

CHILD = (
    """
import json, os, sys, threading, time
import ctxprop
from opentelemetry import trace
"""
    + threadlimit.LIMIT_THREADS
    + """
def out(**kw):
    print(json.dumps(kw), flush=True)

ctxprop.init(endpoint=os.environ["EP"], close_timeout=5.0, schedule_delay=60, handle_signals=False)
control = limit_threads()
tracer = trace.get_tracer("limited")
for i in range(50):
    tracer.start_span(f"t-{i}").end()
t = time.monotonic()
ctxprop.close()
out(control=control, close_s=time.monotonic() - t, stats=ctxprop.stats())
"""
)


def test_spans_ending_where_no_thread_can_start_are_delivered_by_close_in_the_calling_thread(
    tmp_path: Path,
) -> None:
    """No export thread can start (the control: ``Thread.start()`` is refused): 50 spans end quietly and
    wait; ``close()`` exports them inline to the collector, each once; nothing on stderr, exit status 0."""
    with OTLPReceiver() as rx, threadlimit.cgroup() as env:
        env.update({"EP": rx.endpoint, "CTXPROP_SPOOL_DIR": str(tmp_path / "spool"), "PYTHONPATH": str(REPO)})
        res = run_child(CHILD, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
        assert res.last("control") == "can't start new thread"
        assert rx.wait_for_spans(50, timeout=10)
        assert sorted(s.name for s in rx.spans) == sorted(f"t-{i}" for i in range(50))
    stats = res.last("stats")
    assert stats["worker_start_errors"] >= 1, stats
    assert stats["spans_exported"] == 50, stats
    assert res.last("close_s") < 5.0
    assert_books_balance(stats, ended=50)


CUSTOM = (
    """
import json, os, threading
import ctxprop
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
"""
    + threadlimit.LIMIT_THREADS
    + """
class Collecting(SpanExporter):
    def __init__(self):
        self.names, self.threads = [], set()
    def export(self, spans):
        self.names.extend(s.name for s in spans)
        self.threads.add(threading.current_thread().name)
        return SpanExportResult.SUCCESS

exporter = Collecting()
ctxprop.init(exporter=exporter, close_timeout=5.0, schedule_delay=60, handle_signals=False)
limit_threads()
for i in range(30):
    trace.get_tracer("limited").start_span(f"c-{i}").end()
ctxprop.close()
print(json.dumps({"names": sorted(exporter.names), "threads": sorted(exporter.threads),
                  "stats": ctxprop.stats()}), flush=True)
"""
)


def test_a_custom_exporter_gets_the_spans_inline_from_close_where_no_thread_can_start(tmp_path: Path) -> None:
    """The same with a custom exporter: ``close()`` calls its ``export()`` in the main thread, each span
    once, and the books balance. (There it has no deadline of ctxprop's: see the README.)"""
    with threadlimit.cgroup() as env:
        env.update({"CTXPROP_SPOOL_DIR": str(tmp_path / "spool"), "PYTHONPATH": str(REPO)})
        res = run_child(CUSTOM, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.last("names") == sorted(f"c-{i}" for i in range(30))
    assert res.last("threads") == ["MainThread"]
    assert_books_balance(res.last("stats"), ended=30)
    assert res.last("stats")["spans_exported"] == 30
