"""Forking stays clean: with the exporter idle (before any span, after flush()) the process that forks has
one thread, so Python 3.12+ gives no multi-threaded-fork DeprecationWarning (3.15 raises it under
``-W error``); with spans in flight at the fork no span is lost or sent twice. Real child processes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from support import OTLPReceiver, assert_books_balance, receiver, run_child

__all__ = ["receiver"]

SCRIPT = """
import json, multiprocessing, os, threading, time, warnings
import ctxprop
from opentelemetry import trace

def out(**kw):
    print(json.dumps(kw), flush=True)

def make_spans(prefix, n):
    tracer = trace.get_tracer("fork")
    for i in range(n):
        tracer.start_span(f"{prefix}-{i}").end()

def fork_and_reap(tag):
    threads = threading.active_count()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # 3.12+ warns when forking with threads alive
        pid = os.fork()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    out(tag=tag, threads=threads, child=os.waitstatus_to_exitcode(status))

def in_mp_child():
    make_spans("mp", 20)
    ctxprop.close()

ctxprop.init(endpoint=os.environ["EP"], handle_signals=False, schedule_delay=60, max_export_batch_size=100)
fork_and_reap("before_any_span")
make_spans("flushed", 150)
ok = ctxprop.flush(10)
fork_and_reap("after_flush")
with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    p = multiprocessing.get_context("fork").Process(target=in_mp_child)
    p.start()
p.join(30)
out(mp_exit=p.exitcode)
ctxprop.flush(10)
make_spans("inflight", 350)  # full batches leave at once: some are in flight at the fork below
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # not idle: the warning is legitimate here
    pid = os.fork()
if pid == 0:
    make_spans("child", 40)
    ctxprop.close(10)
    out(child_stats=ctxprop.stats())
    os._exit(0)
os.waitpid(pid, 0)
ctxprop.close(10)
out(flushed=ok, stats=ctxprop.stats())
"""


def test_fork_while_idle_is_single_threaded_and_spans_in_flight_arrive_once(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """Before any span and after flush() the forking process has one thread (no DeprecationWarning on
    3.12+, an error here); a multiprocessing fork-context child delivers its spans; spans in flight at a
    fork arrive once, and the child's own once."""
    receiver.set_mode("slow", delay=0.2)
    res = run_child(
        SCRIPT, env={"EP": receiver.endpoint, "CTXPROP_SPOOL_DIR": str(tmp_path / "spool")}, timeout=90
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    forks = {line["tag"]: line for line in res.json_lines if "tag" in line}
    assert forks["before_any_span"]["threads"] == 1
    assert forks["before_any_span"]["child"] == 0
    assert forks["after_flush"]["threads"] == 1
    assert forks["after_flush"]["child"] == 0
    assert res.last("flushed") is True
    assert res.last("mp_exit") == 0
    names = Counter(s.name for s in receiver.spans)
    for prefix, n in (("flushed", 150), ("mp", 20), ("inflight", 350), ("child", 40)):
        got = {k: v for k, v in names.items() if k.startswith(prefix + "-")}
        assert len(got) == n, (prefix, len(got))
        assert set(got.values()) == {1}, prefix
    assert_books_balance(res.last("stats"), ended=150 + 350)
    assert_books_balance(res.last("child_stats"))
