"""Delivery under hostile collectors and exporters: whole-request deadlines, one deadline per ending,
no duplicate of a batch in flight at close, no head-of-line blocking, partial success counted; the books
balance in every case. Real child processes against loopback collectors that misbehave."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import support
from collectors import serving
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from support import OTLPReceiver, assert_books_balance, run_child

from ctxprop import _stats
from ctxprop._processor import CtxpropSpanProcessor

receiver = support.receiver

PRELUDE = """
import json, os, signal, sys, time
import ctxprop
from opentelemetry import trace

def make_spans(prefix, n):
    tracer = trace.get_tracer("delivery")
    for i in range(n):
        tracer.start_span(f"{prefix}-{i}").end()

def out(**kw):
    print(json.dumps(kw), flush=True)
"""


def _env(endpoint: str, tmp_path: Path) -> dict[str, str]:
    return {"EP": endpoint, "CTXPROP_SPOOL_DIR": str(tmp_path / "spool")}


def _spool_spans(tmp_path: Path) -> int:
    from ctxprop._spool import Spool

    return Spool.open(tmp_path / "spool").status().spans


# -- whole-request deadlines -------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["close", "exit"])
def test_a_trickling_collector_cannot_hold_close_or_exit(tmp_path: Path, ending: str) -> None:
    """A collector that trickles its answer a byte at a time (faster than a socket timeout fires): close()
    and a plain exit still end within the deadline + 0.5 s, and the spans wait in the spool."""
    body = PRELUDE + f"""
ctxprop.init(endpoint=os.environ["EP"], close_timeout=1.0, schedule_delay=60, handle_signals=False)
make_spans("t", 50)
t0 = time.monotonic()
if {ending == "close"!r}:
    ctxprop.close()
    out(close_s=time.monotonic() - t0, stats=ctxprop.stats())
out(exiting_at=time.monotonic())
"""
    with serving("trickle") as col:
        res = run_child(body, env=_env(col.endpoint, tmp_path), timeout=30)
        ended = time.monotonic()
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert ended - res.last("exiting_at") < (1.0 if ending == "exit" else 0.0) + 0.5 + 1.0  # + teardown
    if ending == "close":
        assert res.last("close_s") < 1.0 + 0.5
        assert_books_balance(res.last("stats"), ended=50)
    assert _spool_spans(tmp_path) == 50


def test_sender_ends_a_trickled_answer_at_its_deadline() -> None:
    """One POST to a trickling collector returns by its timeout (+0.5 s) with a retryable outcome, and
    leaves no timer thread behind."""
    from ctxprop._encoding import encode
    from ctxprop._transport import OTLPSender

    before = threading.active_count()  # the collector's own threads are gone once serving() ends
    with serving("trickle") as col:
        sender = OTLPSender(col.endpoint)
        t0 = time.monotonic()
        out = sender(encode([]).payload, 0.8)
        took = time.monotonic() - t0
        sender.close()
    assert not out.ok
    assert out.retryable
    assert took < 0.8 + 0.5
    assert threading.active_count() == before


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    """Retry-After in delay-seconds or as an HTTP-date; junk or a date in the past is handled."""
    from ctxprop._transport import parse_retry_after

    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 30) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 + 30) == 0.0
    assert parse_retry_after("-3") is None
    assert parse_retry_after("later") is None
    assert parse_retry_after(None) is None


class _BlockingExporter(SpanExporter):
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.shutdowns = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(60)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.release.set()


@pytest.mark.parametrize(("batch", "abandoned", "queued"), [(512, 30, 0), (10, 10, 20)])
def test_a_blocking_custom_exporter_cannot_hold_close(
    tmp_path: Path, batch: int, abandoned: int, queued: int
) -> None:
    """init(exporter=...) whose export() never returns: close() still returns by its deadline + 0.5 s; the
    batch inside export() counts as abandoned, the batches still queued behind it (batches of 10) as
    dropped_close_timeout (a custom exporter's spans have no spool to go to); the books balance."""
    body = PRELUDE + f"""
import threading
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
entered = threading.Event()
class Stuck(SpanExporter):
    def export(self, spans):
        entered.set()
        threading.Event().wait(3600)
        return SpanExportResult.SUCCESS
ctxprop.init(exporter=Stuck(), close_timeout=1.0, schedule_delay=60, max_export_batch_size={batch},
             handle_signals=False)
make_spans("b", 30)
entered.wait(20)
t0 = time.monotonic()
ctxprop.close()
out(close_s=time.monotonic() - t0, stats=ctxprop.stats())
"""
    res = run_child(body, env={"CTXPROP_SPOOL_DIR": str(tmp_path / "spool")}, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.last("close_s") < 1.0 + 0.5
    stats = res.last("stats")
    assert stats["dropped_export_abandoned"] == abandoned, stats
    assert stats.get("dropped_close_timeout", 0) == queued, stats
    assert_books_balance(stats, ended=30)


def test_flush_returns_by_its_deadline_while_export_blocks() -> None:
    """A hand-added processor whose exporter blocks: force_flush() returns False by its deadline; once the
    exporter lets go, the spans are exported and nothing is counted twice."""
    exp = _BlockingExporter()
    proc = CtxpropSpanProcessor(exp, max_export_batch_size=5, schedule_delay_millis=60000)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(proc)
    tracer = provider.get_tracer("t")
    for i in range(5):
        tracer.start_span(f"x{i}").end()
    assert exp.entered.wait(20)
    t0 = time.monotonic()
    assert proc.force_flush(300) is False
    assert time.monotonic() - t0 < 0.3 + 0.5
    exp.release.set()
    assert proc.force_flush(20000) is True
    proc.shutdown()
    stats = _stats.snapshot()
    assert stats["spans_exported"] == 5
    assert exp.shutdowns == 1
    assert_books_balance(stats, ended=5)


# -- SIGTERM: one deadline ---------------------------------------------------------------------------------


def test_sigterm_with_a_chained_handler_and_a_hanging_collector_spends_one_deadline(tmp_path: Path) -> None:
    """SIGTERM, an application handler that exits, a collector that trickles its answer: from the signal
    to the process's end takes one close deadline (+0.5 s), not one for the handler's flush and one more
    at exit; every span is in the spool."""
    body = PRELUDE + """
def on_term(signum, frame):
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
ctxprop.init(endpoint=os.environ["EP"], close_timeout=2.0, schedule_delay=60, max_export_batch_size=100)
make_spans("s", 250)  # two full batches: the export thread has one in flight, the rest waits
proc = ctxprop._pipeline.current_processor()
while proc._inflight is None:
    time.sleep(0.005)
out(ready=True, ready_at=time.monotonic())  # the parent sends SIGTERM as soon as it reads this line
for _ in range(3000):  # short sleeps, so the handler runs even if SIGTERM lands just before one starts
    time.sleep(0.02)
"""
    with serving("trickle") as col:
        res = run_child(body, env=_env(col.endpoint, tmp_path), timeout=30, signal_after_line="ready")
        ended = time.monotonic()
    assert res.signalled
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert ended - res.last("ready_at") < 2.0 + 0.5 + 0.5  # + signal delivery, teardown, pipe reading
    assert _spool_spans(tmp_path) == 250


# -- exactly once: a batch in flight at close() --------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.3, 1.6])
def test_a_batch_in_flight_at_close_is_delivered_once(tmp_path: Path, delay: float) -> None:
    """A batch in flight at close() against a slow collector (answering within the 1 s deadline, or after
    it while the process lives on): its spool copy is removed once the collector acknowledges it, so the
    next start sends only what was never delivered. 600 spans, each once."""
    first = PRELUDE + """
ctxprop.init(endpoint=os.environ["EP"], close_timeout=1.0, schedule_delay=60, max_export_batch_size=512,
             handle_signals=False)
make_spans("f", 600)  # a full batch goes at once; 88 spans wait for close()
proc = ctxprop._pipeline.current_processor()
while proc._inflight is None:
    time.sleep(0.005)
t0 = time.monotonic()
ctxprop.close()
close_s = time.monotonic() - t0
deadline = time.monotonic() + 20
while ctxprop.stats().get("exported", 0) < 512 and time.monotonic() < deadline:
    time.sleep(0.01)  # the application lives on; the slow collector answers meanwhile
out(close_s=close_s, stats=ctxprop.stats())
"""
    second = PRELUDE + """
ctxprop.init(endpoint=os.environ["EP"], close_timeout=10.0, handle_signals=False)
ctxprop.close()
out(stats=ctxprop.stats())
"""
    with OTLPReceiver(mode="slow", delay=delay) as rx:
        a = run_child(first, env=_env(rx.endpoint, tmp_path), timeout=60)
        assert a.returncode == 0, a.stderr
        assert a.stderr == ""
        assert a.last("close_s") < 1.0 + 0.5
        stats = a.last("stats")
        rx.set_mode("ok")
        b = run_child(second, env=_env(rx.endpoint, tmp_path), timeout=60)
        assert b.returncode == 0, b.stderr
        names = Counter(s.name for s in rx.spans)
    assert len(names) == 600
    assert {k: v for k, v in names.items() if v > 1} == {}
    assert _spool_spans(tmp_path) == 0
    assert stats["exported"] >= 512  # at 0.3 s the 88 others are delivered within close() too
    assert_books_balance(stats, ended=600)
    assert_books_balance(b.last("stats"))


# -- no head-of-line blocking without a spool ----------------------------------------------------------------


class _Picky(SpanExporter):
    """Refuses batches with a 'refused' span, raises on batches with a 'raises' span, exports the rest."""

    def __init__(self) -> None:
        self.exported: list[str] = []
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        names = [s.name for s in spans]
        if any(n.startswith("raises") for n in names):
            raise RuntimeError("exporter bug")
        if any(n.startswith("refused") for n in names):
            return SpanExportResult.FAILURE
        self.exported.extend(names)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return


@pytest.fixture
def picky() -> Iterator[tuple[_Picky, CtxpropSpanProcessor, TracerProvider]]:
    exp = _Picky()
    proc = CtxpropSpanProcessor(
        exp, max_export_batch_size=10, schedule_delay_millis=60000, export_timeout_millis=1500
    )
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(proc)
    yield exp, proc, provider
    proc.shutdown()


def test_refused_and_raising_batches_are_given_up_and_later_spans_still_export(
    picky: tuple[_Picky, CtxpropSpanProcessor, TracerProvider],
) -> None:
    """Without a spool, a batch the exporter refuses and one it raises on are retried a bounded number of
    times within the export timeout, then dropped and counted; later spans are exported meanwhile, and
    force_flush() returns long before 30 s."""
    exp, proc, provider = picky
    tracer = provider.get_tracer("t")
    for prefix in ("refused", "raises", "fine"):
        for i in range(10):
            tracer.start_span(f"{prefix}{i}").end()
    t0 = time.monotonic()
    proc.force_flush(30000)
    took = time.monotonic() - t0
    assert took < 1.5 + 2.0  # the export timeout bounds each batch's retries
    assert sorted(exp.exported) == sorted(f"fine{i}" for i in range(10))
    assert exp.calls <= 1 + 2 * 6  # bounded retries: at most six attempts per failing batch
    stats = _stats.snapshot()
    assert stats["spans_dropped"] == 20
    assert stats["spans_exported"] == 10
    assert_books_balance(stats, ended=30)


# -- what each HTTP status means --------------------------------------------------------------------------


def _through_a_pipeline(rx: OTLPReceiver, tmp_path: Path, n: int) -> tuple[CtxpropSpanProcessor, bool]:
    """``n`` spans through a processor sending to ``rx`` with a spool; force_flush()'s answer."""
    from ctxprop._spool import Spool
    from ctxprop._transport import OTLPSender

    proc = CtxpropSpanProcessor(
        sender=OTLPSender(rx.endpoint), spool=Spool.open(tmp_path / "s"), max_export_batch_size=10
    )
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(proc)
    tracer = provider.get_tracer("t")
    for i in range(n):
        tracer.start_span(f"h{i}").end()
    flushed = proc.force_flush(20000)
    return proc, flushed


def test_a_collector_refusing_for_good_gets_each_batch_once_and_its_spans_count_as_rejected(
    tmp_path: Path,
) -> None:
    """HTTP 400: each batch is sent once (no retry, nothing to the spool), its spans count as
    spans_rejected, and last_error names the status."""
    from ctxprop._spool import Spool

    with OTLPReceiver(mode="400") as rx:
        proc, flushed = _through_a_pipeline(rx, tmp_path, 20)
        requests = rx.requests
        proc.shutdown()
    stats = _stats.snapshot()
    assert requests == 2  # two batches of 10, each once
    assert stats["spans_rejected"] == 20, stats
    assert stats.get("retried", 0) == 0, stats
    assert stats.get("spans_exported", 0) == 0, stats
    assert "HTTP 400" in proc.last_error
    assert Spool.open(tmp_path / "s").status().spans == 0
    assert flushed is True  # every batch settled: refused for good, nothing is left to wait for
    assert_books_balance(stats, ended=20)


@pytest.mark.parametrize("status", ["408", "502", "504", "429", "503"])
def test_a_collector_asking_to_retry_gets_the_batch_again_and_it_is_delivered_once(
    tmp_path: Path, status: str
) -> None:
    """408, 429, 502, 503, 504 (Retry-After: 0): the first answer refuses, the batch is retried and
    delivered; its spans count as exported, each once, none as rejected."""
    with OTLPReceiver() as rx:
        rx.set_mode(status, retry_after=0, times=1)
        proc, flushed = _through_a_pipeline(rx, tmp_path, 10)
        proc.shutdown()
        names = sorted(s.name for s in rx.spans)
        requests = rx.requests
    stats = _stats.snapshot()
    assert flushed is True
    assert requests == 2  # refused once, then accepted
    assert names == sorted(f"h{i}" for i in range(10))
    assert stats["retried"] == 10, stats
    assert stats["spans_exported"] == 10, stats
    assert stats.get("spans_rejected", 0) == 0, stats
    assert_books_balance(stats, ended=10)


@pytest.mark.parametrize(
    ("reason", "status", "retry_after", "timeout_ms"),
    [
        ("attempts", "503", 0.0, 20000),  # asked to retry at once, six times: attempts run out first
        ("retry_after", "429", 3600.0, 20000),  # asked to wait past the 30 s cap: given up at once
        ("timeout", "503", None, 250),  # its own backoff would pass the 0.25 s export timeout
    ],
)
def test_without_a_spool_a_batch_given_up_is_counted_under_the_reason_it_was_given_up_for(
    reason: str, status: str, retry_after: float | None, timeout_ms: int
) -> None:
    """With no spool to go to, a batch the collector keeps refusing is dropped, and its spans are counted
    under dropped_export_<reason> for the one rule that gave it up (attempts, Retry-After, timeout)."""
    from ctxprop._transport import OTLPSender

    with OTLPReceiver() as rx:
        rx.set_mode(status, retry_after=retry_after)
        proc = CtxpropSpanProcessor(
            sender=OTLPSender(rx.endpoint), max_export_batch_size=10, export_timeout_millis=timeout_ms
        )
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(proc)
        for i in range(10):
            provider.get_tracer("t").start_span(f"g{i}").end()
        proc.force_flush(20000)
        proc.shutdown()
        requests = rx.requests
    stats = _stats.snapshot()
    given_up = {k: v for k, v in stats.items() if k.startswith("dropped_export_")}
    assert given_up == {f"dropped_export_{reason}": 10}, stats
    assert requests == {"attempts": 6, "retry_after": 1}.get(reason, requests), requests
    assert_books_balance(stats, ended=10)


# -- partial success ----------------------------------------------------------------------------------------


def test_partial_success_counts_rejected_spans_and_keeps_the_message(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A 200 answer whose partial_success rejects 3 spans: those count as spans_rejected (not exported),
    the collector's error_message is kept for debugging and logged once, at debug level only."""
    from ctxprop._spool import Spool
    from ctxprop._transport import OTLPSender

    caplog.set_level(logging.DEBUG, logger="ctxprop")
    with serving("partial", rejected=3, message="span name too long") as col:
        proc = CtxpropSpanProcessor(
            sender=OTLPSender(col.endpoint), spool=Spool.open(tmp_path / "s"), max_export_batch_size=10
        )
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(proc)
        tracer = provider.get_tracer("t")
        for i in range(20):
            tracer.start_span(f"p{i}").end()
        assert proc.force_flush(20000)
        proc.shutdown()
    stats = _stats.snapshot()
    assert stats["spans_rejected"] == 6  # 3 in each of the two batches
    assert stats["spans_exported"] == 14
    assert proc.last_error == "span name too long"
    records = [r for r in caplog.records if "span name too long" in r.getMessage()]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG
    assert_books_balance(stats, ended=20)


def test_partial_success_stays_off_stderr_in_a_real_process(tmp_path: Path) -> None:
    """Through init(), a partial-success answer prints nothing and the books balance."""
    body = PRELUDE + """
ctxprop.init(endpoint=os.environ["EP"], handle_signals=False)
make_spans("p", 40)
ctxprop.close()
out(stats=ctxprop.stats())
"""
    with serving("partial", rejected=1, message="nope") as col:
        res = run_child(body, env=_env(col.endpoint, tmp_path), timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    stats = res.last("stats")
    assert stats["spans_rejected"] == 1
    assert_books_balance(stats, ended=40)
