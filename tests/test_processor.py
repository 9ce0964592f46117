"""ctxprop's batching processor with real threads, a real exporter thread and the loopback collector."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import support
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, get_value
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from support import OTLPReceiver

from ctxprop import _stats
from ctxprop._processor import CtxpropSpanProcessor
from ctxprop._spool import Spool
from ctxprop._transport import OTLPSender, SendOutcome

receiver = support.receiver


class RecordingExporter(SpanExporter):
    """Collects exported spans; can block or fail on demand; notes whether instrumentation was suppressed."""

    def __init__(self, fail_times: int = 0) -> None:
        self.spans: list[ReadableSpan] = []
        self.batches: list[int] = []
        self.suppressed: list[bool] = []
        self.fail_times = fail_times
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.cond = threading.Condition()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.gate.wait(30)
        self.suppressed.append(bool(get_value(_SUPPRESS_INSTRUMENTATION_KEY)))
        with self.cond:
            if self.fail_times > 0:
                self.fail_times -= 1
                return SpanExportResult.FAILURE
            self.spans.extend(spans)
            self.batches.append(len(spans))
            self.cond.notify_all()
        return SpanExportResult.SUCCESS

    def wait_for(self, n: int, timeout: float = 20) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.spans) >= n, timeout)

    def shutdown(self) -> None:
        return


def _provider(proc: CtxpropSpanProcessor) -> TracerProvider:
    p = TracerProvider(shutdown_on_exit=False)
    p.add_span_processor(proc)
    return p


def _make(provider: TracerProvider, n: int, prefix: str = "s") -> None:
    tracer = provider.get_tracer("t")
    for i in range(n):
        tracer.start_span(f"{prefix}{i}").end()


@pytest.fixture
def procs() -> Iterator[list[CtxpropSpanProcessor]]:
    made: list[CtxpropSpanProcessor] = []
    yield made
    for p in made:
        p.forget()


def test_batch_full_wakes_the_worker_before_the_delay(procs: list[CtxpropSpanProcessor]) -> None:
    """A full batch is exported at once, not after the (60 s) schedule delay, with instrumentation off."""
    exp = RecordingExporter()
    proc = CtxpropSpanProcessor(exporter=exp, max_export_batch_size=10, max_queue_size=100, schedule_delay=60)
    procs.append(proc)
    _make(_provider(proc), 10)
    assert exp.wait_for(10)
    assert exp.batches == [10]
    assert exp.suppressed == [True]
    assert _stats.snapshot()["exported"] == 10
    assert proc.counters["exported"] == 10


def test_schedule_delay_exports_a_partial_batch(procs: list[CtxpropSpanProcessor]) -> None:
    """Fewer spans than a batch go out when the schedule delay passes."""
    exp = RecordingExporter()
    proc = CtxpropSpanProcessor(exporter=exp, max_export_batch_size=100, schedule_delay=0.05)
    procs.append(proc)
    _make(_provider(proc), 3)
    assert exp.wait_for(3)


def test_on_end_never_blocks_and_counts_drops_when_full(procs: list[CtxpropSpanProcessor]) -> None:
    """With the exporter stuck, on_end returns at once; beyond the bound spans are dropped and counted."""
    exp = RecordingExporter()
    exp.gate.clear()
    proc = CtxpropSpanProcessor(exporter=exp, max_export_batch_size=10, max_queue_size=50, schedule_delay=60)
    procs.append(proc)
    provider = _provider(proc)
    _make(provider, 10)
    assert exp.entered.wait(20)  # the worker now holds a batch of 10, blocked inside export()
    done = threading.Event()

    def app() -> None:
        _make(provider, 80)
        done.set()

    threading.Thread(target=app, daemon=True).start()
    assert done.wait(20)  # the app thread finished although the exporter is still blocked
    assert proc.counters["dropped_queue_full"] == 30
    assert _stats.snapshot()["dropped_queue_full"] == 30
    exp.gate.set()
    assert proc.flush_until(time.monotonic() + 20)
    assert len(exp.spans) == 60


def test_failed_batches_are_retried_not_discarded(procs: list[CtxpropSpanProcessor]) -> None:
    """A custom exporter failing twice gets the same batch again; nothing is lost; retries are counted."""
    exp = RecordingExporter(fail_times=2)
    proc = CtxpropSpanProcessor(exporter=exp, max_export_batch_size=20, schedule_delay=0.02)
    procs.append(proc)
    _make(_provider(proc), 20)
    assert exp.wait_for(20)
    # The exporter holds the spans before the export thread counts them: with truly parallel threads
    # (3.13t) the counters are read only once the flush says the batch is settled.
    assert proc.flush_until(time.monotonic() + 20)
    assert sorted(s.name for s in exp.spans) == sorted(f"s{i}" for i in range(20))
    assert proc.counters["retried"] == 40  # two failed attempts of 20 spans each
    assert proc.counters["exported"] == 20


def test_flush_is_bounded_when_exporter_keeps_failing(procs: list[CtxpropSpanProcessor]) -> None:
    """flush() returns False by its deadline while the exporter fails; spans stay in memory, go out later."""
    exp = RecordingExporter(fail_times=10**6)
    proc = CtxpropSpanProcessor(exporter=exp, max_export_batch_size=10, schedule_delay=60)
    procs.append(proc)
    _make(_provider(proc), 25)
    t0 = time.monotonic()
    assert proc.flush_until(time.monotonic() + 0.5) is False
    assert time.monotonic() - t0 < 0.5 + 2.0
    assert proc.pending_spans + proc.queue_length == 25
    exp.fail_times = 0
    assert proc.flush_until(time.monotonic() + 20)
    assert len(exp.spans) == 25


def test_retry_after_is_honoured(receiver: OTLPReceiver, procs: list[CtxpropSpanProcessor]) -> None:
    """After a 429 with Retry-After: 1 the next attempt waits about a second, then succeeds."""
    sender = OTLPSender(receiver.endpoint)
    times: list[float] = []

    def timed(payload: bytes, timeout: float) -> SendOutcome:
        times.append(time.monotonic())
        out = sender(payload, timeout)
        if out.retryable:
            receiver.set_mode("ok")
        return out

    receiver.set_mode("429", retry_after=1)
    proc = CtxpropSpanProcessor(sender=timed, max_export_batch_size=5, schedule_delay=0.01)
    procs.append(proc)
    _make(_provider(proc), 5)
    assert receiver.wait_for_spans(5, 20)
    assert len(times) == 2
    assert times[1] - times[0] >= 0.9  # a lower bound: load can only make the gap longer
    assert proc.counters["retried"] == 5
    sender.close()


def test_give_up_goes_to_the_spool_and_replays_exactly_once(
    receiver: OTLPReceiver, procs: list[CtxpropSpanProcessor], tmp_path: Path
) -> None:
    """A batch the collector keeps refusing is spooled; once the collector is back it is replayed, once."""
    receiver.set_mode("503")
    spool = Spool.open(tmp_path / "spool")
    sender = OTLPSender(receiver.endpoint)
    proc = CtxpropSpanProcessor(
        sender=sender, spool=spool, max_export_batch_size=10, schedule_delay=0.01, give_up_after=0.3
    )
    procs.append(proc)
    provider = _provider(proc)
    _make(provider, 10, "a")
    deadline = time.monotonic() + 20
    while proc.counters.get("spooled", 0) < 10 and time.monotonic() < deadline:
        threading.Event().wait(0.02)
    assert proc.counters["spooled"] == 10
    assert spool.has_pending()
    receiver.set_mode("ok")
    _make(provider, 10, "b")  # a successful export triggers the replay of the spool
    assert receiver.wait_for_spans(20, 20)
    names = [s.name for s in receiver.spans]
    assert sorted(names) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])
    assert proc.shutdown_until(time.monotonic() + 5)
    assert not spool.has_pending()


def test_flush_deadline_spools_leftovers_when_collector_hangs(
    procs: list[CtxpropSpanProcessor], tmp_path: Path
) -> None:
    """With a collector that never answers, flush() returns by its deadline and the spans are in the spool."""
    with OTLPReceiver(mode="slow", delay=60) as rx:
        spool = Spool.open(tmp_path / "spool")
        # No full batch, so the worker stays asleep and flush() itself is the one stuck in the request (a
        # batch the worker has in flight stays the worker's: see the next test).
        proc = CtxpropSpanProcessor(
            sender=OTLPSender(rx.endpoint), spool=spool, max_export_batch_size=500, schedule_delay=60
        )
        procs.append(proc)
        _make(_provider(proc), 120)
        t0 = time.monotonic()
        assert proc.flush_until(time.monotonic() + 1.0) is False
        took = time.monotonic() - t0
        assert took < 1.0 + 1.5
        assert spool.status().spans == 120
        assert proc.counters["spooled"] == 120


def test_durable_mode_writes_ahead_and_acks(
    receiver: OTLPReceiver, procs: list[CtxpropSpanProcessor], tmp_path: Path
) -> None:
    """Durable mode writes each batch ahead to the spool and removes it once the collector acknowledged it."""
    spool = Spool.open(tmp_path / "spool")
    proc = CtxpropSpanProcessor(
        sender=OTLPSender(receiver.endpoint),
        spool=spool,
        durable=True,
        max_export_batch_size=10,
        schedule_delay=60,
    )
    procs.append(proc)
    _make(_provider(proc), 30)
    assert proc.flush_until(time.monotonic() + 20)
    assert receiver.wait_for_spans(30, 20)
    assert not spool.has_pending()
    assert spool.status().spans == 0


def test_shutdown_is_idempotent_and_drops_later_spans_counted(procs: list[CtxpropSpanProcessor]) -> None:
    """shutdown twice is harmless; spans ending after it are counted as dropped_after_shutdown."""
    exp = RecordingExporter()
    proc = CtxpropSpanProcessor(exporter=exp, schedule_delay=60)
    procs.append(proc)
    provider = _provider(proc)
    _make(provider, 5)
    assert proc.shutdown_until(time.monotonic() + 10)
    assert proc.shutdown_until(time.monotonic() + 10)
    assert len(exp.spans) == 5
    _make(provider, 3)
    assert proc.counters["dropped_after_shutdown"] == 3


def test_exactly_one_of_exporter_or_sender() -> None:
    """The processor needs exactly one of exporter= or sender=."""
    with pytest.raises(ValueError, match="exactly one"):
        CtxpropSpanProcessor()


def test_close_finishes_a_background_replay_it_raced_with(
    receiver: OTLPReceiver, procs: list[CtxpropSpanProcessor], tmp_path: Path
) -> None:
    """shutdown right after a background replay started still delivers every spooled span, once."""
    from ctxprop._encoding import encode

    mem = RecordingExporter()
    src = CtxpropSpanProcessor(exporter=mem, max_export_batch_size=50, schedule_delay=60)
    procs.append(src)
    _make(_provider(src), 200, "old")
    assert src.flush_until(time.monotonic() + 20)
    spool = Spool.open(tmp_path / "spool")
    for i in range(0, 200, 50):
        spool.append(encode(mem.spans[i : i + 50]).payload, 50)
    receiver.set_mode("slow", delay=0.3)  # each replayed request takes a while: the race is wide open
    proc = CtxpropSpanProcessor(sender=OTLPSender(receiver.endpoint), spool=spool, schedule_delay=60)
    procs.append(proc)
    proc.request_replay()
    assert proc.shutdown_until(time.monotonic() + 10)
    names = [s.name for s in receiver.spans]
    assert sorted(names) == sorted(f"old{i}" for i in range(200))
    assert not spool.has_pending()


def test_pid_check_backs_up_the_fork_hook(procs: list[CtxpropSpanProcessor]) -> None:
    """If the pid changed without the at-fork hook running, flush drops the inherited queue instead of
    exporting the parent's spans."""
    exp = RecordingExporter()
    proc = CtxpropSpanProcessor(exporter=exp, schedule_delay=60)
    procs.append(proc)
    provider = _provider(proc)
    _make(provider, 5, "parent")
    proc._pid = -1  # as if this were a child forked behind the hook's back
    assert proc.flush_until(time.monotonic() + 10)
    assert exp.spans == []
    _make(provider, 2, "child")
    assert proc.flush_until(time.monotonic() + 10)
    assert [s.name for s in exp.spans] == ["child0", "child1"]


def test_refused_replay_backs_off_then_delivers_without_new_spans(
    receiver: OTLPReceiver, procs: list[CtxpropSpanProcessor], tmp_path: Path
) -> None:
    """A spool replay refused with 503 is probed again with backoff (no hot loop) and, once the
    collector is back, delivered even though the application ends no new span."""
    from ctxprop._encoding import encode

    mem = RecordingExporter()
    src = CtxpropSpanProcessor(exporter=mem, schedule_delay=60)
    procs.append(src)
    _make(_provider(src), 30, "old")
    assert src.flush_until(time.monotonic() + 20)
    spool = Spool.open(tmp_path / "spool")
    spool.append(encode(mem.spans).payload, 30)
    receiver.set_mode("503")
    proc = CtxpropSpanProcessor(sender=OTLPSender(receiver.endpoint), spool=spool, schedule_delay=0.05)
    procs.append(proc)
    proc.request_replay()
    window = threading.Event()
    deadline = time.monotonic() + 20
    while receiver.requests == 0 and time.monotonic() < deadline:
        window.wait(0.01)
    start = receiver.requests
    window.wait(1.0)  # an observation window: load can only lower the count
    assert receiver.requests - start < 10
    receiver.set_mode("ok")
    assert receiver.wait_for_spans(30, 30)
    assert sorted(s.name for s in receiver.spans) == sorted(f"old{i}" for i in range(30))


def test_flush_timing_out_under_a_slow_request_does_not_duplicate_it(
    procs: list[CtxpropSpanProcessor], tmp_path: Path
) -> None:
    """flush() that times out while the worker's request is still running leaves that batch to the worker:
    when the slow collector then accepts it, it is not also in the spool (no second delivery later)."""
    with OTLPReceiver(mode="slow", delay=1.0) as rx:
        spool = Spool.open(tmp_path / "spool")
        proc = CtxpropSpanProcessor(
            sender=OTLPSender(rx.endpoint), spool=spool, max_export_batch_size=10, schedule_delay=60
        )
        procs.append(proc)
        provider = _provider(proc)
        _make(provider, 10, "slow")  # a full batch: the worker sends it at once
        deadline = time.monotonic() + 20
        while proc._inflight is None and time.monotonic() < deadline:
            threading.Event().wait(0.005)
        assert proc._inflight is not None
        _make(provider, 5, "queued")
        assert proc.flush_until(time.monotonic() + 0.3) is False  # the worker holds the export lock
        assert rx.wait_for_spans(10, 20)  # the slow collector accepted the in-flight batch after all
        rx.set_mode("ok")
        assert proc.shutdown_until(time.monotonic() + 10)  # replays the spool: only what flush() wrote
        names = sorted(s.name for s in rx.spans)
    assert names == sorted([f"slow{i}" for i in range(10)] + [f"queued{i}" for i in range(5)])
    assert not spool.has_pending()


@pytest.mark.parametrize("otlp", [False, True], ids=["exporter", "otlp sender"])
def test_tag_scopes_makes_one_processor_do_the_scope_tagging_too(otlp: bool, receiver: OTLPReceiver) -> None:
    """tag_scopes=True: the processor copies the active scopes' tags onto each span as it starts (the
    explicit attributes winning), as ScopeTagSpanProcessor does; without it, it tags nothing. Unsampled
    spans are not queued either way. init() builds its processor so, and adds no second one."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    import ctxprop

    class RecordOnly(Sampler):
        """Spans are recorded (on_end sees them) but not sampled: nothing is exported for them."""

        def should_sample(self, *args: object, **kw: object) -> SamplingResult:
            return SamplingResult(Decision.RECORD_ONLY)

        def get_description(self) -> str:
            return "record only"

    for tag_scopes in (True, False):
        exporter = InMemorySpanExporter()
        kw: dict[str, object] = {"sender": OTLPSender(receiver.endpoint)} if otlp else {"exporter": exporter}
        proc = CtxpropSpanProcessor(**kw, tag_scopes=tag_scopes)  # type: ignore[arg-type]
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(proc)
        with ctxprop.isolation_scope() as iso, ctxprop.new_scope() as cur:
            iso.set_tag("tenant", "acme")
            cur.set_tag("route", "/r")
            provider.get_tracer("t").start_span(f"tagged={tag_scopes}", attributes={"route": "/own"}).end()
        assert proc.force_flush(10_000)
        if otlp:
            assert receiver.wait_for_spans(1, 5)
            got = dict(receiver.spans[-1].attributes)
        else:
            got = dict(exporter.get_finished_spans()[-1].attributes or {})
        assert got == ({"tenant": "acme", "route": "/own"} if tag_scopes else {"route": "/own"})
        unsampled = TracerProvider(sampler=RecordOnly(), shutdown_on_exit=False)
        unsampled.add_span_processor(proc)
        unsampled.get_tracer("t").start_span("not sampled").end()
        assert proc.queue_length == 0
        provider.shutdown()
    ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False)
    try:
        installed = ctxprop._pipeline._provider._active_span_processor._span_processors  # type: ignore[attr-defined, union-attr]
        assert [type(p) for p in installed] == [CtxpropSpanProcessor]
        assert installed[0]._tag_scopes
    finally:
        ctxprop.close(5)
