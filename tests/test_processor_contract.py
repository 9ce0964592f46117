"""CtxpropSpanProcessor as a drop-in BatchSpanProcessor: the behaviours the SDK's own batch-processor
tests pin (constructor and validation, env variables, flush, shutdown, sampling, batching, threads,
fork), each checked here against ctxprop's processor, with the SDK's processor as the reference where
both must agree."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from support import assert_books_balance, run_child

from ctxprop import _stats
from ctxprop._processor import CtxpropSpanProcessor


class Recorder(SpanExporter):
    """Records batches; counts shutdown calls; fails the first ``fail`` exports."""

    def __init__(self, fail: int = 0) -> None:
        self.batches: list[list[str]] = []
        self.shutdowns = 0
        self.fail = fail
        self.calls = 0
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.lock:
            self.calls += 1
            if self.fail > 0:
                self.fail -= 1
                return SpanExportResult.FAILURE
            self.batches.append([s.name for s in spans])
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shutdowns += 1

    @property
    def names(self) -> list[str]:
        return [n for b in self.batches for n in b]


@pytest.fixture
def made() -> Iterator[list[CtxpropSpanProcessor]]:
    procs: list[CtxpropSpanProcessor] = []
    yield procs
    for p in procs:
        p.forget()


def _tracer(proc: CtxpropSpanProcessor, **kw: object) -> object:
    provider = TracerProvider(shutdown_on_exit=False, **kw)  # type: ignore[arg-type]
    provider.add_span_processor(proc)
    return provider.get_tracer("contract")


def _spans(tracer: object, n: int, prefix: str = "s") -> None:
    for i in range(n):
        tracer.start_span(f"{prefix}{i}").end()  # type: ignore[attr-defined]


def test_constructor_takes_the_sdk_arguments_positionally(made: list[CtxpropSpanProcessor]) -> None:
    """The same positional arguments as BatchSpanProcessor (exporter, queue, delay ms, batch, timeout ms)."""
    exp = Recorder()
    proc = CtxpropSpanProcessor(exp, 100, 60000, 10, 5000)
    made.append(proc)
    assert proc.span_exporter is exp
    _spans(_tracer(proc), 10)
    assert proc.force_flush(10000)
    assert exp.batches == [[f"s{i}" for i in range(10)]]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {"max_queue_size": 0}),
        ((), {"max_queue_size": -1}),
        ((), {"schedule_delay_millis": 0}),
        ((), {"schedule_delay_millis": -5}),
        ((), {"max_export_batch_size": 0}),
        ((), {"max_export_batch_size": -1}),
        ((), {"max_queue_size": 10, "max_export_batch_size": 11}),
        ((5, 1000, 6), {}),
    ],
)
def test_invalid_arguments_raise_the_sdks_value_error(args: tuple[int, ...], kwargs: dict[str, int]) -> None:
    """Each setting the SDK refuses is refused with the same ValueError message (max_export_batch_size=0
    used to spin empty exports for ever)."""
    with pytest.raises(ValueError, match=r".") as ours:
        CtxpropSpanProcessor(Recorder(), *args, **kwargs)
    with pytest.raises(ValueError, match=r".") as theirs:
        BatchSpanProcessor(Recorder(), *args, **kwargs)  # type: ignore[arg-type]
    assert str(ours.value) == str(theirs.value)


def test_otel_bsp_environment_variables_are_read(
    monkeypatch: pytest.MonkeyPatch, made: list[CtxpropSpanProcessor]
) -> None:
    """Without arguments, OTEL_BSP_MAX_QUEUE_SIZE / _MAX_EXPORT_BATCH_SIZE / _SCHEDULE_DELAY apply, and are
    validated together as the SDK does."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "2")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "3")
    with pytest.raises(ValueError, match="less than or equal to max_queue_size"):
        CtxpropSpanProcessor(Recorder())
    with pytest.raises(ValueError, match="less than or equal to max_queue_size"):
        BatchSpanProcessor(Recorder())
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "20")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    exp = Recorder()
    proc = CtxpropSpanProcessor(exp)
    made.append(proc)
    _spans(_tracer(proc), 30)
    assert proc.force_flush(10000)
    assert exp.batches
    assert max(len(b) for b in exp.batches) == 3


def test_invalid_environment_variables_fall_back_like_the_sdk(
    monkeypatch: pytest.MonkeyPatch, made: list[CtxpropSpanProcessor]
) -> None:
    """A non-integer OTEL_BSP_* value falls back to the default instead of failing, as in the SDK."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "lots")
    exp = Recorder()
    proc = CtxpropSpanProcessor(exp)
    made.append(proc)
    _spans(_tracer(proc), 5)
    assert proc.force_flush(10000)
    assert len(exp.names) == 5


def test_force_flush_exports_everything_and_an_empty_flush_succeeds(made: list[CtxpropSpanProcessor]) -> None:
    """force_flush() with nothing queued returns True; with spans queued, exports all before returning."""
    exp = Recorder()
    proc = CtxpropSpanProcessor(exp, schedule_delay_millis=60000, max_export_batch_size=512)
    made.append(proc)
    assert proc.force_flush(1000) is True
    _spans(_tracer(proc), 25)
    assert proc.force_flush(10000) is True
    assert sorted(exp.names) == sorted(f"s{i}" for i in range(25))


def test_force_flush_after_shutdown_returns_false() -> None:
    """After shutdown(), force_flush() returns False."""
    proc = CtxpropSpanProcessor(Recorder())
    proc.shutdown()
    assert proc.force_flush(1000) is False


def test_shutdown_exports_what_is_queued_and_shuts_the_exporter_down_once() -> None:
    """shutdown() delivers the queue, calls the exporter's shutdown() exactly once, even when called
    twice; spans ending afterwards are not exported, and counted."""
    exp = Recorder()
    proc = CtxpropSpanProcessor(exp, schedule_delay_millis=60000)
    tracer = _tracer(proc)
    _spans(tracer, 7)
    proc.shutdown()
    proc.shutdown()
    assert exp.shutdowns == 1
    assert len(exp.names) == 7
    _spans(tracer, 2, "late")
    assert len(exp.names) == 7
    stats = _stats.snapshot()
    assert stats["dropped_after_shutdown"] == 2
    assert_books_balance(stats, ended=9)


def test_unsampled_spans_are_not_exported(made: list[CtxpropSpanProcessor]) -> None:
    """Spans that are not sampled never reach the exporter (nor the books)."""
    exp = Recorder()
    proc = CtxpropSpanProcessor(exp)
    made.append(proc)
    _spans(_tracer(proc, sampler=ALWAYS_OFF), 10)
    assert proc.force_flush(5000)
    assert exp.calls == 0
    assert _stats.snapshot().get("spans_ended", 0) == 0


def test_batches_never_exceed_max_export_batch_size(made: list[CtxpropSpanProcessor]) -> None:
    """1000 spans with a batch size of 64: every export holds at most 64 spans, all are exported once."""
    exp = Recorder()
    proc = CtxpropSpanProcessor(exp, max_queue_size=2048, max_export_batch_size=64, schedule_delay_millis=5)
    made.append(proc)
    _spans(_tracer(proc), 1000)
    assert proc.force_flush(20000)
    assert max(len(b) for b in exp.batches) <= 64
    assert Counter(exp.names) == Counter(f"s{i}" for i in range(1000))


def test_schedule_delay_exports_a_partial_batch_without_a_flush(made: list[CtxpropSpanProcessor]) -> None:
    """Fewer spans than a batch leave after the schedule delay, with no flush."""
    exp = Recorder()
    got = threading.Event()
    original = exp.export

    def export(spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = original(spans)
        got.set()
        return result

    exp.export = export  # type: ignore[method-assign]
    proc = CtxpropSpanProcessor(exp, schedule_delay_millis=50, max_export_batch_size=512)
    made.append(proc)
    _spans(_tracer(proc), 3)
    assert got.wait(20)
    assert exp.names == ["s0", "s1", "s2"]


def test_many_threads_ending_and_flushing_at_once_lose_nothing(made: list[CtxpropSpanProcessor]) -> None:
    """8 threads end 500 spans each while calling force_flush(): every span is exported exactly once and
    every flush returns True."""
    exp = Recorder()
    proc = CtxpropSpanProcessor(
        exp, max_queue_size=10000, max_export_batch_size=128, schedule_delay_millis=10
    )
    made.append(proc)
    tracer = _tracer(proc)
    results: list[bool] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        _spans(tracer, 500, f"t{k}-")
        ok = proc.force_flush(20000)
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 8
    assert Counter(exp.names) == Counter(f"t{k}-{i}" for k in range(8) for i in range(500))
    assert_books_balance(_stats.snapshot(), ended=4000)


def test_a_failing_export_is_retried_a_bounded_number_of_times_then_dropped_and_counted(
    made: list[CtxpropSpanProcessor],
) -> None:
    """An exporter that always fails gets a bounded number of attempts within the export timeout; then
    the batch is dropped, counted (spans_dropped and a per-reason key), and the processor goes on."""
    exp = Recorder(fail=10**6)
    proc = CtxpropSpanProcessor(
        exp, max_export_batch_size=5, schedule_delay_millis=60000, export_timeout_millis=2000
    )
    made.append(proc)
    tracer = _tracer(proc)
    _spans(tracer, 5)
    t0 = time.monotonic()
    assert proc.force_flush(30000) is False  # dropped, not delivered
    assert time.monotonic() - t0 < 2.0 + 2.0
    assert 2 <= exp.calls <= 6
    stats = _stats.snapshot()
    assert stats["spans_dropped"] == 5
    assert any(k.startswith("dropped_export_") and v == 5 for k, v in stats.items())
    exp.fail = 0
    _spans(tracer, 5, "after")
    assert proc.force_flush(10000) is True
    assert exp.names == [f"after{i}" for i in range(5)]
    assert_books_balance(_stats.snapshot(), ended=10)


def test_a_forked_child_exports_its_own_spans_only(tmp_path: Path) -> None:
    """After os.fork() the child's processor exports the child's spans, never the parent's queued ones;
    the parent still exports its own."""
    code = """
import json, os
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from ctxprop._processor import CtxpropSpanProcessor
class ToFile(SpanExporter):
    def export(self, spans):
        with open(os.environ["OUT"], "a") as f:
            for s in spans:
                f.write(f"{os.getpid()} {s.name}\\n")
        return SpanExportResult.SUCCESS
proc = CtxpropSpanProcessor(ToFile(), schedule_delay_millis=60000)
provider = TracerProvider(shutdown_on_exit=False)
provider.add_span_processor(proc)
tracer = provider.get_tracer("fork")
for i in range(5):
    tracer.start_span(f"parent{i}").end()
pid = os.fork()
if pid == 0:
    for i in range(3):
        tracer.start_span(f"child{i}").end()
    proc.force_flush(10000)
    os._exit(0)
os.waitpid(pid, 0)
proc.force_flush(10000)
print(json.dumps({"parent": os.getpid(), "child": pid}))
"""
    out = tmp_path / "out.txt"
    res = run_child(code, env={"OUT": str(out)})
    assert res.returncode == 0, res.stderr
    lines = [ln.split() for ln in out.read_text().splitlines()]
    by_pid: dict[str, list[str]] = {}
    for pid, name in lines:
        by_pid.setdefault(pid, []).append(name)
    assert sorted(by_pid[str(res.last("child"))]) == [f"child{i}" for i in range(3)]
    assert sorted(by_pid[str(res.last("parent"))]) == [f"parent{i}" for i in range(5)]


def test_truly_parallel_threads_account_for_every_span(made: list[CtxpropSpanProcessor]) -> None:
    """8 threads end 3000 spans each into a queue bound of 2000 (on a free-threaded build they run truly in
    parallel): every span is exported exactly once or dropped and counted, never lost or duplicated."""
    exp = Recorder()
    proc = CtxpropSpanProcessor(
        exp, max_queue_size=2000, max_export_batch_size=256, schedule_delay_millis=5
    )
    made.append(proc)
    tracer = _tracer(proc)
    start = threading.Barrier(8)

    def work(k: int) -> None:
        start.wait()
        _spans(tracer, 3000, f"p{k}-")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert proc.force_flush(30000)
    names = Counter(exp.names)
    assert set(names.values()) <= {1}
    dropped = proc.counters.get("dropped_queue_full", 0)
    assert len(names) + dropped == 8 * 3000
    assert_books_balance(_stats.snapshot(), ended=8 * 3000)
