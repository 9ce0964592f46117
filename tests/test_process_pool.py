"""ContextAwareProcessPoolExecutor: trace context, baggage and tags reach the workers; spans come home."""

from __future__ import annotations

import concurrent.futures
import contextvars
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from support import OTLPReceiver, child_env, receiver  # noqa: F401

import ctxprop
from ctxprop import _capture
from ctxprop._process_pool import bind_for_process, unpack_result

METHODS = ["fork", "spawn", "forkserver"]
FORK = multiprocessing.get_context("fork")
UNPICKLABLE: contextvars.ContextVar[object] = contextvars.ContextVar("unpicklable", default=None)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """A pipeline exporting to memory."""
    exp = InMemorySpanExporter()
    ctxprop.init(exporter=exp, service_name="pool-test", handle_signals=False)
    return exp


@pytest.fixture
def fresh_context() -> Iterator[None]:
    """Each test's scopes and trace context start empty and are restored after it."""
    token = otel_context.attach(otel_context.Context())
    with ctxprop.isolation_scope():
        yield
    otel_context.detach(token)


def tags_here() -> dict[str, Any]:
    return {**ctxprop.get_isolation_scope().tags, **ctxprop.get_current_scope().tags}


def traced_task(n: int) -> dict[str, Any]:
    """Runs in a worker: makes a span, reports what context it saw."""
    seen = tags_here()
    with trace.get_tracer("worker").start_as_current_span(f"task-{n}") as span:
        span.set_attribute("n", n)
        with ctxprop.new_scope():
            ctxprop.get_current_scope().set_tag("step", "inner")
            trace.get_tracer("worker").start_span("inner").end()
        ctxprop.set_tag("written_by_worker", n)  # must not reach the parent
        return {
            "pid": os.getpid(),
            "tags": seen,
            "baggage": dict(baggage.get_all()),
            "trace_id": span.get_span_context().trace_id,
        }


def failing_task() -> None:
    with trace.get_tracer("worker").start_as_current_span("doomed"):
        raise LookupError("no such row")


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


@pytest.mark.usefixtures("fresh_context")
@pytest.mark.parametrize("method", METHODS)
def test_pool_created_before_the_scope_parents_and_tags_worker_spans(
    method: str, exporter: InMemorySpanExporter
) -> None:
    """A pool made before the scope sees its tags and baggage; worker spans are children of the
    submitting span and reach the parent's exporter before shutdown() returns (fork, spawn, forkserver)."""
    pool = ctxprop.ContextAwareProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context(method)
    )
    ctxprop.set_tag("job", "nightly")
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with trace.get_tracer("parent").start_as_current_span("submit") as parent, ctxprop.new_scope():
            ctxprop.get_current_scope().set_tag("phase", "load")
            out = pool.submit(traced_task, 1).result(timeout=60)
            outs = list(pool.map(traced_task, [2, 3], chunksize=2))
    finally:
        otel_context.detach(token)
    pool.shutdown()
    # No flush here: shutdown() itself delivered the worker spans.
    spans = by_name(list(exporter.get_finished_spans()))
    assert out["pid"] != os.getpid()
    assert out["tags"] == {"job": "nightly", "phase": "load"}
    assert out["baggage"] == {"tenant": "acme"}
    assert tags_here() == {"job": "nightly"}
    parent_ctx = parent.get_span_context()
    for n, result in [(1, out), (2, outs[0]), (3, outs[1])]:
        assert result["trace_id"] == parent_ctx.trace_id
        task = spans[f"task-{n}"]
        assert task.parent is not None
        assert task.parent.span_id == parent_ctx.span_id
        assert task.context.trace_id == parent_ctx.trace_id
        assert task.attributes is not None
        assert task.attributes["job"] == "nightly"
        assert task.attributes["phase"] == "load"
        assert task.attributes["n"] == n
        assert task.resource.attributes["service.name"] == "pool-test"
    inner = [s for s in exporter.get_finished_spans() if s.name == "inner"]
    assert len(inner) == 3
    assert all(s.attributes is not None and s.attributes["step"] == "inner" for s in inner)
    assert {s.parent.span_id for s in inner if s.parent} == {
        spans[f"task-{n}"].context.span_id for n in (1, 2, 3)
    }


@pytest.mark.usefixtures("fresh_context")
def test_worker_exception_is_reraised_and_its_span_still_delivered(exporter: InMemorySpanExporter) -> None:
    """A task's exception reaches the caller unchanged (worker traceback as cause); its error span arrives."""
    with ctxprop.ContextAwareProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("fork")
    ) as pool:
        fut = pool.submit(failing_task)
        with pytest.raises(LookupError, match="no such row") as info:
            fut.result(timeout=60)
    assert "failing_task" in str(info.value.__cause__)
    doomed = by_name(list(exporter.get_finished_spans()))["doomed"]
    assert doomed.status.status_code is StatusCode.ERROR
    assert [e.name for e in doomed.events] == ["exception"]


@pytest.mark.usefixtures("fresh_context")
def test_unpicklable_context_values_are_skipped(exporter: InMemorySpanExporter) -> None:
    """A ContextVar holding an unpicklable value in the submitter does not fail the submit."""
    UNPICKLABLE.set(threading.Lock())
    ctxprop.set_tag("job", "locks")
    with ctxprop.ContextAwareProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("forkserver")
    ) as pool:
        assert pool.submit(traced_task, 7).result(timeout=60)["tags"] == {"job": "locks"}


@pytest.mark.usefixtures("fresh_context")
def test_without_a_pipeline_context_still_travels() -> None:
    """With no TracerProvider in the parent, tags and the trace id still reach the worker; nothing fails."""
    ctxprop.set_tag("job", "bare")
    fake_parent = trace.NonRecordingSpan(
        trace.SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=trace.TraceFlags(1))
    )
    with (
        trace.use_span(fake_parent),
        ctxprop.ContextAwareProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("fork")
        ) as pool,
    ):
        out = pool.submit(traced_task, 1).result(timeout=60)
    assert out["tags"] == {"job": "bare"}
    assert out["trace_id"] == 0xABC


def _init_marker(marker: str) -> None:
    os.environ["CTXPROP_TEST_INIT"] = marker


def _read_marker() -> tuple[str, dict[str, Any]]:
    return os.environ.get("CTXPROP_TEST_INIT", ""), tags_here()


@pytest.mark.usefixtures("fresh_context")
def test_user_initializer_runs_in_each_worker() -> None:
    """The user's initializer and initargs still run in the workers (after ctxprop's own set-up)."""
    ctxprop.set_tag("job", "init")
    with ctxprop.ContextAwareProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_marker,
        initargs=("ok",),
    ) as pool:
        assert pool.submit(_read_marker).result(timeout=60) == ("ok", {"job": "init"})


def _wait_for(event: Any) -> int:
    event.wait(60)
    return 1


_EVENT: Any = None


def _keep_event(event: Any) -> None:
    global _EVENT  # noqa: PLW0603
    _EVENT = event


def _wait_global() -> int:
    return _wait_for(_EVENT)


def test_cancel_and_wait_work_on_its_futures() -> None:
    """A pending task's future can be cancelled; concurrent.futures.wait sees results and cancellations."""
    ctx = multiprocessing.get_context("fork")
    event = ctx.Event()
    with ctxprop.ContextAwareProcessPoolExecutor(
        max_workers=1, mp_context=ctx, initializer=_keep_event, initargs=(event,)
    ) as pool:
        futs = [pool.submit(_wait_global) for _ in range(6)]
        assert futs[-1].cancel()
        assert futs[-1].cancelled()
        event.set()
        _, not_done = concurrent.futures.wait(futs, timeout=60)
        assert not not_done
        assert [f.result() for f in futs[:-1]] == [1] * 5


@pytest.mark.usefixtures("fresh_context")
def test_bind_for_process_with_a_plain_pool(exporter: InMemorySpanExporter) -> None:
    """bind_for_process/unpack_result carry the context through a plain ProcessPoolExecutor too."""
    ctxprop.set_tag("job", "plain")
    with (
        trace.get_tracer("p").start_as_current_span("submit") as parent,
        ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as pool,
    ):
        out = unpack_result(pool.submit(bind_for_process(traced_task, (4,))).result(timeout=60))
        with pytest.raises(LookupError):
            unpack_result(pool.submit(bind_for_process(failing_task)).result(timeout=60))
    assert out["tags"] == {"job": "plain"}
    ctxprop.flush(30)
    spans = by_name(list(exporter.get_finished_spans()))
    assert spans["task-4"].parent is not None
    assert spans["task-4"].parent.span_id == parent.get_span_context().span_id
    assert "doomed" in spans


FORK_WITH_QUEUED_SPANS = """
import json, multiprocessing, os, sys
from opentelemetry import trace
import ctxprop

def task(n):
    with trace.get_tracer("worker").start_as_current_span(f"task-{n}"):
        return os.getpid()

ctxprop.init(
    endpoint=os.environ["EP"],
    service_name="pool-otlp",
    spool_dir=os.environ["SPOOL"],
    handle_signals=False,
    schedule_delay=30.0,  # keep the parent's spans queued across the fork
)
tracer = trace.get_tracer("parent")
for i in range(50):
    tracer.start_span(f"before-fork-{i}").end()
with tracer.start_as_current_span("submit"):
    pool = ctxprop.ContextAwareProcessPoolExecutor(
        max_workers=2, mp_context=multiprocessing.get_context("fork")
    )
    pids = list(pool.map(task, range(4)))
pool.shutdown()
print(json.dumps({"pool_shut": True}), flush=True)
sys.stdin.readline()  # the parent has counted the task spans
ctxprop.close(10)
print(json.dumps({"pids": pids, "me": os.getpid()}))
"""


def test_real_pipeline_forked_workers_do_not_resend_the_parents_queue(
    receiver: OTLPReceiver,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Through the real OTLP pipeline: spans queued before a fork are sent once (by the parent only), and
    worker spans reach the collector before shutdown() returns. (In a child process of its own: the fork
    happens with the exporter's spans in flight, never in the test process with its receiver thread.)"""
    env = child_env({"EP": receiver.endpoint, "SPOOL": str(tmp_path / "spool")})
    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_WITH_QUEUED_SPANS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert json.loads(proc.stdout.readline()) == {"pool_shut": True}
        tasks_at_shutdown = sum(1 for s in receiver.spans if s.name.startswith("task-"))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert tasks_at_shutdown == 4  # already delivered by shutdown()
    result = json.loads(out.splitlines()[-1])
    names = [s.name for s in receiver.spans]
    assert len(set(result["pids"]) - {result["me"]}) >= 1
    assert sorted(n for n in names if n.startswith("before-fork-")) == sorted(
        f"before-fork-{i}" for i in range(50)
    )
    assert len(names) == len({s.span_id for s in receiver.spans})
    submit = next(s for s in receiver.spans if s.name == "submit")
    tasks = [s for s in receiver.spans if s.name.startswith("task-")]
    assert {s.parent_span_id for s in tasks} == {submit.span_id}
    assert {s.service_name for s in tasks} == {"pool-otlp"}


_BOUND_TRACER: Any = None


def task_with_inherited_tracer() -> None:
    with _BOUND_TRACER.start_as_current_span("inherited-tracer-span"):
        pass


@pytest.mark.usefixtures("fresh_context")
def test_forked_worker_spans_from_a_tracer_made_before_the_fork_come_home(
    exporter: InMemorySpanExporter,
) -> None:
    """A tracer obtained in the parent before the fork (bound to the parent's provider) still ships its
    worker spans home instead of losing them in the dropped inherited pipeline."""
    global _BOUND_TRACER  # noqa: PLW0603
    _BOUND_TRACER = trace.get_tracer("module-level")
    with (
        _BOUND_TRACER.start_as_current_span("parent-side") as parent,
        ctxprop.ContextAwareProcessPoolExecutor(max_workers=1, mp_context=FORK) as pool,
    ):
        pool.submit(task_with_inherited_tracer).result(timeout=60)
    spans = by_name(list(exporter.get_finished_spans()))
    worker = spans["inherited-tracer-span"]
    assert worker.parent is not None
    assert worker.parent.span_id == parent.get_span_context().span_id


def test_spanwire_round_trip_keeps_every_exported_field() -> None:
    """to_wire/from_wire (through pickle) keep ids, parent, kind, times, attributes, events, links,
    status, resource and instrumentation scope."""
    import pickle

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import Link, SpanKind, Status

    from ctxprop._spanwire import from_wire, to_wire

    exp = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "wire", "k": 1}))
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracer = provider.get_tracer("lib", "1.2", schema_url="https://s", attributes={"scope.attr": "x"})
    linked = trace.SpanContext(1, 2, is_remote=True, trace_state=trace.TraceState([("vendor", "v")]))
    with tracer.start_as_current_span("outer"):
        span = tracer.start_span(
            "inner",
            kind=SpanKind.CLIENT,
            attributes={"s": "v", "l": [1, 2]},
            links=[Link(linked, {"why": "x"})],
        )
        span.add_event("evt", {"n": 3}, timestamp=123)
        span.set_status(Status(StatusCode.ERROR, "broken"))
        span.end(end_time=span.start_time + 1000)  # type: ignore[attr-defined]
    original = next(s for s in exp.get_finished_spans() if s.name == "inner")
    back = from_wire(pickle.loads(pickle.dumps(to_wire(original))))  # noqa: S301 - our own bytes
    assert back.context == original.context
    assert back.parent == original.parent
    assert (back.name, back.kind, back.start_time, back.end_time) == (
        "inner",
        SpanKind.CLIENT,
        original.start_time,
        original.end_time,
    )
    assert dict(back.attributes or {}) == {"s": "v", "l": (1, 2)}
    assert [(e.name, dict(e.attributes or {}), e.timestamp) for e in back.events] == [("evt", {"n": 3}, 123)]
    assert [(lk.context, dict(lk.attributes or {})) for lk in back.links] == [(linked, {"why": "x"})]
    assert back.links[0].context.trace_state == linked.trace_state
    assert (back.status.status_code, back.status.description) == (StatusCode.ERROR, "broken")
    assert dict(back.resource.attributes) == dict(original.resource.attributes)
    assert back.instrumentation_scope == original.instrumentation_scope
    override = Resource({"service.name": "parent"})
    assert from_wire(to_wire(original), resource=override).resource is override


@pytest.mark.usefixtures("fresh_context")
def test_context_aware_pool_in_run_in_executor_under_instrument_propagates_once(
    exporter: InMemorySpanExporter,
) -> None:
    """run_in_executor with a ContextAwareProcessPoolExecutor while instrumented: right tags and parent."""
    import asyncio

    ctxprop.instrument()
    try:

        async def main() -> tuple[dict[str, Any], int]:
            with (
                ctxprop.ContextAwareProcessPoolExecutor(max_workers=1, mp_context=FORK) as pool,
                trace.get_tracer("p").start_as_current_span("submit") as parent,
            ):
                ctxprop.set_tag("job", "aio")
                out = await asyncio.get_running_loop().run_in_executor(pool, traced_task, 5)
                return out, parent.get_span_context().span_id

        out, parent_id = asyncio.run(main())
    finally:
        ctxprop.uninstrument()
    assert out["tags"] == {"job": "aio"}
    task = by_name(list(exporter.get_finished_spans()))["task-5"]
    assert task.parent is not None
    assert task.parent.span_id == parent_id


POOL_SCRIPT = """
import json, multiprocessing, os, sys
import ctxprop
from opentelemetry import trace

def work(i):
    with trace.get_tracer("worker").start_as_current_span("work") as span:
        span.set_attribute("i", i)
    return os.getpid()

if __name__ == "__main__":
    # The pool exists before init(), before any scope or span; nothing is set up in the workers.
    pool = ctxprop.ContextAwareProcessPoolExecutor(
        max_workers=2, mp_context=multiprocessing.get_context(sys.argv[1])
    )
    ctxprop.init(service_name="script", endpoint=os.environ["RX"], spool_dir=os.environ["SPOOL"])
    ctxprop.set_tag("run", "e2e")
    with trace.get_tracer("main").start_as_current_span("main") as main:
        pids = set(pool.map(work, range(40)))
    pool.shutdown()
    print(json.dumps({"main": format(main.get_span_context().span_id, "016x"),
                      "in_workers": os.getpid() not in pids}))
    # no close(): the normal exit delivers what is left
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_script_with_a_pool_delivers_every_worker_span_to_the_collector(
    method: str,
    receiver: OTLPReceiver,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A real script (spawn/forkserver workers, no set-up in them, no close()): all 40 worker spans reach the
    collector under the main span with the script's service name and tags; nothing on stderr."""
    script = tmp_path / "pool_script.py"
    script.write_text(POOL_SCRIPT)
    env = child_env({"RX": receiver.endpoint, "SPOOL": str(tmp_path / "spool")})
    done = subprocess.run(
        [sys.executable, str(script), method],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["in_workers"]
    assert receiver.wait_for_spans(41, 30)
    work = [s for s in receiver.spans if s.name == "work"]
    assert sorted(s.attributes["i"] for s in work) == list(range(40))
    assert {s.parent_span_id for s in work} == {out["main"]}
    assert {s.service_name for s in work} == {"script"}
    assert {s.attributes["run"] for s in work} == {"e2e"}


def _crash() -> None:
    os._exit(3)


@pytest.mark.usefixtures("fresh_context")
def test_a_crashed_worker_fails_the_futures_and_keeps_delivered_spans(exporter: InMemorySpanExporter) -> None:
    """A worker that dies mid-task breaks the pool as in the stdlib: its future and the queued ones raise
    BrokenProcessPool (none hangs), submit() then raises it, shutdown() returns; earlier spans arrived."""
    pool = ctxprop.ContextAwareProcessPoolExecutor(max_workers=1, mp_context=FORK)
    try:
        assert pool.submit(traced_task, 1).result(timeout=60)["pid"] != os.getpid()
        doomed, queued = pool.submit(_crash), pool.submit(traced_task, 2)
        for fut in (doomed, queued):
            with pytest.raises(BrokenProcessPool):
                fut.result(timeout=60)
        with pytest.raises(BrokenProcessPool):
            pool.submit(traced_task, 3)
    finally:
        pool.shutdown()
    names = {s.name for s in exporter.get_finished_spans()}
    assert "task-1" in names
    assert "task-2" not in names


@pytest.mark.usefixtures("fresh_context")
def test_max_tasks_per_child_replaces_workers_that_still_get_the_context(
    exporter: InMemorySpanExporter,
) -> None:
    """With max_tasks_per_child=1 every task runs in a new worker process; each one still gets the tags
    and the parent span, and every worker span reaches the exporter by shutdown()."""
    ctxprop.set_tag("job", "recycled")
    with (
        trace.get_tracer("parent").start_as_current_span("submit") as parent,
        ctxprop.ContextAwareProcessPoolExecutor(
            max_workers=2, mp_context=multiprocessing.get_context("forkserver"), max_tasks_per_child=1
        ) as pool,
    ):
        outs = list(pool.map(traced_task, range(4)))
    assert len({o["pid"] for o in outs}) == 4
    assert all(o["tags"] == {"job": "recycled"} for o in outs)
    tasks = [s for s in exporter.get_finished_spans() if s.name.startswith("task-")]
    assert sorted(s.name for s in tasks) == [f"task-{n}" for n in range(4)]
    assert {s.parent.span_id for s in tasks if s.parent} == {parent.get_span_context().span_id}


def test_non_callable_initializer_rejected_at_construction() -> None:
    """A non-callable initializer raises TypeError at construction, as the stdlib pool does."""
    with pytest.raises(TypeError, match="initializer must be a callable"):
        ProcessPoolExecutor(initializer=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="initializer must be a callable"):
        ctxprop.ContextAwareProcessPoolExecutor(initializer=42)  # type: ignore[arg-type]


# --- portable capture hooks: a third-party SDK's state crossing the process boundary ----------------------

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")


def apply_request(state: bytes) -> None:
    """The activator of RequestHook: runs in the worker, inside the task's own context copy."""
    REQUEST.set(pickle.loads(state))  # noqa: S301 - bytes this test's own parent made


def failing_activator(state: bytes) -> None:
    raise RuntimeError("activator fault")


class RequestHook:
    """A portable hook carrying REQUEST's value to process-pool workers (and nothing within the process)."""

    def capture(self) -> None:
        return None

    def activate(self, state: None) -> None:
        pass

    def capture_portable(self) -> bytes | None:
        value = REQUEST.get()
        return None if value == "none" else pickle.dumps(value)

    def portable_activator(self) -> Callable[[bytes], None]:
        return apply_request


class FaultyHook(RequestHook):
    """Every way a portable hook can misbehave, chosen by ``mode``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def capture_portable(self) -> bytes | None:
        if self.mode == "capture raises":
            raise RuntimeError("capture fault")
        if self.mode == "not bytes":
            return "text"  # type: ignore[return-value]
        return pickle.dumps("x")

    def portable_activator(self) -> Callable[[bytes], None]:
        if self.mode == "activator raises":
            return failing_activator
        if self.mode == "lambda":
            return lambda state: None  # cannot be imported by name in a worker: the hook stays local
        return apply_request


def request_in_worker() -> str:
    return REQUEST.get()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_portable_hook_state_reaches_each_task_and_only_it(method: str) -> None:
    """A registered portable hook's state reaches each task in the worker; the worker's own context and
    a later task without state never see an earlier task's value."""
    hook = RequestHook()
    _capture.register_capture_hook(hook)
    try:
        with ctxprop.ContextAwareProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context(method)
        ) as pool:
            # Started with REQUEST unset: a forked worker would otherwise inherit the first value.
            seen = [pool.submit(request_in_worker).result(timeout=60)]
            for value in ("r-1", "r-2", "none"):
                token = REQUEST.set(value)
                seen.append(pool.submit(request_in_worker).result(timeout=60))
                REQUEST.reset(token)
    finally:
        _capture.unregister_capture_hook(hook)
    assert seen == ["none", "r-1", "r-2", "none"]


def test_without_portable_hooks_the_envelope_carries_nothing_extra() -> None:
    """No portable hook registered: the envelope's hook slot is the empty tuple (one byte pickled)."""
    from ctxprop._process_pool import _envelope

    assert _capture._portable == ()
    assert _envelope()[5] == ()
    hook = RequestHook()
    _capture.register_capture_hook(hook)
    try:
        REQUEST.set("r-9")
        assert _envelope()[5] == (("test_process_pool", "apply_request", pickle.dumps("r-9")),)
    finally:
        _capture.unregister_capture_hook(hook)
    assert _capture._portable == ()


def test_faulty_portable_hooks_never_fail_a_task() -> None:
    """Portable hooks that raise, return non-bytes or name an activator that raises or cannot be imported
    leave tasks running normally; the faults are counted, not raised."""
    hooks = [FaultyHook(m) for m in ("capture raises", "not bytes", "activator raises", "lambda")]
    for hook in hooks:
        _capture.register_capture_hook(hook)
    try:
        assert [h.mode for h, _, _ in _capture._portable] == [
            "capture raises",
            "not bytes",
            "activator raises",
        ]
        assert ctxprop.stats()["capture_hook_errors"] == 1  # the lambda, at registration
        with ctxprop.ContextAwareProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            assert pool.submit(abs, -4).result(timeout=60) == 4
            worker_stats = pool.submit(ctxprop.stats).result(timeout=60)
    finally:
        for hook in hooks:
            _capture.unregister_capture_hook(hook)
    assert worker_stats["capture_hook_errors"] == 2  # the activator raised in each of the two tasks
    assert ctxprop.stats()["capture_hook_errors"] == 1 + 2 * 2  # capture raised, not bytes: per submit
